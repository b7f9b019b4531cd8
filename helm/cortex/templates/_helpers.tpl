{{/* Names: <release>-cortex, or the release name when it already says cortex. */}}
{{- define "cortex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cortex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: cortex.component (dict "ctx" $ "component" "neuron"). */}}
{{- define "cortex.component" -}}
{{- printf "%s-%s" (include "cortex.fullname" .ctx | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "cortex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "cortex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cortex
{{- end -}}

{{/* Selector labels of one component; the operator finds neuron pods by these. */}}
{{- define "cortex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cortex.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cortex.componentLabels" -}}
{{ include "cortex.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The operator's --neuron-pods: exactly the neuron DaemonSet's selector labels. */}}
{{- define "cortex.neuronPodSelector" -}}
{{- $labels := include "cortex.selectorLabels" (dict "ctx" . "component" "neuron") | fromYaml -}}
{{- $pairs := list -}}
{{- range $k := keys $labels | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%s" $k (get $labels $k)) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{- define "cortex.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag -}}
{{- printf "%s:%s%s" .image.repository $tag (default "" .suffix) -}}
{{- end -}}

{{- define "cortex.neuronTokenSecret" -}}
{{- if .Values.neuronToken.existingSecret -}}
{{- .Values.neuronToken.existingSecret -}}
{{- else -}}
{{- include "cortex.component" (dict "ctx" . "component" "neuron-token") -}}
{{- end -}}
{{- end -}}

{{/* The neuron token as an environment variable, for every component. */}}
{{- define "cortex.neuronTokenEnv" -}}
- name: CORTEX_NEURON_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "cortex.neuronTokenSecret" . }}
      key: {{ .Values.neuronToken.key }}
{{- end -}}

{{- define "cortex.logEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logging.level | quote }}
- name: CORTEX_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
{{- end -}}

{{/* Pod-level fields every component shares. */}}
{{- define "cortex.podCommon" -}}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* RBAC rules, one list per component and scope, so the Roles and the tests agree. */}}
{{- define "cortex.rules.operator.placements" -}}
- apiGroups: [cortex.helexa.io]
  resources: [modelplacements]
  verbs: [get, list, watch, patch, update]
- apiGroups: [cortex.helexa.io]
  resources: [modelplacements/status, modelplacements/scale]
  verbs: [get, patch, update]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{- define "cortex.rules.operator.neurons" -}}
- apiGroups: [cortex.helexa.io]
  resources: [neurons]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [cortex.helexa.io]
  resources: [neurons/status]
  verbs: [get, patch, update]
{{- end -}}

{{- define "cortex.rules.operator.local" -}}
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, update]
{{- end -}}

{{- define "cortex.rules.gateway.placements" -}}
- apiGroups: [cortex.helexa.io]
  resources: [modelplacements]
  verbs: [get, list, watch]
- apiGroups: [cortex.helexa.io]
  resources: [modelplacements/scale]
  verbs: [get, patch, update]
{{- end -}}

{{- define "cortex.rules.gateway.neurons" -}}
- apiGroups: [cortex.helexa.io]
  resources: [neurons]
  verbs: [get, list, watch]
{{- end -}}
