//! s3:// and gs:// sources through `object_store`, which owns request signing and the credential
//! chains (static keys, IRSA web-identity tokens, ECS/instance metadata; GCS service accounts and
//! workload identity). We add: a shared AWS credentials file, `STORAGE_EMULATOR_HOST`, an extra CA,
//! no whole-request timeout (large bodies take long; stalls are caught per read by the loop).

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig,
};

use super::fetch::{Body, Entry, FetchError, Source};

/// Store settings that come from flags rather than the environment.
pub struct StoreSettings<'a> {
    /// Extra trusted CA certificates (PEM).
    pub ca_pem: Option<&'a [u8]>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// `--credentials-dir`, for `credentials` (AWS) and `service-account.json` (GCS).
    pub credentials_dir: Option<&'a FsPath>,
}

fn client_options(s: &StoreSettings<'_>, endpoint: Option<&str>) -> Result<ClientOptions, FetchError> {
    let mut opts = ClientOptions::new()
        .with_timeout_disabled()
        .with_connect_timeout(s.connect_timeout)
        .with_user_agent(reqwest::header::HeaderValue::from_static(concat!(
            "kubemaas-server/",
            env!("CARGO_PKG_VERSION")
        )));
    if endpoint.is_some_and(|e| e.starts_with("http://")) {
        opts = opts.with_allow_http(true);
    }
    if let Some(pem) = s.ca_pem {
        for cert in Certificate::from_pem_bundle(pem)
            .map_err(|e| FetchError::Fatal(format!("invalid --ca-file: {e}")))?
        {
            opts = opts.with_root_certificate(cert);
        }
    }
    Ok(opts)
}

fn retry() -> RetryConfig {
    // Request-level retries inside object_store stay short: the transfer loop retries and resumes.
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 2,
        retry_timeout: Duration::from_secs(30),
    }
}

/// One profile of an AWS shared credentials file (INI): key id, secret, optional session token.
pub fn read_aws_credentials(text: &str, profile: &str) -> Option<(String, String, Option<String>)> {
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            in_profile = name == profile || name == format!("profile {profile}");
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some((id?, secret?, token))
}

/// An S3 bucket (AWS or S3-compatible via `AWS_ENDPOINT_URL`).
/// `region`, when given, replaces the configured one (the bucket's own, found by
/// [`bucket_region`] after S3 said the bucket is elsewhere).
pub fn s3(
    bucket: &str,
    s: &StoreSettings<'_>,
    region: Option<&str>,
) -> Result<Arc<dyn ObjectStore>, FetchError> {
    let endpoint = s3_endpoint();
    let mut b = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(client_options(s, endpoint.as_deref())?)
        .with_retry(retry());
    if let Some(r) = region {
        b = b.with_region(r);
    } else if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
        b = b.with_region("us-east-1");
    }
    if let Some(ep) = &endpoint {
        // S3-compatible stores (MinIO, Ceph, moto) address buckets by path, unless
        // AWS_VIRTUAL_HOSTED_STYLE_REQUEST says the endpoint is the bucket's own address.
        b = b
            .with_endpoint(ep)
            .with_virtual_hosted_style_request(virtual_hosted());
    }
    // A shared credentials file, when no key is in the environment: $AWS_SHARED_CREDENTIALS_FILE,
    // else `credentials` in --credentials-dir.
    let mut has_file = false;
    if std::env::var("AWS_ACCESS_KEY_ID").is_err() {
        let file = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
            .map(std::path::PathBuf::from)
            .or_else(|| s.credentials_dir.map(|d| d.join("credentials")));
        if let Some(file) = file.filter(|f| f.is_file()) {
            let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
            let text = std::fs::read_to_string(&file)
                .map_err(|e| FetchError::Fatal(format!("cannot read {}: {e}", file.display())))?;
            let (id, secret, token) = read_aws_credentials(&text, &profile).ok_or_else(|| {
                FetchError::Denied(format!(
                    "{} has no aws_access_key_id/aws_secret_access_key in profile [{profile}]",
                    file.display()
                ))
            })?;
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            has_file = true;
            if let Some(t) = token {
                b = b.with_token(t);
            }
        }
    }
    let has_static = std::env::var("AWS_ACCESS_KEY_ID").is_ok()
        || std::env::var("AWS_WEB_IDENTITY_TOKEN_FILE").is_ok()
        || std::env::var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_ok()
        || std::env::var("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_ok()
        || has_file;
    if endpoint.is_some() && !has_static {
        // An S3-compatible store has no instance metadata service to ask: without credentials
        // the requests go unsigned (a public bucket) instead of probing 169.254.169.254.
        b = b.with_skip_signature(true);
    }
    b.build()
        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| FetchError::Fatal(format!("S3 configuration: {e}")))
}

fn s3_endpoint() -> Option<String> {
    std::env::var("AWS_ENDPOINT_URL_S3")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .ok()
        .filter(|e| !e.is_empty())
}

/// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST` as `object_store` reads it (true, 1, yes, y, on); unset or
/// empty: false, since a custom endpoint is most often a store that addresses buckets by path.
fn virtual_hosted() -> bool {
    std::env::var("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "y" | "on"
        )
    })
}

/// What `object_store` says when S3 answers 301 without a Location: the bucket is in another
/// region than the one the request was signed for.
const WRONG_REGION: &str = "redirect without LOCATION";

/// Whether a failure is S3 saying the bucket lives in another region.
pub fn is_wrong_region(message: &str) -> bool {
    message.contains(WRONG_REGION)
}

/// The bucket's region, from the `x-amz-bucket-region` header S3 puts on any answer to a HEAD of
/// the bucket, signed or not (the AWS CLI and boto3 find it the same way).
pub async fn bucket_region(
    bucket: &str,
    s: &StoreSettings<'_>,
    read_timeout: Duration,
) -> Result<String, FetchError> {
    let url = match s3_endpoint() {
        // The endpoint is the bucket's own address.
        Some(ep) if virtual_hosted() => {
            format!("{}/", ep.trim_end_matches('/'))
        }
        Some(ep) => format!("{}/{bucket}", ep.trim_end_matches('/')),
        None => format!("https://s3.amazonaws.com/{bucket}"),
    };
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(s.connect_timeout)
        .user_agent(concat!("kubemaas-server/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = s.ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| FetchError::Fatal(format!("invalid --ca-file: {e}")))?;
        builder = builder.tls_certs_merge(certs);
    }
    let client = builder
        .build()
        .map_err(|e| FetchError::Fatal(format!("failed to build the HTTP client: {e}")))?;
    let unknown = |why: String| {
        FetchError::Fatal(format!(
            "bucket {bucket} is in another region than the one configured, and its region could not be \
             found ({why}); set AWS_REGION to the bucket's region"
        ))
    };
    let resp = tokio::time::timeout(read_timeout, client.head(&url).send())
        .await
        .map_err(|_| unknown(format!("HEAD {url}: no answer for {}s", read_timeout.as_secs())))?
        .map_err(|e| unknown(format!("HEAD {url}: {}", super::http::chain(&e))))?;
    resp.headers()
        .get("x-amz-bucket-region")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .map(String::from)
        .ok_or_else(|| {
            unknown(format!(
                "HEAD {url} answered {} without x-amz-bucket-region",
                resp.status()
            ))
        })
}

/// A GCS bucket; `STORAGE_EMULATOR_HOST` points it at an emulator (no authentication).
pub fn gcs(bucket: &str, s: &StoreSettings<'_>) -> Result<Arc<dyn ObjectStore>, FetchError> {
    let emulator = std::env::var("STORAGE_EMULATOR_HOST")
        .ok()
        .filter(|e| !e.is_empty());
    let emulator = emulator.map(|e| {
        if e.contains("://") {
            e
        } else {
            format!("http://{e}")
        }
    });
    let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(client_options(s, emulator.as_deref())?)
        .with_retry(retry());
    if let Some(ep) = &emulator {
        b = b
            .with_base_url(ep.trim_end_matches('/'))
            .with_skip_signature(true);
    } else if let Ok(path) = std::env::var("GOOGLE_APPLICATION_CREDENTIALS") {
        b = b.with_application_credentials(path);
    } else if let Some(file) = s
        .credentials_dir
        .map(|d| d.join("service-account.json"))
        .filter(|f| f.is_file())
    {
        b = b.with_service_account_path(file.to_string_lossy());
    }
    b.build()
        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| FetchError::Fatal(format!("GCS configuration: {e}")))
}

fn map_err(e: object_store::Error) -> FetchError {
    let text = super::http::chain(&e);
    match e {
        object_store::Error::NotFound { .. } => FetchError::NotFound(text),
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            FetchError::Denied(text)
        }
        object_store::Error::Precondition { .. } => FetchError::Changed(text),
        // Not retried: the same region gets the same answer. The S3 source finds the bucket's
        // region and goes on there.
        object_store::Error::Generic { .. } if is_wrong_region(&text) => FetchError::Fatal(text),
        object_store::Error::Generic { .. } => {
            // Some stores answer a bad key with 400/403 inside a generic error.
            if [
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "403 Forbidden",
                "401 Unauthorized",
            ]
            .iter()
            .any(|k| text.contains(k))
            {
                FetchError::Denied(text)
            } else if text.contains("HEAD") && text.contains("400 Bad Request") {
                // S3 answers a bad or expired session token (and a wrong region) with 400, and a
                // HEAD response carries no error code to tell them apart.
                FetchError::Denied(format!(
                    "{text} (HTTP 400 to HEAD: an invalid or expired session token, or a wrong region)"
                ))
            } else if text.contains("404 Not Found")
                || text.contains("NoSuchKey")
                || text.contains("NoSuchBucket")
            {
                FetchError::NotFound(text)
            } else {
                FetchError::Transient(text)
            }
        }
        _ => FetchError::Fatal(text),
    }
}

/// An object or a prefix in a bucket.
pub struct StoreSource {
    /// The bucket.
    pub store: Arc<dyn ObjectStore>,
    /// Object key, or a prefix ending in `/`.
    pub key: String,
    /// The longest wait for the next listed key or a HEAD answer (`--read-timeout`).
    pub read_timeout: Duration,
}

impl StoreSource {
    /// Whether an object has exactly this name (a HEAD).
    async fn exists(&self, location: &Path) -> Result<bool, FetchError> {
        match tokio::time::timeout(self.read_timeout, self.store.head(location))
            .await
            .map_err(|_| self.stalled())?
            .map_err(map_err)
        {
            Ok(_) => Ok(true),
            Err(FetchError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn stalled(&self) -> FetchError {
        FetchError::Transient(format!(
            "the store did not answer for {}s (--read-timeout)",
            self.read_timeout.as_secs()
        ))
    }
}

/// The store's path for `key`, exactly as named: `Path::from` would percent-encode characters such
/// as `~`, `#` or `[` (legal in keys) and so name another object.
fn key_path(key: &str) -> Result<Path, FetchError> {
    Path::parse(key).map_err(|e| FetchError::Fatal(format!("object key {key:?} cannot be fetched: {e}")))
}

impl Source for StoreSource {
    async fn list(&self) -> Result<Vec<Entry>, FetchError> {
        if let Some(prefix) = self.key.strip_suffix('/') {
            let base = key_path(prefix)?;
            // Timed per key rather than per listing: a large prefix takes several pages, each
            // of which must come within the read timeout.
            let mut keys = self.store.list(Some(&base));
            let mut entries = Vec::new();
            while let Some(m) = tokio::time::timeout(self.read_timeout, keys.next())
                .await
                .map_err(|_| self.stalled())?
            {
                let m = m.map_err(map_err)?;
                let key = m.location.to_string();
                let Some(rel) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
                    continue;
                };
                if m.size == 0 && !self.exists(&m.location).await? {
                    // A "folder" the S3 or GCS console created: a 0-byte object named `dir/`,
                    // listed without its slash (object_store drops it), so no object has the
                    // listed name. Its files, if any, are listed on their own.
                    continue;
                }
                entries.push(Entry {
                    rel: rel.to_string(),
                    size: Some(m.size),
                    locator: key,
                });
            }
            entries.sort_by(|a, b| a.rel.cmp(&b.rel));
            return Ok(entries);
        }
        let meta = tokio::time::timeout(self.read_timeout, self.store.head(&key_path(&self.key)?))
            .await
            .map_err(|_| self.stalled())?
            .map_err(map_err)?;
        Ok(vec![Entry {
            rel: String::new(),
            size: Some(meta.size),
            locator: meta.location.to_string(),
        }])
    }

    async fn open(&self, entry: &Entry, offset: u64, validator: Option<&str>) -> Result<Body, FetchError> {
        if entry.size == Some(offset) && offset > 0 {
            // Everything arrived before the connection dropped.
            return Ok(Body {
                stream: Box::pin(futures::stream::empty()),
                total: entry.size,
                resumed: true,
                validator: validator.map(String::from),
            });
        }
        let opts = GetOptions {
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            if_match: validator.map(String::from),
            ..GetOptions::default()
        };
        let got = self
            .store
            .get_opts(&key_path(&entry.locator)?, opts)
            .await
            .map_err(map_err)?;
        let total = Some(got.meta.size);
        let validator = got.meta.e_tag.clone();
        let resumed = got.range.start == offset;
        let stream = got.into_stream().map(|r| {
            r.map_err(|e| FetchError::Transient(format!("reading the object: {}", super::http::chain(&e))))
        });
        Ok(Body {
            stream: Box::pin(stream),
            total,
            resumed,
            validator,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_credentials_file_profiles_are_read() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = S\n\n[profile other]\naws_access_key_id=B\naws_secret_access_key=T\naws_session_token=X\n";
        assert_eq!(
            read_aws_credentials(text, "default"),
            Some(("A".into(), "S".into(), None))
        );
        assert_eq!(
            read_aws_credentials(text, "other"),
            Some(("B".into(), "T".into(), Some("X".into())))
        );
        assert_eq!(read_aws_credentials(text, "missing"), None);
    }
}
