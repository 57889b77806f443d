//! hf:// sources: the Hugging Face Hub's HTTP API (`HF_ENDPOINT`, default https://huggingface.co).
//! A directory is listed with `GET /api/models/{repo}/tree/{revision}/{path}?recursive=true`
//! (following `Link: rel="next"` pages); files come from `GET /{repo}/resolve/{revision}/{path}`,
//! which the Hub redirects to its CDN for large files (the token is not sent there).

use reqwest::Url;

use super::fetch::{Body, Entry, FetchError, Source};
use super::http::HttpFetcher;

/// Most pages a listing may take (the Hub pages by 1,000 entries).
const MAX_PAGES: usize = 1000;

/// A Hugging Face repository, directory or file.
pub struct HfSource {
    /// The client (guarded).
    pub http: HttpFetcher,
    /// Hub base URL.
    pub endpoint: Url,
    /// `org/repo`.
    pub repo: String,
    /// Path in the repository (empty, a directory ending in `/`, or a file).
    pub path: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// `HF_TOKEN`.
    pub token: Option<String>,
}

fn url_with(base: &Url, segments: &[&str]) -> Result<Url, FetchError> {
    let mut url = base.clone();
    {
        let mut segs = url
            .path_segments_mut()
            .map_err(|_| FetchError::Fatal(format!("HF_ENDPOINT {base} cannot take a path")))?;
        segs.pop_if_empty();
        for s in segments {
            // One segment each: a '/' inside (a revision such as refs/pr/1) is percent-encoded.
            segs.push(s);
        }
    }
    Ok(url)
}

impl HfSource {
    fn file_url(&self, path: &str) -> Result<Url, FetchError> {
        let (org, name) = self.repo.split_once('/').unwrap_or((&self.repo, ""));
        let mut segs = vec![org, name, "resolve", self.revision.as_str()];
        segs.extend(path.split('/'));
        url_with(&self.endpoint, &segs)
    }

    fn denied_hint(e: FetchError) -> FetchError {
        match e {
            FetchError::Denied(m) => FetchError::Denied(format!(
                "{m}: the repository does not exist or is private; set HF_TOKEN (or a `token` key in credentialsSecretRef)"
            )),
            other => other,
        }
    }
}

impl Source for HfSource {
    async fn list(&self) -> Result<Vec<Entry>, FetchError> {
        let dir = self.path.is_empty() || self.path.ends_with('/');
        if !dir {
            return Ok(vec![Entry {
                rel: String::new(),
                size: None,
                locator: self.file_url(&self.path)?.to_string(),
            }]);
        }
        let prefix = self.path.trim_end_matches('/');
        let (org, name) = self.repo.split_once('/').unwrap_or((&self.repo, ""));
        let mut segs = vec!["api", "models", org, name, "tree", self.revision.as_str()];
        if !prefix.is_empty() {
            segs.extend(prefix.split('/'));
        }
        let mut url = url_with(&self.endpoint, &segs)?;
        url.query_pairs_mut().append_pair("recursive", "true");
        let mut entries = Vec::new();
        for _ in 0..MAX_PAGES {
            let (page, link) = self
                .http
                .get_json(&url, self.token.as_deref())
                .await
                .map_err(Self::denied_hint)?;
            let items = page
                .as_array()
                .ok_or_else(|| FetchError::Fatal(format!("{url} did not answer a JSON array")))?;
            for item in items {
                if item["type"].as_str() != Some("file") {
                    continue;
                }
                let Some(path) = item["path"].as_str() else {
                    continue;
                };
                let rel = if prefix.is_empty() {
                    path
                } else {
                    match path.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) {
                        Some(r) => r,
                        None => continue,
                    }
                };
                entries.push(Entry {
                    rel: rel.to_string(),
                    size: item["size"].as_u64(),
                    locator: self.file_url(path)?.to_string(),
                });
            }
            match link.as_deref().and_then(next_link) {
                Some(next) => {
                    url = url
                        .join(&next)
                        .map_err(|e| FetchError::Fatal(format!("bad Link header {next:?}: {e}")))?;
                }
                None => return Ok(entries),
            }
        }
        Err(FetchError::Fatal(format!(
            "the listing of {} has more than {MAX_PAGES} pages",
            self.repo
        )))
    }

    async fn open(&self, entry: &Entry, offset: u64, validator: Option<&str>) -> Result<Body, FetchError> {
        let url =
            Url::parse(&entry.locator).map_err(|e| FetchError::Fatal(format!("{}: {e}", entry.locator)))?;
        self.http
            .open_url(&url, self.token.as_deref(), offset, validator)
            .await
            .map_err(Self::denied_hint)
    }
}

/// The `rel="next"` target of a Link header.
pub fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| matches!(p.trim().replace(' ', "").as_str(), "rel=\"next\"" | "rel=next"));
        is_next.then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_next_page_is_found() {
        assert_eq!(
            next_link(r#"<https://hub/api/models/a/b/tree/main?cursor=x>; rel="next""#).as_deref(),
            Some("https://hub/api/models/a/b/tree/main?cursor=x")
        );
        assert_eq!(next_link(r#"<https://x>; rel="prev""#), None);
    }

    #[test]
    fn revisions_with_slashes_are_one_encoded_segment() {
        let base = Url::parse("http://127.0.0.1:9/hub/").unwrap();
        let u = url_with(
            &base,
            &["org", "repo", "resolve", "refs/pr/1", "onnx", "model.onnx"],
        )
        .unwrap();
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:9/hub/org/repo/resolve/refs%2Fpr%2F1/onnx/model.onnx"
        );
    }
}
