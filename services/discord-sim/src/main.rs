//! `discord-sim`: the simulator for the dev stack. Configuration: `DISCORD_SIM__*` env vars
//! (docs/SIMULATOR.md). Stops cleanly on SIGINT / SIGTERM.

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
