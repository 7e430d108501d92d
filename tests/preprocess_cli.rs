//! `resnet-serve preprocess`: the tensors it writes are torchvision's, exactly, and files the
//! service refuses are reported as the API would answer them.

mod common;

use std::ffi::OsStr;
use std::path::PathBuf;

use candle_core::{DType, Device};

#[test]
fn preprocess_writes_torchvision_tensors_exactly() {
    let Some(dir) = common::shared_file("reference/preprocess") else {
        return;
    };
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let refs =
        candle_core::safetensors::load(dir.join("torchvision.safetensors"), &Device::Cpu).unwrap();
    let mut images: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name() != Some(OsStr::new("torchvision.safetensors")))
        .collect();
    images.sort();
    assert!(images.len() >= 12, "expected the reference images");
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("inputs.safetensors");
    let mut args: Vec<&OsStr> = vec!["preprocess".as_ref()];
    args.extend(images.iter().map(|p| p.as_os_str()));
    args.extend([
        "--weights".as_ref(),
        weights.as_os_str(),
        "--output".as_ref(),
        output.as_os_str(),
    ]);
    let (ok, stdout, stderr) = common::run_cli(&args);
    assert!(ok, "preprocess failed:\n{stdout}\n{stderr}");
    let got = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
    assert_eq!(got.len(), images.len(), "one tensor per image");
    for path in &images {
        let name = path.file_name().unwrap().to_str().unwrap();
        let tensor = &got[name];
        assert_eq!(tensor.dims(), &[3, 32, 32], "{name}");
        assert_eq!(tensor.dtype(), DType::F32, "{name}");
        let got: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = refs[&format!("{name}/seed_norm")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{name}: max |diff| {max}");
        assert_eq!(got, want, "{name}: max |diff| {max}");
    }
}

#[test]
fn preprocess_reports_refused_files_as_the_api_and_writes_nothing() {
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let fixture = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jpeg/ycc420-q75-45x29.jpg"),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.jpg");
    let cut = tmp.path().join("cut.jpg");
    let text = tmp.path().join("notes.txt");
    std::fs::write(&good, &fixture).unwrap();
    // Without its last 20 bytes: the end of the scan and the end marker (refused by Pillow
    // unless it loads truncated images, see tests/fixtures/jpeg/expected.json).
    std::fs::write(&cut, &fixture[..fixture.len() - 20]).unwrap();
    std::fs::write(&text, "not an image").unwrap();
    let output = tmp.path().join("out.safetensors");
    let run = |extra: &[&OsStr]| {
        let mut args: Vec<&OsStr> = vec![
            "preprocess".as_ref(),
            good.as_os_str(),
            cut.as_os_str(),
            "--weights".as_ref(),
            weights.as_os_str(),
            "--output".as_ref(),
            output.as_os_str(),
        ];
        args.extend_from_slice(extra);
        common::run_cli(&args)
    };

    let (ok, _, stderr) = run(&[text.as_os_str()]);
    assert!(!ok, "a refused file must fail the command");
    let line = |name: &str| {
        stderr
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no line for {name} in:\n{stderr}"))
            .to_string()
    };
    let cut_line = line("cut.jpg");
    assert!(
        cut_line.contains("422 invalid_image") && cut_line.contains("image file is truncated"),
        "{cut_line}"
    );
    assert!(
        line("notes.txt").contains("415 unsupported_media_type"),
        "{stderr}"
    );
    assert!(!stderr.contains("good.jpg:"), "{stderr}");
    assert!(!output.exists(), "nothing is written when a file fails");

    // As a pipeline with ImageFile.LOAD_TRUNCATED_IMAGES = True would, the cut file is kept.
    let (ok, stdout, stderr) = run(&["--load-truncated-images".as_ref()]);
    assert!(ok, "{stdout}\n{stderr}");
    let got = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    assert_eq!(names, ["cut.jpg", "good.jpg"]);
}
