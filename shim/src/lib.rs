//! containerd-shim-dockhand-v2: a runtime v2 shim that delegates every call to the stock
//! `containerd-shim-runc-v2` and records, for every container, where it sits in the cgroup tree.
//!
//! containerd starts this binary exactly as it would start the runc shim. Its `start` action runs
//! the delegate's `start` with the same arguments, working directory, stdin and environment, then
//! serves a socket of its own (one per delegate, so one per pod) and answers containerd in the
//! delegate's reply format with its own address. Every Task API call is forwarded to the delegate
//! as raw ttrpc bytes under the service name containerd used (`containerd.task.v2.Task` or `v3`);
//! only Create, Start, Delete and Connect are decoded, to write the record. Status codes and
//! errors pass through unchanged and the delegate publishes events itself.
//!
//! Layout:
//! - `args`: the flags containerd passes to shim binaries.
//! - `config`: the record directory and delegate path (file next to the binary, env overrides).
//! - `reply`: the `start` reply formats (plain address, JSON, protobuf) and rewriting them.
//! - `actions`: the `start`, `delete` and pass-through actions (processes, not RPC).
//! - `forward`: the ttrpc forwarder: one raw handler per Task method and service name.
//! - `placement`: what the forwarder observes: the record written at Create, completed at Start,
//!   removed at Delete.
//! - `daemon`: the long-running shim: serve, watch the delegate, exit when it exits.
//! - `logging`: tracing to the `log` fifo containerd reads.
#![forbid(unsafe_code)]

pub mod actions;
pub mod args;
pub mod config;
pub mod daemon;
pub mod forward;
pub mod logging;
pub mod placement;
pub mod reply;

/// The action name the `start` action gives the daemon it launches.
pub const DAEMON_ACTION: &str = "dockhand-serve";
