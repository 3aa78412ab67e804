//! `vr-tail`: see `vr-tail --help` and docs/OPERATIONS.md.

use std::io::Write;
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let options = match vr_tail::parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            let help = message == vr_tail::USAGE;
            eprintln!("{message}");
            return if help {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let client = match vr_tail::connect(&options.nats_url).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("vr-tail: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let stdout = std::io::stdout();
    let json = options.json;
    let run = vr_tail::run(&client, &options, |line| {
        let mut out = stdout.lock();
        // A closed pipe (`| head`) ends the tail quietly.
        writeln!(out, "{}", line.render(json)).is_ok() && out.flush().is_ok()
    });
    tokio::select! {
        result = run => match result {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vr-tail: {e:#}");
                ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
    }
}
