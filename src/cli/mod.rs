//! Subcommands besides `serve`: `eval` (accuracy and parity), `bench` (throughput) and
//! `healthcheck` (the container image's liveness check).

pub mod bench;
pub mod eval;
pub mod healthcheck;
