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

    /// Where a 401 for this request sends the player: login, then back to the page named in
    /// `X-Return-To` (a local path), else `/`.
    pub fn login_url_for(req: &HttpRequest) -> String {
        let return_to = req
            .headers()
            .get("x-return-to")
            .and_then(|v| v.to_str().ok())
            .map(|s| safe_return_path(Some(s)))
            .unwrap_or_else(|| "/".to_owned());
        login_url(&return_to)
    }

    /// The live session of a request, refreshing its Discord token when it is about to expire.
    /// A missing, invalid or ended session is a 401 carrying the login URL.
    pub async fn session(&self, req: &HttpRequest) -> Result<(String, StoredSession), HttpError> {
        let unauthorized = || HttpError::unauthorized(Self::login_url_for(req));
        let cookie = req
            .cookie(self.sessions.cookie_name())
            .ok_or_else(unauthorized)?;
        let id = self
            .sessions
            .verify(cookie.value())
            .map_err(|_| unauthorized())?;
        let (session, _) = match self.sessions.entry(&id).await {
            Ok(found) => found,
            Err(SessionError::Store(e)) => {
                return Err(HttpError::new(
                    ErrorCode::Unavailable,
                    format!("session store: {e}"),
                ))
            }
            Err(_) => return Err(unauthorized()),
        };
        if !Stale::Expiring.holds(&session, voicerooms_contract::now_ms()) {
            return Ok((id, session));
        }
        match self.refresh_session(&id, Stale::Expiring).await {
            Ok(session) => Ok((id, session)),
            Err(e) => Err(e.into_http(req)),
        }
    }

    /// Discord refused the player's current token (e.g. it expired early): refresh it once.
    /// The refreshed session, with its token stored for room-manager.
    pub async fn refresh_refused(
        &self,
        req: &HttpRequest,
        id: &str,
        refused: &StoredSession,
    ) -> Result<StoredSession, HttpError> {
        self.refresh_session(id, Stale::Refused(refused.access_token.clone()))
            .await
            .map_err(|e| e.into_http(req))
    }

    /// Ends a session for good (its sockets on every edge close too: they watch the bucket).
    pub async fn end_session(&self, id: &str, user: UserId, why: &str) {
        tracing::info!(user = %user, why, "session ended");
        if let Err(e) = self.sessions.delete(id).await {
            tracing::warn!(user = %user, error = %e, "could not delete an ended session");
        }
    }

    /// Refreshes the session's Discord token unless it is no longer stale — once per session at
    /// a time across every edge. The session entry is the lock: an edge claims the refresh by
    /// compare-and-set (`refreshing_until`), calls Discord, and writes the new tokens by
    /// compare-and-set on its claim. Everyone else uses the current token while it lasts, or
    /// waits for the new one. Discord rotates refresh tokens, so an `invalid_grant` may only
    /// mean another refresh won: the entry is re-read before the session is given up.
    async fn refresh_session(&self, id: &str, stale: Stale) -> Result<StoredSession, RefreshError> {
        let give_up = std::time::Instant::now()
            .checked_add(Duration::from_millis(
                self.settings.timeout_ms.saturating_add(CLAIM_SLACK_MS),
            ))
            .unwrap_or_else(std::time::Instant::now);
        loop {
            let (session, revision) = self.sessions.entry(id).await?;
            let now = voicerooms_contract::now_ms();
            if !stale.holds(&session, now) {
                return Ok(session);
            }
            if session.refreshing_until.is_some_and(|until| until > now) {
                // Another request (here or on another edge) is refreshing it.
                if stale.usable_meanwhile(&session, now) {
                    return Ok(session);
                }
                if std::time::Instant::now() > give_up {
                    return Err(RefreshError::Unavailable(
                        "the token refresh is taking too long",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let mut claim = session.clone();
            claim.refreshing_until = Some(
                now.saturating_add(self.settings.timeout_ms)
                    .saturating_add(CLAIM_SLACK_MS),
            );
            let claimed = match self.sessions.replace(id, &claim, revision).await {
                Ok(revision) => revision,
                // Someone else claimed (or refreshed, or ended) it first: look again.
                Err(SessionError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            };
            return self.refresh_claimed(id, &session, claimed, &stale).await;
        }
    }

    /// Calls Discord for a refresh this edge has claimed, and stores the outcome.
    async fn refresh_claimed(
        &self,
        id: &str,
        session: &StoredSession,
        mut revision: u64,
        stale: &Stale,
    ) -> Result<StoredSession, RefreshError> {
        match self.refresh(session).await {
            Ok(mut next) => {
                next.refreshing_until = None;
                loop {
                    match self.sessions.replace(id, &next, revision).await {
                        Ok(_) => break,
                        Err(SessionError::Conflict) => {
                            // Written meanwhile (our claim ran out and another edge took it, or
                            // a logout). Ours are the valid tokens unless someone refreshed too.
                            let (current, current_revision) = self.sessions.entry(id).await?;
                            if current.refresh_token != session.refresh_token {
                                return Ok(current);
                            }
                            revision = current_revision;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                self.store_token(&next).await.map_err(|_| {
                    RefreshError::Unavailable("could not store the refreshed token")
                })?;
                tracing::info!(user = %next.user.id, "discord token refreshed");
                Ok(next)
            }
            Err(Refusal::InvalidGrant(why)) => {
                // Rotation: another refresh may have used this refresh token first.
                if let Ok((current, _)) = self.sessions.entry(id).await {
                    if current.refresh_token != session.refresh_token
                        && !stale.holds(&current, voicerooms_contract::now_ms())
                    {
                        return Ok(current);
                    }
                }
                self.end_session(id, session.user.id, &why).await;
                Err(RefreshError::Ended)
            }
            Err(Refusal::Other(why)) => {
                // Discord or the network failed: keep the session, release the claim.
                tracing::warn!(user = %session.user.id, error = %why, "token refresh failed; will retry");
                let mut released = session.clone();
                released.refreshing_until = None;
                let _ = self.sessions.replace(id, &released, revision).await;
                if stale.usable_meanwhile(session, voicerooms_contract::now_ms()) {
                    return Ok(session.clone());
                }
                Err(RefreshError::Unavailable(
                    "Discord did not refresh the token; retry",
                ))
            }
        }
    }

    async fn refresh(&self, session: &StoredSession) -> Result<StoredSession, Refusal> {
        let token = self
            .client
            .exchange_refresh_token(&RefreshToken::new(session.refresh_token.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| match &e {
                oauth2::RequestTokenError::ServerResponse(r)
                    if *r.error() == oauth2::basic::BasicErrorResponseType::InvalidGrant =>
                {
                    Refusal::InvalidGrant(oauth_error(&e))
                }
                _ => Refusal::Other(oauth_error(&e)),
            })?;
        let now = voicerooms_contract::now_ms();
        let mut next = session.clone();
        next.access_token = token.access_token().secret().clone();
        if let Some(refresh) = token.refresh_token() {
            next.refresh_token = refresh.secret().clone();
        }
        next.access_expires_at = now.saturating_add(
            token
                .expires_in()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(3_600_000),
        );
        next.scope = scope_string(token.scopes()).unwrap_or(next.scope);
        Ok(next)
    }

    /// Writes the access token where room-manager reads it. Login goes on when this fails (the
    /// caller logs it); a refresh for room-manager's sake does not.
    async fn store_token(&self, session: &StoredSession) -> Result<(), String> {
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
        if let Err(e) = &result {
            tracing::warn!(user = %session.user.id, error = %e, "could not store the player's token");
        }
        result
    }
}

/// Extra time a refresh claim lasts beyond the token endpoint's timeout.
const CLAIM_SLACK_MS: u64 = 2_000;

/// What makes a session's token due for a refresh.
enum Stale {
    /// It expires within [`REFRESH_MARGIN_MS`].
    Expiring,
    /// Discord refused this access token.
    Refused(String),
}

impl Stale {
    fn holds(&self, session: &StoredSession, now: u64) -> bool {
        match self {
            Stale::Expiring => session.access_expires_at <= now.saturating_add(REFRESH_MARGIN_MS),
            Stale::Refused(token) => session.access_token == *token,
        }
    }

    /// Whether the current token can still be used while another refresh runs.
    fn usable_meanwhile(&self, session: &StoredSession, now: u64) -> bool {
        matches!(self, Stale::Expiring) && session.access_expires_at > now
    }
}

/// Why Discord's token endpoint gave no new token.
enum Refusal {
    /// The refresh token is no longer valid (rotated, revoked, expired).
    InvalidGrant(String),
    /// Anything else: unreachable, a server error, an unreadable answer.
    Other(String),
}

/// Why a session could not be refreshed.
#[derive(Debug)]
enum RefreshError {
    /// The session is gone (deleted, expired, or Discord refused its refresh token).
    Ended,
    Unavailable(&'static str),
}

impl From<SessionError> for RefreshError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Store(_) => RefreshError::Unavailable("session store unavailable"),
            _ => RefreshError::Ended,
        }
    }
}

impl RefreshError {
    fn into_http(self, req: &HttpRequest) -> HttpError {
        match self {
            RefreshError::Ended => HttpError::unauthorized(Auth::login_url_for(req)),
            RefreshError::Unavailable(why) => HttpError::new(ErrorCode::DiscordUnavailable, why),
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
        access_expires_at: now.saturating_add(
            token
                .expires_in()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(3_600_000),
        ),
        scope: scope_string(token.scopes()).unwrap_or_else(|| auth.settings.scopes.clone()),
        created_at: now,
        expires_at: now.saturating_add(auth.session_ttl_ms),
        refreshing_until: None,
    };
    let value = auth
        .sessions
        .create(&session)
        .await
        .map_err(|e| HttpError::new(ErrorCode::Unavailable, e.to_string()))?;
    // Login goes on without it: room-manager then asks the player to log in again when it
    // needs the token (already logged).
    let _ = auth.store_token(&session).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;
    use proptest::prelude::*;

    fn any_text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                proptest::char::range(' ', '~'),
                Just('%'),
                Just('&'),
                Just('='),
                Just('é'),
                Just('\u{1D4D0}'),
                any::<char>()
            ],
            0..400,
        )
        .prop_map(|c| c.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn login_and_callback_queries_of_any_shape_decode_or_are_refused(query in any_text()) {
            if let Ok(login) = web::Query::<LoginQuery>::from_query(&query) {
                let path = safe_return_path(login.return_to.as_deref());
                prop_assert!(path.starts_with('/') && !path.starts_with("//"));
            }
            let _ = web::Query::<CallbackQuery>::from_query(&query);
        }

        #[test]
        fn the_return_header_always_gives_a_local_login_url(value in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut req = TestRequest::default();
            if let Ok(header) = actix_web::http::header::HeaderValue::from_bytes(&value) {
                req = req.insert_header(("x-return-to", header));
            }
            let url = Auth::login_url_for(&req.to_http_request());
            prop_assert!(url.starts_with("/auth/login?return_to=%2F"), "{}", url);
        }
    }
}
