//! Reading PyTorch checkpoints down to named tensors: the zip container (`torch.save` since 1.6)
//! and the legacy pre-1.6 stream, a bare state dict or `{"state_dict": ...}`.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::Object;

use super::convert::ConvertError;
use super::pytorch_pickle::unpickle;

/// `torch.serialization.MAGIC_NUMBER`, 0x1950a86a20f9469cfc6c, as pickled by legacy `torch.save`:
/// PROTO 2, LONG1 of 10 little-endian bytes, STOP.
const LEGACY_HEADER: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
];
/// `torch.serialization.PROTOCOL_VERSION` of legacy checkpoints.
const LEGACY_PROTOCOL_VERSION: i64 = 1001;
/// Largest `data.pkl` read from a zip checkpoint (a state dict's is a few hundred KiB).
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Largest total of tensor data read from one checkpoint.
pub const MAX_TENSOR_BYTES: u64 = 1 << 30;

/// The container a checkpoint came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `torch.save` since PyTorch 1.6: a zip archive with `data.pkl` and `data/<key>` entries.
    Zip,
    /// Before 1.6: magic number, protocol, system info, object, storage keys, raw storages.
    Legacy,
}

/// The element type of a PyTorch storage (`torch.FloatStorage` and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    Float,
    Double,
    Half,
    BFloat16,
    Long,
    Int,
    Short,
    Char,
    Byte,
    Bool,
}

impl StorageType {
    fn from_class(class: &str) -> Option<Self> {
        Some(match class {
            "FloatStorage" => Self::Float,
            "DoubleStorage" => Self::Double,
            "HalfStorage" => Self::Half,
            "BFloat16Storage" => Self::BFloat16,
            "LongStorage" => Self::Long,
            "IntStorage" => Self::Int,
            "ShortStorage" => Self::Short,
            "CharStorage" => Self::Char,
            "ByteStorage" => Self::Byte,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    pub fn element_size(self) -> usize {
        match self {
            Self::Double | Self::Long => 8,
            Self::Float | Self::Int => 4,
            Self::Half | Self::BFloat16 | Self::Short => 2,
            Self::Char | Self::Byte | Self::Bool => 1,
        }
    }

    /// The safetensors type of a float storage; `None` for integer and boolean storages.
    pub fn float_dtype(self) -> Option<safetensors::Dtype> {
        match self {
            Self::Float => Some(safetensors::Dtype::F32),
            Self::Double => Some(safetensors::Dtype::F64),
            Self::Half => Some(safetensors::Dtype::F16),
            Self::BFloat16 => Some(safetensors::Dtype::BF16),
            _ => None,
        }
    }

    /// PyTorch's name for the element type.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::Float => "float32",
            Self::Double => "float64",
            Self::Half => "float16",
            Self::BFloat16 => "bfloat16",
            Self::Long => "int64",
            Self::Int => "int32",
            Self::Short => "int16",
            Self::Char => "int8",
            Self::Byte => "uint8",
            Self::Bool => "bool",
        }
    }
}

/// One tensor of a state dict, its elements copied out contiguous and little-endian.
#[derive(Debug, Clone)]
pub struct TorchTensor {
    pub name: String,
    pub storage_type: StorageType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// A checkpoint's state dict.
#[derive(Debug)]
pub struct TorchStateDict {
    pub format: Format,
    pub tensors: Vec<TorchTensor>,
    /// State-dict entries that are not tensors (such as `_metadata`), left out.
    pub skipped: Vec<String>,
}

/// Where a tensor's elements live: a storage, possibly a view into a larger one.
#[derive(Debug, Clone)]
struct StorageRef {
    key: String,
    storage_type: StorageType,
    /// Elements of the stored storage.
    len: usize,
    /// The elements the tensor's storage covers (all of them unless a legacy view).
    view_offset: usize,
    view_len: usize,
}

#[derive(Debug)]
struct TensorRef {
    name: String,
    layout: TensorLayout,
}

/// A tensor as `_rebuild_tensor_v2` describes it: storage, offset (in elements), size, stride.
#[derive(Debug)]
struct TensorLayout {
    storage: StorageRef,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Reads the state dict of the checkpoint `bytes`; `path` names it in errors.
pub fn read_state_dict(path: &Path, bytes: &[u8]) -> Result<TorchStateDict, ConvertError> {
    let not_checkpoint = |reason: &str| ConvertError::NotACheckpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return read_zip(path, bytes);
    }
    if bytes.starts_with(&LEGACY_HEADER) {
        return read_legacy(path, bytes);
    }
    if bytes.is_empty() {
        return Err(not_checkpoint("the file is empty"));
    }
    if bytes.get(257..262) == Some(b"ustar") {
        return Err(ConvertError::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: "a tar archive (the format of PyTorch before 0.4); load it in Python and \
                     torch.save(model.state_dict()) again"
                .into(),
        });
    }
    if bytes[0] == 0x80 {
        return Err(not_checkpoint(
            "it is a Python pickle without PyTorch's magic number (a plain pickle, or a \
             protocol other than 2)",
        ));
    }
    if bytes.len() > 8 && bytes[8] == b'{' {
        return Err(not_checkpoint(
            "it looks like a safetensors file already; use it with --weights",
        ));
    }
    Err(not_checkpoint(
        "neither a zip archive (torch.save since PyTorch 1.6) nor a legacy PyTorch file",
    ))
}

fn corrupt(path: &Path, reason: impl Into<String>) -> ConvertError {
    ConvertError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_zip(path: &Path, bytes: &[u8]) -> Result<TorchStateDict, ConvertError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| corrupt(path, format!("unreadable zip archive: {e}")))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    if names
        .iter()
        .any(|n| n.ends_with("constants.pkl") || n.contains("/code/"))
    {
        return Err(ConvertError::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: "a TorchScript archive (torch.jit.save); load it in Python and \
                     torch.save(model.state_dict())"
                .into(),
        });
    }
    let Some(pickle_name) = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.matches('/').count())
    else {
        return Err(ConvertError::NotACheckpoint {
            path: path.to_path_buf(),
            reason: "a zip archive without data.pkl".into(),
        });
    };
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut read_entry = |name: &str, limit: u64| -> Result<Vec<u8>, ConvertError> {
        let entry = zip
            .by_name(name)
            .map_err(|e| corrupt(path, format!("zip entry {name}: {e}")))?;
        // Sized by what is actually read, not by the size the archive declares: a few bytes of
        // central directory can claim gigabytes per entry.
        let mut data = Vec::new();
        entry
            .take(limit + 1)
            .read_to_end(&mut data)
            .map_err(|e| corrupt(path, format!("zip entry {name}: {e}")))?;
        if data.len() as u64 > limit {
            return Err(corrupt(
                path,
                format!("zip entry {name} is larger than {limit} bytes"),
            ));
        }
        Ok(data)
    };
    let byteorder = format!("{prefix}byteorder");
    if names.contains(&byteorder) {
        let order = read_entry(&byteorder, 16)?;
        if order.trim_ascii() != b"little" {
            return Err(ConvertError::UnsupportedFormat {
                path: path.to_path_buf(),
                reason: format!(
                    "byte order {:?}; only little-endian checkpoints are read",
                    String::from_utf8_lossy(&order)
                ),
            });
        }
    }
    let pickle = read_entry(pickle_name, MAX_PICKLE_BYTES)?;
    let (object, _) =
        unpickle(&pickle).map_err(|e| corrupt(path, format!("{pickle_name}: {e}")))?;
    let (refs, skipped) = tensor_refs(path, object)?;
    let mut budget = MAX_TENSOR_BYTES;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for r in &refs {
        if storages.contains_key(&r.layout.storage.key) {
            continue;
        }
        let data = read_entry(&format!("{prefix}data/{}", r.layout.storage.key), budget)?;
        budget -= data.len() as u64;
        storages.insert(r.layout.storage.key.clone(), data);
    }
    let tensors = refs
        .into_iter()
        .map(|r| {
            let data = storages.get(&r.layout.storage.key).map(Vec::as_slice);
            materialize(path, r, data)
        })
        .collect::<Result<_, _>>()?;
    Ok(TorchStateDict {
        format: Format::Zip,
        tensors,
        skipped,
    })
}

fn read_legacy(path: &Path, bytes: &[u8]) -> Result<TorchStateDict, ConvertError> {
    let mut rest = &bytes[LEGACY_HEADER.len()..];
    let mut next = |what: &str| -> Result<Object, ConvertError> {
        let (object, used) = unpickle(rest).map_err(|e| corrupt(path, format!("{what}: {e}")))?;
        rest = &rest[used..];
        Ok(object)
    };
    let version = next("protocol version")?;
    if version != Object::Int(LEGACY_PROTOCOL_VERSION as i32) {
        return Err(ConvertError::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: format!(
                "legacy protocol version {version:?} (expected {LEGACY_PROTOCOL_VERSION})"
            ),
        });
    }
    let sys_info = next("system info")?;
    if let Object::Dict(entries) = &sys_info {
        if dict_get(entries, "little_endian") == Some(&Object::Bool(false)) {
            return Err(ConvertError::UnsupportedFormat {
                path: path.to_path_buf(),
                reason: "saved on a big-endian machine; only little-endian checkpoints are read"
                    .into(),
            });
        }
    }
    let object = next("checkpoint object")?;
    let keys = match next("storage key list")? {
        Object::List(keys) => keys,
        other => {
            return Err(corrupt(
                path,
                format!("expected the list of storage keys, found {}", kind(&other)),
            ))
        }
    };
    let mut declared = HashMap::new();
    collect_storages(path, &object, &mut declared)?;
    let (refs, skipped) = tensor_refs(path, object)?;
    // The storages follow in the order of the key list: an i64 element count, then the elements.
    let mut storages: HashMap<String, &[u8]> = HashMap::with_capacity(keys.len());
    for key in keys {
        let Object::Unicode(key) = key else {
            return Err(corrupt(path, "a storage key is not a string"));
        };
        let Some(&(storage_type, len)) = declared.get(&key) else {
            return Err(corrupt(
                path,
                format!("storage {key} is listed but no tensor uses it"),
            ));
        };
        let Some((count, tail)) = rest.split_first_chunk::<8>() else {
            return Err(corrupt(
                path,
                format!("truncated: storage {key} is missing (file ends early)"),
            ));
        };
        let count = u64::from_le_bytes(*count);
        if count != len as u64 {
            return Err(corrupt(
                path,
                format!("storage {key} holds {count} elements, its tensors declare {len}"),
            ));
        }
        let size = count
            .checked_mul(storage_type.element_size() as u64)
            .filter(|&s| s <= tail.len() as u64)
            .ok_or_else(|| {
                corrupt(
                    path,
                    format!("truncated: storage {key} needs {count} elements past the file's end"),
                )
            })? as usize;
        storages.insert(key, &tail[..size]);
        rest = &tail[size..];
    }
    let tensors = refs
        .into_iter()
        .map(|r| {
            let data = storages.get(&r.layout.storage.key).copied();
            materialize(path, r, data)
        })
        .collect::<Result<_, _>>()?;
    Ok(TorchStateDict {
        format: Format::Legacy,
        tensors,
        skipped,
    })
}

fn dict_get<'a>(entries: &'a [(Object, Object)], key: &str) -> Option<&'a Object> {
    entries
        .iter()
        .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
        .map(|(_, v)| v)
}

/// A short description of an object for error messages.
fn kind(object: &Object) -> String {
    match object {
        Object::Class {
            module_name,
            class_name,
        } => format!("class {module_name}.{class_name}"),
        Object::Int(_) | Object::Long(_) => "an integer".into(),
        Object::Float(_) => "a float".into(),
        Object::Unicode(_) => "a string".into(),
        Object::Bool(_) => "a bool".into(),
        Object::None => "None".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::List(_) => "a list".into(),
        Object::Mark => "a pickle mark".into(),
        Object::Dict(_) => "a dict".into(),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => match &**callable {
            Object::Class {
                module_name,
                class_name,
            } => format!("a {module_name}.{class_name} object"),
            Object::Reduce { callable, .. } => kind(&Object::Reduce {
                callable: callable.clone(),
                args: Box::new(Object::None),
            }),
            _ => "an object".into(),
        },
        Object::PersistentLoad(_) => "a storage".into(),
    }
}

fn non_negative(object: &Object) -> Option<usize> {
    match object {
        Object::Int(v) => usize::try_from(*v).ok(),
        Object::Long(v) => usize::try_from(*v).ok(),
        _ => None,
    }
}

fn usize_tuple(object: &Object) -> Option<Vec<usize>> {
    match object {
        Object::Tuple(items) | Object::List(items) => items.iter().map(non_negative).collect(),
        _ => None,
    }
}

/// Parses a storage persistent id: `('storage', torch.XStorage, key, location, numel)`, plus in
/// the legacy format `view_metadata`, `None` or `(view_key, offset, view_numel)`.
fn storage_ref(id: &Object) -> Result<StorageRef, String> {
    let Object::Tuple(items) = id else {
        return Err(format!("persistent id is {}, not a tuple", kind(id)));
    };
    let [Object::Unicode(tag), Object::Class {
        module_name,
        class_name,
    }, Object::Unicode(key), _location, size, view @ ..] = items.as_slice()
    else {
        return Err("persistent id is not ('storage', type, key, location, size)".into());
    };
    if tag != "storage" {
        return Err(format!("persistent id of kind {tag:?}, expected 'storage'"));
    }
    let storage_type = StorageType::from_class(class_name)
        .filter(|_| module_name == "torch")
        .ok_or_else(|| format!("unsupported storage type {module_name}.{class_name}"))?;
    let len = non_negative(size).ok_or("storage size is not a non-negative integer")?;
    let (view_offset, view_len) = match view {
        [] | [Object::None] => (0, len),
        [Object::Tuple(v)] => match v.as_slice() {
            [_, offset, view_len] => (
                non_negative(offset).ok_or("bad storage view offset")?,
                non_negative(view_len).ok_or("bad storage view size")?,
            ),
            _ => return Err("malformed storage view metadata".into()),
        },
        _ => return Err("malformed storage persistent id".into()),
    };
    if view_offset
        .checked_add(view_len)
        .is_none_or(|end| end > len)
    {
        return Err(format!(
            "storage view {view_offset}+{view_len} exceeds its storage of {len} elements"
        ));
    }
    Ok(StorageRef {
        key: key.clone(),
        storage_type,
        len,
        view_offset,
        view_len,
    })
}

/// Every storage the object refers to (legacy files list them all, optimizer state included).
fn collect_storages(
    path: &Path,
    object: &Object,
    out: &mut HashMap<String, (StorageType, usize)>,
) -> Result<(), ConvertError> {
    match object {
        Object::PersistentLoad(id) => {
            let storage = storage_ref(id).map_err(|e| corrupt(path, e))?;
            match out.insert(storage.key.clone(), (storage.storage_type, storage.len)) {
                Some(previous) if previous != (storage.storage_type, storage.len) => Err(corrupt(
                    path,
                    format!("storage {} is declared twice, differently", storage.key),
                )),
                _ => Ok(()),
            }
        }
        Object::Tuple(items) | Object::List(items) => items
            .iter()
            .try_for_each(|o| collect_storages(path, o, out)),
        Object::Dict(entries) => entries.iter().try_for_each(|(k, v)| {
            collect_storages(path, k, out)?;
            collect_storages(path, v, out)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            collect_storages(path, callable, out)?;
            collect_storages(path, args, out)
        }
        _ => Ok(()),
    }
}

/// Recognises a pickled tensor: `None` when `value` is not one, an error when it is one that
/// cannot be read.
fn tensor_parts(value: &Object) -> Option<Result<TensorLayout, String>> {
    let Object::Reduce { callable, args } = value else {
        return None;
    };
    let Object::Class {
        module_name,
        class_name,
    } = &**callable
    else {
        return None;
    };
    let Object::Tuple(args) = &**args else {
        return None;
    };
    match (module_name.as_str(), class_name.as_str()) {
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            args.first().and_then(tensor_parts)
        }
        ("torch._tensor", "_rebuild_from_type_v2") => match args.as_slice() {
            [func, _type, Object::Tuple(_) | Object::List(_), ..] => {
                tensor_parts(&Object::Reduce {
                    callable: Box::new(func.clone()),
                    args: Box::new(args[2].clone()),
                })
            }
            _ => Some(Err("malformed _rebuild_from_type_v2 arguments".into())),
        },
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => Some(match args.as_slice() {
            [Object::PersistentLoad(id), offset, size, stride, ..] => (|| {
                let storage = storage_ref(id)?;
                let offset = non_negative(offset).ok_or("storage offset is not an integer")?;
                let shape = usize_tuple(size).ok_or("size is not a tuple of integers")?;
                let stride = usize_tuple(stride).ok_or("stride is not a tuple of integers")?;
                Ok(TensorLayout {
                    storage,
                    offset,
                    shape,
                    stride,
                })
            })(),
            _ => Err(format!("malformed {class_name} arguments")),
        }),
        ("torch._utils", other) if other.starts_with("_rebuild_") => Some(Err(format!(
            "unsupported tensor kind ({other}: sparse, quantized or other special tensors are not read)"
        ))),
        _ => None,
    }
}

/// Finds the state dict in the checkpoint's object and the tensors it names.
fn tensor_refs(path: &Path, object: Object) -> Result<(Vec<TensorRef>, Vec<String>), ConvertError> {
    let missing = |reason: String| ConvertError::MissingStateDict {
        path: path.to_path_buf(),
        reason,
    };
    let entries = match object {
        Object::Dict(mut entries) => {
            let state_dict = entries
                .iter()
                .position(|(k, _)| matches!(k, Object::Unicode(s) if s == "state_dict"));
            match state_dict {
                Some(i) => match entries.swap_remove(i).1 {
                    Object::Dict(inner) => inner,
                    other => {
                        return Err(missing(format!(
                            "\"state_dict\" holds {}, not a dict of tensors",
                            kind(&other)
                        )))
                    }
                },
                None if entries.iter().any(|(_, v)| tensor_parts(v).is_some()) => entries,
                None => {
                    let keys: Vec<String> = entries
                        .iter()
                        .map(|(k, _)| match k {
                            Object::Unicode(s) => format!("{s:?}"),
                            other => kind(other),
                        })
                        .collect();
                    return Err(missing(format!(
                        "the checkpoint is a dict with keys [{}] and no tensors; expected a \
                         state dict or {{\"state_dict\": ...}}",
                        keys.join(", ")
                    )));
                }
            }
        }
        Object::Build { callable, .. } if matches!(&*callable, Object::Reduce { .. }) => {
            return Err(ConvertError::UnsupportedFormat {
                path: path.to_path_buf(),
                reason: format!(
                    "it holds {} (a whole pickled model, torch.save(model)); save \
                     model.state_dict() instead",
                    kind(&Object::Build {
                        callable,
                        args: Box::new(Object::None)
                    })
                ),
            });
        }
        other => {
            return Err(missing(format!(
                "the checkpoint holds {}; expected a state dict or {{\"state_dict\": ...}}",
                kind(&other)
            )))
        }
    };
    let mut refs = Vec::with_capacity(entries.len());
    let mut skipped = Vec::new();
    for (key, value) in entries {
        let name = match key {
            Object::Unicode(name) => name,
            other => {
                skipped.push(kind(&other));
                continue;
            }
        };
        match tensor_parts(&value) {
            None => skipped.push(name),
            Some(Err(reason)) => {
                return Err(ConvertError::Tensor {
                    path: path.to_path_buf(),
                    name,
                    reason,
                })
            }
            Some(Ok(layout)) => refs.push(TensorRef { name, layout }),
        }
    }
    Ok((refs, skipped))
}

/// Copies a tensor's elements out of its storage, checking layout and bounds.
fn materialize(
    path: &Path,
    r: TensorRef,
    storage: Option<&[u8]>,
) -> Result<TorchTensor, ConvertError> {
    let TensorRef { name, layout: l } = r;
    let fail = |reason: String| ConvertError::Tensor {
        path: PathBuf::from(path),
        name: name.clone(),
        reason,
    };
    if l.shape.len() != l.stride.len() {
        return Err(fail(format!(
            "size {:?} and stride {:?} differ in rank",
            l.shape, l.stride
        )));
    }
    let mut expected = 1usize;
    for (&dim, &stride) in l.shape.iter().zip(&l.stride).rev() {
        if dim != 1 && stride != expected {
            return Err(fail(format!(
                "non-contiguous layout (size {:?}, stride {:?}); call .contiguous() on it \
                 before saving",
                l.shape, l.stride
            )));
        }
        expected = expected
            .checked_mul(dim)
            .ok_or_else(|| fail(format!("size {:?} overflows", l.shape)))?;
    }
    let numel = expected;
    let element = l.storage.storage_type.element_size();
    let Some(data) = storage else {
        return Err(fail(format!("storage {} is missing", l.storage.key)));
    };
    let start = l.storage.view_offset.checked_add(l.offset);
    let end = start.and_then(|s| s.checked_add(numel));
    let (Some(start), Some(end)) = (start, end) else {
        return Err(fail("storage offset overflows".into()));
    };
    let view_end = l.storage.view_offset + l.storage.view_len;
    if end > view_end || end.saturating_mul(element) > data.len() {
        return Err(fail(format!(
            "reads elements {start}..{end} of storage {}, which holds {} (truncated or corrupt)",
            l.storage.key,
            (data.len() / element).min(view_end)
        )));
    }
    Ok(TorchTensor {
        name,
        storage_type: l.storage.storage_type,
        shape: l.shape,
        data: data[start * element..end * element].to_vec(),
    })
}
