//! KServe Open Inference Protocol (V2) over REST, with Triton's binary tensor data extension.

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::{ApiError, json_error};
use crate::backend::{Signature, TensorSpec};
use crate::inference::input_spec;
use crate::shm::{SharedMemory, ShmRef, ShmTarget};
use crate::tensor::{DataType, ElementWriter, Tensor, TensorData, element_count};

/// Header carrying the length of the JSON part of a binary-extension body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The platform reported for every model (Triton's name for ONNX models run by ONNX Runtime).
pub const PLATFORM: &str = "onnxruntime_onnx";

/// The protocol extensions the server implements (server metadata, REST and gRPC).
pub const EXTENSIONS: [&str; 4] = [
    "binary_tensor_data",
    "statistics",
    "model_configuration",
    "model_repository(index)",
];

/// [`EXTENSIONS`], with `system_shared_memory` when clients may use it (`--allow-client-shm`).
pub fn extensions(shm: &SharedMemory) -> Vec<&'static str> {
    let mut all = EXTENSIONS.to_vec();
    if shm.allowed() {
        all.push("system_shared_memory");
    }
    all
}

/// Deepest nesting accepted in a `data` array (tensors have far fewer dimensions).
pub const MAX_DATA_DEPTH: usize = 32;

// Every list and map of the header is bounded while it is parsed: a small entry (`{"name":"y"}`,
// `"k":1`, a dimension `1,`) grows 7 to 20 times once decoded, so an unbounded list in a 64 MiB
// body took a gigabyte before any check could look at it (see `bounded`).
#[derive(Deserialize)]
struct RequestHeader<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, deserialize_with = "super::bounded::parameters")]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow, deserialize_with = "super::bounded::inputs")]
    inputs: Vec<InputHeader<'a>>,
    #[serde(default, deserialize_with = "super::bounded::outputs")]
    outputs: Option<Vec<OutputHeader>>,
}

#[derive(Deserialize)]
struct InputHeader<'a> {
    name: String,
    #[serde(deserialize_with = "super::bounded::shape")]
    shape: Vec<i64>,
    datatype: String,
    #[serde(default, deserialize_with = "super::bounded::tensor_parameters")]
    parameters: Option<Map<String, Value>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct OutputHeader {
    name: String,
    #[serde(default, deserialize_with = "super::bounded::tensor_parameters")]
    parameters: Option<Map<String, Value>>,
}

/// A decoded inference request.
#[derive(Debug)]
pub struct InferRequest {
    /// Request id, echoed in the response.
    pub id: Option<String>,
    /// Request parameters, passed through to the response.
    pub parameters: Option<Map<String, Value>>,
    /// Inputs, typed per the model.
    pub inputs: Vec<Tensor>,
    /// Outputs requested (empty: all).
    pub outputs: Vec<String>,
    /// Per requested output: answer in binary.
    pub binary_outputs: Vec<bool>,
    /// Answer every output in binary unless it says otherwise.
    pub binary_default: bool,
    /// Per requested output: the shared memory to write it to instead of the answer.
    pub shm_outputs: Vec<Option<ShmTarget>>,
}

/// The `shared_memory_*` parameters of one input or output (Triton's shared memory extension):
/// none, or a region and a byte size, with an optional offset.
pub(crate) fn shm_param(
    p: &Option<Map<String, Value>>,
    what: impl Fn() -> String,
) -> Result<Option<ShmRef>, ApiError> {
    let Some(p) = p else { return Ok(None) };
    if !p.keys().any(|k| k.starts_with("shared_memory_")) {
        return Ok(None);
    }
    let what = what();
    let what = what.as_str();
    let number = |key: &str| -> Result<Option<u64>, ApiError> {
        match p.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ApiError::BadRequest(format!("{what}: {key} must be a non-negative integer, got {v}"))
            }),
        }
    };
    let region = match p.get("shared_memory_region") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(ApiError::BadRequest(format!(
                "{what}: shared_memory_region must be a region name (a string), got {v}"
            )));
        }
    };
    shm_ref(
        region,
        number("shared_memory_offset")?,
        number("shared_memory_byte_size")?,
        what,
    )
}

/// Checks that the shared memory parameters come as Triton requires: a region and a byte size
/// together, the offset optional (default 0).
fn shm_ref(
    region: Option<String>,
    offset: Option<u64>,
    byte_size: Option<u64>,
    what: &str,
) -> Result<Option<ShmRef>, ApiError> {
    match (region, byte_size) {
        (None, None) if offset.is_none() => Ok(None),
        (Some(region), Some(byte_size)) => Ok(Some(ShmRef {
            region,
            offset: offset.unwrap_or(0),
            byte_size,
        })),
        _ => Err(ApiError::BadRequest(format!(
            "{what}: shared_memory_region and shared_memory_byte_size go together (shared_memory_offset is optional)"
        ))),
    }
}

/// The answer to an output that asks for Triton's `classification` (top-k labels), which is not
/// served: a raw tensor in its place would be a wrong answer with a 200.
pub fn classification_unsupported(output: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "output {output:?} asks for classification, which KubeMaaS does not serve; request the raw output and take the top classes on the client"
    ))
}

fn bool_param(p: &Option<Map<String, Value>>, key: &str) -> Result<Option<bool>, ApiError> {
    match p.as_ref().and_then(|m| m.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::BadRequest(format!(
            "parameter {key:?} must be true or false, got {other}"
        ))),
    }
}

/// Decodes a V2 request body. `json_len` is the `Inference-Header-Content-Length` header, if any.
pub fn decode_request(
    sig: &Signature,
    body: &Bytes,
    json_len: Option<usize>,
) -> Result<InferRequest, ApiError> {
    decode_request_with(sig, body, json_len, true)
}

/// [`decode_request`], with the one-pass parse of data arrays on or off. Off is serde alone, the
/// route the one pass must always agree with: the tests compare the two and the `json_floats`
/// benchmark measures them side by side.
pub fn decode_request_with(
    sig: &Signature,
    body: &Bytes,
    json_len: Option<usize>,
    prepass: bool,
) -> Result<InferRequest, ApiError> {
    decode(sig, body, json_len, prepass, None, &mut |_| Ok(()))
}

/// [`decode_request`] for a server whose clients may name registered shared memory regions
/// (`shm`) in place of an input's data, or to receive an output; each use passes `gate` first.
pub fn decode_request_shm(
    sig: &Signature,
    body: &Bytes,
    json_len: Option<usize>,
    shm: &SharedMemory,
    gate: crate::shm::Gate<'_>,
) -> Result<InferRequest, ApiError> {
    decode(sig, body, json_len, true, Some(shm), gate)
}

fn decode(
    sig: &Signature,
    body: &Bytes,
    json_len: Option<usize>,
    prepass: bool,
    shm: Option<&SharedMemory>,
    gate: crate::shm::Gate<'_>,
) -> Result<InferRequest, ApiError> {
    let (json, mut binary) = match json_len {
        Some(n) if n > body.len() => {
            return Err(ApiError::BadRequest(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body.clone(), Bytes::new()),
    };
    // One pass parses the numeric data arrays, and serde parses what is left. When serde rejects
    // that, it parses the original instead, so error messages point into what the client sent.
    // A model without float inputs has nothing for the pass to parse (and its BYTES data may be
    // long strings that serde steps over faster).
    let floats = sig
        .inputs
        .iter()
        .any(|s| matches!(s.datatype, DataType::F32 | DataType::F64));
    let (rest, found) = (prepass && floats)
        .then(|| crate::jsonfloat::prepass(&json, MAX_DATA_DEPTH))
        .flatten()
        .map(|p| (p.text, p.found))
        .unwrap_or_default();
    let (header, found): (RequestHeader<'_>, _) = match serde_json::from_slice(&rest) {
        Ok(header) if !found.is_empty() => (header, found),
        _ => (
            serde_json::from_slice(&json).map_err(|e| json_error("inference request JSON", &e))?,
            Vec::new(),
        ),
    };
    let mut found = found.into_iter().peekable();
    let mut inputs = Vec::with_capacity(header.inputs.len());
    let mut shm_bytes = 0;
    for (index, input) in header.inputs.iter().enumerate() {
        let parsed = found.next_if(|f| f.input == index);
        let spec = input_spec(sig, &input.name)?;
        let dtype = DataType::from_v2_name(&input.datatype).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "input {:?} has unknown datatype {:?}; use one of BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES",
                input.name, input.datatype
            ))
        })?;
        if dtype != spec.datatype {
            return Err(ApiError::BadRequest(format!(
                "input {:?} has datatype {} but the model expects {}",
                input.name, dtype, spec.datatype
            )));
        }
        let count = element_count(&input.shape)
            .map_err(|e| ApiError::BadRequest(format!("input {:?}: {e}", input.name)))?;
        let shape: Vec<usize> = input.shape.iter().map(|&d| d as usize).collect();
        let binary_size = match input.parameters.as_ref().and_then(|p| p.get("binary_data_size")) {
            None => None,
            Some(v) => Some(v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "input {:?}: binary_data_size must be a non-negative integer, got {v}",
                    input.name
                ))
            })?),
        };
        if let Some(at) = shm_param(&input.parameters, || format!("input {:?}", input.name))? {
            let what = format!("input {:?}", input.name);
            if binary_size.is_some() || input.data.is_some() || parsed.is_some() {
                return Err(ApiError::BadRequest(format!(
                    "{what} names a shared memory region and also carries data; send one"
                )));
            }
            let raw = crate::shm::read_input(shm, &at, &what, &mut shm_bytes, gate)?;
            let tensor = Tensor::from_binary(&input.name, dtype, shape, raw)
                .map_err(|e| ApiError::BadRequest(format!("{what}: {e}")))?;
            inputs.push(tensor);
            continue;
        }
        let tensor = match (binary_size, input.data, parsed) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(ApiError::BadRequest(format!(
                    "input {:?} has both \"data\" and binary_data_size; send one",
                    input.name
                )));
            }
            (Some(n), None, None) => {
                if n > binary.len() {
                    return Err(ApiError::BadRequest(format!(
                        "input {:?} declares binary_data_size {n} but only {} binary bytes remain in the body",
                        input.name,
                        binary.len()
                    )));
                }
                let raw = binary.split_to(n);
                Tensor::from_binary(&input.name, dtype, shape, raw)
                    .map_err(|e| ApiError::BadRequest(format!("input {:?}: {e}", input.name)))?
            }
            (None, _, Some(found)) => {
                let span = found.span.clone();
                match found.into_bytes(dtype, count) {
                    Some(bytes) => Tensor::new(&input.name, dtype, shape, TensorData::Raw(bytes.into()))
                        .map_err(|e| ApiError::BadRequest(format!("input {:?}: {e}", input.name)))?,
                    // Another type or count: the general path decides, and words the error.
                    None => {
                        let text = std::str::from_utf8(&json[span])
                            .map_err(|e| ApiError::BadRequest(format!("input {:?} data: {e}", input.name)))?;
                        decode_data(&input.name, dtype, shape, count, text)?
                    }
                }
            }
            (None, Some(raw), None) => decode_data(&input.name, dtype, shape, count, raw.get())?,
            (None, None, None) => {
                return Err(ApiError::BadRequest(format!(
                    "input {:?} has no \"data\" and no binary_data_size parameter",
                    input.name
                )));
            }
        };
        inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{} bytes of binary data are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    let binary_default = bool_param(&header.parameters, "binary_data_output")?.unwrap_or(false);
    let mut outputs = Vec::new();
    let mut binary_outputs = Vec::new();
    let mut shm_outputs = Vec::new();
    for o in header.outputs.unwrap_or_default() {
        if o.parameters
            .as_ref()
            .is_some_and(|p| p.contains_key("classification"))
        {
            return Err(classification_unsupported(&o.name));
        }
        binary_outputs.push(bool_param(&o.parameters, "binary_data")?.unwrap_or(binary_default));
        let what = || format!("output {:?}", o.name);
        let target = match shm_param(&o.parameters, what)? {
            Some(at) => Some(crate::shm::output_target(shm, gate, at, &what())?),
            None => None,
        };
        shm_outputs.push(target);
        outputs.push(o.name);
    }
    Ok(InferRequest {
        id: header.id,
        parameters: header.parameters,
        inputs,
        outputs,
        binary_outputs,
        binary_default,
        shm_outputs,
    })
}

fn decode_data(
    name: &str,
    dtype: DataType,
    shape: Vec<usize>,
    count: usize,
    text: &str,
) -> Result<Tensor, ApiError> {
    if let Some(bytes) = crate::jsonfloat::parse_floats(text.as_bytes(), dtype, count, MAX_DATA_DEPTH) {
        return Tensor::new(name, dtype, shape, TensorData::Raw(bytes.into()))
            .map_err(|e| ApiError::BadRequest(format!("input {name:?}: {e}")));
    }
    // A JSON element takes at least two bytes ("0,"): the body, not the claimed shape, bounds the
    // allocation.
    let mut writer = ElementWriter::new(dtype, count.min(text.len() / 2 + 1), count);
    let mut de = serde_json::Deserializer::from_str(text);
    let result = DataSeed {
        writer: &mut writer,
        depth: 0,
    }
    .deserialize(&mut de);
    if let Err(e) = result {
        return Err(ApiError::BadRequest(format!("input {name:?} data: {e}")));
    }
    if writer.count() != count {
        return Err(ApiError::BadRequest(format!(
            "input {name:?} has {} elements in \"data\" but shape {shape:?} needs {count}",
            writer.count()
        )));
    }
    writer
        .finish(name, shape)
        .map_err(|e| ApiError::BadRequest(format!("input {name:?}: {e}")))
}

/// Streams JSON `data` (flat or nested arrays) straight into an [`ElementWriter`], so large tensors
/// never materialise as a `serde_json::Value` tree.
pub struct DataSeed<'w> {
    /// Destination.
    pub writer: &'w mut ElementWriter,
    /// Current nesting depth.
    pub depth: usize,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an array of {} values", self.writer.dtype())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.writer.push_bool(v).map_err(E::custom)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.writer.push_i64(v).map_err(E::custom)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.writer.push_u64(v).map_err(E::custom)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.writer.push_f64(v).map_err(E::custom)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.writer.push_str(v).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DATA_DEPTH {
            return Err(serde::de::Error::custom(format!(
                "arrays nested deeper than {MAX_DATA_DEPTH} levels"
            )));
        }
        let depth = self.depth + 1;
        let writer = self.writer;
        while seq
            .next_element_seed(DataSeed {
                writer: &mut *writer,
                depth,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// Response encoding: JSON only, or a JSON header plus binary blobs (Triton's binary extension).
pub struct EncodedResponse {
    /// The JSON document.
    pub json: Bytes,
    /// The outputs asked for as binary, in order; they follow the JSON as they are, uncopied.
    pub blobs: Vec<Bytes>,
}

#[derive(serde::Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<crate::tensor::JsonElements<'a>>,
}

#[derive(serde::Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a Map<String, Value>>,
    outputs: Vec<OutputJson<'a>>,
}

/// About how many bytes of JSON [`encode_response`] writes for `outputs`: what deciding where to
/// write it needs (binary outputs cost a copy, not formatting).
pub fn json_response_len(req: &InferRequest, outputs: &[Tensor]) -> usize {
    outputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if req.shm_outputs.get(i).is_some_and(Option::is_some) {
                // Writing to shared memory is a copy: large ones go off the I/O threads too.
                t.binary_len()
            } else if req.binary_outputs.get(i).copied().unwrap_or(req.binary_default) {
                0
            } else {
                t.json_len()
            }
        })
        .sum()
}

/// Encodes the response to `req` for model `name` version `version`. Elements are written straight
/// from the tensor bytes (f32 stays in its shortest f32 form). Outputs asked for in shared memory
/// are written to their regions and answered with their name, type and shape only.
pub fn encode_response(
    name: &str,
    version: u64,
    req: &InferRequest,
    outputs: &[Tensor],
) -> Result<EncodedResponse, ApiError> {
    let mut blobs: Vec<Bytes> = Vec::new();
    let mut out_json = Vec::with_capacity(outputs.len());
    // What the JSON will hold, so it is allocated once: growing a multi-megabyte Vec by doubling
    // copies it over and over (the largest cost after number formatting when answering 1 MiB of
    // FP32 as JSON).
    let mut size = 512;
    for (i, t) in outputs.iter().enumerate() {
        let binary = req.binary_outputs.get(i).copied().unwrap_or(req.binary_default);
        size += 160 + t.name.len();
        let at = req.shm_outputs.get(i).and_then(Option::as_ref);
        let (parameters, data) = if let Some(at) = at {
            let blob = t.to_binary();
            let what = format!("output {:?}", t.name);
            at.write(&blob, &what)?;
            // As Triton answers it: name, type and shape only. Triton's C++ client reads any
            // output `parameters` as the binary extension's and requires `binary_data_size`.
            (None, None)
        } else if binary {
            let blob = t.to_binary();
            let p = serde_json::json!({"binary_data_size": blob.len()});
            blobs.push(blob);
            (Some(p), None)
        } else {
            size += t.json_len();
            (None, Some(t.json_elements(false)))
        };
        out_json.push(OutputJson {
            name: &t.name,
            datatype: t.dtype.v2_name(),
            shape: &t.shape,
            parameters,
            data,
        });
    }
    let resp = ResponseJson {
        model_name: name,
        model_version: version.to_string(),
        id: req.id.as_deref(),
        parameters: req.parameters.as_ref(),
        outputs: out_json,
    };
    let mut json = Vec::with_capacity(size);
    serde_json::to_writer(&mut json, &resp)
        .map_err(|e| ApiError::Internal(format!("failed to encode the response: {e}")))?;
    Ok(EncodedResponse {
        json: Bytes::from(json),
        blobs,
    })
}

fn specs_json(specs: &[TensorSpec]) -> Value {
    Value::Array(
        specs
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "datatype": s.datatype.v2_name(), "shape": s.shape}))
            .collect(),
    )
}

/// Model metadata (`GET /v2/models/{m}[/versions/{v}]`).
/// `parameters.artifact` carries the pull record (uri, sha256, bytes, files, seconds) when the
/// model was fetched by `kubemaas-server pull`; the operator copies it into `status.model`.
/// `parameters.execution_provider_fallback` says why CUDA was not used when it was tried.
pub fn model_metadata(
    name: &str,
    versions: &[u64],
    sig: &Signature,
    execution_provider: &str,
    fallback: Option<&str>,
    artifact: Option<&Value>,
) -> Value {
    let mut parameters = serde_json::json!({"execution_provider": execution_provider});
    if let Some(why) = fallback {
        parameters["execution_provider_fallback"] = why.into();
    }
    if let Some(a) = artifact {
        parameters["artifact"] = a.clone();
    }
    serde_json::json!({
        "name": name,
        "versions": versions.iter().map(u64::to_string).collect::<Vec<_>>(),
        "platform": PLATFORM,
        "inputs": specs_json(&sig.inputs),
        "outputs": specs_json(&sig.outputs),
        "parameters": parameters,
    })
}

/// Triton's per-request `parameters.timeout`: how long, in microseconds, the request may wait for
/// an instance (or its batch) before it is answered 503 without running. 0, as in Triton, is no
/// timeout.
pub fn timeout_param(
    parameters: Option<&Map<String, Value>>,
) -> Result<Option<std::time::Duration>, ApiError> {
    match parameters.and_then(|p| p.get("timeout")) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|us| (us > 0).then(|| std::time::Duration::from_micros(us)))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "parameters.timeout must be a whole number of microseconds (0: no timeout), not {v}"
                ))
            }),
    }
}

/// Triton's model configuration (`GET /v2/models/{m}/config`), as `perf_analyzer` reads it.
/// With dynamic batching, Triton's convention applies: `max_batch_size` > 0 and `dims` without the
/// batch dimension (clients still send it).
pub fn triton_config(
    name: &str,
    backend: &dyn crate::backend::Backend,
    version_policy: &crate::model_config::VersionPolicy,
    batching: Option<&crate::batcher::BatchConfig>,
) -> Value {
    let (sig, execution_provider) = (backend.signature(), backend.execution_provider());
    let skip = usize::from(batching.is_some());
    let io = |specs: &[TensorSpec]| -> Value {
        Value::Array(
            specs
                .iter()
                .map(|s| serde_json::json!({"name": s.name, "data_type": s.datatype.triton_name(), "dims": s.shape[skip.min(s.shape.len())..]}))
                .collect(),
        )
    };
    use crate::model_config::VersionPolicy;
    let version_policy = match version_policy {
        VersionPolicy::All => serde_json::json!({"all": {}}),
        VersionPolicy::Latest(n) => serde_json::json!({"latest": {"num_versions": n}}),
        VersionPolicy::Specific(v) => serde_json::json!({"specific": {"versions": v}}),
    };
    let mut config = serde_json::json!({
        "name": name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": version_policy,
        // Without batching, dims include the batch dimension, as Triton does for max_batch_size 0.
        "max_batch_size": batching.map_or(0, |b| b.max_batch_size),
        "input": io(&sig.inputs),
        "output": io(&sig.outputs),
        "instance_group": instance_groups(name, execution_provider, backend.instances(), backend.gpu_devices()),
        "parameters": {"execution_provider": {"string_value": execution_provider}},
    });
    // Without dynamic batching (Triton's default scheduler), a model that takes a batch
    // dimension reports max_batch_size and no dynamic_batching block, as Triton does.
    if let Some(b) = batching.filter(|b| b.combine) {
        config["dynamic_batching"] = serde_json::json!({
            "preferred_batch_size": b.preferred_batch_sizes,
            "max_queue_delay_microseconds": b.max_queue_delay.as_micros() as u64,
            "default_queue_policy": {"max_queue_size": b.max_queue_size},
        });
    }
    config
}

/// `instance_group` as Triton writes it: `count` instances of one kind, and on CUDA `count` on
/// each of `gpus`; a spread with unequal counts per device is one group per device.
fn instance_groups(name: &str, execution_provider: &str, instances: usize, gpu_devices: &[i32]) -> Value {
    if execution_provider != crate::backend::ort::CUDA_EP {
        return serde_json::json!([{"name": name, "kind": "KIND_CPU", "count": instances}]);
    }
    let mut per_device: std::collections::BTreeMap<i32, usize> = std::collections::BTreeMap::new();
    for d in gpu_devices {
        *per_device.entry(*d).or_default() += 1;
    }
    if per_device.is_empty() {
        per_device.insert(0, instances);
    }
    let count = per_device.values().next().copied().unwrap_or_default();
    if per_device.values().all(|&n| n == count) {
        let gpus: Vec<i32> = per_device.keys().copied().collect();
        return serde_json::json!([{"name": name, "kind": "KIND_GPU", "count": count, "gpus": gpus}]);
    }
    Value::Array(
        per_device
            .iter()
            .map(|(d, n)| serde_json::json!({"name": format!("{name}_{d}"), "kind": "KIND_GPU", "count": n, "gpus": [d]}))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_groups_say_how_many_instances_run_on_which_device() {
        assert_eq!(
            instance_groups("m", "CPUExecutionProvider", 3, &[]),
            serde_json::json!([{"name": "m", "kind": "KIND_CPU", "count": 3}])
        );
        let cuda = crate::backend::ort::CUDA_EP;
        assert_eq!(
            instance_groups("m", cuda, 4, &[0, 1, 0, 1]),
            serde_json::json!([{"name": "m", "kind": "KIND_GPU", "count": 2, "gpus": [0, 1]}])
        );
        assert_eq!(
            instance_groups("m", cuda, 3, &[2, 5, 2]),
            serde_json::json!([
                {"name": "m_2", "kind": "KIND_GPU", "count": 2, "gpus": [2]},
                {"name": "m_5", "kind": "KIND_GPU", "count": 1, "gpus": [5]}
            ])
        );
    }

    fn sig() -> Signature {
        Signature {
            inputs: vec![
                TensorSpec {
                    name: "x".into(),
                    datatype: DataType::F32,
                    shape: vec![-1, 2],
                },
                TensorSpec {
                    name: "s".into(),
                    datatype: DataType::Bytes,
                    shape: vec![-1],
                },
            ],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: DataType::F32,
                shape: vec![-1, 2],
            }],
            leading_dim_conflict: None,
        }
    }

    #[test]
    fn json_data_is_accepted_flat_or_nested() {
        for data in ["[1,2,3,4]", "[[1,2],[3,4]]", "[[1.0,2],[3,4e0]]"] {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[2,2],"datatype":"FP32","data":{data}}},{{"name":"s","shape":[1],"datatype":"BYTES","data":["hi"]}}]}}"#
            );
            let req = decode_request(&sig(), &Bytes::from(body), None).unwrap();
            assert_eq!(req.inputs[0].shape, vec![2, 2]);
            assert_eq!(req.inputs[0].to_binary().len(), 16);
        }
    }

    #[test]
    fn binary_inputs_are_split_by_size_in_order() {
        let json = r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"s","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&(-2.0f32).to_le_bytes());
        body.extend_from_slice(&[2, 0, 0, 0, b'o', b'k']);
        let req = decode_request(&sig(), &Bytes::from(body), Some(json.len())).unwrap();
        assert_eq!(req.binary_outputs, vec![true]);
        let resp = encode_response("m", 1, &req, &req.inputs[..1]).unwrap();
        assert_eq!(resp.blobs.concat(), [0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0]);
        let header: Value = serde_json::from_slice(&resp.json).unwrap();
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8);
    }

    #[test]
    fn mismatched_binary_sizes_are_rejected() {
        let json = r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        for extra in [4usize, 12] {
            let mut body = json.as_bytes().to_vec();
            body.extend(std::iter::repeat_n(0u8, extra));
            assert!(decode_request(&sig(), &Bytes::from(body), Some(json.len())).is_err());
        }
        assert!(decode_request(&sig(), &Bytes::from(json), Some(json.len() + 1)).is_err());
    }

    #[test]
    fn deep_nesting_and_element_count_mismatch_are_rejected() {
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        let body = format!(r#"{{"inputs":[{{"name":"x","shape":[1,1],"datatype":"FP32","data":{deep}}}]}}"#);
        let err = decode_request(&sig(), &Bytes::from(body), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nested deeper"), "{err}");
        let body = r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3]}]}"#;
        let err = decode_request(&sig(), &Bytes::from(body), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 4"), "{err}");
    }

    #[test]
    fn huge_shapes_do_not_allocate() {
        let body = r#"{"inputs":[{"name":"x","shape":[4000000000,2],"datatype":"FP32","data":[1,2]}]}"#;
        let err = decode_request(&sig(), &Bytes::from(body), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 8000000000"), "{err}");
    }

    fn wide_sig() -> Signature {
        let spec = |name: &str, datatype, shape: &[i64]| TensorSpec {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
        };
        Signature {
            inputs: vec![
                spec("x", DataType::F32, &[-1, 2]),
                spec("d", DataType::F64, &[-1]),
                spec("i", DataType::I64, &[-1]),
                spec("s", DataType::Bytes, &[-1]),
                spec("b", DataType::Bool, &[-1]),
            ],
            outputs: vec![spec("y", DataType::F32, &[-1, 2])],
            leading_dim_conflict: None,
        }
    }

    /// Both decoding routes, as text: the one-pass parse of data arrays and serde alone.
    fn both(body: &str) -> (String, String) {
        let body = Bytes::from(body.to_string());
        let sig = wide_sig();
        (
            format!("{:?}", decode_request_with(&sig, &body, None, true)),
            format!("{:?}", decode_request_with(&sig, &body, None, false)),
        )
    }

    /// Request bodies of every shape the one pass meets: key orders, nesting, whitespace, other
    /// inputs around, and data that it must hand back to serde.
    fn bodies() -> Vec<String> {
        let datas = [
            "[1,2,3,4]",
            "[[1,2],[3,4]]",
            " [ [ 0.1 , -2.5e-3 ] ,\n\t[ 3 , 1E2 ] ] ",
            "[[-0, 0.30000001192092896], [6.02214076e23, 1e39]]",
            "[[],[1,2],[],[3,4]]",
            "[[1.5,-2],[3e-2,4E+1]]",
            "[\n[0,0],\n[0,-0.0]\n]",
            "[[[1],[2]],[[3],[4]]]",
            "[1,2,3]",
            "[1,2,3,4,5]",
            "[[1,2],[3,\"4\"]]",
            "[true,1,2,3]",
            "[1,2,3,null]",
            "[1e400,1,2,3]",
            "[12345678901234567890,1,2,3]",
            "[[[[[1,2,3,4]]]]]",
            "null",
            "7",
            "[1,2,3,4,]",
            "[,1,2,3]",
            "[1 2 3 4]",
            "[01,2,3,4]",
            "[1.,2,3,4]",
            "[.5,2,3,4]",
            "[+1,2,3,4]",
            "[1e,2,3,4]",
            "[-,2,3,4]",
            "[NaN,2,3,4]",
            "[Infinity,2,3,4]",
            "[1,2,3,4",
            "[[1,2],[3,4]",
            "[1,2],[3,4]]",
            "[{\"a\":1},2,3,4]",
        ];
        let mut out = Vec::new();
        let fields = |datatype: &str, data: &str| {
            [
                r#""name":"x""#.to_string(),
                r#""shape":[2,2]"#.to_string(),
                format!(r#""datatype":"{datatype}""#),
                format!(r#""data":{data}"#),
            ]
        };
        let others = [
            r#"{"name":"i","shape":[2],"data":[5,-6],"datatype":"INT64"}"#,
            r#"{"name":"i","datatype":"INT64","shape":[2],"data":[5,-6]}"#,
            r#"{"name":"d","data":[[0.5],[1e-300]],"datatype":"FP64","shape":[2]}"#,
            r#"{"name":"s","datatype":"BYTES","shape":[2],"data":["a]","\"b\\"]}"#,
            r#"{"name":"s","data":["a]","b"],"shape":[2],"datatype":"BYTES"}"#,
            r#"{"name":"b","shape":[2],"data":[true,0],"datatype":"BOOL"}"#,
            r#"{"name":"b","shape":[2],"datatype":"BOOL","data":[true,false],"parameters":{}}"#,
        ];
        for data in datas {
            for datatype in ["FP32", "INT64", "FP33"] {
                let f = fields(datatype, data);
                // Every order of the four keys.
                for perm in 0..24usize {
                    let mut idx: Vec<usize> = (0..4).collect();
                    let mut k = perm;
                    let mut order = Vec::new();
                    for n in (1..=4).rev() {
                        order.push(idx.remove(k % n));
                        k /= n;
                    }
                    let input = format!(
                        "{{{}}}",
                        order.iter().map(|&i| f[i].as_str()).collect::<Vec<_>>().join(",")
                    );
                    let other = others[perm % others.len()];
                    out.push(format!(r#"{{"inputs":[{input}]}}"#));
                    if datatype == "FP32" {
                        out.push(format!(
                            r#"{{"id":"r","parameters":{{"k":1}},"extra":{{"inputs":[{{"data":[1]}}]}}, "inputs" : [ {other} , {input} ] ,"outputs":[{{"name":"y","data":[1]}}]}}"#
                        ));
                        out.push(format!(r#"{{"inputs":[{input},{other}]}}"#));
                    }
                }
            }
        }
        out.extend(
            [
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}]}x"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}],"inputs":[]}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4],"data":[1,2,3,4]}]}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","d\u0061ta":[1,2,3,4]}]}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4],"parameters":{"binary_data_size":16}}]}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}]"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]},]}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]} {"name":"i"}]}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4],}]}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2] "datatype":"FP32","data":[1,2,3,4]}]}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data"[1,2,3,4]}]}"#,
                r#"{"inputs":[{"name":"x","shape":[-1,2],"datatype":"FP32","data":[1,2,3,4]}]}"#,
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}],"parameters":{"binary_data_output":1}}"#,
                r#"[{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}]}]"#,
                r#"{"inputs":[7,{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}]}"#,
                "{\"inputs\":[{\"name\":\"x\",\"shape\":[2,2],\"datatype\":\"FP32\",\"data\":[1,2,3,4]}]}\n",
                r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}]} {}"#,
                r#"{"inputs":[]}"#,
                "",
            ]
            .map(str::to_string),
        );
        out
    }

    #[test]
    fn the_one_pass_parse_answers_exactly_as_serde_alone() {
        let mut fast = 0;
        let mut ok = 0;
        for body in bodies() {
            let (one_pass, serde_alone) = both(&body);
            assert_eq!(one_pass, serde_alone, "{body}");
            fast += usize::from(crate::jsonfloat::prepass(body.as_bytes(), MAX_DATA_DEPTH).is_some());
            ok += usize::from(one_pass.starts_with("Ok"));
        }
        // The comparison is not vacuous: many bodies took the one pass, and many decoded.
        assert!(fast > 250 && ok > 300, "{fast} took the one pass, {ok} decoded");
    }

    #[test]
    fn mangled_bodies_answer_exactly_as_serde_alone() {
        for body in crate::jsonfloat::mangled(&bodies(), 0x1234_5678_9abc_def1, 30_000) {
            let Ok(body) = String::from_utf8(body) else {
                continue;
            };
            let (one_pass, serde_alone) = both(&body);
            assert_eq!(one_pass, serde_alone, "{body}");
        }
    }
}
