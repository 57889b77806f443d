//! ONNX Runtime backend: sessions, execution-provider selection, conversion to and from ORT values.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Instant;

use bytes::Bytes;
use half::{bf16, f16};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

use super::{Backend, BackendError, Outcome, PhaseTimes, Signature, TensorSpec, Work};
use crate::tensor::{DataType, Tensor, TensorData};

/// Name ORT gives the CPU execution provider.
pub const CPU_EP: &str = "CPUExecutionProvider";
/// Name ORT gives the CUDA execution provider.
pub const CUDA_EP: &str = "CUDAExecutionProvider";

/// Which execution provider to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutionProvider {
    /// CPU only.
    Cpu,
    /// CUDA, or fail to load.
    Cuda,
    /// CUDA when it really registers, else CPU.
    Auto,
}

/// Graph optimisation level (ONNX Runtime's `GraphOptimizationLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptLevel {
    /// No graph optimisation.
    Disable,
    /// Basic: constant folding, redundant node elimination.
    Basic,
    /// Extended: complex node fusions.
    Extended,
    /// Layout optimisations too.
    All,
}

/// How sessions are built.
#[derive(Debug, Clone)]
pub struct OrtOptions {
    /// Execution provider requested.
    pub execution_provider: ExecutionProvider,
    /// Graph optimisation level.
    pub optimization: OptLevel,
    /// Intra-op threads per session; 0 chooses from the usable cores (see [`plan_threads`]).
    pub intra_threads: usize,
    /// Sessions per model, so requests run in parallel without one lock; 0 chooses (see
    /// [`plan_threads`]).
    pub instances: usize,
    /// Cores to plan for when choosing; 0: the cores this process may use ([`usable_cpus`]).
    pub cpus: usize,
    /// CUDA device ordinals the CUDA execution provider runs on: instance k on device
    /// `gpu_devices[k % len]`, as Triton spreads an instance group over its GPUs. Empty: device 0.
    pub gpu_devices: Vec<i32>,
    /// How cuDNN picks convolution algorithms on CUDA.
    pub conv_algo_search: ConvAlgoSearch,
}

/// How cuDNN chooses a convolution algorithm for each new input shape (the CUDA execution
/// provider's `cudnn_conv_algo_search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvAlgoSearch {
    /// Try every algorithm on the first run of each shape: best for fixed shapes, but each new shape
    /// (every batch size the batcher forms, every image size) stalls its request, seconds on a
    /// large network.
    Exhaustive,
    /// cuDNN's heuristics, no trial runs: shorter stalls on new shapes (on an H200, batched PP-OCR
    /// cls still lost most of its first seconds to them), slower kernels on fixed shapes.
    Heuristic,
    /// cuDNN's default algorithm.
    Default,
}

/// Sessions per model and intra-op threads per session, as resolved for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPlan {
    /// ONNX Runtime sessions (instances) for the model.
    pub instances: usize,
    /// Intra-op threads of each session.
    pub intra_threads: usize,
}

/// Most instances chosen automatically on a CPU: beyond this, more sessions mostly cost memory
/// (each holds its own copy of the weights) and a batch of a few rows beats another instance.
const AUTO_CPU_INSTANCES: usize = 4;
/// Instances chosen automatically on CUDA; each session has its own CUDA stream, so small models
/// overlap their copies and kernels. On an H200 (2026-11-29), PP-OCR cls at 16 clients served
/// 1,552 images/s with 4 instances against 555 with 1, and det 640² 469 against 168 requests/s.
const AUTO_CUDA_INSTANCES: usize = 4;

/// The CUDA device of instance `k`: the devices taken in turn, so each gets an even share.
pub fn device_of(k: usize, devices: &[i32]) -> i32 {
    if devices.is_empty() {
        0
    } else {
        devices[k % devices.len()]
    }
}

/// Resolves `--instances` and `--intra-op-threads` (0 = choose) for `cpus` usable cores, on the
/// CPU (`gpus` 0) or on `gpus` CUDA devices (`AUTO_CUDA_INSTANCES` each).
///
/// Many small sessions with one thread each serve concurrent requests best on a CPU: ONNX
/// Runtime's intra-op parallelism on small tensors mostly spins, and every session whose pool
/// spans all cores competes with the others. So, unless told: as many instances as cores (at most
/// `AUTO_CPU_INSTANCES`) and the cores shared among them, so instances × threads never exceeds
/// the cores this process may use (its cgroup CPU quota and affinity, which
/// [`std::thread::available_parallelism`] reads).
pub fn plan_threads(instances: usize, intra_threads: usize, cpus: usize, gpus: usize) -> ThreadPlan {
    let cpus = cpus.max(1);
    let instances = match (instances, intra_threads) {
        (0, _) if gpus > 0 => AUTO_CUDA_INSTANCES * gpus,
        (0, 0) => cpus.min(AUTO_CPU_INSTANCES),
        (0, t) => (cpus / t).clamp(1, AUTO_CPU_INSTANCES),
        (n, _) => n,
    };
    let intra_threads = match intra_threads {
        0 => (cpus / instances).max(1),
        t => t,
    };
    ThreadPlan {
        instances,
        intra_threads,
    }
}

/// Cores this process may use: the cgroup CPU quota and the affinity mask are honoured.
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The cores to plan threads for: `cpus` when given (`--cpus`), else [`usable_cpus`], unless the
/// process has no CPU quota and the pod has a request (`KUBEMAAS_CPU_REQUEST_MILLIS`, which the
/// operator fills from the downward API): a LimitRange's default request comes without a limit,
/// and then the usable cores are the node's, not the pod's.
pub fn planned_cpus(cpus: usize) -> usize {
    if cpus > 0 {
        return cpus;
    }
    let request = std::env::var("KUBEMAAS_CPU_REQUEST_MILLIS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    plan_for_pod(usable_cpus(), cpu_quota_set(), request)
}

/// Whether the cgroup limits this process's CPU time: Some(false) when it says there is no quota
/// (cgroup v2 `cpu.max` "max ...", v1 `cpu.cfs_quota_us` -1), None when it cannot be read.
fn cpu_quota_set() -> Option<bool> {
    if let Ok(v2) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        return Some(!v2.trim_start().starts_with("max"));
    }
    let v1 = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        .or_else(|_| std::fs::read_to_string("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us"))
        .ok()?;
    Some(v1.trim() != "-1")
}

/// [`planned_cpus`] from the usable cores, whether a quota is set, and the pod's CPU request in
/// millicores.
fn plan_for_pod(usable: usize, quota_set: Option<bool>, request: Option<u64>) -> usize {
    match (quota_set, request) {
        (Some(false), Some(r)) if r > 0 => usize::try_from(r.div_ceil(1000))
            .unwrap_or(usize::MAX)
            .clamp(1, usable.max(1)),
        _ => usable,
    }
}

/// Loads the ONNX Runtime shared library and creates the process-wide environment.
pub fn init_runtime(library: &Path) -> Result<Environment, BackendError> {
    let builder =
        ort::init_from(library).map_err(|e| BackendError::Library(format!("{}: {e}", library.display())))?;
    builder
        .with_name("kubemaas")
        .build()
        .map_err(|e| BackendError::Library(e.to_string()))
}

/// A model served by `instances` ONNX Runtime sessions, each owned by its own worker thread: a
/// session keeps its thread (and that thread's caches) for its whole life, and no session is
/// passed between threads or locked per run. Dropping the model ends the threads once they finish
/// what they run.
pub struct OrtModel {
    signature: Signature,
    provider: &'static str,
    fallback: Option<String>,
    /// The CUDA device of each instance; empty on the CPU.
    devices: Vec<i32>,
    queues: Vec<mpsc::Sender<Work>>,
    idle: Arc<Idle>,
}

/// The instances not running anything.
struct Idle {
    state: Mutex<IdleState>,
    freed: Condvar,
}

struct IdleState {
    free: Vec<usize>,
    /// Work queued while every instance was busy ([`Backend::enqueue`]), oldest first: an
    /// instance whose run ends takes the next one itself.
    pending: VecDeque<Work>,
    /// Threads blocked in `take`: only they need a wake-up (a syscall), and they are rare (warm-up,
    /// blocking callers): an async caller holds a permit and always finds an instance free.
    waiting: usize,
}

impl Idle {
    /// Instance `k` has ended a run: it takes the oldest queued work, if any, else it is free.
    fn finish(&self, k: usize) -> Option<Work> {
        let mut state = self.state.lock().ok()?;
        if let Some(next) = state.pending.pop_front() {
            return Some(next);
        }
        state.free.push(k);
        if state.waiting > 0 {
            self.freed.notify_all();
        }
        None
    }
}

/// An instance's thread: runs what it is handed, one at a time, until the model is dropped.
fn worker(
    k: usize,
    mut session: Session,
    all_outputs: Vec<String>,
    jobs: mpsc::Receiver<Work>,
    idle: Arc<Idle>,
) {
    let mut next = None;
    loop {
        let work = match next.take() {
            Some(work) => work,
            None => match jobs.recv() {
                Ok(work) => work,
                Err(_) => return,
            },
        };
        let Work {
            inputs,
            outputs,
            reply,
            on_run,
            permit,
            claim,
        } = work;
        // A caller that left, or withdrew its queued work, before the run starts costs nothing.
        let inputs = match (&claim, reply.abandoned()) {
            (_, true) => None,
            (Some(claim), false) => claim.start(),
            (None, false) => Some(inputs),
        };
        let outcome = inputs.map(|inputs| {
            // A panic inside ONNX Runtime's bindings fails this request, not the instance.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&mut session, &all_outputs, inputs, &outputs)
            }))
            .unwrap_or_else(|_| Err(BackendError::Runtime("the ONNX Runtime run panicked".into())))
        });
        // Queued work is taken before the reply goes out, so the instance never waits for a
        // caller to hand it over. Free before the permit goes: whoever takes the permit next
        // must find a free instance.
        next = idle.finish(k);
        drop(permit);
        if let Some(outcome) = outcome {
            if let (Ok((_, phases)), Some(on_run)) = (&outcome, on_run) {
                on_run(phases);
            }
            reply.send(outcome);
        }
    }
}

fn build_session(
    env: &Environment,
    path: &Path,
    opts: &OrtOptions,
    intra_threads: usize,
    cuda_device: Option<i32>,
) -> Result<Session, String> {
    // SessionBuilder errors carry the builder and are not Send: turn them into strings right here.
    let level = match opts.optimization {
        OptLevel::Disable => GraphOptimizationLevel::Disable,
        OptLevel::Basic => GraphOptimizationLevel::Level1,
        OptLevel::Extended => GraphOptimizationLevel::Level2,
        OptLevel::All => GraphOptimizationLevel::All,
    };
    let mut b = Session::builder(env)
        .map_err(|e| e.to_string())?
        .with_optimization_level(level)
        .map_err(|e| e.to_string())?;
    b = b.with_intra_threads(intra_threads).map_err(|e| e.to_string())?;
    if let Some(device) = cuda_device {
        // Without error_on_failure ORT silently falls back to CPU and we would report a lie.
        let search = match opts.conv_algo_search {
            ConvAlgoSearch::Exhaustive => ort::ep::cuda::ConvAlgorithmSearch::Exhaustive,
            ConvAlgoSearch::Heuristic => ort::ep::cuda::ConvAlgorithmSearch::Heuristic,
            ConvAlgoSearch::Default => ort::ep::cuda::ConvAlgorithmSearch::Default,
        };
        let ep = ort::ep::CUDA::default()
            .with_device_id(device)
            .with_conv_algorithm_search(search);
        b = b
            .with_execution_providers([ep.build().error_on_failure()])
            .map_err(|e| e.to_string())?;
    }
    b.commit_from_file(path).map_err(|e| e.to_string())
}

fn map_element_type(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::U8,
        TensorElementType::Uint16 => DataType::U16,
        TensorElementType::Uint32 => DataType::U32,
        TensorElementType::Uint64 => DataType::U64,
        TensorElementType::Int8 => DataType::I8,
        TensorElementType::Int16 => DataType::I16,
        TensorElementType::Int32 => DataType::I32,
        TensorElementType::Int64 => DataType::I64,
        TensorElementType::Float16 => DataType::F16,
        TensorElementType::Bfloat16 => DataType::BF16,
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float64 => DataType::F64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

/// The names of a tensor's dimensions (empty where the model gives none).
fn dim_names(ty: &ValueType) -> Vec<&str> {
    match ty {
        ValueType::Tensor {
            dimension_symbols, ..
        } => dimension_symbols.iter().map(String::as_str).collect(),
        _ => Vec::new(),
    }
}

/// See [`Signature::leading_dim_conflict`]: an output whose first dimension carries the name of
/// a later dimension of some input, and not the name of any input's first dimension.
fn leading_dim_conflict(inputs: &[(&str, &ValueType)], outputs: &[(&str, &ValueType)]) -> Option<String> {
    let inputs: Vec<(&str, Vec<&str>)> = inputs.iter().map(|(n, t)| (*n, dim_names(t))).collect();
    let leading = |name: &str| inputs.iter().any(|(_, d)| d.first() == Some(&name));
    outputs.iter().find_map(|(out, ty)| {
        let names = dim_names(ty);
        let first = names.first().copied().filter(|n| !n.is_empty() && !leading(n))?;
        let (input, k) = inputs
            .iter()
            .find_map(|(i, d)| d.iter().skip(1).position(|n| *n == first).map(|k| (i, k + 1)))?;
        Some(format!(
            "output {out:?} begins with dimension {first:?}, which is dimension {k} of input {input:?}, not its batch dimension"
        ))
    })
}

fn spec_of(name: &str, ty: &ValueType, what: &str) -> Result<TensorSpec, String> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            let datatype = map_element_type(*ty).ok_or_else(|| {
                format!("{what} {name:?} has element type {ty}, which KubeMaaS cannot serve")
            })?;
            Ok(TensorSpec {
                name: name.to_string(),
                datatype,
                shape: shape.iter().copied().collect(),
            })
        }
        other => Err(format!(
            "{what} {name:?} is a {other:?}, not a tensor; only tensor inputs and outputs are served"
        )),
    }
}

impl OrtModel {
    /// Loads `path` into `opts.instances` sessions.
    pub fn load(env: &Environment, path: &Path, opts: &OrtOptions) -> Result<OrtModel, BackendError> {
        let load_err = |message: String| BackendError::Load {
            path: path.display().to_string(),
            message,
        };
        let cpus = planned_cpus(opts.cpus);
        let cpu_plan = plan_threads(opts.instances, opts.intra_threads, cpus, 0);
        let cuda_plan = plan_threads(
            opts.instances,
            opts.intra_threads,
            cpus,
            opts.gpu_devices.len().max(1),
        );
        let first_device = device_of(0, &opts.gpu_devices);
        let mut fallback = None;
        let (first, provider) = match opts.execution_provider {
            ExecutionProvider::Cpu => (
                build_session(env, path, opts, cpu_plan.intra_threads, None).map_err(load_err)?,
                CPU_EP,
            ),
            ExecutionProvider::Cuda => (
                build_session(env, path, opts, cuda_plan.intra_threads, Some(first_device)).map_err(|e| {
                    load_err(format!(
                        "CUDA execution provider requested on device {first_device} but unavailable: {e}"
                    ))
                })?,
                CUDA_EP,
            ),
            ExecutionProvider::Auto => {
                match build_session(env, path, opts, cuda_plan.intra_threads, Some(first_device)) {
                    Ok(s) => (s, CUDA_EP),
                    Err(e) => {
                        tracing::info!(model = %path.display(), reason = %e, "CUDA unavailable, using CPU");
                        fallback = Some(e);
                        (
                            build_session(env, path, opts, cpu_plan.intra_threads, None).map_err(load_err)?,
                            CPU_EP,
                        )
                    }
                }
            }
        };
        let cuda = provider == CUDA_EP;
        let plan = if cuda { cuda_plan } else { cpu_plan };
        let instances = plan.instances.max(1);
        tracing::info!(
            model = %path.display(),
            instances,
            intra_op_threads = plan.intra_threads,
            usable_cpus = cpus,
            chosen = opts.instances == 0 || opts.intra_threads == 0,
            "sessions"
        );
        let inputs = first
            .inputs()
            .iter()
            .map(|o| spec_of(o.name(), o.dtype(), "input"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(load_err)?;
        let outputs = first
            .outputs()
            .iter()
            .map(|o| spec_of(o.name(), o.dtype(), "output"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(load_err)?;
        let leading_dim_conflict = leading_dim_conflict(
            &first
                .inputs()
                .iter()
                .map(|o| (o.name(), o.dtype()))
                .collect::<Vec<_>>(),
            &first
                .outputs()
                .iter()
                .map(|o| (o.name(), o.dtype()))
                .collect::<Vec<_>>(),
        );
        let mut sessions = vec![first];
        for k in 1..instances {
            let device = device_of(k, &opts.gpu_devices);
            sessions.push(
                build_session(env, path, opts, plan.intra_threads, cuda.then_some(device))
                    .map_err(|e| load_err(format!("instance {k} on device {device}: {e}")))?,
            );
        }
        let all_outputs: Vec<String> = outputs.iter().map(|o| o.name.clone()).collect();
        let idle = Arc::new(Idle {
            state: Mutex::new(IdleState {
                free: (0..instances).rev().collect(),
                pending: VecDeque::new(),
                waiting: 0,
            }),
            freed: Condvar::new(),
        });
        let mut queues = Vec::with_capacity(instances);
        for (k, session) in sessions.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let (all_outputs, idle) = (all_outputs.clone(), idle.clone());
            std::thread::Builder::new()
                .name(format!("instance-{k}"))
                .spawn(move || worker(k, session, all_outputs, rx, idle))
                .map_err(|e| load_err(format!("cannot start the thread of instance {k}: {e}")))?;
            queues.push(tx);
        }
        Ok(OrtModel {
            signature: Signature {
                inputs,
                outputs,
                leading_dim_conflict,
            },
            provider,
            fallback,
            devices: if cuda {
                (0..instances).map(|k| device_of(k, &opts.gpu_devices)).collect()
            } else {
                Vec::new()
            },
            queues,
            idle,
        })
    }

    /// Takes instance `which` (any when None) out of the free list, waiting until it is free.
    fn take(&self, which: Option<usize>) -> Result<usize, BackendError> {
        if which.is_some_and(|k| k >= self.queues.len()) {
            return Err(BackendError::Runtime(format!("no instance {which:?}")));
        }
        let poisoned = |_| BackendError::Runtime("instance list lock poisoned".into());
        let mut state = self.idle.state.lock().map_err(poisoned)?;
        loop {
            let at = match which {
                None => state.free.len().checked_sub(1),
                Some(k) => state.free.iter().position(|&i| i == k),
            };
            if let Some(at) = at {
                return Ok(state.free.swap_remove(at));
            }
            state.waiting += 1;
            state = self.idle.freed.wait(state).map_err(poisoned)?;
            state.waiting -= 1;
        }
    }
}

fn le_vec<T, const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    b.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

/// An input for ONNX Runtime, and whether it went in place. On a little-endian host, numeric data
/// that is aligned for its element type (binary request bodies are read so that it usually is) is
/// lent to ONNX Runtime without a copy, and misaligned data (gRPC's raw contents land anywhere in
/// the message) is copied as one block. BOOL is normalised to 0/1; BYTES become strings.
fn input_value(t: &Tensor) -> Result<(SessionInputValue<'_>, bool), BackendError> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let rt =
        |e: ort::Error| BackendError::Runtime(format!("failed to create input tensor {:?}: {e}", t.name));
    let b = match &t.data {
        TensorData::Raw(b) => b,
        TensorData::Strings(items) => {
            let strings = items
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    String::from_utf8(s.to_vec()).map_err(|_| {
                        BackendError::InvalidInput(format!(
                            "input {:?} element {i} is not valid UTF-8; ONNX string tensors hold text",
                            t.name
                        ))
                    })
                })
                .collect::<Result<Vec<String>, _>>()?;
            let value = ort::value::Tensor::from_string_array((shape, &strings[..])).map_err(rt)?;
            return Ok((value.into_dyn().into(), false));
        }
    };
    macro_rules! owned {
        ($v:expr) => {
            Ok((
                ort::value::Tensor::from_array((shape, $v))
                    .map_err(rt)?
                    .into_dyn()
                    .into(),
                false,
            ))
        };
    }
    macro_rules! numeric {
        ($t:ty, $n:literal, $f:expr) => {{
            if !cfg!(target_endian = "little") {
                return owned!(le_vec::<$t, $n>(b, $f));
            }
            if let Ok(data) = bytemuck::try_cast_slice::<u8, $t>(b) {
                return Ok((
                    TensorRef::from_array_view((shape, data)).map_err(rt)?.into(),
                    true,
                ));
            }
            let n = b.len() / $n;
            let mut v = vec![<$t as bytemuck::Zeroable>::zeroed(); n];
            bytemuck::cast_slice_mut::<$t, u8>(&mut v).copy_from_slice(&b[..n * $n]);
            owned!(v)
        }};
    }
    match t.dtype {
        DataType::Bool => owned!(le_vec::<bool, 1>(b, |a| a[0] != 0)),
        DataType::U8 => numeric!(u8, 1, |a: [u8; 1]| a[0]),
        DataType::I8 => numeric!(i8, 1, i8::from_le_bytes),
        DataType::U16 => numeric!(u16, 2, u16::from_le_bytes),
        DataType::I16 => numeric!(i16, 2, i16::from_le_bytes),
        DataType::U32 => numeric!(u32, 4, u32::from_le_bytes),
        DataType::I32 => numeric!(i32, 4, i32::from_le_bytes),
        DataType::U64 => numeric!(u64, 8, u64::from_le_bytes),
        DataType::I64 => numeric!(i64, 8, i64::from_le_bytes),
        DataType::F16 => numeric!(f16, 2, f16::from_le_bytes),
        DataType::BF16 => numeric!(bf16, 2, bf16::from_le_bytes),
        DataType::F32 => numeric!(f32, 4, f32::from_le_bytes),
        DataType::F64 => numeric!(f64, 8, f64::from_le_bytes),
        DataType::Bytes => Err(BackendError::Runtime("BYTES tensor with raw data".into())),
    }
}

fn from_value(name: &str, v: &DynValue) -> Result<Tensor, BackendError> {
    let rt = |e: ort::Error| BackendError::Runtime(format!("failed to read output {name:?}: {e}"));
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(BackendError::Runtime(format!("output {name:?} is not a tensor")));
    };
    let dtype = map_element_type(*ty)
        .ok_or_else(|| BackendError::Runtime(format!("output {name:?} has unsupported element type {ty}")))?;
    macro_rules! prim {
        ($t:ty) => {{
            let (shape, data) = v.try_extract_tensor::<$t>().map_err(rt)?;
            let out = if cfg!(target_endian = "little") {
                // One copy out of ONNX Runtime's buffer, as one block. Lending the buffer itself
                // (tried) kept one arena chunk per answer in flight: +37 % RSS at 64 clients on
                // 1 MiB answers for 1.00x throughput at 4 and 16 clients.
                Bytes::copy_from_slice(bytemuck::cast_slice::<$t, u8>(data))
            } else {
                Bytes::from(data.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
            };
            (
                shape.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>(),
                TensorData::Raw(out),
            )
        }};
    }
    let (shape, data) = match dtype {
        DataType::Bool => {
            let (shape, data) = v.try_extract_tensor::<bool>().map_err(rt)?;
            let out: Vec<u8> = data.iter().map(|&x| x as u8).collect();
            (
                shape.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>(),
                TensorData::Raw(Bytes::from(out)),
            )
        }
        DataType::U8 => prim!(u8),
        DataType::I8 => prim!(i8),
        DataType::U16 => prim!(u16),
        DataType::I16 => prim!(i16),
        DataType::U32 => prim!(u32),
        DataType::I32 => prim!(i32),
        DataType::U64 => prim!(u64),
        DataType::I64 => prim!(i64),
        DataType::F16 => prim!(f16),
        DataType::BF16 => prim!(bf16),
        DataType::F32 => prim!(f32),
        DataType::F64 => prim!(f64),
        DataType::Bytes => {
            let (shape, strings) = v.try_extract_strings().map_err(rt)?;
            (
                shape.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>(),
                TensorData::Strings(strings.into_iter().map(Bytes::from).collect()),
            )
        }
    };
    Tensor::new(name, dtype, shape, data).map_err(|e| BackendError::Runtime(e.to_string()))
}

impl Backend for OrtModel {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn execution_provider(&self) -> &str {
        self.provider
    }

    fn execution_provider_fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    fn instances(&self) -> usize {
        self.queues.len()
    }

    fn gpu_devices(&self) -> &[i32] {
        &self.devices
    }

    fn submit(&self, work: Work, instance: Option<usize>) {
        match self.take(instance) {
            Ok(k) => self.send(k, work),
            Err(e) => work.reply.send(Err(e)),
        }
    }

    fn enqueue(&self, work: Work) {
        let free = match self.idle.state.lock() {
            Ok(mut state) => match state.free.pop() {
                Some(k) => Some((k, work)),
                None => {
                    state.pending.push_back(work);
                    None
                }
            },
            Err(_) => {
                let e = BackendError::Runtime("instance list lock poisoned".into());
                return work.reply.send(Err(e));
            }
        };
        if let Some((k, mut work)) = free {
            // Handed to a free instance at once, it waits for nothing: it starts here, so a
            // timeout shorter than the thread's wake-up cannot withdraw it (only a client that
            // leaves, which the instance still checks).
            if let Some(inputs) = work.claim.as_ref().and_then(|c| c.start()) {
                work.inputs = inputs;
                work.claim = None;
            }
            self.send(k, work);
        }
    }
}

impl OrtModel {
    /// Gives `work` to instance `k`, taken out of the free list by the caller.
    fn send(&self, k: usize, work: Work) {
        if let Err(mpsc::SendError(work)) = self.queues[k].send(work) {
            // The thread is gone (it can only end with the model); k stays out of the free list.
            work.reply
                .send(Err(BackendError::Runtime(format!("instance {k} has stopped"))));
        }
    }
}

/// Runs `session` on `inputs` and returns the `outputs` asked for (all of `all_outputs` when
/// empty), in the order asked.
fn run(session: &mut Session, all_outputs: &[String], inputs: Vec<Tensor>, outputs: &[String]) -> Outcome {
    let t0 = Instant::now();
    let mut values: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
    let mut in_place = 0;
    for t in &inputs {
        let (value, borrowed) = input_value(t)?;
        in_place += usize::from(borrowed);
        values.push((t.name.as_str(), value));
    }
    tracing::debug!(
        in_place,
        copied = inputs.len() - in_place,
        "inputs handed to ONNX Runtime"
    );
    let wanted = if outputs.is_empty() { all_outputs } else { outputs };
    let mut selector = ort::session::OutputSelector::no_default();
    for name in wanted {
        selector = selector.with(name.clone());
    }
    let run_options = RunOptions::new()
        .map_err(|e| BackendError::Runtime(e.to_string()))?
        .with_outputs(selector);
    let t1 = Instant::now();
    let result = session
        .run_with_options(values, &run_options)
        .map_err(run_error)?;
    let t2 = Instant::now();
    let mut out = Vec::with_capacity(wanted.len());
    for name in wanted {
        let v = result
            .get(name)
            .ok_or_else(|| BackendError::Runtime(format!("the model did not produce output {name:?}")))?;
        out.push(from_value(name, v)?);
    }
    drop(result);
    let t3 = Instant::now();
    Ok((
        out,
        PhaseTimes {
            input: t1 - t0,
            infer: t2 - t1,
            output: t3 - t2,
        },
    ))
}

/// Where the ONNX Runtime library is looked for, in order, when no path is given explicitly.
pub fn default_library_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        out.push(dir.join("libonnxruntime.so"));
        out.push(dir.join("lib").join("libonnxruntime.so"));
    }
    let cache = std::env::var_os("KUBEMAAS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("kubemaas")));
    if let Some(cache) = cache {
        out.push(cache.join("ort").join(ORT_VERSION).join("libonnxruntime.so"));
    }
    out.push(PathBuf::from("/usr/lib/libonnxruntime.so"));
    out
}

/// The ONNX Runtime version the server is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";

/// Classifies an error from running the model. The inputs already match the signature, and the
/// model loaded and ran its warm-up, so an invalid argument or a node refusing its inputs (e.g.
/// Reshape to a size that does not fit, dynamic dimensions that disagree between inputs) is the
/// request's doing: a client error (400, counted REJECTED). Allocation failures and anything else
/// stay server errors.
fn run_error(e: ort::Error) -> BackendError {
    let message = e.to_string();
    let node_refused = message.contains("while running") && !message.contains("allocat");
    if matches!(e.code(), ort::error::ErrorCode::InvalidArgument) || node_refused {
        BackendError::InvalidInput(format!("the model rejected the input: {message}"))
    } else {
        BackendError::Runtime(message)
    }
}

#[cfg(test)]
mod tests {
    use super::{ThreadPlan, device_of, leading_dim_conflict, plan_for_pod, plan_threads};

    #[test]
    fn a_pod_with_a_request_and_no_limit_is_planned_for_its_request() {
        // No quota (a request and no limit): the request, rounded up, within the usable cores.
        assert_eq!(plan_for_pod(64, Some(false), Some(500)), 1);
        assert_eq!(plan_for_pod(64, Some(false), Some(2_500)), 3);
        assert_eq!(plan_for_pod(2, Some(false), Some(9_000)), 2);
        // A quota: the usable cores say it already, whatever the request.
        assert_eq!(plan_for_pod(3, Some(true), Some(1_000)), 3);
        // Nothing known, or nothing asked for: the usable cores.
        assert_eq!(plan_for_pod(8, None, Some(1_000)), 8);
        assert_eq!(plan_for_pod(8, Some(false), None), 8);
        assert_eq!(plan_for_pod(8, Some(false), Some(0)), 8);
    }
    use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

    fn tensor(names: &[&str]) -> ValueType {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape: Shape::new(names.iter().map(|_| -1i64)),
            dimension_symbols: SymbolicDimensions::new(names.iter().map(|n| n.to_string())),
        }
    }

    #[test]
    fn an_output_led_by_an_inputs_later_dimension_cannot_be_batched_and_other_names_can() {
        let conflict = |inputs: &[(&str, &[&str])], outputs: &[(&str, &[&str])]| {
            let i: Vec<(&str, ValueType)> = inputs.iter().map(|(n, d)| (*n, tensor(d))).collect();
            let o: Vec<(&str, ValueType)> = outputs.iter().map(|(n, d)| (*n, tensor(d))).collect();
            leading_dim_conflict(
                &i.iter().map(|(n, t)| (*n, t)).collect::<Vec<_>>(),
                &o.iter().map(|(n, t)| (*n, t)).collect::<Vec<_>>(),
            )
        };
        // A transpose: y begins with x's second dimension.
        let why = conflict(&[("x", &["a", "b"])], &[("y", &["b", "a"])]);
        assert!(why.is_some_and(|w| w.contains("dimension 1 of input \"x\"")));
        // paddle2onnx names every dynamic dimension anew (PP-OCR det): nothing against batching.
        assert_eq!(
            conflict(
                &[("x", &["p2o.DynamicDimension.0", "3", "p2o.DynamicDimension.1"])],
                &[("y", &["p2o.DynamicDimension.3", "1", "p2o.DynamicDimension.4"])]
            ),
            None
        );
        // The same name first on both sides (MiniLM), unnamed dimensions, and a name that is also
        // another input's first dimension.
        assert_eq!(
            conflict(&[("ids", &["batch", "seq"])], &[("h", &["batch", "seq"])]),
            None
        );
        assert_eq!(conflict(&[("x", &["", ""])], &[("y", &["", ""])]), None);
        assert_eq!(
            conflict(&[("a", &["n", "m"]), ("b", &["m", "k"])], &[("y", &["m"])]),
            None
        );
    }

    fn plan(instances: usize, intra_threads: usize) -> ThreadPlan {
        ThreadPlan {
            instances,
            intra_threads,
        }
    }

    #[test]
    fn instances_are_spread_over_the_gpus_in_turn_four_each_when_chosen() {
        let on = |devices: &[i32]| (0..6).map(|k| device_of(k, devices)).collect::<Vec<_>>();
        assert_eq!(on(&[]), [0; 6]);
        assert_eq!(on(&[0]), [0; 6]);
        assert_eq!(on(&[0, 1]), [0, 1, 0, 1, 0, 1]);
        assert_eq!(on(&[2, 0, 1]), [2, 0, 1, 2, 0, 1]);
        assert_eq!(plan_threads(0, 0, 16, 1), plan(4, 4));
        assert_eq!(plan_threads(0, 0, 16, 2), plan(8, 2));
        assert_eq!(plan_threads(3, 0, 16, 2), plan(3, 5), "asked for: kept");
    }

    #[test]
    fn chosen_instances_and_threads_never_oversubscribe_the_usable_cores() {
        assert_eq!(plan_threads(0, 0, 1, 0), plan(1, 1));
        assert_eq!(plan_threads(0, 0, 2, 0), plan(2, 1));
        assert_eq!(plan_threads(0, 0, 4, 0), plan(4, 1));
        assert_eq!(plan_threads(0, 0, 16, 0), plan(4, 4));
        assert_eq!(plan_threads(0, 0, 6, 0), plan(4, 1));
        for cpus in 1..=64 {
            let p = plan_threads(0, 0, cpus, 0);
            assert!(p.instances * p.intra_threads <= cpus, "{cpus}: {p:?}");
        }
    }

    #[test]
    fn what_is_given_is_kept_and_the_rest_shares_the_cores() {
        assert_eq!(plan_threads(2, 0, 8, 0), plan(2, 4));
        assert_eq!(plan_threads(0, 2, 8, 0), plan(4, 2));
        assert_eq!(plan_threads(0, 4, 2, 0), plan(1, 4));
        assert_eq!(plan_threads(3, 5, 2, 0), plan(3, 5));
        assert_eq!(plan_threads(16, 0, 2, 0), plan(16, 1));
        // No usable-core count (0) is treated as one core.
        assert_eq!(plan_threads(0, 0, 0, 0), plan(1, 1));
    }

    #[test]
    fn cuda_defaults_to_four_instances_sharing_the_cores_for_their_cpu_nodes() {
        assert_eq!(plan_threads(0, 0, 16, 1), plan(4, 4));
        assert_eq!(plan_threads(0, 0, 2, 1), plan(4, 1));
        assert_eq!(plan_threads(2, 0, 16, 1), plan(2, 8));
    }
}
