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
    documented_vars_of(".env.example")
}

/// `KEY=value` (true) and `# KEY=value` (false) lines of an env file.
fn documented_vars_of(path: &str) -> BTreeMap<String, bool> {
    read(path)
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
    // Real secrets are never in a committed file. .env.example carries only the simulator's
    // fixed, published credentials (its dev wiring); the Discord variant leaves them commented.
    for secret in ["VOICEROOMS__NATS__TOKEN", "VOICEROOMS__SESSION__KEY"] {
        assert_eq!(
            documented.get(secret),
            Some(&false),
            "{secret} must be a commented placeholder"
        );
    }
    let sim = discord_sim::SimConfig::default();
    let set = set_vars(".env.example");
    assert_eq!(set["VOICEROOMS__DISCORD__TOKEN"], sim.bot_token);
    assert_eq!(
        set["VOICEROOMS__OAUTH__CLIENT_SECRET"],
        sim.oauth.client_secret
    );
    let variant = documented_vars_of(".env.discord.example");
    for secret in [
        "VOICEROOMS__DISCORD__TOKEN",
        "VOICEROOMS__OAUTH__CLIENT_SECRET",
    ] {
        assert_eq!(
            variant.get(secret),
            Some(&false),
            "{secret} must be a commented placeholder in .env.discord.example"
        );
    }
}

#[test]
fn env_example_values_load_in_every_service() {
    load_in_every_service(set_vars(".env.example"));
}

/// The `KEY=value` lines (not comments) of an env file.
fn set_vars(path: &str) -> BTreeMap<String, String> {
    read(path)
        .lines()
        .filter(|l| l.starts_with("VOICEROOMS"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn load_in_every_service(vars: BTreeMap<String, String>) {
    let vars: std::collections::HashMap<String, String> = vars.into_iter().collect();
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
    let compose = compose();
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
            // The official image (a build argument's default), run as the non-root user.
            assert_eq!(service["build"]["target"].as_str(), Some("nats"));
            assert_eq!(
                service["build"]["dockerfile"].as_str(),
                Some("deploy/Dockerfile")
            );
            assert!(service["healthcheck"].is_mapping(), "nats healthcheck");
            // The host often runs its own NATS on 4222.
            for port in service["ports"].as_sequence().unwrap() {
                let port = port.as_str().unwrap();
                assert!(
                    !port.contains(":4222:") && !port.starts_with("4222:"),
                    "NATS published on the host's 4222: {port}"
                );
            }
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
            assert!(
                service["healthcheck"].is_mapping(),
                "discord-sim healthcheck"
            );
            continue;
        }
        let reads = &by_service[name];
        for key in environment.keys() {
            assert!(reads.contains(key), "{name} does not read {key}");
        }
        // The probe asks /readyz (voicerooms_platform::ops::probe; shared/platform/tests/probe.rs).
        assert_eq!(
            service["healthcheck"]["test"],
            serde_yaml_ng::from_str::<serde_yaml_ng::Value>(
                r#"["CMD", "/usr/local/bin/service", "healthcheck"]"#
            )
            .unwrap(),
            "{name} has a readiness healthcheck"
        );
        assert!(
            service["stop_grace_period"].as_str().is_some(),
            "{name}: stop_grace_period"
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

/// docker-compose.yml with its `<<` merge keys applied.
fn compose() -> serde_yaml_ng::Value {
    let mut compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("docker-compose.yml")).unwrap();
    compose.apply_merge().unwrap();
    compose
}

/// A compose `environment:` mapping as strings.
fn compose_env(service: &serde_yaml_ng::Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_yaml_ng::Value::String(s) => s.clone(),
                        other => serde_yaml_ng::to_string(other).unwrap().trim().to_owned(),
                    };
                    (k.as_str().unwrap().to_owned(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The host port a service publishes for `container_port` ("127.0.0.1:8080:8080" → 8080).
fn published(service: &serde_yaml_ng::Value, container_port: u16) -> u16 {
    service["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| {
            let parts: Vec<&str> = p.as_str().unwrap().split(':').collect();
            let (host, container) = (parts[parts.len() - 2], parts[parts.len() - 1]);
            (container.parse::<u16>().ok()? == container_port).then(|| host.parse().unwrap())
        })
        .next()
        .unwrap_or_else(|| panic!("port {container_port} is not published"))
}

/// `cp .env.example .env && docker-compose --profile dev up` needs no edits: the services are
/// wired to the simulator — server-side on the compose network, the browser on the published
/// port — and the simulator hands out URLs that resolve on the network.
#[test]
fn env_example_wires_the_dev_profile_to_the_simulator() {
    let compose = compose();
    let services = &compose["services"];
    let sim_service = &services["discord-sim"];
    let sim_env = compose_env(sim_service);
    let sim = discord_sim::SimConfig::from_vars(sim_env.clone()).unwrap();
    // The simulator appends the port itself: a host with a port gives ws://discord-sim:8790:8790.
    let public_host = sim.public_host.clone().expect("DISCORD_SIM__PUBLIC_HOST");
    assert_eq!(
        public_host, "discord-sim",
        "the compose service name, no port"
    );
    let sim_port = sim.bind.port();
    let on_network = format!("http://discord-sim:{sim_port}");
    let for_browser = format!("http://localhost:{}", published(sim_service, sim_port));
    let edge = &services["edge"];
    let edge_port: u16 = compose_env(edge)["VOICEROOMS__HTTP__PORT"].parse().unwrap();
    let page = format!("http://localhost:{}", published(edge, edge_port));

    let env = set_vars(".env.example");
    let expect = [
        (
            "VOICEROOMS__DISCORD__API_BASE",
            format!("{on_network}/api/v10"),
        ),
        ("VOICEROOMS__DISCORD__TOKEN", sim.bot_token.clone()),
        ("VOICEROOMS__OAUTH__CLIENT_ID", sim.oauth.client_id.clone()),
        (
            "VOICEROOMS__OAUTH__CLIENT_SECRET",
            sim.oauth.client_secret.clone(),
        ),
        (
            "VOICEROOMS__OAUTH__AUTHORIZE_URL",
            format!("{for_browser}/oauth2/authorize"),
        ),
        (
            "VOICEROOMS__OAUTH__TOKEN_URL",
            format!("{on_network}/api/oauth2/token"),
        ),
        (
            "VOICEROOMS__OAUTH__REVOKE_URL",
            format!("{on_network}/api/oauth2/token/revoke"),
        ),
        (
            "VOICEROOMS__OAUTH__API_BASE",
            format!("{on_network}/api/v10"),
        ),
        (
            "VOICEROOMS__OAUTH__REDIRECT_URL",
            format!("{page}/auth/callback"),
        ),
        (
            "VOICEROOMS__EDGE__DEFAULT_GUILD",
            discord_sim::seed::GUILD_ID.to_string(),
        ),
    ];
    for (key, want) in expect {
        assert_eq!(env.get(key), Some(&want), "{key} in .env.example");
    }
}

/// Against Discord: .env.example with its Discord connection block replaced by
/// .env.discord.example (secrets filled in) loads in every service and names no simulator.
#[test]
fn the_discord_variant_replaces_the_whole_simulator_block() {
    let example = read(".env.example");
    let start = example
        .find("# === Discord connection")
        .expect("block start");
    let end = example
        .find("# === end of the Discord connection block")
        .expect("block end");
    let block: BTreeSet<String> = example[start..end]
        .lines()
        .filter(|l| l.starts_with("VOICEROOMS"))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
        .collect();
    let variant = documented_vars_of(".env.discord.example");
    let missing: Vec<_> = block.iter().filter(|k| !variant.contains_key(*k)).collect();
    assert!(missing.is_empty(), ".env.discord.example lacks {missing:?}");
    let known = all_settings();
    let unknown: Vec<_> = variant.keys().filter(|k| !known.contains(*k)).collect();
    assert!(unknown.is_empty(), "not settings: {unknown:?}");

    let mut merged: BTreeMap<String, String> = example[..start]
        .lines()
        .chain(example[end..].lines())
        .filter(|l| l.starts_with("VOICEROOMS"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    merged.extend(set_vars(".env.discord.example"));
    // What the operator fills in.
    for (key, value) in [
        ("VOICEROOMS__DISCORD__TOKEN", "a-bot-token"),
        ("VOICEROOMS__OAUTH__CLIENT_ID", "123456789012345678"),
        ("VOICEROOMS__OAUTH__CLIENT_SECRET", "a-client-secret"),
        ("VOICEROOMS__EDGE__DEFAULT_GUILD", "223456789012345678"),
        ("VOICEROOMS__ROOMS__GUILDS", "223456789012345678"),
    ] {
        assert!(variant.contains_key(key), "{key} in .env.discord.example");
        merged.insert(key.to_owned(), value.to_owned());
    }
    for (key, value) in &merged {
        assert!(
            !value.contains("discord-sim") && !value.contains(":8790"),
            "{key}={value} still names the simulator"
        );
    }
    assert!(merged["VOICEROOMS__DISCORD__API_BASE"].starts_with("https://discord.com/"));
    load_in_every_service(merged);
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
    std::fs::create_dir_all(dir.path().join("deploy")).unwrap();
    std::fs::copy(
        repo().join("deploy/Dockerfile"),
        dir.path().join("deploy/Dockerfile"),
    )
    .unwrap();
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
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .filter_map(|l| l.rsplit_once(" AS ").map(|(_, s)| s.trim()))
        .collect();
    // The last stage is the default target: the full in-container build.
    assert_eq!(
        stages,
        ["nats", "compile", "runtime-base", "prebuilt", "runtime"]
    );
    // The official images are the defaults of the base-image build arguments.
    for default in [
        "${RUST_IMAGE:-docker.io/library/rust:",
        "${RUNTIME_IMAGE:-gcr.io/distroless/cc-debian12:nonroot}",
        "${NATS_IMAGE:-docker.io/library/nats:2.10.",
    ] {
        assert!(dockerfile.contains(default), "{default}");
    }
    // Non-root (distroless `nonroot` is 65532) in every image compose runs, NATS included.
    assert_eq!(dockerfile.matches("USER 65532:65532").count(), 3);
    assert!(
        dockerfile.contains("STOPSIGNAL SIGINT"),
        "nats-server stops cleanly on SIGINT"
    );
    assert!(dockerfile.contains("--locked"));
    // No debug info in production binaries (docs/OPERATIONS.md, "Images").
    assert!(dockerfile.contains("CARGO_PROFILE_RELEASE_STRIP=debuginfo"));
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
