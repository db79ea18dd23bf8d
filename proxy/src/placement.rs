//! ContainerStatus, verbose: the shim's cgroup placement record is added to `info` under
//! `dockhand.cgroup`, next to containerd's own `info`, so `crictl inspect` shows where the
//! container sits in the cgroup tree (the answer `docker inspect` gave).

use std::path::PathBuf;
use std::sync::Arc;

use dockhand_host::record;
use dockhand_protos::cri::ContainerStatusRequest;
use dockhand_protos::wire::{self, Edit, Op};
use futures::future::BoxFuture;

use crate::grpc::{Interceptor, Reply, UnaryCall};

/// The `info` key carrying the record.
pub const INFO_KEY: &str = "dockhand.cgroup";
/// `ContainerStatusResponse.info` (map<string, string>).
const RESPONSE_INFO: u32 = 2;

/// The ContainerStatus handler's outer step: the inner handler answers (the archive's, or a plain
/// forward), then a verbose answer gets the record.
pub struct WithRecord {
    inner: Arc<dyn Interceptor>,
    records: Arc<PathBuf>,
}

impl WithRecord {
    pub fn new(inner: Arc<dyn Interceptor>, records: PathBuf) -> WithRecord {
        WithRecord {
            inner,
            records: Arc::new(records),
        }
    }
}

impl Interceptor for WithRecord {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            let request = call.decode::<ContainerStatusRequest>().ok();
            let reply = self.inner.handle(call).await;
            let Some(request) = request.filter(|r| r.verbose) else {
                return reply;
            };
            if reply.code() != tonic::Code::Ok {
                return reply;
            }
            // Reading the record touches the filesystem: off the runtime's thread.
            let records = self.records.clone();
            let id = request.container_id.clone();
            let record = tokio::task::spawn_blocking(move || record::read(&records, &id)).await;
            match record {
                Ok(Ok(Some(record))) => add_record(&request.container_id, &record, reply),
                Ok(Ok(None)) => reply,
                Ok(Err(e)) => {
                    tracing::debug!(container_id = %request.container_id, error = %e, "no cgroup record");
                    reply
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cgroup record task failed");
                    reply
                }
            }
        })
    }
}

/// Adds `record` to a successful reply's `info`; on any failure the reply is returned as it is.
fn add_record(container_id: &str, record: &record::Record, reply: Reply) -> Reply {
    let Some(message) = reply.message() else {
        return reply;
    };
    let Ok(json) = serde_json::to_string(record) else {
        return reply;
    };
    let edit = Edit {
        path: Vec::new(),
        op: Op::Append {
            field: RESPONSE_INFO,
            value: wire::map_entry(INFO_KEY, &json),
        },
    };
    match wire::apply(&message, &[edit]) {
        Ok(edited) => reply.with_message(&edited),
        Err(e) => {
            tracing::warn!(container_id = %container_id, error = %e, "cannot add the cgroup record");
            reply
        }
    }
}
