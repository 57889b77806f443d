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
}
