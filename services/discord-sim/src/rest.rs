//! The REST API under `/api` and `/api/v10`: routing, bot / bearer authentication, rate limits,
//! REST faults, Discord-shaped errors, and the handlers that change the world.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use serde_json::{json, Value};

use crate::config::perms;
use crate::error::SimError;
use crate::log::SimEventKind;
use crate::oauth;
use crate::ratelimit::{BucketHeaders, Decision};
use crate::state::{lock, RestFaultKind, Sim};
use crate::util::set;
use crate::world::{self, channel_type, Actor, ChannelPatch, ChannelSpec, Overwrite};

/// A Discord JSON error: `{code, message, errors?}` with its HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub code: u32,
    pub message: String,
    pub errors: Option<Value>,
}

impl ApiError {
    fn new(status: u16, code: u32, message: &str) -> Self {
        Self {
            status,
            code,
            message: message.to_owned(),
            errors: None,
        }
    }

    fn unauthorized() -> Self {
        Self::new(401, 0, "401: Unauthorized")
    }

    fn missing_access() -> Self {
        Self::new(403, 50001, "Missing Access")
    }

    fn missing_permissions() -> Self {
        Self::new(403, 50013, "Missing Permissions")
    }

    /// 50035 Invalid Form Body with Discord's nested `errors` for one field.
    fn form(field: &str, code: &str, message: &str) -> Self {
        Self {
            status: 400,
            code: 50035,
            message: "Invalid Form Body".into(),
            errors: Some(json!({field: {"_errors": [{"code": code, "message": message}]}})),
        }
    }

    fn body(&self) -> Value {
        let mut v = json!({"message": self.message, "code": self.code});
        if let Some(e) = &self.errors {
            set(&mut v, "errors", e.clone());
        }
        v
    }
}

impl From<SimError> for ApiError {
    fn from(e: SimError) -> Self {
        match e {
            SimError::UnknownGuild(_) => Self::new(404, 10004, "Unknown Guild"),
            SimError::UnknownChannel(_) => Self::new(404, 10003, "Unknown Channel"),
            SimError::UnknownUser(_) => Self::new(404, 10013, "Unknown User"),
            SimError::UnknownRole(_) => Self::new(404, 10011, "Unknown Role"),
            SimError::NotMember { .. } => Self::new(404, 10007, "Unknown Member"),
            SimError::NotConnected(_) => {
                Self::new(400, 40032, "Target user is not connected to voice")
            }
            SimError::MissingPermission { .. } => Self::missing_permissions(),
            SimError::NotVoice(_) => Self::form(
                "channel_id",
                "CHANNEL_TYPE_INVALID",
                "Channel is not a voice channel",
            ),
            SimError::ChannelFull { .. } => Self::new(400, 0, "Channel is full"),
            SimError::Conflict(_) => Self::new(400, 0, "Already exists"),
            SimError::BadRequest(m) => Self::form("_body", "BASE_TYPE_INVALID", &m),
            SimError::LimitReached {
                what: "guild roles",
                ..
            } => Self::new(400, 30005, "Maximum number of guild roles reached (250)"),
            SimError::LimitReached { .. } => {
                Self::new(400, 30013, "Maximum number of guild channels reached (500)")
            }
            SimError::ShuttingDown => Self::new(503, 0, "Service Unavailable"),
        }
    }
}

type ApiResult = Result<(u16, Option<Value>), ApiError>;

/// Who called.
#[derive(Debug, Clone, PartialEq)]
enum Caller {
    None,
    Bot,
    Bearer { user_id: u64, scope: String },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Auth {
    /// No token needed.
    Open,
    Bot,
    BotOrBearer,
    /// OAuth2 token endpoints (client credentials checked by the handler).
    Client,
}

/// A matched route: template for logs and buckets, the bucket group, the major parameter.
struct Route {
    template: &'static str,
    group: &'static str,
    major: u64,
    auth: Auth,
    op: Op,
}

enum Op {
    Gateway,
    GatewayBot,
    GetGuild(u64),
    GuildChannels(u64),
    CreateChannel(u64),
    GetChannel(u64),
    PatchChannel(u64),
    DeleteChannel(u64),
    GuildRoles(u64),
    CreateRole(u64),
    DeleteRole(u64, u64),
    MemberRole(u64, u64, u64, bool),
    GetMember(u64, u64),
    PutMember(u64, u64),
    PatchMember(u64, u64),
    Me,
    MyGuilds,
    Token,
    Revoke,
}

fn sf(s: &str) -> Option<u64> {
    s.parse().ok()
}

/// Maps method + path segments (after `/api[/v10]`) to a route. `Err(404 | 405)` otherwise.
fn route(method: &str, segs: &[&str]) -> Result<Route, u16> {
    use Op::*;
    let r = |template, group, major, auth, op| {
        Ok(Route {
            template,
            group,
            major,
            auth,
            op,
        })
    };
    let m = method;
    match segs {
        ["gateway"] => match m {
            "GET" => r("GET /gateway", "gateway", 0, Auth::Open, Gateway),
            _ => Err(405),
        },
        ["gateway", "bot"] => match m {
            "GET" => r("GET /gateway/bot", "gateway/bot", 0, Auth::Bot, GatewayBot),
            _ => Err(405),
        },
        ["guilds", g] => {
            let g = sf(g).ok_or(404u16)?;
            match m {
                "GET" => r("GET /guilds/{guild_id}", "guild", g, Auth::Bot, GetGuild(g)),
                _ => Err(405),
            }
        }
        ["guilds", g, "channels"] => {
            let g = sf(g).ok_or(404u16)?;
            match m {
                "GET" => r(
                    "GET /guilds/{guild_id}/channels",
                    "guild/channels:get",
                    g,
                    Auth::Bot,
                    GuildChannels(g),
                ),
                "POST" => r(
                    "POST /guilds/{guild_id}/channels",
                    "guild/channels:post",
                    g,
                    Auth::Bot,
                    CreateChannel(g),
                ),
                _ => Err(405),
            }
        }
        ["channels", c] => {
            let c = sf(c).ok_or(404u16)?;
            match m {
                "GET" => r(
                    "GET /channels/{channel_id}",
                    "channel:get",
                    c,
                    Auth::Bot,
                    GetChannel(c),
                ),
                "PATCH" => r(
                    "PATCH /channels/{channel_id}",
                    "channel:patch",
                    c,
                    Auth::Bot,
                    PatchChannel(c),
                ),
                "DELETE" => r(
                    "DELETE /channels/{channel_id}",
                    "channel:delete",
                    c,
                    Auth::Bot,
                    DeleteChannel(c),
                ),
                _ => Err(405),
            }
        }
        ["guilds", g, "roles"] => {
            let g = sf(g).ok_or(404u16)?;
            match m {
                "GET" => r(
                    "GET /guilds/{guild_id}/roles",
                    "guild/roles:get",
                    g,
                    Auth::Bot,
                    GuildRoles(g),
                ),
                "POST" => r(
                    "POST /guilds/{guild_id}/roles",
                    "guild/roles:post",
                    g,
                    Auth::Bot,
                    CreateRole(g),
                ),
                _ => Err(405),
            }
        }
        ["guilds", g, "roles", ro] => {
            let (g, ro) = (sf(g).ok_or(404u16)?, sf(ro).ok_or(404u16)?);
            match m {
                "DELETE" => r(
                    "DELETE /guilds/{guild_id}/roles/{role_id}",
                    "guild/role:delete",
                    g,
                    Auth::Bot,
                    DeleteRole(g, ro),
                ),
                _ => Err(405),
            }
        }
        ["guilds", g, "members", u, "roles", ro] => {
            let (g, u, ro) = (
                sf(g).ok_or(404u16)?,
                sf(u).ok_or(404u16)?,
                sf(ro).ok_or(404u16)?,
            );
            // PUT and DELETE share one bucket, as on Discord.
            match m {
                "PUT" => r(
                    "PUT /guilds/{guild_id}/members/{user_id}/roles/{role_id}",
                    "guild/member/role",
                    g,
                    Auth::Bot,
                    MemberRole(g, u, ro, true),
                ),
                "DELETE" => r(
                    "DELETE /guilds/{guild_id}/members/{user_id}/roles/{role_id}",
                    "guild/member/role",
                    g,
                    Auth::Bot,
                    MemberRole(g, u, ro, false),
                ),
                _ => Err(405),
            }
        }
        ["guilds", g, "members", u] => {
            let g = sf(g).ok_or(404u16)?;
            let u = sf(u).ok_or(404u16)?;
            match m {
                "GET" => r(
                    "GET /guilds/{guild_id}/members/{user_id}",
                    "guild/member:get",
                    g,
                    Auth::Bot,
                    GetMember(g, u),
                ),
                "PUT" => r(
                    "PUT /guilds/{guild_id}/members/{user_id}",
                    "guild/member:put",
                    g,
                    Auth::Bot,
                    PutMember(g, u),
                ),
                "PATCH" => r(
                    "PATCH /guilds/{guild_id}/members/{user_id}",
                    "guild/member:patch",
                    g,
                    Auth::Bot,
                    PatchMember(g, u),
                ),
                _ => Err(405),
            }
        }
        ["users", "@me"] => match m {
            "GET" => r("GET /users/@me", "users/@me", 0, Auth::BotOrBearer, Me),
            _ => Err(405),
        },
        ["users", "@me", "guilds"] => match m {
            "GET" => r(
                "GET /users/@me/guilds",
                "users/@me/guilds",
                0,
                Auth::BotOrBearer,
                MyGuilds,
            ),
            _ => Err(405),
        },
        ["oauth2", "token"] => match m {
            "POST" => r("POST /oauth2/token", "oauth2/token", 0, Auth::Client, Token),
            _ => Err(405),
        },
        ["oauth2", "token", "revoke"] => match m {
            "POST" => r(
                "POST /oauth2/token/revoke",
                "oauth2/token/revoke",
                0,
                Auth::Client,
                Revoke,
            ),
            _ => Err(405),
        },
        _ => Err(404),
    }
}

fn caller(sim: &Sim, req: &HttpRequest) -> Caller {
    let Some(h) = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
    else {
        return Caller::None;
    };
    if let Some(t) = h.strip_prefix("Bot ") {
        if t == sim.config.bot_token {
            return Caller::Bot;
        }
    } else if let Some(t) = h.strip_prefix("Bearer ") {
        if let Some((user_id, scope)) = lock(&sim.oauth).bearer(t) {
            return Caller::Bearer { user_id, scope };
        }
    }
    Caller::None
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn bucket_headers(b: &mut HttpResponseBuilder, h: &BucketHeaders) {
    b.insert_header(("X-RateLimit-Limit", h.limit.to_string()))
        .insert_header(("X-RateLimit-Remaining", h.remaining.to_string()))
        .insert_header(("X-RateLimit-Reset", format!("{:.3}", h.reset)))
        .insert_header(("X-RateLimit-Reset-After", format!("{:.3}", h.reset_after)))
        .insert_header(("X-RateLimit-Bucket", h.bucket.clone()));
}

fn too_many(scope: &str, retry_after: f64, headers: Option<&BucketHeaders>) -> HttpResponse {
    let global = scope == "global";
    let mut b = HttpResponse::TooManyRequests();
    if let Some(h) = headers {
        bucket_headers(&mut b, h);
    }
    b.insert_header((
        "Retry-After",
        (retry_after.ceil() as u64).max(1).to_string(),
    ))
    .insert_header(("X-RateLimit-Scope", scope.to_owned()));
    if global {
        b.insert_header(("X-RateLimit-Global", "true"));
    }
    b.json(json!({
        "message": "You are being rate limited.",
        "retry_after": (retry_after * 1000.0).round() / 1000.0,
        "global": global,
    }))
}

/// The single entry point for `/api/...`.
pub async fn api(req: HttpRequest, body: web::Bytes, sim: web::Data<Arc<Sim>>) -> HttpResponse {
    let sim = sim.get_ref().clone();
    let method = req.method().as_str().to_owned();
    let path = req.path().to_owned();
    let rest = path.strip_prefix("/api").unwrap_or(&path);
    let rest = ["/v10", "/v9"]
        .iter()
        .find_map(|v| {
            rest.strip_prefix(v)
                .filter(|r| r.is_empty() || r.starts_with('/'))
        })
        .unwrap_or(rest);
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let (resp, template, scope) = match route(&method, &segs) {
        Err(code) => {
            let msg = if code == 405 {
                "405: Method Not Allowed"
            } else {
                "404: Not Found"
            };
            (
                HttpResponse::build(status(code)).json(json!({"message": msg, "code": 0})),
                format!("{method} <unknown>"),
                None,
            )
        }
        Ok(r) => {
            let (resp, scope) = serve(&sim, &req, &body, &r).await;
            (resp, r.template.to_string(), scope)
        }
    };
    let code = resp.status().as_u16();
    lock(&sim.limiter).record_status(code, scope.as_deref());
    sim.record(SimEventKind::Rest {
        method,
        route: template,
        path,
        status: code,
    });
    resp
}

async fn serve(
    sim: &Arc<Sim>,
    req: &HttpRequest,
    body: &[u8],
    r: &Route,
) -> (HttpResponse, Option<String>) {
    // Injected REST faults, in queue order.
    let fault = {
        let mut f = lock(&sim.faults);
        let path = req.path();
        let idx = f
            .rest
            .iter()
            .position(|x| x.path_contains.as_deref().is_none_or(|p| path.contains(p)));
        let picked = idx.and_then(|i| {
            let entry = f.rest.get_mut(i)?;
            entry.remaining = entry.remaining.saturating_sub(1);
            let kind = entry.kind.clone();
            if entry.remaining == 0 {
                f.rest.remove(i);
            }
            Some(kind)
        });
        (picked, f.rest_latency)
    };
    let latency = sim.with_jitter(fault.1);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault.0 {
        Some(RestFaultKind::RateLimit { scope, retry_after }) => {
            return (too_many(&scope, retry_after, None), Some(scope));
        }
        Some(RestFaultKind::Status(code)) => {
            let resp = HttpResponse::build(status(code))
                .json(json!({"message": format!("{code}: Simulated server error"), "code": 0}));
            return (resp, None);
        }
        Some(RestFaultKind::Slow(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    let who = caller(sim, req);
    let authorised = match r.auth {
        Auth::Open | Auth::Client => true,
        Auth::Bot => who == Caller::Bot,
        Auth::BotOrBearer => who != Caller::None,
    };
    if !authorised {
        let e = ApiError::unauthorized();
        return (HttpResponse::build(status(e.status)).json(e.body()), None);
    }
    let mut headers = None;
    if who == Caller::Bot {
        match lock(&sim.limiter).check(r.template, r.group, r.major, true) {
            Decision::Allow(h) => headers = Some(h),
            Decision::Limited {
                scope,
                retry_after,
                headers,
            } => {
                return (
                    too_many(scope, retry_after, headers.as_ref()),
                    Some(scope.to_owned()),
                )
            }
            Decision::Banned { retry_after } => {
                let resp = HttpResponse::Forbidden()
                    .insert_header(("Retry-After", (retry_after.ceil() as u64).max(1).to_string()))
                    .json(json!({"message": "You are being blocked from accessing our API temporarily due to exceeding our rate limits frequently.", "code": 0}));
                return (resp, None);
            }
        }
    }
    let auth_header = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let result = handle(sim, &who, auth_header.as_deref(), body, &r.op);
    let mut b;
    let payload;
    match result {
        Ok((code, v)) => {
            b = HttpResponse::build(status(code));
            payload = v;
        }
        Err(e) => {
            b = HttpResponse::build(status(e.status));
            payload = Some(e.body());
        }
    }
    if let Some(h) = &headers {
        bucket_headers(&mut b, h);
    }
    let resp = match payload {
        Some(v) => b.json(v),
        None => b.finish(),
    };
    (resp, None)
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| ApiError::new(400, 50109, "The request body contains invalid JSON."))?;
    if !v.is_object() {
        return Err(ApiError::form(
            "_body",
            "DICT_TYPE_CONVERT",
            "Only dictionaries may be used in a DictType",
        ));
    }
    Ok(v)
}

/// A snowflake given as a string or a number.
fn snowflake(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn perm_bits(v: Option<&Value>) -> Result<u64, ()> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s.parse().map_err(|_| ()),
        Some(Value::Number(n)) => n.as_u64().ok_or(()),
        _ => Err(()),
    }
}

fn overwrites(v: Option<&Value>) -> Result<Option<Vec<Overwrite>>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let Some(arr) = v.as_array() else {
        return Err(ApiError::form(
            "permission_overwrites",
            "BASE_TYPE_LIST",
            "Must be a list",
        ));
    };
    let mut out = Vec::with_capacity(arr.len());
    for (i, o) in arr.iter().enumerate() {
        let bad = |m: &str| {
            ApiError::form(
                &format!("permission_overwrites.{i}"),
                "BASE_TYPE_INVALID",
                m,
            )
        };
        let id = o
            .get("id")
            .and_then(snowflake)
            .ok_or_else(|| bad("id must be a snowflake"))?;
        let kind = match o.get("type") {
            Some(Value::Number(n)) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
                n.as_u64().unwrap_or(0) as u8
            }
            Some(Value::String(s)) if s == "role" || s == "0" => 0,
            Some(Value::String(s)) if s == "member" || s == "1" => 1,
            _ => return Err(bad("type must be 0 (role) or 1 (member)")),
        };
        let allow =
            perm_bits(o.get("allow")).map_err(|_| bad("allow must be a permission string"))?;
        let deny = perm_bits(o.get("deny")).map_err(|_| bad("deny must be a permission string"))?;
        out.push(Overwrite {
            id,
            kind,
            allow,
            deny,
        });
    }
    Ok(Some(out))
}

/// The bot's guild-level permissions in `guild`, or 50001 when it is not there.
fn bot_perms(sim: &Sim, guild_id: u64) -> Result<u64, ApiError> {
    let world = lock(&sim.world);
    let g = world.guild(guild_id)?;
    if !g.bot_member {
        return Err(ApiError::missing_access());
    }
    Ok(world.base_permissions(g, world.bot_id))
}

fn require(sim: &Sim, guild_id: u64, bits: u64) -> Result<(), ApiError> {
    let p = bot_perms(sim, guild_id)?;
    if p & bits != bits {
        return Err(ApiError::missing_permissions());
    }
    Ok(())
}

/// With `strict_bot_permissions`, the bot needs `bits` on the channel itself (after
/// overwrites), as on Discord: without VIEW_CHANNEL the channel is 50001 Missing Access, without
/// the others 50013. Off by default: the bot is then not checked per channel.
fn require_on_channel(sim: &Sim, channel_id: u64, bits: u64) -> Result<(), ApiError> {
    if !sim.config.strict_bot_permissions {
        return Ok(());
    }
    let world = lock(&sim.world);
    let c = world.channel(channel_id)?;
    let g = world.guild(c.guild_id)?;
    let p = world.channel_permissions(g, c, world.bot_id);
    if p & perms::VIEW_CHANNEL == 0 {
        return Err(ApiError::missing_access());
    }
    if p & bits != bits {
        return Err(ApiError::missing_permissions());
    }
    Ok(())
}

fn guild_of_channel(sim: &Sim, channel_id: u64) -> Result<u64, ApiError> {
    let world = lock(&sim.world);
    Ok(world.channel(channel_id)?.guild_id)
}

fn handle(sim: &Arc<Sim>, who: &Caller, auth: Option<&str>, body: &[u8], op: &Op) -> ApiResult {
    match *op {
        Op::Gateway => Ok((200, Some(json!({"url": sim.gateway_url})))),
        Op::GatewayBot => {
            // Discord recommends about one shard per 1,000 guilds.
            let shards = sim.config.recommended_shards.unwrap_or_else(|| {
                let guilds = lock(&sim.world)
                    .guilds
                    .values()
                    .filter(|g| g.bot_member)
                    .count();
                u32::try_from(guilds.div_ceil(1_000))
                    .unwrap_or(u32::MAX)
                    .max(1)
            });
            let gw = lock(&sim.gateway);
            let remaining = sim
                .config
                .session_start_total
                .saturating_sub(gw.session_starts_used);
            let reset_after = gw
                .session_starts_reset
                .map(|t| {
                    t.saturating_duration_since(std::time::Instant::now())
                        .as_millis() as u64
                })
                .unwrap_or(86_400_000);
            Ok((
                200,
                Some(json!({
                    "url": sim.gateway_url,
                    "shards": shards,
                    "session_start_limit": {
                        "total": sim.config.session_start_total,
                        "remaining": remaining,
                        "reset_after": reset_after,
                        "max_concurrency": sim.config.max_concurrency,
                    }
                })),
            ))
        }
        Op::GetGuild(g) => {
            bot_perms(sim, g)?;
            let world = lock(&sim.world);
            Ok((200, Some(world.guild_base_json(world.guild(g)?))))
        }
        Op::GuildChannels(g) => {
            bot_perms(sim, g)?;
            let world = lock(&sim.world);
            let list: Vec<Value> = world
                .guild(g)?
                .channels
                .values()
                .map(world::channel_json)
                .collect();
            Ok((200, Some(Value::Array(list))))
        }
        Op::CreateChannel(g) => {
            let v = parse_body(body)?;
            let name = match v.get("name") {
                Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= 100 => s.clone(),
                Some(Value::String(_)) => {
                    return Err(ApiError::form(
                        "name",
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 100 in length.",
                    ))
                }
                _ => {
                    return Err(ApiError::form(
                        "name",
                        "BASE_TYPE_REQUIRED",
                        "This field is required",
                    ))
                }
            };
            let kind = match v.get("type") {
                None | Some(Value::Null) => channel_type::GUILD_TEXT,
                Some(t) => match t.as_u64() {
                    Some(k @ (0 | 2 | 4 | 13)) => k as u8,
                    _ => {
                        return Err(ApiError::form(
                            "type",
                            "BASE_TYPE_CHOICES",
                            "Value must be one of {0, 2, 4, 13}.",
                        ))
                    }
                },
            };
            let user_limit = match v.get("user_limit") {
                None | Some(Value::Null) => 0,
                Some(x) => match x.as_u64() {
                    Some(n) if n <= 99 => n as u32,
                    _ => {
                        return Err(ApiError::form(
                            "user_limit",
                            "NUMBER_TYPE_MAX",
                            "int value should be less than or equal to 99.",
                        ))
                    }
                },
            };
            let parent_id = match v.get("parent_id") {
                None | Some(Value::Null) => None,
                Some(p) => Some(snowflake(p).ok_or_else(|| {
                    ApiError::form("parent_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
                })?),
            };
            let ow = overwrites(v.get("permission_overwrites"))?.unwrap_or_default();
            require(sim, g, perms::MANAGE_CHANNELS)?;
            let spec = ChannelSpec {
                id: None,
                name,
                kind,
                parent_id,
                user_limit,
                bitrate: v.get("bitrate").and_then(Value::as_u64).map(|b| b as u32),
                position: v.get("position").and_then(Value::as_i64),
                overwrites: ow,
            };
            let c = sim.mutate(|w| w.create_channel(g, spec))?;
            Ok((201, Some(world::channel_json(&c))))
        }
        Op::GetChannel(c) => {
            let g = guild_of_channel(sim, c)?;
            bot_perms(sim, g)?;
            require_on_channel(sim, c, perms::VIEW_CHANNEL)?;
            let world = lock(&sim.world);
            Ok((200, Some(world::channel_json(world.channel(c)?))))
        }
        Op::PatchChannel(c) => {
            let g = guild_of_channel(sim, c)?;
            let v = parse_body(body)?;
            let mut patch = ChannelPatch::default();
            if let Some(n) = v.get("name") {
                match n.as_str() {
                    Some(s) if !s.is_empty() && s.chars().count() <= 100 => {
                        patch.name = Some(s.to_owned())
                    }
                    _ => {
                        return Err(ApiError::form(
                            "name",
                            "BASE_TYPE_BAD_LENGTH",
                            "Must be between 1 and 100 in length.",
                        ))
                    }
                }
            }
            if let Some(n) = v.get("user_limit") {
                match n.as_u64() {
                    Some(n) if n <= 99 => patch.user_limit = Some(n as u32),
                    _ => {
                        return Err(ApiError::form(
                            "user_limit",
                            "NUMBER_TYPE_MAX",
                            "int value should be less than or equal to 99.",
                        ))
                    }
                }
            }
            if let Some(p) = v.get("parent_id") {
                patch.parent_id = Some(if p.is_null() {
                    None
                } else {
                    Some(snowflake(p).ok_or_else(|| {
                        ApiError::form("parent_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
                    })?)
                });
            }
            patch.position = v.get("position").and_then(Value::as_i64);
            patch.bitrate = v.get("bitrate").and_then(Value::as_u64).map(|b| b as u32);
            patch.overwrites = overwrites(v.get("permission_overwrites"))?;
            require(sim, g, perms::MANAGE_CHANNELS)?;
            require_on_channel(sim, c, perms::MANAGE_CHANNELS)?;
            let c = sim.mutate(|w| w.update_channel(c, patch))?;
            Ok((200, Some(world::channel_json(&c))))
        }
        Op::DeleteChannel(c) => {
            let g = guild_of_channel(sim, c)?;
            require(sim, g, perms::MANAGE_CHANNELS)?;
            require_on_channel(sim, c, perms::MANAGE_CHANNELS)?;
            let c = sim.mutate(|w| w.delete_channel(c))?;
            Ok((200, Some(world::channel_json(&c))))
        }
        Op::GuildRoles(g) => {
            bot_perms(sim, g)?;
            let world = lock(&sim.world);
            let list: Vec<Value> = world
                .guild(g)?
                .roles
                .values()
                .map(world::role_json)
                .collect();
            Ok((200, Some(Value::Array(list))))
        }
        Op::CreateRole(g) => {
            let v = parse_body(body)?;
            let name = match v.get("name") {
                None | Some(Value::Null) => "new role".to_owned(),
                Some(Value::String(s)) if s.chars().count() <= 100 => s.clone(),
                _ => {
                    return Err(ApiError::form(
                        "name",
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 100 in length.",
                    ))
                }
            };
            let permissions = perm_bits(v.get("permissions")).map_err(|_| {
                ApiError::form("permissions", "BASE_TYPE_INVALID", "Invalid permissions")
            })?;
            require(sim, g, perms::MANAGE_ROLES)?;
            if permissions & !bot_perms(sim, g)? != 0 {
                // A bot cannot grant permissions it does not have.
                return Err(ApiError::missing_permissions());
            }
            let color = v.get("color").and_then(Value::as_u64).unwrap_or(0) as u32;
            let hoist = v.get("hoist").and_then(Value::as_bool).unwrap_or(false);
            let mentionable = v
                .get("mentionable")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let role =
                sim.mutate(|w| w.create_role(g, &name, permissions, color, hoist, mentionable))?;
            Ok((200, Some(world::role_json(&role))))
        }
        Op::DeleteRole(g, r) => {
            require(sim, g, perms::MANAGE_ROLES)?;
            role_below_bot(sim, g, r)?;
            sim.mutate(|w| w.delete_role(g, r))?;
            Ok((204, None))
        }
        Op::MemberRole(g, u, r, add) => {
            require(sim, g, perms::MANAGE_ROLES)?;
            role_below_bot(sim, g, r)?;
            sim.mutate(|w| w.set_member_role(g, u, r, add))?;
            Ok((204, None))
        }
        Op::GetMember(g, u) => {
            bot_perms(sim, g)?;
            let world = lock(&sim.world);
            let guild = world.guild(g)?;
            let m = guild
                .members
                .get(&u)
                .ok_or(SimError::NotMember { guild: g, user: u })?;
            Ok((200, Some(world::member_json(m, world.user(u)?))))
        }
        Op::PutMember(g, u) => put_member(sim, g, u, body),
        Op::PatchMember(g, u) => patch_member(sim, g, u, body),
        Op::Me => {
            let world = lock(&sim.world);
            let id = match who {
                Caller::Bearer { user_id, .. } => *user_id,
                _ => world.bot_id,
            };
            let mut v = world::user_json(world.user(id)?);
            if let Caller::Bearer { scope, .. } = who {
                set(&mut v, "locale", json!("en-US"));
                set(&mut v, "mfa_enabled", json!(false));
                set(&mut v, "premium_type", json!(0));
                if scope.split_whitespace().any(|s| s == "email") {
                    let email = format!(
                        "{}@sim.invalid",
                        v.get("username").and_then(Value::as_str).unwrap_or("user")
                    );
                    set(&mut v, "email", json!(email));
                    set(&mut v, "verified", json!(true));
                }
            }
            Ok((200, Some(v)))
        }
        Op::MyGuilds => {
            let world = lock(&sim.world);
            let id = match who {
                Caller::Bearer { user_id, scope } => {
                    if !scope.split_whitespace().any(|s| s == "guilds") {
                        return Err(ApiError::unauthorized());
                    }
                    *user_id
                }
                _ => world.bot_id,
            };
            let list: Vec<Value> = world
                .guilds
                .values()
                .filter(|g| g.members.contains_key(&id))
                .map(|g| {
                    json!({
                        "id": g.id.to_string(),
                        "name": g.name,
                        "icon": null,
                        "banner": null,
                        "owner": g.owner_id == id,
                        "permissions": world.base_permissions(g, id).to_string(),
                        "features": [],
                    })
                })
                .collect();
            Ok((200, Some(Value::Array(list))))
        }
        Op::Token => {
            let (code, v) = oauth::token(sim, auth, body);
            Ok((code, Some(v)))
        }
        Op::Revoke => {
            let (code, v) = oauth::revoke(sim, auth, body);
            Ok((code, Some(v)))
        }
    }
}

/// Discord's role hierarchy: a bot manages only roles below its highest role.
fn role_below_bot(sim: &Sim, g: u64, r: u64) -> Result<(), ApiError> {
    let world = lock(&sim.world);
    let guild = world.guild(g)?;
    let role = guild.roles.get(&r).ok_or(SimError::UnknownRole(r))?;
    let top = guild
        .members
        .get(&world.bot_id)
        .map(|m| {
            m.roles
                .iter()
                .filter_map(|id| guild.roles.get(id))
                .map(|x| x.position)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    if world.base_permissions(guild, world.bot_id) != u64::MAX && role.position >= top {
        return Err(ApiError::missing_permissions());
    }
    Ok(())
}

fn put_member(sim: &Arc<Sim>, g: u64, u: u64, body: &[u8]) -> ApiResult {
    let v = parse_body(body)?;
    let Some(token) = v.get("access_token").and_then(Value::as_str) else {
        return Err(ApiError::form(
            "access_token",
            "BASE_TYPE_REQUIRED",
            "This field is required",
        ));
    };
    bot_perms(sim, g)?;
    let grant = lock(&sim.oauth).bearer(token);
    match grant {
        Some((user, scope))
            if user == u && scope.split_whitespace().any(|s| s == "guilds.join") => {}
        _ => return Err(ApiError::new(403, 50025, "Invalid OAuth2 access token")),
    }
    let mut roles = Vec::new();
    if let Some(list) = v.get("roles").and_then(Value::as_array) {
        for r in list {
            roles.push(snowflake(r).ok_or_else(|| {
                ApiError::form("roles", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
            })?);
        }
        if !roles.is_empty() {
            require(sim, g, perms::MANAGE_ROLES)?;
        }
    }
    let nick = v.get("nick").and_then(Value::as_str).map(str::to_owned);
    let added = sim.mutate(|w| w.add_member(g, u, &roles, nick))?;
    if !added {
        return Ok((204, None));
    }
    let (mute, deaf) = (
        v.get("mute").and_then(Value::as_bool),
        v.get("deaf").and_then(Value::as_bool),
    );
    if mute.is_some() || deaf.is_some() {
        sim.mutate(|w| w.set_member_mute_deaf(g, u, mute, deaf))?;
    }
    let world = lock(&sim.world);
    let guild = world.guild(g)?;
    let m = guild
        .members
        .get(&u)
        .ok_or(SimError::NotMember { guild: g, user: u })?;
    Ok((201, Some(world::member_json(m, world.user(u)?))))
}

fn patch_member(sim: &Arc<Sim>, g: u64, u: u64, body: &[u8]) -> ApiResult {
    let v = parse_body(body)?;
    let bot = bot_perms(sim, g)?;
    {
        let world = lock(&sim.world);
        let guild = world.guild(g)?;
        if !guild.members.contains_key(&u) {
            return Err(SimError::NotMember { guild: g, user: u }.into());
        }
    }
    if let Some(ch) = v.get("channel_id") {
        if bot & perms::MOVE_MEMBERS == 0 {
            return Err(ApiError::missing_permissions());
        }
        if ch.is_null() {
            // Disconnecting someone who is not in voice changes nothing.
            let in_voice = lock(&sim.world).guild(g)?.voice.contains_key(&u);
            if in_voice {
                sim.mutate(|w| w.voice_leave(g, u))?;
            }
        } else {
            let target = snowflake(ch).ok_or_else(|| {
                ApiError::form(
                    "channel_id",
                    "NUMBER_TYPE_COERCE",
                    "Value is not snowflake.",
                )
            })?;
            {
                let world = lock(&sim.world);
                let guild = world.guild(g)?;
                let c = guild
                    .channels
                    .get(&target)
                    .ok_or(SimError::UnknownChannel(target))?;
                if !c.is_voice() {
                    return Err(SimError::NotVoice(target).into());
                }
                if !guild.voice.contains_key(&u) {
                    return Err(SimError::NotConnected(u).into());
                }
            }
            require_on_channel(sim, target, perms::CONNECT | perms::MOVE_MEMBERS)?;
            sim.mutate(|w| w.voice_join(g, u, target, Actor::Moderator))?;
        }
    }
    let mute = v.get("mute").and_then(Value::as_bool);
    let deaf = v.get("deaf").and_then(Value::as_bool);
    if mute.is_some() && bot & perms::MUTE_MEMBERS == 0
        || deaf.is_some() && bot & perms::DEAFEN_MEMBERS == 0
    {
        return Err(ApiError::missing_permissions());
    }
    if mute.is_some() || deaf.is_some() {
        sim.mutate(|w| w.set_member_mute_deaf(g, u, mute, deaf))?;
    }
    if let Some(list) = v.get("roles").and_then(Value::as_array) {
        if bot & perms::MANAGE_ROLES == 0 {
            return Err(ApiError::missing_permissions());
        }
        let wanted: Vec<u64> = list.iter().filter_map(snowflake).collect();
        let current: Vec<u64> = lock(&sim.world)
            .guild(g)?
            .members
            .get(&u)
            .map(|m| m.roles.clone())
            .unwrap_or_default();
        for r in current.iter().filter(|r| !wanted.contains(r)) {
            sim.mutate(|w| w.set_member_role(g, u, *r, false))?;
        }
        for r in wanted.iter().filter(|r| !current.contains(r)) {
            sim.mutate(|w| w.set_member_role(g, u, *r, true))?;
        }
    }
    let world = lock(&sim.world);
    let guild = world.guild(g)?;
    let m = guild
        .members
        .get(&u)
        .ok_or(SimError::NotMember { guild: g, user: u })?;
    Ok((200, Some(world::member_json(m, world.user(u)?))))
}
