//! The model's tensors in the Open Inference Protocol, for every protocol that carries it (REST
//! v2, gRPC): input and output names, datatypes and shapes, and the checks that turn one input
//! tensor into [`ModelInput`].

use std::collections::HashSet;

use bytes::Bytes;

use super::{InferError, ModelInfo, ModelInput};
use crate::model::{IMAGE_FLOATS, INPUT_CHANNELS, INPUT_SIZE};

/// The FP32 input: normalised images, `[N, 3, 32, 32]`, row-major.
pub const INPUT_PIXELS: &str = "input";
/// The BYTES input: encoded images (PNG, JPEG, ...), `[N]`.
pub const INPUT_IMAGES: &str = "image_bytes";
/// The outputs, both FP32 `[N, classes]`.
pub const OUTPUT_LOGITS: &str = "logits";
pub const OUTPUT_PROBABILITIES: &str = "probabilities";
pub const OUTPUTS: [&str; 2] = [OUTPUT_LOGITS, OUTPUT_PROBABILITIES];
/// The one version of the served model.
pub const MODEL_VERSION: &str = "1";

/// A tensor as the model metadata describes it; -1 marks the batch dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// The model's inputs: the FP32 pixels and the BYTES images (a request sends one of them).
pub fn input_specs(model: &ModelInfo) -> Vec<TensorSpec> {
    let [c, h, w] = model
        .input_shape
        .map(|d| i64::try_from(d).unwrap_or(i64::MAX));
    vec![
        TensorSpec {
            name: INPUT_PIXELS,
            datatype: "FP32",
            shape: vec![-1, c, h, w],
        },
        TensorSpec {
            name: INPUT_IMAGES,
            datatype: "BYTES",
            shape: vec![-1],
        },
    ]
}

/// The model's outputs, both FP32 `[-1, classes]`.
pub fn output_specs(model: &ModelInfo) -> Vec<TensorSpec> {
    let classes = i64::try_from(model.num_classes).unwrap_or(i64::MAX);
    OUTPUTS
        .iter()
        .map(|&name| TensorSpec {
            name,
            datatype: "FP32",
            shape: vec![-1, classes],
        })
        .collect()
}

/// An input tensor's elements as the request carried them.
#[derive(Debug, Clone, PartialEq)]
pub enum Contents {
    /// FP32 values (JSON numbers, gRPC `fp32_contents`).
    Fp32(Vec<f32>),
    /// BYTES elements (base64-decoded JSON strings, gRPC `bytes_contents`).
    Bytes(Vec<Bytes>),
    /// Raw little-endian data (the binary tensor data extension, gRPC `raw_input_contents`):
    /// FP32 values, or BYTES elements each behind a 4-byte little-endian length.
    Raw(Bytes),
}

/// One input tensor of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor<'a> {
    pub name: &'a str,
    pub datatype: &'a str,
    pub shape: &'a [i64],
    pub contents: Contents,
}

fn invalid(message: impl Into<String>) -> InferError {
    InferError::InvalidInput(message.into())
}

/// The model's one input: exactly one tensor, `input` FP32 `[N, 3, 32, 32]` or `image_bytes`
/// BYTES `[N]`, with `1 <= N <= max_batch` and as many elements as its shape says.
pub fn model_input(
    inputs: Vec<InputTensor<'_>>,
    max_batch: usize,
) -> Result<ModelInput, InferError> {
    let count = inputs.len();
    let Some(input) = inputs.into_iter().next().filter(|_| count == 1) else {
        return Err(invalid(format!(
            "expected exactly one input (`{INPUT_PIXELS}` FP32 or `{INPUT_IMAGES}` BYTES), got {count}"
        )));
    };
    match input.name {
        INPUT_PIXELS => {
            expect_datatype(&input, "FP32")?;
            let n = batch_size(&input, &[INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE], max_batch)?;
            let count = n * IMAGE_FLOATS;
            let pixels = match input.contents {
                Contents::Fp32(values) => {
                    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                        return Err(invalid(format!("FP32 value {i} is not finite")));
                    }
                    values
                }
                Contents::Raw(bytes) => fp32_from_le(&bytes, count)?,
                Contents::Bytes(_) => {
                    return Err(invalid(format!(
                        "input `{INPUT_PIXELS}` is FP32 but its contents are BYTES"
                    )))
                }
            };
            if pixels.len() != count {
                return Err(invalid(format!(
                    "input `{INPUT_PIXELS}` has shape {:?} ({count} values) but {} values",
                    input.shape,
                    pixels.len()
                )));
            }
            Ok(ModelInput::Pixels { pixels, n })
        }
        INPUT_IMAGES => {
            expect_datatype(&input, "BYTES")?;
            let n = batch_size(&input, &[], max_batch)?;
            let images = match input.contents {
                Contents::Bytes(images) => images,
                Contents::Raw(bytes) => length_prefixed(&bytes)?,
                Contents::Fp32(values) if values.is_empty() => Vec::new(),
                Contents::Fp32(_) => {
                    return Err(invalid(format!(
                        "input `{INPUT_IMAGES}` is BYTES but its contents are numbers"
                    )))
                }
            };
            if images.len() != n {
                return Err(invalid(format!(
                    "input `{INPUT_IMAGES}` has shape [{n}] but {} elements",
                    images.len()
                )));
            }
            Ok(ModelInput::Images(images))
        }
        other => Err(invalid(format!(
            "unknown input {other:?}; the model takes `{INPUT_PIXELS}` (FP32 [-1,3,32,32]) or `{INPUT_IMAGES}` (BYTES [-1])"
        ))),
    }
}

fn expect_datatype(input: &InputTensor<'_>, datatype: &str) -> Result<(), InferError> {
    if input.datatype == datatype {
        Ok(())
    } else {
        Err(invalid(format!(
            "input `{}` must have datatype {datatype}, got {:?}",
            input.name, input.datatype
        )))
    }
}

/// The leading dimension, checked against `max_batch`, with the rest of the shape `inner`.
fn batch_size(
    input: &InputTensor<'_>,
    inner: &[usize],
    max_batch: usize,
) -> Result<usize, InferError> {
    let shape = input.shape;
    let shape_ok = shape.len() == inner.len() + 1
        && shape[1..]
            .iter()
            .zip(inner)
            .all(|(&d, &e)| i64::try_from(e) == Ok(d));
    if !shape_ok {
        let expected: Vec<String> = std::iter::once("N".to_owned())
            .chain(inner.iter().map(|d| d.to_string()))
            .collect();
        return Err(invalid(format!(
            "input `{}` must have shape [{}], got {shape:?}",
            input.name,
            expected.join(", "),
        )));
    }
    usize::try_from(shape[0])
        .ok()
        .filter(|n| (1..=max_batch).contains(n))
        .ok_or_else(|| {
            invalid(format!(
                "input `{}` has batch size {}; it must be from 1 to {max_batch}",
                input.name, shape[0]
            ))
        })
}

fn fp32_from_le(bytes: &[u8], count: usize) -> Result<Vec<f32>, InferError> {
    let expected = count
        .checked_mul(4)
        .ok_or_else(|| invalid("shape has too many elements"))?;
    if bytes.len() != expected {
        return Err(invalid(format!(
            "FP32 binary data of {count} values must be {expected} bytes, got {}",
            bytes.len()
        )));
    }
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!("FP32 value {i} is not finite")));
    }
    Ok(values)
}

/// BYTES elements in raw form: each a little-endian u32 length, then that many bytes.
fn length_prefixed(bytes: &Bytes) -> Result<Vec<Bytes>, InferError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes.get(at..at + 4).ok_or_else(|| {
            invalid("BYTES binary data ends inside an element's 4-byte length prefix")
        })?;
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let start = at + 4;
        let end = start
            .checked_add(length)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                invalid(format!(
                    "BYTES element {} declares {length} bytes, past the end of the data",
                    out.len()
                ))
            })?;
        out.push(bytes.slice(start..end));
        at = end;
    }
    Ok(out)
}

/// The requested outputs by name, in order, each at most once; none requested means all.
pub fn output_names<'a>(
    requested: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<&'static str>, InferError> {
    let mut seen = HashSet::new();
    let mut names = Vec::new();
    for name in requested {
        let known = OUTPUTS.iter().copied().find(|&n| n == name).ok_or_else(|| {
            invalid(format!(
                "unknown output {name:?}; the model answers `{OUTPUT_LOGITS}` and `{OUTPUT_PROBABILITIES}`"
            ))
        })?;
        if !seen.insert(known) {
            return Err(invalid(format!("output `{known}` is requested twice")));
        }
        names.push(known);
    }
    if names.is_empty() {
        names.extend(OUTPUTS);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor<'a>(
        name: &'a str,
        datatype: &'a str,
        shape: &'a [i64],
        contents: Contents,
    ) -> Vec<InputTensor<'a>> {
        vec![InputTensor {
            name,
            datatype,
            shape,
            contents,
        }]
    }

    fn message(result: Result<ModelInput, InferError>) -> String {
        match result {
            Err(InferError::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn pixels_and_images_in_every_encoding() {
        let values = vec![0.5f32; 2 * 3 * 32 * 32];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for contents in [Contents::Fp32(values.clone()), Contents::Raw(raw.into())] {
            let input = model_input(tensor("input", "FP32", &[2, 3, 32, 32], contents), 4).unwrap();
            assert_eq!(
                input,
                ModelInput::Pixels {
                    pixels: values.clone(),
                    n: 2
                }
            );
        }
        let mut raw = Vec::new();
        for element in [&b"ab"[..], b"xyz"] {
            raw.extend((element.len() as u32).to_le_bytes());
            raw.extend(element);
        }
        let expected =
            ModelInput::Images(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"xyz")]);
        for contents in [
            Contents::Raw(raw.into()),
            Contents::Bytes(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"xyz")]),
        ] {
            let input = model_input(tensor("image_bytes", "BYTES", &[2], contents), 4).unwrap();
            assert_eq!(input, expected);
        }
    }

    #[test]
    fn wrong_tensors_are_refused_with_the_cause() {
        let m = message(model_input(
            tensor("input", "FP32", &[1, 3, 32], Contents::Fp32(vec![])),
            4,
        ));
        assert!(m.contains("must have shape [N, 3, 32, 32]"), "{m}");
        let m = message(model_input(
            tensor("input", "FP16", &[1, 3, 32, 32], Contents::Fp32(vec![])),
            4,
        ));
        assert!(m.contains("datatype FP32"), "{m}");
        let m = message(model_input(
            tensor("input", "FP32", &[5, 3, 32, 32], Contents::Fp32(vec![])),
            4,
        ));
        assert!(m.contains("from 1 to 4"), "{m}");
        let m = message(model_input(
            tensor("input", "FP32", &[-1, 3, 32, 32], Contents::Fp32(vec![])),
            4,
        ));
        assert!(m.contains("batch size -1"), "{m}");
        let m = message(model_input(
            tensor(
                "input",
                "FP32",
                &[1, 3, 32, 32],
                Contents::Fp32(vec![0.0; 7]),
            ),
            4,
        ));
        assert!(m.contains("but 7 values"), "{m}");
        let m = message(model_input(
            tensor(
                "input",
                "FP32",
                &[1, 3, 32, 32],
                Contents::Fp32(vec![f32::NAN; 3072]),
            ),
            4,
        ));
        assert!(m.contains("not finite"), "{m}");
        let m = message(model_input(
            tensor(
                "image_bytes",
                "BYTES",
                &[1],
                Contents::Raw(Bytes::from_static(&[9, 0, 0, 0, 1])),
            ),
            4,
        ));
        assert!(m.contains("past the end"), "{m}");
        let m = message(model_input(
            tensor("pixels", "FP32", &[1], Contents::Fp32(vec![])),
            4,
        ));
        assert!(m.contains("unknown input"), "{m}");
        let m = message(model_input(Vec::new(), 4));
        assert!(m.contains("exactly one input"), "{m}");
    }

    #[test]
    fn outputs_default_to_all_and_are_checked() {
        assert_eq!(output_names([]).unwrap(), OUTPUTS);
        assert_eq!(output_names(["probabilities"]).unwrap(), ["probabilities"]);
        assert!(output_names(["logits", "logits"]).is_err());
        assert!(output_names(["features"]).is_err());
    }
}
