//! The checks inside the proxy, as Prometheus metrics: a cluster without node-problem-detector
//! sees the same results on `/metrics`. Every `[check] interval_seconds` the proxy runs
//! `check all` under `[check] timeout_seconds` (its own socket, containerd, the volumes, the
//! archive with the lost-log count read from its own registry) and sets:
//!
//! - `dockhand_check_status{check}`: 0 OK, 1 problem, 2 unknown (NPD's codes);
//! - `dockhand_check_findings{check,verdict}`: how many problems and unknowns it found;
//! - `dockhand_check_duration_seconds{check}`: how long the check took;
//! - `dockhand_check_runtime_call_duration_seconds{endpoint,call}`: Version and Status latency
//!   through dockhand and directly (NaN when the call failed);
//! - `dockhand_check_runs_total`: completed runs.
//!
//! A change of a check's verdict is logged.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::{LostLogs, Report, Settings, Verdict, What};
use crate::config::Config;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    check: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    endpoint: &'static str,
    call: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The background checker; [`Checker::register`] before the registry is shared.
pub struct Checker {
    settings: Settings,
    interval: Duration,
    timeout: Duration,
    status: Family<CheckLabels, Gauge>,
    findings: Family<FindingLabels, Gauge>,
    duration: Family<CheckLabels, FloatGauge>,
    calls: Family<CallLabels, FloatGauge>,
    runs: Counter,
}

const CHECKS: [What; 4] = [
    What::Runtime,
    What::Volumes,
    What::Propagation,
    What::Archive,
];

impl Checker {
    /// The checker for `config`, its metrics registered; `None` when `interval_seconds` is 0.
    pub fn register(config: &Config, registry: &mut Registry) -> Option<Checker> {
        if config.check.interval_seconds == 0 {
            return None;
        }
        let checker = Checker {
            settings: Settings {
                config: config.clone(),
            },
            interval: Duration::from_secs(config.check.interval_seconds),
            timeout: Duration::from_secs(config.check.timeout_seconds),
            status: Family::default(),
            findings: Family::default(),
            duration: Family::default(),
            calls: Family::default(),
            runs: Counter::default(),
        };
        registry.register(
            "dockhand_check_status",
            "Result of dockhand's node check: 0 OK, 1 problem, 2 unknown",
            checker.status.clone(),
        );
        registry.register(
            "dockhand_check_findings",
            "Problems and unknowns the last node check found",
            checker.findings.clone(),
        );
        registry.register(
            "dockhand_check_duration_seconds",
            "How long the last node check took",
            checker.duration.clone(),
        );
        registry.register(
            "dockhand_check_runtime_call_duration_seconds",
            "Latency of CRI Version and Status in the last runtime check (NaN: failed)",
            checker.calls.clone(),
        );
        registry.register(
            "dockhand_check_runs",
            "Node checks completed",
            checker.runs.clone(),
        );
        // Unknown until the first run, so the series exist from the start.
        for what in CHECKS {
            checker
                .status
                .get_or_create(&CheckLabels { check: what.name() })
                .set(Verdict::Unknown as i64);
        }
        Some(checker)
    }

    /// Runs the checks every interval until `stop` completes.
    pub async fn run(self, registry: Arc<Registry>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut last_lost = None;
        let mut verdicts: HashMap<&'static str, Verdict> = HashMap::new();
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = &mut stop => return,
            }
            let deadline = Instant::now() + self.timeout;
            let reports = super::run(
                What::All,
                &self.settings,
                deadline,
                LostLogs::Registry(&registry, &mut last_lost),
            )
            .await;
            for report in &reports {
                self.record(report);
                let name = report.check.name();
                if verdicts.insert(name, report.verdict) != Some(report.verdict) {
                    match report.verdict {
                        Verdict::Ok => {
                            tracing::info!(check = name, line = %report.line(), "node check ok")
                        }
                        _ => {
                            tracing::warn!(check = name, verdict = report.verdict.label(), line = %report.line(), "node check failed")
                        }
                    }
                }
            }
            self.runs.inc();
        }
    }

    fn record(&self, report: &Report) {
        let check = report.check.name();
        self.status
            .get_or_create(&CheckLabels { check })
            .set(report.verdict as i64);
        self.duration
            .get_or_create(&CheckLabels { check })
            .set(report.elapsed_seconds);
        for verdict in [Verdict::Problem, Verdict::Unknown] {
            self.findings
                .get_or_create(&FindingLabels {
                    check,
                    verdict: verdict.label(),
                })
                .set(report.count(verdict) as i64);
        }
        if report.check == What::Runtime {
            for endpoint in ["dockhand", "containerd"] {
                for (call, key) in [("version", "version_seconds"), ("status", "status_seconds")] {
                    let seconds = report.facts[endpoint]["answer"][key]
                        .as_f64()
                        .unwrap_or(f64::NAN);
                    self.calls
                        .get_or_create(&CallLabels { endpoint, call })
                        .set(seconds);
                }
            }
        }
    }
}
