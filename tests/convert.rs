//! `convert`: the public legacy checkpoint converts to weights that reproduce PyTorch's logits,
//! the zip and legacy containers give the same tensors, the seed notebook's `.pth` matches its
//! `save_file` twin, and broken inputs fail with a clear error instead of a panic.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::Path;

use resnet_serve::model::convert::{convert_bytes, ConvertError, ConvertOptions};
use resnet_serve::model::weights::{IMAGENET_MEAN, IMAGENET_STD, NOTEBOOK_MEAN, NOTEBOOK_STD};
use resnet_serve::model::Checkpoint;

use common::Tensors;

/// A safetensors file's tensors (name -> dtype, shape, bytes) and metadata.
fn read_safetensors(path: &Path) -> (Tensors, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    (
        common::tensors_of(&bytes),
        header.metadata().clone().unwrap_or_default(),
    )
}

fn convert_cli(args: &[&OsStr]) -> (bool, String) {
    let mut full: Vec<&OsStr> = vec![OsStr::new("convert")];
    full.extend_from_slice(args);
    let (ok, _, stderr) = common::run_cli(&full);
    (ok, stderr)
}

/// Runs `eval` on the paper reference and checks PyTorch parity.
fn assert_matches_pytorch_paper_logits(weights: &Path) {
    let Some(report) = common::eval_report(weights, "paper_logits", "candle") else {
        return;
    };
    common::assert_pretrained_parity(&report);
}

#[test]
fn legacy_checkpoint_converts_to_weights_matching_pytorch() {
    let Some(th) = common::shared_file("models/resnet56-4bfd9763.th") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let explicit = dir.path().join("explicit.safetensors");
    let (ok, stderr) = convert_cli(&[
        th.as_os_str(),
        explicit.as_os_str(),
        OsStr::new("--mean"),
        OsStr::new("0.485,0.456,0.406"),
        OsStr::new("--std"),
        OsStr::new("0.229,0.224,0.225"),
    ]);
    assert!(ok, "{stderr}");
    let ckpt = Checkpoint::load(&explicit).unwrap();
    assert_eq!(ckpt.spec.depth(), 56);
    assert!(!ckpt.spec.conv_bias);
    assert_eq!(ckpt.metadata.mean, IMAGENET_MEAN);
    assert_eq!(ckpt.metadata.std, IMAGENET_STD);
    assert_eq!(ckpt.metadata.name, "resnet56");
    assert_eq!(ckpt.metadata.labels[0], "airplane");
    assert_eq!(
        ckpt.metadata.source.as_deref(),
        Some("converted from resnet56-4bfd9763.th")
    );
    let (_, meta) = read_safetensors(&explicit);
    for key in ["mean", "std", "labels", "name", "source"] {
        assert!(meta.contains_key(key), "metadata {key} missing: {meta:?}");
    }

    // Without flags the paper-style checkpoint is detected: same file, and a warning saying so.
    let detected = dir.path().join("nested/dir/detected.safetensors");
    let (ok, stderr) = convert_cli(&[th.as_os_str(), detected.as_os_str()]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("paper-style") && stderr.contains("--preset notebook"),
        "{stderr}"
    );
    let (tensors, meta_detected) = read_safetensors(&detected);
    assert_eq!(
        meta_detected, meta,
        "detection stores what the explicit flags store"
    );
    assert!(
        tensors == read_safetensors(&explicit).0,
        "detection changed the tensors"
    );

    assert_matches_pytorch_paper_logits(&explicit);
}

#[test]
fn zip_and_legacy_containers_give_bitwise_identical_tensors() {
    let (Some(th), Some(zip)) = (
        common::shared_file("models/resnet56-4bfd9763.th"),
        common::shared_file("models/resnet56-4bfd9763-zip.pth"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let from_th = dir.path().join("th.safetensors");
    let from_zip = dir.path().join("zip.safetensors");
    for (input, output) in [(&th, &from_th), (&zip, &from_zip)] {
        let (ok, stderr) = convert_cli(&[input.as_os_str(), output.as_os_str()]);
        assert!(ok, "{stderr}");
    }
    let (a, mut meta_a) = read_safetensors(&from_th);
    let (b, mut meta_b) = read_safetensors(&from_zip);
    assert_eq!(a.len(), 1 + 4 + 27 * (2 + 8) + 2); // stem conv and bn, 27 blocks, fc
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, tensor) in &a {
        assert!(b[name] == *tensor, "{name} differs");
    }
    assert_eq!(
        meta_a.remove("source").unwrap(),
        "converted from resnet56-4bfd9763.th"
    );
    assert_eq!(
        meta_b.remove("source").unwrap(),
        "converted from resnet56-4bfd9763-zip.pth"
    );
    assert_eq!(meta_a, meta_b);
}

#[test]
fn seed_notebook_pth_matches_its_safetensors_twin() {
    let (Some(pth), Some(twin)) = (
        common::shared_file("models/resnet56-seed-random.pth"),
        common::shared_file("models/resnet56-seed-random.safetensors"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seed.safetensors");
    let (ok, stderr) = convert_cli(&[pth.as_os_str(), out.as_os_str()]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("paper-style"), "{stderr}");
    let (converted, _) = read_safetensors(&out);
    let (mut expected, _) = read_safetensors(&twin);
    let counters = expected.len();
    expected.retain(|name, _| !name.ends_with(".num_batches_tracked"));
    assert!(counters > expected.len(), "the twin has batch counters");
    assert_eq!(converted, expected);
    let ckpt = Checkpoint::load(&out).unwrap();
    assert_eq!(ckpt.metadata.mean, NOTEBOOK_MEAN);
    assert_eq!(ckpt.metadata.std, NOTEBOOK_STD);
}

#[test]
fn options_are_stored_and_checked() {
    let Some(th) = common::shared_file("models/resnet56-4bfd9763.th") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let labels = "a,b,c,d,e,f,g,h,i,j";
    let (ok, stderr) = convert_cli(&[
        th.as_os_str(),
        out.as_os_str(),
        OsStr::new("--preset"),
        OsStr::new("notebook"),
        OsStr::new("--labels"),
        OsStr::new(labels),
        OsStr::new("--name"),
        OsStr::new("my-net"),
    ]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("paper-style"), "{stderr}");
    let ckpt = Checkpoint::load(&out).unwrap();
    assert_eq!(ckpt.metadata.mean, NOTEBOOK_MEAN);
    assert_eq!(ckpt.metadata.name, "my-net");
    assert_eq!(ckpt.metadata.labels.join(","), labels);

    let refused = dir.path().join("refused.safetensors");
    for (args, expect) in [
        (vec!["--labels", "a,b,c"], "labels"),
        (vec!["--mean", "0.5,0.5,0.5"], "--std"),
        (
            vec!["--mean", "0.5,0.5", "--std", "0.2,0.2,0.2"],
            "--mean takes 3 values",
        ),
        (vec!["--mean", "0.5,0.5,0.5", "--std", "0.2,0,0.2"], "std"),
        (
            vec![
                "--preset",
                "imagenet",
                "--mean",
                "0.5,0.5,0.5",
                "--std",
                "0.2,0.2,0.2",
            ],
            "--preset",
        ),
        (vec!["--preset", "cifar"], "imagenet"),
    ] {
        let mut full = vec![th.as_os_str(), refused.as_os_str()];
        full.extend(args.iter().map(OsStr::new));
        let (ok, stderr) = convert_cli(&full);
        assert!(!ok, "{args:?} was accepted");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!refused.exists(), "{args:?} wrote a file");
    }
}

/// Rewrites a zip checkpoint with `data.pkl` passed through `edit` (entries stored uncompressed).
fn rewrite_zip(bytes: &[u8], edit: impl Fn(Vec<u8>) -> Vec<u8>) -> Vec<u8> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if name.ends_with("data.pkl") {
            data = edit(data);
        }
        out.start_file(name, options).unwrap();
        out.write_all(&data).unwrap();
    }
    out.finish().unwrap().into_inner()
}

fn replace_first(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

fn convert(bytes: &[u8]) -> Result<(), ConvertError> {
    convert_bytes(
        Path::new("input.pth"),
        bytes,
        &ConvertOptions::default(),
        Path::new("out.safetensors"),
    )
    .map(|_| ())
}

#[test]
fn checkpoints_that_are_not_state_dicts_are_explained() {
    let (Some(th), Some(zip)) = (
        common::shared_file("models/resnet56-4bfd9763.th"),
        common::shared_file("models/resnet56-4bfd9763-zip.pth"),
    ) else {
        return;
    };
    let th = std::fs::read(th).unwrap();
    let zip = std::fs::read(zip).unwrap();

    // Integer weights: every storage of the zip checkpoint relabelled int16.
    let ints = rewrite_zip(&zip, |pkl| {
        replace_first(&pkl, b"torch\nFloatStorage\n", b"torch\nShortStorage\n")
    });
    let err = convert(&ints).unwrap_err();
    assert!(
        matches!(&err, ConvertError::NonFloatTensor { name, dtype, .. }
            if name.starts_with("module.") && dtype == "int16"),
        "{err}"
    );

    // A dict without a state dict: the message lists what the dict holds.
    let renamed = replace_first(&th, b"state_dict", b"state_dixt");
    let err = convert(&renamed).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ConvertError::MissingStateDict { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("best_prec1") && msg.contains("state_dixt"),
        "{msg}"
    );

    // A strided (non-contiguous) tensor: conv1.weight's stride (27, 9, 3, 1) made (27, 9, 3, 2).
    let strided = replace_first(&th, b"K\x1bK\x09K\x03K\x01t", b"K\x1bK\x09K\x03K\x02t");
    let err = convert(&strided).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("module.conv1.weight") && msg.contains("non-contiguous"),
        "{msg}"
    );

    // A whole pickled model (torch.save(model)) in the legacy container.
    let mut module = th[..15].to_vec(); // magic number
    module.extend_from_slice(b"\x80\x02M\xe9\x03."); // protocol version 1001
    module.extend_from_slice(b"\x80\x02}."); // system info
    module.extend_from_slice(b"\x80\x02c__main__\nNet\nq\x00)\x81q\x01}q\x02b."); // Net()
    module.extend_from_slice(b"\x80\x02]."); // no storages
    let msg = convert(&module).unwrap_err().to_string();
    assert!(
        msg.contains("__main__.Net") && msg.contains("state_dict()"),
        "{msg}"
    );

    // Zip archives that are not torch.save output.
    let mut plain = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    plain
        .start_file("notes.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    plain.write_all(b"hello").unwrap();
    let plain = plain.finish().unwrap().into_inner();
    let err = convert(&plain).unwrap_err();
    assert!(matches!(err, ConvertError::NotACheckpoint { .. }), "{err}");
}

#[test]
fn every_truncation_and_random_corruption_fails_cleanly() {
    let (Some(th), Some(zip)) = (
        common::shared_file("models/resnet56-4bfd9763.th"),
        common::shared_file("models/resnet56-4bfd9763-zip.pth"),
    ) else {
        return;
    };
    for path in [th, zip] {
        let bytes = std::fs::read(&path).unwrap();
        // Prefixes: densely through the headers and pickles, sparsely through the tensor data.
        let cuts = (0..50_000)
            .step_by(23)
            .chain((50_000..bytes.len()).step_by(99_991));
        for cut in cuts.filter(|&c| c < bytes.len()) {
            let err = convert(&bytes[..cut]).expect_err("a truncated checkpoint converted");
            assert!(err.to_string().contains("input.pth"), "{cut}: {err}");
        }
        // Random byte changes in the first 48 KiB (headers and pickles): any outcome but a panic.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut failures = 0;
        for _ in 0..200 {
            let mut broken = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % 49_152) as usize;
                broken[at] = next() as u8;
            }
            failures += usize::from(convert(&broken).is_err());
        }
        assert!(
            failures > 0,
            "{}: no corruption was noticed",
            path.display()
        );
    }
}

#[test]
fn cli_refuses_broken_inputs_with_a_clear_message() {
    let (Some(th), Some(png), Some(st)) = (
        common::shared_file("models/resnet56-4bfd9763.th"),
        common::shared_file("data/images/0000-cat.png"),
        common::shared_file("models/resnet56-seed-random.safetensors"),
    ) else {
        return;
    };
    let bytes = std::fs::read(&th).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut corrupt_pickle = bytes.clone();
    corrupt_pickle[200..260].fill(0xff);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.th",
            bytes[..bytes.len() / 2].to_vec(),
            "truncated",
        ),
        ("cut-header.th", bytes[..100].to_vec(), "truncated"),
        ("corrupt.th", corrupt_pickle, "corrupt"),
        ("empty.pth", Vec::new(), "not a PyTorch checkpoint"),
        (
            "text.pth",
            b"hello, world\n".to_vec(),
            "not a PyTorch checkpoint",
        ),
        (
            "image.pth",
            std::fs::read(&png).unwrap(),
            "not a PyTorch checkpoint",
        ),
        ("weights.pth", std::fs::read(&st).unwrap(), "safetensors"),
    ];
    for (name, content, expect) in cases {
        let input = dir.path().join(name);
        std::fs::write(&input, content).unwrap();
        let output = dir.path().join(format!("{name}.safetensors"));
        let out = std::process::Command::new(common::binary())
            .args([OsStr::new("convert"), input.as_os_str(), output.as_os_str()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("error:") && stderr.contains(name) && stderr.contains(expect),
            "{name}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(!output.exists(), "{name}: an output was written");
    }
    let missing = dir.path().join("missing.pth");
    let (ok, stderr) = convert_cli(&[missing.as_os_str(), dir.path().join("x").as_os_str()]);
    assert!(!ok && stderr.contains("missing.pth"), "{stderr}");
}
