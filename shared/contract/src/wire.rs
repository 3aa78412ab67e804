//! Decoding and validation shared by every message type.
//!
//! Decoding is three steps, each with its own typed error: size (before parsing anything), version
//! (a tiny probe, so a future version is reported as such rather than as garbage), then the full
//! parse followed by [`Validate`] (lengths, character sets, cross-field rules).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version carried by every message in its `v` field.
pub const VERSION: u16 = 1;
/// Largest message any decoder here accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Why a message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unsupported version {found}; this build speaks version {supported}")]
    UnsupportedVersion { found: u64, supported: u16 },
    #[error("invalid field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl DecodeError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Cross-field and content checks run after a successful parse.
pub trait Validate {
    fn validate(&self) -> Result<(), DecodeError>;
}

#[derive(Deserialize)]
struct VersionProbe {
    v: Option<serde_json::Value>,
}

/// Decodes a versioned message (`{"v": 1, ...}`): size, version, parse, validation.
pub fn decode_versioned<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, DecodeError> {
    check_size(bytes)?;
    let probe: VersionProbe = serde_json::from_slice(bytes).map_err(malformed)?;
    match probe.v {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
        Some(serde_json::Value::Number(n)) => {
            return Err(DecodeError::UnsupportedVersion {
                found: n.as_u64().unwrap_or(u64::MAX),
                supported: VERSION,
            })
        }
        Some(_) => return Err(DecodeError::invalid("v", "must be a number")),
        None => return Err(DecodeError::invalid("v", "missing")),
    }
    decode_unversioned(bytes)
}

/// Decodes a message whose version is carried by its subject (room-manager commands).
pub fn decode_unversioned<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, DecodeError> {
    check_size(bytes)?;
    let value: T = serde_json::from_slice(bytes).map_err(malformed)?;
    value.validate()?;
    Ok(value)
}

/// Serializes a message. Our types serialize infallibly (string keys, no non-finite floats).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|e| {
        // Unreachable for the types in this crate; keep a decodable error rather than panic.
        format!("{{\"v\":{VERSION},\"encode_error\":{:?}}}", e.to_string()).into_bytes()
    })
}

fn check_size(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
        })
    } else {
        Ok(())
    }
}

fn malformed(e: serde_json::Error) -> DecodeError {
    // serde_json quotes the offending input, which may be multi-byte text.
    let mut msg = e.to_string();
    crate::text::truncate_string(&mut msg, 300);
    DecodeError::Malformed(msg)
}

/// Checks a human text field: length in characters and no control characters.
pub fn check_text(
    field: &'static str,
    value: &str,
    min: usize,
    max: usize,
) -> Result<(), DecodeError> {
    let len = value.chars().count();
    if len < min || len > max {
        return Err(DecodeError::invalid(
            field,
            format!("must be {min}-{max} characters, got {len}"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(DecodeError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks an opaque token field (hashes, keys): length and a conservative character set.
pub fn check_token(field: &'static str, value: &str, max: usize) -> Result<(), DecodeError> {
    if value.is_empty() || value.len() > max {
        return Err(DecodeError::invalid(
            field,
            format!("must be 1-{max} bytes"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err(DecodeError::invalid(
            field,
            "has characters outside [A-Za-z0-9_.:-]",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Count {
        #[allow(dead_code)]
        n: u64,
    }

    impl Validate for Count {
        fn validate(&self) -> Result<(), DecodeError> {
            Ok(())
        }
    }

    #[test]
    fn a_malformed_message_quoting_multibyte_text_is_an_error_not_a_panic() {
        // serde_json quotes the offending string in its message; with 4-byte characters the
        // 300-byte cut lands inside one at some length. Every length up to past the cut.
        for n in 0..120 {
            let text = "\u{1d4d0}".repeat(n);
            let body = format!("{{\"n\":\"{text}\"}}");
            let err = decode_unversioned::<Count>(body.as_bytes()).unwrap_err();
            assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
        }
    }
}
