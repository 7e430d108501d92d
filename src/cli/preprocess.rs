//! `preprocess`: the exact model input for image files, written as safetensors so it can be
//! compared with a training pipeline's tensors. Same code path as the service.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};

use crate::cli::args::PreprocessArgs;
use crate::http::error::ApiError;
use crate::model::weights::{Checkpoint, WeightsSource};
use crate::model::{INPUT_CHANNELS, INPUT_SIZE};
use crate::preprocess::{preprocess_with, DecodeOptions};

/// Preprocesses every image of `args` with the normalisation stored in the weights (`--weights`,
/// or the default ones as `serve` picks them) and writes
/// one float32 `[3, 32, 32]` tensor per image, named by its file name. Each file that fails is
/// reported with the status, code and message the API would answer; then nothing is written
/// and an error is returned.
pub fn run(args: &PreprocessArgs) -> Result<()> {
    let source = WeightsSource::resolve(args.weights.as_deref())?;
    let checkpoint = Checkpoint::load_source(&source)
        .with_context(|| format!("reading the normalisation from {source:?}"))?;
    let weights = match &checkpoint.origin.path {
        Some(path) => path.clone(),
        None => checkpoint.origin.kind.clone(),
    };
    let (mean, std) = (checkpoint.metadata.mean, checkpoint.metadata.std);
    let options = DecodeOptions {
        max_pixels: args.max_image_pixels,
        load_truncated: args.load_truncated_images,
    };
    let mut tensors: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut names = HashSet::new();
    let mut failed = 0usize;
    for path in &args.images {
        match preprocess_file(path, &mean, &std, &options, &mut names) {
            Ok((name, floats)) => {
                tensors.insert(name, floats.iter().flat_map(|v| v.to_le_bytes()).collect());
            }
            Err(message) => {
                eprintln!("{}: {message}", path.display());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} images could not be preprocessed; {} was not written",
            args.images.len(),
            args.output.display()
        );
    }
    let shape = vec![INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE];
    let views = tensors
        .iter()
        .map(|(name, bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let metadata = HashMap::from([
        ("mean".to_string(), format!("{mean:?}")),
        ("std".to_string(), format!("{std:?}")),
        ("weights".to_string(), weights),
        (
            "weights_sha256".to_string(),
            checkpoint.origin.sha256.clone(),
        ),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata))?;
    crate::model::convert::write_atomic(&args.output, &bytes)?;
    println!(
        "wrote {} tensors (float32 [3, 32, 32], mean {mean:?}, std {std:?}) to {}",
        tensors.len(),
        args.output.display()
    );
    Ok(())
}

/// One file: its tensor name and floats, or the line that reports why not.
fn preprocess_file(
    path: &Path,
    mean: &[f32; 3],
    std: &[f32; 3],
    options: &DecodeOptions,
    names: &mut HashSet<String>,
) -> Result<(String, Vec<f32>), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or("the path names no file")?;
    if !names.insert(name.clone()) {
        return Err(format!("another input is also named {name}"));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let floats = preprocess_with(&bytes, mean, std, options).map_err(|e| {
        let api = ApiError::from_preprocess(e, None);
        format!("{} {}: {api}", api.status().as_u16(), api.code())
    })?;
    Ok((name, floats))
}
