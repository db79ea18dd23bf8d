//! Retention: which archived container to drop next. Oldest first (by last write), for age,
//! then total size, then the free-space floor, so the archive never becomes the cause of the
//! disk pressure it exists to survive.

use dockhand_host::ContainerId;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Upper bound of the archive's size on disk.
    pub max_bytes: u64,
    /// Entries last written longer ago than this are dropped (0: no age limit).
    pub max_age_seconds: u64,
    /// Free space the archive's filesystem keeps, in percent of its size.
    pub min_free_percent: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    MaxAge,
    MaxBytes,
    MinFree,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::MaxAge => "max_age",
            Reason::MaxBytes => "max_bytes",
            Reason::MinFree => "min_free",
        }
    }
}

/// One archived container as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: ContainerId,
    pub bytes: u64,
    pub archived_at: i64,
}

/// The next entry to drop, if any. `candidates` in any order, times in Unix nanoseconds;
/// `free_percent` is the free space now (None when unknown: the floor is then not enforced).
pub fn next_drop(
    candidates: &[Candidate],
    now: i64,
    policy: &Policy,
    free_percent: Option<f64>,
) -> Option<(ContainerId, Reason)> {
    let oldest = candidates
        .iter()
        .min_by(|a, b| (a.archived_at, &a.id).cmp(&(b.archived_at, &b.id)))?;
    if policy.max_age_seconds > 0
        && now.saturating_sub(oldest.archived_at) / 1_000_000_000 > policy.max_age_seconds as i64
    {
        return Some((oldest.id.clone(), Reason::MaxAge));
    }
    let total: u64 = candidates.iter().map(|c| c.bytes).sum();
    if total > policy.max_bytes {
        return Some((oldest.id.clone(), Reason::MaxBytes));
    }
    if free_percent.is_some_and(|free| free < policy.min_free_percent) {
        return Some((oldest.id.clone(), Reason::MinFree));
    }
    None
}
