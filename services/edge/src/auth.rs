//! Discord OAuth2 login (authorization code + PKCE, via the `oauth2` crate), logout, and the
//! session lookup every API call goes through, with silent token refresh.
//!
//! ```text
//! GET /auth/login?return_to=/x  → 302 Discord authorize (state, PKCE S256); flow cookie (encrypted)
//! GET /auth/callback?code&state → check state, exchange code (+verifier), GET /users/@me,
//!                                 store session + token in KV, session cookie, 303 → /x
//! POST /auth/logout             → revoke (best effort), delete session, clear cookie
//! ```

use std::sync::Arc;
use std::time::Duration;

use actix_web::cookie::{time::Duration as CookieDuration, Cookie, SameSite};
use actix_web::{web, HttpRequest, HttpResponse};
use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RevocationUrl, Scope,
    TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use voicerooms_contract::command::UserToken;
use voicerooms_contract::subject::user_token_key;
use voicerooms_contract::wire::Validate;
use voicerooms_contract::{ErrorCode, UserId, UserRef};
use voicerooms_platform::nats::LazyBucket;

use crate::http::{login_url, safe_return_path, HttpError};
use crate::session::{SessionError, SessionStore, StoredSession};
use crate::OAuthSettings;

type Client = BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointSet, EndpointSet>;

/// Name of the short-lived cookie that carries state, PKCE verifier and return path.
const FLOW_COOKIE: &str = "vr_oauth";
/// Refresh the access token when it has less than this left.
const REFRESH_MARGIN_MS: u64 = 60_000;

/// Everything the login flow and session lookups need.
pub struct Auth {
    client: Client,
    http: reqwest::Client,
    settings: OAuthSettings,
    pub sessions: SessionStore,
    tokens: Arc<LazyBucket>,
    flow_key: cookie::Key,
    cookie_secure: bool,
    session_ttl_ms: u64,
    allowed_origins: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Flow {
    state: String,
    verifier: String,
    return_to: String,
}

#[derive(Deserialize)]
pub struct LoginQuery {
    return_to: Option<String>,
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// Discord's `GET /users/@me`, the fields we keep.
#[derive(Deserialize)]
struct DiscordUser {
    id: UserId,
    username: String,
    #[serde(default)]
    global_name: Option<String>,
    #[serde(default)]
    avatar: Option<String>,
}

impl Auth {
    pub fn new(
        settings: OAuthSettings,
        sessions: SessionStore,
        tokens: Arc<LazyBucket>,
        flow_key: cookie::Key,
        cookie_secure: bool,
        session_ttl_ms: u64,
        allowed_origins: Vec<String>,
    ) -> anyhow::Result<Self> {
        let client = BasicClient::new(ClientId::new(settings.client_id.clone()))
            .set_client_secret(ClientSecret::new(
                settings
                    .client_secret
                    .as_ref()
                    .map(|s| s.expose().to_owned())
                    .unwrap_or_default(),
            ))
            .set_auth_uri(AuthUrl::new(settings.authorize_url.clone())?)
            .set_token_uri(TokenUrl::new(settings.token_url.clone())?)
            .set_revocation_url(RevocationUrl::new(settings.revoke_url.clone())?)
            .set_redirect_uri(RedirectUrl::new(settings.redirect_url.clone())?);
        let http = reqwest::Client::builder()
            // The token endpoint must not redirect us elsewhere with our credentials.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()?;
        Ok(Self {
            client,
            http,
            settings,
            sessions,
            tokens,
            flow_key,
            cookie_secure,
            session_ttl_ms,
            allowed_origins,
        })
    }

    fn session_cookie(&self, value: String) -> Cookie<'static> {
        Cookie::build(self.sessions.cookie_name().to_owned(), value)
            .path("/")
            .http_only(true)
            .secure(self.cookie_secure)
            .same_site(SameSite::Lax)
            .max_age(CookieDuration::milliseconds(self.session_ttl_ms as i64))
            .finish()
    }

    /// The live session of a request, refreshing its Discord token when it is about to expire.
    /// A missing, invalid or unrefreshable session is a 401 carrying the login URL.
    pub async fn session(&self, req: &HttpRequest) -> Result<(String, StoredSession), HttpError> {
        let return_to = req
            .headers()
            .get("x-return-to")
            .and_then(|v| v.to_str().ok())
            .map(|s| safe_return_path(Some(s)))
            .unwrap_or_else(|| "/".to_owned());
        let unauthorized = || HttpError::unauthorized(login_url(&return_to));
        let cookie = req
            .cookie(self.sessions.cookie_name())
            .ok_or_else(unauthorized)?;
        let (id, mut session) = match self.sessions.load(cookie.value()).await {
            Ok(found) => found,
            Err(SessionError::Store(e)) => {
                return Err(HttpError::new(
                    ErrorCode::Unavailable,
                    format!("session store: {e}"),
                ))
            }
            Err(_) => return Err(unauthorized()),
        };
        if session.access_expires_at <= voicerooms_contract::now_ms() + REFRESH_MARGIN_MS {
            match self.refresh(&session).await {
                Ok(refreshed) => {
                    session = refreshed;
                    self.sessions
                        .update(&id, &session)
                        .await
                        .map_err(|e| HttpError::new(ErrorCode::Unavailable, e.to_string()))?;
                    self.store_token(&session).await;
                    tracing::info!(user = %session.user.id, "discord token refreshed");
                }
                Err(e) => {
                    tracing::info!(user = %session.user.id, error = %e, "token refresh failed; session ended");
                    let _ = self.sessions.delete(&id).await;
                    return Err(unauthorized());
                }
            }
        }
        Ok((id, session))
    }

    async fn refresh(&self, session: &StoredSession) -> anyhow::Result<StoredSession> {
        let token = self
            .client
            .exchange_refresh_token(&RefreshToken::new(session.refresh_token.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| anyhow::anyhow!("refresh: {}", oauth_error(&e)))?;
        let now = voicerooms_contract::now_ms();
        let mut next = session.clone();
        next.access_token = token.access_token().secret().clone();
        if let Some(refresh) = token.refresh_token() {
            next.refresh_token = refresh.secret().clone();
        }
        next.access_expires_at = now
            + token
                .expires_in()
                .map(|d| d.as_millis() as u64)
                .unwrap_or(3_600_000);
        next.scope = scope_string(token.scopes()).unwrap_or(next.scope);
        Ok(next)
    }

    /// Writes the access token where room-manager reads it (best effort: login still works).
    async fn store_token(&self, session: &StoredSession) {
        let token = UserToken {
            v: 1,
            access_token: session.access_token.clone(),
            expires_at: session.access_expires_at,
            scope: session.scope.clone(),
        };
        let result = match (self.tokens.get().await, serde_json::to_vec(&token)) {
            (Ok(store), Ok(bytes)) => store
                .put(user_token_key(session.user.id), bytes.into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            (Err(e), _) => Err(e.to_string()),
            (_, Err(e)) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(user = %session.user.id, error = %e, "could not store the player's token");
        }
    }
}

fn oauth_error<RE: std::error::Error + 'static, T: oauth2::ErrorResponse + 'static>(
    e: &oauth2::RequestTokenError<RE, T>,
) -> String {
    match e {
        oauth2::RequestTokenError::ServerResponse(r) => format!("{r}"),
        oauth2::RequestTokenError::Request(_) => "token endpoint unreachable".into(),
        oauth2::RequestTokenError::Parse(_, _) => "unreadable token response".into(),
        oauth2::RequestTokenError::Other(s) => s.clone(),
    }
}

fn scope_string(scopes: Option<&Vec<Scope>>) -> Option<String> {
    scopes.map(|s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "))
}

/// `GET /auth/login`.
pub async fn login(auth: web::Data<Auth>, query: web::Query<LoginQuery>) -> HttpResponse {
    let return_to = safe_return_path(query.return_to.as_deref());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = auth
        .client
        .authorize_url(CsrfToken::new_random)
        .set_pkce_challenge(challenge);
    for scope in auth.settings.scopes.split_whitespace() {
        request = request.add_scope(Scope::new(scope.to_owned()));
    }
    let (url, state) = request.url();
    let flow = Flow {
        state: state.secret().clone(),
        verifier: verifier.secret().clone(),
        return_to,
    };
    let mut jar = cookie::CookieJar::new();
    jar.private_mut(&auth.flow_key).add(cookie::Cookie::new(
        FLOW_COOKIE,
        serde_json::to_string(&flow).unwrap_or_default(),
    ));
    let sealed = jar
        .get(FLOW_COOKIE)
        .map(|c| c.value().to_owned())
        .unwrap_or_default();
    let cookie = Cookie::build(FLOW_COOKIE, sealed)
        .path("/auth")
        .http_only(true)
        .secure(auth.cookie_secure)
        .same_site(SameSite::Lax)
        .max_age(CookieDuration::minutes(10))
        .finish();
    HttpResponse::Found()
        .insert_header(("Location", url.to_string()))
        .cookie(cookie)
        .finish()
}

/// `GET /auth/callback`.
pub async fn callback(
    auth: web::Data<Auth>,
    req: HttpRequest,
    query: web::Query<CallbackQuery>,
) -> Result<HttpResponse, HttpError> {
    let flow: Flow = req
        .cookie(FLOW_COOKIE)
        .and_then(|c| {
            let mut jar = cookie::CookieJar::new();
            jar.add_original(cookie::Cookie::new(FLOW_COOKIE, c.value().to_owned()));
            jar.private(&auth.flow_key)
                .get(FLOW_COOKIE)
                .and_then(|c| serde_json::from_str(c.value()).ok())
        })
        .ok_or_else(|| HttpError::unauthorized(login_url("/")))?;
    if let Some(error) = &query.error {
        tracing::info!(error = %error.chars().take(64).collect::<String>(), "login refused at Discord");
        return Err(HttpError::unauthorized(login_url(&flow.return_to)));
    }
    let (Some(code), Some(state)) = (&query.code, &query.state) else {
        return Err(HttpError::new(
            ErrorCode::Validation,
            "missing code or state",
        ));
    };
    if state != &flow.state {
        return Err(HttpError::forbidden(
            "oauth_state",
            "login state does not match; try again",
        ));
    }
    let token = auth
        .client
        .exchange_code(AuthorizationCode::new(code.clone()))
        .set_pkce_verifier(PkceCodeVerifier::new(flow.verifier.clone()))
        .request_async(&auth.http)
        .await
        .map_err(|e| {
            tracing::warn!(error = %oauth_error(&e), "code exchange failed");
            HttpError::unauthorized(login_url(&flow.return_to))
        })?;
    let access = token.access_token().secret().clone();
    let me: DiscordUser = auth
        .http
        .get(format!(
            "{}/users/@me",
            auth.settings.api_base.trim_end_matches('/')
        ))
        .bearer_auth(&access)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|_| {
            HttpError::new(
                ErrorCode::DiscordUnavailable,
                "Discord did not return the user",
            )
        })?
        .json()
        .await
        .map_err(|_| {
            HttpError::new(
                ErrorCode::DiscordUnavailable,
                "Discord returned an unreadable user",
            )
        })?;
    let user = UserRef {
        id: me.id,
        username: me.username,
        global_name: me.global_name,
        avatar: me.avatar,
    };
    user.validate().map_err(|e| {
        HttpError::new(
            ErrorCode::DiscordUnavailable,
            format!("unusable Discord user: {e}"),
        )
    })?;
    let now = voicerooms_contract::now_ms();
    let session = StoredSession {
        v: 1,
        user,
        access_token: access,
        refresh_token: token
            .refresh_token()
            .map(|r| r.secret().clone())
            .unwrap_or_default(),
        access_expires_at: now
            + token
                .expires_in()
                .map(|d| d.as_millis() as u64)
                .unwrap_or(3_600_000),
        scope: scope_string(token.scopes()).unwrap_or_else(|| auth.settings.scopes.clone()),
        created_at: now,
        expires_at: now + auth.session_ttl_ms,
    };
    let value = auth
        .sessions
        .create(&session)
        .await
        .map_err(|e| HttpError::new(ErrorCode::Unavailable, e.to_string()))?;
    auth.store_token(&session).await;
    tracing::info!(user = %session.user.id, "logged in");
    let mut clear = Cookie::build(FLOW_COOKIE, "").path("/auth").finish();
    clear.make_removal();
    Ok(HttpResponse::SeeOther()
        .insert_header(("Location", flow.return_to))
        .cookie(auth.session_cookie(value))
        .cookie(clear)
        .finish())
}

/// `POST /auth/logout`.
pub async fn logout(auth: web::Data<Auth>, req: HttpRequest) -> Result<HttpResponse, HttpError> {
    crate::http::check_origin(&req, &auth.allowed_origins)?;
    if let Some(cookie) = req.cookie(auth.sessions.cookie_name()) {
        if let Ok((id, session)) = auth.sessions.load(cookie.value()).await {
            let revoke = auth
                .client
                .revoke_token(oauth2::StandardRevocableToken::AccessToken(
                    oauth2::AccessToken::new(session.access_token.clone()),
                ));
            if let Ok(request) = revoke {
                if request.request_async(&auth.http).await.is_err() {
                    tracing::info!(user = %session.user.id, "token revocation failed (ignored)");
                }
            }
            let _ = auth.sessions.delete(&id).await;
            if let Ok(store) = auth.tokens.get().await {
                let _ = store.delete(user_token_key(session.user.id)).await;
            }
            tracing::info!(user = %session.user.id, "logged out");
        }
    }
    let mut clear = auth.session_cookie(String::new());
    clear.make_removal();
    Ok(HttpResponse::NoContent().cookie(clear).finish())
}

/// `GET /api/me`: who is logged in (never any token).
pub async fn me(auth: web::Data<Auth>, req: HttpRequest) -> Result<HttpResponse, HttpError> {
    let (_, session) = auth.session(&req).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "user": session.user,
        "session_expires_at": session.expires_at,
    })))
}
