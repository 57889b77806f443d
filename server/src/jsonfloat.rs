//! The fast path for the commonest large JSON input: FP32 or FP64 numbers in (possibly nested)
//! arrays. [`prepass`] walks a V2 request once, parses every input's numeric `data` array straight
//! into the tensor's bytes with a fast float parser, and hands serde the request with those arrays
//! cut out, so serde never scans them (its scan to delimit a raw value cost as much as the
//! parsing). [`parse_shaped`] and [`lone_member_floats`] do the same for TF-Serving's bodies, whose
//! shape is their nesting. The general path (serde) stays for everything else and for every error
//! message, so the fast path only has to recognise what it handles and step aside otherwise.

use std::ops::Range;

use crate::tensor::DataType;

/// Integers beyond this (2^53) are converted by the general path from i64/u64 with one rounding
/// rather than through `f64`, so they take that path.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Where parsed numbers go: a tensor's little-endian bytes.
enum Sink {
    F32(Vec<u8>),
    F64(Vec<u8>),
}

impl Sink {
    fn new(dtype: DataType, capacity: usize) -> Option<Sink> {
        Some(match dtype {
            DataType::F32 => Sink::F32(Vec::with_capacity(capacity * 4)),
            DataType::F64 => Sink::F64(Vec::with_capacity(capacity * 8)),
            _ => return None,
        })
    }

    #[inline]
    fn push(&mut self, v: f64) {
        match self {
            Sink::F32(b) => b.extend_from_slice(&(v as f32).to_le_bytes()),
            Sink::F64(b) => b.extend_from_slice(&v.to_le_bytes()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Sink::F32(b) => b.len() / 4,
            Sink::F64(b) => b.len() / 8,
        }
    }

    /// `count` elements of `dtype` as little-endian bytes, exactly as the general path would
    /// write them (a number is read as the nearest `f64`, then narrowed); `None` when the count
    /// or the type differs.
    fn into_bytes(self, dtype: DataType, count: usize) -> Option<Vec<u8>> {
        if self.len() != count {
            return None;
        }
        match (self, dtype) {
            (Sink::F32(b), DataType::F32) | (Sink::F64(b), DataType::F64) => Some(b),
            _ => None,
        }
    }
}

/// A byte cursor over JSON text. Every method returns `None` on anything it does not accept; the
/// caller then leaves the text to serde.
struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn ws(&mut self) {
        while matches!(self.text.get(self.at), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn take(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.at += 1;
        Some(c)
    }

    /// A string at the cursor; returns its raw contents (escapes left as written).
    fn string(&mut self) -> Option<&'a [u8]> {
        let text = self.text;
        if self.take()? != b'"' {
            return None;
        }
        let start = self.at;
        loop {
            self.at += memchr::memchr2(b'"', b'\\', text.get(self.at..)?)?;
            match self.take()? {
                b'"' => return Some(&text[start..self.at - 1]),
                _ => {
                    // An escape: the next byte is part of it, even a quote.
                    self.take()?;
                }
            }
        }
    }

    /// Steps over any value. Only its extent matters here: what it holds stays in the text that
    /// serde parses, which checks it.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'[' | b'{' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'[' | b'{' => depth += 1,
                        b']' | b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => {
                let start = self.at;
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b']' | b'}' | b' ' | b'\n' | b'\r' | b'\t')
                ) {
                    self.at += 1;
                }
                (self.at > start).then_some(())
            }
        }
    }

    /// The members of the object at the cursor, one call of `member` per key with the cursor on
    /// its value; `member` must step over the value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        if self.take()? != b'{' {
            return None;
        }
        self.ws();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.ws();
            if self.take()? != b':' {
                return None;
            }
            self.ws();
            member(self, key)?;
            self.ws();
            match self.take()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// One JSON number. The fast float parser reads it and says where it ends; JSON's grammar is
    /// narrower than the parser's (no `+`, leading zeros, bare points, `inf` or `nan`), so the
    /// few places where they differ are checked on the token.
    #[inline]
    fn number(&mut self) -> Option<f64> {
        let rest = &self.text[self.at..];
        let digits = usize::from(rest.first() == Some(&b'-'));
        match rest.get(digits)? {
            b'0' => {
                if rest.get(digits + 1).is_some_and(u8::is_ascii_digit) {
                    return None;
                }
            }
            b'1'..=b'9' => {}
            _ => return None,
        }
        let (v, used): (f64, usize) = fast_float2::parse_partial(rest).ok()?;
        let token = &rest[..used];
        // A point must have digits after it, before any exponent.
        if let Some(point) = token.iter().position(|&c| c == b'.')
            && !token.get(point + 1).is_some_and(u8::is_ascii_digit)
        {
            return None;
        }
        // serde refuses numbers beyond f64's range; long integers take the general path.
        if !v.is_finite()
            || (v.abs() > MAX_EXACT_INTEGER && !token.iter().any(|c| matches!(c, b'.' | b'e' | b'E')))
        {
            return None;
        }
        self.at += used;
        Some(v)
    }
}

/// Parses `text`, a whole `data` value, when it holds only numbers in arrays nested at most
/// `max_depth` deep, into `count` elements of `dtype` (FP32 or FP64) as little-endian bytes,
/// exactly as the general path would (a number is read as the nearest `f64`, then narrowed).
/// `None` when anything else appears (a string, a boolean, `null`, an object, a long integer,
/// deeper nesting, ragged or empty lists, text that is not JSON), when the count differs, or for
/// another data type: the caller then takes the general path, which also words the error.
pub fn parse_floats(text: &[u8], dtype: DataType, count: usize, max_depth: usize) -> Option<Vec<u8>> {
    // The claimed shape does not size the allocation: a number takes at least two bytes ("0,").
    let mut sink = Sink::new(dtype, count.min(text.len() / 2 + 1))?;
    let mut s = Scanner { text, at: 0 };
    s.ws();
    s.shaped_numbers(&mut sink, max_depth, count)?;
    s.ws();
    if s.at != text.len() {
        return None;
    }
    sink.into_bytes(dtype, count)
}

/// Nested lists of numbers with the shape their nesting gives, for TF-Serving's formats, which
/// send no shape: `text` is a whole value, `dtype` FP32 or FP64. The numbers are appended to `out`
/// as little-endian bytes (no second buffer: a tensor may be most of a large body), and the shape
/// is returned. `None`, with `out` as it was, when the lists are ragged or hold an empty list (the
/// general path words those errors), nest deeper than `max_depth`, hold more than `limit`
/// numbers, or anything [`parse_floats`] refuses.
pub fn parse_shaped(
    text: &[u8],
    dtype: DataType,
    max_depth: usize,
    limit: usize,
    out: &mut Vec<u8>,
) -> Option<Vec<usize>> {
    let start = out.len();
    let mut sink = match dtype {
        DataType::F32 => Sink::F32(std::mem::take(out)),
        DataType::F64 => Sink::F64(std::mem::take(out)),
        _ => return None,
    };
    let mut s = Scanner { text, at: 0 };
    s.ws();
    let shape = s
        .shaped_numbers(&mut sink, max_depth, limit + start / dtype.size()?)
        .filter(|_| {
            s.ws();
            s.at == text.len()
        });
    let (Sink::F32(bytes) | Sink::F64(bytes)) = sink;
    *out = bytes;
    if shape.is_none() {
        out.truncate(start);
    }
    shape
}

impl Scanner<'_> {
    /// The one walk every entry point uses: the number, or rectangular non-empty lists of
    /// numbers nested at most `max_depth` deep, at the cursor, which it leaves after the value.
    /// Numbers go into `sink` (which then holds no more than `limit`); the shape comes out.
    fn shaped_numbers(&mut self, sink: &mut Sink, max_depth: usize, limit: usize) -> Option<Vec<usize>> {
        let before = sink.len();
        // Per open list, its elements so far; per depth, the length every list there must have.
        let mut open: Vec<usize> = Vec::new();
        let mut dims: Vec<Option<usize>> = Vec::new();
        let mut rank: Option<usize> = None;
        loop {
            // A value is expected here.
            if self.peek()? == b'[' {
                if rank.is_some_and(|r| open.len() >= r) || open.len() >= max_depth {
                    return None;
                }
                self.at += 1;
                self.ws();
                if self.peek()? == b']' {
                    return None;
                }
                open.push(0);
                continue;
            }
            if *rank.get_or_insert(open.len()) != open.len() || sink.len() >= limit {
                return None;
            }
            sink.push(self.number()?);
            // After a value (a number or a list just closed): more of its list, or its end.
            loop {
                let Some(count) = open.last_mut() else {
                    // Every depth holds a closed list, so every length is known.
                    let shape = dims.into_iter().collect::<Option<Vec<usize>>>()?;
                    return (sink.len() - before == shape.iter().product::<usize>()).then_some(shape);
                };
                *count += 1;
                self.ws();
                match self.take()? {
                    b',' => {
                        self.ws();
                        break;
                    }
                    b']' => {
                        let n = open.pop()?;
                        let level = open.len();
                        if dims.len() <= level {
                            dims.resize(level + 1, None);
                        }
                        if *dims[level].get_or_insert(n) != n {
                            return None;
                        }
                    }
                    _ => return None,
                }
            }
        }
    }
}

/// What [`lone_member_floats`] found.
pub struct LoneMember {
    /// Which of the two keys was given.
    pub key: usize,
    /// The numbers, little-endian.
    pub bytes: Vec<u8>,
    /// The shape their nesting gives.
    pub shape: Vec<usize>,
    /// Where the value was in the text.
    pub span: Range<usize>,
}

/// TF-Serving's `{"instances": [...]}` or `{"inputs": [...]}` for a model with one FP32/FP64
/// input, in one pass: `keys` are the two member names; the one present must hold nested lists
/// of numbers (see [`parse_shaped`]), and other members are only stepped over: the caller must
/// have the rest of the text checked (with the value's span replaced). `None` when both or neither
/// key is present, a key repeats, or anything else is not what this pass handles: the caller then
/// decodes the request with serde, which also words any error.
pub fn lone_member_floats(
    text: &[u8],
    keys: [&[u8]; 2],
    dtype: DataType,
    max_depth: usize,
    limit: usize,
) -> Option<LoneMember> {
    // Other types are the general path's from the start, before any of the text is read.
    Sink::new(dtype, 0)?;
    let mut found = None;
    let mut repeated = false;
    let mut s = Scanner { text, at: 0 };
    s.ws();
    s.object(|s, key| {
        let Some(which) = keys.iter().position(|k| *k == key) else {
            return s.skip_value();
        };
        repeated |= found.is_some();
        if s.peek()? != b'[' {
            return None;
        }
        let mut sink = Sink::new(dtype, 0)?;
        let start = s.at;
        let shape = s.shaped_numbers(&mut sink, max_depth, limit)?;
        let (Sink::F32(bytes) | Sink::F64(bytes)) = sink;
        found = Some(LoneMember {
            key: which,
            bytes,
            shape,
            span: start..s.at,
        });
        Some(())
    })?;
    s.ws();
    (s.at == text.len() && !repeated).then_some(found)?
}

/// An input's `data` array parsed by [`prepass`].
pub struct FoundData {
    /// The input's position in the request's `inputs`.
    pub input: usize,
    /// Where the array was in the request text (for the general path when the fast one steps
    /// aside).
    pub span: Range<usize>,
    numbers: Sink,
}

impl FoundData {
    /// The array as `count` elements of `dtype`, little-endian; `None` when the general path must
    /// decide (another data type, another count).
    pub fn into_bytes(self, dtype: DataType, count: usize) -> Option<Vec<u8>> {
        self.numbers.into_bytes(dtype, count)
    }
}

/// What [`prepass`] found.
pub struct Prepass {
    /// The request with every parsed `data` array replaced by `null`: what serde parses.
    pub text: Vec<u8>,
    /// The arrays, in the order of their inputs.
    pub found: Vec<FoundData>,
}

/// One pass over a V2 request's JSON: every `inputs[i].data` that is an array of numbers (nested
/// at most `max_depth` deep) and whose input's `datatype`, given before it, is FP32 or FP64, is
/// parsed (arrays that come before their datatype are left to serde: parsing them blind would
/// need a wider buffer than the tensor's). `None` when there is nothing to parse or the text is not what this pass expects
/// (serde then parses the original text and words any error).
pub fn prepass(text: &[u8], max_depth: usize) -> Option<Prepass> {
    let mut found = Vec::new();
    let mut s = Scanner { text, at: 0 };
    s.ws();
    s.object(|s, key| {
        if key != b"inputs" || s.peek()? != b'[' {
            return s.skip_value();
        }
        s.at += 1;
        s.ws();
        if s.peek()? == b']' {
            s.at += 1;
            return Some(());
        }
        let mut input = 0;
        loop {
            if s.peek()? == b'{' {
                s.input(input, &mut found, max_depth)?;
            } else {
                s.skip_value()?;
            }
            input += 1;
            s.ws();
            match s.take()? {
                b',' => s.ws(),
                b']' => return Some(()),
                _ => return None,
            }
        }
    })?;
    s.ws();
    if s.at != text.len() || found.is_empty() {
        return None;
    }
    let cut: usize = found.iter().map(|f: &FoundData| f.span.len()).sum();
    let mut rest = Vec::with_capacity(text.len() - cut + 4 * found.len());
    let mut from = 0;
    for f in &found {
        rest.extend_from_slice(&text[from..f.span.start]);
        rest.extend_from_slice(b"null");
        from = f.span.end;
    }
    rest.extend_from_slice(&text[from..]);
    Some(Prepass { text: rest, found })
}

impl Scanner<'_> {
    /// One input object: notes its `datatype` and `shape` and parses its `data`.
    fn input(&mut self, input: usize, found: &mut Vec<FoundData>, max_depth: usize) -> Option<()> {
        let mut dtype: Option<Result<DataType, ()>> = None;
        let mut count: Option<usize> = None;
        self.object(|s, key| match key {
            b"datatype" if s.peek()? == b'"' => {
                let name = s.string()?;
                dtype = Some(
                    std::str::from_utf8(name)
                        .ok()
                        .and_then(DataType::from_v2_name)
                        .ok_or(()),
                );
                Some(())
            }
            b"shape" => {
                let start = s.at;
                s.skip_value()?;
                count = shape_count(&s.text[start..s.at]);
                Some(())
            }
            b"data" if s.peek()? == b'[' => {
                let Some(Ok(dtype @ (DataType::F32 | DataType::F64))) = dtype else {
                    // Not a float input, or its datatype comes later (clients send it first):
                    // serde's general path handles it.
                    return s.skip_value();
                };
                let start = s.at;
                // A number takes at least two bytes ("0,"), so the text, not the claimed shape,
                // bounds the allocation.
                let capacity = count.unwrap_or(0).min((s.text.len() - start) / 2 + 1);
                let mut numbers = Sink::new(dtype, capacity)?;
                s.shaped_numbers(&mut numbers, max_depth, count.unwrap_or(usize::MAX))?;
                found.push(FoundData {
                    input,
                    span: start..s.at,
                    numbers,
                });
                Some(())
            }
            _ => s.skip_value(),
        })
    }
}

/// The element count of a shape written as a plain array of non-negative integers.
fn shape_count(text: &[u8]) -> Option<usize> {
    let inner = text.strip_prefix(b"[")?.strip_suffix(b"]")?;
    let inner = std::str::from_utf8(inner).ok()?;
    if inner.trim().is_empty() {
        return Some(1);
    }
    inner
        .split(',')
        .try_fold(1usize, |n, d| n.checked_mul(d.trim().parse::<usize>().ok()?))
}

/// Request bodies damaged at random (1–3 bytes removed, inserted or replaced with JSON's
/// punctuation, digits and letters), for tests that compare the fast path with serde alone on
/// text neither was written for. Reproducible from `seed`.
#[cfg(test)]
pub(crate) fn mangled(bodies: &[String], seed: u64, count: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut seed = seed;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as usize
    };
    let alphabet = b"[]{},:\" 0123456789-+.eE\\atnul";
    (0..count).map(move |_| {
        let mut body = bodies[next() % bodies.len()].clone().into_bytes();
        for _ in 0..1 + next() % 3 {
            let at = next() % body.len().max(1);
            match next() % 3 {
                0 if !body.is_empty() => {
                    body.remove(at);
                }
                1 => body.insert(at, alphabet[next() % alphabet.len()]),
                _ if !body.is_empty() => body[at] = alphabet[next() % alphabet.len()],
                _ => {}
            }
        }
        body
    })
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
    fn nesting_gives_the_shape_and_ragged_or_empty_lists_step_aside() {
        let shaped = |t: &str| parse_shaped(t.as_bytes(), DataType::F32, 32, 100, &mut Vec::new());
        assert_eq!(shaped("[[1,2,3],[4,5,6]]"), Some(vec![2, 3]));
        assert_eq!(shaped(" [ [ [0.5] ] , [ [ -1 ] ] ] "), Some(vec![2, 1, 1]));
        assert_eq!(shaped("7"), Some(vec![]));
        // Appended after what is there; on refusal, what was there is left as it was.
        let mut out = vec![7u8; 8];
        assert_eq!(
            parse_shaped(b"[[1.5],[-2]]", DataType::F64, 32, 2, &mut out),
            Some(vec![2, 1])
        );
        assert_eq!(
            out,
            [[7u8; 8], 1.5f64.to_le_bytes(), (-2f64).to_le_bytes()].concat()
        );
        assert_eq!(
            parse_shaped(b"[[1.5],[-2, 3]]", DataType::F64, 32, 9, &mut out),
            None
        );
        assert_eq!(parse_shaped(b"[4, 5]", DataType::F64, 32, 1, &mut out), None);
        assert_eq!(out.len(), 24);
        for t in [
            "[[1,2],[3]]",
            "[[1],2]",
            "[1,[2]]",
            "[]",
            "[[],[]]",
            "[[1,2],[3,4]",
            "[1] 2",
        ] {
            assert_eq!(shaped(t), None, "{t}");
        }
        // The depth and count limits.
        assert_eq!(
            parse_shaped(b"[[[1]]]", DataType::F32, 2, 100, &mut Vec::new()),
            None
        );
        assert_eq!(
            parse_shaped(b"[1,2,3]", DataType::F32, 32, 2, &mut Vec::new()),
            None
        );
        assert_eq!(
            parse_shaped(b"[1,2,3]", DataType::I32, 32, 9, &mut Vec::new()),
            None
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
            // Numbers the fast parser reads but JSON does not allow.
            ("[1.]", 1),
            ("[1.e5]", 1),
            ("[12.E-3]", 1),
            ("[-0.]", 1),
            ("[.5]", 1),
            ("[-.5]", 1),
            ("[01]", 1),
            ("[-01.5]", 1),
            ("[+1]", 1),
            ("[inf]", 1),
            ("[-infinity]", 1),
            ("[NaN]", 1),
            ("[1e]", 1),
            ("[-]", 1),
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
