//! The one table of CRI methods dockhand acts on, each with its one handler. Every other method
//! (and every method of another API version) is passed through untouched by the server.
//!
//! A handler gets the whole unary request: it may read a decoded copy, forward the original or
//! edited bytes (through `protos::wire`, never by re-encoding), and read or replace the reply.

use std::sync::Arc;

use bytes::Bytes;
use dockhand_protos::cri::ContainerStatusRequest;
use http_body_util::Full;
use tonic::body::Body;

use crate::archive::Archive;
use crate::grpc::Reply;
use crate::placement::Placement;
use crate::propagation::Propagation;
use crate::upstream::Upstream;

/// The CRI v1 methods dockhand intercepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intercepted {
    /// Docker-parity mount propagation (`propagation.rs`).
    CreateContainer,
    /// Container log archive (`archive.rs`): stage the log file.
    StartContainer,
    /// Container log archive: stage the new file, archive the rotated one.
    ReopenContainerLog,
    /// Container log archive: finalize (queued; never deletes the archive).
    RemoveContainer,
    /// Container log archive: answer for archived containers containerd no longer knows; and
    /// verbose answers get the shim's cgroup record (`placement.rs`).
    ContainerStatus,
}

const TABLE: &[(&str, Intercepted)] = &[
    (
        "/runtime.v1.RuntimeService/CreateContainer",
        Intercepted::CreateContainer,
    ),
    (
        "/runtime.v1.RuntimeService/StartContainer",
        Intercepted::StartContainer,
    ),
    (
        "/runtime.v1.RuntimeService/ReopenContainerLog",
        Intercepted::ReopenContainerLog,
    ),
    (
        "/runtime.v1.RuntimeService/RemoveContainer",
        Intercepted::RemoveContainer,
    ),
    (
        "/runtime.v1.RuntimeService/ContainerStatus",
        Intercepted::ContainerStatus,
    ),
];

pub fn lookup(path: &str) -> Option<Intercepted> {
    TABLE
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, method)| *method)
}

/// One intercepted unary call: the caller's request head and its single message.
pub struct UnaryCall {
    head: http::request::Parts,
    pub message: Bytes,
    upstream: Upstream,
}

impl UnaryCall {
    pub fn new(head: http::request::Parts, message: Bytes, upstream: Upstream) -> UnaryCall {
        UnaryCall {
            head,
            message,
            upstream,
        }
    }

    /// A decoded copy of the request, for reading only.
    pub fn decode<T: prost::Message + Default>(&self) -> Result<T, prost::DecodeError> {
        T::decode(self.message.clone())
    }

    /// Forwards `message` (the original or an edited copy) with the caller's headers.
    pub async fn forward(&self, message: &[u8]) -> Reply {
        let body = Body::new(Full::new(dockhand_protos::codec::frame(message)));
        let response = self
            .upstream
            .send(request_with_body(&self.head, body))
            .await;
        Reply::collect(response).await
    }

    /// Forwards the request exactly as it came.
    pub async fn forward_unchanged(&self) -> Reply {
        let message = self.message.clone();
        self.forward(&message).await
    }
}

/// A new request with the same method, URI, version and headers as `head`.
pub fn request_with_body(head: &http::request::Parts, body: Body) -> http::Request<Body> {
    let mut request = http::Request::new(body);
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    request.headers_mut().remove(http::header::CONTENT_LENGTH);
    request
}

/// The handlers' shared state.
pub struct Handlers {
    pub propagation: Propagation,
    /// The shim's cgroup records, for verbose ContainerStatus (`placement.rs`).
    pub placement: Placement,
    /// The container log archive; None when switched off.
    pub archive: Option<Arc<Archive>>,
}

impl Handlers {
    pub async fn handle(self: &Arc<Self>, method: Intercepted, call: UnaryCall) -> Reply {
        match method {
            Intercepted::CreateContainer => self.propagation.create_container(call).await,
            Intercepted::StartContainer => match &self.archive {
                Some(archive) => archive.start_container(call).await,
                None => call.forward_unchanged().await,
            },
            Intercepted::ReopenContainerLog => match &self.archive {
                Some(archive) => archive.reopen_container_log(call).await,
                None => call.forward_unchanged().await,
            },
            Intercepted::RemoveContainer => match &self.archive {
                Some(archive) => archive.remove_container(call).await,
                None => call.forward_unchanged().await,
            },
            Intercepted::ContainerStatus => {
                // Decoded once for both steps: the archive needs the id, placement the verbosity.
                let request = call.decode::<ContainerStatusRequest>().ok();
                let reply = match &self.archive {
                    Some(archive) => archive.container_status(call, request.as_ref()).await,
                    None => call.forward_unchanged().await,
                };
                self.placement.add_record(request.as_ref(), reply)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_v1_paths_in_the_table_are_intercepted() {
        assert_eq!(
            lookup("/runtime.v1.RuntimeService/CreateContainer"),
            Some(Intercepted::CreateContainer)
        );
        assert_eq!(
            lookup("/runtime.v1alpha2.RuntimeService/CreateContainer"),
            None
        );
        assert_eq!(lookup("/runtime.v1.RuntimeService/Version"), None);
        assert_eq!(lookup("/runtime.v1.RuntimeService/createcontainer"), None);
    }
}
