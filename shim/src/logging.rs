//! The shim logs with `tracing` to the `log` fifo containerd opens in the bundle directory (the
//! working directory of every shim action) and copies into its own log, as the runc shim does.
//! When there is no such fifo (run by hand, tests) nothing is logged: stdout and stderr are
//! protocol channels for the `start` and `delete` actions.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

/// Installs the subscriber. `debug` is containerd's `-debug` flag.
pub fn init(debug: bool) {
    let path = Path::new("log");
    let is_fifo = std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    if !is_fifo {
        return;
    }
    // Non-blocking: opening a fifo for writing blocks until a reader exists, and a log line
    // must never stall a container operation.
    let Ok(file) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    else {
        return;
    };
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_max_level(level)
        .with_target(false)
        .try_init();
}
