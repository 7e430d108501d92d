//! The network plan of the fast engine: folded, repacked layers read from the weights file, which
//! buffer each layer reads and writes, and the walk of a micro-batch of images through them,
//! layer by layer.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Tensor};

use super::buffers::{ChannelsOutput, LayerInput, LayerOutput, Plane};
use super::conv::ConvLayer;
use super::parallel::Partition;
use super::simd::SimdLevel;
use super::winograd::{self, Scratch, Tiling, WinogradLayer};
use super::workspace::Shared;
use super::FastError;
use crate::model::fold::{fold_batch_norm, BatchNorm, FoldedConv};
use crate::model::spec::{ModelSpec, Shortcut, INPUT_CHANNELS, INPUT_SIZE, STAGE_CHANNELS};

/// Buffer id of the network input.
const INPUT: usize = 0;

/// Winograd layers whose F(4x4, 3x3) filters are larger than this (the 64-channel ones: 576 KiB,
/// against 144 KiB for 32 channels) are wide: they split their output channels between threads
/// when the batch is small, so that each thread reads only its part of the filters, and have an
/// F(2x2, 3x3) form for the smallest batches. Below it the filters stay in a core's cache, and
/// splitting would only repeat the input transform on every thread (measured at batch 1: 1.11x
/// splitting the 64-channel layers, 0.98x splitting the 32-channel ones too).
const WIDE_ABOVE_FILTER_BYTES: usize = 256 * 1024;

/// Whether a layer is wide ([`WIDE_ABOVE_FILTER_BYTES`]), from its F(4x4, 3x3) form.
fn is_wide(large: &WinogradLayer) -> bool {
    large.filter_bytes() > WIDE_ABOVE_FILTER_BYTES
}

/// What a forward pass decides once for all its micro-batches and threads.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// Run the wide layers in F(2x2, 3x3) ([`Network::pass`]).
    small_batch: bool,
}

/// Which buffers of an image's [`Shared`] set a layer reads and writes, by buffer id.
#[derive(Debug, Clone, Copy)]
struct Operands {
    src: usize,
    dst: usize,
    /// Added to the output before the ReLU.
    residual: Option<usize>,
}

#[derive(Debug)]
enum ShortcutPlan {
    /// The block input itself.
    Identity,
    /// Folded conv1x1 (stride 2) + batch norm, into buffer `buf`.
    Projection { conv: ConvLayer, buf: usize },
    /// `x[::2, ::2]` with `pad` zero channels on each side, into buffer `buf`.
    ZeroPad { pad: usize, buf: usize },
}

/// A 3x3 convolution, computed directly or with Winograd.
#[derive(Debug)]
enum Conv3x3 {
    Direct(ConvLayer),
    Winograd {
        /// F(4x4, 3x3): the fewest multiplies, for batches whose tiles share the filters.
        large: WinogradLayer,
        /// F(2x2, 3x3) for the wide layers, at batches small enough that the threads split
        /// their output channels (batches of 1 and 2 for 64 channels): a pass then waits on
        /// reading the filters from the shared cache, and these are 2.25x smaller (256 KiB
        /// against 576 KiB), for 1.78x the multiplies. Measured with 2 threads on AVX-512:
        /// 1.19x the images/s at batch 1, 1.24x at batch 2. Both sets stay loaded (17 x 256 KiB
        /// more for ResNet56).
        small: Option<Box<WinogradLayer>>,
    },
}

impl Conv3x3 {
    fn new(conv: &FoldedConv, stride: usize, src: Plane, level: SimdLevel, winograd: bool) -> Self {
        if !(winograd && winograd::supports(Tiling::F4, conv, stride, src.h, src.w)) {
            return Self::Direct(ConvLayer::new(conv, stride, level));
        }
        let large = WinogradLayer::new(conv, src.w, level, Tiling::F4);
        let small = (is_wide(&large) && winograd::supports(Tiling::F2, conv, stride, src.h, src.w))
            .then(|| Box::new(WinogradLayer::new(conv, src.w, level, Tiling::F2)));
        Self::Winograd { large, small }
    }

    /// The most images whose tiles make one group of this layer's F(2x2, 3x3) form (whose
    /// output is `dst`), if it has one.
    fn small_batch_max(&self, dst: Plane) -> Option<usize> {
        match self {
            Self::Winograd {
                small: Some(small), ..
            } => Some(small.group_tiles() / ((dst.h / small.tile()) * (dst.w / small.tile()))),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Block {
    conv1: Conv3x3,
    conv2: Conv3x3,
    shortcut: ShortcutPlan,
    input: usize,
    mid: usize,
    output: usize,
}

/// Every layer of a CIFAR ResNet, folded and packed for one SIMD level.
#[derive(Debug)]
pub struct Network {
    /// Shape of each buffer, indexed by buffer id.
    planes: Vec<Plane>,
    stem: ConvLayer,
    stem_output: usize,
    blocks: Vec<Block>,
    /// How many of `blocks` make the first stage.
    first_stage_blocks: usize,
    /// Batches up to this size run the wide layers in F(2x2, 3x3).
    small_batch_max: usize,
    /// `[classes][channels]`.
    fc_weight: Vec<f32>,
    fc_bias: Vec<f32>,
    classes: usize,
}

/// Reads the weights of the network's layers by their state-dict names.
struct Reader<'a> {
    tensors: &'a HashMap<String, Tensor>,
}

impl Reader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, FastError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| FastError::MissingTensor {
                name: name.into(),
                expected: shape.to_vec(),
            })?;
        if t.dims() != shape {
            return Err(FastError::WrongShape {
                name: name.into(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(|source| FastError::Tensor {
                name: name.into(),
                source,
            })
    }

    fn batch_norm(&self, prefix: &str, c: usize) -> Result<BatchNorm, FastError> {
        let field = |f: &str| self.get(&format!("{prefix}.{f}"), &[c]);
        Ok(BatchNorm {
            weight: field("weight")?,
            bias: field("bias")?,
            running_mean: field("running_mean")?,
            running_var: field("running_var")?,
        })
    }

    /// Convolution `conv` (bias when `bias`) followed by batch norm `bn`, folded into one.
    fn folded(
        &self,
        conv: &str,
        bn: &str,
        (cin, cout, k): (usize, usize, usize),
        bias: bool,
    ) -> Result<FoldedConv, FastError> {
        let weight = self.get(&format!("{conv}.weight"), &[cout, cin, k, k])?;
        let conv_bias = if bias {
            Some(self.get(&format!("{conv}.bias"), &[cout])?)
        } else {
            None
        };
        Ok(fold_batch_norm(
            &weight,
            conv_bias.as_deref(),
            &self.batch_norm(bn, cout)?,
            cin,
            k,
        ))
    }
}

impl Network {
    /// Builds the plan for `spec` from tensors named as in the weights file.
    /// `winograd`: compute the stride-1 3x3 convolutions with Winograd (F(4x4, 3x3), and
    /// F(2x2, 3x3) too for the wide layers at small batches).
    pub fn load(
        spec: &ModelSpec,
        tensors: &HashMap<String, Tensor>,
        level: SimdLevel,
        winograd: bool,
    ) -> Result<Self, FastError> {
        let read = Reader { tensors };
        let bias = spec.conv_bias;
        let mut planes = vec![Plane::new(INPUT_SIZE, INPUT_SIZE, INPUT_CHANNELS)];
        let mut add = |p: Plane| {
            planes.push(p);
            planes.len() - 1
        };

        let stem = ConvLayer::new(
            &read.folded("conv1", "bn1", (INPUT_CHANNELS, STAGE_CHANNELS[0], 3), bias)?,
            1,
            level,
        );
        let mut current =
            add(stem.output_plane(Plane::new(INPUT_SIZE, INPUT_SIZE, INPUT_CHANNELS)));
        let stem_output = current;
        let mut current_plane =
            stem.output_plane(Plane::new(INPUT_SIZE, INPUT_SIZE, INPUT_CHANNELS));

        let mut blocks = Vec::with_capacity(3 * spec.blocks_per_stage);
        for stage in 0..3 {
            // Each stage has its own buffers, so each keeps the zero border of its own shape.
            let (mut pair, mut mid) = (None, None);
            for index in 0..spec.blocks_per_stage {
                let (stride, cin, cout) = spec.block_geometry(stage, index);
                let p = format!("block{}.{index}", stage + 1);
                let conv1 = read.folded(
                    &format!("{p}.conv1"),
                    &format!("{p}.bn1"),
                    (cin, cout, 3),
                    bias,
                )?;
                let conv2 = read.folded(
                    &format!("{p}.conv2"),
                    &format!("{p}.bn2"),
                    (cout, cout, 3),
                    bias,
                )?;
                let out_plane = Plane::new(
                    (current_plane.h - 1) / stride + 1,
                    (current_plane.w - 1) / stride + 1,
                    cout,
                );
                let conv1 = Conv3x3::new(&conv1, stride, current_plane, level, winograd);
                let conv2 = Conv3x3::new(&conv2, 1, out_plane, level, winograd);
                let [a, b] = *pair.get_or_insert_with(|| [add(out_plane), add(out_plane)]);
                let mid = *mid.get_or_insert_with(|| add(out_plane));
                let shortcut = if !spec.is_downsampling(stage, index) {
                    ShortcutPlan::Identity
                } else {
                    match spec.shortcut {
                        Shortcut::Projection => ShortcutPlan::Projection {
                            conv: ConvLayer::new(
                                &read.folded(
                                    &format!("{p}.residual.0"),
                                    &format!("{p}.residual.1"),
                                    (cin, cout, 1),
                                    bias,
                                )?,
                                stride,
                                level,
                            ),
                            buf: add(out_plane),
                        },
                        Shortcut::ZeroPad => ShortcutPlan::ZeroPad {
                            pad: (cout - cin) / 2,
                            buf: add(out_plane),
                        },
                    }
                };
                let output = if current == a { b } else { a };
                blocks.push(Block {
                    conv1,
                    conv2,
                    shortcut,
                    input: current,
                    mid,
                    output,
                });
                current = output;
                current_plane = out_plane;
            }
        }
        let channels = STAGE_CHANNELS[2];
        let classes = spec.num_classes;
        let small_batch_max = blocks
            .iter()
            .flat_map(|b| [&b.conv1, &b.conv2].map(|conv| conv.small_batch_max(planes[b.output])))
            .flatten()
            .min()
            .unwrap_or(0);
        Ok(Self {
            planes,
            stem,
            stem_output,
            blocks,
            first_stage_blocks: spec.blocks_per_stage,
            small_batch_max,
            fc_weight: read.get("fc.weight", &[classes, channels])?,
            fc_bias: read.get("fc.bias", &[classes])?,
            classes,
        })
    }

    /// Shapes of the buffers an image needs, by buffer id (to allocate a workspace).
    pub fn planes(&self) -> &[Plane] {
        &self.planes
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The plan of a forward pass of `n` images. The wide layers run in F(2x2, 3x3) when the
    /// threads would split their output channels in it (batches of 1 and 2 for 64 channels),
    /// and in F(4x4, 3x3) otherwise. It is decided from `n` alone, never from how the pass
    /// shares its images out between threads, so that threading does not change the arithmetic.
    pub fn pass(&self, n: usize) -> Pass {
        Pass {
            small_batch: n <= self.small_batch_max,
        }
    }

    fn last_output(&self) -> usize {
        self.blocks.last().map_or(self.stem_output, |b| b.output)
    }

    /// One direct convolution of every image of the micro-batch, over this thread's rows.
    ///
    /// # Safety
    /// Between two `sync`s of the partition, no thread writes `io.src` or `io.residual`, and the
    /// threads write disjoint rows of `io.dst` (what `Partition::share` hands out), which nobody
    /// reads.
    unsafe fn conv(
        &self,
        layer: &ConvLayer,
        batch: &[Shared<'_>],
        part: &impl Partition,
        io: Operands,
        relu: bool,
    ) {
        let (src_plane, dst_plane) = (self.planes[io.src], self.planes[io.dst]);
        part.share(dst_plane.h, |rows| {
            let band = dst_plane.rows(&rows);
            for bufs in batch {
                // SAFETY: nobody writes `src` or the residual in this phase, and these rows of
                // `dst` are this thread's alone (the function contract).
                let (image, output, residual) = unsafe {
                    (
                        bufs.read(io.src),
                        bufs.write(io.dst, band.clone()),
                        io.residual.map(|id| &bufs.read(id)[band.clone()]),
                    )
                };
                layer.run(
                    LayerInput {
                        image,
                        plane: src_plane,
                    },
                    LayerOutput {
                        band: output,
                        plane: dst_plane,
                        rows: rows.clone(),
                        residual,
                        relu,
                    },
                );
            }
        });
    }

    /// A 3x3 convolution of a block, with ReLU, for every image of the micro-batch.
    ///
    /// # Safety
    /// As for [`Self::conv`].
    unsafe fn conv3x3(
        &self,
        layer: &Conv3x3,
        batch: &[Shared<'_>],
        part: &impl Partition,
        scratch: &mut Scratch,
        io: Operands,
        pass: Pass,
    ) {
        match layer {
            // SAFETY: same contract as ours.
            Conv3x3::Direct(layer) => unsafe { self.conv(layer, batch, part, io, true) },
            Conv3x3::Winograd { large, small } => {
                let layer = match small {
                    Some(small) if pass.small_batch => small,
                    _ => large,
                };
                // Wide or not by its F(4x4, 3x3) filters, whichever form runs.
                let wide = is_wide(large);
                // SAFETY: same contract as ours.
                unsafe { self.winograd(layer, wide, batch, part, scratch, io) }
            }
        }
    }

    /// A Winograd convolution: this thread's tile rows of every image, gathered into groups of
    /// about `group_tiles()` tiles (several images' worth for the narrow, wide layers) so that
    /// each group reads the transformed filters once; or, for a `wide` layer
    /// ([`WIDE_ABOVE_FILTER_BYTES`]) when the whole batch is one group, this thread's blocks of
    /// output channels ([`Self::winograd_channels`]).
    ///
    /// # Safety
    /// As for [`Self::conv`].
    unsafe fn winograd(
        &self,
        layer: &WinogradLayer,
        wide: bool,
        batch: &[Shared<'_>],
        part: &impl Partition,
        scratch: &mut Scratch,
        io: Operands,
    ) {
        let (src_plane, dst_plane) = (self.planes[io.src], self.planes[io.dst]);
        let tile = layer.tile();
        let tiles_x = dst_plane.w / tile;
        let tiles = batch.len() * tiles_x * (dst_plane.h / tile);
        if wide && tiles <= layer.group_tiles() && layer.cout > layer.block() {
            // SAFETY: the caller's contract.
            unsafe { self.winograd_channels(layer, batch, part, scratch, io) };
            return;
        }
        // Whole tiles: a thread's band is a run of tile rows, in one claim, since each group
        // reads all the filters (at batch 1 with 2 threads, 1.06x the images/s of two claims
        // each).
        part.share_once(dst_plane.h / tile, |band| {
            let rows_per_image = band.len();
            let per_group = (layer.group_tiles() / tiles_x).max(1);
            // Tile rows of all images, in order: (image, tile row); a group is a run of them.
            let total = batch.len() * rows_per_image;
            let at = |k: usize| (k / rows_per_image, band.start + k % rows_per_image);
            let mut start = 0;
            while start < total {
                let end = (start + per_group).min(total);
                let n = (end - start) * tiles_x;
                // Each image's part of the group: consecutive tile rows, tiles `offset..` of it.
                let segments = || {
                    let mut k = start;
                    std::iter::from_fn(move || {
                        if k >= end {
                            return None;
                        }
                        let (image, first) = at(k);
                        let last = (end - k).min(band.end - first) + first;
                        let offset = (k - start) * tiles_x;
                        k += last - first;
                        Some((image, first..last, offset))
                    })
                };
                for (image, tiles, offset) in segments() {
                    // SAFETY: nobody writes `src` in this phase (the function contract).
                    let input = unsafe { batch[image].read(io.src) };
                    let input = LayerInput {
                        image: input,
                        plane: src_plane,
                    };
                    layer.transform_input(input, tiles, (offset, n), scratch);
                }
                layer.multiply(n, 0..layer.cout, scratch);
                for (image, tiles, offset) in segments() {
                    let rows = tiles.start * tile..tiles.end * tile;
                    let band = dst_plane.rows(&rows);
                    let bufs = &batch[image];
                    // SAFETY: these rows of `dst` are this thread's band, and nobody writes the
                    // residual in this phase (the function contract).
                    let (output, residual) = unsafe {
                        (
                            bufs.write(io.dst, band.clone()),
                            io.residual.map(|id| &bufs.read(id)[band]),
                        )
                    };
                    let out = LayerOutput {
                        band: output,
                        plane: dst_plane,
                        rows,
                        residual,
                        relu: true,
                    };
                    layer.transform_output(scratch, (offset, n), out);
                }
                start = end;
            }
        });
    }

    /// A Winograd convolution whose tiles, over the whole batch, make one group (the widest
    /// layers at small batches): the threads share its blocks of output channels instead of its
    /// tile rows. Each thread transforms every tile of the input (cheap: few tiles), and then
    /// multiplies and transforms back only its channels, so it reads only its blocks of the
    /// filters. Split by tile rows, two threads each read all the filters (590 KB for 64
    /// channels, beyond a core's cache) to multiply a few tiles: a small batch's pass waited on
    /// that.
    ///
    /// # Safety
    /// As for [`Self::conv`].
    unsafe fn winograd_channels(
        &self,
        layer: &WinogradLayer,
        batch: &[Shared<'_>],
        part: &impl Partition,
        scratch: &mut Scratch,
        io: Operands,
    ) {
        let (src_plane, dst_plane) = (self.planes[io.src], self.planes[io.dst]);
        let tile_rows = dst_plane.h / layer.tile();
        let per_image = tile_rows * (dst_plane.w / layer.tile());
        let n = batch.len() * per_image;
        let rows = 0..dst_plane.h;
        let band = dst_plane.rows(&rows);
        let block = layer.block();
        let mut transformed = false;
        part.share(layer.cout / block, |blocks| {
            if !transformed {
                for (i, bufs) in batch.iter().enumerate() {
                    let input = LayerInput {
                        // SAFETY: nobody writes `src` in this phase (the function contract).
                        image: unsafe { bufs.read(io.src) },
                        plane: src_plane,
                    };
                    layer.transform_input(input, 0..tile_rows, (i * per_image, n), scratch);
                }
                transformed = true;
            }
            let channels = blocks.start * block..blocks.end * block;
            layer.multiply(n, channels.clone(), scratch);
            for (i, bufs) in batch.iter().enumerate() {
                let out = ChannelsOutput {
                    band: bufs.write_shared(io.dst, band.clone()),
                    len: band.len(),
                    plane: dst_plane,
                    rows: rows.clone(),
                    channels: channels.clone(),
                    // SAFETY: nobody writes the residual in this phase (the function contract).
                    residual: io
                        .residual
                        .map(|id| unsafe { &bufs.read(id)[band.clone()] }),
                    relu: true,
                };
                // SAFETY: the band is this image's whole `dst` buffer interior rows; these
                // channel blocks were handed to this thread alone, so no other thread touches
                // these channels of it in this phase, and nobody reads `dst` (the function
                // contract).
                unsafe { layer.transform_output_channels(scratch, (i * per_image, n), out) };
            }
        });
    }

    /// The input phase (the images, NCHW, into INPUT) and the stem, each followed by a sync.
    ///
    /// # Safety
    /// As for [`Self::run_batch`].
    unsafe fn input_and_stem(&self, images: &[f32], batch: &[Shared<'_>], part: &impl Partition) {
        let input = self.planes[INPUT];
        let image_len = input.h * input.w * input.c;
        part.share(input.h, |rows| {
            for (image, bufs) in images.chunks_exact(image_len).zip(batch) {
                // SAFETY: this phase writes only this thread's rows of INPUT.
                let dst = unsafe { bufs.write(INPUT, input.rows(&rows)) };
                for (i, y) in rows.clone().enumerate() {
                    for x in 0..input.w {
                        let at = input.at(i, x) - input.row_len();
                        for c in 0..input.c {
                            dst[at + c] = image[(c * input.h + y) * input.w + x];
                        }
                    }
                }
            }
        });
        part.sync();
        let stem = Operands {
            src: INPUT,
            dst: self.stem_output,
            residual: None,
        };
        // SAFETY: the stem phase reads INPUT (complete after the sync) and writes this thread's
        // rows of the stem output, which no other thread reads or writes in this phase.
        unsafe { self.conv(&self.stem, batch, part, stem, true) };
        part.sync();
    }

    /// `blocks`, in order, each as two phases followed by a sync.
    ///
    /// # Safety
    /// As for [`Self::run_batch`].
    unsafe fn run_blocks(
        &self,
        blocks: &[Block],
        batch: &[Shared<'_>],
        part: &impl Partition,
        scratch: &mut Scratch,
        pass: Pass,
    ) {
        for block in blocks {
            let conv1 = Operands {
                src: block.input,
                dst: block.mid,
                residual: None,
            };
            // SAFETY: conv1's phase reads the block input (complete after the sync) and writes
            // this thread's rows of `mid`, which nothing reads until the next sync.
            unsafe { self.conv3x3(&block.conv1, batch, part, scratch, conv1, pass) };
            let residual = match &block.shortcut {
                ShortcutPlan::Identity => block.input,
                ShortcutPlan::Projection { conv, buf } => {
                    let projection = Operands {
                        src: block.input,
                        dst: *buf,
                        residual: None,
                    };
                    // SAFETY: same phase as conv1: reads the block input, writes this thread's
                    // rows of the shortcut buffer, distinct from `mid` and from the input.
                    unsafe { self.conv(conv, batch, part, projection, false) };
                    *buf
                }
                ShortcutPlan::ZeroPad { pad, buf } => {
                    // SAFETY: reads the block input, writes this thread's rows of `buf`.
                    unsafe { self.zero_pad_shortcut(batch, part, block.input, *buf, *pad) };
                    *buf
                }
            };
            part.sync();
            let conv2 = Operands {
                src: block.mid,
                dst: block.output,
                residual: Some(residual),
            };
            // SAFETY: conv2's phase reads `mid` and the residual (both complete after the sync)
            // and writes this thread's rows of the block output, which neither of them is.
            unsafe { self.conv3x3(&block.conv2, batch, part, scratch, conv2, pass) };
            part.sync();
        }
    }

    /// Runs a micro-batch of images (`n * [3, 32, 32]`, normalised, NCHW; `batch[i]` holds image
    /// i's buffers) through the network, layer by layer. Every thread of the partition calls
    /// this with the same arguments but its own `logits` (`n * classes`, scratch): the images
    /// whose classifier head this thread computes are handed to `deliver` with their logits.
    /// `pass` is the forward pass's plan ([`Self::pass`]).
    ///
    /// The phases, separated by `sync`: input (writes INPUT), stem (INPUT -> stem output), then
    /// per block conv1 + shortcut (input -> mid, shortcut buffer) and conv2 (mid + residual ->
    /// output), then the heads (last output -> `logits`); up to the end of the first stage one
    /// image at a time, then over the whole micro-batch. Within a phase no buffer is both read
    /// and written, and threads write disjoint rows (or, in [`Self::winograd_channels`],
    /// disjoint channels); that is what makes the `Shared` accesses below sound. Everything is
    /// finished when this returns.
    ///
    /// # Safety
    /// The buffers behind `batch` are used, while this runs, only by the threads of `part`, each
    /// calling `run_batch` with views of the same buffers, the same `pass` (which decides how
    /// many rows each layer shares out) and its own `part` of one partition (for
    /// [`super::parallel::Alone`]: by this thread alone).
    // Eight, each with its own role: a struct to bundle some would only be unpacked here.
    // `deliver` is a `dyn` callback, called once per micro-batch, so that the walk through the
    // network is compiled once per partition type whoever calls it: with a generic callback, a
    // second caller of the `Alone` walk (serving a queue) made `bench`'s batch 8 and 64 2-4%
    // slower (6 alternated runs, slower in 5 and 6 of 6), through the compiler's different
    // inlining of the shared layers.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_batch(
        &self,
        images: &[f32],
        batch: &[Shared<'_>],
        part: &impl Partition,
        pass: Pass,
        scratch: &mut Scratch,
        logits: &mut [f32],
        deliver: &mut dyn FnMut(Range<usize>, &[f32]),
    ) {
        let input = self.planes[INPUT];
        let image_len = input.h * input.w * input.c;
        assert_eq!(images.len(), batch.len() * image_len, "micro-batch size");
        // The first stage image by image, the rest over the micro-batch. The first stage's
        // activations are the largest (74 KB per buffer at 16 channels, 32x32): a micro-batch of
        // them, layer by layer, does not stay in a core's cache, one image's does. The later
        // stages' are a half and a quarter of that, and gather tiles across images.
        let first_stage = self.first_stage_blocks;
        for (image, bufs) in images.chunks_exact(image_len).zip(batch.chunks(1)) {
            // SAFETY: the caller's contract, for this image's buffers.
            unsafe {
                self.input_and_stem(image, bufs, part);
                self.run_blocks(&self.blocks[..first_stage], bufs, part, scratch, pass);
            }
        }
        // SAFETY: the caller's contract.
        unsafe { self.run_blocks(&self.blocks[first_stage..], batch, part, scratch, pass) };
        let last = self.last_output();
        let classes = self.classes;
        assert_eq!(logits.len(), batch.len() * classes, "logits size");
        part.share(batch.len(), |images| {
            let logits = &mut logits[images.start * classes..images.end * classes];
            for (bufs, logits) in batch[images.clone()]
                .iter()
                .zip(logits.chunks_exact_mut(classes))
            {
                // SAFETY: the heads' phase only reads the last output (complete after the
                // sync); the next write to it comes after the sync below.
                let features = unsafe { bufs.read(last) };
                self.head(features, self.planes[last], logits);
            }
            deliver(images, logits);
        });
        part.sync();
    }

    /// `x[::2, ::2]` of `src`, placed at channels `pad..pad + c_in` of `dst` (zeros elsewhere),
    /// for every image of the micro-batch.
    ///
    /// # Safety
    /// As for [`Self::conv`].
    unsafe fn zero_pad_shortcut(
        &self,
        batch: &[Shared<'_>],
        part: &impl Partition,
        src: usize,
        dst: usize,
        pad: usize,
    ) {
        let (sp, dp) = (self.planes[src], self.planes[dst]);
        part.share(dp.h, |rows| {
            let base = dp.rows(&rows).start;
            for bufs in batch {
                // SAFETY: function contract.
                let (input, out) = unsafe { (bufs.read(src), bufs.write(dst, dp.rows(&rows))) };
                for y in rows.clone() {
                    for x in 0..dp.w {
                        let o = dp.at(y, x) - base;
                        let i = sp.at(2 * y, 2 * x);
                        let pixel = &mut out[o..o + dp.c];
                        pixel.fill(0.0);
                        pixel[pad..pad + sp.c].copy_from_slice(&input[i..i + sp.c]);
                    }
                }
            }
        });
    }

    /// Global average pool and the linear classifier.
    fn head(&self, features: &[f32], plane: Plane, logits: &mut [f32]) {
        let mut pooled = [0.0f32; STAGE_CHANNELS[2]];
        let pooled = &mut pooled[..plane.c];
        for y in 0..plane.h {
            for x in 0..plane.w {
                let at = plane.at(y, x);
                for (p, &v) in pooled.iter_mut().zip(&features[at..at + plane.c]) {
                    *p += v;
                }
            }
        }
        let scale = 1.0 / (plane.h * plane.w) as f32;
        for ((logit, row), &b) in logits
            .iter_mut()
            .zip(self.fc_weight.chunks_exact(plane.c))
            .zip(&self.fc_bias)
        {
            *logit = b + scale
                * row
                    .iter()
                    .zip(pooled.iter())
                    .map(|(w, p)| w * p)
                    .sum::<f32>();
        }
    }
}
