//! The `resnet-serve` binary: parse the configuration, set up logging, run the subcommand.

use std::process::ExitCode;

use clap::Parser;
use resnet_serve::config::{Cli, Command};

fn main() -> ExitCode {
    let command = Cli::parse().into_command();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match &command {
        Command::Eval(args) => resnet_serve::cli::eval::run(args),
        Command::Bench(args) => resnet_serve::cli::bench::run(args),
        Command::Convert(args) => resnet_serve::model::convert::run(args)
            .map(|_| ())
            .map_err(Into::into),
        Command::FetchWeights(args) => resnet_serve::model::fetch::fetch_weights(args)
            .map(|_| ())
            .map_err(Into::into),
        Command::Serve(_) => Err(anyhow::anyhow!("not available in this build yet")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
