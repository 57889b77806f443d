//! What the gRPC wire check costs (`cargo bench -p kubemaas-server --bench grpc_wire`): for a few
//! `ModelInferRequest`s as clients send them, the time of `grpc::wire::check` beside the time of
//! prost decoding the same bytes, which every request pays anyway, and their ratio. Prints a
//! table; asserts nothing about speed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kubemaas_server::grpc::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use kubemaas_server::grpc::pb::{InferParameter, InferTensorContents, ModelInferRequest};
use kubemaas_server::grpc::wire;
use prost::Message;

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn raw(name: &str, shape: &[i64], bytes: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![tensor(name, "FP32", shape)],
        outputs: vec![InferRequestedOutputTensor {
            name: "y".into(),
            parameters: [("binary_data".to_string(), InferParameter::default())].into(),
        }],
        raw_input_contents: vec![Bytes::from(vec![7u8; bytes])],
        ..Default::default()
    }
}

/// Median seconds of one run of `f`, over 15 samples of enough runs each to fill about 3 ms.
fn time(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut runs = 0u32;
    while start.elapsed() < Duration::from_millis(30) {
        f();
        runs += 1;
    }
    let per_sample = (runs / 10).max(1);
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_sample {
                f();
            }
            t.elapsed().as_secs_f64() / f64::from(per_sample)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let mut typed = tensor("x", "FP32", &[1, 10_000]);
    typed.contents = Some(InferTensorContents {
        fp32_contents: vec![0.5; 10_000],
        ..Default::default()
    });
    let mut strings = tensor("s", "BYTES", &[1_000]);
    strings.contents = Some(InferTensorContents {
        bytes_contents: vec![Bytes::from_static(b"a short string"); 1_000],
        ..Default::default()
    });
    let cases = [
        ("dense 1x10 FP32, raw", raw("x", &[1, 10], 40)),
        ("PP-OCR cls 1x3x48x192, raw", raw("x", &[1, 3, 48, 192], 110_592)),
        (
            "PP-OCR det 1x3x640x640, raw",
            raw("x", &[1, 3, 640, 640], 4_915_200),
        ),
        (
            "10,000 FP32 in fp32_contents",
            ModelInferRequest {
                model_name: "m".into(),
                inputs: vec![typed],
                ..Default::default()
            },
        ),
        (
            "1,000 strings in bytes_contents",
            ModelInferRequest {
                model_name: "m".into(),
                inputs: vec![strings],
                ..Default::default()
            },
        ),
        (
            "64 raw inputs with a parameter each",
            ModelInferRequest {
                model_name: "m".into(),
                inputs: (0..64)
                    .map(|i| {
                        let mut t = tensor(&format!("in{i}"), "FP32", &[1, 16]);
                        t.parameters.insert("k".into(), InferParameter::default());
                        t
                    })
                    .collect(),
                raw_input_contents: vec![Bytes::from(vec![0u8; 64]); 64],
                ..Default::default()
            },
        ),
    ];
    println!("| request | bytes | check µs | prost decode µs | check ÷ decode |");
    println!("|---|---|---|---|---|");
    for (what, request) in cases {
        let wire = Bytes::from(request.encode_to_vec());
        let check = time(|| {
            std::hint::black_box(wire::check(std::hint::black_box(&wire)).is_ok());
        });
        let decode = time(|| {
            std::hint::black_box(ModelInferRequest::decode(wire.clone()).is_ok());
        });
        println!(
            "| {what} | {} | {:.3} | {:.3} | {:.3} |",
            wire.len(),
            check * 1e6,
            decode * 1e6,
            check / decode
        );
    }
}
