//! `cortex status` and `cortex models`: tables of the fleet and the catalogue, read from a gateway.

use serde_json::Value;

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

async fn get(gateway: &str, path: &str, key: Option<&str>) -> anyhow::Result<Value> {
    let url = format!("{}{path}", gateway.trim_end_matches('/'));
    let mut rb = reqwest::Client::new().get(&url);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let res = rb.send().await.map_err(|e| {
        anyhow::anyhow!("cannot reach the gateway at {url}: {e}; is `cortex serve` running?")
    })?;
    let status = res.status();
    let body: Value = res.json().await?;
    if !status.is_success() {
        anyhow::bail!(
            "{url} answered {status}: {}",
            body["error"]["message"].as_str().unwrap_or("?")
        );
    }
    Ok(body)
}

/// The fleet: one line per neuron and device, then its models.
pub async fn status(gateway: &str, key: Option<&str>) -> anyhow::Result<String> {
    let v = get(gateway, "/cortex/fleet", key).await?;
    let mut out = format!(
        "{:<14} {:<28} {:<5} {:<34} {:>10} {:>10} {:>8}\n",
        "NEURON", "ENDPOINT", "UP", "DEVICE", "FREE", "TOTAL", "INFLIGHT"
    );
    for n in v["neurons"].as_array().into_iter().flatten() {
        let st = &n["status"];
        let devices = st["devices"].as_array().cloned().unwrap_or_default();
        let first = devices.first();
        out += &format!(
            "{:<14} {:<28} {:<5} {:<34} {:>10} {:>10} {:>8}\n",
            n["name"].as_str().unwrap_or("?"),
            n["endpoint"].as_str().unwrap_or("?"),
            if n["up"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            first
                .map(|d| format!(
                    "{} ({})",
                    d["name"].as_str().unwrap_or("?"),
                    d["kind"].as_str().unwrap_or("?")
                ))
                .unwrap_or_else(|| "-".into()),
            first
                .map(|d| gib(d["memoryFree"].as_u64().unwrap_or(0)))
                .unwrap_or_else(|| "-".into()),
            first
                .map(|d| gib(d["memoryTotal"].as_u64().unwrap_or(0)))
                .unwrap_or_else(|| "-".into()),
            st["inflight"].as_u64().unwrap_or(0),
        );
        for m in st["models"].as_array().into_iter().flatten() {
            out += &format!(
                "  └ {:<24} {:<11} {:>10}  in-flight {}  queued {}\n",
                m["id"].as_str().unwrap_or("?"),
                m["state"].as_str().unwrap_or("?"),
                gib(m["bytes"].as_u64().unwrap_or(0)),
                m["inflight"].as_u64().unwrap_or(0),
                m["queued"].as_u64().unwrap_or(0),
            );
        }
    }
    Ok(out)
}

/// The catalogue: every served name, its state and where it is loaded.
pub async fn models(gateway: &str, key: Option<&str>) -> anyhow::Result<String> {
    let v = get(gateway, "/v1/models", key).await?;
    let mut out = format!(
        "{:<28} {:<11} {:<7} {}\n",
        "MODEL", "STATE", "PINNED", "LOADED ON"
    );
    for m in v["data"].as_array().into_iter().flatten() {
        let on: Vec<String> = m["loaded_on"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                format!(
                    "{} ({})",
                    l["neuron"].as_str().unwrap_or("?"),
                    l["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        out += &format!(
            "{:<28} {:<11} {:<7} {}\n",
            m["id"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            m["pinned"].as_bool().unwrap_or(false),
            if on.is_empty() {
                "-".into()
            } else {
                on.join(", ")
            }
        );
    }
    Ok(out)
}
