//! Sessions: a random id in a signed cookie; everything else server-side in the KV bucket
//! `sessions` (Discord tokens never reach the browser).
//!
//! The cookie value is the session id signed with the configured key (HMAC-SHA256, via the
//! `cookie` crate's signed jar), so a forged or altered cookie is rejected before any lookup.

use std::sync::Arc;

use async_nats::jetstream::kv;
use cookie::{Cookie, CookieJar, Key};
use serde::{Deserialize, Serialize};
use voicerooms_contract::{Millis, UserRef};
use voicerooms_platform::nats::LazyBucket;

/// KV bucket holding sessions, keyed by session id.
pub const SESSIONS_BUCKET: &str = "sessions";

/// What the edge keeps about a logged-in user.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredSession {
    pub v: u16,
    pub user: UserRef,
    /// Discord OAuth2 tokens; never sent to the browser, never logged.
    pub access_token: String,
    pub refresh_token: String,
    /// When the access token expires (refresh before using it after this).
    pub access_expires_at: Millis,
    /// Scopes Discord granted, space separated.
    #[serde(default)]
    pub scope: String,
    pub created_at: Millis,
    /// When the session itself ends (absolute).
    pub expires_at: Millis,
    /// Set while one edge refreshes the Discord token (until this time): the others use the
    /// current token while it lasts, or wait for the new one. Written by compare-and-set, so one
    /// refresh runs per session across every edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshing_until: Option<Millis>,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSession")
            .field("user", &self.user.id)
            .field("access_expires_at", &self.access_expires_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a session could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no valid session cookie")]
    BadCookie,
    #[error("session not found")]
    NotFound,
    #[error("session expired")]
    Expired,
    #[error("session store unavailable: {0}")]
    Store(String),
    /// A compare-and-set lost: the entry changed since it was read.
    #[error("the session changed meanwhile")]
    Conflict,
}

/// Sessions in KV, cookies signed with one key.
#[derive(Clone)]
pub struct SessionStore {
    kv: Arc<LazyBucket>,
    key: Key,
    cookie_name: String,
}

impl SessionStore {
    pub fn new(kv: Arc<LazyBucket>, key: Key, cookie_name: String) -> Self {
        Self {
            kv,
            key,
            cookie_name,
        }
    }

    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// Stores a new session; returns the signed cookie value.
    pub async fn create(&self, session: &StoredSession) -> Result<String, SessionError> {
        let id = new_session_id();
        let bytes = serde_json::to_vec(session).map_err(|e| SessionError::Store(e.to_string()))?;
        self.store()
            .await?
            .create(&id, bytes.into())
            .await
            .map_err(|e| SessionError::Store(e.to_string()))?;
        Ok(self.sign(&id))
    }

    /// Replaces a session's data unconditionally (tests and tools; the edge uses
    /// [`SessionStore::replace`]).
    pub async fn update(&self, id: &str, session: &StoredSession) -> Result<(), SessionError> {
        let bytes = serde_json::to_vec(session).map_err(|e| SessionError::Store(e.to_string()))?;
        self.store()
            .await?
            .put(id, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| SessionError::Store(e.to_string()))
    }

    /// Replaces a session's data if it is still at `revision`; its new revision, or
    /// [`SessionError::Conflict`] when someone wrote (or deleted) it meanwhile.
    pub async fn replace(
        &self,
        id: &str,
        session: &StoredSession,
        revision: u64,
    ) -> Result<u64, SessionError> {
        use async_nats::jetstream::kv::UpdateErrorKind;
        let bytes = serde_json::to_vec(session).map_err(|e| SessionError::Store(e.to_string()))?;
        match self.store().await?.update(id, bytes.into(), revision).await {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Err(SessionError::Conflict),
            Err(e) => Err(SessionError::Store(e.to_string())),
        }
    }

    /// A session by id with its revision (`NotFound` once deleted, `Expired` past its end).
    pub async fn entry(&self, id: &str) -> Result<(StoredSession, u64), SessionError> {
        use async_nats::jetstream::kv::Operation;
        let entry = self
            .store()
            .await?
            .entry(id)
            .await
            .map_err(|e| SessionError::Store(e.to_string()))?
            .filter(|e| e.operation == Operation::Put)
            .ok_or(SessionError::NotFound)?;
        let session: StoredSession =
            serde_json::from_slice(&entry.value).map_err(|e| SessionError::Store(e.to_string()))?;
        if session.expires_at <= voicerooms_contract::now_ms() {
            return Err(SessionError::Expired);
        }
        Ok((session, entry.revision))
    }

    /// The session id inside a signed cookie value, if the signature holds.
    pub fn verify(&self, cookie_value: &str) -> Result<String, SessionError> {
        let mut jar = CookieJar::new();
        jar.add_original(Cookie::new(
            self.cookie_name.clone(),
            cookie_value.to_owned(),
        ));
        let id = jar
            .signed(&self.key)
            .get(&self.cookie_name)
            .map(|c| c.value().to_owned())
            .ok_or(SessionError::BadCookie)?;
        if is_session_id(&id) {
            Ok(id)
        } else {
            Err(SessionError::BadCookie)
        }
    }

    /// Loads a live (not expired) session by its signed cookie value.
    pub async fn load(&self, cookie_value: &str) -> Result<(String, StoredSession), SessionError> {
        let id = self.verify(cookie_value)?;
        let entry = self
            .store()
            .await?
            .get(&id)
            .await
            .map_err(|e| SessionError::Store(e.to_string()))?
            .ok_or(SessionError::NotFound)?;
        let session: StoredSession =
            serde_json::from_slice(&entry).map_err(|e| SessionError::Store(e.to_string()))?;
        if session.expires_at <= voicerooms_contract::now_ms() {
            return Err(SessionError::Expired);
        }
        Ok((id, session))
    }

    /// Ends a session.
    pub async fn delete(&self, id: &str) -> Result<(), SessionError> {
        self.store()
            .await?
            .delete(id)
            .await
            .map_err(|e| SessionError::Store(e.to_string()))
    }

    async fn store(&self) -> Result<&kv::Store, SessionError> {
        self.kv
            .get()
            .await
            .map_err(|e| SessionError::Store(e.to_string()))
    }

    fn sign(&self, id: &str) -> String {
        let mut jar = CookieJar::new();
        jar.signed_mut(&self.key)
            .add(Cookie::new(self.cookie_name.clone(), id.to_owned()));
        jar.get(&self.cookie_name)
            .map(|c| c.value().to_owned())
            .unwrap_or_default()
    }
}

/// 256 random bits, URL-safe (also a valid KV key).
fn new_session_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_session_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_random_hex() {
        let a = new_session_id();
        let b = new_session_id();
        assert_ne!(a, b);
        assert!(is_session_id(&a));
        assert!(!is_session_id("../etc"));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// One store for every case. Verification never touches the bucket: a client that never
        /// connects is enough (made inside a runtime, which stays for the test binary).
        fn store() -> &'static SessionStore {
            static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> =
                std::sync::OnceLock::new();
            static STORE: std::sync::OnceLock<SessionStore> = std::sync::OnceLock::new();
            STORE.get_or_init(|| {
                let runtime = RUNTIME.get_or_init(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                });
                runtime.block_on(async {
                    let nats = async_nats::ConnectOptions::new()
                        .retry_on_initial_connect()
                        .connect("127.0.0.1:1")
                        .await
                        .unwrap();
                    let js = async_nats::jetstream::new(nats);
                    SessionStore::new(
                        Arc::new(LazyBucket::new(js, SESSIONS_BUCKET, 1, 1)),
                        Key::derive_from(b"a session key of at least thirty-two bytes, for tests"),
                        "vr_session".into(),
                    )
                })
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn arbitrary_cookie_values_are_refused_without_a_panic(
                value in proptest::collection::vec(any::<char>(), 0..400)
                    .prop_map(|c| c.into_iter().collect::<String>()),
            ) {
                let store = store();
                prop_assert!(matches!(store.verify(&value), Err(SessionError::BadCookie)));
            }

            #[test]
            fn signed_ids_verify_and_any_change_is_refused(flip in 0usize..200, to in any::<char>()) {
                let store = store();
                let id = new_session_id();
                let signed = store.sign(&id);
                prop_assert_eq!(store.verify(&signed).unwrap(), id.clone());
                let mut chars: Vec<char> = signed.chars().collect();
                let at = flip.checked_rem(chars.len()).unwrap();
                if chars[at] != to {
                    chars[at] = to;
                    let tampered: String = chars.into_iter().collect();
                    prop_assert!(store.verify(&tampered).is_err(), "{}", tampered);
                }
            }
        }
    }
}
