//! The REST router and handlers (`http::routes::handle`), driven without a network: each input is
//! one HTTP/1.1 request, sent by hyper's client over an in-memory pipe to hyper's server, whose
//! service is the server's own `routes::handle` (as `http::serve` wires it). `handle` takes a
//! `Request<hyper::body::Incoming>`, which only hyper's connection code can make, hence the pipe.
//!
//! The repository lists models that never become ready (no ONNX Runtime is needed): `m` version 1
//! loading and version 2 failed, `resnet` version 1 loading. So every route is reachable up to the
//! model lookup; the decoders behind `:infer` and `:predict` have their own targets.
//!
//! Input format (text, like an HTTP request; `\r\n` also accepted):
//! ```text
//! METHOD REQUEST-TARGET [OPTIONS]
//! Header-Name: value
//! ...
//!
//! body
//! ```
//! OPTIONS is a word of flags: `m` serves the metrics port's surface instead of the full one, `k`
//! turns API keys on (`admin:s3cret` for everything, `limited:k2:resnet` for model `resnet`), `a`
//! turns the audit log on, `s` allows system shared memory (`--allow-client-shm`), `z` compresses
//! answers for clients that accept it (`--compress-responses`). Framing headers (Content-Length,
//! Transfer-Encoding, Connection, Host, ...) are set by the client, not taken from the input.
//!
//! Invariants besides no panic: no 5xx but 503 (nothing here can legitimately fail inside the
//! server), every error status carries `{"error": "..."}` as JSON, 401 carries `WWW-Authenticate`,
//! 405 carries `Allow`, without keys there is no 401/403, with keys a request without
//! `Authorization` to any route other than health/readiness gets 401 (or 405 for a method the route
//! does not answer), and the metrics surface answers anything but GET/HEAD with 404.

use std::cell::RefCell;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::init;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderName, HeaderValue, WWW_AUTHENTICATE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kubemaas_server::admission::{Admission, Limits};
use kubemaas_server::auth::ApiKeys;
use kubemaas_server::http::{AppState, Surface, routes};
use kubemaas_server::model_config::ConfigFile;
use kubemaas_server::offload::{OFFLOAD_BYTES, Offload};
use kubemaas_server::repository::{ModelSource, ModelState, Repository};
use kubemaas_server::shm::SharedMemory;

/// Largest request body the states accept.
const MAX_REQUEST_BYTES: usize = 4096;

fn repository() -> Arc<Repository> {
    let source = |name: &str, version: u64| ModelSource {
        name: name.to_string(),
        version,
        path: PathBuf::from(format!("/nonexistent/{name}/{version}/model.onnx")),
        config: ConfigFile::Absent,
    };
    let repo = Repository::new(&[source("m", 1), source("m", 2), source("resnet", 1)]);
    repo.set_state(
        "m",
        2,
        ModelState::Failed("the model file is not a valid ONNX model".into()),
    );
    Arc::new(repo)
}

fn api_keys() -> Arc<ApiKeys> {
    let path = std::env::temp_dir().join(format!("kubemaas-fuzz-api-keys-{}", std::process::id()));
    std::fs::write(&path, "# fuzz keys\nadmin:s3cret\nlimited:k2:resnet\n").expect("write the API key file");
    let keys = ApiKeys::load(&path).expect("load the API key file");
    let _ = std::fs::remove_file(&path);
    Arc::new(keys)
}

/// Which state a case runs against: a bit each for API keys, the audit log, client shared memory
/// and compressed answers.
fn state_index(keys: bool, audit: bool, shm: bool, compress: bool) -> usize {
    usize::from(keys) | usize::from(audit) << 1 | usize::from(shm) << 2 | usize::from(compress) << 3
}

/// The sixteen states, indexed by `state_index`.
static STATES: LazyLock<Vec<Arc<AppState>>> = LazyLock::new(|| {
    let repo = repository();
    let keys = api_keys();
    let admission = Arc::new(Admission::new(Limits {
        connections: 64,
        requests: 64,
        body_bytes: 8 * MAX_REQUEST_BYTES,
    }));
    (0..16)
        .map(|i: usize| {
            Arc::new(AppState {
                repo: repo.clone(),
                max_request_bytes: MAX_REQUEST_BYTES,
                api_keys: (i & 1 != 0).then(|| keys.clone()),
                audit: i & 2 != 0,
                header_read_timeout: Duration::from_secs(5),
                body_read_timeout: Duration::from_secs(5),
                admission: admission.clone(),
                // Bodies this small are parsed in place; one permit, as on a one-core pod.
                offload: Offload::new(1, OFFLOAD_BYTES),
                shm: Arc::new(SharedMemory::new(i & 4 != 0, MAX_REQUEST_BYTES)),
                compress_responses: i & 8 != 0,
            })
        })
        .collect()
});

/// `KUBEMAAS_FUZZ_DEBUG=1` prints each exchange (to check what the seeds reach).
static DEBUG: LazyLock<bool> = LazyLock::new(|| std::env::var_os("KUBEMAAS_FUZZ_DEBUG").is_some());

thread_local! {
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime"),
    );
}

/// Headers the client sets itself (framing and connection management).
const FRAMING: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "host",
    "te",
    "upgrade",
    "expect",
    "keep-alive",
    "trailer",
];

struct Case {
    surface: Surface,
    keys: bool,
    audit: bool,
    shm: bool,
    compress: bool,
    request: Request<Full<Bytes>>,
}

fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let line = &data[..i];
            (line.strip_suffix(b"\r").unwrap_or(line), &data[i + 1..])
        }
        None => (data, &[]),
    }
}

fn parse(data: &[u8]) -> Option<Case> {
    let (first, mut rest) = split_line(data);
    let mut words = first.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let method = Method::from_bytes(words.next()?).ok()?;
    if method == Method::CONNECT {
        // Authority-form targets only; nothing of the router's to reach.
        return None;
    }
    let uri = Uri::try_from(words.next()?).ok()?;
    uri.path_and_query()?;
    let flags = words.next().unwrap_or_default();
    let mut builder = Request::builder().method(method).uri(uri);
    loop {
        let (line, after) = split_line(rest);
        rest = after;
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        if FRAMING.contains(&name.as_str()) {
            continue;
        }
        builder = builder.header(name, value);
    }
    builder = builder.header(http::header::CONNECTION, "close");
    let request = builder.body(Full::new(Bytes::copy_from_slice(rest))).ok()?;
    Some(Case {
        surface: if flags.contains(&b'm') {
            Surface::MetricsOnly
        } else {
            Surface::Full
        },
        keys: flags.contains(&b'k'),
        audit: flags.contains(&b'a'),
        shm: flags.contains(&b's'),
        compress: flags.contains(&b'z'),
        request,
    })
}

/// Liveness and readiness routes, which API keys leave open (mirrors `routes::is_open`).
fn is_open(path: &str) -> bool {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(
        segs.as_slice(),
        ["v2", "health", "live" | "ready"]
            | ["v2", "models", _, "ready"]
            | ["v2", "models", _, "versions", _, "ready"]
    )
}

struct Answer {
    /// Whether `routes::handle` made the answer (false: hyper refused the request itself, e.g. 431
    /// for more than 100 headers; the router's invariants do not apply).
    handled: bool,
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

/// Sends the request through hyper's client to hyper's server running `routes::handle`.
async fn exchange(state: Arc<AppState>, surface: Surface, request: Request<Full<Bytes>>) -> Option<Answer> {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let handled = Arc::new(AtomicBool::new(false));
    let called = handled.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        called.store(true, Ordering::Relaxed);
        async move { Ok::<_, Infallible>(routes::handle(state, surface, req).await) }
    });
    let server =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server_io), service);
    let (mut sender, client_conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .ok()?;
    let exchange = async move {
        let response = sender.send_request(request).await.ok()?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.ok()?.to_bytes();
        Some(Answer {
            handled: handled.load(Ordering::Relaxed),
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    let (answer, _, _) = tokio::join!(exchange, client_conn, server);
    answer
}

fn check(case_method: &Method, path: &str, surface: Surface, keys: bool, authorization: bool, a: &Answer) {
    let status = a.status;
    if !a.handled {
        assert!(
            status.is_client_error(),
            "{case_method} {path}: hyper answered {status} without the router"
        );
        return;
    }
    assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{case_method} {path} answered {status}: {}",
        String::from_utf8_lossy(&a.body)
    );
    let head = case_method == Method::HEAD;
    if status.is_client_error() || status.is_server_error() {
        let ct = a.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        assert_eq!(
            ct,
            Some("application/json"),
            "{case_method} {path}: error without a JSON content type"
        );
        if !head {
            let v: serde_json::Value = serde_json::from_slice(&a.body)
                .unwrap_or_else(|e| panic!("{case_method} {path}: {status} body is not JSON ({e})"));
            let is_error = v.get("error").is_some_and(serde_json::Value::is_string);
            // Readiness answers 503 with its own JSON ({"ready": false, ...}).
            assert!(
                is_error || (status == StatusCode::SERVICE_UNAVAILABLE && v.get("ready").is_some()),
                "{case_method} {path}: {status} body has no \"error\": {v}"
            );
        }
    }
    if status == StatusCode::UNAUTHORIZED {
        assert!(
            a.headers.contains_key(WWW_AUTHENTICATE),
            "401 without WWW-Authenticate"
        );
    }
    if !keys || surface == Surface::MetricsOnly {
        assert!(
            status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
            "{case_method} {path}: {status} with API keys off (or on the metrics port)"
        );
    }
    if keys && surface == Surface::Full && !authorization && !is_open(path) {
        // Refused for want of a key, or (before the key is checked) for the method.
        assert!(
            status == StatusCode::UNAUTHORIZED || status == StatusCode::METHOD_NOT_ALLOWED,
            "{case_method} {path} without a key was not refused: {status}"
        );
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        // RFC 9110 15.5.6: a 405 response MUST carry Allow.
        assert!(
            a.headers.contains_key(ALLOW),
            "{case_method} {path}: 405 without an Allow header"
        );
    }
    if surface == Surface::MetricsOnly && case_method != Method::GET && case_method != Method::HEAD {
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{case_method} {path} on the metrics port"
        );
    }
}

/// Runs one input and asserts the invariants.
pub fn run(data: &[u8]) {
    init();
    let Some(case) = parse(data) else {
        return;
    };
    let state = STATES[state_index(case.keys, case.audit, case.shm, case.compress)].clone();
    let method = case.request.method().clone();
    let path = case.request.uri().path().to_string();
    let authorization = case.request.headers().contains_key(http::header::AUTHORIZATION);
    let answer = RUNTIME.with(|rt| rt.borrow().block_on(exchange(state, case.surface, case.request)));
    if *DEBUG {
        match &answer {
            Some(a) => eprintln!(
                "{method} {path} -> {} {}{}",
                a.status,
                String::from_utf8_lossy(&a.body),
                if a.handled {
                    ""
                } else {
                    " (answered by hyper, not the router)"
                }
            ),
            None => eprintln!("{method} {path} -> no answer (the client refused the request)"),
        }
    }
    if let Some(a) = answer {
        check(&method, &path, case.surface, case.keys, authorization, &a);
    }
}
