//! Bounded parsing of a V2 request header's lists and maps. Small entries grow many times once
//! decoded (an output `{"name":"y"}`, 12 bytes, becomes a struct, a string and a map slot; a
//! parameter value `[0,0,...]` becomes a `Value` tree of 32 bytes an element), and serde builds
//! each list whole before the request can be checked against the model. So each list stops at a
//! bound no real request reaches, and parameter values are the scalars the protocol allows
//! (Triton refuses the others too), parsed without building what they would hold.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::tensor::MAX_DIMS;

/// The most inputs, and the most outputs, one request may name (models with one input per
/// feature have thousands).
pub const MAX_TENSORS: usize = 16384;
/// The most entries in the request's `parameters` object.
pub const MAX_PARAMETERS: usize = 256;
/// The most entries in an input's or an output's `parameters` (the protocol's own keys are
/// `binary_data`, `binary_data_size`, the three `shared_memory_*` and `classification`): with
/// up to [`MAX_TENSORS`] tensors, this bounds the entries of a whole request.
pub const MAX_TENSOR_PARAMETERS: usize = 16;

/// A JSON list of at most `max` elements, named `what` in the error.
struct AtMost<T> {
    max: usize,
    what: &'static str,
    element: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for AtMost<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(x) = seq.next_element()? {
            if out.len() == self.max {
                return Err(A::Error::custom(format!("more than {} {}", self.max, self.what)));
            }
            out.push(x);
        }
        Ok(out)
    }
}

fn at_most<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(AtMost {
        max,
        what,
        element: PhantomData,
    })
}

/// `inputs`: at most [`MAX_TENSORS`].
pub fn inputs<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    at_most(d, MAX_TENSORS, "inputs")
}

/// `outputs` (absent or null: none named): at most [`MAX_TENSORS`].
pub fn outputs<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Vec<T>>, D::Error> {
    Option::<Outputs<T>>::deserialize(d).map(|o| o.map(|o| o.0))
}

struct Outputs<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Outputs<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        at_most(d, MAX_TENSORS, "outputs").map(Outputs)
    }
}

/// A tensor's `shape`: at most [`MAX_DIMS`] dimensions.
pub fn shape<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    at_most(d, MAX_DIMS, "dimensions in a shape")
}

/// The request's `parameters` object (absent or null: none): at most [`MAX_PARAMETERS`] entries,
/// each a string, a number, a boolean or null.
pub fn parameters<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Map<String, Value>>, D::Error> {
    d.deserialize_option(Parameters {
        max: MAX_PARAMETERS,
        of: "",
    })
}

/// An input's or an output's `parameters`: at most [`MAX_TENSOR_PARAMETERS`] entries.
pub fn tensor_parameters<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Map<String, Value>>, D::Error> {
    d.deserialize_option(Parameters {
        max: MAX_TENSOR_PARAMETERS,
        of: " for one input or output",
    })
}

struct Parameters {
    max: usize,
    of: &'static str,
}

impl<'de> Visitor<'de> for Parameters {
    type Value = Option<Map<String, Value>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an object of at most {} parameters{}", self.max, self.of)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // A repeated key replaces its value and takes no more room.
            if out.len() == self.max && !out.contains_key(&key) {
                return Err(A::Error::custom(format!(
                    "more than {} parameters{}",
                    self.max, self.of
                )));
            }
            let value = map.next_value_seed(Scalar { key: &key })?;
            out.insert(key, value);
        }
        Ok(Some(out))
    }
}

/// A parameter's value: refused at its first character when it is a list or an object.
struct Scalar<'k> {
    key: &'k str,
}

impl<'de> DeserializeSeed<'de> for Scalar<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scalar<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "parameter {:?} must be a string, a number, a boolean or null",
            self.key
        )
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        Err(A::Error::custom(format!(
            "parameter {:?} must be a string, a number, a boolean or null, not a list",
            self.key
        )))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        Err(A::Error::custom(format!(
            "parameter {:?} must be a string, a number, a boolean or null, not an object",
            self.key
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    struct Header {
        #[serde(default, deserialize_with = "parameters")]
        parameters: Option<Map<String, Value>>,
        #[serde(default, deserialize_with = "outputs")]
        outputs: Option<Vec<String>>,
        #[serde(default, deserialize_with = "shape")]
        shape: Vec<i64>,
        #[serde(default, deserialize_with = "tensor_parameters")]
        tensor_parameters: Option<Map<String, Value>>,
    }

    fn parse(text: &str) -> Result<Header, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn scalars_and_null_are_parameters_and_lists_or_objects_are_not() {
        let h =
            parse(r#"{"parameters": {"a": 1, "b": -2, "c": 0.5, "d": "x", "e": true, "f": null}}"#).unwrap();
        let p = h.parameters.unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(p["c"], Value::from(0.5));
        assert!(parse(r#"{"parameters": null}"#).unwrap().parameters.is_none());
        assert!(parse("{}").unwrap().parameters.is_none());
        let list = parse(r#"{"parameters": {"k": [0, 0]}}"#).unwrap_err();
        assert!(
            list.starts_with(r#"parameter "k" must be a string, a number, a boolean or null, not a list"#),
            "{list}"
        );
        let object = parse(r#"{"parameters": {"k": {"x": 1}}}"#).unwrap_err();
        assert!(object.contains("not an object"), "{object}");
        let wrong = parse(r#"{"parameters": [1]}"#).unwrap_err();
        assert!(wrong.contains("an object of at most 256 parameters"), "{wrong}");
    }

    #[test]
    fn every_list_stops_at_its_bound() {
        let keys = |n: usize| {
            (0..n)
                .map(|i| format!("\"k{i}\": 1"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(
            parse(&format!("{{\"parameters\": {{{}}}}}", keys(256)))
                .unwrap()
                .parameters
                .unwrap()
                .len(),
            256
        );
        let over = parse(&format!("{{\"parameters\": {{{}}}}}", keys(257))).unwrap_err();
        assert!(over.starts_with("more than 256 parameters"), "{over}");
        // The same key again replaces its value.
        let again = format!("{{\"parameters\": {{{}, \"k0\": 2}}}}", keys(256));
        assert_eq!(parse(&again).unwrap().parameters.unwrap()["k0"], 2);
        let names = |n: usize| format!("{{\"outputs\": [{}]}}", vec!["\"y\""; n].join(","));
        assert_eq!(parse(&names(16384)).unwrap().outputs.unwrap().len(), 16384);
        assert!(
            parse(&names(16385))
                .unwrap_err()
                .starts_with("more than 16384 outputs")
        );
        let tensor = |n: usize| format!("{{\"tensor_parameters\": {{{}}}}}", keys(n));
        assert_eq!(parse(&tensor(16)).unwrap().tensor_parameters.unwrap().len(), 16);
        let over = parse(&tensor(17)).unwrap_err();
        assert!(
            over.starts_with("more than 16 parameters for one input or output"),
            "{over}"
        );
        assert!(parse(r#"{"outputs": null}"#).unwrap().outputs.is_none());
        let dims = |n: usize| format!("{{\"shape\": [{}]}}", vec!["1"; n].join(","));
        assert_eq!(parse(&dims(64)).unwrap().shape.len(), 64);
        assert!(
            parse(&dims(65))
                .unwrap_err()
                .starts_with("more than 64 dimensions in a shape")
        );
    }
}
