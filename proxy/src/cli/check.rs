//! `dockhand check <what>`: node and volume health as a node-problem-detector custom plugin.
//!
//! NPD's contract: exit 0 OK, 1 problem, anything else unknown (2 here); it reads stdout (up to
//! 4 KiB) and keeps the first `max_output_length` bytes, 80 by default, as the condition's or
//! event's message; a rule that runs longer than its `timeout` (5 s by default) has its process
//! group SIGKILLed. So every check runs under one deadline for the whole run (`--timeout`,
//! below NPD's), prints one ASCII line of at most [`LINE_BYTES`] first, then detail, and never
//! touches a volume path itself (see `probe`).
//!
//! Layout:
//! - `runtime`: CRI Version and Status through dockhand and directly.
//! - `volumes`: containers' bind mounts against the host mount table, kubelet's volume
//!   directories, statfs of every volume in a child process.
//! - `propagation`: the audit's at-risk mounts.
//! - `archive`: the log archive against its bounds, lost logs since the last check.
//! - `probe`: the statfs child.
//! - `background`: the same checks inside the proxy, as Prometheus metrics.

pub mod archive;
pub mod background;
pub mod probe;
pub mod propagation;
pub mod runtime;
pub mod volumes;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

pub use crate::cli::cri_client::{running_containers, CriError, Running};

use crate::config::{Config, DEFAULT_CONFIG_PATH};

/// The most NPD shows of a plugin's output by default (`max_output_length`).
pub const LINE_BYTES: usize = 80;

/// What to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum What {
    /// CRI Version and Status through dockhand and directly.
    Runtime,
    /// Containers' bind mounts, kubelet's volume mounts, statfs and usage of each volume.
    Volumes,
    /// Running containers whose Docker-root mounts lost Docker's rslave.
    Propagation,
    /// The log archive's size and free space against its bounds; lost logs since last time.
    Archive,
    /// Every check; the worst result wins.
    All,
}

impl What {
    pub fn name(self) -> &'static str {
        match self {
            What::Runtime => "runtime",
            What::Volumes => "volumes",
            What::Propagation => "propagation",
            What::Archive => "archive",
            What::All => "all",
        }
    }
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// What to check [default: all].
    what: Option<What>,
    /// dockhand's config file, for sockets, the archive and `[check]` [default:
    /// /etc/dockhand/config.toml when it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// dockhand's socket (overrides `listen`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// containerd's socket (overrides `containerd`).
    #[arg(long)]
    containerd: Option<PathBuf>,
    /// Seconds the whole check may take; keep it below NPD's rule timeout.
    #[arg(long, default_value_t = 4.0)]
    timeout: f64,
    /// Print the reports as JSON on stdout after the first line (instead of the detail on
    /// stderr).
    #[arg(long)]
    json: bool,
    /// kubelet's root directory (overrides `[check] kubelet_dir`).
    #[arg(long)]
    kubelet_dir: Option<PathBuf>,
    /// Used space in percent above which a volume is a problem (overrides `[check] usage_percent`).
    #[arg(long)]
    usage_percent: Option<u8>,
    /// The host's mount table (overrides `[check] host_mountinfo`).
    #[arg(long)]
    host_mountinfo: Option<PathBuf>,
    /// NetworkReady false is a problem (overrides `[check] require_network`).
    #[arg(long)]
    require_network: bool,
    /// Where `archive` keeps the lost-log count it last saw (overrides `[check] state_file`).
    #[arg(long)]
    state_file: Option<PathBuf>,
}

/// NPD's plugin exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok = 0,
    Problem = 1,
    Unknown = 2,
}

impl Verdict {
    /// Problem is worse than unknown, which is worse than OK.
    fn rank(self) -> u8 {
        match self {
            Verdict::Ok => 0,
            Verdict::Unknown => 1,
            Verdict::Problem => 2,
        }
    }

    pub fn worst(self, other: Verdict) -> Verdict {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Problem => "problem",
            Verdict::Unknown => "unknown",
        }
    }
}

/// One thing a check found; `Ok` findings are notes shown in the detail only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub verdict: Verdict,
    pub message: String,
}

impl Finding {
    pub fn problem(message: impl Into<String>) -> Finding {
        Finding {
            verdict: Verdict::Problem,
            message: message.into(),
        }
    }
    pub fn unknown(message: impl Into<String>) -> Finding {
        Finding {
            verdict: Verdict::Unknown,
            message: message.into(),
        }
    }
    pub fn note(message: impl Into<String>) -> Finding {
        Finding {
            verdict: Verdict::Ok,
            message: message.into(),
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub check: What,
    pub verdict: Verdict,
    /// What the first line says after the check's name.
    pub summary: String,
    pub findings: Vec<Finding>,
    /// Measurements (latencies, counts) for people and for metrics.
    pub facts: serde_json::Value,
    pub elapsed_seconds: f64,
}

impl Report {
    /// The worst finding sets the verdict and the summary (`ok` when there is none).
    pub fn new(
        check: What,
        findings: Vec<Finding>,
        ok: impl Into<String>,
        facts: serde_json::Value,
    ) -> Report {
        let verdict = findings
            .iter()
            .fold(Verdict::Ok, |worst, f| worst.worst(f.verdict));
        let summary = match findings.iter().find(|f| f.verdict == verdict) {
            Some(first) if verdict != Verdict::Ok => {
                let others = findings.iter().filter(|f| f.verdict != Verdict::Ok).count() - 1;
                if others > 0 {
                    format!("{} (+{others} more)", first.message)
                } else {
                    first.message.clone()
                }
            }
            _ => ok.into(),
        };
        Report {
            check,
            verdict,
            summary,
            findings,
            facts,
            elapsed_seconds: 0.0,
        }
    }

    /// `volumes: default/web/app /data: mount lost`, NPD's message.
    pub fn line(&self) -> String {
        first_line(&format!("{}: {}", self.check.name(), self.summary))
    }

    /// The number of findings with `verdict`.
    pub fn count(&self, verdict: Verdict) -> usize {
        self.findings
            .iter()
            .filter(|f| f.verdict == verdict)
            .count()
    }
}

/// `text` as one line of printable ASCII of at most [`LINE_BYTES`] bytes: anything else becomes
/// `?`, and a longer text is cut with `...`.
pub fn first_line(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if line.len() > LINE_BYTES {
        line.truncate(LINE_BYTES - 3);
        line.push_str("...");
    }
    line
}

/// `error: its innermost cause` (tonic's transport errors hide the `connect(2)` error).
pub fn with_cause(error: &dyn std::error::Error) -> String {
    let root = root_cause(error);
    if std::ptr::addr_eq(root, error) {
        error.to_string()
    } else {
        format!("{error}: {root}")
    }
}

/// The innermost source of `error`.
pub fn root_cause<'e>(error: &'e (dyn std::error::Error + 'e)) -> &'e (dyn std::error::Error + 'e) {
    let mut root = error;
    while let Some(source) = root.source() {
        root = source;
    }
    root
}

/// Everything a check needs to know, from the config file and the flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
}

impl Settings {
    fn from_args(args: &CheckArgs) -> Result<Settings, crate::config::ConfigError> {
        let mut config = match &args.config {
            Some(path) => Config::load(path, true)?,
            None => Config::load(Path::new(DEFAULT_CONFIG_PATH), false)?,
        };
        if let Some(socket) = &args.socket {
            config.listen = socket.clone();
        }
        if let Some(containerd) = &args.containerd {
            config.containerd = containerd.clone();
        }
        let check = &mut config.check;
        if let Some(dir) = &args.kubelet_dir {
            check.kubelet_dir = dir.clone();
        }
        if let Some(percent) = args.usage_percent {
            check.usage_percent = percent;
        }
        if let Some(path) = &args.host_mountinfo {
            check.host_mountinfo = path.clone();
        }
        if let Some(path) = &args.state_file {
            check.state_file = path.clone();
        }
        if args.require_network {
            check.require_network = true;
        }
        config.validate()?;
        Ok(Settings { config })
    }
}

/// Where `archive` gets the proxy's lost-log count and keeps the last one it saw.
pub enum LostLogs<'a> {
    /// From the proxy's metrics endpoint; the last count is kept in `state_file`.
    Scrape,
    /// From the proxy's own registry (the background checker); the last count in memory.
    Registry(
        &'a prometheus_client::registry::Registry,
        &'a mut Option<u64>,
    ),
}

async fn within<F: std::future::Future>(deadline: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

/// Runs `what` under `deadline`. A check that does not finish in time is `unknown`.
pub async fn run(
    what: What,
    settings: &Settings,
    deadline: Instant,
    lost: LostLogs<'_>,
) -> Vec<Report> {
    let started = Instant::now();
    let timed = |what: What, report: Option<Report>| {
        let mut report = report.unwrap_or_else(|| {
            Report::new(
                what,
                vec![Finding::unknown(format!(
                    "no result within {:.1}s",
                    deadline.saturating_duration_since(started).as_secs_f64()
                ))],
                "",
                serde_json::Value::Null,
            )
        });
        report.elapsed_seconds = started.elapsed().as_secs_f64();
        report
    };
    match what {
        What::Runtime => vec![timed(
            What::Runtime,
            within(deadline, runtime::check(settings, deadline)).await,
        )],
        What::Volumes => vec![timed(
            What::Volumes,
            within(deadline, volumes::check(settings, deadline)).await,
        )],
        What::Propagation => vec![timed(
            What::Propagation,
            within(deadline, propagation::check(settings)).await,
        )],
        What::Archive => vec![timed(
            What::Archive,
            within(deadline, archive::check(settings, deadline, lost)).await,
        )],
        What::All => {
            let (r, v, p, a) = tokio::join!(
                within(deadline, runtime::check(settings, deadline)),
                within(deadline, volumes::check(settings, deadline)),
                within(deadline, propagation::check(settings)),
                within(deadline, archive::check(settings, deadline, lost)),
            );
            vec![
                timed(What::Runtime, r),
                timed(What::Volumes, v),
                timed(What::Propagation, p),
                timed(What::Archive, a),
            ]
        }
    }
}

/// The worst of `reports`, and the one line naming it (or all of them when all are OK).
pub fn overall(what: What, reports: &[Report]) -> (Verdict, String) {
    let verdict = reports
        .iter()
        .fold(Verdict::Ok, |worst, r| worst.worst(r.verdict));
    if what != What::All || reports.len() == 1 {
        let line = reports.first().map(Report::line).unwrap_or_default();
        return (verdict, line);
    }
    if verdict == Verdict::Ok {
        let short: Vec<&str> = reports.iter().map(|r| r.check.name()).collect();
        return (verdict, first_line(&format!("ok: {}", short.join(", "))));
    }
    let worst = reports
        .iter()
        .find(|r| r.verdict == verdict)
        .expect("some report has the worst verdict");
    let others = reports
        .iter()
        .filter(|r| r.verdict != Verdict::Ok && !std::ptr::eq(*r, worst))
        .count();
    let line = if others > 0 {
        // Keep room for the count of other failing checks.
        let suffix = format!(" [+{others} checks]");
        let room = LINE_BYTES - suffix.len();
        let mut head = worst.line();
        if head.len() > room {
            // The line is ASCII: any byte is a char boundary.
            head.truncate(room - 3);
            head.push_str("...");
        }
        format!("{head}{suffix}")
    } else {
        worst.line()
    };
    (verdict, line)
}

/// The text after the first line: every report and its findings.
pub fn detail(reports: &[Report]) -> String {
    let mut out = String::new();
    for report in reports {
        out.push_str(&format!(
            "{} {} ({:.0} ms)",
            report.check.name(),
            report.verdict.label(),
            report.elapsed_seconds * 1000.0,
        ));
        if report.findings.is_empty() {
            out.push_str(&format!(": {}", report.summary));
        }
        out.push('\n');
        for finding in &report.findings {
            out.push_str(&format!(
                "  {}: {}\n",
                finding.verdict.label(),
                finding.message
            ));
        }
    }
    out
}

/// `dockhand check`: prints the line and the detail, returns NPD's exit code.
pub async fn main(args: CheckArgs) -> u8 {
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout.clamp(0.1, 3600.0));
    let what = args.what.unwrap_or(What::All);
    let settings = match Settings::from_args(&args) {
        Ok(settings) => settings,
        Err(e) => {
            let e = anyhow::Error::from(e);
            println!("{}", first_line(&format!("check: {e:#}")));
            return Verdict::Unknown as u8;
        }
    };
    let reports = run(what, &settings, deadline, LostLogs::Scrape).await;
    let (verdict, line) = overall(what, &reports);
    // NPD keeps the first 80 bytes of the *whole* stdout (trimmed) as the message, so stdout
    // carries the line alone and the detail goes to stderr, which NPD logs for a problem.
    println!("{line}");
    if args.json {
        let json = serde_json::json!({
            "check": what,
            "verdict": verdict,
            "exit_code": verdict as u8,
            "line": line,
            "reports": reports,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        );
    } else {
        eprint!("{}", detail(&reports));
    }
    verdict as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_is_short_printable_ascii() {
        assert_eq!(first_line("volumes: ok"), "volumes: ok");
        let long = format!("volumes: {}", "x".repeat(200));
        let line = first_line(&long);
        assert_eq!(line.len(), LINE_BYTES);
        assert!(line.ends_with("..."));
        assert_eq!(first_line("pod\nname é"), "pod?name ?");
    }

    #[test]
    fn the_worst_finding_names_the_report() {
        let report = Report::new(
            What::Volumes,
            vec![
                Finding::note("fine"),
                Finding::unknown("slow"),
                Finding::problem("default/web/app /data: mount lost"),
                Finding::problem("other"),
            ],
            "ok",
            serde_json::Value::Null,
        );
        assert_eq!(report.verdict, Verdict::Problem);
        assert_eq!(
            report.line(),
            "volumes: default/web/app /data: mount lost (+2 more)"
        );
    }

    #[test]
    fn all_names_the_worst_check() {
        let ok = Report::new(What::Runtime, vec![], "fine", serde_json::Value::Null);
        let unknown = Report::new(
            What::Archive,
            vec![Finding::unknown("no metrics")],
            "",
            serde_json::Value::Null,
        );
        let problem = Report::new(
            What::Volumes,
            vec![Finding::problem("x".repeat(100))],
            "",
            serde_json::Value::Null,
        );
        let (verdict, line) = overall(What::All, &[ok.clone(), unknown.clone(), problem]);
        assert_eq!(verdict, Verdict::Problem);
        assert!(line.starts_with("volumes: xxx"), "{line}");
        assert!(line.ends_with("... [+1 checks]"), "{line}");
        assert!(line.len() <= LINE_BYTES, "{line}");
        let (verdict, line) = overall(What::All, &[ok.clone(), ok]);
        assert_eq!(verdict, Verdict::Ok);
        assert_eq!(line, "ok: runtime, runtime");
        let (verdict, line) = overall(What::Archive, &[unknown]);
        assert_eq!(
            (verdict, line.as_str()),
            (Verdict::Unknown, "archive: no metrics")
        );
    }
}
