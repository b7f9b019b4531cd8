//! The Containerfiles against the workspace and the Helm chart.

mod common;

use common::*;
use cortex_testkit::workspace_root;
use serde_yaml::Value;

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
