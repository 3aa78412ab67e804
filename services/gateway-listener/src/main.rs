use std::process::ExitCode;

use gateway_listener::{load_settings, Application, SERVICE};
use voicerooms_platform::telemetry;

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
