//! The ttrpc forwarder: every Task API call containerd makes on this shim's socket goes to the
//! delegate as the same ttrpc `Request` (service name, method, payload bytes, metadata, timeout),
//! and the delegate's `Response` (status and payload bytes) comes back unchanged.
//!
//! ttrpc dispatches on (service, method) with no catch-all, so the forwarder registers one raw
//! handler per Task method under both service names containerd uses: `containerd.task.v2.Task`
//! (containerd 1.x, and 2.x talking to a v2 shim) and `containerd.task.v3.Task` (2.x). The
//! messages of both are the same; nothing is decoded here. The few methods the shim observes
//! (see [`OBSERVED`]) are handed to an [`Observer`] after the delegate answered, and the observer
//! cannot change the answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::ttrpc::r#async::{Client, MethodHandler, Service, TtrpcContext};
use containerd_shim_protos::ttrpc::{self, get_status, Code, Request, Response};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// The Task service names containerd calls shims by.
pub const TASK_SERVICES: [&str; 2] = ["containerd.task.v2.Task", "containerd.task.v3.Task"];

/// Every method of the Task service (containerd `api/runtime/task/v2|v3/shim.proto`).
pub const TASK_METHODS: [&str; 17] = [
    "State",
    "Create",
    "Start",
    "Delete",
    "Pids",
    "Pause",
    "Resume",
    "Checkpoint",
    "Kill",
    "Exec",
    "ResizePty",
    "CloseIO",
    "Update",
    "Wait",
    "Stats",
    "Connect",
    "Shutdown",
];

/// Methods whose request and response the observer sees.
pub const OBSERVED: [&str; 4] = ["Create", "Start", "Delete", "Connect"];

/// Sees observed calls after the delegate answered. It must not block for long: containerd is
/// waiting for the answer.
pub trait Observer: Send + Sync + 'static {
    fn observe(&self, method: &str, request: &[u8], response: &Response);
}

/// State shared by all handlers.
pub struct Shared {
    client: Client,
    observer: Arc<dyn Observer>,
    /// Notified when the delegate can no longer be reached.
    pub lost: Notify,
    in_flight: AtomicUsize,
}

impl Shared {
    pub fn new(client: Client, observer: Arc<dyn Observer>) -> Arc<Shared> {
        Arc::new(Shared {
            client,
            observer,
            lost: Notify::new(),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Calls being forwarded right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// The ttrpc services to register: every Task method under every Task service name.
pub fn services(shared: &Arc<Shared>) -> HashMap<String, Service> {
    TASK_SERVICES
        .iter()
        .map(|name| {
            let methods = TASK_METHODS
                .iter()
                .map(|method| {
                    let handler: Box<dyn MethodHandler + Send + Sync> = Box::new(Forward {
                        shared: shared.clone(),
                        observed: OBSERVED.contains(method),
                    });
                    (method.to_string(), handler)
                })
                .collect();
            let service = Service {
                methods,
                streams: HashMap::new(),
            };
            (name.to_string(), service)
        })
        .collect()
}

struct Forward {
    shared: Arc<Shared>,
    observed: bool,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl MethodHandler for Forward {
    async fn handler(&self, _ctx: TtrpcContext, req: Request) -> ttrpc::Result<Response> {
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight(&self.shared.in_flight);
        let method = req.method.clone();
        let observed = self.observed.then(|| req.payload.clone());
        debug!(service = %req.service, method = %method, "forward");
        let deadline = (req.timeout_nano > 0)
            .then(|| std::time::Duration::from_nanos(req.timeout_nano as u64));
        let started = std::time::Instant::now();
        let response = match self.shared.client.request(req).await {
            Ok(response) => response,
            Err(ttrpc::Error::RpcStatus(status)) => {
                let mut response = Response::new();
                response.set_status(status);
                response
            }
            Err(e @ (ttrpc::Error::RemoteClosed | ttrpc::Error::LocalClosed)) => {
                // The delegate is gone. containerd must see what it sees when the stock shim
                // dies: the connection closing, not an answer. The daemon exits on `lost`.
                warn!(method = %method, error = %e, "delegate connection lost");
                self.shared.lost.notify_one();
                return std::future::pending().await;
            }
            Err(e) => {
                // ttrpc-rust reports its own timeout only as `Error::Others(text)`; the deadline
                // having passed is what decides, not the words of the error.
                let code = match deadline {
                    Some(deadline) if started.elapsed() >= deadline => Code::DEADLINE_EXCEEDED,
                    _ => Code::UNAVAILABLE,
                };
                warn!(method = %method, error = %e, "forward failed");
                let mut response = Response::new();
                response.set_status(get_status(code, e.to_string()));
                response
            }
        };
        if let Some(request) = observed {
            self.shared.observer.observe(&method, &request, &response);
        }
        Ok(response)
    }
}
