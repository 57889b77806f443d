//! The Open Inference Protocol over gRPC (KServe's `inference.GRPCInferenceService` with Triton's
//! extensions) and the standard `grpc.health.v1` service, on their own port. Requests decode into
//! the same [`crate::tensor::Tensor`] and run through the same [`crate::inference::execute`] as
//! REST, so batching, statistics and metrics are shared.

pub mod budget;
pub mod codec;
pub mod service;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use crate::http::AppState;
use crate::listener::Conn;
use crate::protocol::error::ApiError;

/// Messages and stubs generated from `proto/inference.proto` (package `inference`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod pb {
    tonic::include_proto!("inference");
}

/// Messages and stubs generated from `proto/health.proto` (package `grpc.health.v1`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod health_pb {
    tonic::include_proto!("grpc.health.v1");
}

/// The gRPC status for an error: the codes gRPC clients retry and report by.
pub fn status(e: &ApiError) -> Status {
    let code = match e {
        ApiError::BadRequest(_) => Code::InvalidArgument,
        ApiError::NotFound(_) => Code::NotFound,
        ApiError::MethodNotAllowed { .. } => Code::Unimplemented,
        ApiError::PayloadTooLarge(_) => Code::ResourceExhausted,
        // A full queue is UNAVAILABLE in Triton (the HTTP 503's code), which retry policies cover.
        ApiError::Unavailable(_) | ApiError::Overloaded(_) | ApiError::QueueFull(_) => Code::Unavailable,
        ApiError::RequestTimeout(_) => Code::DeadlineExceeded,
        ApiError::Internal(_) => Code::Internal,
        ApiError::Unauthorized(_) => Code::Unauthenticated,
        ApiError::Forbidden(_) => Code::PermissionDenied,
        ApiError::AlreadyExists(_) => Code::AlreadyExists,
        ApiError::UnsupportedMediaType(_) => Code::Unimplemented,
    };
    // Shorter than REST's: grpc-message percent-encodes non-ASCII bytes (3 each), and clients
    // keep trailers under 8 KiB.
    Status::new(
        code,
        crate::protocol::error::clip(&e.to_string(), GRPC_MESSAGE_BYTES).into_owned(),
    )
}

/// The most bytes of a gRPC status message (see [`status`]).
pub const GRPC_MESSAGE_BYTES: usize = 2048;

/// The statuses tonic answers itself, before any handler runs, in the codes gRPC clients expect:
/// a message over the size limit is OUT_OF_RANGE in tonic and RESOURCE_EXHAUSTED by gRPC's
/// convention; bytes that are not a protobuf message are INTERNAL in tonic, but the client sent
/// them (INVALID_ARGUMENT). The server's own handlers never answer OUT_OF_RANGE, nor INTERNAL
/// with prost's decode message.
pub fn transport_status(limit: usize) -> impl Fn(Status) -> Status + Clone {
    move |s: Status| match s.code() {
        Code::OutOfRange => Status::resource_exhausted(format!(
            "{}; send less data per request or raise --max-request-bytes (now {limit})",
            s.message()
        )),
        Code::Internal if s.message().starts_with("failed to decode Protobuf message") => {
            Status::invalid_argument(format!("the request is not a valid message: {}", s.message()))
        }
        _ => s,
    }
}

/// Rewrites a trailers-only error response's status (how tonic answers a request it could not
/// decode) with `f`.
#[derive(Clone)]
struct RewriteStatus<F>(F);

impl<F: Fn(Status) -> Status> RewriteStatus<F> {
    fn apply<B>(&self, mut resp: http::Response<B>) -> http::Response<B> {
        if let Some(s) = Status::from_header_map(resp.headers())
            && s.code() != Code::Ok
        {
            let new = (self.0)(s);
            let headers = resp.headers_mut();
            headers.remove("grpc-status");
            headers.remove("grpc-message");
            headers.remove("grpc-status-details-bin");
            if let Err(e) = new.add_header(headers) {
                tracing::debug!(error = %e, "could not rewrite a gRPC status");
            }
        }
        resp
    }
}

/// The gRPC method a call names (the last segment of its path), kept for the key check.
#[derive(Clone)]
struct Method(Arc<str>);

/// Methods open without an API key, as their REST twins are: the probes of the kubelet, load
/// balancers and meshes.
fn open_without_key(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || matches!(
            path.rsplit('/').next(),
            Some("ServerLive" | "ServerReady" | "ModelReady")
        )
}

/// Refuses a call without a valid key from its headers alone, as REST answers 401 before it reads
/// a body: tonic reads and decodes (and inflates) the whole message before a handler runs, so a
/// check there let a caller without a key hold the body budget every valid caller shares. Which
/// model a key may call is checked by the handlers, which read the model's name from the message.
fn check_key(state: &AppState, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
    let Some(keys) = state.api_keys.as_deref() else {
        return Ok(req);
    };
    let Some(Method(method)) = req.extensions().get::<Method>() else {
        return Ok(req);
    };
    let header = req.metadata().get("authorization").map(|v| v.as_bytes());
    let mut caller = None;
    match crate::auth::authorize(Some(keys), header, None, &mut caller) {
        Ok(()) => Ok(req),
        Err(e) => {
            if state.audit {
                crate::audit::write(&crate::audit::Record {
                    protocol: "grpc",
                    route: method,
                    model: None,
                    version: None,
                    caller: caller.as_deref(),
                    status: &format!("{:?}", Code::Unauthenticated),
                    bytes_in: 0,
                    bytes_out: 0,
                    latency: Duration::ZERO,
                });
            }
            Err(status(&e))
        }
    }
}

/// Calls and streams one connection may have open at once; more wait in the client.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// Serves gRPC on `listener` until `shutdown` flips to true, then lets in-flight calls and streams
/// finish for at most `grace` (streams stop taking new requests at once and end after answering
/// the ones they hold).
pub async fn serve(
    conns: mpsc::Receiver<Conn>,
    state: Arc<AppState>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let limit = state.max_request_bytes;
    let budget = budget::BodyBudget {
        admission: state.admission.clone(),
        timeout: state.body_read_timeout,
    };
    let inference = pb::grpc_inference_service_server::GrpcInferenceServiceServer::new(
        service::Inference::new(state.clone(), shutdown.clone()),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(usize::MAX)
    // What tritonclient's `compression_algorithm` and perf_analyzer's
    // --grpc-compression-algorithm send, as Triton accepts them. A message inflates to at most
    // --max-request-bytes (tonic stops it there: RESOURCE_EXHAUSTED). Answers go uncompressed,
    // as Triton's do by default: clients advertise gzip whether or not they want the CPU spent.
    .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
    .accept_compressed(tonic::codec::CompressionEncoding::Deflate);
    let keyed = state.clone();
    let health = health_pb::health_server::HealthServer::new(service::Health::new(state, shutdown.clone()));
    let rewrite = RewriteStatus(transport_status(limit));
    let incoming = futures::stream::unfold(conns, |mut conns| async move {
        conns.recv().await.map(|c| (Ok::<_, std::io::Error>(c), conns))
    });
    let mut stop = shutdown.clone();
    let signal = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let server = tonic::transport::Server::builder()
        // Bounds what one connection holds at once (each call or stream holds its messages).
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        // As on the HTTP port: the same header bound, and pings that free the places of peers
        // that vanished without closing.
        .http2_max_header_list_size(crate::http::MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(crate::http::KEEP_ALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(crate::http::KEEP_ALIVE_TIMEOUT))
        // The key is checked first, on the headers, before anything reads the body.
        .layer(tower::util::MapRequestLayer::new(|mut r: http::Request<_>| {
            let path = r.uri().path();
            if !open_without_key(path) {
                let method = Method(path.rsplit('/').next().unwrap_or_default().into());
                r.extensions_mut().insert(method);
            }
            r
        }))
        .layer(tonic::service::InterceptorLayer::new(move |req| {
            check_key(&keyed, req)
        }))
        .layer(tower::util::MapRequestLayer::new(move |r| budget.wrap(r)))
        .layer(tower::util::MapResponseLayer::new(move |r| {
            rewrite.apply::<tonic::body::Body>(r)
        }))
        .add_service(inference)
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, signal);
    let mut stopped = shutdown;
    let deadline = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => match r {
            Ok(()) => tracing::info!(surface = "grpc", "all connections drained"),
            Err(e) => tracing::error!(error = %e, "gRPC server failed"),
        },
        _ = deadline => tracing::warn!(surface = "grpc", "shutdown timeout reached with requests still in flight"),
    }
}
