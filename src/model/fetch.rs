//! `fetch-weights`: download the default pretrained checkpoint, verify it, convert it.

/// The public pretrained ResNet56 (BSD-2-Clause, Yerlan Idelbayev).
pub const DEFAULT_URL: &str =
    "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet56-4bfd9763.th";
/// sha256 of [`DEFAULT_URL`]'s file.
pub const DEFAULT_SHA256: &str = "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367";
