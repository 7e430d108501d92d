//! The pretrained ResNet56 compiled into the binary: bitwise the tensors `convert --preset
//! imagenet` makes from the public `.th` checkpoint, with its licence in the metadata, and what
//! `eval` and `bench` run when no `--weights` is given (in a directory with no weights file).

mod common;

use std::ffi::OsStr;
use std::process::Command;

/// The binary in an empty working directory, with no `RESNET_*` settings leaking in.
fn in_empty_dir(dir: &std::path::Path) -> Command {
    let mut command = common::command_without_resnet_env(&common::binary());
    command.current_dir(dir);
    command
}

#[test]
fn embedded_tensors_are_what_convert_makes_from_the_public_checkpoint() {
    let Some(th) = common::shared_file("models/resnet56-4bfd9763.th") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let converted = dir.path().join("converted.safetensors");
    let (ok, _, stderr) = common::run_cli(&[
        OsStr::new("convert"),
        th.as_os_str(),
        converted.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("imagenet"),
    ]);
    assert!(ok, "{stderr}");
    let embedded = common::embedded_tensors();
    common::assert_bitwise_equal(
        "embedded vs convert --preset imagenet",
        &embedded,
        &common::tensors_of(&std::fs::read(&converted).unwrap()),
    );
}

#[test]
fn embedded_metadata_carries_normalisation_and_licence() {
    let bytes = resnet_serve::model::embedded::bytes().expect("built with embedded-weights");
    let ckpt = resnet_serve::model::Checkpoint::from_bytes("embedded".as_ref(), bytes).unwrap();
    assert_eq!(ckpt.spec.depth(), 56);
    assert_eq!(ckpt.metadata.name, "resnet56");
    assert_eq!(
        ckpt.metadata.mean,
        resnet_serve::model::weights::IMAGENET_MEAN
    );
    assert_eq!(
        ckpt.metadata.std,
        resnet_serve::model::weights::IMAGENET_STD
    );
    let source = ckpt.metadata.source.unwrap_or_default();
    for needle in ["resnet56-4bfd9763.th", "Yerlan Idelbayev", "BSD-2-Clause"] {
        assert!(source.contains(needle), "{needle:?} not in {source:?}");
    }
    let licence = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("weights/LICENSE-resnet56-4bfd9763.txt");
    let licence = std::fs::read_to_string(licence).unwrap();
    assert!(licence.contains("Copyright (c) 2018, Yerlan Idelbayev"));
}

#[test]
fn eval_and_bench_without_weights_use_the_embedded_model() {
    let (Some(data), Some(reference)) = (
        common::shared_file("data/cifar10-test-846.safetensors"),
        common::shared_file("reference/logits.safetensors"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = in_empty_dir(dir.path())
        .args([
            "eval",
            "--json",
            "--device",
            "cpu",
            "--reference-key",
            "paper_logits",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--reference")
        .arg(&reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    common::assert_pretrained_parity(&report);

    let out = in_empty_dir(dir.path())
        .args(["bench", "--batch-sizes", "2", "--seconds", "0.05"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["batch_size"], 2, "{line}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing written"
    );
}
