//! The Helm chart `helm/cortex`: `helm lint` and `helm template` with the default values and with
//! every switch on (`ci/all-on-values.yaml`); what the manifests promise (security defaults, GPU
//! scheduling, probes, one neuron token, the operator finding the DaemonSet's pods, least-privilege
//! RBAC rule by rule); wrong values refused by `values.schema.json` with its message; and on a real
//! API server: every object accepted under strict validation, `helm install`, `upgrade` (the
//! generated neuron token kept) and `uninstall`, RBAC proven with `kubectl auth can-i` as each
//! ServiceAccount, and the real operator, gateway and neuron run with the chart's command lines
//! and the chart's ServiceAccount tokens through a whole placement life.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use cortex_testkit::{ControlPlane, free_port, workspace_root};
use serde_yaml::Value;

fn all_on() -> String {
    chart().join("ci/all-on-values.yaml").display().to_string()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn seq(v: &Value) -> Vec<Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn env_of<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_sequence()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no env {name} in {container:?}"))
}

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

/// Applies the Prometheus Operator CRDs (the subset in tests/data) and waits for them.
fn install_monitoring_crds(cp: &ControlPlane) {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/monitoring.coreos.com.yaml");
    cp.kubectl_ok(&["apply", "-f", crds.to_str().unwrap()]);
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/podmonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
        "--timeout=60s",
    ]);
}

fn can_i(cp: &ControlPlane, sa: &str, verb: &str, what: &str, ns: Option<&str>) -> bool {
    let (resource, sub) = match what.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (what, None),
    };
    let mut c = cp.kubectl();
    c.args(["auth", "can-i", verb, resource])
        .arg(format!("--as=system:serviceaccount:cortex:cortex-{sa}"));
    if let Some(s) = sub {
        c.arg(format!("--subresource={s}"));
    }
    match ns {
        Some(ns) => c.args(["-n", ns]),
        None => c.arg("--all-namespaces"),
    };
    let out = c.output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        said == "yes" || said == "no",
        "kubectl auth can-i {verb} {what} as {sa}: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    said == "yes"
}

fn token_of(cp: &ControlPlane) -> String {
    cp.kubectl_ok(&[
        "get",
        "secret",
        "cortex-neuron-token",
        "-n",
        "cortex",
        "-o",
        "jsonpath={.data.token}",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_upgrades_and_uninstalls_on_a_real_api_server() {
    let cp = ControlPlane::start().await;
    let home = cp.dir().join("helm");
    install_monitoring_crds(&cp);
    let all_on = all_on();

    // A wrong value fails the install itself with the schema's message; nothing is installed.
    let out = helm(&home, Some(&cp))
        .args(["install", "cortex"])
        .arg(chart())
        .args([
            "-n",
            "cortex",
            "--create-namespace",
            "--set",
            "neuron.device=tpu",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("at '/neuron/device': value must be one of"),
        "{err}"
    );
    assert_eq!(
        run_ok(helm(&home, Some(&cp)).args(["list", "-A", "-q"])).trim(),
        ""
    );

    // Every object of the all-on chart passes the API server's strict validation.
    cp.kubectl_ok(&["create", "namespace", "cortex"]);
    let rendered = run_ok(
        helm(&home, Some(&cp))
            .args(["template", "cortex"])
            .arg(chart())
            .args(["-n", "cortex", "-f", &all_on]),
    );
    let file = cp.dir().join("rendered.yaml");
    std::fs::write(&file, &rendered).unwrap();
    cp.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        "cortex",
        "-f",
        file.to_str().unwrap(),
    ]);

    // install: the CRDs from the chart's crds/, then every object; NOTES.txt gives the endpoint.
    let notes = run_ok(
        helm(&home, Some(&cp))
            .args(["install", "cortex"])
            .arg(chart())
            .args(["-n", "cortex", "-f", &all_on]),
    );
    assert!(notes.contains("https://cortex.example.com/v1"), "{notes}");
    assert!(!notes.contains("WARNING"), "API keys are set: {notes}");
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/modelplacements.cortex.helexa.io",
        "crd/neurons.cortex.helexa.io",
        "--timeout=60s",
    ]);
    let manifest = cp.dir().join("manifest.yaml");
    std::fs::write(
        &manifest,
        run_ok(helm(&home, Some(&cp)).args(["get", "manifest", "cortex", "-n", "cortex"])),
    )
    .unwrap();
    let listed = cp.kubectl_ok(&["get", "-f", manifest.to_str().unwrap(), "-o", "name"]);
    let expected = rendered.matches("\nkind: ").count();
    assert_eq!(
        listed.lines().count(),
        expected,
        "objects on the server:\n{listed}"
    );
    let token = token_of(&cp);
    assert!(token.len() >= 64, "{token}");

    // The examples are valid ModelPlacements for the installed CRDs.
    let examples = workspace_root().join("examples/kubernetes");
    let out = cp.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        "default",
        "-f",
        examples.to_str().unwrap(),
    ]);
    assert_eq!(
        out.matches("modelplacement.cortex.helexa.io/").count(),
        3,
        "{out}"
    );

    // RBAC as each ServiceAccount: what it needs is allowed, the rest denied.
    let checks: &[(&str, &str, &str, Option<&str>, bool)] = &[
        ("gateway", "list", "modelplacements", None, true),
        ("gateway", "watch", "modelplacements", Some("default"), true),
        (
            "gateway",
            "patch",
            "modelplacements/scale",
            Some("default"),
            true,
        ),
        ("gateway", "list", "neurons", None, true),
        (
            "gateway",
            "delete",
            "modelplacements",
            Some("default"),
            false,
        ),
        (
            "gateway",
            "patch",
            "modelplacements",
            Some("default"),
            false,
        ),
        (
            "gateway",
            "create",
            "modelplacements",
            Some("default"),
            false,
        ),
        (
            "gateway",
            "patch",
            "modelplacements/status",
            Some("default"),
            false,
        ),
        ("gateway", "patch", "neurons", None, false),
        ("gateway", "get", "secrets", Some("cortex"), false),
        ("gateway", "list", "pods", Some("cortex"), false),
        ("operator", "patch", "neurons/status", None, true),
        ("operator", "create", "neurons", None, true),
        ("operator", "delete", "neurons", None, true),
        (
            "operator",
            "update",
            "modelplacements",
            Some("default"),
            true,
        ),
        (
            "operator",
            "patch",
            "modelplacements/status",
            Some("default"),
            true,
        ),
        (
            "operator",
            "patch",
            "modelplacements/scale",
            Some("default"),
            true,
        ),
        (
            "operator",
            "create",
            "events.events.k8s.io",
            Some("default"),
            true,
        ),
        ("operator", "watch", "pods", Some("cortex"), true),
        (
            "operator",
            "create",
            "leases.coordination.k8s.io",
            Some("cortex"),
            true,
        ),
        (
            "operator",
            "update",
            "leases.coordination.k8s.io",
            Some("cortex"),
            true,
        ),
        ("operator", "get", "secrets", Some("cortex"), false),
        ("operator", "list", "secrets", None, false),
        (
            "operator",
            "delete",
            "modelplacements",
            Some("default"),
            false,
        ),
        (
            "operator",
            "create",
            "modelplacements",
            Some("default"),
            false,
        ),
        ("operator", "list", "pods", Some("default"), false),
        ("operator", "create", "pods", Some("cortex"), false),
        (
            "operator",
            "delete",
            "leases.coordination.k8s.io",
            Some("cortex"),
            false,
        ),
        (
            "operator",
            "create",
            "leases.coordination.k8s.io",
            Some("default"),
            false,
        ),
        ("neuron", "get", "secrets", Some("cortex"), false),
        ("neuron", "list", "pods", Some("cortex"), false),
        ("neuron", "get", "modelplacements", Some("default"), false),
        ("neuron", "list", "neurons", None, false),
        ("neuron", "get", "configmaps", Some("cortex"), false),
    ];
    let mut wrong = Vec::new();
    for &(sa, verb, what, ns, want) in checks {
        if can_i(&cp, sa, verb, what, ns) != want {
            wrong.push(format!(
                "{sa} {} {verb} {what} in {}",
                if want { "cannot" } else { "can" },
                ns.unwrap_or("all namespaces")
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "RBAC is not as designed:\n{}",
        wrong.join("\n")
    );
    // The neuron may do nothing beyond what every authenticated user may (discovery, asking
    // about itself).
    for ns in ["cortex", "default"] {
        let list = cp.kubectl_ok(&[
            "auth",
            "can-i",
            "--list",
            "--as=system:serviceaccount:cortex:cortex-neuron",
            "-n",
            ns,
        ]);
        for line in list.lines().skip(1) {
            let resource = line.split_whitespace().next().unwrap_or_default();
            assert!(
                resource.starts_with("selfsubject")
                    || resource.is_empty()
                    || line.trim_start().starts_with('['),
                "the neuron's ServiceAccount may do more than discovery in {ns}: {line}\n{list}"
            );
        }
    }

    // upgrade: a changed value is applied, the generated token is kept.
    run_ok(
        helm(&home, Some(&cp))
            .args(["upgrade", "cortex"])
            .arg(chart())
            .args([
                "-n",
                "cortex",
                "-f",
                &all_on,
                "--set",
                "operator.replicas=3",
            ]),
    );
    assert_eq!(
        cp.kubectl_ok(&[
            "get",
            "deploy",
            "cortex-operator",
            "-n",
            "cortex",
            "-o",
            "jsonpath={.spec.replicas}",
        ]),
        "3"
    );
    assert_eq!(token_of(&cp), token, "the neuron token changed on upgrade");
    let history = run_ok(helm(&home, Some(&cp)).args(["history", "cortex", "-n", "cortex"]));
    assert!(
        history.contains("deployed") && history.lines().count() == 3,
        "{history}"
    );

    // uninstall: every object goes; the CRDs (and so users' ModelPlacements) stay, as Helm does.
    run_ok(helm(&home, Some(&cp)).args(["uninstall", "cortex", "-n", "cortex"]));
    let left = cp
        .kubectl()
        .args(["get", "-f", manifest.to_str().unwrap(), "-o", "name"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    cp.kubectl_ok(&["get", "crd", "modelplacements.cortex.helexa.io"]);
}

/// A kubeconfig for `cp` that authenticates with `token`.
fn kubeconfig_with_token(cp: &ControlPlane, name: &str, token: &str) -> PathBuf {
    let path = cp.dir().join(format!("{name}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: test\n",
            cp.url
        ),
    )
    .unwrap();
    path
}

/// The args of a workload's first container as installed, with `--flag=` values replaced.
fn installed_args(cp: &ControlPlane, what: &str, replace: &[(&str, String)]) -> Vec<String> {
    let json = cp.kubectl_ok(&[
        "get",
        what,
        "-n",
        "cortex",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    let args: Vec<String> = serde_json::from_str(&json).unwrap();
    args.into_iter()
        .map(|a| {
            for (flag, value) in replace {
                if a.starts_with(&format!("{flag}=")) {
                    return format!("{flag}={value}");
                }
            }
            a
        })
        .collect()
}

/// The plain `value:` environment variables of a workload's first container.
fn installed_env(cp: &ControlPlane, what: &str) -> Vec<(String, String)> {
    let json = cp.kubectl_ok(&[
        "get",
        what,
        "-n",
        "cortex",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env}",
    ]);
    let env: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    env.iter()
        .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
        .collect()
}

async fn chat(gateway: &str, model: &str) -> Result<String, String> {
    let r = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": model,
            "max_tokens": 12,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        }))
        .timeout(std::time::Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    Ok(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_run_with_the_charts_command_lines_and_service_accounts() {
    let cp = ControlPlane::start().await;
    let home = cp.dir().join("helm");
    let notes = run_ok(
        helm(&home, Some(&cp))
            .args(["install", "cortex"])
            .arg(chart())
            .args(["-n", "cortex", "--create-namespace"])
            .args(["--set", "neuron.gpu.enabled=false"]),
    );
    for want in [
        "kubectl -n cortex port-forward svc/cortex-gateway 31313",
        "http://cortex-gateway.cortex.svc:31313/v1",
        "WARNING: gateway.apiKeys.existingSecret is empty",
    ] {
        assert!(notes.contains(want), "NOTES.txt lacks {want:?}:\n{notes}");
    }
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/modelplacements.cortex.helexa.io",
        "crd/neurons.cortex.helexa.io",
        "--timeout=60s",
    ]);
    // The token the chart generated, as the pods read it from the Secret.
    let token = cp.kubectl_ok(&[
        "get",
        "secret",
        "cortex-neuron-token",
        "-n",
        "cortex",
        "-o",
        "go-template={{.data.token | base64decode}}",
    ]);
    assert_eq!(token.len(), 48, "{token}");

    // The neuron, with the DaemonSet's arguments (address and model directory made local).
    let nport = free_port();
    let nargs = installed_args(
        &cp,
        "daemonset/cortex-neuron",
        &[
            ("--listen", format!("127.0.0.1:{nport}")),
            ("--model-dirs", models_dir().display().to_string()),
        ],
    );
    assert!(nargs.contains(&"--device=cpu".to_string()), "{nargs:?}");
    let log = |name: &str| std::fs::File::create(cp.dir().join(name)).unwrap();
    let _neuron = Proc(
        Command::new(bin("neuron"))
            .args(&nargs)
            .envs(installed_env(&cp, "daemonset/cortex-neuron"))
            .env("HF_HOME", cp.dir().join("hf"))
            .env("HOME", cp.dir())
            .env("CORTEX_NEURON_TOKEN", &token)
            .env("CORTEX_NODE_NAME", "gpu-node-1")
            .stdout(Stdio::null())
            .stderr(log("neuron.log"))
            .spawn()
            .unwrap(),
    );

    // A neuron pod as the DaemonSet would make it (no kubelet runs here), with the template's labels.
    let labels: BTreeMap<String, String> = serde_json::from_str(&cp.kubectl_ok(&[
        "get",
        "daemonset/cortex-neuron",
        "-n",
        "cortex",
        "-o",
        "jsonpath={.spec.template.metadata.labels}",
    ]))
    .unwrap();
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let pod = cp.dir().join("pod.yaml");
    std::fs::write(
        &pod,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: cortex-neuron-x1\n  namespace: cortex\n  labels:\n{labels}spec:\n  nodeName: gpu-node-1\n  containers:\n  - name: neuron\n    image: ghcr.io/helexa/cortex-neuron:0.1.0\n"
        ),
    )
    .unwrap();
    cp.kubectl_ok(&["apply", "-f", pod.to_str().unwrap()]);
    cp.kubectl_ok(&[
        "patch",
        "pod",
        "cortex-neuron-x1",
        "-n",
        "cortex",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"127.0.0.1","podIPs":[{"ip":"127.0.0.1"}]}}"#,
    ]);

    // The operator and the gateway: the Deployments' arguments, their ServiceAccounts' tokens.
    let sa_token = |sa: &str| {
        cp.kubectl_ok(&["create", "token", sa, "-n", "cortex", "--duration=1h"])
            .trim()
            .to_string()
    };
    let op_port = free_port();
    let op_args = installed_args(
        &cp,
        "deployment/cortex-operator",
        &[
            ("--metrics-listen", format!("127.0.0.1:{op_port}")),
            ("--neuron-port", nport.to_string()),
        ],
    );
    let _operator = Proc(
        Command::new(bin("cortex-operator"))
            .args(&op_args)
            .envs(installed_env(&cp, "deployment/cortex-operator"))
            .env(
                "KUBECONFIG",
                kubeconfig_with_token(&cp, "operator", &sa_token("cortex-operator")),
            )
            .env("POD_NAMESPACE", "cortex")
            .env("POD_NAME", "cortex-operator-abc")
            .env("CORTEX_NEURON_TOKEN", &token)
            .env("CORTEX_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(log("operator.log"))
            .spawn()
            .unwrap(),
    );
    let gport = free_port();
    let gw_args = installed_args(
        &cp,
        "deployment/cortex-gateway",
        &[
            ("--listen", format!("127.0.0.1:{gport}")),
            ("--metrics-listen", format!("127.0.0.1:{}", free_port())),
        ],
    );
    let _gateway = Proc(
        Command::new(bin("cortex"))
            .args(&gw_args)
            .envs(installed_env(&cp, "deployment/cortex-gateway"))
            .env(
                "KUBECONFIG",
                kubeconfig_with_token(&cp, "gateway", &sa_token("cortex-gateway")),
            )
            .env("CORTEX_NEURON_TOKEN", &token)
            .env("CORTEX_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(log("gateway.log"))
            .spawn()
            .unwrap(),
    );

    // The operator (pods list/watch, neurons create, neurons/status) registers the pod's neuron.
    wait_until("a ready Neuron for the neuron pod", 60, || async {
        let out = cp
            .kubectl()
            .args([
                "get",
                "neuron",
                "gpu-node-1",
                "-o",
                "jsonpath={.status.ready}",
            ])
            .output()
            .unwrap();
        match String::from_utf8_lossy(&out.stdout).trim() {
            "true" => Ok(()),
            other => Err(format!("ready={other:?}")),
        }
    })
    .await;
    assert!(
        cp.kubectl_ok(&[
            "get",
            "lease",
            "cortex-operator",
            "-n",
            "cortex",
            "-o",
            "jsonpath={.spec.holderIdentity}"
        ]) == "cortex-operator-abc"
    );

    // A placement: finalizer, load, status and Events, all with the operator's own rights.
    apply(
        &cp,
        "smollm2",
        &smollm2_placement("smollm2", "  contextLength: 1024\n"),
    );
    let phase = || cp.kubectl_ok(&["get", "mp", "smollm2", "-o", "jsonpath={.status.phase}"]);
    wait_until("smollm2 Ready", 120, || async {
        match phase().as_str() {
            "Ready" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    let gateway = format!("http://127.0.0.1:{gport}");
    let mut answer = Err(String::new());
    for _ in 0..50 {
        answer = chat(&gateway, "smollm2").await;
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        answer.as_ref().is_ok_and(|a| a.contains("Paris")),
        "{answer:?}"
    );

    // Scaled to zero, a request wakes it: the gateway's scale subresource right at work.
    cp.kubectl_ok(&["scale", "mp/smollm2", "--replicas=0"]);
    wait_until("smollm2 Idle", 60, || async {
        match phase().as_str() {
            "Idle" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    let answer = chat(&gateway, "smollm2").await;
    assert!(
        answer.as_ref().is_ok_and(|a| a.contains("Paris")),
        "{answer:?}"
    );
    assert_eq!(
        cp.kubectl_ok(&["get", "mp", "smollm2", "-o", "jsonpath={.spec.replicas}"]),
        "1"
    );
    let events = cp.kubectl_ok(&["get", "events.events.k8s.io", "-n", "default", "-o", "name"]);
    assert!(
        !events.trim().is_empty(),
        "the operator's Events were not written"
    );

    // Delete: the operator's finalizer unloads and lets go.
    cp.kubectl_ok(&["delete", "mp/smollm2", "--wait=true", "--timeout=60s"]);

    for name in ["operator.log", "gateway.log"] {
        let text = std::fs::read_to_string(cp.dir().join(name)).unwrap();
        assert!(
            !text.contains("forbidden") && !text.contains("Forbidden"),
            "{name} shows a call its ServiceAccount may not make:\n{text}"
        );
    }
}

/// The Containerfiles cannot be built here (no container engine), so their drift is checked:
/// every workspace member is copied in, the binaries they install are the ones cargo builds and
/// the chart runs, as the user and on the ports the chart expects.
#[test]
fn the_containerfiles_match_the_workspace_and_the_chart() {
    let root = workspace_root();
    let members: Vec<String> = {
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let line = manifest
            .lines()
            .find(|l| l.starts_with("members"))
            .expect("workspace members");
        line.split('"')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect()
    };
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let user = values["podSecurityContext"]["runAsUser"].as_u64().unwrap();
    for (file, binaries, ports) in [
        (
            "Containerfile",
            &["cortex-operator", "cortex", "neuron"][..],
            vec![
                values["operator"]["metricsPort"].as_u64().unwrap(),
                values["gateway"]["service"]["port"].as_u64().unwrap(),
                values["gateway"]["service"]["metricsPort"]
                    .as_u64()
                    .unwrap(),
                values["neuron"]["port"].as_u64().unwrap(),
            ],
        ),
        (
            "Containerfile.cuda",
            &["neuron"][..],
            vec![values["neuron"]["port"].as_u64().unwrap()],
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for m in &members {
            assert!(
                text.contains(&format!("COPY {m} {m}")),
                "{file} does not copy {m}"
            );
        }
        for line in text
            .lines()
            .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        {
            for src in line
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .split_last()
                .unwrap()
                .1
            {
                assert!(root.join(src).exists(), "{file}: {src} does not exist");
            }
        }
        for b in binaries {
            assert!(
                text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{b}\"]")),
                "{file} does not run {b}"
            );
        }
        for p in ports {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("EXPOSE")
                        && l.split_whitespace().any(|w| w == p.to_string())),
                "{file} does not expose {p}"
            );
        }
        let users = text.lines().filter(|l| l.starts_with("USER ")).count();
        assert_eq!(
            users,
            text.lines().filter(|l| l.starts_with("ENTRYPOINT")).count(),
            "{file}: every image sets its user"
        );
        assert!(
            text.lines()
                .filter(|l| l.starts_with("USER "))
                .all(|l| l == format!("USER {user}:{user}")),
            "{file}: images run as {user}, as the chart's podSecurityContext"
        );
    }
}
