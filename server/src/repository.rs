//! Models and versions on disk → loaded models, readiness and metadata.
//!
//! Layout (Triton's): `DIR/<model>/<version>/model.onnx`, versions are positive integers, all are
//! loaded and the highest is the default. Single files can be added with `--model NAME=PATH`
//! (version 1). A model that fails to load stays listed, not ready, with its error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::backend::Backend;
use crate::metrics::{ModelMetricsView, ModelStats};
use crate::tensor::Tensor;

/// Errors reading the repository layout.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// The directory cannot be read.
    #[error("failed to read model repository {path}: {source}")]
    Read {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A `--model` flag that is not `NAME=PATH`.
    #[error("invalid --model {0:?}: expected NAME=PATH, e.g. --model resnet=/models/resnet.onnx")]
    BadModelFlag(String),
    /// Two sources give the same model name and version.
    #[error("model {name:?} version {version} is defined twice ({first} and {second})")]
    Duplicate {
        /// Model.
        name: String,
        /// Version.
        version: u64,
        /// First path.
        first: PathBuf,
        /// Second path.
        second: PathBuf,
    },
    /// Nothing to serve.
    #[error(
        "no models found: give --model-repository DIR with DIR/<model>/<version>/model.onnx, or --model NAME=PATH"
    )]
    Empty,
}

/// One model version to load.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    /// Served name.
    pub name: String,
    /// Version number.
    pub version: u64,
    /// Path of the `.onnx` file.
    pub path: PathBuf,
    /// The model directory's `config.pbtxt` (repository models only).
    pub config: crate::model_config::ConfigFile,
}

/// Lists the model versions in a Triton-layout directory. Entries that are not `<int>/model.onnx`
/// are skipped with a warning, so a stray file does not stop the server.
pub fn scan(dir: &Path) -> Result<Vec<ModelSource>, RepositoryError> {
    let read = |p: &Path| {
        std::fs::read_dir(p).map_err(|source| RepositoryError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut out = Vec::new();
    for model in read(dir)? {
        let model = model.map_err(|source| RepositoryError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if !model.path().is_dir() {
            continue;
        }
        let name = model.file_name().to_string_lossy().into_owned();
        let config = crate::model_config::read(&model.path(), &name);
        let policy = config.version_policy();
        let mut found = Vec::new();
        for version in read(&model.path())? {
            let version = version.map_err(|source| RepositoryError::Read {
                path: model.path(),
                source,
            })?;
            let vname = version.file_name().to_string_lossy().into_owned();
            let Ok(v) = vname.parse::<u64>() else {
                if version.path().is_dir() {
                    tracing::warn!(model = %name, entry = %vname, "skipping version directory that is not a positive integer");
                }
                continue;
            };
            let file = version.path().join("model.onnx");
            if v == 0 || !file.exists() {
                tracing::warn!(model = %name, version = %vname, "skipping version without model.onnx");
                continue;
            }
            found.push((v, file));
        }
        found.sort();
        let numbers: Vec<u64> = found.iter().map(|(v, _)| *v).collect();
        let served = policy.select(&numbers);
        if served.is_empty() && !numbers.is_empty() {
            tracing::warn!(model = %name, found = ?numbers, "the version_policy of config.pbtxt names none of the versions found: the model is not served");
        } else if served.len() < numbers.len() {
            tracing::info!(model = %name, found = ?numbers, served = ?served, "versions served by the version_policy of config.pbtxt (Triton's default: the latest)");
        }
        for (v, file) in found {
            if served.contains(&v) {
                out.push(ModelSource {
                    name: name.clone(),
                    version: v,
                    path: file,
                    config: config.clone(),
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    Ok(out)
}

/// Parses `--model NAME=PATH`.
pub fn parse_model_flag(flag: &str) -> Result<ModelSource, RepositoryError> {
    match flag.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() && !name.contains('/') => {
            Ok(ModelSource {
                name: name.to_string(),
                version: 1,
                path: PathBuf::from(path),
                config: crate::model_config::ConfigFile::Absent,
            })
        }
        _ => Err(RepositoryError::BadModelFlag(flag.to_string())),
    }
}

/// Merges repository and flag sources, rejecting duplicates.
pub fn merge_sources(mut sources: Vec<ModelSource>) -> Result<Vec<ModelSource>, RepositoryError> {
    if sources.is_empty() {
        return Err(RepositoryError::Empty);
    }
    sources.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    for w in sources.windows(2) {
        if w[0].name == w[1].name && w[0].version == w[1].version {
            return Err(RepositoryError::Duplicate {
                name: w[0].name.clone(),
                version: w[0].version,
                first: w[0].path.clone(),
                second: w[1].path.clone(),
            });
        }
    }
    Ok(sources)
}

/// A loaded model version, ready to execute.
pub struct LoadedModel {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// The runtime.
    pub backend: Box<dyn Backend>,
    /// Bounds concurrent executions to the number of instances; waiting here is queue time.
    pub slots: Arc<Semaphore>,
    /// The dynamic batcher, when batching is on and the model can be batched.
    pub batcher: std::sync::OnceLock<crate::batcher::Batcher>,
    /// Time to load and warm up.
    pub load_time: Duration,
    /// What `kubemaas-server pull` recorded about the artifact (`kubemaas-pull.json` beside the
    /// model): uri, sha256, bytes, files, seconds. None when the model was not pulled.
    pub artifact: Option<serde_json::Value>,
    /// The model's version policy (its `config.pbtxt`'s; every version without one).
    pub version_policy: crate::model_config::VersionPolicy,
}

/// Reads the pull record in a model's version directory; a malformed one is logged and ignored.
pub fn read_pull_record(model_file: &Path) -> Option<serde_json::Value> {
    let path = model_file
        .parent()?
        .join(kubemaas_crds::artifact::PULL_RECORD_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) if v.is_object() => Some(v),
        _ => {
            tracing::warn!(path = %path.display(), "ignoring a malformed pull record");
            None
        }
    }
}

/// State of a model version.
#[derive(Clone)]
pub enum ModelState {
    /// Being loaded.
    Loading,
    /// Loaded and warmed up.
    Ready(Arc<LoadedModel>),
    /// Failed to load; the message says why.
    Failed(String),
}

/// One version's entry in the repository.
#[derive(Clone)]
pub struct VersionEntry {
    /// Current state.
    pub state: ModelState,
    /// Counters (kept across state changes).
    pub stats: Arc<ModelStats>,
    /// Where it came from.
    pub path: PathBuf,
}

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No such model.
    #[error("model {0:?} is not served here; POST /v2/repository/index lists the models served")]
    UnknownModel(String),
    /// No such version.
    #[error("model {model:?} has no version {version:?}; available versions: {available}")]
    UnknownVersion {
        /// Model.
        model: String,
        /// Version asked.
        version: String,
        /// Versions present.
        available: String,
    },
    /// Known but not ready.
    #[error("model {model:?} version {version} is not ready: {reason}")]
    NotReady {
        /// Model.
        model: String,
        /// Version.
        version: u64,
        /// Why.
        reason: String,
        /// Counters, so the failure is counted.
        stats: Arc<ModelStats>,
    },
}

/// All models served by this process.
#[derive(Default)]
pub struct Repository {
    models: RwLock<BTreeMap<String, BTreeMap<u64, VersionEntry>>>,
    shutting_down: AtomicBool,
}

impl Repository {
    /// A repository listing `sources`, all in the `Loading` state.
    pub fn new(sources: &[ModelSource]) -> Repository {
        let mut models: BTreeMap<String, BTreeMap<u64, VersionEntry>> = BTreeMap::new();
        for s in sources {
            models.entry(s.name.clone()).or_default().insert(
                s.version,
                VersionEntry {
                    state: ModelState::Loading,
                    stats: Arc::default(),
                    path: s.path.clone(),
                },
            );
        }
        Repository {
            models: RwLock::new(models),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Sets the state of one version.
    pub fn set_state(&self, name: &str, version: u64, state: ModelState) {
        if let Ok(mut m) = self.models.write()
            && let Some(e) = m.get_mut(name).and_then(|v| v.get_mut(&version))
        {
            e.state = state;
        }
    }

    /// Finds a version entry; `version` None or empty means the default: as in Triton, the highest
    /// version that is ready, else the highest (whose state then says why nothing serves).
    pub fn entry(&self, name: &str, version: Option<&str>) -> Result<(u64, VersionEntry), LookupError> {
        let models = self
            .models
            .read()
            .map_err(|_| LookupError::UnknownModel(name.to_string()))?;
        let versions = models
            .get(name)
            .ok_or_else(|| LookupError::UnknownModel(name.to_string()))?;
        let found = match version.filter(|v| !v.is_empty()) {
            None => versions
                .iter()
                .rev()
                .find(|(_, e)| matches!(e.state, ModelState::Ready(_)))
                .or_else(|| versions.iter().next_back()),
            Some(v) => v.parse::<u64>().ok().and_then(|n| versions.get_key_value(&n)),
        };
        let (v, e) = found.ok_or_else(|| LookupError::UnknownVersion {
            model: name.to_string(),
            version: version.unwrap_or_default().to_string(),
            available: versions.keys().map(u64::to_string).collect::<Vec<_>>().join(", "),
        })?;
        Ok((*v, e.clone()))
    }

    /// The ready model for a request, or why not.
    pub fn ready_model(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(Arc<LoadedModel>, Arc<ModelStats>), LookupError> {
        let (v, e) = self.entry(name, version)?;
        let not_ready = |reason: String| LookupError::NotReady {
            model: name.to_string(),
            version: v,
            reason,
            stats: e.stats.clone(),
        };
        match &e.state {
            ModelState::Ready(m) => Ok((m.clone(), e.stats.clone())),
            ModelState::Loading => Err(not_ready("still loading".into())),
            ModelState::Failed(err) => Err(not_ready(err.clone())),
        }
    }

    /// Every (name, version, entry), sorted.
    pub fn list(&self) -> Vec<(String, u64, VersionEntry)> {
        let Ok(models) = self.models.read() else {
            return Vec::new();
        };
        models
            .iter()
            .flat_map(|(n, vs)| vs.iter().map(move |(v, e)| (n.clone(), *v, e.clone())))
            .collect()
    }

    /// The versions of model `name` that are ready, ascending (empty when unknown), as Triton's
    /// model metadata lists them.
    pub fn ready_versions(&self, name: &str) -> Vec<u64> {
        self.models
            .read()
            .map(|m| {
                m.get(name)
                    .map(|v| {
                        v.iter()
                            .filter(|(_, e)| matches!(e.state, ModelState::Ready(_)))
                            .map(|(k, _)| *k)
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Triton's repository index: every (name, version, state, reason), state being `READY`,
    /// `LOADING` or `UNAVAILABLE` (with the load error as reason).
    pub fn index(&self) -> Vec<(String, u64, &'static str, String)> {
        self.list()
            .into_iter()
            .map(|(name, v, e)| match e.state {
                ModelState::Ready(_) => (name, v, "READY", String::new()),
                ModelState::Loading => (name, v, "LOADING", String::new()),
                ModelState::Failed(err) => (name, v, "UNAVAILABLE", err),
            })
            .collect()
    }

    /// Server readiness: every model that is to be served is ready. No model is still loading, at
    /// least one is ready, and the server is not shutting down. A model that failed to load (the
    /// server runs on without `--exit-on-load-failure`) is not to be served: it is reported on its
    /// own (model readiness, repository index, metrics) and does not hold the others back.
    pub fn all_ready(&self) -> bool {
        let list = self.list();
        let loading = list
            .iter()
            .any(|(_, _, e)| matches!(e.state, ModelState::Loading));
        let ready = list
            .iter()
            .any(|(_, _, e)| matches!(e.state, ModelState::Ready(_)));
        !self.is_shutting_down() && !loading && (ready || list.is_empty())
    }

    /// Marks the server as shutting down: readiness turns false at once.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Renders `/metrics`.
    pub fn render_metrics(&self) -> String {
        let list = self.list();
        let versions: Vec<String> = list.iter().map(|(_, v, _)| v.to_string()).collect();
        let views: Vec<ModelMetricsView<'_>> = list
            .iter()
            .zip(&versions)
            .map(|((name, _, e), version)| {
                let loaded = match &e.state {
                    ModelState::Ready(m) => Some(m),
                    _ => None,
                };
                ModelMetricsView {
                    model: name,
                    version,
                    execution_provider: loaded.map(|m| m.backend.execution_provider()).unwrap_or(""),
                    ready: loaded.is_some(),
                    load_time: loaded.map(|m| m.load_time),
                    stats: &e.stats,
                }
            })
            .collect();
        let mut out = crate::metrics::render(&views);
        // GPU families only where a model really runs on CUDA (NVML is not opened otherwise).
        if views
            .iter()
            .any(|v| v.execution_provider == crate::backend::ort::CUDA_EP)
        {
            crate::gpu::render(&mut out, &crate::gpu::read());
        }
        out
    }
}

/// Loads one version with `load` and warms it up with one zero-filled inference. A warm-up the
/// model itself rejects (e.g. a shape input of zeros) is logged and is not a load failure.
pub fn load_and_warm(
    source: &ModelSource,
    load: impl FnOnce(&Path) -> Result<Box<dyn Backend>, crate::backend::BackendError>,
) -> Result<LoadedModel, String> {
    let start = Instant::now();
    let backend = load(&source.path).map_err(|e| e.to_string())?;
    let inputs: Result<Vec<Tensor>, String> = backend
        .signature()
        .inputs
        .iter()
        .map(|i| {
            let shape = i
                .shape
                .iter()
                .map(|&d| if d < 0 { 1 } else { d as usize })
                .collect();
            Tensor::warm_up_zeros(&i.name, i.datatype, shape)
        })
        .collect();
    // Every instance is warmed: each session pays for its own first run (on CUDA, the first run
    // of a shape in a session is far slower than the next).
    match inputs {
        Ok(inputs) => {
            if let Err(e) = backend.infer_on_every_instance(&inputs) {
                tracing::warn!(model = %source.name, version = source.version, error = %e, "warm-up inference rejected by the model; serving anyway");
            }
        }
        Err(why) => {
            tracing::warn!(model = %source.name, version = source.version, reason = %why, "model not warmed up; serving anyway");
        }
    }
    let load_time = start.elapsed();
    let slots = Arc::new(Semaphore::new(backend.instances()));
    tracing::info!(
        model = %source.name,
        version = source.version,
        execution_provider = backend.execution_provider(),
        instances = backend.instances(),
        load_ms = load_time.as_millis() as u64,
        "model ready"
    );
    Ok(LoadedModel {
        name: source.name.clone(),
        version: source.version,
        backend,
        slots,
        batcher: std::sync::OnceLock::new(),
        load_time,
        artifact: read_pull_record(&source.path),
        version_policy: source.config.version_policy(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_integer_versions_with_model_files_and_skips_the_rest() {
        let dir = std::env::temp_dir().join(format!("kubemaas-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for p in ["a/1", "a/3", "a/x", "b/2", "c/0"] {
            std::fs::create_dir_all(dir.join(p)).unwrap();
            std::fs::write(dir.join(p).join("model.onnx"), b"").unwrap();
        }
        std::fs::create_dir_all(dir.join("b/5")).unwrap(); // no model file
        std::fs::write(dir.join("README"), b"").unwrap();
        let found: Vec<(String, u64)> = scan(&dir)
            .unwrap()
            .into_iter()
            .map(|s| (s.name, s.version))
            .collect();
        assert_eq!(found, vec![("a".into(), 1), ("a".into(), 3), ("b".into(), 2)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn model_flag_needs_name_and_path() {
        assert_eq!(parse_model_flag("m=/x.onnx").unwrap().name, "m");
        for bad in ["m", "=x", "m=", "a/b=x"] {
            assert!(parse_model_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn duplicate_sources_and_empty_sources_are_rejected() {
        let s = |n: &str, v| ModelSource {
            name: n.into(),
            version: v,
            path: PathBuf::from(n),
            config: crate::model_config::ConfigFile::Absent,
        };
        assert!(merge_sources(vec![]).is_err());
        assert!(merge_sources(vec![s("a", 1), s("a", 1)]).is_err());
        assert_eq!(merge_sources(vec![s("b", 1), s("a", 2)]).unwrap()[0].name, "a");
    }

    #[test]
    fn default_version_is_the_highest_and_unknown_versions_are_reported() {
        let s = |v| ModelSource {
            name: "m".into(),
            version: v,
            path: PathBuf::new(),
            config: crate::model_config::ConfigFile::Absent,
        };
        let repo = Repository::new(&[s(1), s(7), s(3)]);
        assert_eq!(repo.entry("m", None).unwrap().0, 7);
        assert_eq!(repo.entry("m", Some("3")).unwrap().0, 3);
        let err = repo.entry("m", Some("4")).err().unwrap().to_string();
        assert!(err.contains("1, 3, 7"), "{err}");
        assert!(repo.entry("x", None).is_err());
        assert!(!repo.all_ready());
    }
}
