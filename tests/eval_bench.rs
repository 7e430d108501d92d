//! `eval` and `bench` through the binary: the JSON contract of DESIGN.md and logits parity with
//! PyTorch on the seed notebook's model (candle engine, the reference implementation).

mod common;

use std::ffi::OsStr;

#[test]
fn eval_seed_random_matches_pytorch_logits() {
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let Some(report) = common::eval_report(&weights, "seed_random_logits", "candle") else {
        return;
    };
    eprintln!("{report}");
    assert_eq!(report["images"], 846);
    assert_eq!(report["engine"], "candle");
    assert_eq!(report["top1_agreement"].as_f64(), Some(1.0));
    let diff = report["max_abs_logit_diff"].as_f64().unwrap();
    assert!(diff <= 1e-3, "max |logit diff| {diff}");
    assert!(report["accuracy"].as_f64().is_some());
}

#[test]
fn bench_prints_one_json_line_per_batch_size() {
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let (ok, stdout, stderr) = common::run_cli(&[
        OsStr::new("bench"),
        OsStr::new("--weights"),
        weights.as_os_str(),
        OsStr::new("--batch-sizes"),
        OsStr::new("1,3"),
        OsStr::new("--seconds"),
        OsStr::new("0.2"),
        OsStr::new("--device"),
        OsStr::new("cpu"),
        OsStr::new("--json"),
    ]);
    assert!(ok, "bench failed: {stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, batch) in lines.iter().zip([1, 3]) {
        assert_eq!(line["batch_size"], batch);
        let ips = line["images_per_second"].as_f64().unwrap();
        let ms = line["ms_per_batch"].as_f64().unwrap();
        assert!(ips > 0.0 && ms > 0.0, "{line}");
    }
}

#[test]
fn bench_refuses_a_zero_batch_size() {
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let (ok, _, stderr) = common::run_cli(&[
        OsStr::new("bench"),
        OsStr::new("--weights"),
        weights.as_os_str(),
        OsStr::new("--batch-sizes"),
        OsStr::new("0"),
        OsStr::new("--device"),
        OsStr::new("cpu"),
    ]);
    assert!(!ok);
    assert!(stderr.contains("batch sizes must be >= 1"), "{stderr}");
}
