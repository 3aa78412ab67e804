//! Behaviour every service binary must show, written once and run by each service's tests:
//! health, readiness that follows NATS, clean exit on SIGTERM, and start-up failure on bad
//! configuration naming the key.

use std::time::Duration;

use crate::{free_port, wait_until, NatsServer, ServiceProcess};

/// GET `url` and return the status code, or `None` when nothing answers.
pub async fn status_of(url: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// `/healthz` answers 200; `/readyz` is 200 while NATS is up, 503 while it is stopped, and 200
/// again after it restarts; `/metrics` serves Prometheus text.
pub async fn health_follows_nats(base_url: &str, nats: &mut NatsServer) {
    let healthz = format!("{base_url}/healthz");
    let readyz = format!("{base_url}/readyz");
    assert_eq!(status_of(&healthz).await, Some(200), "/healthz");
    wait_until(
        Duration::from_secs(15),
        "/readyz 200 with NATS up",
        || async { status_of(&readyz).await == Some(200) },
    )
    .await;

    nats.stop();
    wait_until(
        Duration::from_secs(15),
        "/readyz 503 with NATS stopped",
        || async { status_of(&readyz).await == Some(503) },
    )
    .await;
    assert_eq!(
        status_of(&healthz).await,
        Some(200),
        "/healthz while NATS is down"
    );

    nats.restart().await;
    wait_until(
        Duration::from_secs(20),
        "/readyz 200 after NATS restarts",
        || async { status_of(&readyz).await == Some(200) },
    )
    .await;

    let body = reqwest::get(format!("{base_url}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        body.contains("voicerooms_nats_connected"),
        "metrics: {body}"
    );
    assert!(body.contains("voicerooms_service_info"), "metrics: {body}");
}

/// The binary at `bin` starts against `nats`, becomes ready, and exits 0 within the grace period
/// after SIGTERM.
pub async fn sigterm_exits_cleanly(bin: &str, nats: &NatsServer, extra_env: &[(&str, String)]) {
    let port = free_port();
    let mut env = vec![
        ("VOICEROOMS__NATS__URL", nats.url()),
        ("VOICEROOMS__HTTP__PORT", port.to_string()),
        ("VOICEROOMS__SHUTDOWN__GRACE_PERIOD_MS", "5000".to_owned()),
        ("VOICEROOMS__LOG__FORMAT", "json".to_owned()),
    ];
    env.extend(extra_env.iter().cloned());
    let mut process = ServiceProcess::spawn(bin, &env);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let started = std::time::Instant::now();
    while status_of(&readyz).await != Some(200) {
        if let Some(status) = process.wait_exit(Duration::from_millis(50)).await {
            panic!("{bin} exited early with {status}: {}", process.output());
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{bin} not ready within 30 s: {}",
            process.output()
        );
    }
    process.terminate();
    let status = process
        .wait_exit(Duration::from_secs(6))
        .await
        .unwrap_or_else(|| {
            panic!(
                "{bin} still running 6 s after SIGTERM: {}",
                process.output()
            )
        });
    assert!(
        status.success(),
        "{bin} exited with {status}: {}",
        process.output()
    );
    let output = process.output();
    assert!(output.contains("stopped cleanly"), "{output}");
}

/// The binary fails at start-up when `key` (an env var) has a bad value, naming `dotted_key`.
pub async fn bad_config_fails_naming_the_key(bin: &str, var: &str, value: &str, dotted_key: &str) {
    let env = vec![
        ("VOICEROOMS__NATS__URL", "nats://127.0.0.1:1".to_owned()),
        (var, value.to_owned()),
    ];
    let mut process = ServiceProcess::spawn(bin, &env);
    let status = process
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("{bin} kept running with {var}={value}"));
    assert!(!status.success(), "{bin} accepted {var}={value}");
    // The output thread may lag the exit slightly.
    wait_until(Duration::from_secs(2), "error output", || async {
        process.output().contains(dotted_key)
    })
    .await;
}

/// Generates the conformance tests for a service crate whose library exposes `Settings`
/// (`Default`, with `common`) and `Application` (`build`, `port`, `run_until_stopped`).
///
/// ```text
/// voicerooms_testkit::service_conformance_tests!(
///     crate_name: gateway_listener,
///     bin: env!("CARGO_BIN_EXE_gateway-listener"),
///     bad_config: [("VOICEROOMS__HTTP__PORT", "eighty", "http.port")],
/// );
/// ```
#[macro_export]
macro_rules! service_conformance_tests {
    (crate_name: $krate:ident, bin: $bin:expr, bad_config: [$(($var:expr, $value:expr, $key:expr)),+ $(,)?] $(,)?) => {
        $crate::service_conformance_tests!(
            crate_name: $krate,
            bin: $bin,
            env: [],
            bad_config: [$(($var, $value, $key)),+],
        );
    };
    (crate_name: $krate:ident, bin: $bin:expr, env: [$(($evar:expr, $evalue:expr)),* $(,)?], bad_config: [$(($var:expr, $value:expr, $key:expr)),+ $(,)?] $(,)?) => {
        #[tokio::test]
        async fn health_and_readiness_follow_nats() {
            let mut nats = $crate::NatsServer::start().await;
            let mut settings = $krate::Settings::default();
            settings.common.nats.url = nats.url();
            settings.common.http.port = 0;
            let app = $krate::Application::build(settings).await.unwrap();
            let base = format!("http://127.0.0.1:{}", app.port());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let running = tokio::spawn(app.run_until_stopped(async {
                let _ = stopped.await;
            }));

            $crate::conformance::health_follows_nats(&base, &mut nats).await;

            stop.send(()).unwrap();
            running.await.unwrap().unwrap();
        }

        #[tokio::test]
        async fn sigterm_exits_zero_within_the_grace_period() {
            let nats = $crate::NatsServer::start().await;
            let env: Vec<(&str, String)> = vec![$(($evar, $evalue.to_string())),*];
            $crate::conformance::sigterm_exits_cleanly($bin, &nats, &env).await;
        }

        #[tokio::test]
        async fn a_bad_configuration_value_fails_start_up_naming_the_key() {
            $(
                $crate::conformance::bad_config_fails_naming_the_key($bin, $var, $value, $key).await;
            )+
        }
    };
}
