//! The fast CPU engine: parity with the PyTorch reference logits at every SIMD level this CPU
//! has, on odd batch sizes and thread counts; agreement with the candle engine on a zero-pad,
//! bias-free network; engine selection and errors.

mod common;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use resnet_serve::cli::eval::{evaluate, load_reference, LabelledImages};
use resnet_serve::model::fast::{FastOptions, FastResNet, SimdLevel, Threading};
use resnet_serve::model::{
    Checkpoint, DeviceChoice, Engine, EngineChoice, EngineError, FedBatch, Feed, LoadOptions,
    Model, ModelError, Shortcut, SimdChoice, IMAGE_FLOATS,
};
use resnet_serve::preprocess::normalize_chw;
use safetensors::tensor::TensorView;

const SEED_WEIGHTS: &str = "models/resnet56-seed-random.safetensors";
const TEST_IMAGES: &str = "data/cifar10-test-846.safetensors";
const REFERENCE: &str = "reference/logits.safetensors";

fn options(weights: &Path, engine: EngineChoice, simd: SimdChoice, threads: usize) -> LoadOptions {
    LoadOptions {
        weights: Some(weights.to_path_buf()),
        device: DeviceChoice::Cpu,
        engine,
        simd,
        threads,
        ..LoadOptions::default()
    }
}

/// Every level `--simd` can force.
const LEVELS: [SimdChoice; 3] = [SimdChoice::Avx512, SimdChoice::Avx2, SimdChoice::Scalar];

/// Whether this CPU has `level`.
fn supported(level: SimdChoice) -> bool {
    SimdLevel::resolve(level).is_ok()
}

/// The first `n` images of the labelled set and their reference logits.
fn first_images(n: usize) -> Option<(PathBuf, LabelledImages, Vec<f32>)> {
    let weights = common::shared_file(SEED_WEIGHTS)?;
    let data = LabelledImages::load(&common::shared_file(TEST_IMAGES)?).unwrap();
    let reference = load_reference(&common::shared_file(REFERENCE)?, "seed_random_logits").unwrap();
    let n = n.min(data.len());
    let classes = reference.len() / data.len();
    let subset = LabelledImages {
        pixels: data.pixels[..n * IMAGE_FLOATS].to_vec(),
        labels: data.labels[..n].to_vec(),
    };
    Some((weights, subset, reference[..n * classes].to_vec()))
}

/// Each SIMD level this CPU supports, forced, on batches of 1, 3, 17 and 64 (each ending in a
/// partial batch), with 1 and 2 threads (whole images per thread, and an image split between
/// threads for the remainder): top-1 agreement 1.0 and |logit diff| <= 1e-3 against PyTorch.
#[test]
fn every_simd_level_matches_the_pytorch_reference_on_odd_batches() {
    let Some((weights, data, reference)) = first_images(70) else {
        return;
    };
    for choice in LEVELS {
        let level = choice.as_str();
        if !common::simd_testable(level, supported(choice)) {
            continue;
        }
        for threads in [1, 2] {
            let mut model =
                Model::load(&options(&weights, EngineChoice::Fast, choice, threads)).unwrap();
            assert_eq!(model.engine_name(), format!("fast-{level}"));
            for batch in [1, 3, 17, 64] {
                let report = evaluate(&mut model, &data, Some(&reference), batch).unwrap();
                let (agree, diff) = (
                    report.top1_agreement.unwrap(),
                    report.max_abs_logit_diff.unwrap(),
                );
                eprintln!("{level} threads {threads} batch {batch}: agreement {agree}, max diff {diff:.2e}");
                assert_eq!(agree, 1.0, "{level}, {threads} threads, batch {batch}");
                assert!(
                    diff <= 1e-3,
                    "{level}, {threads} threads, batch {batch}: {diff}"
                );
            }
        }
    }
}

/// The default engine on the CPU is the fast one, on the whole reference set.
#[test]
fn auto_engine_matches_the_reference_on_the_whole_test_set() {
    let Some((weights, data, reference)) = first_images(usize::MAX) else {
        return;
    };
    let mut model =
        Model::load(&options(&weights, EngineChoice::Auto, SimdChoice::Auto, 0)).unwrap();
    assert_eq!(model.engine_name(), format!("fast-{}", SimdLevel::detect()));
    let report = evaluate(&mut model, &data, Some(&reference), 64).unwrap();
    assert_eq!(report.images, 846);
    assert_eq!(report.top1_agreement, Some(1.0));
    assert!(report.max_abs_logit_diff.unwrap() <= 1e-3, "{report:?}");
}

/// `n` normalised images (`n * [3, 32, 32]`) from the test set.
fn normalised_batch(data: &LabelledImages, n: usize, mean: &[f32; 3], std: &[f32; 3]) -> Vec<f32> {
    let mut input = Vec::with_capacity(n * IMAGE_FLOATS);
    for image in data.pixels.chunks_exact(IMAGE_FLOATS).take(n) {
        normalize_chw(image, mean, std, &mut input);
    }
    input
}

/// Threading changes who computes what, never the arithmetic: for a given batch size, every
/// strategy and thread count gives bit-identical logits. Nor does the batch size, except in
/// choosing the wide layers' Winograd tiles: F(2x2, 3x3) for batches of 1 and 2, F(4x4, 3x3)
/// above; within each range every batch gives each image the same logits.
#[test]
fn threading_strategies_give_identical_logits() {
    let Some((weights, data, _)) = first_images(7) else {
        return;
    };
    let ckpt = Checkpoint::load(&weights).unwrap();
    let x = normalised_batch(&data, 7, &ckpt.metadata.mean, &ckpt.metadata.std);
    let mut alone = FastResNet::new(&ckpt.spec, &ckpt.tensors, SimdChoice::Auto, 1).unwrap();
    let sizes = [1, 2, 3, 7];
    let baselines: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| alone.logits(&x[..n * IMAGE_FLOATS], n).unwrap())
        .collect();
    assert_eq!(baselines[0], baselines[1][..10], "batches of 1 and 2");
    assert_eq!(baselines[2], baselines[3][..30], "batches of 3 and 7");
    assert_ne!(
        baselines[0],
        baselines[3][..10],
        "F(2x2, 3x3) below batch 3"
    );
    for threads in [2, 3] {
        for threading in [Threading::Auto, Threading::Images, Threading::Layers] {
            let options = FastOptions {
                threads,
                threading,
                ..FastOptions::default()
            };
            let mut net = FastResNet::with_options(&ckpt.spec, &ckpt.tensors, &options).unwrap();
            for (&n, baseline) in sizes.iter().zip(&baselines) {
                let got = net.logits(&x[..n * IMAGE_FLOATS], n).unwrap();
                assert_eq!(
                    &got, baseline,
                    "{threads} threads, {threading:?}, batch {n}"
                );
            }
        }
    }
}

/// A feed of fixed batches (the first `n` images each) that records every delivery.
struct BatchList {
    queued: Mutex<VecDeque<(u64, usize)>>,
    images: Vec<f32>,
    /// (batch, first image, logits) per delivery.
    delivered: Mutex<Vec<(u64, usize, Vec<f32>)>>,
    /// The first delivery panics (as a bug in the engine's thread would).
    panic_once: AtomicBool,
}

impl Feed for BatchList {
    fn next_batch(&self, pixels: &mut Vec<f32>) -> Option<FedBatch> {
        let (id, images) = self.queued.lock().unwrap().pop_front()?;
        pixels.extend_from_slice(&self.images[..images * IMAGE_FLOATS]);
        Some(FedBatch { id, images })
    }

    fn deliver(&self, batch: u64, first: usize, logits: &[f32]) {
        if self.panic_once.swap(false, Ordering::SeqCst) {
            panic!("injected panic");
        }
        self.delivered
            .lock()
            .unwrap()
            .push((batch, first, logits.to_vec()));
    }

    fn fail(&self, batch: u64, error: &EngineError) {
        panic!("batch {batch} failed: {error}");
    }
}

/// Serving a queue, the engine starts a batch on a thread done with its share of the previous
/// one; that changes when an image runs, never its logits: every image of every batch is
/// delivered once, bit-identical to a lone pass over its batch, whatever the thread count and
/// strategy, with batches smaller than, equal to and larger than the thread count in a row.
#[test]
fn serving_a_queue_gives_every_batch_the_logits_of_a_lone_pass() {
    let Some((weights, data, _)) = first_images(20) else {
        return;
    };
    let ckpt = Checkpoint::load(&weights).unwrap();
    let x = normalised_batch(&data, 20, &ckpt.metadata.mean, &ckpt.metadata.std);
    let mut alone = FastResNet::new(&ckpt.spec, &ckpt.tensors, SimdChoice::Auto, 1).unwrap();
    let sizes = [1, 7, 2, 9, 1, 20, 3, 16];
    let baselines: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| alone.logits(&x[..n * IMAGE_FLOATS], n).unwrap())
        .collect();
    let classes = baselines[0].len();
    for (threads, threading) in [
        (1, Threading::Auto),
        (2, Threading::Auto),
        (3, Threading::Auto),
        (2, Threading::Layers),
    ] {
        let options = FastOptions {
            threads,
            threading,
            ..FastOptions::default()
        };
        let mut net = FastResNet::with_options(&ckpt.spec, &ckpt.tensors, &options).unwrap();
        let feed = BatchList {
            queued: Mutex::new((0..).zip(sizes).collect()),
            images: x.clone(),
            delivered: Mutex::default(),
            panic_once: AtomicBool::new(false),
        };
        net.serve(&feed);
        assert!(feed.queued.lock().unwrap().is_empty());
        let mut got: Vec<Vec<Option<&[f32]>>> = sizes.iter().map(|&n| vec![None; n]).collect();
        let delivered = feed.delivered.lock().unwrap();
        for (batch, first, logits) in delivered.iter() {
            for (i, row) in logits.chunks_exact(classes).enumerate() {
                let slot = &mut got[*batch as usize][first + i];
                assert!(slot.is_none(), "batch {batch} image {} twice", first + i);
                *slot = Some(row);
            }
        }
        for ((batch, rows), baseline) in got.iter().enumerate().zip(&baselines) {
            for (i, row) in rows.iter().enumerate() {
                assert_eq!(
                    *row,
                    Some(&baseline[i * classes..(i + 1) * classes]),
                    "{threads} threads, {threading:?}, batch {batch} (of {}), image {i}",
                    sizes[batch]
                );
            }
        }
    }
}

/// A panic on one thread while serving reaches the caller, and the other threads stop taking
/// batches instead of serving the queue on without it. They stop once the panic unwinds, after
/// the panic hook (which may print a backtrace); without stopping, they would take all 20,000
/// batches, some 15 s of work.
#[test]
fn a_panic_while_serving_stops_every_thread() {
    let Some((weights, data, _)) = first_images(2) else {
        return;
    };
    let ckpt = Checkpoint::load(&weights).unwrap();
    let x = normalised_batch(&data, 2, &ckpt.metadata.mean, &ckpt.metadata.std);
    let mut net = FastResNet::new(&ckpt.spec, &ckpt.tensors, SimdChoice::Auto, 2).unwrap();
    let feed = BatchList {
        queued: Mutex::new((0..20_000).map(|id| (id, 2)).collect()),
        images: x,
        delivered: Mutex::default(),
        panic_once: AtomicBool::new(true),
    };
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| net.serve(&feed)));
    assert!(served.is_err());
    let left = feed.queued.lock().unwrap().len();
    assert!(left >= 10_000, "{left} batches left");
    // The engine still serves afterwards.
    feed.queued.lock().unwrap().truncate(3);
    net.serve(&feed);
    assert!(feed.queued.lock().unwrap().is_empty());
}

/// The seed tensors rewritten as a paper-style network: no convolution biases, no projection
/// shortcut tensors (so the zero-pad shortcut), batch norms and classifier kept.
fn zero_pad_no_bias_checkpoint(seed: &Path) -> Checkpoint {
    let bytes = std::fs::read(seed).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let is_conv_bias = |name: &str| {
        name.ends_with(".bias")
            && (name.starts_with("conv1") || name.contains(".conv1.") || name.contains(".conv2."))
    };
    let kept: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| !is_conv_bias(name) && !name.contains(".residual."))
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    let ckpt = Checkpoint::from_bytes(Path::new("zero-pad.safetensors"), &out).unwrap();
    assert_eq!(ckpt.spec.shortcut, Shortcut::ZeroPad);
    assert!(!ckpt.spec.conv_bias);
    ckpt
}

fn build(ckpt: &Checkpoint, engine: EngineChoice, simd: SimdChoice, threads: usize) -> Model {
    let copy = Checkpoint {
        spec: ckpt.spec,
        metadata: ckpt.metadata.clone(),
        tensors: ckpt.tensors.clone(),
        origin: ckpt.origin.clone(),
    };
    Model::from_checkpoint(copy, &options(Path::new("unused"), engine, simd, threads)).unwrap()
}

/// The zero-pad shortcut and bias-free folding, against the candle engine on the same inputs.
#[test]
fn zero_pad_network_without_bias_matches_the_candle_engine() {
    let Some((weights, data, _)) = first_images(19) else {
        return;
    };
    let ckpt = zero_pad_no_bias_checkpoint(&weights);
    let x = normalised_batch(&data, 19, &ckpt.metadata.mean, &ckpt.metadata.std);
    let want = build(&ckpt, EngineChoice::Candle, SimdChoice::Auto, 0)
        .logits(&x, 19)
        .unwrap();
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    for choice in LEVELS.into_iter().filter(|&c| supported(c)) {
        let level = choice.as_str();
        for threads in [1, 2] {
            let got = build(&ckpt, EngineChoice::Fast, choice, threads)
                .logits(&x, 19)
                .unwrap();
            let diff = got
                .iter()
                .zip(&want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!("zero-pad, no bias, {level}, {threads} threads: max diff {diff:.2e} (scale {scale:.2e})");
            assert!(diff <= 1e-3 * scale, "{level}: {diff} vs scale {scale}");
        }
    }
}

#[test]
fn engine_choice_on_the_cpu() {
    let Some(weights) = common::shared_file(SEED_WEIGHTS) else {
        return;
    };
    let candle = Model::load(&options(
        &weights,
        EngineChoice::Candle,
        SimdChoice::Auto,
        0,
    ))
    .unwrap();
    assert_eq!(candle.engine_name(), "candle");
    // The model worker owns the model on its own thread: the fast engine must allow that.
    fn sendable<T: Send>(_: &T) {}
    for choice in LEVELS {
        let level = choice.as_str();
        let result = Model::load(&options(&weights, EngineChoice::Fast, choice, 1));
        if supported(choice) {
            let model = result.unwrap();
            sendable(&model);
            assert_eq!(model.engine_name(), format!("fast-{level}"));
        } else {
            let err = result.unwrap_err();
            assert!(matches!(err, ModelError::Fast(_)), "{err:?}");
            assert!(err.to_string().contains("does not support"), "{err}");
            eprintln!("{level} is missing on this CPU; forcing it fails with: {err}");
        }
    }
}

#[test]
fn wrong_input_shapes_are_errors() {
    let Some(weights) = common::shared_file(SEED_WEIGHTS) else {
        return;
    };
    let ckpt = Checkpoint::load(&weights).unwrap();
    let mut net = FastResNet::new(&ckpt.spec, &ckpt.tensors, SimdChoice::Auto, 2).unwrap();
    // Two 16x16 images, two one-channel images, one image for two, one float too many.
    for (floats, n) in [
        (2 * 3 * 16 * 16, 2),
        (2 * 32 * 32, 2),
        (IMAGE_FLOATS, 2),
        (IMAGE_FLOATS + 1, 1),
    ] {
        let err = net.logits(&vec![0.0; floats], n).unwrap_err();
        assert!(
            matches!(err, EngineError::InputLength { .. }),
            "{floats} floats for {n}: {err}"
        );
    }
    assert_eq!(net.logits(&[], 0).unwrap(), Vec::<f32>::new());
}

#[test]
fn absurd_thread_counts_are_errors() {
    let Some(weights) = common::shared_file(SEED_WEIGHTS) else {
        return;
    };
    let err = Model::load(&options(
        &weights,
        EngineChoice::Fast,
        SimdChoice::Auto,
        100_000,
    ))
    .unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
}

#[test]
fn missing_or_misshapen_tensors_are_errors() {
    let Some(weights) = common::shared_file(SEED_WEIGHTS) else {
        return;
    };
    let ckpt = Checkpoint::load(&weights).unwrap();
    let mut tensors: HashMap<String, Tensor> = ckpt.tensors.clone();
    tensors.remove("block2.3.bn1.running_var");
    let err = FastResNet::new(&ckpt.spec, &tensors, SimdChoice::Auto, 1).unwrap_err();
    assert!(
        err.to_string().contains("block2.3.bn1.running_var"),
        "{err}"
    );
    let mut tensors = ckpt.tensors.clone();
    tensors.insert(
        "fc.weight".into(),
        Tensor::zeros((10, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let err = FastResNet::new(&ckpt.spec, &tensors, SimdChoice::Auto, 1).unwrap_err();
    assert!(err.to_string().contains("fc.weight"), "{err}");
}

/// CPU seconds this process has used (user + system), from /proc (Linux only).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Threading strategies and algorithms side by side, alternated: run with
/// `cargo test --release --test fast_engine -- --ignored --nocapture strategies`.
/// Prints images/s (wall) and images per CPU-second for each configuration.
#[test]
#[ignore = "a benchmark: run in release, by hand"]
fn strategies_benchmark() {
    let Some(weights) = common::shared_file(SEED_WEIGHTS) else {
        return;
    };
    let ckpt = Checkpoint::load(&weights).unwrap();
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let configs = [
        ("1 thread", 1, Threading::Auto, true),
        ("2 threads, auto", 2, Threading::Auto, true),
        ("2 threads, images", 2, Threading::Images, true),
        ("2 threads, layers", 2, Threading::Layers, true),
        ("2 threads, auto, direct only", 2, Threading::Auto, false),
        ("1 thread, direct only", 1, Threading::Auto, false),
    ];
    let mut nets: Vec<_> = configs
        .iter()
        .map(|&(_, threads, threading, winograd)| {
            let options = FastOptions {
                simd: SimdChoice::Auto,
                threads,
                threading,
                winograd,
            };
            FastResNet::with_options(&ckpt.spec, &ckpt.tensors, &options).unwrap()
        })
        .collect();
    for batch in [1usize, 64] {
        let x = Tensor::randn(0f32, 1.0, batch * IMAGE_FLOATS, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Whatever is timed must compute the same thing.
        let first = nets[0].logits(&x, batch).unwrap();
        for net in &mut nets[1..] {
            let other = net.logits(&x, batch).unwrap();
            let diff = first
                .iter()
                .zip(&other)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-3, "configurations disagree by {diff}");
        }
        let mut results = vec![Vec::new(); configs.len()];
        for _ in 0..rounds {
            for (k, net) in nets.iter_mut().enumerate() {
                net.logits(&x, batch).unwrap();
                let (wall, cpu) = (std::time::Instant::now(), process_cpu_seconds());
                let mut passes = 0;
                while passes == 0 || wall.elapsed().as_secs_f64() < seconds {
                    std::hint::black_box(net.logits(&x, batch).unwrap());
                    passes += 1;
                }
                let images = (passes * batch) as f64;
                let per_cpu = match (cpu, process_cpu_seconds()) {
                    (Some(a), Some(b)) if b > a => images / (b - a),
                    _ => f64::NAN,
                };
                results[k].push((images / wall.elapsed().as_secs_f64(), per_cpu));
            }
        }
        for (k, (name, ..)) in configs.iter().enumerate() {
            let walls: Vec<String> = results[k].iter().map(|r| format!("{:.0}", r.0)).collect();
            let cpus: Vec<String> = results[k].iter().map(|r| format!("{:.0}", r.1)).collect();
            eprintln!(
                "batch {batch:>2} {name:<30} img/s {:<24} img/CPU-s {}",
                walls.join(" "),
                cpus.join(" ")
            );
        }
    }
}
