//! `discord-sim`: the simulator for the dev stack. Configuration: `DISCORD_SIM__*` env vars
//! (docs/SIMULATOR.md). Stops cleanly on SIGINT / SIGTERM. `discord-sim healthcheck` is the
//! container health probe: `GET /_sim` on the bound port answers 200.

use anyhow::Context;
use discord_sim::{seed, SimConfig, Simulator};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = SimConfig::from_env().context("reading DISCORD_SIM__* settings")?;
    if std::env::var_os("DISCORD_SIM__BIND").is_none() {
        config.bind = ([127, 0, 0, 1], 8790).into();
    }
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return probe(config.bind.port());
    }
    let sim = Simulator::start(config)
        .await
        .context("starting the simulator")?;
    println!("discord-sim http:    {}", sim.http_url());
    println!("discord-sim api:     {}", sim.api_url());
    println!("discord-sim gateway: {}", sim.gateway_url());
    println!("discord-sim control: {}/_sim", sim.http_url());
    println!(
        "seeded guild {} with users {:?}",
        seed::GUILD_ID,
        seed::USERS
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    sim.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// `GET /_sim` on 127.0.0.1:`port` with a 2 s timeout, using only std (the runtime image has no
/// curl): Ok when it answers 200.
fn probe(port: u16) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /_sim HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head)?;
    let line = String::from_utf8_lossy(head.get(..n).unwrap_or_default());
    if line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        anyhow::bail!("/_sim answered {:?}", line.lines().next().unwrap_or(""))
    }
}
