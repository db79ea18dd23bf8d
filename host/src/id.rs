//! The one rule for a container id that dockhand puts into a path: 64 lowercase hex digits.
//!
//! Every CRI runtime dockhand fronts (containerd, and CRI-O alike) names containers and
//! sandboxes with 32 random bytes in lowercase hex, and CRI gives callers no way to choose an
//! id. Anything else (a `ctr run` name, a 17 KB string from a buggy client, `../x`) is not a
//! container dockhand keeps files for. Such an id can never be `.`, `..`, hidden, an option, or
//! contain `/`, so it is safe as one path component and as a glob prefix.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Length of a container id.
pub const ID_LEN: usize = 64;

/// How much of a refused id an error message repeats.
const SHOWN: usize = 80;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid container id {shown:?}{}: expected 64 lowercase hex digits", if *.truncated { "…" } else { "" })]
pub struct IdError {
    /// The start of the refused id.
    pub shown: String,
    pub truncated: bool,
}

/// A validated container (or sandbox) id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerId(String);

impl ContainerId {
    pub fn parse(id: &str) -> Result<ContainerId, IdError> {
        if is_container_id(id) {
            return Ok(ContainerId(id.to_string()));
        }
        Err(IdError {
            shown: id.chars().take(SHOWN).collect(),
            truncated: id.chars().nth(SHOWN).is_some(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 13 characters, as `crictl ps` shows them.
    pub fn short(&self) -> &str {
        &self.0[..13]
    }
}

/// Whether `id` follows the rule, without building a [`ContainerId`].
pub fn is_container_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl TryFrom<String> for ContainerId {
    type Error = IdError;
    fn try_from(id: String) -> Result<ContainerId, IdError> {
        ContainerId::parse(&id)
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> String {
        id.0
    }
}

impl AsRef<str> for ContainerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn only_64_lowercase_hex_digits_are_ids() {
        assert_eq!(ContainerId::parse(ID).unwrap().as_str(), ID);
        assert_eq!(ContainerId::parse(ID).unwrap().short(), "0123456789abc");
        let long = "a".repeat(17_000);
        for bad in [
            "",
            "abc",
            "abc_1.2-3",
            "../x",
            &ID[..63],
            &format!("{ID}0"),
            &ID.to_uppercase(),
            &format!("{}/", &ID[..63]),
            &format!("{}G", &ID[..63]),
            &long,
        ] {
            assert!(ContainerId::parse(bad).is_err(), "{bad:?} accepted");
            assert!(!is_container_id(bad));
        }
    }

    #[test]
    fn errors_quote_a_bounded_part_of_the_id() {
        let message = ContainerId::parse(&"x".repeat(17_000))
            .unwrap_err()
            .to_string();
        assert!(message.len() < 200, "{message}");
        assert!(
            message.contains("…: expected 64 lowercase hex digits"),
            "{message}"
        );
        let message = ContainerId::parse("a/b").unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid container id \"a/b\": expected 64 lowercase hex digits"
        );
    }

    #[test]
    fn serde_refuses_bad_ids() {
        let id: ContainerId = serde_json::from_str(&format!("\"{ID}\"")).unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{ID}\""));
        assert!(serde_json::from_str::<ContainerId>("\"../etc\"").is_err());
    }
}
