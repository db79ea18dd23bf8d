//! The `dockhand` command: the CRI proxy and the operator's tools.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dockhand::cli::audit;
use dockhand::config::{Config, DEFAULT_CONFIG_PATH};
use dockhand::server;

/// Exit code for a configuration error (EX_USAGE, as sysexits.h).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "dockhand",
    version,
    about = "Move a Kubernetes node from Docker to containerd without its workloads noticing"
)]
struct Cli {
    /// Log filter (tracing's env-filter syntax); RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the CRI proxy between kubelet and containerd.
    Proxy(ProxyArgs),
    /// Find what would break after a migration without dockhand.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Where each container sits in the cgroup tree (what `docker inspect` told).
    Cgroups(dockhand::cli::cgroups::CgroupsArgs),
    /// Node and volume health for node-problem-detector: exit 0 OK, 1 problem, 2 unknown; one
    /// line of at most 80 bytes, then detail.
    Check(dockhand::cli::check::CheckArgs),
    /// List archived containers, or print one's logs like `kubectl logs`.
    Logs(dockhand::cli::logs::LogsArgs),
    /// `dockhand check`'s statfs child (internal).
    #[command(hide = true)]
    StatfsProbe(dockhand::cli::check::probe::ProbeArgs),
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Config file; a missing default file means all defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket kubelet connects to (overrides `listen`).
    #[arg(long)]
    listen: Option<PathBuf>,
    /// containerd's socket (overrides `containerd`).
    #[arg(long)]
    containerd: Option<PathBuf>,
    /// Loopback address for /metrics (overrides `metrics_address`).
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Running containers that bind-mount Docker's root, its ancestors or inside it privately.
    Propagation(audit::PropagationArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The statfs child: no runtime, no logging (its stderr is /dev/null anyway).
    if let Command::StatfsProbe(args) = cli.command {
        return dockhand::cli::check::probe::child(args);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The CLI's commands run on one thread. The proxy reads its config first: `worker_threads`
    // (default 2) decides its runtime, which make bench measured against one thread. Anything
    // that may block (filesystem work on host paths, compression) runs on tokio's blocking pool
    // or the archive's own thread.
    let mut proxy_config = None;
    let mut builder = tokio::runtime::Builder::new_current_thread();
    if let Command::Proxy(args) = &cli.command {
        let config = match load_config(args) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("dockhand: {:#}", anyhow::Error::from(e));
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        if config.worker_threads > 1 {
            builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(config.worker_threads);
        }
        proxy_config = Some(config);
    }
    let runtime = builder.enable_all().build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dockhand: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if let Some(config) = proxy_config {
            return proxy(config).await;
        }
        match cli.command {
            Command::Cgroups(args) => dockhand::cli::cgroups::run(args)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Check(args) => {
                let code = dockhand::cli::check::main(args).await;
                // Exit now: a thread blocked on a dead mount (the propagation audit resolves
                // host paths) must not hold the process past its deadline.
                let _ = std::io::Write::flush(&mut std::io::stdout());
                std::process::exit(i32::from(code));
            }
            Command::Audit(AuditCommand::Propagation(args)) => {
                audit::propagation(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Logs(args) => dockhand::cli::logs::run(&args, &mut std::io::stdout().lock())
                .map(|()| ExitCode::SUCCESS),
            Command::Proxy(_) | Command::StatfsProbe(_) => {
                unreachable!("handled before the runtime starts")
            }
        }
    });
    // Not a plain drop, which waits for every blocking task: a propagation decision stuck in
    // `lstat` on a hung filesystem must not keep a stopped proxy alive (the drain is over by
    // now, and every file the proxy writes is written temp-then-rename).
    runtime.shutdown_timeout(SHUTDOWN_BLOCKING_WAIT);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dockhand: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long an exiting process waits for its blocking tasks.
const SHUTDOWN_BLOCKING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn proxy(config: Config) -> anyhow::Result<ExitCode> {
    let mut registry = prometheus_client::registry::Registry::default();
    let proxy = server::Proxy::new(&config, &mut registry)?;
    let listener = server::bind(&config.listen)?;
    tracing::info!(
        listen = %config.listen.display(),
        containerd = %config.containerd.display(),
        propagation = ?config.propagation.mode,
        "dockhand proxy started"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = config.metrics_address {
        // The background checker only shows on /metrics: it runs when they are served.
        let checker = dockhand::cli::check::background::Checker::register(&config, &mut registry);
        let registry = Arc::new(registry);
        if let Some(checker) = checker {
            let mut stop = stop_rx.clone();
            tokio::spawn(checker.run(registry.clone(), async move {
                let _ = stop.changed().await;
            }));
        }
        let mut stop = stop_rx.clone();
        let metrics = dockhand::metrics::serve(addr, registry, async move {
            let _ = stop.changed().await;
        });
        tokio::spawn(async move {
            if let Err(e) = metrics.await {
                tracing::warn!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }
    let served = server::serve(listener, proxy, shutdown_signal()).await;
    let _ = stop_tx.send(true);
    served.context("serving CRI")?;
    tracing::info!("dockhand proxy stopped");
    Ok(ExitCode::SUCCESS)
}

fn load_config(args: &ProxyArgs) -> Result<Config, dockhand::config::ConfigError> {
    let (path, required) = match &args.config {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let mut config = Config::load(&path, required)?;
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    if let Some(containerd) = &args.containerd {
        config.containerd = containerd.clone();
    }
    if let Some(addr) = args.metrics_address {
        config.metrics_address = Some(addr);
    }
    config.validate()?;
    Ok(config)
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
