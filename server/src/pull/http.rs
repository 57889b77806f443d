//! http(s):// sources (and the transport of the Hugging Face Hub): rustls, redirects followed by
//! hand so that every hop passes the address guard, credentials never follow a redirect to
//! another origin, and an interrupted body resumes with a range request.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, LOCATION, RANGE};
use reqwest::{StatusCode, Url};

use super::fetch::{Body, Entry, FetchError, Source};
use super::guard::{AddressGuard, GuardError, GuardResolver};

const MAX_REDIRECTS: usize = 10;

/// Every cause of an error, each once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// `msg` with the credentials of `url` (a query, a password) replaced, as the URI given is
/// redacted: the URL a redirect leads to may be signed too, and messages reach logs and status.
fn clean(msg: String, url: &Url) -> String {
    kubemaas_crds::artifact::redact(&msg, url.as_str())
}

/// Maps an HTTP status to what the transfer loop does with it.
pub fn status_error(status: StatusCode, url: &Url, detail: &str) -> FetchError {
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    };
    let msg = clean(format!("HTTP {status} from {url}{detail}"), url);
    match status.as_u16() {
        404 | 410 => FetchError::NotFound(msg),
        401 | 403 => FetchError::Denied(msg),
        408 | 425 | 429 | 500..=599 => FetchError::Transient(msg),
        _ => FetchError::Fatal(msg),
    }
}

/// A 429 or 503 that says when to come back (`Retry-After`: seconds, or an HTTP date) becomes
/// [`FetchError::Busy`], so the retry waits that long; other errors pass unchanged.
pub fn with_retry_after(
    e: FetchError,
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> FetchError {
    let (FetchError::Transient(message), 429 | 503) = (&e, status.as_u16()) else {
        return e;
    };
    match headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry_after)
    {
        Some(wait) => FetchError::Busy {
            message: message.clone(),
            wait,
        },
        None => e,
    }
}

/// Parses a `Retry-After` value (RFC 9110: delay seconds or an HTTP date); a date in the past is
/// no wait.
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn guard_error(e: GuardError) -> FetchError {
    match e {
        GuardError::Refused { .. } => FetchError::Refused(e.to_string()),
        GuardError::Dns { .. } => FetchError::Transient(e.to_string()),
    }
}

/// An HTTP client bound to the address guard.
#[derive(Clone)]
pub struct HttpFetcher {
    client: reqwest::Client,
    guard: Arc<AddressGuard>,
    read_timeout: Duration,
}

/// TLS and timeout settings of the client.
pub struct ClientSettings<'a> {
    /// Extra trusted CA certificates (PEM).
    pub ca_pem: Option<&'a [u8]>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// The longest wait for the next bytes of a listing page (`--read-timeout`); downloads are
    /// timed by the transfer loop.
    pub read_timeout: Duration,
}

impl HttpFetcher {
    /// Builds the client; the guard is its DNS resolver.
    pub fn new(guard: Arc<AddressGuard>, settings: &ClientSettings<'_>) -> Result<Self, FetchError> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would connect on our behalf, past the address guard.
            .no_proxy()
            .dns_resolver(Arc::new(GuardResolver(guard.clone())))
            .connect_timeout(settings.connect_timeout)
            .user_agent(concat!("kubemaas-server/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = settings.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| FetchError::Fatal(format!("invalid --ca-file: {}", chain(&e))))?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| FetchError::Fatal(format!("failed to build the HTTP client: {}", chain(&e))))?;
        Ok(HttpFetcher {
            client,
            guard,
            read_timeout: settings.read_timeout,
        })
    }

    /// GET with redirects followed by hand. `auth` goes only to `url`'s own origin.
    pub async fn get(
        &self,
        url: &Url,
        auth: Option<&str>,
        range_from: u64,
        validator: Option<&str>,
    ) -> Result<(reqwest::Response, Url), FetchError> {
        let origin = url.origin();
        let mut current = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let host = current
                .host_str()
                .ok_or_else(|| FetchError::Fatal(format!("{current} has no host")))?;
            // Names are checked by the resolver the client connects through (one lookup, and
            // the address checked is the one used); an IP literal never reaches a resolver.
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
                self.guard.check_ip(bare, ip).map_err(guard_error)?;
            }
            let mut req = self.client.get(current.clone());
            if range_from > 0 {
                req = req.header(RANGE, format!("bytes={range_from}-"));
                if let Some(v) = validator {
                    req = req.header(IF_RANGE, v);
                }
            }
            if let Some(token) = auth
                && current.origin() == origin
            {
                req = req.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            let resp = req.send().await.map_err(|e| request_error(&current, &e))?;
            let status = resp.status();
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                let loc = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        FetchError::Fatal(format!("HTTP {status} from {current} without a Location"))
                    })?;
                let next = current
                    .join(loc)
                    .map_err(|e| FetchError::Fatal(format!("bad redirect Location {loc:?}: {e}")))?;
                if !matches!(next.scheme(), "http" | "https") {
                    return Err(FetchError::Fatal(format!(
                        "refused a redirect to {next}: only http(s)"
                    )));
                }
                if current.scheme() == "https" && next.scheme() == "http" {
                    return Err(FetchError::Fatal(clean(
                        format!("refused a redirect from https to plain http ({next})"),
                        &next,
                    )));
                }
                tracing::debug!(
                    from = %clean(current.to_string(), &current),
                    to = %clean(next.to_string(), &next),
                    "redirect"
                );
                current = next;
                continue;
            }
            return Ok((resp, current));
        }
        Err(FetchError::Fatal(clean(
            format!("more than {MAX_REDIRECTS} redirects from {url}"),
            url,
        )))
    }

    /// Opens a URL as a body, resuming at `offset` when the server honours the range.
    pub async fn open_url(
        &self,
        url: &Url,
        auth: Option<&str>,
        offset: u64,
        validator: Option<&str>,
    ) -> Result<Body, FetchError> {
        let (resp, final_url) = self.get(url, auth, offset, validator).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let sent = validator;
        let validator = headers
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.starts_with("W/"))
            .or_else(|| headers.get(LAST_MODIFIED).and_then(|v| v.to_str().ok()))
            .map(String::from);
        let (resumed, total) = match status {
            StatusCode::OK => (false, resp.content_length()),
            StatusCode::PARTIAL_CONTENT => {
                let cr = headers
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let (start, total) = parse_content_range(cr).ok_or_else(|| {
                    FetchError::Transient(clean(
                        format!("unusable Content-Range {cr:?} from {final_url}"),
                        &final_url,
                    ))
                })?;
                if start != offset {
                    return Err(FetchError::Transient(format!(
                        "asked for bytes from {offset}, got a range starting at {start}"
                    )));
                }
                // A server or cache that ignores If-Range sends a range of whatever it has now:
                // its validator tells another version, whose bytes must not extend ours.
                // Like with like: an ETag is sent quoted, a date is not.
                let now = if sent.is_some_and(|v| v.starts_with('"')) {
                    headers
                        .get(ETAG)
                        .and_then(|v| v.to_str().ok())
                        .filter(|v| !v.starts_with("W/"))
                } else {
                    headers.get(LAST_MODIFIED).and_then(|v| v.to_str().ok())
                };
                if let (Some(sent), Some(now)) = (sent, now)
                    && sent != now
                {
                    return Err(FetchError::Changed(clean(
                        format!("{final_url} changed since the transfer began ({sent} is now {now})"),
                        &final_url,
                    )));
                }
                (true, total)
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                return Err(FetchError::Changed(clean(
                    format!("{final_url} no longer has byte {offset}"),
                    &final_url,
                )));
            }
            s => {
                let html = headers
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("html"));
                let text = first_bytes(resp, ERROR_PAGE_BYTES).await;
                // A short plain or JSON answer says why; an HTML error page does not.
                let detail: String = if html || text.trim_start().starts_with('<') {
                    String::new()
                } else {
                    text.lines()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("")
                        .chars()
                        .take(200)
                        .collect()
                };
                return Err(with_retry_after(
                    status_error(s, &final_url, detail.trim()),
                    s,
                    &headers,
                ));
            }
        };
        let url_for_errors = final_url.clone();
        let stream = resp.bytes_stream().map(move |r| {
            r.map_err(|e| {
                FetchError::Transient(clean(
                    format!("reading {url_for_errors}: {}", chain(&e)),
                    &url_for_errors,
                ))
            })
        });
        Ok(Body {
            stream: Box::pin(stream),
            total,
            resumed,
            validator,
        })
    }

    /// GET a small document (a listing) whole, with `auth`.
    pub async fn get_json(
        &self,
        url: &Url,
        auth: Option<&str>,
    ) -> Result<(serde_json::Value, Option<String>), FetchError> {
        // A page accepted and never answered is a stalled read: retried by the caller.
        let stalled = |at: &Url| {
            FetchError::Transient(clean(
                format!(
                    "no answer from {at} for {}s (--read-timeout)",
                    self.read_timeout.as_secs()
                ),
                at,
            ))
        };
        let (resp, final_url) = tokio::time::timeout(self.read_timeout, self.get(url, auth, 0, None))
            .await
            .map_err(|_| stalled(url))??;
        let status = resp.status();
        let link = resp
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        if !status.is_success() {
            let code = resp
                .headers()
                .get("x-error-code")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            return Err(with_retry_after(
                status_error(status, &final_url, &code),
                status,
                resp.headers(),
            ));
        }
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(chunk) = tokio::time::timeout(self.read_timeout, resp.chunk())
            .await
            .map_err(|_| stalled(&final_url))?
            .map_err(|e| {
                FetchError::Transient(clean(format!("reading {final_url}: {}", chain(&e)), &final_url))
            })?
        {
            if body.len() + chunk.len() > LISTING_PAGE_BYTES {
                return Err(FetchError::Fatal(clean(
                    format!("{final_url} answered a listing page larger than 16 MiB; that is not a listing"),
                    &final_url,
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let v = serde_json::from_slice(&body).map_err(|e| {
            FetchError::Fatal(clean(format!("{final_url} did not answer JSON: {e}"), &final_url))
        })?;
        Ok((v, link))
    }
}

/// The largest listing page read (a Hub page of hundreds of files is a few hundred KB).
const LISTING_PAGE_BYTES: usize = 16 << 20;

/// The most of an error answer read for its message: the first line is all that is used, and an
/// error page may be of any size.
const ERROR_PAGE_BYTES: usize = 64 << 10;

/// The first `cap` bytes of `resp`'s body as text (lossy); the rest is never read.
async fn first_bytes(mut resp: reqwest::Response, cap: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < cap {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c[..c.len().min(cap - buf.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn request_error(url: &Url, e: &reqwest::Error) -> FetchError {
    let text = chain(e);
    if let Some(g) = std::error::Error::source(e).and_then(find_guard_error) {
        return guard_error(g);
    }
    let msg = clean(format!("GET {url}: {text}"), url);
    if text.contains("certificate") || text.contains("UnknownIssuer") || text.contains("InvalidCertificate") {
        // A TLS trust failure does not heal by retrying.
        return FetchError::Fatal(format!("{msg} (give the store's CA with --ca-file)"));
    }
    FetchError::Transient(msg)
}

fn find_guard_error(mut e: &(dyn std::error::Error + 'static)) -> Option<GuardError> {
    loop {
        if let Some(g) = e.downcast_ref::<GuardError>() {
            return Some(g.clone());
        }
        e = e.source()?;
    }
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`).
pub fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

/// One file at an http(s) URL.
pub struct HttpSource {
    /// The client.
    pub http: HttpFetcher,
    /// The URL.
    pub url: Url,
    /// Bearer token for the URL's origin.
    pub token: Option<String>,
}

impl Source for HttpSource {
    async fn list(&self) -> Result<Vec<Entry>, FetchError> {
        Ok(vec![Entry {
            rel: String::new(),
            size: None,
            locator: self.url.to_string(),
        }])
    }

    async fn open(&self, _entry: &Entry, offset: u64, validator: Option<&str>) -> Result<Body, FetchError> {
        self.http
            .open_url(&self.url, self.token.as_deref(), offset, validator)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_parsed_with_and_without_a_total() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn retry_after_is_seconds_or_a_date_and_only_a_busy_answer_carries_it() {
        assert_eq!(retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(90));
        let wait = retry_after(&later).unwrap();
        assert!(
            wait > Duration::from_secs(85) && wait <= Duration::from_secs(90),
            "{wait:?}"
        );
        assert_eq!(retry_after("soon"), None);
        assert_eq!(retry_after("-1"), None);
        let u = Url::parse("http://h/x").unwrap();
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        let busy =
            |s: StatusCode, h: &reqwest::header::HeaderMap| with_retry_after(status_error(s, &u, ""), s, h);
        assert!(matches!(
            busy(StatusCode::TOO_MANY_REQUESTS, &h),
            FetchError::Busy { wait, .. } if wait == Duration::from_secs(7)
        ));
        assert!(matches!(
            busy(StatusCode::SERVICE_UNAVAILABLE, &h),
            FetchError::Busy { .. }
        ));
        // A 500 or a 404 is what it is, whatever it says about later.
        assert!(matches!(
            busy(StatusCode::INTERNAL_SERVER_ERROR, &h),
            FetchError::Transient(_)
        ));
        assert!(matches!(busy(StatusCode::NOT_FOUND, &h), FetchError::NotFound(_)));
        let none = reqwest::header::HeaderMap::new();
        assert!(matches!(
            busy(StatusCode::TOO_MANY_REQUESTS, &none),
            FetchError::Transient(_)
        ));
    }

    #[test]
    fn statuses_map_to_not_found_denied_transient_and_fatal() {
        let u = Url::parse("http://h/x").unwrap();
        assert!(matches!(
            status_error(StatusCode::NOT_FOUND, &u, ""),
            FetchError::NotFound(_)
        ));
        assert!(matches!(
            status_error(StatusCode::FORBIDDEN, &u, ""),
            FetchError::Denied(_)
        ));
        assert!(matches!(
            status_error(StatusCode::SERVICE_UNAVAILABLE, &u, ""),
            FetchError::Transient(_)
        ));
        assert!(matches!(
            status_error(StatusCode::TOO_MANY_REQUESTS, &u, ""),
            FetchError::Transient(_)
        ));
        assert!(matches!(
            status_error(StatusCode::BAD_REQUEST, &u, ""),
            FetchError::Fatal(_)
        ));
    }
}
