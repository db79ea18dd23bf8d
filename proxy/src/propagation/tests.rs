use super::*;

const SHARED_ROOT: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
30 22 0:25 / /srv/private rw,relatime - tmpfs tmpfs rw
31 22 0:26 / /var/lib/kubelet rw,relatime master:7 - tmpfs tmpfs rw
";

const PRIVATE_ROOT: &str = "22 1 253:0 / / rw,relatime - ext4 /dev/vda rw\n";

fn mount(host: &str, container: &str, propagation: MountPropagation) -> Mount {
    Mount {
        host_path: host.into(),
        container_path: container.into(),
        propagation: propagation as i32,
        ..Default::default()
    }
}

fn private(host: &str, container: &str) -> Mount {
    mount(host, container, MountPropagation::PropagationPrivate)
}

fn config() -> PropagationConfig {
    PropagationConfig::default()
}

fn decide_with(config: &PropagationConfig, mounts: &[Mount], table: &str) -> Vec<MountDecision> {
    decide(&Rule::new(config), mounts, || {
        Ok::<_, std::convert::Infallible>(MountTable::parse(table))
    })
}

#[test]
fn docker_root_ancestors_and_descendants_match() {
    let mounts = [
        private("/", "/rootfs"),
        private("/var", "/host/var"),
        private("/var/lib", "/host/var/lib"),
        private("/var/lib/docker/containers", "/containers"),
        private("/var/lib/docker", "/docker"),
    ];
    let decisions = decide_with(&config(), &mounts, SHARED_ROOT);
    assert_eq!(decisions.len(), 5);
    assert!(decisions.iter().all(|d| d.decision == Decision::Rslave));
    assert_eq!(
        decisions.iter().map(|d| d.index).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
}

#[test]
fn unrelated_and_string_prefix_paths_do_not_match() {
    let mounts = [
        private("/var/lib/doc", "/a"),
        private("/var/lib/dockerd", "/b"),
        private("/etc", "/c"),
        private("/var/log", "/d"),
        private("/variable", "/e"),
    ];
    assert!(decide_with(&config(), &mounts, SHARED_ROOT).is_empty());
}

#[test]
fn explicit_modes_empty_and_relative_paths_are_left_alone() {
    let mounts = [
        mount("/", "/a", MountPropagation::PropagationHostToContainer),
        mount("/", "/b", MountPropagation::PropagationBidirectional),
        private("", "/c"),
        private("var/lib", "/d"),
        Mount {
            propagation: 7, // a value newer than this proto knows
            host_path: "/".into(),
            ..Default::default()
        },
    ];
    assert!(decide_with(&config(), &mounts, SHARED_ROOT).is_empty());
}

#[test]
fn private_host_mount_falls_back_like_docker() {
    let decisions = decide_with(&config(), &[private("/", "/rootfs")], PRIVATE_ROOT);
    assert_eq!(
        decisions[0].decision,
        Decision::KeepPrivate("host mount private")
    );
    assert_eq!(
        annotation(&decisions),
        "/rootfs=private(host mount private)"
    );
}

#[test]
fn the_mount_that_contains_the_source_decides() {
    let mut config = config();
    config.extra_paths = vec!["/srv".into()];
    let decisions = decide_with(
        &config,
        &[private("/srv/private/x", "/x"), private("/srv/other", "/y")],
        SHARED_ROOT,
    );
    assert_eq!(
        decisions[0].decision,
        Decision::KeepPrivate("host mount private")
    );
    assert_eq!(decisions[1].decision, Decision::Rslave);
}

#[test]
fn slave_host_mounts_take_rslave() {
    let mut config = config();
    config.extra_paths = vec!["/var/lib/kubelet".into()];
    let decisions = decide_with(
        &config,
        &[private("/var/lib/kubelet/pods", "/p")],
        SHARED_ROOT,
    );
    assert_eq!(decisions[0].decision, Decision::Rslave);
}

#[test]
fn unreadable_mount_table_keeps_private() {
    let decisions = decide(&Rule::new(&config()), &[private("/", "/rootfs")], || {
        Err::<MountTable, _>("no such file")
    });
    assert_eq!(
        decisions[0].decision,
        Decision::KeepPrivate("host mount table unreadable")
    );
}

#[test]
fn mount_table_is_not_read_when_nothing_matches() {
    let decisions = decide(
        &Rule::new(&config()),
        &[private("/etc", "/etc")],
        || -> Result<MountTable, String> { panic!("read the mount table for nothing") },
    );
    assert!(decisions.is_empty());
}

#[test]
fn symlinked_sources_are_resolved_before_matching() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let data = root.join("data/docker");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(&data, root.join("link")).unwrap();
    let mut config = config();
    config.docker_root = data.clone();
    let table = "22 1 253:0 / / rw shared:1 - ext4 /dev/vda rw\n";
    let link = root.join("link").join("containers");
    let decisions = decide_with(&config, &[private(link.to_str().unwrap(), "/c")], table);
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].source, data.join("containers"));
    assert_eq!(decisions[0].decision, Decision::Rslave);
}

#[test]
fn resolve_keeps_the_missing_rest_of_a_path() {
    assert_eq!(
        resolve(Path::new("/nonexistent-dockhand/a/../b")),
        PathBuf::from("/nonexistent-dockhand/b")
    );
    assert_eq!(resolve(Path::new("/")), PathBuf::from("/"));
}

#[test]
fn is_within_compares_components() {
    assert!(is_within(
        Path::new("/var/lib/docker/x"),
        Path::new("/var/lib/docker")
    ));
    assert!(is_within(
        Path::new("/var/lib/docker"),
        Path::new("/var/lib/docker/")
    ));
    assert!(!is_within(
        Path::new("/var/lib/doc"),
        Path::new("/var/lib/docker")
    ));
    assert!(is_within(Path::new("/var"), Path::new("/")));
}

#[test]
fn edits_set_host_to_container_and_annotate() {
    use dockhand_protos::cri::{self, ContainerConfig};
    use prost::Message;
    let cri_private = |host: &str, container: &str| cri::Mount {
        host_path: host.into(),
        container_path: container.into(),
        ..Default::default()
    };
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: "pod".into(),
        config: Some(ContainerConfig {
            mounts: vec![cri_private("/etc", "/etc"), cri_private("/", "/rootfs")],
            ..Default::default()
        }),
        sandbox_config: None,
    };
    let encoded = request.encode_to_vec();
    let view = CreateContainerRequest::decode(encoded.as_slice()).unwrap();
    let decisions = decide_with(&config(), &view.config.unwrap().mounts, SHARED_ROOT);
    let edited = wire::apply(&encoded, &edits(&decisions)).unwrap();
    let edited = cri::CreateContainerRequest::decode(edited.as_slice()).unwrap();
    let config = edited.config.unwrap();
    assert_eq!(
        config.mounts[0].propagation,
        MountPropagation::PropagationPrivate as i32
    );
    assert_eq!(
        config.mounts[1].propagation,
        MountPropagation::PropagationHostToContainer as i32
    );
    assert_eq!(config.annotations[DECISION_ANNOTATION], "/rootfs=rslave");
}

#[test]
fn resolver_follows_relative_and_chained_links_and_parent_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir_all(root.join("real/inner")).unwrap();
    std::os::unix::fs::symlink("real", root.join("rel")).unwrap();
    std::os::unix::fs::symlink(root.join("rel/inner"), root.join("chain")).unwrap();
    std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
    let mut resolver = Resolver::default();
    assert_eq!(
        resolver.resolve(&root.join("rel/inner")),
        root.join("real/inner")
    );
    assert_eq!(
        resolver.resolve(&root.join("chain/new/x")),
        root.join("real/inner/new/x")
    );
    // `..` after a link applies to where the link led, as Go's EvalSymlinks does.
    assert_eq!(
        resolver.resolve(&root.join("chain/../inner")),
        root.join("real/inner")
    );
    // A loop ends (the path is then treated as missing) instead of hanging.
    assert_eq!(resolver.resolve(&root.join("loop/x")), root.join("loop/x"));
}

#[test]
fn the_annotation_reads_back_per_mount() {
    let decisions = decide_with(
        &config(),
        &[private("/", "/rootfs"), private("/var", "/rootfs/var")],
        PRIVATE_ROOT,
    );
    let text = annotation(&decisions);
    let private = Some(Recorded::Private {
        reason: "host mount private".into(),
    });
    assert_eq!(recorded_decision(&text, "/rootfs"), private);
    assert_eq!(recorded_decision(&text, "/rootfs/var"), private);
    assert_eq!(
        recorded_decision("/rootfs=rslave", "/rootfs"),
        Some(Recorded::Rslave)
    );
    assert_eq!(recorded_decision("/rootfs=rslave", "/root"), None);
    assert_eq!(recorded_decision(&text, "/etc"), None);
}

/// Container paths may hold the separators of the annotation's own format.
#[test]
fn any_container_path_reads_back_as_itself() {
    let decisions = decide_with(
        &config(),
        &[
            private("/", "/a, b=c"),
            private("/var", "/x=rslave, /y"),
            private("/var/lib", "/100%2C"),
        ],
        SHARED_ROOT,
    );
    let text = annotation(&decisions);
    for path in ["/a, b=c", "/x=rslave, /y", "/100%2C"] {
        assert_eq!(
            recorded_decision(&text, path),
            Some(Recorded::Rslave),
            "{text}"
        );
    }
    assert_eq!(recorded_decision(&text, "/a"), None, "{text}");
    assert_eq!(recorded_decision(&text, "/y"), None, "{text}");
    assert_eq!(recorded_decision("/a=bogus", "/a"), None);
}

fn recursive_read_only(host: &str, container: &str) -> Mount {
    Mount {
        recursive_read_only: true,
        ..private(host, container)
    }
}

/// containerd refuses `recursive read-only mount needs private propagation`: such a mount keeps
/// PRIVATE, said so, and the mount table is not read for it.
#[test]
fn recursive_read_only_mounts_keep_private() {
    let decisions = decide(
        &Rule::new(&config()),
        &[recursive_read_only("/", "/rootfs")],
        || -> Result<MountTable, String> { panic!("read the mount table for nothing") },
    );
    assert_eq!(
        decisions[0].decision,
        Decision::KeepPrivate(RECURSIVE_READ_ONLY)
    );
    assert_eq!(decisions[0].decision.result(), "recursive_read_only");
    assert_eq!(
        annotation(&decisions),
        "/rootfs=private(recursive read-only)"
    );
    // Next to a mount that takes rslave, only that one is edited.
    let decisions = decide_with(
        &config(),
        &[recursive_read_only("/", "/ro"), private("/var", "/var")],
        SHARED_ROOT,
    );
    assert_eq!(
        decisions
            .iter()
            .map(|d| d.decision.clone())
            .collect::<Vec<_>>(),
        [Decision::KeepPrivate(RECURSIVE_READ_ONLY), Decision::Rslave]
    );
    assert_eq!(
        edits(&decisions).len(),
        2,
        "one propagation, one annotation"
    );
}

/// Fields that do not change what the host's mount table allows leave the decision as it was.
#[test]
fn readonly_relabel_and_id_mappings_do_not_change_the_decision() {
    use dockhand_protos::cri::{self, IdMapping};
    let mapping = IdMapping {
        host_id: 100000,
        container_id: 0,
        length: 65536,
    };
    let private = |host: &str, container: &str| cri::Mount {
        host_path: host.into(),
        container_path: container.into(),
        ..Default::default()
    };
    // As kubelet encodes them, read as dockhand reads a CreateContainer.
    let mounts = [
        cri::Mount {
            readonly: true,
            ..private("/", "/ro")
        },
        cri::Mount {
            selinux_relabel: true,
            ..private("/var", "/relabel")
        },
        cri::Mount {
            uid_mappings: vec![mapping],
            gid_mappings: vec![mapping],
            ..private("/var/lib", "/idmapped")
        },
    ]
    .map(|m| Mount::of(&m));
    let decisions = decide_with(&config(), &mounts, SHARED_ROOT);
    assert_eq!(decisions.len(), 3);
    assert!(decisions.iter().all(|d| d.decision == Decision::Rslave));
}

/// An image volume (cri-api `Mount.image`) is mounted by containerd from a snapshot, not bound
/// from its host path: left alone, even with a host path the rule would cover.
#[test]
fn image_volumes_are_left_alone() {
    use dockhand_protos::view::ImageSpec;
    let mounts = [
        Mount {
            image: Some(ImageSpec {
                image: "registry/data:1".into(),
            }),
            host_path: String::new(),
            ..private("/", "/image")
        },
        Mount {
            image: Some(ImageSpec::default()),
            ..private("/", "/both")
        },
    ];
    assert!(decide_with(&config(), &mounts, SHARED_ROOT).is_empty());
}

/// A propagation among a mount's `mount_options` (cri-api v0.37 field 11) is the pod's choice;
/// other options change nothing.
#[test]
fn a_propagation_in_mount_options_is_left_alone() {
    let with = |options: &[&str], container: &str| Mount {
        mount_options: options.iter().map(|o| o.to_string()).collect(),
        ..private("/", container)
    };
    let mounts = [
        with(&["rslave"], "/a"),
        with(&["nodev", "private"], "/b"),
        with(&["rshared"], "/c"),
        with(&["noexec", "nosuid"], "/d"),
    ];
    let decisions = decide_with(&config(), &mounts, SHARED_ROOT);
    assert_eq!(
        decisions
            .iter()
            .map(|d| (d.container_path.as_str(), d.decision.clone()))
            .collect::<Vec<_>>(),
        [("/d", Decision::Rslave)]
    );
}

#[test]
fn a_refusal_is_kept_short_on_one_line_and_without_the_separator() {
    assert_eq!(
        refusal_text("not a shared, or slave\nmount"),
        "not a shared; or slave mount"
    );
    // The end is kept: Go puts the cause last.
    let long = format!("{}{}", "a".repeat(50), "é".repeat(100));
    assert_eq!(refusal_text(&long), format!("...{}", "é".repeat(100)));
    let exact = "é".repeat(100);
    assert_eq!(refusal_text(&exact), exact);
    let decisions = [MountDecision {
        index: 0,
        container_path: "/rootfs".into(),
        source: "/".into(),
        decision: Decision::Rslave.refused("no, thanks"),
    }];
    let text = annotation(&decisions);
    assert_eq!(text, "/rootfs=private(refused: no; thanks)");
    assert_eq!(
        recorded_decision(&text, "/rootfs"),
        Some(Recorded::Private {
            reason: "refused: no; thanks".into()
        })
    );
    // A decision that kept private stays what it was.
    assert_eq!(
        Decision::KeepPrivate(RECURSIVE_READ_ONLY).refused("x"),
        Decision::KeepPrivate(RECURSIVE_READ_ONLY)
    );
}

#[test]
fn only_a_finished_refusal_is_one() {
    use crate::grpc::Reply;
    use tonic::{Code, Status};
    for code in [
        Code::Unknown,
        Code::InvalidArgument,
        Code::NotFound,
        Code::AlreadyExists,
        Code::FailedPrecondition,
        Code::Internal,
    ] {
        let refused = refusal(&Reply::error(Status::new(code, "no")));
        assert_eq!(refused.map(|s| s.code()), Some(code));
    }
    for code in [Code::Cancelled, Code::DeadlineExceeded, Code::Unavailable] {
        assert!(refusal(&Reply::error(Status::new(code, "maybe running"))).is_none());
    }
    assert!(refusal(&Reply::reset(h2::Reason::CANCEL)).is_none());
    assert!(refusal(&Reply::reset(h2::Reason::INTERNAL_ERROR)).is_none());
    assert!(refusal(&Reply::ok(b"")).is_none());
}
