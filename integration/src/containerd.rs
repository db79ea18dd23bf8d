//! Which containerd a [`crate::Node`] runs, and the config file that version reads.
//!
//! `DOCKHAND_CONTAINERD` picks the release line (`1.6`, the default, `1.7`, `2.3` or `2.4`); its
//! binaries (`containerd`, `ctr`, `containerd-shim-runc-v2`) come from `DOCKHAND_CONTAINERD_BIN`,
//! else `<target>/containerd/<version>/bin` (what `make containerd-<version>` fills), else, for
//! 1.6 only, the system's (Debian 12's package). The binary's own `--version` must match the line
//! asked for, so a test run never reports one version's results under another's name.
//!
//! runc: 1.6 and 1.7 run the one in `PATH` (Debian 12's 1.1.5, as those nodes have it); 2.x runs
//! runc [`RUNC_VERSION`] from `DOCKHAND_RUNC`, else `<target>/runc/<RUNC_VERSION>/runc` (what
//! `make runc` builds), named in the runc options' `BinaryName`. Its `--version` is checked too.
//!
//! Each line gets its own config dialect: 1.6 and 1.7 read `version = 2` with everything CRI
//! under `io.containerd.grpc.v1.cri`; 2.x reads `version = 3` with the CRI plugin split into
//! `io.containerd.cri.v1.images` and `io.containerd.cri.v1.runtime`, the sandbox image among the
//! pinned images, and NRI on by default (switched off here).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

use crate::fixtures::target_dir;
use crate::images::PAUSE_IMAGE;

/// The containerd release lines the suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// Debian 12's 1.6.20: ignores `runtime_path`, finds shims in `PATH`.
    V1_6,
    /// Debian 13's 1.7.24.
    V1_7,
    /// The 2.3 LTS, built from its Go module (`tools/go.mod`).
    V2_3,
    /// 2.4, built from its Go module (`tools/containerd-2.4/go.mod`).
    V2_4,
}

impl Version {
    pub const ALL: [Version; 4] = [Version::V1_6, Version::V1_7, Version::V2_3, Version::V2_4];

    /// `1.6`, `1.7`, `2.3`, `2.4`.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_6 => "1.6",
            Version::V1_7 => "1.7",
            Version::V2_3 => "2.3",
            Version::V2_4 => "2.4",
        }
    }

    /// Whether containerd starts the shim `runtime_path` names (1.7+; 1.6 parses it and then
    /// starts `containerd-shim-<name>-v2` from its `PATH`, measured on 1.6.20).
    pub fn honours_runtime_path(self) -> bool {
        self >= Version::V1_7
    }

    /// Whether the config is `version = 3` with the split CRI plugins (2.x).
    pub fn is_v2(self) -> bool {
        self >= Version::V2_3
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Version {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Version> {
        Version::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| anyhow!("unknown containerd version {s:?} (known: 1.6, 1.7, 2.3, 2.4)"))
    }
}

/// A containerd installation: its release line and where its binaries are.
#[derive(Debug, Clone)]
pub struct Containerd {
    pub version: Version,
    /// What `containerd --version` printed.
    pub full_version: String,
    /// Directory holding `containerd`, `ctr` and `containerd-shim-runc-v2`.
    pub bin_dir: PathBuf,
    /// The runc its pods run with (the runc options' `BinaryName`); `None`: the one in `PATH`.
    pub runc: Option<PathBuf>,
}

/// The runc the 2.x lines run with (`make runc`, `tools/runc/go.mod`).
pub const RUNC_VERSION: &str = "1.5.3";

/// runc for `version`: `None` (the one in `PATH`) for 1.x, else [`RUNC_VERSION`] from
/// `DOCKHAND_RUNC` or `<target>/runc/<RUNC_VERSION>/runc`, its `--version` checked.
fn runc_for(version: Version) -> Result<Option<PathBuf>> {
    if !version.is_v2() {
        return Ok(None);
    }
    let runc = std::env::var_os("DOCKHAND_RUNC")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("runc").join(RUNC_VERSION).join("runc"));
    if !runc.is_file() {
        bail!(
            "runc {RUNC_VERSION} not found at {}: run `make runc`",
            runc.display()
        );
    }
    let output = Command::new(&runc)
        .arg("--version")
        .output()
        .with_context(|| format!("run {} --version", runc.display()))?;
    let printed = String::from_utf8_lossy(&output.stdout);
    if printed.lines().next() != Some(&format!("runc version {RUNC_VERSION}")) {
        bail!(
            "{} is {:?}, not runc {RUNC_VERSION}",
            runc.display(),
            printed.trim()
        );
    }
    Ok(Some(runc))
}

impl Containerd {
    /// The installation `DOCKHAND_CONTAINERD` (and `DOCKHAND_CONTAINERD_BIN`) name, checked once
    /// per process.
    pub fn selected() -> Result<&'static Containerd> {
        static SELECTED: OnceLock<std::result::Result<Containerd, String>> = OnceLock::new();
        SELECTED
            .get_or_init(|| Containerd::from_env().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn from_env() -> Result<Containerd> {
        let version: Version = match std::env::var("DOCKHAND_CONTAINERD") {
            Ok(v) if !v.is_empty() => v.parse()?,
            _ => Version::V1_6,
        };
        let built = target_dir()
            .join("containerd")
            .join(version.as_str())
            .join("bin");
        let bin_dir = match std::env::var_os("DOCKHAND_CONTAINERD_BIN") {
            Some(dir) => PathBuf::from(dir),
            None if built.join("containerd").exists() => built,
            None if version == Version::V1_6 => PathBuf::from("/usr/bin"),
            None => bail!(
                "containerd {version} not found in {}: run `make containerd-{version}`",
                built.display()
            ),
        };
        let containerd = bin_dir.join("containerd");
        let output = Command::new(&containerd)
            .arg("--version")
            .output()
            .with_context(|| format!("run {} --version", containerd.display()))?;
        let full_version = String::from_utf8_lossy(&output.stdout).trim().to_string();
        // e.g. `containerd github.com/containerd/containerd/v2 2.1.9+unknown `.
        let release = full_version.split_whitespace().nth(2).unwrap_or_default();
        if !release
            .trim_start_matches('v')
            .starts_with(&format!("{version}."))
        {
            bail!(
                "{} is {full_version:?}, not containerd {version}",
                containerd.display()
            );
        }
        Ok(Containerd {
            version,
            full_version,
            bin_dir,
            runc: runc_for(version)?,
        })
    }

    /// `containerd`, `ctr` or `containerd-shim-runc-v2` of this installation.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// The stock runc shim of this installation.
    pub fn stock_shim(&self) -> PathBuf {
        self.binary("containerd-shim-runc-v2")
    }
}

/// What goes into a node's config besides its directory.
#[derive(Debug, Clone, Default)]
pub struct ConfigParams<'a> {
    pub runtime_type: &'a str,
    pub runtime_path: Option<&'a Path>,
    /// `hosts.toml` directory tree for registry mirrors (`config_path`).
    pub registry_config_path: Option<&'a Path>,
    /// The runc options' `BinaryName` (none: runc from `PATH`).
    pub runc: Option<&'a Path>,
    /// TOML appended as is.
    pub extra: &'a str,
}

/// containerd's config for `version`: root, state, sockets and CNI inside `dir`, CRI on cgroupfs,
/// `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE), the pause image as sandbox image.
pub fn config(version: Version, dir: &Path, params: &ConfigParams) -> String {
    let d = dir.display();
    let runtime_type = params.runtime_type;
    let runtime_path = match params.runtime_path {
        Some(path) => format!("runtime_path = \"{}\"", path.display()),
        None => String::new(),
    };
    let registry = match params.registry_config_path {
        Some(path) => format!("config_path = \"{}\"", path.display()),
        None => String::new(),
    };
    let binary_name = match params.runc {
        Some(path) => format!("BinaryName = \"{}\"", path.display()),
        None => String::new(),
    };
    let extra = params.extra;
    let common = format!(
        r#"root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""
"#
    );
    if !version.is_v2() {
        return format!(
            r#"version = 2
{common}
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "{runtime_type}"
      {runtime_path}

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
        {binary_name}

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"

  [plugins."io.containerd.grpc.v1.cri".registry]
    {registry}

{extra}
"#
        );
    }
    format!(
        r#"version = 3
{common}
[plugins.'io.containerd.internal.v1.opt']
  path = "{d}/opt"

[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"

  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"

  [plugins.'io.containerd.cri.v1.images'.registry]
    {registry}

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true

  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"

    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "{runtime_type}"
      {runtime_path}

      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
        {binary_name}

  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{d}/cni/bin"]
    conf_dir = "{d}/cni/conf"

{extra}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_order() {
        for v in Version::ALL {
            assert_eq!(v.as_str().parse::<Version>().unwrap(), v);
        }
        assert!("1.5".parse::<Version>().is_err());
        assert!(!Version::V1_6.honours_runtime_path());
        assert!(Version::V1_7.honours_runtime_path() && !Version::V1_7.is_v2());
        assert!(Version::V2_3.is_v2() && Version::V2_4.is_v2());
    }

    /// Both dialects are valid TOML with the keys where each version reads them.
    #[test]
    fn dialects_put_the_keys_where_each_version_reads_them() {
        let dir = Path::new("/tmp/dockhand-node-x");
        let params = ConfigParams {
            runtime_type: "io.containerd.runc.v2",
            runtime_path: Some(Path::new("/opt/shim")),
            runc: Some(Path::new("/opt/runc")),
            ..ConfigParams::default()
        };
        let v2: toml::Value = toml::from_str(&config(Version::V1_7, dir, &params)).unwrap();
        let cri = &v2["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(v2["version"].as_integer(), Some(2));
        assert_eq!(cri["sandbox_image"].as_str(), Some(PAUSE_IMAGE));
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["runtime_path"].as_str(),
            Some("/opt/shim")
        );
        let v3: toml::Value = toml::from_str(&config(Version::V2_3, dir, &params)).unwrap();
        let plugins = &v3["plugins"];
        assert_eq!(v3["version"].as_integer(), Some(3));
        assert_eq!(
            plugins["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"].as_str(),
            Some(PAUSE_IMAGE)
        );
        let runtime = &plugins["io.containerd.cri.v1.runtime"];
        assert_eq!(runtime["restrict_oom_score_adj"].as_bool(), Some(true));
        assert_eq!(
            runtime["containerd"]["runtimes"]["runc"]["options"]["BinaryName"].as_str(),
            Some("/opt/runc")
        );
        assert_eq!(
            runtime["containerd"]["runtimes"]["runc"]["runtime_path"].as_str(),
            Some("/opt/shim")
        );
        assert_eq!(
            plugins["io.containerd.nri.v1.nri"]["disable"].as_bool(),
            Some(true)
        );
    }

    /// The README's config snippets for 1.7 and 2.x name the runtime table where the harness
    /// puts it for that version (the table every shim test on that version runs through).
    #[test]
    fn readme_snippets_match_each_versions_dialect() {
        let readme = std::fs::read_to_string(crate::workspace_dir().join("README.md")).unwrap();
        let snippets: Vec<toml::Value> = readme
            .split("```toml\n")
            .skip(1)
            .filter_map(|block| block.split("```").next())
            .filter(|block| block.contains("runtime_path"))
            .map(|block| toml::from_str(block).unwrap())
            .collect();
        let runc = |config: &toml::Value| -> toml::Value {
            let plugins = &config["plugins"];
            let runtimes = match config["version"].as_integer() {
                Some(3) => &plugins["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"],
                _ => &plugins["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"],
            };
            runtimes["runc"].clone()
        };
        let params = ConfigParams {
            runtime_type: "io.containerd.runc.v2",
            runtime_path: Some(Path::new("/usr/local/bin/containerd-shim-dockhand-v2")),
            ..ConfigParams::default()
        };
        let dir = Path::new("/tmp/dockhand-node-x");
        for version in [Version::V1_7, Version::V2_3, Version::V2_4] {
            let ours: toml::Value = toml::from_str(&config(version, dir, &params)).unwrap();
            let snippet = snippets
                .iter()
                .find(|s| s["version"].as_integer() == ours["version"].as_integer())
                .unwrap_or_else(|| panic!("no README snippet for containerd {version}"));
            let (theirs, ours) = (runc(snippet), runc(&ours));
            for key in ["runtime_type", "runtime_path"] {
                assert_eq!(theirs[key], ours[key], "{version}: {key}");
            }
            assert!(theirs["options"].get("SystemdCgroup").is_some());
            assert!(ours["options"].get("SystemdCgroup").is_some());
        }
    }
}
