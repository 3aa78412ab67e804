//! Invite tokens: JWTs signed with HS256 and a configured secret.
//!
//! The algorithm is pinned: a token whose header names anything but HS256 (`none` included) is
//! rejected before its signature is looked at. Claims: room, guild, channel, role, creator (`sub`),
//! issued-at, expiry (24 h by default) and a token id (`jti`). The room keeps the id of its current
//! invite, so rotating it (a new `jti`) makes every older link stop working.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use voicerooms_contract::{ApiError, ErrorCode, Millis};

/// The claims of an invite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteClaims {
    /// Room id (= its voice channel id), decimal.
    pub room: String,
    pub guild: String,
    pub channel: String,
    pub role: String,
    /// The room's creator.
    pub sub: String,
    /// Seconds since the epoch.
    pub iat: u64,
    pub exp: u64,
    /// Token id: the room's current invite id.
    pub jti: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    #[error("the invite has expired")]
    Expired,
    #[error("the invite is not valid")]
    Invalid,
}

impl From<InviteError> for ApiError {
    fn from(e: InviteError) -> Self {
        match e {
            InviteError::Expired => ApiError::new(ErrorCode::InviteExpired, e.to_string()),
            InviteError::Invalid => ApiError::new(ErrorCode::InviteInvalid, e.to_string()),
        }
    }
}

/// Signs and verifies invites. The keys are derived once from the secret.
#[derive(Clone)]
pub struct InviteSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl InviteSigner {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "iat", "sub", "jti"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn sign(&self, claims: &InviteClaims) -> Result<String, ApiError> {
        encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("signing invite: {e}")))
    }

    /// Verifies signature, algorithm and expiry.
    pub fn verify(&self, token: &str) -> Result<InviteClaims, InviteError> {
        use jsonwebtoken::errors::ErrorKind;
        match decode::<InviteClaims>(token, &self.decoding, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => match e.kind() {
                ErrorKind::ExpiredSignature => Err(InviteError::Expired),
                _ => Err(InviteError::Invalid),
            },
        }
    }
}

/// Seconds from milliseconds.
pub fn secs(ms: Millis) -> u64 {
    ms / 1000
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)] // test code: an overflow is a failed test
mod tests {
    use super::*;

    fn claims(exp: u64) -> InviteClaims {
        InviteClaims {
            room: "11".into(),
            guild: "1".into(),
            channel: "11".into(),
            role: "12".into(),
            sub: "7".into(),
            iat: 1,
            exp,
            jti: "abc".into(),
        }
    }

    fn now() -> u64 {
        secs(voicerooms_contract::now_ms())
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_signed_invite_verifies_and_keeps_its_claims() {
        let s = InviteSigner::new(SECRET);
        let c = claims(now() + 60);
        assert_eq!(s.verify(&s.sign(&c).unwrap()).unwrap(), c);
    }

    #[test]
    fn expired_tampered_none_and_foreign_tokens_are_refused() {
        let s = InviteSigner::new(SECRET);
        let expired = s.sign(&claims(now() - 1)).unwrap();
        assert_eq!(s.verify(&expired), Err(InviteError::Expired));

        let good = s.sign(&claims(now() + 60)).unwrap();
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[2] = parts[2].chars().rev().collect();
        assert_eq!(s.verify(&parts.join(".")), Err(InviteError::Invalid));

        let other = InviteSigner::new(b"another-secret-another-secret-xx");
        assert_eq!(
            s.verify(&other.sign(&claims(now() + 60)).unwrap()),
            Err(InviteError::Invalid)
        );

        // alg: none with the same claims and an empty signature.
        let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
        let body = base64url(&serde_json::to_vec(&claims(now() + 60)).unwrap());
        assert_eq!(
            s.verify(&format!("{header}.{body}.")),
            Err(InviteError::Invalid)
        );
        assert_eq!(s.verify("garbage"), Err(InviteError::Invalid));
    }

    fn base64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..(chunk.len() + 1) {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
