use std::process::ExitCode;

use edge::{load_settings, Application, SERVICE};
use voicerooms_platform::telemetry;

/// jemalloc, not the system allocator: after many connections close, glibc's malloc kept most
/// of their memory (RSS ratcheted up over rounds of churn), while jemalloc's background threads
/// give freed pages back within about a second (docs/BENCHMARKS.md, edge).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at start-up: purge freed pages from background threads (so an idle
/// edge gives memory back too) after 1 s. `_RJEM_MALLOC_CONF` overrides them at run time.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

#[tokio::main]
async fn main() -> ExitCode {
    voicerooms_platform::exit_code(SERVICE, run().await)
}

async fn run() -> anyhow::Result<()> {
    let settings = load_settings()?;
    // `<binary> healthcheck`: the container health probe (the runtime image has no curl).
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return voicerooms_platform::ops::probe(settings.common.http.port);
    }
    let _telemetry = telemetry::init(SERVICE, &settings.common.log, &settings.common.telemetry)?;
    let app = Application::build(settings).await?;
    app.run_until_stopped(voicerooms_platform::signal()).await
}
