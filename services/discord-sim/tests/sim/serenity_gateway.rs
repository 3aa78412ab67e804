//! Fidelity: serenity's own gateway client against the simulator.

use std::time::Duration;

use discord_sim::{seed, SimEventKind, SimHandle};
use serenity::all::{
    ChannelId, Context, EventHandler, GatewayIntents, Guild, HttpBuilder, Ready, ResumedEvent,
    ShardManager, VoiceState,
};
use std::sync::Arc;
use tokio::sync::mpsc;

use crate::helpers::*;

#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Ready(String),
    GuildCreate {
        id: u64,
        voice_states: usize,
        channels: usize,
    },
    Voice {
        user: u64,
        channel: Option<u64>,
    },
    Resumed,
}

struct Handler {
    tx: mpsc::Sender<Seen>,
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _: Context, r: Ready) {
        let _ = self.tx.send(Seen::Ready(r.session_id.clone())).await;
    }
    async fn guild_create(&self, _: Context, g: Guild, _: Option<bool>) {
        let _ = self
            .tx
            .send(Seen::GuildCreate {
                id: g.id.get(),
                voice_states: g.voice_states.len(),
                channels: g.channels.len(),
            })
            .await;
    }
    async fn voice_state_update(&self, _: Context, _: Option<VoiceState>, new: VoiceState) {
        let _ = self
            .tx
            .send(Seen::Voice {
                user: new.user_id.get(),
                channel: new.channel_id.map(ChannelId::get),
            })
            .await;
    }
    async fn resume(&self, _: Context, _: ResumedEvent) {
        let _ = self.tx.send(Seen::Resumed).await;
    }
}

pub struct Bot {
    pub rx: mpsc::Receiver<Seen>,
    pub manager: Arc<ShardManager>,
    pub done: tokio::task::JoinHandle<Result<(), serenity::Error>>,
}

impl Bot {
    /// Next event matching `pred` within 20 s (serenity waits 5 s between shard boots).
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(s)) if pred(&s) => return s,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("serenity stopped while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    pub async fn stop(self) {
        self.manager.shutdown_all().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.done).await;
    }
}

/// Starts a serenity client whose HTTP points at the simulator; serenity's `ClientBuilder` takes
/// the gateway URL from `GET /gateway` through that HTTP client (falling back to the real
/// Discord URL if the call fails). serenity ignores the proxy while its own rate limiter is on, hence the flag.
pub async fn start_bot(sim: &SimHandle, token: &str) -> Bot {
    start_bot_with(sim, token, false).await
}

/// `autoshard`: `Client::start_autosharded`, which asks `GET /gateway/bot` for the shard count.
pub async fn start_bot_with(sim: &SimHandle, token: &str, autoshard: bool) -> Bot {
    let http = HttpBuilder::new(token)
        .proxy(sim.http_url())
        .ratelimiter_disabled(true)
        .build();
    let intents = GatewayIntents::GUILDS | GatewayIntents::GUILD_VOICE_STATES;
    let (tx, rx) = mpsc::channel(1024);
    let mut client = serenity::client::ClientBuilder::new_with_http(http, intents)
        .event_handler(Handler { tx })
        .await
        .expect("serenity client builds");
    let manager = client.shard_manager.clone();
    let done = tokio::spawn(async move {
        if autoshard {
            client.start_autosharded().await
        } else {
            client.start().await
        }
    });
    Bot { rx, manager, done }
}

fn count(sim: &SimHandle, f: impl Fn(&SimEventKind) -> bool) -> usize {
    sim.events().iter().filter(|e| f(&e.kind)).count()
}

#[tokio::test]
async fn serenity_finds_the_gateway_through_rest_identifies_and_receives_ready_and_guild_create() {
    let sim = start_default().await;
    sim.connect_voice(seed::USERS[0].0, seed::LOBBY_CHANNEL_ID)
        .expect("join");
    let mut bot = start_bot(&sim, &sim.config().bot_token.clone()).await;
    bot.expect("READY", |s| matches!(s, Seen::Ready(_))).await;
    let gc = bot
        .expect("GUILD_CREATE", |s| matches!(s, Seen::GuildCreate { .. }))
        .await;
    assert_eq!(
        gc,
        Seen::GuildCreate {
            id: seed::GUILD_ID,
            voice_states: 1,
            channels: 3
        }
    );
    let rest: Vec<_> = sim
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, SimEventKind::Rest { .. }))
        .collect();
    assert!(
        count(
            &sim,
            |k| matches!(k, SimEventKind::Rest { route, status: 200, .. } if route == "GET /gateway")
        ) >= 1,
        "{rest:?}"
    );
    // serenity heartbeats and the simulator acknowledges.
    assert!(
        wait_until(Duration::from_secs(5), || count(&sim, |k| matches!(
            k,
            SimEventKind::HeartbeatAck { .. }
        )) >= 2)
        .await,
        "serenity heartbeats"
    );
    sim.connect_voice(seed::USERS[1].0, seed::GAMING_CHANNEL_ID)
        .expect("join");
    let v = bot
        .expect("VOICE_STATE_UPDATE", |s| matches!(s, Seen::Voice { .. }))
        .await;
    assert_eq!(
        v,
        Seen::Voice {
            user: seed::USERS[1].0,
            channel: Some(seed::GAMING_CHANNEL_ID)
        }
    );
    bot.stop().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn serenity_resumes_after_reconnect_and_after_a_4000_close_without_losing_a_dispatch() {
    let sim = start_default().await;
    let mut bot = start_bot(&sim, &sim.config().bot_token.clone()).await;
    bot.expect("READY", |s| matches!(s, Seen::Ready(_))).await;
    bot.expect("GUILD_CREATE", |s| matches!(s, Seen::GuildCreate { .. }))
        .await;

    // op 7: the dispatch emitted right after waits in the replay buffer.
    assert_eq!(sim.send_reconnect(None), 1);
    sim.connect_voice(seed::USERS[0].0, seed::LOBBY_CHANNEL_ID)
        .expect("join");
    // The replayed dispatch comes before RESUMED.
    let v = bot
        .expect("alice's join", |s| matches!(s, Seen::Voice { .. }))
        .await;
    assert_eq!(
        v,
        Seen::Voice {
            user: seed::USERS[0].0,
            channel: Some(seed::LOBBY_CHANNEL_ID)
        }
    );
    bot.expect("RESUMED", |s| *s == Seen::Resumed).await;

    // 4000 Unknown error: resumable.
    assert!(wait_until(Duration::from_secs(5), || sim.connection_count() == 1).await);
    assert_eq!(sim.close_connections(4000, None), 1);
    sim.connect_voice(seed::USERS[1].0, seed::LOBBY_CHANNEL_ID)
        .expect("join");
    let v = bot
        .expect("bob's join", |s| matches!(s, Seen::Voice { .. }))
        .await;
    assert_eq!(
        v,
        Seen::Voice {
            user: seed::USERS[1].0,
            channel: Some(seed::LOBBY_CHANNEL_ID)
        }
    );

    assert_eq!(
        count(&sim, |k| matches!(k, SimEventKind::Identify { .. })),
        1,
        "never re-identified"
    );
    assert_eq!(count(&sim, |k| matches!(k, SimEventKind::Resume { .. })), 2);
    assert!(sim
        .events()
        .iter()
        .any(|e| matches!(&e.kind, SimEventKind::Resume { replayed, .. } if *replayed >= 1)));
    bot.stop().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn serenity_reidentifies_after_invalid_session_false() {
    let sim = start_default().await;
    let mut bot = start_bot(&sim, &sim.config().bot_token.clone()).await;
    let first = bot.expect("READY", |s| matches!(s, Seen::Ready(_))).await;
    assert_eq!(sim.invalidate_sessions(false, None), 1);
    let second = bot
        .expect("a second READY", |s| matches!(s, Seen::Ready(_)))
        .await;
    assert_ne!(first, second, "a new session");
    assert_eq!(
        count(&sim, |k| matches!(k, SimEventKind::Identify { .. })),
        2
    );
    bot.stop().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn serenity_stops_on_4004_authentication_failed() {
    let sim = start_default().await;
    let mut bot = start_bot(&sim, &sim.config().bot_token.clone()).await;
    bot.expect("READY", |s| matches!(s, Seen::Ready(_))).await;
    assert_eq!(sim.close_connections(4004, None), 1);
    let result = tokio::time::timeout(Duration::from_secs(10), &mut bot.done).await;
    let ended = result.expect("serenity stops by itself").expect("task");
    assert!(
        ended.is_err(),
        "client.start() reports the failure: {ended:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || sim.connection_count() == 0).await,
        "no reconnect after 4004"
    );
    assert_eq!(
        count(&sim, |k| matches!(k, SimEventKind::Identify { .. })),
        1
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn serenity_with_a_wrong_token_is_closed_with_4004_and_stops() {
    let sim = start_default().await;
    let mut bot = start_bot(&sim, "wrong-token").await;
    let result = tokio::time::timeout(Duration::from_secs(10), &mut bot.done).await;
    assert!(result.expect("stops").expect("task").is_err());
    assert!(sim.events().iter().any(|e| matches!(
        &e.kind,
        SimEventKind::Disconnected {
            code: Some(4004),
            by_server: true,
            ..
        }
    )));
    sim.shutdown().await;
}

#[tokio::test]
async fn serenity_autosharded_start_reads_gateway_bot_and_connects() {
    let sim = start_default().await;
    let mut bot = start_bot_with(&sim, &sim.config().bot_token.clone(), true).await;
    bot.expect("READY", |s| matches!(s, Seen::Ready(_))).await;
    assert!(
        count(
            &sim,
            |k| matches!(k, SimEventKind::Rest { route, status: 200, .. } if route == "GET /gateway/bot")
        ) >= 1
    );
    bot.stop().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn serenity_treats_missing_heartbeat_acks_as_a_zombie_connection_and_reconnects() {
    let sim = start_default().await;
    let mut bot = start_bot(&sim, &sim.config().bot_token.clone()).await;
    bot.expect("READY", |s| matches!(s, Seen::Ready(_))).await;
    sim.set_heartbeat_acks(false);
    // serenity notices on its next heartbeat and starts over; as measured, it re-identifies
    // rather than resuming.
    bot.expect("a second READY", |s| matches!(s, Seen::Ready(_)))
        .await;
    sim.set_heartbeat_acks(true);
    assert!(count(&sim, |k| matches!(k, SimEventKind::Identify { .. })) >= 2);
    bot.stop().await;
    sim.shutdown().await;
}
