//! `convert`: PyTorch checkpoints (zip and legacy formats) to resnet-serve safetensors files.
