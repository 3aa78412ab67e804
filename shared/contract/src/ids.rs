//! Typed Discord snowflake ids.
//!
//! Every id that reaches a NATS subject goes through [`Snowflake::parse`], which accepts only 1–20
//! ASCII digits that fit a non-zero `u64`. That is what makes subject injection impossible: no id
//! can carry `.`, `*`, `>` or whitespace into a subject token.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a snowflake id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than 20 characters")]
    TooLong,
    #[error("id must contain only ASCII digits")]
    NotDigits,
    #[error("id does not fit in 64 bits")]
    Overflow,
    #[error("id must not be zero")]
    Zero,
}

/// A validated, non-zero Discord snowflake.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Snowflake(u64);

impl Snowflake {
    /// Longest decimal form of a `u64`.
    pub const MAX_LEN: usize = 20;

    /// Parses the decimal form Discord uses on the wire.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(IdError::TooLong);
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdError::NotDigits);
        }
        let value: u64 = s.parse().map_err(|_| IdError::Overflow)?;
        Self::new(value)
    }

    /// Wraps a raw value; zero is not a valid snowflake.
    pub fn new(value: u64) -> Result<Self, IdError> {
        if value == 0 {
            Err(IdError::Zero)
        } else {
            Ok(Self(value))
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch at which Discord minted this id.
    pub fn timestamp_ms(self) -> u64 {
        // The top 42 bits are at most 2^42 - 1 ms, so the sum is far below u64::MAX; saturating
        // only to satisfy the lint without a proof comment.
        (self.0 >> 22).saturating_add(DISCORD_EPOCH_MS)
    }
}

/// Discord's epoch (2015-01-01T00:00:00Z) in Unix milliseconds.
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

impl fmt::Debug for Snowflake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Snowflake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Marker types, so a guild id can never be passed where a user id is expected.
pub mod marker {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct Guild;
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct Channel;
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct User;
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct Role;
}

/// A snowflake tagged with what it identifies.
pub struct Id<M> {
    value: Snowflake,
    _marker: PhantomData<fn() -> M>,
}

pub type GuildId = Id<marker::Guild>;
pub type ChannelId = Id<marker::Channel>;
pub type UserId = Id<marker::User>;
pub type RoleId = Id<marker::Role>;
/// A room is identified by its Discord voice channel, as in the original specification.
pub type RoomId = ChannelId;

impl<M> Id<M> {
    pub fn new(value: u64) -> Result<Self, IdError> {
        Snowflake::new(value).map(Self::from_snowflake)
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        Snowflake::parse(s).map(Self::from_snowflake)
    }

    pub const fn from_snowflake(value: Snowflake) -> Self {
        Self {
            value,
            _marker: PhantomData,
        }
    }

    pub fn get(self) -> u64 {
        self.value.get()
    }

    pub fn snowflake(self) -> Snowflake {
        self.value
    }

    /// Reinterprets the id, e.g. a guild id as the `@everyone` role id (Discord uses the same value).
    pub fn cast<N>(self) -> Id<N> {
        Id::from_snowflake(self.value)
    }
}

// Manual impls: derives would put bounds on `M`.
impl<M> Clone for Id<M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M> Copy for Id<M> {}
impl<M> PartialEq for Id<M> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}
impl<M> Eq for Id<M> {}
impl<M> std::hash::Hash for Id<M> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.value.hash(state)
    }
}
impl<M> PartialOrd for Id<M> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<M> Ord for Id<M> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.cmp(&other.value)
    }
}
impl<M> fmt::Debug for Id<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.value, f)
    }
}
impl<M> fmt::Display for Id<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.value, f)
    }
}
impl<M> FromStr for Id<M> {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Ids travel as strings, as Discord sends them (JavaScript cannot hold a u64).
impl<M> Serialize for Id<M> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.value)
    }
}

impl<'de, M> Deserialize<'de> for Id<M> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<M>(PhantomData<fn() -> M>);
        impl<M> de::Visitor<'_> for Visitor<M> {
            type Value = Id<M>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Discord snowflake id as a string of digits")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                // Quote only the start of the input: an error must not grow with it.
                Id::parse(v).map_err(|e| {
                    let quoted = crate::text::truncate_with_ellipsis(v, 32);
                    E::custom(format_args!("invalid id {quoted:?}: {e}"))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Id::new(v).map_err(|e| E::custom(format_args!("invalid id {v}: {e}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                let v = u64::try_from(v).map_err(|_| E::custom("invalid id: negative"))?;
                self.visit_u64(v)
            }
        }
        deserializer.deserialize_any(Visitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_id_error_quotes_only_the_start_of_the_input() {
        let long = format!("\"{}\"", "\u{1d4d0}".repeat(5_000));
        let err = serde_json::from_str::<GuildId>(&long)
            .unwrap_err()
            .to_string();
        assert!(err.len() < 200, "{} bytes: {err}", err.len());
        assert!(err.contains("invalid id"), "{err}");
    }

    #[test]
    fn parses_discord_snowflakes() {
        let id = GuildId::parse("175928847299117063").unwrap();
        assert_eq!(id.get(), 175928847299117063);
        assert_eq!(id.to_string(), "175928847299117063");
        assert_eq!(id.snowflake().timestamp_ms(), 1_462_015_105_796);
    }

    #[test]
    fn rejects_hostile_and_malformed_ids() {
        for (input, err) in [
            ("", IdError::Empty),
            ("0", IdError::Zero),
            ("12.34", IdError::NotDigits),
            ("*", IdError::NotDigits),
            (">", IdError::NotDigits),
            ("1 2", IdError::NotDigits),
            (" 12", IdError::NotDigits),
            ("+12", IdError::NotDigits),
            ("-12", IdError::NotDigits),
            ("١٢", IdError::NotDigits),
            ("18446744073709551616", IdError::Overflow),
            ("99999999999999999999", IdError::Overflow),
            ("123456789012345678901", IdError::TooLong),
        ] {
            assert_eq!(UserId::parse(input).unwrap_err(), err, "input {input:?}");
        }
        assert_eq!(
            UserId::parse("18446744073709551615").unwrap().get(),
            u64::MAX
        );
    }

    #[test]
    fn ids_serialize_as_strings_and_accept_numbers() {
        let id = ChannelId::new(42).unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"42\"");
        let back: ChannelId = serde_json::from_str("\"42\"").unwrap();
        assert_eq!(back, id);
        let from_number: ChannelId = serde_json::from_str("42").unwrap();
        assert_eq!(from_number, id);
        assert!(serde_json::from_str::<ChannelId>("\"4.2\"").is_err());
        assert!(serde_json::from_str::<ChannelId>("-1").is_err());
        assert!(serde_json::from_str::<ChannelId>("null").is_err());
    }
}
