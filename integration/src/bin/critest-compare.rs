//! `make critest`: cri-tools' critest run twice on the containerd `DOCKHAND_CONTAINERD` names,
//! once straight against containerd with the stock runc shim, once through `dockhand proxy` with
//! dockhand's shim; the two results must be equal spec by spec (so the specs that pass through
//! dockhand are those that pass direct), and each side must pass at least the version's
//! [`critest::MIN_PASSED`], so a lab broken on both sides alike is not "equal". Both nodes have
//! CNI pods and a read-only registry on their loopback serving locally built images as
//! registry.k8s.io, gcr.io and k8s.gcr.io. Reports go to
//! `target/critest/<version>/{direct,dockhand}.xml`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dockhand_integration::critest::{self, Outcomes, Registry};
use dockhand_integration::{target_dir, Containerd, Network, Node, NodeOptions, ProxyProcess};

const SHIM: &str = "containerd-shim-dockhand-v2";

/// One critest run on a fresh node; `shim` = dockhand's shim and proxy in front.
async fn run(out: &Path, name: &str, shim: Option<&Path>) -> Result<Outcomes> {
    let scratch = tempfile::Builder::new()
        .prefix("dockhand-critest-")
        .tempdir_in("/tmp")?;
    let mut registry = Registry::prepare(scratch.path())?;
    let runtime_path = match shim {
        Some(built) => {
            let bin = scratch.path().join(SHIM);
            std::fs::copy(built, &bin).with_context(|| format!("copy {}", built.display()))?;
            let config = serde_json::json!({ "recordDir": scratch.path().join("records") });
            std::fs::write(
                scratch.path().join(format!("{SHIM}.json")),
                config.to_string(),
            )?;
            Some(bin)
        }
        None => None,
    };
    let node = Node::start(NodeOptions {
        network: Network::Cni,
        registry_config_path: Some(registry.hosts_dir()),
        runtime_path,
        ..NodeOptions::default()
    })
    .await?;
    registry.start(node.info())?;
    let proxy = match shim {
        Some(_) => Some(
            ProxyProcess::start(
                &node,
                &format!(
                    "cgroup_records = \"{}\"",
                    scratch.path().join("records").display()
                ),
            )
            .await?,
        ),
        None => None,
    };
    let socket = match &proxy {
        Some(proxy) => proxy.socket(),
        None => node.containerd_socket().to_path_buf(),
    };
    let started = Instant::now();
    let report = out.join(format!("{name}.xml"));
    let log = out.join(format!("{name}.log"));
    let info = node.info().clone();
    let outcomes =
        tokio::task::spawn_blocking(move || critest::run(&info, &socket, &report, &log)).await??;
    println!(
        "critest {name}: {} in {} s",
        critest::summary(&outcomes),
        started.elapsed().as_secs()
    );
    drop(proxy);
    drop(node);
    drop(registry);
    Ok(outcomes)
}

#[tokio::main]
async fn main() -> Result<()> {
    let containerd = Containerd::selected()?;
    let out = target_dir()
        .join("critest")
        .join(containerd.version.as_str());
    std::fs::create_dir_all(&out)?;
    let shim: PathBuf = std::env::var_os("DOCKHAND_SHIM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug").join(SHIM));
    if !shim.is_file() {
        bail!("{} not found: run `make build`", shim.display());
    }
    let version = containerd.version;
    let Some(min_passed) = critest::min_passed(version) else {
        bail!(
            "critest has no minimum of passed specs for containerd {version}: measure a run and \
             add it to MIN_PASSED (integration/src/critest.rs)"
        );
    };
    println!("critest on {}", containerd.full_version);
    let direct = run(&out, "direct", None).await?;
    let through = run(&out, "dockhand", Some(&shim)).await?;
    let differences = critest::differences(&direct, &through);
    for (spec, a, b) in &differences {
        println!("  {spec}: direct {a}, through dockhand {b}");
    }
    let passed = [
        ("direct", critest::passed(&direct).len()),
        ("through dockhand", critest::passed(&through).len()),
    ];
    let too_few: Vec<String> = passed
        .iter()
        .filter(|(_, n)| *n < min_passed)
        .map(|(side, n)| format!("{side} {n}"))
        .collect();
    if !too_few.is_empty() {
        bail!(
            "critest on containerd {version}: fewer specs passed than the {min_passed} measured \
             (MIN_PASSED): {} (reports in {})",
            too_few.join(", "),
            out.display()
        );
    }
    if !differences.is_empty() {
        bail!(
            "critest on containerd {version}: {} specs differ through dockhand (reports in {})",
            differences.len(),
            out.display()
        );
    }
    println!(
        "critest on containerd {}: equal spec by spec ({})",
        containerd.version,
        critest::summary(&direct)
    );
    Ok(())
}
