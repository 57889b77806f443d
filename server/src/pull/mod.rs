//! `kubemaas-server pull URI DEST`: the init-container step that fetches a model artifact and
//! verifies its SHA-256 before the server may see it. The file appears at DEST only when complete
//! and verified (written to a temporary name, then renamed).
//!
//! Exit codes (read by the operator's status): 2 download failed, 3 checksum mismatch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Exit code for a failed download.
pub const EXIT_DOWNLOAD_FAILED: u8 = 2;
/// Exit code for a checksum mismatch.
pub const EXIT_CHECKSUM_MISMATCH: u8 = 3;
const MAX_REDIRECTS: usize = 5;

/// Flags of `kubemaas-server pull`.
#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    /// Artifact URI: http://..., or pvc://<claim>/<path> (read from --pvc-root/<claim>/<path>).
    pub uri: String,
    /// Destination file, e.g. /models/<name>/<version>/model.onnx.
    pub dest: PathBuf,
    /// Expected SHA-256 (64 hex characters); a mismatch deletes the file and exits 3.
    #[arg(long, env = "KUBEMAAS_MODEL_SHA256")]
    pub sha256: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, env = "KUBEMAAS_PULL_TIMEOUT", default_value_t = 600)]
    pub timeout: u64,
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
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The scheme is not handled by this build.
    #[error(
        "failed to download {uri}: the {scheme}:// scheme is not supported by this server build yet; use http:// or pvc://<claim>/<path>"
    )]
    Unsupported {
        /// URI.
        uri: String,
        /// Scheme.
        scheme: String,
    },
    /// The transfer failed.
    #[error("failed to download {uri}: {message}")]
    Download {
        /// URI.
        uri: String,
        /// Why.
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
    /// Process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            PullError::Checksum { .. } => EXIT_CHECKSUM_MISMATCH,
            _ => EXIT_DOWNLOAD_FAILED,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn fetch_http(uri: &str, out: &mut tokio::fs::File, hasher: &mut Sha256) -> Result<u64, String> {
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut current = uri.to_string();
    for _ in 0..=MAX_REDIRECTS {
        let parsed: http::Uri = current.parse().map_err(|e| format!("invalid URI: {e}"))?;
        let resp = client.get(parsed.clone()).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        if status.is_redirection() {
            let loc = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| format!("HTTP {status} without a Location header"))?;
            current = if loc.starts_with("http://") || loc.starts_with("https://") {
                loc.to_string()
            } else {
                format!(
                    "{}://{}{loc}",
                    parsed.scheme_str().unwrap_or("http"),
                    parsed.authority().map(|a| a.as_str()).unwrap_or("")
                )
            };
            if !current.starts_with("http://") {
                return Err(format!("redirected to {current}, which this build cannot fetch"));
            }
            continue;
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let mut body = resp.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(data) = frame.into_data() {
                hasher.update(&data);
                out.write_all(&data)
                    .await
                    .map_err(|e| format!("failed to write: {e}"))?;
                total += data.len() as u64;
            }
        }
        return Ok(total);
    }
    Err(format!("more than {MAX_REDIRECTS} redirects"))
}

async fn fetch_file(src: &Path, out: &mut tokio::fs::File, hasher: &mut Sha256) -> Result<u64, String> {
    let data = tokio::fs::read(src)
        .await
        .map_err(|e| format!("cannot read {}: {e}", src.display()))?;
    hasher.update(&data);
    out.write_all(&data)
        .await
        .map_err(|e| format!("failed to write: {e}"))?;
    Ok(data.len() as u64)
}

/// Downloads and verifies; returns the number of bytes written.
pub async fn pull(args: &PullArgs) -> Result<u64, PullError> {
    let uri = args.uri.clone();
    let dl = |message: String| PullError::Download {
        uri: uri.clone(),
        message,
    };
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| dl("expected scheme://...".into()))?;
    if !matches!(scheme, "http" | "pvc") {
        let e = PullError::Unsupported {
            uri: uri.clone(),
            scheme: scheme.to_string(),
        };
        let _ = std::fs::write(&args.termination_log, e.to_string());
        return Err(e);
    }
    if let Some(parent) = args.dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| dl(format!("cannot create {}: {e}", parent.display())))?;
    }
    let tmp = args.dest.with_extension("partial");
    let mut out = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| dl(format!("cannot create {}: {e}", tmp.display())))?;
    let mut hasher = Sha256::new();
    let transfer = async {
        match scheme {
            "http" => fetch_http(&uri, &mut out, &mut hasher).await,
            _ => fetch_file(&args.pvc_root.join(rest), &mut out, &mut hasher).await,
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(args.timeout), transfer).await;
    let outcome = match result {
        Err(_) => Err(dl(format!("timed out after {}s", args.timeout))),
        Ok(Err(m)) => Err(dl(m)),
        Ok(Ok(n)) => Ok(n),
    };
    let verified = outcome.and_then(|n| {
        let actual = hex(&hasher.finalize());
        match &args.sha256 {
            Some(expected) if !expected.eq_ignore_ascii_case(&actual) => Err(PullError::Checksum {
                uri: uri.clone(),
                expected: expected.clone(),
                actual,
            }),
            _ => Ok((n, actual)),
        }
    });
    match verified {
        Ok((n, digest)) => {
            out.sync_all()
                .await
                .map_err(|e| dl(format!("failed to flush: {e}")))?;
            drop(out);
            tokio::fs::rename(&tmp, &args.dest)
                .await
                .map_err(|e| dl(format!("failed to move into place: {e}")))?;
            tracing::info!(uri = %uri, dest = %args.dest.display(), bytes = n, sha256 = %digest, "model pulled");
            Ok(n)
        }
        Err(e) => {
            drop(out);
            let _ = tokio::fs::remove_file(&tmp).await;
            // Best effort: the termination log only exists inside Kubernetes.
            let _ = std::fs::write(&args.termination_log, e.to_string());
            Err(e)
        }
    }
}
