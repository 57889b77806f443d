//! The fast path for the commonest large JSON input: FP32 or FP64 `data` given as numbers in
//! (possibly nested) arrays. Numbers go straight from the request text into the tensor's
//! little-endian bytes with a fast float parser, skipping serde's per-element visitor calls. The
//! general path (serde) stays for everything else and for every error message, so the fast path
//! only has to recognise what it handles and step aside otherwise.

use crate::tensor::DataType;

/// Integers beyond this (2^53) are converted by the general path from i64/u64 with one rounding
/// rather than through `f64`, so they take that path.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Parses `text`, which serde_json has already checked is valid JSON, when it holds only numbers
/// in arrays nested at most `max_depth` deep, into `count` elements of `dtype` (FP32 or FP64) as
/// little-endian bytes, exactly as the general path would (a number is read as the nearest `f64`,
/// then narrowed). `None` when anything else appears (a string, a boolean, `null`, an object, a
/// long integer, deeper nesting), when the count differs, or for another data type: the caller
/// then takes the general path, which also words the error.
pub fn parse_floats(text: &[u8], dtype: DataType, count: usize, max_depth: usize) -> Option<Vec<u8>> {
    let width = match dtype {
        DataType::F32 => 4,
        DataType::F64 => 8,
        _ => return None,
    };
    // The claimed shape does not size the allocation: a number takes at least two bytes ("0,").
    let mut out = Vec::with_capacity(count.min(text.len() / 2 + 1) * width);
    let limit = count.checked_mul(width)?;
    let mut depth = 0usize;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'[' => {
                depth += 1;
                if depth > max_depth {
                    return None;
                }
                i += 1;
            }
            b']' => {
                depth = depth.checked_sub(1)?;
                i += 1;
            }
            b',' | b' ' | b'\n' | b'\r' | b'\t' => i += 1,
            b'-' | b'0'..=b'9' => {
                // serde_json validated the text, so what starts here is one JSON number.
                let (v, used): (f64, usize) = fast_float2::parse_partial(&text[i..]).ok()?;
                if used == 0 {
                    return None;
                }
                let token = &text[i..i + used];
                i += used;
                // The magnitude first: `fract` is a libm call, and only huge numbers need it.
                if v.abs() > MAX_EXACT_INTEGER
                    && v.fract() == 0.0
                    && !token.iter().any(|c| matches!(c, b'.' | b'e' | b'E'))
                {
                    // A long integer, which the general path converts from i64/u64.
                    return None;
                }
                if out.len() >= limit {
                    return None;
                }
                match dtype {
                    DataType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
                    _ => out.extend_from_slice(&v.to_le_bytes()),
                }
            }
            _ => return None,
        }
    }
    (out.len() == limit && depth == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::v2::DataSeed;
    use crate::tensor::{ElementWriter, TensorData};
    use serde::de::DeserializeSeed;

    /// The general path's bytes for the same text.
    fn general(text: &str, dtype: DataType, count: usize) -> Result<Vec<u8>, String> {
        let mut writer = ElementWriter::new(dtype, count, count);
        let mut de = serde_json::Deserializer::from_str(text);
        DataSeed {
            writer: &mut writer,
            depth: 0,
        }
        .deserialize(&mut de)
        .map_err(|e| e.to_string())?;
        match writer.finish("x", vec![count]).map_err(|e| e.to_string())?.data {
            TensorData::Raw(b) => Ok(b.to_vec()),
            TensorData::Strings(_) => Err("strings".into()),
        }
    }

    #[test]
    fn numbers_parse_to_the_same_bytes_as_the_general_path() {
        let cases = [
            "[0.1, -2.5e-3, 3, 1e10, -0, 0.30000001192092896, 6.02214076e23, 1E-45, 3.4028235e38, 1e39]",
            "[[1,2],[3,4],[5,6]]",
            "[ [ [ 0.5 ] , [ -0.25 ] ] ]\n",
            "7.5",
            "[123456789012345, -99999, 2.2250738585072014e-308, 5e-324, 1.7976931348623157e308]",
        ];
        for text in cases {
            for dtype in [DataType::F32, DataType::F64] {
                let want = general(text, dtype, text.matches(',').count() + 1).unwrap();
                let count = want.len() / if dtype == DataType::F32 { 4 } else { 8 };
                let got = parse_floats(text.as_bytes(), dtype, count, 32);
                assert_eq!(got.as_deref(), Some(&want[..]), "{text} as {dtype}");
            }
        }
        // Random f32 values printed as numpy prints them (the f64 repr of each f32), and shortest.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut values = Vec::new();
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            values.push(f32::from_bits((seed as u32) & 0xbf7f_ffff));
        }
        let text = format!(
            "[{}]",
            values
                .iter()
                .enumerate()
                .map(|(i, v)| if i % 2 == 0 {
                    format!("{}", f64::from(*v))
                } else {
                    format!("{v:e}")
                })
                .collect::<Vec<_>>()
                .join(",")
        );
        let want = general(&text, DataType::F32, values.len()).unwrap();
        assert_eq!(
            parse_floats(text.as_bytes(), DataType::F32, values.len(), 32),
            Some(want)
        );
    }

    #[test]
    fn anything_else_steps_aside_for_the_general_path() {
        for (text, count) in [
            ("[1, \"2\"]", 2),
            ("[true]", 1),
            ("[null]", 1),
            ("[{\"a\": 1}]", 1),
            ("[1, 2, 3]", 2),
            ("[1, 2]", 3),
            ("[12345678901234567890]", 1),
            ("[[[1]]]", 1),
        ] {
            assert_eq!(
                parse_floats(text.as_bytes(), DataType::F32, count, 2),
                None,
                "{text}"
            );
        }
        assert_eq!(parse_floats(b"[1]", DataType::I32, 1, 32), None);
        assert_eq!(parse_floats(b"[1]", DataType::F16, 1, 32), None);
        assert_eq!(parse_floats(b"[1]", DataType::F32, usize::MAX, 32), None);
    }
}
