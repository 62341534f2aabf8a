//! A migration's id in the one form operators see: lowercase hex, no prefix, in the CLI, the
//! logs and `status --json` (as a string there: JSON numbers lose 64-bit ids in most tools).

use std::fmt;

/// Formats an id for logs and displays: `tracing::info!(migration = %MigrationId(id), ..)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationId(pub u64);

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Parses the hex form (an optional `0x` prefix is accepted).
pub fn parse(s: &str) -> Result<u64, String> {
    let hex = s.trim().trim_start_matches("0x");
    if hex.is_empty() || hex.len() > 16 {
        return Err(format!("invalid migration id {s:?}: up to 16 hex digits"));
    }
    u64::from_str_radix(hex, 16).map_err(|_| format!("invalid migration id {s:?}: not hex"))
}

/// `#[serde(with = "migration_id::hex")]`: the id as a hex string. Reading also takes a
/// number, which is what daemons before status schema 2 wrote.
pub mod hex {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the hex string.
    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&super::MigrationId(*id))
    }

    /// Reads a hex string or a number.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Hex(String),
            Number(u64),
        }
        match Either::deserialize(d)? {
            Either::Hex(s) => super::parse(&s).map_err(serde::de::Error::custom),
            Either::Number(n) => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_a_hex_string_both_ways() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct T {
            #[serde(with = "hex")]
            id: u64,
        }
        let big = 0xfedc_ba98_7654_3210_u64;
        let json = serde_json::to_string(&T { id: big }).unwrap();
        assert_eq!(json, r#"{"id":"fedcba9876543210"}"#);
        assert_eq!(serde_json::from_str::<T>(&json).unwrap().id, big);
        // The old numeric form still reads.
        let old = format!(r#"{{"id":{big}}}"#);
        assert_eq!(serde_json::from_str::<T>(&old).unwrap().id, big);
        assert!(serde_json::from_str::<T>(r#"{"id":"xyz"}"#).is_err());
        assert_eq!(parse("0x1F").unwrap(), 0x1f);
        assert!(parse("").is_err());
        assert!(parse("11112222333344445").is_err());
    }
}
