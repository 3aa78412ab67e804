//! # vr-tail
//!
//! The operator's tail: follows the room event subjects and prints one line per event — time,
//! subject, kind, room, user, sequence, latency — readable by default, JSON with `--json` for
//! piping. Filters narrow by guild, room, kind and user. Replay mode reads the `ROOMS` stream
//! from a sequence or a time (an ordered consumer, nothing durable is left on the server) and
//! prints exactly the lines the live tail printed, latency aside.
//!
//! ## Layout
//! - [`Options`] / [`parse_args`]: the command line (`vr-tail --help`).
//! - [`run`]: connect-agnostic main loop; live (core subscription on the stream's republish,
//!   `live.rooms.…`, which carries the stream sequence) or replay (JetStream ordered consumer).
//! - [`Line`]: one printed event; [`Line::text`] and JSON (serde) renderings.
//! - [`timefmt`]: RFC 3339 formatting and `--since` parsing without a date library.
//!
//! Every subject comes from `voicerooms_contract::subject`; every payload is decoded with the
//! contract's `RoomEvent::decode_on`, which also checks that the payload agrees with its subject.

pub mod timefmt;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde::Serialize;
use voicerooms_contract::status::{
    pool_key, GatewayStatus, OperatorAlert, PoolMembers, ShardLease,
};
use voicerooms_contract::subject::{self, Subject, ROOMS_STREAM};
use voicerooms_contract::{now_ms, EventKind, GuildId, Millis, RoomEvent, RoomId, UserId};

/// Where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// From now on (live feed).
    Live,
    /// Replay from this stream sequence.
    Sequence(u64),
    /// Replay from this time (ms since the epoch).
    Time(Millis),
}

/// What to show and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub nats_url: String,
    pub guild: Option<GuildId>,
    pub room: Option<RoomId>,
    /// Empty: every kind.
    pub kinds: Vec<EventKind>,
    pub user: Option<UserId>,
    pub json: bool,
    pub start: Start,
    /// In replay mode, keep following new events after the stored ones.
    pub follow: bool,
    /// Stop after this many lines.
    pub limit: Option<u64>,
    /// Also show gateway status and operator alerts (live only; not narrowed by the filters):
    /// first every shard's last status from the gateway pool's KV bucket, then live updates.
    pub ops: bool,
    /// The gateway pool's KV bucket (`VOICEROOMS__GATEWAY__LEASE_BUCKET`).
    pub gateway_bucket: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            guild: None,
            room: None,
            kinds: Vec::new(),
            user: None,
            json: false,
            start: Start::Live,
            follow: false,
            limit: None,
            ops: false,
            gateway_bucket: voicerooms_contract::status::GATEWAY_POOL_BUCKET.to_owned(),
        }
    }
}

pub const USAGE: &str = "\
vr-tail: follow or replay voicerooms events, one line per event

USAGE: vr-tail [OPTIONS]

  --nats URL          NATS server(s), comma separated
                      (default: $VOICEROOMS__NATS__URL, $NATS_URL, nats://127.0.0.1:4222;
                      the token is read from $VOICEROOMS__NATS__TOKEN)
  --guild ID          only this guild
  --room ID           only this room (its voice channel id)
  --kind KIND         only this kind (repeatable), e.g. voice.joined, room.deleted
  --user ID           only events about this user
  --json              one JSON object per line (for jq and friends)
  --since-seq N       replay the ROOMS stream from sequence N
  --since WHEN        replay from a time: RFC 3339 (2025-11-25T21:30:00Z), epoch
                      milliseconds, or an age (90s, 15m, 2h, 1d)
  --follow            after a replay, keep following new events
  --limit N           stop after N lines
  --ops               also show gateway.*.status and ops.alerts.> (live mode): first every
                      shard's last status (with its holder, from the gateway pool's KV
                      bucket) and the pool's assignment (each live replica's shards),
                      then changes as they happen
  --gateway-bucket B  the gateway pool's KV bucket (default: gateway_leases)
  -h, --help          this text

Lines: TIME SUBJECT KIND room=ID guild=ID user=ID(NAME) seq=N latency=MS
  TIME is the event's received_at (when our first service saw it). Live, latency is from
  received_at to this tail; in a replay, from received_at to when the stream stored it.";

/// Parses the command line (without the program name). `Err` carries the message to print.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Options, String> {
    let mut options = Options {
        nats_url: std::env::var("VOICEROOMS__NATS__URL")
            .or_else(|_| std::env::var("NATS_URL"))
            .unwrap_or_else(|_| Options::default().nats_url),
        ..Options::default()
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Err(USAGE.to_owned()),
            "--nats" => options.nats_url = value("--nats")?,
            "--guild" => {
                options.guild =
                    Some(GuildId::parse(&value("--guild")?).map_err(|e| format!("--guild: {e}"))?)
            }
            "--room" => {
                options.room =
                    Some(RoomId::parse(&value("--room")?).map_err(|e| format!("--room: {e}"))?)
            }
            "--user" => {
                options.user =
                    Some(UserId::parse(&value("--user")?).map_err(|e| format!("--user: {e}"))?)
            }
            "--kind" => {
                let kind =
                    EventKind::parse(&value("--kind")?).map_err(|e| format!("--kind: {e}"))?;
                if !options.kinds.contains(&kind) {
                    options.kinds.push(kind);
                }
            }
            "--json" => options.json = true,
            "--follow" => options.follow = true,
            "--ops" => options.ops = true,
            "--gateway-bucket" => options.gateway_bucket = value("--gateway-bucket")?,
            "--since-seq" => {
                let n: u64 = value("--since-seq")?
                    .parse()
                    .map_err(|_| "--since-seq: expected a sequence number".to_owned())?;
                options.start = Start::Sequence(n.max(1));
            }
            "--since" => {
                let when = timefmt::parse_since(&value("--since")?, now_ms())
                    .map_err(|e| format!("--since: {e}"))?;
                options.start = Start::Time(when);
            }
            "--limit" => {
                options.limit = Some(
                    value("--limit")?
                        .parse()
                        .map_err(|_| "--limit: expected a number".to_owned())?,
                )
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    if options.ops && options.start != Start::Live {
        return Err("--ops shows live status and alerts only; drop it for a replay".to_owned());
    }
    Ok(options)
}

impl Options {
    /// The server-side subject filter: exact when at most one kind is asked for; with several
    /// kinds the filter stays broad (nats-server 2.9 consumers take one filter) and [`Options::wants`]
    /// narrows.
    pub fn subject(&self) -> String {
        let kind = match self.kinds.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        subject::filter::select(self.guild, self.room, kind)
    }

    fn live_subject(&self) -> String {
        let kind = match self.kinds.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        subject::filter::select_live(self.guild, self.room, kind)
    }

    /// Whether an event passes every filter.
    pub fn wants(&self, event: &RoomEvent) -> bool {
        self.guild.is_none_or(|g| g == event.guild)
            && self.room.is_none_or(|r| r == event.room)
            && (self.kinds.is_empty() || self.kinds.contains(&event.kind()))
            && self
                .user
                .is_none_or(|u| event.event.user().is_some_and(|user| user.id == u))
    }
}

/// A user as shown on a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineUser {
    pub id: UserId,
    pub username: String,
}

/// One printed line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Line {
    /// RFC 3339 of `received_at` (or of the status/alert time).
    pub time: String,
    /// The event's own subject (`rooms.…`, also when it arrived on `live.rooms.…`).
    pub subject: String,
    /// `voice.joined`, …; `gateway.status`, `gateway.pool` and `ops.alert` for `--ops` lines.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guild: Option<GuildId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<LineUser>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Live: received_at → this tail. Replay: received_at → stored in the stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<i64>,
    /// The full payload (the event with `seq` filled in, the status or the alert).
    pub event: serde_json::Value,
    /// For a shard's last status read at start: who holds the shard now, when that is not the
    /// replica that wrote the status (`no holder: lease expired 12 s ago`, `held by gw-b`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Line {
    pub fn from_event(subject: String, event: &RoomEvent, seq: u64, latency_ms: i64) -> Self {
        let mut event = event.clone();
        event.seq = Some(seq);
        Line {
            time: timefmt::rfc3339_ms(event.received_at),
            subject,
            kind: event.kind().as_str().to_owned(),
            guild: Some(event.guild),
            room: Some(event.room),
            user: event.event.user().map(|u| LineUser {
                id: u.id,
                username: u.username.clone(),
            }),
            seq: Some(seq),
            latency_ms: Some(latency_ms),
            event: serde_json::to_value(&event).unwrap_or(serde_json::Value::Null),
            note: None,
        }
    }

    /// The readable rendering.
    pub fn text(&self) -> String {
        let mut out = format!("{} {} {}", self.time, self.subject, self.kind);
        if let Some(room) = self.room {
            out.push_str(&format!(" room={room}"));
        }
        if let Some(guild) = self.guild {
            out.push_str(&format!(" guild={guild}"));
        }
        if let Some(user) = &self.user {
            out.push_str(&format!(" user={}({})", user.id, user.username));
        }
        if let Some(seq) = self.seq {
            out.push_str(&format!(" seq={seq}"));
        }
        if let Some(latency) = self.latency_ms {
            out.push_str(&format!(" latency={latency}ms"));
        }
        if self.kind == "gateway.status" || self.kind == "ops.alert" || self.kind == "gateway.pool"
        {
            out.push_str(&format!(" {}", self.event));
        }
        if let Some(note) = &self.note {
            out.push_str(&format!(" note={note:?}"));
        }
        out
    }

    /// The line as printed with or without `--json`.
    pub fn render(&self, json: bool) -> String {
        if json {
            serde_json::to_string(self).unwrap_or_default()
        } else {
            self.text()
        }
    }
}

/// Connects with the token from `VOICEROOMS__NATS__TOKEN`, if set.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new().name("vr-tail");
    if let Ok(token) = std::env::var("VOICEROOMS__NATS__TOKEN") {
        options = options.token(token);
    }
    let addrs = url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("--nats")?;
    options
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// Follows or replays according to `options`, calling `emit` with each line; `emit` returns
/// `false` to stop. Returns the number of lines emitted. Bad messages are reported on stderr and
/// skipped.
pub async fn run(
    client: &async_nats::Client,
    options: &Options,
    emit: impl FnMut(Line) -> bool,
) -> anyhow::Result<u64> {
    match options.start {
        Start::Live => LiveTail::start(client, options).await?.run(emit).await,
        Start::Sequence(_) | Start::Time(_) => replay(client, options, emit).await,
    }
}

/// Counts lines and applies `--limit`.
fn limited(options: &Options, mut emit: impl FnMut(Line) -> bool) -> impl FnMut(Line) -> bool {
    let limit = options.limit;
    let mut count = 0u64;
    move |line| {
        count = count.saturating_add(1);
        emit(line) && limit.is_none_or(|limit| count < limit)
    }
}

/// A live tail whose subscriptions are in place: every event published after
/// [`LiveTail::start`] returns is seen.
pub struct LiveTail {
    options: Options,
    messages: futures::stream::SelectAll<async_nats::Subscriber>,
    /// `--ops`: every shard's last status, printed before the live lines.
    initial: Vec<Line>,
}

impl LiveTail {
    pub async fn start(client: &async_nats::Client, options: &Options) -> anyhow::Result<Self> {
        let mut subjects = vec![options.live_subject()];
        if options.ops {
            subjects.push(subject::filter::gateway_status());
            subjects.push(subject::filter::ops_alerts());
        }
        let mut subscriptions = Vec::new();
        for s in subjects {
            subscriptions.push(client.subscribe(s.clone()).await.context(s)?);
        }
        // The server has registered the interest once the flush round trip is done.
        client.flush().await.context("flushing subscriptions")?;
        // Subscribed first, then the snapshot: a change in between shows up twice at worst,
        // never not at all.
        let initial = if options.ops {
            shard_statuses(client, &options.gateway_bucket).await
        } else {
            Vec::new()
        };
        Ok(Self {
            options: options.clone(),
            messages: futures::stream::select_all(subscriptions),
            initial,
        })
    }

    /// Emits lines until `emit` says stop, `--limit` is reached or the connection closes.
    pub async fn run(mut self, emit: impl FnMut(Line) -> bool) -> anyhow::Result<u64> {
        if self.options.limit == Some(0) {
            return Ok(0);
        }
        let mut count = 0u64;
        let mut take = limited(&self.options, emit);
        for line in std::mem::take(&mut self.initial) {
            count = count.saturating_add(1);
            if !take(line) {
                return Ok(count);
            }
        }
        while let Some(message) = self.messages.next().await {
            let line = match Subject::parse(&message.subject) {
                Ok(Subject::LiveRoomEvent { .. }) => live_event(&message, &self.options),
                Ok(Subject::GatewayStatus { .. }) => status_line(&message),
                Ok(Subject::OpsAlert { .. }) => alert_line(&message),
                _ => None,
            };
            if let Some(line) = line {
                count = count.saturating_add(1);
                if !take(line) {
                    break;
                }
            }
        }
        Ok(count)
    }
}

fn live_event(message: &async_nats::Message, options: &Options) -> Option<Line> {
    let event = match RoomEvent::decode_on(&message.subject, &message.payload) {
        Ok(event) => event,
        Err(e) => {
            eprintln!("vr-tail: skipping {}: {e}", message.subject);
            return None;
        }
    };
    if !options.wants(&event) {
        return None;
    }
    let seq = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Sequence"))
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .unwrap_or(0);
    let latency = latency_ms(now_ms(), event.received_at);
    Some(Line::from_event(event.subject(), &event, seq, latency))
}

/// Milliseconds from `from` to `to`, negative when `to` is earlier (clocks of different hosts),
/// saturating: the times come from NATS payloads.
fn latency_ms(to: Millis, from: Millis) -> i64 {
    match to.checked_sub(from) {
        Some(ahead) => i64::try_from(ahead).unwrap_or(i64::MAX),
        None => 0i64.saturating_sub(i64::try_from(from.abs_diff(to)).unwrap_or(i64::MAX)),
    }
}

fn status_line(message: &async_nats::Message) -> Option<Line> {
    let status = GatewayStatus::decode(&message.payload)
        .map_err(|e| eprintln!("vr-tail: skipping {}: {e}", message.subject))
        .ok()?;
    Some(Line {
        time: timefmt::rfc3339_ms(status.at),
        subject: message.subject.to_string(),
        kind: "gateway.status".to_owned(),
        guild: None,
        room: None,
        user: None,
        seq: None,
        latency_ms: None,
        event: serde_json::to_value(&status).ok()?,
        note: None,
    })
}

/// Every shard's last status from the gateway pool's KV bucket, by shard, each with a note when
/// its lease says the shard has no holder now or another one; then the pool's assignment (a
/// `gateway.pool` line: each live replica and the shards it holds). Empty when there is no bucket
/// (no gateway-listener has run) or it cannot be read within a few seconds.
pub async fn shard_statuses(client: &async_nats::Client, bucket: &str) -> Vec<Line> {
    let read = async {
        let js = jetstream::new(client.clone());
        let kv = js.get_key_value(bucket).await.ok()?;
        let mut keys = kv.keys().await.ok()?;
        let mut shards = Vec::new();
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { continue };
            if let Some((shard, count, "status")) = pool_key::parse(&key) {
                shards.push((shard, count, key));
            }
        }
        shards.sort();
        let mut lines = Vec::new();
        for (shard, count, key) in shards {
            let Ok(Some(bytes)) = kv.get(&key).await else {
                continue;
            };
            let Ok(status) = GatewayStatus::decode(&bytes) else {
                continue;
            };
            let lease = kv
                .get(pool_key::lease(shard, count))
                .await
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<ShardLease>(&b).ok());
            let now = now_ms();
            let note = match lease {
                None => Some("no holder".to_owned()),
                Some(l) if l.expires_at == 0 => Some("no holder: released".to_owned()),
                Some(l) if l.expires_at <= now => Some(format!(
                    "no holder: lease expired {} s ago",
                    now.saturating_sub(l.expires_at) / 1000
                )),
                Some(l) if l.holder != status.instance => Some(format!("held by {}", l.holder)),
                Some(_) => None,
            };
            lines.push(Line {
                time: timefmt::rfc3339_ms(status.at),
                subject: status.subject(),
                kind: "gateway.status".to_owned(),
                guild: None,
                room: None,
                user: None,
                seq: None,
                latency_ms: None,
                event: serde_json::to_value(&status).ok()?,
                note,
            });
        }
        if let Some(pool) = pool_line(&kv).await {
            lines.push(pool);
        }
        Some(lines)
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The pool's live replicas and the shards each holds (`pool.members`), when there is a pool.
async fn pool_line(kv: &jetstream::kv::Store) -> Option<Line> {
    let bytes = kv.get(pool_key::MEMBERS).await.ok()??;
    let mut pool: PoolMembers = serde_json::from_slice(&bytes).ok()?;
    let now = now_ms();
    pool.members.retain(|_, m| m.expires_at > now);
    let note = pool
        .members
        .iter()
        .map(|(name, m)| format!("{name}: {:?} of {}", m.held, m.shard_count))
        .collect::<Vec<_>>()
        .join("; ");
    Some(Line {
        time: timefmt::rfc3339_ms(now),
        subject: format!("kv {}", pool_key::MEMBERS),
        kind: "gateway.pool".to_owned(),
        guild: None,
        room: None,
        user: None,
        seq: None,
        latency_ms: None,
        note: Some(format!("{} live replicas; {note}", pool.members.len())),
        event: serde_json::to_value(&pool).ok()?,
    })
}

fn alert_line(message: &async_nats::Message) -> Option<Line> {
    let alert = OperatorAlert::decode(&message.payload)
        .map_err(|e| eprintln!("vr-tail: skipping {}: {e}", message.subject))
        .ok()?;
    Some(Line {
        time: timefmt::rfc3339_ms(alert.at),
        subject: message.subject.to_string(),
        kind: "ops.alert".to_owned(),
        guild: None,
        room: None,
        user: None,
        seq: None,
        latency_ms: None,
        event: serde_json::to_value(&alert).ok()?,
        note: None,
    })
}

async fn replay(
    client: &async_nats::Client,
    options: &Options,
    emit: impl FnMut(Line) -> bool,
) -> anyhow::Result<u64> {
    if options.limit == Some(0) {
        return Ok(0);
    }
    let mut count = 0u64;
    let mut take = limited(options, emit);
    let js = jetstream::new(client.clone());
    let stream = js
        .get_stream(ROOMS_STREAM)
        .await
        .context("reading the ROOMS stream")?;
    let start_sequence = match options.start {
        Start::Sequence(n) => n,
        Start::Time(ms) => match sequence_at(&stream, ms).await? {
            Some(n) => n,
            None if options.follow => stream_end(&stream).await?.saturating_add(1),
            None => return Ok(0),
        },
        Start::Live => stream_end(&stream).await?.saturating_add(1),
    };
    // Where the stored events matching the filter end, read before the replay starts. (The
    // consumer's `num_pending` right after creation is not reliable on nats-server 2.9: it
    // reported 3, 6 and 8 for the same 7 stored events in our tests.)
    let end = if options.follow {
        u64::MAX
    } else {
        match last_matching(&stream, &options.subject()).await? {
            Some(end) if end >= start_sequence => end,
            _ => return Ok(0),
        }
    };
    // An ordered consumer is ephemeral and in-order, and re-creates itself on a gap: nothing
    // is left behind on the server when the tail exits.
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: options.subject(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence },
            ..Default::default()
        })
        .await
        .context("creating a replay consumer")?;
    let mut messages = consumer.messages().await.context("replaying")?;
    loop {
        let next = if options.follow {
            messages.next().await
        } else {
            // A stored message should arrive promptly; a stall is an error, not a hang.
            tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .context("replay stalled for 30 s")?
        };
        let Some(message) = next else { break };
        let message = message.context("replay")?;
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("message info: {e}"))?;
        let seq = info.stream_sequence;
        let stored_ms =
            u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        match RoomEvent::decode_on(&message.subject, &message.payload) {
            Ok(event) if options.wants(&event) => {
                let latency = latency_ms(stored_ms, event.received_at);
                let line = Line::from_event(event.subject(), &event, seq, latency);
                count = count.saturating_add(1);
                if !take(line) {
                    return Ok(count);
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("vr-tail: skipping seq {seq} ({}): {e}", message.subject),
        }
        if seq >= end {
            break;
        }
    }
    Ok(count)
}

/// The sequence of the newest stored event on `filter` (wildcards allowed), if any.
async fn last_matching(
    stream: &jetstream::stream::Stream,
    filter: &str,
) -> anyhow::Result<Option<u64>> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    match stream.get_last_raw_message_by_subject(filter).await {
        Ok(message) => Ok(Some(message.sequence)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading the newest event on {filter}: {e}")),
    }
}

/// The last sequence in the stream.
async fn stream_end(stream: &jetstream::stream::Stream) -> anyhow::Result<u64> {
    let mut stream = stream.clone();
    Ok(stream
        .info()
        .await
        .context("reading the ROOMS stream")?
        .state
        .last_sequence)
}

/// The sequence of the first event stored at or after `ms`, if any.
///
/// A time is turned into a sequence first so that both replay modes run the same, sequence
/// bounded, code path.
async fn sequence_at(
    stream: &jetstream::stream::Stream,
    ms: Millis,
) -> anyhow::Result<Option<u64>> {
    let nanos = i128::from(ms)
        .checked_mul(1_000_000)
        .context("--since is out of range")?;
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .context("--since is out of range")?;
    let last = stream_end(stream).await?;
    if last == 0 {
        return Ok(None);
    }
    let newest = stream
        .get_raw_message(last)
        .await
        .context("reading the newest stored event")?;
    if newest.time < start_time {
        return Ok(None);
    }
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject::filter::all_rooms(),
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await
        .context("creating a replay consumer")?;
    let mut messages = consumer.messages().await.context("replaying")?;
    // The newest event is at or after `ms`, so one is coming.
    let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
        .await
        .context("replay stalled for 30 s")?
        .context("replay ended")?
        .map_err(|e| anyhow::anyhow!("replay: {e}"))?;
    let info = message
        .info()
        .map_err(|e| anyhow::anyhow!("message info: {e}"))?;
    Ok(Some(info.stream_sequence))
}
