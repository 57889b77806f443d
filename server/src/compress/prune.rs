//! `prune`: magnitude pruning. The smallest weights of MatMul, Gemm, Conv and ConvTranspose are
//! set to zero until each weight reaches the target sparsity. ONNX Runtime runs dense kernels, so
//! this buys neither speed nor memory on CPU; what it buys is an artifact that compresses (gzip,
//! zstd) to a fraction of its size, which the report measures.

use super::model::{dtype, floats};
use super::proto::ModelProto;
use super::{Selection, Skipped};

/// What the pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Weights pruned.
    pub pruned_weights: usize,
    /// Weight elements in those tensors.
    pub elements: usize,
    /// Of which zero after pruning.
    pub zeros: usize,
    /// Nodes of a prunable type left alone, and why.
    pub skipped: Vec<Skipped>,
}

/// Zeroes the `sparsity` fraction (0..1) of smallest-magnitude elements of every selected weight.
pub fn run(m: &mut ModelProto, sel: &Selection, sparsity: f64) -> Outcome {
    let mut out = Outcome::default();
    let Some(g) = m.graph.as_mut() else { return out };
    let inputs: std::collections::HashSet<String> = g.input.iter().map(|i| i.name.clone()).collect();
    let mut weights: Vec<String> = Vec::new();
    for n in &g.node {
        let prunable =
            n.domain.is_empty() && matches!(n.op_type.as_str(), "MatMul" | "Gemm" | "Conv" | "ConvTranspose");
        if !prunable || !sel.includes(n) {
            continue;
        }
        match n.input.get(1) {
            Some(w)
                if g.initializer
                    .iter()
                    .any(|t| &t.name == w && t.data_type == dtype::FLOAT)
                    && !inputs.contains(w) =>
            {
                if !weights.contains(w) {
                    weights.push(w.clone());
                }
            }
            other => out.skipped.push(Skipped {
                node: n.name.clone(),
                op: n.op_type.clone(),
                why: format!(
                    "input 1 ({:?}) is not a float32 constant",
                    other.cloned().unwrap_or_default()
                ),
            }),
        }
    }
    for t in g.initializer.iter_mut().filter(|t| weights.contains(&t.name)) {
        let Some(mut v) = floats(t) else { continue };
        let k = ((v.len() as f64) * sparsity).floor() as usize;
        if k > 0 {
            let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            let (_, &mut threshold, _) = mags.select_nth_unstable_by(k - 1, f32::total_cmp);
            // Ties at the threshold: zero only as many as needed to reach k.
            let mut budget = k;
            for x in v.iter_mut().filter(|x| x.abs() < threshold) {
                *x = 0.0;
                budget -= 1;
            }
            for x in v.iter_mut() {
                if budget == 0 {
                    break;
                }
                if x.abs() == threshold {
                    *x = 0.0;
                    budget -= 1;
                }
            }
        }
        out.pruned_weights += 1;
        out.elements += v.len();
        out.zeros += v.iter().filter(|x| **x == 0.0).count();
        t.raw_data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        t.float_data.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::model::{f32_tensor, node};
    use crate::compress::proto::GraphProto;

    #[test]
    fn exactly_the_target_share_is_zeroed_even_with_ties() {
        // 10 values, five of them tied at the threshold magnitude.
        let w = [0.5f32, -0.5, 0.5, 0.5, -0.5, 3.0, -4.0, 5.0, 0.1, 6.0];
        let mut m = ModelProto {
            graph: Some(GraphProto {
                node: vec![node(
                    "MatMul",
                    "mm".into(),
                    vec!["a".into(), "w".into()],
                    vec!["y".into()],
                )],
                initializer: vec![f32_tensor("w", vec![2, 5], &w)],
                ..Default::default()
            }),
            ..Default::default()
        };
        let out = run(&mut m, &Selection::default(), 0.4);
        assert_eq!((out.pruned_weights, out.elements, out.zeros), (1, 10, 4));
        let v = floats(&m.graph.unwrap().initializer[0]).unwrap();
        assert_eq!(v[8], 0.0, "the smallest goes first");
        assert_eq!(v[5..8], [3.0, -4.0, 5.0], "large weights stay");
        assert_eq!(v.iter().filter(|x| **x == 0.0).count(), 4);
    }
}
