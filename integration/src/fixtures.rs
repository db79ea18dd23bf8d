//! Files the tests need, built from the repository and this machine (never downloaded) and cached
//! under `<target>/dockhand-fixtures/<key>/`, where the key hashes every input. Each build happens
//! in a fresh temp directory that is renamed into place, so concurrent test processes never see a
//! half-written fixture: the first rename wins and the others drop their copy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::images::{hex, write_image_archive};

/// Bump when the way fixtures are built changes without their inputs changing.
const FORMAT: &str = "dockhand-fixtures-v2";
/// Debian's `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";

/// The cached fixture files.
#[derive(Debug, Clone)]
pub struct Fixtures {
    /// Static pause binary built from `integration/fixtures/pause.c`.
    pub pause: PathBuf,
    /// OCI image-layout tarball holding [`crate::BUSYBOX_IMAGE`] and [`crate::PAUSE_IMAGE`].
    pub images: PathBuf,
}

/// Returns the fixtures, building them on first use in this process (or in any process before).
pub fn fixtures() -> Result<&'static Fixtures> {
    static FIXTURES: OnceLock<std::result::Result<Fixtures, String>> = OnceLock::new();
    FIXTURES
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("cannot build test fixtures: {e}"))
}

/// The workspace root (the parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration crate lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"))
}

fn build() -> Result<Fixtures> {
    let source = workspace_dir().join("integration/fixtures/pause.c");
    let pause_c = std::fs::read(&source).with_context(|| format!("read {}", source.display()))?;
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("read {BUSYBOX} (apt-get install busybox-static)"))?;
    let mut key = Sha256::new();
    for input in [FORMAT.as_bytes(), &pause_c, &busybox] {
        key.update((input.len() as u64).to_le_bytes());
        key.update(input);
    }
    let root = target_dir().join("dockhand-fixtures");
    let dir = root.join(&hex(&key.finalize())[..16]);
    let fixtures = Fixtures {
        pause: dir.join("pause"),
        images: dir.join("images.tar"),
    };
    if dir.is_dir() {
        return Ok(fixtures);
    }
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".building-")
        .tempdir_in(&root)?;
    let pause = scratch.path().join("pause");
    let gcc = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&pause)
        .arg(&source)
        .output()
        .context("run gcc (apt-get install gcc libc6-dev)")?;
    if !gcc.status.success() {
        bail!(
            "gcc -static {} failed: {}",
            source.display(),
            String::from_utf8_lossy(&gcc.stderr)
        );
    }
    write_image_archive(
        Path::new(BUSYBOX),
        &pause,
        &scratch.path().join("images.tar"),
    )?;
    let scratch = scratch.keep();
    if let Err(e) = std::fs::rename(&scratch, &dir) {
        // Another process won the race; its copy is identical.
        let _ = std::fs::remove_dir_all(&scratch);
        if !dir.is_dir() {
            return Err(e).with_context(|| format!("rename fixtures into {}", dir.display()));
        }
    }
    Ok(fixtures)
}
