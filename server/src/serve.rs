//! `kubemaas-server serve`: configuration, start-up, model loading and shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::ort::{self as ortb, ConvAlgoSearch, ExecutionProvider, OptLevel, OrtModel, OrtOptions};
use crate::http::{self, AppState, Surface};
use crate::model_config::ConfigFile;
use crate::repository::{self, ModelSource, ModelState, Repository};

/// Flags of `kubemaas-server serve`. Every flag can also be set through the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Model repository in Triton's layout: DIR/<model>/<version>/model.onnx. Every version is
    /// loaded, the highest being the default, unless the model's `config.pbtxt` says otherwise:
    /// with that file, as in Triton, only the latest version unless its `version_policy` says
    /// which, and its batching and instance group replace the flags for that model.
    #[arg(long, env = "KUBEMAAS_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,

    /// Serve one model file as NAME (version 1). Repeatable.
    #[arg(
        long = "model",
        value_name = "NAME=PATH",
        env = "KUBEMAAS_MODEL",
        value_delimiter = ','
    )]
    pub models: Vec<String>,

    /// Address to listen on. The default, `::`, is every address, IPv4 and IPv6 (or IPv4 alone
    /// where the host has no IPv6), so pods answer on IPv4, IPv6 and dual-stack clusters; `0.0.0.0`
    /// is IPv4 only.
    #[arg(long, env = "KUBEMAAS_HOST", default_value = "::")]
    pub host: IpAddr,

    /// HTTP port (KServe V2, TF-Serving REST, /metrics). 0 picks a free port.
    #[arg(long, env = "KUBEMAAS_HTTP_PORT", default_value_t = 8080)]
    pub http_port: u16,

    /// gRPC port (the Open Inference Protocol's `inference.GRPCInferenceService` with Triton's
    /// extensions, and `grpc.health.v1.Health`). 0 picks a free port.
    #[arg(long, env = "KUBEMAAS_GRPC_PORT", default_value_t = 8081)]
    pub grpc_port: u16,

    /// Port serving /metrics, health, readiness and model metadata, plain HTTP and without an API
    /// key (for the kubelet, the operator and Prometheus). 0 picks a free port.
    #[arg(long, env = "KUBEMAAS_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,

    /// ONNX Runtime shared library (libonnxruntime.so). Without it (or with an empty
    /// ORT_DYLIB_PATH), the project's cached copy (~/.cache/kubemaas/ort/<version>/) and the
    /// directory of this executable are tried.
    #[arg(long, env = "ORT_DYLIB_PATH", value_parser = path_or_unset)]
    pub ort_library: Option<PathBuf>,

    /// Execution provider: cpu, cuda (fail if CUDA does not register), or auto (CUDA when it
    /// really registers, else CPU). The provider in use is logged, shown in model metadata and
    /// exported as a metric label.
    #[arg(long, env = "KUBEMAAS_EXECUTION_PROVIDER", value_enum, default_value = "auto")]
    pub execution_provider: ExecutionProvider,

    /// Graph optimisation level.
    #[arg(long, env = "KUBEMAAS_GRAPH_OPTIMIZATION", value_enum, default_value = "all")]
    pub graph_optimization: OptLevel,

    /// Intra-op threads per session. 0 chooses: the usable cores (the cgroup CPU quota and
    /// affinity honoured) shared among the instances, so instances × threads never exceeds them.
    /// At most 1024.
    #[arg(long, env = "KUBEMAAS_INTRA_OP_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub intra_op_threads: u16,

    /// ONNX Runtime sessions per model: requests run in parallel up to this many. 0 chooses: on a
    /// CPU one per usable core, at most 4 (with one intra-op thread each on up to 4 cores); on
    /// CUDA 4 (each its own CUDA stream and its own copy of the weights in GPU memory).
    #[arg(long, env = "KUBEMAAS_INSTANCES", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub instances: u16,

    /// Cores to plan for when `--instances` or `--intra-op-threads` is 0. 0: the cores this
    /// process may use (its cgroup CPU quota and affinity), or, with no quota, the request in
    /// KUBEMAAS_CPU_REQUEST_MILLIS when set. The operator passes the pod's CPU limit, else its
    /// request, and when the spec gives neither sets that variable from the downward API (a
    /// LimitRange's default request comes without a limit, so without a quota to read).
    #[arg(long, env = "KUBEMAAS_CPUS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=4096))]
    pub cpus: u16,

    /// Threads that accept connections and read, route and answer requests (the async runtime's
    /// workers). 0 chooses one per 4 cores planned for (`--cpus`, else the usable cores), at least
    /// one: inference runs on the instances' own threads and large JSON bodies are parsed and
    /// written on a separate bounded pool, so these threads only move bytes, and each extra one
    /// competes with the instances for the same cores. On 2 cores one served PP-OCR cls 1.0–1.3×
    /// and a 10×10 dense model up to 1.36× what two did, and 1 MiB bodies as fast as two.
    #[arg(long, env = "KUBEMAAS_IO_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub io_threads: u16,

    /// CUDA device ordinals for the CUDA execution provider (`nvidia-smi` numbering, after
    /// CUDA_VISIBLE_DEVICES), comma-separated: instances are spread over them in turn, as
    /// Triton spreads an instance group, and with `--instances 0` each device gets four. With
    /// `auto`, the model runs on the CPU when CUDA cannot start on the first device; a device
    /// that does not exist fails the load (with `cuda`, whichever it is).
    #[arg(long, env = "KUBEMAAS_GPU_DEVICE", value_delimiter = ',', default_value = "0", value_parser = clap::value_parser!(i32).range(0..))]
    pub gpu_device: Vec<i32>,

    /// How cuDNN picks a convolution algorithm for each new input shape on CUDA. `exhaustive`
    /// (ONNX Runtime's default) times every algorithm on a shape's first run: the fastest for fixed
    /// shapes (on an H200, PP-OCR det 640² ran 162 req/s against 115 with `heuristic`), but each
    /// new shape stalls its first request (with batching, seconds). `heuristic` stalls less and
    /// suits inputs whose size varies (images of many sizes).
    #[arg(
        long,
        env = "KUBEMAAS_CUDA_CONV_ALGO_SEARCH",
        value_enum,
        default_value = "exhaustive"
    )]
    pub cuda_conv_algo_search: ConvAlgoSearch,

    /// Dynamic batching: the most rows one execution may hold; 0 turns batching off. Concurrent
    /// requests for a model whose inputs and outputs all have a dynamic first dimension are
    /// joined along it (a request may carry several rows); other models run unbatched (logged).
    #[arg(long, env = "KUBEMAAS_MAX_BATCH_SIZE", default_value_t = 0)]
    pub max_batch_size: usize,

    /// Dynamic batching: the longest the oldest queued request waits for others, in microseconds
    /// [default: 1000]. On the CPU with several instances a batch stops waiting sooner, once it
    /// holds its even share of the requests in flight (queued and able to join it, or running on
    /// the other instances). Needs --max-batch-size (a model's config.pbtxt sets its own).
    #[arg(long, env = "KUBEMAAS_MAX_QUEUE_DELAY_US", value_parser = clap::value_parser!(u64).range(0..=86_400_000_000))]
    pub max_queue_delay_us: Option<u64>,

    /// Dynamic batching: requests queued per model beyond this are refused at once with 503 and
    /// `Retry-After`.
    #[arg(long, env = "KUBEMAAS_MAX_QUEUE_SIZE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue_size: u32,

    /// Dynamic batching: batch sizes dispatched as soon as reached, without waiting out the queue
    /// delay (comma-separated or repeated), each from 1 to --max-batch-size.
    #[arg(long, env = "KUBEMAAS_PREFERRED_BATCH_SIZE", value_delimiter = ',')]
    pub preferred_batch_size: Vec<usize>,

    /// Dynamic batching: pad each batch with zero rows up to the next power of two (or preferred
    /// size, or the maximum) so the runtime sees few distinct shapes; the extra rows are dropped
    /// from the answers. `auto` pads on CUDA, where every new shape's first run stalls, and not
    /// on the CPU, where the extra rows would cost their full compute.
    #[arg(long, env = "KUBEMAAS_PAD_BATCHES", value_enum, default_value = "auto")]
    pub pad_batches: PadBatches,

    /// Largest request body accepted, in bytes: larger REST bodies get 413, larger gRPC messages
    /// RESOURCE_EXHAUSTED (as does a gRPC inference request whose entries would take over twice
    /// its size once decoded).
    #[arg(long, env = "KUBEMAAS_MAX_REQUEST_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = positive_bytes)]
    pub max_request_bytes: usize,

    /// API keys: one per line, `KEY`, `ID:KEY` or `ID:KEY:MODEL[,MODEL...]` (only those models).
    /// With it, every inference and metadata route of every protocol wants
    /// `Authorization: Bearer KEY` (gRPC: `authorization` metadata): 401 without a valid key, 403
    /// for a model the key may not call. Health and readiness stay open; the metrics port needs
    /// no key. The file is re-read when it changes (a rotated Secret); keys are never logged.
    #[arg(long, env = "KUBEMAAS_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Audit log: one structured line per request on the inference ports (log target
    /// `kubemaas_audit`: protocol, route, model, version, the caller's key ID, status, bytes in
    /// and out, latency), except health and readiness probes. The metrics port (scraped by
    /// Prometheus and the operator) is not audited. Keys are never written.
    #[arg(long, env = "KUBEMAAS_AUDIT_LOG")]
    pub audit_log: bool,

    /// Compress REST inference answers with gzip or deflate when the client accepts it
    /// (`Accept-Encoding`; tritonclient's `response_compression_algorithm`), as Triton does. Off by
    /// default: most HTTP libraries (Python's requests, Go's net/http) ask for gzip on every
    /// request, and on a cluster network compressing costs more time than it saves.
    #[arg(long, env = "KUBEMAAS_COMPRESS_RESPONSES")]
    pub compress_responses: bool,

    /// Triton's system shared memory extension: clients on this host (a sidecar in the pod, a
    /// benchmark) may register POSIX shared memory objects under /dev/shm as regions
    /// (`/v2/systemsharedmemory`, gRPC `SystemSharedMemoryRegister`) and pass inputs and receive
    /// outputs through them instead of the socket (`perf_analyzer --shared-memory system`,
    /// `tritonclient.utils.shared_memory`). Off by default, as in Triton (`--allow-client-shm`):
    /// a registered region lets clients make the server read and write that object.
    #[arg(long, env = "KUBEMAAS_ALLOW_CLIENT_SHM")]
    pub allow_client_shm: bool,

    /// Seconds a connection may take to send a complete request head: slow or silent clients, and
    /// HTTP/1 keep-alive connections idle that long, are closed, so they cannot hold connections
    /// (and file descriptors) forever. On every port it also bounds the first bytes and the TLS
    /// handshake. An HTTP/2 connection (gRPC's) may idle between requests, as gRPC clients keep
    /// theirs; `--max-connections` bounds those. At most 86400 (a day).
    #[arg(long, env = "KUBEMAAS_HEADER_READ_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub header_read_timeout: u64,

    /// Seconds a request body may take to arrive whole; slower bodies get 408 (gRPC
    /// DEADLINE_EXCEEDED), so a client trickling bytes cannot hold a request open. On gRPC this
    /// bounds a unary call's request, and each message of a stream from its first byte. At most
    /// 86400 (a day).
    #[arg(long, env = "KUBEMAAS_BODY_READ_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub body_read_timeout: u64,

    /// Open client connections per port; more are closed as soon as they are accepted.
    #[arg(long, env = "KUBEMAAS_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Inference requests in the server at once, all protocols together (each gRPC stream
    /// message counts); more get 503 with `Retry-After` (gRPC UNAVAILABLE) at once.
    #[arg(long, env = "KUBEMAAS_MAX_CONCURRENT_REQUESTS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// Bytes of request bodies the server holds at once, all requests together (default: 8 ×
    /// --max-request-bytes), counted as they arrive (on gRPC, a message still arriving and each
    /// message being served), plus 192 bytes per decoded BYTES element; a request that would
    /// exceed it gets 503 with `Retry-After` (gRPC UNAVAILABLE), so concurrent large requests
    /// cannot exhaust memory.
    #[arg(long, env = "KUBEMAAS_MAX_BUFFERED_REQUEST_BYTES")]
    pub max_buffered_request_bytes: Option<usize>,

    /// TLS certificate chain (PEM, leaf first) for the HTTP and gRPC ports; needs --tls-key. The
    /// metrics port stays plain HTTP for probes and scrapers. Reloaded when the file changes.
    #[arg(long, env = "KUBEMAAS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for --tls-cert. Reloaded when the file changes.
    #[arg(long, env = "KUBEMAAS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: a PEM CA bundle; clients must present a certificate it signed (needs
    /// --tls-cert). Reloaded when the file changes.
    #[arg(long, env = "KUBEMAAS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Seconds to let in-flight requests finish after SIGTERM before exiting.
    #[arg(long, env = "KUBEMAAS_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Seconds to keep accepting new requests after SIGTERM while readiness already reports
    /// false, so load balancers (Kubernetes endpoints) stop routing here before connections are
    /// refused. Draining (--shutdown-timeout) starts after it.
    #[arg(long, env = "KUBEMAAS_SHUTDOWN_DELAY", default_value_t = 0)]
    pub shutdown_delay: u64,

    /// Exit with code 4 when a model fails to load, writing the error to --termination-log (what
    /// a Kubernetes pod wants: the operator reports it as ModelLoaded=False, reason LoadFailed).
    /// Without it the server keeps serving the other models and reports the failed one not ready;
    /// server readiness then means every model still to be served is ready (at least one model
    /// serving, none still loading), so the others take traffic.
    #[arg(long, env = "KUBEMAAS_EXIT_ON_LOAD_FAILURE")]
    pub exit_on_load_failure: bool,

    /// Where --exit-on-load-failure writes the load error, and where a stop by a signal is noted
    /// as "while loading" or "after its models had loaded" (only into a file that exists, as the
    /// kubelet makes it: the operator tells a startup-probe kill from a liveness-probe restart).
    #[arg(
        long,
        env = "KUBEMAAS_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
}

/// When batches are padded to a few sizes (`--pad-batches`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PadBatches {
    /// On CUDA only.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad repository or flags.
    #[error(transparent)]
    Repository(#[from] repository::RepositoryError),
    /// The runtime library is missing.
    #[error(
        "failed to load the ONNX Runtime library (tried {tried}): {last}.\n\
         Get it with `make setup` (or scripts/setup.sh), which unpacks libonnxruntime.so from the \
         onnxruntime=={version} wheel on PyPI into ~/.cache/kubemaas/ort/{version}/, or pass \
         --ort-library /path/to/libonnxruntime.so (env ORT_DYLIB_PATH)"
    )]
    Library {
        /// Paths tried.
        tried: String,
        /// Version expected.
        version: &'static str,
        /// Last loader error.
        last: String,
    },
    /// A port could not be bound.
    #[error(transparent)]
    Transport(#[from] http::TransportError),
    /// The API keys file is unreadable or malformed.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The TLS files are unreadable or invalid.
    #[error(transparent)]
    Tls(#[from] crate::listener::TlsError),
}

/// A number of bytes above 0 (a limit of 0 would refuse every request).
fn positive_bytes(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a number of bytes above 0")),
    }
}

impl ServeArgs {
    /// What clap cannot check flag by flag, before anything starts: the body budget holds a
    /// request of the largest size, every GPU is listed once, and preferred batch sizes are sizes
    /// the batcher can form (a size of 0, or above `--max-batch-size`, would be accepted and
    /// never used).
    pub fn check(&self) -> Result<(), String> {
        if let Some(budget) = self.max_buffered_request_bytes
            && budget < self.max_request_bytes
        {
            return Err(format!(
                "--max-buffered-request-bytes ({budget}) is below --max-request-bytes ({}): \
                 a request of the largest size allowed could never be admitted; raise it",
                self.max_request_bytes
            ));
        }
        // A device listed twice would silently get twice the instances.
        for (i, d) in self.gpu_device.iter().enumerate() {
            if self.gpu_device[..i].contains(d) {
                return Err(format!("--gpu-device {d} is listed twice"));
            }
        }
        let max = self.max_batch_size;
        let unused = if !self.preferred_batch_size.is_empty() {
            Some("--preferred-batch-size")
        } else {
            self.max_queue_delay_us.map(|_| "--max-queue-delay-us")
        };
        if let (0, Some(flag)) = (max, unused) {
            return Err(format!(
                "{flag} needs batching on: give --max-batch-size above 0 \
                 (a model's config.pbtxt sets its own)"
            ));
        }
        match self.preferred_batch_size.iter().find(|&&p| p == 0 || p > max) {
            Some(p) => Err(format!(
                "--preferred-batch-size {p} is not a batch size from 1 to --max-batch-size ({max})"
            )),
            None => Ok(()),
        }
    }
}

/// `--max-queue-delay-us` when not given, in microseconds.
pub const DEFAULT_MAX_QUEUE_DELAY_US: u64 = 1000;

/// A path, where an empty value (`ORT_DYLIB_PATH=""`, as shells leave behind) means "not given"
/// rather than an error about a flag the user never passed.
pub fn path_or_unset(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// Why a library file cannot be loaded, as far as can be told without loading it: the loader's own
/// message (`dlopen failed`) does not say.
fn why_unloadable(path: &std::path::Path) -> &'static str {
    use std::io::Read;
    let mut head = Vec::with_capacity(20);
    let read = std::fs::File::open(path).and_then(|f| f.take(20).read_to_end(&mut head));
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "the file does not exist",
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => "the file is not readable",
        Err(_) if path.is_dir() => "it is a directory, not a file",
        Err(_) => "the file cannot be read",
        Ok(_) if !head.starts_with(b"\x7fELF") => "the file is not a shared library (no ELF header)",
        Ok(_) if head.len() < 20 => "the file is too short to be a shared library",
        // e_machine, little-endian: 62 is x86-64, 183 is AArch64.
        Ok(_)
            if u16::from_le_bytes([head[18], head[19]])
                != if cfg!(target_arch = "aarch64") { 183 } else { 62 } =>
        {
            "the library is built for another CPU architecture"
        }
        Ok(_) => {
            "the library or one of the libraries it needs could not be loaded (`ldd` on it lists \
             any that are missing)"
        }
    }
}

/// Loads ONNX Runtime from `explicit`, else from the usual places, and says why not in words.
pub fn init_library(explicit: Option<&PathBuf>) -> Result<ort::environment::Environment, ServeError> {
    let explicit = explicit.filter(|p| !p.as_os_str().is_empty());
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.clone()],
        None => ortb::default_library_candidates()
            .into_iter()
            .filter(|p| p.exists())
            .collect(),
    };
    let mut last = String::from("no candidate file exists");
    for path in &candidates {
        match ortb::init_runtime(path) {
            Ok(env) => {
                tracing::info!(library = %path.display(), "ONNX Runtime loaded");
                return Ok(env);
            }
            // The loader says only "dlopen failed"; say why instead.
            Err(crate::backend::BackendError::Library(m)) if m.contains("dlopen failed") => {
                last = format!("{}: {}", path.display(), why_unloadable(path))
            }
            Err(e) => last = e.to_string(),
        }
    }
    let tried = match explicit {
        Some(p) => p.display().to_string(),
        None => ortb::default_library_candidates()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    Err(ServeError::Library {
        tried,
        version: ortb::ORT_VERSION,
        last,
    })
}

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every model had finished loading (or failing to).
    Clean,
    /// A model was still loading: its thread cannot be interrupted, so the caller should end the
    /// process without waiting for it.
    WhileLoading,
}

/// Turns dynamic batching on for a loaded model that can be batched (else says why not): pads
/// batches when `pad_batches` says so and then, before the model is ready, runs every padded size
/// once on every instance, so the first requests do not pay for those shapes' first runs.
fn start_batching(
    m: &Arc<repository::LoadedModel>,
    source: &repository::ModelSource,
    config: &crate::batcher::BatchConfig,
    pad_batches: PadBatches,
    stats: Arc<crate::metrics::ModelStats>,
) {
    let (name, version) = (&source.name, source.version);
    if let Err(why) = crate::batcher::batchable(m.backend.signature()) {
        tracing::warn!(model = %name, version, reason = %why, "dynamic batching off for this model");
        return;
    }
    let mut config = config.clone();
    let pad = match pad_batches {
        PadBatches::Always => true,
        PadBatches::Never => false,
        PadBatches::Auto => m.backend.execution_provider() == ortb::CUDA_EP,
    };
    // Requests that are never joined run as their clients sent them, unpadded, as in Triton.
    if pad && config.combine {
        config.pad_to = crate::batcher::padding_sizes(config.max_batch_size, &config.preferred_batch_sizes);
    }
    if config.combine {
        tracing::info!(model = %name, version, max_batch_size = config.max_batch_size, padded_to = ?config.pad_to, "dynamic batching on");
    } else {
        tracing::info!(model = %name, version, max_batch_size = config.max_batch_size, "batches as clients send them, never joined (no dynamic_batching)");
    }
    if !config.pad_to.is_empty() {
        let started = std::time::Instant::now();
        match crate::batcher::warm_padded_sizes(m.backend.as_ref(), &config.pad_to) {
            Ok(()) => {
                tracing::info!(model = %name, version, sizes = ?config.pad_to, instances = m.backend.instances(), ms = started.elapsed().as_millis() as u64, "padded batch sizes warmed")
            }
            Err(why) => {
                tracing::warn!(model = %name, version, reason = %why, "padded batch sizes not warmed")
            }
        }
    }
    let _ = m
        .batcher
        .set(crate::batcher::Batcher::start(Arc::downgrade(m), config, stats));
}

/// Marks `source` failed with `e`, or with `--exit-on-load-failure` ends the process with
/// [`kubemaas_crds::artifact::exit::LOAD_FAILED`] after writing `e` to the termination log.
fn load_failed(
    repo: &Repository,
    source: &ModelSource,
    e: String,
    exit_on_load_failure: bool,
    termination_log: &std::path::Path,
) {
    tracing::error!(model = %source.name, version = source.version, error = %e, "model failed to load");
    if exit_on_load_failure {
        let message = format!("model {} version {}: {e}", source.name, source.version);
        // Best effort: the file only exists inside Kubernetes.
        let _ = std::fs::write(termination_log, &message);
        std::process::exit(i32::from(kubemaas_crds::artifact::exit::LOAD_FAILED));
    }
    repo.set_state(&source.name, source.version, ModelState::Failed(e));
}

/// The session options for one model: the server's, with its config.pbtxt's instance group
/// (count, and `KIND_CPU` on the CPU or `KIND_GPU` on CUDA on the listed devices) applied.
fn model_options(opts: &OrtOptions, settings: Option<&crate::model_config::ModelSettings>) -> OrtOptions {
    use crate::model_config::InstanceKind;
    let mut o = opts.clone();
    if let Some(group) = settings.and_then(|s| s.instances.as_ref()) {
        o.instances = group.count;
        match group.kind {
            InstanceKind::Auto => {}
            InstanceKind::Cpu => o.execution_provider = ExecutionProvider::Cpu,
            InstanceKind::Gpu => {
                o.execution_provider = ExecutionProvider::Cuda;
                if !group.gpus.is_empty() {
                    o.gpu_devices = group.gpus.clone();
                }
            }
        }
    }
    o
}

/// The async runtime's worker threads for `serve`: `--io-threads`, else one per 4 planned cores,
/// at least one.
pub fn io_threads(io_threads: u16, cpus: u16) -> usize {
    match io_threads {
        0 => (crate::backend::ort::planned_cpus(usize::from(cpus)) / 4).max(1),
        n => usize::from(n),
    }
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub async fn run(args: ServeArgs) -> Result<Stopped, ServeError> {
    crate::metrics::uptime();
    // Every client connection is a file descriptor; the usual soft limit (1024) is far below what
    // the hard limit allows a server.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(open_files = n, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
    // Destructured so that no flag can be silently ignored.
    let ServeArgs {
        model_repository,
        models,
        host,
        http_port,
        grpc_port,
        metrics_port,
        ort_library,
        execution_provider,
        graph_optimization,
        intra_op_threads,
        instances,
        cpus,
        // Read by `main`, which builds the runtime before this runs.
        io_threads: _,
        gpu_device,
        cuda_conv_algo_search,
        max_request_bytes,
        api_keys_file,
        audit_log,
        compress_responses,
        allow_client_shm,
        header_read_timeout,
        body_read_timeout,
        max_connections,
        max_concurrent_requests,
        max_buffered_request_bytes,
        tls_cert,
        tls_key,
        tls_client_ca,
        max_batch_size,
        max_queue_delay_us,
        max_queue_size,
        preferred_batch_size,
        pad_batches,
        shutdown_timeout,
        shutdown_delay,
        exit_on_load_failure,
        termination_log,
    } = args;
    let batching = (max_batch_size > 0).then(|| crate::batcher::BatchConfig {
        max_batch_size,
        max_queue_delay: Duration::from_micros(max_queue_delay_us.unwrap_or(DEFAULT_MAX_QUEUE_DELAY_US)),
        max_queue_size: max_queue_size as usize,
        pad_to: Vec::new(),
        preferred_batch_sizes: preferred_batch_size,
        combine: true,
    });

    let mut sources: Vec<ModelSource> = match &model_repository {
        Some(dir) => repository::scan(dir)?,
        None => Vec::new(),
    };
    for m in &models {
        sources.push(repository::parse_model_flag(m)?);
    }
    let sources = repository::merge_sources(sources)?;
    let env = init_library(ort_library.as_ref())?;

    let api_keys = match &api_keys_file {
        Some(path) => {
            let keys = Arc::new(crate::auth::ApiKeys::load(path)?);
            keys.clone().watch(Duration::from_secs(1));
            Some(keys)
        }
        None => None,
    };
    let body_budget = max_buffered_request_bytes.unwrap_or(max_request_bytes.saturating_mul(8));
    let admission = Arc::new(crate::admission::Admission::new(crate::admission::Limits {
        connections: max_connections as usize,
        requests: max_concurrent_requests as usize,
        body_bytes: body_budget,
    }));
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => {
            let tls = Arc::new(crate::listener::Tls::load(crate::listener::TlsFiles {
                cert,
                key,
                client_ca: tls_client_ca,
            })?);
            tls.clone().watch(Duration::from_secs(1));
            Some(tls)
        }
        _ => None,
    };
    let repo = Arc::new(Repository::new(&sources));
    let state = Arc::new(AppState {
        repo: repo.clone(),
        max_request_bytes,
        api_keys,
        audit: audit_log,
        compress_responses,
        shm: Arc::new(crate::shm::SharedMemory::new(allow_client_shm, max_request_bytes)),
        header_read_timeout: Duration::from_secs(header_read_timeout),
        body_read_timeout: Duration::from_secs(body_read_timeout),
        admission: admission.clone(),
        offload: crate::offload::Offload::new(
            crate::backend::ort::planned_cpus(usize::from(cpus)),
            crate::offload::OFFLOAD_BYTES,
        ),
    });
    let http_listener = http::bind(SocketAddr::new(host, http_port))?;
    let grpc_listener = http::bind(SocketAddr::new(host, grpc_port))?;
    let metrics_listener = http::bind(SocketAddr::new(host, metrics_port))?;
    let http_addr = http_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let metrics_addr = metrics_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let grpc_addr = grpc_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(http = %http_addr, grpc = %grpc_addr, metrics = %metrics_addr, models = sources.len(), io_threads = tokio::runtime::Handle::current().metrics().num_workers(), "listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let grace = Duration::from_secs(shutdown_timeout);
    let accept = |listener, tls: Option<Arc<crate::listener::Tls>>| {
        let opts = crate::listener::AcceptOptions {
            admission: admission.clone(),
            first_byte_timeout: Duration::from_secs(header_read_timeout),
            tls,
        };
        crate::listener::accept(listener, opts, stop_rx.clone())
    };
    let (http_conns, grpc_conns) = (accept(http_listener, tls.clone()), accept(grpc_listener, tls));
    let metrics_conns = accept(metrics_listener, None);
    let servers = [
        tokio::spawn(http::serve(
            http_conns,
            state.clone(),
            Surface::Full,
            stop_rx.clone(),
            grace,
        )),
        tokio::spawn(crate::grpc::serve(
            grpc_conns,
            state.clone(),
            stop_rx.clone(),
            grace,
        )),
        tokio::spawn(http::serve(
            metrics_conns,
            state.clone(),
            Surface::MetricsOnly,
            stop_rx,
            grace,
        )),
    ];

    // Load in the background so liveness answers while large models load.
    let opts = OrtOptions {
        execution_provider,
        optimization: graph_optimization,
        intra_threads: usize::from(intra_op_threads),
        instances: usize::from(instances),
        cpus: usize::from(cpus),
        gpu_devices: gpu_device,
        conv_algo_search: cuda_conv_algo_search,
    };
    let loader_repo = repo.clone();
    let stop_note = termination_log.clone();
    let began = std::time::Instant::now();
    let loader = tokio::task::spawn_blocking(move || {
        for source in &sources {
            let settings = match &source.config {
                ConfigFile::Absent => None,
                ConfigFile::Valid(s) => Some(s.clone()),
                ConfigFile::Invalid(e) => {
                    load_failed(
                        &loader_repo,
                        source,
                        e.clone(),
                        exit_on_load_failure,
                        &termination_log,
                    );
                    continue;
                }
            };
            let model_opts = model_options(&opts, settings.as_deref());
            let loaded = repository::load_and_warm(source, |path| {
                OrtModel::load(&env, path, &model_opts)
                    .map(|m| Box::new(m) as Box<dyn crate::backend::Backend>)
            })
            .and_then(|m| match &settings {
                Some(s) => s.check(m.backend.signature()).map(|()| m),
                None => Ok(m),
            });
            // A model's config.pbtxt decides its batching; without one the flags do.
            let config = match &settings {
                Some(s) => s.batching.as_ref().map(|b| b.config(max_queue_size as usize)),
                None => batching.clone(),
            };
            match loaded {
                Ok(m) => {
                    let m = Arc::new(m);
                    if let Some(config) = &config
                        && let Ok((_, entry)) =
                            loader_repo.entry(&source.name, Some(&source.version.to_string()))
                    {
                        start_batching(&m, source, config, pad_batches, entry.stats);
                    }
                    loader_repo.set_state(&source.name, source.version, ModelState::Ready(m))
                }
                Err(e) => load_failed(&loader_repo, source, e, exit_on_load_failure, &termination_log),
            }
        }
        if loader_repo.all_ready() {
            tracing::info!("ready: every model to be served is loaded");
        }
    });

    wait_for_signal().await;
    note_stop(&stop_note, !loader.is_finished(), began.elapsed());
    tracing::info!(
        delay_s = shutdown_delay,
        timeout_s = shutdown_timeout,
        "shutdown requested: readiness is now false"
    );
    repo.begin_shutdown();
    tokio::time::sleep(Duration::from_secs(shutdown_delay)).await;
    tracing::info!("no longer accepting connections; draining in-flight requests");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    let loading = !loader.is_finished();
    loader.abort();
    if loading {
        tracing::info!("stopped while a model is still loading; exiting without waiting for it");
        return Ok(Stopped::WhileLoading);
    }
    tracing::info!("stopped");
    Ok(Stopped::Clean)
}

/// Says in the termination log, where the kubelet keeps it beside the exit code, whether a signal
/// stopped the server while it loaded (a startup-probe kill) or after (a liveness-probe restart):
/// both exit the same way. Only an existing file is written: the kubelet makes it, and outside
/// Kubernetes nothing is created.
fn note_stop(path: &std::path::Path, loading: bool, ran: Duration) {
    use kubemaas_crds::artifact::{STOPPED_AFTER_LOADING, STOPPED_WHILE_LOADING};
    let said = if loading {
        STOPPED_WHILE_LOADING
    } else {
        STOPPED_AFTER_LOADING
    };
    let message = format!("{said} ({} s after it started)", ran.as_secs());
    let written = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, message.as_bytes()));
    if let Err(e) = written {
        tracing::debug!(path = %path.display(), error = %e, "no termination log written");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
