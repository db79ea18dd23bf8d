//! ContainerStatus, verbose: the shim's cgroup placement record is added to `info` under
//! `dockhand.cgroup`, next to containerd's own `info`, so `crictl inspect` shows where the
//! container sits in the cgroup tree (the answer `docker inspect` gave).

use std::path::PathBuf;

use dockhand_host::record;
use dockhand_protos::cri::ContainerStatusRequest;
use dockhand_protos::wire::{self, Edit, Op};

use crate::grpc::Reply;

/// The `info` key carrying the record.
pub const INFO_KEY: &str = "dockhand.cgroup";
/// `ContainerStatusResponse.info` (map<string, string>).
const RESPONSE_INFO: u32 = 2;

pub struct Placement {
    records: PathBuf,
}

impl Placement {
    pub fn new(records: PathBuf) -> Placement {
        Placement { records }
    }

    /// Adds the record to a successful verbose reply; any other reply is returned as it is.
    pub fn add_record(&self, request: Option<&ContainerStatusRequest>, reply: Reply) -> Reply {
        let Some(request) = request.filter(|r| r.verbose) else {
            return reply;
        };
        let Some(message) = reply.message() else {
            return reply;
        };
        let record = match record::read(&self.records, &request.container_id) {
            Ok(Some(record)) => record,
            Ok(None) => return reply,
            Err(e) => {
                tracing::debug!(container_id = %request.container_id, error = %e, "no cgroup record");
                return reply;
            }
        };
        let Ok(json) = serde_json::to_string(&record) else {
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
                tracing::warn!(container_id = %request.container_id, error = %e, "cannot add the cgroup record");
                reply
            }
        }
    }
}
