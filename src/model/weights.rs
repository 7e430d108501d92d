//! Loading a resnet-serve weights file: memory-mapped safetensors, the architecture inferred
//! from its tensors, every tensor checked by name and shape, and the optional metadata read.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::spec::{ModelSpec, Shortcut};

/// The notebook's normalisation, used when a file carries none.
pub const NOTEBOOK_MEAN: [f32; 3] = [0.491, 0.482, 0.447];
pub const NOTEBOOK_STD: [f32; 3] = [0.247, 0.243, 0.262];
/// The normalisation the public 2018 CIFAR ResNet checkpoints were trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

pub const CIFAR10_LABELS: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Why a weights file cannot be used. Each names the file and what was wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor {name} is missing (expected shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{path}: tensor {name} has dtype {dtype}; expected a float type (F32, F16, BF16 or F64)"
    )]
    WrongDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error(
        "{path}: unexpected tensor {name} for a {architecture} (mixed or unknown naming scheme)"
    )]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        architecture: String,
    },
    #[error("{path}: not a CIFAR ResNet weights file: {reason}")]
    Architecture { path: PathBuf, reason: String },
    #[error("{path}: metadata {key:?} is invalid: {reason}")]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error(
        "no weights: {} does not exist and this build has no embedded model (cargo feature \
         `embedded-weights`); run `resnet-serve fetch-weights`, convert a checkpoint with \
         `resnet-serve convert IN {}`, or pass --weights PATH",
        default.display(),
        default.display()
    )]
    NoWeights { default: PathBuf },
    #[error("{path}: tensor {name}: {source}")]
    Tensor {
        path: PathBuf,
        name: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}

/// What the file says about how to use the model: normalisation, labels, name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub labels: Vec<String>,
    pub source: Option<String>,
}

/// The weights file used when `--weights` is not given.
pub const DEFAULT_WEIGHTS_PATH: &str = "weights/resnet56.safetensors";

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    File(PathBuf),
    /// The pretrained ResNet56 compiled into the binary (see [`super::embedded`]).
    Embedded,
}

impl WeightsSource {
    /// An explicitly given path is used as it is (a missing file is an error when loaded).
    /// Without one: the file at [`DEFAULT_WEIGHTS_PATH`] when there is one, else the embedded
    /// model; a build without it then has no weights to offer, and says how to get some.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, WeightsError> {
        if let Some(path) = explicit {
            return Ok(Self::File(path.to_path_buf()));
        }
        let default = Path::new(DEFAULT_WEIGHTS_PATH);
        if default.exists() {
            Ok(Self::File(default.to_path_buf()))
        } else if super::embedded::bytes().is_some() {
            Ok(Self::Embedded)
        } else {
            Err(WeightsError::NoWeights {
                default: default.to_path_buf(),
            })
        }
    }
}

/// Which weights a model was built from, as `/v1/model` and the startup log report them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightsOrigin {
    /// `embedded` (compiled into the binary) or `file`.
    pub kind: String,
    /// The file's path as given, for `file`.
    pub path: Option<String>,
    /// Lower-case hex sha256 of the safetensors bytes.
    pub sha256: String,
}

impl WeightsOrigin {
    fn new(kind: &str, path: Option<&Path>, bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        Self {
            kind: kind.into(),
            path: path.map(|p| p.display().to_string()),
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// A validated weights file: its architecture, metadata, tensors (f32, on the CPU) and origin.
#[derive(Debug)]
pub struct Checkpoint {
    pub spec: ModelSpec,
    pub metadata: ModelMetadata,
    pub tensors: HashMap<String, Tensor>,
    pub origin: WeightsOrigin,
}

impl Checkpoint {
    /// Loads the weights `source` names.
    pub fn load_source(source: &WeightsSource) -> Result<Self, WeightsError> {
        match source {
            WeightsSource::File(path) => Self::load(path),
            WeightsSource::Embedded => {
                let label = Path::new(super::embedded::EMBEDDED_LABEL);
                let bytes = super::embedded::bytes().ok_or_else(|| WeightsError::NoWeights {
                    default: PathBuf::from(DEFAULT_WEIGHTS_PATH),
                })?;
                let mut checkpoint = Self::from_bytes(label, bytes)?;
                // Same bytes, same digest: only where they came from differs.
                checkpoint.origin.kind = "embedded".into();
                checkpoint.origin.path = None;
                Ok(checkpoint)
            }
        }
    }

    /// Memory-maps, validates and loads `path`.
    pub fn load(path: &Path) -> Result<Self, WeightsError> {
        let io = |source| WeightsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only and only read while mapped; tensors are copied out
        // before the map is dropped at the end of this function.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_bytes(path, &mmap)
    }

    /// Validates and loads a safetensors file held in memory; `path` is only used in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, WeightsError> {
        let format = |reason: String| WeightsError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| format(e.to_string()))?;
        let shapes: HashMap<String, Vec<usize>> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        let spec = infer_spec(path, &shapes)?;
        let expected = spec.expected_tensors();
        let expected_names: BTreeSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
        let architecture = format!(
            "resnet{} ({} shortcut, {} conv bias)",
            spec.depth(),
            spec.shortcut.as_str(),
            if spec.conv_bias { "with" } else { "without" }
        );
        let mut unexpected: Vec<&String> = shapes
            .keys()
            .filter(|n| {
                !expected_names.contains(n.as_str()) && !n.ends_with(".num_batches_tracked")
            })
            .collect();
        unexpected.sort();
        if let Some(name) = unexpected.first() {
            return Err(WeightsError::UnexpectedTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
                architecture,
            });
        }
        let mut tensors = HashMap::with_capacity(expected.len());
        for want in &expected {
            let Some(found) = shapes.get(&want.name) else {
                return Err(WeightsError::MissingTensor {
                    path: path.to_path_buf(),
                    name: want.name.clone(),
                    expected: want.shape.clone(),
                });
            };
            if found != &want.shape {
                return Err(WeightsError::WrongShape {
                    path: path.to_path_buf(),
                    name: want.name.clone(),
                    expected: want.shape.clone(),
                    found: found.clone(),
                });
            }
            let view = st.tensor(&want.name).map_err(|e| format(e.to_string()))?;
            let tensor = view_to_f32(path, &want.name, &view)?;
            tensors.insert(want.name.clone(), tensor);
        }
        let metadata = read_metadata(path, header.metadata().as_ref(), &spec)?;
        Ok(Self {
            spec,
            metadata,
            tensors,
            origin: WeightsOrigin::new("file", Some(path), bytes),
        })
    }
}

fn view_to_f32(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Tensor, WeightsError> {
    use safetensors::Dtype as St;
    let dtype = match view.dtype() {
        St::F32 => DType::F32,
        St::F16 => DType::F16,
        St::BF16 => DType::BF16,
        St::F64 => DType::F64,
        other => {
            return Err(WeightsError::WrongDtype {
                path: path.to_path_buf(),
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    let tensor_err = |source| WeightsError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        source: Box::new(source),
    };
    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(tensor_err)
}

/// Reads depth, shortcut kind, conv bias and class count off the tensor names and shapes.
fn infer_spec(
    path: &Path,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<ModelSpec, WeightsError> {
    let arch = |reason: String| WeightsError::Architecture {
        path: path.to_path_buf(),
        reason,
    };
    if shapes
        .keys()
        .any(|k| k.starts_with("layer") || k.starts_with("linear.") || k.starts_with("module."))
    {
        return Err(arch(
            "tensor names follow the PyTorch checkpoint scheme (layer*/linear/module.); \
             run `resnet-serve convert` on the checkpoint first"
                .into(),
        ));
    }
    let blocks_in = |stage: usize| -> usize {
        (0..)
            .take_while(|i| shapes.contains_key(&format!("block{stage}.{i}.conv1.weight")))
            .count()
    };
    let n = blocks_in(1);
    if n == 0 {
        return Err(arch("no block1.0.conv1.weight tensor".into()));
    }
    for stage in [2, 3] {
        let m = blocks_in(stage);
        if m != n {
            return Err(arch(format!(
                "block1 has {n} blocks but block{stage} has {m}; every stage needs the same count (depth = 6n+2)"
            )));
        }
    }
    let shortcut = match (
        shapes.contains_key("block2.0.residual.0.weight"),
        shapes.contains_key("block3.0.residual.0.weight"),
    ) {
        (true, true) => Shortcut::Projection,
        (false, false) => Shortcut::ZeroPad,
        (true, false) => {
            return Err(arch(
                "block2 has a projection shortcut but block3.0.residual.0.weight is missing".into(),
            ))
        }
        (false, true) => {
            return Err(arch(
                "block3 has a projection shortcut but block2.0.residual.0.weight is missing".into(),
            ))
        }
    };
    let features = super::spec::STAGE_CHANNELS[2];
    let num_classes = match shapes.get("fc.weight").map(Vec::as_slice) {
        Some([classes, f]) if *classes > 0 && *f == features => *classes,
        Some(other) => {
            return Err(arch(format!(
                "tensor fc.weight has shape {other:?}, expected [classes, {features}]"
            )))
        }
        None => {
            return Err(WeightsError::MissingTensor {
                path: path.to_path_buf(),
                name: "fc.weight".into(),
                expected: vec![10, features],
            })
        }
    };
    Ok(ModelSpec {
        blocks_per_stage: n,
        shortcut,
        conv_bias: shapes.contains_key("conv1.bias"),
        num_classes,
    })
}

fn read_metadata(
    path: &Path,
    meta: Option<&HashMap<String, String>>,
    spec: &ModelSpec,
) -> Result<ModelMetadata, WeightsError> {
    let bad = |key: &str, reason: String| WeightsError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let get = |key: &str| meta.and_then(|m| m.get(key));
    let triple = |key: &str, default: [f32; 3], positive: bool| -> Result<[f32; 3], WeightsError> {
        let Some(raw) = get(key) else {
            return Ok(default);
        };
        let values: Vec<f32> = serde_json::from_str(raw)
            .map_err(|e| bad(key, format!("expected a JSON array of 3 numbers ({e})")))?;
        let values: [f32; 3] = values
            .try_into()
            .map_err(|v: Vec<f32>| bad(key, format!("expected 3 numbers, got {}", v.len())))?;
        if values
            .iter()
            .any(|v| !v.is_finite() || (positive && *v <= 0.0))
        {
            return Err(bad(
                key,
                format!(
                    "values must be finite{}: {values:?}",
                    if positive { " and > 0" } else { "" }
                ),
            ));
        }
        Ok(values)
    };
    let mean = triple("mean", NOTEBOOK_MEAN, false)?;
    let std = triple("std", NOTEBOOK_STD, true)?;
    let labels = match get("labels") {
        Some(raw) => {
            let labels: Vec<String> = serde_json::from_str(raw)
                .map_err(|e| bad("labels", format!("expected a JSON array of strings ({e})")))?;
            if labels.len() != spec.num_classes {
                return Err(bad(
                    "labels",
                    format!("{} labels for {} classes", labels.len(), spec.num_classes),
                ));
            }
            labels
        }
        None => default_labels(spec.num_classes),
    };
    Ok(ModelMetadata {
        name: get("name")
            .cloned()
            .unwrap_or_else(|| format!("resnet{}", spec.depth())),
        mean,
        std,
        labels,
        source: get("source").cloned(),
    })
}

/// CIFAR-10's class names for 10 classes, else `class_0`, `class_1`, ...
pub fn default_labels(num_classes: usize) -> Vec<String> {
    if num_classes == CIFAR10_LABELS.len() {
        CIFAR10_LABELS.iter().map(|s| s.to_string()).collect()
    } else {
        (0..num_classes).map(|i| format!("class_{i}")).collect()
    }
}
