//! TF-Serving REST API (also KServe's V1 protocol): `:predict` in the row (`instances`) and columnar
//! (`inputs`) formats, model status and metadata.

use std::collections::BTreeMap;

use super::bounded::MAX_TENSORS;
use base64::Engine as _;
use bytes::Bytes;
use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::{ApiError, json_error};
use super::v2::MAX_DATA_DEPTH;
use crate::backend::{Signature, TensorSpec};
use crate::inference::input_spec;
use crate::tensor::{DataType, ElementWriter, Tensor, TensorData};

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

/// The top level of a `:predict` body. The tensors stay unparsed slices of the body: they are
/// streamed into tensors later, never built as a `Value` tree (32 bytes per element).
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    instances: Option<&'a RawValue>,
    #[serde(borrow, default)]
    inputs: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "string")]
    signature_name: Option<String>,
}

/// A member that must be a string when present (TF-Serving refuses `"signature_name": null`).
fn string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// The members of a `:predict` body besides its tensors that mean something.
#[derive(Deserialize)]
struct Rest {
    #[serde(default, deserialize_with = "string")]
    signature_name: Option<String>,
}

/// The one signature an ONNX model has, under the name TF-Serving gives a model's default one.
pub const SIGNATURE: &str = "serving_default";

/// Refuses a `signature_name` other than [`SIGNATURE`], as TF-Serving refuses one the model lacks:
/// ignoring it would answer for another signature than the one asked for.
fn check_signature(name: Option<&str>) -> Result<(), ApiError> {
    match name {
        // TF-Serving reads an empty name as the default.
        None | Some("" | SIGNATURE) => Ok(()),
        Some(other) => Err(ApiError::BadRequest(format!(
            "signature_name {other:?} not found: an ONNX model has one signature, {SIGNATURE:?} (or leave signature_name out)"
        ))),
    }
}

/// `body` with TF-Serving's bare `NaN`, `Infinity` and `-Infinity` literals (which its parser
/// accepts and Python's `json.dumps` writes) quoted, as this server's JSON reads them; None when
/// it has none outside strings.
fn quote_special_floats(body: &[u8]) -> Option<Vec<u8>> {
    const TOKENS: [&[u8]; 3] = [b"NaN", b"Infinity", b"-Infinity"];
    let mut out = Vec::new();
    let (mut copied, mut i, mut in_string) = (0, 0, false);
    'scan: while i < body.len() {
        let c = body[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else if c == b'"' {
            in_string = true;
        } else if matches!(c, b'N' | b'I' | b'-') {
            for token in TOKENS {
                let end = i + token.len();
                let whole = body.get(end).is_none_or(|b| !b.is_ascii_alphanumeric());
                if body[i..].starts_with(token) && whole {
                    out.extend_from_slice(&body[copied..i]);
                    out.push(b'"');
                    out.extend_from_slice(token);
                    out.push(b'"');
                    (i, copied) = (end, end);
                    continue 'scan;
                }
            }
        }
        i += 1;
    }
    (copied > 0).then(|| {
        out.extend_from_slice(&body[copied..]);
        out
    })
}

/// One tensor being decoded from nested JSON lists: the elements go straight into the writer while
/// the shape is tracked, and ragged lists are refused as soon as they appear.
struct Builder<'s> {
    spec: &'s TensorSpec,
    writer: ElementWriter,
    /// Length of each dimension, set by the first list seen at that depth.
    dims: Vec<Option<usize>>,
    /// Depth of the elements, set by the first element (or empty list) seen.
    rank: Option<usize>,
    /// Instances fed so far (row format with named inputs).
    rows: usize,
    /// Try the fast float path first (off only to compare against serde alone).
    fast: bool,
}

impl<'s> Builder<'s> {
    /// `body_len` bounds the element count: a JSON element takes at least one byte.
    fn new(spec: &'s TensorSpec, body_len: usize, fast: bool) -> Builder<'s> {
        Builder {
            spec,
            writer: ElementWriter::new(spec.datatype, body_len / 2 + 1, body_len + 1),
            dims: Vec::new(),
            rank: None,
            rows: 0,
            fast,
        }
    }

    fn bad(&self, m: impl std::fmt::Display) -> ApiError {
        ApiError::BadRequest(format!("input {:?}: {m}", self.spec.name))
    }

    /// Streams one nested value in at `depth` (0 for a whole tensor, 1 for one row of a stacked
    /// tensor).
    fn feed(&mut self, raw: &RawValue, depth: usize) -> Result<(), ApiError> {
        if self.fast && self.feed_floats(raw, depth) {
            return Ok(());
        }
        let mut de = serde_json::Deserializer::from_str(raw.get());
        Nested { b: self, depth }
            .deserialize(&mut de)
            .map_err(|e| self.bad(e))
    }

    /// Feeds FP32/FP64 lists through the fast float path when they are rectangular and agree with
    /// what was fed before; `false`, having changed nothing, when the general path must decide.
    fn feed_floats(&mut self, raw: &RawValue, depth: usize) -> bool {
        if !matches!(self.spec.datatype, DataType::F32 | DataType::F64) {
            return false;
        }
        let (dtype, max_depth) = (self.spec.datatype, MAX_DATA_DEPTH.saturating_sub(depth));
        let (rank, dims) = (self.rank, &self.dims);
        // The shape must agree with what was fed before, else the general path decides.
        let agrees = |shape: &[usize]| {
            let rank_here = depth + shape.len();
            rank.is_none_or(|r| r == rank_here)
                && dims.iter().skip(rank_here).all(Option::is_none)
                && shape
                    .iter()
                    .enumerate()
                    .all(|(k, &n)| dims.get(depth + k).copied().flatten().is_none_or(|m| m == n))
        };
        let Some(shape) = self.writer.append_le(|out, room| {
            crate::jsonfloat::parse_shaped(raw.get().as_bytes(), dtype, max_depth, room, out)
                .filter(|shape| agrees(shape))
        }) else {
            return false;
        };
        let rank = depth + shape.len();
        if self.dims.len() < rank {
            self.dims.resize(rank, None);
        }
        for (k, n) in shape.into_iter().enumerate() {
            self.dims[depth + k] = Some(n);
        }
        self.rank = Some(rank);
        true
    }

    /// The tensor, with `rows` prepended to the shape when the values were stacked rows.
    fn finish(self, stacked: bool) -> Result<Tensor, ApiError> {
        let rank = self.rank.unwrap_or(self.dims.len());
        let mut shape: Vec<usize> = self.dims.iter().take(rank).map(|d| d.unwrap_or(0)).collect();
        if stacked {
            match shape.first_mut() {
                Some(first) => *first = self.rows,
                None => shape.push(self.rows),
            }
        }
        let (spec, writer) = (self.spec, self.writer);
        writer
            .finish(spec.name.clone(), shape)
            .map_err(|e| ApiError::BadRequest(format!("input {:?}: {e}", spec.name)))
    }

    /// An element at `depth`: it fixes the rank, or must agree with it.
    fn element<E: serde::de::Error>(&mut self, depth: usize) -> Result<&mut ElementWriter, E> {
        match self.rank {
            None => self.rank = Some(depth),
            Some(r) if r == depth => {}
            Some(_) => return Err(E::custom("ragged list: a single value where a list was expected")),
        }
        Ok(&mut self.writer)
    }
}

/// Visits one nested value of a [`Builder`] at a depth.
struct Nested<'b, 's> {
    b: &'b mut Builder<'s>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Nested<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Nested<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nested lists of {} values", self.b.spec.datatype)
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.b.element(self.depth)?.push_bool(v).map_err(E::custom)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.b.element(self.depth)?.push_i64(v).map_err(E::custom)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.b.element(self.depth)?.push_u64(v).map_err(E::custom)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.b.element(self.depth)?.push_f64(v).map_err(E::custom)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.b.element(self.depth)?.push_str(v).map_err(E::custom)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(E::custom("null is not a tensor element"))
    }

    /// `{"b64": "..."}` is one BYTES element; any other object is an error.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let not_b64 = || {
            A::Error::custom("an object where a tensor element was expected (only {\"b64\": \"...\"} is one)")
        };
        let key: Option<std::borrow::Cow<'de, str>> = map.next_key()?;
        if key.as_deref() != Some("b64") {
            return Err(not_b64());
        }
        let text: std::borrow::Cow<'de, str> = map.next_value()?;
        if map.next_key::<IgnoredAny>()?.is_some() {
            return Err(not_b64());
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|e| A::Error::custom(format!("invalid base64 in {{\"b64\": ...}}: {e}")))?;
        self.b
            .element(self.depth)?
            .push_bytes(Bytes::from(raw))
            .map_err(A::Error::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.depth;
        if depth >= MAX_DATA_DEPTH {
            return Err(A::Error::custom(format!(
                "lists nested deeper than {MAX_DATA_DEPTH} levels"
            )));
        }
        if self.b.rank.is_some_and(|r| depth >= r) {
            return Err(A::Error::custom(
                "ragged list: a list where a single value was expected",
            ));
        }
        if self.b.dims.len() <= depth {
            self.b.dims.resize(depth + 1, None);
        }
        let b = self.b;
        let mut n = 0usize;
        while seq
            .next_element_seed(Nested {
                b: &mut *b,
                depth: depth + 1,
            })?
            .is_some()
        {
            n += 1;
        }
        match b.dims[depth] {
            None => b.dims[depth] = Some(n),
            Some(m) if m != n => {
                return Err(A::Error::custom(format!(
                    "ragged list: expected {m} elements, found {n}"
                )));
            }
            Some(_) => {}
        }
        if n == 0 && b.rank.is_none() {
            b.rank = Some(depth + 1);
        }
        Ok(())
    }
}

/// The first non-blank character of a JSON value.
fn first_char(raw: &RawValue) -> Option<char> {
    raw.get().trim_start().chars().next()
}

/// An object of named values that refuses a name given twice: serde keeps the last, so
/// `{"a": …, "a": …}` would silently drop one (V2 refuses the same mistake).
struct UniqueNames<'a>(BTreeMap<String, &'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for UniqueNames<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = UniqueNames<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of named values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueNames<'a>, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    if out.contains_key(&k) {
                        return Err(A::Error::custom(format!("input {k:?} given more than once")));
                    }
                    // A name takes a few bytes of body and a map entry of about a hundred: stop
                    // where no model's inputs reach (as V2's lists do).
                    if out.len() == MAX_TENSORS {
                        return Err(A::Error::custom(format!(
                            "more than {MAX_TENSORS} named inputs in one object"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueNames(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// `{"b64": "..."}`: one BYTES value, not an object naming inputs.
fn is_b64(map: &BTreeMap<String, &RawValue>) -> bool {
    map.len() == 1 && map.get("b64").is_some_and(|v| first_char(v) == Some('"'))
}

/// The first element of a JSON list, parsed alone (the rest is left unread).
fn first_element(list: &RawValue) -> Result<Option<&RawValue>, ApiError> {
    let text = list.get().trim_start();
    let rest = text.strip_prefix('[').unwrap_or(text).trim_start();
    if rest.starts_with(']') {
        return Ok(None);
    }
    let mut de = serde_json::Deserializer::from_str(rest);
    <&RawValue>::deserialize(&mut de)
        .map(Some)
        .map_err(|e| json_error("predict request JSON", &e))
}

/// Named row format: every instance is an object naming the inputs; each input's values are
/// stacked along a new first dimension, streamed without a tree of the instances.
struct NamedRows<'b, 's> {
    sig: &'s Signature,
    body_len: usize,
    fast: bool,
    builders: &'b mut Vec<Builder<'s>>,
    /// A request error found inside the visitor, kept whole (serde's error type is only a string).
    failure: &'b mut Option<ApiError>,
}

impl<'de> DeserializeSeed<'de> for NamedRows<'_, '_> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for NamedRows<'_, '_> {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of objects naming the inputs")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<usize, A::Error> {
        let mut rows = 0;
        while let Some(UniqueNames(instance)) = seq.next_element::<UniqueNames<'de>>()? {
            if let Err(e) = self.instance(rows, &instance) {
                *self.failure = Some(e);
                return Err(A::Error::custom("rejected"));
            }
            rows += 1;
        }
        Ok(rows)
    }
}

impl<'s> NamedRows<'_, 's> {
    fn instance(&mut self, row: usize, instance: &BTreeMap<String, &RawValue>) -> Result<(), ApiError> {
        let lacks = |name: &str| {
            ApiError::BadRequest(format!(
                "an instance lacks input {name:?}; every instance needs the same inputs"
            ))
        };
        if is_b64(instance) {
            return Err(ApiError::BadRequest(
                "every instance must be an object naming the inputs, or none: {\"b64\": ...} is a value"
                    .into(),
            ));
        }
        for (name, value) in instance {
            let index = match self.builders.iter().position(|b| &b.spec.name == name) {
                Some(i) => i,
                None if row > 0 => return Err(lacks(name)),
                None => {
                    self.builders.push(Builder::new(
                        input_spec(self.sig, name)?,
                        self.body_len,
                        self.fast,
                    ));
                    self.builders.len() - 1
                }
            };
            let b = &mut self.builders[index];
            if b.dims.is_empty() {
                b.dims.push(None);
            }
            b.feed(value, 1)?;
            b.rows += 1;
        }
        match self.builders.iter().find(|b| b.rows != row + 1) {
            Some(b) => Err(lacks(&b.spec.name)),
            None => Ok(()),
        }
    }
}

/// Decodes a `:predict` body.
pub fn decode_request(sig: &Signature, body: &[u8]) -> Result<PredictRequest, ApiError> {
    decode_request_with(sig, body, true)
}

/// [`decode_request`], with the fast float path for FP32/FP64 lists on or off. Off is serde
/// alone, which the fast path must always agree with: the tests compare the two.
pub fn decode_request_with(sig: &Signature, body: &[u8], fast: bool) -> Result<PredictRequest, ApiError> {
    let first = decode_json(sig, body, fast);
    // Bare NaN and infinities are not JSON: looked for only once the body failed as JSON, so a
    // valid body pays nothing for them.
    match (&first, quote_special_floats(body)) {
        (Err(ApiError::BadRequest(_)), Some(quoted)) => decode_json(sig, &quoted, fast),
        _ => first,
    }
}

fn decode_json(sig: &Signature, body: &[u8], fast: bool) -> Result<PredictRequest, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::BadRequest(format!("the request body is not UTF-8 text: {e}")))?;
    if !text.trim_start().starts_with('{') {
        return Err(ApiError::BadRequest(
            "the request must be a JSON object with \"instances\" or \"inputs\"".into(),
        ));
    }
    if fast && let Some(request) = one_pass(sig, body) {
        return Ok(request);
    }
    let parsed: Body = serde_json::from_str(text).map_err(|e| json_error("predict request JSON", &e))?;
    check_signature(parsed.signature_name.as_deref())?;
    let single = match sig.inputs.as_slice() {
        [only] => Some(only),
        _ => None,
    };
    let body_len = body.len();
    match (parsed.instances, parsed.inputs) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "give either \"instances\" (row format) or \"inputs\" (columnar format), not both".into(),
        )),
        (None, None) => Err(ApiError::BadRequest(
            "the request needs \"instances\" (row format) or \"inputs\" (columnar format)".into(),
        )),
        (Some(instances), None) => {
            if first_char(instances) != Some('[') {
                return Err(ApiError::BadRequest("\"instances\" must be a list".into()));
            }
            // Only an object needs reading to tell named instances from a {"b64": ...} value: a
            // first instance that is a list (often the whole tensor) is not scanned twice.
            let rest = instances
                .get()
                .trim_start()
                .strip_prefix('[')
                .unwrap_or_default()
                .trim_start();
            if rest.starts_with(']') {
                return Err(ApiError::BadRequest("\"instances\" is empty".into()));
            }
            let named = rest.starts_with('{')
                && first_element(instances)?.is_some_and(|first| {
                    !serde_json::from_str::<UniqueNames<'_>>(first.get()).is_ok_and(|m| is_b64(&m.0))
                });
            let inputs = if named {
                let mut builders = Vec::new();
                let mut failure = None;
                let mut de = serde_json::Deserializer::from_str(instances.get());
                let rows = NamedRows {
                    sig,
                    body_len,
                    fast,
                    builders: &mut builders,
                    failure: &mut failure,
                }
                .deserialize(&mut de);
                if let Some(e) = failure {
                    return Err(e);
                }
                rows.map_err(|e| {
                    ApiError::BadRequest(format!(
                        "\"instances\": every instance must be an object naming the inputs ({e})"
                    ))
                })?;
                builders
                    .into_iter()
                    .map(|b| b.finish(true))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                let spec = single.ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "the model has {} inputs: each instance must be an object naming them",
                        sig.inputs.len()
                    ))
                })?;
                // The list of instances is the stacked tensor itself.
                let mut b = Builder::new(spec, body_len, fast);
                b.feed(instances, 0)?;
                vec![b.finish(false)?]
            };
            Ok(PredictRequest {
                format: Format::Row,
                inputs,
            })
        }
        (None, Some(inputs)) => {
            let named = match first_char(inputs) {
                Some('{') => {
                    let UniqueNames(map) = serde_json::from_str(inputs.get())
                        .map_err(|e| json_error("\"inputs\" object", &e))?;
                    (!is_b64(&map)).then_some(map)
                }
                _ => None,
            };
            let tensors = match (named, single) {
                (Some(map), _) => map
                    .iter()
                    .map(|(name, v)| {
                        let mut b = Builder::new(input_spec(sig, name)?, body_len, fast);
                        b.feed(v, 0)?;
                        b.finish(false)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                (None, Some(spec)) => {
                    let mut b = Builder::new(spec, body_len, fast);
                    b.feed(inputs, 0)?;
                    vec![b.finish(false)?]
                }
                (None, None) => {
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

/// The commonest `:predict` body, decoded in one pass: a model with one FP32/FP64 input, and
/// `instances` or `inputs` holding its values as nested lists (the list of instances is the
/// stacked tensor itself). `None` for anything else, which serde decodes.
fn one_pass(sig: &Signature, body: &[u8]) -> Option<PredictRequest> {
    let [spec] = sig.inputs.as_slice() else {
        return None;
    };
    let found = crate::jsonfloat::lone_member_floats(
        body,
        [b"instances", b"inputs"],
        spec.datatype,
        MAX_DATA_DEPTH,
        body.len() + 1,
    )?;
    // The pass only stepped over the other members: serde checks that the rest is JSON.
    let rest = [&body[..found.span.start], b"null", &body[found.span.end..]].concat();
    let rest: Rest = serde_json::from_slice(&rest).ok()?;
    // A signature refused is worded by the general path.
    check_signature(rest.signature_name.as_deref()).ok()?;
    let data = TensorData::Raw(found.bytes.into());
    let tensor = Tensor::new(spec.name.clone(), spec.datatype, found.shape, data).ok()?;
    Some(PredictRequest {
        format: if found.key == 0 {
            Format::Row
        } else {
            Format::Columnar
        },
        inputs: vec![tensor],
    })
}

/// Encodes the `:predict` response: `{"predictions": ...}` in the row format (one object per row
/// naming every output when there are several), `{"outputs": ...}` in the columnar format. The
/// elements are written straight from the tensors, never built as a `Value` tree.
pub fn encode_response(format: Format, outputs: &[Tensor]) -> Result<Vec<u8>, ApiError> {
    let rows = match (format, outputs) {
        (Format::Row, [_, _, ..]) => {
            let rows = outputs
                .first()
                .and_then(|t| t.shape.first())
                .copied()
                .unwrap_or(0);
            if let Some(t) = outputs.iter().find(|t| t.shape.first() != Some(&rows)) {
                return Err(ApiError::BadRequest(format!(
                    "output {:?} has no batch dimension of {rows} rows; use the columnar format (\"inputs\")",
                    t.name
                )));
            }
            rows
        }
        _ => 0,
    };
    // Outputs by name, as TF-Serving lists them.
    let mut by_name: Vec<&Tensor> = outputs.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    serde_json::to_vec(&PredictResponse {
        format,
        outputs: &by_name,
        rows,
    })
    .map_err(|e| ApiError::Internal(format!("failed to encode the response: {e}")))
}

struct PredictResponse<'a> {
    format: Format,
    outputs: &'a [&'a Tensor],
    rows: usize,
}

impl Serialize for PredictResponse<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut top = s.serialize_map(Some(1))?;
        match (self.format, self.outputs) {
            (Format::Row, [only]) => top.serialize_entry("predictions", &only.json_elements(true))?,
            (Format::Columnar, [only]) => top.serialize_entry("outputs", &only.json_elements(true))?,
            (Format::Columnar, many) => top.serialize_entry(
                "outputs",
                &Named {
                    outputs: many,
                    row: None,
                },
            )?,
            (Format::Row, many) => top.serialize_entry(
                "predictions",
                &Rows {
                    outputs: many,
                    rows: self.rows,
                },
            )?,
        }
        top.end()
    }
}

/// One `{name: row elements, ...}` object per row (every output has `rows` rows).
struct Rows<'a> {
    outputs: &'a [&'a Tensor],
    rows: usize,
}

impl Serialize for Rows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut list = s.serialize_seq(Some(self.rows))?;
        for row in 0..self.rows {
            list.serialize_element(&Named {
                outputs: self.outputs,
                row: Some(row),
            })?;
        }
        list.end()
    }
}

/// `{name: elements, ...}` for every output: whole (columnar), or one row of each.
struct Named<'a> {
    outputs: &'a [&'a Tensor],
    row: Option<usize>,
}

impl Serialize for Named<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.outputs.len()))?;
        for t in self.outputs {
            let elements = match self.row {
                None => t.json_elements(true),
                Some(row) => t.json_row(row).ok_or_else(|| {
                    serde::ser::Error::custom(format!("output {:?} has no row {row}", t.name))
                })?,
            };
            m.serialize_entry(&t.name, &elements)?;
        }
        m.end()
    }
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
            leading_dim_conflict: None,
        }
    }

    #[test]
    fn bare_nan_and_infinities_are_quoted_outside_strings_only() {
        let quoted =
            |b: &str| quote_special_floats(b.as_bytes()).map(|v| String::from_utf8(v).unwrap_or_default());
        assert_eq!(
            quoted(r#"{"inputs": [NaN, Infinity,-Infinity]}"#).as_deref(),
            Some(r#"{"inputs": ["NaN", "Infinity","-Infinity"]}"#)
        );
        assert_eq!(quoted(r#"{"NaN": "Infinity \" NaN", "inputs": [1]}"#), None);
        assert_eq!(quoted(r#"{"inputs": [NaNa, Infinityx]}"#), None);
        assert_eq!(quoted(r#"{"inputs": [-1, 2]}"#), None);
        let s = sig(&[("x", DataType::F64, &[-1])]);
        for fast in [true, false] {
            let r = decode_request_with(&s, br#"{"instances": [NaN, -Infinity, 2]}"#, fast);
            let values: Vec<f64> = match r.map(|r| r.inputs[0].data.clone()) {
                Ok(TensorData::Raw(b)) => b
                    .chunks(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect(),
                other => panic!("{other:?}"),
            };
            assert!(values[0].is_nan() && values[1] == f64::NEG_INFINITY && values[2] == 2.0);
        }
    }

    #[test]
    fn a_signature_other_than_the_default_is_refused_by_name() {
        let s = sig(&[("x", DataType::F32, &[-1])]);
        for fast in [true, false] {
            for ok in [
                r#"{"instances": [1]}"#,
                r#"{"signature_name": "", "instances": [1]}"#,
                r#"{"signature_name": "serving_default", "instances": [1]}"#,
            ] {
                assert!(decode_request_with(&s, ok.as_bytes(), fast).is_ok(), "{ok}");
            }
            let e = decode_request_with(&s, br#"{"signature_name": "predict", "instances": [1]}"#, fast);
            assert!(
                matches!(&e, Err(ApiError::BadRequest(m)) if m.contains("\"predict\"") && m.contains("serving_default")),
                "{e:?}"
            );
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
    fn shapes_are_tracked_while_streaming() {
        let s = sig(&[("x", DataType::F32, &[-1, -1])]);
        let shape = |body: &[u8]| decode_request(&s, body).map(|r| r.inputs[0].shape.clone());
        assert_eq!(shape(br#"{"instances": [[1,2,3],[4,5,6]]}"#).unwrap(), vec![2, 3]);
        assert_eq!(
            shape(br#"{"inputs": [[[1],[2]],[[3],[4]]]}"#).unwrap(),
            vec![2, 2, 1]
        );
        assert_eq!(shape(br#"{"inputs": [[], []]}"#).unwrap(), vec![2, 0]);
        assert_eq!(shape(br#"{"inputs": 7}"#).unwrap(), Vec::<usize>::new());
        assert_eq!(
            shape(br#"{"instances": [{"x": [1, 2]}, {"x": [3, 4]}]}"#).unwrap(),
            vec![2, 2]
        );
        for ragged in [
            &br#"{"instances": [[1,2],[3]]}"#[..],
            br#"{"instances": [[1,2],3]}"#,
            br#"{"instances": [1,[2]]}"#,
            br#"{"inputs": [[], [[1]]]}"#,
            br#"{"instances": [{"x": [1, 2]}, {"x": [3]}]}"#,
        ] {
            let e = shape(ragged).unwrap_err().to_string();
            assert!(e.contains("ragged"), "{e}");
        }
    }

    #[test]
    fn named_instances_must_all_name_the_same_inputs() {
        let s = sig(&[("a", DataType::I64, &[-1]), ("b", DataType::I64, &[-1])]);
        for (body, want) in [
            (
                &br#"{"instances": [{"a": 1, "b": 2}, {"a": 3}]}"#[..],
                "lacks input \"b\"",
            ),
            (
                br#"{"instances": [{"a": 1}, {"a": 3, "b": 2}]}"#,
                "lacks input \"b\"",
            ),
            (
                br#"{"instances": [{"a": 1, "b": 2}, 5]}"#,
                "every instance must be an object",
            ),
            (br#"{"instances": [{"a": 1, "c": 2}]}"#, "unknown input \"c\""),
            (
                br#"{"instances": [{"a": null, "b": 1}]}"#,
                "null is not a tensor element",
            ),
            (
                br#"{"instances": [{"a": {"c": 1}, "b": 1}]}"#,
                "an object where a tensor element",
            ),
            (br#"{"instances": []}"#, "\"instances\" is empty"),
            (br#"{"instances": {"a": 1}}"#, "must be a list"),
            (b"{\"instances\": [1, 2]}\xff", "not UTF-8"),
        ] {
            let e = decode_request(&s, body).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
        let r = decode_request(&s, br#"{"instances": [{"a": 1, "b": 2}, {"b": 4, "a": 3}]}"#).unwrap();
        let a = r.inputs.iter().find(|t| t.name == "a").unwrap();
        assert_eq!(a.shape, vec![2]);
        assert_eq!(
            a.to_binary().as_ref(),
            [1i64.to_le_bytes(), 3i64.to_le_bytes()].concat()
        );
    }

    #[test]
    fn b64_values_are_elements_in_both_formats() {
        let s = sig(&[("t", DataType::Bytes, &[-1])]);
        for body in [
            &br#"{"instances": [{"b64": "aGk="}]}"#[..],
            br#"{"inputs": [{"b64": "aGk="}]}"#,
        ] {
            let r = decode_request(&s, body).unwrap();
            assert_eq!(r.inputs[0].to_binary().as_ref(), &[2, 0, 0, 0, b'h', b'i']);
        }
        let r = decode_request(&s, br#"{"inputs": {"b64": "aGk="}}"#).unwrap();
        assert_eq!(r.inputs[0].shape, Vec::<usize>::new());
        let e = decode_request(&s, br#"{"inputs": [{"b64": "%%"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid base64"), "{e}");
    }

    #[test]
    fn row_responses_nest_by_row() {
        let mut w = ElementWriter::new(DataType::F32, 4, 4);
        for v in [1, 2, 3, 4] {
            w.push_i64(v).unwrap();
        }
        let t = w.finish("y", vec![2, 2]).unwrap();
        let v: Value =
            serde_json::from_slice(&encode_response(Format::Row, std::slice::from_ref(&t)).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"predictions": [[1.0, 2.0], [3.0, 4.0]]}));
        let mut t2 = t.clone();
        t2.name = "z".into();
        let v: Value = serde_json::from_slice(&encode_response(Format::Row, &[t, t2]).unwrap()).unwrap();
        assert_eq!(v["predictions"][1]["z"], serde_json::json!([3.0, 4.0]));
    }

    /// What the response was when it was built as a `Value` tree: the reference for the encoder
    /// that writes straight from the tensors.
    fn as_value_tree(format: Format, outputs: &[Tensor]) -> Result<Value, String> {
        let nested = |t: &Tensor| serde_json::to_value(t.json_elements(true)).unwrap();
        Ok(match (format, outputs) {
            (Format::Row, [only]) => serde_json::json!({ "predictions": nested(only) }),
            (Format::Columnar, [only]) => serde_json::json!({ "outputs": nested(only) }),
            (Format::Columnar, many) => {
                let m: Map<String, Value> = many.iter().map(|t| (t.name.clone(), nested(t))).collect();
                serde_json::json!({ "outputs": m })
            }
            (Format::Row, many) => {
                let rows = many.first().and_then(|t| t.shape.first()).copied().unwrap_or(0);
                let mut per_row: Vec<Map<String, Value>> = vec![Map::new(); rows];
                for t in many {
                    match nested(t) {
                        Value::Array(items) if items.len() == rows => {
                            for (row, item) in per_row.iter_mut().zip(items) {
                                row.insert(t.name.clone(), item);
                            }
                        }
                        _ => return Err(t.name.clone()),
                    }
                }
                serde_json::json!({ "predictions": per_row })
            }
        })
    }

    #[test]
    fn responses_equal_the_value_tree_they_replace() {
        let tensor = |name: &str, dtype: DataType, shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            let mut w = ElementWriter::new(dtype, n, n);
            for i in 0..n {
                match dtype {
                    DataType::Bytes => w.push_str(&format!("s\"{i}")).unwrap(),
                    DataType::Bool => w.push_bool(i % 2 == 0).unwrap(),
                    DataType::F32 => w
                        .push_f64([0.1, -2.5e-7, f64::NAN, 3e30][i % 4] * i as f64)
                        .unwrap(),
                    _ => w.push_i64(i as i64 - 3).unwrap(),
                }
            }
            w.finish(name, shape).unwrap()
        };
        let sets = [
            vec![tensor("y", DataType::F32, vec![2, 3])],
            vec![tensor("y", DataType::F32, vec![])],
            vec![tensor("y", DataType::F32, vec![0, 4])],
            vec![
                tensor("b", DataType::F32, vec![2, 2, 2]),
                tensor("a", DataType::I64, vec![2]),
            ],
            vec![
                tensor("z", DataType::Bytes, vec![3, 1]),
                tensor("m", DataType::Bool, vec![3, 2]),
            ],
            vec![
                tensor("y", DataType::F32, vec![2, 3]),
                tensor("w", DataType::I32, vec![3, 2]),
            ],
            vec![
                tensor("y", DataType::F32, vec![2, 3]),
                tensor("s", DataType::F32, vec![]),
            ],
            vec![],
        ];
        for outputs in sets {
            for format in [Format::Row, Format::Columnar] {
                let direct = encode_response(format, &outputs)
                    .map(|b| serde_json::from_slice::<Value>(&b).unwrap())
                    .map_err(|e| e.to_string());
                let tree = as_value_tree(format, &outputs);
                match (&direct, &tree) {
                    // Floats compare as the f32 they encode: the tree widened them to f64 first.
                    (Ok(d), Ok(t)) => assert_eq!(as_f32(d), as_f32(t), "{format:?} {outputs:?}"),
                    (Err(d), Err(name)) => {
                        assert!(d.contains(&format!("output {name:?} has no batch")), "{d}")
                    }
                    _ => panic!("{direct:?} against {tree:?}"),
                }
            }
        }
    }

    fn as_f32(v: &Value) -> Value {
        match v {
            Value::Number(n) if n.is_f64() => serde_json::json!(n.as_f64().map(|f| f as f32)),
            Value::Array(a) => Value::Array(a.iter().map(as_f32).collect()),
            Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), as_f32(v))).collect()),
            other => other.clone(),
        }
    }

    /// Nested values of every kind the fast float path meets, and some it must hand back.
    const VALUES: [&str; 24] = [
        "[[1,2],[3,4]]",
        "[[[1,2]],[[3,4]]]",
        " [ [ 0.5 , -2.5e-3 ] ,\n [ 3 , 1E2 ] ] ",
        "[[-0, 5e-324], [6.02214076e23, 1e39]]",
        "[1,2]",
        "[[1,2]]",
        "7",
        "[[1,2],[3]]",
        "[[1,2],[[3],4]]",
        "[[1,2],3]",
        "[]",
        "[[]]",
        "[[],[]]",
        "[[1,\"2\"]]",
        "[[1,true]]",
        "[[1e400,1]]",
        "[[01,2]]",
        "[[1.,2]]",
        "[[12345678901234567890,1]]",
        "[[{\"b64\":\"aGk=\"}]]",
        "[[1,2],[3,4]",
        "[[1,2],[3,4]]]",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        "[[1,null]]",
    ];

    fn v1_bodies() -> Vec<String> {
        let mut out = Vec::new();
        for v in VALUES {
            out.push(format!(r#"{{"instances": {v}}}"#));
            out.push(format!(r#"{{"inputs": {v}}}"#));
            out.push(format!(r#"{{"inputs": {{"x": {v}, "i": [[5]]}}}}"#));
            for w in VALUES {
                out.push(format!(
                    r#"{{"instances": [{{"x": {v}, "i": [1]}}, {{"i": [2], "x": {w}}}]}}"#
                ));
            }
        }
        out.extend(
            [
                r#"{"signature_name": "serving_default", "instances": [[1,2],[3,4]]}"#,
                r#"{"instances": [[1,2]], "meta": {"instances": [[9]], "s": "\"}"}}"#,
                r#"{"instances": [[1,2]], "instances": [[3,4]]}"#,
                r#"{"instances": [[1,2]], "inputs": [[1,2]]}"#,
                r#"{"instances": [[1,2]]} x"#,
                r#"{"instances": [[1,2]],}"#,
                r#"{"inputs": null}"#,
                r#"{"instances": {"x": [[1,2]]}}"#,
                "{}",
            ]
            .map(str::to_string),
        );
        out
    }

    fn v1_sigs() -> [Signature; 3] {
        [
            sig(&[("x", DataType::F32, &[-1, 2])]),
            sig(&[("x", DataType::F64, &[-1, -1, -1])]),
            sig(&[("x", DataType::F32, &[-1, 2]), ("i", DataType::I64, &[-1, 1])]),
        ]
    }

    #[test]
    fn the_fast_float_path_answers_exactly_as_serde_alone() {
        let mut ok = 0;
        for s in v1_sigs() {
            for body in v1_bodies() {
                let fast = format!("{:?}", decode_request_with(&s, body.as_bytes(), true));
                let general = format!("{:?}", decode_request_with(&s, body.as_bytes(), false));
                assert_eq!(fast, general, "{body}");
                ok += usize::from(fast.starts_with("Ok"));
            }
        }
        // Not vacuous: many bodies decoded.
        assert!(ok > 50, "{ok} decoded");
    }

    #[test]
    fn mangled_predict_bodies_answer_exactly_as_serde_alone() {
        let sigs = v1_sigs();
        let bodies = v1_bodies();
        for (n, body) in crate::jsonfloat::mangled(&bodies, 0x0fed_cba9_8765_4321, 20_000).enumerate() {
            let s = &sigs[n % sigs.len()];
            let fast = format!("{:?}", decode_request_with(s, &body, true));
            let general = format!("{:?}", decode_request_with(s, &body, false));
            assert_eq!(fast, general, "{}", String::from_utf8_lossy(&body));
        }
    }
}
