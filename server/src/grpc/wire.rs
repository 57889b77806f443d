//! The codec of the generated services: prost's, plus a look at a `ModelInferRequest`'s wire
//! bytes before prost decodes them. Every protobuf field is optional, so an empty `inputs` entry
//! is 2 bytes on the wire and a struct of a few hundred bytes once decoded (names, shape,
//! parameters map, contents); empty outputs, raw entries and BYTES elements grow 16 to 40 times.
//! tonic decodes a whole message before any handler runs, so a message within
//! `--max-request-bytes` could take a hundred times that in memory and get the pod OOM-killed.
//! Here the memory the decoded entries take is estimated from the wire, without allocating, and a
//! message whose entries would take more than twice its size (plus [`SLACK`]) is refused with
//! `RESOURCE_EXHAUSTED`. BYTES elements (`bytes_contents`) have an allowance of their own, 8 times
//! the message's size: a short string is a legitimate element that grows that much (10 bytes
//! take 12 on the wire and 42 decoded), and the elements are counted again, 192 bytes each
//! ([`crate::admission::STRING_ELEMENT_BYTES`]), against the shared budget once decoded, as
//! REST's are. So a message holds at most 262,144 empty strings or 524,288 one-byte strings in
//! `bytes_contents` (longer strings are not limited this way; `raw_input_contents` not at all). Numbers are not counted: a packed int64
//! grows at most 8 times, as in any protobuf server.

use std::any::TypeId;
use std::mem::size_of;

use bytes::{Buf, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use super::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use super::pb::{InferParameter, ModelInferRequest};

/// What the entries of a small request may take whatever its size: a request naming a few dozen
/// tensors, each with parameters, is far below it.
pub const SLACK: u64 = 4 << 20;

/// prost's codec, with [`check`] on every `ModelInferRequest` before it is decoded.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(self.0.decoder())
    }
}

/// See [`BoundedCodec`].
#[derive(Debug, Clone)]
pub struct BoundedDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default + 'static> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands a whole message in one contiguous buffer.
        if TypeId::of::<U>() == TypeId::of::<ModelInferRequest>() && buf.chunk().len() == buf.remaining() {
            check(buf.chunk())?;
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The entries of a `ModelInferRequest` and the memory their decoded structs take.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Entries {
    /// `inputs`.
    pub inputs: u64,
    /// `outputs`.
    pub outputs: u64,
    /// `raw_input_contents`.
    pub raw: u64,
    /// `bytes_contents` elements, over all inputs.
    pub bytes_elements: u64,
    /// Bytes the decoded `bytes_contents` elements take (their handles; the strings stay in the
    /// message's buffer).
    pub element_bytes: u64,
    /// `parameters` entries, of the request and its tensors.
    pub parameters: u64,
    /// Bytes the decoded entries take beyond the message's own buffer (which raw contents and
    /// BYTES elements point into).
    pub bytes: u64,
}

/// Refuses a `ModelInferRequest` (`wire`, its encoded bytes) whose decoded entries would take
/// more than twice its size plus [`SLACK`], or whose BYTES elements would take more than 8 times
/// its size plus [`SLACK`]. A message that is not valid protobuf is left to prost,
/// which says why; what came before the fault is counted all the same, since prost decodes it
/// before it finds the fault.
pub fn check(wire: &[u8]) -> Result<(), Status> {
    let e = entries(wire);
    let size = wire.len() as u64;
    let allowed = size.saturating_mul(2).saturating_add(SLACK);
    let for_elements = size.saturating_mul(8).saturating_add(SLACK);
    if e.bytes <= allowed && e.element_bytes <= for_elements {
        return Ok(());
    }
    Err(Status::resource_exhausted(format!(
        "the request would take about {} MiB once decoded ({} inputs, {} outputs, {} \
         raw_input_contents entries, {} bytes_contents elements, {} parameters) for {} bytes on \
         the wire; the server refuses entries that take over twice the message's size (BYTES \
         elements: 8 times): send fewer, larger entries (BYTES tensors in raw_input_contents)",
        (e.bytes + e.element_bytes) >> 20,
        e.inputs,
        e.outputs,
        e.raw,
        e.bytes_elements,
        e.parameters,
        wire.len()
    )))
}

/// Counts the entries of a `ModelInferRequest`, as far as `wire` is well-formed.
pub fn entries(wire: &[u8]) -> Entries {
    let mut e = Entries::default();
    let _ = walk(wire, &mut |field, value| match (field, value) {
        (4, Value::Bytes(b)) => parameter(&mut e, b),
        (5, Value::Bytes(b)) => {
            e.inputs += 1;
            e.bytes += size_of::<InferInputTensor>() as u64;
            input(&mut e, b);
        }
        (6, Value::Bytes(b)) => {
            e.outputs += 1;
            e.bytes += size_of::<InferRequestedOutputTensor>() as u64;
            let _ = walk(b, &mut |f, v| {
                if let (2, Value::Bytes(p)) = (f, v) {
                    parameter(&mut e, p);
                }
            });
        }
        (7, Value::Bytes(_)) => {
            e.raw += 1;
            e.bytes += size_of::<Bytes>() as u64;
        }
        _ => {}
    });
    e
}

/// A `parameters` map entry: its key and value, and the map's slot.
fn parameter(e: &mut Entries, entry: &[u8]) {
    e.parameters += 1;
    e.bytes += (size_of::<(String, InferParameter)>() + entry.len()) as u64;
}

/// An `InferInputTensor`: its shape, its parameters and its contents' BYTES elements (numbers
/// are not counted, see the module's description).
fn input(e: &mut Entries, tensor: &[u8]) {
    let _ = walk(tensor, &mut |field, value| match (field, value) {
        // `shape`, packed (a dimension of 1 or 2 bytes takes 8) or one field a dimension.
        (3, Value::Bytes(packed)) => e.bytes += 8 * packed.iter().filter(|b| *b & 0x80 == 0).count() as u64,
        (3, Value::Number) => e.bytes += 8,
        (4, Value::Bytes(p)) => parameter(e, p),
        (5, Value::Bytes(contents)) => {
            let _ = walk(contents, &mut |f, v| {
                if let (8, Value::Bytes(_)) = (f, v) {
                    e.bytes_elements += 1;
                    e.element_bytes += size_of::<Bytes>() as u64;
                }
            });
        }
        _ => {}
    });
}

/// A field's value, as far as the counting needs it.
enum Value<'a> {
    /// A varint or a fixed-width number.
    Number,
    /// Length-delimited: a string, bytes, a message or a packed array.
    Bytes(&'a [u8]),
}

/// Not protobuf (prost finds the same fault and says so).
#[derive(Debug)]
struct Malformed;

/// How deep groups may nest (prost's recursion limit).
const MAX_DEPTH: u32 = 100;

/// Calls `visit` with each top-level field of the message `b`, skipping groups (a deprecated
/// encoding prost skips in unknown fields); stops at the first malformed field.
fn walk(mut b: &[u8], visit: &mut impl FnMut(u64, Value<'_>)) -> Result<(), Malformed> {
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (field, wire_type) = (key >> 3, key & 7);
        match wire_type {
            3 => skip_group(&mut b, field, 1)?,
            _ => visit(field, value(&mut b, wire_type)?),
        }
    }
    Ok(())
}

/// One field's value of `wire_type` (not a group).
fn value<'a>(b: &mut &'a [u8], wire_type: u64) -> Result<Value<'a>, Malformed> {
    let width = match wire_type {
        0 => {
            varint(b)?;
            return Ok(Value::Number);
        }
        1 => 8,
        2 => usize::try_from(varint(b)?).map_err(|_| Malformed)?,
        5 => 4,
        _ => return Err(Malformed),
    };
    if b.len() < width {
        return Err(Malformed);
    }
    let (v, rest) = b.split_at(width);
    *b = rest;
    Ok(if wire_type == 2 {
        Value::Bytes(v)
    } else {
        Value::Number
    })
}

/// Skips a group's fields up to its end-group key.
fn skip_group(b: &mut &[u8], field: u64, depth: u32) -> Result<(), Malformed> {
    if depth > MAX_DEPTH {
        return Err(Malformed);
    }
    loop {
        if b.is_empty() {
            return Err(Malformed);
        }
        let key = varint(b)?;
        match key & 7 {
            3 => skip_group(b, key >> 3, depth + 1)?,
            4 if key >> 3 == field => return Ok(()),
            4 => return Err(Malformed),
            t => {
                value(b, t)?;
            }
        }
    }
}

/// A base-128 varint of at most 10 bytes.
fn varint(b: &mut &[u8]) -> Result<u64, Malformed> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&byte, rest) = b.split_first().ok_or(Malformed)?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::pb::model_infer_request::InferInputTensor;
    use crate::grpc::pb::{InferTensorContents, ModelInferRequest};
    use prost::Message;

    fn request() -> ModelInferRequest {
        let mut r = ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        };
        r.parameters.insert("timeout".into(), InferParameter::default());
        r.inputs.push(InferInputTensor {
            name: "x".into(),
            datatype: "BYTES".into(),
            shape: vec![3],
            parameters: [("a".to_string(), InferParameter::default())].into(),
            contents: Some(InferTensorContents {
                bytes_contents: vec![Bytes::from_static(b"ab"); 3],
                int64_contents: vec![1, 2, 3],
                ..Default::default()
            }),
        });
        r.outputs.push(Default::default());
        r.outputs.push(InferRequestedOutputTensor {
            name: "y".into(),
            parameters: [("binary_data".to_string(), InferParameter::default())].into(),
        });
        r.raw_input_contents.push(Bytes::from_static(b"1234"));
        r
    }

    #[test]
    fn entries_are_counted_as_prost_decodes_them() {
        let e = entries(&request().encode_to_vec());
        assert_eq!(
            (e.inputs, e.outputs, e.raw, e.bytes_elements, e.parameters),
            (1, 2, 1, 3, 3)
        );
        assert!(check(&request().encode_to_vec()).is_ok());
    }

    #[test]
    fn many_empty_inputs_are_refused_and_say_what_they_held() {
        let mut wire = b"\x0a\x01m".to_vec();
        for _ in 0..200_000 {
            wire.extend_from_slice(b"\x2a\x00");
        }
        let e = check(&wire).expect_err("refused");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("200000 inputs"), "{}", e.message());
        // The same count of full-sized inputs is not refused: what counts is what they take
        // beyond their own bytes.
        let big = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![
                InferInputTensor {
                    name: "x".repeat(300),
                    ..Default::default()
                };
                20_000
            ],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(entries(&big).inputs, 20_000);
        assert!(check(&big).is_ok());
        // A shape of millions of dimensions, packed at a byte each.
        let long = ModelInferRequest {
            inputs: vec![InferInputTensor {
                shape: vec![1; 1 << 20],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(check(&long.encode_to_vec()).is_err());
    }

    #[test]
    fn short_strings_pass_and_empty_ones_by_the_million_do_not() {
        let strings = |n: usize, len: usize| {
            ModelInferRequest {
                inputs: vec![InferInputTensor {
                    name: "s".into(),
                    datatype: "BYTES".into(),
                    shape: vec![n as i64],
                    contents: Some(InferTensorContents {
                        bytes_contents: vec![Bytes::from(vec![b'a'; len]); n],
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec()
        };
        // A million 10-byte strings, a million 2-byte ones: legitimate batches.
        assert!(check(&strings(1_000_000, 10)).is_ok());
        assert!(check(&strings(1_000_000, 2)).is_ok());
        let e = check(&strings(4_000_000, 0)).expect_err("16 times its size");
        assert!(
            e.message().contains("4000000 bytes_contents elements"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn entries_before_a_fault_or_after_a_group_still_count() {
        let mut wire = Vec::new();
        // An unknown field as a group (prost skips it), then empty inputs, then a truncated key.
        wire.extend_from_slice(b"\x9b\x06\x08\x01\x9c\x06");
        for _ in 0..200_000 {
            wire.extend_from_slice(b"\x2a\x00");
        }
        assert_eq!(entries(&wire).inputs, 200_000);
        wire.push(0xff);
        assert_eq!(entries(&wire).inputs, 200_000);
        assert!(check(&wire).is_err());
        // prost agrees on the group: it decodes the well-formed part.
        let ok = &wire[..wire.len() - 1];
        assert_eq!(
            ModelInferRequest::decode(ok).map(|r| r.inputs.len()).ok(),
            Some(200_000)
        );
    }

    proptest::proptest! {
        /// Whatever the bytes, the walk ends without panicking, and where prost decodes them the
        /// counts are prost's own.
        #[test]
        fn counts_agree_with_prost_on_mutated_requests(
            edits in proptest::collection::vec((0usize..400, proptest::num::u8::ANY), 0..6),
            cut in 0usize..400,
        ) {
            let mut wire = request().encode_to_vec();
            for (at, byte) in edits {
                let at = at % wire.len();
                wire[at] = byte;
            }
            wire.truncate(cut.max(1));
            let e = entries(&wire);
            if let Ok(r) = ModelInferRequest::decode(wire.as_slice()) {
                let elements: usize = r.inputs.iter().filter_map(|i| i.contents.as_ref()).map(|c| c.bytes_contents.len()).sum();
                proptest::prop_assert_eq!(
                    (e.inputs, e.outputs, e.raw, e.bytes_elements),
                    (r.inputs.len() as u64, r.outputs.len() as u64, r.raw_input_contents.len() as u64, elements as u64)
                );
            }
        }
    }

    #[test]
    fn malformed_bytes_are_left_to_prost() {
        for b in [&b"\xff\xff\xff\xff\xff"[..], b"\x2a\x05ab", b"\x0b", b"\x0c"] {
            assert!(check(b).is_ok());
            assert!(ModelInferRequest::decode(b).is_err());
        }
    }
}
