//! `statfs` of host paths in a child process, so a dead NFS or FUSE mount can never hang a check.
//!
//! Any system call on a path under a mount whose server stopped answering (NFS `hard`, a FUSE
//! daemon that is stuck) blocks until the server answers, which may be never. The check therefore
//! never touches a volume path itself: it runs `dockhand statfs-probe PATH...` (the same binary,
//! through `/proc/self/exe`, so an upgrade on disk does not matter) with stdin and stderr on
//! `/dev/null` and stdout on a pipe. The child resolves and `statvfs`es each path on a thread of
//! its own and prints one JSON line per path as soon as it has it. At the deadline the parent
//! SIGKILLs the child (a task waiting on NFS or FUSE is killable) and reaps it; a path without an
//! answer by then is reported as having timed out. The child also exits by itself at the
//! deadline it is given, so it cannot outlive a parent that died.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant;

/// What the child found for one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// The path with symlinks resolved (as containerd resolves a bind source) and its filesystem.
    Stats { resolved: PathBuf, stats: Stats },
    /// A system call failed.
    Failed {
        /// `realpath` or `statvfs`.
        call: String,
        errno: i32,
        message: String,
    },
}

/// The parts of `statvfs(3)` a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub fragment_bytes: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub read_only: bool,
}

impl Stats {
    /// Used space in percent as `df` computes it: used / (used + available to unprivileged
    /// users), rounded up. `None` for filesystems without blocks (proc, sysfs).
    pub fn used_percent(&self) -> Option<u64> {
        let used = self.blocks.saturating_sub(self.blocks_free);
        let total = used + self.blocks_available;
        (total > 0 && self.blocks > 0).then(|| (used * 100).div_ceil(total))
    }
}

#[derive(Serialize, Deserialize)]
struct Line {
    index: usize,
    answer: Answer,
}

/// Arguments of the hidden `dockhand statfs-probe` command (the child).
#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Milliseconds after which the child exits whatever it still waits for.
    #[arg(long)]
    deadline_ms: u64,
    /// Paths to resolve and statvfs.
    paths: Vec<OsString>,
}

/// The child: one thread per path, one line per answer, exit at the deadline.
pub fn child(args: ProbeArgs) -> std::process::ExitCode {
    let deadline = std::time::Instant::now() + Duration::from_millis(args.deadline_ms);
    let (tx, rx) = std::sync::mpsc::channel();
    let count = args.paths.len();
    for (index, path) in args.paths.into_iter().enumerate() {
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let _ = tx.send(Line {
                    index,
                    answer: answer(Path::new(&path)),
                });
            });
        if spawned.is_err() {
            // Out of threads: that path gets no answer and is reported as timed out.
            continue;
        }
    }
    drop(tx);
    let mut out = std::io::stdout().lock();
    for _ in 0..count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        let Ok(text) = serde_json::to_string(&line) else {
            continue;
        };
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    // Threads still blocked in the kernel are killed with the process.
    std::process::ExitCode::SUCCESS
}

fn answer(path: &Path) -> Answer {
    let failed = |call: &str, e: std::io::Error| Answer::Failed {
        call: call.into(),
        errno: e.raw_os_error().unwrap_or(0),
        message: e.to_string(),
    };
    let resolved = match std::fs::canonicalize(path) {
        Ok(resolved) => resolved,
        Err(e) => return failed("realpath", e),
    };
    match rustix::fs::statvfs(&resolved) {
        Ok(s) => Answer::Stats {
            resolved,
            stats: Stats {
                fragment_bytes: s.f_frsize,
                blocks: s.f_blocks,
                blocks_free: s.f_bfree,
                blocks_available: s.f_bavail,
                read_only: s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY),
            },
        },
        Err(e) => failed("statvfs", e.into()),
    }
}

/// What the parent got back: one entry per path, `None` where the child gave no answer before
/// the deadline.
#[derive(Debug)]
pub struct Probed {
    pub answers: Vec<Option<Answer>>,
    /// Whether the child had to be killed (some path never answered).
    pub killed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot start the statfs child {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// The binary the child runs: this one.
const SELF_EXE: &str = "/proc/self/exe";
/// Time kept after the child's deadline to kill and reap it.
const REAP_MARGIN: Duration = Duration::from_millis(200);

/// Resolves and statvfs'es `paths` in a child that is killed and reaped by `deadline`.
pub async fn probe(paths: &[PathBuf], deadline: Instant) -> Result<Probed, ProbeError> {
    let mut answers = vec![None; paths.len()];
    if paths.is_empty() {
        return Ok(Probed {
            answers,
            killed: false,
        });
    }
    let answer_by = deadline
        .checked_sub(REAP_MARGIN)
        .unwrap_or(deadline)
        .max(Instant::now());
    let child_ms = answer_by
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    let mut child = tokio::process::Command::new(SELF_EXE)
        .arg("statfs-probe")
        .arg("--deadline-ms")
        .arg(child_ms.to_string())
        .arg("--")
        .args(paths)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProbeError::Spawn {
            program: SELF_EXE.into(),
            source,
        })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut left = paths.len();
    while left > 0 {
        match tokio::time::timeout_at(answer_by, lines.next_line()).await {
            Ok(Ok(Some(text))) => {
                let Ok(line) = serde_json::from_str::<Line>(&text) else {
                    continue;
                };
                if let Some(slot) = answers.get_mut(line.index) {
                    if slot.replace(line.answer).is_none() {
                        left -= 1;
                    }
                }
            }
            // EOF, a read error or the deadline: what is missing timed out.
            _ => break,
        }
    }
    let killed = left > 0;
    if killed {
        let _ = child.start_kill();
    }
    // Reap it: a killed task waiting on NFS or FUSE exits at once.
    let reap_by = deadline.max(Instant::now() + Duration::from_millis(50));
    if tokio::time::timeout_at(reap_by, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            pid = child.id(),
            "statfs child not reaped by the deadline; tokio reaps it later"
        );
    }
    Ok(Probed { answers, killed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_percent_is_dfs() {
        let stats = Stats {
            fragment_bytes: 4096,
            blocks: 100,
            blocks_free: 10,
            blocks_available: 5,
            read_only: false,
        };
        // 90 used of 95 reachable: 94.7 → 95, as df prints it.
        assert_eq!(stats.used_percent(), Some(95));
        let empty = Stats { blocks: 0, ..stats };
        assert_eq!(empty.used_percent(), None);
    }

    #[test]
    fn answers_round_trip() {
        let line = Line {
            index: 3,
            answer: Answer::Failed {
                call: "statvfs".into(),
                errno: 107,
                message: "Transport endpoint is not connected".into(),
            },
        };
        let text = serde_json::to_string(&line).unwrap();
        let back: Line = serde_json::from_str(&text).unwrap();
        assert_eq!(back.index, 3);
        assert_eq!(back.answer, line.answer);
    }
}
