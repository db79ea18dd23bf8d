//! The archive's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::restore::RestoredMetrics;

/// Why a container's log could not be kept (`dockhand_archive_lost_logs_total{reason}`).
const LOST_REASONS: [&str; 8] = [
    "no_space",
    "outside_log_directory",
    "log_missing",
    "unsafe_path",
    "cross_device",
    "io_error",
    "containerd",
    "invalid_id",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabels {
    pub(super) reason: &'static str,
}

pub(super) struct Metrics {
    pub(super) bytes: Gauge,
    pub(super) containers: Gauge,
    pub(super) staged: Gauge,
    pub(super) input_bytes: Counter,
    pub(super) dropped: Family<ReasonLabels, Counter>,
    pub(super) lost: Family<ReasonLabels, Counter>,
    pub(super) restored: RestoredMetrics,
}

impl Metrics {
    pub(super) fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            bytes: Gauge::default(),
            containers: Gauge::default(),
            staged: Gauge::default(),
            input_bytes: Counter::default(),
            dropped: Family::default(),
            lost: Family::default(),
            restored: RestoredMetrics::default(),
        };
        registry.register(
            "dockhand_archive_bytes",
            "Size of the log archive on disk (compressed logs and metadata)",
            metrics.bytes.clone(),
        );
        registry.register(
            "dockhand_archive_containers",
            "Containers in the log archive",
            metrics.containers.clone(),
        );
        registry.register(
            "dockhand_archive_staged_containers",
            "Containers whose live log is hard-linked into staging",
            metrics.staged.clone(),
        );
        registry.register(
            "dockhand_archive_input_bytes",
            "Uncompressed log bytes archived",
            metrics.input_bytes.clone(),
        );
        registry.register(
            "dockhand_archive_dropped_containers",
            "Archived containers dropped by retention, by reason",
            metrics.dropped.clone(),
        );
        registry.register(
            "dockhand_archive_lost_logs",
            "Container logs that could not be staged or archived, by reason",
            metrics.lost.clone(),
        );
        registry.register(
            "dockhand_archive_restored_bytes",
            "Size of the decompressed copies served to kubelet, after the last cleanup",
            metrics.restored.bytes.clone(),
        );
        registry.register(
            "dockhand_archive_restored_over_bound_bytes",
            "Bytes of restored copies over archive.restored_max_bytes, kept because their paths are leased to callers",
            metrics.restored.over_bound.clone(),
        );
        registry.register(
            "dockhand_archive_restored_leased",
            "Restored copies whose paths are leased to callers now",
            metrics.restored.leased.clone(),
        );
        // Every reason at 0 from the start, so alerts see the series before the first event.
        for reason in ["max_age", "max_bytes", "min_free"] {
            let _ = metrics.dropped.get_or_create(&ReasonLabels { reason });
        }
        for reason in LOST_REASONS {
            let _ = metrics.lost.get_or_create(&ReasonLabels { reason });
        }
        metrics
    }

    pub(super) fn lost(&self, reason: &'static str) {
        self.lost.get_or_create(&ReasonLabels { reason }).inc();
    }
}
