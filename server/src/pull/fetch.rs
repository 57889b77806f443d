//! The transfer loop every source shares: stream each file to a staging path while hashing it,
//! retry transient failures with backoff, resume with a range request where the source allows,
//! enforce the byte budget and report progress. Sources only list entries and open byte streams.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kubemaas_crds::artifact::redact_uri;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// One file of an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to DEST for a directory artifact; empty for a single file.
    pub rel: String,
    /// Size, when the listing says.
    pub size: Option<u64>,
    /// What the source needs to open it (a key, a URL, a path).
    pub locator: String,
}

/// A byte stream of (part of) one entry.
pub struct Body {
    /// The bytes.
    pub stream: Pin<Box<dyn Stream<Item = Result<Bytes, FetchError>> + Send>>,
    /// Size of the whole entry, when known.
    pub total: Option<u64>,
    /// True when the stream starts at the requested offset; false when it starts at zero.
    pub resumed: bool,
    /// A validator (ETag or Last-Modified) that pins this version for a later resume.
    pub validator: Option<String>,
}

/// Failures of a source, by what the loop does with them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Worth retrying (connection lost, 5xx, 429, a stalled read).
    #[error("{0}")]
    Transient(String),
    /// A busy server (429 or 503) that said when to come back (`Retry-After`): retried like
    /// `Transient`, but not before `wait`.
    #[error("{message}")]
    Busy {
        /// What it answered.
        message: String,
        /// How long it asked us to wait.
        wait: Duration,
    },
    /// The object changed since the transfer began: start it again from zero.
    #[error("{0}")]
    Changed(String),
    /// It does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The credentials were refused.
    #[error("{0}")]
    Denied(String),
    /// Over the byte limit.
    #[error("{0}")]
    TooLarge(String),
    /// The address guard refused the host.
    #[error("{0}")]
    Refused(String),
    /// Any other failure that a retry will not fix.
    #[error("{0}")]
    Fatal(String),
    /// Writing to local disk failed.
    #[error("{0}")]
    Local(String),
}

/// A place artifacts come from.
pub trait Source {
    /// The files of the artifact (one for a single object).
    fn list(&self) -> impl Future<Output = Result<Vec<Entry>, FetchError>> + Send;
    /// Opens `entry` at `offset`; `validator` is what the previous attempt's body carried.
    fn open(
        &self,
        entry: &Entry,
        offset: u64,
        validator: Option<&str>,
    ) -> impl Future<Output = Result<Body, FetchError>> + Send;
}

/// Retry, timeout and size settings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Retries per file after a transient failure.
    pub retries: u32,
    /// A read that yields nothing for this long is a transient failure.
    pub read_timeout: Duration,
    /// First backoff; doubles per retry up to 10 s.
    pub backoff: Duration,
    /// Total bytes allowed over all files.
    pub max_bytes: Option<u64>,
    /// When the whole pull gives up (`--timeout`): a server asking to be retried later than this
    /// fails the pull at once instead of sleeping into the timeout.
    pub deadline: Option<Instant>,
}

/// The pause before retrying after `e`: the backoff, or what a busy server asked for when that is
/// longer. `Err` when the server asked for a wait that ends past the deadline.
fn pause_before_retry(e: &FetchError, backoff: Duration, limits: &Limits) -> Result<Duration, FetchError> {
    let FetchError::Busy { message, wait } = e else {
        return Ok(backoff);
    };
    // Checked: a server may ask for more seconds than an Instant can hold.
    if let Some(deadline) = limits.deadline
        && Instant::now().checked_add(*wait).is_none_or(|t| t > deadline)
    {
        return Err(FetchError::Transient(format!(
            "{message}; it asked to be retried after {}s (Retry-After), past --timeout",
            wait.as_secs()
        )));
    }
    Ok(backoff.max(*wait))
}

/// Bytes transferred so far, for the byte budget and progress lines.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes written.
    pub done: AtomicU64,
    /// Bytes expected in total (0 when unknown).
    pub total: AtomicU64,
}

impl Progress {
    /// Logs bytes, rate and ETA every `every` until dropped (the task is aborted by the caller).
    pub fn spawn_reporter(self: &Arc<Self>, uri: String, every: Duration) -> tokio::task::JoinHandle<()> {
        let p = self.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let done = p.done.load(Ordering::Relaxed);
                let total = p.total.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64().max(1e-3);
                let rate = done as f64 / secs;
                let eta = (total > done && rate > 0.0).then(|| ((total - done) as f64 / rate).round() as u64);
                tracing::info!(
                    uri = %uri,
                    bytes = done,
                    total = (total > 0).then_some(total),
                    rate_mib_s = (rate / 1048576.0 * 100.0).round() / 100.0,
                    eta_s = eta,
                    "pulling"
                );
            }
        })
    }
}

/// Hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn budget_check(limits: &Limits, progress: &Progress, extra: u64) -> Result<(), FetchError> {
    if let Some(max) = limits.max_bytes {
        let used = progress.done.load(Ordering::Relaxed);
        if used.saturating_add(extra) > max {
            return Err(FetchError::TooLarge(format!(
                "more than the {max} bytes allowed by --max-bytes"
            )));
        }
    }
    Ok(())
}

fn local(path: &Path, e: std::io::Error) -> FetchError {
    FetchError::Local(format!("failed to write {}: {e}", path.display()))
}

/// Empties a partly written file to start it again.
async fn rewind(
    file: &mut tokio::fs::File,
    dest: &Path,
    progress: &Progress,
    written: u64,
) -> Result<(), FetchError> {
    progress.done.fetch_sub(written, Ordering::Relaxed);
    file.set_len(0).await.map_err(|e| local(dest, e))?;
    file.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| local(dest, e))?;
    Ok(())
}

/// Lists `src`, retrying what may pass (a 429 or 503 from a busy Hub or store, a dropped
/// connection) as a download is retried: up to `limits.retries` times, backing off.
async fn list_with_retries<S: Source>(src: &S, limits: &Limits) -> Result<Vec<Entry>, FetchError> {
    let mut failures = 0u32;
    let mut backoff = limits.backoff;
    loop {
        match src.list().await {
            Err(e @ (FetchError::Transient(_) | FetchError::Busy { .. })) if failures < limits.retries => {
                let pause = pause_before_retry(&e, backoff, limits)?;
                failures += 1;
                tracing::warn!(
                    attempt = failures,
                    of = limits.retries,
                    "listing: {e}; retrying in {:.1}s",
                    pause.as_secs_f64()
                );
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(FetchError::Transient(m) | FetchError::Busy { message: m, .. }) if limits.retries > 0 => {
                return Err(FetchError::Transient(format!(
                    "{m} (gave up after {} retries)",
                    limits.retries
                )));
            }
            other => return other,
        }
    }
}

/// Streams one entry into `dest` (created or truncated) and returns its size and SHA-256.
pub async fn download_entry<S: Source>(
    src: &S,
    entry: &Entry,
    dest: &Path,
    limits: &Limits,
    progress: &Progress,
) -> Result<(u64, String), FetchError> {
    let mut file = tokio::fs::File::create(dest).await.map_err(|e| local(dest, e))?;
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let mut validator: Option<String> = None;
    let mut failures = 0u32;
    let mut backoff = limits.backoff;
    let mut total_counted = false;
    // The furthest any attempt got: only bytes past it are progress. A source that cannot resume
    // restarts from zero, and getting as far again is not.
    let mut furthest = 0u64;
    loop {
        let attempt = async {
            let opened =
                tokio::time::timeout(limits.read_timeout, src.open(entry, offset, validator.as_deref()))
                    .await
                    .map_err(|_| {
                        FetchError::Transient(format!(
                            "no response within {}s",
                            limits.read_timeout.as_secs()
                        ))
                    })??;
            Ok::<Body, FetchError>(opened)
        };
        let outcome: Result<(), FetchError> = match attempt.await {
            Err(e) => Err(e),
            Ok(mut body) => {
                if !body.resumed && offset > 0 {
                    // The source restarted from zero: so do we.
                    rewind(&mut file, dest, progress, offset).await?;
                    hasher = Sha256::new();
                    offset = 0;
                }
                if body.validator.is_some() {
                    validator = body.validator.clone();
                }
                if entry.size.is_none()
                    && !total_counted
                    && let Some(t) = body.total
                {
                    // The listing did not know the size; the response does.
                    progress.total.fetch_add(t, Ordering::Relaxed);
                    total_counted = true;
                }
                let remaining = body.total.map(|t| t.saturating_sub(offset));
                budget_check(limits, progress, remaining.unwrap_or(0))?;
                let mut got_any = false;
                loop {
                    match tokio::time::timeout(limits.read_timeout, body.stream.next()).await {
                        Err(_) => {
                            break Err(FetchError::Transient(format!(
                                "no data for {}s after {offset} bytes",
                                limits.read_timeout.as_secs()
                            )));
                        }
                        Ok(None) => {
                            break match body.total {
                                Some(t) if offset < t => Err(FetchError::Transient(format!(
                                    "connection closed after {offset} of {t} bytes"
                                ))),
                                _ => Ok(()),
                            };
                        }
                        Ok(Some(Err(e))) => break Err(e),
                        Ok(Some(Ok(chunk))) => {
                            budget_check(limits, progress, chunk.len() as u64)?;
                            hasher.update(&chunk);
                            file.write_all(&chunk).await.map_err(|e| local(dest, e))?;
                            offset += chunk.len() as u64;
                            progress.done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                            if offset > furthest {
                                furthest = offset;
                                if !got_any {
                                    got_any = true;
                                    // Progress resets the retry budget: only consecutive
                                    // failures count.
                                    failures = 0;
                                    backoff = limits.backoff;
                                }
                            }
                        }
                    }
                }
            }
        };
        match outcome {
            Ok(()) => {
                file.flush().await.map_err(|e| local(dest, e))?;
                file.sync_all().await.map_err(|e| local(dest, e))?;
                return Ok((offset, hex(&hasher.finalize())));
            }
            Err(FetchError::Changed(m)) if failures < limits.retries => {
                tracing::warn!(file = %redact_uri(&entry.locator), "{m}; starting this file again");
                validator = None;
                rewind(&mut file, dest, progress, offset).await?;
                hasher = Sha256::new();
                offset = 0;
                failures += 1;
            }
            Err(e @ (FetchError::Transient(_) | FetchError::Busy { .. })) if failures < limits.retries => {
                let pause = pause_before_retry(&e, backoff, limits)?;
                failures += 1;
                tracing::warn!(
                    file = %redact_uri(&entry.locator),
                    attempt = failures,
                    of = limits.retries,
                    resume_at = offset,
                    "{e}; retrying in {:.1}s",
                    pause.as_secs_f64()
                );
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(FetchError::Transient(m) | FetchError::Changed(m) | FetchError::Busy { message: m, .. }) => {
                return Err(FetchError::Transient(if limits.retries > 0 {
                    format!("{m} (gave up after {} retries)", limits.retries)
                } else {
                    m
                }));
            }
            Err(e) => return Err(e),
        }
    }
}

/// What was fetched into the staging path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// SHA-256 of the file, or of the manifest for a directory.
    pub sha256: String,
    /// Bytes over all files.
    pub bytes: u64,
    /// Number of files.
    pub files: usize,
}

/// The digest of a directory artifact: SHA-256 of the `sha256sum`-style manifest (one line
/// `"<hex>  <relative path>\n"` per file, sorted by path bytes), so a user can compute it with
/// `find . -type f -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum`.
pub fn manifest_digest(mut files: Vec<(String, String)>) -> String {
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = Sha256::new();
    for (rel, sha) in files {
        h.update(format!("{sha}  {rel}\n").as_bytes());
    }
    hex(&h.finalize())
}

/// Fetches every entry of `src` into `staging` (a file for a single object, else a directory).
pub async fn fetch_all<S: Source>(
    src: &S,
    staging: &Path,
    directory: bool,
    limits: &Limits,
    progress: &Progress,
) -> Result<Fetched, FetchError> {
    let entries = list_with_retries(src, limits).await?;
    if entries.is_empty() {
        return Err(FetchError::NotFound(
            "nothing to download: the prefix holds no files".into(),
        ));
    }
    if !directory && entries.len() != 1 {
        return Err(FetchError::Fatal(format!(
            "expected one file, the source listed {}",
            entries.len()
        )));
    }
    if entries.iter().all(|e| e.size.is_some()) {
        let total: u64 = entries.iter().filter_map(|e| e.size).sum();
        progress.total.store(total, Ordering::Relaxed);
        budget_check(limits, progress, total)?;
    }
    if !directory {
        let (bytes, sha256) = download_entry(src, &entries[0], staging, limits, progress).await?;
        return Ok(Fetched {
            sha256,
            bytes,
            files: 1,
        });
    }
    tokio::fs::create_dir_all(staging)
        .await
        .map_err(|e| local(staging, e))?;
    let mut sums = Vec::with_capacity(entries.len());
    let mut bytes = 0;
    for entry in &entries {
        super::uri::check_relative(&entry.rel, "listed file")
            .map_err(|e| FetchError::Fatal(format!("refused a listed file: {e}")))?;
        if entry.rel.is_empty() || entry.rel.ends_with('/') {
            continue;
        }
        let path: PathBuf = staging.join(&entry.rel);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| local(parent, e))?;
        }
        let (n, sha) = download_entry(src, entry, &path, limits, progress).await?;
        bytes += n;
        sums.push((entry.rel.clone(), sha));
    }
    let files = sums.len();
    Ok(Fetched {
        sha256: manifest_digest(sums),
        bytes,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_digest_matches_sha256sum_of_sorted_lines() {
        // printf '%s  %s\n' <sha of "b"> B.txt <sha of "a"> a/x | sha256sum (byte order: 'B' < 'a').
        let a = hex(&Sha256::digest(b"a"));
        let b = hex(&Sha256::digest(b"b"));
        let text = format!("{b}  B.txt\n{a}  a/x\n");
        let want = hex(&Sha256::digest(text.as_bytes()));
        assert_eq!(
            manifest_digest(vec![("a/x".into(), a), ("B.txt".into(), b)]),
            want
        );
    }

    #[test]
    fn a_retry_after_no_instant_can_hold_fails_the_pull_instead_of_panicking() {
        let limits = Limits {
            retries: 3,
            read_timeout: Duration::from_secs(1),
            backoff: Duration::from_millis(500),
            max_bytes: None,
            deadline: Some(Instant::now() + Duration::from_secs(600)),
        };
        let busy = |secs| FetchError::Busy {
            message: "HTTP 503".into(),
            wait: Duration::from_secs(secs),
        };
        assert!(matches!(
            pause_before_retry(&busy(u64::MAX), Duration::from_millis(500), &limits),
            Err(FetchError::Transient(m)) if m.contains("Retry-After")
        ));
        assert_eq!(
            pause_before_retry(&busy(0), Duration::from_millis(500), &limits).ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            pause_before_retry(&busy(7), Duration::from_millis(500), &limits).ok(),
            Some(Duration::from_secs(7))
        );
    }
}
