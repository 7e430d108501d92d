//! The `resnet-serve` binary: its global allocator; parse the command line, set up logging (`serve`
//! sets up its own), run the subcommand's handler from [`resnet_serve::cli`].

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use resnet_serve::cli;
use resnet_serve::cli::args::{Cli, Command, LogFormat};

/// mimalloc instead of the system allocator: a request's body, pixels and response are allocated
/// and freed on the runtime worker and its batch on the model thread, which mimalloc does with less
/// work than glibc's malloc; and it backs its memory with transparent huge pages where the kernel
/// allows them (also in `madvise` mode), which makes the engine's batch-1 passes faster (likely
/// fewer TLB misses on its weights and activations) at the cost of a larger resident set. The
/// README has the figures; `MIMALLOC_ALLOW_THP=0` turns the huge pages off.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    #[cfg(feature = "cuda")]
    keep_cuda_math_fp32();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let command = cli.into_command();
    if !matches!(command, Command::Serve(_)) {
        cli::logging::init_tracing(LogFormat::Text, None);
    }
    let result = match &command {
        // Sets up its own logging: trace export needs its runtime first.
        Command::Serve(args) => cli::serve::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Preprocess(args) => cli::preprocess::run(args),
        Command::Convert(args) => cli::convert::run(args),
        Command::FetchWeights(args) => cli::fetch::run(args),
        Command::Healthcheck(args) => cli::healthcheck::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// cuDNN may run FP32 convolutions on TF32 tensor cores (10-bit mantissa) by default on Ampere
/// and newer GPUs, enough over 56 layers to move the logits past the 1e-3 the service matches
/// PyTorch's FP32 to. Ask NVIDIA's libraries for FP32 unless the environment says otherwise
/// (`NVIDIA_TF32_OVERRIDE=1` leaves TF32 allowed).
#[cfg(feature = "cuda")]
fn keep_cuda_math_fp32() {
    if std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() {
        // Before any thread exists, so nothing reads the environment while it changes.
        std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    }
}
