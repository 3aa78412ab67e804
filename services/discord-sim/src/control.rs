//! The HTTP control API under `/_sim` (documented in docs/SIMULATOR.md). Each handler decodes
//! JSON, calls the same [`SimHandle`] method a test would, and answers JSON.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::error::SimError;
use crate::handle::{LoadSpec, SimHandle};
use crate::state::{RestFault, RestFaultKind};
use crate::world::{channel_type, ChannelSpec, Overwrite, VoiceFlags};

/// Accepts a snowflake as a JSON string or number.
pub fn de_id<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = Value::deserialize(d)?;
    match &v {
        Value::String(s) => s.parse().map_err(serde::de::Error::custom),
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| serde::de::Error::custom("not a snowflake")),
        _ => Err(serde::de::Error::custom("not a snowflake")),
    }
}

pub fn de_opt_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(serde::de::Error::custom),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("not a snowflake")),
        Some(_) => Err(serde::de::Error::custom("not a snowflake")),
    }
}

fn de_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    let v = Vec::<Value>::deserialize(d)?;
    v.iter()
        .map(|x| match x {
            Value::String(s) => s.parse().map_err(serde::de::Error::custom),
            Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| serde::de::Error::custom("not a snowflake")),
            _ => Err(serde::de::Error::custom("not a snowflake")),
        })
        .collect()
}

fn err(e: SimError) -> HttpResponse {
    HttpResponse::build(actix_web::http::StatusCode::from_u16(e.status()).unwrap_or_default())
        .json(json!({"error": e.code(), "message": e.to_string()}))
}

fn ok(v: Value) -> HttpResponse {
    HttpResponse::Ok().json(v)
}

fn reply<T>(r: Result<T, SimError>, f: impl FnOnce(T) -> Value) -> HttpResponse {
    match r {
        Ok(v) => ok(f(v)),
        Err(e) => err(e),
    }
}

type H = web::Data<SimHandle>;

#[derive(Deserialize)]
struct NewGuild {
    #[serde(default, deserialize_with = "de_opt_id")]
    id: Option<u64>,
    name: String,
    #[serde(default = "yes")]
    bot_member: bool,
}

fn yes() -> bool {
    true
}

async fn create_guild(h: H, b: web::Json<NewGuild>) -> HttpResponse {
    reply(
        h.create_guild_with(b.id, &b.name, b.bot_member),
        |id| json!({"id": id.to_string()}),
    )
}

#[derive(Deserialize)]
struct NewUser {
    #[serde(default, deserialize_with = "de_opt_id")]
    id: Option<u64>,
    username: String,
    #[serde(default, deserialize_with = "de_ids")]
    guilds: Vec<u64>,
}

async fn create_user(h: H, b: web::Json<NewUser>) -> HttpResponse {
    let r = h.create_user_with(b.id, &b.username).and_then(|id| {
        for g in &b.guilds {
            h.add_member(*g, id, &[])?;
        }
        Ok(id)
    });
    reply(r, |id| json!({"id": id.to_string()}))
}

#[derive(Deserialize)]
struct NewMember {
    #[serde(deserialize_with = "de_id")]
    user_id: u64,
    #[serde(default, deserialize_with = "de_ids")]
    roles: Vec<u64>,
}

async fn add_member(h: H, p: web::Path<u64>, b: web::Json<NewMember>) -> HttpResponse {
    reply(
        h.add_member(p.into_inner(), b.user_id, &b.roles),
        |added| json!({"added": added}),
    )
}

#[derive(Deserialize)]
struct NewOverwrite {
    #[serde(deserialize_with = "de_id")]
    id: u64,
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default, deserialize_with = "de_opt_id")]
    allow: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_id")]
    deny: Option<u64>,
}

#[derive(Deserialize)]
struct NewChannel {
    #[serde(default, deserialize_with = "de_opt_id")]
    id: Option<u64>,
    name: String,
    #[serde(rename = "type", default = "voice")]
    kind: u8,
    #[serde(default)]
    user_limit: u32,
    #[serde(default, deserialize_with = "de_opt_id")]
    parent_id: Option<u64>,
    #[serde(default)]
    permission_overwrites: Vec<NewOverwrite>,
}

fn voice() -> u8 {
    channel_type::GUILD_VOICE
}

async fn create_channel(h: H, p: web::Path<u64>, b: web::Json<NewChannel>) -> HttpResponse {
    let b = b.into_inner();
    let spec = ChannelSpec {
        id: b.id,
        name: b.name,
        kind: b.kind,
        parent_id: b.parent_id,
        user_limit: b.user_limit,
        bitrate: None,
        position: None,
        overwrites: b
            .permission_overwrites
            .into_iter()
            .map(|o| Overwrite {
                id: o.id,
                kind: o.kind,
                allow: o.allow.unwrap_or(0),
                deny: o.deny.unwrap_or(0),
            })
            .collect(),
    };
    reply(
        h.create_channel(p.into_inner(), spec),
        |id| json!({"id": id.to_string()}),
    )
}

async fn delete_channel(h: H, p: web::Path<u64>) -> HttpResponse {
    reply(h.delete_channel(p.into_inner()), |_| json!({}))
}

#[derive(Deserialize)]
struct NewRole {
    name: String,
    #[serde(default, deserialize_with = "de_opt_id")]
    permissions: Option<u64>,
}

async fn create_role(h: H, p: web::Path<u64>, b: web::Json<NewRole>) -> HttpResponse {
    reply(
        h.create_role(p.into_inner(), &b.name, b.permissions.unwrap_or(0)),
        |id| json!({"id": id.to_string()}),
    )
}

async fn add_role(h: H, p: web::Path<(u64, u64, u64)>) -> HttpResponse {
    let (g, u, r) = p.into_inner();
    reply(h.set_member_role(g, u, r, true), |_| json!({}))
}

async fn remove_role(h: H, p: web::Path<(u64, u64, u64)>) -> HttpResponse {
    let (g, u, r) = p.into_inner();
    reply(h.set_member_role(g, u, r, false), |_| json!({}))
}

#[derive(Deserialize)]
struct BotPerms {
    #[serde(deserialize_with = "de_id")]
    permissions: u64,
}

async fn bot_permissions(h: H, p: web::Path<u64>, b: web::Json<BotPerms>) -> HttpResponse {
    reply(h.set_bot_permissions(p.into_inner(), b.permissions), |_| {
        json!({})
    })
}

#[derive(Deserialize)]
struct VoiceTarget {
    #[serde(deserialize_with = "de_id")]
    user_id: u64,
    #[serde(deserialize_with = "de_id")]
    channel_id: u64,
}

async fn voice_connect(h: H, b: web::Json<VoiceTarget>) -> HttpResponse {
    reply(h.connect_voice(b.user_id, b.channel_id), |_| json!({}))
}

async fn voice_move(h: H, b: web::Json<VoiceTarget>) -> HttpResponse {
    reply(h.move_voice(b.user_id, b.channel_id), |_| json!({}))
}

#[derive(Deserialize)]
struct VoiceUser {
    #[serde(deserialize_with = "de_id")]
    user_id: u64,
}

async fn voice_disconnect(h: H, b: web::Json<VoiceUser>) -> HttpResponse {
    reply(h.disconnect_voice(b.user_id), |_| json!({}))
}

#[derive(Deserialize)]
struct VoiceStateBody {
    #[serde(deserialize_with = "de_id")]
    user_id: u64,
    #[serde(flatten)]
    flags: VoiceFlags,
}

async fn voice_state(h: H, b: web::Json<VoiceStateBody>) -> HttpResponse {
    let b = b.into_inner();
    reply(h.set_voice_flags(b.user_id, b.flags), |_| json!({}))
}

#[derive(Deserialize, Default)]
struct Target {
    session_id: Option<String>,
    #[serde(default)]
    resumable: bool,
    code: Option<u16>,
    enabled: Option<bool>,
    seconds: Option<f64>,
}

async fn fault_drop(h: H, b: Option<web::Json<Target>>) -> HttpResponse {
    let b = b.map(|b| b.into_inner()).unwrap_or_default();
    ok(json!({"connections": h.drop_connections(b.session_id.as_deref())}))
}

async fn fault_reconnect(h: H, b: Option<web::Json<Target>>) -> HttpResponse {
    let b = b.map(|b| b.into_inner()).unwrap_or_default();
    ok(json!({"connections": h.send_reconnect(b.session_id.as_deref())}))
}

async fn fault_invalid_session(h: H, b: Option<web::Json<Target>>) -> HttpResponse {
    let b = b.map(|b| b.into_inner()).unwrap_or_default();
    ok(json!({"connections": h.invalidate_sessions(b.resumable, b.session_id.as_deref())}))
}

async fn fault_close(h: H, b: web::Json<Target>) -> HttpResponse {
    let Some(code) = b.code else {
        return err(SimError::BadRequest("code is required".into()));
    };
    if !(1000..=4999).contains(&code) {
        return err(SimError::BadRequest("code must be 1000..=4999".into()));
    }
    ok(json!({"connections": h.close_connections(code, b.session_id.as_deref())}))
}

async fn fault_request_heartbeat(h: H) -> HttpResponse {
    ok(json!({"connections": h.request_heartbeat()}))
}

async fn fault_acks(h: H, b: web::Json<Target>) -> HttpResponse {
    h.set_heartbeat_acks(b.enabled.unwrap_or(true));
    ok(json!({}))
}

async fn fault_refuse(h: H, b: web::Json<Target>) -> HttpResponse {
    let secs = b.seconds.unwrap_or(0.0);
    if !(0.0..=3600.0).contains(&secs) {
        return err(SimError::BadRequest("seconds must be 0..=3600".into()));
    }
    h.refuse_connections_for(Duration::from_secs_f64(secs));
    ok(json!({}))
}

#[derive(Deserialize)]
struct RestFaultBody {
    kind: String,
    #[serde(default = "one")]
    count: u32,
    scope: Option<String>,
    retry_after: Option<f64>,
    status: Option<u16>,
    delay_ms: Option<u64>,
    path_contains: Option<String>,
}

fn one() -> u32 {
    1
}

async fn fault_rest(h: H, b: web::Json<RestFaultBody>) -> HttpResponse {
    let b = b.into_inner();
    let kind = match b.kind.as_str() {
        "rate_limit" => {
            let scope = b.scope.unwrap_or_else(|| "user".into());
            if !["user", "global", "shared"].contains(&scope.as_str()) {
                return err(SimError::BadRequest(
                    "scope must be user, global or shared".into(),
                ));
            }
            RestFaultKind::RateLimit {
                scope,
                retry_after: b.retry_after.unwrap_or(1.0).clamp(0.0, 3600.0),
            }
        }
        "status" => match b.status {
            Some(s @ 400..=599) => RestFaultKind::Status(s),
            _ => return err(SimError::BadRequest("status must be 400..=599".into())),
        },
        "slow" => RestFaultKind::Slow(Duration::from_millis(
            b.delay_ms.unwrap_or(1000).min(60_000),
        )),
        _ => {
            return err(SimError::BadRequest(
                "kind must be rate_limit, status or slow".into(),
            ))
        }
    };
    reply(
        h.inject_rest_fault(RestFault {
            kind,
            remaining: b.count.clamp(1, 10_000),
            path_contains: b.path_contains,
        }),
        |_| json!({}),
    )
}

#[derive(Deserialize)]
struct Latency {
    #[serde(default)]
    rest_ms: u64,
    #[serde(default)]
    gateway_ms: u64,
    #[serde(default)]
    jitter_ms: u64,
}

async fn fault_latency(h: H, b: web::Json<Latency>) -> HttpResponse {
    h.set_latency(
        Duration::from_millis(b.rest_ms.min(60_000)),
        Duration::from_millis(b.gateway_ms.min(60_000)),
    );
    h.set_jitter(Duration::from_millis(b.jitter_ms.min(60_000)));
    ok(json!({}))
}

async fn fault_clear(h: H) -> HttpResponse {
    h.clear_faults();
    ok(json!({}))
}

async fn ratelimit_reset(h: H) -> HttpResponse {
    h.reset_rate_limits();
    ok(json!({}))
}

#[derive(Deserialize)]
struct NextLogin {
    user: Value,
}

async fn next_login(h: H, b: web::Json<NextLogin>) -> HttpResponse {
    let key = match &b.user {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => {
            return err(SimError::BadRequest(
                "user must be an id or a username".into(),
            ))
        }
    };
    let id = crate::state::lock(&h.sim.world)
        .find_user(&key)
        .map(|u| u.id);
    match id {
        Some(id) => {
            h.set_next_login(id);
            ok(json!({"user_id": id.to_string()}))
        }
        None => err(SimError::BadRequest(format!("no user {key}"))),
    }
}

#[derive(Deserialize)]
struct NextError {
    error: String,
}

async fn next_error(h: H, b: web::Json<NextError>) -> HttpResponse {
    h.set_next_authorize_error(&b.error);
    ok(json!({}))
}

async fn expire_tokens(h: H) -> HttpResponse {
    h.expire_access_tokens();
    ok(json!({}))
}

async fn start_load(h: H, b: web::Json<LoadSpec>) -> HttpResponse {
    reply(h.start_load(b.into_inner()), |_| json!({"started": true}))
}

async fn load_status(h: H) -> HttpResponse {
    ok(json!({"running": h.load_running()}))
}

async fn stop_load(h: H) -> HttpResponse {
    h.stop_load();
    ok(json!({}))
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn log(h: H, q: web::Query<Since>) -> HttpResponse {
    ok(json!(h.events_since(q.since)))
}

async fn clear_log(h: H) -> HttpResponse {
    h.clear_events();
    ok(json!({}))
}

async fn state(h: H) -> HttpResponse {
    ok(h.snapshot())
}

async fn sessions(h: H) -> HttpResponse {
    ok(json!({"sessions": h.sessions(), "connections": h.connection_count()}))
}

async fn urls(h: H) -> HttpResponse {
    ok(json!({"http": h.http_url(), "api": h.api_url(), "gateway": h.gateway_url()}))
}

/// Registers the `/_sim` scope.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/_sim")
            .route("", web::get().to(urls))
            .route("/state", web::get().to(state))
            .route("/sessions", web::get().to(sessions))
            .route("/log", web::get().to(log))
            .route("/log", web::delete().to(clear_log))
            .route("/guilds", web::post().to(create_guild))
            .route("/users", web::post().to(create_user))
            .route("/guilds/{g}/members", web::post().to(add_member))
            .route("/guilds/{g}/channels", web::post().to(create_channel))
            .route("/guilds/{g}/roles", web::post().to(create_role))
            .route(
                "/guilds/{g}/bot_permissions",
                web::post().to(bot_permissions),
            )
            .route("/guilds/{g}/members/{u}/roles/{r}", web::put().to(add_role))
            .route(
                "/guilds/{g}/members/{u}/roles/{r}",
                web::delete().to(remove_role),
            )
            .route("/channels/{c}", web::delete().to(delete_channel))
            .route("/voice/connect", web::post().to(voice_connect))
            .route("/voice/move", web::post().to(voice_move))
            .route("/voice/disconnect", web::post().to(voice_disconnect))
            .route("/voice/state", web::post().to(voice_state))
            .route("/faults/drop", web::post().to(fault_drop))
            .route("/faults/reconnect", web::post().to(fault_reconnect))
            .route(
                "/faults/invalid_session",
                web::post().to(fault_invalid_session),
            )
            .route("/faults/close", web::post().to(fault_close))
            .route(
                "/faults/request_heartbeat",
                web::post().to(fault_request_heartbeat),
            )
            .route("/faults/heartbeat_acks", web::post().to(fault_acks))
            .route("/faults/refuse_connections", web::post().to(fault_refuse))
            .route("/faults/rest", web::post().to(fault_rest))
            .route("/faults/latency", web::post().to(fault_latency))
            .route("/faults/clear", web::post().to(fault_clear))
            .route("/ratelimits/reset", web::post().to(ratelimit_reset))
            .route("/oauth/next_login", web::post().to(next_login))
            .route("/oauth/next_error", web::post().to(next_error))
            .route("/oauth/expire_access_tokens", web::post().to(expire_tokens))
            .route("/load", web::post().to(start_load))
            .route("/load", web::get().to(load_status))
            .route("/load", web::delete().to(stop_load)),
    );
}
