//! `fp16`: float32 weights and activations to float16, with float32 kept at the model's boundary.
//!
//! Every float tensor gets a precision from its producer: graph inputs stay float32, a node that
//! is converted produces float16, a node on the keep list (or of another domain) produces float32.
//! Where a reader wants the other precision a `Cast` is inserted (one per tensor and direction).
//! Graph outputs produced in float16 are cast back under their own names, so clients see the same
//! signature. Element types are inferred node by node (declared `value_info` first, then the
//! operator's rule); models with control flow (If, Loop, Scan) are refused rather than guessed.

use std::collections::{HashMap, HashSet};

use half::f16;

use super::model::{Names, attr, dtype, int_attr, node};
use super::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, type_proto};
use super::{CompressError, Selection};

/// Operators kept in float32 by default: their float inputs are indices, scales or thresholds
/// whose float16 rounding changes the result, or ONNX Runtime has no float16 kernel for them.
pub const DEFAULT_KEEP: &[&str] = &[
    "Resize",
    "Upsample",
    "RoiAlign",
    "NonMaxSuppression",
    "TopK",
    "Range",
    "CumSum",
    "RandomUniform",
    "RandomNormal",
    "RandomUniformLike",
    "RandomNormalLike",
    "Multinomial",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "Bernoulli",
    "EyeLike",
    "LayerNormalization",
];

/// What the pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Nodes computing in float16.
    pub converted_nodes: usize,
    /// Nodes with float tensors kept in float32.
    pub kept_nodes: usize,
    /// Cast nodes added at precision boundaries.
    pub casts: usize,
}

/// The element type of each output of `n`, given its inputs' types (0 = unknown).
fn infer(n: &NodeProto, input: &dyn Fn(usize) -> i32) -> Vec<i32> {
    let first_known = || (0..n.input.len()).map(input).find(|&t| t != 0).unwrap_or(0);
    let attr_i = |k: &str| attr(n, k).map(|a| a.i as i32);
    let tensor_attr = |k: &str| attr(n, k).and_then(|a| a.t.as_ref()).map(|t| t.data_type);
    let one = |t: i32| vec![t; n.output.len()];
    if !n.domain.is_empty() && n.domain != "ai.onnx" {
        return one(0);
    }
    match n.op_type.as_str() {
        "Cast" => one(attr_i("to").unwrap_or(0)),
        "CastLike" => one(input(1)),
        "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" | "NonMaxSuppression" => one(dtype::INT64),
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" | "Not"
        | "IsNaN" | "IsInf" => one(dtype::BOOL),
        "ConstantOfShape" => one(tensor_attr("value").unwrap_or(dtype::FLOAT)),
        "Constant" => {
            let t = match n.attribute.first().map(|a| a.name.as_str()) {
                Some("value") => tensor_attr("value").unwrap_or(0),
                Some("value_float" | "value_floats") => dtype::FLOAT,
                Some("value_int" | "value_ints") => dtype::INT64,
                Some("value_string" | "value_strings") => dtype::STRING,
                _ => 0,
            };
            one(t)
        }
        "TopK" => vec![input(0), dtype::INT64],
        "MaxPool" => vec![input(0), dtype::INT64],
        "Dropout" => vec![input(0), dtype::BOOL],
        "LayerNormalization" => vec![input(0), dtype::FLOAT, dtype::FLOAT],
        "Unique" => vec![input(0), dtype::INT64, dtype::INT64, dtype::INT64],
        "DynamicQuantizeLinear" => vec![dtype::UINT8, dtype::FLOAT, dtype::UINT8],
        "QuantizeLinear" => one(if n.input.len() > 2 { input(2) } else { dtype::UINT8 }),
        "DequantizeLinear" => one(input(1)),
        "MatMulInteger" | "ConvInteger" => one(dtype::INT32),
        "Where" => one(input(1)),
        "RandomUniform" | "RandomNormal" => one(attr_i("dtype").unwrap_or(dtype::FLOAT)),
        "RandomUniformLike" | "RandomNormalLike" | "EyeLike" => {
            one(attr_i("dtype").unwrap_or_else(|| input(0)))
        }
        "OneHot" => one(input(2)),
        _ => one(first_known()),
    }
}

/// Runs the pass over the main graph.
pub fn run(m: &mut ModelProto, sel: &Selection) -> Result<Outcome, CompressError> {
    let Some(g) = m.graph.as_mut() else {
        return Ok(Outcome::default());
    };
    if let Some(n) = g.node.iter().find(|n| super::model::has_subgraph(n)) {
        return Err(CompressError::Unsupported {
            node: n.name.clone(),
            op: n.op_type.clone(),
            message: "fp16 does not convert models with control flow (subgraphs)".into(),
        });
    }
    // Element types: declared ones first.
    let mut ty: HashMap<String, i32> = HashMap::new();
    let declared = g.input.iter().chain(&g.value_info).chain(&g.output);
    for v in declared {
        if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            ty.insert(v.name.clone(), t.elem_type);
        }
    }
    for t in &g.initializer {
        ty.insert(t.name.clone(), t.data_type);
    }
    for n in &g.node {
        let got = infer(n, &|i| {
            n.input.get(i).and_then(|x| ty.get(x)).copied().unwrap_or(0)
        });
        for (o, t) in n.output.iter().zip(got) {
            if t != 0 {
                ty.entry(o.clone()).or_insert(t);
            }
        }
    }
    let is_float = |name: &str| ty.get(name) == Some(&dtype::FLOAT);
    // Constants float16 cannot hold (|x| > 65504, e.g. a BatchNormalization variance of 1e8 in
    // PP-OCRv4 det) keep their readers in float32: saturating them changed det's output (cosine
    // 0.87).
    let max = f16::MAX.to_f32();
    let out_of_range: HashSet<String> = g
        .initializer
        .iter()
        .filter(|t| super::model::floats(t).is_some_and(|v| v.iter().any(|x| x.is_finite() && x.abs() > max)))
        .map(|t| t.name.clone())
        .collect();
    let convert = |n: &NodeProto| {
        let custom = !n.domain.is_empty() && n.domain != "ai.onnx";
        !custom
            && !sel.keep_fp32(n)
            && !DEFAULT_KEEP.contains(&n.op_type.as_str())
            && sel.includes(n)
            && !n.input.iter().any(|i| out_of_range.contains(i))
    };
    let touches_float = |n: &NodeProto| n.input.iter().chain(&n.output).any(|x| is_float(x));
    // Sizes computed in float (Shape -> Cast -> Mul -> Cast back to int64) stay float32: float16
    // holds integers exactly only up to 2048, so a 4097-wide input would get a 4096 size. A node
    // is size arithmetic when it casts an integer to float, or when every float input it has is
    // size arithmetic or a constant.
    let integer = |t: Option<&i32>| matches!(t, Some(2..=7 | 12 | 13));
    let constants: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut sizes: HashSet<String> = HashSet::new();
    let mut flags = Vec::with_capacity(g.node.len());
    for n in &g.node {
        let floats: Vec<&String> = n.input.iter().filter(|x| is_float(x)).collect();
        let cast_of_integer = n.op_type == "Cast" && integer(n.input.first().and_then(|x| ty.get(x)));
        let derived = !floats.is_empty()
            && floats.iter().any(|x| sizes.contains(*x))
            && floats
                .iter()
                .all(|x| sizes.contains(*x) || constants.contains(x.as_str()));
        if cast_of_integer || derived {
            sizes.extend(n.output.iter().filter(|o| is_float(o)).cloned());
        }
        flags.push(convert(n) && !cast_of_integer && !derived);
    }
    // Precision of each float tensor where it is produced: true = float16.
    let mut half: HashMap<String, bool> = HashMap::new();
    // Initializers named like a graph output, or like a graph input (a default the caller may
    // override in float32), keep their type.
    let boundary: HashSet<String> = g.output.iter().chain(&g.input).map(|o| o.name.clone()).collect();
    // Float initializers are float16 when every reader converts, else float32 (the readers that
    // convert then get a Cast).
    let mut readers_convert: HashMap<String, bool> = HashMap::new();
    for (n, &converts) in g.node.iter().zip(&flags) {
        let c = converts && touches_float(n);
        for i in &n.input {
            let e = readers_convert.entry(i.clone()).or_insert(true);
            *e &= c;
        }
    }
    let mut out = Outcome::default();
    for t in &mut g.initializer {
        if t.data_type == dtype::FLOAT
            && readers_convert.get(&t.name).copied().unwrap_or(false)
            && !boundary.contains(&t.name)
        {
            to_half(t)?;
            half.insert(t.name.clone(), true);
        }
    }
    let mut names = Names::new(g);
    let mut casts: HashMap<(String, bool), String> = HashMap::new();
    let mut nodes = Vec::with_capacity(g.node.len() * 2);
    for (mut n, &c) in std::mem::take(&mut g.node).into_iter().zip(&flags) {
        if !touches_float(&n) {
            nodes.push(n);
            continue;
        }
        if c {
            out.converted_nodes += 1;
        } else {
            out.kept_nodes += 1;
        }
        for i in n.input.iter_mut().filter(|i| !i.is_empty()) {
            if !is_float(i) {
                continue;
            }
            let have = half.get(i.as_str()).copied().unwrap_or(false);
            if have == c {
                continue;
            }
            let key = (i.clone(), c);
            let cast_name = match casts.get(&key) {
                Some(x) => x.clone(),
                None => {
                    let x = names.fresh(&format!("{i}_{}", if c { "fp16" } else { "fp32" }));
                    let mut cn = node(
                        "Cast",
                        names.fresh(&format!("{x}_Cast")),
                        vec![i.clone()],
                        vec![x.clone()],
                    );
                    cn.attribute.push(int_attr(
                        "to",
                        i64::from(if c { dtype::FLOAT16 } else { dtype::FLOAT }),
                    ));
                    nodes.push(cn);
                    out.casts += 1;
                    casts.insert(key, x.clone());
                    x
                }
            };
            *i = cast_name;
        }
        if c {
            retype_attributes(&mut n)?;
            for o in &n.output {
                if is_float(o) {
                    half.insert(o.clone(), true);
                }
            }
        }
        nodes.push(n);
    }
    // Outputs produced in float16 go back to float32 under their own names.
    let mut renamed: HashMap<String, String> = HashMap::new();
    for o in &g.output {
        if is_float(&o.name) && half.get(&o.name).copied().unwrap_or(false) {
            renamed.insert(o.name.clone(), names.fresh(&format!("{}_fp16", o.name)));
        }
    }
    if !renamed.is_empty() {
        for n in &mut nodes {
            for x in n.input.iter_mut().chain(n.output.iter_mut()) {
                if let Some(r) = renamed.get(x.as_str()) {
                    *x = r.clone();
                }
            }
        }
        for (orig, r) in &renamed {
            let mut cn = node(
                "Cast",
                names.fresh(&format!("{orig}_Cast")),
                vec![r.clone()],
                vec![orig.clone()],
            );
            cn.attribute.push(int_attr("to", i64::from(dtype::FLOAT)));
            nodes.push(cn);
            out.casts += 1;
            half.insert(r.clone(), true);
        }
    }
    g.node = nodes;
    retype_value_info(g, &half);
    Ok(out)
}

/// Attributes of a converted node that name float32: `Cast(to=FLOAT)` and float tensors held in
/// attributes (Constant, ConstantOfShape) become float16; Constant's `value_float(s)` become a
/// float16 `value` tensor.
fn retype_attributes(n: &mut NodeProto) -> Result<(), CompressError> {
    let op = n.op_type.clone();
    for a in &mut n.attribute {
        if op == "Cast" && a.name == "to" && a.i == i64::from(dtype::FLOAT) {
            a.i = i64::from(dtype::FLOAT16);
        }
        if let Some(t) = a.t.as_mut()
            && t.data_type == dtype::FLOAT
        {
            to_half(t)?;
        }
        if op == "Constant" && (a.name == "value_float" || a.name == "value_floats") {
            let (vals, dims) = if a.name == "value_float" {
                (vec![a.f], vec![])
            } else {
                (a.floats.clone(), vec![a.floats.len() as i64])
            };
            let mut t = super::model::f32_tensor("", dims, &vals);
            to_half(&mut t)?;
            *a = AttributeProto {
                name: "value".into(),
                r#type: 4,
                t: Some(t),
                ..Default::default()
            };
        }
    }
    // ConstantOfShape without a value makes float32 zeros: say float16 zero explicitly.
    if op == "ConstantOfShape" && attr(n, "value").is_none() {
        n.attribute.push(AttributeProto {
            name: "value".into(),
            r#type: 4,
            t: Some(super::model::raw_tensor("", dtype::FLOAT16, vec![1], vec![0, 0])),
            ..Default::default()
        });
    }
    Ok(())
}

/// A FLOAT tensor to FLOAT16 in place. Values beyond float16's range saturate at ±65504 rather
/// than becoming infinities.
fn to_half(t: &mut TensorProto) -> Result<(), CompressError> {
    let v = super::model::floats(t).ok_or_else(|| CompressError::Malformed {
        path: String::new(),
        message: format!(
            "tensor {:?}: FLOAT data of a length that is not a multiple of 4",
            t.name
        ),
    })?;
    let max = f16::MAX.to_f32();
    t.raw_data = v
        .iter()
        .flat_map(|&x| {
            let x = if x.is_finite() { x.clamp(-max, max) } else { x };
            f16::from_f32(x).to_bits().to_le_bytes()
        })
        .collect();
    t.float_data.clear();
    t.data_type = dtype::FLOAT16;
    Ok(())
}

/// Declared intermediate types follow the new precisions; stale float32 declarations would make
/// the model invalid.
fn retype_value_info(g: &mut GraphProto, half: &HashMap<String, bool>) {
    for v in &mut g.value_info {
        if half.get(&v.name).copied().unwrap_or(false)
            && let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut())
            && t.elem_type == dtype::FLOAT
        {
            t.elem_type = dtype::FLOAT16;
        }
    }
}
