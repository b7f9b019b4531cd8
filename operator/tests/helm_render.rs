//! The Helm chart `helm/cortex` rendered: `helm lint` and `helm template` with the default values
//! and with every switch on (`ci/all-on-values.yaml`); what the manifests promise (security
//! defaults, GPU scheduling, probes, one neuron token, the operator finding the DaemonSet's pods,
//! least-privilege RBAC rule by rule); wrong values refused by `values.schema.json` with its message.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::*;
use cortex_testkit::workspace_root;
use serde_yaml::Value;

use common::chart::*;

#[test]
fn the_charts_crds_are_the_crds_dir() {
    let ours = std::fs::read(workspace_root().join("crds/cortex.helexa.io.yaml")).unwrap();
    let charts = std::fs::read(chart().join("crds/cortex.helexa.io.yaml")).unwrap_or_default();
    assert!(
        ours == charts,
        "helm/cortex/crds/cortex.helexa.io.yaml differs from crds/; copy it: cp crds/cortex.helexa.io.yaml helm/cortex/crds/"
    );
}

#[test]
fn helm_lint_and_template_pass_with_default_and_all_on_values() {
    let home = tempfile::tempdir().unwrap();
    let all_on = all_on();
    for args in [&[][..], &["-f", all_on.as_str()][..]] {
        let lint = run_ok(
            helm(home.path(), None)
                .args(["lint", "--strict"])
                .arg(chart())
                .args(args),
        );
        assert!(lint.contains("0 chart(s) failed"), "{lint}");
    }

    let defaults = render_chart(home.path(), &[]);
    let everything = render_chart(home.path(), &["-f", &all_on]);
    let kinds = |objects: &[Value]| -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for o in objects {
            *m.entry(str_of(&o["kind"]).to_string()).or_default() += 1;
        }
        m
    };
    let base: BTreeMap<String, usize> = [
        ("ClusterRole", 2),
        ("ClusterRoleBinding", 2),
        ("DaemonSet", 1),
        ("Deployment", 2),
        ("NetworkPolicy", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Secret", 1),
        ("Service", 2),
        ("ServiceAccount", 3),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(kinds(&defaults), base, "objects with the default values");
    let mut all = base.clone();
    for (k, n) in [
        ("ConfigMap", 3),
        ("HorizontalPodAutoscaler", 1),
        ("Ingress", 1),
        ("PodMonitor", 1),
        ("PrometheusRule", 1),
        ("ServiceMonitor", 2),
    ] {
        all.insert(k.into(), n);
    }
    assert_eq!(kinds(&everything), all, "objects with every switch on");

    for objects in [&defaults, &everything] {
        security_defaults_hold(objects);
        the_operator_finds_the_daemonsets_pods(objects);
        one_neuron_token_for_everyone(objects);
        only_the_gateway_and_operator_reach_neurons(objects);
    }

    // GPU scheduling and the neuron's pod.
    for (objects, gpus) in [(&defaults, 1), (&everything, 2)] {
        let ds = named(objects, "DaemonSet", "cortex-neuron");
        let spec = pod_spec(ds);
        assert_eq!(spec["nodeSelector"]["nvidia.com/gpu.present"], "true");
        assert!(
            seq(&spec["tolerations"])
                .iter()
                .any(|t| t["key"] == "nvidia.com/gpu" && t["operator"] == "Exists"),
            "{spec:?}"
        );
        assert_eq!(spec["automountServiceAccountToken"], false);
        let c = &spec["containers"][0];
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], gpus);
        assert!(str_of(&c["image"]).ends_with("-cuda"), "{:?}", c["image"]);
        assert!(seq(&c["args"]).contains(&Value::from("--device=cuda")));
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert!(c["resources"]["requests"]["memory"].is_string());
    }
    let ds = named(&defaults, "DaemonSet", "cortex-neuron");
    assert_eq!(
        pod_spec(ds)["volumes"][0]["hostPath"]["path"],
        "/var/lib/cortex"
    );
    let ds = named(&everything, "DaemonSet", "cortex-neuron");
    let spec = pod_spec(ds);
    assert_eq!(spec["runtimeClassName"], "nvidia");
    let neuron_args = seq(&spec["containers"][0]["args"]);
    for want in ["--max-batch=16", "--kv-cache-memory=4000000000"] {
        assert!(
            neuron_args.contains(&Value::from(want)),
            "{want} missing: {neuron_args:?}"
        );
    }
    assert_eq!(
        spec["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "cortex-models"
    );
    assert_eq!(
        env_of(&spec["containers"][0], "HF_TOKEN")["valueFrom"]["secretKeyRef"]["name"],
        "hf-token"
    );
    assert!(
        seq(&spec["tolerations"])
            .iter()
            .any(|t| t["key"] == "dedicated"),
        "the user's tolerations are added to the GPU one"
    );

    // The CPU variant: no GPU asked for, the CPU image, device cpu.
    let cpu = render_chart(home.path(), &["--set", "neuron.gpu.enabled=false"]);
    let spec = pod_spec(named(&cpu, "DaemonSet", "cortex-neuron"));
    assert!(spec["nodeSelector"].is_null() && spec["tolerations"].is_null());
    let c = &spec["containers"][0];
    assert!(c["resources"]["limits"]["nvidia.com/gpu"].is_null());
    assert!(!str_of(&c["image"]).ends_with("-cuda"));
    assert!(seq(&c["args"]).contains(&Value::from("--device=cpu")));

    // Operator replicas and the gateway's switches.
    assert_eq!(
        named(&everything, "Deployment", "cortex-operator")["spec"]["replicas"],
        2
    );
    let gw = named(&everything, "Deployment", "cortex-gateway");
    let args = seq(&pod_spec(gw)["containers"][0]["args"]);
    for want in [
        "serve",
        "--kubernetes",
        "--api-keys-file=/etc/cortex/api-keys/api-keys",
    ] {
        assert!(
            args.contains(&Value::from(want)),
            "{want} missing: {args:?}"
        );
    }
    assert!(gw["spec"]["replicas"].is_null(), "the HPA owns replicas");
    let svc = named(&everything, "Service", "cortex-gateway");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");

    // Dashboards: one ConfigMap per file, labelled for Grafana's sidecar, the file unchanged.
    let dashboards = std::fs::read_dir(chart().join("dashboards")).unwrap();
    let mut files = 0;
    for f in dashboards {
        let path = f.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let cm = named(
            &everything,
            "ConfigMap",
            &format!("cortex-dashboard-{stem}"),
        );
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
        let shipped = str_of(&cm["data"][format!("cortex-{stem}.json").as_str()]);
        let file = std::fs::read_to_string(&path).unwrap();
        assert_eq!(shipped.trim_end(), file.trim_end(), "{stem} dashboard");
        let json: serde_json::Value = serde_json::from_str(shipped).unwrap();
        assert!(json["uid"].is_string() && json["panels"].is_array());
        files += 1;
    }
    assert_eq!(files, 3);

    // The rules pass promtool.
    let rules = named(&everything, "PrometheusRule", "cortex");
    let file = home.path().join("rules.yaml");
    std::fs::write(&file, serde_yaml::to_string(&rules["spec"]).unwrap()).unwrap();
    let out = run_ok(
        Command::new(debian_tool("promtool"))
            .args(["check", "rules"])
            .arg(&file),
    );
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");

    // The RBAC, rule by rule, for both scopes.
    assert_eq!(rbac(&defaults), expected_rbac(None));
    let scoped = render_chart(home.path(), &["--set", "watchNamespace=models"]);
    assert_eq!(rbac(&scoped), expected_rbac(Some("models")));
    let scoped_args =
        seq(&pod_spec(named(&scoped, "Deployment", "cortex-operator"))["containers"][0]["args"]);
    assert!(scoped_args.contains(&Value::from("--namespace=models")));
}

/// Non-root, read-only root filesystem, no capabilities, no privilege escalation, the runtime's
/// seccomp profile: on every pod and container. The one exception is the hostPath cache's init
/// container, root with CHOWN as its only capability.
fn security_defaults_hold(objects: &[Value]) {
    for w in objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "DaemonSet")
    {
        let name = str_of(&w["metadata"]["name"]);
        let spec = pod_spec(w);
        let pod = &spec["securityContext"];
        assert_eq!(pod["runAsNonRoot"], true, "{name}");
        assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        for c in seq(&spec["containers"]) {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(
                sc["capabilities"]["drop"],
                Value::from(vec!["ALL"]),
                "{name}"
            );
            assert!(
                sc["runAsUser"].is_null() && sc["runAsNonRoot"].is_null(),
                "{name}"
            );
            assert!(
                !c["resources"]["requests"].is_null(),
                "{name} has no requests"
            );
        }
        for c in seq(&spec["initContainers"]) {
            assert_eq!(c["name"], "cache-permissions");
            let sc = &c["securityContext"];
            assert_eq!(sc["capabilities"]["add"], Value::from(vec!["CHOWN"]));
            assert_eq!(sc["capabilities"]["drop"], Value::from(vec!["ALL"]));
            assert_eq!(sc["readOnlyRootFilesystem"], true);
            assert_eq!(sc["allowPrivilegeEscalation"], false);
        }
        let automount = &spec["automountServiceAccountToken"];
        assert_eq!(
            automount.as_bool().unwrap_or(true),
            name != "cortex-neuron",
            "{name}: only the operator and the gateway get an API token"
        );
    }
}

/// The operator's `--neuron-pods` selects exactly the labels of the DaemonSet's pods.
fn the_operator_finds_the_daemonsets_pods(objects: &[Value]) {
    let op = named(objects, "Deployment", "cortex-operator");
    let args = seq(&pod_spec(op)["containers"][0]["args"]);
    let selector = args
        .iter()
        .find_map(|a| str_of(a).strip_prefix("--neuron-pods="))
        .expect("--neuron-pods");
    let ds = named(objects, "DaemonSet", "cortex-neuron");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for pair in selector.split(',') {
        let (k, v) = pair.split_once('=').unwrap();
        assert_eq!(
            labels[k], v,
            "{pair} does not match the neuron pods' labels {labels:?}"
        );
    }
    assert!(selector.contains("app.kubernetes.io/component=neuron"));
    let gw = named(objects, "Deployment", "cortex-gateway");
    let gw_labels = &gw["spec"]["template"]["metadata"]["labels"];
    assert!(
        selector
            .split(',')
            .any(|p| p.split_once('=').is_some_and(|(k, v)| gw_labels[k] != v)),
        "the selector would pick gateway pods too"
    );
}

/// The neuron, the operator and the gateway read the same generated token.
fn one_neuron_token_for_everyone(objects: &[Value]) {
    let secret = named(objects, "Secret", "cortex-neuron-token");
    let token = str_of(&secret["data"]["token"]);
    assert!(token.len() >= 48, "a long random token: {token}");
    for (kind, name) in [
        ("DaemonSet", "cortex-neuron"),
        ("Deployment", "cortex-operator"),
        ("Deployment", "cortex-gateway"),
    ] {
        let c = &pod_spec(named(objects, kind, name))["containers"][0];
        let r = &env_of(c, "CORTEX_NEURON_TOKEN")["valueFrom"]["secretKeyRef"];
        assert_eq!(r["name"], "cortex-neuron-token", "{name}");
        assert_eq!(r["key"], "token", "{name}");
    }
}

fn only_the_gateway_and_operator_reach_neurons(objects: &[Value]) {
    let np = named(objects, "NetworkPolicy", "cortex-neuron");
    let ds = named(objects, "DaemonSet", "cortex-neuron");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    let rule = &np["spec"]["ingress"][0];
    let from = seq(&rule["from"]);
    let components: Vec<&str> = from
        .iter()
        .filter_map(|p| p["podSelector"]["matchLabels"]["app.kubernetes.io/component"].as_str())
        .collect();
    assert_eq!(components, ["gateway", "operator"]);
    assert!(
        from.iter().all(|p| !p["podSelector"].is_null()
            || p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                == "monitoring"),
        "only the configured extra peer: {from:?}"
    );
    assert_eq!(rule["ports"][0]["port"], 13131);
}

/// What each ServiceAccount may do, from the rendered (Cluster)Roles and their bindings:
/// "sa scope group/resource verb" lines (scope `*` for cluster-wide).
fn rbac(objects: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for b in objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        let role_kind = str_of(&b["roleRef"]["kind"]);
        let role_ns = b["metadata"]["namespace"].as_str();
        let role = objects
            .iter()
            .find(|o| {
                o["kind"] == role_kind
                    && o["metadata"]["name"] == b["roleRef"]["name"]
                    && (role_kind == "ClusterRole"
                        || o["metadata"]["namespace"].as_str() == role_ns)
            })
            .expect("a binding to a rendered role");
        let scope = match (b["kind"].as_str(), role_ns) {
            (Some("RoleBinding"), Some(ns)) => ns.to_string(),
            _ => "*".to_string(),
        };
        for s in seq(&b["subjects"]) {
            let sa = str_of(&s["name"]).trim_start_matches("cortex-").to_string();
            for r in seq(&role["rules"]) {
                for g in seq(&r["apiGroups"]) {
                    for res in seq(&r["resources"]) {
                        for v in seq(&r["verbs"]) {
                            let g = str_of(&g);
                            let g = if g.is_empty() { "core" } else { g };
                            out.insert(format!("{sa} {scope} {g}/{} {}", str_of(&res), str_of(&v)));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Exactly the calls each binary makes (see the operator's and the gateway's sources); the neuron
/// has no rights at all.
fn expected_rbac(watch: Option<&str>) -> BTreeSet<String> {
    let placements = watch.unwrap_or("*");
    let table: &[(&str, &str, &str, &str)] = &[
        (
            "operator",
            "*",
            "cortex.helexa.io/neurons",
            "get list watch create patch update delete",
        ),
        (
            "operator",
            "*",
            "cortex.helexa.io/neurons/status",
            "get patch update",
        ),
        (
            "operator",
            placements,
            "cortex.helexa.io/modelplacements",
            "get list watch patch update",
        ),
        (
            "operator",
            placements,
            "cortex.helexa.io/modelplacements/status",
            "get patch update",
        ),
        (
            "operator",
            placements,
            "cortex.helexa.io/modelplacements/scale",
            "get patch update",
        ),
        (
            "operator",
            placements,
            "events.k8s.io/events",
            "create patch",
        ),
        ("operator", "cortex", "core/pods", "get list watch"),
        (
            "operator",
            "cortex",
            "coordination.k8s.io/leases",
            "get create update",
        ),
        ("gateway", "*", "cortex.helexa.io/neurons", "get list watch"),
        (
            "gateway",
            placements,
            "cortex.helexa.io/modelplacements",
            "get list watch",
        ),
        (
            "gateway",
            placements,
            "cortex.helexa.io/modelplacements/scale",
            "get patch update",
        ),
    ];
    let mut out = BTreeSet::new();
    for (sa, scope, res, verbs) in table {
        for v in verbs.split(' ') {
            out.insert(format!("{sa} {scope} {res} {v}"));
        }
    }
    out
}

#[test]
fn a_wrong_value_is_refused_with_the_schemas_message() {
    let home = tempfile::tempdir().unwrap();
    let cases = [
        (
            "neuron.device=tpu",
            "at '/neuron/device': value must be one of '', 'auto', 'cpu', 'cuda'",
        ),
        (
            "operator.replicas=0",
            "at '/operator/replicas': minimum: got 0, want 1",
        ),
        (
            "operator.eviction=fifo",
            "at '/operator/eviction': value must be one of 'lru', 'priority'",
        ),
        (
            "neuron.modelCache.type=nfs",
            "at '/neuron/modelCache/type': value must be one of 'hostPath', 'pvc', 'emptyDir'",
        ),
        (
            "gateway.service.port=70000",
            "at '/gateway/service/port': maximum",
        ),
        (
            "metrics.prometheusRule.placementNotReadyFor=15 minutes",
            "at '/metrics/prometheusRule/placementNotReadyFor': '15 minutes' does not match pattern",
        ),
        (
            "neuron.gpu.cout=1",
            "at '/neuron/gpu': additional properties 'cout' not allowed",
        ),
        (
            "neuron.maxMemory=20GB",
            "at '/neuron/maxMemory': '20GB' does not match pattern",
        ),
    ];
    for (set, want) in cases {
        let out = helm(home.path(), None)
            .args(["template", "cortex"])
            .arg(chart())
            .args(["--set", set])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            err.contains("values don't meet the specifications of the schema")
                && err.contains(want),
            "--set {set}: wanted {want:?} in:\n{err}"
        );
    }
    // A PVC cache needs its claim: the template says which value to set.
    let out = helm(home.path(), None)
        .args(["template", "cortex"])
        .arg(chart())
        .args(["--set", "neuron.modelCache.type=pvc"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "neuron.modelCache.pvc.existingClaim is required when neuron.modelCache.type is pvc"
            ),
        "{err}"
    );
}
