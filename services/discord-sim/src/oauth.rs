//! OAuth2: the authorize redirect, the token endpoint (authorization_code and refresh_token
//! grants, PKCE, client authentication by Basic auth or body), revocation and bearer lookups.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;

use crate::log::SimEventKind;
use crate::state::{lock, Sim};
use crate::util::instant_after;

struct CodeGrant {
    user_id: u64,
    redirect_uri: Option<String>,
    scope: String,
    challenge: Option<(String, String)>,
    expires: Instant,
    used: bool,
}

pub struct AccessGrant {
    pub user_id: u64,
    pub scope: String,
    pub expires: Instant,
    refresh: String,
}

struct RefreshGrant {
    user_id: u64,
    scope: String,
    expires: Instant,
    access: String,
}

/// Codes or tokens by key, at most `capacity` (`DISCORD_SIM__OAUTH__MAX_GRANTS`) at once.
///
/// Full, it makes room by dropping the **oldest** grant: grants of one kind share a lifetime, so
/// the oldest is the first to expire (or already expired), and a grant just handed out is never
/// the one dropped. Each insert also drops expired grants from the front, so expired grants do
/// not pile up; the whole store is amortised O(1) per grant.
struct Grants<V> {
    map: HashMap<String, V>,
    /// Keys in insertion order; may hold keys already removed (skipped, compacted when large).
    order: VecDeque<String>,
    capacity: usize,
    /// When a grant stops being valid (valid while `now < expires`).
    expires: fn(&V) -> Instant,
}

impl<V> Grants<V> {
    fn new(capacity: usize, expires: fn(&V) -> Instant) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            expires,
        }
    }

    fn insert(&mut self, key: String, value: V, now: Instant) {
        while let Some(front) = self.order.front() {
            match self.map.get(front) {
                Some(grant) if self.map.len() < self.capacity && now < (self.expires)(grant) => {
                    break
                }
                _ => {
                    if let Some(oldest) = self.order.pop_front() {
                        self.map.remove(&oldest);
                    }
                }
            }
        }
        self.map.insert(key.clone(), value);
        self.order.push_back(key);
        // Keys of grants removed by use or revocation stay in `order` until compacted here.
        if self.order.len() > self.map.len().saturating_mul(2).max(64) {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }

    fn get(&self, key: &str) -> Option<&V> {
        self.map.get(key)
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.map.get_mut(key)
    }

    fn remove(&mut self, key: &str) -> Option<V> {
        self.map.remove(key)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.map.values_mut()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

pub struct OAuthState {
    codes: Grants<CodeGrant>,
    access: Grants<AccessGrant>,
    refresh: Grants<RefreshGrant>,
    /// Control setting: who logs in at the next /oauth2/authorize.
    pub next_user: Option<u64>,
    /// Control setting: the next /oauth2/authorize answers with this error (e.g. access_denied).
    pub next_error: Option<String>,
}

impl OAuthState {
    /// Empty, keeping at most `max_grants` codes, access tokens and refresh tokens each.
    pub fn new(max_grants: usize) -> Self {
        Self {
            codes: Grants::new(max_grants, |g| g.expires),
            access: Grants::new(max_grants, |g| g.expires),
            refresh: Grants::new(max_grants, |g| g.expires),
            next_user: None,
            next_error: None,
        }
    }

    /// The user and scope behind a bearer token, if it is valid.
    pub fn bearer(&self, token: &str) -> Option<(u64, String)> {
        self.access
            .get(token)
            .filter(|a| Instant::now() < a.expires)
            .map(|a| (a.user_id, a.scope.clone()))
    }
}

#[derive(Debug, Deserialize)]
pub struct AuthorizeQuery {
    response_type: Option<String>,
    client_id: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    redirect_uri: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    /// Simulator extension: which user logs in (id or username).
    sim_user: Option<String>,
    /// Simulator extension: the user presses "Cancel" (error=access_denied).
    sim_deny: Option<String>,
}

fn error_page(status: u16, message: &str) -> HttpResponse {
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or_default())
        .json(json!({"message": message, "code": 0}))
}

fn with_query(uri: &str, pairs: &[(&str, &str)]) -> String {
    let mut out = uri.to_owned();
    let mut sep = if uri.contains('?') { '&' } else { '?' };
    for (k, v) in pairs {
        out.push(sep);
        out.push_str(k);
        out.push('=');
        out.push_str(&urlencode(v));
        sep = '&';
    }
    out
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET /oauth2/authorize`: the simulated user approves at once and is redirected back.
pub async fn authorize(
    _req: HttpRequest,
    q: web::Query<AuthorizeQuery>,
    sim: web::Data<Arc<Sim>>,
) -> HttpResponse {
    let q = q.into_inner();
    let cfg = &sim.config.oauth;
    if q.client_id.as_deref() != Some(cfg.client_id.as_str()) {
        sim.record(SimEventKind::Oauth {
            endpoint: "authorize".into(),
            outcome: "unknown client_id".into(),
        });
        return error_page(400, "Unknown Application");
    }
    let Some(redirect) = q.redirect_uri.clone() else {
        return error_page(400, "Invalid OAuth2 redirect_uri");
    };
    if !cfg.redirect_uris.is_empty() && !cfg.redirect_uris.contains(&redirect) {
        return error_page(400, "Invalid OAuth2 redirect_uri");
    }
    let state = q.state.clone().unwrap_or_default();
    let redirect_error = |error: &str, description: &str| {
        let mut pairs = vec![("error", error), ("error_description", description)];
        if !state.is_empty() {
            pairs.push(("state", state.as_str()));
        }
        HttpResponse::Found()
            .insert_header(("Location", with_query(&redirect, &pairs)))
            .finish()
    };
    if q.response_type.as_deref() != Some("code") {
        return redirect_error("unsupported_response_type", "response_type must be code");
    }
    let scope = q.scope.clone().unwrap_or_default();
    if scope.split_whitespace().next().is_none() {
        return redirect_error(
            "invalid_scope",
            "The requested scope is invalid, unknown, or malformed.",
        );
    }
    let challenge = match (&q.code_challenge, q.code_challenge_method.as_deref()) {
        (None, _) => None,
        (Some(c), None | Some("S256")) => Some((c.clone(), "S256".to_owned())),
        (Some(c), Some("plain")) => Some((c.clone(), "plain".to_owned())),
        (Some(_), Some(_)) => {
            return redirect_error("invalid_request", "Unsupported code_challenge_method");
        }
    };
    let forced_error = lock(&sim.oauth).next_error.take();
    if q.sim_deny.is_some() || forced_error.is_some() {
        let error = forced_error.unwrap_or_else(|| "access_denied".into());
        sim.record(SimEventKind::Oauth {
            endpoint: "authorize".into(),
            outcome: format!("error {error}"),
        });
        return redirect_error(
            &error,
            "The resource owner or authorization server denied the request",
        );
    }
    let user = {
        let world = lock(&sim.world);
        let next = lock(&sim.oauth).next_user.take();
        match (&q.sim_user, next) {
            (Some(key), _) => world.find_user(key).map(|u| u.id),
            (None, Some(id)) => world.users.get(&id).map(|u| u.id),
            (None, None) => world.first_human().map(|u| u.id),
        }
    };
    let Some(user_id) = user else {
        return error_page(400, "sim_user names no simulated user");
    };
    let code = sim.random_token(30);
    {
        let mut o = lock(&sim.oauth);
        let now = Instant::now();
        o.codes.insert(
            code.clone(),
            CodeGrant {
                user_id,
                redirect_uri: Some(redirect.clone()),
                scope,
                challenge,
                expires: instant_after(now, cfg.code_lifetime),
                used: false,
            },
            now,
        );
    }
    sim.record(SimEventKind::Oauth {
        endpoint: "authorize".into(),
        outcome: format!("code for user {user_id}"),
    });
    let mut pairs = vec![("code", code.as_str())];
    if !state.is_empty() {
        pairs.push(("state", state.as_str()));
    }
    HttpResponse::Found()
        .insert_header(("Location", with_query(&redirect, &pairs)))
        .finish()
}

/// An OAuth2 error body (`{error, error_description}`) with its status.
pub type OAuthReply = (u16, Value);

fn oauth_error(status: u16, error: &str, description: &str) -> OAuthReply {
    (
        status,
        json!({"error": error, "error_description": description}),
    )
}

/// Client credentials from `Authorization: Basic` or the form body.
fn client_ok(sim: &Sim, auth: Option<&str>, form: &HashMap<String, String>) -> bool {
    let cfg = &sim.config.oauth;
    let from_basic = auth
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(a, b)| (a.to_owned(), b.to_owned())));
    let (id, secret) = match from_basic {
        Some(pair) => pair,
        None => (
            form.get("client_id").cloned().unwrap_or_default(),
            form.get("client_secret").cloned().unwrap_or_default(),
        ),
    };
    id == cfg.client_id && secret == cfg.client_secret
}

fn issue(sim: &Sim, o: &mut OAuthState, user_id: u64, scope: &str) -> Value {
    let access = sim.random_token(30);
    let refresh = sim.random_token(30);
    let cfg = &sim.config.oauth;
    let now = Instant::now();
    o.access.insert(
        access.clone(),
        AccessGrant {
            user_id,
            scope: scope.to_owned(),
            expires: instant_after(now, cfg.access_token_lifetime),
            refresh: refresh.clone(),
        },
        now,
    );
    o.refresh.insert(
        refresh.clone(),
        RefreshGrant {
            user_id,
            scope: scope.to_owned(),
            expires: instant_after(now, cfg.refresh_token_lifetime),
            access: access.clone(),
        },
        now,
    );
    json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": cfg.access_token_lifetime.as_secs(),
        "refresh_token": refresh,
        "scope": scope,
    })
}

fn pkce_ok(challenge: &(String, String), verifier: Option<&String>) -> bool {
    let Some(v) = verifier else { return false };
    if !(43..=128).contains(&v.len()) {
        return false;
    }
    match challenge.1.as_str() {
        "plain" => *v == challenge.0,
        _ => {
            let digest = sha2::Sha256::digest(v.as_bytes());
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest) == challenge.0
        }
    }
}

/// `POST /api/oauth2/token`.
pub fn token(sim: &Sim, auth: Option<&str>, body: &[u8]) -> OAuthReply {
    let Ok(form) = serde_urlencoded::from_bytes::<HashMap<String, String>>(body) else {
        return oauth_error(
            400,
            "invalid_request",
            "Body must be application/x-www-form-urlencoded",
        );
    };
    if !client_ok(sim, auth, &form) {
        return oauth_error(401, "invalid_client", "Invalid client credentials");
    }
    let mut o = lock(&sim.oauth);
    let now = Instant::now();
    let reply = match form.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            let Some(code) = form.get("code") else {
                return oauth_error(400, "invalid_request", "Missing \"code\" in request.");
            };
            match o.codes.get_mut(code) {
                None => oauth_error(400, "invalid_grant", "Invalid \"code\" in request."),
                Some(g) if g.used || now >= g.expires => {
                    g.used = true;
                    oauth_error(400, "invalid_grant", "Invalid \"code\" in request.")
                }
                Some(g) if g.redirect_uri.as_ref() != form.get("redirect_uri") => {
                    oauth_error(400, "invalid_grant", "Invalid \"redirect_uri\" in request.")
                }
                Some(g)
                    if g.challenge
                        .as_ref()
                        .is_some_and(|c| !pkce_ok(c, form.get("code_verifier"))) =>
                {
                    oauth_error(
                        400,
                        "invalid_grant",
                        "Invalid \"code_verifier\" in request.",
                    )
                }
                Some(g) => {
                    g.used = true;
                    let (user, scope) = (g.user_id, g.scope.clone());
                    (200, issue(sim, &mut o, user, &scope))
                }
            }
        }
        Some("refresh_token") => {
            let Some(rt) = form.get("refresh_token") else {
                return oauth_error(
                    400,
                    "invalid_request",
                    "Missing \"refresh_token\" in request.",
                );
            };
            match o.refresh.remove(rt) {
                Some(r) if now < r.expires => (200, issue(sim, &mut o, r.user_id, &r.scope)),
                // Rotation: a used (removed) or expired refresh token is invalid.
                _ => oauth_error(
                    400,
                    "invalid_grant",
                    "Invalid \"refresh_token\" in request.",
                ),
            }
        }
        Some("client_credentials") => oauth_error(
            400,
            "unsupported_grant_type",
            "client_credentials is not simulated",
        ),
        _ => oauth_error(400, "unsupported_grant_type", "Unsupported grant type"),
    };
    drop(o);
    sim.record(SimEventKind::Oauth {
        endpoint: "token".into(),
        outcome: format!(
            "{} {}",
            form.get("grant_type").map_or("?", String::as_str),
            reply.1.get("error").and_then(Value::as_str).unwrap_or("ok")
        ),
    });
    reply
}

/// `POST /api/oauth2/token/revoke`: revoking either token revokes the pair.
pub fn revoke(sim: &Sim, auth: Option<&str>, body: &[u8]) -> OAuthReply {
    let Ok(form) = serde_urlencoded::from_bytes::<HashMap<String, String>>(body) else {
        return oauth_error(400, "invalid_request", "Body must be form-encoded");
    };
    if !client_ok(sim, auth, &form) {
        return oauth_error(401, "invalid_client", "Invalid client credentials");
    }
    let Some(t) = form.get("token") else {
        return oauth_error(400, "invalid_request", "Missing \"token\" in request.");
    };
    let mut o = lock(&sim.oauth);
    if let Some(a) = o.access.remove(t) {
        o.refresh.remove(&a.refresh);
    }
    if let Some(r) = o.refresh.remove(t) {
        o.access.remove(&r.access);
    }
    drop(o);
    sim.record(SimEventKind::Oauth {
        endpoint: "revoke".into(),
        outcome: "ok".into(),
    });
    (200, json!({}))
}

/// Lifetimes shortened for a test that wants expiry within seconds.
pub fn expire_all_access_tokens(sim: &Sim) {
    let mut o = lock(&sim.oauth);
    // A grant is valid while `now < expires`, so "now" is already in the past for every check.
    let past = Instant::now();
    for a in o.access.values_mut() {
        a.expires = past;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s256_pkce_accepts_the_matching_verifier_only() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".to_owned();
        let challenge = (
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM".to_owned(),
            "S256".to_owned(),
        );
        assert!(pkce_ok(&challenge, Some(&verifier)));
        let wrong = "x".repeat(43);
        assert!(!pkce_ok(&challenge, Some(&wrong)));
        assert!(!pkce_ok(&challenge, None));
    }

    #[test]
    fn redirect_query_is_percent_encoded() {
        assert_eq!(
            with_query("http://a/cb", &[("state", "a b&c")]),
            "http://a/cb?state=a%20b%26c"
        );
        assert_eq!(
            with_query("http://a/cb?x=1", &[("code", "z")]),
            "http://a/cb?x=1&code=z"
        );
    }

    struct Plain(Instant);

    /// Before: a full store removed `keys().next()` of a HashMap, in practice often a grant just
    /// issued, so logins past 10,000 failed at the callback.
    #[test]
    fn a_full_store_drops_the_oldest_grant_never_the_newest() {
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(600);
        let mut grants = Grants::new(100, |p: &Plain| p.0);
        for i in 0..250 {
            grants.insert(format!("k{i}"), Plain(later), now);
            assert!(grants.get(&format!("k{i}")).is_some(), "k{i} just issued");
            assert!(grants.len() <= 100);
        }
        assert_eq!(grants.len(), 100);
        assert!(grants.get("k149").is_none());
        assert!((150..250).all(|i| grants.get(&format!("k{i}")).is_some()));
    }

    #[test]
    fn expired_grants_at_the_front_go_before_the_store_is_full() {
        let now = Instant::now();
        let mut grants = Grants::new(100, |p: &Plain| p.0);
        grants.insert("old".into(), Plain(now), now);
        grants.insert(
            "live".into(),
            Plain(now + std::time::Duration::from_secs(5)),
            now,
        );
        grants.insert(
            "new".into(),
            Plain(now + std::time::Duration::from_secs(5)),
            now,
        );
        assert!(
            grants.get("old").is_none(),
            "expired (valid while now < expires)"
        );
        assert_eq!(grants.len(), 2);
    }

    #[test]
    fn removed_keys_do_not_evict_live_grants_and_the_order_stays_bounded() {
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(600);
        let mut grants = Grants::new(10, |p: &Plain| p.0);
        for i in 0..10_000 {
            grants.insert(format!("k{i}"), Plain(later), now);
            if i % 2 == 0 {
                assert!(grants.remove(&format!("k{i}")).is_some());
            }
            assert!(grants.order.len() <= 64.max(2 * grants.len()) + 2);
        }
        // Only odd keys remain: the ten newest of them.
        assert_eq!(grants.len(), 10);
        assert!((9_980..10_000)
            .filter(|i| i % 2 == 1)
            .all(|i| grants.get(&format!("k{i}")).is_some()));
    }
}
