//! The `dockhand` command line's subcommands.

pub mod check;
