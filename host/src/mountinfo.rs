//! The host's mount table, from `/proc/self/mountinfo`, and each mount's propagation.
//!
//! Docker and containerd decide whether a bind mount may be `rslave` by the propagation of the
//! host mount that contains its source: `shared:N` among the optional fields makes it shared,
//! `master:N` a slave, neither private (proc(5), "mountinfo"). A mount can be both shared and
//! a slave (`shared:N master:M`); containerd's `ensureSharedOrSlave` accepts either and its
//! `ensureShared` looks only for `shared:`, so such a mount counts as [`Propagation::Shared`].
//! `unbindable` has neither and counts as private, which is what containerd's checks make of it.
//!
//! A line is `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
//! SUPER_OPTIONS`, space separated. The kernel escapes space, tab, newline and backslash in
//! paths as octal (`\040`, `\011`, `\012`, `\134`); they are decoded here. Paths are bytes
//! (Linux does not require UTF-8), so the table is parsed from bytes.
//!
//! The root field is not always a path: a bind mount of a namespace file (containerd's
//! `/run/netns/cni-*`, Docker's `/run/docker/netns/*`, on every node with a pod that has its own
//! network) shows `net:[4026532184]`, and other pseudo filesystems write what their `show_path`
//! gives. Such lines are kept as they are. A line dockhand cannot use at all is skipped and
//! reported in [`MountTable::skipped`], never a reason to give up the whole table: one odd mount
//! must not switch off every decision that needs the others.
//!
//! Why not the `procfs` crate: its `MountInfo` parses the same fields, but it fails the whole
//! table on a line it cannot parse, decodes paths as UTF-8 strings, and brings a dependency tree
//! several times the size of this file for one file format.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Where the kernel shows the calling process's mount table.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// How mount and unmount events propagate to and from a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Propagation {
    /// In a peer group (`shared:N`), possibly also a slave of another (`master:M`).
    Shared,
    /// Receives events from a peer group (`master:N`) and sends none.
    Slave,
    /// Neither: private (or unbindable).
    Private,
}

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// The device's `(major, minor)`.
    pub device: (u32, u32),
    /// The directory of the filesystem that forms this mount's root (not `/` for bind mounts).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub options: String,
    /// The peer group of `shared:N`.
    pub shared_group: Option<u32>,
    /// The peer group of `master:N`.
    pub master_group: Option<u32>,
    pub propagation: Propagation,
    pub fs_type: String,
    /// The mount source (`/dev/vda1`, `tmpfs`, `server:/export`), escapes decoded.
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MountInfoError {
    #[error("cannot read mount table {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A line of the table that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mount table line {line}: {reason}: {text:?}")]
pub struct SkippedLine {
    /// 1-based line number.
    pub line: usize,
    pub reason: &'static str,
    pub text: String,
}

/// The mount table, in the kernel's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountTable {
    entries: Vec<MountEntry>,
    skipped: Vec<SkippedLine>,
}

impl MountTable {
    /// Reads the calling process's mount table from `/proc/self/mountinfo`.
    pub fn read() -> Result<MountTable, MountInfoError> {
        MountTable::read_from(Path::new(MOUNTINFO))
    }

    /// Reads a mount table in mountinfo format from `path` (`/proc/<pid>/mountinfo`).
    pub fn read_from(path: &Path) -> Result<MountTable, MountInfoError> {
        let bytes = std::fs::read(path).map_err(|source| MountInfoError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(MountTable::parse_bytes(&bytes))
    }

    /// Parses mountinfo text. Empty lines are ignored; a line that does not parse is skipped
    /// and listed in [`MountTable::skipped`] with its (1-based) line number.
    pub fn parse(text: &str) -> MountTable {
        MountTable::parse_bytes(text.as_bytes())
    }

    /// Parses mountinfo bytes; paths need not be UTF-8.
    pub fn parse_bytes(bytes: &[u8]) -> MountTable {
        let mut table = MountTable::default();
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match parse_line(line) {
                Ok(entry) => table.entries.push(entry),
                Err(reason) => table.skipped.push(SkippedLine {
                    line: i + 1,
                    reason,
                    text: String::from_utf8_lossy(line).into_owned(),
                }),
            }
        }
        table
    }

    /// All entries, in the kernel's order.
    pub fn entries(&self) -> &[MountEntry] {
        &self.entries
    }

    /// The lines that could not be used, in order.
    pub fn skipped(&self) -> &[SkippedLine] {
        &self.skipped
    }

    /// The mount that contains `path`: the one whose mount point is the longest prefix of it,
    /// compared by whole components (`/var/lib/doc` does not contain `/var/lib/docker`). When
    /// several mounts are stacked on that mount point, the last in the table, which is the one
    /// on top and visible, is returned.
    ///
    /// `path` should be absolute with symlinks already resolved: a symlink's target may live on
    /// another mount, and `..` is compared as a name.
    pub fn containing(&self, path: &Path) -> Option<&MountEntry> {
        let mut best: Option<(usize, &MountEntry)> = None;
        for entry in &self.entries {
            if !path.starts_with(&entry.mount_point) {
                continue;
            }
            let depth = entry.mount_point.components().count();
            if best.is_none_or(|(best_depth, _)| depth >= best_depth) {
                best = Some((depth, entry));
            }
        }
        best.map(|(_, entry)| entry)
    }

    /// The mount containerd's `mount.Lookup` (and Docker's `getSourceMount`) would pick for
    /// `path`: the longest mount point that is a *string* prefix of it, the first in the table
    /// on a tie. This differs from [`MountTable::containing`] for stacked mounts (containerd
    /// sees the bottom one) and for string-prefix siblings (`/var/lib/doc` "contains"
    /// `/var/lib/docker`). Use it to predict containerd's own propagation check.
    pub fn containerd_lookup(&self, path: &Path) -> Option<&MountEntry> {
        let path = path.as_os_str().as_encoded_bytes();
        let mut best: Option<&MountEntry> = None;
        for entry in &self.entries {
            let mount_point = entry.mount_point.as_os_str().as_encoded_bytes();
            if !path.starts_with(mount_point) {
                continue;
            }
            let longer = best.is_none_or(|b| {
                mount_point.len() > b.mount_point.as_os_str().as_encoded_bytes().len()
            });
            if longer {
                best = Some(entry);
            }
        }
        best
    }
}

/// One line, or why it cannot be used.
fn parse_line(line: &[u8]) -> Result<MountEntry, &'static str> {
    let malformed = |reason: &'static str| reason;
    let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    // Mount points are absolute, options never "-": the first "-" from the seventh field on
    // is the separator.
    let separator = fields
        .iter()
        .skip(6)
        .position(|f| *f == b"-")
        .map(|at| at + 6)
        .ok_or_else(|| malformed("no \"-\" separator after six fields"))?;
    // Exactly three fields follow; proc(5) adds new ones as optional fields before the "-".
    let [fs_type, source, super_options] = fields[separator + 1..] else {
        return Err(malformed("not three fields after the \"-\" separator"));
    };
    let number_field = |text: &[u8], reason| {
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse::<u32>().ok())
            .ok_or_else(|| malformed(reason))
    };
    let mount_id = number_field(fields[0], "mount id is not a number")?;
    let parent_id = number_field(fields[1], "parent id is not a number")?;
    let device = match fields[2].iter().position(|b| *b == b':') {
        Some(colon) => (
            number_field(&fields[2][..colon], "device is not major:minor")?,
            number_field(&fields[2][colon + 1..], "device is not major:minor")?,
        ),
        None => return Err(malformed("device is not major:minor")),
    };
    // The root is what the filesystem's show_path writes: a path for most, `net:[4026532184]`
    // for an nsfs bind mount. Kept as given; only the mount point must be a path.
    let (root, mount_point) = (unescape(fields[3]), unescape(fields[4]));
    if !mount_point.starts_with(b"/") {
        return Err(malformed("mount point is not an absolute path"));
    }

    let (mut shared_group, mut master_group) = (None, None);
    for optional in &fields[6..separator] {
        if let Some(group) = optional.strip_prefix(b"shared:") {
            shared_group = Some(number_field(group, "shared:N has no peer group number")?);
        } else if let Some(group) = optional.strip_prefix(b"master:") {
            master_group = Some(number_field(group, "master:N has no peer group number")?);
        }
        // "propagate_from:N", "unbindable" and tags a newer kernel adds are not propagation.
    }
    let propagation = match (shared_group, master_group) {
        (Some(_), _) => Propagation::Shared,
        (None, Some(_)) => Propagation::Slave,
        (None, None) => Propagation::Private,
    };

    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    Ok(MountEntry {
        mount_id,
        parent_id,
        device,
        root: PathBuf::from(OsString::from_vec(root)),
        mount_point: PathBuf::from(OsString::from_vec(mount_point)),
        options: text(fields[5]),
        shared_group,
        master_group,
        propagation,
        fs_type: text(fs_type),
        source: text(&unescape(source)),
        super_options: text(super_options),
    })
}

/// Decodes the kernel's `\NNN` octal escapes; a backslash not followed by three octal digits
/// (at most `\377`) is kept as it is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' {
            if let Some(byte) = field.get(i + 1..i + 4).and_then(octal) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

fn octal(digits: &[u8]) -> Option<u8> {
    digits
        .iter()
        .try_fold(0u16, |acc, d| match d {
            b'0'..=b'7' => Some(acc * 8 + u16::from(d - b'0')),
            _ => None,
        })
        .and_then(|value| u8::try_from(value).ok())
}

/// The mount table, parsed once and re-read only after it changed.
///
/// The kernel reports a change in the namespace's mount table as `POLLPRI | POLLERR` on an open
/// `/proc/self/mountinfo` (once per change, until polled): a zero-timeout `poll(2)` before each
/// use costs one system call instead of reading and parsing the whole table. A change that
/// happened before the poll is always seen, so the cache is never staler than a fresh read.
pub struct WatchedMountTable {
    path: PathBuf,
    state: std::sync::Mutex<Option<(std::fs::File, std::sync::Arc<MountTable>)>>,
}

impl WatchedMountTable {
    pub fn new(path: &Path) -> WatchedMountTable {
        WatchedMountTable {
            path: path.to_path_buf(),
            state: std::sync::Mutex::new(None),
        }
    }

    /// The table as it is now. `on_reread` sees the table each time it is read afresh (to
    /// report its skipped lines once per change, not once per use).
    pub fn current(
        &self,
        on_reread: impl FnOnce(&MountTable),
    ) -> Result<std::sync::Arc<MountTable>, MountInfoError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((file, table)) = state.as_ref() {
            if !changed(file) {
                return Ok(table.clone());
            }
        }
        let read_error = |source| MountInfoError::Read {
            path: self.path.clone(),
            source,
        };
        // Opening records the namespace's current change count; reading then shows at least
        // that state, and any later change makes the next poll report it.
        let mut file = std::fs::File::open(&self.path).map_err(read_error)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes).map_err(read_error)?;
        let table = std::sync::Arc::new(MountTable::parse_bytes(&bytes));
        on_reread(&table);
        *state = Some((file, table.clone()));
        Ok(table)
    }
}

/// Whether the mount table behind `file` changed since it was opened or last polled. A file
/// that cannot be polled counts as changed.
fn changed(file: &std::fs::File) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(file, PollFlags::PRI)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::PRI | PollFlags::ERR | PollFlags::NVAL),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's table, trimmed: systemd's shared root, kubelet's pod volumes, a docker data
    /// root bind-mounted onto itself and made private, a slave mount, escaped names.
    const TABLE: &str = r"22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
24 22 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 22 0:6 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4017612k,nr_inodes=1004403,mode=755
26 25 0:23 / /dev/pts rw,nosuid,noexec,relatime shared:3 - devpts devpts rw,gid=5,mode=620,ptmxmode=000
27 22 0:24 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=807520k,mode=755
30 22 253:1 /var/lib/docker /var/lib/docker rw,relatime - ext4 /dev/vda1 rw,errors=remount-ro
31 22 0:40 / /var/lib/kubelet/pods/0123/volumes/kubernetes.io~projected/kube-api-access-x rw,relatime shared:210 - tmpfs tmpfs rw,size=3963600k
32 22 0:41 / /mnt/with\040space rw,relatime master:9 - tmpfs my\040source rw
33 22 0:42 / /mnt/tab\011new\012line\134back rw,relatime shared:20 master:9 propagate_from:1 - tmpfs tmpfs rw
34 22 0:43 / /srv rw,relatime unbindable - tmpfs tmpfs rw
35 34 0:44 / /srv rw,relatime shared:30 - tmpfs tmpfs rw
36 22 0:45 / /var/lib/doc rw,relatime - tmpfs tmpfs rw
";

    fn table() -> MountTable {
        MountTable::parse(TABLE)
    }

    fn at<'t>(table: &'t MountTable, path: &str) -> &'t MountEntry {
        table.containing(Path::new(path)).unwrap()
    }

    #[test]
    fn parses_every_field() {
        let table = table();
        assert_eq!(table.entries().len(), 13);
        let root = &table.entries()[0];
        assert_eq!(
            *root,
            MountEntry {
                mount_id: 22,
                parent_id: 1,
                device: (253, 1),
                root: "/".into(),
                mount_point: "/".into(),
                options: "rw,relatime".into(),
                shared_group: Some(1),
                master_group: None,
                propagation: Propagation::Shared,
                fs_type: "ext4".into(),
                source: "/dev/vda1".into(),
                super_options: "rw,errors=remount-ro".into(),
            }
        );
        let docker = &table.entries()[6];
        assert_eq!(docker.root, Path::new("/var/lib/docker"));
        assert_eq!(docker.propagation, Propagation::Private);
        assert_eq!((docker.shared_group, docker.master_group), (None, None));
    }

    #[test]
    fn decodes_octal_escapes() {
        let table = table();
        let spaced = &table.entries()[8];
        assert_eq!(spaced.mount_point, Path::new("/mnt/with space"));
        assert_eq!(spaced.source, "my source");
        assert_eq!(
            table.entries()[9].mount_point,
            Path::new("/mnt/tab\tnew\nline\\back")
        );
        assert_eq!(unescape(br"a\\b\0x\400\7"), br"a\\b\0x\400\7");
        assert_eq!(unescape(br"\101\102"), b"AB");
    }

    #[test]
    fn reads_propagation_from_optional_fields() {
        let table = table();
        assert_eq!(at(&table, "/etc").propagation, Propagation::Shared);
        assert_eq!(
            at(&table, "/var/lib/docker").propagation,
            Propagation::Private
        );
        let slave = at(&table, "/mnt/with space/x");
        assert_eq!(slave.propagation, Propagation::Slave);
        assert_eq!(slave.master_group, Some(9));
        let both = at(&table, "/mnt/tab\tnew\nline\\back");
        assert_eq!(both.propagation, Propagation::Shared);
        assert_eq!((both.shared_group, both.master_group), (Some(20), Some(9)));
        assert_eq!(
            table.entries()[10].propagation,
            Propagation::Private,
            "unbindable"
        );
    }

    #[test]
    fn finds_the_longest_mount_point_by_components() {
        let table = table();
        assert_eq!(at(&table, "/").mount_id, 22);
        assert_eq!(at(&table, "/var/lib/docker").mount_id, 30);
        assert_eq!(at(&table, "/var/lib/docker/").mount_id, 30);
        assert_eq!(at(&table, "/var/lib/docker/containers/abc").mount_id, 30);
        assert_eq!(at(&table, "/var/lib/dockerd").mount_id, 22);
        assert_eq!(at(&table, "/var/lib").mount_id, 22);
        assert_eq!(at(&table, "/var/lib/doc").mount_id, 36);
        assert_eq!(at(&table, "/dev/pts/0").mount_id, 26);
        assert_eq!(at(&table, "/dev/ptsx").mount_id, 25);
        assert_eq!(
            at(
                &table,
                "/var/lib/kubelet/pods/0123/volumes/kubernetes.io~projected/kube-api-access-x/token"
            )
            .mount_id,
            31
        );
        assert!(table.containing(Path::new("relative/path")).is_none());
        assert!(MountTable::default().containing(Path::new("/")).is_none());
    }

    #[test]
    fn the_last_of_stacked_mounts_is_the_visible_one() {
        let table = table();
        let srv = at(&table, "/srv/data");
        assert_eq!(srv.mount_id, 35);
        assert_eq!(srv.propagation, Propagation::Shared);
    }

    #[test]
    fn containerd_lookup_uses_string_prefixes_and_the_first_stacked_mount() {
        let table = table();
        let lookup = |path: &str| table.containerd_lookup(Path::new(path)).unwrap().mount_id;
        assert_eq!(lookup("/srv/data"), 34);
        assert_eq!(lookup("/var/lib/docker"), 30);
        assert_eq!(lookup("/var/lib/dockerd"), 30);
        assert_eq!(lookup("/var/lib/doc"), 36);
        assert_eq!(lookup("/etc"), 22);
    }

    #[test]
    fn optional_fields_may_be_absent_and_source_empty() {
        let table = MountTable::parse("40 22 0:50 / /mnt rw - tmpfs  rw\n\n");
        let entry = &table.entries()[0];
        assert_eq!(entry.propagation, Propagation::Private);
        assert_eq!(entry.source, "");
        assert_eq!(entry.super_options, "rw");
    }

    #[test]
    fn paths_need_not_be_utf8() {
        let table = MountTable::parse_bytes(b"40 22 0:50 / /mnt/\xff rw shared:4 - tmpfs x rw\n");
        let path = PathBuf::from(OsString::from_vec(b"/mnt/\xff/a".to_vec()));
        assert_eq!(table.containing(&path).unwrap().mount_id, 40);
    }

    #[test]
    fn malformed_lines_are_skipped_with_their_line_number() {
        let cases: [(&str, &str); 8] = [
            (
                "22 1 253:1 / / rw shared:1 ext4 /dev/vda1 rw",
                "no \"-\" separator",
            ),
            ("22 1 253:1 / / rw - ext4 /dev/vda1", "not three fields"),
            (
                "22 1 253:1 / / rw - ext4 /dev/vda1 rw extra",
                "not three fields",
            ),
            ("x 1 253:1 / / rw - ext4 /dev/vda1 rw", "mount id"),
            ("22 1 253 / / rw - ext4 /dev/vda1 rw", "major:minor"),
            ("22 1 253:1 / mnt rw - ext4 /dev/vda1 rw", "absolute"),
            (
                "22 1 253:1 / / rw shared: - ext4 /dev/vda1 rw",
                "peer group",
            ),
            ("22 1 253:1 / / - ext4 /dev/vda1 rw", "separator"),
        ];
        for (line, reason) in cases {
            // The bad line sits between good ones: every good line is still there.
            let text = format!("{TABLE}{line}\n40 22 0:50 / /late rw shared:9 - tmpfs t rw\n");
            let table = MountTable::parse(&text);
            assert_eq!(table.entries().len(), 14, "{line}");
            assert_eq!(table.entries()[13].mount_point, Path::new("/late"));
            let [skipped] = table.skipped() else {
                panic!("{line}: {:?}", table.skipped());
            };
            assert_eq!(skipped.line, 14, "{line}");
            let message = skipped.to_string();
            assert!(message.starts_with("mount table line 14: "), "{message}");
            assert!(message.contains(reason), "{message} lacks {reason}");
        }
    }

    /// What every node with a CNI pod has: containerd's network namespace files bind-mounted
    /// under /run/netns, whose root is `net:[inode]`, not a path.
    #[test]
    fn nsfs_lines_are_kept_and_the_rest_of_the_table_is_used() {
        let text = format!(
            "{TABLE}63 27 0:4 net:[4026532184] /run/netns/cni-e1ac7f8a-0c3b-5d31-9b35-6a1f1c7e1d2a rw shared:5 - nsfs nsfs rw\n"
        );
        let table = MountTable::parse(&text);
        assert!(table.skipped().is_empty(), "{:?}", table.skipped());
        assert_eq!(table.entries().len(), 14);
        let netns = at(
            &table,
            "/run/netns/cni-e1ac7f8a-0c3b-5d31-9b35-6a1f1c7e1d2a",
        );
        assert_eq!(netns.root, Path::new("net:[4026532184]"));
        assert_eq!(netns.fs_type, "nsfs");
        assert_eq!(at(&table, "/").propagation, Propagation::Shared);
        assert_eq!(at(&table, "/var/lib/docker").mount_id, 30);
    }

    #[test]
    fn the_watched_table_is_reread_only_after_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mountinfo");
        std::fs::write(&path, TABLE).unwrap();
        let watched = WatchedMountTable::new(&path);
        let mut rereads = 0;
        let first = watched.current(|_| rereads += 1).unwrap();
        assert_eq!(first.entries().len(), 13);
        // A regular file always polls as readable, never PRI/ERR: it counts as unchanged, so the
        // cached table is served even though the file now differs.
        std::fs::write(&path, "40 22 0:50 / / rw - tmpfs t rw\n").unwrap();
        let second = watched.current(|_| rereads += 1).unwrap();
        assert!(std::sync::Arc::ptr_eq(&first, &second));
        assert_eq!(rereads, 1);
    }

    /// A mount made in a namespace after its table was read is seen by the next use, and only
    /// then is the table read again. The namespace is a child's own (`unshare --mount`, which
    /// needs root as the proxy does), so the host's mount table is never touched.
    #[test]
    fn the_watched_table_sees_a_mount_made_after_it_was_read() {
        use std::io::{BufRead, Write};
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().canonicalize().unwrap().join("later");
        std::fs::create_dir(&target).unwrap();
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"echo ready; read go; mount -t tmpfs dockhand-watched "$0" && echo mounted; read done"#)
            .arg(&target)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run unshare");
        let mut to_child = child.stdin.take().unwrap();
        let mut from_child = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        from_child.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n", "unshare --mount failed (not root?)");

        let watched = WatchedMountTable::new(
            &Path::new("/proc")
                .join(child.id().to_string())
                .join("mountinfo"),
        );
        let mut rereads = 0;
        let before = watched.current(|_| rereads += 1).unwrap();
        assert!(before.entries().iter().all(|e| e.mount_point != target));

        writeln!(to_child, "go").unwrap();
        line.clear();
        from_child.read_line(&mut line).unwrap();
        assert_eq!(line, "mounted\n", "the child could not mount a tmpfs");
        let after = watched.current(|_| rereads += 1).unwrap();
        let again = watched.current(|_| rereads += 1).unwrap();
        drop(to_child);
        child.wait().unwrap();
        assert_eq!(
            rereads, 2,
            "read once, then once after the mount, then cached"
        );
        assert!(std::sync::Arc::ptr_eq(&after, &again));
        let mounted = after.containing(&target.join("x")).unwrap();
        assert_eq!(mounted.mount_point, target);
        assert_eq!(mounted.source, "dockhand-watched");
    }

    #[test]
    fn read_reports_the_path() {
        let err = MountTable::read_from(Path::new("/nonexistent/mountinfo")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/mountinfo"), "{err}");
    }

    #[test]
    fn reads_this_process_mount_table() {
        let table = MountTable::read().unwrap();
        assert!(table.skipped().is_empty(), "{:?}", table.skipped());
        assert!(table.containing(Path::new("/")).is_some());
    }
}
