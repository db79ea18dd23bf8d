use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dockhand_protos::cri::ContainerState;

use super::restore;
use super::retention::{next_drop, Candidate, Policy, Reason};
use super::staging::{generation_file, parse_generation_file};
use super::staging::{locate, Linked, Staging, StagingError};
use super::store::{Appended, ContainerMeta, Store};
use crate::cli::{cri_log, logs as logs_cmd};
use crate::config::Config;
use dockhand_host::ContainerId;

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn id() -> ContainerId {
    ContainerId::parse(ID).unwrap()
}

fn meta(id: &ContainerId) -> ContainerMeta {
    let mut meta = ContainerMeta::unknown(id.clone());
    meta.namespace = "batch".into();
    meta.pod = "hello-job".into();
    meta.container = "hello".into();
    meta.image = "busybox:latest".into();
    meta
}

/// A pod log tree like kubelet's: `<root>/pods/<ns>_<pod>_<uid>/<container>/0.log`.
struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pods: PathBuf,
    log_directory: PathBuf,
    log_path: PathBuf,
    staging: Staging,
}

fn tree() -> Tree {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pods = root.join("pods");
    let log_directory = pods.join("batch_hello-job_uid1");
    std::fs::create_dir_all(log_directory.join("hello")).unwrap();
    let log_path = log_directory.join("hello/0.log");
    std::fs::write(&log_path, "2024-01-01T00:00:00.000000001Z stdout F first\n").unwrap();
    let staging = Staging::new(&root.join("staging"), &pods);
    Tree {
        _dir: dir,
        root,
        pods,
        log_directory,
        log_path,
        staging,
    }
}

impl Tree {
    fn location(&self) -> super::staging::LogLocation {
        locate(
            &id(),
            &self.pods,
            self.log_directory.to_str().unwrap(),
            self.log_path.to_str().unwrap(),
        )
        .unwrap()
    }

    /// Every file under the tree, relative, sorted.
    fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.sort();
        out
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            walk(root, &path, out);
        } else {
            out.push(path.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

// ---- names ----------------------------------------------------------------------------------

/// The archive names directories by container id only, with the one rule of `dockhand-host`:
/// 64 lowercase hex digits (what containerd gives every container), so a hostile id never
/// becomes a path.
#[test]
fn container_ids_are_single_safe_components() {
    assert!(ContainerId::parse(ID).is_ok());
    for bad in [
        "",
        ".",
        "..",
        "../etc",
        "a/b",
        ".hidden",
        "-rf",
        "a*",
        "a?",
        "a[1]",
        "a b",
        "a\0b",
        "abc_1.2-3",
    ] {
        assert!(ContainerId::parse(bad).is_err(), "{bad:?} accepted");
    }
    assert!(ContainerId::parse(&"a".repeat(64)).is_ok());
    assert!(ContainerId::parse(&"a".repeat(128)).is_err());
    let error = ContainerId::parse("a/b").unwrap_err().to_string();
    assert!(error.contains("a/b") && error.contains('/'), "{error}");
}

#[test]
fn generation_names_round_trip() {
    assert_eq!(generation_file(7), "000007.log");
    assert_eq!(parse_generation_file("000007.log"), Some(7));
    assert_eq!(parse_generation_file("7.log"), None);
    assert_eq!(parse_generation_file("000007.log.tmp"), None);
}

// ---- staging --------------------------------------------------------------------------------

#[test]
fn log_paths_must_stay_inside_the_sandbox_log_directory() {
    let root = Path::new("/var/log/pods");
    let dir = "/var/log/pods/ns_pod_uid";
    assert!(locate(&id(), root, dir, "/var/log/pods/ns_pod_uid/c/0.log").is_ok());
    for bad in [
        "/var/log/pods/ns_pod_uid/../other_pod/c/0.log",
        "/var/log/pods/other_pod_uid/c/0.log",
        "/etc/shadow",
        "/var/log/pods/ns_pod_uid",
        "relative/c/0.log",
    ] {
        assert!(
            matches!(
                locate(&id(), root, dir, bad),
                Err(StagingError::OutsideLogDirectory { .. })
            ),
            "{bad} accepted"
        );
    }
    assert!(matches!(
        locate(&id(), root, "/tmp/x", "/tmp/x/c/0.log"),
        Err(StagingError::OutsidePodLogs { .. })
    ));
}

#[test]
fn staging_hard_links_the_live_file() {
    let t = tree();
    t.staging.check_links().unwrap();
    assert_eq!(
        t.staging.link(&id(), &t.location(), 1).unwrap(),
        Linked::New(1)
    );
    let staged = t.root.join("staging").join(ID).join("000001.log");
    assert_eq!(
        std::fs::metadata(&staged).unwrap().ino(),
        std::fs::metadata(&t.log_path).unwrap().ino()
    );
    // Same file again: nothing new.
    assert_eq!(
        t.staging.link(&id(), &t.location(), 1).unwrap(),
        Linked::Already(1)
    );
    // kubelet deletes its file: the staged link still has the data.
    std::fs::remove_file(&t.log_path).unwrap();
    assert!(std::fs::read_to_string(&staged).unwrap().contains("first"));
}

#[test]
fn rotation_links_the_new_file_as_the_next_generation() {
    let t = tree();
    t.staging.link(&id(), &t.location(), 1).unwrap();
    // kubelet: rename 0.log aside, gzip it later (new file, old unlinked); containerd reopens.
    std::fs::rename(
        &t.log_path,
        t.log_path.with_extension("log.20240101-000000"),
    )
    .unwrap();
    std::fs::write(
        &t.log_path,
        "2024-01-01T00:00:01.000000001Z stdout F second\n",
    )
    .unwrap();
    std::fs::remove_file(t.log_path.with_extension("log.20240101-000000")).unwrap();
    assert_eq!(
        t.staging.link(&id(), &t.location(), 0).unwrap(),
        Linked::New(2)
    );
    assert_eq!(t.staging.generations(&id()).unwrap(), vec![1, 2]);
    let mut first = String::new();
    std::io::Read::read_to_string(
        &mut t.staging.open_generation(&id(), 1).unwrap(),
        &mut first,
    )
    .unwrap();
    assert!(first.contains("first") && !first.contains("second"));
}

#[test]
fn symlinks_in_the_log_tree_are_refused_and_nothing_is_written() {
    let t = tree();
    let secret = t.root.join("secret");
    std::fs::write(&secret, "root's secret\n").unwrap();
    // The log file itself is a symlink.
    std::fs::remove_file(&t.log_path).unwrap();
    std::os::unix::fs::symlink(&secret, &t.log_path).unwrap();
    let before = t.files();
    let error = t.staging.link(&id(), &t.location(), 1).unwrap_err();
    assert!(matches!(error, StagingError::Unsafe { .. }), "{error}");
    assert_eq!(error.reason(), "unsafe_path");
    assert!(t.staging.generations(&id()).unwrap().is_empty());
    assert!(!t
        .files()
        .iter()
        .any(|f| f.starts_with("staging") && f.ends_with(".log")));
    assert_eq!(before, t.files());

    // A directory on the way is a symlink.
    let t = tree();
    let elsewhere = t.root.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("0.log"), "not a pod log\n").unwrap();
    std::fs::remove_dir_all(t.log_directory.join("hello")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, t.log_directory.join("hello")).unwrap();
    let error = t.staging.link(&id(), &t.location(), 1).unwrap_err();
    assert!(matches!(error, StagingError::Unsafe { .. }), "{error}");
    assert!(t.staging.generations(&id()).unwrap().is_empty());
}

#[test]
fn staging_that_cannot_link_pod_logs_is_reported_clearly() {
    // /proc is never writable like the filesystem of a temp dir.
    let t = tree();
    let staging = Staging::new(Path::new("/proc/dockhand-staging"), &t.pods);
    let error = staging.check_links().unwrap_err().to_string();
    assert!(error.contains("/proc/dockhand-staging"), "{error}");
    // The probe leaves nothing behind in the pod log root.
    let t = tree();
    let before = t.files();
    t.staging.check_links().unwrap();
    assert_eq!(t.files(), before);
}

#[test]
fn a_write_beyond_its_budget_is_undone_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path(), 3);
    let meta = meta(&id());
    // Incompressible input, more than the budget allows.
    let mut noise = Vec::new();
    let mut x: u64 = 1;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push(x as u8);
    }
    let error = store
        .append_generation_within(&meta, 1, &mut noise.as_slice(), 50_000)
        .unwrap_err();
    assert!(error.is_no_space(), "{error}");
    // A first generation that fails leaves no entry at all.
    assert!(!dir.path().join(ID).exists());
    store
        .append_generation(&meta, 1, &mut "a F line\n".as_bytes())
        .unwrap();
    let committed = std::fs::metadata(dir.path().join(ID).join("log.zst"))
        .unwrap()
        .len();
    let error = store
        .append_generation_within(&meta, 2, &mut noise.as_slice(), 50_000)
        .unwrap_err();
    assert!(error.is_no_space(), "{error}");
    // A later one is cut back to the committed length, not left for the next start.
    assert_eq!(
        std::fs::metadata(dir.path().join(ID).join("log.zst"))
            .unwrap()
            .len(),
        committed
    );
    let mut out = Vec::new();
    store.read_log(&id(), &mut out).unwrap();
    assert_eq!(out, b"a F line\n");
}

// ---- store ----------------------------------------------------------------------------------

#[test]
fn generations_are_appended_in_order_and_never_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path(), 3);
    let meta = meta(&id());
    let one = "2024-01-01T00:00:00.000000001Z stdout F one\n".repeat(100);
    let two = "2024-01-01T00:00:01.000000001Z stdout F two\n".repeat(100);
    let added = store
        .append_generation(&meta, 1, &mut one.as_bytes())
        .unwrap();
    assert!(matches!(added, Appended::Added { raw, .. } if raw == one.len() as u64));
    store
        .append_generation(&meta, 2, &mut two.as_bytes())
        .unwrap();
    // A replay after a crash (generation 2 still staged) adds nothing.
    let replay = store
        .append_generation(&meta, 2, &mut two.as_bytes())
        .unwrap();
    assert!(matches!(replay, Appended::AlreadyThere(_)));
    let mut out = Vec::new();
    store.read_log(&id(), &mut out).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), format!("{one}{two}"));
    let entry = store.entry(&id()).unwrap().unwrap();
    assert_eq!(entry.generations, vec![1, 2]);
    assert!(entry.log_bytes < entry.raw_bytes / 5, "{entry:?}");
}

#[test]
fn a_frame_half_written_by_a_crash_is_cut_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path(), 3);
    let meta = meta(&id());
    store
        .append_generation(&meta, 1, &mut "a F line\n".as_bytes())
        .unwrap();
    // The crash: bytes of a frame whose meta.json never got written, and a temp file.
    let log = dir.path().join(ID).join("log.zst");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3])
        .unwrap();
    std::fs::write(dir.path().join(ID).join(".tmp.meta.json.1.1"), "{").unwrap();
    // An entry created but never committed.
    let uncommitted = "feedface".repeat(8);
    std::fs::create_dir_all(dir.path().join(&uncommitted)).unwrap();
    let entries = store.recover().unwrap();
    assert_eq!(entries.len(), 1);
    assert!(!dir.path().join(&uncommitted).exists());
    assert!(!dir.path().join(ID).join(".tmp.meta.json.1.1").exists());
    store
        .append_generation(&meta, 2, &mut "b F line\n".as_bytes())
        .unwrap();
    let mut out = Vec::new();
    store.read_log(&id(), &mut out).unwrap();
    assert_eq!(out, b"a F line\nb F line\n");
}

#[test]
fn complete_keeps_earlier_metadata_and_remove_drops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path(), 3);
    store
        .append_generation(&meta(&id()), 1, &mut "x\n".as_bytes())
        .unwrap();
    let mut end = ContainerMeta::unknown(id());
    end.exit_code = Some(3);
    end.reason = "Error".into();
    let entry = store.complete(&end).unwrap();
    assert!(entry.complete);
    assert_eq!(entry.container.pod, "hello-job");
    assert_eq!(entry.container.exit_code, Some(3));
    store.remove(&id()).unwrap();
    assert!(store.entry(&id()).unwrap().is_none());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// ---- restore --------------------------------------------------------------------------------

fn restored(root: &Path, max_bytes: u64, lease: Duration) -> restore::Restored {
    restore::Restored::new(root, max_bytes, lease, Default::default())
}

fn numbered(n: usize) -> ContainerId {
    ContainerId::parse(&format!("{n:064x}")).unwrap()
}

/// A store with `count` archived containers of `lines` log lines each.
fn store_of(dir: &Path, count: usize, lines: usize) -> (Store, HashSet<ContainerId>, String) {
    let store = Store::new(&dir.join("archive"), 3);
    let text: String = (0..lines)
        .map(|i| format!("2024-01-01T00:00:00.000000001Z stdout F line {i} of the job\n"))
        .collect();
    let mut ids = HashSet::new();
    for n in 0..count {
        let id = numbered(n);
        store
            .append_generation(&meta(&id), 1, &mut text.as_bytes())
            .unwrap();
        ids.insert(id);
    }
    (store, ids, text)
}

#[test]
fn restored_copy_is_alone_in_its_directory_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, archived, text) = store_of(dir.path(), 1, 1);
    let root = dir.path().join("restored");
    let copies = restored(&root, 1 << 20, Duration::from_secs(60));
    let path = copies.serve(&store, &numbered(0), &archived).unwrap();
    assert_eq!(path, root.join(numbered(0).as_str()).join("restored.log"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    // kubelet's repeated removal: everything matching `<log_path>*` goes.
    let siblings: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(siblings, vec![std::ffi::OsString::from("restored.log")]);
    std::fs::remove_file(&path).unwrap();
    let again = copies.serve(&store, &numbered(0), &archived).unwrap();
    assert_eq!(std::fs::read_to_string(again).unwrap(), text);
    assert!(store.entry(&numbered(0)).unwrap().is_some());
}

/// Issue 24.1: parallel first reads of different containers, each request's cleanup running
/// beside the others' writes: every caller gets a whole copy at the path it was given.
#[test]
fn parallel_first_reads_each_get_their_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (store, archived, text) = store_of(dir.path(), 8, 4000);
    let root = dir.path().join("restored");
    let copies = restored(&root, 256 << 20, Duration::from_secs(60));
    for round in 0..20 {
        let _ = std::fs::remove_dir_all(&root);
        let gate = std::sync::Barrier::new(8);
        std::thread::scope(|scope| {
            for id in &archived {
                let (copies, store, archived, gate, text) =
                    (&copies, &store, &archived, &gate, &text);
                scope.spawn(move || {
                    gate.wait();
                    let path = copies.serve(store, id, archived).unwrap_or_else(|e| {
                        panic!("round {round}: {id}: {e}");
                    });
                    assert_eq!(
                        &std::fs::read_to_string(&path).unwrap(),
                        text,
                        "round {round}"
                    );
                });
            }
        });
    }
}

/// Issue 23: the worker's cleanup (after every archived container) runs while requests write
/// new copies; it never takes a copy being written for a leftover.
#[test]
fn the_cleanup_never_removes_a_copy_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let (store, archived, text) = store_of(dir.path(), 4, 4000);
    let root = dir.path().join("restored");
    // Leases short enough that every round's copies have been cleaned up and are written anew,
    // long enough for the reader to open the path under a loaded machine.
    let lease = Duration::from_millis(200);
    let copies = restored(&root, 256 << 20, lease);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // The worker's view: nothing spared but what is in use.
                copies.bound(&HashSet::new());
                // Runs again at once, but not in a spin: std's mutex is not fair, and a thread
                // that relocks it in a loop can starve the servers for minutes (seen once).
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        for round in 0..20 {
            for id in &archived {
                let path = copies.serve(&store, id, &archived).unwrap_or_else(|e| {
                    panic!("round {round}: {id}: {e}");
                });
                assert_eq!(
                    std::fs::read_to_string(&path).unwrap(),
                    text,
                    "round {round}"
                );
            }
            std::thread::sleep(lease + Duration::from_millis(50));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

/// Issue 24.2: a path handed out stays readable while its lease holds, over the bound and
/// through a cleanup that spares nothing; the bound holds again once the leases end, and the
/// gauges say so.
#[test]
fn a_leased_copy_outlives_the_bound_until_its_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (store, archived, _) = store_of(dir.path(), 3, 100);
    let root = dir.path().join("restored");
    let metrics = restore::RestoredMetrics::default();
    let lease = Duration::from_secs(1);
    let copies = restore::Restored::new(&root, 1024, lease, metrics.clone());
    let paths: Vec<PathBuf> = (0..3)
        .map(|n| copies.serve(&store, &numbered(n), &archived).unwrap())
        .collect();
    copies.evict_all();
    for path in &paths {
        assert!(
            path.is_file(),
            "{} was removed while leased",
            path.display()
        );
    }
    assert_eq!(metrics.leased.get(), 3);
    assert!(metrics.over_bound.get() > 0);
    std::thread::sleep(lease + Duration::from_millis(50));
    copies.bound(&archived);
    assert!(
        paths.iter().all(|p| !p.exists()),
        "expired copies over the bound stay"
    );
    assert_eq!(metrics.over_bound.get(), 0);
    assert_eq!(metrics.leased.get(), 0);
    // Within the bound, an expired copy stays (it is only no longer protected).
    let big = restore::Restored::new(&root, 1 << 20, lease, metrics.clone());
    let path = big.serve(&store, &numbered(0), &archived).unwrap();
    std::thread::sleep(lease + Duration::from_millis(50));
    big.bound(&archived);
    assert!(path.is_file());
    // Not archived any more and not leased: a leftover.
    big.bound(&HashSet::new());
    assert!(!path.exists());
}

/// kubelet removes an archived container again while its copy is leased: it goes once the
/// lease ends, unless it was served again meanwhile.
#[test]
fn a_release_waits_for_the_lease_and_yields_to_a_new_read() {
    let dir = tempfile::tempdir().unwrap();
    let (store, archived, _) = store_of(dir.path(), 1, 10);
    let root = dir.path().join("restored");
    let lease = Duration::from_millis(200);
    let copies = restored(&root, 1 << 20, lease);
    let id = numbered(0);
    let path = copies.serve(&store, &id, &archived).unwrap();
    let when = copies.release(&id).expect("a leased copy waits");
    assert!(path.is_file());
    assert_eq!(copies.release_again(&id), Some(when));
    std::thread::sleep(when.saturating_duration_since(std::time::Instant::now()));
    assert_eq!(copies.release_again(&id), None);
    assert!(!path.parent().unwrap().exists());
    // Released, then read again before the lease ended: the read wins.
    let path = copies.serve(&store, &id, &archived).unwrap();
    let when = copies.release(&id).unwrap();
    let path2 = copies.serve(&store, &id, &archived).unwrap();
    assert_eq!(path, path2);
    std::thread::sleep(when.saturating_duration_since(std::time::Instant::now()));
    assert_eq!(copies.release_again(&id), None);
    assert!(path.is_file());
    // Not in use: removed at once.
    std::thread::sleep(lease);
    assert_eq!(copies.release(&id), None);
    assert!(!path.exists());
}

#[test]
fn exited_status_has_what_kubelet_requires() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path(), 3);
    let mut meta = meta(&id());
    meta.exit_code = Some(0);
    meta.reason = "Completed".into();
    meta.created_at = 5;
    meta.finished_at = 9;
    meta.annotations
        .insert(restore::PRE_STOP_ANNOTATION.into(), "{}".into());
    meta.annotations
        .insert("io.kubernetes.container.hash".into(), "abc".into());
    meta.labels
        .insert("io.kubernetes.pod.name".into(), "hello-job".into());
    store
        .append_generation(&meta, 1, &mut "x\n".as_bytes())
        .unwrap();
    let entry = store.complete(&meta).unwrap();
    let status = restore::exited_status(&entry, Path::new("/r/x/restored.log"));
    assert_eq!(status.id, ID);
    assert_eq!(status.state, ContainerState::ContainerExited as i32);
    assert_eq!(status.metadata.unwrap().name, "hello");
    assert_eq!(status.created_at, 5);
    assert_eq!(status.finished_at, 9);
    assert_eq!(status.image.unwrap().image, "busybox:latest");
    assert!(!status.image_ref.is_empty());
    assert_eq!(status.reason, "Completed");
    assert_eq!(status.log_path, "/r/x/restored.log");
    assert!(!status
        .annotations
        .contains_key(restore::PRE_STOP_ANNOTATION));
    assert_eq!(status.annotations["io.kubernetes.container.hash"], "abc");
    assert_eq!(status.labels["io.kubernetes.pod.name"], "hello-job");
}

// ---- retention ------------------------------------------------------------------------------

fn candidate(name: &str, bytes: u64, archived_at: i64) -> Candidate {
    Candidate {
        id: ContainerId::parse(&name.repeat(64)).unwrap(),
        bytes,
        archived_at,
    }
}

#[test]
fn retention_drops_the_oldest_first() {
    let policy = Policy {
        max_bytes: 100,
        max_age_seconds: 1000,
        min_free_percent: 10.0,
    };
    let entries = [
        candidate("b", 40, 200),
        candidate("a", 40, 100),
        candidate("c", 40, 300),
    ];
    assert_eq!(
        next_drop(&entries, 400, &policy, Some(50.0)),
        Some((
            ContainerId::parse(&"a".repeat(64)).unwrap(),
            Reason::MaxBytes
        ))
    );
    assert_eq!(next_drop(&entries[..2], 400, &policy, Some(50.0)), None);
    assert_eq!(
        next_drop(&entries[..2], 1150 * 1_000_000_000, &policy, Some(50.0)),
        Some((ContainerId::parse(&"a".repeat(64)).unwrap(), Reason::MaxAge))
    );
    assert_eq!(
        next_drop(&entries[..2], 400, &policy, Some(5.0)),
        Some((
            ContainerId::parse(&"a".repeat(64)).unwrap(),
            Reason::MinFree
        ))
    );
    assert_eq!(next_drop(&[], 400, &policy, Some(0.0)), None);
}

// ---- reading back ---------------------------------------------------------------------------

#[test]
fn partial_lines_are_joined_per_stream() {
    let text = "2024-01-01T00:00:00.000000001Z stdout P hel\n\
                2024-01-01T00:00:00.000000002Z stderr F oops\n\
                2024-01-01T00:00:00.000000003Z stdout F lo\n\
                2024-01-01T00:00:00.000000004Z stdout F  spaced  \n";
    let lines = cri_log::parse(text);
    let messages: Vec<&str> = lines.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(messages, vec!["oops", "hello", " spaced  "]);
    assert_eq!(lines[1].time, "2024-01-01T00:00:00.000000001Z");
}

#[test]
fn rfc3339_times_round_trip() {
    let nanos = cri_log::parse_rfc3339_nanos("2016-10-06T00:17:09.669794202Z").unwrap();
    assert_eq!(nanos, 1_475_713_029_669_794_202);
    assert_eq!(
        cri_log::format_rfc3339(nanos),
        "2016-10-06T00:17:09.669794202Z"
    );
    assert_eq!(
        cri_log::parse_rfc3339_nanos("2016-10-06T02:17:09+02:00"),
        Some(1_475_713_029_000_000_000)
    );
    assert_eq!(cri_log::parse_rfc3339_nanos("2016-13-06T00:17:09Z"), None);
    assert_eq!(cri_log::parse_rfc3339_nanos("yesterday"), None);
    assert_eq!(cri_log::parse_duration_seconds("10m"), Some(600));
    assert_eq!(cri_log::parse_duration_seconds("2h"), Some(7200));
    assert_eq!(cri_log::parse_duration_seconds("soon"), None);
}

#[test]
fn rendering_is_like_kubectl_logs() {
    let text = "2024-01-01T00:00:01.000000000Z stdout F one\n\
                2024-01-01T00:00:02.000000000Z stdout P t\n\
                2024-01-01T00:00:02.500000000Z stdout F wo\n\
                2024-01-01T00:00:03.000000000Z stderr F three\n";
    assert_eq!(
        logs_cmd::render(text, false, None, None),
        "one\ntwo\nthree\n"
    );
    assert_eq!(logs_cmd::render(text, false, Some(1), None), "three\n");
    assert_eq!(
        logs_cmd::render(text, true, Some(2), None),
        "2024-01-01T00:00:02.000000000Z two\n2024-01-01T00:00:03.000000000Z three\n"
    );
    let since = cri_log::parse_rfc3339_nanos("2024-01-01T00:00:02Z").unwrap();
    assert_eq!(
        logs_cmd::render(text, false, None, Some(since)),
        "two\nthree\n"
    );
}

#[test]
fn logs_command_lists_filters_and_prints() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path(), 3);
    for (n, (pod, container)) in [("job-a", "main"), ("job-b", "main"), ("job-b", "side")]
        .iter()
        .enumerate()
    {
        let id = ContainerId::parse(&format!("{n}{}", &ID[1..])).unwrap();
        let mut meta = meta(&id);
        meta.pod = pod.to_string();
        meta.container = container.to_string();
        meta.exit_code = Some(n as i32);
        let line = format!("2024-01-01T00:00:0{n}.000000000Z stdout F from {pod}/{container}\n");
        store
            .append_generation(&meta, 1, &mut line.as_bytes())
            .unwrap();
        store.complete(&meta).unwrap();
    }
    let run = |args: logs_cmd::LogsArgs| {
        let mut out = Vec::new();
        logs_cmd::run(&args, &mut out).map(|()| String::from_utf8(out).unwrap())
    };
    let base = || logs_cmd::LogsArgs {
        dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let table = run(logs_cmd::LogsArgs {
        pod: Some("job-b".into()),
        ..base()
    })
    .unwrap();
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.starts_with("NAMESPACE"));
    assert!(table.contains("side") && !table.contains("job-a"));
    let json = run(logs_cmd::LogsArgs {
        json: true,
        container: Some("main".into()),
        ..base()
    })
    .unwrap();
    let listed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["namespace"], "batch");
    let printed = run(logs_cmd::LogsArgs {
        id: Some("1123".into()),
        ..base()
    })
    .unwrap();
    assert_eq!(printed, "from job-b/main\n");
    assert!(run(logs_cmd::LogsArgs {
        id: Some("nomatch".into()),
        ..base()
    })
    .is_err());
}

// ---- config ---------------------------------------------------------------------------------

#[test]
fn archive_config_defaults_and_refusals() {
    let config: Config = toml::from_str("").unwrap();
    assert!(config.archive.enabled);
    assert!(config.archive.serve_kubelet);
    assert_eq!(
        config.archive.staging_dir,
        PathBuf::from("/var/log/dockhand/staging")
    );
    config.validate().unwrap();
    let parsed: Config = toml::from_str(
        "[archive]\nenabled = false\ndir = \"/a\"\nstaging_dir = \"/s\"\nrestored_dir = \"/r\"\n\
         pod_logs_dir = \"/p\"\nmax_bytes = 10\nmax_age_seconds = 0\nmin_free_percent = 0\n\
         compression_level = 1\nserve_kubelet = false\n",
    )
    .unwrap();
    parsed.validate().unwrap();
    assert!(toml::from_str::<Config>("[archive]\nmax_size = 1").is_err());
    for bad in [
        "restored_dir = \"/var/log/pods/restored\"",
        "restored_dir = \"/var/lib/dock*hand\"",
        "restored_dir = \"relative\"",
        "dir = \"/var/lib/dockhand/restored/x\"",
        "min_free_percent = 101",
        "staging_dir = \"/var/log/pods/../x\"",
    ] {
        let config: Config = toml::from_str(&format!("[archive]\n{bad}")).unwrap();
        assert!(config.validate().is_err(), "{bad} accepted");
    }
}

// ---- the archive as the proxy opens it -------------------------------------------------------

#[tokio::test]
async fn open_registers_metrics_and_loads_what_a_crash_left() {
    let t = tree();
    let config = crate::config::ArchiveConfig {
        dir: t.root.join("archive"),
        staging_dir: t.root.join("staging"),
        restored_dir: t.root.join("restored"),
        pod_logs_dir: t.pods.clone(),
        ..Default::default()
    };
    // An archived container from a previous run.
    let (archive, _, registry) = open_with_one_archived(&config, &t.root);
    assert!(archive.contains(ID));
    assert!(!archive.contains("../etc"));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for name in [
        "dockhand_archive_bytes ",
        "dockhand_archive_containers 1",
        "dockhand_archive_staged_containers 0",
        "dockhand_archive_input_bytes_total",
        "dockhand_archive_dropped_containers_total{reason=\"max_bytes\"} 0",
        "dockhand_archive_lost_logs_total{reason=\"unsafe_path\"} 0",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    // Staging exists (the link probe made it, and left nothing in it); restored copies wait
    // until kubelet needs one.
    assert_eq!(std::fs::read_dir(&config.staging_dir).unwrap().count(), 0);
    assert!(!config.restored_dir.exists());
}

#[tokio::test]
async fn the_free_space_floor_drops_archived_containers() {
    let t = tree();
    let config = crate::config::ArchiveConfig {
        dir: t.root.join("archive"),
        staging_dir: t.root.join("staging"),
        restored_dir: t.root.join("restored"),
        pod_logs_dir: t.pods.clone(),
        // No filesystem has 100% free: everything must go.
        min_free_percent: 100,
        ..Default::default()
    };
    let (archive, store, registry) = open_with_one_archived(&config, &t.root);
    super::worker::enforce_retention(&archive);
    assert!(!archive.contains(ID));
    assert!(store.list().unwrap().is_empty());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("dockhand_archive_dropped_containers_total{reason=\"min_free\"} 1"),
        "{text}"
    );
    assert!(text.contains("dockhand_archive_containers 0"), "{text}");
}

/// The archive opened over a store that already holds one complete container (`id()`), with no
/// containerd to ask; with the store and the metrics registry, for the test to look at.
fn open_with_one_archived(
    config: &crate::config::ArchiveConfig,
    root: &std::path::Path,
) -> (
    std::sync::Arc<super::Archive>,
    Store,
    prometheus_client::registry::Registry,
) {
    let store = Store::new(&config.dir, 3);
    store
        .append_generation(&meta(&id()), 1, &mut "x F y\n".as_bytes())
        .unwrap();
    store.complete(&meta(&id())).unwrap();
    let upstream = crate::upstream::Upstream::new(
        &root.join("no-containerd.sock"),
        std::time::Duration::from_secs(1),
    );
    let mut registry = prometheus_client::registry::Registry::default();
    let archive = super::Archive::open(
        config,
        std::path::Path::new("/nonexistent/cgroups"),
        upstream,
        Default::default(),
        &mut registry,
    )
    .unwrap();
    (archive, store, registry)
}
