//! Docker-parity mount propagation, applied in CreateContainer.
//!
//! Docker (moby `validateBindDaemonRoot`) gave a bind mount `rslave` when the pod asked for no
//! propagation and its source was the daemon root (`/var/lib/docker`), inside it, or one of its
//! ancestors (`/`, `/var`, `/var/lib`); when the source's host mount was neither shared nor slave
//! it silently fell back to private. containerd gives such mounts `rprivate`, and refuses
//! `rslave` on a private host mount outright. So for each such mount dockhand asks containerd for
//! `PROPAGATION_HOST_TO_CONTAINER` only when the host mount can take it, and otherwise leaves the
//! mount private, as Docker did. Paths are compared by components after resolving symlinks the
//! way containerd will, so `/var/lib/doc` never matches `/var/lib/docker`.
//!
//! What each field of a CRI `Mount` (cri-api v0.37) means for the rule:
//! - `container_path` (1): only named in the decision annotation.
//! - `host_path` (2): the rule's subject; empty or relative: left alone (containerd's to judge).
//! - `readonly` (3): no effect (Docker gave read-only binds rslave too; containerd accepts it).
//! - `selinux_relabel` (4): no effect (containerd relabels the source whatever the propagation).
//! - `propagation` (5): only `PROPAGATION_PRIVATE` (what kubelet sends for `None`) is a
//!   candidate; `HOST_TO_CONTAINER`, `BIDIRECTIONAL` and values this proto does not know are the
//!   pod's explicit choice and left alone.
//! - `uidMappings`/`gidMappings` (6, 7): no effect (an idmapped bind takes rslave like any bind;
//!   a runtime that refused it would get the original request, see [`Propagation`]).
//! - `recursive_read_only` (8): containerd and runc require private propagation for it
//!   (`recursive read-only mount needs private propagation`), and so did Docker: the mount keeps
//!   its propagation, decided `private(recursive read-only)`.
//! - `image` (9), `image_sub_path` (10): an image volume, mounted by containerd from a snapshot
//!   (its host path must be empty): not a bind of a host path, left alone.
//! - `mount_options` (11, cri-api v0.37): bind options the runtime adds; one that names a
//!   propagation (`rslave`, `private`, ...) is the pod's explicit choice: left alone. Others
//!   (`noexec`, `nodev`, ...) have no effect.
//!
//! The request is read through `protos::view`, which names only these fields (and the record's):
//! a field the rule does not read can change type, as `KeyValue.value` did in v0.37, and the
//! request is still decided.
//!
//! And of `ContainerConfig`: only `mounts` and `annotations` (where the decision goes) matter.
//! User namespaces (`linux.security_context.namespace_options.userns_options`), privileged, a
//! read-only rootfs, devices and the rest do not change what the host's mount table allows; the
//! pod's own opt-out is read from `PodSandboxConfig.annotations`.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dockhand_protos::cri::MountPropagation;
use dockhand_protos::view::{CreateContainerRequest, Mount};
use dockhand_protos::wire::{self, Edit, Op, Step};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::Code;
use tracing::Instrument;

use crate::config::{PropagationConfig, PropagationMode};
use crate::grpc::{Interceptor, Reply, UnaryCall};
use dockhand_host::mountinfo::{self, MountTable, WatchedMountTable};
use futures::future::BoxFuture;

/// Pod annotation (on the sandbox) that turns the rewrite off for that pod's containers.
pub const OPT_OUT_ANNOTATION: &str = "dockhand.io/mount-propagation";
/// The opt-out annotation's value.
pub const OPT_OUT_VALUE: &str = "keep";
/// Container annotation recording what dockhand decided, visible in `crictl inspect`.
pub const DECISION_ANNOTATION: &str = "dockhand.io/mount-propagation";

// CRI v1 field numbers used for the byte edit.
const CREATE_CONFIG: u32 = 2;
const CONFIG_MOUNTS: u32 = 7;
const CONFIG_ANNOTATIONS: u32 = 10;
const MOUNT_PROPAGATION: u32 = 5;

/// What dockhand does with one mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Ask for HOST_TO_CONTAINER: containerd mounts it rslave, as Docker did.
    Rslave,
    /// Leave it private, as Docker's fallback did, and say why.
    KeepPrivate(&'static str),
    /// Was rslave, but containerd refused the edited request (its message, cut to fit the
    /// annotation): the original went instead, so the mount is private.
    Refused(String),
}

impl Decision {
    /// The `result` label it is counted under in `dockhand_propagation_rewrites_total`.
    fn result(&self) -> &'static str {
        match self {
            Decision::Rslave => "rslave",
            Decision::KeepPrivate(why) if *why == RECURSIVE_READ_ONLY => "recursive_read_only",
            Decision::KeepPrivate(_) => "private_fallback",
            Decision::Refused(_) => "refused_original_sent",
        }
    }

    /// What became of this decision when containerd refused the edited request with `message`.
    fn refused(self, message: &str) -> Decision {
        match self {
            Decision::Rslave => Decision::Refused(refusal_text(message)),
            kept => kept,
        }
    }
}

/// Longest part of containerd's refusal kept in the annotation, in characters.
const REFUSAL_CHARS: usize = 100;

/// containerd's refusal as the annotation can hold it: one line, no `,` (the annotation's
/// separator: written `;`), its last [`REFUSAL_CHARS`] characters (`...` marks the cut). The
/// end, because Go wraps an error in its callers' context: the cause comes last (`failed to
/// generate container "<64 hex>" spec: ... is not a shared or slave mount`); the whole message
/// is in the log.
fn refusal_text(message: &str) -> String {
    let clean: String = message
        .chars()
        .map(|c| match c {
            ',' => ';',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    let clean = clean.trim();
    match clean.char_indices().rev().nth(REFUSAL_CHARS - 1) {
        Some((cut, _)) if cut > 0 => format!("...{}", &clean[cut..]),
        _ => clean.to_string(),
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Rslave => f.write_str("rslave"),
            Decision::KeepPrivate(why) => write!(f, "private({why})"),
            Decision::Refused(message) => write!(f, "private(refused: {message})"),
        }
    }
}

/// The decision for one mount of a request, by its index in `config.mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountDecision {
    pub index: usize,
    pub container_path: String,
    pub source: PathBuf,
    pub decision: Decision,
}

/// The reason a recursive read-only mount keeps its propagation.
pub const RECURSIVE_READ_ONLY: &str = "recursive read-only";

/// OCI mount options that set a propagation (runc's list).
const PROPAGATION_OPTIONS: [&str; 8] = [
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
];

/// Whether the rule looks at `mount` at all, before any host path is read: propagation left to
/// the runtime (PRIVATE, and none among its mount options), an absolute host path, and not an
/// image volume.
pub fn is_candidate(mount: &Mount) -> bool {
    mount.propagation == MountPropagation::PropagationPrivate as i32
        && Path::new(&mount.host_path).is_absolute()
        && mount.image.is_none()
        && !mount
            .mount_options
            .iter()
            .any(|o| PROPAGATION_OPTIONS.contains(&o.trim()))
}

/// Docker's rule (plus the operator's extra paths), with its roots resolved once.
pub struct Rule {
    docker_root: PathBuf,
    extra: Vec<PathBuf>,
}

impl Rule {
    pub fn new(config: &PropagationConfig) -> Rule {
        Rule {
            docker_root: resolve(&config.docker_root),
            extra: config.extra_paths.iter().map(|p| resolve(p)).collect(),
        }
    }

    /// The resolved source of `mount` when the rule covers it: propagation left to the runtime
    /// (PRIVATE), an absolute host path, inside the docker root or an ancestor of it, or inside
    /// an extra path.
    pub fn matches(&self, mount: &Mount, resolver: &mut Resolver) -> Option<PathBuf> {
        if !is_candidate(mount) {
            return None;
        }
        let source = resolver.resolve(Path::new(&mount.host_path));
        let docker = is_within(&self.docker_root, &source) || is_within(&source, &self.docker_root);
        let extra = self.extra.iter().any(|root| is_within(&source, root));
        (docker || extra).then_some(source)
    }
}

/// Decides which of `mounts` Docker would have made rslave.
///
/// `table` is read once, and only when some mount matches the rule.
pub fn decide<T: Borrow<MountTable>, E: fmt::Display>(
    rule: &Rule,
    mounts: &[Mount],
    table: impl FnOnce() -> Result<T, E>,
) -> Vec<MountDecision> {
    let mut resolver = Resolver::default();
    let matched: Vec<(usize, &Mount, PathBuf)> = mounts
        .iter()
        .enumerate()
        .filter_map(|(i, m)| rule.matches(m, &mut resolver).map(|source| (i, m, source)))
        .collect();
    if matched.is_empty() {
        return Vec::new();
    }
    // A recursive read-only mount is decided without the host's mount table.
    let table = matched
        .iter()
        .any(|(_, m, _)| !m.recursive_read_only)
        .then(table);
    if let Some(Err(e)) = &table {
        tracing::warn!(error = %e, "cannot read the host's mount table; leaving mounts private");
    }
    matched
        .into_iter()
        .map(|(index, mount, source)| {
            let decision = match &table {
                // containerd refuses any other propagation for it (and runc cannot do it).
                _ if mount.recursive_read_only => Decision::KeepPrivate(RECURSIVE_READ_ONLY),
                None | Some(Err(_)) => Decision::KeepPrivate("host mount table unreadable"),
                // The mount containerd itself will check (its `mount.Lookup` rule), so that dockhand
                // never asks for rslave where containerd would refuse it.
                Some(Ok(table)) => match table
                    .borrow()
                    .containerd_lookup(&source)
                    .map(|e| e.propagation)
                {
                    Some(mountinfo::Propagation::Shared) | Some(mountinfo::Propagation::Slave) => {
                        Decision::Rslave
                    }
                    Some(mountinfo::Propagation::Private) => {
                        Decision::KeepPrivate("host mount private")
                    }
                    None => Decision::KeepPrivate("host mount not found"),
                },
            };
            MountDecision {
                index,
                container_path: mount.container_path.clone(),
                source,
                decision,
            }
        })
        .collect()
}

/// Whether `path` is `root` or inside it, by whole components.
pub fn is_within(path: &Path, root: &Path) -> bool {
    let mut path = path.components().filter(|c| *c != Component::CurDir);
    root.components()
        .filter(|c| *c != Component::CurDir)
        .all(|c| path.next() == Some(c))
}

/// Resolves symlinks as containerd will before it mounts (Go's `filepath.EvalSymlinks` on the
/// existing part; the missing rest, which containerd creates, is appended as written). Read-only:
/// `lstat` and `readlink`, nothing is created. Results are remembered for the life of the
/// resolver, one CreateContainer, so mounts that share a prefix (kubelet's volume directories)
/// cost one `lstat` per new component.
#[derive(Default)]
pub struct Resolver {
    /// `resolved parent + name` → what it resolves to; `None` when it does not exist.
    memo: HashMap<PathBuf, Option<PathBuf>>,
}

/// Symlinks followed in one resolution before giving up (as the kernel's ELOOP).
const MAX_SYMLINKS: usize = 40;

impl Resolver {
    pub fn resolve(&mut self, path: &Path) -> PathBuf {
        let mut budget = MAX_SYMLINKS;
        self.resolve_from(PathBuf::from("/"), path, &mut budget)
    }

    fn resolve_from(&mut self, mut resolved: PathBuf, path: &Path, budget: &mut usize) -> PathBuf {
        let mut components = path.components();
        while let Some(component) = components.next() {
            match component {
                Component::RootDir => resolved = PathBuf::from("/"),
                Component::CurDir | Component::Prefix(_) => {}
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => {
                    let candidate = resolved.join(name);
                    let next = match self.memo.get(&candidate) {
                        Some(known) => known.clone(),
                        None => {
                            let found = self.step(&resolved, &candidate, budget);
                            self.memo.insert(candidate, found.clone());
                            found
                        }
                    };
                    match next {
                        Some(next) => resolved = next,
                        None => {
                            // Missing from here on: containerd creates the rest as written.
                            resolved.push(name);
                            return lexically_clean(&resolved.join(components.as_path()));
                        }
                    }
                }
            }
        }
        resolved
    }

    /// One existing component: itself, or where its symlink leads.
    fn step(&mut self, parent: &Path, candidate: &Path, budget: &mut usize) -> Option<PathBuf> {
        let meta = std::fs::symlink_metadata(candidate).ok()?;
        if !meta.file_type().is_symlink() {
            return Some(candidate.to_path_buf());
        }
        if *budget == 0 {
            return None;
        }
        *budget -= 1;
        let target = std::fs::read_link(candidate).ok()?;
        Some(self.resolve_from(parent.to_path_buf(), &target, budget))
    }
}

/// Resolves one path with a fresh [`Resolver`].
pub fn resolve(path: &Path) -> PathBuf {
    Resolver::default().resolve(path)
}

/// Removes `.` and applies `..` without touching the filesystem (for the part that does not
/// exist), as Go's `filepath.Clean` does for an absolute path.
pub(crate) fn lexically_clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The annotation text for a set of decisions: `"/rootfs=rslave, /host=private(host mount private)"`.
///
/// The format is for people reading `crictl inspect` and for [`recorded_decision`]:
/// `<container path>=<decision>` entries joined by `", "`, where a container path's `%`, `,` and
/// `=` are written `%25`, `%2C` and `%3D` so that any path reads back as itself.
pub fn annotation(decisions: &[MountDecision]) -> String {
    decisions
        .iter()
        .map(|d| format!("{}={}", escape_path(&d.container_path), d.decision))
        .collect::<Vec<_>>()
        .join(", ")
}

fn escape_path(path: &str) -> String {
    path.replace('%', "%25")
        .replace(',', "%2C")
        .replace('=', "%3D")
}

fn unescape_path(path: &str) -> String {
    path.replace("%3D", "=")
        .replace("%2C", ",")
        .replace("%25", "%")
}

/// A decision as the annotation records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Rslave,
    Private { reason: String },
}

impl Recorded {
    fn parse(text: &str) -> Option<Recorded> {
        if text == "rslave" {
            return Some(Recorded::Rslave);
        }
        let reason = text.strip_prefix("private(")?.strip_suffix(')')?;
        Some(Recorded::Private {
            reason: reason.to_string(),
        })
    }
}

/// What an annotation written by [`annotation`] says about `container_path`, or None when it
/// does not name that path (or names it with a decision this dockhand does not know).
pub fn recorded_decision(annotation: &str, container_path: &str) -> Option<Recorded> {
    annotation.split(", ").find_map(|entry| {
        let (path, decision) = entry.split_once('=')?;
        (unescape_path(path) == container_path)
            .then(|| Recorded::parse(decision))
            .flatten()
    })
}

/// The byte edits that carry out `decisions` on an encoded CreateContainerRequest.
pub fn edits(decisions: &[MountDecision]) -> Vec<Edit> {
    let mut edits: Vec<Edit> = decisions
        .iter()
        .filter(|d| d.decision == Decision::Rslave)
        .map(|d| Edit {
            path: vec![
                Step::Field(CREATE_CONFIG),
                Step::Item(CONFIG_MOUNTS, d.index),
            ],
            op: Op::SetVarint {
                field: MOUNT_PROPAGATION,
                value: MountPropagation::PropagationHostToContainer as u64,
            },
        })
        .collect();
    edits.push(annotate(&annotation(decisions)));
    edits
}

/// The edit that appends the decision annotation `text` to the container's annotations.
fn annotate(text: &str) -> Edit {
    Edit {
        path: vec![Step::Field(CREATE_CONFIG)],
        op: Op::Append {
            field: CONFIG_ANNOTATIONS,
            value: wire::map_entry(DECISION_ANNOTATION, text),
        },
    }
}

/// Whether `reply` is containerd refusing the create: a gRPC status other than OK, and not one
/// that leaves the first create possibly still running in containerd (CANCELLED,
/// DEADLINE_EXCEEDED, UNAVAILABLE, or a reset stream), where sending it again could race it.
pub fn refusal(reply: &Reply) -> Option<tonic::Status> {
    if reply.is_reset() {
        return None;
    }
    let status = reply.status();
    match status.code() {
        Code::Ok | Code::Cancelled | Code::DeadlineExceeded | Code::Unavailable => None,
        _ => Some(status),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The CreateContainer handler: state and metrics.
pub struct Propagation {
    config: PropagationConfig,
    /// The rule and the host's mount table, shared with the blocking pool that decides.
    decider: Arc<Decider>,
    /// Decisions allowed on the blocking pool at once.
    deciding: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
    rewrites: Family<ResultLabels, Counter>,
}

/// How many decisions may run (or hang) on the blocking pool at once.
const DECIDING_AT_ONCE: usize = 8;

/// What deciding needs, on the blocking pool.
struct Decider {
    rule: Rule,
    table: WatchedMountTable,
    /// Mount table lines that could not be used, counted once per re-read.
    skipped_lines: Counter,
}

impl Decider {
    fn decide(&self, mounts: &[Mount]) -> Vec<MountDecision> {
        decide(&self.rule, mounts, || {
            self.table.current(|table| {
                for skipped in table.skipped() {
                    tracing::warn!(error = %skipped, "mount table line skipped");
                }
                self.skipped_lines.inc_by(table.skipped().len() as u64);
            })
        })
    }
}

/// How long deciding (`lstat`/`readlink` of host paths, the mount table) may take. A host path
/// on a hung filesystem must not stall the proxy: past this the request goes as it came.
const DECIDE_TIMEOUT: Duration = Duration::from_secs(2);

impl Propagation {
    pub fn new(config: PropagationConfig, registry: &mut Registry) -> Propagation {
        let rewrites = Family::<ResultLabels, Counter>::default();
        registry.register(
            "dockhand_propagation_rewrites",
            "Mounts the Docker-parity propagation rule matched, by what dockhand did",
            rewrites.clone(),
        );
        let skipped_lines = Counter::default();
        registry.register(
            "dockhand_mount_table_skipped_lines",
            "Lines of the host's mount table that could not be parsed (the rest is used)",
            skipped_lines.clone(),
        );
        Propagation {
            decider: Arc::new(Decider {
                rule: Rule::new(&config),
                table: WatchedMountTable::new(Path::new(mountinfo::MOUNTINFO)),
                skipped_lines,
            }),
            deciding: Arc::new(tokio::sync::Semaphore::new(DECIDING_AT_ONCE)),
            timeout: DECIDE_TIMEOUT,
            config,
            rewrites,
        }
    }

    fn count(&self, result: &'static str, n: usize) {
        self.rewrites
            .get_or_create(&ResultLabels { result })
            .inc_by(n as u64);
    }

    /// Decides for `call` (`request` is its decoded copy, None when it does not decode) and
    /// forwards it, edited or as it came.
    pub async fn forward(
        &self,
        call: &UnaryCall,
        request: Option<CreateContainerRequest>,
    ) -> Forwarded {
        if self.config.mode == PropagationMode::Off {
            return Forwarded::as_it_came(call).await;
        }
        let Some(request) = request else {
            tracing::debug!("CreateContainer does not decode; forwarding as is");
            return Forwarded::as_it_came(call).await;
        };
        let Some(config) = request.config.as_ref() else {
            return Forwarded::as_it_came(call).await;
        };
        let pod = request
            .sandbox_config
            .as_ref()
            .and_then(|s| s.metadata.as_ref())
            .map(|m| format!("{}/{}", m.namespace, m.name))
            .unwrap_or_default();
        let container = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let span = tracing::info_span!("create_container", pod = %pod, container = %container);
        self.decide_and_forward(call, request)
            .instrument(span)
            .await
    }

    async fn decide_and_forward(
        &self,
        call: &UnaryCall,
        request: CreateContainerRequest,
    ) -> Forwarded {
        let mounts = request.config.map(|c| c.mounts).unwrap_or_default();
        // The opt-out is read before any host path is touched: a pod may opt out precisely
        // because one of its host paths lives on a filesystem that hangs.
        let opted_out = request
            .sandbox_config
            .as_ref()
            .and_then(|s| s.annotations.get(OPT_OUT_ANNOTATION))
            .is_some_and(|v| v == OPT_OUT_VALUE);
        if opted_out {
            let candidates = mounts.iter().filter(|m| is_candidate(m)).count();
            if candidates > 0 {
                tracing::info!(
                    mounts = candidates,
                    "pod opted out; mounts kept as requested"
                );
                self.count("opted_out", candidates);
            }
            return Forwarded::as_it_came(call).await;
        }
        // A decision stuck on a hung filesystem cannot be cancelled (it is a blocking system
        // call); it holds its permit until it returns, so a hang costs at most
        // DECIDING_AT_ONCE threads and later creates go through unchanged at once.
        let Ok(permit) = self.deciding.clone().try_acquire_owned() else {
            tracing::warn!("earlier decisions are still stuck on host paths; forwarding unchanged");
            self.count("timeout", 1);
            return Forwarded::as_it_came(call).await;
        };
        let decider = self.decider.clone();
        let decided = tokio::task::spawn_blocking(move || {
            let decisions = decider.decide(&mounts);
            drop(permit);
            #[cfg(feature = "test-hooks")]
            after_decide_hook();
            decisions
        });
        let decisions = match tokio::time::timeout(self.timeout, decided).await {
            Ok(Ok(decisions)) => decisions,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "deciding failed; forwarding unchanged");
                self.count("error", 1);
                return Forwarded::as_it_came(call).await;
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.timeout.as_millis() as u64,
                    "host paths did not answer in time (a hung filesystem?); forwarding unchanged"
                );
                self.count("timeout", 1);
                return Forwarded::as_it_came(call).await;
            }
        };
        if decisions.is_empty() {
            return Forwarded::as_it_came(call).await;
        }
        for d in &decisions {
            match &d.decision {
                Decision::Rslave => tracing::info!(
                    container_path = %d.container_path, source = %d.source.display(),
                    dry_run = self.config.mode == PropagationMode::DryRun,
                    "bind mount gets rslave, as on Docker"
                ),
                Decision::KeepPrivate(why) if *why == RECURSIVE_READ_ONLY => tracing::info!(
                    container_path = %d.container_path, source = %d.source.display(), reason = why,
                    "keeping rprivate: a recursive read-only mount needs it"
                ),
                Decision::KeepPrivate(why) => tracing::warn!(
                    container_path = %d.container_path, source = %d.source.display(), reason = why,
                    "keeping rprivate, as Docker's fallback did"
                ),
                // Only made after containerd answered (forward_edited logs it).
                Decision::Refused(_) => {}
            }
        }
        if self.config.mode == PropagationMode::DryRun {
            self.count("dry_run", decisions.len());
            return Forwarded::as_it_came(call).await;
        }
        match wire::apply(&call.message, &edits(&decisions)) {
            Ok(edited) => self.forward_edited(call, &edited, decisions).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot edit CreateContainer; forwarding unchanged");
                self.count("error", decisions.len());
                Forwarded::as_it_came(call).await
            }
        }
    }
}

impl Propagation {
    /// Forwards the `edited` request. If containerd refuses it (see [`refusal`]) and dockhand
    /// asked for rslave, the original goes once instead and its answer is the caller's: a create
    /// that works without dockhand works with it, whatever the reason containerd had (one the
    /// rule could not foresee, such as a host mount made private after deciding). The cost is
    /// one more call, on refusal only.
    ///
    /// The original goes with the decision annotation appended, now saying `private(refused:
    /// <containerd's message>)`, and nothing else changed: annotations are the one part of a
    /// request a runtime stores without acting on it (CRI: they "SHOULD NOT influence runtime
    /// behaviour"), and `crictl inspect`, the audit and the lifecycle record then say what
    /// happened to that container.
    async fn forward_edited(
        &self,
        call: &UnaryCall,
        edited: &[u8],
        decisions: Vec<MountDecision>,
    ) -> Forwarded {
        let reply = call.forward(edited).await;
        let rewrote = decisions.iter().any(|d| d.decision == Decision::Rslave);
        let refused = if rewrote { refusal(&reply) } else { None };
        let (reply, decisions) = match refused {
            None => (reply, decisions),
            Some(status) => {
                tracing::warn!(
                    code = ?status.code(), message = %status.message(),
                    "containerd refused CreateContainer with rslave; sending the original"
                );
                let decisions: Vec<MountDecision> = decisions
                    .into_iter()
                    .map(|d| MountDecision {
                        decision: d.decision.refused(status.message()),
                        ..d
                    })
                    .collect();
                let text = annotation(&decisions);
                let reply = match wire::apply(&call.message, &[annotate(&text)]) {
                    Ok(original) => call.forward(&original).await,
                    // Unreachable: the same bytes took the full edit above.
                    Err(_) => {
                        return Forwarded::as_it_came(call).await;
                    }
                };
                (reply, decisions)
            }
        };
        for d in &decisions {
            self.count(d.decision.result(), 1);
        }
        Forwarded {
            reply,
            decision: Some(annotation(&decisions)),
        }
    }
}

/// Test hook, only in builds with the `test-hooks` feature (the integration tests'; never
/// `make install`'s): a shell command run after each decision, before the request is forwarded
/// (e.g. to make a host mount private between deciding and containerd's own check).
#[cfg(feature = "test-hooks")]
pub const AFTER_DECIDE_ENV: &str = "DOCKHAND_PROPAGATION_AFTER_DECIDE";

#[cfg(feature = "test-hooks")]
fn after_decide_hook() {
    if let Some(command) = std::env::var_os(AFTER_DECIDE_ENV) {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .status();
        tracing::warn!(?command, ?status, "ran {AFTER_DECIDE_ENV}");
    }
}

/// What CreateContainer forwarded: containerd's reply, and the decision annotation's value when
/// dockhand edited the request (None when it went as it came).
pub struct Forwarded {
    pub reply: Reply,
    pub decision: Option<String>,
}

impl Forwarded {
    /// The request forwarded as it came.
    async fn as_it_came(call: &UnaryCall) -> Forwarded {
        Forwarded {
            reply: call.forward_unchanged().await,
            decision: None,
        }
    }
}

/// CreateContainer with the archive off: propagation alone.
impl Interceptor for Propagation {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            let request = call.decode::<CreateContainerRequest>().ok();
            self.forward(&call, request).await.reply
        })
    }
}

#[cfg(test)]
mod tests;
