//! File operations that never follow a symlink: every directory below a configured root is
//! opened relative to its parent with `O_NOFOLLOW | O_DIRECTORY`, files with `O_NOFOLLOW`, and
//! links are made with `linkat` (which links a symlink itself, never its target). Writes that
//! must survive a crash go through [`write_atomic`], the one atomic write of dockhand's (temp
//! file created exclusively, fsync, rename, fsync directory): the archive, the shim's records
//! and the shim's `address` file all use it.
//!
//! Why component by component and not `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: the
//! callers walk at most two levels below a directory they already hold open, where `openat`
//! with `O_NOFOLLOW` gives the same guarantee on every kernel; `openat2` needs Linux 5.6, and
//! nodes migrating off Docker still run older enterprise kernels.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};

/// Prefix of every temporary file [`write_atomic`] writes; owners remove leftovers at start-up.
pub const TMP_PREFIX: &str = ".tmp.";

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn io(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// Opens a configured directory; its last component must not be a symlink.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    rfs::openat(rfs::CWD, path, DIR_FLAGS, Mode::empty()).map_err(io)
}

/// Creates a configured directory (and its parents, mode 0700) when missing, then opens it.
pub fn create_dir(path: &Path) -> io::Result<OwnedFd> {
    create_dir_mode(path, 0o700)
}

/// Creates a configured directory (and its parents, `mode`) when missing, then opens it; its
/// last component must not be a symlink.
pub fn create_dir_mode(path: &Path, mode: u32) -> io::Result<OwnedFd> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)?;
    open_dir(path)
}

/// Opens `name` inside `dir` as a directory, refusing symlinks.
pub fn open_subdir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    check_component(name)?;
    rfs::openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(io)
}

/// Opens `name` inside `dir` as a directory, creating it (mode 0700) when missing.
pub fn create_subdir(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    check_component(OsStr::new(name))?;
    match rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => sync_dir(dir)?,
        Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(io(e)),
    }
    open_subdir(dir, OsStr::new(name))
}

/// The status of `name` inside `dir`, without following a symlink.
pub fn stat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<rfs::Stat> {
    check_component(name)?;
    rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io)
}

pub fn is_regular(stat: &rfs::Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile
}

/// Opens the regular file `name` inside `dir` for reading, refusing symlinks and anything else.
pub fn open_file(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    check_component(name)?;
    let fd = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(io)?;
    regular(File::from(fd))
}

/// `file` if it is a regular file (O_NOFOLLOW refuses a symlink; this refuses the rest).
fn regular(file: File) -> io::Result<File> {
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Opens (creating, mode 0600) the regular file `name` inside `dir` for writing.
pub fn open_write(dir: BorrowedFd<'_>, name: &str) -> io::Result<File> {
    check_component(OsStr::new(name))?;
    let fd = rfs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(io)?;
    regular(File::from(fd))
}

/// Writes `data` to `name` inside `dir` (mode 0600) so that a crash leaves either the old or the
/// new content.
pub fn write_atomic(dir: BorrowedFd<'_>, name: &str, data: &[u8]) -> io::Result<()> {
    write_atomic_mode(dir, name, data, 0o600)
}

/// [`write_atomic`] with the new file's mode.
pub fn write_atomic_mode(
    dir: BorrowedFd<'_>,
    name: &str,
    data: &[u8],
    mode: u32,
) -> io::Result<()> {
    write_then_rename(dir, name, data, mode, true)?;
    sync_dir(dir)
}

/// [`write_atomic`] without the fsyncs: a crash of the writing process leaves the old or the new
/// content (the kernel has it), a crash of the machine may leave the old. For a write on a
/// caller's path whose fsync would also flush other files' dirty data (ext4's ordered mode).
pub fn write_replace(dir: BorrowedFd<'_>, name: &str, data: &[u8]) -> io::Result<()> {
    write_then_rename(dir, name, data, 0o600, false)
}

/// Writes `data` to a fresh temporary file next to `name` (fsynced when `sync`), then renames it
/// over `name`; the temporary file is removed on failure.
fn write_then_rename(
    dir: BorrowedFd<'_>,
    name: &str,
    data: &[u8],
    mode: u32,
    sync: bool,
) -> io::Result<()> {
    check_component(OsStr::new(name))?;
    let tmp = temp_name(name);
    // O_EXCL: never through a symlink or over a file someone else made.
    let fd = rfs::openat(
        dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(io)?;
    let mut file = File::from(fd);
    let written = file
        .write_all(data)
        .and_then(|()| if sync { file.sync_all() } else { Ok(()) });
    if let Err(e) = written.and_then(|()| rename(dir, &tmp, name)) {
        let _ = rfs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        return Err(e);
    }
    Ok(())
}

/// A fresh temporary name for `name` in the same directory.
pub fn temp_name(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{TMP_PREFIX}{name}.{}.{n}", std::process::id())
}

pub fn rename(dir: BorrowedFd<'_>, from: &str, to: &str) -> io::Result<()> {
    rfs::renameat(dir, from, dir, to).map_err(io)
}

/// Hard-links `from` (in `from_dir`) as `to` (in `to_dir`); a symlink is linked as itself.
pub fn link(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &str,
) -> io::Result<()> {
    check_component(from)?;
    rfs::linkat(from_dir, from, to_dir, to, AtFlags::empty()).map_err(io)
}

/// Removes the file `name` from `dir`; a missing file is not an error.
pub fn remove_file(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// Removes the empty directory `name` from `dir`; a missing one is not an error.
pub fn remove_dir(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(io(e)),
    }
}

pub fn sync_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    rfs::fsync(dir).map_err(io)
}

/// The names in `dir` (not `.` or `..`).
pub fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<std::ffi::OsString>> {
    let fd = rfs::openat(dir, ".", DIR_FLAGS, Mode::empty()).map_err(io)?;
    let reader = rfs::Dir::read_from(fd.as_fd()).map_err(io)?;
    let mut names = Vec::new();
    for entry in reader {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// The device of an existing directory, or of its nearest existing ancestor.
pub fn device_of(path: &Path) -> io::Result<u64> {
    let mut current = path;
    loop {
        match std::fs::metadata(current) {
            Ok(meta) => return Ok(std::os::unix::fs::MetadataExt::dev(&meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match current.parent() {
                Some(parent) => current = parent,
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

/// Free space on the filesystem holding `dir`, as a percentage of its size.
pub fn free_percent(dir: BorrowedFd<'_>) -> io::Result<f64> {
    let vfs = rfs::fstatvfs(dir).map_err(io)?;
    if vfs.f_blocks == 0 {
        return Ok(100.0);
    }
    Ok(vfs.f_bavail as f64 * 100.0 / vfs.f_blocks as f64)
}

/// Space on the filesystem holding `dir`: (bytes available to unprivileged users, total bytes).
pub fn space(dir: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let vfs = rfs::fstatvfs(dir).map_err(io)?;
    let unit = if vfs.f_frsize > 0 {
        vfs.f_frsize
    } else {
        vfs.f_bsize
    };
    Ok((vfs.f_bavail * unit, vfs.f_blocks * unit))
}

/// A single, normal path component: not empty, `.`, `..`, and without `/` or NUL.
fn check_component(name: &OsStr) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes == b"."
        || bytes == b".."
        || bytes.contains(&b'/')
        || bytes.contains(&0)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single path component"),
        ));
    }
    Ok(())
}
