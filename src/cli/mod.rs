//! Subcommands besides `serve`: `eval` (accuracy and parity), `bench` (throughput),
//! `preprocess` (the exact model input of image files) and `healthcheck` (the container image's
//! liveness check); and [`args`], every flag of every subcommand with its `RESNET_*` variable.

pub mod args;
pub mod bench;
pub mod eval;
pub mod healthcheck;
pub mod preprocess;
