//! API keys: who may call the models. `serve --api-keys-file PATH` turns it on; every inference
//! and metadata route of every protocol then wants `Authorization: Bearer KEY` (gRPC: the same
//! `authorization` metadata). Health and readiness stay open for the kubelet.
//!
//! The file has one key per line: `KEY`, `ID:KEY`, or `ID:KEY:MODEL[,MODEL...]` to allow only those
//! models. Blank lines and lines starting with `#` are skipped. The file is re-read when it
//! changes (a rotated Kubernetes Secret), and a file that no longer parses keeps the previous keys.
//! Keys are compared in constant time and never logged; the ID (default `line-N`) names the caller.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::watched::Watched;

use subtle::ConstantTimeEq;

/// Errors reading the key file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be read.
    #[error("failed to read the API keys file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line does not parse (the key itself is never quoted).
    #[error("the API keys file {path}, line {line}: {why}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
}

#[derive(Debug, Clone)]
struct Key {
    id: String,
    /// SHA-256 of the key: every comparison then takes the same time whatever the lengths of the
    /// key and of what was sent (comparing the keys themselves ends early on a length mismatch).
    digest: [u8; 32],
    models: Option<Vec<String>>,
}

/// What a key is checked for on Triton's shared memory routes and on requests that use shared
/// memory. No model is named so (names are URL segments; this has a '/'), so a key limited to
/// some models is refused: regions are shared by every client, and a scoped key could otherwise
/// read or overwrite the tensors of models it may not call.
pub const SHARED_MEMORY: &str = "system/shared-memory";

/// What a key is checked for on `/metrics` of the HTTP port, which covers every model: like
/// [`SHARED_MEMORY`], no model is named so, and a key limited to some models is refused.
pub const EVERY_MODEL: &str = "system/every-model";

/// The outcome of checking a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key is valid for this request; the key's ID.
    Allowed(String),
    /// No `Authorization: Bearer` credential.
    Missing,
    /// A credential that matches no key.
    Invalid,
    /// A valid key (its ID) that may not call this model.
    Forbidden(String),
}

impl Verdict {
    /// The ID of the key presented, when it is a known key (allowed or not): who is calling.
    pub fn caller(&self) -> Option<&str> {
        match self {
            Verdict::Allowed(id) | Verdict::Forbidden(id) => Some(id),
            Verdict::Missing | Verdict::Invalid => None,
        }
    }
}

/// Parses the key file's text.
fn parse(path: &Path, text: &str) -> Result<Vec<Key>, AuthError> {
    let mut keys = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |why| AuthError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            why,
        };
        let mut parts = line.splitn(3, ':');
        let (id, secret, models) = match (parts.next(), parts.next(), parts.next()) {
            (Some(key), None, None) => (format!("line-{}", i + 1), key, None),
            (Some(id), Some(key), models) => (id.to_string(), key, models),
            _ => return Err(err("expected KEY, ID:KEY or ID:KEY:MODEL[,MODEL...]")),
        };
        if secret.is_empty() {
            return Err(err("the key is empty"));
        }
        if id.is_empty() {
            return Err(err("the ID before ':' is empty"));
        }
        if secret.chars().any(char::is_whitespace) {
            return Err(err("a key may not contain whitespace"));
        }
        let models = match models {
            None => None,
            Some(list) => {
                let names: Vec<String> = list
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty())
                    .collect();
                if names.is_empty() {
                    return Err(err("the model list after the second ':' is empty"));
                }
                Some(names)
            }
        };
        keys.push(Key {
            id,
            digest: sha256(secret.as_bytes()),
            models,
        });
    }
    Ok(keys)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn read_keys(path: &Path) -> Result<Vec<Key>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// The keys of `--api-keys-file`, re-read when the file changes.
pub struct ApiKeys(std::sync::Arc<Watched<Vec<Key>, AuthError>>);

impl ApiKeys {
    /// Reads the file; an unreadable or malformed file is an error (the server must not start
    /// open when it was asked to be closed).
    pub fn load(path: &Path) -> Result<ApiKeys, AuthError> {
        let owned = path.to_path_buf();
        let keys = Watched::load("API keys", vec![owned.clone()], move || read_keys(&owned))?;
        tracing::info!(
            path = %path.display(),
            keys = keys.current().map_or(0, |k| k.len()),
            "API keys loaded"
        );
        Ok(ApiKeys(std::sync::Arc::new(keys)))
    }

    /// Re-reads the file if it changed since the last read. A file that cannot be read or parsed
    /// keeps the keys in force (logged without any key).
    pub fn reload_if_changed(&self) {
        self.0.reload_if_changed()
    }

    /// Re-reads the file every `every` until the process ends.
    pub fn watch(&self, every: Duration) {
        self.0.clone().watch(every)
    }

    /// `f` of the key an `Authorization` header value carries (None: a credential that is no
    /// key); Err(Missing) without a Bearer credential.
    fn with_key<R>(
        &self,
        authorization: Option<&[u8]>,
        f: impl FnOnce(Option<&Key>) -> R,
    ) -> Result<R, Verdict> {
        let token = authorization.and_then(bearer).ok_or(Verdict::Missing)?;
        let Some(keys) = self.0.current() else {
            return Ok(f(None));
        };
        // Every key is compared, so the time taken does not say which one (or whether one) matched.
        let sent = sha256(token);
        let mut found: Option<&Key> = None;
        for k in keys.iter() {
            if bool::from(k.digest.ct_eq(&sent)) {
                found = Some(k);
            }
        }
        Ok(f(found))
    }

    /// Checks an `Authorization` header value for a request to `model` (None: a server-wide route).
    pub fn check(&self, authorization: Option<&[u8]>, model: Option<&str>) -> Verdict {
        let verdict = self.with_key(authorization, |found| match (found, model) {
            (None, _) => Verdict::Invalid,
            (Some(k), Some(m)) if k.models.as_ref().is_some_and(|ms| !ms.iter().any(|x| x == m)) => {
                Verdict::Forbidden(k.id.clone())
            }
            (Some(k), _) => Verdict::Allowed(k.id.clone()),
        });
        verdict.unwrap_or_else(|missing| missing)
    }
}

/// The models a server-wide listing (statistics of every model, the repository index) shows a
/// caller: every one, or only those its key may call. Resolved once per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing(Option<Vec<String>>);

impl Listing {
    /// Every model.
    pub const EVERY: Listing = Listing(None);

    /// What `authorization` may see under `keys` (None: keys are off, everything is shown). A
    /// credential that is no key sees nothing (listing routes refuse it before they ask).
    pub fn for_caller(keys: Option<&ApiKeys>, authorization: Option<&[u8]>) -> Listing {
        let Some(keys) = keys else {
            return Listing::EVERY;
        };
        keys.with_key(authorization, |found| match found {
            Some(k) => Listing(k.models.clone()),
            None => Listing(Some(Vec::new())),
        })
        .unwrap_or(Listing(Some(Vec::new())))
    }

    /// Whether `model` is shown.
    pub fn shows(&self, model: &str) -> bool {
        self.0.as_ref().is_none_or(|ms| ms.iter().any(|m| m == model))
    }
}

/// Refuses a request that uses shared memory when its key may not ([`SHARED_MEMORY`]). Checked
/// only for requests that name a region, before the region is looked up ([`crate::shm::gate`]).
pub fn check_shared_memory(
    keys: Option<&ApiKeys>,
    authorization: Option<&[u8]>,
) -> Result<(), crate::protocol::error::ApiError> {
    authorize(keys, authorization, Some(SHARED_MEMORY), &mut None)
}

/// The one access check every protocol makes: `authorization` (the header or gRPC metadata value)
/// for `model` against `keys` (None: keys are off, everything allowed). `caller` gets the key's ID
/// when the key is known, allowed or not, for the audit log.
pub fn authorize(
    keys: Option<&ApiKeys>,
    authorization: Option<&[u8]>,
    model: Option<&str>,
    caller: &mut Option<String>,
) -> Result<(), crate::protocol::error::ApiError> {
    let Some(keys) = keys else {
        return Ok(());
    };
    let verdict = keys.check(authorization, model);
    *caller = verdict.caller().map(str::to_owned);
    match crate::protocol::error::ApiError::from_verdict(&verdict, model) {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// The credential of `Bearer CREDENTIAL` (scheme case-insensitive, as RFC 9110 says).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !rest.is_empty()).then(|| rest.trim_ascii())
}

/// The message a refused request gets (never the key).
pub fn refusal(verdict: &Verdict, model: Option<&str>) -> String {
    match verdict {
        Verdict::Missing => {
            "this server requires an API key: send the header Authorization: Bearer KEY".into()
        }
        Verdict::Invalid => "the API key is not valid".into(),
        Verdict::Forbidden(id) if model == Some(SHARED_MEMORY) => format!(
            "API key {id:?} is limited to some models and may not use shared memory regions; use a key without a model list"
        ),
        Verdict::Forbidden(id) if model == Some(EVERY_MODEL) => format!(
            "API key {id:?} is limited to some models and may not read /metrics, which covers every model; use a key without a model list, or the metrics port"
        ),
        Verdict::Forbidden(id) => format!(
            "API key {id:?} may not call model {:?}",
            model.unwrap_or_default()
        ),
        Verdict::Allowed(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> ApiKeys {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, text).unwrap();
        let k = ApiKeys::load(&path).unwrap();
        drop(dir);
        k
    }

    #[test]
    fn keys_ids_and_model_lists_decide_who_may_call_what() {
        let k = keys("# comment\n\nplainkey\nalice:alice-key\nbob:bob-key:ocr, stats\n");
        assert_eq!(
            k.check(Some(b"Bearer plainkey"), Some("x")),
            Verdict::Allowed("line-3".into())
        );
        assert_eq!(
            k.check(Some(b"bearer alice-key"), Some("x")),
            Verdict::Allowed("alice".into())
        );
        assert_eq!(
            k.check(Some(b"Bearer bob-key"), Some("stats")),
            Verdict::Allowed("bob".into())
        );
        assert_eq!(
            k.check(Some(b"Bearer bob-key"), Some("x")),
            Verdict::Forbidden("bob".into())
        );
        assert_eq!(
            k.check(Some(b"Bearer bob-key"), None),
            Verdict::Allowed("bob".into())
        );
        assert_eq!(k.check(Some(b"Bearer nope"), Some("x")), Verdict::Invalid);
        assert_eq!(k.check(Some(b"Basic alice-key"), Some("x")), Verdict::Missing);
        assert_eq!(k.check(Some(b"Bearer "), Some("x")), Verdict::Missing);
        assert_eq!(k.check(None, Some("x")), Verdict::Missing);
        // A prefix of a key is not the key.
        assert_eq!(k.check(Some(b"Bearer alice-ke"), Some("x")), Verdict::Invalid);
    }

    #[test]
    fn a_listing_shows_a_limited_key_only_its_models() {
        let k = keys("alice:alice-key\nbob:bob-key:ocr,stats\n");
        let of = |header: &[u8]| Listing::for_caller(Some(&k), Some(header));
        assert!(of(b"Bearer alice-key").shows("anything"));
        let bob = of(b"Bearer bob-key");
        assert!(bob.shows("ocr") && bob.shows("stats") && !bob.shows("resnet"));
        assert!(!of(b"Bearer nobody").shows("ocr"));
        assert!(
            Listing::for_caller(None, None).shows("resnet"),
            "keys off: every model"
        );
    }

    #[test]
    fn malformed_lines_are_refused_without_quoting_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        for (text, why) in [
            ("id:\n", "the key is empty"),
            (":secret-one\n", "the ID before ':' is empty"),
            ("id:secret two\n", "whitespace"),
            ("id:secret-three:\n", "model list"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = ApiKeys::load(&path).err().unwrap().to_string();
            assert!(e.contains(why) && e.contains("line 1"), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "a:old-key\n").unwrap();
        let k = ApiKeys::load(&path).unwrap();
        std::fs::write(&path, "a:new-key-longer\n").unwrap();
        k.reload_if_changed();
        assert_eq!(k.check(Some(b"Bearer old-key"), None), Verdict::Invalid);
        assert_eq!(
            k.check(Some(b"Bearer new-key-longer"), None),
            Verdict::Allowed("a".into())
        );
        std::fs::write(&path, "a:\n").unwrap();
        k.reload_if_changed();
        assert_eq!(
            k.check(Some(b"Bearer new-key-longer"), None),
            Verdict::Allowed("a".into())
        );
    }
}
