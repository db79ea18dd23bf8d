//! cri-tools' critest against a [`Node`]: the images its `pkg/validate` pulls, built from
//! Debian's busybox-static and served by a read-only registry on the node's loopback (set as
//! containerd's mirror for registry.k8s.io, gcr.io and k8s.gcr.io), the run itself, and its JUnit
//! report read back test by test.
//!
//! The registry is Debian's `docker-registry` (distribution 2.8), started in read-only mode on a
//! storage tree written here: a well-kept registry from the distribution beats one of our own,
//! and writing its filesystem layout directly needs no push client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::containerd::Version;
use crate::fixtures::{target_dir, workspace_dir};
use crate::images::{busybox_layer, image, Entry, Image, PATH_ENV};
use crate::node::{terminate, NodeInfo};

/// Where the registry listens, inside the node's network namespace.
pub const REGISTRY_ADDRESS: &str = "127.0.0.1:5000";
/// The fewest specs critest must pass on each side (straight against containerd, and through
/// dockhand) per containerd version, so that a lab or harness that breaks both sides alike (the
/// registry, CNI, the images) is red instead of two equal lists of failures. Measured with
/// critest v1.37.0 and this skip list on 2026-12-07, both sides equal: containerd 1.6.20 passed
/// 81 of 142 specs (11 failed, 50 skipped), 2.4.2 passed 103 (9 failed, 30 skipped). The failures
/// are the lab's busybox stand-in images (no `pgrep`, `ipcs`; NoNewPrivs' log), the hostPort
/// spec, MaskedPaths, and on 1.6 the StopContainer/StopPodSandbox idempotence. Each minimum is
/// the measured count less 3, room for a timing-sensitive spec on a loaded machine. Raise a number
/// when more pass; lower one only with a reason. A version not listed has not been measured:
/// `critest-compare` refuses it.
pub const MIN_PASSED: [(Version, usize); 2] = [(Version::V1_6, 78), (Version::V2_4, 100)];

/// [`MIN_PASSED`] of `version`.
pub fn min_passed(version: Version) -> Option<usize> {
    MIN_PASSED
        .iter()
        .find(|(v, _)| *v == version)
        .map(|(_, n)| *n)
}

/// Names of the specs that passed.
pub fn passed(outcomes: &Outcomes) -> std::collections::BTreeSet<&str> {
    outcomes
        .iter()
        .filter(|(_, status)| *status == "passed")
        .map(|(name, _)| name.as_str())
        .collect()
}

/// The registries critest v1.37 names (`framework.DefaultRegistryPrefix`, `validate.registry`,
/// and k8s.gcr.io in `testSameImageDifferentRegistries`).
pub const MIRRORED: [&str; 3] = ["registry.k8s.io", "gcr.io", "k8s.gcr.io"];
/// critest's `-parallel`: its specs mostly wait (timeouts, `Eventually`), so four ginkgo
/// processes cut a run from ~11 to a few minutes on two cores. Needs the `ginkgo` CLI next to
/// critest (`make tools`).
pub const PARALLEL: u32 = 4;
/// The skip list: one ginkgo regular expression a line, `# reason` after it.
pub const SKIP_LIST: &str = "integration/critest-skip.txt";

/// `target/tools/bin/critest` (built by `make critest-bin`), or `$DOCKHAND_CRITEST`.
pub fn critest_binary() -> Result<PathBuf> {
    let bin = std::env::var_os("DOCKHAND_CRITEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("tools/bin/critest"));
    if !bin.is_file() {
        bail!("{} not found: run `make tools`", bin.display());
    }
    Ok(bin)
}

/// One image: its repository (one registry serves both hosts: their repositories do not
/// overlap), its tags, and its content.
struct Served {
    repository: String,
    tags: Vec<String>,
    image: Image,
}

/// `/etc/passwd` and `/etc/group` with the users critest's user images name (cri-tools
/// `images/build`: uid 1002, `www-data`, 1003:1004, `www-data:1004`, and `default-user` 1000 in
/// `group-defined-in-image` 50000).
fn users_layer() -> BTreeMap<String, Entry> {
    let passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n\
                  www-data:x:33:33:www-data:/var/www:/bin/false\n\
                  default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n";
    let group = "root:x:0:\nnogroup:x:65534:\nwww-data:x:33:\ndefault-user:x:1000:\n\
                 group-defined-in-image:x:50000:default-user\n";
    let mut layer = BTreeMap::new();
    layer.insert("etc".into(), Entry::Dir { mode: 0o755 });
    for (name, data) in [("etc/passwd", passwd), ("etc/group", group)] {
        let data = data.as_bytes().to_vec();
        layer.insert(name.into(), Entry::File { mode: 0o644, data });
    }
    layer
}

/// A layer holding one empty file `/<name>` (cri-tools' `image-test`: `ADD ${TEST} ${TEST}`).
fn marker_layer(name: &str) -> BTreeMap<String, Entry> {
    let mut layer = BTreeMap::new();
    let data = Vec::new();
    layer.insert(name.into(), Entry::File { mode: 0o644, data });
    layer
}

/// A web root for the nginx and httpd stand-ins (busybox `httpd`).
fn www_layer() -> BTreeMap<String, Entry> {
    let mut layer = BTreeMap::new();
    layer.insert("www".into(), Entry::Dir { mode: 0o755 });
    let data = b"<html><body>dockhand test page</body></html>\n".to_vec();
    layer.insert("www/index.html".into(), Entry::File { mode: 0o644, data });
    layer
}

/// The images critest's specs pull, under the names `pkg/validate` uses.
fn served_images(busybox: &Path) -> Result<Vec<Served>> {
    let e2e = "e2e-test-images";
    let staging = "k8s-staging-cri-tools";
    let cmd = |args: &[&str]| json!({ "Env": [PATH_ENV], "Cmd": args });
    let user = |user: &str| json!({ "Env": [PATH_ENV], "Cmd": ["sh"], "User": user });
    let httpd = |port: u16| cmd(&["httpd", "-f", "-v", "-p", &port.to_string(), "-h", "/www"]);
    // (host, repository, tags, extra layers, config)
    type Def = (
        &'static str,
        String,
        Vec<&'static str>,
        Vec<BTreeMap<String, Entry>>,
        serde_json::Value,
    );
    let mut defs: Vec<Def> = vec![
        (
            "registry.k8s.io",
            format!("{e2e}/busybox"),
            vec!["1.29-2"],
            vec![],
            cmd(&["sh"]),
        ),
        // Stand-ins for nginx and httpd: a web server on port 80 that logs its name.
        (
            "registry.k8s.io",
            format!("{e2e}/nginx"),
            vec!["1.14-2"],
            vec![www_layer()],
            httpd(80),
        ),
        (
            "registry.k8s.io",
            format!("{e2e}/httpd"),
            vec!["2.4.39-4"],
            vec![www_layer()],
            cmd(&["sh", "-c", "echo httpd; exec httpd -f -v -p 80 -h /www"]),
        ),
        (
            "registry.k8s.io",
            format!("{e2e}/nonewprivs"),
            vec!["1.3"],
            vec![],
            cmd(&["sh"]),
        ),
        // One image under two registries' names (`registry.k8s.io/pause:3.9` and
        // `k8s.gcr.io/pause:3.9`): one repository here serves both.
        (
            "registry.k8s.io",
            "pause".into(),
            vec!["3.9"],
            vec![marker_layer("pause")],
            cmd(&["sh"]),
        ),
        (
            "gcr.io",
            format!("{staging}/hostnet-nginx-amd64"),
            vec!["latest"],
            vec![www_layer()],
            httpd(12003),
        ),
    ];
    for (name, spec) in [
        ("test-image-user-uid", "1002"),
        ("test-image-user-username", "www-data"),
        ("test-image-user-uid-group", "1003:1004"),
        ("test-image-user-username-group", "www-data:1004"),
        ("test-image-predefined-group", "1000"),
    ] {
        defs.push((
            "gcr.io",
            format!("{staging}/{name}"),
            vec!["latest"],
            vec![users_layer()],
            user(spec),
        ));
    }
    for name in [
        "test-image-1",
        "test-image-2",
        "test-image-3",
        "test-image-latest",
    ] {
        defs.push((
            "gcr.io",
            format!("{staging}/{name}"),
            vec!["latest"],
            vec![marker_layer(name)],
            cmd(&["sh"]),
        ));
    }
    // Different tags, one image; and one tag per image.
    defs.push((
        "gcr.io",
        format!("{staging}/test-image-tags"),
        vec!["1", "2", "3"],
        vec![marker_layer("same-image")],
        cmd(&["sh"]),
    ));
    for tag in ["test", "all"] {
        defs.push((
            "gcr.io",
            format!("{staging}/test-image-tag"),
            vec![tag],
            vec![marker_layer(tag)],
            cmd(&["sh"]),
        ));
    }
    let mut served = Vec::new();
    for (host, repository, tags, extra, config) in defs {
        let mut layers = vec![busybox_layer(busybox)?];
        layers.extend(extra);
        let name = format!("{host}/{repository}:{}", tags[0]);
        served.push(Served {
            image: image(&name, layers, config)?,
            repository,
            tags: tags.into_iter().map(String::from).collect(),
        });
    }
    Ok(served)
}

/// Writes the images in distribution's filesystem storage layout under `root`. Two tags that
/// share a repository (test-image-tag:test and :all) add to the same tree.
fn write_storage(root: &Path, served: &[Served]) -> Result<()> {
    let v2 = root.join("docker/registry/v2");
    let link = |path: PathBuf, digest: &str| -> Result<()> {
        std::fs::create_dir_all(&path)?;
        std::fs::write(path.join("link"), digest)?;
        Ok(())
    };
    for s in served {
        let repo = v2.join("repositories").join(&s.repository);
        let (manifest, rest) = s.image.blobs.split_last().context("image without blobs")?;
        for blob in &s.image.blobs {
            let hex = &blob.digest["sha256:".len()..];
            let dir = v2.join("blobs/sha256").join(&hex[..2]).join(hex);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("data"), &blob.data)?;
        }
        for blob in rest {
            let hex = &blob.digest["sha256:".len()..];
            link(repo.join("_layers/sha256").join(hex), &blob.digest)?;
        }
        let hex = &manifest.digest["sha256:".len()..];
        link(
            repo.join("_manifests/revisions/sha256").join(hex),
            &manifest.digest,
        )?;
        for tag in &s.tags {
            let tag_dir = repo.join("_manifests/tags").join(tag);
            link(tag_dir.join("current"), &manifest.digest)?;
            link(tag_dir.join("index/sha256").join(hex), &manifest.digest)?;
        }
    }
    Ok(())
}

/// The registry of one node: storage and config in `dir`, containerd's `hosts.toml` tree in
/// `dir/hosts` (pass it as [`crate::NodeOptions::registry_config_path`]).
pub struct Registry {
    dir: PathBuf,
    child: Option<Child>,
}

impl Registry {
    /// Writes the images, the registry config and the mirror config into `dir`.
    pub fn prepare(dir: &Path) -> Result<Registry> {
        let served = served_images(Path::new("/bin/busybox"))?;
        write_storage(&dir.join("storage"), &served)?;
        for host in MIRRORED {
            let hosts = dir.join("hosts").join(host);
            std::fs::create_dir_all(&hosts)?;
            std::fs::write(
                hosts.join("hosts.toml"),
                format!(
                    "server = \"https://{host}\"\n\n[host.\"http://{REGISTRY_ADDRESS}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
            )?;
        }
        std::fs::write(
            dir.join("registry.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 maintenance:\n    readonly:\n      enabled: true\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {REGISTRY_ADDRESS}\n",
                dir.join("storage").display()
            ),
        )?;
        Ok(Registry {
            dir: dir.to_path_buf(),
            child: None,
        })
    }

    /// containerd's registry `config_path`.
    pub fn hosts_dir(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    /// Starts `docker-registry` in the node's network namespace and waits until it answers.
    pub fn start(&mut self, node: &NodeInfo) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("registry.log"))?;
        let child = node
            .net_command("docker-registry")
            .arg("serve")
            .arg(self.dir.join("registry.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("run docker-registry (apt-get install docker-registry)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe = node
                .net_command("busybox")
                .args(["wget", "-q", "-O", "/dev/null"])
                .arg(format!("http://{REGISTRY_ADDRESS}/v2/"))
                .output()?;
            if probe.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry did not answer; log:\n{}",
                    std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(5));
        }
    }
}

/// The skip list's expressions, joined for `-ginkgo.skip`.
pub fn skip_expression() -> Result<String> {
    let path = workspace_dir().join(SKIP_LIST);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let entries: Vec<String> = text
        .lines()
        .map(|l| l.split_once('#').map_or(l, |(e, _)| e).trim())
        .filter(|e| !e.is_empty())
        .map(|e| format!("({e})"))
        .collect();
    Ok(entries.join("|"))
}

/// Runs critest against `socket` from inside the node's namespaces, writing the JUnit report to
/// `report`; returns each spec's outcome. critest's own exit status is not an error: failing
/// specs are results to compare.
pub fn run(node: &NodeInfo, socket: &Path, report: &Path, log: &Path) -> Result<Outcomes> {
    let endpoint = format!("unix://{}", socket.display());
    let log_file = std::fs::File::create(log)?;
    let critest = critest_binary()?;
    let tools = critest.parent().context("critest has no directory")?;
    let path = std::env::var("PATH").unwrap_or_default();
    let status = node
        .net_command(&critest)
        .env("PATH", format!("{}:{path}", tools.display()))
        .arg(format!("-parallel={PARALLEL}"))
        .arg(format!("-runtime-endpoint={endpoint}"))
        .arg(format!("-image-endpoint={endpoint}"))
        .arg(format!("-ginkgo.junit-report={}", report.display()))
        .arg(format!("-ginkgo.skip={}", skip_expression()?))
        .arg("-ginkgo.no-color")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("run critest")?;
    let xml = std::fs::read_to_string(report)
        .with_context(|| format!("critest ({status}) wrote no report; see {}", log.display()))?;
    parse_junit(&xml)
}

/// Spec name → `passed`, `failed`, `skipped` (ginkgo's JUnit `status`).
pub type Outcomes = BTreeMap<String, String>;

/// Reads ginkgo's JUnit report: every `<testcase name=… status=…>`.
pub fn parse_junit(xml: &str) -> Result<Outcomes> {
    let mut outcomes = Outcomes::new();
    for case in xml.split("<testcase ").skip(1) {
        let tag = format!(" {}", case.split('>').next().unwrap_or_default());
        let attr = |name: &str| {
            let start = tag
                .find(&format!(" {name}=\""))
                .map(|i| i + name.len() + 3)?;
            let end = tag[start..].find('"')? + start;
            Some(tag[start..end].to_string())
        };
        let (Some(name), Some(status)) = (attr("name"), attr("status")) else {
            bail!("testcase without name or status: {tag}");
        };
        if name.starts_with("[SynchronizedBeforeSuite]") || name.starts_with("[BeforeSuite]") {
            continue;
        }
        outcomes.insert(name, status);
    }
    if outcomes.is_empty() {
        bail!("no testcases in the report");
    }
    Ok(outcomes)
}

/// `passed`/`failed`/`skipped` counts, e.g. `83 passed, 3 failed, 27 skipped`.
pub fn summary(outcomes: &Outcomes) -> String {
    let count = |s: &str| outcomes.values().filter(|v| *v == s).count();
    let other = outcomes.len() - count("passed") - count("failed") - count("skipped");
    let mut text = format!(
        "{} passed, {} failed, {} skipped",
        count("passed"),
        count("failed"),
        count("skipped")
    );
    if other > 0 {
        text.push_str(&format!(", {other} other"));
    }
    text
}

/// Specs whose outcome differs: (name, first, second).
pub fn differences(a: &Outcomes, b: &Outcomes) -> Vec<(String, String, String)> {
    let none = String::from("(absent)");
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let (x, y) = (a.get(name).unwrap_or(&none), b.get(name).unwrap_or(&none));
            (x != y).then(|| (name.clone(), x.clone(), y.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_reports_are_read_test_by_test() {
        let xml = r#"<testsuites><testsuite name="CRI">
<testcase name="[SynchronizedBeforeSuite]" classname="CRI" status="passed" time="1"></testcase>
<testcase name="[It] [sig-node] Image Manager public image with tag should be pulled and removed [Conformance]" classname="CRI" status="passed" time="2.1"></testcase>
<testcase name="[It] [sig-node] Container runtime should support SELinux" classname="CRI" status="skipped" time="0"><skipped message="skipped"></skipped></testcase>
<testcase name="[It] [sig-node] Security Context NoNewPrivs" classname="CRI" status="failed" time="3"><failure message="x">y</failure></testcase>
</testsuite></testsuites>"#;
        let outcomes = parse_junit(xml).unwrap();
        assert_eq!(outcomes.len(), 3);
        assert_eq!(summary(&outcomes), "1 passed, 1 failed, 1 skipped");
        let mut other = outcomes.clone();
        other.insert(
            "[It] [sig-node] Security Context NoNewPrivs".into(),
            "passed".into(),
        );
        assert_eq!(
            differences(&outcomes, &other),
            vec![(
                "[It] [sig-node] Security Context NoNewPrivs".to_string(),
                "failed".to_string(),
                "passed".to_string()
            )]
        );
    }

    /// Every version `make critest` runs has a measured minimum, and none is zero.
    #[test]
    fn every_critest_version_has_a_minimum_of_passed_specs() {
        let makefile = std::fs::read_to_string(workspace_dir().join("Makefile")).unwrap();
        let line = makefile
            .lines()
            .find_map(|l| l.strip_prefix("CRITEST_VERSIONS := "))
            .expect("CRITEST_VERSIONS in the Makefile");
        for version in line.split_whitespace() {
            let version: Version = version.parse().unwrap();
            let min = min_passed(version).unwrap_or_else(|| panic!("no MIN_PASSED for {version}"));
            assert!(min > 0, "{version}");
        }
        let mut outcomes = Outcomes::new();
        outcomes.insert("a".into(), "passed".into());
        outcomes.insert("b".into(), "failed".into());
        assert_eq!(passed(&outcomes).into_iter().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn the_skip_list_has_a_reason_per_entry_and_makes_one_expression() {
        let text = std::fs::read_to_string(workspace_dir().join(SKIP_LIST)).unwrap();
        for line in text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        {
            let (entry, reason) = line.split_once('#').expect("every entry says why");
            assert!(
                !entry.trim().is_empty() && !reason.trim().is_empty(),
                "{line}"
            );
        }
        assert!(skip_expression().unwrap().contains("with digest"));
    }

    /// The storage tree resolves a tag to a manifest whose blobs are all there.
    #[test]
    fn storage_links_tags_to_manifests_and_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let served = served_images(Path::new("/bin/busybox")).unwrap();
        write_storage(dir.path(), &served).unwrap();
        let v2 = dir.path().join("docker/registry/v2");
        let repo = v2.join("repositories/k8s-staging-cri-tools/test-image-tags");
        let digest = std::fs::read_to_string(repo.join("_manifests/tags/2/current/link")).unwrap();
        let hex = &digest["sha256:".len()..];
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                v2.join("blobs/sha256")
                    .join(&hex[..2])
                    .join(hex)
                    .join("data"),
            )
            .unwrap(),
        )
        .unwrap();
        for layer in manifest["layers"].as_array().unwrap() {
            let d = layer["digest"].as_str().unwrap();
            assert!(repo
                .join("_layers/sha256")
                .join(&d[7..])
                .join("link")
                .is_file());
        }
        // Different images for test-image-1 and -2, one image for the three tags.
        let tag = |repo: &str, tag: &str| {
            std::fs::read_to_string(
                v2.join("repositories/k8s-staging-cri-tools")
                    .join(repo)
                    .join("_manifests/tags")
                    .join(tag)
                    .join("current/link"),
            )
            .unwrap()
        };
        assert_ne!(tag("test-image-1", "latest"), tag("test-image-2", "latest"));
        assert_eq!(tag("test-image-tags", "1"), tag("test-image-tags", "3"));
    }
}
