//! Builds `src/preprocess/jpeg/pillow_decode.c`, the libjpeg API driver that decodes JPEG as
//! Pillow does, against the headers of the libjpeg-turbo that `turbojpeg-sys` builds from source.

use std::env;
use std::path::PathBuf;

fn main() {
    const SHIM: &str = "src/preprocess/jpeg/pillow_decode.c";
    println!("cargo:rerun-if-changed={SHIM}");
    // `turbojpeg-sys` (links = "turbojpeg") exports its installed include directories.
    let includes = env::var("DEP_TURBOJPEG_INCLUDE").unwrap_or_default();
    let includes: Vec<PathBuf> = includes
        .split(',')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect();
    if !includes.iter().any(|dir| dir.join("jpeglib.h").is_file()) {
        panic!(
            "jpeglib.h not found in the include directories turbojpeg-sys reports ({includes:?}); \
             the vendored libjpeg-turbo build (cmake and nasm) must succeed first"
        );
    }
    cc::Build::new()
        .file(SHIM)
        .includes(&includes)
        .warnings(true)
        .compile("resnet_serve_pillow_jpeg");
}
