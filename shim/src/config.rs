//! Where records go and which shim to delegate to.
//!
//! containerd starts shims with its own environment, but operators rarely control containerd's
//! environment, so the primary place is a JSON file next to the binary:
//! `<binary>.json`, e.g. `/usr/local/bin/containerd-shim-dockhand-v2.json`:
//!
//! ```json
//! { "recordDir": "/run/dockhand/cgroups", "delegate": "/usr/bin/containerd-shim-runc-v2" }
//! ```
//!
//! Both keys are optional. The environment variables `DOCKHAND_RECORD_DIR` and
//! `DOCKHAND_DELEGATE` override the file (the `start` action sets them for the daemon it launches
//! so that both agree). Defaults: [`dockhand_host::record::DEFAULT_DIR`] and
//! `containerd-shim-runc-v2` from `PATH` (then `/usr/bin`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const ENV_RECORD_DIR: &str = "DOCKHAND_RECORD_DIR";
pub const ENV_DELEGATE: &str = "DOCKHAND_DELEGATE";
const DELEGATE_NAME: &str = "containerd-shim-runc-v2";

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("locate the shim binary: {0}")]
    CurrentExe(#[source] std::io::Error),
}

/// The shim's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub record_dir: PathBuf,
    pub delegate: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    record_dir: Option<PathBuf>,
    delegate: Option<PathBuf>,
}

impl Config {
    /// Loads `<current exe>.json` (if present) and the environment overrides.
    pub fn load() -> Result<Config, ConfigError> {
        let exe = std::env::current_exe().map_err(ConfigError::CurrentExe)?;
        let mut file = exe.into_os_string();
        file.push(".json");
        Config::load_from(
            Path::new(&file),
            std::env::var_os(ENV_RECORD_DIR).map(PathBuf::from),
            std::env::var_os(ENV_DELEGATE).map(PathBuf::from),
        )
    }

    /// Loads `file` (missing is fine) with the given overrides.
    pub fn load_from(
        file: &Path,
        record_dir: Option<PathBuf>,
        delegate: Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        let parsed = match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse {
                path: file.to_path_buf(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: file.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Config {
            record_dir: record_dir
                .or(parsed.record_dir)
                .unwrap_or_else(|| PathBuf::from(dockhand_host::record::DEFAULT_DIR)),
            delegate: delegate
                .or(parsed.delegate)
                .unwrap_or_else(default_delegate),
        })
    }
}

fn default_delegate() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(DELEGATE_NAME))
        .find(|p| p.is_file())
        .unwrap_or_else(|| Path::new("/usr/bin").join(DELEGATE_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_then_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shim.json");
        let none = Config::load_from(&file, None, None).unwrap();
        assert_eq!(none.record_dir, Path::new("/run/dockhand/cgroups"));
        assert!(none.delegate.ends_with("containerd-shim-runc-v2"));

        std::fs::write(&file, r#"{"recordDir": "/tmp/r", "delegate": "/opt/d"}"#).unwrap();
        let from_file = Config::load_from(&file, None, None).unwrap();
        assert_eq!(from_file.record_dir, Path::new("/tmp/r"));
        assert_eq!(from_file.delegate, Path::new("/opt/d"));

        let env = Config::load_from(&file, Some("/e".into()), None).unwrap();
        assert_eq!(env.record_dir, Path::new("/e"));
        assert_eq!(env.delegate, Path::new("/opt/d"));

        std::fs::write(&file, r#"{"recordDirectory": "/x"}"#).unwrap();
        assert!(matches!(
            Config::load_from(&file, None, None),
            Err(ConfigError::Parse { .. })
        ));
    }
}
