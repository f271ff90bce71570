//! Content IDs: the BLAKE3 hash of a manifest.

use std::fmt;
use std::str::FromStr;

/// A file's or folder's ID: the BLAKE3 hash of its manifest, shown as 64
/// lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub [u8; 32]);

/// Why a string is not an [`Id`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an ID is 64 hex digits (the BLAKE3 hash of a manifest)")]
pub struct IdParseError;

impl Id {
    /// The ID of a manifest's encoded bytes.
    pub fn of_manifest(bytes: &[u8]) -> Id {
        Id(*blake3::hash(bytes).as_bytes())
    }

    /// The ID as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Id {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Id, IdParseError> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(IdParseError);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| IdParseError)?;
        Ok(Id(out))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", &self.to_hex()[..16])
    }
}

impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_refusals() {
        let id = Id::of_manifest(b"x");
        assert_eq!(id.to_hex().parse::<Id>(), Ok(id));
        assert_eq!(id.to_hex().to_uppercase().parse::<Id>(), Ok(id));
        assert!("abc".parse::<Id>().is_err());
        assert!("g".repeat(64).parse::<Id>().is_err());
        assert!("é".repeat(32).parse::<Id>().is_err());
    }
}
