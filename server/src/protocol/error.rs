//! The one error type every endpoint returns, and its mapping to HTTP status codes.

use http::StatusCode;

use crate::backend::BackendError;
use crate::repository::LookupError;
use crate::tensor::TensorError;

/// An error answered to a client as `{"error": "..."}`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or does not fit the model (400).
    #[error("{}", Clip(.0))]
    BadRequest(String),
    /// Unknown model, version or path (404).
    #[error("{}", Clip(.0))]
    NotFound(String),
    /// The method is not allowed on the path (405).
    #[error("{}", Clip(.message))]
    MethodNotAllowed {
        /// What went wrong.
        message: String,
        /// The methods the route answers (the `Allow` header).
        allow: &'static str,
    },
    /// The body is larger than the configured limit (413).
    #[error("{}", Clip(.0))]
    PayloadTooLarge(String),
    /// The model or server is not ready (503).
    #[error("{}", Clip(.0))]
    Unavailable(String),
    /// The runtime failed (500).
    #[error("{}", Clip(.0))]
    Internal(String),
    /// The model's batch queue is full (503 with `Retry-After`).
    #[error("{}", Clip(.0))]
    QueueFull(String),
    /// No valid API key (401 with `WWW-Authenticate`).
    #[error("{}", Clip(.0))]
    Unauthorized(String),
    /// A valid API key that may not call this model (403).
    #[error("{}", Clip(.0))]
    Forbidden(String),
    /// A server-wide limit on requests or buffered bytes is reached (503 with `Retry-After`).
    #[error("{}", Clip(.0))]
    Overloaded(String),
    /// The body did not arrive within `--body-read-timeout` (408).
    #[error("{}", Clip(.0))]
    RequestTimeout(String),
    /// The name is taken, e.g. a shared-memory region registered twice (400 over HTTP and
    /// ALREADY_EXISTS over gRPC, as Triton answers).
    #[error("{}", Clip(.0))]
    AlreadyExists(String),
    /// The body is in a form the server does not read, e.g. an unknown Content-Encoding (415).
    #[error("{}", Clip(.0))]
    UnsupportedMediaType(String),
}

/// The most bytes of an error message that are answered or logged. Messages quote what the client
/// sent (an unknown input's name, a value that does not parse), which may be megabytes, and quoted
/// with escapes grows up to four times: answered whole, it made a response (or a gRPC trailer)
/// larger than the request.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Writes a message of at most [`MAX_MESSAGE_BYTES`]: its beginning and its end (where the advice
/// usually is), with how much was cut between them.
struct Clip<'a>(&'a str);

impl std::fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&clip(self.0, MAX_MESSAGE_BYTES))
    }
}

/// `m` cut to about `max` bytes: its first three quarters and its last quarter, at character
/// boundaries, with how many bytes were cut between them. A message only a little over `max` is
/// left whole (the note would make it longer).
pub fn clip(m: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if m.len() <= max + 64 {
        return std::borrow::Cow::Borrowed(m);
    }
    let mut head = max * 3 / 4;
    while !m.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = m.len() - max / 4;
    while !m.is_char_boundary(tail) {
        tail += 1;
    }
    std::borrow::Cow::Owned(format!(
        "{} [{} bytes of this message cut] {}",
        &m[..head],
        tail - head,
        &m[tail..]
    ))
}

impl ApiError {
    /// HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::AlreadyExists(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::QueueFull(_) | ApiError::Overloaded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.to_string() }).to_string()
    }
}

impl ApiError {
    /// The error for a request the API keys refuse; None when the verdict allows it.
    pub fn from_verdict(v: &crate::auth::Verdict, model: Option<&str>) -> Option<ApiError> {
        use crate::auth::Verdict;
        let message = crate::auth::refusal(v, model);
        match v {
            Verdict::Allowed(_) => None,
            Verdict::Missing | Verdict::Invalid => Some(ApiError::Unauthorized(message)),
            Verdict::Forbidden(_) => Some(ApiError::Forbidden(message)),
        }
    }
}

impl From<TensorError> for ApiError {
    fn from(e: TensorError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<LookupError> for ApiError {
    fn from(e: LookupError) -> Self {
        match e {
            LookupError::NotReady { .. } => ApiError::Unavailable(e.to_string()),
            _ => ApiError::NotFound(e.to_string()),
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::InvalidInput(m) => ApiError::BadRequest(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// A JSON syntax or structure error, with the position serde reports.
pub fn json_error(what: &str, e: &serde_json::Error) -> ApiError {
    ApiError::BadRequest(format!("malformed {what}: {e}"))
}

#[cfg(test)]
mod clip_tests {
    use super::*;

    #[test]
    fn a_long_message_keeps_its_beginning_and_its_advice() {
        let name = "\u{300}".repeat(1_000_000);
        let e = ApiError::BadRequest(format!("unknown input {name:?}; the model's inputs are \"x\""));
        let shown = e.to_string();
        assert!(shown.len() < MAX_MESSAGE_BYTES + 100, "{}", shown.len());
        assert!(shown.starts_with("unknown input \"\\u{300}"), "{}", &shown[..40]);
        assert!(
            shown.ends_with("; the model's inputs are \"x\""),
            "{}",
            &shown[shown.len() - 60..]
        );
        assert!(shown.contains(" bytes of this message cut] "));
        // JSON escapes (a backslash doubles, a control character takes six bytes) come on top.
        assert!(e.body().len() < 6 * MAX_MESSAGE_BYTES);
        // Multi-byte characters across both cuts (one ASCII byte first, so that neither cut falls
        // on a boundary by itself), and the text on each side stays whole characters.
        for c in ["\u{1F600}", "\u{4E2D}", "\u{300}"] {
            let m = format!("x{}", c.repeat(5000));
            let shown = ApiError::NotFound(m.clone()).to_string();
            assert!(shown.contains("bytes of this message cut"), "{c}");
            assert!(shown.len() <= MAX_MESSAGE_BYTES + 64, "{}", shown.len());
            let cut: usize = shown
                .split(" bytes of this message cut] ")
                .next()
                .and_then(|h| h.rsplit(" [").next())
                .and_then(|n| n.parse().ok())
                .unwrap();
            assert_eq!(
                shown.len() - " [".len() - cut.to_string().len() - " bytes of this message cut] ".len() + cut,
                m.len()
            );
        }
        assert_eq!(ApiError::Internal("short".into()).to_string(), "short");
        // Just over the bound: left whole.
        let near = "y".repeat(MAX_MESSAGE_BYTES + 10);
        assert_eq!(ApiError::BadRequest(near.clone()).to_string(), near);
    }
}
