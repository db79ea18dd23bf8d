//! CreateContainerRequest as dockhand reads it: prost messages that name only the fields the
//! propagation rule and the lifecycle record read, with cri-api v0.37's field numbers.
//!
//! Why views and not the full CRI types: prost skips every field a message does not name (it
//! checks only that its bytes are well-formed), so a field dockhand does not read can change
//! type without failing the decode. With `k8s-cri` 0.11's full types, cri-api v0.37's
//! `KeyValue.value` (now `bytes`: an env value from a binary Secret is not UTF-8) made the whole
//! request fail to decode, and the request went to containerd with no decision and no record.
//! Types generated from v0.37 would fail the same way at the next type change elsewhere. Walking
//! the encoded bytes with `wire::fields` would read the same fields as these views, with a
//! hand-written parser per field instead of prost's.
//!
//! Views are for reading only: a request is forwarded as its original bytes, or edited with
//! [`crate::wire`], never re-encoded from a view (that would drop every field it does not name).

use std::collections::HashMap;

pub use crate::cri::{ContainerMetadata, MountPropagation, PodSandboxMetadata};

/// `runtime.v1.CreateContainerRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<ContainerConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

/// `runtime.v1.ContainerConfig`: metadata, image, mounts, labels, annotations and log path.
/// Not named (skipped): command, args, working_dir, envs (`KeyValue.value` is `bytes` since
/// cri-api v0.37), devices, stdin/tty, linux, windows, CDI devices, stop signal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "2")]
    pub image: Option<ImageSpec>,
    #[prost(message, repeated, tag = "7")]
    pub mounts: Vec<Mount>,
    #[prost(map = "string, string", tag = "9")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "10")]
    pub annotations: HashMap<String, String>,
    #[prost(string, tag = "11")]
    pub log_path: String,
}

/// `runtime.v1.ImageSpec`: the image reference only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

/// `runtime.v1.Mount`: what the propagation rule reads. Not named (skipped, no effect on the
/// rule): readonly (3), selinux_relabel (4), uidMappings (6), gidMappings (7).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mount {
    #[prost(string, tag = "1")]
    pub container_path: String,
    #[prost(string, tag = "2")]
    pub host_path: String,
    /// A [`MountPropagation`], or a value newer than it knows.
    #[prost(int32, tag = "5")]
    pub propagation: i32,
    #[prost(bool, tag = "8")]
    pub recursive_read_only: bool,
    /// An image volume (cri-api v0.31+): present, even empty, means containerd mounts an image.
    #[prost(message, optional, tag = "9")]
    pub image: Option<ImageSpec>,
    #[prost(string, tag = "10")]
    pub image_sub_path: String,
    /// Extra bind mount options (cri-api v0.37).
    #[prost(string, repeated, tag = "11")]
    pub mount_options: Vec<String>,
}

/// `runtime.v1.PodSandboxConfig`: metadata, log directory and annotations.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
}

impl Mount {
    /// The view of a CRI `Mount` (e.g. one of ContainerStatus's), read as a CreateContainer's is.
    pub fn of(mount: &crate::cri::Mount) -> Mount {
        use prost::Message;
        // A message prost just encoded always decodes; the default is unreachable.
        Mount::decode(mount.encode_to_vec().as_slice()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::cri;

    /// A CreateContainerRequest as cri-api v0.37's kubelet encodes it, with an env value that is
    /// not UTF-8 (`KeyValue.value` is `bytes` there) and a mount with `mount_options` (field 11).
    fn v037_request() -> Vec<u8> {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: "pod".into(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "app".into(),
                    attempt: 1,
                }),
                image: Some(cri::ImageSpec {
                    image: "busybox".into(),
                    ..Default::default()
                }),
                envs: vec![cri::KeyValue {
                    key: "SECRET".into(),
                    value: "placeholder".into(),
                }],
                mounts: vec![cri::Mount {
                    container_path: "/rootfs".into(),
                    host_path: "/".into(),
                    recursive_read_only: true,
                    ..Default::default()
                }],
                labels: [("l".to_string(), "1".to_string())].into(),
                annotations: [("a".to_string(), "2".to_string())].into(),
                log_path: "app/1.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(cri::PodSandboxConfig {
                log_directory: "/var/log/pods/x".into(),
                annotations: [("p".to_string(), "3".to_string())].into(),
                ..Default::default()
            }),
        };
        let bytes = request.encode_to_vec();
        // The env value's bytes, made invalid UTF-8 in place (same length).
        let at = bytes
            .windows(11)
            .position(|w| w == b"placeholder")
            .expect("the env value");
        let mut bytes = bytes;
        bytes[at..at + 11].copy_from_slice(b"\xff\xfe binary!!");
        // mount_options = ["noexec"] appended to the mount, with the lengths around it fixed.
        crate::wire::apply(
            &bytes,
            &[crate::wire::Edit {
                path: vec![crate::wire::Step::Field(2), crate::wire::Step::Item(7, 0)],
                op: crate::wire::Op::Append {
                    field: 11,
                    value: b"noexec".to_vec(),
                },
            }],
        )
        .expect("edit")
    }

    #[test]
    fn a_non_utf8_env_value_fails_the_full_decode_but_not_the_view() {
        let bytes = v037_request();
        assert!(cri::CreateContainerRequest::decode(bytes.as_slice()).is_err());
        let view = CreateContainerRequest::decode(bytes.as_slice()).expect("the view decodes");
        assert_eq!(view.pod_sandbox_id, "pod");
        let config = view.config.expect("config");
        assert_eq!(config.metadata.as_ref().map(|m| m.attempt), Some(1));
        assert_eq!(config.image.map(|i| i.image).as_deref(), Some("busybox"));
        assert_eq!(config.labels["l"], "1");
        assert_eq!(config.annotations["a"], "2");
        assert_eq!(config.log_path, "app/1.log");
        assert_eq!(config.mounts.len(), 1);
        assert!(config.mounts[0].recursive_read_only);
        assert_eq!(config.mounts[0].mount_options, ["noexec"]);
        let sandbox = view.sandbox_config.expect("sandbox config");
        assert_eq!(sandbox.log_directory, "/var/log/pods/x");
        assert_eq!(sandbox.annotations["p"], "3");
    }

    #[test]
    fn a_status_mount_reads_as_a_create_mount() {
        let mount = cri::Mount {
            container_path: "/c".into(),
            host_path: "/h".into(),
            propagation: cri::MountPropagation::PropagationHostToContainer as i32,
            recursive_read_only: true,
            image: Some(cri::ImageSpec::default()),
            ..Default::default()
        };
        let view = Mount::of(&mount);
        assert_eq!(
            (view.container_path.as_str(), view.host_path.as_str()),
            ("/c", "/h")
        );
        assert_eq!(view.propagation, mount.propagation);
        assert!(view.recursive_read_only);
        assert!(view.image.is_some());
    }
}
