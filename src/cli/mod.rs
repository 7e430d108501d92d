//! The offline subcommands: `eval` (accuracy and parity) and `bench` (throughput).

pub mod bench;
pub mod eval;
