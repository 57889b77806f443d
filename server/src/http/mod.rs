//! HTTP transport: listeners, connection handling, body limits and graceful shutdown. Endpoint logic
//! lives in [`routes`].

pub mod routes;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::listener::Conn;

use crate::repository::Repository;

/// A response body of one or more chunks, handed to the connection as they are: a binary-extension
/// answer is its JSON header and then each output's bytes, which are never copied into one buffer
/// first (on a plain TCP connection hyper writes them with one vectored write).
#[derive(Debug, Default)]
pub struct Chunks {
    parts: VecDeque<Bytes>,
    left: u64,
}

impl Chunks {
    /// A body of one chunk.
    pub fn one(body: Bytes) -> Chunks {
        Chunks::many(vec![body])
    }

    /// A body of these chunks, in order.
    pub fn many(parts: Vec<Bytes>) -> Chunks {
        let left = parts.iter().map(|p| p.len() as u64).sum();
        Chunks {
            parts: parts.into_iter().filter(|p| !p.is_empty()).collect(),
            left,
        }
    }
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = self.parts.pop_front();
        if let Some(part) = &next {
            self.left -= part.len() as u64;
        }
        Poll::Ready(next.map(|part| Ok(Frame::data(part))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// Shared state of every handler.
pub struct AppState {
    /// The models.
    pub repo: Arc<Repository>,
    /// Largest request body accepted, in bytes.
    pub max_request_bytes: usize,
    /// API keys, when `--api-keys-file` is set: inference and metadata routes need one.
    pub api_keys: Option<Arc<crate::auth::ApiKeys>>,
    /// Write an audit line per request (`--audit-log`).
    pub audit: bool,
    /// A connection that has not sent a complete request head within this time is closed
    /// (`--header-read-timeout`): slow, silent and idle keep-alive clients do not hold it.
    pub header_read_timeout: Duration,
    /// A request body must have arrived whole within this time (`--body-read-timeout`).
    pub body_read_timeout: Duration,
    /// Server-wide bounds on connections, requests in flight and buffered bytes.
    pub admission: Arc<crate::admission::Admission>,
    /// Where large JSON bodies are parsed and written, off the I/O threads.
    pub offload: crate::offload::Offload,
    /// Registered system shared memory regions (`--allow-client-shm`).
    pub shm: Arc<crate::shm::SharedMemory>,
    /// Compress inference answers for clients that accept it (`--compress-responses`).
    pub compress_responses: bool,
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything (the HTTP port).
    Full,
    /// Only `/metrics`, health, model readiness and model metadata (the metrics port: for the cluster's own
    /// components, never behind API keys).
    MetricsOnly,
}

/// Errors starting the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address is taken or not allowed.
    #[error("failed to listen on {addr}: {source}{}", bind_hint(source))]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Binds a listener (see [`kubemaas_crds::listen::listen`] for what `::` means). Called from
/// within the runtime, which the listener registers with.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    kubemaas_crds::listen::listen(addr)
        .and_then(TcpListener::from_std)
        .map_err(|source| TransportError::Bind { addr, source })
}

/// Serves the connections `accept` hands over until `shutdown` flips to true, then lets in-flight
/// requests finish for at most `grace`.
pub async fn serve(
    mut conns: mpsc::Receiver<Conn>,
    state: Arc<AppState>,
    surface: Surface,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.header_read_timeout)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        // What one HTTP/2 connection may hold at once, as on the gRPC port; a client resetting
        // streams as fast as it opens them ("rapid reset") is cut off by hyper's reset limit.
        .max_concurrent_streams(crate::grpc::MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        // Pings find peers that vanished without closing; unanswered, the connection closes.
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
    loop {
        tokio::select! {
            conn = conns.recv() => {
                let Some(conn) = conn else { break };
                let state = state.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<Response<Chunks>, Infallible>(routes::handle(state, surface, req).await) }
                });
                let watcher = graceful.watcher();
                let conn = builder.serve_connection(TokioIo::new(conn), svc).into_owned();
                // A connection task that fails or panics affects only its own connection.
                tokio::spawn(async move {
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, "connection closed with error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(conns);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!(surface = ?surface, "all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!(surface = ?surface, "shutdown timeout reached with requests still in flight"),
    }
}

/// Header lines one HTTP/1 request may have.
const MAX_HEADERS: usize = 100;
/// Bytes of headers one HTTP/2 request may have.
pub(crate) const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// How often an idle HTTP/2 connection is pinged, on both ports, to find peers that vanished
/// without closing (a node gone, a NAT entry expired).
pub(crate) const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a ping may go unanswered before the connection is closed.
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a client may open and reset before the server has accepted them.
const MAX_PENDING_RESETS: usize = 20;

/// What to do about a port that cannot be bound.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there: stop it, or choose other ports with --http-port, --grpc-port and \
             --metrics-port; 0 picks free ones)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need privileges: choose a port above 1023)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (no interface of this machine has that address: check --host)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(flavor = "current_thread")]
    async fn chunks_arrive_whole_in_order_with_their_exact_length() {
        let body = Chunks::many(vec![
            Bytes::from_static(b"{\"a\":1}"),
            Bytes::new(),
            Bytes::from_static(&[1, 2, 3]),
            Bytes::from_static(&[4]),
        ]);
        assert_eq!(hyper::body::Body::size_hint(&body).exact(), Some(11));
        let all = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(all.ok().as_deref(), Some(&b"{\"a\":1}\x01\x02\x03\x04"[..]));
        let empty = Chunks::many(vec![Bytes::new()]);
        assert!(hyper::body::Body::is_end_stream(&empty));
        assert_eq!(hyper::body::Body::size_hint(&empty).exact(), Some(0));
    }
}
