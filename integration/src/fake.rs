//! A fake containerd for tests and benchmarks of the proxy alone: an HTTP/2 gRPC server on a
//! unix socket that records every request's bytes and answers from a closure. And the proxy
//! itself, run in-process in front of any socket.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dockhand_protos::codec;
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

/// What the fake answers to one call.
#[derive(Debug, Clone)]
pub enum Answer {
    /// One message, status OK.
    Message(Bytes),
    /// Several messages (a server stream), then status OK.
    Stream(Vec<Bytes>),
    /// A trailers-only error: one HEADERS frame with END_STREAM, as grpc-go servers send it.
    Status(tonic::Code, String),
    /// The stream reset with this reason (RST_STREAM), no response.
    Reset(h2::Reason),
    /// The inner answer, after a delay (a slow containerd), without blocking the runtime.
    Delayed(std::time::Duration, Box<Answer>),
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
    /// The request body exactly as received, gRPC frames included.
    pub body: Bytes,
}

impl Seen {
    /// The single message of a unary request.
    pub fn message(&self) -> Bytes {
        codec::unframe(&self.body).expect("one gRPC frame")
    }
}

type Answerer = dyn Fn(&str, &Bytes) -> Answer + Send + Sync;

pub struct FakeUpstream {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl FakeUpstream {
    /// Starts the fake on a fresh socket; `answer` gets the path and the request body.
    pub async fn start(
        answer: impl Fn(&str, &Bytes) -> Answer + Send + Sync + 'static,
    ) -> FakeUpstream {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("fake-containerd.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake socket");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer: Arc<Answerer> = Arc::new(answer);
        let (stop, mut stopped) = oneshot::channel();
        let recorded = seen.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => return,
                    },
                    _ = &mut stopped => return,
                };
                let answer = answer.clone();
                let recorded = recorded.clone();
                let service =
                    hyper::service::service_fn(move |request: http::Request<Incoming>| {
                        let answer = answer.clone();
                        let recorded = recorded.clone();
                        async move { respond(request, &*answer, &recorded).await }
                    });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeUpstream {
            socket,
            seen,
            stop: Some(stop),
            _dir: dir,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every request received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests received for one method, in order (the proxy makes calls of its own too).
    pub fn seen_for(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type FakeBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn respond(
    request: http::Request<Incoming>,
    answer: &Answerer,
    recorded: &Mutex<Vec<Seen>>,
) -> Result<http::Response<FakeBody>, h2::Error> {
    use http_body_util::BodyExt;
    let path = request.uri().path().to_string();
    let headers = request.headers().clone();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let message = codec::unframe(&body).unwrap_or_default();
    recorded.lock().unwrap().push(Seen {
        path: path.clone(),
        headers,
        body,
    });
    let ok_trailers = || {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        trailers
    };
    let mut frames = Vec::new();
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    let mut answer = answer(&path, &message);
    while let Answer::Delayed(delay, inner) = answer {
        tokio::time::sleep(delay).await;
        answer = *inner;
    }
    match answer {
        Answer::Message(message) => {
            frames.push(Ok(Frame::data(codec::frame(&message))));
            frames.push(Ok(Frame::trailers(ok_trailers())));
        }
        Answer::Stream(messages) => {
            frames.extend(messages.iter().map(|m| Ok(Frame::data(codec::frame(m)))));
            frames.push(Ok(Frame::trailers(ok_trailers())));
        }
        Answer::Delayed(..) => unreachable!("unwrapped above"),
        Answer::Reset(reason) => return Err(h2::Error::from(reason)),
        Answer::Status(code, message) => {
            // No body at all: hyper puts END_STREAM on the HEADERS frame.
            let response = response
                .header("grpc-status", (code as i32).to_string())
                .header("grpc-message", message)
                .body(http_body_util::Empty::new().boxed_unsync())
                .expect("valid response");
            return Ok(response);
        }
    }
    Ok(response
        .body(StreamBody::new(futures::stream::iter(frames)).boxed_unsync())
        .expect("valid response"))
}

/// dockhand's proxy running in this process in front of `containerd`.
pub struct InProcessProxy {
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl InProcessProxy {
    /// Starts the proxy with the config text `toml` (listen and containerd are filled in).
    pub async fn start(containerd: &Path, toml: &str) -> InProcessProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("dockhand.sock");
        let mut text = toml.to_string();
        if !toml.contains("[archive]") {
            text.push_str(&crate::proxy::archive_toml(
                &dir.path().join("archive"),
                &dir.path().join("pods"),
            ));
        }
        let mut config: dockhand::config::Config = toml::from_str(&text).expect("valid config");
        config.listen = socket.clone();
        config.containerd = containerd.to_path_buf();
        config.validate().expect("valid config");
        let mut registry = prometheus_client::registry::Registry::default();
        let proxy = dockhand::server::Proxy::new(&config, &mut registry).expect("proxy starts");
        let listener = dockhand::server::bind(&socket).expect("bind proxy socket");
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let _ = dockhand::server::serve(listener, proxy, async {
                let _ = stopped.await;
            })
            .await;
        });
        InProcessProxy {
            socket,
            stop: Some(stop),
            done: Some(done),
            _dir: dir,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops accepting, drains and waits for the server to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for InProcessProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
