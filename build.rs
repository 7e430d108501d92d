//! Builds `src/preprocess/jpeg/pillow_decode.c`, the libjpeg API driver that decodes JPEG as
//! Pillow does, against the headers of the libjpeg-turbo that `turbojpeg-sys` builds from source;
//! and generates the gRPC server code of `proto/grpc_predict_v2.proto` (`src/grpc/`), compiling
//! the proto in Rust, so no `protoc` is needed.

use std::env;
use std::path::PathBuf;

fn main() {
    build_pillow_jpeg_shim();
    generate_grpc_code();
}

fn generate_grpc_code() {
    const PROTO: &str = "proto/grpc_predict_v2.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = match protox::compile([PROTO], ["proto"]) {
        Ok(descriptors) => descriptors,
        Err(e) => panic!("{PROTO} does not compile: {e:?}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        // The client too: the tests and Rust users call the service with it.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .bytes(".inference.InferTensorContents.bytes_contents")
        .compile_fds(descriptors)
    {
        panic!("generating the gRPC code of {PROTO}: {e}");
    }
}

fn build_pillow_jpeg_shim() {
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
