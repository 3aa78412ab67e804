//! The room HTTP API: each call checks the session (refreshing it silently), validates its body,
//! and forwards a typed command to room-manager over NATS request/reply with a timeout.
//!
//! | method and path | command | success |
//! |---|---|---|
//! | `POST /api/rooms` `{name, guild?, idempotency_key?}` | `create` | 201 `Created` |
//! | `POST /api/rooms/join` `{invite}` | `join` | 200 `Joined` |
//! | `GET /api/rooms` | `list_mine` | 200 `RoomList` |
//! | `GET /api/rooms/{room}` | `get` | 200 `RoomView` |
//! | `POST /api/rooms/{room}/leave` | `leave` | 200 `{}` |
//! | `POST /api/rooms/{room}/close` | `close` | 200 `{}` |
//! | `POST /api/rooms/{room}/invite` | `rotate_invite` | 200 `Invite` |

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use voicerooms_contract::command::{
    decode_reply, CreateRoom, Created, Done, Invite, JoinRoom, Joined, ListMine, RoomCommand,
    RoomList, RoomView,
};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::wire::Validate;
use voicerooms_contract::{ApiError, ErrorCode, GuildId, RoomId, UserRef};

use crate::auth::Auth;
use crate::http::{check_origin, HttpError};

/// What the API handlers share.
pub struct Api {
    pub nats: async_nats::Client,
    pub timeout: Duration,
    pub default_guild: Option<GuildId>,
    pub allowed_origins: Vec<String>,
}

impl Api {
    async fn call<Req: Serialize + Validate, Rep: DeserializeOwned>(
        &self,
        kind: CommandKind,
        request: Req,
    ) -> Result<Rep, HttpError> {
        request.validate().map_err(ApiError::from)?;
        let payload = serde_json::to_vec(&request)
            .map_err(|e| HttpError::new(ErrorCode::Internal, e.to_string()))?;
        // The request's span: its context travels in the NATS headers to room-manager.
        let span = tracing::info_span!("edge.roommgr_request", command = kind.as_str());
        let mut headers = async_nats::HeaderMap::new();
        span.in_scope(|| voicerooms_platform::telemetry::inject(&mut headers));
        let reply = tokio::time::timeout(
            self.timeout,
            self.nats
                .request_with_headers(kind.subject(), headers, payload.into()),
        )
        .instrument(span)
        .await
        .map_err(|_| HttpError::new(ErrorCode::Timeout, "room-manager did not answer in time"))?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {
                HttpError::new(ErrorCode::Unavailable, "room-manager is not running")
            }
            async_nats::RequestErrorKind::TimedOut => {
                HttpError::new(ErrorCode::Timeout, "room-manager did not answer in time")
            }
            _ => HttpError::new(ErrorCode::Unavailable, "NATS is not reachable"),
        })?;
        decode_reply::<Rep>(&reply.payload).map_err(HttpError::from)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    #[serde(default)]
    guild: Option<GuildId>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    invite: String,
}

async fn requester(auth: &Auth, req: &HttpRequest) -> Result<UserRef, HttpError> {
    auth.session(req).await.map(|(_, s)| s.user)
}

/// Sends a command that room-manager carries out with the player's Discord token (adding them to
/// the guild). Discord may refuse a token before its recorded expiry (revoked, expired early):
/// room-manager then answers `unauthorized`, and the token is refreshed once and the command sent
/// again. Refused again — or not refreshable — the session ends and the 401 carries the login URL.
async fn as_player<Rep, Fut>(
    auth: &Auth,
    req: &HttpRequest,
    send: impl Fn(UserRef) -> Fut,
) -> Result<Rep, HttpError>
where
    Fut: std::future::Future<Output = Result<Rep, HttpError>>,
{
    let (id, session) = auth.session(req).await?;
    match send(session.user.clone()).await {
        Err(e) if e.error.code == ErrorCode::Unauthorized => {
            tracing::info!(user = %session.user.id, "Discord refused the player's token; refreshing it");
            let refreshed = auth.refresh_refused(req, &id, &session).await?;
            match send(refreshed.user.clone()).await {
                Err(e) if e.error.code == ErrorCode::Unauthorized => {
                    auth.end_session(&id, session.user.id, "Discord refused the refreshed token")
                        .await;
                    Err(HttpError::unauthorized(Auth::login_url_for(req)))
                }
                other => other.map_err(|e| e.with_login_url(|| Auth::login_url_for(req))),
            }
        }
        other => other.map_err(|e| e.with_login_url(|| Auth::login_url_for(req))),
    }
}

fn room_id(raw: &str) -> Result<RoomId, HttpError> {
    RoomId::parse(raw).map_err(|e| HttpError::new(ErrorCode::Validation, format!("room: {e}")))
}

/// `POST /api/rooms`.
pub async fn create(
    api: web::Data<Api>,
    auth: web::Data<Auth>,
    req: HttpRequest,
    body: web::Json<CreateBody>,
) -> Result<HttpResponse, HttpError> {
    check_origin(&req, &api.allowed_origins)?;
    let body = body.into_inner();
    let guild = body.guild.or(api.default_guild).ok_or_else(|| {
        HttpError::new(
            ErrorCode::Validation,
            "guild is required (no default guild configured)",
        )
    })?;
    let created: Created = as_player(&auth, &req, |requester| {
        api.call(
            CommandKind::Create,
            CreateRoom {
                requester,
                guild,
                name: body.name.clone(),
                idempotency_key: body.idempotency_key.clone(),
            },
        )
    })
    .await?;
    Ok(HttpResponse::Created().json(created))
}

/// `POST /api/rooms/join`.
pub async fn join(
    api: web::Data<Api>,
    auth: web::Data<Auth>,
    req: HttpRequest,
    body: web::Json<JoinBody>,
) -> Result<HttpResponse, HttpError> {
    check_origin(&req, &api.allowed_origins)?;
    let invite = body.into_inner().invite;
    let joined: Joined = as_player(&auth, &req, |requester| {
        api.call(
            CommandKind::Join,
            JoinRoom {
                requester,
                invite: invite.clone(),
                room: None,
            },
        )
    })
    .await?;
    Ok(HttpResponse::Ok().json(joined))
}

/// `GET /api/rooms`.
pub async fn list(
    api: web::Data<Api>,
    auth: web::Data<Auth>,
    req: HttpRequest,
) -> Result<HttpResponse, HttpError> {
    let requester = requester(&auth, &req).await?;
    let rooms: RoomList = api
        .call(CommandKind::ListMine, ListMine { requester })
        .await
        .map_err(|e| e.with_login_url(|| Auth::login_url_for(&req)))?;
    Ok(HttpResponse::Ok().json(rooms))
}

/// `GET /api/rooms/{room}`.
pub async fn get(
    api: web::Data<Api>,
    auth: web::Data<Auth>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    let room = room_id(&path)?;
    let requester = requester(&auth, &req).await?;
    let view: RoomView = api
        .call(CommandKind::Get, RoomCommand { requester, room })
        .await
        .map_err(|e| e.with_login_url(|| Auth::login_url_for(&req)))?;
    Ok(HttpResponse::Ok().json(view))
}

/// `POST /api/rooms/{room}/{action}` for leave, close and invite.
pub async fn action(
    api: web::Data<Api>,
    auth: web::Data<Auth>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, HttpError> {
    check_origin(&req, &api.allowed_origins)?;
    let (room, action) = path.into_inner();
    let room = room_id(&room)?;
    let requester = requester(&auth, &req).await?;
    let command = RoomCommand { requester, room };
    let login = || Auth::login_url_for(&req);
    match action.as_str() {
        "leave" => {
            let done: Done = api
                .call(CommandKind::Leave, command)
                .await
                .map_err(|e| e.with_login_url(login))?;
            Ok(HttpResponse::Ok().json(done))
        }
        "close" => {
            let done: Done = api
                .call(CommandKind::Close, command)
                .await
                .map_err(|e| e.with_login_url(login))?;
            Ok(HttpResponse::Ok().json(done))
        }
        "invite" => {
            let invite: Invite = api
                .call(CommandKind::RotateInvite, command)
                .await
                .map_err(|e| e.with_login_url(login))?;
            Ok(HttpResponse::Ok().json(invite))
        }
        _ => Err(HttpError::new(ErrorCode::RoomNotFound, "no such action")),
    }
}

/// JSON body errors as typed `validation` errors, bodies bounded by `limit`.
pub fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(|e, _| HttpError::new(ErrorCode::Validation, body_error_message(&e)).into())
}

/// Longest message a body error answers with (it may quote the body).
const MAX_BODY_ERROR_BYTES: usize = 200;

/// What a refused body is told: its size, its type, or what the JSON decoder said, cut on a
/// character boundary.
pub fn body_error_message(e: &actix_web::error::JsonPayloadError) -> String {
    match e {
        actix_web::error::JsonPayloadError::Overflow { .. }
        | actix_web::error::JsonPayloadError::OverflowKnownLength { .. } => {
            "request body too large".to_owned()
        }
        actix_web::error::JsonPayloadError::ContentType => {
            "send Content-Type: application/json".to_owned()
        }
        other => {
            let mut m = other.to_string();
            voicerooms_contract::text::truncate_string(&mut m, MAX_BODY_ERROR_BYTES);
            m
        }
    }
}

/// `GET /api/openapi.json`.
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(include_str!("openapi.json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::error::JsonPayloadError;
    use proptest::prelude::*;

    /// Bodies of every shape: arbitrary bytes, JSON with hostile keys and values.
    fn any_body() -> impl Strategy<Value = Vec<u8>> {
        let text = proptest::collection::vec(
            prop_oneof![
                proptest::char::range(' ', '~'),
                Just('é'),
                Just('\u{1D4D0}'),
                Just('😀'),
                any::<char>()
            ],
            0..300,
        )
        .prop_map(|c| c.into_iter().collect::<String>());
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            (text.clone(), text.clone()).prop_map(|(k, v)| {
                let mut body = serde_json::Map::new();
                body.insert(k, serde_json::Value::String(v));
                serde_json::Value::Object(body).to_string().into_bytes()
            }),
            text.clone()
                .prop_map(|n| serde_json::json!({ "name": n }).to_string().into_bytes()),
            text.prop_map(|n| serde_json::json!({ "invite": n, "x": 1 })
                .to_string()
                .into_bytes()),
            (1usize..1_000)
                .prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()),
            Just(br#"{"name":1e999999}"#.to_vec()),
            Just(br#"{"guild":"18446744073709551616","name":"x"}"#.to_vec()),
        ]
    }

    fn refused<T: serde::de::DeserializeOwned>(body: &[u8]) {
        if let Err(e) = serde_json::from_slice::<T>(body) {
            let message = body_error_message(&JsonPayloadError::Deserialize(e));
            assert!(message.len() <= MAX_BODY_ERROR_BYTES, "{message}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn bodies_of_every_shape_decode_or_give_a_short_error(body in any_body()) {
            refused::<CreateBody>(&body);
            refused::<JoinBody>(&body);
        }

        #[test]
        fn valid_create_bodies_decode(name in "[^\\p{Cc}]{1,100}", key in proptest::option::of("[A-Za-z0-9_-]{1,64}")) {
            let body = serde_json::json!({"name": name, "idempotency_key": key}).to_string();
            let decoded: CreateBody = serde_json::from_str(&body).unwrap();
            prop_assert_eq!(decoded.name, name);
            prop_assert_eq!(decoded.idempotency_key, key);
        }
    }

    #[test]
    fn size_and_type_errors_have_fixed_messages() {
        assert_eq!(
            body_error_message(&JsonPayloadError::ContentType),
            "send Content-Type: application/json"
        );
        assert_eq!(
            body_error_message(&JsonPayloadError::Overflow { limit: 1 }),
            "request body too large"
        );
    }
}
