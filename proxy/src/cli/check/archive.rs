//! `dockhand check archive`: is the log archive within its bounds, and did the proxy lose any
//! container log since the last check?
//!
//! - Size: the bytes under `[archive] dir` against `max_bytes` (retention keeps it below after
//!   every job, so above means retention does not work).
//! - Free space on its filesystem (statvfs in the `probe` child, as retention computes it:
//!   available / total) against `min_free_percent`: below it, new logs push out old ones.
//! - Lost logs: `dockhand_archive_lost_logs_total` (every reason) from the proxy's metrics
//!   endpoint, against the count the previous check saw (kept in `[check] state_file`; a lower
//!   count means the proxy restarted and everything counted since then is new). Any increase is
//!   a problem for this run only: NPD's temporary rule turns it into an event. Without
//!   `metrics_address` the count cannot be read, which is noted, not unknown.

use std::path::Path;

use tokio::time::Instant;

use super::probe::{self, Answer};
use super::{Finding, LostLogs, Report, Settings, What};

/// The proxy's counter of lost logs.
const LOST_METRIC: &str = "dockhand_archive_lost_logs_total";

/// The sum of every `dockhand_archive_lost_logs_total` sample in Prometheus or OpenMetrics text.
pub fn lost_logs_total(text: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(LOST_METRIC) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest.rsplit(' ').next()?;
        let value: f64 = value.parse().ok()?;
        *total.get_or_insert(0) += value as u64;
    }
    total
}

/// Bytes of regular files in the archive's container directories; symlinks are not followed.
fn archive_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_file() {
            total += entry.metadata()?.len();
        } else if kind.is_dir() {
            for file in std::fs::read_dir(entry.path())?.flatten() {
                if file.file_type().is_ok_and(|t| t.is_file()) {
                    total += file.metadata().map_or(0, |m| m.len());
                }
            }
        }
    }
    Ok(total)
}

/// `GET /metrics` from the proxy's loopback endpoint, by `deadline`.
async fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut bytes = Vec::new();
    stream.take(16 << 20).read_to_end(&mut bytes).await?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!(
            "answered {}",
            head.lines().next().unwrap_or_default()
        )));
    }
    Ok(body.to_string())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

pub async fn check(settings: &Settings, deadline: Instant, lost: LostLogs<'_>) -> Report {
    let archive = &settings.config.archive;
    if !archive.enabled {
        return Report::new(
            What::Archive,
            Vec::new(),
            "archive disabled",
            serde_json::Value::Null,
        );
    }
    let mut findings = Vec::new();
    let dir = archive.dir.clone();
    let bytes = match tokio::task::spawn_blocking(move || archive_bytes(&dir)).await {
        Ok(Ok(bytes)) => Some(bytes),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
        Ok(Err(e)) => {
            findings.push(Finding::unknown(format!(
                "cannot read {}: {e}",
                archive.dir.display()
            )));
            None
        }
        Err(e) => {
            findings.push(Finding::unknown(format!("archive size: {e}")));
            None
        }
    };
    if let Some(bytes) = bytes.filter(|b| *b > archive.max_bytes) {
        findings.push(Finding::problem(format!(
            "{} over max_bytes {}",
            human(bytes),
            human(archive.max_bytes)
        )));
    }

    let free_percent = if archive.dir.exists() {
        match probe::probe(std::slice::from_ref(&archive.dir), deadline).await {
            Ok(probed) => match probed.answers.into_iter().next().flatten() {
                Some(Answer::Stats { stats, .. }) if stats.blocks > 0 => {
                    Some(stats.blocks_available as f64 * 100.0 / stats.blocks as f64)
                }
                Some(Answer::Stats { .. }) => None,
                Some(Answer::Failed { call, message, .. }) => {
                    findings.push(Finding::unknown(format!(
                        "{call} {}: {message}",
                        archive.dir.display()
                    )));
                    None
                }
                None => {
                    findings.push(Finding::unknown(format!(
                        "statfs of {} did not answer in time",
                        archive.dir.display()
                    )));
                    None
                }
            },
            Err(e) => {
                findings.push(Finding::unknown(e.to_string()));
                None
            }
        }
    } else {
        None
    };
    if let Some(free) = free_percent.filter(|f| *f < f64::from(archive.min_free_percent)) {
        findings.push(Finding::problem(format!(
            "{free:.0}% free on its filesystem, below min_free_percent {}",
            archive.min_free_percent
        )));
    }

    let (now, previous) = match lost {
        LostLogs::Registry(registry, last) => {
            let mut text = String::new();
            let _ = prometheus_client::encoding::text::encode(&mut text, registry);
            let now = lost_logs_total(&text);
            let previous = match now {
                Some(now) => last.replace(now),
                None => *last,
            };
            (now, previous)
        }
        LostLogs::Scrape => match settings.config.metrics_address {
            None => {
                findings.push(Finding::note(
                    "lost logs not counted: the proxy has no metrics_address",
                ));
                (None, None)
            }
            Some(addr) => match scrape(addr).await {
                Ok(text) => {
                    let now = lost_logs_total(&text);
                    let previous = read_state(&settings.config.check.state_file);
                    if let Some(now) = now {
                        if let Err(e) = write_state(&settings.config.check.state_file, now) {
                            findings.push(Finding::unknown(format!(
                                "cannot keep the lost-log count in {}: {e}",
                                settings.config.check.state_file.display()
                            )));
                        }
                    }
                    (now, previous)
                }
                Err(e) => {
                    findings.push(Finding::unknown(format!(
                        "cannot read the proxy's metrics at {addr}: {e}"
                    )));
                    (None, None)
                }
            },
        },
    };
    let new_losses = match (now, previous) {
        (Some(now), Some(previous)) if now >= previous => now - previous,
        // First check, or the proxy restarted (counter reset): everything it counted is new.
        (Some(now), _) => now,
        (None, _) => 0,
    };
    if new_losses > 0 {
        findings.push(Finding::problem(format!(
            "{new_losses} container logs lost since the last check"
        )));
    }
    let ok = match (bytes, free_percent) {
        (Some(bytes), Some(free)) => format!(
            "{} of {}, {free:.0}% free, no logs lost",
            human(bytes),
            human(archive.max_bytes),
        ),
        (Some(_), None) => "empty, no logs lost".into(),
        (None, _) => String::new(),
    };
    let facts = serde_json::json!({
        "dir": archive.dir,
        "bytes": bytes,
        "max_bytes": archive.max_bytes,
        "free_percent": free_percent,
        "min_free_percent": archive.min_free_percent,
        "lost_logs_total": now,
        "lost_since_last_check": new_losses,
    });
    Report::new(What::Archive, findings, ok, facts)
}

fn read_state(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes the count atomically (temp file in the same directory, then rename).
fn write_state(path: &Path, count: u64) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("state file has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let mut temp = tempfile_in(dir)?;
    std::io::Write::write_all(&mut temp.1, format!("{count}\n").as_bytes())?;
    temp.1.sync_all()?;
    std::fs::rename(&temp.0, path)
}

/// A new file `.<name>.<pid>.tmp` next to the state file, refusing to open an existing one
/// (so a planted symlink is never followed).
fn tempfile_in(dir: &Path) -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let path = dir.join(format!(".check-state.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_logs_are_summed_over_reasons() {
        let text = "# HELP dockhand_archive_lost_logs Container logs lost\n\
                    # TYPE dockhand_archive_lost_logs counter\n\
                    dockhand_archive_lost_logs_total{reason=\"io_error\"} 2\n\
                    dockhand_archive_lost_logs_total{reason=\"log_missing\"} 3\n\
                    dockhand_archive_lost_logs_created 1.7e9\n";
        assert_eq!(lost_logs_total(text), Some(5));
        assert_eq!(lost_logs_total("dockhand_archive_bytes 3\n"), None);
    }

    #[test]
    fn state_is_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state");
        assert_eq!(read_state(&path), None);
        write_state(&path, 7).unwrap();
        assert_eq!(read_state(&path), Some(7));
        write_state(&path, 9).unwrap();
        assert_eq!(read_state(&path), Some(9));
    }

    #[test]
    fn sizes_read_like_people() {
        assert_eq!(human(512), "512B");
        assert_eq!(human(1 << 30), "1.0GiB");
    }
}
