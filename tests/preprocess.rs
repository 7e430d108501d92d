//! Preprocessing parity with torchvision: every file in `reference/preprocess/` against the
//! tensor `Resize(32), CenterCrop(32), ToTensor(), Normalize(...)` produced on the PIL image
//! (see `tools/make_references.py` in the shared data for the exact PyTorch code).

mod common;

use candle_core::Device;
use resnet_serve::model::weights::{IMAGENET_MEAN, IMAGENET_STD, NOTEBOOK_MEAN, NOTEBOOK_STD};
use resnet_serve::preprocess::preprocess;

#[test]
fn every_reference_image_matches_torchvision() {
    let Some(dir) = common::shared_file("reference/preprocess") else {
        return;
    };
    let refs =
        candle_core::safetensors::load(dir.join("torchvision.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "torchvision.safetensors")
        .collect();
    names.sort();
    assert!(
        names.len() >= 12,
        "expected the reference images, found {names:?}"
    );
    let mut failures = Vec::new();
    for name in &names {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let lossy = name.ends_with(".jpg") || name.ends_with(".jpeg");
        for (tag, mean, std) in [
            ("seed_norm", NOTEBOOK_MEAN, NOTEBOOK_STD),
            ("paper_norm", IMAGENET_MEAN, IMAGENET_STD),
        ] {
            let want: Vec<f32> = refs[&format!("{name}/{tag}")]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got =
                preprocess(&bytes, &mean, &std, 1 << 30).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.len(), want.len(), "{name}");
            let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
            let max = diffs.iter().cloned().fold(0.0, f32::max);
            let mean_diff = diffs.iter().sum::<f32>() / diffs.len() as f32;
            eprintln!("{name} {tag}: max |diff| {max:.5}, mean |diff| {mean_diff:.6}");
            // Contract: lossless within 0.02 (one 8-bit level). The resampler reproduces Pillow's
            // integer arithmetic, so lossless inputs are held to exact equality instead.
            let ok = if lossy {
                mean_diff <= 0.01 && max <= 0.1
            } else {
                max <= 1e-6
            };
            if !ok {
                failures.push(format!("{name} {tag}: max {max}, mean {mean_diff}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "outside torchvision tolerance: {failures:#?}"
    );
}

/// Decoder coverage beyond the shared references: CMYK and progressive grayscale JPEG, an
/// animated GIF (first frame), a 16-bit RGB PNG. Fixtures and PIL's output for them are made by
/// `tests/fixtures/make_fixtures.py`.
#[test]
fn decoder_fixtures_match_pil() {
    use resnet_serve::preprocess::{decode_rgb8, resize_shorter_and_center_crop};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in [
        "cmyk-40x24.jpg",
        "gray-progressive-50x30.jpg",
        "animated-36x36.gif",
        "rgb16-33x45.png",
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let want = std::fs::read(dir.join(format!("{name}.expected.rgb"))).unwrap();
        let image = decode_rgb8(&bytes, 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = resize_shorter_and_center_crop(&image, 32).pixels;
        assert_eq!(got.len(), want.len(), "{name}");
        // Compare in normalised units with the smallest std in use, as the contract's tolerances are.
        let scale = 1.0 / 255.0 / IMAGENET_STD[2];
        let diffs: Vec<f32> = got
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as f32 - b as f32).abs() * scale)
            .collect();
        let max = diffs.iter().cloned().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        eprintln!("{name}: max |diff| {max:.5}, mean |diff| {mean:.6}");
        if name.ends_with(".jpg") {
            assert!(mean <= 0.01 && max <= 0.1, "{name}: max {max}, mean {mean}");
        } else {
            assert_eq!(got, want, "{name}: lossless input must match PIL exactly");
        }
    }
}
