//! Open Inference Protocol tensors over REST: the JSON request and response bodies, `data`
//! flattened from nested arrays, the binary tensor data extension, and base64 for JSON BYTES
//! elements; what a tensor must be for the model is checked by [`crate::infer::tensor`].

use std::fmt;

use axum::body::Bytes;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::http::error::ApiError;
use crate::infer::tensor::{model_input, output_names, Contents, InputTensor};
use crate::infer::ModelInput;

/// The body of `POST /v2/models/{model_name}/infer` (the JSON part, with the binary extension).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<RequestParameters>,
    pub inputs: Vec<RequestInput>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestParameters {
    /// Every output in binary unless the output says otherwise.
    #[serde(default)]
    pub binary_data_output: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<u64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<InputParameters>,
    #[serde(default)]
    pub data: Option<TensorData>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputParameters {
    /// The tensor's bytes follow the JSON header instead of `data`.
    #[serde(default)]
    pub binary_data_size: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<OutputParameters>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputParameters {
    #[serde(default)]
    pub binary_data: Option<bool>,
}

/// The body of a successful infer (the JSON part when some output is binary).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseOutput {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<OutputSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputSize {
    pub binary_data_size: usize,
}

/// `data` of a JSON input, flattened from any nesting of arrays.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Numbers(Vec<f32>),
    Strings(Vec<String>),
}

#[derive(Default)]
struct Flat {
    numbers: Vec<f32>,
    strings: Vec<String>,
}

struct FlatVisitor<'a>(&'a mut Flat);

impl<'de> Visitor<'de> for FlatVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array (possibly nested) of numbers or of strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(FlatVisitor(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        let value = v as f32;
        if !value.is_finite() {
            return Err(E::custom(format!("{v} is not a finite FP32 value")));
        }
        self.0.numbers.push(value);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.strings.push(v.to_owned());
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for FlatVisitor<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Deserialize<'de> for TensorData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut flat = Flat::default();
        d.deserialize_seq(FlatVisitor(&mut flat))?;
        match (flat.numbers.is_empty(), flat.strings.is_empty()) {
            (_, true) => Ok(Self::Numbers(flat.numbers)),
            (true, false) => Ok(Self::Strings(flat.strings)),
            (false, false) => Err(de::Error::custom("`data` mixes numbers and strings")),
        }
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// Splits a body into its JSON header and binary tensor data, per the
/// `Inference-Header-Content-Length` header value (`None`: all JSON).
pub fn split_body(body: &Bytes, header_length: Option<&str>) -> Result<(Bytes, Bytes), ApiError> {
    let Some(text) = header_length else {
        return Ok((body.clone(), Bytes::new()));
    };
    let length: usize = text.trim().parse().map_err(|_| {
        bad(format!(
            "Inference-Header-Content-Length must be a byte count, got {text:?}"
        ))
    })?;
    if length > body.len() {
        return Err(bad(format!(
            "Inference-Header-Content-Length is {length} but the body has {} bytes",
            body.len()
        )));
    }
    Ok((body.slice(..length), body.slice(length..)))
}

/// Reads the inputs of `request` into [`ModelInput`] of at most `max_batch` images, taking
/// binary tensor data from `binary`, all of which must be used.
pub fn parse_inputs(
    request: &InferRequest,
    binary: &Bytes,
    max_batch: usize,
) -> Result<ModelInput, ApiError> {
    let mut tensors = Vec::with_capacity(request.inputs.len());
    let mut shapes = Vec::with_capacity(request.inputs.len());
    let mut used = 0u64;
    for input in &request.inputs {
        let shape = input
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| bad(format!("shape {:?} has too many elements", input.shape)))?;
        shapes.push(shape);
        let (contents, size) = contents(input, binary, used)?;
        used = used.saturating_add(size);
        tensors.push(contents);
    }
    if used != binary.len() as u64 {
        return Err(bad(format!(
            "the body carries {} bytes of binary tensor data but the inputs declare {used}",
            binary.len()
        )));
    }
    let tensors = request
        .inputs
        .iter()
        .zip(&shapes)
        .zip(tensors)
        .map(|((input, shape), contents)| InputTensor {
            name: &input.name,
            datatype: &input.datatype,
            shape,
            contents,
        })
        .collect();
    Ok(model_input(tensors, max_batch)?)
}

/// An input's elements, from `data` or from the binary data at `offset`, and how many binary
/// bytes it takes.
fn contents(
    input: &RequestInput,
    binary: &Bytes,
    offset: u64,
) -> Result<(Contents, u64), ApiError> {
    let size = input.parameters.as_ref().and_then(|p| p.binary_data_size);
    match (&input.data, size) {
        (Some(TensorData::Numbers(values)), None) => Ok((Contents::Fp32(values.clone()), 0)),
        (Some(TensorData::Strings(texts)), None) if input.datatype == "BYTES" => {
            let images = texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    decode_base64(t)
                        .map(Bytes::from)
                        .map_err(|e| bad(format!("input `{}` element {i}: {e}", input.name)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((Contents::Bytes(images), 0))
        }
        (Some(TensorData::Strings(_)), None) => Err(bad(format!(
            "input `{}` is {} but `data` holds strings",
            input.name, input.datatype
        ))),
        (None, Some(size)) => {
            let range = usize::try_from(offset)
                .ok()
                .zip(usize::try_from(size).ok())
                .and_then(|(start, size)| Some(start..start.checked_add(size)?))
                .filter(|range| range.end <= binary.len())
                .ok_or_else(|| {
                    bad(format!(
                        "input `{}` declares binary_data_size {size} but the body carries {} bytes of binary data",
                        input.name,
                        binary.len()
                    ))
                })?;
            Ok((Contents::Raw(binary.slice(range)), size))
        }
        (Some(_), Some(_)) => Err(bad(format!(
            "input `{}` has both `data` and `binary_data_size`",
            input.name
        ))),
        (None, None) => Err(bad(format!(
            "input `{}` has neither `data` nor `parameters.binary_data_size`",
            input.name
        ))),
    }
}

/// Standard base64 (RFC 4648 alphabet), padding optional.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let trimmed = text.trim_end_matches('=');
    let padding = text.len() - trimmed.len();
    if padding > 2 || (padding > 0 && !text.len().is_multiple_of(4)) || trimmed.len() % 4 == 1 {
        return Err("not valid base64 (bad length or padding)".into());
    }
    let mut out = Vec::with_capacity(trimmed.len() / 4 * 3 + 2);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for (i, c) in trimmed.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("not valid base64: byte {c:#04x} at {i}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if acc != 0 {
        return Err("not valid base64 (non-zero trailing bits)".into());
    }
    Ok(out)
}

/// Which outputs to answer, in order, and whether each is binary.
pub fn requested_outputs(request: &InferRequest) -> Result<Vec<(&'static str, bool)>, ApiError> {
    let default_binary = request
        .parameters
        .as_ref()
        .and_then(|p| p.binary_data_output)
        .unwrap_or(false);
    let requested = request.outputs.as_deref().unwrap_or_default();
    let names = output_names(requested.iter().map(|o| o.name.as_str()))?;
    Ok(names
        .into_iter()
        .map(|name| {
            let binary = requested
                .iter()
                .find(|o| o.name == name)
                .and_then(|o| o.parameters.as_ref())
                .and_then(|p| p.binary_data)
                .unwrap_or(default_binary);
            (name, binary)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::tensor::{OUTPUT_LOGITS, OUTPUT_PROBABILITIES};

    fn request(json: &str) -> InferRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn base64_round_trips_and_rejects_garbage() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert_eq!(decode_base64("/+8=").unwrap(), [0xff, 0xef]);
        for bad in ["a", "aGVsbG8==", "aGV$", "aGVsbG9=", "a==="] {
            assert!(decode_base64(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nested_and_flat_data_flatten_alike() {
        let nested: TensorData = serde_json::from_str("[[1, 2], [3.5, -4]]").unwrap();
        let flat: TensorData = serde_json::from_str("[1, 2, 3.5, -4]").unwrap();
        assert_eq!(nested, flat);
        assert_eq!(nested, TensorData::Numbers(vec![1.0, 2.0, 3.5, -4.0]));
        assert!(serde_json::from_str::<TensorData>("[1, \"a\"]").is_err());
        assert!(serde_json::from_str::<TensorData>("[1e300]").is_err());
        assert!(serde_json::from_str::<TensorData>("[true]").is_err());
        assert!(serde_json::from_str::<TensorData>("3").is_err());
    }

    #[test]
    fn fp32_shape_data_and_batch_limits() {
        let ok =
            r#"{"inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32","data":[DATA]}]}"#;
        let data = vec!["0.5"; 3072].join(",");
        let r = request(&ok.replace("DATA", &data));
        assert_eq!(parse_inputs(&r, &Bytes::new(), 4).unwrap().len(), 1);
        assert!(
            parse_inputs(&r, &Bytes::new(), 0).is_err(),
            "over max batch"
        );
        let short = request(&ok.replace("DATA", "1,2"));
        assert!(parse_inputs(&short, &Bytes::new(), 4).is_err());
        let huge = r#"{"inputs":[{"name":"input","shape":[2,3,32,32,18446744073709551615],"datatype":"FP32","data":[1]}]}"#;
        assert!(parse_inputs(&request(huge), &Bytes::new(), 4).is_err());
        let int = ok.replace("FP32", "INT8").replace("DATA", &data);
        assert!(parse_inputs(&request(&int), &Bytes::new(), 4).is_err());
    }

    #[test]
    fn binary_inputs_must_match_their_declared_sizes() {
        let json = |size: usize| {
            request(&format!(
                r#"{{"inputs":[{{"name":"image_bytes","shape":[2],"datatype":"BYTES","parameters":{{"binary_data_size":{size}}}}}]}}"#
            ))
        };
        let mut body = Vec::new();
        for element in [&b"abc"[..], b"de"] {
            body.extend_from_slice(&(element.len() as u32).to_le_bytes());
            body.extend_from_slice(element);
        }
        let body = Bytes::from(body);
        match parse_inputs(&json(body.len()), &body, 4).unwrap() {
            ModelInput::Images(images) => assert_eq!(images, [&b"abc"[..], b"de"]),
            other => panic!("{other:?}"),
        }
        assert!(parse_inputs(&json(body.len() - 1), &body, 4).is_err());
        assert!(parse_inputs(&json(body.len() + 1), &body, 4).is_err());
        let mut lying = body.to_vec();
        lying[0] = 200;
        assert!(parse_inputs(&json(lying.len()), &Bytes::from(lying), 4).is_err());
    }

    #[test]
    fn outputs_default_to_both_and_follow_binary_flags() {
        let r = request(r#"{"inputs":[],"parameters":{"binary_data_output":true}}"#);
        assert_eq!(
            requested_outputs(&r).unwrap(),
            [(OUTPUT_LOGITS, true), (OUTPUT_PROBABILITIES, true)]
        );
        let r = request(
            r#"{"inputs":[],"outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}"#,
        );
        assert_eq!(
            requested_outputs(&r).unwrap(),
            [(OUTPUT_PROBABILITIES, true)]
        );
        let r = request(r#"{"inputs":[],"outputs":[{"name":"nope"}]}"#);
        assert!(requested_outputs(&r).is_err());
        let r = request(r#"{"inputs":[],"outputs":[{"name":"logits"},{"name":"logits"}]}"#);
        assert!(requested_outputs(&r).is_err());
    }
}
