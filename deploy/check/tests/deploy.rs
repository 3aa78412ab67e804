//! `.env.example`, `docker-compose.yml` and `deploy/Dockerfile` against the code.

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

use voicerooms_platform::settings::env_var_names;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Variables each service binary reads, by compose service name.
fn settings_by_service() -> BTreeMap<&'static str, BTreeSet<String>> {
    BTreeMap::from([
        (
            "gateway-listener",
            env_var_names::<gateway_listener::GatewaySettings>(),
        ),
        (
            "room-manager",
            env_var_names::<room_manager::RoomManagerSettings>(),
        ),
        ("edge", env_var_names::<edge::EdgeSettings>()),
    ])
}

fn all_settings() -> BTreeSet<String> {
    settings_by_service().into_values().flatten().collect()
}

/// `KEY=value` and `# KEY=value` lines of .env.example.
fn documented_vars() -> BTreeMap<String, bool> {
    read(".env.example")
        .lines()
        .filter_map(|line| {
            let (set, rest) = match line.strip_prefix("# ") {
                Some(rest) => (false, rest),
                None => (true, line),
            };
            let (key, _) = rest.split_once('=')?;
            key.starts_with("VOICEROOMS").then(|| (key.to_owned(), set))
        })
        .collect()
}

#[test]
fn env_example_documents_every_setting_and_only_real_ones() {
    let documented = documented_vars();
    let known = all_settings();
    let missing: Vec<_> = known
        .iter()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");
    let unknown: Vec<_> = documented
        .keys()
        .filter(|k| !known.contains(*k) && k.as_str() != "VOICEROOMS_CONFIG_FILE")
        .collect();
    assert!(
        unknown.is_empty(),
        ".env.example documents settings no code reads: {unknown:?}"
    );
    for secret in [
        "VOICEROOMS__DISCORD__TOKEN",
        "VOICEROOMS__NATS__TOKEN",
        "VOICEROOMS__SESSION__KEY",
    ] {
        assert_eq!(
            documented.get(secret),
            Some(&false),
            "{secret} must be a commented placeholder"
        );
    }
}

#[test]
fn env_example_values_load_in_every_service() {
    let vars: std::collections::HashMap<String, String> = read(".env.example")
        .lines()
        .filter(|l| l.starts_with("VOICEROOMS"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    use voicerooms_platform::settings::{load_from, CommonSettings};
    load_from::<gateway_listener::GatewaySettings>(
        CommonSettings::default(),
        Some(vars.clone()),
        None,
    )
    .expect("gateway-listener loads .env.example");
    load_from::<room_manager::RoomManagerSettings>(
        CommonSettings::default(),
        Some(vars.clone()),
        None,
    )
    .expect("room-manager loads .env.example");
    load_from::<edge::EdgeSettings>(CommonSettings::default(), Some(vars), None)
        .expect("edge loads .env.example");
}

#[test]
fn compose_services_are_our_binaries_and_set_only_settings_they_read() {
    let compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("docker-compose.yml")).unwrap();
    let services = compose["services"].as_mapping().expect("services");
    let by_service = settings_by_service();
    let binaries = ["gateway-listener", "room-manager", "edge", "discord-sim"];
    let mut seen = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let environment: BTreeMap<String, String> = match &service["environment"] {
            serde_yaml_ng::Value::Mapping(m) => m
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_yaml_ng::Value::String(s) => s.clone(),
                        other => serde_yaml_ng::to_string(other).unwrap().trim().to_owned(),
                    };
                    (k.as_str().unwrap().to_owned(), v)
                })
                .collect(),
            serde_yaml_ng::Value::Null => BTreeMap::new(),
            other => panic!("{name}: environment must be a mapping, got {other:?}"),
        };
        if service["profiles"]
            .as_sequence()
            .is_some_and(|p| p.iter().any(|p| p == "tracing"))
        {
            // Third-party observability images: pinned, never `latest`, only in their profile.
            let image = service["image"].as_str().unwrap();
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest",
                "{name}: pinned image: {image}"
            );
            continue;
        }
        if name == "nats" {
            let image = service["image"].as_str().unwrap();
            assert!(
                image.starts_with("nats:2."),
                "pinned official NATS image: {image}"
            );
            assert!(service["healthcheck"].is_mapping(), "nats healthcheck");
            continue;
        }
        let built = service["build"]["args"]["SERVICE"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: build.args.SERVICE"));
        assert_eq!(built, name, "compose service name matches its binary");
        assert!(
            binaries.contains(&built),
            "{built} is not a workspace binary"
        );
        assert_eq!(
            service["build"]["dockerfile"].as_str(),
            Some("deploy/Dockerfile")
        );
        seen.insert(name.to_owned());
        if name == "discord-sim" {
            assert_eq!(
                service["profiles"][0].as_str(),
                Some("dev"),
                "simulator only in the dev profile"
            );
            discord_sim::SimConfig::from_vars(environment.clone())
                .unwrap_or_else(|e| panic!("discord-sim rejects its compose environment: {e}"));
            continue;
        }
        let reads = &by_service[name];
        for key in environment.keys() {
            assert!(reads.contains(key), "{name} does not read {key}");
        }
        assert!(
            service["healthcheck"].is_mapping(),
            "{name} has a healthcheck"
        );
    }
    assert_eq!(
        seen.len(),
        binaries.len(),
        "every binary is in compose: {seen:?}"
    );
    assert!(
        compose["volumes"]["nats-data"].is_null() || compose["volumes"]["nats-data"].is_mapping()
    );
}

#[test]
fn docker_compose_accepts_the_file() {
    let docker_compose = which("docker-compose").expect(
        "docker-compose is not installed: `apt-get install docker-compose` (scripts/test does this)",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("docker-compose.yml"),
        dir.path().join("docker-compose.yml"),
    )
    .unwrap();
    std::fs::copy(repo().join(".env.example"), dir.path().join(".env")).unwrap();
    std::fs::create_dir_all(dir.path().join("deploy/otel")).unwrap();
    std::fs::copy(
        repo().join("deploy/otel/collector.yaml"),
        dir.path().join("deploy/otel/collector.yaml"),
    )
    .unwrap();
    for profile in [None, Some("dev"), Some("tracing")] {
        let mut command = Command::new(&docker_compose);
        command.current_dir(dir.path());
        if let Some(p) = profile {
            command.args(["--profile", p]);
        }
        let out = command.args(["config", "-q"]).output().unwrap();
        assert!(
            out.status.success(),
            "docker-compose config (profile {profile:?}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_dockerfile_builds_any_service_into_a_small_non_root_image() {
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.contains("ARG SERVICE"));
    assert_eq!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")),
        2,
        "two stages"
    );
    assert!(dockerfile.contains("distroless/cc-debian12:nonroot"));
    assert!(dockerfile.contains("USER nonroot"));
    assert!(dockerfile.contains("--locked"));
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[test]
fn the_collector_pipeline_uses_only_components_it_defines() {
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/otel/collector.yaml")).unwrap();
    let pipeline = &config["service"]["pipelines"]["traces"];
    for (section, key) in [
        ("receivers", "receivers"),
        ("processors", "processors"),
        ("exporters", "exporters"),
    ] {
        let defined = config[section].as_mapping().expect(section);
        let used = pipeline[key].as_sequence().expect(key);
        assert!(!used.is_empty(), "{key} in the traces pipeline");
        for component in used {
            assert!(
                defined.contains_key(component),
                "{component:?} is not defined in {section}"
            );
        }
    }
    assert_eq!(
        config["receivers"]["otlp"]["protocols"]["http"]["endpoint"], "0.0.0.0:4318",
        "the services export OTLP/HTTP to :4318"
    );
}
