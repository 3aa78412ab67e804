//! The one adapter between NATS request/reply and the handlers: the async-nats service API
//! (`$SRV.PING|INFO|STATS` discovery and per-endpoint stats) with one endpoint per command on
//! `roommgr.v1.<command>`, queue group `q` so replicas share the load. Each request is decoded,
//! validated, handled and answered with `{"v":1,"ok":…}` or `{"v":1,"error":{code,message}}`.
//! At most `max_inflight_commands` requests run at once per replica; more wait in NATS.
//!
//! Shutdown: the endpoints are unsubscribed (no new commands reach this replica; the others
//! take them), requests already received are still handled, and every command in progress runs
//! to its answer — Discord calls are cut at shutdown's cut-off, so even a command stuck on
//! Discord answers (`unavailable`, retryable) within the grace period, its create rolled back.

use std::future::Future;
use std::sync::Arc;

use async_nats::service::ServiceExt;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use voicerooms_contract::command::{
    decode_command, encode_reply, CreateRoom, JoinRoom, ListMine, RoomCommand,
};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::wire::Validate;
use voicerooms_contract::ApiError;

use crate::rooms::{self, Core};
use crate::supervisor::Up;

/// Decodes, handles and encodes one command, and records its latency by outcome (`ok` or the
/// error code). Never panics on input.
pub async fn dispatch(core: &Arc<Core>, kind: CommandKind, body: &[u8]) -> Vec<u8> {
    let started = std::time::Instant::now();
    let (reply, outcome) = dispatch_inner(core, kind, body).await;
    core.metrics.op(kind.as_str(), outcome, started);
    reply
}

async fn dispatch_inner(
    core: &Arc<Core>,
    kind: CommandKind,
    body: &[u8],
) -> (Vec<u8>, &'static str) {
    match kind {
        CommandKind::Create => {
            handle::<CreateRoom, _, _, _>(body, |c| rooms::create(core, c)).await
        }
        CommandKind::Join => handle::<JoinRoom, _, _, _>(body, |c| rooms::join(core, c)).await,
        CommandKind::Leave => handle::<RoomCommand, _, _, _>(body, |c| rooms::leave(core, c)).await,
        CommandKind::Close => handle::<RoomCommand, _, _, _>(body, |c| rooms::close(core, c)).await,
        CommandKind::Get => handle::<RoomCommand, _, _, _>(body, |c| rooms::get(core, c)).await,
        CommandKind::ListMine => {
            handle::<ListMine, _, _, _>(body, |c| rooms::list_mine(core, c)).await
        }
        CommandKind::RotateInvite => {
            handle::<RoomCommand, _, _, _>(body, |c| rooms::rotate_invite(core, c)).await
        }
    }
}

async fn handle<C, R, F, Fut>(body: &[u8], f: F) -> (Vec<u8>, &'static str)
where
    C: DeserializeOwned + Validate,
    R: Serialize,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<R, ApiError>>,
{
    let result = match decode_command::<C>(body) {
        Ok(cmd) => f(cmd).await,
        Err(e) => Err(ApiError::from(e)),
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => {
            tracing::debug!(code = %e.code, message = %e.message, "command failed");
            e.code.as_str()
        }
    };
    (encode_reply(&result), outcome)
}

/// Serves every command until `token` is cancelled, then stops taking new ones and answers
/// those already received (see the module documentation). Marks `up` once the endpoints exist.
pub async fn serve(
    core: Arc<Core>,
    client: async_nats::Client,
    max_inflight: usize,
    token: CancellationToken,
    up: Up,
) -> anyhow::Result<()> {
    let service = client
        .service_builder()
        .description("voicerooms room-manager: rooms, invites, placement")
        .start("room-manager", "1.0.0")
        .await
        .map_err(|e| anyhow::anyhow!("starting the NATS service: {e}"))?;
    let mut endpoints = Vec::new();
    for kind in CommandKind::ALL {
        let endpoint = service
            .endpoint_builder()
            .name(kind.as_str())
            .add(kind.subject())
            .await
            .map_err(|e| anyhow::anyhow!("adding endpoint {}: {e}", kind.as_str()))?;
        endpoints.push(endpoint.map(move |req| (kind, req)).boxed());
    }
    let mut requests = futures::stream::select_all(endpoints);
    let limit = Arc::new(Semaphore::new(max_inflight.max(1)));
    // Commands run here, not on the service's tracker: this task waits for them itself, so a
    // supervisor restart never leaves them behind, and shutdown waits for their answers.
    let inflight = tokio_util::task::TaskTracker::new();
    up.set(true);
    tracing::info!("room API listening on roommgr.v1.*");
    let mut stopping = Some(service);
    loop {
        let next = if stopping.is_some() {
            tokio::select! {
                _ = token.cancelled() => {
                    // Stop taking commands: the endpoints unsubscribe, what they already
                    // received still comes out of `requests`, then it ends.
                    if let Some(s) = stopping.take() {
                        let _ = s.stop().await;
                    }
                    up.set(false);
                    tracing::info!("room API stopped taking commands; finishing those in progress");
                    continue;
                }
                n = requests.next() => n,
            }
        } else {
            // Bounded: an endpoint whose subscription did not end is not waited for.
            tokio::time::timeout(std::time::Duration::from_secs(1), requests.next())
                .await
                .unwrap_or_default()
        };
        let Some((kind, request)) = next else { break };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let core = core.clone();
        // One span per command, child of the caller's (the edge's request span) when its
        // trace context came in the NATS headers; events published while handling carry it on.
        let span = tracing::info_span!("roommgr.command", command = kind.as_str());
        voicerooms_platform::telemetry::extract_into(&span, request.message.headers.as_ref());
        inflight.spawn(
            async move {
                let reply = dispatch(&core, kind, &request.message.payload).await;
                if let Err(e) = request.respond(Ok(reply.into())).await {
                    tracing::warn!(command = kind.as_str(), error = %e, "reply failed");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    inflight.close();
    inflight.wait().await;
    if token.is_cancelled() {
        tracing::info!("room API stopped");
        Ok(())
    } else {
        Err(anyhow::anyhow!("the command subscriptions ended"))
    }
}
