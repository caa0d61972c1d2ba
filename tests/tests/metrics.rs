//! End to end: the admin plane's `/metrics` after real traffic through a real `moat serve`
//! (issue 14): every line parses as Prometheus text, names and labels follow the conventions,
//! the gateway's families carry what the traffic did, and every query of the Grafana
//! dashboard in `dist/` names a metric the scrape has.

use std::collections::{BTreeMap, BTreeSet};

use moat_tests::{Sim, daemon::Daemon, http::Client};
use serde_json::{Value, json};

fn scrape(moat: &Daemon, key: &str) -> String {
    let url = format!("http://{}/metrics", moat.admin_addr());
    let r = Client::new().get(url).bearer_auth(key).send().unwrap();
    assert_eq!(r.status(), 200);
    r.text().unwrap()
}

struct Scrape {
    /// Family name → type.
    types: BTreeMap<String, String>,
    /// Sample name with its labels → value.
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Parses the text exposition format strictly enough to fail on anything malformed.
fn parse(text: &str) -> Scrape {
    let mut types = BTreeMap::new();
    let mut helps = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a text");
            assert!(valid_name(name) && !help.is_empty(), "{line}");
            helps.insert(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(helps.contains(name), "TYPE before HELP: {line}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line} twice"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                let mut labels = BTreeMap::new();
                // Label values here never hold `",` (the gateway's values are bounded).
                for pair in body.split("\",") {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    assert!(valid_name(k) && !k.starts_with("__"), "{line}");
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name, labels)
            }
        };
        assert!(valid_name(name), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        let kind = types
            .get(family)
            .unwrap_or_else(|| panic!("no TYPE for {line}"));
        if kind == "counter" {
            assert!(
                name.ends_with("_total"),
                "a counter's name ends in _total: {line}"
            );
        }
        if kind == "histogram" && name.ends_with("_bucket") {
            assert!(labels.contains_key("le"), "{line}");
        }
        if name.ends_with("_seconds_bucket") || name.ends_with("_seconds_sum") {
            assert!(family.ends_with("_seconds"), "{line}");
        }
        samples.push((name.to_owned(), labels, value));
    }
    Scrape { types, samples }
}

impl Scrape {
    fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name && want.iter().all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}

#[test]
fn metrics_follow_prometheus_conventions_and_the_dashboard_matches_them() {
    let sim = Sim::start(&[]);
    let mut moat = Daemon::off(
        "",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\
             [pools.local]\nhosts = [\"{}\"]\n\
             [models.\"test-model\"]\npool = \"local\"\n\
             [roles.tester]\npermissions = [\"model:*\", \"inference:*\"]\n\
             [roles.ops]\npermissions = [\"audit:read\"]\n\
             [quotas.key]\nrequests_per_minute = 3\n",
            sim.addr
        ),
    );
    moat.create_tester_key();
    moat.add_user("testing", "ops", &["ops"]);
    let ops = moat.create_key("ops");
    moat.start();
    let chat = |stream: bool| {
        Client::new()
            .post(moat.url("/v1/chat/completions"))
            .bearer_auth(moat.key())
            .json(&json!({"model": "test-model", "stream": stream,
                "messages": [{"role": "user", "content": "hello"}]}))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(chat(false), 200);
    assert_eq!(chat(true), 200);
    assert_eq!(chat(false), 200);
    assert_eq!(chat(false), 429, "the key's quota");
    let r = Client::new()
        .get(moat.url("/v1/models"))
        .bearer_auth("nope")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);

    // The supervisor pushes its audit counts every 2 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let s = loop {
        let s = parse(&scrape(&moat, &ops));
        if s.value("moat_audit_records_written_total", &[]) > 0.0
            || std::time::Instant::now() > deadline
        {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let chat_route = [("route", "/v1/chat/completions"), ("model", "test-model")];
    assert_eq!(
        s.value(
            "moat_requests_total",
            &[chat_route[0], chat_route[1], ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        s.value("moat_requests_total", &[chat_route[0], ("status", "429")]),
        1.0
    );
    assert_eq!(
        s.value(
            "moat_requests_total",
            &[("route", "/v1/models"), ("status", "401")]
        ),
        1.0
    );
    assert_eq!(
        s.value(
            "moat_upstream_latency_seconds_count",
            &[("model", "test-model")]
        ),
        3.0
    );
    assert_eq!(
        s.value(
            "moat_upstream_latency_seconds_bucket",
            &[("model", "test-model"), ("le", "+Inf")]
        ),
        3.0
    );
    assert_eq!(
        s.value(
            "moat_time_to_first_token_seconds_count",
            &[("model", "test-model")]
        ),
        3.0
    );
    assert!(
        s.value(
            "moat_tokens_total",
            &[("model", "test-model"), ("direction", "in")]
        ) > 0.0
    );
    assert!(
        s.value(
            "moat_tokens_total",
            &[("model", "test-model"), ("direction", "out")]
        ) > 0.0
    );
    assert_eq!(
        s.value(
            "moat_auth_failures_total",
            &[("reason", "not an API key or access token")]
        ),
        1.0
    );
    assert_eq!(
        s.value("moat_quota_denials_total", &[("scope", "key")]),
        1.0
    );
    assert_eq!(s.value("moat_pool_host_healthy", &[("pool", "local")]), 1.0);
    assert!(s.value("moat_audit_records_written_total", &[]) > 0.0);
    assert!(s.types.contains_key("moat_guardrail_denials_total"));
    assert!(s.types.contains_key("moat_audit_records_dropped_total"));

    // The dashboard: every metric any query names is one this scrape exports.
    let path = moat_tests::tests_dir().join("../dist/grafana-moat.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut named = BTreeSet::new();
    let mut queries = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            queries += 1;
            let mut found = false;
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
                if word.starts_with("moat_") {
                    found = true;
                    named.insert(word.to_owned());
                }
            }
            assert!(found, "a query that names no moat metric: {expr}");
        }
    }
    assert!(queries >= 10);
    let exported: BTreeSet<String> = s
        .samples
        .iter()
        .map(|(n, _, _)| n.clone())
        .chain(s.types.keys().cloned())
        .collect();
    for n in &named {
        assert!(
            exported.contains(n),
            "the dashboard queries {n}, which moat does not export"
        );
    }
}
