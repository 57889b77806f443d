//! The TF-Serving (V1) `:predict` decoder: the whole fuzz input is the request body, decoded
//! against a one-input model (unnamed `instances` / `inputs` apply) and a six-input model
//! (named instances and columnar objects).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use crate::{check_decode_error, check_tensor, init, multi_input_signature, single_input_signature};
use kubemaas_server::backend::Signature;
use kubemaas_server::protocol::v1::{Format, decode_request};
use serde_json::value::RawValue;

static SINGLE: LazyLock<Signature> = LazyLock::new(single_input_signature);
static MULTI: LazyLock<Signature> = LazyLock::new(multi_input_signature);

fn check(sig: &Signature, data: &[u8]) {
    match decode_request(sig, data) {
        Ok(req) => {
            // The format follows the key the client used.
            // Raw values: an ignored key may hold a number no f64 can (`1e999`), which a `Value`
            // refuses but the decoder, rightly, skips.
            let top: BTreeMap<String, &RawValue> =
                serde_json::from_slice(data).expect("accepted body is a JSON object");
            let row = top.get("instances").is_some_and(|i| i.get().trim() != "null");
            let expected = if row { Format::Row } else { Format::Columnar };
            assert_eq!(req.format, expected);
            for t in &req.inputs {
                check_tensor(sig, t);
            }
        }
        Err(e) => check_decode_error(&e),
    }
}

/// Runs one input and asserts the invariants.
pub fn run(data: &[u8]) {
    init();
    check(&SINGLE, data);
    check(&MULTI, data);
}
