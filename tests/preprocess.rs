//! Preprocessing parity with torchvision: every file in `reference/preprocess/` against the
//! tensor `Resize(32), CenterCrop(32), ToTensor(), Normalize(...)` produced on the PIL image
//! (see `tools/make_references.py` in the shared data for the exact PyTorch code), and the
//! decoder fixtures (`tests/fixtures/`) against what Pillow makes of them.

mod common;
mod jpeg_cases;

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
            // Contract: lossless within 0.02 (one 8-bit level), JPEG within 0.1. Decoding is
            // Pillow's (libjpeg-turbo for JPEG) and the resampler reproduces Pillow's integer
            // arithmetic, so every format is held to exact equality instead.
            if got != want {
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
/// animated GIF (first frame), a 16-bit RGB PNG, each exactly as PIL decodes it. Fixtures and
/// PIL's output for them are made by `tests/fixtures/make_fixtures.py`.
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
        let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name}: {differing} bytes differ from PIL's");
    }
}

/// Every JPEG case of `tests/fixtures/jpeg/` (every sampling, progressive, restart markers,
/// optimised Huffman, gray, CMYK, RGB, odd and 1-pixel sizes; cut at many points; damaged) as
/// Pillow opens it, with `LOAD_TRUNCATED_IMAGES` off and on: the same refusal, or the same RGB
/// bytes and the same 32x32 model input. With `RESNET_JPEG_CORPUS=DIR`, also the random corpus
/// `make_fixtures.py --corpus DIR` wrote.
#[test]
fn jpeg_cases_match_pillow() {
    let mut dirs = vec![jpeg_cases::fixture_dir()];
    if let Some(corpus) = std::env::var_os("RESNET_JPEG_CORPUS") {
        dirs.push(corpus.into());
    }
    for dir in dirs {
        let cases = jpeg_cases::load(&dir);
        let mut failures = Vec::new();
        let (mut opened, mut refused) = (0, 0);
        for case in &cases {
            for (load_truncated, want) in [(false, &case.strict), (true, &case.load_truncated)] {
                match want {
                    jpeg_cases::Expected::Opens { .. } => opened += 1,
                    jpeg_cases::Expected::Refused(_) => refused += 1,
                }
                if let Err(e) = jpeg_cases::check(case, load_truncated, want) {
                    failures.push(format!(
                        "{} (load_truncated={load_truncated}): {e}",
                        case.name
                    ));
                }
            }
        }
        eprintln!(
            "{}: {} cases, {opened} decodes and {refused} refusals checked against Pillow",
            dir.display(),
            cases.len()
        );
        assert!(cases.len() >= 20, "too few cases in {}", dir.display());
        assert!(
            failures.is_empty(),
            "differences from Pillow: {failures:#?}"
        );
    }
}
