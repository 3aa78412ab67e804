//! The panic hook against real panics: in a spawned task of a service built in-process, in a child
//! service process, and in test code (which is not recorded).

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects
)]

use std::path::Path;
use std::time::{Duration, Instant};

use voicerooms_platform::panics::{self, PanicRecord, PANIC_LOG_VAR};
use voicerooms_platform::settings::{LogFormat, TelemetrySettings};
use voicerooms_platform::{telemetry, CommonSettings, ServiceBuilder};
use voicerooms_testkit::NatsServer;

/// Set in the child process: the URL of the parent's nats-server.
const CHILD_VAR: &str = "VOICEROOMS_PANIC_PROBE_NATS";

fn common(nats_url: String) -> CommonSettings {
    let mut common = CommonSettings::default();
    common.nats.url = nats_url;
    common
}

/// A service bug of a real kind: a deadline computed from an untrusted duration. std's
/// `Instant + Duration` panics on overflow, at a location inside std (not test code).
async fn deadline_from_untrusted_duration() {
    std::hint::black_box(Instant::now() + std::hint::black_box(Duration::MAX));
}

fn records(log: &Path) -> Vec<PanicRecord> {
    panics::read_log(log)
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_task_of_an_in_process_service_is_recorded_and_a_test_assertion_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("panics.jsonl");
    // This test's deliberate panic must not reach the suite's own log.
    panics::set_log_file(Some(log.clone()));
    let nats = NatsServer::start().await;
    let builder = ServiceBuilder::new("panic-probe", &common(nats.url()))
        .await
        .unwrap();

    let task = builder.tasks().spawn(deadline_from_untrusted_duration());
    assert!(task.await.unwrap_err().is_panic());

    let recorded = records(&log);
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let record = &recorded[0];
    assert_eq!(record.service, "panic-probe");
    assert_eq!(record.pid, std::process::id());
    assert!(record.location.contains("std/src/time.rs"), "{record:?}");
    assert!(record.message.contains("overflow"), "{record:?}");
    assert!(!record.thread.is_empty());

    // A failed assertion in test code is the test's business, not a service panic.
    let assertion = tokio::spawn(async { panic!("a test assertion failed") });
    assert!(assertion.await.unwrap_err().is_panic());
    assert_eq!(records(&log).len(), 1);
    panics::set_log_file(None);
}

#[test]
fn a_panic_in_a_child_service_process_is_recorded_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("panics.jsonl");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let nats = runtime.block_on(NatsServer::start());
    // The child is this test binary again, running only `panic_probe_child`.
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "panic_probe_child", "--ignored", "--nocapture"])
        .env(CHILD_VAR, nats.url())
        .env(PANIC_LOG_VAR, &log)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The child "succeeds": tokio swallowed the panic, as it would in a careless service.
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "the child ran: {stdout}");

    let recorded = records(&log);
    assert_eq!(recorded.len(), 1, "{recorded:?}\n{stdout}\n{stderr}");
    let record = &recorded[0];
    assert_eq!(record.service, "panic-child");
    assert_ne!(record.pid, std::process::id());
    assert!(record.location.contains("std/src/time.rs"), "{record:?}");
    // The structured error event in the service's JSON log, and the previous hook's message.
    let event = stdout
        .lines()
        .find(|l| l.contains("\"message\":\"panic\""))
        .unwrap_or_else(|| panic!("no panic event in the log: {stdout}"));
    assert!(event.contains("\"level\":\"ERROR\""), "{event}");
    assert!(event.contains("std/src/time.rs"), "{event}");
    assert!(stderr.contains("panicked at"), "{stderr}");
}

/// Not a test of its own: the child process of the test above (does nothing when run directly).
#[test]
#[ignore = "runs as the child process of a_panic_in_a_child_service_process_is_recorded_and_logged"]
fn panic_probe_child() {
    let Ok(nats_url) = std::env::var(CHILD_VAR) else {
        return;
    };
    let common = common(nats_url);
    let mut log = common.log.clone();
    log.format = LogFormat::Json;
    let _telemetry = telemetry::init("panic-child", &log, &TelemetrySettings::default()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let builder = ServiceBuilder::new("panic-child", &common).await.unwrap();
        let task = builder.tasks().spawn(deadline_from_untrusted_duration());
        let _ = task.await;
    });
}

#[test]
fn the_harness_passes_the_same_variable_to_the_services_it_starts() {
    assert_eq!(PANIC_LOG_VAR, voicerooms_testkit::PANIC_LOG_VAR);
}
