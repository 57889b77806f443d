//! Fault injection between the operator's client and the apiserver, for the e2e suite: conflicts
//! and server errors on writes, watches that end every few seconds, and `410 Expired` when a watch
//! resumes. `main` installs it only in debug builds and only when `KUBEMAAS_E2E_FAULTS` is set,
//! e.g. `conflict=0.5,error=0.2,watch=10,gone=1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kube::client::Body;
use tower::{BoxError, Layer, Service};

/// The response body type of kube's client stack.
type DynBody = kube::client::DynBody;

/// What to inject.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    /// Share of write requests answered `409 Conflict` without reaching the apiserver.
    pub conflict: f64,
    /// Share of write requests answered `503`/`500`.
    pub error: f64,
    /// Watches end after this many seconds (the watcher then resumes).
    pub watch_seconds: Option<u32>,
    /// Every other resumed watch (one with a resourceVersion) gets `410 Expired`, as a watch
    /// `ERROR` event the way the apiserver sends it.
    pub gone_on_resume: bool,
}

/// Why a plan could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "invalid KUBEMAAS_E2E_FAULTS entry {0:?} (expected conflict=<0..1>, error=<0..1>, watch=<seconds>, gone=<0|1>)"
)]
pub struct BadPlan(String);

impl std::str::FromStr for FaultPlan {
    type Err = BadPlan;

    fn from_str(s: &str) -> Result<FaultPlan, BadPlan> {
        let mut plan = FaultPlan::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || BadPlan(part.to_string());
            let (k, v) = part.split_once('=').ok_or_else(bad)?;
            let share = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| (0.0..=1.0).contains(x))
                    .ok_or_else(bad)
            };
            match k {
                "conflict" => plan.conflict = share()?,
                "error" => plan.error = share()?,
                "watch" => plan.watch_seconds = Some(v.parse().map_err(|_| bad())?),
                "gone" => plan.gone_on_resume = v == "1",
                _ => return Err(bad()),
            }
        }
        Ok(plan)
    }
}

/// The tower layer.
#[derive(Clone)]
pub struct FaultLayer {
    plan: FaultPlan,
    seed: Arc<AtomicU64>,
}

impl FaultLayer {
    /// A layer following `plan`.
    pub fn new(plan: FaultPlan) -> FaultLayer {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        FaultLayer {
            plan,
            seed: Arc::new(AtomicU64::new(seed)),
        }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> FaultService<S> {
        FaultService {
            inner,
            layer: self.clone(),
            resumes: Arc::default(),
        }
    }
}

/// The service the layer wraps around kube's stack.
#[derive(Clone)]
pub struct FaultService<S> {
    inner: S,
    layer: FaultLayer,
    resumes: Arc<AtomicU64>,
}

impl FaultLayer {
    /// A uniform number in [0, 1) (xorshift; no cryptographic needs here).
    fn roll(&self) -> f64 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Box<DynBody>> {
    let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    json_response(code, body.to_string())
}

fn json_response(code: StatusCode, body: String) -> Response<Box<DynBody>> {
    let full = Full::new(Bytes::from(body)).map_err(|never| -> BoxError { match never {} });
    let mut r = Response::new(Box::new(full) as Box<DynBody>);
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A watch whose resource version is too old, answered as the apiserver's watch cache answers it
/// once it has accepted the request: `200 OK`, then one `ERROR` event carrying a `410 Expired`
/// Status. A watcher re-lists on that event. (An HTTP 410 instead reads as a failed watch start,
/// which kube's watcher retries with the same version after a growing backoff: injected that way,
/// it kept a watcher blind for minutes and the test timed out.)
fn expired_watch() -> Response<Box<DynBody>> {
    let event = serde_json::json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
        "metadata": {}, "status": "Failure", "message": "injected: too old resource version",
        "reason": "Expired", "code": 410}});
    json_response(StatusCode::OK, format!("{event}\n"))
}

/// The request's query with `timeoutSeconds` set to `seconds`.
fn shorten_watch(query: &str, seconds: u32) -> String {
    let mut parts: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("timeoutSeconds="))
        .map(str::to_string)
        .collect();
    parts.push(format!("timeoutSeconds={seconds}"));
    parts.join("&")
}

impl<S> Service<Request<Body>> for FaultService<S>
where
    S: Service<Request<Body>, Response = Response<Box<DynBody>>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Box<DynBody>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let plan = &self.layer.plan;
        let write = !matches!(*req.method(), Method::GET | Method::HEAD);
        if write {
            let r = self.layer.roll();
            if r < plan.conflict {
                let res = status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "injected conflict: the object has been modified",
                );
                return Box::pin(async move { Ok(res) });
            }
            if r < plan.conflict + plan.error {
                let code = if r < plan.conflict + plan.error / 2.0 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                let res = status(code, "InternalError", "injected server error");
                return Box::pin(async move { Ok(res) });
            }
        }
        let query = req.uri().query().unwrap_or_default().to_string();
        let watch = query.split('&').any(|p| p == "watch=true" || p == "watch=1");
        if watch {
            let resuming = query.split('&').any(|p| {
                p.starts_with("resourceVersion=") && p != "resourceVersion=" && p != "resourceVersion=0"
            });
            if resuming && plan.gone_on_resume && self.resumes.fetch_add(1, Ordering::Relaxed) % 2 == 1 {
                return Box::pin(async move { Ok(expired_watch()) });
            }
            if let Some(seconds) = plan.watch_seconds {
                let q = shorten_watch(&query, seconds);
                let path = req.uri().path().to_string();
                if let Ok(uri) = format!("{path}?{q}").parse() {
                    *req.uri_mut() = uri;
                }
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_read_and_a_bad_one_named() {
        let p: FaultPlan = "conflict=0.5,error=0.2,watch=10,gone=1".parse().unwrap();
        assert_eq!(
            p,
            FaultPlan {
                conflict: 0.5,
                error: 0.2,
                watch_seconds: Some(10),
                gone_on_resume: true
            }
        );
        assert_eq!(
            "conflict=2".parse::<FaultPlan>(),
            Err(BadPlan("conflict=2".into()))
        );
        assert!("nonsense".parse::<FaultPlan>().is_err());
    }

    #[test]
    fn watch_timeouts_are_replaced_and_rolls_are_uniform() {
        assert_eq!(
            shorten_watch("watch=true&timeoutSeconds=290&resourceVersion=5", 10),
            "watch=true&resourceVersion=5&timeoutSeconds=10"
        );
        let l = FaultLayer::new(FaultPlan::default());
        let rolls: Vec<f64> = (0..10_000).map(|_| l.roll()).collect();
        assert!(rolls.iter().all(|r| (0.0..1.0).contains(r)));
        let below_half = rolls.iter().filter(|r| **r < 0.5).count();
        assert!((4_500..5_500).contains(&below_half), "{below_half}");
    }

    #[tokio::test]
    async fn an_expired_watch_is_a_200_with_one_410_error_event_as_the_apiserver_sends() {
        let r = expired_watch();
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&body).unwrap();
        assert_eq!(text.lines().count(), 1);
        // What kube's watcher decodes: an ERROR event whose Status says 410.
        let ev: kube::core::WatchEvent<k8s_openapi::api::core::v1::Pod> =
            serde_json::from_str(text.trim()).unwrap();
        match ev {
            kube::core::WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
            other => panic!("expected an ERROR event, got {other:?}"),
        }
    }
}
