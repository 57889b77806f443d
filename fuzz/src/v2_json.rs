//! The V2 (Open Inference Protocol) JSON request decoder: the whole fuzz input is the request body
//! (no binary extension), decoded against a model with FP32 (dynamic dims), INT64, BYTES, BOOL,
//! FP16 and UINT64 inputs.

use std::sync::LazyLock;

use bytes::Bytes;
use kubemaas_server::backend::Signature;
use kubemaas_server::protocol::v2::decode_request;

use crate::{check_decode_error, check_tensor, init, multi_input_signature};

static SIG: LazyLock<Signature> = LazyLock::new(multi_input_signature);

/// Decodes one input and asserts the invariants.
pub fn run(data: &[u8]) {
    init();
    let body = Bytes::copy_from_slice(data);
    match decode_request(&SIG, &body, None) {
        Ok(req) => {
            for t in &req.inputs {
                check_tensor(&SIG, t);
            }
            assert_eq!(req.outputs.len(), req.binary_outputs.len());
        }
        Err(e) => check_decode_error(&e),
    }
}
