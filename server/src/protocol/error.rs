//! The one error type every endpoint returns, and its mapping to HTTP status codes.

use http::StatusCode;

use crate::backend::BackendError;
use crate::repository::LookupError;
use crate::tensor::TensorError;

/// An error answered to a client as `{"error": "..."}`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or does not fit the model (400).
    #[error("{0}")]
    BadRequest(String),
    /// Unknown model, version or path (404).
    #[error("{0}")]
    NotFound(String),
    /// The method is not allowed on the path (405).
    #[error("{message}")]
    MethodNotAllowed {
        /// What went wrong.
        message: String,
        /// The methods the route answers (the `Allow` header).
        allow: &'static str,
    },
    /// The body is larger than the configured limit (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The model or server is not ready (503).
    #[error("{0}")]
    Unavailable(String),
    /// The runtime failed (500).
    #[error("{0}")]
    Internal(String),
    /// The model's batch queue is full (503 with `Retry-After`).
    #[error("{0}")]
    QueueFull(String),
    /// No valid API key (401 with `WWW-Authenticate`).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid API key that may not call this model (403).
    #[error("{0}")]
    Forbidden(String),
    /// A server-wide limit on requests or buffered bytes is reached (503 with `Retry-After`).
    #[error("{0}")]
    Overloaded(String),
    /// The body did not arrive within `--body-read-timeout` (408).
    #[error("{0}")]
    RequestTimeout(String),
    /// The name is taken, e.g. a shared-memory region registered twice (400 over HTTP and
    /// ALREADY_EXISTS over gRPC, as Triton answers).
    #[error("{0}")]
    AlreadyExists(String),
    /// The body is in a form the server does not read, e.g. an unknown Content-Encoding (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
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
