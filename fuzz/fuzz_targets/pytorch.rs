//! Fuzzes the PyTorch checkpoint reader and `convert`: any bytes either yield tensors whose data
//! matches their shape and type, and then a loadable weights file or a `ConvertError`; never a
//! panic, stack overflow or unbounded allocation.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use resnet_serve::model::convert::{convert_bytes, ConvertOptions};
use resnet_serve::model::pytorch::read_state_dict;
use resnet_serve::model::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let input = Path::new("fuzz.pth");
    let Ok(state_dict) = read_state_dict(input, data) else {
        return;
    };
    for tensor in &state_dict.tensors {
        let numel: usize = tensor.shape.iter().product();
        assert_eq!(
            tensor.data.len(),
            numel * tensor.storage_type.element_size(),
            "{}",
            tensor.name
        );
    }
    let output = Path::new("fuzz.safetensors");
    if let Ok(converted) = convert_bytes(input, data, &ConvertOptions::default(), output) {
        let checkpoint = Checkpoint::from_bytes(output, &converted.bytes)
            .expect("convert validates what it writes");
        assert_eq!(checkpoint.spec, converted.spec);
    }
});
