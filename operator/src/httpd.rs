//! `/healthz`, `/readyz` and `/metrics` of the operator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;

use crate::metrics::Metrics;

/// What the endpoints report.
pub struct Health {
    /// Metrics rendered on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// `/readyz` answers 200 while set: the apiserver answered the last probe (see
    /// [`probe_apiserver`]); a standby is ready too, as it would take over.
    pub ready: AtomicBool,
}

/// How often the apiserver is probed, and how long one probe may take.
pub const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps `health.ready` equal to "the apiserver at `url` answered `GET /version` within
/// [`PROBE_EVERY`] on the last try", logging each change with the URL (a bare "client error
/// (Connect)" every few seconds does not say which server is unreachable). Runs until the process
/// ends.
pub async fn probe_apiserver(client: kube::Client, url: String, health: Arc<Health>) {
    let mut reachable: Option<bool> = None;
    loop {
        let answer = tokio::time::timeout(PROBE_EVERY, client.apiserver_version()).await;
        let ok = matches!(answer, Ok(Ok(_)));
        health.ready.store(ok, Ordering::SeqCst);
        if reachable != Some(ok) {
            match answer {
                Ok(Ok(v)) => {
                    tracing::info!(apiserver = %url, version = %v.git_version, "apiserver reachable")
                }
                Ok(Err(e)) => {
                    tracing::error!(apiserver = %url, error = %kubemaas_crds::report::chain(&e), "cannot reach the apiserver; /readyz answers 503 until it answers")
                }
                Err(_) => {
                    tracing::error!(apiserver = %url, timeout = ?PROBE_EVERY, "the apiserver did not answer in time; /readyz answers 503 until it answers")
                }
            }
            reachable = Some(ok);
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

fn respond(health: &Health, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "ok".to_string()),
        "/readyz" if health.ready.load(Ordering::SeqCst) => (StatusCode::OK, "ok".to_string()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready".to_string()),
        "/metrics" => (StatusCode::OK, health.metrics.render()),
        _ => (StatusCode::NOT_FOUND, "not found".to_string()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Serves until the process ends. Returns the bound address.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::from_std(kubemaas_crds::listen::listen(addr)?)?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors (EMFILE) and the like: retrying at once would spin
                    // a core; wait for connections to close.
                    tracing::warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let health = health.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let health = health.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&health, &req)) }
                });
                let _ = Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}
