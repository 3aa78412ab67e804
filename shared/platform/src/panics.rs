//! Every panic of a service is reported: logged as a structured error event and, when
//! [`PANIC_LOG_VAR`] names a file, appended to it as one JSON line.
//!
//! A panic in a spawned task is otherwise easy to miss: tokio catches it, the task's `JoinHandle`
//! (often dropped) holds the error, and the process carries on without the work the task did. The
//! test suite sets [`PANIC_LOG_VAR`] and fails when the file holds any line (`scripts/test`), so
//! "no panic reachable from input" is checked over every test, in-process services and child
//! service processes alike.
//!
//! [`install`] is called by [`crate::telemetry::init`] (binaries) and by
//! [`crate::ServiceBuilder::new`] (so services built in-process by tests are covered too). It is
//! idempotent, and chains to the hook that was there before (the default one prints the message
//! and, with `RUST_BACKTRACE`, the backtrace), so nothing is lost from stderr.
//!
//! Panics located in test code — paths containing `/tests/`, `/examples/` or `/benches/`, and
//! the test harness crates `shared/testkit/` and `tools/ops-e2e/` — are test assertions, not
//! service failures: they are neither logged nor recorded. (A failed assertion in a unit test
//! inside `src/` is recorded; that test fails anyway.)
//!
//! A record, one line, written with a single `O_APPEND` write so that concurrent processes never
//! interleave:
//! `{"time_unix_ms":1764102000123,"service":"edge","pid":4242,"thread":"tokio-runtime-worker",
//! "location":"services/edge/src/api.rs:220:21","message":"byte index 200 is not a char boundary"}`

use std::io::Write as _;
use std::panic::PanicHookInfo;
use std::path::PathBuf;
use std::sync::{Mutex, Once, PoisonError};

use serde::Serialize;

/// Environment variable naming the file panic records are appended to.
pub const PANIC_LOG_VAR: &str = "VOICEROOMS_PANIC_LOG";

/// Longest panic message recorded (a record stays one small write).
const MAX_MESSAGE_BYTES: usize = 4096;

static INSTALL: Once = Once::new();
/// Services that installed the hook in this process (tests run several in one process).
static SERVICES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
/// Where records go instead of [`PANIC_LOG_VAR`] (tests of this mechanism).
static LOG_OVERRIDE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// One recorded panic.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PanicRecord {
    pub time_unix_ms: u64,
    /// The services built in this process, comma separated (one, outside tests).
    pub service: String,
    pub pid: u32,
    pub thread: String,
    /// `file:line:column`, or `unknown`.
    pub location: String,
    pub message: String,
}

/// Installs the panic hook once per process and registers `service` as running in it.
pub fn install(service: &'static str) {
    {
        let mut services = SERVICES.lock().unwrap_or_else(PoisonError::into_inner);
        if !services.contains(&service) {
            services.push(service);
        }
    }
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            previous(info);
        }));
    });
}

/// Sends records to `path` instead of the file [`PANIC_LOG_VAR`] names (`None`: back to the
/// variable). For tests of this mechanism, whose deliberate panics must not reach the suite's log.
pub fn set_log_file(path: Option<PathBuf>) {
    *LOG_OVERRIDE.lock().unwrap_or_else(PoisonError::into_inner) = path;
}

/// Whether a panic at `file` is in test code (see the module docs).
pub fn is_test_location(file: &str) -> bool {
    const TEST_DIRS: [&str; 3] = ["tests/", "examples/", "benches/"];
    const HARNESSES: [&str; 2] = ["shared/testkit/", "tools/ops-e2e/"];
    let file = file.replace('\\', "/");
    TEST_DIRS
        .iter()
        .any(|dir| file.starts_with(dir) || file.contains(&format!("/{dir}")))
        || HARNESSES.iter().any(|h| file.contains(h))
}

fn report(info: &PanicHookInfo<'_>) {
    let location = info.location();
    if location.is_some_and(|l| is_test_location(l.file())) {
        return;
    }
    let record = PanicRecord {
        time_unix_ms: voicerooms_contract::now_ms(),
        service: SERVICES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join(","),
        pid: std::process::id(),
        thread: std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned(),
        location: location.map_or_else(|| "unknown".to_owned(), ToString::to_string),
        message: voicerooms_contract::text::truncate_str(&message(info), MAX_MESSAGE_BYTES)
            .to_owned(),
    };
    tracing::error!(
        panic.service = %record.service,
        panic.thread = %record.thread,
        panic.location = %record.location,
        panic.message = %record.message,
        "panic"
    );
    let path = LOG_OVERRIDE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .or_else(|| std::env::var_os(PANIC_LOG_VAR).map(PathBuf::from));
    if let Some(path) = path {
        if let Err(e) = append(&path, &record) {
            eprintln!(
                "voicerooms: could not record the panic in {}: {e}",
                path.display()
            );
        }
    }
}

fn message(info: &PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic payload that is not a string)".to_owned())
}

fn append(path: &std::path::Path, record: &PanicRecord) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // One write of the whole line: with O_APPEND the kernel places it at the end atomically, so
    // records of concurrent processes never interleave.
    file.write_all(&line)
}

/// The records in a panic log file (lines that do not parse are returned as errors).
pub fn read_log(path: &std::path::Path) -> std::io::Result<Vec<Result<PanicRecord, String>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{e}: {l}")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_code_is_recognised_by_its_path() {
        for test in [
            "services/edge/tests/ws/main.rs",
            "tests/browser.rs",
            "/work/repo/shared/platform/tests/panics.rs",
            "services/edge/examples/edge_bench.rs",
            "services/edge/benches/hub.rs",
            "shared/testkit/src/lib.rs",
            "/abs/shared/testkit/src/conformance.rs",
            "tools/ops-e2e/src/lib.rs",
            "C:\\repo\\services\\edge\\tests\\x.rs",
        ] {
            assert!(is_test_location(test), "{test}");
        }
        for service in [
            "services/edge/src/api.rs",
            "shared/platform/src/runtime.rs",
            "/rustc/abc/library/std/src/time.rs",
            "/root/.cargo/registry/src/index.crates.io-x/tokio-1.54.0/src/runtime/task/harness.rs",
            "services/contests/src/lib.rs",
            "services/edge/src/latests.rs",
        ] {
            assert!(!is_test_location(service), "{service}");
        }
    }
}
