//! The command line: [`args`], every flag of every subcommand with its `RESNET_*` variable, and
//! each subcommand's handler, which turns flags into the domain modules' options: `serve` (the
//! API, with [`logging`] and trace export), `convert` (a PyTorch checkpoint to a weights file),
//! `fetch-weights` (the pretrained checkpoint), `eval` (accuracy and parity), `bench`
//! (throughput), `preprocess` (the exact model input of image files) and `healthcheck` (the
//! container image's liveness check).

pub mod args;
pub mod bench;
pub mod convert;
pub mod eval;
pub mod fetch;
pub mod healthcheck;
pub mod logging;
pub mod preprocess;
pub mod serve;
