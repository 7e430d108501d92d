//! resnet-serve: an HTTP inference service for CIFAR ResNets.
//!
//! - [`config`]: every flag and its `RESNET_*` environment variable.
//! - [`model`]: architecture spec, weights loading, PyTorch conversion, download, and the
//!   forward-pass engines behind one [`model::Model`].
//! - [`preprocess`]: image bytes to normalised tensors, as torchvision does.
//! - [`cli`]: the offline subcommands `eval` and `bench`.

pub mod cli;
pub mod config;
pub mod model;
pub mod preprocess;
