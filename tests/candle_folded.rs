//! The candle engine with batch norm folded into the convolutions (what runs on CUDA), on the
//! CPU against PyTorch's logits for both shared models.

mod common;

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use resnet_serve::cli::eval::{load_reference, LabelledImages};
use resnet_serve::model::candle::{BatchNormMode, CandleResNet};
use resnet_serve::model::convert::{convert_bytes, ConvertOptions};
use resnet_serve::model::{Checkpoint, IMAGE_FLOATS, INPUT_CHANNELS, INPUT_SIZE};
use resnet_serve::preprocess::normalize_chw;

const BATCH: usize = 128;

/// Logits of `net` for every image of `data`, normalised with `checkpoint`'s mean and std.
fn logits(net: &CandleResNet, checkpoint: &Checkpoint, data: &LabelledImages) -> Vec<f32> {
    let (mean, std) = (&checkpoint.metadata.mean, &checkpoint.metadata.std);
    let mut out = Vec::new();
    let mut input = Vec::new();
    for chunk in data.pixels.chunks(BATCH * IMAGE_FLOATS) {
        input.clear();
        for image in chunk.chunks_exact(IMAGE_FLOATS) {
            normalize_chw(image, mean, std, &mut input);
        }
        let n = chunk.len() / IMAGE_FLOATS;
        let x = Tensor::from_slice(
            &input,
            (n, INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE),
            &Device::Cpu,
        )
        .unwrap();
        out.extend(
            net.forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    out
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

/// (accuracy, top-1 agreement with the reference, max |logit diff|).
fn compare(logits: &[f32], reference: &[f32], labels: &[i64]) -> (f64, f64, f32) {
    assert_eq!(logits.len(), reference.len());
    let classes = reference.len() / labels.len();
    let rows = || {
        logits
            .chunks_exact(classes)
            .zip(reference.chunks_exact(classes))
    };
    let n = labels.len() as f64;
    let correct = rows()
        .zip(labels)
        .filter(|((row, _), &label)| argmax(row) as i64 == label)
        .count();
    let agree = rows().filter(|(a, b)| argmax(a) == argmax(b)).count();
    let max_diff = logits
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    (correct as f64 / n, agree as f64 / n, max_diff)
}

/// The folded network of `checkpoint` against PyTorch's `reference_key` logits on the 846 shared
/// images: top-1 agreement 1.0 and |logit diff| <= 1e-3. Returns the accuracy. (The unfolded
/// network, `--engine candle` on the CPU, is held to the same in eval_bench.rs and convert.rs.)
fn check_folded(name: &str, checkpoint: &Checkpoint, reference_key: &str) -> Option<f64> {
    let data =
        LabelledImages::load(&common::shared_file("data/cifar10-test-846.safetensors")?).unwrap();
    let reference = load_reference(
        &common::shared_file("reference/logits.safetensors")?,
        reference_key,
    )
    .unwrap();
    let net = CandleResNet::from_tensors(
        &checkpoint.spec,
        &checkpoint.tensors,
        &Device::Cpu,
        BatchNormMode::Folded,
    )
    .unwrap();
    assert_eq!(net.batch_norm_mode(), BatchNormMode::Folded);
    let (accuracy, agreement, max_diff) =
        compare(&logits(&net, checkpoint, &data), &reference, &data.labels);
    eprintln!(
        "{name} folded: accuracy {accuracy:.4}, agreement {agreement}, max diff {max_diff:.2e}"
    );
    assert_eq!(agreement, 1.0, "{name}");
    assert!(max_diff <= 1e-3, "{name}: max |logit diff| {max_diff}");
    Some(accuracy)
}

/// The seed notebook's model: projection shortcuts, convolutions with a bias.
#[test]
fn folded_seed_random_model_matches_pytorch() {
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let checkpoint = Checkpoint::load(&weights).unwrap();
    check_folded("seed-random", &checkpoint, "seed_random_logits");
}

/// The public pretrained checkpoint: zero-pad shortcuts, no conv bias; PyTorch's 93.26%.
#[test]
fn folded_pretrained_model_matches_pytorch() {
    let Some(th) = common::shared_file("models/resnet56-4bfd9763.th") else {
        return;
    };
    let bytes = std::fs::read(&th).unwrap();
    let converted = convert_bytes(
        &th,
        &bytes,
        &ConvertOptions::default(),
        Path::new("pretrained.safetensors"),
    )
    .unwrap();
    let checkpoint = Checkpoint::from_bytes(&th, &converted.bytes).unwrap();
    let Some(accuracy) = check_folded("pretrained", &checkpoint, "paper_logits") else {
        return;
    };
    assert!(accuracy >= 0.932, "folded accuracy {accuracy}");
}
