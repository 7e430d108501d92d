//! The reference forward pass: the CIFAR ResNet as plain candle-nn layers, named exactly like
//! the PyTorch `state_dict()`. It runs on any candle device, and is the CUDA path.

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::spec::{ModelSpec, Shortcut, STAGE_CHANNELS};

/// PyTorch's `nn.BatchNorm2d` default.
const BN_EPS: f64 = 1e-5;

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        ..Default::default()
    };
    if bias {
        candle_nn::conv2d(cin, cout, k, cfg, vb)
    } else {
        candle_nn::conv2d_no_bias(cin, cout, k, cfg, vb)
    }
}

fn bn(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    let cfg = BatchNormConfig {
        eps: BN_EPS,
        remove_mean: true,
        affine: true,
        momentum: 0.1,
    };
    candle_nn::batch_norm(c, cfg, vb)
}

#[derive(Debug)]
enum ShortcutLayer {
    Identity,
    Projection(Conv2d, BatchNorm),
    /// Subsample by 2 and pad `pad` zero channels on each side.
    ZeroPad {
        pad: usize,
    },
}

#[derive(Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    shortcut: ShortcutLayer,
}

impl BasicBlock {
    fn new(spec: &ModelSpec, stage: usize, index: usize, vb: VarBuilder) -> Result<Self> {
        let (stride, cin, cout) = spec.block_geometry(stage, index);
        let bias = spec.conv_bias;
        let shortcut = if !spec.is_downsampling(stage, index) {
            ShortcutLayer::Identity
        } else {
            match spec.shortcut {
                Shortcut::Projection => ShortcutLayer::Projection(
                    conv(cin, cout, 1, stride, bias, vb.pp("residual").pp("0"))?,
                    bn(cout, vb.pp("residual").pp("1"))?,
                ),
                Shortcut::ZeroPad => ShortcutLayer::ZeroPad {
                    pad: (cout - cin) / 2,
                },
            }
        };
        Ok(Self {
            conv1: conv(cin, cout, 3, stride, bias, vb.pp("conv1"))?,
            bn1: bn(cout, vb.pp("bn1"))?,
            conv2: conv(cout, cout, 3, 1, bias, vb.pp("conv2"))?,
            bn2: bn(cout, vb.pp("bn2"))?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.bn1.forward_t(&self.conv1.forward(x)?, false)?.relu()?;
        let y = self.bn2.forward_t(&self.conv2.forward(&y)?, false)?;
        let identity = match &self.shortcut {
            ShortcutLayer::Identity => x.clone(),
            ShortcutLayer::Projection(conv, bn) => bn.forward_t(&conv.forward(x)?, false)?,
            ShortcutLayer::ZeroPad { pad } => subsample2(x)?.pad_with_zeros(1, *pad, *pad)?,
        };
        (y + identity)?.relu()
    }
}

/// `x[:, :, ::2, ::2]` for an NCHW tensor.
fn subsample2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let device = x.device();
    let rows = Tensor::arange_step(0u32, h as u32, 2, device)?;
    let cols = Tensor::arange_step(0u32, w as u32, 2, device)?;
    x.index_select(&rows, 2)?.index_select(&cols, 3)
}

/// The CIFAR ResNet in candle-nn.
#[derive(Debug)]
pub struct CandleResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

impl CandleResNet {
    /// Builds the network from a [`VarBuilder`] over tensors named as in the weights file.
    pub fn new(spec: &ModelSpec, vb: VarBuilder) -> Result<Self> {
        let mut blocks = Vec::with_capacity(3 * spec.blocks_per_stage);
        for stage in 0..3 {
            let stage_vb = vb.pp(format!("block{}", stage + 1));
            for index in 0..spec.blocks_per_stage {
                blocks.push(BasicBlock::new(
                    spec,
                    stage,
                    index,
                    stage_vb.pp(index.to_string()),
                )?);
            }
        }
        Ok(Self {
            conv1: conv(3, STAGE_CHANNELS[0], 3, 1, spec.conv_bias, vb.pp("conv1"))?,
            bn1: bn(STAGE_CHANNELS[0], vb.pp("bn1"))?,
            blocks,
            fc: candle_nn::linear(STAGE_CHANNELS[2], spec.num_classes, vb.pp("fc"))?,
        })
    }

    /// Builds the network on `device` from f32 tensors named as in the weights file.
    pub fn from_tensors(
        spec: &ModelSpec,
        tensors: &std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, device);
        Self::new(spec, vb)
    }
}

impl Module for CandleResNet {
    /// `[N, 3, 32, 32]` normalised images to `[N, classes]` logits.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.bn1.forward_t(&self.conv1.forward(x)?, false)?.relu()?;
        for block in &self.blocks {
            y = block.forward(&y)?;
        }
        let pooled = y.mean((2, 3))?;
        self.fc.forward(&pooled)
    }
}
