//! A value built from files and rebuilt when one of them changes: the API keys and the TLS
//! certificate, both mounted from Secrets that are rotated in place. A change is seen by size and
//! modification time (a Secret update swaps a symlink, so both change); a rebuild that fails keeps
//! the value in force, logged, so a half-written update never opens or breaks the server.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// What identifies a version of a file.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

type Loader<T, E> = Box<dyn Fn() -> Result<T, E> + Send + Sync>;

/// The current value, built by `load` from `paths`.
pub struct Watched<T, E> {
    what: &'static str,
    paths: Vec<PathBuf>,
    load: Loader<T, E>,
    state: RwLock<(Arc<T>, Vec<Stamp>)>,
}

impl<T: Send + Sync + 'static, E: Display + 'static> Watched<T, E> {
    /// Builds the value once; an error here is the caller's to report (a server must not start
    /// without what it was asked for). `what` names it in logs ("API keys").
    pub fn load(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: impl Fn() -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Watched<T, E>, E> {
        // Stamped before reading, so a change during the read is seen on the next check.
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let value = Arc::new(load()?);
        Ok(Watched {
            what,
            paths,
            load: Box::new(load),
            state: RwLock::new((value, stamps)),
        })
    }

    /// The value in force.
    pub fn current(&self) -> Option<Arc<T>> {
        self.state.read().ok().map(|s| s.0.clone())
    }

    /// Rebuilds the value if a file changed since the last check.
    pub fn reload_if_changed(&self) {
        let now: Vec<Stamp> = self.paths.iter().map(|p| stamp(p)).collect();
        if self.state.read().map(|s| s.1 == now).unwrap_or(false) {
            return;
        }
        let what = self.what;
        let path = self
            .paths
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match (self.load)() {
            Ok(value) => {
                tracing::info!(path, "{what} reloaded");
                if let Ok(mut s) = self.state.write() {
                    *s = (Arc::new(value), now);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the previous {what}");
                if let Ok(mut s) = self.state.write() {
                    s.1 = now;
                }
            }
        }
    }

    /// Checks the files every `every` until the process ends.
    pub fn watch(self: Arc<Self>, every: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let watched = self.clone();
                // A stat per file and, rarely, a small read: off the reactor all the same.
                let _ = tokio::task::spawn_blocking(move || watched.reload_if_changed()).await;
            }
        });
    }
}
