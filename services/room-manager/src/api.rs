//! The one adapter between NATS request/reply and the handlers: the async-nats service API
//! (`$SRV.PING|INFO|STATS` discovery and per-endpoint stats) with one endpoint per command on
//! `roommgr.v1.<command>`, queue group `q` so replicas share the load. Each request is decoded,
//! validated, handled and answered with `{"v":1,"ok":…}` or `{"v":1,"error":{code,message}}`.
//! At most `max_inflight_commands` requests run at once per replica; more wait in NATS.

use std::future::Future;
use std::sync::Arc;

use async_nats::service::ServiceExt;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use voicerooms_contract::command::{
    decode_command, encode_reply, CreateRoom, ListMine, RoomCommand,
};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::wire::Validate;
use voicerooms_contract::ApiError;

use crate::rooms::{self, Core};

/// Decodes, handles and encodes one command, and records its latency by outcome (`ok` or the
/// error code). Never panics on input.
pub async fn dispatch(core: &Core, kind: CommandKind, body: &[u8]) -> Vec<u8> {
    let started = std::time::Instant::now();
    let (reply, outcome) = dispatch_inner(core, kind, body).await;
    core.metrics.op(kind.as_str(), outcome, started);
    reply
}

async fn dispatch_inner(core: &Core, kind: CommandKind, body: &[u8]) -> (Vec<u8>, &'static str) {
    match kind {
        CommandKind::Create => {
            handle::<CreateRoom, _, _, _>(body, |c| rooms::create(core, c)).await
        }
        CommandKind::Join => {
            handle::<rooms::JoinRequest, _, _, _>(body, |c| rooms::join(core, c)).await
        }
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

/// Serves every command until `token` is cancelled.
pub async fn serve(
    core: Arc<Core>,
    client: async_nats::Client,
    max_inflight: usize,
    tasks: TaskTracker,
    token: CancellationToken,
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
    tracing::info!("room API listening on roommgr.v1.*");
    loop {
        let next = tokio::select! {
            _ = token.cancelled() => break,
            n = requests.next() => n,
        };
        let Some((kind, request)) = next else { break };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let core = core.clone();
        let token = token.clone();
        // One span per command, child of the caller's (the edge's request span) when its
        // trace context came in the NATS headers; events published while handling carry it on.
        let span = tracing::info_span!("roommgr.command", command = kind.as_str());
        voicerooms_platform::telemetry::extract_into(&span, request.message.headers.as_ref());
        tasks.spawn(
            async move {
                // A command still waiting on Discord at shutdown is abandoned (the caller times
                // out; a create's slot is rolled back by the reconciler).
                let reply = tokio::select! {
                    _ = token.cancelled() => return,
                    r = dispatch(&core, kind, &request.message.payload) => r,
                };
                if let Err(e) = request.respond(Ok(reply.into())).await {
                    tracing::warn!(command = kind.as_str(), error = %e, "reply failed");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    let _ = service.stop().await;
    Ok(())
}
