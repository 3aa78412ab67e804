//! The Kubernetes manifests (`deploy/k8s/`) against the API schemas (`kubernetes-validate
//! --strict`, offline) and against the rules production relies on: probes, requests, grace
//! periods above the services' own, secrets only from Secret objects, R3 NATS, HPA and PDBs.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_yaml_ng::Value;
use voicerooms_platform::settings::env_var_names;

/// The Kubernetes version the manifests target.
const KUBERNETES_VERSION: &str = "1.30.0";

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s")
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(k8s_dir())
        .expect("deploy/k8s")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "manifests: {files:?}");
    files
}

fn documents() -> Vec<Value> {
    let mut out = Vec::new();
    for file in manifest_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !value.is_null() {
                out.push(value);
            }
        }
    }
    out
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn validator() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var("HOME").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from(format!("{home}/.local/bin")),
            PathBuf::from("/usr/local/bin"),
        ])
        .map(|d| d.join("kubernetes-validate"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "kubernetes-validate is not installed: `pip install kubernetes-validate` \
                 (scripts/test does this). The manifests are never left unchecked."
            )
        })
}

fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(validator())
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .expect("running kubernetes-validate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn manifests_pass_kubernetes_validate_strict() {
    let (ok, out) = validate(&manifest_files());
    assert!(ok, "kubernetes-validate:\n{out}");
    assert!(!out.contains("WARN") && !out.contains("ERROR"), "{out}");

    // The validator can fail: an unknown field is rejected in strict mode.
    let tmp = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(
        tmp.path(),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replica: 2\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec: {containers: [{name: x, image: x}]}\n",
    )
    .unwrap();
    assert!(
        !validate(&[tmp.path().to_path_buf()]).0,
        "a misspelt field passed"
    );
}

fn config_map(docs: &[Value]) -> BTreeMap<String, String> {
    let cm = kind(docs, "ConfigMap")
        .into_iter()
        .find(|c| name(c) == "voicerooms-config")
        .expect("ConfigMap voicerooms-config");
    cm["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

const SECRETS: [&str; 5] = [
    "VOICEROOMS__DISCORD__TOKEN",
    "VOICEROOMS__NATS__TOKEN",
    "VOICEROOMS__SESSION__KEY",
    "VOICEROOMS__OAUTH__CLIENT_SECRET",
    "VOICEROOMS__INVITES__SECRET",
];

#[test]
fn services_are_deployed_as_production_needs() {
    let docs = documents();
    let config = config_map(&docs);
    let settings: BTreeMap<&str, BTreeSet<String>> = BTreeMap::from([
        (
            "gateway-listener",
            env_var_names::<gateway_listener::GatewaySettings>(),
        ),
        (
            "room-manager",
            env_var_names::<room_manager::RoomManagerSettings>(),
        ),
        ("edge", env_var_names::<edge::EdgeSettings>()),
    ]);
    let all: BTreeSet<&String> = settings.values().flatten().collect();
    for key in config.keys() {
        assert!(
            all.contains(key),
            "voicerooms-config sets {key}, which no service reads"
        );
        assert!(
            !SECRETS.contains(&key.as_str()),
            "{key} is a secret: use the Secret"
        );
    }
    assert_eq!(
        config["VOICEROOMS__NATS__REPLICAS"], "3",
        "ROOMS and buckets R3"
    );
    let grace_ms: u64 = config["VOICEROOMS__SHUTDOWN__GRACE_PERIOD_MS"]
        .parse()
        .unwrap();
    assert_eq!(
        config["VOICEROOMS__NATS__URL"].split(',').count(),
        3,
        "every NATS node"
    );

    let deployments = kind(&docs, "Deployment");
    let pdbs = kind(&docs, "PodDisruptionBudget");
    for (service, reads) in &settings {
        let d = deployments
            .iter()
            .find(|d| name(d) == *service)
            .unwrap_or_else(|| panic!("Deployment {service}"));
        let spec = &d["spec"]["template"]["spec"];
        let grace_s = spec["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds");
        assert!(
            grace_s * 1000 > grace_ms,
            "{service}: pod grace {grace_s}s must exceed the service's {grace_ms} ms"
        );
        let containers = spec["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{service}: readiness"
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{service}: liveness"
        );
        assert!(
            c["resources"]["requests"]["cpu"].is_string(),
            "{service}: cpu request"
        );
        assert!(
            c["resources"]["requests"]["memory"].is_string(),
            "{service}: memory request"
        );
        assert_eq!(
            c["securityContext"]["runAsNonRoot"], true,
            "{service}: non-root"
        );
        for env in c["env"].as_sequence().unwrap() {
            let key = env["name"].as_str().unwrap();
            assert!(
                reads.contains(key),
                "{service}: sets {key}, which it does not read"
            );
            if SECRETS.contains(&key) {
                assert_eq!(
                    env["valueFrom"]["secretKeyRef"]["name"], "voicerooms-secrets",
                    "{service}: {key} from the Secret"
                );
            }
            assert!(
                !(SECRETS.contains(&key) && env.get("value").is_some()),
                "{service}: {key} inline"
            );
        }
        // The secrets the service reads all come from the Secret.
        for secret in SECRETS.iter().filter(|s| reads.contains(**s)) {
            assert!(
                c["env"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|e| e["name"] == *secret),
                "{service}: {secret} not supplied"
            );
        }
        assert!(
            pdbs.iter().any(
                |p| p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == *service
            ),
            "{service}: PodDisruptionBudget"
        );
        assert!(
            d["spec"]["replicas"].as_u64().unwrap() >= 2,
            "{service}: at least 2 replicas"
        );
    }
    let gl = deployments
        .iter()
        .find(|d| name(d) == "gateway-listener")
        .unwrap();
    assert!(
        gl["spec"]["replicas"].as_u64().unwrap() >= 2,
        "gateway-listener: a pool of at least 2 identical replicas"
    );
    let env = gl["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "VOICEROOMS__GATEWAY__SHARD_COUNT"),
        "the pool's shard count is set"
    );
    assert!(
        !env.iter()
            .any(|e| e["name"] == "VOICEROOMS__GATEWAY__SHARD_ID"),
        "every replica runs the same configuration (no static shard)"
    );
    assert_eq!(
        gl["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
        "a new pod starts before an old one stops (shards move by handover)"
    );

    let hpas = kind(&docs, "HorizontalPodAutoscaler");
    assert_eq!(hpas.len(), 1);
    assert_eq!(hpas[0]["spec"]["scaleTargetRef"]["name"], "edge");
    assert!(hpas[0]["spec"]["minReplicas"].as_u64().unwrap() >= 2);

    let nats = kind(&docs, "StatefulSet")
        .into_iter()
        .find(|s| name(s) == "nats")
        .expect("nats StatefulSet");
    assert_eq!(nats["spec"]["replicas"], 3);
    let conf = kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| name(c) == "nats-config")
        .unwrap()["data"]["nats.conf"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(conf.contains("jetstream"), "JetStream on");
    assert_eq!(
        conf.matches("nats://nats-").count(),
        3,
        "routes to the three nodes:\n{conf}"
    );
    assert!(pdbs.iter().any(|p| p["spec"]["maxUnavailable"] == 1
        && p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "nats"));
}

#[test]
fn secrets_in_the_example_are_placeholders() {
    let docs = documents();
    for s in kind(&docs, "Secret") {
        for (k, v) in s["stringData"].as_mapping().unwrap() {
            assert!(
                v.as_str().unwrap().starts_with("replace-me"),
                "{k:?} looks like a real secret"
            );
        }
    }
}
