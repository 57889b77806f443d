//! Measuring a compression: the original and the compressed model run in ONNX Runtime on the same
//! inputs (from `.npz` files, or seeded random values within the declared shapes), and their
//! outputs and latencies are compared.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use half::{bf16, f16};
use serde::Serialize;

use super::CompressError;
use crate::backend::ort::{ExecutionProvider, OptLevel, OrtModel, OrtOptions};
use crate::backend::{Backend, TensorSpec};
use crate::tensor::{DataType, Tensor, TensorData};

/// Agreement of one output between the original and the compressed model, over all samples.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputAgreement {
    /// Output name.
    pub name: String,
    /// Cosine similarity of the flattened outputs (1 = same direction).
    pub cosine: f64,
    /// Largest absolute difference of one element.
    pub max_abs_error: f64,
    /// For outputs whose last dimension has several classes: the share of rows whose arg-max
    /// class is the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
}

/// Latency at the first sample (ONNX Runtime's run time), both models on this machine, interleaved
/// run by run.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// Median milliseconds of the original.
    pub before_ms: f64,
    /// Median milliseconds of the compressed model.
    pub after_ms: f64,
    /// before ÷ after: above 1 the compressed model is faster.
    pub speedup: f64,
    /// Timed runs of each model.
    pub runs: usize,
    /// ONNX Runtime intra-op threads (0: its default, one per core).
    pub threads: usize,
}

/// Reads one `.npz` archive into tensors named after its arrays (`NAME.npy` → `NAME`).
pub fn read_npz(path: &Path) -> Result<Vec<Tensor>, CompressError> {
    let bad = |message: String| CompressError::Inputs {
        path: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not an .npz (zip) archive: {e}")))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        let mut buf = Vec::new();
        entry
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        out.push(parse_npy(&name, &buf).map_err(|m| bad(format!("array {name:?}: {m}")))?);
    }
    Ok(out)
}

/// One `.npy` array (format versions 1-3, little-endian, C order).
pub fn parse_npy(name: &str, b: &[u8]) -> Result<Tensor, String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array".into());
    }
    let (len, start) = match b[6] {
        1 => (usize::from(u16::from_le_bytes([b[8], b[9]])), 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = b
        .get(start..start + len)
        .map(String::from_utf8_lossy)
        .ok_or("truncated header")?;
    let field = |key: &str| -> Option<String> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        let end = if rest.starts_with('(') {
            rest.find(')')? + 1
        } else {
            rest.find([',', '}'])?
        };
        Some(rest[..end].trim().trim_matches('\'').to_string())
    };
    let descr = field("descr").ok_or("no descr in header")?;
    if field("fortran_order").as_deref() != Some("False") {
        return Err("Fortran-ordered arrays are not supported (use np.ascontiguousarray)".into());
    }
    let shape_text = field("shape").ok_or("no shape in header")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape_text}")))
        .collect::<Result<_, _>>()?;
    let dtype = match descr.as_str() {
        "<f4" => DataType::F32,
        "<f8" => DataType::F64,
        "<f2" => DataType::F16,
        "<i8" => DataType::I64,
        "<i4" => DataType::I32,
        "<i2" => DataType::I16,
        "|i1" => DataType::I8,
        "|u1" => DataType::U8,
        "<u2" => DataType::U16,
        "<u4" => DataType::U32,
        "<u8" => DataType::U64,
        "|b1" => DataType::Bool,
        d => {
            return Err(format!(
                "dtype {d} is not supported (little-endian numbers and bool only)"
            ));
        }
    };
    let data = Bytes::copy_from_slice(&b[start + len..]);
    Tensor::new(name, dtype, shape, TensorData::Raw(data)).map_err(|e| e.to_string())
}

/// The most elements one random evaluation input may have (256 MiB of FP32).
pub const MAX_RANDOM_ELEMENTS: usize = 64 << 20;

/// A small deterministic generator (xorshift), so random samples are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// Every given shape must name an input, with its rank and its fixed dimensions: a typo would
/// otherwise leave that input at the fallback sizes and the evaluation would measure something else.
fn check_shapes(specs: &[TensorSpec], shapes: &HashMap<String, Vec<usize>>) -> Result<(), CompressError> {
    let refuse = |message: String| CompressError::Inputs {
        path: String::new(),
        message,
    };
    let mut names: Vec<&String> = shapes.keys().collect();
    names.sort();
    for name in names {
        let given = &shapes[name];
        let Some(spec) = specs.iter().find(|s| &s.name == name) else {
            let inputs: Vec<String> = specs.iter().map(|s| format!("{:?}", s.name)).collect();
            return Err(refuse(format!(
                "--input-shape {name:?} names no input of the model; its inputs: {}",
                inputs.join(", ")
            )));
        };
        if given.len() != spec.shape.len() {
            return Err(refuse(format!(
                "input {name:?} has {} dimensions {:?} (-1 is dynamic), but --input-shape gives {}",
                spec.shape.len(),
                spec.shape,
                given.len()
            )));
        }
        if let Some((i, (&want, &got))) = spec
            .shape
            .iter()
            .zip(given)
            .enumerate()
            .find(|(_, (w, g))| **w >= 0 && **w as usize != **g)
        {
            return Err(refuse(format!(
                "dimension {i} of input {name:?} is fixed at {want}, but --input-shape gives {got}"
            )));
        }
    }
    Ok(())
}

/// Seeded random tensors for `spec`: floats uniform in [-1, 1), integers in [0, 2), booleans.
/// Dynamic dimensions take the size given in `shapes`, else 1 for the first (batch) and 32 for
/// the others.
pub fn random_inputs(
    specs: &[TensorSpec],
    shapes: &HashMap<String, Vec<usize>>,
    seed: u64,
) -> Result<Vec<Tensor>, CompressError> {
    check_shapes(specs, shapes)?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let mut out = Vec::new();
    for s in specs {
        let shape: Vec<usize> = match shapes.get(&s.name) {
            Some(given) => given.clone(),
            None => s
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if d >= 0 {
                        d as usize
                    } else if i == 0 {
                        1
                    } else {
                        32
                    }
                })
                .collect(),
        };
        // Bounded: shapes come from flags and manifests, and memory is the init container's.
        let n = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= MAX_RANDOM_ELEMENTS)
            .ok_or_else(|| CompressError::Inputs {
                path: String::new(),
                message: format!(
                    "input {:?} of shape {shape:?} is larger than {MAX_RANDOM_ELEMENTS} elements; give smaller --input-shape sizes",
                    s.name
                ),
            })?;
        let mut raw: Vec<u8> = Vec::new();
        for _ in 0..n {
            let u = rng.unit();
            let int = i64::from(rng.next().is_multiple_of(2));
            match s.datatype {
                DataType::F32 => raw.extend((u as f32).to_le_bytes()),
                DataType::F64 => raw.extend(u.to_le_bytes()),
                DataType::F16 => raw.extend(f16::from_f64(u).to_bits().to_le_bytes()),
                DataType::BF16 => raw.extend(bf16::from_f64(u).to_bits().to_le_bytes()),
                DataType::I64 | DataType::U64 => raw.extend(int.to_le_bytes()),
                DataType::I32 | DataType::U32 => raw.extend((int as i32).to_le_bytes()),
                DataType::I16 | DataType::U16 => raw.extend((int as i16).to_le_bytes()),
                DataType::I8 | DataType::U8 | DataType::Bool => raw.push(int as u8),
                DataType::Bytes => {
                    return Err(CompressError::Inputs {
                        path: String::new(),
                        message: format!("input {:?} is a string tensor: give --eval-inputs", s.name),
                    });
                }
            }
        }
        let t = Tensor::new(
            s.name.clone(),
            s.datatype,
            shape,
            TensorData::Raw(Bytes::from(raw)),
        )
        .map_err(|e| CompressError::Inputs {
            path: String::new(),
            message: format!("input {:?}: {e}", s.name),
        })?;
        out.push(t);
    }
    Ok(out)
}

/// Elements of a numeric tensor as f64 (None for strings).
fn values(t: &Tensor) -> Option<Vec<f64>> {
    let TensorData::Raw(b) = &t.data else { return None };
    let size = t.dtype.size()?;
    let v = b.chunks_exact(size).map(|c| {
        let a = |n: usize| {
            let mut x = [0u8; 8];
            x[..n].copy_from_slice(&c[..n]);
            x
        };
        match t.dtype {
            DataType::F32 => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DataType::F64 => f64::from_le_bytes(a(8)),
            DataType::F16 => f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64(),
            DataType::BF16 => bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64(),
            DataType::I8 => f64::from(c[0] as i8),
            DataType::U8 | DataType::Bool => f64::from(c[0]),
            DataType::I16 => f64::from(i16::from_le_bytes([c[0], c[1]])),
            DataType::U16 => f64::from(u16::from_le_bytes([c[0], c[1]])),
            DataType::I32 => f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DataType::U32 => f64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DataType::I64 => i64::from_le_bytes(a(8)) as f64,
            DataType::U64 => u64::from_le_bytes(a(8)) as f64,
            DataType::Bytes => 0.0,
        }
    });
    Some(v.collect())
}

/// Cosine similarity; two all-zero vectors agree fully.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 && nb == 0.0 {
        return 1.0;
    }
    if na == 0.0 || nb == 0.0 || !dot.is_finite() {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// The two models loaded side by side.
pub struct Pair {
    before: OrtModel,
    after: OrtModel,
    threads: usize,
}

impl Pair {
    /// Loads both files on the CPU with `threads` intra-op threads each.
    pub fn load(
        env: &ort::environment::Environment,
        before: &Path,
        after: &Path,
        threads: usize,
    ) -> Result<Pair, CompressError> {
        let opts = OrtOptions {
            execution_provider: ExecutionProvider::Cpu,
            optimization: OptLevel::All,
            intra_threads: threads,
            instances: 1,
            cpus: 0,
            gpu_devices: vec![0],
            conv_algo_search: crate::backend::ort::ConvAlgoSearch::Heuristic,
        };
        let load = |p: &Path, which: &str| {
            OrtModel::load(env, p, &opts).map_err(|e| {
                CompressError::Runtime(format!("the {which} model does not load in ONNX Runtime: {e}"))
            })
        };
        Ok(Pair {
            before: load(before, "original")?,
            after: load(after, "compressed")?,
            threads,
        })
    }

    /// The original's inputs.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.before.signature().inputs
    }

    /// Runs every sample through both models and compares their outputs.
    pub fn agreement(&self, samples: &[Vec<Tensor>]) -> Result<Vec<OutputAgreement>, CompressError> {
        let outputs = &self.before.signature().outputs;
        let mut a_all: Vec<Vec<f64>> = vec![Vec::new(); outputs.len()];
        let mut b_all: Vec<Vec<f64>> = vec![Vec::new(); outputs.len()];
        let mut classes: Vec<Option<usize>> = vec![None; outputs.len()];
        for inputs in samples {
            let run = |m: &OrtModel, which: &str| {
                m.infer(inputs.clone(), &[]).map(|(o, _)| o).map_err(|e| {
                    CompressError::Runtime(format!("the {which} model failed on an evaluation input: {e}"))
                })
            };
            let (a, b) = (run(&self.before, "original")?, run(&self.after, "compressed")?);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                if x.shape != y.shape {
                    return Err(CompressError::Runtime(format!(
                        "output {:?} has shape {:?} in the original and {:?} compressed",
                        x.name, x.shape, y.shape
                    )));
                }
                if let (Some(vx), Some(vy)) = (values(x), values(y)) {
                    a_all[i].extend(vx);
                    b_all[i].extend(vy);
                    // Classifier-shaped: [batch, classes] or [batch, steps, classes]. Maps such as
                    // a detector's [1, 1, H, W] have no classes.
                    let ranked = matches!(x.shape.len(), 2 | 3);
                    classes[i] = x.shape.last().copied().filter(|&c| c > 1 && ranked);
                }
            }
        }
        Ok(outputs
            .iter()
            .enumerate()
            .filter(|(i, _)| !a_all[*i].is_empty())
            .map(|(i, spec)| {
                let (a, b) = (&a_all[i], &b_all[i]);
                let max_abs_error = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                let top1_agreement = classes[i].map(|c| {
                    let rows = a.len() / c;
                    let same = a
                        .chunks_exact(c)
                        .zip(b.chunks_exact(c))
                        .filter(|(x, y)| argmax(x) == argmax(y))
                        .count();
                    round(same as f64 / rows.max(1) as f64, 4)
                });
                OutputAgreement {
                    name: spec.name.clone(),
                    cosine: round(cosine(a, b), 6),
                    max_abs_error: round(max_abs_error, 6),
                    top1_agreement,
                }
            })
            .collect())
    }

    /// Median latency of both models on `inputs`, alternating so that drift hits both alike.
    pub fn latency(&self, inputs: &[Tensor], runs: usize) -> Result<Latency, CompressError> {
        let time = |m: &OrtModel| -> Result<Duration, CompressError> {
            // ONNX Runtime's own execution time: copying tensors in and out is the same for both
            // models and, in a debug build, slower than the model itself.
            let (_, phases) = m
                .infer(inputs.to_vec(), &[])
                .map_err(|e| CompressError::Runtime(e.to_string()))?;
            Ok(phases.infer)
        };
        for _ in 0..3 {
            time(&self.before)?;
            time(&self.after)?;
        }
        let (mut a, mut b) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        for _ in 0..runs.max(1) {
            a.push(time(&self.before)?);
            b.push(time(&self.after)?);
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2].as_secs_f64() * 1000.0
        };
        let (before_ms, after_ms) = (median(&mut a), median(&mut b));
        Ok(Latency {
            before_ms: round(before_ms, 3),
            after_ms: round(after_ms, 3),
            speedup: round(before_ms / after_ms.max(1e-9), 3),
            runs: runs.max(1),
            threads: self.threads,
        })
    }
}

/// `x` rounded to `digits` decimals (for reports and status: stable, readable numbers).
pub fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, fortran: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((header.len() as u16).to_le_bytes());
        b.extend(header.as_bytes());
        b.extend(data);
        b
    }

    #[test]
    fn npy_arrays_parse_with_their_type_and_shape_and_bad_ones_say_why() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let t = parse_npy("x", &npy("<f4", "False", "(2, 3)", &data)).unwrap();
        assert_eq!((t.dtype, t.shape.clone()), (DataType::F32, vec![2, 3]));
        assert_eq!(values(&t).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let scalar = parse_npy("s", &npy("<i8", "False", "()", &7i64.to_le_bytes())).unwrap();
        assert_eq!((scalar.shape.len(), values(&scalar).unwrap()), (0, vec![7.0]));
        let one = parse_npy("v", &npy("|u1", "False", "(3,)", &[1, 2, 3])).unwrap();
        assert_eq!(one.shape, vec![3]);
        assert!(
            parse_npy("x", &npy("<f4", "True", "(2, 3)", &data))
                .unwrap_err()
                .contains("Fortran")
        );
        assert!(
            parse_npy("x", &npy(">f4", "False", "(2, 3)", &data))
                .unwrap_err()
                .contains(">f4")
        );
        assert!(
            parse_npy("x", &npy("<f4", "False", "(2, 4)", &data)).is_err(),
            "too few bytes"
        );
        assert!(
            parse_npy("x", b"PK\x03\x04 zip")
                .unwrap_err()
                .contains("not a .npy")
        );
    }

    #[test]
    fn cosine_and_random_inputs_behave() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 0.0]), 1.0);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 0.0]), 0.0);
        assert!((cosine(&[1.0, 0.0], &[0.0, 1.0])).abs() < 1e-12);
        let spec = [TensorSpec {
            name: "x".into(),
            datatype: DataType::F32,
            shape: vec![-1, 3, -1],
        }];
        let a = random_inputs(&spec, &HashMap::new(), 1).unwrap();
        assert_eq!(a[0].shape, vec![1, 3, 32]);
        assert_eq!(a, random_inputs(&spec, &HashMap::new(), 1).unwrap(), "seeded");
        assert_ne!(a, random_inputs(&spec, &HashMap::new(), 2).unwrap());
        assert!(values(&a[0]).unwrap().iter().all(|v| (-1.0..1.0).contains(v)));
        let given = HashMap::from([("x".to_string(), vec![2, 3, 5])]);
        assert_eq!(random_inputs(&spec, &given, 0).unwrap()[0].shape, vec![2, 3, 5]);
        for huge in [vec![1, 3, 1 << 33], vec![usize::MAX, 3, 1]] {
            let given = HashMap::from([("x".to_string(), huge)]);
            let e = random_inputs(&spec, &given, 0).unwrap_err().to_string();
            assert!(e.contains("larger than"), "{e}");
        }
    }
}
