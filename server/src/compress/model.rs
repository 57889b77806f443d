//! Reading and writing ONNX models (with external data), and the tensor and graph helpers the
//! compression passes share.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use prost::Message;

use super::CompressError;
use super::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto};

/// ONNX element types used here (`TensorProto.DataType`).
pub mod dtype {
    /// float32.
    pub const FLOAT: i32 = 1;
    /// uint8.
    pub const UINT8: i32 = 2;
    /// int8.
    pub const INT8: i32 = 3;
    /// int32.
    pub const INT32: i32 = 6;
    /// int64.
    pub const INT64: i32 = 7;
    /// string.
    pub const STRING: i32 = 8;
    /// bool.
    pub const BOOL: i32 = 9;
    /// float16.
    pub const FLOAT16: i32 = 10;
}

/// `TensorProto.data_location` of a tensor whose bytes live in a side file.
const EXTERNAL: i32 = 1;
/// Above this many bytes of weights the output keeps its weights in a side file: protobuf
/// messages cannot exceed 2 GiB.
const INLINE_LIMIT: usize = 1_800 << 20;
/// Tensors at least this large go to the side file when one is written (ONNX's own default).
const EXTERNAL_MIN_BYTES: usize = 1024;

/// A model read from disk, with every external tensor's bytes pulled inline.
pub struct Loaded {
    /// The model.
    pub model: ModelProto,
    /// Size on disk: the model file plus its external-data files.
    pub bytes: u64,
    /// Whether any tensor was stored externally.
    pub had_external: bool,
    /// The model file and its external-data files, canonical: what the output must never replace.
    pub files: Vec<PathBuf>,
}

fn io_err(path: &Path, e: std::io::Error) -> CompressError {
    CompressError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Reads `path`, resolving external data relative to its directory.
pub fn load(path: &Path) -> Result<Loaded, CompressError> {
    let buf = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let mut model = ModelProto::decode(buf.as_slice()).map_err(|e| CompressError::Malformed {
        path: path.display().to_string(),
        message: format!("not an ONNX model (protobuf): {e}"),
    })?;
    let Some(graph) = model.graph.as_mut() else {
        return Err(CompressError::Malformed {
            path: path.display().to_string(),
            message: "the model has no graph".into(),
        });
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: HashSet<PathBuf> = HashSet::new();
    let mut had_external = false;
    let mut result = Ok(());
    for_each_tensor(graph, &mut |t| {
        if result.is_ok() && t.data_location == EXTERNAL {
            had_external = true;
            match read_external(dir, t) {
                Ok(file) => {
                    files.insert(file);
                }
                Err(e) => result = Err(e),
            }
        }
    });
    result?;
    let mut bytes = buf.len() as u64;
    for f in &files {
        bytes += std::fs::metadata(f).map_err(|e| io_err(f, e))?.len();
    }
    let mut originals = vec![std::fs::canonicalize(path).map_err(|e| io_err(path, e))?];
    for f in files {
        originals.push(std::fs::canonicalize(&f).map_err(|e| io_err(&f, e))?);
    }
    Ok(Loaded {
        model,
        bytes,
        had_external,
        files: originals,
    })
}

/// Visits every tensor of a graph: initializers and tensor attributes, in subgraphs too.
fn for_each_tensor(g: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto)) {
    for t in &mut g.initializer {
        f(t);
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            if let Some(t) = a.t.as_mut() {
                f(t);
            }
            for t in &mut a.tensors {
                f(t);
            }
            if let Some(sub) = a.g.as_mut() {
                for_each_tensor(sub, f);
            }
            for sub in &mut a.graphs {
                for_each_tensor(sub, f);
            }
        }
    }
}

fn read_external(dir: &Path, t: &mut TensorProto) -> Result<PathBuf, CompressError> {
    let entry = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
    };
    let bad = |message: String| CompressError::Malformed {
        path: dir.display().to_string(),
        message: format!("tensor {:?}: {message}", t.name),
    };
    let location = entry("location").ok_or_else(|| bad("external data without a location".into()))?;
    // External data must stay beside the model: no absolute paths, no climbing out.
    let rel = Path::new(&location);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad(format!(
            "external data location {location:?} leaves the model's directory"
        )));
    }
    let file = dir.join(rel);
    let parse = |k: &str| -> Result<Option<u64>, CompressError> {
        entry(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("external data {k} {v:?} is not a number")))
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    // Only this tensor's bytes are read: a model's side file can hold gigabytes for hundreds of
    // tensors.
    let mut f = std::fs::File::open(&file).map_err(|e| io_err(&file, e))?;
    let size = f.metadata().map_err(|e| io_err(&file, e))?.len();
    let length = match parse("length")? {
        Some(l) => l,
        None => size.saturating_sub(offset),
    };
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(bad(format!(
            "bytes {offset}..{} are outside {} ({size} bytes)",
            offset.saturating_add(length),
            file.display()
        )));
    }
    let length = usize::try_from(length).map_err(|_| bad("length too large".into()))?;
    let mut buf = vec![0u8; length];
    f.seek(std::io::SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| io_err(&file, e))?;
    t.raw_data = buf;
    t.external_data.clear();
    t.data_location = 0;
    Ok(file)
}

/// Writes `model` to `out` atomically (a temporary file renamed into place). Weights go to a side
/// file `OUT.data` when the input had external data or the model would be too large for one
/// protobuf message. Returns the bytes written (model and side file).
pub fn save(model: &mut ModelProto, out: &Path, external: bool) -> Result<u64, CompressError> {
    let weight_bytes: usize = model
        .graph
        .as_ref()
        .map(|g| g.initializer.iter().map(|t| t.raw_data.len()).sum())
        .unwrap_or(0);
    let external = external || weight_bytes > INLINE_LIMIT;
    let mut written = 0u64;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.onnx".into());
    if external {
        let data_name = format!("{name}.data");
        let data_path = out.with_file_name(&data_name);
        let mut side: Vec<u8> = Vec::new();
        if let Some(g) = model.graph.as_mut() {
            for t in &mut g.initializer {
                if t.raw_data.len() < EXTERNAL_MIN_BYTES {
                    continue;
                }
                // ONNX aligns external tensors; 64 bytes suits memory mapping and SIMD loads.
                while !side.len().is_multiple_of(64) {
                    side.push(0);
                }
                let offset = side.len();
                side.extend_from_slice(&t.raw_data);
                t.external_data = vec![
                    kv("location", &data_name),
                    kv("offset", &offset.to_string()),
                    kv("length", &t.raw_data.len().to_string()),
                ];
                t.data_location = EXTERNAL;
                t.raw_data.clear();
            }
        }
        written += write_atomic(&data_path, &side)?;
    }
    written += write_atomic(out, &model.encode_to_vec())?;
    Ok(written)
}

fn kv(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<u64, CompressError> {
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(path, e)
        })?;
    Ok(bytes.len() as u64)
}

/// The float32 values of a FLOAT tensor (raw bytes or `float_data`).
pub fn floats(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != dtype::FLOAT {
        return None;
    }
    if !t.raw_data.is_empty() {
        if !t.raw_data.len().is_multiple_of(4) {
            return None;
        }
        return Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    Some(t.float_data.clone())
}

/// Number of elements the dimensions describe (None when negative or overflowing).
pub fn element_count(dims: &[i64]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

/// A tensor from raw little-endian bytes.
pub fn raw_tensor(name: &str, data_type: i32, dims: Vec<i64>, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type,
        dims,
        raw_data: raw,
        ..Default::default()
    }
}

/// A FLOAT tensor.
pub fn f32_tensor(name: &str, dims: Vec<i64>, v: &[f32]) -> TensorProto {
    raw_tensor(
        name,
        dtype::FLOAT,
        dims,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

/// A node in the default domain.
pub fn node(op: &str, name: String, inputs: Vec<String>, outputs: Vec<String>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name,
        input: inputs,
        output: outputs,
        ..Default::default()
    }
}

/// An INT attribute.
pub fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 2,
        i: v,
        ..Default::default()
    }
}

/// A node's attribute by name.
pub fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// The opset version of the default domain.
pub fn default_opset(m: &ModelProto) -> i64 {
    m.opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version)
}

/// Moves the tensors of `Constant` nodes (attribute `value`) into initializers, so passes see one
/// kind of constant. Exporters such as paddle2onnx keep every weight in a Constant node. Needs IR
/// version 4 (initializers that are not graph inputs); a Constant whose output is a graph output
/// stays.
pub fn constants_to_initializers(m: &mut ModelProto) {
    if m.ir_version < 4 {
        return;
    }
    let Some(g) = m.graph.as_mut() else { return };
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut kept = Vec::with_capacity(g.node.len());
    for mut n in std::mem::take(&mut g.node) {
        let movable = n.op_type == "Constant"
            && n.domain.is_empty()
            && n.output.len() == 1
            && !outputs.contains(&n.output[0])
            && n.attribute.len() == 1
            && n.attribute[0].name == "value"
            && n.attribute[0].t.is_some();
        if movable && let Some(mut t) = n.attribute[0].t.take() {
            t.name = n.output[0].clone();
            g.initializer.push(t);
        } else {
            kept.push(n);
        }
    }
    g.node = kept;
}

/// How many nodes read each tensor (graph outputs count as readers), in the main graph and in
/// subgraphs, which may read outer tensors.
pub fn consumers(g: &GraphProto) -> HashMap<String, usize> {
    let mut c: HashMap<String, usize> = HashMap::new();
    count_reads(g, &mut c);
    for o in &g.output {
        *c.entry(o.name.clone()).or_default() += 1;
    }
    c
}

fn count_reads(g: &GraphProto, c: &mut HashMap<String, usize>) {
    for n in &g.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *c.entry(i.clone()).or_default() += 1;
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                count_reads(sub, c);
                for o in &sub.output {
                    *c.entry(o.name.clone()).or_default() += 1;
                }
            }
        }
    }
}

/// Whether a node carries subgraphs (If, Loop, Scan).
pub fn has_subgraph(n: &NodeProto) -> bool {
    n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty())
}

/// A name not yet used in the graph, derived from `base`.
pub struct Names {
    used: HashSet<String>,
}

impl Names {
    /// Collects every tensor and node name in `g`.
    pub fn new(g: &GraphProto) -> Names {
        let mut used = HashSet::new();
        for n in &g.node {
            used.insert(n.name.clone());
            used.extend(n.input.iter().cloned());
            used.extend(n.output.iter().cloned());
        }
        used.extend(g.initializer.iter().map(|t| t.name.clone()));
        used.extend(g.input.iter().map(|v| v.name.clone()));
        used.extend(g.output.iter().map(|v| v.name.clone()));
        Names { used }
    }

    /// `base`, or `base_2`, `base_3`, ... when taken.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 2;
        while self.used.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.used.insert(name.clone());
        name
    }
}
