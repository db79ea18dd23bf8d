//! `dockhand logs`: the archive read back. Without an id it lists the archived containers
//! (filtered by namespace, pod, container; a table or `--json`); with an id (or a unique prefix)
//! it prints that container's output the way `kubectl logs` does.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::Serialize;

use super::cri_log;
use crate::archive::store::{now_nanos, Entry, Store};
use crate::config::{Config, DEFAULT_CONFIG_PATH};

#[derive(clap::Args, Debug, Default)]
pub struct LogsArgs {
    /// Container id (or a unique prefix) to print; without it, archived containers are listed.
    pub id: Option<String>,
    /// dockhand's config file, for `archive.dir` (a missing default file means the default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Archive directory (overrides `archive.dir`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Only containers of pods in this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only containers of this pod.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only containers with this name.
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    /// List as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Prefix each line with its RFC 3339 time.
    #[arg(long)]
    pub timestamps: bool,
    /// Print only the last N lines.
    #[arg(long)]
    pub tail: Option<usize>,
    /// Print only lines newer than this (`30s`, `10m`, `2h`, `1d`).
    #[arg(long)]
    pub since: Option<String>,
}

/// One archived container, as listed.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: String,
    pub attempt: u32,
    pub image: String,
    pub exit_code: Option<i32>,
    pub reason: String,
    pub started_at: String,
    pub finished_at: String,
    pub log_bytes: u64,
    pub raw_bytes: u64,
    /// Log generations in the archive (1, then one per rotation).
    pub generations: Vec<u32>,
    pub complete: bool,
}

impl From<&Entry> for Listed {
    fn from(entry: &Entry) -> Listed {
        let meta = &entry.container;
        let time = |nanos: i64| {
            if nanos == 0 {
                String::new()
            } else {
                cri_log::format_rfc3339(nanos)
            }
        };
        Listed {
            id: meta.id.to_string(),
            namespace: meta.namespace.clone(),
            pod: meta.pod.clone(),
            pod_uid: meta.pod_uid.clone(),
            container: meta.container.clone(),
            attempt: meta.attempt,
            image: meta.image.clone(),
            exit_code: meta.exit_code,
            reason: meta.reason.clone(),
            started_at: time(meta.started_at),
            finished_at: time(meta.finished_at),
            log_bytes: entry.log_bytes,
            raw_bytes: entry.raw_bytes,
            generations: entry.generations.clone(),
            complete: entry.complete,
        }
    }
}

pub fn run(args: &LogsArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            let (path, required) = match &args.config {
                Some(path) => (path.clone(), true),
                None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
            };
            Config::load(&path, required)?.archive.dir
        }
    };
    let store = Store::new(&dir, 3);
    let entries: Vec<Entry> = store
        .list()
        .with_context(|| format!("reading the archive {}", dir.display()))?
        .into_iter()
        .filter(|e| selected(args, e))
        .collect();
    match &args.id {
        None => list(args, &entries, out),
        Some(prefix) => {
            let matching: Vec<&Entry> = entries
                .iter()
                .filter(|e| e.container.id.as_str().starts_with(prefix.as_str()))
                .collect();
            let entry = match matching.as_slice() {
                [entry] => *entry,
                [] => bail!(
                    "no archived container matches {prefix:?} in {}",
                    dir.display()
                ),
                _ => bail!(
                    "{prefix:?} matches {} archived containers; give more of the id",
                    matching.len()
                ),
            };
            let mut text = Vec::new();
            store.read_log(&entry.container.id, &mut text)?;
            let since = match &args.since {
                Some(since) => {
                    let seconds = cri_log::parse_duration_seconds(since)
                        .with_context(|| format!("--since {since:?}: use e.g. 30s, 10m, 2h, 1d"))?;
                    Some(now_nanos() - seconds as i64 * 1_000_000_000)
                }
                None => None,
            };
            let text = String::from_utf8_lossy(&text);
            out.write_all(render(&text, args.timestamps, args.tail, since).as_bytes())?;
            Ok(())
        }
    }
}

fn selected(args: &LogsArgs, entry: &Entry) -> bool {
    let meta = &entry.container;
    let is = |filter: &Option<String>, value: &str| filter.as_deref().is_none_or(|f| f == value);
    is(&args.namespace, &meta.namespace)
        && is(&args.pod, &meta.pod)
        && is(&args.container, &meta.container)
}

fn list(args: &LogsArgs, entries: &[Entry], out: &mut dyn Write) -> anyhow::Result<()> {
    let listed: Vec<Listed> = entries.iter().map(Listed::from).collect();
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &listed)?;
        writeln!(out)?;
        return Ok(());
    }
    let mut rows = vec![[
        "NAMESPACE",
        "POD",
        "CONTAINER",
        "ATTEMPT",
        "CONTAINER ID",
        "EXIT",
        "FINISHED",
        "SIZE",
    ]
    .map(String::from)];
    for l in &listed {
        rows.push([
            l.namespace.clone(),
            l.pod.clone(),
            l.container.clone(),
            l.attempt.to_string(),
            l.id[..l.id.len().min(13)].to_string(),
            l.exit_code.map_or("-".into(), |c| c.to_string()),
            l.finished_at.split('.').next().unwrap_or("").to_string(),
            human_bytes(l.raw_bytes),
        ]);
    }
    out.write_all(super::table::render(&rows).as_bytes())?;
    Ok(())
}

/// The text `kubectl logs` would show for CRI log `text`.
pub fn render(
    text: &str,
    timestamps: bool,
    tail: Option<usize>,
    since_nanos: Option<i64>,
) -> String {
    let mut lines = cri_log::parse(text);
    if let Some(since) = since_nanos {
        lines.retain(|l| l.nanos >= since);
    }
    if let Some(tail) = tail {
        let skip = lines.len().saturating_sub(tail);
        lines.drain(..skip);
    }
    let mut out = String::new();
    for line in lines {
        if timestamps && !line.time.is_empty() {
            out.push_str(&line.time);
            out.push(' ');
        }
        out.push_str(&line.message);
        out.push('\n');
    }
    out
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}Gi", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}Mi", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}Ki", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}
