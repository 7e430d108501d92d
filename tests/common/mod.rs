//! Test helpers shared by the integration tests: where the shared reference data lives.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The shared reference data directory (`RESNET_SHARED_DIR`, default `../shared`), or `None`
/// after a loud SKIPPED line when it is absent. With `REQUIRE_SHARED_DATA=1` absence fails the test.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("RESNET_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if dir.join("README.md").is_file() {
        return Some(dir);
    }
    let required = std::env::var("REQUIRE_SHARED_DATA").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "REQUIRE_SHARED_DATA=1 but the shared data directory {} is missing (set RESNET_SHARED_DIR)",
        dir.display()
    );
    eprintln!(
        "SKIPPED: shared data directory {} not found (set RESNET_SHARED_DIR); this test did not run",
        dir.display()
    );
    None
}

/// A file under the shared directory, or `None` (skipping loudly) when the directory is absent.
pub fn shared_file(relative: &str) -> Option<PathBuf> {
    let path = shared_dir()?.join(relative);
    assert!(
        path.exists(),
        "shared data file {} is missing",
        path.display()
    );
    Some(path)
}

/// The `resnet-serve` binary built for this test run.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_resnet-serve"))
}

/// Runs the binary with `args`, returning (exit success, stdout, stderr).
pub fn run_cli(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = std::process::Command::new(binary())
        .args(args)
        .env_remove("RESNET_WEIGHTS")
        .output()
        .expect("the resnet-serve binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
