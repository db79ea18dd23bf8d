//! The proxy's configuration: a TOML file (`/etc/dockhand/config.toml`) with every key optional,
//! overridden by command-line flags. Every key and its default is listed in the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/dockhand/config.toml";
pub const DEFAULT_LISTEN: &str = "/run/dockhand/dockhand.sock";
pub const DEFAULT_CONTAINERD: &str = "/run/containerd/containerd.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unix socket kubelet connects to.
    pub listen: PathBuf,
    /// containerd's CRI socket.
    pub containerd: PathBuf,
    /// Loopback address for Prometheus metrics (`/metrics`); none when unset.
    pub metrics_address: Option<SocketAddr>,
    /// Seconds to wait for containerd's socket to accept a connection before answering UNAVAILABLE.
    pub connect_timeout_seconds: u64,
    /// Seconds SIGTERM waits for in-flight calls before closing connections.
    pub drain_timeout_seconds: u64,
    /// Seconds a new connection may take to send its HTTP/2 preface before it is dropped.
    pub handshake_timeout_seconds: u64,
    /// Seconds an intercepted call's request body may take to arrive in full.
    pub request_body_timeout_seconds: u64,
    /// Threads that serve calls: 1 runs everything on one thread.
    pub worker_threads: usize,
    /// Where containerd-shim-dockhand-v2 writes cgroup placement records.
    pub cgroup_records: PathBuf,
    pub propagation: PropagationConfig,
    pub archive: ArchiveConfig,
    pub check: CheckConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.into(),
            containerd: DEFAULT_CONTAINERD.into(),
            metrics_address: None,
            connect_timeout_seconds: 2,
            drain_timeout_seconds: 10,
            handshake_timeout_seconds: 10,
            request_body_timeout_seconds: 30,
            worker_threads: 2,
            cgroup_records: dockhand_host::record::DEFAULT_DIR.into(),
            propagation: PropagationConfig::default(),
            archive: ArchiveConfig::default(),
            check: CheckConfig::default(),
        }
    }
}

/// What the proxy does with Docker-parity mount propagation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PropagationMode {
    /// Rewrite matching mounts to HOST_TO_CONTAINER (rslave).
    Enforce,
    /// Decide, log and count, but forward the request unchanged.
    DryRun,
    /// Do nothing.
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PropagationConfig {
    pub mode: PropagationMode,
    /// Docker's data root: its ancestors and everything inside it get rslave.
    pub docker_root: PathBuf,
    /// More absolute host paths, each matching itself and its subtree.
    pub extra_paths: Vec<PathBuf>,
}

impl Default for PropagationConfig {
    fn default() -> Self {
        PropagationConfig {
            mode: PropagationMode::Enforce,
            docker_root: "/var/lib/docker".into(),
            extra_paths: Vec::new(),
        }
    }
}

/// The container log archive (`archive.rs`): logs kept after kubelet removes containers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Archive container logs at all.
    pub enabled: bool,
    /// Compressed logs and their metadata, one directory per container.
    pub dir: PathBuf,
    /// Hard links to live log files; must be on the same filesystem as `pod_logs_dir`.
    pub staging_dir: PathBuf,
    /// Decompressed copies handed to kubelet for archived containers (one directory each);
    /// never under kubelet's log directories.
    pub restored_dir: PathBuf,
    /// kubelet's pod log root; a log file outside it is never archived.
    pub pod_logs_dir: PathBuf,
    /// Upper bound of the archive's size on disk; the oldest containers are dropped first.
    pub max_bytes: u64,
    /// Containers archived longer ago than this are dropped (0: kept until space runs out).
    pub max_age_seconds: u64,
    /// Free space kept on the archive's filesystem, in percent; the oldest are dropped first.
    pub min_free_percent: u8,
    /// zstd level (1 fastest to 19 smallest).
    pub compression_level: i32,
    /// Answer ContainerStatus for archived containers, so `kubectl logs` works after GC.
    pub serve_kubelet: bool,
    /// Upper bound of the restored copies' total size; least recently used go first.
    pub restored_max_bytes: u64,
    /// How long a restored copy's path stays readable after it was handed out, whatever else is
    /// evicted meanwhile (kubelet opens it right after ContainerStatus).
    pub restored_lease_seconds: u64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            enabled: true,
            dir: "/var/lib/dockhand/archive".into(),
            staging_dir: "/var/log/dockhand/staging".into(),
            restored_dir: "/var/lib/dockhand/restored".into(),
            pod_logs_dir: "/var/log/pods".into(),
            max_bytes: 1 << 30,
            max_age_seconds: 7 * 24 * 3600,
            min_free_percent: 15,
            compression_level: 3,
            serve_kubelet: true,
            restored_max_bytes: 256 << 20,
            restored_lease_seconds: 60,
        }
    }
}

impl ArchiveConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        let paths = [
            ("archive.dir", &self.dir),
            ("archive.staging_dir", &self.staging_dir),
            ("archive.restored_dir", &self.restored_dir),
            ("archive.pod_logs_dir", &self.pod_logs_dir),
        ];
        for (key, path) in paths {
            if !path.is_absolute() {
                return invalid(key, format!("{} is not an absolute path", path.display()));
            }
            if path.components().any(|c| {
                !matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )
            }) {
                return invalid(
                    key,
                    format!("{} has '.' or '..' components", path.display()),
                );
            }
        }
        for (i, (key, a)) in paths.iter().enumerate() {
            for (other, b) in &paths[i + 1..] {
                if a.starts_with(b) || b.starts_with(a) {
                    return invalid(
                        key,
                        format!("{} overlaps {other} {}", a.display(), b.display()),
                    );
                }
            }
        }
        // kubelet deletes everything matching `<log_path>*`: no glob characters in the path.
        let restored = self.restored_dir.to_string_lossy();
        if restored.contains(['*', '?', '[', ']', '\\']) {
            return invalid(
                "archive.restored_dir",
                format!("{restored} contains glob characters"),
            );
        }
        for kubelet_dir in ["/var/log/pods", "/var/log/containers"] {
            if self.restored_dir.starts_with(kubelet_dir) {
                return invalid(
                    "archive.restored_dir",
                    format!("{restored} is under kubelet's {kubelet_dir}"),
                );
            }
        }
        if self.restored_lease_seconds == 0 {
            return invalid(
                "archive.restored_lease_seconds",
                "must be at least 1 (a path handed out must stay readable)".into(),
            );
        }
        if self.min_free_percent > 100 {
            return invalid("archive.min_free_percent", "must be at most 100".into());
        }
        if !(1..=19).contains(&self.compression_level) {
            return invalid(
                "archive.compression_level",
                "must be between 1 and 19".into(),
            );
        }
        Ok(())
    }
}

/// `dockhand check` and the proxy's background checker (`cli/check.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckConfig {
    /// Seconds between the proxy's background checks (0: none); results on `/metrics`.
    pub interval_seconds: u64,
    /// Seconds one background check may take.
    pub timeout_seconds: u64,
    /// kubelet's root directory (`pods/<uid>/volumes` under it).
    pub kubelet_dir: PathBuf,
    /// Used space in percent above which a volume is a problem.
    pub usage_percent: u8,
    /// The host's mount table; the check runs in the host's mount namespace, as the proxy.
    pub host_mountinfo: PathBuf,
    /// NetworkReady false is a problem, not only a note.
    pub require_network: bool,
    /// Where `dockhand check archive` keeps the lost-log count it last saw.
    pub state_file: PathBuf,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            interval_seconds: 60,
            timeout_seconds: 10,
            kubelet_dir: "/var/lib/kubelet".into(),
            usage_percent: 90,
            host_mountinfo: "/proc/self/mountinfo".into(),
            require_network: false,
            state_file: "/run/dockhand/check-archive-lost".into(),
        }
    }
}

impl CheckConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, path) in [
            ("check.kubelet_dir", &self.kubelet_dir),
            ("check.host_mountinfo", &self.host_mountinfo),
            ("check.state_file", &self.state_file),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{} is not an absolute path", path.display()),
                });
            }
        }
        if !(1..=100).contains(&self.usage_percent) {
            return Err(ConfigError::Invalid {
                key: "check.usage_percent",
                reason: "must be between 1 and 100".into(),
            });
        }
        if self.timeout_seconds == 0 {
            return Err(ConfigError::Invalid {
                key: "check.timeout_seconds",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

impl Config {
    /// Reads `path`; a missing file is an error only when `required` (it was named explicitly).
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            source: Box::new(e),
        })?;
        Ok(config)
    }

    /// Checks what serde cannot: absolute paths, a loopback metrics address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let absolute = |key: &'static str, path: &Path| {
            if path.is_absolute() {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    reason: format!("{} is not an absolute path", path.display()),
                })
            }
        };
        absolute("listen", &self.listen)?;
        absolute("containerd", &self.containerd)?;
        absolute("cgroup_records", &self.cgroup_records)?;
        absolute("propagation.docker_root", &self.propagation.docker_root)?;
        for path in &self.propagation.extra_paths {
            absolute("propagation.extra_paths", path)?;
        }
        if self.listen == self.containerd {
            return Err(ConfigError::Invalid {
                key: "listen",
                reason: "the proxy cannot listen on containerd's own socket".into(),
            });
        }
        if let Some(addr) = self.metrics_address {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid {
                    key: "metrics_address",
                    reason: format!("{addr} is not a loopback address"),
                });
            }
        }
        self.archive.validate()?;
        self.check.validate()?;
        for (key, value) in [
            ("connect_timeout_seconds", self.connect_timeout_seconds),
            ("handshake_timeout_seconds", self.handshake_timeout_seconds),
            (
                "request_body_timeout_seconds",
                self.request_body_timeout_seconds,
            ),
            ("worker_threads", self.worker_threads as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!(config.listen, PathBuf::from(DEFAULT_LISTEN));
        assert_eq!(config.containerd, PathBuf::from(DEFAULT_CONTAINERD));
        assert_eq!(config.propagation.mode, PropagationMode::Enforce);
        assert_eq!(
            config.propagation.docker_root,
            PathBuf::from("/var/lib/docker")
        );
        config.validate().unwrap();
    }

    #[test]
    fn every_key_parses() {
        let config: Config = toml::from_str(
            r#"
            listen = "/run/x.sock"
            containerd = "/run/c.sock"
            metrics_address = "127.0.0.1:9337"
            connect_timeout_seconds = 3
            drain_timeout_seconds = 5
            cgroup_records = "/run/dockhand/cgroups"
            [propagation]
            mode = "dry-run"
            docker_root = "/data/docker"
            extra_paths = ["/srv"]
            [check]
            interval_seconds = 30
            timeout_seconds = 4
            kubelet_dir = "/data/kubelet"
            usage_percent = 85
            host_mountinfo = "/proc/1/mountinfo"
            require_network = true
            state_file = "/run/dockhand/lost"
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.check.usage_percent, 85);
        let zero: Config = toml::from_str("[check]\nusage_percent = 0").unwrap();
        assert!(zero.validate().is_err());
        assert_eq!(config.propagation.mode, PropagationMode::DryRun);
        assert_eq!(config.propagation.extra_paths, vec![PathBuf::from("/srv")]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<Config>("lisen = \"/x\"").is_err());
        assert!(toml::from_str::<Config>("[propagation]\nmode = \"sometimes\"").is_err());
        let config: Config = toml::from_str("listen = \"relative.sock\"").unwrap();
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("listen"));
        let config: Config = toml::from_str("metrics_address = \"0.0.0.0:9337\"").unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn missing_file_is_only_an_error_when_named() {
        let path = Path::new("/nonexistent/dockhand.toml");
        assert!(Config::load(path, false).is_ok());
        assert!(matches!(
            Config::load(path, true),
            Err(ConfigError::Read { .. })
        ));
    }
}
