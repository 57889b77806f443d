//! Conversion between the gRPC messages and the protocol-neutral [`Tensor`]: inputs in typed
//! `contents` or in `raw_input_contents`, outputs back in the form the client used.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::pb::infer_parameter::ParameterChoice;
use super::pb::model_infer_request::InferInputTensor;
use super::pb::model_infer_response::InferOutputTensor;
use super::pb::{InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse};
use crate::backend::Signature;
use crate::inference::input_spec;
use crate::protocol::error::ApiError;
use crate::shm::{SharedMemory, ShmRef, ShmTarget};
use crate::tensor::{DataType, Tensor, TensorData, element_count};

/// A decoded `ModelInferRequest`.
#[derive(Debug)]
pub struct Decoded {
    /// Inputs, typed per the model.
    pub inputs: Vec<Tensor>,
    /// Outputs requested (empty: all).
    pub outputs: Vec<String>,
    /// Answer in `raw_output_contents`: no input carried typed contents.
    pub raw: bool,
    /// Request parameters as JSON, for the options REST shares (`timeout`).
    pub parameters: Map<String, Value>,
    /// Per requested output: the shared memory to write it to instead of the answer.
    pub shm_outputs: Vec<Option<ShmTarget>>,
}

/// The `shared_memory_*` parameters of one input or output (Triton's shared memory extension),
/// read as REST reads them.
fn shm_param(
    p: &HashMap<String, InferParameter>,
    what: impl Fn() -> String,
) -> Result<Option<ShmRef>, ApiError> {
    if !p.keys().any(|k| k.starts_with("shared_memory_")) {
        return Ok(None);
    }
    crate::protocol::v2::shm_param(&Some(parameters_json(p)), what)
}

/// Decodes a request for a model with signature `sig`. Raw contents are taken, not copied.
/// Inputs may name registered regions of `shm` instead of carrying data; each use of a region
/// passes `gate` first.
pub fn decode_request(
    sig: &Signature,
    req: &mut ModelInferRequest,
    shm: Option<&SharedMemory>,
    gate: crate::shm::Gate<'_>,
) -> Result<Decoded, ApiError> {
    let raw_contents = std::mem::take(&mut req.raw_input_contents);
    let raw = !raw_contents.is_empty();
    let in_shm = req
        .inputs
        .iter()
        .map(|i| shm_param(&i.parameters, || format!("input {:?}", i.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let carried = in_shm.iter().filter(|s| s.is_none()).count();
    if raw && raw_contents.len() != carried {
        return Err(ApiError::BadRequest(format!(
            "raw_input_contents has {} entries but the request has {carried} inputs outside shared memory; send one entry per such input, in input order",
            raw_contents.len(),
        )));
    }
    let mut raw_contents = raw_contents.into_iter();
    let mut inputs = Vec::with_capacity(req.inputs.len());
    // Typed answers only for a client that used typed contents; tritonclient reads raw ones.
    let typed = !raw && req.inputs.iter().any(|i| i.contents.is_some());
    let mut shm_bytes = 0;
    for (input, at) in req.inputs.iter_mut().zip(in_shm) {
        let tensor = match at {
            Some(at) => shm_input(sig, input, &at, shm, &mut shm_bytes, gate)?,
            None => decode_input(sig, input, raw.then(|| raw_contents.next()).flatten())?,
        };
        inputs.push(tensor);
    }
    let mut outputs = Vec::with_capacity(req.outputs.len());
    let mut shm_outputs = Vec::with_capacity(req.outputs.len());
    for o in &req.outputs {
        if o.parameters.contains_key("classification") {
            return Err(crate::protocol::v2::classification_unsupported(&o.name));
        }
        let what = || format!("output {:?}", o.name);
        let target = match shm_param(&o.parameters, what)? {
            Some(at) => Some(crate::shm::output_target(shm, gate, at, &what())?),
            None => None,
        };
        shm_outputs.push(target);
        outputs.push(o.name.clone());
    }
    Ok(Decoded {
        inputs,
        outputs,
        raw: !typed,
        parameters: parameters_json(&req.parameters),
        shm_outputs,
    })
}

/// An input whose data is in a registered shared memory region: decoded as raw contents.
fn shm_input(
    sig: &Signature,
    input: &mut InferInputTensor,
    at: &ShmRef,
    shm: Option<&SharedMemory>,
    used: &mut u64,
    gate: crate::shm::Gate<'_>,
) -> Result<Tensor, ApiError> {
    let what = format!("input {:?}", input.name);
    if input.contents.as_ref().is_some_and(|c| !populated(c).is_empty()) {
        return Err(ApiError::BadRequest(format!(
            "{what} names a shared memory region and also carries contents; send one"
        )));
    }
    let raw = crate::shm::read_input(shm, at, &what, used, gate)?;
    decode_input(sig, input, Some(raw))
}

fn decode_input(
    sig: &Signature,
    input: &mut InferInputTensor,
    raw: Option<Bytes>,
) -> Result<Tensor, ApiError> {
    let name = input.name.as_str();
    let spec = input_spec(sig, name)?;
    let dtype = DataType::from_v2_name(&input.datatype).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "input {name:?} has unknown datatype {:?}; use one of BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES",
            input.datatype
        ))
    })?;
    if dtype != spec.datatype {
        return Err(ApiError::BadRequest(format!(
            "input {name:?} has datatype {dtype} but the model expects {}",
            spec.datatype
        )));
    }
    let count =
        element_count(&input.shape).map_err(|e| ApiError::BadRequest(format!("input {name:?}: {e}")))?;
    let shape: Vec<usize> = input.shape.iter().map(|&d| d as usize).collect();
    let bad = |e: crate::tensor::TensorError| ApiError::BadRequest(format!("input {name:?}: {e}"));
    match (raw, input.contents.take()) {
        (Some(_), Some(c)) if !populated(&c).is_empty() => Err(ApiError::BadRequest(format!(
            "input {name:?} has contents although the request carries raw_input_contents; send every input one way"
        ))),
        (Some(bytes), _) => Tensor::from_binary(name, dtype, shape, bytes).map_err(bad),
        (None, Some(c)) => typed_input(name, dtype, shape, count, c),
        (None, None) if count == 0 => Ok(Tensor::zeros(name, dtype, shape)),
        (None, None) => Err(ApiError::BadRequest(format!(
            "input {name:?} has no contents and the request has no raw_input_contents"
        ))),
    }
}

/// The contents field that carries elements of `dtype`; None for FP16 and BF16, which have none.
fn field_for(dtype: DataType) -> Option<&'static str> {
    Some(match dtype {
        DataType::Bool => "bool_contents",
        DataType::I8 | DataType::I16 | DataType::I32 => "int_contents",
        DataType::I64 => "int64_contents",
        DataType::U8 | DataType::U16 | DataType::U32 => "uint_contents",
        DataType::U64 => "uint64_contents",
        DataType::F32 => "fp32_contents",
        DataType::F64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::F16 | DataType::BF16 => return None,
    })
}

/// The non-empty fields of `c`, with their element counts.
fn populated(c: &InferTensorContents) -> Vec<(&'static str, usize)> {
    [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .collect()
}

/// Little-endian bytes of typed values, each converted (and range-checked) by `conv`.
fn pack<T: Copy + std::fmt::Display, const N: usize>(
    name: &str,
    dtype: DataType,
    values: &[T],
    conv: impl Fn(T) -> Option<[u8; N]>,
) -> Result<Bytes, ApiError> {
    let mut out = Vec::with_capacity(values.len() * N);
    for &v in values {
        let b = conv(v).ok_or_else(|| {
            ApiError::BadRequest(format!("input {name:?}: value {v} is out of range for {dtype}"))
        })?;
        out.extend_from_slice(&b);
    }
    Ok(Bytes::from(out))
}

fn typed_input(
    name: &str,
    dtype: DataType,
    shape: Vec<usize>,
    count: usize,
    c: InferTensorContents,
) -> Result<Tensor, ApiError> {
    let untyped = || {
        ApiError::BadRequest(format!(
            "input {name:?} is {dtype}, which has no typed contents in the protocol; send it in raw_input_contents"
        ))
    };
    let given = populated(&c);
    if given.is_empty() && count == 0 {
        return Ok(Tensor::zeros(name, dtype, shape));
    }
    let field = field_for(dtype).ok_or_else(untyped)?;
    if let Some((other, _)) = given.iter().find(|(f, _)| *f != field) {
        return Err(ApiError::BadRequest(format!(
            "input {name:?} is {dtype}: its elements go in {field}, not {other}"
        )));
    }
    let n = given.first().map_or(0, |(_, n)| *n);
    if n != count {
        return Err(ApiError::BadRequest(format!(
            "input {name:?} has {n} elements in {field} but shape {shape:?} needs {count}"
        )));
    }
    let data = match dtype {
        DataType::Bytes => TensorData::Strings(c.bytes_contents),
        DataType::Bool => TensorData::Raw(c.bool_contents.iter().map(|&b| u8::from(b)).collect()),
        DataType::I8 => TensorData::Raw(pack(name, dtype, &c.int_contents, |v| {
            i8::try_from(v).ok().map(i8::to_le_bytes)
        })?),
        DataType::I16 => TensorData::Raw(pack(name, dtype, &c.int_contents, |v| {
            i16::try_from(v).ok().map(i16::to_le_bytes)
        })?),
        DataType::I32 => TensorData::Raw(pack(name, dtype, &c.int_contents, |v| Some(v.to_le_bytes()))?),
        DataType::I64 => TensorData::Raw(pack(name, dtype, &c.int64_contents, |v| Some(v.to_le_bytes()))?),
        DataType::U8 => TensorData::Raw(pack(name, dtype, &c.uint_contents, |v| {
            u8::try_from(v).ok().map(u8::to_le_bytes)
        })?),
        DataType::U16 => TensorData::Raw(pack(name, dtype, &c.uint_contents, |v| {
            u16::try_from(v).ok().map(u16::to_le_bytes)
        })?),
        DataType::U32 => TensorData::Raw(pack(name, dtype, &c.uint_contents, |v| Some(v.to_le_bytes()))?),
        DataType::U64 => TensorData::Raw(pack(name, dtype, &c.uint64_contents, |v| Some(v.to_le_bytes()))?),
        DataType::F32 => TensorData::Raw(pack(name, dtype, &c.fp32_contents, |v| Some(v.to_le_bytes()))?),
        DataType::F64 => TensorData::Raw(pack(name, dtype, &c.fp64_contents, |v| Some(v.to_le_bytes()))?),
        DataType::F16 | DataType::BF16 => return Err(untyped()),
    };
    Tensor::new(name, dtype, shape, data).map_err(|e| ApiError::BadRequest(format!("input {name:?}: {e}")))
}

/// Request parameters as JSON values (what the REST side reads options from).
fn parameters_json(p: &HashMap<String, InferParameter>) -> Map<String, Value> {
    p.iter()
        .filter_map(|(k, v)| {
            let v = match v.parameter_choice.as_ref()? {
                ParameterChoice::BoolParam(b) => Value::Bool(*b),
                ParameterChoice::Int64Param(i) => Value::from(*i),
                ParameterChoice::Uint64Param(u) => Value::from(*u),
                ParameterChoice::DoubleParam(d) => Value::from(*d),
                ParameterChoice::StringParam(s) => Value::String(s.clone()),
            };
            Some((k.clone(), v))
        })
        .collect()
}

/// Elements of a fixed-size tensor, read as `N`-byte little-endian values.
fn unpack<T, const N: usize>(raw: &[u8], from: impl Fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            from(a)
        })
        .collect()
}

/// Typed contents of an output; None for FP16/BF16 (raw only).
fn typed_output(t: &Tensor) -> Option<InferTensorContents> {
    let mut c = InferTensorContents::default();
    let raw: &[u8] = match &t.data {
        TensorData::Strings(s) => {
            c.bytes_contents = s.clone();
            return Some(c);
        }
        TensorData::Raw(b) => b,
    };
    match t.dtype {
        DataType::Bool => c.bool_contents = raw.iter().map(|&b| b != 0).collect(),
        DataType::I8 => c.int_contents = unpack(raw, |a: [u8; 1]| i32::from(i8::from_le_bytes(a))),
        DataType::I16 => c.int_contents = unpack(raw, |a| i32::from(i16::from_le_bytes(a))),
        DataType::I32 => c.int_contents = unpack(raw, i32::from_le_bytes),
        DataType::I64 => c.int64_contents = unpack(raw, i64::from_le_bytes),
        DataType::U8 => c.uint_contents = raw.iter().map(|&b| u32::from(b)).collect(),
        DataType::U16 => c.uint_contents = unpack(raw, |a| u32::from(u16::from_le_bytes(a))),
        DataType::U32 => c.uint_contents = unpack(raw, u32::from_le_bytes),
        DataType::U64 => c.uint64_contents = unpack(raw, u64::from_le_bytes),
        DataType::F32 => c.fp32_contents = unpack(raw, f32::from_le_bytes),
        DataType::F64 => c.fp64_contents = unpack(raw, f64::from_le_bytes),
        DataType::F16 | DataType::BF16 | DataType::Bytes => return None,
    }
    Some(c)
}

/// Encodes the response to `req` (whose id and parameters are echoed). Outputs go in
/// `raw_output_contents` when the request used raw contents or when an output is FP16/BF16 (which
/// have no typed form; the protocol wants all outputs one way), else in typed `contents`.
/// Outputs asked for in shared memory (`in_shm`, per output) are written to their regions and
/// answered with name, type and shape only.
pub fn encode_response(
    model: &str,
    version: u64,
    req: &ModelInferRequest,
    raw: bool,
    outputs: Vec<Tensor>,
    in_shm: &[Option<ShmTarget>],
) -> Result<ModelInferResponse, ApiError> {
    let raw = raw || outputs.iter().any(|t| field_for(t.dtype).is_none());
    let at = |i: usize| in_shm.get(i).and_then(Option::as_ref);
    // Raw entries stay aligned with the outputs: an empty one for an output in shared memory
    // (Triton's C++ client, perf_analyzer's, indexes them by output and crashes on fewer).
    let mut resp = ModelInferResponse {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: req.id.clone(),
        parameters: req.parameters.clone(),
        outputs: Vec::with_capacity(outputs.len()),
        raw_output_contents: Vec::new(),
    };
    for (i, t) in outputs.into_iter().enumerate() {
        let contents = if let Some(at) = at(i) {
            let what = format!("output {:?}", t.name);
            at.write(&t.to_binary(), &what)?;
            if raw {
                resp.raw_output_contents.push(Bytes::new());
            }
            None
        } else if raw {
            resp.raw_output_contents.push(t.to_binary());
            None
        } else {
            typed_output(&t)
        };
        resp.outputs.push(InferOutputTensor {
            name: t.name,
            datatype: t.dtype.v2_name().to_string(),
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            parameters: HashMap::new(),
            contents,
        });
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TensorSpec;
    use crate::tensor::ALL_DATA_TYPES;

    fn sig() -> Signature {
        Signature {
            inputs: ALL_DATA_TYPES
                .iter()
                .map(|&d| TensorSpec {
                    name: d.v2_name().to_string(),
                    datatype: d,
                    shape: vec![-1, -1],
                })
                .collect(),
            outputs: Vec::new(),
            leading_dim_conflict: None,
        }
    }

    fn input(dtype: DataType, shape: Vec<i64>, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: dtype.v2_name().into(),
            datatype: dtype.v2_name().into(),
            shape,
            parameters: HashMap::new(),
            contents,
        }
    }

    fn request(inputs: Vec<InferInputTensor>, raw: Vec<Bytes>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs,
            raw_input_contents: raw,
            ..Default::default()
        }
    }

    fn err(mut req: ModelInferRequest) -> String {
        decode_request(&sig(), &mut req, None, &mut |_| Ok(()))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn typed_contents_round_trip_through_tensors_for_every_typed_datatype() {
        let tensors: Vec<Tensor> = ALL_DATA_TYPES
            .iter()
            .filter(|&&d| field_for(d).is_some())
            .map(|&d| {
                // Extremes of each type, so widening and narrowing are exercised.
                let raw: Vec<u8> = match d.size() {
                    Some(1) if d == DataType::Bool => vec![1, 0, 1, 1],
                    Some(n) => (0..4 * n)
                        .map(|i| if i % n == n - 1 { 0x80 } else { (i * 37) as u8 })
                        .collect(),
                    None => Vec::new(),
                };
                let data = if d == DataType::Bytes {
                    TensorData::Strings(vec![
                        Bytes::from_static(b"a"),
                        Bytes::new(),
                        Bytes::from_static(b"\xff\x00"),
                        Bytes::from_static(b"z"),
                    ])
                } else {
                    TensorData::Raw(Bytes::from(raw))
                };
                Tensor::new(d.v2_name(), d, vec![2, 2], data).unwrap()
            })
            .collect();
        let resp =
            encode_response("m", 1, &ModelInferRequest::default(), false, tensors.clone(), &[]).unwrap();
        assert!(resp.raw_output_contents.is_empty());
        let inputs = resp
            .outputs
            .into_iter()
            .map(|o| InferInputTensor {
                name: o.name,
                datatype: o.datatype,
                shape: o.shape,
                parameters: HashMap::new(),
                contents: o.contents,
            })
            .collect();
        let mut req = request(inputs, Vec::new());
        let decoded = decode_request(&sig(), &mut req, None, &mut |_| Ok(())).unwrap();
        assert!(!decoded.raw);
        assert_eq!(decoded.inputs, tensors);
        // Without typed contents (here: no input has elements) the answer is raw, as tritonclient
        // reads it.
        let mut empty = request(vec![input(DataType::F16, vec![0, 2], None)], Vec::new());
        assert!(
            decode_request(&sig(), &mut empty, None, &mut |_| Ok(()))
                .unwrap()
                .raw
        );
    }

    #[test]
    fn half_precision_outputs_force_raw_contents_for_all_outputs() {
        let half = Tensor::zeros("FP16", DataType::F16, vec![1, 2]);
        let int = Tensor::zeros("INT32", DataType::I32, vec![1, 2]);
        let resp =
            encode_response("m", 3, &ModelInferRequest::default(), false, vec![int, half], &[]).unwrap();
        assert_eq!(resp.raw_output_contents.len(), 2);
        assert!(resp.outputs.iter().all(|o| o.contents.is_none()));
        assert_eq!(resp.model_version, "3");
    }

    #[test]
    fn raw_contents_decode_per_input_and_must_match_in_number_and_size() {
        let ok = request(
            vec![
                input(DataType::F16, vec![1, 2], None),
                input(DataType::Bytes, vec![1, 1], None),
            ],
            vec![
                Bytes::from_static(&[0, 60, 0, 188]),
                Bytes::from_static(&[2, 0, 0, 0, b'h', b'i']),
            ],
        );
        let mut req = ok;
        let d = decode_request(&sig(), &mut req, None, &mut |_| Ok(())).unwrap();
        assert!(d.raw);
        assert_eq!(
            d.inputs[1].data,
            TensorData::Strings(vec![Bytes::from_static(b"hi")])
        );

        let e = err(request(
            vec![input(DataType::F32, vec![1, 2], None)],
            vec![Bytes::new(), Bytes::new()],
        ));
        assert!(e.contains("2 entries but the request has 1 inputs"), "{e}");
        let e = err(request(
            vec![input(DataType::F32, vec![1, 2], None)],
            vec![Bytes::from_static(&[0; 7])],
        ));
        assert!(e.contains("7 bytes") && e.contains("needs 8"), "{e}");
        let e = err(request(
            vec![input(DataType::Bytes, vec![1], None)],
            vec![Bytes::from_static(&[9, 0, 0, 0, 1])],
        ));
        assert!(e.contains("declares 9 bytes"), "{e}");
    }

    #[test]
    fn malformed_typed_contents_are_refused_with_what_to_fix() {
        let fp32 = |v: Vec<f32>| {
            Some(InferTensorContents {
                fp32_contents: v,
                ..Default::default()
            })
        };
        let e = err(request(
            vec![input(DataType::F32, vec![2, 2], fp32(vec![1.0; 3]))],
            Vec::new(),
        ));
        assert!(
            e.contains("3 elements in fp32_contents but shape [2, 2] needs 4"),
            "{e}"
        );
        let e = err(request(
            vec![input(DataType::I32, vec![1, 1], fp32(vec![1.0]))],
            Vec::new(),
        ));
        assert!(e.contains("go in int_contents, not fp32_contents"), "{e}");
        let e = err(request(
            vec![input(DataType::F16, vec![1, 1], fp32(vec![1.0]))],
            Vec::new(),
        ));
        assert!(e.contains("raw_input_contents"), "{e}");
        let small = Some(InferTensorContents {
            uint_contents: vec![256],
            ..Default::default()
        });
        let e = err(request(vec![input(DataType::U8, vec![1, 1], small)], Vec::new()));
        assert!(e.contains("256 is out of range for UINT8"), "{e}");
        let mut bad = input(DataType::F32, vec![1, 1], fp32(vec![1.0]));
        bad.datatype = "FLOAT".into();
        let e = err(request(vec![bad], Vec::new()));
        assert!(e.contains("unknown datatype \"FLOAT\""), "{e}");
        // A huge declared shape is refused by counting, before anything is allocated.
        let e = err(request(
            vec![input(DataType::F32, vec![1 << 40, 1 << 30], fp32(vec![1.0]))],
            Vec::new(),
        ));
        assert!(e.contains("is invalid"), "{e}");
        let e = err(request(
            vec![input(DataType::F32, vec![-1, 2], fp32(vec![1.0]))],
            Vec::new(),
        ));
        assert!(e.contains("is invalid"), "{e}");
        let e = err(request(vec![input(DataType::F32, vec![1, 1], None)], Vec::new()));
        assert!(e.contains("no contents"), "{e}");
        let both = Some(InferTensorContents {
            fp32_contents: vec![1.0],
            bytes_contents: vec![Bytes::from_static(b"x")],
            ..Default::default()
        });
        let e = err(request(vec![input(DataType::F32, vec![1, 1], both)], Vec::new()));
        assert!(e.contains("not bytes_contents"), "{e}");
        // An empty FP16 tensor needs no contents, typed or not.
        let empty = Some(InferTensorContents::default());
        let mut req = request(vec![input(DataType::F16, vec![0, 2], empty)], Vec::new());
        assert!(decode_request(&sig(), &mut req, None, &mut |_| Ok(())).is_ok());
    }

    #[test]
    fn parameters_become_json_for_the_shared_options() {
        let mut req = request(Vec::new(), Vec::new());
        req.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(5000)),
            },
        );
        let params = parameters_json(&req.parameters);
        assert_eq!(params.get("timeout"), Some(&Value::from(5000)));
    }
}
