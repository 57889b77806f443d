//! TF-Serving REST API (also KServe's V1 protocol): `:predict` in the row (`instances`) and columnar
//! (`inputs`) formats, model status and metadata.

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value};

use super::error::{ApiError, json_error};
use super::v2::MAX_DATA_DEPTH;
use crate::backend::{Signature, TensorSpec};
use crate::inference::input_spec;
use crate::tensor::{ElementWriter, Tensor};

/// Which of TF-Serving's request formats was used; the response mirrors it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"instances": [...]}` → `{"predictions": [...]}`
    Row,
    /// `{"inputs": ...}` → `{"outputs": ...}`
    Columnar,
}

/// A decoded `:predict` request.
#[derive(Debug)]
pub struct PredictRequest {
    /// Format used.
    pub format: Format,
    /// Inputs, typed per the model.
    pub inputs: Vec<Tensor>,
}

fn is_b64(v: &Value) -> Option<&str> {
    match v {
        Value::Object(m) if m.len() == 1 => m.get("b64").and_then(Value::as_str),
        _ => None,
    }
}

/// Shape of a nested JSON value (lists are dimensions; numbers, strings, booleans and `{"b64"}` are
/// elements).
fn infer_shape(v: &Value) -> Result<Vec<usize>, String> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(items) = cur {
        if shape.len() >= MAX_DATA_DEPTH {
            return Err(format!("lists nested deeper than {MAX_DATA_DEPTH} levels"));
        }
        shape.push(items.len());
        match items.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    Ok(shape)
}

/// Writes the elements of `v`, checking that it is a regular (non-ragged) array of `shape`.
fn write_elements(w: &mut ElementWriter, v: &Value, shape: &[usize]) -> Result<(), String> {
    match (v, shape.split_first()) {
        (Value::Array(items), Some((&n, rest))) => {
            if items.len() != n {
                return Err(format!(
                    "ragged list: expected {n} elements, found {}",
                    items.len()
                ));
            }
            items.iter().try_for_each(|i| write_elements(w, i, rest))
        }
        (Value::Array(_), None) => Err("ragged list: a list where a single value was expected".into()),
        (_, Some(_)) => Err("ragged list: a single value where a list was expected".into()),
        (v, None) => {
            let r = if let Some(b) = is_b64(v) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("invalid base64 in {{\"b64\": ...}}: {e}"))?;
                w.push_bytes(Bytes::from(raw))
            } else {
                match v {
                    Value::Bool(b) => w.push_bool(*b),
                    Value::String(s) => w.push_str(s),
                    Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                        (Some(i), _, _) => w.push_i64(i),
                        (_, Some(u), _) => w.push_u64(u),
                        (_, _, Some(f)) => w.push_f64(f),
                        _ => return Err(format!("unrepresentable number {n}")),
                    },
                    Value::Null => return Err("null is not a tensor element".into()),
                    Value::Object(_) => return Err("an object where a tensor element was expected".into()),
                    Value::Array(_) => return Err("unexpected list".into()),
                }
            };
            r.map_err(|e| e.to_string())
        }
    }
}

/// Builds a tensor for `spec` from nested values stacked along a new first dimension (`rows`) or
/// from one nested value (`rows` None).
fn tensor_from_values(spec: &TensorSpec, values: &[&Value], stacked: bool) -> Result<Tensor, ApiError> {
    let bad = |m: String| ApiError::BadRequest(format!("input {:?}: {m}", spec.name));
    let first = values.first().ok_or_else(|| bad("no values".into()))?;
    let inner = infer_shape(first).map_err(bad)?;
    let mut shape = inner.clone();
    if stacked {
        shape.insert(0, values.len());
    }
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    let mut w = ElementWriter::new(spec.datatype, count, count);
    for v in values {
        write_elements(&mut w, v, &inner).map_err(bad)?;
    }
    w.finish(spec.name.clone(), shape).map_err(|e| bad(e.to_string()))
}

/// Decodes a `:predict` body.
pub fn decode_request(sig: &Signature, body: &[u8]) -> Result<PredictRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| json_error("predict request JSON", &e))?;
    let Value::Object(mut obj) = v else {
        return Err(ApiError::BadRequest(
            "the request must be a JSON object with \"instances\" or \"inputs\"".into(),
        ));
    };
    let single = match sig.inputs.as_slice() {
        [only] => Some(only),
        _ => None,
    };
    match (obj.remove("instances"), obj.remove("inputs")) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "give either \"instances\" (row format) or \"inputs\" (columnar format), not both".into(),
        )),
        (None, None) => Err(ApiError::BadRequest(
            "the request needs \"instances\" (row format) or \"inputs\" (columnar format)".into(),
        )),
        (Some(Value::Array(instances)), None) => {
            if instances.is_empty() {
                return Err(ApiError::BadRequest("\"instances\" is empty".into()));
            }
            let named = instances
                .iter()
                .all(|i| matches!(i, Value::Object(_)) && is_b64(i).is_none());
            let inputs = if named {
                let mut out = Vec::new();
                let Some(Value::Object(first)) = instances.first() else {
                    return Err(ApiError::BadRequest("\"instances\" is empty".into()));
                };
                for name in first.keys() {
                    let spec = input_spec(sig, name)?;
                    let values = instances
                        .iter()
                        .map(|i| {
                            i.get(name).ok_or_else(|| {
                                ApiError::BadRequest(format!(
                                    "an instance lacks input {name:?}; every instance needs the same inputs"
                                ))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    out.push(tensor_from_values(spec, &values, true)?);
                }
                out
            } else {
                let spec = single.ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "the model has {} inputs: each instance must be an object naming them",
                        sig.inputs.len()
                    ))
                })?;
                let values: Vec<&Value> = instances.iter().collect();
                vec![tensor_from_values(spec, &values, true)?]
            };
            Ok(PredictRequest {
                format: Format::Row,
                inputs,
            })
        }
        (Some(_), None) => Err(ApiError::BadRequest("\"instances\" must be a list".into())),
        (None, Some(inputs)) => {
            let tensors = match (inputs, single) {
                (Value::Object(map), _) if is_b64(&Value::Object(map.clone())).is_none() => map
                    .iter()
                    .map(|(name, v)| tensor_from_values(input_spec(sig, name)?, &[v], false))
                    .collect::<Result<Vec<_>, _>>()?,
                (v, Some(spec)) => vec![tensor_from_values(spec, &[&v], false)?],
                (_, None) => {
                    return Err(ApiError::BadRequest(format!(
                        "the model has {} inputs: \"inputs\" must be an object naming them",
                        sig.inputs.len()
                    )));
                }
            };
            Ok(PredictRequest {
                format: Format::Columnar,
                inputs: tensors,
            })
        }
    }
}

/// Encodes the `:predict` response.
pub fn encode_response(format: Format, outputs: &[Tensor]) -> Result<Value, ApiError> {
    let nested = |t: &Tensor| {
        serde_json::to_value(t.json_elements(true))
            .map_err(|e| ApiError::Internal(format!("failed to encode output {:?}: {e}", t.name)))
    };
    Ok(match (format, outputs) {
        (Format::Row, [only]) => serde_json::json!({ "predictions": nested(only)? }),
        (Format::Columnar, [only]) => serde_json::json!({ "outputs": nested(only)? }),
        (Format::Columnar, many) => {
            let mut m = Map::new();
            for t in many {
                m.insert(t.name.clone(), nested(t)?);
            }
            serde_json::json!({ "outputs": m })
        }
        (Format::Row, many) => {
            // One object per row, each naming every output's slice for that row.
            let rows = many.first().and_then(|t| t.shape.first()).copied().unwrap_or(0);
            let mut per_row: Vec<Map<String, Value>> = vec![Map::new(); rows];
            for t in many {
                match nested(t)? {
                    Value::Array(items) if items.len() == rows => {
                        for (row, item) in per_row.iter_mut().zip(items) {
                            row.insert(t.name.clone(), item);
                        }
                    }
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "output {:?} has no batch dimension of {rows} rows; use the columnar format (\"inputs\")",
                            t.name
                        )));
                    }
                }
            }
            serde_json::json!({ "predictions": per_row })
        }
    })
}

fn tf_signature(specs: &[TensorSpec]) -> Value {
    let mut m = Map::new();
    for s in specs {
        let dims: Vec<Value> = s
            .shape
            .iter()
            .map(|d| serde_json::json!({"size": d.to_string(), "name": ""}))
            .collect();
        m.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.datatype.tf_name(), "tensor_shape": {"dim": dims, "unknown_rank": false}, "name": s.name}),
        );
    }
    Value::Object(m)
}

/// `GET /v1/models/{m}/metadata`.
pub fn metadata(name: &str, version: u64, sig: &Signature) -> Value {
    serde_json::json!({
        "model_spec": {"name": name, "signature_name": "", "version": version.to_string()},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": tf_signature(&sig.inputs),
            "outputs": tf_signature(&sig.outputs),
            "method_name": "tensorflow/serving/predict",
        }}}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    fn sig(inputs: &[(&str, DataType, &[i64])]) -> Signature {
        Signature {
            inputs: inputs
                .iter()
                .map(|(n, d, s)| TensorSpec {
                    name: (*n).into(),
                    datatype: *d,
                    shape: s.to_vec(),
                })
                .collect(),
            outputs: vec![],
        }
    }

    #[test]
    fn row_format_stacks_instances_and_accepts_integers_for_floats() {
        let s = sig(&[("x", DataType::F32, &[-1, 10])]);
        let body = br#"{"instances": [[1,2,3,4,5,6,7,8,9,10],[11,12,13,14,15,16,17,18,19,20]]}"#;
        let req = decode_request(&s, body).unwrap();
        assert_eq!(req.format, Format::Row);
        assert_eq!(req.inputs[0].shape, vec![2, 10]);
    }

    #[test]
    fn named_instances_and_b64_bytes_decode() {
        let s = sig(&[("a", DataType::I64, &[-1]), ("t", DataType::Bytes, &[-1])]);
        let body = br#"{"instances": [{"a": 1, "t": {"b64": "aGk="}}, {"a": 2, "t": "yo"}]}"#;
        let req = decode_request(&s, body).unwrap();
        let t = req.inputs.iter().find(|t| t.name == "t").unwrap();
        assert_eq!(
            t.to_binary().as_ref(),
            &[2, 0, 0, 0, b'h', b'i', 2, 0, 0, 0, b'y', b'o']
        );
    }

    #[test]
    fn ragged_lists_and_both_formats_are_rejected() {
        let s = sig(&[("x", DataType::F32, &[-1, 2])]);
        assert!(decode_request(&s, br#"{"instances": [[1,2],[3]]}"#).is_err());
        assert!(decode_request(&s, br#"{"instances": [[1,2]], "inputs": [[1,2]]}"#).is_err());
        assert!(decode_request(&s, br#"{"inputs": [[1,[2]]]}"#).is_err());
        assert!(decode_request(&s, br#"[1,2]"#).is_err());
    }

    #[test]
    fn row_responses_nest_by_row() {
        let mut w = ElementWriter::new(DataType::F32, 4, 4);
        for v in [1, 2, 3, 4] {
            w.push_i64(v).unwrap();
        }
        let t = w.finish("y", vec![2, 2]).unwrap();
        let v = encode_response(Format::Row, std::slice::from_ref(&t)).unwrap();
        assert_eq!(v, serde_json::json!({"predictions": [[1.0, 2.0], [3.0, 4.0]]}));
        let mut t2 = t.clone();
        t2.name = "z".into();
        let v = encode_response(Format::Row, &[t, t2]).unwrap();
        assert_eq!(v["predictions"][1]["z"], serde_json::json!([3.0, 4.0]));
    }
}
