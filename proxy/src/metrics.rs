//! Prometheus metrics: the registry every component registers into, the per-call CRI metrics
//! (a tower layer around the whole proxy), and the loopback `/metrics` endpoint.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tonic::body::Body;
use tonic::Code;
use tracing::Instrument;

use crate::grpc::{head_code, Reset};

/// CRI methods by name; any other path is counted as `other` so callers cannot grow the label set.
const CRI_METHODS: &[&str] = &[
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "RuntimeConfig",
    "UpdatePodSandboxResources",
    "ListImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
];

/// The metric label for a request path.
pub fn method_label(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or("");
    let known_service = path.starts_with("/runtime.v1.") || path.starts_with("/runtime.v1alpha2.");
    match CRI_METHODS.iter().find(|m| **m == name) {
        Some(method) if known_service => method,
        _ => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

type DurationFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

pub struct CriMetrics {
    requests: Family<CallLabels, Counter>,
    duration: DurationFamily,
}

impl CriMetrics {
    pub fn register(registry: &mut Registry) -> CriMetrics {
        let requests = Family::<CallLabels, Counter>::default();
        let duration: DurationFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.0, 20)));
        registry.register(
            "dockhand_cri_requests",
            "CRI calls through the proxy by method and gRPC code",
            requests.clone(),
        );
        registry.register(
            "dockhand_cri_request_duration_seconds",
            "Time from a CRI call's arrival to the end of its response",
            duration.clone(),
        );
        CriMetrics { requests, duration }
    }

    fn observe(&self, method: &'static str, code: Code, elapsed: Duration) {
        self.requests
            .get_or_create(&CallLabels {
                method,
                code: code_name(code),
            })
            .inc();
        self.duration
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Counts and times every call, and gives it a `cri_call` span. Outermost layer.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<CriMetrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<CriMetrics>) -> MetricsLayer {
        MetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<CriMetrics>,
}

impl<S, B> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Reset>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Reset;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Reset>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Reset>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let span = tracing::debug_span!("cri_call", method = %request.uri().path());
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(
            async move {
                let response = match response.await {
                    Ok(response) => response,
                    Err(reset) => {
                        // A relayed reset: the caller's library reports it as this code.
                        metrics.observe(method, reset.code(), started.elapsed());
                        return Err(reset);
                    }
                };
                let recorder = Recorder {
                    metrics,
                    method,
                    started,
                    done: false,
                };
                if let Some(code) = head_code(response.headers()) {
                    recorder.finish(code);
                    return Ok(response);
                }
                Ok(response.map(|body| {
                    Body::new(MeteredBody {
                        inner: body,
                        recorder,
                    })
                }))
            }
            .instrument(span),
        )
    }
}

struct Recorder {
    metrics: Arc<CriMetrics>,
    method: &'static str,
    started: Instant,
    done: bool,
}

impl Recorder {
    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.started.elapsed();
        self.metrics.observe(self.method, code, elapsed);
        tracing::debug!(method = self.method, code = ?code, elapsed_us = elapsed.as_micros() as u64, "cri call done");
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // A body dropped before its trailers: the caller went away or the stream broke.
        self.record(Code::Cancelled);
    }
}

/// A response body that records the call when its trailers pass.
struct MeteredBody {
    inner: Body,
    recorder: Recorder,
}

impl http_body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(head_code) {
                    self.recorder.record(code);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let code = Reset::find(e).map_or(Code::Unavailable, |reset| reset.code());
                self.recorder.record(code);
            }
            Poll::Ready(None) => self.recorder.record(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `/metrics` on a loopback address until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            () = &mut shutdown => return Ok(()),
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<_>| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(metrics_response(request.uri().path(), &registry)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn metrics_response(path: &str, registry: &Registry) -> http::Response<Full<bytes::Bytes>> {
    if path != "/metrics" {
        let mut response = http::Response::new(Full::new("not found\n".into()));
        *response.status_mut() = http::StatusCode::NOT_FOUND;
        return response;
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    let mut response = http::Response::new(Full::new(text.into()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            method_label("/runtime.v1.RuntimeService/Version"),
            "Version"
        );
        assert_eq!(
            method_label("/runtime.v1.ImageService/ListImages"),
            "ListImages"
        );
        assert_eq!(
            method_label("/runtime.v1.RuntimeService/NoSuchMethod"),
            "other"
        );
        assert_eq!(method_label("/evil.Service/Version"), "other");
    }

    #[test]
    fn observed_calls_are_encoded() {
        let mut registry = Registry::default();
        let metrics = CriMetrics::register(&mut registry);
        metrics.observe("Version", Code::Ok, Duration::from_micros(70));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("dockhand_cri_requests_total{method=\"Version\",code=\"OK\"} 1"));
        assert!(text.contains("dockhand_cri_request_duration_seconds_count{method=\"Version\"} 1"));
    }
}
