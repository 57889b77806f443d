//! pvc:// sources (a claim mounted at `--pvc-root/<claim>`) and cache hits: files on a mounted
//! volume, streamed in chunks (never read whole), confined to the volume's root even through
//! symbolic links.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::io::AsyncSeekExt;

use super::fetch::{Body, Entry, FetchError, Source};

const CHUNK: usize = 256 * 1024;

/// A file or directory below `root`.
pub struct LocalSource {
    /// The volume root; nothing outside it is read.
    pub root: PathBuf,
    /// Path relative to the root (a directory when it ends in `/`, or empty for the root itself).
    pub path: String,
}

fn io(path: &Path, e: std::io::Error) -> FetchError {
    if e.kind() == std::io::ErrorKind::NotFound {
        FetchError::NotFound(format!("{} does not exist", path.display()))
    } else if e.kind() == std::io::ErrorKind::PermissionDenied {
        FetchError::Denied(format!("cannot read {}: {e}", path.display()))
    } else {
        FetchError::Fatal(format!("cannot read {}: {e}", path.display()))
    }
}

impl LocalSource {
    /// Resolves `path` (following links) and refuses anything outside the root.
    fn confined(&self, path: &Path) -> Result<PathBuf, FetchError> {
        let root = std::fs::canonicalize(&self.root).map_err(|e| io(&self.root, e))?;
        let real = std::fs::canonicalize(path).map_err(|e| io(path, e))?;
        if !real.starts_with(&root) {
            return Err(FetchError::Fatal(format!(
                "{} resolves to {}, outside the volume {}; refused",
                path.display(),
                real.display(),
                root.display()
            )));
        }
        Ok(real)
    }

    /// Lists the files under `dir` (resolved), named from `rel`; `walking` holds the resolved
    /// directories from the top down to `dir`.
    fn walk(
        &self,
        dir: &Path,
        rel: &str,
        walking: &mut Vec<PathBuf>,
        out: &mut Vec<Entry>,
    ) -> Result<(), FetchError> {
        let mut children: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| io(dir, e))?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let name = child.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let real = self.confined(&child.path())?;
            let meta = std::fs::metadata(&real).map_err(|e| io(&real, e))?;
            if meta.is_dir() {
                // A link to a directory being walked (`loop -> .`, or two that point at each
                // other's directories) would be walked forever.
                if walking.contains(&real) {
                    return Err(FetchError::Fatal(format!(
                        "{} is a link back to {}, which contains it: a directory loop; remove the link or pull a directory without it",
                        child.path().display(),
                        real.display()
                    )));
                }
                walking.push(real.clone());
                let walked = self.walk(&real, &child_rel, walking, out);
                walking.pop();
                walked?;
            } else if meta.is_file() {
                out.push(Entry {
                    rel: child_rel,
                    size: Some(meta.len()),
                    locator: real.to_string_lossy().into_owned(),
                });
            }
        }
        Ok(())
    }
}

impl Source for LocalSource {
    async fn list(&self) -> Result<Vec<Entry>, FetchError> {
        let target = self.root.join(self.path.trim_end_matches('/'));
        let real = self.confined(&target)?;
        let meta = std::fs::metadata(&real).map_err(|e| io(&real, e))?;
        let want_dir = self.path.is_empty() || self.path.ends_with('/');
        match (want_dir, meta.is_dir()) {
            (true, true) => {
                let mut out = Vec::new();
                self.walk(&real, "", &mut vec![real.clone()], &mut out)?;
                Ok(out)
            }
            (false, false) => Ok(vec![Entry {
                rel: String::new(),
                size: Some(meta.len()),
                locator: real.to_string_lossy().into_owned(),
            }]),
            (true, false) => Err(FetchError::Fatal(format!(
                "{} is a file; drop the trailing '/' to pull one file",
                target.display()
            ))),
            (false, true) => Err(FetchError::Fatal(format!(
                "{} is a directory; end the URI with '/' to pull a directory",
                target.display()
            ))),
        }
    }

    async fn open(&self, entry: &Entry, offset: u64, _validator: Option<&str>) -> Result<Body, FetchError> {
        let path = PathBuf::from(&entry.locator);
        let mut file = tokio::fs::File::open(&path).await.map_err(|e| io(&path, e))?;
        let total = file.metadata().await.map_err(|e| io(&path, e))?.len();
        if offset > 0 {
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| io(&path, e))?;
        }
        let shown = path.display().to_string();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, CHUNK)
            .map(move |r| r.map_err(|e| FetchError::Transient(format!("reading {shown}: {e}"))));
        Ok(Body {
            stream: Box::pin(stream),
            total: Some(total),
            resumed: true,
            validator: None,
        })
    }
}
