//! Test images built from files on this machine: an OCI image-layout tarball holding a busybox
//! image (Debian's `busybox-static`, applets as hard links) and a pause image (the static binary
//! from `fixtures/pause.c`). Layers are uncompressed tars, so a layer's digest is its diff id.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The busybox image: `/bin/busybox` plus every applet as a hard link in `/bin`; `Cmd` is `sh`.
pub const BUSYBOX_IMAGE: &str = "docker.io/dockhand/busybox:test";
/// The pause image: `/pause` as entrypoint. containerd's `sandbox_image` in every [`crate::Node`].
pub const PAUSE_IMAGE: &str = "docker.io/dockhand/pause:test";

pub(crate) const PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// One file of an image layer.
pub(crate) enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    HardLink { target: String },
}

/// A content-addressed blob and its descriptor.
pub(crate) struct Blob {
    pub(crate) digest: String,
    pub(crate) data: Vec<u8>,
}

impl Blob {
    fn new(data: Vec<u8>) -> Blob {
        Blob {
            digest: format!("sha256:{}", hex(&Sha256::digest(&data))),
            data,
        }
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.data.len() })
    }
}

/// An image: its blobs (layers, config, manifest) and the manifest's index entry.
pub(crate) struct Image {
    /// Layers, then the config, then the manifest.
    pub(crate) blobs: Vec<Blob>,
    index_entry: Value,
}

/// Writes an OCI image-layout tarball with both test images to `out`.
pub fn write_image_archive(busybox: &Path, pause: &Path, out: &Path) -> Result<()> {
    let busybox_image = image(
        BUSYBOX_IMAGE,
        vec![busybox_layer(busybox)?],
        json!({ "Env": [PATH_ENV], "Cmd": ["sh"] }),
    )?;
    let pause_data = std::fs::read(pause).with_context(|| format!("read {}", pause.display()))?;
    let pause_layer = [(
        "pause".to_string(),
        Entry::File {
            mode: 0o755,
            data: pause_data,
        },
    )];
    let pause_image = image(
        PAUSE_IMAGE,
        vec![pause_layer.into_iter().collect()],
        json!({ "Env": [PATH_ENV], "Entrypoint": ["/pause"] }),
    )?;

    let file = std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
    let mut archive = tar::Builder::new(file);
    append(
        &mut archive,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [busybox_image.index_entry, pause_image.index_entry],
    });
    append(&mut archive, "index.json", &serde_json::to_vec(&index)?)?;
    append_dir(&mut archive, "blobs")?;
    append_dir(&mut archive, "blobs/sha256")?;
    let mut written = std::collections::HashSet::new();
    for blob in busybox_image.blobs.iter().chain(&pause_image.blobs) {
        if written.insert(blob.digest.clone()) {
            let name = format!("blobs/sha256/{}", &blob.digest["sha256:".len()..]);
            append(&mut archive, &name, &blob.data)?;
        }
    }
    archive.into_inner()?.sync_all()?;
    Ok(())
}

/// The busybox layer: `/bin/busybox`, its applets as hard links, and the usual empty directories.
pub(crate) fn busybox_layer(busybox: &Path) -> Result<BTreeMap<String, Entry>> {
    let data = std::fs::read(busybox).with_context(|| format!("read {}", busybox.display()))?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("run {} --list", busybox.display()))?;
    if !list.status.success() {
        bail!("{} --list failed: {}", busybox.display(), list.status);
    }
    let mut entries = BTreeMap::new();
    for dir in ["bin", "dev", "etc", "proc", "root", "sys", "usr", "var"] {
        entries.insert(dir.to_string(), Entry::Dir { mode: 0o755 });
    }
    entries.insert("tmp".into(), Entry::Dir { mode: 0o1777 });
    let passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n";
    let group = b"root:x:0:\nnogroup:x:65534:\n";
    let files: [(&str, &[u8]); 2] = [("etc/passwd", passwd), ("etc/group", group)];
    for (name, data) in files {
        let data = data.to_vec();
        entries.insert(name.into(), Entry::File { mode: 0o644, data });
    }
    entries.insert("bin/busybox".into(), Entry::File { mode: 0o755, data });
    for applet in String::from_utf8(list.stdout)?.lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let target = "bin/busybox".to_string();
        entries.insert(format!("bin/{applet}"), Entry::HardLink { target });
    }
    Ok(entries)
}

/// Builds the layer tars, config and manifest of an image named `name`.
pub(crate) fn image(
    name: &str,
    layers: Vec<BTreeMap<String, Entry>>,
    config: Value,
) -> Result<Image> {
    let layers = layers
        .iter()
        .map(|layer| Ok(Blob::new(layer_tar(layer)?)))
        .collect::<Result<Vec<Blob>>>()?;
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    let config = Blob::new(serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "dockhand-integration" }],
    }))?);
    let manifest = Blob::new(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(CONFIG_MEDIA_TYPE),
        "layers": layers.iter().map(|l| l.descriptor(LAYER_MEDIA_TYPE)).collect::<Vec<_>>(),
    }))?);
    let mut index_entry = manifest.descriptor(MANIFEST_MEDIA_TYPE);
    index_entry["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    index_entry["annotations"] = json!({
        "org.opencontainers.image.ref.name": name,
        "io.containerd.image.name": name,
    });
    let mut blobs = layers;
    blobs.extend([config, manifest]);
    Ok(Image { blobs, index_entry })
}

fn layer_tar(entries: &BTreeMap<String, Entry>) -> Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    // Directories, then files, then hard links: a link's target must come before it.
    let rank = |entry: &Entry| match entry {
        Entry::Dir { .. } => 0,
        Entry::File { .. } => 1,
        Entry::HardLink { .. } => 2,
    };
    let mut ordered: Vec<(&String, &Entry)> = entries.iter().collect();
    ordered.sort_by_key(|(path, entry)| (rank(entry), path.as_str()));
    for (path, entry) in ordered {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match entry {
            Entry::Dir { mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                archive.append_data(&mut header, format!("{path}/"), std::io::empty())?;
            }
            Entry::File { mode, data } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                archive.append_data(&mut header, path, data.as_slice())?;
            }
            Entry::HardLink { target } => {
                header.set_entry_type(tar::EntryType::Link);
                header.set_mode(0o755);
                header.set_size(0);
                archive.append_link(&mut header, path, target)?;
            }
        }
    }
    Ok(archive.into_inner()?)
}

fn append<W: std::io::Write>(archive: &mut tar::Builder<W>, name: &str, data: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_size(data.len() as u64);
    archive.append_data(&mut header, name, data)?;
    Ok(())
}

fn append_dir<W: std::io::Write>(archive: &mut tar::Builder<W>, name: &str) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_size(0);
    archive.append_data(&mut header, format!("{name}/"), std::io::empty())?;
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
