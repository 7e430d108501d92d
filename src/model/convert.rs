//! `convert`: a PyTorch checkpoint (zip or legacy format) to a resnet-serve safetensors file,
//! with the tensor names mapped, the normalisation chosen, and the result validated by loading it.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;

use super::pytorch::{self, TorchTensor};
use super::spec::{ModelSpec, Shortcut};
use super::weights::{
    default_labels, Checkpoint, ModelMetadata, WeightsError, IMAGENET_MEAN, IMAGENET_STD,
    NOTEBOOK_MEAN, NOTEBOOK_STD,
};

/// Largest checkpoint file read (a ResNet110 checkpoint is under 8 MiB).
pub const MAX_INPUT_BYTES: u64 = 1 << 30;

/// Why a checkpoint could not be converted. Each names the file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is {size} bytes, more than the {limit} bytes a checkpoint may have")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path} is not a PyTorch checkpoint: {reason}")]
    NotACheckpoint { path: PathBuf, reason: String },
    #[error("{path}: unsupported checkpoint format: {reason}")]
    UnsupportedFormat { path: PathBuf, reason: String },
    #[error("{path} is corrupt or truncated: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: no state dict: {reason}")]
    MissingStateDict { path: PathBuf, reason: String },
    #[error(
        "{path}: tensor {name} is {dtype}; weights must be float32, float64, float16 or bfloat16"
    )]
    NonFloatTensor {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor {name}: {reason}")]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("{path}: tensors {first} and {second} both become {name}")]
    DuplicateTensor {
        path: PathBuf,
        name: String,
        first: String,
        second: String,
    },
    #[error("{path}: {reason}")]
    InvalidOption { path: PathBuf, reason: String },
    #[error("{path}: the converted weights are not a loadable CIFAR ResNet: {error}")]
    NotAResNet {
        path: PathBuf,
        error: Box<WeightsError>,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A named training normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalizationPreset {
    /// mean 0.485,0.456,0.406 / std 0.229,0.224,0.225: what the public 2018 CIFAR ResNet
    /// checkpoints were trained with.
    Imagenet,
    /// mean 0.491,0.482,0.447 / std 0.247,0.243,0.262: the seed notebook's values.
    Notebook,
}

impl NormalizationPreset {
    pub fn mean_std(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Self::Imagenet => (IMAGENET_MEAN, IMAGENET_STD),
            Self::Notebook => (NOTEBOOK_MEAN, NOTEBOOK_STD),
        }
    }
}

/// How the converter picks the mean and std it stores.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Normalization {
    /// `imagenet` for a paper-style checkpoint (`layer*`/`linear` names and zero-pad shortcut),
    /// with a warning; `notebook` otherwise.
    #[default]
    Detect,
    Preset(NormalizationPreset),
    Explicit {
        mean: [f32; 3],
        std: [f32; 3],
    },
}

/// Everything `convert` stores besides the tensors.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    pub normalization: Normalization,
    pub labels: Option<Vec<String>>,
    pub name: Option<String>,
    /// Provenance text; `converted from FILE` when absent.
    pub source: Option<String>,
}

/// Where the stored normalisation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalizationOrigin {
    Explicit,
    Preset(NormalizationPreset),
    /// Chosen by detection: `Imagenet` for a paper-style checkpoint.
    Detected(NormalizationPreset),
}

/// A converted, validated weights file.
#[derive(Debug)]
pub struct Converted {
    /// The safetensors file.
    pub bytes: Vec<u8>,
    pub spec: ModelSpec,
    pub metadata: ModelMetadata,
    pub normalization: NormalizationOrigin,
    pub format: pytorch::Format,
    /// Tensors left out: `num_batches_tracked` counters and non-tensor entries.
    pub dropped: Vec<String>,
}

/// A state-dict name in the weights-file scheme, and whether it used the public checkpoints'
/// naming (`layer{n}` / `linear`).
fn map_name(name: &str) -> (String, bool) {
    let name = name.strip_prefix("module.").unwrap_or(name);
    if let Some(rest) = name.strip_prefix("linear.") {
        return (format!("fc.{rest}"), true);
    }
    if let Some(rest) = name.strip_prefix("layer") {
        if rest.starts_with(|c: char| c.is_ascii_digit()) {
            let block = format!("block{rest}");
            return (block.replacen(".shortcut.", ".residual.", 1), true);
        }
    }
    (name.to_string(), false)
}

/// Serialises `tensors` (name -> tensor) with `metadata`.
fn serialize(
    path: &Path,
    tensors: &BTreeMap<String, TorchTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, ConvertError> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let tensor_err = |reason: String| ConvertError::Tensor {
            path: path.to_path_buf(),
            name: t.name.clone(),
            reason,
        };
        let dtype = t.storage_type.float_dtype().ok_or_else(|| {
            tensor_err(format!(
                "{} is not a float type",
                t.storage_type.torch_name()
            ))
        })?;
        let view = TensorView::new(dtype, t.shape.clone(), &t.data)
            .map_err(|e| tensor_err(e.to_string()))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize(views, metadata).map_err(|e| ConvertError::Tensor {
        path: path.to_path_buf(),
        name: "(all)".into(),
        reason: format!("cannot serialise safetensors: {e}"),
    })
}

/// Converts the checkpoint `bytes` read from `input`; `output` names the result in errors.
pub fn convert_bytes(
    input: &Path,
    bytes: &[u8],
    options: &ConvertOptions,
    output: &Path,
) -> Result<Converted, ConvertError> {
    let state_dict = pytorch::read_state_dict(input, bytes)?;
    let mut dropped = state_dict.skipped;
    let mut source_tensors = state_dict.tensors;
    // Sorted, so that errors name the same tensor on every run.
    source_tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut paper_naming = false;
    let mut tensors: BTreeMap<String, TorchTensor> = BTreeMap::new();
    for tensor in source_tensors {
        let (name, paper) = map_name(&tensor.name);
        if name.ends_with(".num_batches_tracked") {
            dropped.push(tensor.name);
            continue;
        }
        if tensor.storage_type.float_dtype().is_none() {
            return Err(ConvertError::NonFloatTensor {
                path: input.to_path_buf(),
                name: tensor.name,
                dtype: tensor.storage_type.torch_name().into(),
            });
        }
        paper_naming |= paper;
        if let Some(previous) = tensors.get(&name) {
            return Err(ConvertError::DuplicateTensor {
                path: input.to_path_buf(),
                name,
                first: previous.name.clone(),
                second: tensor.name,
            });
        }
        tensors.insert(name, tensor);
    }
    if tensors.is_empty() {
        return Err(ConvertError::MissingStateDict {
            path: input.to_path_buf(),
            reason: "the state dict holds no float tensors".into(),
        });
    }
    let not_resnet = |error| ConvertError::NotAResNet {
        path: input.to_path_buf(),
        error: Box::new(error),
    };
    // Loading the bare tensors first yields the architecture, which the defaults depend on.
    let spec = Checkpoint::from_bytes(output, &serialize(input, &tensors, None)?)
        .map_err(not_resnet)?
        .spec;
    let (mean, std, origin) = match options.normalization {
        Normalization::Explicit { mean, std } => (mean, std, NormalizationOrigin::Explicit),
        Normalization::Preset(preset) => {
            let (mean, std) = preset.mean_std();
            (mean, std, NormalizationOrigin::Preset(preset))
        }
        Normalization::Detect => {
            let preset = if paper_naming && spec.shortcut == Shortcut::ZeroPad {
                tracing::warn!(
                    input = %input.display(),
                    "this looks like a public paper-style CIFAR ResNet checkpoint (layer*/linear \
                     names, zero-pad shortcut): storing the normalisation those were trained \
                     with, mean {IMAGENET_MEAN:?} / std {IMAGENET_STD:?} (--preset imagenet); \
                     pass --preset notebook or --mean/--std to override"
                );
                NormalizationPreset::Imagenet
            } else {
                tracing::info!(
                    "storing the notebook normalisation, mean {NOTEBOOK_MEAN:?} / std \
                     {NOTEBOOK_STD:?}; pass --preset or --mean/--std if the model was trained \
                     with another"
                );
                NormalizationPreset::Notebook
            };
            let (mean, std) = preset.mean_std();
            (mean, std, NormalizationOrigin::Detected(preset))
        }
    };
    let labels = options
        .labels
        .clone()
        .unwrap_or_else(|| default_labels(spec.num_classes));
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| format!("resnet{}", spec.depth()));
    if name.trim().is_empty() {
        return Err(ConvertError::InvalidOption {
            path: input.to_path_buf(),
            reason: "--name is empty".into(),
        });
    }
    let file_name = input.file_name().map_or_else(
        || input.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let source = options
        .source
        .clone()
        .unwrap_or_else(|| format!("converted from {file_name}"));
    let metadata = HashMap::from([
        ("mean".to_string(), to_json(&mean)),
        ("std".to_string(), to_json(&std)),
        ("labels".to_string(), to_json(&labels)),
        ("name".to_string(), name),
        ("source".to_string(), source),
    ]);
    let bytes = serialize(input, &tensors, Some(metadata))?;
    let checkpoint = Checkpoint::from_bytes(output, &bytes).map_err(not_resnet)?;
    Ok(Converted {
        bytes,
        spec: checkpoint.spec,
        metadata: checkpoint.metadata,
        normalization: origin,
        format: state_dict.format,
        dropped,
    })
}

/// JSON text of a metadata value. Non-finite floats become `null`, which validation refuses.
fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Reads a checkpoint file, refusing files too large to be one.
pub fn read_input(path: &Path) -> Result<Vec<u8>, ConvertError> {
    let read_err = |error| ConvertError::Read {
        path: path.to_path_buf(),
        error,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_INPUT_BYTES {
        return Err(ConvertError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_INPUT_BYTES,
        });
    }
    std::fs::read(path).map_err(read_err)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// `path` never holds a partial file; creates the parent directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ConvertError> {
    let write_err = |error| ConvertError::Write {
        path: path.to_path_buf(),
        error,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(write_err)?;
    let file_name = path.file_name().ok_or_else(|| {
        write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path names no file",
        ))
    })?;
    let temp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        // Best effort: the temporary file is ours and useless after a failure.
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(write_err)
}

/// Converts the checkpoint `input` with `options` into the weights file `output`: read,
/// convert, validate, write (atomically, parent directories created). `output` may not be
/// `input`.
pub fn convert_file(
    input: &Path,
    output: &Path,
    options: &ConvertOptions,
) -> Result<Converted, ConvertError> {
    let same_file = std::fs::canonicalize(input)
        .ok()
        .zip(std::fs::canonicalize(output).ok())
        .is_some_and(|(a, b)| a == b);
    if same_file {
        return Err(ConvertError::InvalidOption {
            path: input.to_path_buf(),
            reason: "the output would overwrite the input checkpoint".into(),
        });
    }
    let bytes = read_input(input)?;
    let converted = convert_bytes(input, &bytes, options, output)?;
    write_atomic(output, &converted.bytes)?;
    log_converted(input, output, &converted);
    Ok(converted)
}

/// One info line describing what was written.
pub fn log_converted(input: &Path, output: &Path, converted: &Converted) {
    let spec = &converted.spec;
    let meta = &converted.metadata;
    tracing::info!(
        input = %input.display(),
        output = %output.display(),
        format = ?converted.format,
        model = %meta.name,
        depth = spec.depth(),
        shortcut = spec.shortcut.as_str(),
        conv_bias = spec.conv_bias,
        classes = spec.num_classes,
        mean = ?meta.mean,
        std = ?meta.std,
        normalization = ?converted.normalization,
        dropped = converted.dropped.len(),
        "converted"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_names_map_onto_the_weights_scheme() {
        for (from, to, paper) in [
            ("module.conv1.weight", "conv1.weight", false),
            (
                "module.layer2.3.bn1.running_var",
                "block2.3.bn1.running_var",
                true,
            ),
            (
                "layer3.0.shortcut.0.weight",
                "block3.0.residual.0.weight",
                true,
            ),
            ("module.linear.bias", "fc.bias", true),
            ("block1.0.conv2.weight", "block1.0.conv2.weight", false),
            ("fc.weight", "fc.weight", false),
            ("layers.0.weight", "layers.0.weight", false),
        ] {
            assert_eq!(map_name(from), (to.to_string(), paper), "{from}");
        }
    }
}
