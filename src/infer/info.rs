//! [`ModelInfo`]: what the served model is, as every front-end describes it (`/v1/model`, the v2
//! metadata routes, gRPC `ModelMetadata`) and as the `resnet_model_info` metric labels it.

use serde::{Deserialize, Serialize};

use crate::model::{Model, INPUT_CHANNELS, INPUT_SIZE};

/// What the served model is: shown by `/v1/model` and the `resnet_model_info` labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub depth: usize,
    /// `projection` or `zero_pad`.
    pub shortcut: String,
    pub conv_bias: bool,
    /// Learned parameters (batch-norm running statistics excluded).
    pub parameter_count: usize,
    pub num_classes: usize,
    pub labels: Vec<String>,
    /// `[channels, height, width]` of the network input.
    pub input_shape: [usize; 3],
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub device: String,
    pub engine: String,
    /// Provenance from the weights file, if any.
    pub source: Option<String>,
    /// Which weights are served: `embedded` or a file (with its path), and their sha256.
    pub weights: crate::model::WeightsOrigin,
}

impl ModelInfo {
    pub fn from_model(model: &Model) -> Self {
        let spec = &model.spec;
        let meta = &model.metadata;
        Self {
            name: meta.name.clone(),
            depth: spec.depth(),
            shortcut: spec.shortcut.as_str().into(),
            conv_bias: spec.conv_bias,
            parameter_count: spec.parameter_count(),
            num_classes: spec.num_classes,
            labels: meta.labels.clone(),
            input_shape: [INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE],
            mean: meta.mean,
            std: meta.std,
            device: crate::model::device_name(model.device()),
            engine: model.engine_name().to_string(),
            source: meta.source.clone(),
            weights: model.weights.clone(),
        }
    }

    /// The label of every class, `class_<i>` where the weights name none.
    pub fn class_labels(&self) -> Vec<String> {
        (0..self.num_classes)
            .map(|i| {
                self.labels
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("class_{i}"))
            })
            .collect()
    }

    /// The platform the Open Inference Protocol's model metadata names.
    pub fn platform(&self) -> String {
        format!("resnet-serve_{}", self.engine)
    }

    /// The labels of the `resnet_model_info` gauge.
    pub fn metric_labels(&self) -> Vec<(&'static str, String)> {
        vec![
            ("name", self.name.clone()),
            ("device", self.device.clone()),
            ("engine", self.engine.clone()),
            ("depth", self.depth.to_string()),
            ("shortcut", self.shortcut.clone()),
            ("classes", self.num_classes.to_string()),
        ]
    }
}
