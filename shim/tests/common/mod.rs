//! An in-process fake delegate: a ttrpc server that records every call and answers Create,
//! Start and Delete like the runc shim (pid = this process) and anything else with NotFound.
#![allow(dead_code)] // each test file uses part of it

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim_protos::api::{CreateTaskResponse, DeleteResponse, StartResponse};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::ttrpc::r#async::transport::Listener;
use containerd_shim_protos::ttrpc::r#async::{MethodHandler, Server, Service, TtrpcContext};
use containerd_shim_protos::ttrpc::{self, get_status, Code, Request, Response};
use dockhand_shim::forward::TASK_METHODS;
use tokio::net::UnixListener;

pub const ID: &str = "4f1c0a9e3b2d4c5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6";

/// What the fake delegate received: (service, method, payload, metadata).
pub type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>, Vec<(String, String)>)>>>;

struct FakeMethod {
    seen: Seen,
}

#[async_trait]
impl MethodHandler for FakeMethod {
    async fn handler(&self, _ctx: TtrpcContext, req: Request) -> ttrpc::Result<Response> {
        let metadata = req
            .metadata
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        self.seen.lock().unwrap().push((
            req.service.clone(),
            req.method.clone(),
            req.payload.clone(),
            metadata,
        ));
        let pid = std::process::id();
        let mut res = Response::new();
        res.set_status(get_status(Code::OK, ""));
        res.payload = match req.method.as_str() {
            "Create" => {
                let mut r = CreateTaskResponse::new();
                r.pid = pid;
                let mut bytes = r.write_to_bytes().unwrap();
                bytes.extend_from_slice(&[0xf8, 0x06, 0x2a]); // unknown field 111 = 42
                bytes
            }
            "Start" => {
                let mut r = StartResponse::new();
                r.pid = pid;
                r.write_to_bytes().unwrap()
            }
            "Delete" => {
                let mut r = DeleteResponse::new();
                r.pid = pid;
                r.exit_status = 137;
                r.write_to_bytes().unwrap()
            }
            _ => {
                // A status in the response (a handler's Err would reach the client as UNKNOWN).
                res.set_status(get_status(
                    Code::NOT_FOUND,
                    format!("{}: container {ID} not found", req.method),
                ));
                Vec::new()
            }
        };
        Ok(res)
    }
}

/// A fake delegate serving `service_name` on `path`.
pub async fn fake_delegate(path: &Path, service_name: &str, seen: &Seen) -> Server {
    let methods = TASK_METHODS
        .iter()
        .map(|m| {
            let h: Box<dyn MethodHandler + Send + Sync> =
                Box::new(FakeMethod { seen: seen.clone() });
            (m.to_string(), h)
        })
        .collect();
    let services = HashMap::from([(
        service_name.to_string(),
        Service {
            methods,
            streams: HashMap::new(),
        },
    )]);
    let mut server = Server::new()
        .add_listener(Listener::from(UnixListener::bind(path).unwrap()))
        .register_service(services);
    server.start().await.unwrap();
    server
}
