//! NATS connection and the shared JetStream objects.
//!
//! [`connect`] returns at once and keeps (re)connecting in the background: a service starts while
//! NATS is still coming up and reports not-ready until it is connected, rather than crash-looping.
//! Every connection event is logged and counted. Publishes are bounded by
//! `nats.client_capacity`; beyond it they fail fast instead of growing memory.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use voicerooms_contract::{subject, StreamEpoch};

use crate::settings::NatsSettings;

/// Connection events services react to (e.g. the edge re-reads the stream after a gap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEvent {
    Connected,
    Disconnected,
    /// The subscription with this id (async-nats' `sid`) overflowed its buffer: messages were
    /// dropped from it.
    SlowConsumer(u64),
}

/// Connection metrics, registered under `nats_*`, and a broadcast of connection events.
#[derive(Clone)]
pub struct NatsMetrics {
    /// 1 while connected.
    pub connected: Gauge,
    /// Connection events by kind (connected, disconnected, slow_consumer, ...).
    pub events: Family<Vec<(String, String)>, Counter>,
    /// Subscribe with `notifier.subscribe()`; lagging receivers only lose old notifications.
    pub notifier: tokio::sync::broadcast::Sender<ConnectionEvent>,
}

impl Default for NatsMetrics {
    fn default() -> Self {
        Self {
            connected: Gauge::default(),
            events: Family::default(),
            notifier: tokio::sync::broadcast::channel(64).0,
        }
    }
}

impl NatsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nats_connected",
            "1 while connected to NATS",
            self.connected.clone(),
        );
        registry.register(
            "nats_connection_events",
            "NATS connection events by kind",
            self.events.clone(),
        );
    }
}

/// Connects to NATS with retries in the background; never blocks on an unreachable server.
pub async fn connect(
    settings: &NatsSettings,
    client_name: &str,
    metrics: NatsMetrics,
) -> anyhow::Result<async_nats::Client> {
    let metrics = Arc::new(metrics);
    let mut options = async_nats::ConnectOptions::new()
        .name(client_name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .request_timeout(Some(Duration::from_millis(settings.request_timeout_ms)))
        .client_capacity(settings.client_capacity)
        .subscription_capacity(settings.subscription_capacity)
        .event_callback(move |event| {
            let metrics = metrics.clone();
            async move { on_event(&metrics, event) }
        });
    if let Some(token) = &settings.token {
        options = options.token(token.expose().to_owned());
    }
    let urls: Vec<&str> = settings.url.split(',').map(str::trim).collect();
    let addrs = urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("nats.url: {e}"))?;
    Ok(options.connect(addrs).await?)
}

fn on_event(metrics: &NatsMetrics, event: async_nats::Event) {
    let kind = match &event {
        async_nats::Event::Connected => {
            metrics.connected.set(1);
            let _ = metrics.notifier.send(ConnectionEvent::Connected);
            tracing::info!(event = "connected", "nats connected");
            "connected"
        }
        async_nats::Event::Disconnected => {
            metrics.connected.set(0);
            let _ = metrics.notifier.send(ConnectionEvent::Disconnected);
            tracing::warn!(event = "disconnected", "nats disconnected; reconnecting");
            "disconnected"
        }
        async_nats::Event::LameDuckMode => {
            tracing::warn!(event = "lame_duck", "nats server entering lame duck mode");
            "lame_duck"
        }
        async_nats::Event::SlowConsumer(sid) => {
            let _ = metrics.notifier.send(ConnectionEvent::SlowConsumer(*sid));
            tracing::warn!(
                event = "slow_consumer",
                sid,
                "nats subscription fell behind"
            );
            "slow_consumer"
        }
        async_nats::Event::ServerError(e) => {
            tracing::error!(event = "server_error", error = %e, "nats server error");
            "server_error"
        }
        async_nats::Event::ClientError(e) => {
            tracing::error!(event = "client_error", error = %e, "nats client error");
            "client_error"
        }
        _ => {
            tracing::info!(event = ?event, "nats event");
            "other"
        }
    };
    metrics
        .events
        .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
        .inc();
}

/// Whether the client is connected right now.
pub fn is_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// The `ROOMS` stream: every room event, stored once (de-duplicated by `Nats-Msg-Id`) and
/// republished with its sequence on `live.rooms.>` for the edges' live feed.
pub fn rooms_stream_config(settings: &NatsSettings) -> stream::Config {
    stream::Config {
        name: subject::ROOMS_STREAM.to_owned(),
        description: Some("Every room event; stream sequence = per-room event sequence".into()),
        subjects: vec![subject::filter::all_rooms()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        max_age: Duration::from_secs(settings.stream_max_age_secs),
        max_bytes: settings.stream_max_bytes,
        max_message_size: voicerooms_contract::wire::MAX_MESSAGE_BYTES as i32,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(settings.duplicate_window_secs),
        allow_direct: true,
        republish: Some(stream::Republish {
            source: subject::filter::all_rooms(),
            destination: subject::filter::live_all(),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// Creates the `ROOMS` stream, or updates it to this build's configuration.
pub async fn ensure_rooms_stream(
    js: &jetstream::Context,
    settings: &NatsSettings,
) -> anyhow::Result<stream::Stream> {
    use anyhow::Context as _;
    let config = rooms_stream_config(settings);
    let mut create_error = None;
    if js.get_stream(subject::ROOMS_STREAM).await.is_ok() {
        js.update_stream(config)
            .await
            .context("updating the ROOMS stream")?;
    } else if let Err(e) = js.create_stream(config).await {
        // Another service may have created it a moment ago: that is success, if it can be read.
        tracing::debug!(error = %e, "create ROOMS stream raced; reading it");
        create_error = Some(e);
    }
    match js.get_stream(subject::ROOMS_STREAM).await {
        Ok(stream) => Ok(stream),
        // The read failing after a failed create: the create's error is the cause worth reporting
        // (e.g. a fresh cluster without enough JetStream peers yet), not the read's "not found".
        Err(read) => Err(match create_error {
            Some(create) => anyhow::anyhow!(
                "creating the ROOMS stream: {create}; reading it afterwards: {read}"
            ),
            None => anyhow::Error::new(read).context("reading the ROOMS stream"),
        }),
    }
}

/// Why the `ROOMS` stream's epoch could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StreamEpochError {
    #[error("the ROOMS stream does not exist")]
    NotFound,
    /// No answer within the request timeout, NATS disconnected, a JetStream error.
    #[error("reading the ROOMS stream failed: {0}")]
    Unavailable(String),
    #[error("the ROOMS stream reports a creation time outside 1970-2554: {0}")]
    OutOfRange(String),
}

/// The epoch ([`StreamEpoch`]) of the `ROOMS` stream as it exists now: one JetStream API request,
/// bounded by the connection's request timeout (`nats.request_timeout_ms`).
pub async fn rooms_stream_epoch(js: &jetstream::Context) -> Result<StreamEpoch, StreamEpochError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    match js.get_stream(subject::ROOMS_STREAM).await {
        Ok(stream) => stream_epoch(stream.cached_info()),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js_error)
                if js_error.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Err(StreamEpochError::NotFound)
            }
            _ => Err(StreamEpochError::Unavailable(e.to_string())),
        },
    }
}

/// The epoch of a stream from its info (when the caller has just read it anyway).
pub fn stream_epoch(info: &stream::Info) -> Result<StreamEpoch, StreamEpochError> {
    u64::try_from(info.created.unix_timestamp_nanos())
        .map(StreamEpoch::from_unix_nanos)
        .map_err(|_| StreamEpochError::OutOfRange(info.created.to_string()))
}

/// Creates a KV bucket if it does not exist, and opens it.
///
/// The bucket's stream is created directly (KV is a stream convention: `KV_<bucket>` over
/// `$KV.<bucket>.>`) because async-nats' `create_key_value` first asks for account info, whose
/// reply from nats-server 2.9 (Debian's) it cannot decode.
pub async fn ensure_kv(
    js: &jetstream::Context,
    bucket: &str,
    history: i64,
    replicas: usize,
) -> anyhow::Result<kv::Store> {
    use anyhow::Context as _;
    if let Ok(store) = js.get_key_value(bucket).await {
        // A replicated bucket made by an earlier version still allows direct (possibly stale)
        // gets: switch it to leader reads.
        let name = format!("KV_{bucket}");
        if let Ok(existing) = js.get_stream(&name).await {
            let config = existing.cached_info().config.clone();
            if config.num_replicas > 1 && config.allow_direct {
                let config = stream::Config {
                    allow_direct: false,
                    ..config
                };
                match js.update_stream(config).await {
                    Ok(_) => return js.get_key_value(bucket).await.context("reopening KV"),
                    Err(e) => tracing::warn!(error = %e, bucket, "could not disable direct gets"),
                }
            }
        }
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history.max(1),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        // Direct gets may be answered by any replica, including one that has not applied the
        // latest write yet: with R3, a room read right after a join could miss the new member
        // (a subscribe refused, a stale reply). Reads go through the leader when replicated.
        allow_direct: replicas <= 1,
        discard: stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    if let Err(e) = js.create_stream(config).await {
        tracing::debug!(error = %e, bucket, "create KV stream raced; opening it");
    }
    js.get_key_value(bucket)
        .await
        .with_context(|| format!("opening KV bucket {bucket}"))
}

/// A KV bucket opened (and created if missing) on first use, so a service can start while NATS
/// is still unreachable. Failed attempts are retried on the next use.
pub struct LazyBucket {
    js: jetstream::Context,
    name: String,
    history: i64,
    replicas: usize,
    cell: tokio::sync::OnceCell<kv::Store>,
}

impl LazyBucket {
    pub fn new(js: jetstream::Context, name: &str, history: i64, replicas: usize) -> Self {
        Self {
            js,
            name: name.to_owned(),
            history,
            replicas,
            cell: tokio::sync::OnceCell::new(),
        }
    }

    /// The bucket, opening or creating it if this is the first successful use.
    pub async fn get(&self) -> anyhow::Result<&kv::Store> {
        self.cell
            .get_or_try_init(|| ensure_kv(&self.js, &self.name, self.history, self.replicas))
            .await
    }
}
