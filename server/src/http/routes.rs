//! Routing and endpoint handlers. Every error leaves through [`ApiError`], so status codes and the
//! `{"error": "..."}` body are decided in one place.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use tracing::Instrument;

use super::{AppState, Chunks, Surface};
use crate::admission::Ticket;
use crate::auth::Listing;
use crate::inference;
use crate::protocol::error::ApiError;
use crate::protocol::{v1, v2};
use crate::repository::{LookupError, ModelState};

const JSON: &str = "application/json";

fn json_response(status: StatusCode, v: &Value) -> Response<Chunks> {
    bytes_response(status, JSON, Bytes::from(v.to_string()))
}

fn bytes_response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Chunks> {
    let mut r = Response::new(Chunks::one(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error_response(e: &ApiError) -> Response<Chunks> {
    let mut r = bytes_response(e.status(), JSON, Bytes::from(e.body()));
    if matches!(e, ApiError::QueueFull(_) | ApiError::Overloaded(_)) {
        // A full queue drains within the queue delay; clients (and proxies) may retry in a second.
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let ApiError::MethodNotAllowed { allow, .. } = e {
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    }
    if matches!(e, ApiError::Unauthorized(_)) {
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"kubemaas\""),
        );
    }
    r
}

/// Routes anyone may call with API keys on: liveness and readiness (server and per model), which
/// the kubelet probes without credentials.
fn is_open(segs: &[&str]) -> bool {
    matches!(
        segs,
        // `GET /`: KServe's liveness.
        [""] | ["v2", "health", "live" | "ready"]
            | ["v2", "models", _, "ready"]
            | ["v2", "models", _, "versions", _, "ready"]
    )
}

/// The methods a known route answers (the `Allow` header of a 405); None for an unknown path.
fn allowed(segs: &[&str]) -> Option<&'static str> {
    const READ: &str = "GET, HEAD";
    let v1_predict = |last: &str| last.split_once(':').is_some_and(|(_, verb)| verb == "predict");
    match segs {
        [""] | ["metrics"] | ["v2"] | ["v2", "health", "live" | "ready"] | ["v2", "models", "stats"] => {
            Some(READ)
        }
        ["v1", "models"] => Some(READ),
        ["v2", "repository", "index"] => Some("GET, HEAD, POST"),
        ["v2", "models", _, "infer"] | ["v2", "models", _, "versions", _, "infer"] => Some("POST"),
        ["v2", "models", _] | ["v2", "models", _, "versions", _] => Some(READ),
        ["v2", "models", _, "ready" | "config" | "stats"]
        | ["v2", "models", _, "versions", _, "ready" | "config" | "stats"] => Some(READ),
        ["v1", "models", m] if v1_predict(m) => Some("POST"),
        ["v1", "models", _, "versions", v] if v1_predict(v) => Some("POST"),
        // Other verbs (`:classify`, `:regress`) are answered by the route itself.
        ["v1", "models", .., last] if last.contains(':') => None,
        ["v1", "models", _] | ["v1", "models", _, "versions", _] => Some(READ),
        ["v1", "models", _, "metadata"] | ["v1", "models", _, "versions", _, "metadata"] => Some(READ),
        ["v2", "systemsharedmemory" | "cudasharedmemory", "status"]
        | [
            "v2",
            "systemsharedmemory" | "cudasharedmemory",
            "region",
            _,
            "status",
        ] => Some(READ),
        ["v2", "systemsharedmemory" | "cudasharedmemory", "unregister"]
        | [
            "v2",
            "systemsharedmemory" | "cudasharedmemory",
            "region",
            _,
            "register" | "unregister",
        ] => Some("POST"),
        _ => None,
    }
}

/// A path segment as it names a model, version or region: percent-decoded, as clients encode it
/// (tritonclient quotes model names; TF-Serving decodes them). Routes match their fixed segments
/// undecoded, so an encoded '/' or ':' stays inside the name it belongs to.
fn decoded(seg: &str) -> Result<Cow<'_, str>, ApiError> {
    percent_encoding::percent_decode_str(seg)
        .decode_utf8()
        .map_err(|_| ApiError::BadRequest(format!("path segment {seg:?} is not UTF-8 once percent-decoded")))
}

/// [`decoded`], or the segment as it is where it does not decode: the route then refuses it.
fn decoded_or_raw(seg: &str) -> Cow<'_, str> {
    decoded(seg).unwrap_or(Cow::Borrowed(seg))
}

/// The model a route addresses, for keys limited to some models, decoded as routing decodes it.
fn route_model<'a>(segs: &[&'a str]) -> Option<Cow<'a, str>> {
    match segs {
        ["v2", "models", "stats"] => None,
        ["metrics"] => Some(Cow::Borrowed(crate::auth::EVERY_MODEL)),
        ["v2", "systemsharedmemory", ..] => Some(Cow::Borrowed(crate::auth::SHARED_MEMORY)),
        ["v2", "models", m, ..] => Some(decoded_or_raw(m)),
        ["v1", "models", rest @ ..] if !rest.is_empty() => Some(decoded_or_raw(v1_parts(rest).0)),
        _ => None,
    }
}

/// A TF-Serving route after `/v1/models/`, as routing reads it: the verb hangs off the last
/// segment after its first ':' (`m:predict`, `m/versions/1:predict`), so a model name keeps any
/// ':' of its own unless it is the last segment. Returns the model and the segments with the verb
/// cut off the last, and the verb. Authorization reads the model the same way.
fn v1_parts<'a>(rest: &[&'a str]) -> (&'a str, Vec<&'a str>, Option<&'a str>) {
    let (last, verb) = match rest.last().and_then(|l| l.split_once(':')) {
        Some((head, verb)) => (head, Some(verb)),
        None => (rest.last().copied().unwrap_or(""), None),
    };
    let mut segs: Vec<&str> = rest.to_vec();
    if let Some(l) = segs.last_mut() {
        *l = last;
    }
    (segs.first().copied().unwrap_or(""), segs, verb)
}

/// The version a route addresses, if any.
fn route_version<'a>(segs: &[&'a str]) -> Option<Cow<'a, str>> {
    match segs {
        ["v2" | "v1", "models", _, "versions", v, ..] => {
            Some(decoded_or_raw(v.split_once(':').map_or(*v, |(head, _)| head)))
        }
        _ => None,
    }
}

/// Refuses a request the API keys do not allow; health and readiness are open.
fn authorize(
    state: &AppState,
    req: &Request<Incoming>,
    segs: &[&str],
    caller: &mut Option<String>,
) -> Result<(), ApiError> {
    if is_open(segs) {
        return Ok(());
    }
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    crate::auth::authorize(
        state.api_keys.as_deref(),
        header,
        route_model(segs).as_deref(),
        caller,
    )
}

/// Which models a server-wide listing shows the caller of `req`.
fn listing(state: &AppState, req: &Request<Incoming>) -> Listing {
    let key = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    Listing::for_caller(state.api_keys.as_deref(), key)
}

/// Entry point for every request.
pub async fn handle(state: Arc<AppState>, surface: Surface, req: Request<Incoming>) -> Response<Chunks> {
    let audited = state.audit && surface == Surface::Full;
    let started = std::time::Instant::now();
    // What the audit line needs from the request, taken before routing consumes it.
    let seen = audited.then(|| {
        let bytes_in = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        (req.uri().path().to_string(), bytes_in)
    });
    let mut caller = None;
    let response = match route(&state, surface, req, &mut caller).await {
        Ok(r) => r,
        Err(e) => {
            if e.status().is_server_error() && e.status() != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(error = %e, "request failed");
            }
            error_response(&e)
        }
    };
    let Some((path, bytes_in)) = seen else {
        return response;
    };
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if !is_open(&segs) {
        use hyper::body::Body as _;
        crate::audit::write(&crate::audit::Record {
            protocol: "http",
            route: &path,
            model: route_model(&segs).as_deref(),
            version: route_version(&segs).as_deref(),
            caller: caller.as_deref(),
            status: response.status().as_str(),
            bytes_in,
            bytes_out: response.body().size_hint().exact().unwrap_or(0),
            latency: started.elapsed(),
        });
    }
    response
}

/// Reads the whole body: at most `--max-request-bytes`, within `--body-read-timeout`, and only
/// while the bytes held by all requests stay within `--max-buffered-request-bytes`. Bytes are
/// reserved as they arrive, not as declared: a client that declares a large body and sends nothing
/// holds nothing.
///
/// `aligned_at`: an offset into the body (where the binary extension's tensors start) that should
/// land 16-byte aligned in memory, so numeric tensors there are lent to ONNX Runtime in place
/// rather than copied; best effort, never needed for correctness.
async fn read_body(
    state: &AppState,
    ticket: &mut Ticket,
    req: Request<Incoming>,
    aligned_at: Option<usize>,
) -> Result<(http::request::Parts, Bytes), ApiError> {
    let limit = state.max_request_bytes;
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "request body exceeds the limit of {limit} bytes; send less data per request or raise --max-request-bytes"
        ))
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let mut body = Limited::new(body, limit);
    // The declared size is allocated only once the client has sent a first MiB: headers alone
    // make the server set aside nothing.
    const EAGER: usize = 1 << 20;
    let declared = declared.map_or(0, |n| n as usize);
    const ALIGN: usize = 16;
    let mut buf = bytes::BytesMut::with_capacity(declared.min(EAGER) + ALIGN);
    // Leading filler bytes, cut off below. The allocator's blocks are 16-aligned, so the offset
    // also holds if the buffer grows and moves.
    let skip = match aligned_at {
        // Wrapping: `at` is the client's Inference-Header-Content-Length, checked against the
        // body only when it is decoded; any value gives some offset below ALIGN here.
        Some(at) if declared > 0 => (ALIGN - (buf.as_ptr() as usize).wrapping_add(at) % ALIGN) % ALIGN,
        _ => 0,
    };
    buf.resize(skip, 0);
    let deadline = tokio::time::Instant::now() + state.body_read_timeout;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} s (--body-read-timeout); {} bytes came",
                    state.body_read_timeout.as_secs(),
                    buf.len() - skip
                )));
            }
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Ok(Some(Err(e))) => {
                return Err(ApiError::BadRequest(format!(
                    "failed to read the request body: {e}"
                )));
            }
        };
        if let Ok(data) = frame.into_data() {
            state.admission.reserve(ticket, data.len())?;
            if buf.len() + data.len() > EAGER && buf.capacity() < declared + skip {
                buf.reserve(declared + skip - buf.len());
            }
            buf.extend_from_slice(&data);
        }
    }
    let body = buf.freeze().slice(skip..);
    let Some(encoding) = content_encoding(&parts.headers)? else {
        return Ok((parts, body));
    };
    // Inflating is CPU work whose size the compressed bytes do not tell: on the bounded pool, off
    // the I/O threads, with the inflated bytes reserved as the buffer grows (many small bodies that
    // each inflate to --max-request-bytes must not hold more than the budget between them).
    let admission = state.admission.clone();
    let mut held = std::mem::take(ticket);
    let (inflated, held) = state
        .offload
        .run(usize::MAX, move || {
            let inflated = inflate(encoding, &body, limit, aligned_at, &mut |n| {
                admission.reserve(&mut held, n)
            });
            (inflated, held)
        })
        .await?;
    *ticket = held;
    Ok((parts, inflated?))
}

/// A body's compression (`Content-Encoding`), as Triton's HTTP endpoint and tritonclient's
/// `request_compression_algorithm` and `response_compression_algorithm` use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Gzip,
    /// zlib-wrapped DEFLATE, what HTTP's `deflate` names (RFC 9110).
    Deflate,
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
        }
    }
}

/// The body's encoding; None when it is sent as is. Any other coding is refused by name (415)
/// rather than parsed as if it were plain.
fn content_encoding(headers: &http::HeaderMap) -> Result<Option<Encoding>, ApiError> {
    let Some(value) = headers.get(http::header::CONTENT_ENCODING) else {
        return Ok(None);
    };
    let name = value.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match name.as_str() {
        "" | "identity" => Ok(None),
        "gzip" | "x-gzip" => Ok(Some(Encoding::Gzip)),
        "deflate" => Ok(Some(Encoding::Deflate)),
        _ => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Encoding {value:?} is not supported: send the body as is, gzip or deflate"
        ))),
    }
}

/// Inflates `body`, refusing more than `limit` bytes of output (a small body may inflate to any
/// size). `reserve` is called with every byte of capacity before the output buffer takes it, and
/// its refusal stops the inflation. `aligned_at` as in [`read_body`].
fn inflate(
    encoding: Encoding,
    body: &[u8],
    limit: usize,
    aligned_at: Option<usize>,
    reserve: &mut dyn FnMut(usize) -> Result<(), ApiError>,
) -> Result<Bytes, ApiError> {
    use std::io::Read;
    const ALIGN: usize = 16;
    // One byte past the limit tells "exactly the limit" from "more".
    let most = limit.saturating_add(1 + ALIGN);
    let first = body.len().saturating_mul(4).min(most).max(ALIGN);
    reserve(first)?;
    let mut out = Vec::with_capacity(first);
    let mut held = out.capacity();
    let skip = aligned_at.map_or(0, |at| {
        (ALIGN - (out.as_ptr() as usize).wrapping_add(at) % ALIGN) % ALIGN
    });
    out.resize(skip, 0);
    let mut reader: Box<dyn Read + '_> = match encoding {
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Encoding::Deflate => Box::new(flate2::read::ZlibDecoder::new(body)),
    };
    let mut read = Ok(());
    loop {
        if out.len() - skip > limit {
            break;
        }
        if out.len() == out.capacity() {
            // Doubling, as a Vec grows, but reserved before the memory is taken.
            let want = (out.capacity() * 2).clamp(out.len() + 1, most.max(out.len() + 1));
            reserve(want - held)?;
            out.reserve_exact(want - out.len());
            if out.capacity() > want {
                reserve(out.capacity() - want)?;
            }
            held = out.capacity();
        }
        // At most the spare capacity, so reading never grows the buffer past what is reserved.
        let room = out.capacity() - out.len();
        match (&mut reader).take(room as u64).read_to_end(&mut out) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                read = Err(e);
                break;
            }
        }
    }
    match read {
        Err(e) => Err(ApiError::BadRequest(format!(
            "the request body is not valid {} data: {e}",
            if encoding == Encoding::Gzip {
                "gzip"
            } else {
                "deflate (zlib)"
            }
        ))),
        Ok(_) if out.len() - skip > limit => Err(ApiError::PayloadTooLarge(format!(
            "the request body inflates past the limit of {limit} bytes; send less data per request or raise --max-request-bytes"
        ))),
        Ok(_) => Ok(Bytes::from(out).slice(skip..)),
    }
}

async fn route(
    state: &AppState,
    surface: Surface,
    req: Request<Incoming>,
    caller: &mut Option<String>,
) -> Result<Response<Chunks>, ApiError> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    let repo = &state.repo;

    let metrics_port_route = matches!(
        segs.as_slice(),
        ["metrics"]
            | ["v2", "health", _]
            | ["v2", "models", _]
            | ["v2", "models", _, "versions", _]
            | ["v2", "models", _, "ready"]
            | ["v2", "models", _, "versions", _, "ready"]
    ) && get;
    if surface == Surface::MetricsOnly && !metrics_port_route {
        return Err(ApiError::NotFound(format!(
            "{path} is not served on the metrics port; use the HTTP port"
        )));
    }
    if let Some(allow) = allowed(&segs)
        && !allow.split(", ").any(|m| m == method.as_str())
    {
        return Err(ApiError::MethodNotAllowed {
            message: format!("{method} is not allowed on {path}; use {allow}"),
            allow,
        });
    }
    if surface == Surface::Full {
        authorize(state, &req, &segs, caller)?;
    }
    match segs.as_slice() {
        ["metrics"] if get => Ok(bytes_response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(repo.render_metrics() + &state.admission.render()),
        )),
        ["v2", "health", "live"] if get => {
            Ok(json_response(StatusCode::OK, &serde_json::json!({"live": true})))
        }
        [""] if get => Ok(json_response(StatusCode::OK, &serde_json::json!({"status": "alive"}))),
        ["v1", "models"] if get => {
            // KServe V1's model list.
            let shown = listing(state, &req);
            let mut names: Vec<String> = Vec::new();
            for (name, ..) in repo.index() {
                if shown.shows(&name) && !names.contains(&name) {
                    names.push(name);
                }
            }
            Ok(json_response(StatusCode::OK, &serde_json::json!({ "models": names })))
        }
        ["v2", "health", "ready"] if get => {
            let ready = repo.all_ready();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Ok(json_response(status, &serde_json::json!({"ready": ready})))
        }
        ["v2"] if get => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "name": "kubemaas",
                "version": env!("CARGO_PKG_VERSION"),
                "extensions": v2::extensions(&state.shm),
            }),
        )),
        ["v2", "repository", "index"] if post || get => {
            Ok(json_response(StatusCode::OK, &repository_index(state, &listing(state, &req))))
        }
        ["v2", "models", "stats"] if get => {
            Ok(json_response(StatusCode::OK, &stats(state, None, None, &listing(state, &req))?))
        }
        ["v2", "models", m, rest @ ..] => {
            let (version, rest) = match rest {
                ["versions", v, rest @ ..] => (Some(decoded(v)?), rest),
                _ => (None, rest),
            };
            let (m, version) = (&*decoded(m)?, version.as_deref());
            match rest {
                [] if get => model_metadata(state, m, version),
                ["ready"] if get => model_ready(state, m, version),
                ["config"] if get => model_config(state, m, version),
                ["stats"] if get => Ok(json_response(StatusCode::OK, &stats(state, Some(m), version, &Listing::EVERY)?)),
                ["infer"] if post => {
                    infer_v2(state, m, version, req)
                        .instrument(inference::request_span("v2", m, version))
                        .await
                }
                _ => Err(ApiError::NotFound(format!("no endpoint at {path}"))),
            }
        }
        ["v1", "models", rest @ ..] => route_v1(state, rest, req, &path).await,
        ["v2", "systemsharedmemory", rest @ ..] => system_shared_memory(state, rest, req).await,
        ["v2", "cudasharedmemory", ..] => Err(ApiError::BadRequest(
            "CUDA shared memory is not supported by this server; use system shared memory (--allow-client-shm) or send the tensors in the request".into(),
        )),
        _ => Err(ApiError::NotFound(format!(
            "no endpoint at {path}; see GET /v2 for the protocol served"
        ))),
    }
}

async fn route_v1(
    state: &AppState,
    rest: &[&str],
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<Chunks>, ApiError> {
    // `/v1/models/m:predict` and `/v1/models/m/versions/1:predict`: the verb hangs off the last segment.
    // The verb is cut off the undecoded segment: an encoded ':' belongs to the name.
    let (_, segs, verb) = v1_parts(rest);
    let (model, version, tail) = match segs.as_slice() {
        [m, "labels", label, ..] => {
            let (m, label) = (decoded(m)?, decoded(label)?);
            // As TF-Serving: an unknown model is 404, an unknown label of a known one 400.
            state.repo.entry(&m, None)?;
            return Err(ApiError::BadRequest(format!(
                "unrecognized version label {label:?} of model {m:?}: this server has no version labels; address a version by number, /v1/models/{m}/versions/N"
            )));
        }
        [m, "versions", v, tail @ ..] => (decoded(m)?, Some(decoded(v)?), tail.to_vec()),
        [m, tail @ ..] => (decoded(m)?, None, tail.to_vec()),
        [] => return Err(ApiError::NotFound(format!("no endpoint at {path}"))),
    };
    let (model, version) = (&*model, version.as_deref());
    // Methods were checked against `allowed` before routing.
    match (verb, tail.as_slice()) {
        (Some("predict"), []) => {
            predict_v1(state, model, version, req)
                .instrument(inference::request_span("v1", model, version))
                .await
        }
        (Some(other), _) => Err(ApiError::BadRequest(format!(
            "unsupported verb :{other}; KubeMaaS serves :predict (classify and regress are TensorFlow-specific)"
        ))),
        (None, []) => Ok(json_response(StatusCode::OK, &v1_status(state, model, version)?)),
        (None, ["metadata"]) => {
            let (m, _) = state.repo.ready_model(model, version)?;
            Ok(json_response(
                StatusCode::OK,
                &v1::metadata(model, m.version, m.backend.signature()),
            ))
        }
        _ => Err(ApiError::NotFound(format!("no endpoint at {path}"))),
    }
}

fn repository_index(state: &AppState, shown: &Listing) -> Value {
    Value::Array(
        state
            .repo
            .index()
            .into_iter()
            .filter(|(name, ..)| shown.shows(name))
            .map(|(name, v, st, reason)| {
                serde_json::json!({"name": name, "version": v.to_string(), "state": st, "reason": reason})
            })
            .collect(),
    )
}

fn model_metadata(state: &AppState, m: &str, version: Option<&str>) -> Result<Response<Chunks>, ApiError> {
    let (model, _) = state.repo.ready_model(m, version)?;
    let versions: Vec<u64> = match version {
        Some(_) => vec![model.version],
        None => state.repo.ready_versions(m),
    };
    let meta = v2::model_metadata(
        m,
        &versions,
        model.backend.signature(),
        model.backend.execution_provider(),
        model.backend.execution_provider_fallback(),
        model.artifact.as_ref(),
    );
    Ok(json_response(StatusCode::OK, &meta))
}

fn model_ready(state: &AppState, m: &str, version: Option<&str>) -> Result<Response<Chunks>, ApiError> {
    match state.repo.ready_model(m, version) {
        Ok(_) if !state.repo.is_shutting_down() => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"name": m, "ready": true}),
        )),
        Ok(_) => Ok(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"name": m, "ready": false, "error": "the server is shutting down"}),
        )),
        Err(e @ LookupError::NotReady { .. }) => Ok(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"name": m, "ready": false, "error": e.to_string()}),
        )),
        Err(e) => Err(e.into()),
    }
}

fn model_config(state: &AppState, m: &str, version: Option<&str>) -> Result<Response<Chunks>, ApiError> {
    Ok(json_response(
        StatusCode::OK,
        &model_config_json(state, m, version)?,
    ))
}

/// Triton's model configuration of a ready model (REST `/config` and the gRPC `ModelConfig`).
pub(crate) fn model_config_json(state: &AppState, m: &str, version: Option<&str>) -> Result<Value, ApiError> {
    let (model, _) = state.repo.ready_model(m, version)?;
    Ok(v2::triton_config(
        m,
        model.backend.as_ref(),
        &model.version_policy,
        model.batcher.get().map(|b| b.config()),
    ))
}

/// Triton's statistics of one model version, or of all those `shown` (REST `/stats` and the
/// gRPC `ModelStatistics`).
pub(crate) fn stats(
    state: &AppState,
    model: Option<&str>,
    version: Option<&str>,
    shown: &Listing,
) -> Result<Value, ApiError> {
    let entries = match model {
        Some(m) => {
            let (v, e) = state.repo.entry(m, version)?;
            vec![(m.to_string(), v, e)]
        }
        None => state
            .repo
            .list()
            .into_iter()
            .filter(|(name, ..)| shown.shows(name))
            .collect(),
    };
    let model_stats: Vec<Value> = entries
        .into_iter()
        .map(|(name, v, e)| e.stats.triton_json(&name, &v.to_string()))
        .collect();
    Ok(serde_json::json!({ "model_stats": model_stats }))
}

/// Triton's system shared memory extension: status, register and unregister.
async fn system_shared_memory(
    state: &AppState,
    rest: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Chunks>, ApiError> {
    let shm = &state.shm;
    let ok = || json_response(StatusCode::OK, &serde_json::json!({}));
    // tritonclient percent-encodes the region name in the path; requests carry it as is.
    let region = |seg: &str| decoded(seg).map(Cow::into_owned);
    let status = |name: Option<String>| -> Result<Response<Chunks>, ApiError> {
        let regions = shm.status(name.as_deref()).map_err(crate::shm::registry_error)?;
        let body = serde_json::to_value(regions).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(json_response(StatusCode::OK, &body))
    };
    match rest {
        ["status"] => status(None),
        ["region", name, "status"] => status(Some(region(name)?)),
        ["unregister"] => shm.unregister(None).map(|()| ok()).map_err(Into::into),
        ["region", name, "unregister"] => shm
            .unregister(Some(&region(name)?))
            .map(|()| ok())
            .map_err(Into::into),
        ["region", name, "register"] => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Register {
                key: String,
                #[serde(default)]
                offset: u64,
                byte_size: u64,
            }
            let (_, body) = read_body(state, &mut Ticket::default(), req, None).await?;
            let r: Register = serde_json::from_slice(&body).map_err(|e| {
                ApiError::BadRequest(format!(
                    "shared memory register request: {e}; send {{\"key\": \"/name\", \"offset\": 0, \"byte_size\": N}}"
                ))
            })?;
            shm.register(&region(name)?, &r.key, r.offset, r.byte_size)?;
            Ok(ok())
        }
        _ => Err(ApiError::NotFound(format!(
            "no endpoint at /v2/systemsharedmemory/{}",
            rest.join("/")
        ))),
    }
}

async fn infer_v2(
    state: &AppState,
    m: &str,
    version: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Chunks>, ApiError> {
    let start = Instant::now();
    let (model, stats) = state
        .repo
        .ready_model(m, version)
        .map_err(inference::count_not_ready)?;
    let _inflight = inference::InFlight::enter(&stats);
    // Kept for requests that turn out to name shared memory regions (a cheap clone).
    let authorization = state
        .api_keys
        .as_ref()
        .and_then(|_| req.headers().get(http::header::AUTHORIZATION).cloned());
    let compress = state
        .compress_responses
        .then(|| accepted_encoding(req.headers()))
        .flatten();
    let result = async {
        let mut ticket = Ticket::default();
        let header_len = match req.headers().get(v2::HEADER_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest(
                            "Inference-Header-Content-Length must be a non-negative integer".into(),
                        )
                    })?,
            ),
        };
        let (_, body) = read_body(state, &mut ticket, req, header_len).await?;
        state.admission.admit(&mut ticket)?;
        let json = header_len.unwrap_or(body.len());
        let decoding = model.clone();
        let shm = state.shm.clone();
        let (keys, admission) = (state.api_keys.clone(), state.admission.clone());
        let (request, ticket) = state
            .offload
            .run(json, move || {
                // Inputs read from shared memory are held like a body until the answer is encoded.
                let mut gate = crate::shm::gate(
                    keys.as_deref(),
                    authorization.as_ref().map(|v| v.as_bytes()),
                    &admission,
                    &mut ticket,
                );
                let request =
                    v2::decode_request_shm(decoding.backend.signature(), &body, header_len, &shm, &mut gate);
                drop(gate);
                (request, ticket)
            })
            .await?;
        let (request, mut ticket) = (request?, ticket);
        state.admission.reserve_decoded(&mut ticket, &request.inputs)?;
        Ok((request, ticket))
    }
    .await;
    // The ticket is held until the answer is encoded: the decoded inputs live that long.
    let (mut request, _ticket) = inference::counted(&stats, start, result)?;
    let timeout = inference::counted(&stats, start, v2::timeout_param(request.parameters.as_ref()))?;
    let outputs = inference::execute(
        model.clone(),
        &stats,
        start,
        std::mem::take(&mut request.inputs),
        request.outputs.clone(),
        timeout,
    )
    .await?;
    let (name, version) = (m.to_string(), model.version);
    let size = v2::json_response_len(&request, &outputs);
    // Compressing is CPU work like formatting: counted so large answers leave the I/O threads.
    let work = if compress.is_some() {
        size + outputs.iter().map(|t| t.binary_len()).sum::<usize>()
    } else {
        size
    };
    let (encoded, deflated) = state
        .offload
        .run(work, move || {
            let encoded = v2::encode_response(&name, version, &request, &outputs)?;
            let deflated = compress.map(|c| deflate(c, std::iter::once(&encoded.json).chain(&encoded.blobs)));
            Ok::<_, ApiError>((encoded, deflated))
        })
        .await??;
    let json_len = encoded.json.len();
    let binary = !encoded.blobs.is_empty();
    let mut r = match deflated {
        Some(body) => Response::new(Chunks::one(body?)),
        None if !binary => Response::new(Chunks::one(encoded.json)),
        None => Response::new(Chunks::many(
            std::iter::once(encoded.json).chain(encoded.blobs).collect(),
        )),
    };
    let headers = r.headers_mut();
    if let Some(c) = compress {
        headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static(c.name()));
    }
    if binary {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        // The uncompressed JSON's length, as Triton sends it: clients inflate, then split.
        headers.insert(v2::HEADER_LENGTH, HeaderValue::from(json_len));
    } else {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    }
    Ok(r)
}

/// The compression the client accepts for the answer (`Accept-Encoding`, as tritonclient's
/// `response_compression_algorithm` sends it): gzip, else deflate; none for anything else or a
/// refusal (`q=0`).
fn accepted_encoding(headers: &http::HeaderMap) -> Option<Encoding> {
    let accepted = |name: &str| {
        headers
            .get_all(http::header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|item| {
                let mut parts = item.split(';').map(str::trim);
                let coding = parts.next().unwrap_or("");
                let refused = parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                coding.eq_ignore_ascii_case(name) && !refused
            })
    };
    if accepted("gzip") {
        Some(Encoding::Gzip)
    } else if accepted("deflate") {
        Some(Encoding::Deflate)
    } else {
        None
    }
}

/// Compresses the parts of an answer into one body (fast level: the answer waits for it).
fn deflate<'a>(encoding: Encoding, parts: impl Iterator<Item = &'a Bytes>) -> Result<Bytes, ApiError> {
    use std::io::Write;
    let level = flate2::Compression::fast();
    let fail = |e: std::io::Error| ApiError::Internal(format!("compressing the answer failed: {e}"));
    let out = match encoding {
        Encoding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), level);
            for p in parts {
                w.write_all(p).map_err(fail)?;
            }
            w.finish().map_err(fail)?
        }
        Encoding::Deflate => {
            let mut w = flate2::write::ZlibEncoder::new(Vec::new(), level);
            for p in parts {
                w.write_all(p).map_err(fail)?;
            }
            w.finish().map_err(fail)?
        }
    };
    Ok(Bytes::from(out))
}

async fn predict_v1(
    state: &AppState,
    m: &str,
    version: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Chunks>, ApiError> {
    let start = Instant::now();
    let (model, stats) = state
        .repo
        .ready_model(m, version)
        .map_err(inference::count_not_ready)?;
    let _inflight = inference::InFlight::enter(&stats);
    let decoded = async {
        let mut ticket = Ticket::default();
        let (_, body) = read_body(state, &mut ticket, req, None).await?;
        state.admission.admit(&mut ticket)?;
        let decoding = model.clone();
        let request = state
            .offload
            .run(body.len(), move || {
                v1::decode_request(decoding.backend.signature(), &body)
            })
            .await??;
        state.admission.reserve_decoded(&mut ticket, &request.inputs)?;
        Ok((request, ticket))
    }
    .await;
    let (request, _ticket) = inference::counted(&stats, start, decoded)?;
    let outputs = inference::execute(model, &stats, start, request.inputs, Vec::new(), None).await?;
    let format = request.format;
    let json: usize = outputs.iter().map(crate::tensor::Tensor::json_len).sum();
    let body = state
        .offload
        .run(json, move || v1::encode_response(format, &outputs))
        .await??;
    Ok(bytes_response(StatusCode::OK, JSON, Bytes::from(body)))
}

fn v1_status(state: &AppState, m: &str, version: Option<&str>) -> Result<Value, ApiError> {
    let entries: Vec<_> = match version {
        Some(_) => {
            let (v, e) = state.repo.entry(m, version)?;
            vec![(v, e)]
        }
        None => {
            state.repo.entry(m, None)?;
            state
                .repo
                .list()
                .into_iter()
                .filter(|(n, _, _)| n == m)
                .map(|(_, v, e)| (v, e))
                .collect()
        }
    };
    let statuses: Vec<Value> = entries
        .into_iter()
        .map(|(v, e)| {
            let (st, code, msg) = match &e.state {
                ModelState::Ready(_) => ("AVAILABLE", "OK", String::new()),
                ModelState::Loading => ("LOADING", "OK", String::new()),
                ModelState::Failed(err) => ("END", "UNKNOWN", err.clone()),
            };
            serde_json::json!({"version": v.to_string(), "state": st, "status": {"error_code": code, "error_message": msg}})
        })
        .collect();
    // KServe V1's readiness, beside TF-Serving's status.
    let ready = state.repo.ready_model(m, version).is_ok() && !state.repo.is_shutting_down();
    Ok(serde_json::json!({ "name": m, "ready": ready, "model_version_status": statuses }))
}
