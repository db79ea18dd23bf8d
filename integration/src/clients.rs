//! Real gRPC clients against a CRI socket: kubelet's own (k8s.io/cri-client), plain grpc-go and
//! grpcio (gRPC C-core), each a driver process (`tools/cri-driver`, `tools/grpcio-driver`) that
//! runs one call a line and prints its gRPC code, message and response. tonic tolerates framing
//! that these clients reject, so what a node's clients see is tested with them.
//!
//! Requests are encoded here (prost) and passed as bytes; responses come back as bytes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use prost::Message;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tonic::{Code, Status};

use crate::fixtures::{target_dir, workspace_dir};

/// How long one driver line may take before the test fails instead of hanging.
const LINE_TIMEOUT: Duration = Duration::from_secs(150);

/// Which client a [`Driver`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// kubelet's client: `remote.NewRemoteRuntimeService` of k8s.io/cri-client (grpc-go).
    Kubelet,
    /// grpc-go invoking the method path with raw bytes (authority `localhost`).
    GrpcGo,
    /// grpcio from PyPI with its defaults (authority: the percent-encoded socket path).
    Grpcio,
}

impl Client {
    pub const ALL: [Client; 3] = [Client::Kubelet, Client::GrpcGo, Client::Grpcio];
}

/// `target/tools/bin/cri-driver` (`make tools`), or `$DOCKHAND_CRI_DRIVER`.
pub fn cri_driver_binary() -> Result<PathBuf> {
    let bin = std::env::var_os("DOCKHAND_CRI_DRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("tools/bin/cri-driver"));
    if !bin.is_file() {
        bail!("{} not found: run `make tools`", bin.display());
    }
    Ok(bin)
}

/// The venv's python with grpcio (`make tools`: `target/tools/venv`).
pub fn grpcio_python() -> Result<PathBuf> {
    let python = target_dir().join("tools/venv/bin/python");
    let stamp = target_dir().join(format!("tools/venv/.grpcio-{GRPCIO_VERSION}"));
    if !python.is_file() || !stamp.is_file() {
        bail!(
            "grpcio {GRPCIO_VERSION} venv not found at {}: run `make tools`",
            python.parent().unwrap().parent().unwrap().display()
        );
    }
    Ok(python)
}

/// The grpcio the venv holds: `tools/grpcio-driver/requirements.txt` pins it, the Makefile stamps it.
pub const GRPCIO_VERSION: &str = "1.76.0";

/// What one call answered.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub code: Code,
    pub message: String,
    /// The response message (unary calls that succeeded).
    pub response: Vec<u8>,
    /// The messages a stream received (`stream_end`).
    pub responses: Vec<Vec<u8>>,
    /// How long the call took, measured by the driver.
    pub elapsed: Duration,
}

impl Outcome {
    /// The response decoded as `M`, or the status.
    pub fn decode<M: Message + Default>(&self) -> Result<M, Status> {
        if self.code != Code::Ok {
            return Err(self.status());
        }
        M::decode(self.response.as_slice())
            .map_err(|e| Status::internal(format!("test: response does not decode: {e}")))
    }

    pub fn status(&self) -> Status {
        Status::new(self.code, self.message.clone())
    }
}

/// One driver process connected to one socket. Dropping it kills the process.
pub struct Driver {
    client: Client,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: tempfile::NamedTempFile,
}

impl Driver {
    /// Starts the driver of `client` against the CRI socket `socket`.
    pub async fn start(client: Client, socket: &Path) -> Result<Driver> {
        let mut command = match client {
            Client::Kubelet | Client::GrpcGo => Command::new(cri_driver_binary()?),
            Client::Grpcio => {
                let mut command = Command::new(grpcio_python()?);
                command.arg(workspace_dir().join("tools/grpcio-driver/driver.py"));
                command
            }
        };
        let stderr = tempfile::NamedTempFile::new()?;
        let mut child = command
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen()?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start the {client:?} driver"))?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("driver stdout")?).lines();
        Ok(Driver {
            client,
            child,
            stdin,
            stdout,
            stderr,
        })
    }

    pub fn client(&self) -> Client {
        self.client
    }

    /// Calls `/runtime.v1.RuntimeService/<method>` with `request` (default deadline 30 s).
    pub async fn call(&mut self, method: &str, request: &impl Message) -> Result<Outcome> {
        self.call_within(method, request, Duration::from_secs(30))
            .await
    }

    /// Like [`Driver::call`] with a deadline of the caller's (kubelet's client keeps its own).
    pub async fn call_within(
        &mut self,
        method: &str,
        request: &impl Message,
        deadline: Duration,
    ) -> Result<Outcome> {
        let client = match self.client {
            Client::Kubelet => "kubelet",
            Client::GrpcGo | Client::Grpcio => "grpc",
        };
        self.line(json!({
            "op": "call",
            "client": client,
            "method": method,
            "request": STANDARD.encode(request.encode_to_vec()),
            "timeout_ms": deadline.as_millis() as u64,
        }))
        .await
    }

    /// Opens server stream `name` of `method` and reads it in the background until
    /// [`Driver::stream_end`]. Streams are grpc-go's or grpcio's; kubelet's client opens
    /// `GetContainerEvents` only, with its own `GetContainerEvents` (kubelet's evented PLEG).
    pub async fn stream_start(
        &mut self,
        name: &str,
        method: &str,
        request: &impl Message,
    ) -> Result<Outcome> {
        let client = match self.client {
            Client::Kubelet => "kubelet",
            Client::GrpcGo | Client::Grpcio => "grpc",
        };
        self.line(json!({
            "op": "stream_start",
            "client": client,
            "name": name,
            "method": method,
            "request": STANDARD.encode(request.encode_to_vec()),
            "timeout_ms": 120_000,
        }))
        .await
    }

    /// Cancels stream `name`; what it received, and its status (CANCELLED once cancelled).
    pub async fn stream_end(&mut self, name: &str) -> Result<Outcome> {
        self.line(json!({ "op": "stream_end", "name": name })).await
    }

    /// grpc-go only: a connection of its own with a `window`-byte flow-control window (stream
    /// and connection), `count` calls of `method` started on it and never read.
    pub async fn stall(
        &mut self,
        method: &str,
        request: &impl Message,
        count: usize,
        window: u32,
    ) -> Result<Outcome> {
        if self.client == Client::Grpcio {
            bail!("stall is a grpc-go driver op");
        }
        self.line(json!({
            "op": "stall",
            "method": method,
            "request": STANDARD.encode(request.encode_to_vec()),
            "count": count,
            "window": window,
        }))
        .await
    }

    async fn line(&mut self, call: Value) -> Result<Outcome> {
        let mut text = call.to_string();
        text.push('\n');
        let written = self.stdin.write_all(text.as_bytes()).await;
        let read = match written {
            Ok(()) => tokio::time::timeout(LINE_TIMEOUT, self.stdout.next_line()).await,
            Err(e) => Ok(Err(e)),
        };
        let line = match read {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => bail!(
                "the {:?} driver ended ({:?}); stderr:\n{}\n(missing tools? run `make tools`)",
                self.client,
                self.child.try_wait(),
                self.stderr_text()
            ),
            Err(_) => bail!(
                "the {:?} driver gave no answer within {LINE_TIMEOUT:?} to {}; stderr:\n{}",
                self.client,
                call["method"],
                self.stderr_text()
            ),
        };
        let value: Value =
            serde_json::from_str(&line).with_context(|| format!("driver printed {line:?}"))?;
        if let Some(error) = value["error"].as_str() {
            bail!("the {:?} driver: {error}", self.client);
        }
        let bytes =
            |v: &Value| -> Result<Vec<u8>> { Ok(STANDARD.decode(v.as_str().unwrap_or_default())?) };
        Ok(Outcome {
            code: Code::from(value["code"].as_i64().unwrap_or(-1) as i32),
            message: value["message"].as_str().unwrap_or_default().to_string(),
            response: bytes(&value["response"])?,
            responses: value["responses"]
                .as_array()
                .map(|all| all.iter().map(bytes).collect::<Result<Vec<_>>>())
                .transpose()?
                .unwrap_or_default(),
            elapsed: Duration::from_millis(value["elapsed_ms"].as_u64().unwrap_or(0)),
        })
    }

    /// The tail of what the driver wrote on stderr (kubelet's client logs there).
    pub fn stderr_text(&self) -> String {
        let text = std::fs::read_to_string(self.stderr.path()).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text[text.floor_char_boundary(start)..].to_string()
    }
}
