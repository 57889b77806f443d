//! `int8-dynamic`: weights to int8, activations quantized at run time.
//!
//! - **MatMul and Gemm** with a constant 2-D float weight become ONNX Runtime's own dynamic
//!   pattern: `DynamicQuantizeLinear(A)` → `MatMulInteger(A_q, W_q, A_zp)` → `Cast` → `Mul` by
//!   `A_scale × W_scale`. ONNX Runtime fuses it into `DynamicQuantizeMatMul` at load, so the
//!   product really runs in integers. Weights are symmetric int8 (zero point 0, so none is
//!   stored), one scale per output column unless `per_tensor`.
//! - **Conv, ConvTranspose and Gather** (embedding tables) keep float arithmetic and store their
//!   weight as int8 with one scale per output channel (row), rebuilt by `Cast` and `Mul` nodes
//!   that ONNX Runtime folds into a float constant when the session is created. Measured on
//!   PP-OCRv4: `ConvInteger` (what ONNX Runtime's quantizer emits for Conv) ran 5-7x slower than
//!   float Conv on CPU, while weight-only storage costs nothing at run time and cuts the file 4x.

use std::collections::HashMap;

use super::model::{
    Names, attr, consumers, default_opset, dtype, element_count, f32_tensor, floats, int_attr, node,
    raw_tensor,
};
use super::proto::{ModelProto, NodeProto, TensorProto};
use super::{CompressError, Selection, Skipped};

/// Smallest weight (elements) worth quantizing: below it the scales cost more than they save.
const MIN_ELEMENTS: usize = 128;
/// Weight-only storage needs this many elements per output channel. Depthwise convolutions (9 or
/// 25) are tiny and their int8 error is not averaged over inputs: on PP-OCRv4 rec with a rendered
/// text line, quantizing them took the output's cosine similarity from 0.995 to 0.980.
const MIN_PER_CHANNEL: usize = 32;

/// What the pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Nodes whose product now runs in int8.
    pub integer_nodes: usize,
    /// Nodes whose weight is stored as int8 (float arithmetic).
    pub weight_only_nodes: usize,
    /// Nodes of a quantizable type left alone, and why.
    pub skipped: Vec<Skipped>,
}

/// Symmetric int8 of `w` viewed as `[rows, cols]`, with a scale per column (`per_col`), per row
/// (`!per_col && per_channel`) or one for all.
struct Quantized {
    q: Vec<u8>,
    scales: Vec<f32>,
}

fn quantize(w: &[f32], rows: usize, cols: usize, axis: Axis) -> Quantized {
    let groups = match axis {
        Axis::Tensor => 1,
        Axis::Rows => rows,
        Axis::Cols => cols,
    };
    let group = |i: usize| match axis {
        Axis::Tensor => 0,
        Axis::Rows => i / cols,
        Axis::Cols => i % cols,
    };
    let mut max = vec![0f32; groups];
    for (i, &v) in w.iter().enumerate() {
        let g = group(i);
        if v.is_finite() {
            max[g] = max[g].max(v.abs());
        }
    }
    // All-zero groups keep scale 1 so that dividing is harmless and dequantizing gives 0.
    let scales: Vec<f32> = max
        .iter()
        .map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let r = (v / scales[group(i)]).round().clamp(-127.0, 127.0);
            // Two's complement byte of the int8 value.
            (r as i8) as u8
        })
        .collect();
    Quantized { q, scales }
}

#[derive(Clone, Copy)]
enum Axis {
    Tensor,
    Rows,
    Cols,
}

/// Runs the pass over the main graph.
pub fn run(m: &mut ModelProto, sel: &Selection) -> Result<Outcome, CompressError> {
    let opset = default_opset(m);
    let Some(g) = m.graph.as_mut() else {
        return Ok(Outcome::default());
    };
    let readers = consumers(g);
    let mut names = Names::new(g);
    let inits: HashMap<String, TensorProto> = g.initializer.drain(..).map(|t| (t.name.clone(), t)).collect();
    // Initializers read by a graph input of the same name are defaults a caller may override: not
    // constants.
    let overridable: std::collections::HashSet<String> = g.input.iter().map(|i| i.name.clone()).collect();
    let mut out = Outcome::default();
    let mut nodes: Vec<NodeProto> = Vec::with_capacity(g.node.len());
    // One DynamicQuantizeLinear per activation, shared by the MatMuls that read it (Q, K, V).
    let mut dql: HashMap<String, (String, String, String)> = HashMap::new();
    // Remaining readers per weight, so a weight read elsewhere too keeps its float original.
    let mut left = readers.clone();
    let integer_ok = opset >= 11;
    for n in std::mem::take(&mut g.node) {
        let op = n.op_type.as_str();
        let quantizable =
            n.domain.is_empty() && matches!(op, "MatMul" | "Gemm" | "Conv" | "ConvTranspose" | "Gather");
        if !quantizable || !sel.includes(&n) || n.output.is_empty() || n.output[0].is_empty() {
            nodes.push(n);
            continue;
        }
        let widx = if op == "Gather" { 0 } else { 1 };
        let skip = |why: String| Skipped {
            node: n.name.clone(),
            op: n.op_type.clone(),
            why,
        };
        let wname = n.input.get(widx).cloned().unwrap_or_default();
        let weight = match inits.get(&wname) {
            Some(t) if !overridable.contains(&wname) => t,
            _ => {
                if op != "Gather" {
                    out.skipped
                        .push(skip(format!("input {widx} ({wname:?}) is not a constant")));
                }
                nodes.push(n);
                continue;
            }
        };
        let Some(values) = floats(weight) else {
            if weight.data_type == dtype::FLOAT {
                return Err(CompressError::Unsupported {
                    node: n.name.clone(),
                    op: n.op_type.clone(),
                    message: format!("weight {wname:?} has a data length that does not match FLOAT"),
                });
            }
            if op != "Gather" {
                out.skipped.push(skip(format!("weight {wname:?} is not float32")));
            }
            nodes.push(n);
            continue;
        };
        if element_count(&weight.dims) != Some(values.len()) {
            return Err(CompressError::Unsupported {
                node: n.name.clone(),
                op: n.op_type.clone(),
                message: format!(
                    "weight {wname:?} holds {} values but its dims {:?} say otherwise",
                    values.len(),
                    weight.dims
                ),
            });
        }
        if values.len() < MIN_ELEMENTS {
            out.skipped.push(skip(format!(
                "weight {wname:?} has only {} elements",
                values.len()
            )));
            nodes.push(n);
            continue;
        }
        let dims = weight.dims.clone();
        let (lead, rest) = match dims.split_first() {
            Some((&d, r)) if !r.is_empty() => (d as usize, values.len() / (d.max(1) as usize)),
            _ => {
                out.skipped
                    .push(skip(format!("weight {wname:?} has rank {}", dims.len())));
                nodes.push(n);
                continue;
            }
        };
        // A down-projection (K at least twice N: a transformer's FFN output, 1536 -> 384 in
        // MiniLM) reads the activations with the largest outliers, which one uint8 scale per
        // request resolves worst: its weight is stored in int8 but the product stays float.
        // Measured on all-MiniLM-L6-v2 with real sentences: cosine 0.9895 with them in int8,
        // 0.9936 without (see docs/benchmarks.md).
        let down_projection = op == "MatMul" && dims.len() == 2 && lead >= 2 * rest && !sel.all_integer;
        match op {
            "MatMul" | "Gemm" if !down_projection => {
                if dims.len() != 2 {
                    out.skipped
                        .push(skip(format!("weight {wname:?} has rank {}, not 2", dims.len())));
                    nodes.push(n);
                    continue;
                }
                if !integer_ok {
                    out.skipped.push(skip(format!(
                        "the model's opset {opset} predates DynamicQuantizeLinear (opset 11)"
                    )));
                    nodes.push(n);
                    continue;
                }
                let gemm = op == "Gemm";
                let ai = |k: &str, d: i64| attr(&n, k).map_or(d, |a| a.i);
                let af = |k: &str, d: f32| attr(&n, k).map_or(d, |a| a.f);
                if gemm && ai("transA", 0) != 0 {
                    out.skipped.push(skip("Gemm with transA=1".into()));
                    nodes.push(n);
                    continue;
                }
                // The weight as [K, N].
                let (k, cols, w) = if gemm && ai("transB", 0) != 0 {
                    let (rows_n, k) = (lead, rest);
                    let mut t = vec![0f32; values.len()];
                    for r in 0..rows_n {
                        for c in 0..k {
                            t[c * rows_n + r] = values[r * k + c];
                        }
                    }
                    (k, rows_n, t)
                } else {
                    (lead, rest, values)
                };
                let qz = quantize(
                    &w,
                    k,
                    cols,
                    if sel.per_tensor { Axis::Tensor } else { Axis::Cols },
                );
                let alpha = if gemm { af("alpha", 1.0) } else { 1.0 };
                let scales: Vec<f32> = qz.scales.iter().map(|s| s * alpha).collect();
                let base = if n.name.is_empty() {
                    n.output[0].clone()
                } else {
                    n.name.clone()
                };
                let wq = names.fresh(&format!("{wname}_int8"));
                let ws = names.fresh(&format!("{wname}_scale"));
                g.initializer
                    .push(raw_tensor(&wq, dtype::INT8, vec![k as i64, cols as i64], qz.q));
                let sdims = if scales.len() == 1 {
                    vec![]
                } else {
                    vec![cols as i64]
                };
                g.initializer.push(f32_tensor(&ws, sdims, &scales));
                let a = n.input[0].clone();
                let (aq, ascale, azp) = match dql.get(&a) {
                    Some(t) => t.clone(),
                    None => {
                        let t = (
                            names.fresh(&format!("{a}_quantized")),
                            names.fresh(&format!("{a}_scale")),
                            names.fresh(&format!("{a}_zero_point")),
                        );
                        nodes.push(node(
                            "DynamicQuantizeLinear",
                            names.fresh(&format!("{a}_DynamicQuantizeLinear")),
                            vec![a.clone()],
                            vec![t.0.clone(), t.1.clone(), t.2.clone()],
                        ));
                        dql.insert(a.clone(), t.clone());
                        t
                    }
                };
                let int32 = names.fresh(&format!("{base}_int32"));
                let fl = names.fresh(&format!("{base}_float"));
                let scale = names.fresh(&format!("{base}_output_scale"));
                nodes.push(node(
                    "MatMulInteger",
                    names.fresh(&format!("{base}_MatMulInteger")),
                    vec![aq, wq, azp],
                    vec![int32.clone()],
                ));
                let mut cast = node(
                    "Cast",
                    names.fresh(&format!("{base}_Cast")),
                    vec![int32],
                    vec![fl.clone()],
                );
                cast.attribute.push(int_attr("to", i64::from(dtype::FLOAT)));
                nodes.push(cast);
                nodes.push(node(
                    "Mul",
                    names.fresh(&format!("{base}_scales_Mul")),
                    vec![ascale, ws],
                    vec![scale.clone()],
                ));
                let c = n.input.get(2).filter(|c| !c.is_empty()).cloned();
                let product = if c.is_some() {
                    names.fresh(&format!("{base}_product"))
                } else {
                    n.output[0].clone()
                };
                nodes.push(node(
                    "Mul",
                    names.fresh(&format!("{base}_Mul")),
                    vec![fl, scale],
                    vec![product.clone()],
                ));
                if let Some(c) = c {
                    let beta = af("beta", 1.0);
                    let c_in = if beta == 1.0 {
                        c
                    } else {
                        let b = names.fresh(&format!("{base}_beta"));
                        g.initializer.push(f32_tensor(&b, vec![], &[beta]));
                        let scaled = names.fresh(&format!("{base}_bias"));
                        nodes.push(node(
                            "Mul",
                            names.fresh(&format!("{base}_beta_Mul")),
                            vec![c, b],
                            vec![scaled.clone()],
                        ));
                        scaled
                    };
                    nodes.push(node(
                        "Add",
                        names.fresh(&format!("{base}_Add")),
                        vec![product, c_in],
                        vec![n.output[0].clone()],
                    ));
                }
                out.integer_nodes += 1;
            }
            _ if rest < MIN_PER_CHANNEL && !sel.per_tensor && !down_projection => {
                out.skipped.push(skip(format!(
                    "{rest} weights per output channel (depthwise): each channel's rounding error \
                     reaches the output undiluted, so the weight stays float"
                )));
                nodes.push(n);
                continue;
            }
            _ => {
                // Weight-only: one scale per output channel (Conv: dim 0, ConvTranspose: dim 0 of
                // [C_in, C_out/g, ...] is still a valid grouping; Gather: one per table row).
                let qz = quantize(
                    &values,
                    lead,
                    rest,
                    if sel.per_tensor { Axis::Tensor } else { Axis::Rows },
                );
                let wq = names.fresh(&format!("{wname}_int8"));
                let ws = names.fresh(&format!("{wname}_scale"));
                let wc = names.fresh(&format!("{wname}_int8_float"));
                g.initializer
                    .push(raw_tensor(&wq, dtype::INT8, dims.clone(), qz.q));
                let mut sdims = vec![1i64; dims.len()];
                if qz.scales.len() > 1 {
                    sdims[0] = lead as i64;
                } else {
                    sdims.clear();
                }
                g.initializer.push(f32_tensor(&ws, sdims, &qz.scales));
                let mut cast = node(
                    "Cast",
                    names.fresh(&format!("{wname}_Cast")),
                    vec![wq],
                    vec![wc.clone()],
                );
                cast.attribute.push(int_attr("to", i64::from(dtype::FLOAT)));
                nodes.push(cast);
                let rebuilt = names.fresh(&format!("{wname}_dequantized"));
                nodes.push(node(
                    "Mul",
                    names.fresh(&format!("{wname}_Mul")),
                    vec![wc, ws],
                    vec![rebuilt.clone()],
                ));
                let mut n = n;
                n.input[widx] = rebuilt;
                nodes.push(n);
                out.weight_only_nodes += 1;
            }
        }
        if let Some(c) = left.get_mut(&wname) {
            *c = c.saturating_sub(1);
        }
    }
    // Float weights no one reads any more are dropped; the rest stay.
    for (name, t) in inits {
        if left.get(&name).copied().unwrap_or(0) > 0 || !readers.contains_key(&name) {
            g.initializer.push(t);
        }
    }
    // A stable order (the map above has none), so the same input compresses to the same bytes.
    g.initializer.sort_by(|a, b| a.name.cmp(&b.name));
    g.node = nodes;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::model::floats;
    use crate::compress::proto::{GraphProto, OperatorSetIdProto};

    #[test]
    fn symmetric_int8_keeps_each_column_within_half_a_step() {
        let w: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * if i % 4 == 0 { 10.0 } else { 0.1 })
            .collect();
        let q = quantize(&w, 16, 4, Axis::Cols);
        assert_eq!(q.scales.len(), 4);
        for (i, (&v, &b)) in w.iter().zip(&q.q).enumerate() {
            let back = f32::from(b as i8) * q.scales[i % 4];
            assert!((back - v).abs() <= q.scales[i % 4] / 2.0 + 1e-6, "{v} -> {back}");
        }
        let zeros = quantize(&[0.0; 8], 2, 4, Axis::Rows);
        assert_eq!(zeros.scales, vec![1.0, 1.0], "an all-zero row keeps scale 1");
        assert!(zeros.q.iter().all(|&b| b == 0));
    }

    fn matmul_model(k: usize, n: usize) -> ModelProto {
        let w: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.37).sin()).collect();
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                node: vec![node(
                    "MatMul",
                    "mm".into(),
                    vec!["a".into(), "w".into()],
                    vec!["y".into()],
                )],
                initializer: vec![f32_tensor("w", vec![k as i64, n as i64], &w)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_matmul_becomes_the_dynamic_integer_pattern_and_its_float_weight_goes() {
        let mut m = matmul_model(8, 32);
        let out = run(&mut m, &Selection::default()).unwrap();
        assert_eq!(out.integer_nodes, 1);
        let g = m.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"]
        );
        assert_eq!(g.node.last().unwrap().output, ["y"], "the output keeps its name");
        assert!(
            !g.initializer.iter().any(|t| t.name == "w"),
            "the float weight is gone"
        );
        let wq = g.initializer.iter().find(|t| t.name == "w_int8").unwrap();
        assert_eq!(
            (wq.data_type, wq.dims.clone(), wq.raw_data.len()),
            (dtype::INT8, vec![8, 32], 256)
        );
        let s = g.initializer.iter().find(|t| t.name == "w_scale").unwrap();
        assert_eq!(floats(s).unwrap().len(), 32, "one scale per output column");
    }

    #[test]
    fn a_down_projection_stores_int8_weights_but_keeps_a_float_product_unless_all_integer() {
        let mut m = matmul_model(64, 16);
        let out = run(&mut m, &Selection::default()).unwrap();
        assert_eq!((out.integer_nodes, out.weight_only_nodes), (0, 1));
        let ops: Vec<String> = m.graph.unwrap().node.iter().map(|n| n.op_type.clone()).collect();
        assert_eq!(ops, ["Cast", "Mul", "MatMul"]);
        let mut m = matmul_model(64, 16);
        let sel = Selection {
            all_integer: true,
            ..Default::default()
        };
        assert_eq!(run(&mut m, &sel).unwrap().integer_nodes, 1);
    }

    #[test]
    fn excluded_small_and_old_opset_matmuls_are_left_with_a_reason() {
        let mut m = matmul_model(8, 32);
        let sel = Selection {
            exclude: vec!["MatMul".into()],
            ..Default::default()
        };
        let out = run(&mut m, &sel).unwrap();
        assert_eq!(out.integer_nodes, 0);
        let mut m = matmul_model(4, 4);
        let out = run(&mut m, &Selection::default()).unwrap();
        assert!(
            out.skipped[0].why.contains("only 16 elements"),
            "{:?}",
            out.skipped
        );
        let mut m = matmul_model(8, 32);
        m.opset_import[0].version = 10;
        let out = run(&mut m, &Selection::default()).unwrap();
        assert!(out.skipped[0].why.contains("opset 10"), "{:?}", out.skipped);
        assert_eq!(m.graph.unwrap().node.len(), 1);
    }
}
