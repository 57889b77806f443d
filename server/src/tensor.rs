//! The one protocol-neutral tensor type.
//!
//! Protocol codecs decode into [`Tensor`], the backend consumes and produces it, so protocols and the
//! runtime never know each other. Fixed-size elements are kept as little-endian bytes (the wire format
//! of the binary extension, so binary input needs no conversion); BYTES tensors as a list of byte strings.

use bytes::Bytes;
use half::{bf16, f16};
use serde::ser::{Serialize, SerializeSeq, Serializer};

/// Element types, named as in the KServe V2 protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `BOOL`, one byte, 0 or 1.
    Bool,
    /// `UINT8`
    U8,
    /// `UINT16`
    U16,
    /// `UINT32`
    U32,
    /// `UINT64`
    U64,
    /// `INT8`
    I8,
    /// `INT16`
    I16,
    /// `INT32`
    I32,
    /// `INT64`
    I64,
    /// `FP16` (IEEE half precision)
    F16,
    /// `BF16` (bfloat16)
    BF16,
    /// `FP32`
    F32,
    /// `FP64`
    F64,
    /// `BYTES`: variable-length byte strings (ONNX string tensors).
    Bytes,
}

/// Every data type, in a stable order (for tests and listings).
pub const ALL_DATA_TYPES: [DataType; 14] = [
    DataType::Bool,
    DataType::U8,
    DataType::U16,
    DataType::U32,
    DataType::U64,
    DataType::I8,
    DataType::I16,
    DataType::I32,
    DataType::I64,
    DataType::F16,
    DataType::BF16,
    DataType::F32,
    DataType::F64,
    DataType::Bytes,
];

impl DataType {
    /// The KServe V2 name (`FP32`, `BYTES`, …).
    pub fn v2_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::BF16 => "BF16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// The Triton model-configuration name (`TYPE_FP32`, `TYPE_STRING`, …).
    pub fn triton_name(self) -> &'static str {
        match self {
            DataType::Bool => "TYPE_BOOL",
            DataType::U8 => "TYPE_UINT8",
            DataType::U16 => "TYPE_UINT16",
            DataType::U32 => "TYPE_UINT32",
            DataType::U64 => "TYPE_UINT64",
            DataType::I8 => "TYPE_INT8",
            DataType::I16 => "TYPE_INT16",
            DataType::I32 => "TYPE_INT32",
            DataType::I64 => "TYPE_INT64",
            DataType::F16 => "TYPE_FP16",
            DataType::BF16 => "TYPE_BF16",
            DataType::F32 => "TYPE_FP32",
            DataType::F64 => "TYPE_FP64",
            DataType::Bytes => "TYPE_STRING",
        }
    }

    /// The type a Triton model-configuration name stands for ([`DataType::triton_name`]).
    pub fn from_triton_name(name: &str) -> Option<DataType> {
        let v2 = match name.strip_prefix("TYPE_")? {
            "STRING" => "BYTES",
            "BYTES" => return None,
            other => other,
        };
        DataType::from_v2_name(v2)
    }

    /// The TF-Serving / TensorFlow name (`DT_FLOAT`, …), used by the V1 metadata endpoint.
    pub fn tf_name(self) -> &'static str {
        match self {
            DataType::Bool => "DT_BOOL",
            DataType::U8 => "DT_UINT8",
            DataType::U16 => "DT_UINT16",
            DataType::U32 => "DT_UINT32",
            DataType::U64 => "DT_UINT64",
            DataType::I8 => "DT_INT8",
            DataType::I16 => "DT_INT16",
            DataType::I32 => "DT_INT32",
            DataType::I64 => "DT_INT64",
            DataType::F16 => "DT_HALF",
            DataType::BF16 => "DT_BFLOAT16",
            DataType::F32 => "DT_FLOAT",
            DataType::F64 => "DT_DOUBLE",
            DataType::Bytes => "DT_STRING",
        }
    }

    /// Parses a V2 name.
    pub fn from_v2_name(name: &str) -> Option<DataType> {
        ALL_DATA_TYPES.into_iter().find(|d| d.v2_name() == name)
    }

    /// Size of one element in bytes; `None` for BYTES.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 | DataType::BF16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.v2_name())
    }
}

/// Errors building or reading tensors. Messages say what is wrong and how to fix it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    /// A value that cannot be represented in the element type.
    #[error("value {value} is not a valid {dtype} element{hint}")]
    BadElement {
        /// The offending value as written by the client.
        value: String,
        /// The element type expected.
        dtype: DataType,
        /// Extra advice.
        hint: &'static str,
    },
    /// Shape arithmetic overflowed or the shape has a negative dimension.
    #[error("shape {0:?} is invalid: dimensions must be non-negative and their product must fit in memory")]
    BadShape(Vec<i64>),
    /// Raw data whose length does not match the shape.
    #[error("tensor data is {actual} bytes but shape {shape:?} of {dtype} needs {expected} bytes")]
    ByteSizeMismatch {
        /// Bytes received.
        actual: usize,
        /// Bytes needed.
        expected: usize,
        /// The declared shape.
        shape: Vec<usize>,
        /// The element type.
        dtype: DataType,
    },
    /// BYTES tensor serialisation that does not parse (binary extension).
    #[error("malformed BYTES tensor data: {0}")]
    BadBytesEncoding(String),
    /// A shape with more dimensions than any tensor has.
    #[error("shape has {0} dimensions, more than {MAX_DIMS}")]
    TooManyDims(usize),
}

/// The most dimensions a shape may have (NumPy's limit; ONNX models have far fewer). A longer
/// shape costs 8 bytes a dimension for 1 or 2 on the wire, and its error message more.
pub const MAX_DIMS: usize = 64;

/// Tensor contents.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// Fixed-size elements, little-endian, row-major.
    Raw(Bytes),
    /// BYTES elements, row-major.
    Strings(Vec<Bytes>),
}

/// A named tensor with its type, shape and data.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Input or output name.
    pub name: String,
    /// Element type.
    pub dtype: DataType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Contents; length always agrees with `shape` and `dtype` (checked by [`Tensor::new`]).
    pub data: TensorData,
}

/// The largest input a warm-up run builds ([`Tensor::warm_up_zeros`]).
pub const MAX_WARM_UP_BYTES: usize = 1 << 30;

/// Number of elements of a shape given by a client, with overflow and sign checks.
pub fn element_count(shape: &[i64]) -> Result<usize, TensorError> {
    if shape.len() > MAX_DIMS {
        return Err(TensorError::TooManyDims(shape.len()));
    }
    let bad = || TensorError::BadShape(shape.to_vec());
    // The product of the non-zero dimensions is bounded too: [0, 2^62] holds nothing, but a row of
    // it (padding, strides, the runtime's own sizes) would overflow.
    let mut nonzero: usize = 1;
    let mut empty = false;
    for &d in shape {
        let d = usize::try_from(d).map_err(|_| bad())?;
        empty |= d == 0;
        nonzero = nonzero.checked_mul(d.max(1)).ok_or_else(bad)?;
    }
    // Even with no data, a shape whose byte size overflows is nonsense.
    nonzero.checked_mul(8).ok_or_else(bad)?;
    Ok(if empty { 0 } else { nonzero })
}

impl Tensor {
    /// Builds a tensor, checking that the data agrees with the shape.
    pub fn new(
        name: impl Into<String>,
        dtype: DataType,
        shape: Vec<usize>,
        data: TensorData,
    ) -> Result<Tensor, TensorError> {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let count = element_count(&dims)?;
        match (&data, dtype.size()) {
            (TensorData::Raw(b), Some(size)) => {
                let expected = count * size;
                if b.len() != expected {
                    return Err(TensorError::ByteSizeMismatch {
                        actual: b.len(),
                        expected,
                        shape,
                        dtype,
                    });
                }
                if dtype == DataType::Bool
                    && let Some(bad) = b.iter().find(|&&x| x > 1)
                {
                    return Err(TensorError::BadElement {
                        value: bad.to_string(),
                        dtype,
                        hint: " (BOOL bytes must be 0 or 1)",
                    });
                }
            }
            (TensorData::Strings(s), None) => {
                if s.len() != count {
                    return Err(TensorError::ByteSizeMismatch {
                        actual: s.len(),
                        expected: count,
                        shape,
                        dtype,
                    });
                }
            }
            _ => {
                return Err(TensorError::BadBytesEncoding(format!(
                    "data representation does not match datatype {dtype}"
                )));
            }
        }
        Ok(Tensor {
            name: name.into(),
            dtype,
            shape,
            data,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Zeros of `shape` for a warm-up run, unless they would take more than [`MAX_WARM_UP_BYTES`]
    /// (or their size overflows): a model file may declare a fixed input no request could carry.
    pub fn warm_up_zeros(name: &str, dtype: DataType, shape: Vec<usize>) -> Result<Tensor, String> {
        let bytes = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size().unwrap_or(std::mem::size_of::<Bytes>())));
        match bytes {
            Some(b) if b <= MAX_WARM_UP_BYTES => Ok(Tensor::zeros(name, dtype, shape)),
            _ => Err(format!(
                "input {name:?} of shape {shape:?} would take more than {} MiB of zeros",
                MAX_WARM_UP_BYTES >> 20
            )),
        }
    }

    /// Zeros (empty strings for BYTES) of `shape`; the caller bounds its size.
    pub fn zeros(name: impl Into<String>, dtype: DataType, shape: Vec<usize>) -> Tensor {
        let count: usize = shape.iter().product();
        let data = match dtype.size() {
            Some(size) => TensorData::Raw(Bytes::from(vec![0u8; count * size])),
            None => TensorData::Strings(vec![Bytes::new(); count]),
        };
        Tensor {
            name: name.into(),
            dtype,
            shape,
            data,
        }
    }

    /// The binary-extension encoding: raw little-endian bytes, or for BYTES each element as a
    /// 4-byte little-endian length followed by its bytes.
    pub fn to_binary(&self) -> Bytes {
        match &self.data {
            TensorData::Raw(b) => b.clone(),
            TensorData::Strings(items) => {
                let mut out = Vec::with_capacity(self.binary_len());
                for s in items {
                    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    out.extend_from_slice(s);
                }
                Bytes::from(out)
            }
        }
    }

    /// Decodes binary-extension data for a tensor of the given type and shape.
    pub fn from_binary(
        name: impl Into<String>,
        dtype: DataType,
        shape: Vec<usize>,
        raw: Bytes,
    ) -> Result<Tensor, TensorError> {
        if dtype.size().is_some() {
            return Tensor::new(name, dtype, shape, TensorData::Raw(raw));
        }
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let count = element_count(&dims)?;
        // An element is at least its 4-byte prefix in the body but 32 bytes in memory: stop at the
        // shape's count instead of listing whatever the body holds.
        let mut items = Vec::with_capacity(count.min(raw.len() / 4));
        let mut pos = 0usize;
        while pos < raw.len() {
            if items.len() == count {
                return Err(TensorError::BadBytesEncoding(format!(
                    "the data holds more than the {count} elements of shape {shape:?} ({} bytes left over)",
                    raw.len() - pos
                )));
            }
            let Some(len_bytes) = raw.get(pos..pos + 4) else {
                return Err(TensorError::BadBytesEncoding(format!(
                    "element {} has a truncated 4-byte length prefix at offset {pos}",
                    items.len()
                )));
            };
            let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
            let start = pos + 4;
            let end = start
                .checked_add(len)
                .filter(|&e| e <= raw.len())
                .ok_or_else(|| {
                    TensorError::BadBytesEncoding(format!(
                        "element {} declares {len} bytes but only {} remain",
                        items.len(),
                        raw.len() - start
                    ))
                })?;
            items.push(raw.slice(start..end));
            pos = end;
        }
        Tensor::new(name, dtype, shape, TensorData::Strings(items))
    }

    /// Bytes of the elements in the binary extension's form (BYTES: 4-byte length prefixes).
    pub fn binary_len(&self) -> usize {
        match &self.data {
            TensorData::Raw(b) => b.len(),
            TensorData::Strings(s) => s.iter().map(|b| b.len() + 4).sum(),
        }
    }

    /// About how long the elements are as JSON: floats print at most 9 significant digits for
    /// FP32 and 17 for FP64, plus sign, point, exponent and comma; strings their bytes and quotes.
    pub fn json_len(&self) -> usize {
        match (&self.data, self.dtype) {
            (TensorData::Strings(s), _) => s.iter().map(|b| b.len() + 4).sum(),
            (_, DataType::F64) => self.len() * 24,
            (_, DataType::F32 | DataType::F16 | DataType::BF16) => self.len() * 14,
            _ => self.len() * 8,
        }
    }

    /// Serialises the elements as a JSON array: flat when `nested` is false, otherwise nested by shape
    /// (TF-Serving style, with its convention that every element of a BYTES output whose name ends
    /// in `_bytes` is `{"b64": ...}`). Floats use the shortest round-trip form; NaN and infinities
    /// become `null` because JSON has no literal for them (use the binary extension to carry them
    /// exactly).
    pub fn json_elements(&self, nested: bool) -> JsonElements<'_> {
        JsonElements {
            tensor: self,
            nested,
            row: None,
        }
    }

    /// Serialises one row (an index into the first dimension) as nested JSON arrays, like
    /// [`Tensor::json_elements`] with `nested`; `None` for a scalar or a row past the end.
    pub fn json_row(&self, row: usize) -> Option<JsonElements<'_>> {
        (row < self.shape.first().copied()?).then_some(JsonElements {
            tensor: self,
            nested: true,
            row: Some(row),
        })
    }
}

/// Serialises a tensor's elements to JSON; see [`Tensor::json_elements`].
pub struct JsonElements<'a> {
    tensor: &'a Tensor,
    nested: bool,
    /// Only this row of the first dimension.
    row: Option<usize>,
}

impl Serialize for JsonElements<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.tensor;
        let count = t.len();
        let (shape, offset) = match (self.row, self.nested) {
            (Some(row), _) => {
                let inner = t.shape.get(1..).unwrap_or_default();
                (inner.to_vec(), row * inner.iter().product::<usize>())
            }
            (None, true) => (t.shape.clone(), 0),
            (None, false) => (vec![count], 0),
        };
        Slice {
            tensor: t,
            shape: &shape,
            offset,
            b64: self.nested && t.name.ends_with("_bytes"),
        }
        .serialize(s)
    }
}

struct Slice<'a> {
    tensor: &'a Tensor,
    shape: &'a [usize],
    offset: usize,
    /// Strings always as `{"b64": ...}`.
    b64: bool,
}

impl Serialize for Slice<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Some((&first, rest)) = self.shape.split_first() else {
            // Rank 0: a scalar.
            return Element {
                tensor: self.tensor,
                index: self.offset,
                b64: self.b64,
            }
            .serialize(s);
        };
        let stride: usize = rest.iter().product();
        let mut seq = s.serialize_seq(Some(first))?;
        for i in 0..first {
            let offset = self.offset + i * stride;
            if rest.is_empty() {
                seq.serialize_element(&Element {
                    tensor: self.tensor,
                    index: offset,
                    b64: self.b64,
                })?;
            } else {
                seq.serialize_element(&Slice {
                    tensor: self.tensor,
                    shape: rest,
                    offset,
                    b64: self.b64,
                })?;
            }
        }
        seq.end()
    }
}

struct Element<'a> {
    tensor: &'a Tensor,
    index: usize,
    /// A string as `{"b64": ...}` even when it is text.
    b64: bool,
}

fn le<const N: usize>(b: &[u8], i: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[i * N..i * N + N]);
    out
}

impl Serialize for Element<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let i = self.index;
        let b = match &self.tensor.data {
            TensorData::Raw(b) => b,
            TensorData::Strings(items) => {
                return match std::str::from_utf8(&items[i]) {
                    Ok(text) if !self.b64 => s.serialize_str(text),
                    // Not text, or asked for: TF-Serving's convention for binary strings.
                    _ => {
                        use base64::Engine as _;
                        let mut map = serde_json::Map::new();
                        map.insert(
                            "b64".into(),
                            base64::engine::general_purpose::STANDARD.encode(&items[i]).into(),
                        );
                        map.serialize(s)
                    }
                };
            }
        };
        match self.tensor.dtype {
            DataType::Bool => s.serialize_bool(b[i] != 0),
            DataType::U8 => s.serialize_u8(b[i]),
            DataType::I8 => s.serialize_i8(b[i] as i8),
            DataType::U16 => s.serialize_u16(u16::from_le_bytes(le(b, i))),
            DataType::I16 => s.serialize_i16(i16::from_le_bytes(le(b, i))),
            DataType::U32 => s.serialize_u32(u32::from_le_bytes(le(b, i))),
            DataType::I32 => s.serialize_i32(i32::from_le_bytes(le(b, i))),
            DataType::U64 => s.serialize_u64(u64::from_le_bytes(le(b, i))),
            DataType::I64 => s.serialize_i64(i64::from_le_bytes(le(b, i))),
            DataType::F16 => float(s, f16::from_le_bytes(le(b, i)).to_f32()),
            DataType::BF16 => float(s, bf16::from_le_bytes(le(b, i)).to_f32()),
            DataType::F32 => float(s, f32::from_le_bytes(le(b, i))),
            DataType::F64 => {
                let v = f64::from_le_bytes(le(b, i));
                if v.is_finite() {
                    s.serialize_f64(v)
                } else {
                    s.serialize_none()
                }
            }
            DataType::Bytes => s.serialize_none(),
        }
    }
}

fn float<S: Serializer>(s: S, v: f32) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f32(v)
    } else {
        s.serialize_none()
    }
}

/// Accumulates elements of one type from a text protocol (JSON) into the tensor byte layout,
/// checking each value's range. Shared by every JSON codec.
#[derive(Debug)]
pub struct ElementWriter {
    dtype: DataType,
    raw: Vec<u8>,
    strings: Vec<Bytes>,
    count: usize,
    limit: usize,
}

impl ElementWriter {
    /// A writer for `dtype` that refuses more than `limit` elements (so a lying shape cannot make it
    /// allocate, and a huge body cannot exceed what the shape allows).
    pub fn new(dtype: DataType, expected: usize, limit: usize) -> ElementWriter {
        // Capacity from the expected count, but never more than the body could hold.
        let cap = expected.min(limit).min(1 << 20);
        ElementWriter {
            dtype,
            raw: Vec::with_capacity(cap * dtype.size().unwrap_or(0)),
            strings: Vec::new(),
            count: 0,
            limit,
        }
    }

    /// The element type written.
    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    /// Elements written so far.
    pub fn count(&self) -> usize {
        self.count
    }

    fn bump(&mut self) -> Result<(), TensorError> {
        self.count += 1;
        if self.count > self.limit {
            return Err(TensorError::BadElement {
                value: format!("#{}", self.count),
                dtype: self.dtype,
                hint: " (more elements than the shape declares)",
            });
        }
        Ok(())
    }

    fn bad(&self, value: impl ToString, hint: &'static str) -> TensorError {
        TensorError::BadElement {
            value: value.to_string(),
            dtype: self.dtype,
            hint,
        }
    }

    /// Writes an integer given as i64.
    pub fn push_i64(&mut self, v: i64) -> Result<(), TensorError> {
        self.bump()?;
        let oob = " (out of range for this type)";
        macro_rules! int {
            ($t:ty) => {{
                let x = <$t>::try_from(v).map_err(|_| self.bad(v, oob))?;
                self.raw.extend_from_slice(&x.to_le_bytes());
            }};
        }
        match self.dtype {
            DataType::Bool => match v {
                0 | 1 => self.raw.push(v as u8),
                _ => return Err(self.bad(v, " (use true/false or 0/1)")),
            },
            DataType::U8 => int!(u8),
            DataType::U16 => int!(u16),
            DataType::U32 => int!(u32),
            DataType::U64 => int!(u64),
            DataType::I8 => int!(i8),
            DataType::I16 => int!(i16),
            DataType::I32 => int!(i32),
            DataType::I64 => int!(i64),
            // Integers for float inputs are accepted, as TF-Serving does.
            DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64 => {
                self.count -= 1;
                return self.push_f64(v as f64);
            }
            DataType::Bytes => return Err(self.bad(v, " (BYTES elements are strings)")),
        }
        Ok(())
    }

    /// Writes an unsigned integer (values above i64::MAX only fit UINT64 and floats).
    pub fn push_u64(&mut self, v: u64) -> Result<(), TensorError> {
        match i64::try_from(v) {
            Ok(i) => self.push_i64(i),
            Err(_) if self.dtype == DataType::U64 => {
                self.bump()?;
                self.raw.extend_from_slice(&v.to_le_bytes());
                Ok(())
            }
            Err(_)
                if matches!(
                    self.dtype,
                    DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64
                ) =>
            {
                self.push_f64(v as f64)
            }
            Err(_) => {
                self.bump()?;
                Err(self.bad(v, " (out of range for this type)"))
            }
        }
    }

    /// Lets `fill` append elements already encoded as this type's little-endian bytes (as the fast
    /// JSON float path writes them) straight into the tensor's buffer, given how many more the
    /// limit allows. `fill` returns `None` when it appended nothing; so does this, also for BYTES.
    pub fn append_le<T>(&mut self, fill: impl FnOnce(&mut Vec<u8>, usize) -> Option<T>) -> Option<T> {
        let width = self.dtype.size()?;
        let start = self.raw.len();
        let out = fill(&mut self.raw, self.limit.saturating_sub(self.count));
        let added = (self.raw.len() - start) / width;
        if out.is_none() || self.count + added > self.limit {
            self.raw.truncate(start);
            return None;
        }
        self.count += added;
        out
    }

    /// Writes a floating-point number; rejected for integer and boolean types.
    pub fn push_f64(&mut self, v: f64) -> Result<(), TensorError> {
        self.bump()?;
        match self.dtype {
            DataType::F16 => self.raw.extend_from_slice(&f16::from_f64(v).to_le_bytes()),
            DataType::BF16 => self.raw.extend_from_slice(&bf16::from_f64(v).to_le_bytes()),
            DataType::F32 => self.raw.extend_from_slice(&(v as f32).to_le_bytes()),
            DataType::F64 => self.raw.extend_from_slice(&v.to_le_bytes()),
            DataType::Bytes => return Err(self.bad(v, " (BYTES elements are strings)")),
            _ => return Err(self.bad(v, " (a fractional number for an integer or boolean input)")),
        }
        Ok(())
    }

    /// Writes a boolean; only BOOL accepts it.
    pub fn push_bool(&mut self, v: bool) -> Result<(), TensorError> {
        self.bump()?;
        if self.dtype != DataType::Bool {
            return Err(self.bad(v, " (booleans are only valid for BOOL inputs)"));
        }
        self.raw.push(v as u8);
        Ok(())
    }

    /// Writes a string element (BYTES) or a special float spelled as text ("NaN", "inf", "-inf").
    pub fn push_str(&mut self, v: &str) -> Result<(), TensorError> {
        if self.dtype == DataType::Bytes {
            self.bump()?;
            self.strings.push(Bytes::copy_from_slice(v.as_bytes()));
            return Ok(());
        }
        let special = match v {
            "NaN" | "nan" => Some(f64::NAN),
            "inf" | "Infinity" | "+inf" => Some(f64::INFINITY),
            "-inf" | "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        };
        match special {
            Some(f)
                if matches!(
                    self.dtype,
                    DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64
                ) =>
            {
                self.push_f64(f)
            }
            _ => {
                self.bump()?;
                Err(self.bad(format!("{v:?}"), " (a string for a numeric input)"))
            }
        }
    }

    /// Writes raw bytes as one BYTES element (e.g. decoded `{"b64": ...}`).
    pub fn push_bytes(&mut self, v: Bytes) -> Result<(), TensorError> {
        self.bump()?;
        if self.dtype != DataType::Bytes {
            return Err(self.bad("<binary>", " (binary values are only valid for BYTES inputs)"));
        }
        self.strings.push(v);
        Ok(())
    }

    /// Finishes into a tensor of `shape`, checking the element count.
    pub fn finish(self, name: impl Into<String>, shape: Vec<usize>) -> Result<Tensor, TensorError> {
        let data = if self.dtype == DataType::Bytes {
            TensorData::Strings(self.strings)
        } else {
            TensorData::Raw(Bytes::from(self.raw))
        };
        Tensor::new(name, self.dtype, shape, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_count_rejects_negative_and_overflowing_shapes() {
        assert_eq!(element_count(&[2, 3]), Ok(6));
        assert_eq!(element_count(&[]), Ok(1));
        assert!(element_count(&[-1, 3]).is_err());
        assert!(element_count(&[i64::MAX, i64::MAX]).is_err());
        assert!(element_count(&[1 << 62, 4]).is_err());
    }

    #[test]
    fn bytes_binary_encoding_round_trips() {
        let t = Tensor::new(
            "s",
            DataType::Bytes,
            vec![3],
            TensorData::Strings(vec![Bytes::from("ab"), Bytes::new(), Bytes::from(vec![0xff, 0])]),
        )
        .unwrap();
        let wire = t.to_binary();
        assert_eq!(&wire[..6], &[2, 0, 0, 0, b'a', b'b']);
        assert_eq!(
            Tensor::from_binary("s", DataType::Bytes, vec![3], wire).unwrap(),
            t
        );
    }

    #[test]
    fn truncated_bytes_encoding_is_an_error_not_a_panic() {
        for wire in [vec![1u8, 0], vec![5, 0, 0, 0, b'a'], vec![255, 255, 255, 255]] {
            assert!(Tensor::from_binary("s", DataType::Bytes, vec![1], Bytes::from(wire)).is_err());
        }
    }

    #[test]
    fn raw_data_length_must_match_shape() {
        let err = Tensor::new(
            "x",
            DataType::F32,
            vec![2, 2],
            TensorData::Raw(Bytes::from(vec![0u8; 12])),
        );
        assert!(matches!(
            err,
            Err(TensorError::ByteSizeMismatch {
                expected: 16,
                actual: 12,
                ..
            })
        ));
    }

    #[test]
    fn bool_bytes_other_than_zero_or_one_are_rejected() {
        let err = Tensor::new(
            "b",
            DataType::Bool,
            vec![2],
            TensorData::Raw(Bytes::from(vec![1u8, 7])),
        );
        assert!(err.is_err());
    }

    #[test]
    fn writer_checks_integer_ranges_and_accepts_integers_for_floats() {
        let mut w = ElementWriter::new(DataType::U8, 3, 3);
        w.push_i64(255).unwrap();
        assert!(w.push_i64(256).is_err());
        let mut w = ElementWriter::new(DataType::F32, 2, 2);
        w.push_i64(3).unwrap();
        w.push_f64(0.5).unwrap();
        let t = w.finish("f", vec![2]).unwrap();
        assert_eq!(
            serde_json::to_string(&t.json_elements(false)).unwrap(),
            "[3.0,0.5]"
        );
        let mut w = ElementWriter::new(DataType::I32, 1, 1);
        assert!(w.push_f64(1.5).is_err());
    }

    #[test]
    fn writer_refuses_more_elements_than_the_limit() {
        let mut w = ElementWriter::new(DataType::I64, 1, 1);
        w.push_i64(1).unwrap();
        assert!(w.push_i64(2).is_err());
    }

    #[test]
    fn json_output_is_flat_or_nested_by_shape() {
        let mut w = ElementWriter::new(DataType::I32, 6, 6);
        for i in 0..6 {
            w.push_i64(i).unwrap();
        }
        let t = w.finish("x", vec![2, 3]).unwrap();
        assert_eq!(
            serde_json::to_string(&t.json_elements(false)).unwrap(),
            "[0,1,2,3,4,5]"
        );
        assert_eq!(
            serde_json::to_string(&t.json_elements(true)).unwrap(),
            "[[0,1,2],[3,4,5]]"
        );
    }

    #[test]
    fn half_precision_and_special_floats_encode() {
        let mut w = ElementWriter::new(DataType::F16, 3, 3);
        w.push_f64(1.5).unwrap();
        w.push_str("NaN").unwrap();
        w.push_i64(-2).unwrap();
        let t = w.finish("h", vec![3]).unwrap();
        assert_eq!(
            serde_json::to_string(&t.json_elements(false)).unwrap(),
            "[1.5,null,-2.0]"
        );
    }

    #[test]
    fn every_v2_name_parses_back() {
        for d in ALL_DATA_TYPES {
            assert_eq!(DataType::from_v2_name(d.v2_name()), Some(d));
        }
        assert_eq!(DataType::from_v2_name("FLOAT"), None);
    }
}
