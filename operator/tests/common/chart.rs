//! What the chart's tests share: the all-on values file and readers of rendered manifests.

use serde_yaml::Value;

use super::chart;

pub fn all_on() -> String {
    chart().join("ci/all-on-values.yaml").display().to_string()
}

pub fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

pub fn seq(v: &Value) -> Vec<Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

pub fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

pub fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

pub fn env_of<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_sequence()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no env {name} in {container:?}"))
}
