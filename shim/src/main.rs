//! containerd-shim-dockhand-v2: parse the flags, set up logging, run the action.
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use dockhand_host::cgroup::CgroupMounts;
use dockhand_shim::actions::{self, ENV_DELEGATE_ADDRESS};
use dockhand_shim::config::Config;
use dockhand_shim::placement::Recorder;
use dockhand_shim::{args, daemon, logging, DAEMON_ACTION};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "shim action failed");
            // containerd shows a failed action's output in its error.
            let _ = writeln!(std::io::stderr(), "containerd-shim-dockhand-v2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[OsString]) -> Result<ExitCode> {
    let flags = args::parse(args)?;
    logging::init(flags.debug);
    let config = Config::load()?;
    match flags.action.as_str() {
        "start" => Ok(actions::start(&flags, args, &config)?),
        "delete" => Ok(actions::delete(&flags, args, &config)?),
        DAEMON_ACTION => serve(&config),
        _ => Ok(actions::pass_through(args, &config)?),
    }
}

/// The daemon: the listener the `start` action bound is our stdin.
fn serve(config: &Config) -> Result<ExitCode> {
    let delegate_address =
        std::env::var(ENV_DELEGATE_ADDRESS).context("the daemon needs its delegate's address")?;
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("take the listener from stdin")?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    let own_path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(PathBuf::from))
        .context("the listener has no path")?;
    listener.set_nonblocking(true)?;
    let mounts = CgroupMounts::read()?;
    let recorder = Arc::new(Recorder::new(
        config.record_dir.clone(),
        PathBuf::from("/proc"),
        mounts,
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let stopped = runtime.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            sigterm.recv().await;
        };
        anyhow::Ok(daemon::run(listener, &delegate_address, recorder, shutdown).await?)
    });
    let delegate_path = daemon::socket_path(&delegate_address).unwrap_or_default();
    daemon::cleanup(&own_path, &delegate_path);
    tracing::info!(?stopped, "exit");
    stopped?;
    Ok(ExitCode::SUCCESS)
}
