//! Triton's binary tensor extension: a JSON header followed by raw tensor bytes, split where the
//! `Inference-Header-Content-Length` header says.
//!
//! Input layout: byte 0 picks the mode.
//! - even: bytes 1..3 are the header length (u16, little-endian), the rest is the body: decoded with
//!   `protocol::v2::decode_request(sig, body, Some(len))` (a length past the body's end is tested too).
//! - odd: `Tensor::from_binary` directly: byte 1 picks the datatype, byte 2 the rank (0..=4), then
//!   one little-endian u32 per dimension; the rest is the raw data. What it accepts must re-encode to
//!   exactly the same bytes.

use std::sync::LazyLock;

use crate::{DTYPES, check_decode_error, check_tensor, check_tensor_data, init, multi_input_signature};
use bytes::Bytes;
use kubemaas_server::backend::Signature;
use kubemaas_server::protocol::v2::decode_request;
use kubemaas_server::tensor::Tensor;

static SIG: LazyLock<Signature> = LazyLock::new(multi_input_signature);

fn framing(data: &[u8]) {
    let Some((len, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let json_len = usize::from(u16::from_le_bytes(*len));
    let body = Bytes::copy_from_slice(body);
    match decode_request(&SIG, &body, Some(json_len)) {
        Ok(req) => {
            assert!(
                json_len <= body.len(),
                "accepted a header length past the body's end"
            );
            for t in &req.inputs {
                check_tensor(&SIG, t);
            }
            assert_eq!(req.outputs.len(), req.binary_outputs.len());
        }
        Err(e) => check_decode_error(&e),
    }
}

fn from_binary(data: &[u8]) {
    let [dtype, rank, rest @ ..] = data else {
        return;
    };
    let dtype = DTYPES[usize::from(*dtype) % DTYPES.len()];
    let rank = usize::from(*rank % 5);
    if rest.len() < rank * 4 {
        return;
    }
    let (dims, raw) = rest.split_at(rank * 4);
    let shape: Vec<usize> = dims
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let raw = Bytes::copy_from_slice(raw);
    match Tensor::from_binary("t", dtype, shape.clone(), raw.clone()) {
        Ok(t) => {
            assert_eq!(t.shape, shape);
            assert_eq!(t.dtype, dtype);
            check_tensor_data(&t);
            assert_eq!(t.to_binary(), raw, "from_binary then to_binary changed the bytes");
        }
        Err(e) => {
            // Typed, and the message is what a client would read.
            assert!(!e.to_string().is_empty(), "empty TensorError message: {e:?}");
        }
    }
}

/// Runs one input and asserts the invariants.
pub fn run(data: &[u8]) {
    init();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        framing(rest)
    } else {
        from_binary(rest)
    }
}
