//! Leaving nothing behind: processes found by their command line, cgroup trees, mounts under a
//! directory, signals. Everything here is best effort and never panics: it runs from `Drop`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Sends `signal` (a name such as `TERM` or `KILL`) to `pid` with `kill(1)`; false if it failed.
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether `pid` still exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z'))
        }
        Err(_) => false,
    }
}

/// Pids of live processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// SIGKILLs every process whose command line mentions `needle` and waits (up to 5 s) for them.
pub fn kill_processes_mentioning(needle: &str) {
    let pids = processes_mentioning(needle);
    for &pid in &pids {
        signal(pid, "KILL");
    }
    wait_gone(&pids, Duration::from_secs(5));
}

/// Waits until none of `pids` is alive; false on timeout.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| alive(p)) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The directories of `relative` (e.g. `dockhand-x1y2`) under every cgroup hierarchy mounted in
/// `/sys/fs/cgroup` (v1 controllers, `systemd`, and the v2 `unified` mount alike).
pub fn cgroup_dirs(relative: &str) -> Vec<PathBuf> {
    let relative = relative.trim_start_matches('/');
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path().join(relative))
        .filter(|p| p.is_dir())
        .collect();
    // A v2-only machine mounts cgroup2 at /sys/fs/cgroup itself.
    let direct = Path::new("/sys/fs/cgroup").join(relative);
    if direct.join("cgroup.procs").exists() && !dirs.contains(&direct) {
        dirs.push(direct);
    }
    dirs
}

/// Kills every process in the cgroup tree `relative` (in all hierarchies), then removes the tree.
pub fn remove_cgroup_tree(relative: &str) {
    for root in cgroup_dirs(relative) {
        let mut tree = Vec::new();
        collect_dirs(&root, &mut tree);
        let mut pids = Vec::new();
        for dir in &tree {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        for &pid in &pids {
            signal(pid, "KILL");
        }
        wait_gone(&pids, Duration::from_secs(5));
        // Deepest first: a cgroup can only be removed once its children are.
        tree.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in tree {
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// Mount points at or under `dir` in this process's mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts
}

/// Lazily unmounts everything at or under `dir` (in this process's mount namespace).
pub fn unmount_under(dir: &Path) {
    for mount in mounts_under(dir) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&mount)
            .stderr(Stdio::null())
            .status();
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(field: &str) -> PathBuf {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    PathBuf::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn this_process_is_alive_and_found_by_name() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
    }
}
