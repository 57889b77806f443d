//! HTTP transport: listeners, connection handling, body limits and graceful shutdown. Endpoint logic
//! lives in [`routes`].

pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::repository::Repository;

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
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything (the HTTP port).
    Full,
    /// Only `/metrics`, health and model metadata (the metrics port: for the cluster's own
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

/// Binds a listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TransportError::Bind { addr, source })
}

/// Serves connections from `listener` until `shutdown` flips to true, then lets in-flight requests
/// finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    surface: Surface,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    let header_timeout = state.header_read_timeout;
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // E.g. EMFILE: back off instead of spinning; the listener stays up.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<Response<Full<Bytes>>, std::convert::Infallible>(routes::handle(state, surface, req).await) }
                });
                let watcher = graceful.watcher();
                let builder = builder.clone();
                // A connection task that fails or panics affects only its own connection.
                tokio::spawn(async move {
                    // Until a client sends its first byte the protocol is unknown and hyper's
                    // header timeout has not started: a silent client is closed here.
                    let mut first = [0u8; 1];
                    if tokio::time::timeout(header_timeout, stream.peek(&mut first)).await.is_err() {
                        return;
                    }
                    let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, "connection closed with error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!(surface = ?surface, "all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!(surface = ?surface, "shutdown timeout reached with requests still in flight"),
    }
}

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
