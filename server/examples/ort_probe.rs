//! How much of one ONNX Runtime run is copies and kernel launches, measured in-process, so the
//! server's CUDA path is changed only where a measurement says it pays (the throughput issue's
//! "pinned host buffers or I/O binding" and "measure whether CUDA graphs help").
//!
//! For each batch size it times the same random input through up to five ways of running:
//! - `plain`: what kubemaas-server does today: the input lent from ordinary host memory, ONNX
//!   Runtime allocates the outputs in host memory, and they are copied out;
//! - `pinned`: the input copied into page-locked (CUDA pinned) host memory and the outputs bound
//!   to pinned memory through an I/O binding, so both transfers are DMA;
//! - `device`: input and outputs stay on the device (the input copied there once, before timing):
//!   the run alone, the floor for the two above;
//! - `graph`: a session with CUDA graphs on (inputs and outputs bound at fixed device addresses),
//!   timed end to end: host to pinned, pinned to device, replay, device to pinned, pinned out;
//! - `graph-run`: the same session's replay alone, the floor with graphs.
//!
//! The `ort` crate has no safe plain copy between devices: it copies by running a one-node
//! Identity session (a run, and a copy inside it), so each copy in `graph` costs one more small
//! run. `graph` is thus an upper bound for graphs with copies, and `graph-run` the lower one.
//!
//! Every way's outputs are compared with `plain`'s (largest absolute difference). On a CPU
//! (`--ep cpu`, a dry run) `device` uses host memory and the CUDA-only ways say why they cannot
//! run. Usage (`--help` for all flags):
//!
//! ```text
//! cargo build --release -p kubemaas-server --example ort_probe
//! ORT_DYLIB_PATH=.../libonnxruntime.so target/release/examples/ort_probe \
//!     --model ~/.cache/kubemaas/models/ocr-cls/1/model.onnx --shape 3x48x192 --batches 1,8,64
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};
use kubemaas_server::backend::TensorSpec;
use kubemaas_server::compress::eval::{MAX_RANDOM_ELEMENTS, random_inputs};
use kubemaas_server::tensor::{DataType, TensorData};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{Tensor, TensorRef, TensorValueType, ValueRef};

/// Times ONNX Runtime runs of one model with host, pinned, device-resident and CUDA-graph I/O.
#[derive(Debug, Parser)]
#[command(name = "ort_probe", about)]
struct Args {
    /// The ONNX model (one FP32 input whose first dimension is the batch).
    #[arg(long)]
    model: PathBuf,
    /// The input's shape without the batch dimension, e.g. `3x48x192`.
    #[arg(long)]
    shape: String,
    /// Batch sizes to time, comma-separated.
    #[arg(long, default_value = "1,8,64", value_delimiter = ',')]
    batches: Vec<usize>,
    /// Execution provider: `cuda`, or `cpu` for a dry run without a GPU.
    #[arg(long, value_enum, default_value = "cuda")]
    ep: Ep,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    gpu_device: i32,
    /// Ways to time, comma-separated (plain, pinned, device, graph, graph-run).
    #[arg(
        long,
        default_value = "plain,pinned,device,graph,graph-run",
        value_delimiter = ','
    )]
    modes: Vec<Mode>,
    /// ONNX Runtime intra-op threads per session (the CPU nodes' threads on CUDA).
    #[arg(long, default_value_t = 1)]
    intra_op_threads: usize,
    /// Seconds each way is timed per batch size, after one second of the same runs untimed.
    #[arg(long, default_value_t = 2.0, value_parser = positive_seconds)]
    seconds: f64,
    /// The ONNX Runtime library (libonnxruntime.so); defaults to `ORT_DYLIB_PATH`.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_library: PathBuf,
    /// Write the rows as JSON to this file as well.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Ep {
    Cuda,
    Cpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Plain,
    Pinned,
    Device,
    Graph,
    GraphRun,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Pinned => "pinned",
            Mode::Device => "device",
            Mode::Graph => "graph",
            Mode::GraphRun => "graph-run",
        }
    }
}

/// One way at one batch size: its run times, or why it could not run.
struct Row {
    batch: usize,
    mode: Mode,
    result: Result<Timing, String>,
}

struct Timing {
    runs: usize,
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
    items_per_s: f64,
    /// Largest difference from the plain run on the checked input; NaN where one side is NaN
    /// and the other is not counts as infinite.
    max_abs_diff: f32,
    /// Values compared: every output's elements together.
    output_elements: usize,
}

/// A host copy of one output.
#[derive(Debug, Clone)]
struct Out {
    shape: Vec<i64>,
    data: Vec<f32>,
}

/// Host copies of a run's outputs, in the session's output order.
type Outputs = Vec<Out>;

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let item: Vec<usize> = args
        .shape
        .split('x')
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .ok()
                .filter(|&d| d > 0)
                .with_context(|| {
                    format!(
                        "bad --shape {:?}: give positive dimensions like 3x48x192",
                        args.shape
                    )
                })
        })
        .collect::<Result<_>>()?;
    let env = kubemaas_server::backend::ort::init_runtime(&args.ort_library)?;
    let mut plain = build(&env, &args, false)?;
    if plain.inputs().len() != 1 {
        bail!(
            "the probe takes models with one input; this one has {}",
            plain.inputs().len()
        );
    }
    let mut rows = Vec::new();
    for &batch in &args.batches {
        let dims: Vec<usize> = std::iter::once(batch).chain(item.iter().copied()).collect();
        let fits = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_some_and(|n| n > 0 && n <= MAX_RANDOM_ELEMENTS);
        if !fits {
            bail!(
                "batch {batch} of {} is empty or over {MAX_RANDOM_ELEMENTS} values",
                args.shape
            );
        }
        let shape: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        // Two different inputs: the graph ways are checked on one they were not captured with.
        let name = plain.inputs()[0].name().to_string();
        let inputs = [random(&name, &dims, 1)?, random(&name, &dims, 2)?];
        let references = inputs
            .iter()
            .map(|x| run_plain(&mut plain, &shape, x))
            .collect::<Result<Vec<_>>>();
        for &mode in &args.modes {
            let result = match &references {
                Ok(refs) => probe(&env, &args, &mut plain, mode, &shape, &inputs, refs),
                Err(e) => Err(anyhow!("the plain run failed: {e:#}")),
            }
            .map_err(|e| format!("{e:#}"));
            if let Err(e) = &result {
                eprintln!("batch {batch} {}: {e}", mode.name());
            }
            rows.push(Row { batch, mode, result });
            // Written after every row, so a crash in a later way keeps what was measured.
            if let Some(path) = &args.json {
                std::fs::write(path, serde_json::to_string_pretty(&json_rows(&rows))?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    print_table(&args, &rows);
    Ok(())
}

fn build(env: &ort::environment::Environment, args: &Args, graph: bool) -> Result<Session> {
    let mut b = Session::builder(env)
        .map_err(|e| anyhow!("{e}"))?
        .with_intra_threads(args.intra_op_threads)
        .map_err(|e| anyhow!("{e}"))?;
    if args.ep == Ep::Cuda {
        let ep = ort::ep::CUDA::default()
            .with_device_id(args.gpu_device)
            .with_cuda_graph(graph);
        b = b
            .with_execution_providers([ep.build().error_on_failure()])
            .map_err(|e| anyhow!("{e}"))?;
    } else if graph {
        bail!("CUDA graphs need --ep cuda");
    }
    b.commit_from_file(&args.model).map_err(|e| anyhow!("{e}"))
}

/// Deterministic inputs in [-1, 1) from the compressor's seeded generator, so two probes of one
/// model feed it the same numbers.
fn random(name: &str, dims: &[usize], seed: u64) -> Result<Vec<f32>> {
    // Every dimension open: the shape comes from `dims` (random_inputs checks given shapes
    // against the spec's rank and fixed sizes).
    let spec = TensorSpec {
        name: name.to_string(),
        datatype: DataType::F32,
        shape: vec![-1; dims.len()],
    };
    let shapes = HashMap::from([(name.to_string(), dims.to_vec())]);
    let tensor = random_inputs(&[spec], &shapes, seed)?
        .pop()
        .context("no input generated")?;
    match tensor.data {
        TensorData::Raw(b) => Ok(b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        TensorData::Strings(_) => bail!("FP32 input generated as strings"),
    }
}

/// A host copy of an FP32 output, wherever ONNX Runtime left it.
fn host_copy(v: ValueRef<'_>) -> Result<Out> {
    let t = v.downcast::<TensorValueType<f32>>()?;
    let host = if t.memory_info().is_cpu_accessible() {
        None
    } else {
        Some(t.to(AllocationDevice::CPU, 0)?)
    };
    let (shape, data) = match &host {
        Some(h) => h.try_extract_tensor::<f32>()?,
        None => t.try_extract_tensor::<f32>()?,
    };
    Ok(Out {
        shape: shape.to_vec(),
        data: data.to_vec(),
    })
}

fn copies(out: &ort::session::SessionOutputs<'_>) -> Result<Outputs> {
    out.values().map(host_copy).collect()
}

fn run_plain(session: &mut Session, shape: &[i64], data: &[f32]) -> Result<Outputs> {
    let input = TensorRef::from_array_view((shape.to_vec(), data))?;
    let out = session.run(ort::inputs![input])?;
    copies(&out)
}

fn max_diff(a: &Outputs, b: &Outputs) -> Result<f32> {
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.shape != y.shape) {
        bail!("outputs differ in count or shape");
    }
    Ok(a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.data.iter().zip(&y.data))
        .map(|(p, q)| match (p.is_nan(), q.is_nan()) {
            (true, true) => 0.0,
            (false, false) => (p - q).abs(),
            _ => f32::INFINITY,
        })
        .fold(0.0, f32::max))
}

/// Calls `step(true)` once and compares what it returns with `reference`; then runs
/// `step(false)` for a second untimed and for `secs` timed.
fn time(
    secs: f64,
    batch: usize,
    reference: &Outputs,
    mut step: impl FnMut(bool) -> Result<Option<Outputs>>,
) -> Result<Timing> {
    let checked = step(true)?.context("the checked run returned no outputs")?;
    let max_abs_diff = max_diff(reference, &checked)?;
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs(1) {
        step(false)?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs || times.is_empty() {
        let t = Instant::now();
        step(false)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = start.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    Ok(Timing {
        runs: times.len(),
        mean_us: times.iter().sum::<f64>() / times.len() as f64,
        p50_us: q(0.5),
        p99_us: q(0.99),
        items_per_s: (times.len() * batch) as f64 / total,
        max_abs_diff,
        output_elements: reference.iter().map(|o| o.data.len()).sum(),
    })
}

fn mem(args: &Args, device: AllocationDevice<'static>, ty: MemoryType) -> Result<MemoryInfo<'static>> {
    let id = if device == AllocationDevice::CPU {
        0
    } else {
        args.gpu_device
    };
    Ok(MemoryInfo::new(device, id, AllocatorType::Device, ty)?)
}

/// Times one way. `inputs[0]` is the timed input; the graph ways are checked on `inputs[1]`,
/// which they were not captured with, so a replay that ignores its bound input or writes nothing
/// shows as a difference.
fn probe(
    env: &ort::environment::Environment,
    args: &Args,
    plain: &mut Session,
    mode: Mode,
    shape: &[i64],
    inputs: &[Vec<f32>; 2],
    references: &[Outputs],
) -> Result<Timing> {
    let batch = shape[0] as usize;
    let data = &inputs[0];
    let input_name = plain.inputs()[0].name().to_string();
    let output_names: Vec<String> = plain.outputs().iter().map(|o| o.name().to_string()).collect();
    let cuda = args.ep == Ep::Cuda;
    match mode {
        Mode::Plain => time(args.seconds, batch, &references[0], |_| {
            Ok(Some(run_plain(plain, shape, data)?))
        }),
        Mode::Pinned => {
            if !cuda {
                bail!("pinned memory needs --ep cuda");
            }
            let pinned_in = Allocator::new(
                plain,
                mem(args, AllocationDevice::CUDA_PINNED, MemoryType::CPUInput)?,
            )?;
            let out_info = mem(args, AllocationDevice::CUDA_PINNED, MemoryType::CPUOutput)?;
            let mut input = Tensor::<f32>::new(&pinned_in, shape.to_vec())?;
            let mut binding = plain.create_binding()?;
            for name in &output_names {
                binding.bind_output_to_device(name, &out_info)?;
            }
            // The way as a server would use it: every run copies its input in and its outputs out.
            time(args.seconds, batch, &references[0], |_| {
                input.try_extract_tensor_mut::<f32>()?.1.copy_from_slice(data);
                binding.bind_input(&input_name, &input)?;
                let out = plain.run_binding(&binding)?;
                Ok(Some(copies(&out)?))
            })
        }
        Mode::Device => {
            let (device, id) = if cuda {
                (AllocationDevice::CUDA, args.gpu_device)
            } else {
                (AllocationDevice::CPU, 0)
            };
            let host = Tensor::from_array((shape.to_vec(), data.to_vec()))?;
            let input = host.to(device.clone(), id)?;
            let out_info = mem(args, device, MemoryType::Default)?;
            let mut binding = plain.create_binding()?;
            binding.bind_input(&input_name, &input)?;
            for name in &output_names {
                binding.bind_output_to_device(name, &out_info)?;
            }
            binding.synchronize_inputs()?;
            // Timed: the run alone; only the checked run copies its outputs back.
            time(args.seconds, batch, &references[0], |check| {
                let out = plain.run_binding(&binding)?;
                if check { Ok(Some(copies(&out)?)) } else { Ok(None) }
            })
        }
        Mode::Graph | Mode::GraphRun => {
            let mut session = build(env, args, true)?;
            let on_device =
                Allocator::new(&session, mem(args, AllocationDevice::CUDA, MemoryType::Default)?)?;
            let pinned_in = Allocator::new(
                &session,
                mem(args, AllocationDevice::CUDA_PINNED, MemoryType::CPUInput)?,
            )?;
            let pinned_out = Allocator::new(
                &session,
                mem(args, AllocationDevice::CUDA_PINNED, MemoryType::CPUOutput)?,
            )?;
            let mut staged = Tensor::<f32>::new(&pinned_in, shape.to_vec())?;
            let mut input = Tensor::<f32>::new(&on_device, shape.to_vec())?;
            let mut binding = session.create_binding()?;
            let mut outputs = Vec::new();
            let mut landed = Vec::new();
            for (name, r) in output_names.iter().zip(&references[0]) {
                // The graph replays at fixed addresses: each output gets its own buffer, shaped
                // as the plain run's output at this batch size (one graph per session and shape).
                let mut t = Tensor::<f32>::new(&on_device, r.shape.clone())?;
                binding.bind_output(name, &mut t)?;
                landed.push(Tensor::<f32>::new(&pinned_out, r.shape.clone())?);
                outputs.push(t);
            }
            staged.try_extract_tensor_mut::<f32>()?.1.copy_from_slice(data);
            staged.copy_into(&mut input)?;
            binding.bind_input(&input_name, &input)?;
            // The first run captures the graph; the rest replay it.
            session.run_binding(&binding)?;
            let end_to_end = mode == Mode::Graph;
            let mut stage = |x: &[f32]| -> Result<()> {
                staged.try_extract_tensor_mut::<f32>()?.1.copy_from_slice(x);
                staged.copy_into(&mut input)?;
                Ok(())
            };
            time(args.seconds, batch, &references[1], |check| {
                if check {
                    stage(&inputs[1])?;
                } else if end_to_end {
                    stage(data)?;
                }
                session.run_binding(&binding)?;
                if !check && !end_to_end {
                    return Ok(None);
                }
                let mut out = Vec::with_capacity(outputs.len());
                for (t, l) in outputs.iter().zip(landed.iter_mut()) {
                    t.copy_into(&mut *l)?;
                    let (shape, data) = l.try_extract_tensor::<f32>()?;
                    out.push(Out {
                        shape: shape.to_vec(),
                        data: data.to_vec(),
                    });
                }
                Ok(Some(out))
            })
        }
    }
}

fn print_table(args: &Args, rows: &[Row]) {
    println!(
        "{} on {:?}, {} s per way",
        args.model.display(),
        args.ep,
        args.seconds
    );
    println!("| batch | way | runs | mean µs | p50 µs | p99 µs | items/s | ÷ plain | max abs diff |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        match &r.result {
            Ok(t) => {
                let base = rows
                    .iter()
                    .find(|p| p.batch == r.batch && p.mode == Mode::Plain)
                    .and_then(|p| p.result.as_ref().ok())
                    .map(|p| t.items_per_s / p.items_per_s);
                let ratio = base.map_or("–".into(), |x| format!("{x:.2}×"));
                println!(
                    "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {ratio} | {:.2e} |",
                    r.batch,
                    r.mode.name(),
                    t.runs,
                    t.mean_us,
                    t.p50_us,
                    t.p99_us,
                    t.items_per_s,
                    t.max_abs_diff
                );
            }
            Err(e) => println!(
                "| {} | {} | – | – | – | – | – | – | {} |",
                r.batch,
                r.mode.name(),
                e.replace('|', "/")
            ),
        }
    }
}

fn json_rows(rows: &[Row]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| match &r.result {
                Ok(t) => serde_json::json!({
                    "batch": r.batch, "way": r.mode.name(), "runs": t.runs, "mean_us": t.mean_us,
                    "p50_us": t.p50_us, "p99_us": t.p99_us, "items_per_s": t.items_per_s,
                    "max_abs_diff": t.max_abs_diff, "output_elements": t.output_elements,
                }),
                Err(e) => serde_json::json!({"batch": r.batch, "way": r.mode.name(), "error": e}),
            })
            .collect(),
    )
}
