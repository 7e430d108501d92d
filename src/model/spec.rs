//! The architecture of a CIFAR ResNet (depth, shortcut kind, conv bias, classes) and the exact
//! list of tensors, with shapes, that a weights file for it must hold.

use serde::Serialize;

/// Channels of the three stages.
pub const STAGE_CHANNELS: [usize; 3] = [16, 32, 64];
/// Input images are `[3, INPUT_SIZE, INPUT_SIZE]`.
pub const INPUT_SIZE: usize = 32;
/// Input channels (RGB).
pub const INPUT_CHANNELS: usize = 3;
/// Floats in one normalised input image, `[3, 32, 32]` channel-major: the unit in which every
/// engine, the batcher and the protocols count pixels.
pub const IMAGE_FLOATS: usize = INPUT_CHANNELS * INPUT_SIZE * INPUT_SIZE;

/// How the first block of stages 2 and 3 matches the shortcut to the new shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shortcut {
    /// conv1x1 (stride 2) + batch norm: the seed notebook's `residual.{0,1}`.
    Projection,
    /// Parameter-free "option A" of the paper: subsample by 2, pad channels with zeros.
    ZeroPad,
}

impl Shortcut {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Projection => "projection",
            Self::ZeroPad => "zero_pad",
        }
    }
}

/// Everything about the network's shape that a weights file determines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelSpec {
    /// Basic blocks per stage (`n` in depth = 6n + 2).
    pub blocks_per_stage: usize,
    pub shortcut: Shortcut,
    /// Whether every convolution carries a bias.
    pub conv_bias: bool,
    pub num_classes: usize,
}

/// One tensor a weights file must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ModelSpec {
    /// Network depth: 6n + 2 (ResNet56 has n = 9).
    pub fn depth(&self) -> usize {
        6 * self.blocks_per_stage + 2
    }

    /// Stride and channels of block `index` of stage `stage` (0-based): `(stride, in, out)`.
    pub fn block_geometry(&self, stage: usize, index: usize) -> (usize, usize, usize) {
        let out = STAGE_CHANNELS[stage];
        if index > 0 {
            (1, out, out)
        } else if stage == 0 {
            (1, STAGE_CHANNELS[0], out)
        } else {
            (2, STAGE_CHANNELS[stage - 1], out)
        }
    }

    /// Whether block `index` of `stage` changes shape (and so needs a non-identity shortcut).
    pub fn is_downsampling(&self, stage: usize, index: usize) -> bool {
        let (stride, cin, cout) = self.block_geometry(stage, index);
        stride != 1 || cin != cout
    }

    /// Every tensor the model reads, in load order, with its shape.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        let mut out = Vec::new();
        let mut conv = |prefix: &str, cout: usize, cin: usize, k: usize| {
            out.push(ExpectedTensor {
                name: format!("{prefix}.weight"),
                shape: vec![cout, cin, k, k],
            });
            if self.conv_bias {
                out.push(ExpectedTensor {
                    name: format!("{prefix}.bias"),
                    shape: vec![cout],
                });
            }
        };
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        conv("conv1", STAGE_CHANNELS[0], INPUT_CHANNELS, 3);
        bns.push(("bn1".to_string(), STAGE_CHANNELS[0]));
        for stage in 0..3 {
            for index in 0..self.blocks_per_stage {
                let (_, cin, cout) = self.block_geometry(stage, index);
                let p = format!("block{}.{index}", stage + 1);
                convs.push((format!("{p}.conv1"), cout, cin, 3));
                bns.push((format!("{p}.bn1"), cout));
                convs.push((format!("{p}.conv2"), cout, cout, 3));
                bns.push((format!("{p}.bn2"), cout));
                if self.shortcut == Shortcut::Projection && self.is_downsampling(stage, index) {
                    convs.push((format!("{p}.residual.0"), cout, cin, 1));
                    bns.push((format!("{p}.residual.1"), cout));
                }
            }
        }
        for (prefix, cout, cin, k) in convs {
            conv(&prefix, cout, cin, k);
        }
        for (prefix, c) in bns {
            for field in ["weight", "bias", "running_mean", "running_var"] {
                out.push(ExpectedTensor {
                    name: format!("{prefix}.{field}"),
                    shape: vec![c],
                });
            }
        }
        let last = STAGE_CHANNELS[2];
        out.push(ExpectedTensor {
            name: "fc.weight".into(),
            shape: vec![self.num_classes, last],
        });
        out.push(ExpectedTensor {
            name: "fc.bias".into(),
            shape: vec![self.num_classes],
        });
        out
    }

    /// Number of learned parameters (batch-norm running statistics excluded).
    pub fn parameter_count(&self) -> usize {
        self.expected_tensors()
            .iter()
            .filter(|t| !t.name.ends_with("running_mean") && !t.name.ends_with("running_var"))
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet56_projection_with_bias_has_the_notebook_parameter_count() {
        // sum(p.numel() for p in ResNet56().parameters()) for the notebook model in PyTorch
        let spec = ModelSpec {
            blocks_per_stage: 9,
            shortcut: Shortcut::Projection,
            conv_bias: true,
            num_classes: 10,
        };
        assert_eq!(spec.depth(), 56);
        assert_eq!(spec.parameter_count(), 857_898);
    }

    #[test]
    fn resnet56_zero_pad_without_bias_has_the_paper_parameter_count() {
        // The 2018 checkpoints' README: ResNet56 has 0.85M parameters (853,018 exactly).
        let spec = ModelSpec {
            blocks_per_stage: 9,
            shortcut: Shortcut::ZeroPad,
            conv_bias: false,
            num_classes: 10,
        };
        assert_eq!(spec.parameter_count(), 853_018);
    }
}
