//! `kubemaas-server pull URI DEST`: the init-container step that fetches a model artifact, verifies
//! it, and only then puts it where the server will look.
//!
//! Sources (one module each, behind [`fetch::Source`]): `s3://` and `gs://` ([`store`]),
//! `http(s)://` ([`http`]), `hf://` ([`hf`]), `pvc://` ([`local`]). A URI ending in `/` (or a whole
//! Hugging Face repository) is a directory: every file below it lands under DEST, so ONNX models
//! with external-data files work. Shared by all: streaming to a staging path next to DEST while
//! hashing, retries with backoff and range resume ([`fetch`]), the byte limit, the address guard
//! ([`guard`]), an optional sha256-keyed cache, and atomic placement: DEST appears only complete
//! and verified. Exit codes and the record file are the contract in
//! [`kubemaas_crds::artifact`].

pub mod fetch;
pub mod guard;
pub mod hf;
pub mod http;
pub mod local;
pub mod store;
pub mod uri;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubemaas_crds::artifact::{PULL_RECORD_FILE, exit};
use serde::Serialize;

use fetch::{FetchError, Fetched, Limits, Progress, Source};
use uri::ArtifactUri;

/// Flags of `kubemaas-server pull`.
#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    /// Artifact URI: s3://bucket/key, gs://bucket/object, http(s)://host/path,
    /// hf://org/repo[/path][@revision], pvc://claim/path. A URI ending in '/' (or a whole hf repo)
    /// is a directory whose files all land under DEST.
    pub uri: String,
    /// Destination: the model file (e.g. /models/NAME/1/model.onnx), or the version directory
    /// (e.g. /models/NAME/1) for a directory URI.
    pub dest: PathBuf,
    /// Expected SHA-256 (64 hex characters) of the file, or of a directory's manifest (sha256sum
    /// lines "HEX  PATH" sorted by path). A mismatch leaves nothing at DEST and exits 3.
    #[arg(long, env = "KUBEMAAS_MODEL_SHA256")]
    pub sha256: Option<String>,
    /// Give up the download after this many seconds in all (the copy into --cache-dir and, with
    /// --compress, the compression that follow are not counted; the cache copy has a bound of its
    /// own, the same number of seconds, and one that runs out is dropped without failing the pull).
    #[arg(long, env = "KUBEMAAS_PULL_TIMEOUT", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Refuse artifacts larger than this many bytes in all (exit 7).
    #[arg(long, env = "KUBEMAAS_PULL_MAX_BYTES")]
    pub max_bytes: Option<u64>,
    /// Retries per file after a transient failure (connection lost, 5xx, 429, a stalled read);
    /// a retry resumes with a range request where the source allows. Over HTTP(S) and from the
    /// Hugging Face Hub, a 429 or 503 with Retry-After is retried no sooner than it asks, and
    /// fails at once if that is past --timeout.
    #[arg(long, env = "KUBEMAAS_PULL_RETRIES", default_value_t = 5)]
    pub retries: u32,
    /// Seconds without a byte after which a transfer, a listing page or a HEAD request counts as
    /// stalled (and is retried).
    #[arg(long, env = "KUBEMAAS_PULL_READ_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub read_timeout: u64,
    /// TCP connect timeout, seconds.
    #[arg(long, env = "KUBEMAAS_PULL_CONNECT_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout: u64,
    /// Allow http(s)/hf hosts that resolve to loopback or private ranges (RFC 1918, the RFC 6598
    /// shared space, IPv6 unique-local), for stores inside your network. Link-local and cloud
    /// metadata addresses are refused regardless.
    #[arg(long, env = "KUBEMAAS_ALLOW_PRIVATE_ADDRESSES")]
    pub allow_private_addresses: bool,
    /// Pin a host name to addresses, like curl's --resolve: HOST=IP[,IP], for http(s):// and hf://
    /// sources (s3:// and gs:// resolve through their SDK's client). The address guard still
    /// applies. Repeatable.
    #[arg(long = "resolve", value_name = "HOST=IP")]
    pub resolve: Vec<String>,
    /// PEM file of extra CA certificates trusted for https, S3 and GCS endpoints.
    #[arg(long, env = "KUBEMAAS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// File holding a bearer token sent to the http(s) URL's own host (never across a redirect to
    /// another host).
    #[arg(long, env = "KUBEMAAS_BEARER_TOKEN_FILE")]
    pub bearer_token_file: Option<PathBuf>,
    /// Directory of mounted credentials (the ModelDeployment's credentialsSecretRef): `credentials`
    /// (AWS shared credentials file), `service-account.json` (GCS), `token` (bearer token for
    /// http(s), Hugging Face token). Missing files are ignored.
    #[arg(long, env = "KUBEMAAS_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// Where PersistentVolumeClaims are mounted for pvc:// URIs.
    #[arg(long, env = "KUBEMAAS_PVC_ROOT", default_value = "/mnt/pvc")]
    pub pvc_root: PathBuf,
    /// File the failure message is written to, for `kubectl describe` and the operator's status.
    #[arg(
        long,
        env = "KUBEMAAS_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
    /// Seconds between progress lines (bytes, rate, ETA).
    #[arg(long, env = "KUBEMAAS_PULL_PROGRESS_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_seconds: u64,
    /// Compress the model once it is downloaded and verified (`kubemaas-server compress` with
    /// --check): the server then serves the compressed model, the original moves to
    /// `.kubemaas-original/` in the version directory, and the report joins the pull record. A
    /// result under --min-cosine exits 9 and leaves nothing to serve.
    #[arg(long, value_enum, env = "KUBEMAAS_COMPRESS")]
    pub compress: Option<crate::compress::Mode>,
    /// The cosine similarity to the original that --compress requires of every output, 0 to 1.
    #[arg(long, env = "KUBEMAAS_COMPRESS_MIN_COSINE", default_value_t = 0.99, value_parser = crate::compress::unit_interval, requires = "compress")]
    pub min_cosine: f64,
    /// --compress: size of a random evaluation input's dynamic dimensions, NAME=1x3x48x320.
    /// Repeatable.
    #[arg(long = "input-shape", value_name = "NAME=DIMS", value_parser = crate::compress::parse_shape, requires = "compress")]
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// --compress: ONNX Runtime intra-op threads for the evaluation (0: one per core of the
    /// machine; in a pod, give the container's CPU limit), at most 1024.
    #[arg(long, env = "KUBEMAAS_COMPRESS_THREADS", default_value_t = 0, value_parser = crate::compress::thread_count, requires = "compress")]
    pub compress_threads: usize,
    /// ONNX Runtime shared library for --compress's evaluation (as for `serve`).
    #[arg(long, env = "ORT_DYLIB_PATH", value_parser = crate::serve::path_or_unset)]
    pub ort_library: Option<PathBuf>,
    /// A sha256-keyed artifact cache (e.g. a shared ReadWriteMany volume): a verified hit is copied
    /// instead of downloaded, a download is stored for the next pod. Needs --sha256. Copies that
    /// killed pulls left half-written (`*.incoming`, unwritten for an hour) are removed.
    #[arg(long, env = "KUBEMAAS_MODEL_CACHE", requires = "sha256")]
    pub cache_dir: Option<PathBuf>,
}

/// Why a pull failed; each kind has its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Transfer failure, timeout, bad URI or local disk error.
    #[error("failed to download {uri}: {message}")]
    Download {
        /// URI.
        uri: String,
        /// Why.
        message: String,
    },
    /// Nothing at that location.
    #[error("failed to download {uri}: not found: {message}")]
    NotFound {
        /// URI.
        uri: String,
        /// Why.
        message: String,
    },
    /// Credentials refused.
    #[error("failed to download {uri}: access denied: {message}")]
    AccessDenied {
        /// URI.
        uri: String,
        /// Why.
        message: String,
    },
    /// Over `--max-bytes`.
    #[error("failed to download {uri}: artifact too large: {message}")]
    TooLarge {
        /// URI.
        uri: String,
        /// Why.
        message: String,
    },
    /// The address guard refused the host.
    #[error("refused to download {uri}: {message}")]
    AddressRefused {
        /// URI.
        uri: String,
        /// Why.
        message: String,
    },
    /// `--compress` could not compress the model (unsupported model, evaluation failed).
    #[error("failed to compress {uri}: {message}")]
    Compression {
        /// URI.
        uri: String,
        /// Why.
        message: String,
    },
    /// `--compress`'s check refused the result: it agrees too little with the original.
    #[error("{uri}: {message}")]
    CompressionRejected {
        /// URI.
        uri: String,
        /// The numbers.
        message: String,
    },
    /// The content does not match the pinned digest.
    #[error("checksum mismatch for {uri}: expected sha256 {expected}, got {actual}")]
    Checksum {
        /// URI.
        uri: String,
        /// Pinned digest.
        expected: String,
        /// Digest of what was downloaded.
        actual: String,
    },
}

impl PullError {
    /// Process exit code (see `kubemaas_crds::artifact::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            PullError::Download { .. } => exit::DOWNLOAD_FAILED,
            PullError::NotFound { .. } => exit::NOT_FOUND,
            PullError::AccessDenied { .. } => exit::ACCESS_DENIED,
            PullError::TooLarge { .. } => exit::TOO_LARGE,
            PullError::AddressRefused { .. } => exit::ADDRESS_REFUSED,
            PullError::Checksum { .. } => exit::CHECKSUM_MISMATCH,
            PullError::Compression { .. } => exit::COMPRESSION_FAILED,
            PullError::CompressionRejected { .. } => exit::COMPRESSION_REJECTED,
        }
    }

    /// The same error with the credentials of `given` (the URI as given: a presigned query, a
    /// password) replaced wherever they appear: its message becomes the pod's termination message
    /// and the condition's.
    fn redacted(mut self, given: &str) -> Self {
        let (uri, message) = match &mut self {
            PullError::Download { uri, message }
            | PullError::NotFound { uri, message }
            | PullError::AccessDenied { uri, message }
            | PullError::TooLarge { uri, message }
            | PullError::AddressRefused { uri, message }
            | PullError::Compression { uri, message }
            | PullError::CompressionRejected { uri, message } => (uri, Some(message)),
            PullError::Checksum { uri, .. } => (uri, None),
        };
        *uri = kubemaas_crds::artifact::redact(uri, given);
        if let Some(m) = message {
            *m = kubemaas_crds::artifact::redact(m, given);
        }
        self
    }

    fn from_fetch(uri: &str, e: FetchError) -> Self {
        let uri = uri.to_string();
        match e {
            FetchError::NotFound(message) => PullError::NotFound { uri, message },
            FetchError::Denied(message) => PullError::AccessDenied { uri, message },
            FetchError::TooLarge(message) => PullError::TooLarge { uri, message },
            FetchError::Refused(message) => PullError::AddressRefused { uri, message },
            FetchError::Transient(message)
            | FetchError::Busy { message, .. }
            | FetchError::Changed(message)
            | FetchError::Fatal(message)
            | FetchError::Local(message) => PullError::Download { uri, message },
        }
    }
}

/// What a successful pull fetched: printed as the last stdout line and written to
/// `kubemaas-pull.json` in the version directory, where the server reads it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Record {
    /// The URI as given, less its credentials (`kubemaas_crds::artifact::redact_uri`): the record
    /// is served as model metadata.
    pub uri: String,
    /// SHA-256 of the file, or of the directory manifest.
    pub sha256: String,
    /// Bytes over all files.
    pub bytes: u64,
    /// Number of files.
    pub files: usize,
    /// Seconds the pull took.
    pub seconds: f64,
    /// The `compress` report, when the model was compressed after the download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<serde_json::Value>,
}

fn staging_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.partial"))
}

async fn remove_any(path: &Path) {
    match tokio::fs::symlink_metadata(path).await {
        Ok(m) if m.is_dir() => {
            let _ = tokio::fs::remove_dir_all(path).await;
        }
        Ok(_) => {
            let _ = tokio::fs::remove_file(path).await;
        }
        Err(_) => {}
    }
}

/// Fetches from `src` into the staging path, verifies, and moves it to `dest`. On any failure
/// nothing is left at `dest` (nor at the staging path).
pub async fn fetch_verify_place<S: Source>(
    src: &S,
    uri: &str,
    directory: bool,
    dest: &Path,
    expected: Option<&str>,
    limits: &Limits,
    progress: &Progress,
) -> Result<Fetched, PullError> {
    let staging = staging_path(dest);
    remove_any(&staging).await;
    let outcome = async {
        let fetched = fetch::fetch_all(src, &staging, directory, limits, progress)
            .await
            .map_err(|e| PullError::from_fetch(uri, e))?;
        if let Some(want) = expected
            && !want.eq_ignore_ascii_case(&fetched.sha256)
        {
            return Err(PullError::Checksum {
                uri: uri.to_string(),
                expected: want.to_string(),
                actual: fetched.sha256,
            });
        }
        remove_any(dest).await;
        tokio::fs::rename(&staging, dest)
            .await
            .map_err(|e| PullError::Download {
                uri: uri.to_string(),
                message: format!("failed to move {} into place: {e}", dest.display()),
            })?;
        Ok(fetched)
    }
    .await;
    if outcome.is_err() {
        remove_any(&staging).await;
    }
    outcome
}

/// Copies a placed artifact into the cache under its digest (best effort, atomic by rename).
async fn cache_store(
    cache: &Path,
    sha: &str,
    placed: &Path,
    directory: bool,
    limits: &Limits,
) -> Result<(), String> {
    let entries = cache.join("sha256");
    let final_path = entries.join(sha);
    // Every pull that uses the cache sweeps it, hits included: a cluster where every pod hits
    // still clears what killed pods left.
    let sweep = entries.clone();
    let _ = tokio::task::spawn_blocking(move || sweep_abandoned_copies(&sweep, ABANDONED_AFTER)).await;
    if tokio::fs::symlink_metadata(&final_path).await.is_ok() {
        return Ok(());
    }
    tokio::fs::create_dir_all(&entries)
        .await
        .map_err(|e| e.to_string())?;
    let tmp = entries.join(incoming_name(sha));
    let mut incoming = Incoming(Some(tmp.clone()));
    let src = local::LocalSource {
        root: placed.parent().map(Path::to_path_buf).unwrap_or_default(),
        path: format!(
            "{}{}",
            placed
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            if directory { "/" } else { "" }
        ),
    };
    let progress = Progress::default();
    let copied = fetch::fetch_all(&src, &tmp, directory, limits, &progress).await;
    match copied {
        Ok(f) if f.sha256 == sha => {
            // A concurrent pod may have stored it first: then ours is dropped. Renamed here,
            // without an await, so that a timeout cannot drop the guard while the rename runs.
            incoming.0 = None;
            if std::fs::rename(&tmp, &final_path).is_err() {
                remove_any(&tmp).await;
            }
            Ok(())
        }
        Ok(f) => {
            remove_any(&tmp).await;
            Err(format!("copy digest {} differs", f.sha256))
        }
        Err(e) => {
            remove_any(&tmp).await;
            Err(e.to_string())
        }
    }
}

/// Removes a file or a directory tree, if there is one.
fn remove_any_sync(path: &Path) {
    let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
}

/// A cache entry copy that has not been written to for this long was abandoned by its pull (the
/// pod was killed mid-copy): nothing else would ever remove it.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// A half-written cache entry, removed if its copy is abandoned (the future dropped by a timeout);
/// cleared once the entry is in place.
struct Incoming(Option<PathBuf>);

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            remove_any_sync(&p);
        }
    }
}

/// Removes the `*.incoming` copies in `entries` that nothing has written to for `after` (the
/// newest modification time of anything inside counts, so another pod's copy in progress is kept).
fn sweep_abandoned_copies(entries: &Path, after: Duration) {
    let Ok(dir) = std::fs::read_dir(entries) else {
        return;
    };
    for e in dir.flatten() {
        if !e.file_name().to_string_lossy().ends_with(".incoming") {
            continue;
        }
        let path = e.path();
        let idle = newest_write(&path).and_then(|t| t.elapsed().ok());
        if idle.is_some_and(|idle| idle >= after) {
            let removed = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            tracing::info!(path = %path.display(), removed = removed.is_ok(), "removed an abandoned cache copy");
        }
    }
}

/// The latest modification time of `path` or anything below it (symbolic links not followed).
fn newest_write(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let mut newest = meta.modified().ok()?;
    if meta.is_dir() {
        for e in std::fs::read_dir(path).ok()?.flatten() {
            if let Some(t) = newest_write(&e.path()) {
                newest = newest.max(t);
            }
        }
    }
    Some(newest)
}

fn read_secret_file(path: &Path) -> Result<Option<String>, PullError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PullError::Download {
            uri: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }),
    }
}

async fn run(args: &PullArgs, started: Instant) -> Result<Record, PullError> {
    let raw = args.uri.as_str();
    let bad = |message: String| PullError::Download {
        uri: raw.to_string(),
        message,
    };
    if let Some(s) = &args.sha256
        && (s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(bad(format!(
            "--sha256 must be 64 hexadecimal characters, got {s:?}"
        )));
    }
    let expected = args.sha256.as_ref().map(|s| s.to_ascii_lowercase());
    let uri = ArtifactUri::parse(raw).map_err(|e| bad(format!("invalid model URI: {e}")))?;
    let directory = uri.is_directory();
    if let Some(parent) = args.dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| bad(format!("cannot create {}: {e}", parent.display())))?;
    }
    let limits = Limits {
        retries: args.retries,
        read_timeout: Duration::from_secs(args.read_timeout),
        backoff: Duration::from_millis(500),
        max_bytes: args.max_bytes,
        deadline: Some(started + Duration::from_secs(args.timeout)),
    };
    let progress = Arc::new(Progress::default());
    let shown = kubemaas_crds::artifact::redact_uri(raw);
    let reporter = progress.spawn_reporter(shown.clone(), Duration::from_secs(args.progress_seconds));
    let result = fetch_uri(args, &uri, directory, expected.as_deref(), &limits, &progress).await;
    reporter.abort();
    let fetched = result?;
    let record = Record {
        uri: shown.clone(),
        sha256: fetched.sha256,
        bytes: fetched.bytes,
        files: fetched.files,
        seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        compression: None,
    };
    tracing::info!(uri = %shown, dest = %args.dest.display(), bytes = record.bytes, files = record.files, sha256 = %record.sha256, seconds = record.seconds, "model pulled");
    Ok(record)
}

async fn fetch_uri(
    args: &PullArgs,
    uri: &ArtifactUri,
    directory: bool,
    expected: Option<&str>,
    limits: &Limits,
    progress: &Progress,
) -> Result<Fetched, PullError> {
    let raw = args.uri.as_str();
    let dest = args.dest.as_path();
    let fail = |message: String| PullError::Download {
        uri: raw.to_string(),
        message,
    };
    // A verified cache hit replaces the download; a bad entry is dropped and fetched again.
    if let (Some(cache), Some(sha)) = (&args.cache_dir, expected) {
        let entry = cache.join("sha256").join(sha);
        if tokio::fs::symlink_metadata(&entry).await.is_ok() {
            let src = local::LocalSource {
                root: cache.join("sha256"),
                path: format!("{sha}{}", if directory { "/" } else { "" }),
            };
            match fetch_verify_place(&src, raw, directory, dest, Some(sha), limits, progress).await {
                Ok(f) => {
                    tracing::info!(cache = %entry.display(), "served from the artifact cache");
                    return Ok(f);
                }
                // The limit applies to the download just the same.
                Err(e @ PullError::TooLarge { .. }) => return Err(e),
                // Only a corrupt entry is removed: the cache is shared, and a failure of this
                // pod's own (its disk, its permissions) says nothing about the entry.
                Err(e @ PullError::Checksum { .. }) => {
                    let e = e.redacted(raw);
                    tracing::warn!(cache = %entry.display(), error = %e, "cache entry corrupt; removing it and downloading");
                    remove_any(&entry).await;
                    progress.done.store(0, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    let e = e.redacted(raw);
                    tracing::warn!(cache = %entry.display(), error = %e, "cache entry unusable here; downloading");
                    progress.done.store(0, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
    let ca = match &args.ca_file {
        Some(p) => {
            Some(std::fs::read(p).map_err(|e| fail(format!("cannot read --ca-file {}: {e}", p.display())))?)
        }
        None => None,
    };
    // Both at least 1 s: clap refuses 0.
    let connect_timeout = Duration::from_secs(args.connect_timeout);
    let read_timeout = limits.read_timeout;
    let token_file = |name: &str| -> Result<Option<String>, PullError> {
        match &args.credentials_dir {
            Some(d) => read_secret_file(&d.join(name)),
            None => Ok(None),
        }
    };
    let http = || -> Result<http::HttpFetcher, PullError> {
        let mut overrides = HashMap::new();
        for r in &args.resolve {
            let (h, ips) = guard::parse_override(r).map_err(|e| fail(format!("--resolve: {e}")))?;
            overrides.insert(h, ips);
        }
        let guard = Arc::new(guard::AddressGuard::new(args.allow_private_addresses, overrides));
        http::HttpFetcher::new(
            guard,
            &http::ClientSettings {
                ca_pem: ca.as_deref(),
                connect_timeout,
                read_timeout,
            },
        )
        .map_err(|e| PullError::from_fetch(raw, e))
    };
    let store_settings = store::StoreSettings {
        ca_pem: ca.as_deref(),
        connect_timeout,
        credentials_dir: args.credentials_dir.as_deref(),
    };
    let place = |e| PullError::from_fetch(raw, e);
    let fetched = match uri {
        ArtifactUri::S3 { bucket, key } => {
            let src = store::StoreSource {
                store: store::s3(bucket, &store_settings, None).map_err(place)?,
                key: key.clone(),
                read_timeout,
            };
            match fetch_verify_place(&src, raw, directory, dest, expected, limits, progress).await {
                // As the AWS CLI and boto3 do: a bucket in another region is followed there.
                Err(PullError::Download { message, .. }) if store::is_wrong_region(&message) => {
                    let region = store::bucket_region(bucket, &store_settings, read_timeout)
                        .await
                        .map_err(place)?;
                    tracing::warn!(
                        bucket = %bucket,
                        region = %region,
                        "the bucket is in another region than configured; going on in {region} \
                         (set AWS_REGION={region} to save the round trip)"
                    );
                    let src = store::StoreSource {
                        store: store::s3(bucket, &store_settings, Some(&region)).map_err(place)?,
                        key: key.clone(),
                        read_timeout,
                    };
                    progress.done.store(0, std::sync::atomic::Ordering::Relaxed);
                    progress.total.store(0, std::sync::atomic::Ordering::Relaxed);
                    fetch_verify_place(&src, raw, directory, dest, expected, limits, progress).await?
                }
                r => r?,
            }
        }
        ArtifactUri::Gcs { bucket, key } => {
            let src = store::StoreSource {
                store: store::gcs(bucket, &store_settings).map_err(place)?,
                key: key.clone(),
                read_timeout,
            };
            fetch_verify_place(&src, raw, directory, dest, expected, limits, progress).await?
        }
        ArtifactUri::Http { url } => {
            let token = match &args.bearer_token_file {
                Some(f) => read_secret_file(f)?,
                None => token_file("token")?,
            };
            let src = http::HttpSource {
                http: http()?,
                url: url.clone(),
                token,
            };
            fetch_verify_place(&src, raw, directory, dest, expected, limits, progress).await?
        }
        ArtifactUri::Hf { repo, path, revision } => {
            let endpoint_raw =
                std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
            let endpoint = reqwest::Url::parse(&endpoint_raw)
                .map_err(|e| fail(format!("invalid HF_ENDPOINT {endpoint_raw:?}: {e}")))?;
            let token = match std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
                Some(t) => Some(t),
                None => token_file("token")?,
            };
            let src = hf::HfSource {
                http: http()?,
                endpoint,
                repo: repo.clone(),
                path: path.clone(),
                revision: revision.clone(),
                token,
            };
            fetch_verify_place(&src, raw, directory, dest, expected, limits, progress).await?
        }
        ArtifactUri::Pvc { claim, path } => {
            let src = local::LocalSource {
                root: args.pvc_root.join(claim),
                path: path.clone(),
            };
            fetch_verify_place(&src, raw, directory, dest, expected, limits, progress).await?
        }
    };
    Ok(fetched)
}

/// Downloads, verifies and places the artifact; on failure writes the message to the termination
/// log and leaves nothing at DEST.
pub async fn pull(args: &PullArgs) -> Result<Record, PullError> {
    // rustls needs one process-wide crypto provider; ring is the one the workspace already builds.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let started = Instant::now();
    let result = match tokio::time::timeout(Duration::from_secs(args.timeout), run(args, started)).await {
        Ok(r) => r,
        Err(_) => {
            // The transfer was dropped mid-way: clear what it staged.
            remove_any(&staging_path(&args.dest)).await;
            Err(PullError::Download {
                uri: args.uri.clone(),
                message: format!("timed out after {}s (--timeout)", args.timeout),
            })
        }
    };
    // Storing into the cache is best effort and not part of the download: it has its own bound,
    // and a copy that runs out of time is removed and does not fail the pull.
    if let (Ok(_), Some(cache), Some(sha)) = (&result, &args.cache_dir, &args.sha256) {
        let limits = Limits {
            retries: 0,
            read_timeout: Duration::from_secs(args.read_timeout),
            backoff: Duration::ZERO,
            max_bytes: None,
            deadline: None,
        };
        let directory = kubemaas_crds::artifact::is_directory_uri(&args.uri);
        let sha = sha.to_ascii_lowercase();
        let bound = Duration::from_secs(args.timeout);
        let stored =
            tokio::time::timeout(bound, cache_store(cache, &sha, &args.dest, directory, &limits)).await;
        let error = match stored {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("the copy took more than {}s (--timeout)", args.timeout)),
        };
        if let Some(e) = error {
            tracing::warn!(cache = %cache.display(), error = %e, "could not store the artifact in the cache");
        }
    }
    // The record goes beside the model (inside a directory artifact) once the cache has its
    // copy: the cached entry holds the artifact's files only, which is what its digest covers.
    let result = result.and_then(|record| {
        let directory = kubemaas_crds::artifact::is_directory_uri(&args.uri);
        let version_dir = if directory {
            args.dest.clone()
        } else {
            args.dest.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        match write_record(&version_dir, &record) {
            Ok(()) => Ok(record),
            Err(message) => {
                remove_any_sync(&args.dest);
                Err(PullError::Download {
                    uri: args.uri.clone(),
                    message,
                })
            }
        }
    });
    let result = match (result, args.compress) {
        (Ok(record), Some(mode)) => {
            let r = compress_pulled(args, mode, record).await;
            if r.is_err() {
                // Nothing is placed: no uncompressed model a later server could pick up.
                remove_any(&args.dest).await;
                if let Some(dir) = args
                    .dest
                    .parent()
                    .filter(|_| !kubemaas_crds::artifact::is_directory_uri(&args.uri))
                {
                    remove_any(&dir.join(PULL_RECORD_FILE)).await;
                    remove_any(&dir.join(ORIGINAL_DIR)).await;
                    remove_any(&dir.join(COMPRESSED_DIR)).await;
                }
            }
            r
        }
        (r, _) => r,
    };
    let result = result.map_err(|e| e.redacted(&args.uri));
    if let Err(e) = &result {
        // Best effort: the termination log only exists inside Kubernetes.
        let _ = std::fs::write(&args.termination_log, e.to_string());
    }
    result
}

/// Writes the pull record beside the model, atomically.
fn write_record(version_dir: &Path, record: &Record) -> Result<(), String> {
    let json = serde_json::to_string(record).map_err(|e| e.to_string())?;
    let tmp = version_dir.join(format!(".{PULL_RECORD_FILE}.tmp"));
    std::fs::write(&tmp, &json)
        .and_then(|()| std::fs::rename(&tmp, version_dir.join(PULL_RECORD_FILE)))
        .map_err(|e| format!("cannot write {PULL_RECORD_FILE}: {e}"))
}

/// Where the original goes when `--compress` replaces it (inside the version directory, so the
/// server, which loads only `model.onnx`, ignores it). Hidden and prefixed, because artifacts
/// have their own `original/` directories (Hugging Face repositories do).
pub const ORIGINAL_DIR: &str = ".kubemaas-original";
/// Where `--compress` writes before the swap.
const COMPRESSED_DIR: &str = ".kubemaas-compressed";

/// `--compress`: compresses the placed model, checks it against the original, and swaps it in.
/// The original's files move to `.kubemaas-original/` (external-data references stay valid there).
async fn compress_pulled(
    args: &PullArgs,
    mode: crate::compress::Mode,
    mut record: Record,
) -> Result<Record, PullError> {
    let uri = args.uri.clone();
    let failed = |message: String| PullError::Compression {
        uri: uri.clone(),
        message,
    };
    let directory = kubemaas_crds::artifact::is_directory_uri(&args.uri);
    let (version_dir, model) = if directory {
        (args.dest.clone(), args.dest.join("model.onnx"))
    } else {
        (
            args.dest.parent().map(Path::to_path_buf).unwrap_or_default(),
            args.dest.clone(),
        )
    };
    let options = crate::compress::Options {
        mode,
        exclude: Vec::new(),
        keep_fp32: Vec::new(),
        per_tensor: false,
        all_integer: false,
        sparsity: 0.5,
        eval_inputs: Vec::new(),
        samples: 4,
        input_shapes: args.input_shapes.clone(),
        timing_runs: 10,
        threads: args.compress_threads,
        check: true,
        min_cosine: args.min_cosine,
    };
    let library = args.ort_library.clone();
    let (vd, m) = (version_dir.clone(), model.clone());
    let outcome = tokio::task::spawn_blocking(
        move || -> Result<crate::compress::Report, crate::compress::CompressError> {
            let env = crate::serve::init_library(library.as_ref())
                .map_err(|e| crate::compress::CompressError::Runtime(e.to_string()))?;
            let staging = vd.join(COMPRESSED_DIR);
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).map_err(|e| crate::compress::CompressError::Io {
                path: staging.display().to_string(),
                message: e.to_string(),
            })?;
            let name = m
                .file_name()
                .map(std::ffi::OsStr::to_os_string)
                .unwrap_or_else(|| "model.onnx".into());
            let report = crate::compress::compress(&env, &m, &staging.join(&name), &options);
            if report.is_err() {
                let _ = std::fs::remove_dir_all(&staging);
            }
            report
        },
    )
    .await
    .map_err(|e| failed(e.to_string()))?;
    let report = match outcome {
        Ok(r) => r,
        Err(crate::compress::CompressError::Rejected(r)) => {
            let e = crate::compress::CompressError::Rejected(r);
            return Err(PullError::CompressionRejected {
                uri,
                message: e.to_string(),
            });
        }
        Err(e) => return Err(failed(e.to_string())),
    };
    // Swap: every file of the original into .kubemaas-original/, then the compressed files in.
    let original = version_dir.join(ORIGINAL_DIR);
    let staging = version_dir.join(COMPRESSED_DIR);
    let swap = || -> std::io::Result<()> {
        // A previous run's original (an init container that ran again) is replaced.
        if original.exists() {
            std::fs::remove_dir_all(&original)?;
        }
        std::fs::create_dir_all(&original)?;
        for entry in std::fs::read_dir(&version_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let keep = name == PULL_RECORD_FILE || name == ORIGINAL_DIR || name == COMPRESSED_DIR;
            if !keep {
                std::fs::rename(entry.path(), original.join(&name))?;
            }
        }
        for entry in std::fs::read_dir(&staging)? {
            let entry = entry?;
            std::fs::rename(entry.path(), version_dir.join(entry.file_name()))?;
        }
        std::fs::remove_dir_all(&staging)
    };
    swap().map_err(|e| failed(format!("cannot put the compressed model in place: {e}")))?;
    tracing::info!(
        mode = mode.as_str(),
        size_ratio = report.size_ratio,
        cosine = report.cosine,
        "model compressed"
    );
    record.compression = Some(serde_json::to_value(&report).map_err(|e| failed(e.to_string()))?);
    write_record(&version_dir, &record).map_err(failed)?;
    Ok(record)
}

/// The name a cache entry is written under before it is renamed into place. It must differ
/// between writers: every pod's pull runs as PID 1, so a process ID alone would have two pods
/// storing the same artifact write one file.
fn incoming_name(sha: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness, per process and per call.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{sha}.{}.{:016x}.incoming", std::process::id(), h.finish())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use bytes::Bytes;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    use super::fetch::{Body, Entry};
    use super::*;

    #[test]
    fn two_writers_of_one_cache_entry_write_different_files() {
        // Both pulls run as PID 1 in their pods.
        let (a, b) = (super::incoming_name("ab12"), super::incoming_name("ab12"));
        assert_ne!(a, b);
        assert!(a.starts_with("ab12.") && a.ends_with(".incoming"), "{a}");
    }

    /// Serves `content`; the first attempt breaks after `cut` bytes. Later attempts resume (or
    /// restart) and, with `tamper`, serve a changed object.
    struct Flaky {
        content: Vec<u8>,
        cut: usize,
        resume: bool,
        tamper: bool,
        attempts: AtomicU32,
    }

    impl Source for Flaky {
        async fn list(&self) -> Result<Vec<Entry>, FetchError> {
            Ok(vec![Entry {
                rel: String::new(),
                size: Some(self.content.len() as u64),
                locator: "flaky".into(),
            }])
        }

        async fn open(&self, _e: &Entry, offset: u64, _v: Option<&str>) -> Result<Body, FetchError> {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst);
            let mut data = self.content.clone();
            if self.tamper && n > 0 && !data.is_empty() {
                data[0] ^= 0xff;
                let last = data.len() - 1;
                data[last] ^= 0x55;
            }
            let start = if self.resume { offset as usize } else { 0 };
            let mut items: Vec<Result<Bytes, FetchError>> = Vec::new();
            if n == 0 && self.cut < data.len() {
                for chunk in data[start..self.cut].chunks(97) {
                    items.push(Ok(Bytes::copy_from_slice(chunk)));
                }
                items.push(Err(FetchError::Transient("connection reset".into())));
            } else {
                for chunk in data[start.min(data.len())..].chunks(97) {
                    items.push(Ok(Bytes::copy_from_slice(chunk)));
                }
            }
            Ok(Body {
                stream: Box::pin(futures::stream::iter(items)),
                total: Some(data.len() as u64),
                resumed: self.resume,
                validator: None,
            })
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn whatever_the_interruption_dest_holds_the_declared_sha256_or_nothing(
            content in proptest::collection::vec(any::<u8>(), 0..4000),
            cut_frac in 0.0f64..1.2,
            resume in any::<bool>(),
            tamper in any::<bool>(),
            retries in 0u32..3,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("m").join("1").join("model.onnx");
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            let declared = fetch::hex(&Sha256::digest(&content));
            let src = Flaky {
                cut: (content.len() as f64 * cut_frac) as usize,
                content: content.clone(),
                resume,
                tamper,
                attempts: AtomicU32::new(0),
            };
            let limits = Limits { retries, read_timeout: Duration::from_secs(5), backoff: Duration::from_millis(1), max_bytes: None, deadline: None };
            let out = rt.block_on(fetch_verify_place(&src, "flaky://x", false, &dest, Some(&declared), &limits, &Progress::default()));
            match out {
                Ok(f) => {
                    prop_assert_eq!(&f.sha256, &declared);
                    prop_assert_eq!(fetch::hex(&Sha256::digest(std::fs::read(&dest).unwrap())), declared);
                }
                Err(_) => prop_assert!(!dest.exists(), "a failed pull left {}", dest.display()),
            }
            prop_assert!(!staging_path(&dest).exists(), "staging left behind");
        }
    }

    #[tokio::test]
    async fn a_resumed_transfer_is_byte_identical_and_a_tampered_one_never_lands() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let declared = fetch::hex(&Sha256::digest(&content));
        let limits = Limits {
            retries: 2,
            read_timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(1),
            max_bytes: None,
            deadline: None,
        };
        let dest = dir.path().join("a.onnx");
        let ok = Flaky {
            content: content.clone(),
            cut: 4321,
            resume: true,
            tamper: false,
            attempts: AtomicU32::new(0),
        };
        fetch_verify_place(
            &ok,
            "x",
            false,
            &dest,
            Some(&declared),
            &limits,
            &Progress::default(),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), content);
        assert_eq!(ok.attempts.load(Ordering::SeqCst), 2);

        let dest2 = dir.path().join("b.onnx");
        let bad = Flaky {
            content: content.clone(),
            cut: 4321,
            resume: true,
            tamper: true,
            attempts: AtomicU32::new(0),
        };
        let e = fetch_verify_place(
            &bad,
            "x",
            false,
            &dest2,
            Some(&declared),
            &limits,
            &Progress::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.exit_code(), exit::CHECKSUM_MISMATCH);
        assert!(!dest2.exists());
    }

    #[tokio::test]
    async fn the_byte_limit_stops_a_transfer_with_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let src = Flaky {
            content: vec![1; 5000],
            cut: 5000,
            resume: true,
            tamper: false,
            attempts: AtomicU32::new(0),
        };
        let limits = Limits {
            retries: 0,
            read_timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(1),
            max_bytes: Some(4999),
            deadline: None,
        };
        let dest = dir.path().join("a.onnx");
        let e = fetch_verify_place(&src, "x", false, &dest, None, &limits, &Progress::default())
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), exit::TOO_LARGE);
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn a_cache_copy_dropped_mid_way_leaves_nothing_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let placed = dir.path().join("model.onnx");
        std::fs::write(&placed, vec![7u8; 1 << 20]).unwrap();
        let cache = dir.path().join("cache");
        let limits = Limits {
            retries: 0,
            read_timeout: Duration::from_secs(5),
            backoff: Duration::ZERO,
            max_bytes: None,
            deadline: None,
        };
        let sha = fetch::hex(&Sha256::digest(vec![7u8; 1 << 20]));
        // Polled until the copy has begun, then dropped, as a timeout drops it.
        {
            let copy = cache_store(&cache, &sha, &placed, false, &limits);
            tokio::pin!(copy);
            let mut started = false;
            let give_up = Instant::now() + Duration::from_secs(20);
            while Instant::now() < give_up {
                if futures::poll!(copy.as_mut()).is_ready() {
                    break;
                }
                let entries = std::fs::read_dir(cache.join("sha256"))
                    .map(|d| d.count())
                    .unwrap_or(0);
                if entries > 0 {
                    started = true;
                    break;
                }
                // The copy's file work runs on blocking threads: give them a moment.
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            assert!(started, "the copy finished before it could be dropped");
        }
        let left: Vec<_> = std::fs::read_dir(cache.join("sha256"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
