//! Metrics exposition in the classic Prometheus text format (0.0.4).
//!
//! `prometheus-client` writes OpenMetrics, where a counter family `x` has samples `x_total` and a
//! closing `# EOF`. Prometheus reads either, but tools that parse the classic format (`promtool
//! check metrics`, older scrapers) then see counters without help or type. Servers answer
//! OpenMetrics to clients that ask for it and this conversion to the rest.

/// Rewrites an OpenMetrics text exposition in the classic Prometheus text format.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.rsplit_once(' '))
        .filter(|(_, kind)| *kind == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|r| (*p, r)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Content type and body for a scrape: OpenMetrics when the `Accept` header asks for it (as
/// Prometheus does), the classic text format otherwise.
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            openmetrics,
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            openmetrics_to_prometheus(&openmetrics),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_total_in_help_and_type_and_eof_goes() {
        let om = "# HELP reqs Requests.\n# TYPE reqs counter\nreqs_total{a=\"b\"} 3\n# HELP up Up.\n# TYPE up gauge\nup 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(om),
            "# HELP reqs_total Requests.\n# TYPE reqs_total counter\nreqs_total{a=\"b\"} 3\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}
