//! The pretrained ResNet56 compiled into the binary (cargo feature `embedded-weights`, on by
//! default), so a fresh build serves real predictions without a download or a weights file.
//!
//! The file is `weights/resnet56-4bfd9763.safetensors`: the public CIFAR-10 ResNet56 checkpoint
//! `resnet56-4bfd9763.th` (He et al. 2015, trained by Yerlan Idelbayev, BSD-2-Clause, licence in
//! `weights/LICENSE-resnet56-4bfd9763.txt`) converted by `resnet-serve convert --preset imagenet`.

/// What `/v1/model` and the startup log call the embedded weights.
pub const EMBEDDED_LABEL: &str = "embedded:resnet56-4bfd9763";

/// The embedded safetensors file, or `None` in a build without the `embedded-weights` feature.
pub fn bytes() -> Option<&'static [u8]> {
    #[cfg(feature = "embedded-weights")]
    {
        /// `include_bytes!` guarantees no alignment; safetensors data is read as `f32`s, so the
        /// file is kept 8-byte aligned like a memory map would be (its header is padded to 8).
        #[repr(C, align(8))]
        struct Aligned<T: ?Sized>(T);
        static FILE: &Aligned<[u8]> = &Aligned(*include_bytes!(
            "../../weights/resnet56-4bfd9763.safetensors"
        ));
        Some(&FILE.0)
    }
    #[cfg(not(feature = "embedded-weights"))]
    {
        None
    }
}
