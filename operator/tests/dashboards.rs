//! The Grafana dashboards (`helm/cortex/dashboards/*.json`) and the chart's PrometheusRule hold
//! only queries our binaries answer: a real Prometheus (Debian's `prometheus`) scrapes a real
//! gateway (`--kubernetes`), two real neurons and the operator every second while a short scenario
//! runs (chat completions, one streamed, one too long for the context; a model scaled to zero and
//! woken; an eviction; a reconcile error; a neuron killed mid-traffic). Then every PromQL
//! expression of every panel, template variable and alert is asked of Prometheus' HTTP API over
//! the run, and any that returns no finite value fails the test by name. The alerts also pass
//! `promtool check rules`, evaluate without error inside Prometheus, and the neuron-down alert's
//! condition holds once a neuron is gone.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use cortex_testkit::{ControlPlane, free_port};
use serde_json::{Value, json};

/// Template variables are replaced as Grafana would with "All" selected; `$__rate_interval` by a
/// window that spans several 1 s scrapes.
fn as_prometheus_sees_it(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__interval", "30s")
        .replace("$model", ".*")
        .replace("$instance", ".*")
}

/// The metric selectors in `expr` (every metric we export starts with `cortex_` or `vllm:`; `up`
/// is Prometheus' own), with their label matchers.
fn selectors(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let at_word =
            i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b':');
        let rest = &expr[i..];
        let starts = ["cortex_", "vllm:", "up{", "up "]
            .iter()
            .any(|p| rest.starts_with(p));
        if at_word && starts {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let mut sel = rest[..end].to_string();
            if rest[end..].starts_with('{') {
                let close = rest[end..].find('}').unwrap() + end + 1;
                sel = rest[..close].to_string();
            }
            i += sel.len();
            out.push(sel);
        } else {
            i += 1;
        }
    }
    out
}

struct Prom {
    url: String,
    http: reqwest::Client,
    start: f64,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

impl Prom {
    /// Series of `expr` over the run, one sample a second; Err with Prometheus' message.
    async fn range(&self, expr: &str) -> Result<Vec<Value>, String> {
        let r = self
            .http
            .get(format!("{}/api/v1/query_range", self.url))
            .query(&[
                ("query", expr.to_string()),
                ("start", format!("{:.3}", self.start)),
                ("end", format!("{:.3}", now())),
                ("step", "1".into()),
            ])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// How many series of `expr` have at least one finite value during the run.
    async fn series_with_data(&self, expr: &str) -> Result<usize, String> {
        let series = self.range(expr).await?;
        Ok(series
            .iter()
            .filter(|s| {
                s["values"].as_array().is_some_and(|vals| {
                    vals.iter().any(|p| {
                        p[1].as_str()
                            .and_then(|x| x.parse::<f64>().ok())
                            .is_some_and(f64::is_finite)
                    })
                })
            })
            .count())
    }

    async fn last(&self, expr: &str) -> f64 {
        let series = self.range(expr).await.unwrap_or_default();
        series
            .iter()
            .filter_map(|s| {
                s["values"].as_array()?.last()?[1]
                    .as_str()?
                    .parse::<f64>()
                    .ok()
            })
            .sum()
    }
}

/// Every PromQL expression in the chart's dashboards: (where, expression).
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = chart().join("dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        for v in d["templating"]["list"].as_array().unwrap() {
            if v["type"] == "query" {
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap();
                out.push((
                    format!("{name} variable ${}", v["name"].as_str().unwrap()),
                    q.to_string(),
                ));
            }
        }
        let mut panels: Vec<Value> = d["panels"].as_array().unwrap().clone();
        while let Some(p) = panels.pop() {
            panels.extend(p["panels"].as_array().cloned().unwrap_or_default());
            for t in p["targets"].as_array().cloned().unwrap_or_default() {
                out.push((
                    format!(
                        "{name} panel {:?} {}",
                        p["title"].as_str().unwrap_or(""),
                        t["refId"].as_str().unwrap_or("")
                    ),
                    t["expr"]
                        .as_str()
                        .expect("a target without expr")
                        .to_string(),
                ));
            }
        }
    }
    out
}

/// The chart's PrometheusRule (every switch on), as a Prometheus rule file.
fn rule_file(dir: &std::path::Path) -> (std::path::PathBuf, Vec<(String, String)>) {
    let objects = render_chart(
        &dir.join("helm"),
        &[
            "-f",
            chart().join("ci/all-on-values.yaml").to_str().unwrap(),
        ],
    );
    let rule = of_kind(&objects, "PrometheusRule")[0];
    let path = dir.join("cortex-rules.yaml");
    std::fs::write(&path, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    let mut alerts = Vec::new();
    for g in rule["spec"]["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            alerts.push((
                r["alert"].as_str().unwrap().to_string(),
                r["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    (path, alerts)
}

async fn chat(
    gateway: &str,
    model: &str,
    body: Value,
    timeout: u64,
) -> Result<(u16, String), String> {
    let mut body = body;
    body["model"] = json!(model);
    let r = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_secs(timeout))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.map_err(|e| e.to_string())?))
}

fn ask(content: &str) -> Value {
    json!({"max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": content}]})
}

/// Turns down status writes to ModelPlacements labelled `cortex-test/refuse-status`, so the
/// operator meets a real reconcile error (a ValidatingAdmissionPolicy: no webhook needed).
const REFUSE_STATUS: &str = r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: refuse-placement-status
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: ["cortex.helexa.io"]
      apiVersions: ["*"]
      operations: ["UPDATE"]
      resources: ["modelplacements/status"]
  validations:
  - expression: "!has(object.metadata.labels) || !('cortex-test/refuse-status' in object.metadata.labels)"
    message: this test refuses status writes to this ModelPlacement
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: refuse-placement-status
spec:
  policyName: refuse-placement-status
  validationActions: [Deny]
"#;

fn labelled_neuron(name: &str, port: u16) -> String {
    format!(
        "apiVersion: cortex.helexa.io/v1alpha1\nkind: Neuron\nmetadata:\n  name: {name}\n  labels:\n    host: {name}\nspec:\n  endpoint: http://127.0.0.1:{port}\n"
    )
}

async fn phase_is(cp: &ControlPlane, name: &str, want: &str, secs: u64) {
    wait_until(&format!("{name} {want}"), secs, || async {
        let out = cp
            .kubectl()
            .args(["get", "mp", name, "-o", "jsonpath={.status.phase}"])
            .output()
            .unwrap();
        let phase = String::from_utf8_lossy(&out.stdout).to_string();
        if phase == want { Ok(()) } else { Err(phase) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_data_from_the_real_binaries() {
    let prometheus = debian_tool("prometheus");
    let promtool = debian_tool("promtool");
    let cp = ControlPlane::start().await;
    install_crds(&cp);
    apply(&cp, "refuse-status", REFUSE_STATUS);
    let (rules, alerts) = rule_file(cp.dir());
    let checked = run_ok(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    assert!(checked.contains("SUCCESS"), "{checked}");

    // alpha has room for one SmolLM2 copy of 1024 tokens (about 120 MB; so a second placement
    // evicts), beta for more.
    let (alpha, beta) = (free_port(), free_port());
    let _alpha = start_neuron(alpha, &["--max-memory", "200000000"]);
    let mut beta_proc = Some(start_neuron(beta, &[]));
    apply(&cp, "alpha", &labelled_neuron("alpha", alpha));
    apply(&cp, "beta", &labelled_neuron("beta", beta));
    let op = free_port();
    let _operator = start_operator(&cp, op, "op", &[]);
    let (gport, gmport) = (free_port(), free_port());
    let _gateway = Proc(
        Command::new(bin("cortex"))
            .env("KUBECONFIG", &cp.kubeconfig)
            .args(["serve", "--kubernetes"])
            .args(["--listen", &format!("127.0.0.1:{gport}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{gmport}")])
            .args(["--neuron-token", TOKEN, "--load-timeout-secs", "30"])
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(cp.dir().join("gateway.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let gateway = format!("http://127.0.0.1:{gport}");

    // Prometheus scrapes everything every second, with the chart's rules loaded; the job names
    // are the ones the chart's ServiceMonitors and PodMonitor set.
    let pport = free_port();
    let config = cp.dir().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\nscrape_configs:\n- job_name: cortex-neuron\n  static_configs: [{{targets: ['127.0.0.1:{alpha}', '127.0.0.1:{beta}']}}]\n- job_name: cortex-gateway\n  static_configs: [{{targets: ['127.0.0.1:{gmport}']}}]\n- job_name: cortex-operator\n  static_configs: [{{targets: ['127.0.0.1:{op}']}}]\n",
            rules.display()
        ),
    )
    .unwrap();
    let _prometheus = Proc(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                cp.dir().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(cp.dir().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let prom = Prom {
        url: format!("http://127.0.0.1:{pport}"),
        http: reqwest::Client::new(),
        start: now(),
    };
    wait_until("Prometheus ready", 60, || async {
        match reqwest::get(format!("{}/-/ready", prom.url)).await {
            Ok(r) if r.status().is_success() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Steady traffic from here to the end, to a model on beta, so every rate and quantile has
    // samples on both sides of a scrape (a series born with its first request shows no rate).
    let ctx = "  contextLength: 1024\n";
    let on = |host: &str| format!("{ctx}  neuronSelector: {{matchLabels: {{host: {host}}}}}\n");
    apply(&cp, "steady", &smollm2_placement("steady", &on("beta")));
    phase_is(&cp, "steady", "Ready", 120).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, gateway) = (stop.clone(), gateway.clone());
        tokio::spawn(async move {
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Every other answer streamed: inter-token latency is measured on streams.
                let mut body = ask("Name a colour.");
                body["stream"] = json!(answered % 2 == 1);
                if let Ok((200, _)) = chat(&gateway, "steady", body, 3).await {
                    answered += 1;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            answered
        })
    };

    // Answers from alpha, one streamed, one too long for the context (a 4xx from the neuron).
    apply(&cp, "smollm2", &smollm2_placement("smollm2", &on("alpha")));
    phase_is(&cp, "smollm2", "Ready", 120).await;
    for q in ["What is the capital of France?", "Count to three."] {
        let (status, body) = chat(&gateway, "smollm2", ask(q), 120).await.unwrap();
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let mut streamed = ask("Say hello.");
    streamed["stream"] = json!(true);
    let (status, body) = chat(&gateway, "smollm2", streamed, 120).await.unwrap();
    assert!(status == 200 && body.contains("[DONE]"), "{status} {body}");
    let (status, body) = chat(&gateway, "smollm2", ask(&"word ".repeat(1500)), 120)
        .await
        .unwrap();
    assert_eq!(status, 400, "a prompt past the context: {body}");

    // A model that scales itself to zero on beta, then is woken by a request.
    apply(
        &cp,
        "napper",
        &smollm2_placement(
            "napper",
            &format!("  minReplicas: 0\n  idleTimeout: 2\n{}", on("beta")),
        ),
    );
    // Twice: a histogram series is born with its first observation, so only the second wake
    // shows in a rate.
    for _ in 0..2 {
        phase_is(&cp, "napper", "Idle", 120).await;
        let (status, body) = chat(&gateway, "napper", ask("Wake up."), 120)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }

    // An eviction on alpha (fresh pushes smollm2 out) and a reconcile error.
    apply(&cp, "fresh", &smollm2_placement("fresh", &on("alpha")));
    phase_is(&cp, "fresh", "Ready", 120).await;
    let (status, body) = chat(&gateway, "fresh", ask("Hi."), 120).await.unwrap();
    assert_eq!(status, 200, "{body}");
    apply(
        &cp,
        "refused",
        "apiVersion: cortex.helexa.io/v1alpha1\nkind: ModelPlacement\nmetadata:\n  name: refused\n  labels:\n    cortex-test/refuse-status: \"true\"\nspec:\n  model:\n    repo: unsloth/Qwen3-0.6B-GGUF\n    quant: Q4_K_M\n  neuronSelector: {matchLabels: {host: nowhere}}\n",
    );

    // beta dies under steady traffic: the next request meets a dead neuron (a 5xx in the
    // gateway's metrics) before the gateway knows.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(beta_proc.take());
    let _ = chat(&gateway, "steady", ask("Still there?"), 3).await;

    // Wait until Prometheus has seen all of it.
    wait_until("the scenario in Prometheus", 60, || async {
        let checks = [
            ("sum(cortex_operator_evictions_total)", 1.0),
            ("sum(cortex_operator_scale_to_zero_total)", 1.0),
            ("sum(cortex_operator_reconcile_errors_total)", 1.0),
            (
                "sum(cortex_gateway_requests_total{status_class=\"5xx\"})",
                1.0,
            ),
            (
                "sum(cortex_gateway_requests_total{status_class=\"4xx\"})",
                1.0,
            ),
            ("sum(cortex_gateway_cold_loads_total)", 2.0),
            ("count(up{job=\"cortex-neuron\"} == 0)", 1.0),
        ];
        for (q, min) in checks {
            let v = prom.last(q).await;
            if v < min {
                return Err(format!("{q} = {v}"));
            }
        }
        Ok(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = traffic.await.unwrap();
    assert!(answered >= 10, "only {answered} steady answers");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Every dashboard expression returns data. This list names what cannot, and why; keep it tiny.
    let no_data_expected: &[(&str, &str)] = &[];
    let mut failures = Vec::new();
    let queries = dashboard_queries();
    assert!(queries.len() > 50, "only {} queries found", queries.len());
    for (place, expr) in &queries {
        let (query, label) = match expr.strip_prefix("label_values(") {
            Some(rest) => {
                let (q, l) = rest.trim_end_matches(')').rsplit_once(',').unwrap();
                (q.trim().to_string(), Some(l.trim().to_string()))
            }
            None => (as_prometheus_sees_it(expr), None),
        };
        if no_data_expected.iter().any(|(e, _)| *e == expr.as_str()) {
            continue;
        }
        match prom.series_with_data(&query).await {
            Ok(n) if n > 0 => {
                if let Some(l) = label {
                    let series = prom.range(&query).await.unwrap();
                    if !series.iter().any(|s| s["metric"][l.as_str()].is_string()) {
                        failures.push(format!("{place}: no label {l} on {query}"));
                    }
                }
            }
            Ok(_) => {
                let empty: Vec<String> = {
                    let mut v = Vec::new();
                    for s in selectors(&query) {
                        if prom.series_with_data(&s).await.unwrap_or(0) == 0 {
                            v.push(s);
                        }
                    }
                    v
                };
                failures.push(format!(
                    "{place}: no data for {query} (selectors without data: {empty:?})"
                ));
            }
            Err(e) => failures.push(format!("{place}: Prometheus refused {query}: {e}")),
        }
    }

    // Every alert's selectors return data (the conditions themselves need a broken fleet), and
    // Prometheus evaluated every rule without error.
    for (alert, expr) in &alerts {
        let sels = selectors(expr);
        assert!(!sels.is_empty(), "{alert}: no selector found in {expr}");
        for s in sels {
            if prom.series_with_data(&s).await.unwrap_or(0) == 0 {
                failures.push(format!("alert {alert}: no data for its selector {s}"));
            }
        }
    }
    let down = alerts
        .iter()
        .find(|(a, _)| a == "CortexNeuronDown")
        .map(|(_, e)| e.clone())
        .unwrap();
    if prom.series_with_data(&down).await.unwrap_or(0) != 1 {
        failures.push(format!(
            "CortexNeuronDown's condition {down} does not hold with beta dead"
        ));
    }
    let rules_state: Value = reqwest::get(format!("{}/api/v1/rules", prom.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut evaluated = BTreeSet::new();
    for g in rules_state["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["name"].as_str().unwrap().to_string();
            if r["health"] != "ok" {
                failures.push(format!(
                    "alert {name} evaluates with {}: {}",
                    r["health"], r["lastError"]
                ));
            }
            evaluated.insert(name);
        }
    }
    assert_eq!(
        evaluated.len(),
        alerts.len(),
        "Prometheus loaded {evaluated:?}"
    );

    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries and {} alerts have problems:\n{}",
        failures.len(),
        queries.len(),
        alerts.len(),
        failures.join("\n")
    );
    eprintln!(
        "dashboards: {} queries and {} alerts checked against Prometheus over {:.0}s of real traffic",
        queries.len(),
        alerts.len(),
        now() - prom.start
    );
}

#[test]
fn selectors_are_found_with_their_matchers() {
    assert_eq!(
        selectors(
            "sum(rate(cortex_gateway_requests_total{status_class=\"5xx\"}[10m])) / sum(rate(cortex_gateway_requests_total[10m])) > 0.05"
        ),
        [
            "cortex_gateway_requests_total{status_class=\"5xx\"}",
            "cortex_gateway_requests_total"
        ]
    );
    assert_eq!(
        selectors("up{job=\"cortex-neuron\"} == 0 and vllm:num_requests_waiting > 1"),
        ["up{job=\"cortex-neuron\"}", "vllm:num_requests_waiting"]
    );
    assert_eq!(
        selectors(
            "histogram_quantile(0.9, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{instance=~\".*\"}[30s])))"
        ),
        ["vllm:time_to_first_token_seconds_bucket{instance=~\".*\"}"]
    );
}
