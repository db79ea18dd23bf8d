//! Writes the test images (the OCI tarball of the busybox and pause images, built from this
//! machine's busybox-static and `fixtures/pause.c`) to the path given, for the VM lane (`vm/`),
//! whose guest imports them with `ctr -n k8s.io images import`.

use std::path::PathBuf;

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: vm-fixtures OUT.tar")?;
    let fixtures = dockhand_integration::fixtures()?;
    std::fs::copy(&fixtures.images, &out)
        .with_context(|| format!("copy {} to {}", fixtures.images.display(), out.display()))?;
    Ok(())
}
