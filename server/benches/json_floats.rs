//! Micro-benchmark of JSON tensor decoding (`cargo bench -p kubemaas-server --bench json_floats`):
//! V2 request bodies with FP32 `data` as numpy's `tolist()` prints them, side by side in one run,
//! in MB of JSON per second on one core: the data array alone by the fast float path (`jsonfloat`)
//! and by the general serde path, then whole requests decoded in one pass (the server's route) and
//! by serde alone (serde delimits the array, then the fast path parses it). Prints a table; asserts
//! nothing about speed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kubemaas_server::backend::{Signature, TensorSpec};
use kubemaas_server::protocol::v1;
use kubemaas_server::protocol::v2::{DataSeed, decode_request_with};
use kubemaas_server::tensor::{DataType, ElementWriter};
use serde::de::DeserializeSeed;

fn values(n: usize) -> Vec<f32> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// A model with one FP32 input `x` of `shape`.
fn one_fp32_input(shape: &[usize]) -> Signature {
    Signature {
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::F32,
            shape: shape.iter().map(|&d| d as i64).collect(),
        }],
        outputs: vec![],
        leading_dim_conflict: None,
    }
}

/// Runs `f` repeatedly for about `budget`, returning MB/s of `bytes` per call (best of 5 rounds).
fn rate(bytes: usize, budget: Duration, mut f: impl FnMut()) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let mut calls = 0u32;
        while start.elapsed() < budget / 5 {
            f();
            calls += 1;
        }
        best = best.max(bytes as f64 * f64::from(calls) / start.elapsed().as_secs_f64() / 1e6);
    }
    best
}

fn main() {
    println!(
        "| body | JSON size | array: fast path MB/s | array: serde MB/s | fast ÷ serde | request: one pass MB/s | request: serde first MB/s | one pass ÷ serde first |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (label, shape) in [
        ("PP-OCR cls 3×48×192", vec![1usize, 3, 48, 192]),
        ("1 MiB FP32 (262,144)", vec![1, 262_144]),
    ] {
        let n: usize = shape.iter().product();
        let data: Vec<String> = values(n).iter().map(|v| format!("{}", f64::from(*v))).collect();
        let array = format!("[{}]", data.join(", "));
        let body =
            format!(r#"{{"inputs":[{{"name":"x","shape":{shape:?},"datatype":"FP32","data":{array}}}]}}"#);
        let sig = one_fp32_input(&shape);
        let budget = Duration::from_secs(2);
        let fast = rate(array.len(), budget, || {
            let out = kubemaas_server::jsonfloat::parse_floats(array.as_bytes(), DataType::F32, n, 32);
            assert!(out.is_some_and(|b| b.len() == n * 4));
        });
        let serde_path = rate(array.len(), budget, || {
            let mut writer = ElementWriter::new(DataType::F32, n, n);
            let mut de = serde_json::Deserializer::from_str(&array);
            let seed = DataSeed {
                writer: &mut writer,
                depth: 0,
            };
            assert!(seed.deserialize(&mut de).is_ok() && writer.count() == n);
        });
        let bytes = Bytes::from(body.clone());
        let one_pass = rate(body.len(), budget, || {
            assert!(decode_request_with(&sig, &bytes, None, true).is_ok());
        });
        let serde_first = rate(body.len(), budget, || {
            assert!(decode_request_with(&sig, &bytes, None, false).is_ok());
        });
        println!(
            "| {label} | {:.0} KB | {fast:.0} | {serde_path:.0} | {:.2}× | {one_pass:.0} | {serde_first:.0} | {:.2}× |",
            array.len() as f64 / 1e3,
            fast / serde_path,
            one_pass / serde_first
        );
    }
    // TF-Serving's :predict: no shape is sent, the nesting gives it.
    println!();
    println!(
        "| TF-Serving :predict body | JSON size | fast float path MB/s | serde alone MB/s | fast ÷ serde |"
    );
    println!("|---|---|---|---|---|");
    let shape = [1usize, 3, 48, 192];
    let n: usize = shape.iter().product();
    let v = values(n);
    let rows: Vec<String> = v
        .chunks(192)
        .map(|r| {
            format!(
                "[{}]",
                r.iter()
                    .map(|x| format!("{}", f64::from(*x)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    let planes: Vec<String> = rows.chunks(48).map(|p| format!("[{}]", p.join(", "))).collect();
    let body = format!(r#"{{"instances": [[{}]]}}"#, planes.join(", "));
    let sig = one_fp32_input(&shape);
    let budget = Duration::from_secs(2);
    let fast = rate(body.len(), budget, || {
        assert!(
            v1::decode_request_with(&sig, body.as_bytes(), true).is_ok_and(|r| r.inputs[0].shape == shape)
        );
    });
    let general = rate(body.len(), budget, || {
        assert!(
            v1::decode_request_with(&sig, body.as_bytes(), false).is_ok_and(|r| r.inputs[0].shape == shape)
        );
    });
    println!(
        "| PP-OCR cls 1×3×48×192, nested instances | {:.0} KB | {fast:.0} | {general:.0} | {:.2}× |",
        body.len() as f64 / 1e3,
        fast / general
    );
}
