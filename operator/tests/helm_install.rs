//! The Helm chart on a real API server: every object accepted under strict validation, `helm
//! install`, `upgrade` (the generated neuron token kept) and `uninstall`, RBAC proven with `kubectl
//! auth can-i` as each ServiceAccount.

mod common;

use std::path::Path;

use common::*;
use cortex_testkit::{ControlPlane, workspace_root};

use common::chart::*;

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
