//! The shim logs with `tracing` to the `log` fifo containerd opens in the bundle directory (the
//! working directory of every shim action) and copies into its own log, as the runc shim does.
//! When there is no such fifo (run by hand, tests) nothing is logged: stdout and stderr are
//! protocol channels for the `start` and `delete` actions.
//!
//! The subscriber is a small one of our own rather than `tracing-subscriber`'s: one shim runs per
//! pod, and the registry of `tracing-subscriber` alone costs more resident memory (a 32 KiB slab
//! index, plus its code) than everything else the shim keeps on its heap. Lines are logfmt, like
//! the runc shim's logrus output: `time=<unix seconds> level=info msg="..." key=value`. Events
//! carry their own fields; spans are not tracked.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

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
    let max = if debug { Level::DEBUG } else { Level::INFO };
    let _ = tracing::subscriber::set_global_default(LineLog::new(file, max));
}

/// Writes one logfmt line per event to a file.
pub struct LineLog<W> {
    out: Mutex<W>,
    max: Level,
}

impl<W: std::io::Write> LineLog<W> {
    pub fn new(out: W, max: Level) -> LineLog<W> {
        LineLog {
            out: Mutex::new(out),
            max,
        }
    }

    /// The writer (for tests).
    pub fn into_inner(self) -> W {
        self.out.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            push_field(&mut self.fields, field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            push_field(&mut self.fields, field.name(), &format!("{value:?}"));
        }
    }
}

fn push_field(out: &mut String, name: &str, value: &str) {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_whitespace() && c != '"' && c != '=' && !c.is_control());
    if bare {
        let _ = write!(out, " {name}={value}");
    } else {
        let _ = write!(out, " {name}={value:?}");
    }
}

impl<W: std::io::Write + Send + 'static> Subscriber for LineLog<W> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line::default();
        event.record(&mut line);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        let text = format!(
            "time={}.{:03} level={level} msg={:?}{}\n",
            now.as_secs(),
            now.subsec_millis(),
            line.message,
            line.fields
        );
        if let Ok(mut out) = self.out.lock() {
            // A full fifo drops the line rather than blocking a container operation.
            let _ = out.write_all(text.as_bytes());
        }
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_logfmt_and_filtered_by_level() {
        let log = LineLog::new(Vec::new(), Level::INFO);
        let log = std::sync::Arc::new(log);
        tracing::subscriber::with_default(log.clone(), || {
            tracing::info!(container = "abc", path = %"/a b", pid = 7, "record written");
            tracing::debug!("hidden");
            tracing::warn!(error = %"x=y", "cannot record");
        });
        let log = std::sync::Arc::try_unwrap(log).ok().unwrap();
        let text = String::from_utf8(log.into_inner()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first = lines[0].split_once(' ').unwrap().1;
        assert_eq!(
            first,
            r#"level=info msg="record written" container=abc path="/a b" pid=7"#
        );
        assert!(lines[1].ends_with(r#"level=warn msg="cannot record" error="x=y""#));
        assert!(lines[0].starts_with("time="));
    }
}
