//! The CUDA forward pass replayed as a captured CUDA graph, one per batch size, so that a pass is
//! one launch instead of some 200 kernel launches and cuDNN calls made one by one from the host.
//!
//! The first pass at a batch size runs kernel by kernel, then the same pass is captured into a
//! graph over an input and an output buffer of its own; later passes at that size copy their
//! images into that input, launch the graph and read that output. A capture that fails turns
//! graphs off for the engine (with a warning) and every pass runs kernel by kernel, as it would
//! with `--cuda-graphs false`.

use std::collections::HashMap;

use candle_core::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda::cudarc::driver::CudaGraph;
use candle_core::cuda::CudaDevice;
use candle_core::{DType, Device, Module, Result, Shape, Tensor};

use super::candle::CandleResNet;

/// Batch sizes with a graph at most: the server's batches are bounded by `--max-batch-size`,
/// but `bench` and library callers can ask for any size, and each graph holds device memory for
/// its pass's activations. Sizes past this run kernel by kernel.
const MAX_GRAPHS: usize = 256;

/// The graphs of one engine, by batch size.
#[derive(Default)]
pub struct GraphedForward {
    graphs: HashMap<usize, Captured>,
    /// Set when a capture failed: from then on every pass runs kernel by kernel.
    disabled: bool,
}

impl std::fmt::Debug for GraphedForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sizes: Vec<_> = self.graphs.keys().collect();
        sizes.sort_unstable();
        f.debug_struct("GraphedForward")
            .field("batch_sizes", &sizes)
            .field("disabled", &self.disabled)
            .finish()
    }
}

impl GraphedForward {
    /// The logits of `input` (`[n, 3, 32, 32]` on a CUDA device), as `net` computes them.
    pub fn logits(&mut self, net: &CandleResNet, input: &Tensor) -> Result<Vec<f32>> {
        let n = input.dim(0)?;
        if let Some(captured) = self.graphs.get(&n) {
            return captured.replay(input);
        }
        let Device::Cuda(cuda) = input.device() else {
            candle_core::bail!("CUDA graphs need a CUDA device");
        };
        if self.disabled || self.graphs.len() >= MAX_GRAPHS {
            return net.forward(input)?.flatten_all()?.to_vec1();
        }
        // The uncaptured pass answers this call and prepares the capture: it loads the kernels,
        // makes cuDNN's and cuBLAS's handles and workspaces, and uploads the layouts the kernels
        // read, none of which may happen while the stream is captured. candle keeps those
        // uploads, for the capture to find, while this guard lives.
        let _kept_uploads = cuda.enable_cuda_graph_htod_cache();
        let logits = net.forward(input)?;
        let answer = logits.flatten_all()?.to_vec1()?;
        match Captured::capture(cuda, net, input, logits.shape()) {
            Ok(captured) => {
                tracing::debug!(batch_size = n, "captured the forward pass as a CUDA graph");
                self.graphs.insert(n, captured);
            }
            Err(error) => {
                tracing::warn!(
                    batch_size = n,
                    %error,
                    "CUDA graph capture failed; the forward pass runs kernel by kernel"
                );
                self.disabled = true;
            }
        }
        Ok(answer)
    }
}

/// One batch size's graph with the buffers it reads and writes.
struct Captured {
    graph: CudaGraph,
    /// Where the graph reads its images: each replay copies the call's images here first.
    input: Tensor,
    /// Where the graph writes its logits. Allocated before the capture, so the graph frees
    /// everything it allocates itself and owns no memory between replays.
    output: Tensor,
}

// SAFETY: a CUDA graph is not thread-affine; the driver only asks that calls on one graph are
// not made from several threads at once. `Captured` is reached only through `&mut` of the
// engine that owns it (the `Engine` trait's `logits(&mut self)`), so calls on its graph are
// serialised, whichever thread the engine has moved to. Its tensors are `Send` already.
unsafe impl Send for Captured {}

impl Captured {
    /// Captures `net`'s pass over a batch shaped like `example` (on `cuda`), whose logits are
    /// shaped `logits`. Call it right after an uncaptured pass at that shape, under candle's
    /// cache of uploads for captures (see [`GraphedForward::logits`]).
    fn capture(
        cuda: &CudaDevice,
        net: &CandleResNet,
        example: &Tensor,
        logits: &Shape,
    ) -> Result<Self> {
        let input = example.copy()?;
        let output = Tensor::zeros(logits, DType::F32, example.device())?;
        example.device().synchronize()?;

        let stream = cuda.cuda_stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(candle_core::Error::wrap)?;
        // Every tensor the pass allocates is dropped inside the capture, so the graph frees all
        // it allocates; only the copy into `output` outlives it.
        let recorded = net
            .forward(&input)
            .and_then(|logits| output.slice_set(&logits, 0, 0));
        // The capture must end whatever happened, or the stream stays in capture mode.
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        let graph = graph
            .map_err(candle_core::Error::wrap)?
            .ok_or_else(|| candle_core::Error::Msg("the capture recorded no work".into()))?;
        graph.upload().map_err(candle_core::Error::wrap)?;
        Ok(Self {
            graph,
            input,
            output,
        })
    }

    /// Runs the graph on `images` (shaped as the captured batch) and returns its logits.
    fn replay(&self, images: &Tensor) -> Result<Vec<f32>> {
        self.input.slice_set(images, 0, 0)?;
        self.graph.launch().map_err(candle_core::Error::wrap)?;
        // Reading the logits waits for the stream, so for the graph.
        self.output.flatten_all()?.to_vec1()
    }
}
