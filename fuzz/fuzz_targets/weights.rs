//! Fuzzes the weights loader: any bytes either load as a fully validated checkpoint or fail
//! with a `WeightsError`; never a panic or unbounded allocation.
//!
//! Each input is tried twice: as a whole safetensors file, and, when it is a JSON object, as
//! the header of one whose data section is zeros. The second form lets a few hundred bytes of
//! header reach the shape, dtype and metadata checks that a real file needs megabytes for.
#![no_main]

use std::path::Path;

use candle_core::DType;
use libfuzzer_sys::fuzz_target;
use resnet_serve::model::{Checkpoint, WeightsError};

/// Largest zeroed data section built for a header-only input.
const MAX_SYNTHETIC_DATA: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    check(Checkpoint::from_bytes(path, data));
    if let Some(file) = with_zeroed_data(data) {
        check(Checkpoint::from_bytes(path, &file));
    }
});

fn check(result: Result<Checkpoint, WeightsError>) {
    let Ok(checkpoint) = result else { return };
    let expected = checkpoint.spec.expected_tensors();
    assert_eq!(checkpoint.tensors.len(), expected.len());
    for want in &expected {
        let tensor = &checkpoint.tensors[&want.name];
        assert_eq!(tensor.dims(), want.shape.as_slice(), "{}", want.name);
        assert_eq!(tensor.dtype(), DType::F32, "{}", want.name);
    }
    let meta = &checkpoint.metadata;
    assert!(meta.mean.iter().all(|v| v.is_finite()));
    assert!(meta.std.iter().all(|v| v.is_finite() && *v > 0.0));
    assert_eq!(meta.labels.len(), checkpoint.spec.num_classes);
}

/// `data` as a safetensors header followed by as many zero bytes as its offsets reach.
fn with_zeroed_data(data: &[u8]) -> Option<Vec<u8>> {
    if data.first() != Some(&b'{') {
        return None;
    }
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(data).ok()?;
    let end = header
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .filter_map(|(_, info)| info.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if end > MAX_SYNTHETIC_DATA {
        return None;
    }
    let mut file = Vec::with_capacity(8 + data.len() + end as usize);
    file.extend_from_slice(&(data.len() as u64).to_le_bytes());
    file.extend_from_slice(data);
    file.resize(file.len() + end as usize, 0);
    Some(file)
}
