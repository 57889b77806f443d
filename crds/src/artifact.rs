//! The contract between the pod and the operator: what `kubemaas-server pull` and `serve` report
//! through their exit codes and the files they leave, defined once for both sides.
//!
//! The init container's exit code becomes the `ModelLoaded=False` reason; its termination message
//! (written to `/dev/termination-log`) becomes the condition's message.

/// Exit codes of `kubemaas-server pull` and `serve`.
pub mod exit {
    /// The download failed (network, server error, timeout, retries exhausted, invalid URI).
    pub const DOWNLOAD_FAILED: u8 = 2;
    /// The artifact's SHA-256 does not match `spec.model.sha256`.
    pub const CHECKSUM_MISMATCH: u8 = 3;
    /// `serve --exit-on-load-failure`: ONNX Runtime could not load the model.
    pub const LOAD_FAILED: u8 = 4;
    /// The object, prefix, repository or file does not exist.
    pub const NOT_FOUND: u8 = 5;
    /// The store refused the credentials (401/403, an unknown key, a bad signature).
    pub const ACCESS_DENIED: u8 = 6;
    /// The artifact is larger than `--max-bytes`.
    pub const TOO_LARGE: u8 = 7;
    /// The host resolves to (or redirects to) a refused address, e.g. a cloud metadata endpoint.
    pub const ADDRESS_REFUSED: u8 = 8;
    /// `pull --compress` (or `compress --check`): the compressed model's outputs agree with the
    /// original's less than the required cosine similarity; nothing was placed.
    pub const COMPRESSION_REJECTED: u8 = 9;
    /// `pull --compress`: the model could not be compressed (an unsupported model or operator, or
    /// the evaluation failed); nothing was placed.
    pub const COMPRESSION_FAILED: u8 = 10;
}

/// What `serve` writes to its termination log when a signal stops it after every model loaded:
/// the kubelet restarting a server that served (a failed liveness probe) is then told apart from
/// a startup-probe kill, which stops it while loading ([`STOPPED_WHILE_LOADING`]).
pub const STOPPED_AFTER_LOADING: &str = "stopped by a signal after its models had loaded";

/// What `serve` writes to its termination log when a signal stops it while a model still loads.
pub const STOPPED_WHILE_LOADING: &str = "stopped by a signal while loading its models";

/// File `pull` writes next to the model (in the version directory) describing what it fetched:
/// `{"uri", "sha256", "bytes", "files", "seconds"}`. The server reports it in model metadata.
pub const PULL_RECORD_FILE: &str = "kubemaas-pull.json";

/// Whether a model URI names a directory of files (a prefix ending in `/`, a whole Hugging Face
/// repository, or a PVC directory ending in `/`) rather than one file. An `http(s)://` URL is
/// always one file (HTTP has no directory listing).
pub fn is_directory_uri(uri: &str) -> bool {
    if uri.starts_with("http://") || uri.starts_with("https://") {
        return false;
    }
    if let Some(rest) = uri.strip_prefix("hf://") {
        let path = rest.rsplit_once('@').map_or(rest, |(p, _)| p);
        // org/repo alone, or org/repo/dir/
        return path.ends_with('/') || path.matches('/').count() < 2;
    }
    uri.ends_with('/')
}

/// The credential-bearing parts of a model URI, each with what stands in for it: a presigned or
/// signed URL's query (`?X-Amz-Signature=…`, `?X-Goog-Signature=…`) and a password in the
/// authority (`https://user:password@host/…`).
fn uri_secrets(uri: &str) -> Vec<(String, &'static str)> {
    let mut secrets = Vec::new();
    // Only a URL has a query or user information: in s3://, gs://, hf:// and pvc:// URIs a '?',
    // '#' or '@' belongs to the key, the path or the revision.
    if !(uri.starts_with("http://") || uri.starts_with("https://")) {
        return secrets;
    }
    let without_fragment = uri.split('#').next().unwrap_or(uri);
    if let Some((_, query)) = without_fragment.split_once('?')
        && !query.is_empty()
    {
        secrets.push((format!("?{query}"), "?redacted"));
    }
    if let Some((_, rest)) = uri.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && let Some((_, password)) = userinfo.split_once(':')
            && !password.is_empty()
        {
            secrets.push((format!(":{password}@"), ":redacted@"));
        }
    }
    secrets
}

/// `text` with every credential of `uri` in it replaced (see [`redact_uri`]): for messages that
/// quote the URI, such as a failed download's, which becomes a condition message.
pub fn redact(text: &str, uri: &str) -> String {
    uri_secrets(uri)
        .iter()
        .fold(text.to_string(), |t, (secret, stand_in)| {
            t.replace(secret, stand_in)
        })
}

/// `uri` as it may be reported (pull record, model metadata, status, logs): an http(s) URL's query is replaced by
/// `?redacted` (a presigned URL's query is its credential) and a password by `redacted`.
pub fn redact_uri(uri: &str) -> String {
    redact(uri, uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_uris_are_prefixes_and_whole_repos() {
        assert!(is_directory_uri("s3://b/models/resnet/"));
        assert!(!is_directory_uri("s3://b/models/resnet/model.onnx"));
        assert!(is_directory_uri("hf://org/repo"));
        assert!(is_directory_uri("hf://org/repo@v1.0"));
        assert!(is_directory_uri("hf://org/repo/onnx/@main"));
        assert!(!is_directory_uri("hf://org/repo/onnx/model.onnx@main"));
        assert!(!is_directory_uri("hf://org/repo/model.onnx"));
        assert!(is_directory_uri("pvc://claim/dir/"));
        assert!(!is_directory_uri("https://h/dir/"), "a URL is one file");
    }

    #[test]
    fn credentials_in_a_uri_are_never_repeated() {
        assert_eq!(
            redact_uri("https://b.s3.amazonaws.com/m.onnx?X-Amz-Signature=abc&X-Amz-Credential=k"),
            "https://b.s3.amazonaws.com/m.onnx?redacted"
        );
        assert_eq!(
            redact_uri("https://u:p%40ss@host:8443/m.onnx?sig=1#frag"),
            "https://u:redacted@host:8443/m.onnx?redacted#frag"
        );
        for plain in [
            "s3://bucket/m.onnx",
            "hf://org/repo",
            "https://u@host/m.onnx",
            "pvc://c/m/",
            "s3://bucket/odd?key#name.onnx",
            "gs://bucket/a?b.onnx",
        ] {
            assert_eq!(redact_uri(plain), plain);
        }
        let message = "error sending request for url (https://u:pw@h/m?sig=s3cr3t): 404";
        assert_eq!(
            redact(message, "https://u:pw@h/m?sig=s3cr3t"),
            "error sending request for url (https://u:redacted@h/m?redacted): 404"
        );
    }
}
