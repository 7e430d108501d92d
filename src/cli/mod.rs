//! The offline subcommands: `eval` (accuracy and parity), `bench` (throughput) and
//! `preprocess` (the exact model input of image files).

pub mod bench;
pub mod eval;
pub mod preprocess;
