//! The fuzz targets (one module each, `run` takes one input) and what they share: the model
//! signatures the decoders are fuzzed against, the invariants every target asserts, and an
//! allocation guard. The files in `fuzz_targets/` only hand libFuzzer's inputs to `run`, so the
//! main workspace's `cargo test` builds this crate (without libFuzzer) and replays the committed
//! seeds through the same checks (`server/tests/fuzz_seeds.rs`).
//!
//! Invariants, for every input:
//! - no panic (libfuzzer-sys turns a panic into an abort, which libFuzzer records as a crash);
//! - no absurd allocation: the Rust heap is capped at `KUBEMAAS_FUZZ_MALLOC_LIMIT_MB` (default
//!   256 MiB) beyond what the process holds at start, which libFuzzer's own `-malloc_limit_mb`
//!   only enforces under a sanitizer (nightly); `-rss_limit_mb` bounds the whole process;
//! - errors are typed: a decoder refuses bad input with `ApiError::BadRequest` and a JSON body
//!   `{"error": "<the message>"}`, never another variant;
//! - what a decoder accepts is consistent: every tensor names a model input of the model's datatype,
//!   its data agrees with its shape, and it survives the binary-extension round trip.

use std::sync::Once;

pub mod router;
pub mod v1_json;
pub mod v2_binary;
pub mod v2_json;

use kubemaas_server::backend::{Signature, TensorSpec};
use kubemaas_server::protocol::error::ApiError;
use kubemaas_server::tensor::{DataType, Tensor, TensorData};

/// Every data type, in the server's fixed order (a fuzz byte indexes it).
pub use kubemaas_server::tensor::ALL_DATA_TYPES as DTYPES;

fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        datatype,
        shape: shape.to_vec(),
    }
}

/// A model with several inputs of different types (names as in the seed corpus):
/// `x` FP32 `[-1, 4]`, `ids` INT64 `[-1, -1]`, `text` BYTES `[-1]`, `mask` BOOL `[-1, 3]`,
/// `half` FP16 `[2]`, `big` UINT64 `[-1]`.
pub fn multi_input_signature() -> Signature {
    Signature {
        inputs: vec![
            spec("x", DataType::F32, &[-1, 4]),
            spec("ids", DataType::I64, &[-1, -1]),
            spec("text", DataType::Bytes, &[-1]),
            spec("mask", DataType::Bool, &[-1, 3]),
            spec("half", DataType::F16, &[2]),
            spec("big", DataType::U64, &[-1]),
        ],
        outputs: vec![spec("y", DataType::F32, &[-1, 2])],
        leading_dim_conflict: None,
    }
}

/// A model with one FP32 input `x` `[-1, 4]` (TF-Serving's unnamed `instances` and `inputs` need
/// exactly one input).
pub fn single_input_signature() -> Signature {
    Signature {
        inputs: vec![spec("x", DataType::F32, &[-1, 4])],
        outputs: vec![spec("y", DataType::F32, &[-1, 2])],
        leading_dim_conflict: None,
    }
}

/// Asserts the invariants of a tensor a decoder produced for `sig`.
pub fn check_tensor(sig: &Signature, t: &Tensor) {
    let spec = sig
        .inputs
        .iter()
        .find(|s| s.name == t.name)
        .unwrap_or_else(|| panic!("decoded tensor {:?} is not a model input", t.name));
    assert_eq!(
        t.dtype, spec.datatype,
        "tensor {:?} has the wrong datatype",
        t.name
    );
    check_tensor_data(t);
}

/// Asserts that a tensor's data agrees with its shape and type, and that its binary-extension
/// encoding decodes back to the same tensor.
pub fn check_tensor_data(t: &Tensor) {
    let count = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .unwrap_or_else(|| panic!("tensor {:?} has an overflowing shape {:?}", t.name, t.shape));
    match (&t.data, t.dtype.size()) {
        (TensorData::Raw(b), Some(size)) => {
            assert_eq!(
                b.len(),
                count * size,
                "raw data of {:?} disagrees with its shape",
                t.name
            );
            if t.dtype == DataType::Bool {
                assert!(
                    b.iter().all(|&x| x <= 1),
                    "BOOL tensor {:?} holds a byte > 1",
                    t.name
                );
            }
        }
        (TensorData::Strings(s), None) => {
            assert_eq!(
                s.len(),
                count,
                "BYTES data of {:?} disagrees with its shape",
                t.name
            );
        }
        _ => panic!(
            "tensor {:?}: data representation does not match {}",
            t.name, t.dtype
        ),
    }
    let wire = t.to_binary();
    let back = Tensor::from_binary(t.name.clone(), t.dtype, t.shape.clone(), wire)
        .unwrap_or_else(|e| panic!("tensor {:?} does not survive the binary round trip: {e}", t.name));
    assert_eq!(&back, t, "binary round trip changed tensor {:?}", t.name);
}

/// Asserts that a decoder's refusal is a typed client error with a well-formed body.
pub fn check_decode_error(e: &ApiError) {
    assert!(
        matches!(e, ApiError::BadRequest(_)),
        "a decoder refused input with {e:?} (status {}), not BadRequest",
        e.status()
    );
    check_error_body(e);
}

/// Asserts that an error's body is `{"error": "<its message>"}` and the message is not empty.
pub fn check_error_body(e: &ApiError) {
    let msg = e.to_string();
    assert!(!msg.is_empty(), "empty error message: {e:?}");
    let body: serde_json::Value = serde_json::from_str(&e.body()).expect("error body is JSON");
    assert_eq!(body.get("error").and_then(|v| v.as_str()), Some(msg.as_str()));
}

/// The Rust heap, capped: an allocation that would take it past the limit fails, and Rust aborts
/// on a failed allocation (a crash for libFuzzer, with the input saved). So a lying shape or length
/// that makes the server reserve gigabytes is found on stable Rust too, where libFuzzer's
/// `-malloc_limit_mb` has no malloc hooks. The `cap` crate wraps the system allocator, so the
/// harness needs no `unsafe` of its own.
#[global_allocator]
static ALLOC: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);
static INIT: Once = Once::new();

/// Reads the configuration; every target calls it first.
pub fn init() {
    INIT.call_once(|| {
        let mb = std::env::var("KUBEMAAS_FUZZ_MALLOC_LIMIT_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&mb| mb > 0)
            .unwrap_or(256);
        // What is allocated already (the runtime, the signatures) counts too.
        let _ = ALLOC.set_limit(ALLOC.allocated() + (mb << 20));
    });
}
