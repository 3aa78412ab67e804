//! The identity of the `ROOMS` stream: [`StreamEpoch`].
//!
//! Stream sequences are positions in one particular stream. If the stream is deleted and created
//! again (an operator's mistake, a disaster recovery, a new cluster) its sequences restart at 1,
//! and a position saved against the old stream (a browser's `since`, room-manager's last applied
//! voice sequence) means nothing in the new one. A position is therefore the pair (epoch,
//! sequence): a different epoch means "start over from a snapshot".
//!
//! The epoch is the stream's creation time in Unix nanoseconds, as JetStream reports it in the
//! stream info (`created`). It is the same on every replica and survives server restarts and
//! configuration updates; it changes only when the stream is created anew. On the wire it is a
//! JSON **string** of decimal digits (JavaScript numbers lose precision past 2^53), in canonical
//! form (no sign, no leading zeros), and clients treat it as opaque: compare for equality, never
//! order or do arithmetic on it.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a stream epoch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    #[error("stream epoch must be 1-20 decimal digits without leading zeros")]
    Format,
    #[error("stream epoch does not fit in 64 bits")]
    Overflow,
}

/// The identity of one incarnation of the `ROOMS` stream. Compare for equality only.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamEpoch(u64);

impl StreamEpoch {
    /// Longest decimal form of a `u64`.
    pub const MAX_LEN: usize = 20;

    /// The epoch of a stream created at `nanos` after the Unix epoch.
    pub const fn from_unix_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// The stream's creation time in Unix nanoseconds (for logs; clients must not rely on it).
    pub const fn unix_nanos(self) -> u64 {
        self.0
    }

    /// Parses the canonical decimal form (what [`fmt::Display`] writes).
    pub fn parse(s: &str) -> Result<Self, EpochError> {
        let canonical = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        if !canonical {
            return Err(EpochError::Format);
        }
        s.parse().map(Self).map_err(|_| EpochError::Overflow)
    }
}

impl fmt::Display for StreamEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for StreamEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamEpoch({})", self.0)
    }
}

impl FromStr for StreamEpoch {
    type Err = EpochError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for StreamEpoch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StreamEpoch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = StreamEpoch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a stream epoch as a string of decimal digits")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StreamEpoch, E> {
                StreamEpoch::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_is_a_json_string_and_round_trips() {
        let epoch = StreamEpoch::from_unix_nanos(1_764_102_000_123_456_789);
        let json = serde_json::to_string(&epoch).unwrap();
        assert_eq!(json, "\"1764102000123456789\"");
        assert_eq!(serde_json::from_str::<StreamEpoch>(&json).unwrap(), epoch);
        let max = StreamEpoch::from_unix_nanos(u64::MAX);
        let json = serde_json::to_string(&max).unwrap();
        assert_eq!(serde_json::from_str::<StreamEpoch>(&json).unwrap(), max);
        assert_eq!(StreamEpoch::parse("0"), Ok(StreamEpoch::from_unix_nanos(0)));
    }

    #[test]
    fn only_the_canonical_string_form_is_accepted() {
        for bad in [
            "",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1.0",
            "1e9",
            "0x10",
            "١٢٣",
            "123456789012345678901",
        ] {
            assert_eq!(StreamEpoch::parse(bad), Err(EpochError::Format), "{bad:?}");
        }
        assert_eq!(
            StreamEpoch::parse("18446744073709551616"),
            Err(EpochError::Overflow)
        );
        // A number (which a browser may already have rounded) is refused, not guessed at.
        assert!(serde_json::from_str::<StreamEpoch>("1764102000123456789").is_err());
        assert!(serde_json::from_str::<StreamEpoch>("null").is_err());
    }
}
