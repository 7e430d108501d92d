//! `fetch-weights`: the command line's URL, checksum and output as [`FetchOptions`], then
//! [`fetch_weights`].

use anyhow::Result;

use crate::cli::args::FetchArgs;
use crate::model::fetch::{fetch_weights, FetchOptions};

impl From<&FetchArgs> for FetchOptions {
    fn from(args: &FetchArgs) -> Self {
        Self {
            url: args.url.clone(),
            sha256: args.sha256.clone(),
            output: args.output.clone(),
        }
    }
}

/// The `fetch-weights` subcommand: download, verify, convert, write.
pub fn run(args: &FetchArgs) -> Result<()> {
    fetch_weights(&FetchOptions::from(args))?;
    Ok(())
}
