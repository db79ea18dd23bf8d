//! The `dockhand` command line's subcommands (the proxy itself is `server`). Each reads the
//! node through CRI, the archive's files or `/proc`, and prints for people or for
//! node-problem-detector.
//!
//! Layout:
//! - `audit`: `dockhand audit propagation`.
//! - `cgroups`: `dockhand cgroups`, where each container sits in the cgroup tree.
//! - `check`: `dockhand check`, node-problem-detector plugins and the proxy's background
//!   checker.
//! - `logs`: `dockhand logs`, archived containers and their output (`cri_log`: the CRI log
//!   line format and times).
//! - `cri_client`: a CRI client over a unix socket.
//! - `table`: aligned text tables.

pub mod audit;
pub mod cgroups;
pub mod check;
pub mod cri_client;
pub mod cri_log;
pub mod logs;
pub mod table;
