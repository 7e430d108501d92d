//! The fast CPU engine: batch norm folded into the convolutions at load, channels-last
//! activations with zero borders, fused conv + bias (+ residual) + ReLU kernels for AVX-512,
//! AVX2 and portable code, Winograd F(4x4, 3x3) (and F(2x2, 3x3) for the widest layers at small
//! batches) for the stride-1 3x3 convolutions, and the batch (or, for a batch smaller than the
//! thread count, each layer) shared between threads that are started once, with the engine.
//! Serving a queue ([`Engine::serve`]), a thread done with its share of a batch starts the next.
//!
//! - [`simd`]: detecting and forcing the instruction set.
//! - [`crate::model::fold`]: batch-norm folding (shared with the candle engine on CUDA).
//! - [`conv`], [`kernels`]: one direct convolution and its microkernels.
//! - [`winograd`]: the Winograd convolutions (their products reuse the microkernels).
//! - [`network`]: the layer plan and a micro-batch's walk through it.
//! - [`crew`], [`parallel`], [`signal`], [`workspace`], [`buffers`]: threads, how they share a
//!   pass and wait for each other, and the memory they work in.

//!
//! Only [`FastResNet`] and its options are public: the layers, kernels and buffers below it
//! trust their callers (pointer kernels, buffers written by several threads), so they stay inside
//! this module.

mod buffers;
mod conv;
mod crew;
mod kernels;
mod network;
mod parallel;
mod signal;
mod simd;
#[cfg(test)]
mod testing;
mod winograd;
mod workspace;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use self::crew::Crew;
use self::network::{Network, Pass};
use self::parallel::{Alone, BreakOnPanic, Member, TeamChooser, TeamWork};
pub use self::simd::{SimdLevel, UnsupportedSimd};
use self::winograd::Scratch;
use self::workspace::Buffers;
use super::engine::{check_input, Engine, EngineError, Feed};
use super::spec::{ModelSpec, IMAGE_FLOATS};
use super::SimdChoice;

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
    #[error("--threads {0}: the fast engine runs at most {MAX_THREADS} threads")]
    TooManyThreads(usize),
    #[error("starting the fast engine's threads: {0}")]
    Threads(#[from] std::io::Error),
}

/// Most threads the engine runs; each holds a micro-batch's buffers (about 5 MB).
pub const MAX_THREADS: usize = 256;

/// How a batch is shared between threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threading {
    /// Whole images (micro-batches) per thread while every thread gets one; the images left
    /// over either split layer by layer between all threads or run whole, whichever
    /// [`parallel::TeamChooser`] has measured to be faster on this machine lately.
    Auto,
    /// Whole images per thread only (a batch smaller than the thread count leaves threads idle).
    Images,
    /// Every image split layer by layer between all threads.
    Layers,
}

/// Most images a thread runs together, layer by layer: enough for the widest Winograd layers to
/// reuse their transformed filters across images, few enough for the activations to stay in cache.
pub const MICRO_BATCH: usize = 8;

/// One thread's buffers for a micro-batch of whole images, and its Winograd scratch.
#[derive(Debug)]
struct ThreadSpace {
    images: Vec<Buffers>,
    scratch: Scratch,
}

/// Every thread's space, the buffers a team shares for one image, and what has been learnt about
/// running small batches.
#[derive(Debug)]
struct Workspace {
    own: Vec<ThreadSpace>,
    team: Buffers,
    chooser: TeamChooser,
}

/// How to build a [`FastResNet`]; [`FastResNet::new`] uses the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastOptions {
    pub simd: SimdChoice,
    /// 0 = one per available core.
    pub threads: usize,
    pub threading: Threading,
    /// Stride-1 3x3 convolutions with Winograd (else direct).
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
    /// Owned, not locked: a forward pass takes `&mut self`.
    workspace: Workspace,
    /// The `threads - 1` threads that work beside the caller's, started once (none with one
    /// thread).
    crew: Crew,
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
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS)),
            n if n > MAX_THREADS => return Err(FastError::TooManyThreads(n)),
            n => n,
        };
        let net = Network::load(spec, tensors, simd, options.winograd)?;
        let workspace = Workspace {
            own: (0..threads)
                .map(|_| ThreadSpace {
                    images: (0..MICRO_BATCH)
                        .map(|_| Buffers::new(net.planes()))
                        .collect(),
                    scratch: Scratch::default(),
                })
                .collect(),
            team: Buffers::new(net.planes()),
            chooser: TeamChooser::default(),
        };
        let crew = Crew::new(threads - 1)?;
        tracing::debug!(%simd, threads, winograd = options.winograd, "fast engine ready");
        Ok(Self {
            net,
            simd,
            threads,
            threading: options.threading,
            workspace,
            crew,
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

    /// Fills `logits` (`n * classes`) for `n` images laid out `n * [3, 32, 32]`.
    fn run(&mut self, images: &[f32], n: usize, logits: &mut [f32]) {
        let image_len = IMAGE_FLOATS;
        let net = &self.net;
        let classes = net.classes();
        let Workspace { own, team, chooser } = &mut self.workspace;
        let threads = self.threads.min(own.len()).max(1);
        // Images [0, whole) go to threads whole; the rest are split layer by layer.
        let split = n % threads;
        let (whole, learn) = match self.threading {
            _ if threads == 1 || split == 0 => (n, false),
            // Only batches that are all remainder measure the choice cleanly.
            Threading::Auto if n < threads => (if chooser.choose() { 0 } else { n }, true),
            Threading::Auto if chooser.prefers_team() => (n - split, false),
            Threading::Auto => (n, false),
            Threading::Images => (n, false),
            Threading::Layers => (0, false),
        };
        let started = std::time::Instant::now();
        let pass = net.pass(n);
        // The whole images in `chunks` micro-batches of at most MICRO_BATCH, as even as can be
        // and as many for every thread: with a fixed size of 8, a batch of 40 gave one thread
        // 24 images and the other 16. Threads still claim them one by one, so one that is held
        // up (preempted, on a busy server) leaves its share to the others.
        let chunks = micro_batches(whole, threads);
        let next = AtomicUsize::new(0);
        let results = Mutex::new(&mut *logits);
        // Logits of images `first..` (whichever thread computed their heads).
        let deliver = |first: usize, computed: &[f32]| {
            let mut results = lock(&results);
            results[first * classes..first * classes + computed.len()].copy_from_slice(computed);
        };
        let team = team.share();
        let team_work = TeamWork::new(threads);
        let work = |index: usize, space: &mut ThreadSpace| {
            let _release_team = BreakOnPanic(&team_work);
            let ThreadSpace {
                images: bufs,
                scratch,
            } = space;
            let own: Vec<_> = bufs.iter_mut().map(Buffers::share).collect();
            let mut out = vec![0.0f32; MICRO_BATCH * classes];
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= chunks {
                    break;
                }
                let (start, end) = (k * whole / chunks, (k + 1) * whole / chunks);
                let out = &mut out[..(end - start) * classes];
                // SAFETY: `own` views this thread's own buffers (`space`, borrowed exclusively
                // by this closure call), which no other thread sees.
                unsafe {
                    net.run_batch(
                        &images[start * image_len..end * image_len],
                        &own[..end - start],
                        &Alone,
                        pass,
                        scratch,
                        out,
                        &mut |done, logits| deliver(start + done.start, logits),
                    )
                };
            }
            // Every member goes through the same images, so the same layers.
            let part = Member::new(&team_work, index);
            for i in whole..n {
                // SAFETY: the team buffers are used only by the members of this team, each
                // running this same loop over the same images, with the same `pass`, with its
                // own `Member`.
                unsafe {
                    net.run_batch(
                        &images[i * image_len..(i + 1) * image_len],
                        std::slice::from_ref(&team),
                        &part,
                        pass,
                        scratch,
                        &mut out[..classes],
                        &mut |_, logits| deliver(i, logits),
                    )
                };
            }
        };
        // Threads with something to do: all of them when a team runs, else one per micro-batch.
        let active = if whole < n {
            threads
        } else {
            chunks.min(threads)
        };
        // Member `i` takes space `i`, if any: every thread of a team has one, and with whole
        // images only the first `active` threads have work.
        let spaces: Vec<Mutex<Option<&mut ThreadSpace>>> = own
            .iter_mut()
            .take(active)
            .map(|space| Mutex::new(Some(space)))
            .collect();
        let job = |index: usize| {
            let space = spaces.get(index).and_then(|slot| lock(slot).take());
            if let Some(space) = space {
                work(index, space);
            }
        };
        if active > 1 {
            // Micro-batches and a team's rows are claimed, never assigned, so the caller does
            // not wait for a helper that has not started by the time the work is done: the crew
            // skips it.
            self.crew.run(&job);
        } else {
            job(0);
        }
        if learn {
            chooser.record(whole < n, started.elapsed().as_secs_f64() / n as f64);
        }
    }

    /// Runs `first` and the feed's later batches as whole images, micro-batch by micro-batch,
    /// on every thread: a thread that finds its batch's micro-batches all taken collects the
    /// next batch and starts on it while the others finish theirs. Returns when the feed has no
    /// more and every micro-batch taken is done.
    fn stream(&mut self, feed: &dyn Feed, first: FedImages) {
        let threads = self.threads.min(self.workspace.own.len()).max(1);
        let net = &self.net;
        let classes = net.classes();
        let current = Mutex::new(Some(Arc::new(Claimable::new(net, first, threads))));
        let stopped = AtomicBool::new(false);
        let spaces: Vec<Mutex<Option<&mut ThreadSpace>>> = self
            .workspace
            .own
            .iter_mut()
            .take(threads)
            .map(|space| Mutex::new(Some(space)))
            .collect();
        let job = |index: usize| {
            let Some(space) = spaces.get(index).and_then(|slot| lock(slot).take()) else {
                return;
            };
            let _stop_on_panic = StopOnPanic(&stopped);
            let ThreadSpace {
                images: bufs,
                scratch,
            } = space;
            let own: Vec<_> = bufs.iter_mut().map(Buffers::share).collect();
            let mut out = vec![0.0f32; MICRO_BATCH * classes];
            let mut batch = lock(&current).clone();
            while let Some(open) = batch {
                // Another thread panicked: its batch fails, and no thread starts another.
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(images) = open.claim() {
                    let out = &mut out[..images.len() * classes];
                    // SAFETY: `own` views this thread's own buffers (`space`, borrowed
                    // exclusively by this call), which no other thread sees.
                    unsafe {
                        net.run_batch(
                            &open.fed.pixels
                                [images.start * IMAGE_FLOATS..images.end * IMAGE_FLOATS],
                            &own[..images.len()],
                            &Alone,
                            open.pass,
                            scratch,
                            out,
                            &mut |done, logits| {
                                feed.deliver(open.fed.id, images.start + done.start, logits)
                            },
                        )
                    };
                    batch = Some(open);
                    continue;
                }
                // This batch's micro-batches are all taken: the next batch, unless another
                // thread has collected it already.
                let mut current = lock(&current);
                if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &open)) {
                    *current = FedImages::next(feed)
                        .map(|fed| Arc::new(Claimable::new(net, fed, threads)));
                }
                batch = current.clone();
            }
        };
        if threads > 1 {
            self.crew.run(&job);
        } else {
            job(0);
        }
    }
}

/// The number of micro-batches `images` whole images are run in by `threads` threads: as many
/// for every thread, each of at most [`MICRO_BATCH`] images.
fn micro_batches(images: usize, threads: usize) -> usize {
    let rounds = images.div_ceil(threads * MICRO_BATCH).max(1);
    (threads * rounds).min(images)
}

/// A batch from a [`Feed`], with its images.
#[derive(Debug)]
struct FedImages {
    id: u64,
    images: usize,
    pixels: Vec<f32>,
}

impl FedImages {
    /// The feed's next batch; one whose pixels are not its images' (a feed's bug) fails.
    fn next(feed: &dyn Feed) -> Option<Self> {
        loop {
            let mut pixels = Vec::new();
            let batch = feed.next_batch(&mut pixels)?;
            match check_input(&pixels, batch.images) {
                Ok(()) => {
                    return Some(Self {
                        id: batch.id,
                        images: batch.images,
                        pixels,
                    })
                }
                Err(e) => feed.fail(batch.id, &e),
            }
        }
    }
}

/// A batch being run as whole images by whichever threads claim its micro-batches.
#[derive(Debug)]
struct Claimable {
    fed: FedImages,
    /// Planned from the batch's size, as a call of [`FastResNet::run`] with it would be: which
    /// thread runs an image, and when, never changes its logits.
    pass: Pass,
    micro_batches: usize,
    /// The next micro-batch to claim.
    next: AtomicUsize,
}

impl Claimable {
    fn new(net: &Network, fed: FedImages, threads: usize) -> Self {
        Self {
            pass: net.pass(fed.images),
            micro_batches: micro_batches(fed.images, threads),
            next: AtomicUsize::new(0),
            fed,
        }
    }

    /// The images of the next micro-batch nobody has claimed; `None` once all are claimed.
    fn claim(&self) -> Option<Range<usize>> {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let (n, chunks) = (self.fed.images, self.micro_batches);
        (k < chunks).then(|| k * n / chunks..(k + 1) * n / chunks)
    }
}

/// Stops a stream's threads if dropped while its thread unwinds from a panic.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Locks a mutex whose data a panic cannot leave half-written.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine for FastResNet {
    fn logits(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>, EngineError> {
        check_input(images, n)?;
        let mut logits = vec![0.0f32; n * self.net.classes()];
        self.run(images, n, &mut logits);
        Ok(logits)
    }

    /// Batches smaller than the thread count that arrive while every thread is free run as
    /// [`Self::logits`] would run them (split layer by layer, or on one thread); from the first
    /// larger batch on, [`Self::stream`] runs this and the later ones without waiting for the
    /// slowest thread between batches.
    fn serve(&mut self, feed: &dyn Feed) {
        let threads = self.threads.min(self.workspace.own.len()).max(1);
        while let Some(fed) = FedImages::next(feed) {
            if fed.images >= threads && self.threading != Threading::Layers {
                self.stream(feed, fed);
                return;
            }
            let mut logits = vec![0.0f32; fed.images * self.net.classes()];
            self.run(&fed.pixels, fed.images, &mut logits);
            feed.deliver(fed.id, 0, &logits);
        }
    }
}
