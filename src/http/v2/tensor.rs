//! Open Inference Protocol tensors: the JSON request and response bodies, `data` flattened
//! from nested arrays, the binary tensor data extension, and base64 for JSON BYTES elements.

use std::collections::HashSet;
use std::fmt;

use axum::body::Bytes;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::http::error::ApiError;
use crate::model::{INPUT_CHANNELS, INPUT_SIZE};

/// The FP32 input: normalised images, `[N, 3, 32, 32]`, row-major.
pub const INPUT_PIXELS: &str = "input";
/// The BYTES input: encoded images (PNG, JPEG, ...), `[N]`.
pub const INPUT_IMAGES: &str = "image_bytes";
/// The outputs, both FP32 `[N, classes]`.
pub const OUTPUT_LOGITS: &str = "logits";
pub const OUTPUT_PROBABILITIES: &str = "probabilities";
pub const OUTPUTS: [&str; 2] = [OUTPUT_LOGITS, OUTPUT_PROBABILITIES];

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

/// The images of a request, ready for the batcher.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// `n * [3, 32, 32]` normalised floats.
    Pixels { pixels: Vec<f32>, n: usize },
    /// Encoded images, decoded and normalised like `/classify` uploads.
    Images(Vec<Bytes>),
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Self::Pixels { n, .. } => *n,
            Self::Images(images) => images.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

/// Reads the one input of `request` into a [`Batch`] of at most `max_batch` images, taking
/// binary tensor data from `binary`, all of which must be used.
pub fn parse_inputs(
    request: &InferRequest,
    binary: &Bytes,
    max_batch: usize,
) -> Result<Batch, ApiError> {
    let input = match request.inputs.as_slice() {
        [one] => one,
        inputs => {
            return Err(bad(format!(
            "expected exactly one input (`{INPUT_PIXELS}` FP32 or `{INPUT_IMAGES}` BYTES), got {}",
            inputs.len()
        )))
        }
    };
    let batch = match input.name.as_str() {
        INPUT_PIXELS => {
            expect_datatype(input, "FP32")?;
            let n = batch_size(input, &[INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE], max_batch)?;
            let count = element_count(&input.shape)?;
            let pixels = match source(input, binary)? {
                Source::Json(TensorData::Numbers(values)) => values,
                Source::Json(TensorData::Strings(_)) => {
                    return Err(bad(format!(
                        "input `{INPUT_PIXELS}` is FP32 but `data` holds strings"
                    )))
                }
                Source::Binary(bytes) => fp32_from_le(&bytes, count)?,
            };
            if pixels.len() != count {
                return Err(bad(format!(
                    "input `{INPUT_PIXELS}` has shape {:?} ({count} values) but {} values",
                    input.shape,
                    pixels.len()
                )));
            }
            Batch::Pixels { pixels, n }
        }
        INPUT_IMAGES => {
            expect_datatype(input, "BYTES")?;
            let n = batch_size(input, &[], max_batch)?;
            let images = match source(input, binary)? {
                Source::Json(TensorData::Strings(texts)) => texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        decode_base64(t).map(Bytes::from).map_err(|e| {
                            bad(format!("input `{INPUT_IMAGES}` element {i}: {e}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                Source::Json(TensorData::Numbers(v)) if v.is_empty() => Vec::new(),
                Source::Json(TensorData::Numbers(_)) => {
                    return Err(bad(format!(
                        "input `{INPUT_IMAGES}` is BYTES: `data` must hold base64 strings"
                    )))
                }
                Source::Binary(bytes) => length_prefixed(&bytes)?,
            };
            if images.len() != n {
                return Err(bad(format!(
                    "input `{INPUT_IMAGES}` has shape [{n}] but {} elements",
                    images.len()
                )));
            }
            Batch::Images(images)
        }
        other => {
            return Err(bad(format!(
                "unknown input {other:?}; the model takes `{INPUT_PIXELS}` (FP32 [-1,3,32,32]) or `{INPUT_IMAGES}` (BYTES [-1])"
            )))
        }
    };
    let used = input
        .parameters
        .as_ref()
        .and_then(|p| p.binary_data_size)
        .unwrap_or(0);
    if used != binary.len() as u64 {
        return Err(bad(format!(
            "the body carries {} bytes of binary tensor data but the inputs declare {used}",
            binary.len()
        )));
    }
    Ok(batch)
}

fn expect_datatype(input: &RequestInput, datatype: &str) -> Result<(), ApiError> {
    if input.datatype == datatype {
        Ok(())
    } else {
        Err(bad(format!(
            "input `{}` must have datatype {datatype}, got {:?}",
            input.name, input.datatype
        )))
    }
}

/// The leading dimension, checked against `max_batch`, with the rest of the shape `inner`.
fn batch_size(input: &RequestInput, inner: &[usize], max_batch: usize) -> Result<usize, ApiError> {
    let shape_ok = input.shape.len() == inner.len() + 1
        && input.shape[1..]
            .iter()
            .zip(inner)
            .all(|(&d, &e)| d == e as u64);
    if !shape_ok {
        let expected: Vec<String> = std::iter::once("N".to_owned())
            .chain(inner.iter().map(|d| d.to_string()))
            .collect();
        return Err(bad(format!(
            "input `{}` must have shape [{}], got {:?}",
            input.name,
            expected.join(", "),
            input.shape
        )));
    }
    let n = input.shape[0];
    if n == 0 || n > max_batch as u64 {
        return Err(bad(format!(
            "input `{}` has batch size {n}; it must be from 1 to {max_batch}",
            input.name
        )));
    }
    usize::try_from(n).map_err(|_| bad("batch size out of range"))
}

fn element_count(shape: &[u64]) -> Result<usize, ApiError> {
    shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad(format!("shape {shape:?} has too many elements")))
}

enum Source {
    Json(TensorData),
    Binary(Bytes),
}

fn source(input: &RequestInput, binary: &Bytes) -> Result<Source, ApiError> {
    let size = input.parameters.as_ref().and_then(|p| p.binary_data_size);
    match (&input.data, size) {
        (Some(data), None) => Ok(Source::Json(data.clone())),
        (None, Some(size)) => {
            let size = usize::try_from(size)
                .ok()
                .filter(|&s| s <= binary.len())
                .ok_or_else(|| {
                    bad(format!(
                        "input `{}` declares binary_data_size {size} but the body carries {} bytes of binary data",
                        input.name,
                        binary.len()
                    ))
                })?;
            Ok(Source::Binary(binary.slice(..size)))
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

fn fp32_from_le(bytes: &[u8], count: usize) -> Result<Vec<f32>, ApiError> {
    let expected = count
        .checked_mul(4)
        .ok_or_else(|| bad("shape has too many elements"))?;
    if bytes.len() != expected {
        return Err(bad(format!(
            "FP32 binary data of {count} values must be {expected} bytes, got {}",
            bytes.len()
        )));
    }
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("FP32 value {i} is not finite")));
    }
    Ok(values)
}

/// BYTES elements in binary: each a little-endian u32 length, then that many bytes.
fn length_prefixed(bytes: &Bytes) -> Result<Vec<Bytes>, ApiError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes.get(at..at + 4).ok_or_else(|| {
            bad("BYTES binary data ends inside an element's 4-byte length prefix")
        })?;
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let start = at + 4;
        let end = start
            .checked_add(length)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                bad(format!(
                    "BYTES element {} declares {length} bytes, past the end of the data",
                    out.len()
                ))
            })?;
        out.push(bytes.slice(start..end));
        at = end;
    }
    Ok(out)
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
    let Some(outputs) = &request.outputs else {
        return Ok(OUTPUTS.iter().map(|&n| (n, default_binary)).collect());
    };
    let mut seen = HashSet::new();
    outputs
        .iter()
        .map(|o| {
            let name = OUTPUTS
                .iter()
                .copied()
                .find(|&n| n == o.name)
                .ok_or_else(|| {
                    bad(format!(
                        "unknown output {:?}; the model answers `{OUTPUT_LOGITS}` and `{OUTPUT_PROBABILITIES}`",
                        o.name
                    ))
                })?;
            if !seen.insert(name) {
                return Err(bad(format!("output `{name}` is requested twice")));
            }
            let binary = o
                .parameters
                .as_ref()
                .and_then(|p| p.binary_data)
                .unwrap_or(default_binary);
            Ok((name, binary))
        })
        .collect()
}

/// Row-wise softmax of `classes`-wide logits, in f64 for stability.
pub fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(classes.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = row.iter().map(|&l| f64::from(l - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        out.extend(exps.iter().map(|e| (e / total) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Batch::Images(images) => assert_eq!(images, [&b"abc"[..], b"de"]),
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

    #[test]
    fn softmax_rows_sum_to_one() {
        let p = softmax_rows(&[0.0, 0.0, 1000.0, 1.0, 2.0, 3.0], 3);
        assert!((p[2] - 1.0).abs() < 1e-6);
        assert!((p[3..].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[5] > p[4] && p[4] > p[3]);
    }
}
