//! Model URIs: parsed once into the source they name, refusing path tricks (`..`, `.`, empty or
//! absolute components, backslashes) before any request is made.

/// A parsed artifact URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactUri {
    /// `s3://bucket/key` or `s3://bucket/prefix/`.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Object key, or a prefix ending in `/`.
        key: String,
    },
    /// `gs://bucket/object` or `gs://bucket/prefix/`.
    Gcs {
        /// Bucket name.
        bucket: String,
        /// Object name, or a prefix ending in `/`.
        key: String,
    },
    /// `http://…` or `https://…`: one file.
    Http {
        /// The URL.
        url: reqwest::Url,
    },
    /// `hf://org/repo[/path][@revision]`.
    Hf {
        /// `org/repo`.
        repo: String,
        /// Path inside the repository: empty (the whole repository), a directory ending in `/`,
        /// or a file.
        path: String,
        /// Branch, tag or commit (`main` when not given).
        revision: String,
    },
    /// `pvc://claim/path` or `pvc://claim/dir/`.
    Pvc {
        /// PersistentVolumeClaim name.
        claim: String,
        /// Path inside the claim, a directory when it ends in `/`.
        path: String,
    },
}

/// Why a URI is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UriError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, UriError> {
    Err(UriError(msg.into()))
}

/// Checks every `/`-separated component of a relative path; a trailing `/` (a prefix) is allowed.
pub fn check_relative(path: &str, what: &str) -> Result<(), UriError> {
    if path.starts_with('/') {
        return err(format!(
            "{what} {path:?} is absolute; give a path relative to the bucket, repository or claim"
        ));
    }
    let body = path.strip_suffix('/').unwrap_or(path);
    if body.is_empty() {
        return Ok(());
    }
    for c in body.split('/') {
        if c.is_empty() {
            return err(format!("{what} {path:?} has an empty path component (\"//\")"));
        }
        if c == "." || c == ".." {
            return err(format!(
                "{what} {path:?} contains a {c:?} path component, which is refused"
            ));
        }
        if c.contains('\\') || c.contains('\0') {
            return err(format!("{what} {path:?} contains a backslash or NUL character"));
        }
    }
    Ok(())
}

fn check_name(name: &str, what: &str, extra: &[char]) -> Result<(), UriError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        err(format!("{what} {name:?} is not a valid name"))
    }
}

fn bucket_and_key(rest: &str, scheme: &str) -> Result<(String, String), UriError> {
    let Some((bucket, key)) = rest.split_once('/') else {
        return err(format!(
            "expected {scheme}://<bucket>/<key> or {scheme}://<bucket>/<prefix>/"
        ));
    };
    check_name(bucket, "bucket", &['-', '.', '_'])?;
    if key.is_empty() || key == "/" {
        return err(format!(
            "expected an object key or a prefix after {scheme}://{bucket}/ (a whole bucket is not pulled)"
        ));
    }
    check_relative(key, "key")?;
    Ok((bucket.to_string(), key.to_string()))
}

impl ArtifactUri {
    /// Parses and checks a model URI.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return err("expected scheme://…; supported: s3://, gs://, http://, https://, hf://, pvc://");
        };
        match scheme {
            "s3" => {
                let (bucket, key) = bucket_and_key(rest, "s3")?;
                Ok(ArtifactUri::S3 { bucket, key })
            }
            "gs" => {
                let (bucket, key) = bucket_and_key(rest, "gs")?;
                Ok(ArtifactUri::Gcs { bucket, key })
            }
            "http" | "https" => {
                // The raw path is checked before parsing: URL parsing would silently resolve `..`.
                let after_authority = rest.split_once('/').map_or("", |(_, p)| p);
                let raw_path = after_authority.split(['?', '#']).next().unwrap_or("");
                for c in raw_path.split('/') {
                    let lower = c.to_ascii_lowercase().replace("%2e", ".");
                    if lower == "." || lower == ".." {
                        return err(format!(
                            "the URL path contains a {c:?} component, which is refused"
                        ));
                    }
                }
                let url = reqwest::Url::parse(uri).map_err(|e| UriError(format!("invalid URL: {e}")))?;
                if url.host_str().is_none_or(str::is_empty) {
                    return err("the URL has no host");
                }
                if !url.username().is_empty() || url.password().is_some() {
                    return err(
                        "credentials inside the URL are refused; use --bearer-token-file or --credentials-dir",
                    );
                }
                Ok(ArtifactUri::Http { url })
            }
            "hf" => {
                let (body, revision) = match rest.rsplit_once('@') {
                    Some((b, r)) => (b, r.to_string()),
                    None => (rest, "main".to_string()),
                };
                if revision.is_empty() {
                    return err("empty revision after '@'");
                }
                check_relative(&revision, "revision")?;
                if revision.ends_with('/')
                    || !revision
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
                {
                    return err(format!(
                        "revision {revision:?} is not a branch, tag or commit name"
                    ));
                }
                let mut parts = body.splitn(3, '/');
                let (Some(org), Some(repo)) = (parts.next(), parts.next()) else {
                    return err("expected hf://<org>/<repo>[/<path>][@<revision>]");
                };
                check_name(org, "organisation", &['-', '.', '_'])?;
                check_name(repo, "repository", &['-', '.', '_'])?;
                let path = parts.next().unwrap_or("").to_string();
                check_relative(&path, "path")?;
                Ok(ArtifactUri::Hf {
                    repo: format!("{org}/{repo}"),
                    path,
                    revision,
                })
            }
            "pvc" => {
                let Some((claim, path)) = rest.split_once('/') else {
                    return err("expected pvc://<claim>/<path>");
                };
                check_name(claim, "claim", &['-', '.'])?;
                if path.is_empty() {
                    return err("expected a path inside the claim after pvc://<claim>/");
                }
                check_relative(path, "path")?;
                Ok(ArtifactUri::Pvc {
                    claim: claim.into(),
                    path: path.into(),
                })
            }
            other => err(format!(
                "the {other}:// scheme is not supported; use s3://, gs://, http://, https://, hf:// or pvc://"
            )),
        }
    }

    /// Whether the URI names a directory (DEST becomes a directory).
    pub fn is_directory(&self) -> bool {
        match self {
            ArtifactUri::S3 { key, .. } | ArtifactUri::Gcs { key, .. } => key.ends_with('/'),
            ArtifactUri::Http { .. } => false,
            ArtifactUri::Hf { path, .. } => path.is_empty() || path.ends_with('/'),
            ArtifactUri::Pvc { path, .. } => path.ends_with('/'),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(uri: &str) -> String {
        match ArtifactUri::parse(uri) {
            Err(UriError(m)) => m,
            Ok(u) => panic!("{uri} was accepted as {u:?}"),
        }
    }

    #[test]
    fn every_scheme_parses_files_and_prefixes() {
        assert_eq!(
            ArtifactUri::parse("s3://models/resnet/1/model.onnx"),
            Ok(ArtifactUri::S3 {
                bucket: "models".into(),
                key: "resnet/1/model.onnx".into()
            })
        );
        assert!(ArtifactUri::parse("s3://models/resnet/").unwrap().is_directory());
        assert!(ArtifactUri::parse("gs://b/o/").unwrap().is_directory());
        assert!(!ArtifactUri::parse("https://h/x.onnx").unwrap().is_directory());
        assert_eq!(
            ArtifactUri::parse("hf://org/repo/onnx/model.onnx@refs/pr/1"),
            Ok(ArtifactUri::Hf {
                repo: "org/repo".into(),
                path: "onnx/model.onnx".into(),
                revision: "refs/pr/1".into()
            })
        );
        assert!(ArtifactUri::parse("hf://org/repo").unwrap().is_directory());
        assert!(
            ArtifactUri::parse("hf://org/repo/onnx/@v1")
                .unwrap()
                .is_directory()
        );
        assert!(ArtifactUri::parse("pvc://claim/dir/").unwrap().is_directory());
    }

    #[test]
    fn traversal_absolute_and_empty_components_are_refused_in_every_scheme() {
        for uri in [
            "pvc://claim/../../proc/self/environ",
            "pvc://claim//etc/passwd",
            "pvc://claim/a/./b",
            "s3://b/../other/key",
            "s3://b//abs",
            "gs://b/a/../../x",
            "hf://org/repo/../x@main",
            "hf://org/repo/x@../main",
            "http://h/a/../b",
            "https://h/a/%2e%2e/b",
            "pvc://claim/a\\..\\b",
        ] {
            let m = refused(uri);
            assert!(!m.is_empty(), "{uri}");
        }
    }

    #[test]
    fn unknown_schemes_and_credentials_in_urls_are_refused() {
        assert!(refused("ftp://h/x").contains("not supported"));
        assert!(refused("file:///etc/passwd").contains("not supported"));
        assert!(refused("https://user:pw@h/x").contains("credentials"));
        assert!(refused("s3://bucket-only").contains("expected"));
        assert!(refused("hf://just-a-name").contains("expected"));
    }
}
