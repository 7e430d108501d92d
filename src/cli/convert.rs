//! `convert`: the command line's normalisation, labels, name and provenance checked and turned
//! into [`ConvertOptions`], then [`convert::convert_file`].

use anyhow::Result;

use crate::cli::args::ConvertArgs;
use crate::model::convert::{self, ConvertError, ConvertOptions, Normalization};

impl TryFrom<&ConvertArgs> for ConvertOptions {
    type Error = ConvertError;

    /// The options the `convert` command line asks for; a malformed `--mean`/`--std` is an
    /// error naming the input file.
    fn try_from(args: &ConvertArgs) -> Result<Self, ConvertError> {
        let invalid = |reason: String| ConvertError::InvalidOption {
            path: args.input.clone(),
            reason,
        };
        let triple = |flag: &str, values: &[f32]| -> Result<[f32; 3], ConvertError> {
            values
                .try_into()
                .map_err(|_| invalid(format!("--{flag} takes 3 values, got {}", values.len())))
        };
        let normalization = match (&args.mean, &args.std, args.preset) {
            (Some(mean), Some(std), _) => Normalization::Explicit {
                mean: triple("mean", mean)?,
                std: triple("std", std)?,
            },
            (None, None, Some(preset)) => Normalization::Preset(preset),
            (None, None, None) => Normalization::Detect,
            _ => return Err(invalid("--mean and --std go together".into())),
        };
        let labels = args
            .labels
            .as_ref()
            .map(|labels| labels.iter().map(|l| l.trim().to_string()).collect());
        Ok(Self {
            normalization,
            labels,
            name: args.name.clone(),
            source: args.source.clone(),
        })
    }
}

/// The `convert` subcommand: read, convert, validate, write.
pub fn run(args: &ConvertArgs) -> Result<()> {
    let options = ConvertOptions::try_from(args)?;
    convert::convert_file(&args.input, &args.output, &options)?;
    Ok(())
}
