//! `cortex status` and `cortex models`: tables of the fleet and the catalogue, read from a
//! gateway as the typed structs it writes them from.

use cortex_core::neuron::DeviceInfo;
use serde::de::DeserializeOwned;

use crate::fleet::view::{FleetView, ModelList};

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

async fn get<T: DeserializeOwned>(
    gateway: &str,
    path: &str,
    key: Option<&str>,
) -> anyhow::Result<T> {
    let url = format!("{}{path}", gateway.trim_end_matches('/'));
    let mut rb = reqwest::Client::new().get(&url);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let res = rb.send().await.map_err(|e| {
        anyhow::anyhow!("cannot reach the gateway at {url}: {e}; is `cortex serve` running?")
    })?;
    let status = res.status();
    let text = res.text().await?;
    if !status.is_success() {
        let message = serde_json::from_str::<cortex_core::openai::ErrorBody>(&text)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| "?".into());
        anyhow::bail!("{url} answered {status}: {message}");
    }
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{url} answered what is not a cortex gateway's JSON: {e}"))
}

/// The fleet: one line per neuron and device, then its models.
pub async fn status(gateway: &str, key: Option<&str>) -> anyhow::Result<String> {
    Ok(status_table(&get(gateway, "/cortex/fleet", key).await?))
}

/// The catalogue: every served name, its state and where it is loaded.
pub async fn models(gateway: &str, key: Option<&str>) -> anyhow::Result<String> {
    Ok(models_table(&get(gateway, "/v1/models", key).await?))
}

fn status_row(cells: [&str; 7]) -> String {
    format!(
        "{:<14}  {:<28}  {:<3}  {:<40}  {:>10}  {:>10}  {:>8}\n",
        cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6]
    )
}

/// A device as `cuda:0 NVIDIA H200` or `cpu AMD EPYC 7B13`, cut to the column's width.
fn device_label(d: &DeviceInfo) -> String {
    let key = match d.kind.as_str() {
        "cpu" => d.kind.clone(),
        kind => format!("{kind}:{}", d.index),
    };
    let label = format!("{key} {}", d.name);
    if label.chars().count() > 40 {
        label.chars().take(39).chain(['…']).collect()
    } else {
        label
    }
}

/// `/cortex/fleet` as a table: a line per neuron with its first device, a line for each further
/// device, then a line per model it holds. A neuron that never answered has no devices (`-`).
pub fn status_table(v: &FleetView) -> String {
    let mut out = status_row([
        "NEURON", "ENDPOINT", "UP", "DEVICE", "FREE", "TOTAL", "INFLIGHT",
    ]);
    for n in &v.neurons {
        let st = n.status.clone().unwrap_or_default();
        let inflight = st.inflight.to_string();
        let up = if n.up { "yes" } else { "no" };
        let (name, endpoint) = (n.name.as_str(), n.endpoint.as_str());
        if st.devices.is_empty() {
            out += &status_row([name, endpoint, up, "-", "-", "-", &inflight]);
        }
        for (i, d) in st.devices.iter().enumerate() {
            let free = gib(d.memory_free);
            let total = gib(d.memory_total);
            let label = device_label(d);
            out += &if i == 0 {
                status_row([name, endpoint, up, &label, &free, &total, &inflight])
            } else {
                status_row(["", "", "", &label, &free, &total, ""])
            };
        }
        for m in &st.models {
            out += &format!(
                "  └ {:<24}  {:<11}  {:>10}  in-flight {}  queued {}\n",
                m.id,
                m.state.as_str(),
                gib(m.bytes),
                m.inflight,
                m.queued,
            );
        }
    }
    out
}

/// `/v1/models` as a table: every served name, its state and where it is loaded.
pub fn models_table(v: &ModelList) -> String {
    let mut out = format!(
        "{:<28}  {:<11}  {:<6}  {}\n",
        "MODEL", "STATE", "PINNED", "LOADED ON"
    );
    for m in &v.data {
        let on: Vec<String> = m
            .loaded_on
            .iter()
            .map(|l| format!("{} ({})", l.neuron, l.state.as_str()))
            .collect();
        out += &format!(
            "{:<28}  {:<11}  {:<6}  {}\n",
            m.id,
            m.state.as_str(),
            m.pinned,
            if on.is_empty() {
                "-".into()
            } else {
                on.join(", ")
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_device_of_a_neuron_gets_a_line_with_its_free_memory() {
        let fleet = json!({"neurons": [{
            "name": "beast", "endpoint": "http://beast:13131", "up": true,
            "status": {"inflight": 3, "devices": [
                {"index": 0, "name": "NVIDIA H200", "kind": "cuda", "memoryTotal": 150u64 << 30, "memoryFree": 120u64 << 30},
                {"index": 1, "name": "NVIDIA H200", "kind": "cuda", "memoryTotal": 150u64 << 30, "memoryFree": 7u64 << 29},
                {"index": 0, "name": "AMD EPYC 9654 96-Core Processor with a long name", "kind": "cpu", "memoryTotal": 64u64 << 30, "memoryFree": 32u64 << 30},
            ], "models": [{"id": "qwen", "state": "ready", "bytes": 1u64 << 30, "inflight": 3, "queued": 1}]},
        }, {"name": "late", "endpoint": "http://late:13131", "up": false, "status": null}]});
        let table = status_table(&serde_json::from_value(fleet).unwrap());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6, "{table}");
        assert!(lines[1].starts_with("beast ") && lines[1].contains("cuda:0 NVIDIA H200"));
        assert!(lines[1].contains("120.0 GiB") && lines[1].trim_end().ends_with(" 3"));
        assert!(lines[2].starts_with("     ") && lines[2].contains("cuda:1 NVIDIA H200"));
        assert!(lines[2].contains("3.5 GiB") && lines[2].contains("150.0 GiB"));
        assert!(lines[3].contains("cpu AMD EPYC 9654") && lines[3].contains("32.0 GiB"));
        assert!(lines[3].contains('…'), "a long name is cut: {}", lines[3]);
        assert!(lines[4].contains("qwen") && lines[4].contains("queued 1"));
        assert!(lines[5].starts_with("late ") && lines[5].contains(" no "));
    }
}
