//! Weights files: the seed notebook's plain `save_file(state_dict)` loads and matches PyTorch;
//! malformed files fail with an error naming the tensor and the expected shape.

mod common;

use std::collections::HashMap;
use std::path::Path;

use resnet_serve::model::{Checkpoint, Shortcut, WeightsError};
use safetensors::tensor::TensorView;

/// The seed-random file's tensors as (name, dtype, shape, bytes), to rewrite into broken variants.
fn seed_tensors(path: &Path) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_safetensors(
    tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    metadata: Option<HashMap<String, String>>,
) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, metadata).unwrap()
}

fn load_bytes(bytes: &[u8]) -> Result<Checkpoint, WeightsError> {
    Checkpoint::from_bytes(Path::new("test.safetensors"), bytes)
}

#[test]
fn seed_notebook_state_dict_loads_as_is() {
    let Some(path) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let ckpt = Checkpoint::load(&path).unwrap();
    assert_eq!(ckpt.spec.depth(), 56);
    assert_eq!(ckpt.spec.shortcut, Shortcut::Projection);
    assert!(ckpt.spec.conv_bias);
    assert_eq!(ckpt.spec.num_classes, 10);
    assert_eq!(ckpt.metadata.name, "resnet56");
    assert_eq!(ckpt.metadata.mean, [0.491, 0.482, 0.447]);
    assert_eq!(ckpt.metadata.labels[3], "cat");
}

#[test]
fn metadata_overrides_defaults() {
    let Some(path) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let tensors = seed_tensors(&path);
    let meta = HashMap::from([
        ("mean".to_string(), "[0.5, 0.5, 0.5]".to_string()),
        ("std".to_string(), "[0.25, 0.25, 0.25]".to_string()),
        ("name".to_string(), "my-net".to_string()),
        (
            "labels".to_string(),
            serde_json::to_string(&(0..10).map(|i| format!("l{i}")).collect::<Vec<_>>()).unwrap(),
        ),
    ]);
    let ckpt = load_bytes(&write_safetensors(&tensors, Some(meta))).unwrap();
    assert_eq!(ckpt.metadata.name, "my-net");
    assert_eq!(ckpt.metadata.mean, [0.5; 3]);
    assert_eq!(ckpt.metadata.std, [0.25; 3]);
    assert_eq!(ckpt.metadata.labels[9], "l9");
}

#[test]
fn bad_metadata_is_refused_by_key() {
    let Some(path) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let tensors = seed_tensors(&path);
    for (key, value) in [
        ("std", "[0.2, 0.0, 0.2]"),
        ("mean", "[1, 2]"),
        ("labels", "[\"a\", \"b\"]"),
        ("mean", "oops"),
    ] {
        let meta = HashMap::from([(key.to_string(), value.to_string())]);
        let err = load_bytes(&write_safetensors(&tensors, Some(meta))).unwrap_err();
        assert!(
            matches!(&err, WeightsError::Metadata { key: k, .. } if k == key),
            "{key}={value}: {err}"
        );
    }
}

#[test]
fn wrong_shape_names_the_tensor_and_expected_shape() {
    let Some(path) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let mut tensors = seed_tensors(&path);
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == "block2.3.conv1.weight")
        .unwrap();
    t.2 = vec![32, 32, 9]; // same byte count, wrong shape
    let err = load_bytes(&write_safetensors(&tensors, None)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightsError::WrongShape { .. }), "{msg}");
    assert!(
        msg.contains("block2.3.conv1.weight") && msg.contains("[32, 32, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_names_the_tensor_and_expected_shape() {
    let Some(path) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let mut tensors = seed_tensors(&path);
    tensors.retain(|t| t.0 != "block3.8.bn2.running_var");
    let msg = load_bytes(&write_safetensors(&tensors, None))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("block3.8.bn2.running_var") && msg.contains("[64]"),
        "{msg}"
    );
}

#[test]
fn mixed_schemes_are_refused() {
    let Some(path) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let mut tensors = seed_tensors(&path);
    // A conv bias in one block only: mixes the with-bias and without-bias schemes.
    tensors.retain(|t| t.0 != "block1.4.conv2.bias");
    let msg = load_bytes(&write_safetensors(&tensors, None))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("block1.4.conv2.bias"), "{msg}");
    // Projection shortcut in block2 but not block3.
    let mut tensors = seed_tensors(&path);
    tensors.retain(|t| !t.0.starts_with("block3.0.residual"));
    let msg = load_bytes(&write_safetensors(&tensors, None))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("block3.0.residual.0.weight"), "{msg}");
    // A stray tensor from another naming scheme.
    let mut tensors = seed_tensors(&path);
    let extra = tensors.iter().find(|t| t.0 == "fc.bias").unwrap().clone();
    tensors.push(("linear.bias".into(), extra.1, extra.2, extra.3));
    let msg = load_bytes(&write_safetensors(&tensors, None))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("linear") && msg.contains("convert"), "{msg}");
}

#[test]
fn truncated_and_corrupt_files_are_refused() {
    let Some(path) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    for (what, broken) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("header only", bytes[..8].to_vec()),
        ("empty", Vec::new()),
        ("garbage header", {
            let mut b = bytes.clone();
            b[8..40].fill(b'#');
            b
        }),
        ("huge header length", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
    ] {
        let err = load_bytes(&broken).unwrap_err();
        assert!(matches!(err, WeightsError::Format { .. }), "{what}: {err}");
    }
}

#[test]
fn cli_reports_broken_weights_with_nonzero_exit() {
    let Some(path) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let Some(data) = common::shared_file("data/cifar10-test-846.safetensors") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let mut tensors = seed_tensors(&path);
    tensors.iter_mut().find(|t| t.0 == "fc.weight").unwrap().2 = vec![64, 10];
    let wrong_shape = dir.path().join("wrong-shape.safetensors");
    std::fs::write(&wrong_shape, write_safetensors(&tensors, None)).unwrap();
    let pth = common::shared_file("models/resnet56-seed-random.pth").unwrap();
    for (weights, expect) in [
        (truncated.as_path(), "not a valid safetensors file"),
        (
            wrong_shape.as_path(),
            "fc.weight has shape [64, 10], expected [classes, 64]",
        ),
        (pth.as_path(), "not a valid safetensors file"),
        (
            Path::new("/nonexistent/w.safetensors"),
            "cannot read weights file",
        ),
    ] {
        let (ok, _, stderr) = common::run_cli(&[
            "eval".as_ref(),
            "--weights".as_ref(),
            weights.as_os_str(),
            "--data".as_ref(),
            data.as_os_str(),
            "--device".as_ref(),
            "cpu".as_ref(),
        ]);
        assert!(!ok, "{} should fail", weights.display());
        assert!(stderr.contains(expect), "{}: {stderr}", weights.display());
    }
}

#[test]
fn other_depths_and_class_counts_load_and_run() {
    use resnet_serve::model::{
        DeviceChoice, Engine, EngineChoice, LoadOptions, Model, SimdChoice, IMAGE_FLOATS,
    };
    let Some(path) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    // ResNet20 with 100 classes: the first 3 blocks of each stage and a wider classifier.
    let mut tensors = seed_tensors(&path);
    tensors.retain(|t| {
        let block = t.0.split('.').nth(1).and_then(|i| i.parse::<usize>().ok());
        !t.0.starts_with("block") || block.is_some_and(|i| i < 3)
    });
    for t in tensors.iter_mut().filter(|t| t.0.starts_with("fc.")) {
        t.2[0] = 100;
        t.3 = t.3.iter().cycle().take(t.3.len() * 10).copied().collect();
    }
    let ckpt = load_bytes(&write_safetensors(&tensors, None)).unwrap();
    assert_eq!((ckpt.spec.depth(), ckpt.spec.num_classes), (20, 100));
    assert_eq!(ckpt.metadata.labels[99], "class_99");
    let options = LoadOptions {
        weights: Some(path.clone()),
        device: DeviceChoice::Cpu,
        engine: EngineChoice::Candle,
        simd: SimdChoice::Auto,
        threads: 1,
        ..LoadOptions::default()
    };
    let mut model = Model::from_checkpoint(ckpt, &options).unwrap();
    let logits = model.logits(&vec![0.1; 2 * IMAGE_FLOATS], 2).unwrap();
    assert_eq!(logits.len(), 200);
    assert!(logits.iter().all(|v| v.is_finite()));
    // Deleting a block from one stage only is a depth mismatch, named as such.
    tensors.retain(|t| !t.0.starts_with("block2.2."));
    let msg = load_bytes(&write_safetensors(&tensors, None))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("block2 has 2"), "{msg}");
}
