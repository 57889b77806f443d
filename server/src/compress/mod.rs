//! `kubemaas-server compress IN OUT --mode MODE`: model compression at deploy time, in Rust.
//!
//! The model is read and written with the ONNX protobuf messages ([`proto`], compiled from
//! `proto/onnx.proto` with ONNX's own field numbers). Modes: [`quantize`] (`int8-dynamic`),
//! [`fp16`] and [`prune`]. Every compression is measured ([`eval`]): both models run in ONNX
//! Runtime on the same inputs and the report gives sizes, per-output agreement and latencies;
//! `--check` refuses a result whose cosine similarity falls under `--min-cosine`, and then nothing
//! is written. The original is never modified: OUT must be another path, and the result appears
//! there only complete (written beside it, then renamed).

pub mod eval;
pub mod fp16;
pub mod model;
pub mod prune;
pub mod quantize;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The ONNX model messages, generated from `proto/onnx.proto`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// Compression modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// int8 weights; MatMul and Gemm run in int8 with activations quantized per request, Conv,
    /// ConvTranspose and Gather tables are stored in int8 and computed in float.
    #[value(name = "int8-dynamic")]
    Int8Dynamic,
    /// float16 weights and activations, float32 inputs and outputs (for GPUs).
    Fp16,
    /// Magnitude pruning to --sparsity (a smaller compressed artifact; no speed-up on CPU).
    Prune,
}

impl Mode {
    /// The name used on the command line and in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Int8Dynamic => "int8-dynamic",
            Mode::Fp16 => "fp16",
            Mode::Prune => "prune",
        }
    }
}

/// Flags of `kubemaas-server compress`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompressArgs {
    /// The ONNX model to compress (external-data files are read from its directory).
    pub input: PathBuf,
    /// Where the compressed model goes; must differ from the input. Weights go to a side file
    /// OUT.data when the input had external data or the model exceeds protobuf's 2 GiB.
    pub output: PathBuf,
    /// How to compress and judge the result.
    #[command(flatten)]
    pub options: Options,
    /// Write the report (JSON) to this file too; it is always printed on stdout.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// ONNX Runtime shared library, as for `serve` (env ORT_DYLIB_PATH).
    #[arg(long, env = "ORT_DYLIB_PATH", value_parser = crate::serve::path_or_unset)]
    pub ort_library: Option<PathBuf>,
}

/// How to compress and how to judge the result (shared by `compress` and `pull --compress`).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// int8-dynamic, fp16 or prune.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Leave nodes alone: a node name or an operator type (e.g. Conv). Repeatable.
    #[arg(long = "exclude", value_name = "NODE_OR_OP")]
    pub exclude: Vec<String>,
    /// fp16: keep these nodes or operator types in float32 as well as the default list
    /// (Resize, Upsample, RoiAlign, NonMaxSuppression, TopK, Range, CumSum, random and
    /// quantization operators). Repeatable.
    #[arg(long = "keep-fp32", value_name = "NODE_OR_OP")]
    pub keep_fp32: Vec<String>,
    /// int8-dynamic: one scale per weight tensor instead of one per output channel.
    #[arg(long)]
    pub per_tensor: bool,
    /// int8-dynamic: run down-projection MatMuls (K >= 2N, e.g. a transformer's FFN output) in
    /// int8 as well. By default their weights are stored in int8 and their product stays float:
    /// their inputs carry the activation outliers one dynamic uint8 scale resolves worst.
    #[arg(long)]
    pub all_integer: bool,
    /// prune: share of each weight's elements set to zero, 0 to 1.
    #[arg(long, default_value_t = 0.5, value_parser = unit_interval)]
    pub sparsity: f64,
    /// Evaluation inputs: a NumPy .npz file with one array per model input (np.savez). Repeatable;
    /// each file is one sample. Without it, random samples within the declared shapes are used.
    #[arg(long = "eval-inputs", value_name = "FILE.npz")]
    pub eval_inputs: Vec<PathBuf>,
    /// Random samples when no --eval-inputs are given.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Size of a random input's dynamic dimensions: NAME=1x3x48x320. Repeatable. Default: 1 for the
    /// first dimension, 32 for the others.
    #[arg(long = "input-shape", value_name = "NAME=DIMS", value_parser = parse_shape)]
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// Timed runs of each model for the latency comparison, 0 (skips it) to 10000.
    #[arg(long, default_value_t = 20, value_parser = timing_runs)]
    pub timing_runs: usize,
    /// ONNX Runtime intra-op threads for the evaluation (0: one per core), at most 1024.
    #[arg(long, default_value_t = 0, value_parser = thread_count)]
    pub threads: usize,
    /// Fail (exit 9, nothing written) when an output's cosine similarity to the original is under
    /// --min-cosine.
    #[arg(long)]
    pub check: bool,
    /// The agreement --check requires, 0 to 1.
    #[arg(long, default_value_t = 0.99, value_parser = unit_interval)]
    pub min_cosine: f64,
}

/// A number from 0 to 1 (NaN is not one).
pub fn unit_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number from 0 to 1")),
    }
}

/// A count of `what` from 0 to `max`.
fn count_up_to(s: &str, max: usize, what: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("{s:?} is not a number of {what} from 0 to {max}")),
    }
}

/// ONNX Runtime intra-op threads, 0 to 1024: it takes them as a C int, where larger counts wrap
/// (4294967297 would be 1), and no machine runs more usefully.
pub fn thread_count(s: &str) -> Result<usize, String> {
    count_up_to(s, 1024, "threads")
}

/// Timed runs, 0 to 10000 (each is a whole inference of the model, twice).
fn timing_runs(s: &str) -> Result<usize, String> {
    count_up_to(s, 10_000, "runs")
}

/// `NAME=1x3x48x320` → the name and its dimensions.
pub fn parse_shape(s: &str) -> Result<(String, Vec<usize>), String> {
    let (name, dims) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=DIMS, e.g. x=1x3x48x320"))?;
    let dims = dims
        .split('x')
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?}: {d:?} is not a dimension"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_string(), dims))
}

/// Which nodes a pass may touch.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    exclude: Vec<String>,
    keep: Vec<String>,
    /// One scale per tensor.
    pub per_tensor: bool,
    /// Down-projection MatMuls run in int8 too.
    pub all_integer: bool,
}

impl Selection {
    /// Whether the pass may change `n`.
    pub fn includes(&self, n: &proto::NodeProto) -> bool {
        !self.exclude.iter().any(|e| *e == n.name || *e == n.op_type)
    }

    /// Whether fp16 must keep `n` in float32 (beyond the default list).
    pub fn keep_fp32(&self, n: &proto::NodeProto) -> bool {
        self.keep.iter().any(|e| *e == n.name || *e == n.op_type)
    }
}

/// A node of a type the mode handles, left as it was.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Skipped {
    /// Node name.
    pub node: String,
    /// Operator type.
    pub op: String,
    /// Why.
    pub why: String,
}

/// Why compression failed.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// File.
        path: String,
        /// Why.
        message: String,
    },
    /// The input is not a valid ONNX model.
    #[error("{path}: {message}")]
    Malformed {
        /// File.
        path: String,
        /// Why.
        message: String,
    },
    /// A node the mode cannot handle.
    #[error("node {node:?} (op {op}): {message}")]
    Unsupported {
        /// Node name.
        node: String,
        /// Operator type.
        op: String,
        /// Why.
        message: String,
    },
    /// Evaluation inputs that do not fit.
    #[error("evaluation inputs {path}: {message}")]
    Inputs {
        /// File.
        path: String,
        /// Why.
        message: String,
    },
    /// ONNX Runtime refused a model or failed on it.
    #[error("{0}")]
    Runtime(String),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// `--check` refused the result (nothing was written).
    #[error(
        "compression rejected: cosine similarity {} to the original is under the required {} (mode {}, size ratio {}, inputs: {})",
        .0.cosine, .0.min_cosine.unwrap_or_default(), .0.mode.as_str(), .0.size_ratio, .0.inputs
    )]
    Rejected(Box<Report>),
}

/// What a compression did and what it costs in accuracy, measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Mode.
    pub mode: Mode,
    /// Bytes on disk of the original (model and external data).
    pub bytes_before: u64,
    /// Bytes on disk of the result.
    pub bytes_after: u64,
    /// after ÷ before.
    pub size_ratio: f64,
    /// prune: gzip-compressed size of the original's and the result's model bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gzip_bytes: Option<[u64; 2]>,
    /// What changed, by kind of change.
    pub nodes: HashMap<&'static str, usize>,
    /// Nodes of a handled type left alone, and why (at most 50 listed).
    pub skipped: Vec<Skipped>,
    /// How the evaluation inputs were made.
    pub inputs: String,
    /// Agreement per output.
    pub outputs: Vec<eval::OutputAgreement>,
    /// The lowest cosine similarity over the outputs.
    pub cosine: f64,
    /// The lowest top-1 agreement over classifier-shaped outputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Latency before and after on this machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<eval::Latency>,
    /// The agreement required (with --check).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_cosine: Option<f64>,
    /// Whether the check passed (with --check).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passed: Option<bool>,
}

/// Runs `compress`: the model is compressed, measured and (unless the check fails) placed at
/// `output`. On a failed check the report is returned inside [`CompressError::Rejected`]'s text
/// and nothing is written.
pub fn compress(
    env: &ort::environment::Environment,
    input: &Path,
    output: &Path,
    o: &Options,
) -> Result<Report, CompressError> {
    let loaded = model::load(input)?;
    // Where a file would land, resolved like the input's files (a bare name is in the working
    // directory), so no spelling of OUT can replace any file of the original.
    let resolved = |p: &Path| -> Option<PathBuf> {
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Some(std::fs::canonicalize(dir).ok()?.join(p.file_name()?))
    };
    let refuse = |p: &Path| -> Result<(), CompressError> {
        match resolved(p) {
            Some(r) if loaded.files.contains(&r) => Err(CompressError::Usage(format!(
                "{} is a file of the input model: the original is never overwritten; give another OUT",
                p.display()
            ))),
            _ => Ok(()),
        }
    };
    refuse(output)?;
    if let Some(name) = output.file_name() {
        let mut data = name.to_os_string();
        data.push(".data");
        refuse(&output.with_file_name(data))?;
    }
    let mut m = loaded.model;
    model::constants_to_initializers(&mut m);
    let sel = Selection {
        exclude: o.exclude.clone(),
        keep: o.keep_fp32.clone(),
        per_tensor: o.per_tensor,
        all_integer: o.all_integer,
    };
    let mut nodes: HashMap<&'static str, usize> = HashMap::new();
    let mut skipped = Vec::new();
    match o.mode {
        Mode::Int8Dynamic => {
            let r = quantize::run(&mut m, &sel)?;
            nodes.insert("int8Compute", r.integer_nodes);
            nodes.insert("int8WeightOnly", r.weight_only_nodes);
            skipped = r.skipped;
            if r.integer_nodes + r.weight_only_nodes == 0 {
                return Err(CompressError::Unsupported {
                    node: String::new(),
                    op: "MatMul/Gemm/Conv/ConvTranspose/Gather".into(),
                    message: "int8-dynamic found no float32 constant weight to quantize".into(),
                });
            }
        }
        Mode::Fp16 => {
            let r = fp16::run(&mut m, &sel)?;
            nodes.insert("float16", r.converted_nodes);
            nodes.insert("keptFloat32", r.kept_nodes);
            nodes.insert("casts", r.casts);
        }
        Mode::Prune => {
            let r = prune::run(&mut m, &sel, o.sparsity);
            nodes.insert("prunedWeights", r.pruned_weights);
            nodes.insert(
                "zeroPermille",
                (r.zeros * 1000).checked_div(r.elements).unwrap_or(0),
            );
            skipped = r.skipped;
        }
    }
    if skipped.len() > 50 {
        let more = skipped.len() - 50;
        skipped.truncate(50);
        skipped.push(Skipped {
            node: String::new(),
            op: String::new(),
            why: format!("... and {more} more"),
        });
    }
    m.producer_name = "kubemaas-server compress".into();
    m.producer_version = env!("CARGO_PKG_VERSION").into();
    // Written beside OUT first: evaluated there, renamed into place only if accepted.
    let out_dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = output
        .file_name()
        .ok_or_else(|| CompressError::Usage(format!("OUT {} names no file", output.display())))?;
    let staging = out_dir.join(format!(".compress-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| CompressError::Io {
        path: staging.display().to_string(),
        message: e.to_string(),
    })?;
    let result = (|| {
        let staged = staging.join(file);
        let bytes_after = model::save(&mut m, &staged, loaded.had_external)?;
        drop(m);
        let report = measure(env, input, &staged, o, loaded.bytes, bytes_after, nodes, skipped)?;
        if report.passed == Some(false) {
            return Err(CompressError::Rejected(Box::new(report)));
        }
        let io = |e: std::io::Error| CompressError::Io {
            path: staging.display().to_string(),
            message: e.to_string(),
        };
        let mut staged_files = Vec::new();
        for entry in std::fs::read_dir(&staging).map_err(io)? {
            staged_files.push(entry.map_err(io)?.file_name());
        }
        // Every destination is checked before the first rename; the side file moves before the
        // model that names it.
        for name in &staged_files {
            refuse(&out_dir.join(name))?;
        }
        staged_files.sort_by_key(|n| n.as_os_str() == file);
        for name in staged_files {
            let dest = out_dir.join(&name);
            std::fs::rename(staging.join(&name), &dest).map_err(|e| CompressError::Io {
                path: dest.display().to_string(),
                message: e.to_string(),
            })?;
        }
        Ok(report)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

#[allow(clippy::too_many_arguments)]
fn measure(
    env: &ort::environment::Environment,
    input: &Path,
    staged: &Path,
    o: &Options,
    bytes_before: u64,
    bytes_after: u64,
    nodes: HashMap<&'static str, usize>,
    skipped: Vec<Skipped>,
) -> Result<Report, CompressError> {
    let pair = eval::Pair::load(env, input, staged, o.threads)?;
    let shapes: HashMap<String, Vec<usize>> = o.input_shapes.iter().cloned().collect();
    let (samples, how) = if o.eval_inputs.is_empty() {
        let n = o.samples.max(1);
        let s = (0..n)
            .map(|i| eval::random_inputs(pair.inputs(), &shapes, i as u64))
            .collect::<Result<Vec<_>, _>>()?;
        (s, format!("{n} random samples"))
    } else {
        let s = o
            .eval_inputs
            .iter()
            .map(|p| eval::read_npz(p))
            .collect::<Result<Vec<_>, _>>()?;
        (s, format!("{} .npz samples", o.eval_inputs.len()))
    };
    let outputs = pair.agreement(&samples)?;
    if outputs.is_empty() {
        // A check that compared nothing must not pass.
        return Err(CompressError::Runtime(
            "no output of the model is numeric: there is nothing to compare the compressed model on".into(),
        ));
    }
    let cosine = outputs.iter().map(|a| a.cosine).fold(1.0, f64::min);
    let top1 = outputs.iter().filter_map(|a| a.top1_agreement).reduce(f64::min);
    let latency = match (o.timing_runs, samples.first()) {
        (0, _) | (_, None) => None,
        (runs, Some(first)) => Some(pair.latency(first, runs)?),
    };
    let gzip_bytes = (o.mode == Mode::Prune)
        .then(|| -> Result<[u64; 2], CompressError> { Ok([gzip_size(input)?, gzip_size(staged)?]) })
        .transpose()?;
    Ok(Report {
        mode: o.mode,
        bytes_before,
        bytes_after,
        size_ratio: eval::round(bytes_after as f64 / bytes_before.max(1) as f64, 4),
        gzip_bytes,
        nodes,
        skipped,
        inputs: how,
        outputs,
        cosine,
        top1_agreement: top1,
        latency,
        min_cosine: o.check.then_some(o.min_cosine),
        passed: o.check.then_some(cosine >= o.min_cosine),
    })
}

/// Bytes of `path` after gzip (default level).
fn gzip_size(path: &Path) -> Result<u64, CompressError> {
    let data = std::fs::read(path).map_err(|e| CompressError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&data)
        .and_then(|()| enc.finish())
        .map(|v| v.len() as u64)
        .map_err(|e| CompressError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// `kubemaas-server compress`: loads ONNX Runtime, compresses, prints the report (and writes it to
/// `--report`). Exit code 9 when `--check` rejects.
pub fn run(args: &CompressArgs) -> Result<Report, CompressError> {
    let env = crate::serve::init_library(args.ort_library.as_ref())
        .map_err(|e| CompressError::Runtime(e.to_string()))?;
    let result = compress(&env, &args.input, &args.output, &args.options);
    let report = match &result {
        Ok(r) => Some(r),
        Err(CompressError::Rejected(r)) => Some(r.as_ref()),
        Err(_) => None,
    };
    if let Some(r) = report {
        let text = serde_json::to_string_pretty(r).map_err(|e| CompressError::Runtime(e.to_string()))?;
        println!("{text}");
        if let Some(p) = &args.report {
            std::fs::write(p, text).map_err(|e| CompressError::Io {
                path: p.display().to_string(),
                message: e.to_string(),
            })?;
        }
    }
    result
}
