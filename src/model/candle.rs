//! The reference forward pass: the CIFAR ResNet as plain candle-nn layers, named exactly like
//! the PyTorch `state_dict()`. It runs on any candle device, and is the CUDA path. On the CPU it
//! keeps each batch norm as its own layer (the reference the other engines are checked against);
//! on CUDA each batch norm is folded into its convolution by [`super::fold`], as the fast CPU
//! engine does, so a layer is one convolution plus a bias add instead of a convolution and six
//! element-wise kernels. [`CandleEngine`] puts it behind the slice-based [`Engine`] trait.

use candle_core::conv::CudnnFwdAlgo;
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::engine::{check_input, Engine, EngineError};
use super::fold::{self, fold_batch_norm, BN_EPS};
use super::spec::{ModelSpec, Shortcut, INPUT_CHANNELS, INPUT_SIZE, STAGE_CHANNELS};

/// How the batch norms of the network are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchNormMode {
    /// Convolution, then batch norm, as in the weights file (the reference).
    Separate,
    /// Batch norm folded into the convolution before it: one convolution with a bias.
    Folded,
}

impl BatchNormMode {
    /// What runs on `device`: folded on CUDA, where every layer is a kernel launch; separate on
    /// the CPU, where the candle engine serves as the reference.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::Separate
        } else {
            Self::Folded
        }
    }
}

/// A convolution's shape: input and output channels, kernel size, stride.
#[derive(Debug, Clone, Copy)]
struct ConvShape {
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
}

/// The cuDNN algorithm for every convolution (ignored without cuDNN).
///
/// candle makes cuDNN's descriptors anew on every call. With no algorithm named it also asks
/// cuDNN's heuristics for one every time, and what they pick may need a workspace, allocated and
/// zeroed per call: on an H200 a batch-1 pass of ResNet56 took 25 ms, about 0.36 ms for each of
/// its 57 convolutions. Naming implicit GEMM skips the query, and it needs no workspace.
/// `resnet-serve bench` there, FP32, images/s at batch 1 / 64 / 256 / 1024: heuristics 39 /
/// 2,170 / 9,090 / 31,683; implicit GEMM 210 / 10,116 / 29,187 / 30,852; precomputed implicit
/// GEMM (with a workspace) 97 / 5,502 / 19,683 / 35,135; GEMM and non-fused Winograd slower at
/// all but batch 1024; fused Winograd and FFT tiling unsupported for some of the layers.
const CUDNN_ALGORITHM: CudnnFwdAlgo = CudnnFwdAlgo::ImplicitGemm;

impl ConvShape {
    fn config(&self) -> Conv2dConfig {
        Conv2dConfig {
            padding: self.k / 2,
            stride: self.stride,
            cudnn_fwd_algo: Some(CUDNN_ALGORITHM),
            ..Default::default()
        }
    }
}

/// PyTorch's `nn.BatchNorm2d` in inference mode.
fn bn(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    let cfg = BatchNormConfig {
        eps: BN_EPS,
        remove_mean: true,
        affine: true,
        momentum: 0.1,
    };
    candle_nn::batch_norm(c, cfg, vb)
}

/// A `[c]` tensor as floats (from any device: this runs once, at load).
fn floats(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// A convolution (with a bias when `bias`) followed by a batch norm, computed as `mode` says.
#[derive(Debug)]
enum ConvBn {
    Separate(Conv2d, BatchNorm),
    Folded(Conv2d),
}

impl ConvBn {
    /// The convolution's tensors under `conv`, the batch norm's under `norm`.
    fn new(
        shape: ConvShape,
        bias: bool,
        conv: VarBuilder,
        norm: VarBuilder,
        mode: BatchNormMode,
    ) -> Result<Self> {
        let ConvShape { cin, cout, k, .. } = shape;
        let weight = conv.get((cout, cin, k, k), "weight")?;
        let conv_bias = if bias {
            Some(conv.get(cout, "bias")?)
        } else {
            None
        };
        match mode {
            BatchNormMode::Separate => Ok(Self::Separate(
                Conv2d::new(weight, conv_bias, shape.config()),
                bn(cout, norm)?,
            )),
            BatchNormMode::Folded => {
                let stats = fold::BatchNorm {
                    weight: floats(&norm.get(cout, "weight")?)?,
                    bias: floats(&norm.get(cout, "bias")?)?,
                    running_mean: floats(&norm.get(cout, "running_mean")?)?,
                    running_var: floats(&norm.get(cout, "running_var")?)?,
                };
                let conv_bias = conv_bias.as_ref().map(floats).transpose()?;
                let folded =
                    fold_batch_norm(&floats(&weight)?, conv_bias.as_deref(), &stats, cin, k);
                let device = weight.device();
                Ok(Self::Folded(Conv2d::new(
                    Tensor::from_vec(folded.weight, (cout, cin, k, k), device)?,
                    Some(Tensor::from_vec(folded.bias, cout, device)?),
                    shape.config(),
                )))
            }
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Separate(conv, bn) => bn.forward_t(&conv.forward(x)?, false),
            Self::Folded(conv) => conv.forward(x),
        }
    }
}

#[derive(Debug)]
enum ShortcutLayer {
    Identity,
    Projection(ConvBn),
    /// Subsample by 2 and pad `pad` zero channels on each side.
    ZeroPad {
        pad: usize,
    },
}

#[derive(Debug)]
struct BasicBlock {
    conv1: ConvBn,
    conv2: ConvBn,
    shortcut: ShortcutLayer,
}

impl BasicBlock {
    fn new(
        spec: &ModelSpec,
        stage: usize,
        index: usize,
        vb: VarBuilder,
        mode: BatchNormMode,
    ) -> Result<Self> {
        let (stride, cin, cout) = spec.block_geometry(stage, index);
        let bias = spec.conv_bias;
        let conv3x3 = |cin, stride| ConvShape {
            cin,
            cout,
            k: 3,
            stride,
        };
        let shortcut = if !spec.is_downsampling(stage, index) {
            ShortcutLayer::Identity
        } else {
            match spec.shortcut {
                Shortcut::Projection => ShortcutLayer::Projection(ConvBn::new(
                    ConvShape {
                        cin,
                        cout,
                        k: 1,
                        stride,
                    },
                    bias,
                    vb.pp("residual").pp("0"),
                    vb.pp("residual").pp("1"),
                    mode,
                )?),
                Shortcut::ZeroPad => ShortcutLayer::ZeroPad {
                    pad: (cout - cin) / 2,
                },
            }
        };
        Ok(Self {
            conv1: ConvBn::new(
                conv3x3(cin, stride),
                bias,
                vb.pp("conv1"),
                vb.pp("bn1"),
                mode,
            )?,
            conv2: ConvBn::new(conv3x3(cout, 1), bias, vb.pp("conv2"), vb.pp("bn2"), mode)?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(x)?.relu()?;
        let y = self.conv2.forward(&y)?;
        let identity = match &self.shortcut {
            ShortcutLayer::Identity => x.clone(),
            ShortcutLayer::Projection(conv) => conv.forward(x)?,
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
    stem: ConvBn,
    blocks: Vec<BasicBlock>,
    fc: Linear,
    mode: BatchNormMode,
}

impl CandleResNet {
    /// Builds the network from a [`VarBuilder`] over tensors named as in the weights file, on
    /// the builder's device.
    pub fn new(spec: &ModelSpec, vb: VarBuilder, mode: BatchNormMode) -> Result<Self> {
        let mut blocks = Vec::with_capacity(3 * spec.blocks_per_stage);
        for stage in 0..3 {
            let stage_vb = vb.pp(format!("block{}", stage + 1));
            for index in 0..spec.blocks_per_stage {
                blocks.push(BasicBlock::new(
                    spec,
                    stage,
                    index,
                    stage_vb.pp(index.to_string()),
                    mode,
                )?);
            }
        }
        let stem = ConvShape {
            cin: INPUT_CHANNELS,
            cout: STAGE_CHANNELS[0],
            k: 3,
            stride: 1,
        };
        Ok(Self {
            stem: ConvBn::new(stem, spec.conv_bias, vb.pp("conv1"), vb.pp("bn1"), mode)?,
            blocks,
            fc: candle_nn::linear(STAGE_CHANNELS[2], spec.num_classes, vb.pp("fc"))?,
            mode,
        })
    }

    /// Builds the network on `device` from f32 tensors named as in the weights file.
    pub fn from_tensors(
        spec: &ModelSpec,
        tensors: &std::collections::HashMap<String, Tensor>,
        device: &Device,
        mode: BatchNormMode,
    ) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, device);
        Self::new(spec, vb, mode)
    }

    /// How the batch norms are computed.
    pub fn batch_norm_mode(&self) -> BatchNormMode {
        self.mode
    }
}

impl Module for CandleResNet {
    /// `[N, 3, 32, 32]` normalised images to `[N, classes]` logits.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.stem.forward(x)?.relu()?;
        for block in &self.blocks {
            y = block.forward(&y)?;
        }
        let pooled = y.mean((2, 3))?;
        self.fc.forward(&pooled)
    }
}

/// The candle network behind the slice-based [`Engine`] interface: slices become an NCHW tensor
/// on the network's device and the logits come back to the host.
#[derive(Debug)]
pub struct CandleEngine {
    net: CandleResNet,
    device: Device,
    /// On CUDA with graphs on: each batch size's pass, captured once and replayed.
    #[cfg(feature = "cuda")]
    graphs: Option<super::cuda_graphs::GraphedForward>,
}

impl CandleEngine {
    /// `net` must have been built on `device`. `cuda_graphs`: on a CUDA device, replay each
    /// batch size's pass as a captured CUDA graph (ignored elsewhere).
    pub fn new(net: CandleResNet, device: Device, cuda_graphs: bool) -> Self {
        #[cfg(feature = "cuda")]
        let graphs = (cuda_graphs && device.is_cuda()).then(Default::default);
        #[cfg(not(feature = "cuda"))]
        let _ = cuda_graphs;
        Self {
            net,
            device,
            #[cfg(feature = "cuda")]
            graphs,
        }
    }
}

impl Engine for CandleEngine {
    fn logits(&mut self, images: &[f32], n: usize) -> std::result::Result<Vec<f32>, EngineError> {
        check_input(images, n)?;
        let input = Tensor::from_slice(
            images,
            (n, INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE),
            &self.device,
        )?;
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &mut self.graphs {
            return Ok(graphs.logits(&self.net, &input)?);
        }
        Ok(self.net.forward(&input)?.flatten_all()?.to_vec1()?)
    }
}
