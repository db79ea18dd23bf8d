//! Validated names for the archive's paths. Every path component the archive builds from data it
//! did not choose itself (a container id from kubelet or containerd) goes through here first.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest container id accepted (containerd's are 64 hex digits).
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("container id is empty")]
    Empty,
    #[error("container id {id:?} is longer than {MAX_ID_LEN} bytes")]
    TooLong { id: String },
    #[error(
        "container id {id:?} contains {ch:?}; only letters, digits, '_', '.' and '-' are allowed"
    )]
    BadChar { id: String, ch: char },
    #[error("container id {id:?} must start with a letter or digit")]
    BadStart { id: String },
}

/// A container id that is safe as one path component and as a glob prefix: 1 to 128 bytes of
/// `[A-Za-z0-9_.-]`, starting with a letter or digit (so never `.`, `..`, hidden or an option).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerId(String);

impl ContainerId {
    pub fn parse(id: &str) -> Result<ContainerId, NameError> {
        let Some(first) = id.chars().next() else {
            return Err(NameError::Empty);
        };
        if id.len() > MAX_ID_LEN {
            return Err(NameError::TooLong {
                id: id.chars().take(MAX_ID_LEN).collect(),
            });
        }
        if let Some(ch) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(NameError::BadChar { id: id.into(), ch });
        }
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::BadStart { id: id.into() });
        }
        Ok(ContainerId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 13 characters, as `crictl ps` shows them.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(13)]
    }
}

impl TryFrom<String> for ContainerId {
    type Error = NameError;
    fn try_from(id: String) -> Result<ContainerId, NameError> {
        ContainerId::parse(&id)
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> String {
        id.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The staging file name of a log generation: `000001.log`.
pub fn generation_file(generation: u32) -> String {
    format!("{generation:06}.log")
}

/// The generation a staging file name stands for, if it is one.
pub fn parse_generation_file(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
