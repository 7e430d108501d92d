//! The fast CPU engine: batch norm folded into the convolutions at load, channels-last
//! activations with zero borders, fused conv + bias (+ residual) + ReLU kernels for AVX-512,
//! AVX2 and portable code, and the batch or each layer shared between threads.
//!
//! - [`simd`]: detecting and forcing the instruction set.
//! - [`fold`]: batch-norm folding.
//! - [`conv`], [`kernels`]: one convolution and its microkernels.
//! - [`network`]: the layer plan and one image's walk through it.
//! - [`parallel`], [`workspace`], [`buffers`]: threads and the memory they work in.

pub mod buffers;
pub mod conv;
pub mod fold;
pub mod kernels;
pub mod network;
pub mod parallel;
pub mod simd;
pub mod winograd;
pub mod workspace;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Storage, Tensor};

use self::network::Network;
use self::parallel::{Alone, SpinBarrier, Team};
pub use self::simd::{SimdLevel, UnsupportedSimd};
use self::winograd::Scratch;
use self::workspace::Buffers;
use super::spec::{ModelSpec, INPUT_CHANNELS, INPUT_SIZE};
use crate::config::SimdChoice;

/// Why the fast engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FastError {
    #[error(transparent)]
    Simd(#[from] UnsupportedSimd),
    #[error("tensor {name} is missing (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    WrongShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("reading tensor {name}: {source}")]
    Tensor {
        name: String,
        #[source]
        source: candle_core::Error,
    },
}

/// How a batch is shared between threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threading {
    /// Whole images per thread while every thread has one; the rest split layer by layer.
    Auto,
    /// Whole images per thread only (a batch smaller than the thread count leaves threads idle).
    Images,
    /// Every image split layer by layer between all threads.
    Layers,
}

/// Each thread's buffers for whole images and its Winograd scratch, and the buffers a team
/// shares for one image.
#[derive(Debug)]
struct Workspace {
    own: Vec<(Buffers, Scratch)>,
    team: Buffers,
}

/// How to build a [`FastResNet`]; [`FastResNet::new`] uses the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastOptions {
    pub simd: SimdChoice,
    /// 0 = one per available core.
    pub threads: usize,
    pub threading: Threading,
    /// Stride-1 3x3 convolutions with Winograd F(4x4, 3x3) (else direct).
    pub winograd: bool,
}

impl Default for FastOptions {
    fn default() -> Self {
        Self {
            simd: SimdChoice::Auto,
            threads: 0,
            threading: Threading::Auto,
            winograd: true,
        }
    }
}

/// The fast CPU forward pass of a CIFAR ResNet.
#[derive(Debug)]
pub struct FastResNet {
    net: Network,
    simd: SimdLevel,
    threads: usize,
    threading: Threading,
    workspace: Mutex<Workspace>,
}

impl FastResNet {
    /// Folds and packs the weights for `simd` (an explicit level the CPU lacks is an error) and
    /// allocates every buffer a forward pass needs for `threads` threads (0 = one per core).
    pub fn new(
        spec: &ModelSpec,
        tensors: &HashMap<String, Tensor>,
        simd: SimdChoice,
        threads: usize,
    ) -> Result<Self, FastError> {
        let options = FastOptions {
            simd,
            threads,
            ..FastOptions::default()
        };
        Self::with_options(spec, tensors, &options)
    }

    /// [`Self::new`] with every choice explicit (to compare strategies and algorithms).
    pub fn with_options(
        spec: &ModelSpec,
        tensors: &HashMap<String, Tensor>,
        options: &FastOptions,
    ) -> Result<Self, FastError> {
        let simd = SimdLevel::resolve(options.simd)?;
        let threads = match options.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let net = Network::load(spec, tensors, simd, options.winograd)?;
        let workspace = Workspace {
            own: (0..threads)
                .map(|_| (Buffers::new(net.planes()), Scratch::default()))
                .collect(),
            team: Buffers::new(net.planes()),
        };
        tracing::debug!(%simd, threads, winograd = options.winograd, "fast engine ready");
        Ok(Self {
            net,
            simd,
            threads,
            threading: options.threading,
            workspace: Mutex::new(workspace),
        })
    }

    /// The SIMD level the kernels run.
    pub fn simd(&self) -> SimdLevel {
        self.simd
    }

    /// Threads a forward pass uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// `fast-avx512`, `fast-avx2` or `fast-scalar`.
    pub fn name(&self) -> String {
        format!("fast-{}", self.simd)
    }

    /// `[N, 3, 32, 32]` normalised NCHW f32 CPU images to `[N, classes]` logits.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if (c, h, w) != (INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE) {
            candle_core::bail!(
                "fast engine: expected [N, {INPUT_CHANNELS}, {INPUT_SIZE}, {INPUT_SIZE}] images, got {:?}",
                x.dims()
            );
        }
        if !x.device().is_cpu() {
            candle_core::bail!("fast engine: images must be on the CPU");
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("fast engine: images must be on the CPU");
        };
        let start = layout.start_offset();
        let images = &cpu.as_slice::<f32>()?[start..start + n * c * h * w];
        let mut logits = vec![0.0f32; n * self.net.classes()];
        self.run(images, n, &mut logits);
        Tensor::from_vec(logits, (n, self.net.classes()), &Device::Cpu)
    }

    /// Fills `logits` (`n * classes`) for `n` images laid out `n * [3, 32, 32]`.
    fn run(&self, images: &[f32], n: usize, logits: &mut [f32]) {
        let image_len = INPUT_CHANNELS * INPUT_SIZE * INPUT_SIZE;
        let classes = self.net.classes();
        // A poisoned lock means a forward pass panicked; the buffers hold no state between
        // passes (borders are never written), so they are still good to use.
        let mut guard = self
            .workspace
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Workspace { own, team } = &mut *guard;
        let threads = self.threads.min(own.len()).max(1);
        // Images [0, whole) go one per thread; the rest are split layer by layer.
        let whole = match self.threading {
            _ if threads == 1 => n,
            Threading::Auto => n - n % threads,
            Threading::Images => n,
            Threading::Layers => 0,
        };
        let next = AtomicUsize::new(0);
        let results = Mutex::new(&mut *logits);
        let team = team.share();
        let barrier = SpinBarrier::new(threads);
        let work = |index: usize, (own, scratch): &mut (Buffers, Scratch)| {
            let own = own.share();
            let mut out = vec![0.0f32; classes];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= whole {
                    break;
                }
                self.net.run_image(
                    &images[i * image_len..(i + 1) * image_len],
                    &own,
                    &Alone,
                    scratch,
                    Some(&mut out),
                );
                let mut results = results.lock().unwrap_or_else(|p| p.into_inner());
                results[i * classes..(i + 1) * classes].copy_from_slice(&out);
            }
            let part = Team {
                index,
                barrier: &barrier,
            };
            for i in whole..n {
                self.net.run_image(
                    &images[i * image_len..(i + 1) * image_len],
                    &team,
                    &part,
                    scratch,
                    Some(&mut out),
                );
                if index == 0 {
                    let mut results = results.lock().unwrap_or_else(|p| p.into_inner());
                    results[i * classes..(i + 1) * classes].copy_from_slice(&out);
                }
            }
        };
        let mut own = own.iter_mut().take(threads);
        std::thread::scope(|s| {
            let first = own.next();
            for (index, buffers) in own.enumerate() {
                let work = &work;
                s.spawn(move || work(index + 1, buffers));
            }
            if let Some(buffers) = first {
                work(0, buffers);
            }
        });
    }
}
