//! Protocol buffers to and from the inference layer: a `ModelInferRequest`'s tensors (typed
//! contents or `raw_input_contents`) to [`ModelInput`], and [`Logits`] to a `ModelInferResponse`
//! with its outputs in `raw_output_contents`, as Triton answers and its clients read.

use bytes::Bytes;

use super::proto::model_infer_request::InferInputTensor;
use super::proto::model_infer_response::InferOutputTensor;
use super::proto::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use crate::infer::tensor::{
    model_input as checked_input, output_names, Contents, InputTensor, MODEL_VERSION,
    OUTPUT_PROBABILITIES,
};
use crate::infer::{InferError, Logits, ModelInput};

fn invalid(message: impl Into<String>) -> InferError {
    InferError::InvalidInput(message.into())
}

/// The request's one input as [`ModelInput`] of at most `max_batch` images. Its contents are
/// moved out of `request`.
pub fn model_input(
    request: &mut ModelInferRequest,
    max_batch: usize,
) -> Result<ModelInput, InferError> {
    let raw = std::mem::take(&mut request.raw_input_contents);
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for {} inputs; it needs one per input",
            raw.len(),
            request.inputs.len()
        )));
    }
    let contents = if raw.is_empty() {
        request
            .inputs
            .iter_mut()
            .map(typed_contents)
            .collect::<Result<Vec<_>, _>>()?
    } else {
        if let Some(input) = request.inputs.iter().find(|i| i.contents.is_some()) {
            return Err(invalid(format!(
                "input `{}` has typed contents although the request uses raw_input_contents",
                input.name
            )));
        }
        raw.into_iter().map(Contents::Raw).collect()
    };
    let tensors = request
        .inputs
        .iter()
        .zip(contents)
        .map(|(input, contents)| InputTensor {
            name: &input.name,
            datatype: &input.datatype,
            shape: &input.shape,
            contents,
        })
        .collect();
    checked_input(tensors, max_batch)
}

/// An input's typed contents: `fp32_contents` or `bytes_contents`, whichever its datatype uses.
fn typed_contents(input: &mut InferInputTensor) -> Result<Contents, InferError> {
    let contents = input.contents.take().unwrap_or_default();
    let InferTensorContents {
        bool_contents,
        int_contents,
        int64_contents,
        uint_contents,
        uint64_contents,
        fp32_contents,
        fp64_contents,
        bytes_contents,
    } = contents;
    let others = [
        ("bool_contents", bool_contents.is_empty()),
        ("int_contents", int_contents.is_empty()),
        ("int64_contents", int64_contents.is_empty()),
        ("uint_contents", uint_contents.is_empty()),
        ("uint64_contents", uint64_contents.is_empty()),
        ("fp64_contents", fp64_contents.is_empty()),
    ];
    if let Some((field, _)) = others.iter().find(|(_, empty)| !empty) {
        return Err(invalid(format!(
            "input `{}` carries {field}; the model takes fp32_contents (FP32) or bytes_contents \
             (BYTES)",
            input.name
        )));
    }
    match (fp32_contents.is_empty(), bytes_contents.is_empty()) {
        (false, false) => Err(invalid(format!(
            "input `{}` carries both fp32_contents and bytes_contents",
            input.name
        ))),
        (true, false) => Ok(Contents::Bytes(bytes_contents)),
        (false, true) => Ok(Contents::Fp32(fp32_contents)),
        // No elements: the shape check says what is missing.
        (true, true) if input.datatype == "BYTES" => Ok(Contents::Bytes(Vec::new())),
        (true, true) => Ok(Contents::Fp32(Vec::new())),
    }
}

/// The names of the outputs to answer, in order (none requested: all).
pub fn requested_outputs(request: &ModelInferRequest) -> Result<Vec<&'static str>, InferError> {
    output_names(request.outputs.iter().map(|o| o.name.as_str()))
}

/// The response: each output FP32 `[n, classes]`, its values little-endian in
/// `raw_output_contents`.
pub fn response(
    model_name: &str,
    id: String,
    logits: &Logits,
    outputs: &[&'static str],
) -> ModelInferResponse {
    let shape = vec![
        i64::try_from(logits.len()).unwrap_or(i64::MAX),
        i64::try_from(logits.classes()).unwrap_or(i64::MAX),
    ];
    let mut described = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    for &name in outputs {
        let values = if name == OUTPUT_PROBABILITIES {
            logits.probabilities()
        } else {
            logits.values().to_vec()
        };
        raw.push(Bytes::from(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ));
        described.push(InferOutputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape: shape.clone(),
            ..Default::default()
        });
    }
    ModelInferResponse {
        model_name: model_name.into(),
        model_version: MODEL_VERSION.into(),
        id,
        outputs: described,
        raw_output_contents: raw,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(
        name: &str,
        datatype: &str,
        shape: &[i64],
        contents: Option<InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            contents,
            ..Default::default()
        }
    }

    #[test]
    fn typed_and_raw_contents_give_the_same_input() {
        let pixels = vec![0.25f32; 3 * 32 * 32];
        let mut typed = ModelInferRequest {
            inputs: vec![input(
                "input",
                "FP32",
                &[1, 3, 32, 32],
                Some(InferTensorContents {
                    fp32_contents: pixels.clone(),
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        let mut raw = ModelInferRequest {
            inputs: vec![input("input", "FP32", &[1, 3, 32, 32], None)],
            raw_input_contents: vec![Bytes::from(
                pixels
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )],
            ..Default::default()
        };
        let expected = ModelInput::Pixels { pixels, n: 1 };
        assert_eq!(model_input(&mut typed, 8).unwrap(), expected);
        assert_eq!(model_input(&mut raw, 8).unwrap(), expected);

        let mut images = ModelInferRequest {
            inputs: vec![input(
                "image_bytes",
                "BYTES",
                &[2],
                Some(InferTensorContents {
                    bytes_contents: vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        assert_eq!(
            model_input(&mut images, 8).unwrap(),
            ModelInput::Images(vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")])
        );
    }

    #[test]
    fn mixed_or_foreign_contents_are_refused() {
        let mut both = ModelInferRequest {
            inputs: vec![input(
                "input",
                "FP32",
                &[1, 3, 32, 32],
                Some(InferTensorContents {
                    fp32_contents: vec![0.0; 3072],
                    ..Default::default()
                }),
            )],
            raw_input_contents: vec![Bytes::from_static(b"x")],
            ..Default::default()
        };
        let error = model_input(&mut both, 8).unwrap_err().to_string();
        assert!(error.contains("typed contents"), "{error}");
        let mut ints = ModelInferRequest {
            inputs: vec![input(
                "input",
                "FP32",
                &[1, 3, 32, 32],
                Some(InferTensorContents {
                    int_contents: vec![1; 3072],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        let error = model_input(&mut ints, 8).unwrap_err().to_string();
        assert!(error.contains("int_contents"), "{error}");
        let mut counts = ModelInferRequest {
            inputs: vec![input("input", "FP32", &[1, 3, 32, 32], None)],
            raw_input_contents: vec![Bytes::new(), Bytes::new()],
            ..Default::default()
        };
        let error = model_input(&mut counts, 8).unwrap_err().to_string();
        assert!(error.contains("one per input"), "{error}");
    }

    #[test]
    fn outputs_are_raw_little_endian_rows() {
        let logits = Logits::new(vec![0.0, 0.0, 1.0, 3.0], 2);
        let response = response("m", "id-1".into(), &logits, &["logits", "probabilities"]);
        assert_eq!(response.id, "id-1");
        assert_eq!(response.outputs[0].shape, [2, 2]);
        let floats = |b: &Bytes| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        assert_eq!(
            floats(&response.raw_output_contents[0]),
            [0.0, 0.0, 1.0, 3.0]
        );
        let p = floats(&response.raw_output_contents[1]);
        assert_eq!(&p[..2], [0.5, 0.5]);
        assert!(p[3] > p[2] && (p[2] + p[3] - 1.0).abs() < 1e-6);
    }
}
