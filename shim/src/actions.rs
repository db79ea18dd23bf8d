//! The shim binary's actions, run as short-lived processes by containerd:
//!
//! - `start`: run the delegate's `start` with the same arguments, working directory (the bundle),
//!   stdin (runtime options) and environment; bind this shim's socket next to the delegate's
//!   (or find it already served, for the second container of a pod); launch the daemon on it;
//!   point the bundle's `address` file at it (containerd 1.x reconnects through that file after
//!   a restart); answer with the delegate's reply carrying this shim's address.
//! - `delete`: run the delegate's `delete` with stdout and stderr relayed (stdout is the
//!   protobuf `DeleteResponse` containerd reads), remove the record, exit with its status.
//! - anything else (`-v`, `-info`, future actions): run the delegate with everything relayed.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};

use dockhand_host::record;
use tracing::{info, warn};

use crate::args::Flags;
use crate::config::{Config, ENV_DELEGATE, ENV_RECORD_DIR};
use crate::reply::{self, ReplyError, StartReply};
use crate::DAEMON_ACTION;

/// The delegate's address, given to the daemon.
pub const ENV_DELEGATE_ADDRESS: &str = "DOCKHAND_DELEGATE_ADDRESS";

/// Errors of the `start`, `delete` and pass-through actions.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("run the delegate {path}: {source}")]
    Delegate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotSocket { path: PathBuf },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ActionError {
    let path = path.to_path_buf();
    move |source| ActionError::Io { op, path, source }
}

fn exit_code(status: ExitStatus) -> ExitCode {
    match status.code() {
        Some(code) => ExitCode::from(code as u8),
        None => ExitCode::FAILURE,
    }
}

fn delegate(config: &Config, args: &[OsString]) -> Command {
    let mut cmd = Command::new(&config.delegate);
    cmd.args(args);
    cmd
}

fn run_err(config: &Config) -> impl FnOnce(std::io::Error) -> ActionError + '_ {
    move |source| ActionError::Delegate {
        path: config.delegate.clone(),
        source,
    }
}

/// The `start` action. Writes the reply to stdout.
pub fn start(flags: &Flags, args: &[OsString], config: &Config) -> Result<ExitCode, ActionError> {
    let out = delegate(config, args)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(run_err(config))?;
    let mut stdout = std::io::stdout();
    if !out.status.success() {
        let _ = stdout.write_all(&out.stdout);
        return Ok(exit_code(out.status));
    }
    let reply = StartReply::parse(&out.stdout)?;
    let own = reply::own_address(&reply.address)?;
    let own_path = PathBuf::from(own.trim_start_matches("unix://"));
    match bind(&own_path)? {
        Some(listener) => spawn_daemon(flags, config, &reply.address, listener)?,
        None => info!(address = %own, "shim already serving this delegate"),
    }
    write_address_file(Path::new("address"), &own)?;
    // The `delete` action, run by containerd after this shim died, needs the delegate's address,
    // which the `address` file no longer names.
    write_address_file(Path::new(DELEGATE_ADDRESS_FILE), &reply.address)?;
    stdout
        .write_all(&reply.with_address(&own))
        .and_then(|()| stdout.flush())
        .map_err(io_err("write", Path::new("stdout")))?;
    Ok(ExitCode::SUCCESS)
}

/// Binds `path`; `None` when a live shim already serves it. A stale socket is replaced.
fn bind(path: &Path) -> Result<Option<UnixListener>, ActionError> {
    match UnixListener::bind(path) {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            let meta = std::fs::symlink_metadata(path).map_err(io_err("stat", path))?;
            if !meta.file_type().is_socket() {
                return Err(ActionError::NotSocket {
                    path: path.to_path_buf(),
                });
            }
            warn!(path = %path.display(), "replacing stale socket");
            std::fs::remove_file(path).map_err(io_err("remove", path))?;
            UnixListener::bind(path)
                .map(Some)
                .map_err(io_err("bind", path))
        }
        Err(e) => Err(io_err("bind", path)(e)),
    }
}

/// Launches the daemon with the bound listener as its stdin (no fd juggling, no `unsafe`), in
/// its own process group like the runc shim, and does not wait for it: it outlives this process.
#[allow(clippy::zombie_processes)] // never waited on purpose: the daemon is orphaned like the delegate's
fn spawn_daemon(
    flags: &Flags,
    config: &Config,
    delegate_address: &str,
    listener: UnixListener,
) -> Result<(), ActionError> {
    let exe = std::env::current_exe().map_err(io_err("locate", Path::new("/proc/self/exe")))?;
    let mut cmd = Command::new(&exe);
    cmd.args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args(["-address", &flags.address])
        .args(["-publish-binary", &flags.publish_binary]);
    if flags.debug {
        cmd.arg("-debug");
    }
    cmd.arg(DAEMON_ACTION)
        .env(ENV_DELEGATE_ADDRESS, delegate_address)
        .env(ENV_RECORD_DIR, &config.record_dir)
        .env(ENV_DELEGATE, &config.delegate)
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let child = cmd.spawn().map_err(io_err("spawn", &exe))?;
    info!(pid = child.id(), delegate = %delegate_address, "daemon launched");
    Ok(())
}

/// Atomically writes the bundle's `address` file (the current directory, which containerd made
/// the bundle), with the one atomic write of `dockhand-host`.
fn write_address_file(path: &Path, address: &str) -> Result<(), ActionError> {
    let dir =
        dockhand_host::fs::open_dir(Path::new(".")).map_err(io_err("open", Path::new(".")))?;
    let name = path.to_str().unwrap_or("address");
    dockhand_host::fs::write_atomic_mode(
        std::os::fd::AsFd::as_fd(&dir),
        name,
        address.as_bytes(),
        0o644,
    )
    .map_err(io_err("write", path))
}

/// The `delete` action (containerd's cleanup of a task whose shim is gone): the delegate's answer
/// relayed, then what this shim leaves behind removed, so that no more is left than after the
/// stock shim's death:
/// - the record of `id`, and of every container of the pod when `id` is its sandbox (containerd
///   2.x runs `delete` once, with the sandbox's id, for a pod's shim);
/// - the delegate itself, when this shim's daemon is gone but the delegate still serves: it would
///   serve a socket nobody knows for ever (the stock shim, SIGKILLed, leaves no process). It is
///   SIGKILLed, as the stock shim was, and its socket and this shim's are removed.
pub fn delete(flags: &Flags, args: &[OsString], config: &Config) -> Result<ExitCode, ActionError> {
    let status = delegate(config, args).status().map_err(run_err(config))?;
    if status.success() && dockhand_host::id::is_container_id(&flags.id) {
        remove_records(&config.record_dir, &flags.id);
    }
    stop_orphaned_delegate(flags, config);
    Ok(exit_code(status))
}

/// Written next to `address` in the bundle by `start`: the delegate's own address.
pub const DELEGATE_ADDRESS_FILE: &str = "dockhand-delegate-address";

fn remove_records(dir: &Path, id: &str) {
    let records = record::list(dir).into_iter().flatten().flatten();
    let pod_members = records.filter_map(|r| {
        (r.sandbox_id.as_deref() == Some(id) && r.container_id != id).then_some(r.container_id)
    });
    for container in std::iter::once(id.to_string()).chain(pod_members.collect::<Vec<_>>()) {
        match record::remove(dir, &container) {
            Ok(()) => info!(container = %container, "record removed by delete action"),
            Err(e) => warn!(container = %container, error = %e, "cannot remove record"),
        }
    }
}

/// Kills the delegate named in the bundle when this shim's socket (the bundle's `address`) has
/// no daemon behind it, then removes both sockets. Anything unexpected leaves things as they are.
fn stop_orphaned_delegate(flags: &Flags, config: &Config) {
    let read = |name: &str| {
        std::fs::read_to_string(name)
            .ok()
            .and_then(|a| crate::daemon::socket_path(a.trim()))
    };
    let (Some(own), Some(delegate)) = (read("address"), read(DELEGATE_ADDRESS_FILE)) else {
        return;
    };
    if own == delegate || UnixStream::connect(&own).is_ok() {
        // This shim still serves (or the bundle is not ours): the delegate is not orphaned.
        return;
    }
    if UnixStream::connect(&delegate).is_ok() {
        match find_delegate(flags, config) {
            Some(pid) => match rustix::process::kill_process(pid, rustix::process::Signal::KILL) {
                Ok(()) => info!(pid = pid.as_raw_nonzero().get(), "orphaned delegate killed"),
                Err(e) => warn!(error = %e, "cannot kill the orphaned delegate"),
            },
            // Not this pod's delegate (containerd 1.x runs `delete` for each container too).
            None => return,
        }
    }
    crate::daemon::cleanup(&own, &delegate);
}

/// The delegate daemon serving this pod: the delegate binary run with this `-namespace` and
/// `-id` and no action (the daemon's command line, as its `start` launched it). Its socket cannot
/// tell: SO_PEERCRED names the process that listened, the delegate's `start`, long gone.
fn find_delegate(flags: &Flags, config: &Config) -> Option<rustix::process::Pid> {
    let delegate = std::fs::canonicalize(&config.delegate).ok()?;
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            if pid == me || std::fs::read_link(entry.path().join("exe")).ok()? != delegate {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .collect();
            let flag = |name: &[u8]| args.windows(2).find(|w| w[0] == name).map(|w| w[1]);
            let daemon = flag(b"-id") == Some(flags.id.as_bytes())
                && flag(b"-namespace") == Some(flags.namespace.as_bytes())
                && !args.iter().any(|a| *a == b"start" || *a == b"delete");
            daemon
                .then(|| i32::try_from(pid).ok())
                .flatten()
                .and_then(rustix::process::Pid::from_raw)
        })
}

/// Any other action: the delegate with stdin, stdout, stderr and exit status relayed.
pub fn pass_through(args: &[OsString], config: &Config) -> Result<ExitCode, ActionError> {
    let status = delegate(config, args).status().map_err(run_err(config))?;
    Ok(exit_code(status))
}
