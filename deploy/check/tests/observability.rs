//! Alert rules (`deploy/prometheus/`) and the Grafana dashboard (`deploy/grafana/`) against
//! promtool and against the metrics the services really export: the three services are started
//! in-process on a private nats-server and their `/metrics` scraped.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Metrics the rules and the dashboard use that no service on main exports yet, with the
/// service expected to export them (docs/OBSERVABILITY.md, "Metrics the services owe").
/// A name here that a service already exports is reported so it can be dropped from the list.
const AWAITED: &[(&str, &str)] = &[];

/// Metric names registered in the services' and platform's code: `register("name", …)` calls,
/// prefixed with `voicerooms_` and the file's `sub_registry_with_prefix("…")`, in every sample
/// form. A labelled family shows up in `/metrics` only once it has a series, so the scrape alone
/// misses e.g. room-manager's 429 counter until Discord has answered 429.
fn registered_in_code() -> BTreeSet<String> {
    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for dir in [
        "services/edge/src",
        "services/gateway-listener/src",
        "services/room-manager/src",
        "shared/platform/src",
    ] {
        rust_files(&repo().join(dir), &mut files);
    }
    let mut out = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let prefix = text
            .split("sub_registry_with_prefix(\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(|p| format!("{p}_"))
            .unwrap_or_default();
        for chunk in text.split(".register(").skip(1) {
            let Some(rest) = chunk.trim_start().strip_prefix('"') else {
                continue;
            };
            let name = rest.split('"').next().unwrap_or_default();
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                continue;
            }
            let base = format!("voicerooms_{prefix}{name}");
            for suffix in ["", "_total", "_bucket", "_sum", "_count", "_info"] {
                out.insert(format!("{base}{suffix}"));
            }
        }
    }
    out
}

fn promtool() -> PathBuf {
    which("promtool").unwrap_or_else(|| {
        panic!(
            "promtool is not installed: `apt-get install prometheus` (scripts/test does this). \
             The alert rules are never left unchecked."
        )
    })
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn run(mut command: Command) -> (bool, String) {
    let out = command.output().expect("running a validator");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn rules() -> Value {
    serde_yaml_ng::from_str(&read("deploy/prometheus/alerts.yml")).expect("alerts.yml parses")
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/voicerooms.json")).expect("dashboard parses")
}

/// Every rule's `expr`.
fn rule_exprs() -> Vec<String> {
    let mut out = Vec::new();
    for group in rules()["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            out.push(rule["expr"].as_str().expect("expr").to_owned());
        }
    }
    out
}

/// Every panel (rows' nested panels included).
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel.clone());
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

/// Every PromQL query of the dashboard: panel targets and query variables.
fn dashboard_exprs() -> Vec<String> {
    let d = dashboard();
    let mut out: Vec<String> = panels(&d)
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("target expr").to_owned())
        .collect();
    for var in d["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = var["query"]["query"].as_str() {
            if let Some(inner) = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
            {
                out.push(inner.split(',').next().unwrap_or_default().to_owned());
            } else {
                out.push(q.to_owned());
            }
        }
    }
    out
}

/// `voicerooms_…` metric names in a PromQL expression (recording rules use `voicerooms:…`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("voicerooms_") {
        let start = i + pos;
        let boundary = start == 0
            || !(bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b':');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            out.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// Grafana's variables replaced by values Prometheus accepts, for promtool.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$job", ".*")
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names("sum(rate(voicerooms_edge_events_in_total{job=~\"$job\"}[5m])) / voicerooms:x_y > voicerooms_nats_connected"),
        BTreeSet::from(["voicerooms_edge_events_in_total".to_owned(), "voicerooms_nats_connected".to_owned()])
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    let mut check = Command::new(promtool());
    check
        .current_dir(&dir)
        .args(["check", "rules", "alerts.yml"]);
    let (ok, out) = run(check);
    assert!(ok, "promtool check rules:\n{out}");
    let mut test = Command::new(promtool());
    test.current_dir(&dir)
        .args(["test", "rules", "alerts.test.yml"]);
    let (ok, out) = run(test);
    assert!(ok, "promtool test rules:\n{out}");

    // The validator can fail: a broken expression is rejected.
    let broken = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        broken.path(),
        "groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(voicerooms_nats_connected[5m])\n",
    )
    .unwrap();
    let mut bad = Command::new(promtool());
    bad.args(["check", "rules"]).arg(broken.path());
    assert!(!run(bad).0, "promtool accepted a broken rule");
}

#[test]
fn every_alert_is_labelled_annotated_and_has_a_runbook_section() {
    let runbook = read("docs/RUNBOOK.md").to_lowercase();
    let mut alerts = Vec::new();
    for group in rules()["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            alerts.push(name.to_owned());
            assert!(
                rule["labels"]["severity"].is_string(),
                "{name}: severity label"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            let link = rule["annotations"]["runbook"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: runbook"));
            let anchor = link
                .split_once('#')
                .map(|(_, a)| a)
                .unwrap_or_else(|| panic!("{name}: runbook anchor"));
            assert_eq!(anchor, name.to_lowercase(), "{name}: anchor");
            assert!(
                runbook.contains(&format!("### {anchor}")),
                "docs/RUNBOOK.md lacks a section `### {name}`"
            );
        }
    }
    // What the issue asks to alert on.
    for required in [
        "GatewayNotConnected",
        "OperatorAlertRaised",
        "EndToEndLatencyHigh",
        "SlowConsumerClosesRising",
        "DiscordRateLimited",
        "RoomManagerErrors",
        "NatsDisconnected",
    ] {
        assert!(
            alerts.iter().any(|a| a == required),
            "missing alert {required}"
        );
    }
}

#[test]
fn the_dashboard_is_well_formed_and_its_queries_are_valid_promql() {
    let d = dashboard();
    assert!(d["uid"].is_string() && d["title"].is_string());
    let all = panels(&d);
    let mut ids = BTreeSet::new();
    for p in &all {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        let grid = &p["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "panel {id} overflows the grid");
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {id}: targets"));
        assert!(!targets.is_empty(), "panel {id} has no query");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {id}: datasource variable"
        );
        let refs: BTreeSet<_> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        assert_eq!(refs.len(), targets.len(), "panel {id}: refIds unique");
    }

    // promtool parses each query as a recording rule.
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs().iter().enumerate() {
        file.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(&as_promql(expr)).unwrap()
        ));
    }
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &file).unwrap();
    let mut check = Command::new(promtool());
    check.args(["check", "rules"]).arg(tmp.path());
    let (ok, out) = run(check);
    assert!(ok, "dashboard queries:\n{out}\n{file}");
}

/// Sample names a `/metrics` body offers (`# TYPE` families expanded to their samples, so a
/// family with no series yet still counts).
fn exported_names(body: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    out.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        out.insert(format!("{name}{s}"));
                    }
                }
                "info" => {
                    out.insert(format!("{name}_info"));
                }
                _ => {
                    out.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            out.insert(name.to_owned());
        }
    }
    out
}

async fn scrape(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let body = std::sync::Mutex::new(String::new());
    voicerooms_testkit::wait_until(
        Duration::from_secs(15),
        &format!("{url} to answer"),
        || async {
            match reqwest::get(&url).await {
                Ok(r) if r.status().is_success() => {
                    let text = r.text().await.unwrap_or_default();
                    let ok = !text.is_empty();
                    *body.lock().unwrap() = text;
                    ok
                }
                _ => false,
            }
        },
    )
    .await;
    body.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_alerts_and_dashboard_is_exported_by_a_service() {
    let nats = voicerooms_testkit::NatsServer::start().await;

    let mut gw = gateway_listener::Settings::default();
    gw.common.nats.url = nats.url();
    gw.common.http.port = 0;
    let gw = gateway_listener::Application::build(gw)
        .await
        .expect("gateway-listener");
    let mut rm = room_manager::Settings::default();
    rm.common.nats.url = nats.url();
    rm.common.http.port = 0;
    let rm = room_manager::Application::build(rm)
        .await
        .expect("room-manager");
    let mut edge_settings = edge::Settings::default();
    edge_settings.common.nats.url = nats.url();
    edge_settings.common.http.port = 0;
    edge_settings.service.session.key = Some(voicerooms_platform::Secret::new(
        "test-session-key-0123456789abcdef0123456789",
    ));
    let ed = edge::Application::build(edge_settings).await.expect("edge");
    let ports = [
        ("gateway-listener", gw.port()),
        ("room-manager", rm.port()),
        ("edge", ed.port()),
    ];
    tokio::spawn(gw.run_until_stopped(std::future::pending()));
    tokio::spawn(rm.run_until_stopped(std::future::pending()));
    tokio::spawn(ed.run_until_stopped(std::future::pending()));

    let mut exported = BTreeSet::new();
    for (service, port) in ports {
        let names = exported_names(&scrape(port).await);
        assert!(
            names.iter().all(|n| n.starts_with("voicerooms_")),
            "{service}: every metric is prefixed voicerooms_: {names:?}"
        );
        assert!(
            names.contains("voicerooms_service_info"),
            "{service}: {names:?}"
        );
        exported.extend(names);
    }

    // Everything scraped is also found in the code, so the code scan is no looser than it must be.
    let in_code = registered_in_code();
    let missed: Vec<_> = exported.iter().filter(|m| !in_code.contains(*m)).collect();
    assert!(
        missed.is_empty(),
        "the code scan misses scraped metrics: {missed:?}"
    );
    exported.extend(in_code);

    let mut used = BTreeSet::new();
    for expr in rule_exprs().iter().chain(dashboard_exprs().iter()) {
        used.extend(metric_names(expr));
    }
    assert!(used.contains("voicerooms_edge_delivery_latency_seconds_bucket"));
    let awaited: BTreeSet<&str> = AWAITED.iter().map(|(m, _)| *m).collect();
    let unknown: Vec<_> = used
        .iter()
        .filter(|m| !exported.contains(*m) && !awaited.contains(m.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "alerts/dashboard query metrics no service exports: {unknown:?}\nexported: {exported:?}"
    );
    for (metric, owner) in AWAITED {
        assert!(
            used.contains(*metric),
            "{metric} is awaited but nothing uses it"
        );
        if exported.contains(*metric) {
            eprintln!("note: {metric} is now exported; drop it from AWAITED");
        } else {
            eprintln!("awaited from {owner}: {metric}");
        }
    }
}
