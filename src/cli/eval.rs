//! `eval`: top-1 accuracy on a labelled image set and agreement with reference logits.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::cli::args::EvalArgs;
use crate::model::{Engine, LoadOptions, Model, IMAGE_FLOATS, INPUT_CHANNELS, INPUT_SIZE};
use crate::preprocess::normalize_chw;

/// What `eval --json` prints.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub engine: String,
    pub device: String,
    pub images: usize,
    pub accuracy: f64,
    /// Share of images whose argmax equals the reference's (null without --reference).
    pub top1_agreement: Option<f64>,
    /// Largest |logit - reference| over all images and classes (null without --reference).
    pub max_abs_logit_diff: Option<f64>,
    pub seconds: f64,
}

/// A labelled image set: `images` u8 `[N,3,32,32]` and `labels` `[N]`.
pub struct LabelledImages {
    pub pixels: Vec<u8>,
    pub labels: Vec<i64>,
}

impl LabelledImages {
    pub fn load(path: &Path) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        let images = tensors
            .get("images")
            .with_context(|| format!("{}: no `images` tensor", path.display()))?;
        let labels = tensors
            .get("labels")
            .with_context(|| format!("{}: no `labels` tensor", path.display()))?;
        let (n, c, h, w) = images.dims4().context("`images` must be [N,3,32,32]")?;
        if (c, h, w) != (INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE) || images.dtype() != DType::U8 {
            bail!(
                "`images` must be u8 [N,3,32,32], got {:?} {:?}",
                images.dtype(),
                images.dims()
            );
        }
        let labels = labels
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        if labels.len() != n {
            bail!("{n} images but {} labels", labels.len());
        }
        Ok(Self {
            pixels: images.flatten_all()?.to_vec1::<u8>()?,
            labels,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// Runs the model over the data set and compares with the reference, if any.
pub fn evaluate(
    model: &mut Model,
    data: &LabelledImages,
    reference: Option<&[f32]>,
    batch_size: usize,
) -> Result<EvalReport> {
    let classes = model.spec.num_classes;
    let n = data.len();
    if let Some(r) = reference {
        if r.len() != n * classes {
            bail!("reference has {} values, expected {n} x {classes}", r.len());
        }
    }
    let started = std::time::Instant::now();
    let mut logits = Vec::with_capacity(n * classes);
    let mut input = Vec::with_capacity(batch_size.max(1) * IMAGE_FLOATS);
    let (mean, std) = (model.metadata.mean, model.metadata.std);
    for chunk in data.pixels.chunks(batch_size.max(1) * IMAGE_FLOATS) {
        input.clear();
        for image in chunk.chunks_exact(IMAGE_FLOATS) {
            normalize_chw(image, &mean, &std, &mut input);
        }
        logits.extend(model.logits(&input, chunk.len() / IMAGE_FLOATS)?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let rows = || logits.chunks_exact(classes);
    let correct = rows()
        .zip(&data.labels)
        .filter(|(row, &label)| argmax(row) as i64 == label)
        .count();
    let (mut agreement, mut max_diff) = (None, None);
    if let Some(reference) = reference {
        let agree = rows()
            .zip(reference.chunks_exact(classes))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        agreement = Some(agree as f64 / n as f64);
        max_diff = Some(
            logits
                .iter()
                .zip(reference)
                .map(|(a, b)| (a - b).abs() as f64)
                .fold(0.0, f64::max),
        );
    }
    Ok(EvalReport {
        model: model.metadata.name.clone(),
        engine: model.engine_name().to_string(),
        device: crate::model::device_name(model.device()),
        images: n,
        accuracy: correct as f64 / n.max(1) as f64,
        top1_agreement: agreement,
        max_abs_logit_diff: max_diff,
        seconds,
    })
}

/// Reads `[N, classes]` reference logits named `key` from a safetensors file.
pub fn load_reference(path: &Path, key: &str) -> Result<Vec<f32>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let t: &Tensor = tensors.get(key).with_context(|| {
        let mut keys: Vec<_> = tensors.keys().collect();
        keys.sort();
        format!("{}: no tensor {key:?} (it has {keys:?})", path.display())
    })?;
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// The `eval` subcommand.
pub fn run(args: &EvalArgs) -> Result<()> {
    let mut model = Model::load(&LoadOptions::from(&args.model))?;
    let data = LabelledImages::load(&args.data)?;
    let reference = args
        .reference
        .as_deref()
        .map(|p| load_reference(p, &args.reference_key))
        .transpose()?;
    let report = evaluate(&mut model, &data, reference.as_deref(), args.batch_size)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} ({} on {}): {} images, top-1 accuracy {:.4}",
            report.model, report.engine, report.device, report.images, report.accuracy
        );
        if let (Some(a), Some(d)) = (report.top1_agreement, report.max_abs_logit_diff) {
            println!("vs reference: top-1 agreement {a:.4}, max |logit diff| {d:.3e}");
        }
    }
    Ok(())
}
