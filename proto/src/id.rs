//! Identifiers: [`NodeId`], [`EventId`] and [`Dot`].
//!
//! Both ids are 32 bytes, compared and ordered as unsigned bytes from the
//! first to the last (big-endian), and shown as 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node (event author): the 32-byte ed25519 public key of the node.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 32]);

/// An event's id: blake3 of the event's canonical encoding (see `PROTOCOL.md`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventId(pub [u8; 32]);

/// One write by one author: `(author, seq)`. A register write is named by
/// the dot of the event that made it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Dot {
    /// The author of the event.
    pub author: NodeId,
    /// The event's sequence number in its author's chain.
    pub seq: u64,
}

/// Error from parsing a hex id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 64 hex digits, got {got:?}")]
pub struct ParseIdError {
    what: &'static str,
    got: String,
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

fn parse_hex32(s: &str, what: &'static str) -> Result<[u8; 32], ParseIdError> {
    let err = || ParseIdError {
        what,
        got: s.chars().take(80).collect(),
    };
    let s = s.as_bytes();
    if s.len() != 64 {
        return Err(err());
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or_else(err)?;
        let lo = (pair[1] as char).to_digit(16).ok_or_else(err)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Ok(out)
}

macro_rules! hex_id {
    ($t:ident, $what:literal) => {
        impl $t {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The first 8 hex digits, for messages meant for people.
            pub fn short(&self) -> String {
                self.to_string()[..8].to_string()
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "("))?;
                write_hex(f, &self.0[..4])?;
                write!(f, "…)")
            }
        }

        impl FromStr for $t {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32(s.trim(), $what).map($t)
            }
        }
    };
}

hex_id!(NodeId, "a node id");
hex_id!(EventId, "an event id");

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.author.short(), self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let id = EventId([0xab; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<EventId>().unwrap(), id);
        assert!("abc".parse::<EventId>().is_err());
        assert!("zz".repeat(32).parse::<NodeId>().is_err());
        let e = "x".parse::<NodeId>().unwrap_err().to_string();
        assert!(e.contains("node id"), "{e}");
    }
}
