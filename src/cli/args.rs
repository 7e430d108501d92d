//! Command-line and environment configuration: every flag, its `RESNET_*` variable and default.
//! The defaults are read from the domain modules' option types (`LoadOptions`, `ServerConfig`,
//! `ConnectionLimits`, ...), which own them; the model's choices become clap values here.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::PossibleValue;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::connections::ConnectionLimits;
use crate::model::convert::NormalizationPreset;
use crate::model::fetch::{DEFAULT_SHA256, DEFAULT_URL};
use crate::model::weights::DEFAULT_WEIGHTS_PATH;
use crate::model::{DeviceChoice, EngineChoice, LoadOptions, SimdChoice};
use crate::server::ServerConfig;
use crate::telemetry::TelemetryOptions;

/// The HTTP port `serve` listens on and `healthcheck` asks, unless told otherwise.
pub const DEFAULT_PORT: u16 = 8080;

/// The gRPC port, unless told otherwise.
pub const DEFAULT_GRPC_PORT: u16 = 8081;

/// A default duration as the milliseconds its flag takes.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A default count as the `u32` its flag takes.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// resnet-serve: classify images with a CIFAR ResNet over HTTP.
#[derive(Debug, Parser)]
#[command(
    name = "resnet-serve",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Options of `serve`, which also runs when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Cli {
    /// The subcommand to run, `serve` when none was named.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve(ServeArgs),
    /// Convert a PyTorch checkpoint (.pth/.pt/.th) into a resnet-serve safetensors file.
    Convert(ConvertArgs),
    /// Download the default pretrained ResNet56, verify its sha256 and convert it.
    FetchWeights(FetchArgs),
    /// Top-1 accuracy (and agreement with reference logits) on a labelled image set.
    Eval(EvalArgs),
    /// Forward-pass throughput on preprocessed tensors, one JSON line per batch size.
    Bench(BenchArgs),
    /// Exit 0 when a local server answers `/health/live` (the container image's HEALTHCHECK).
    Healthcheck(HealthcheckArgs),
    /// Write the exact model input (normalised float32 [3,32,32]) of image files as safetensors.
    Preprocess(PreprocessArgs),
}

/// How to build the model: shared by every subcommand that runs it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Weights file (safetensors, the schema in weights/README.md). Default:
    /// weights/resnet56.safetensors when that file exists, else the pretrained ResNet56 built
    /// into the binary.
    #[arg(long, env = "RESNET_WEIGHTS")]
    pub weights: Option<PathBuf>,

    /// Device: auto, cpu, cuda or cuda:N (auto = CUDA when built with it and present).
    #[arg(long, env = "RESNET_DEVICE", default_value_t = LoadOptions::default().device)]
    pub device: DeviceChoice,

    /// Forward-pass implementation.
    #[arg(long, env = "RESNET_ENGINE", value_enum, default_value_t = LoadOptions::default().engine)]
    pub engine: EngineChoice,

    /// SIMD level of the fast CPU engine.
    #[arg(long, env = "RESNET_SIMD", value_enum, default_value_t = LoadOptions::default().simd)]
    pub simd: SimdChoice,

    /// Threads for the fast CPU engine (0 = one per available core).
    #[arg(long, env = "RESNET_THREADS", default_value_t = LoadOptions::default().threads)]
    pub threads: usize,

    /// On CUDA, replay the forward pass as a captured CUDA graph per batch size (false: launch
    /// its kernels one by one, as the first pass of each batch size does).
    #[arg(long, env = "RESNET_CUDA_GRAPHS", default_value_t = LoadOptions::default().cuda_graphs,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub cuda_graphs: bool,
}

impl From<&ModelArgs> for LoadOptions {
    fn from(args: &ModelArgs) -> Self {
        Self {
            weights: args.weights.clone(),
            device: args.device,
            engine: args.engine,
            simd: args.simd,
            threads: args.threads,
            cuda_graphs: args.cuda_graphs,
        }
    }
}

// The model's choices as clap values, by hand: the model module does not depend on clap. Names
// and help are what `#[derive(ValueEnum)]` made of the variants and their doc comments.

impl ValueEnum for EngineChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Auto, Self::Fast, Self::Candle]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Auto => {
                PossibleValue::new("auto").help("The fused CPU kernels on CPU, candle-nn on CUDA")
            }
            Self::Fast => PossibleValue::new("fast")
                .help("Batch-norm-folded, channels-last, fused SIMD kernels (CPU only)"),
            Self::Candle => PossibleValue::new("candle").help(
                "The plain candle-nn layers: the reference implementation, and the CUDA path \
                 (there with batch norm folded into the convolutions)",
            ),
        })
    }
}

impl ValueEnum for SimdChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Auto, Self::Avx512, Self::Avx2, Self::Scalar]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Auto => {
                PossibleValue::new("auto").help("The best the CPU supports, detected at run time")
            }
            Self::Avx512 => PossibleValue::new("avx512"),
            Self::Avx2 => PossibleValue::new("avx2"),
            Self::Scalar => {
                PossibleValue::new("scalar").help("Portable scalar code, correct everywhere")
            }
        })
    }
}

impl ValueEnum for NormalizationPreset {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Imagenet, Self::Notebook]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Imagenet => PossibleValue::new("imagenet").help(
                "mean 0.485,0.456,0.406 / std 0.229,0.224,0.225: what the public 2018 CIFAR \
                 ResNet checkpoints were trained with",
            ),
            Self::Notebook => PossibleValue::new("notebook")
                .help("mean 0.491,0.482,0.447 / std 0.247,0.243,0.262: the seed notebook's values"),
        })
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Address to listen on.
    #[arg(long, env = "RESNET_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on.
    #[arg(long, env = "RESNET_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// OpenTelemetry: the OTLP collector's base URL to export traces to (`http://HOST:4318`;
    /// `http://HOST:4317` with OTEL_EXPORTER_OTLP_PROTOCOL=grpc). Unset: no traces, unless the
    /// standard OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "RESNET_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Fraction of new traces sampled when exporting, 0 to 1 (a caller's `traceparent` decides
    /// for its own requests).
    #[arg(
        long,
        env = "RESNET_TRACE_SAMPLE_RATIO",
        default_value_t = TelemetryOptions::default().sample_ratio
    )]
    pub trace_sample_ratio: f64,

    /// Port of the gRPC API (the Open Inference Protocol and grpc.health.v1), on the same
    /// address; 0 turns it off.
    #[arg(long, env = "RESNET_GRPC_PORT", default_value_t = DEFAULT_GRPC_PORT)]
    pub grpc_port: u16,

    /// Threads that serve HTTP: connections, parsing, small image decodes and answers (0 = one
    /// per four cores when the model runs on the CPU, whose engine threads take every core; one
    /// per core when it may run on CUDA).
    #[arg(long, env = "RESNET_HTTP_THREADS", default_value_t = 0)]
    pub http_threads: usize,

    /// Most images in one forward pass.
    #[arg(
        long,
        env = "RESNET_MAX_BATCH_SIZE",
        default_value_t = count(ServerConfig::default().max_batch_size),
        value_parser = clap::value_parser!(u32).range(1..=4096)
    )]
    pub max_batch_size: u32,

    /// Extra wait to fill a batch, from when its oldest image was queued (as Triton's
    /// max_queue_delay). 0: a batch is whatever is queued when the model is free, no waiting.
    #[arg(
        long,
        env = "RESNET_MAX_BATCH_DELAY_MS",
        default_value_t = millis(ServerConfig::default().max_batch_delay)
    )]
    pub max_batch_delay_ms: u64,

    /// Images that may wait in the queue; beyond that requests get 429.
    #[arg(
        long,
        env = "RESNET_QUEUE_CAPACITY",
        default_value_t = count(ServerConfig::default().queue_capacity),
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub queue_capacity: u32,

    /// Deadline for a request from arrival to answer; past it while queued: 504.
    #[arg(
        long,
        env = "RESNET_REQUEST_TIMEOUT_MS",
        default_value_t = millis(ServerConfig::default().request_timeout)
    )]
    pub request_timeout_ms: u64,

    /// Largest accepted request body.
    #[arg(
        long,
        env = "RESNET_MAX_BODY_BYTES",
        default_value_t = ServerConfig::default().max_body_bytes
    )]
    pub max_body_bytes: usize,

    /// Largest image (width x height, as its header declares) that is decoded.
    #[arg(
        long,
        env = "RESNET_MAX_IMAGE_PIXELS",
        default_value_t = ServerConfig::default().max_image_pixels
    )]
    pub max_image_pixels: u64,

    /// Decode a truncated or damaged JPEG as far as it goes (the rest black) instead of refusing
    /// it with 422, as Pillow does with `ImageFile.LOAD_TRUNCATED_IMAGES = True`: for models
    /// whose training pipeline set it.
    #[arg(long, env = "RESNET_LOAD_TRUNCATED_IMAGES", value_parser = clap::builder::BoolishValueParser::new())]
    pub load_truncated_images: bool,

    /// Open connections served at once; further clients wait in the accept backlog.
    #[arg(
        long,
        env = "RESNET_MAX_CONNECTIONS",
        default_value_t = count(ConnectionLimits::default().max_connections),
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,

    /// Deadline for a request's headers, from when the server starts waiting for them (a new
    /// or idle kept-alive connection); past it the connection is closed.
    #[arg(
        long,
        env = "RESNET_HEADER_READ_TIMEOUT_MS",
        default_value_t = millis(ConnectionLimits::default().header_read_timeout),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub header_read_timeout_ms: u64,

    /// On SIGTERM/SIGINT, how long open connections may take to finish before they are closed.
    #[arg(
        long,
        env = "RESNET_SHUTDOWN_TIMEOUT_MS",
        default_value_t = millis(ConnectionLimits::default().shutdown_timeout)
    )]
    pub shutdown_timeout_ms: u64,

    /// Log format.
    #[arg(long, env = "RESNET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// No effect: `serve` never downloads weights. Still accepted so that configurations
    /// written for earlier versions start.
    #[arg(long, env = "RESNET_OFFLINE", hide = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub offline: bool,

    /// Require `Authorization: Bearer <key>` on every route but the health probes,
    /// `/openapi.yaml` and (unless --metrics-require-auth) `/metrics`.
    #[arg(
        long,
        env = "RESNET_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Option<String>,

    /// Like --api-key, the key read from this file (a mounted secret; one trailing newline is
    /// dropped).
    #[arg(long, env = "RESNET_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// With an API key, require it on `/metrics` too.
    #[arg(long, env = "RESNET_METRICS_REQUIRE_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_require_auth: bool,

    /// Answer browsers from these origins with CORS headers: comma-separated origins
    /// (`https://app.example,http://localhost:3000`) or `*`. Off by default.
    #[arg(long, env = "RESNET_CORS_ALLOW_ORIGIN")]
    pub cors_allow_origin: Option<String>,
}

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Normalisation: the mean/std stored in the file must be the ones the model \
was trained with, or accuracy drops quietly. --mean/--std store given values; --preset stores a \
named pair. With neither, a paper-style checkpoint (layer*/linear names and zero-pad shortcut, \
like the public 2018 CIFAR ResNets) gets the imagenet preset, with a warning; any other gets \
the notebook preset."
)]
pub struct ConvertArgs {
    /// PyTorch checkpoint: zip (torch.save >= 1.6) or legacy format; a state dict or
    /// {"state_dict": ...}, `module.` prefix and layer*/linear names accepted.
    pub input: PathBuf,
    /// Output safetensors file (written atomically; parent directories are created).
    pub output: PathBuf,
    /// Training normalisation mean, three comma-separated floats (needs --std).
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 1,
        requires = "std",
        allow_negative_numbers = true
    )]
    pub mean: Option<Vec<f32>>,
    /// Training normalisation std, three comma-separated floats (needs --mean).
    #[arg(long, value_delimiter = ',', num_args = 1, requires = "mean")]
    pub std: Option<Vec<f32>>,
    /// Class labels, comma-separated, one per class (default: the CIFAR-10 names for 10 classes).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Model name shown by the API (default: resnet{depth}).
    #[arg(long)]
    pub name: Option<String>,
    /// Normalisation preset (default: detected, see below).
    #[arg(long, value_enum, conflicts_with_all = ["mean", "std"])]
    pub preset: Option<NormalizationPreset>,
    /// Provenance text stored as metadata and shown by `/v1/model` (default: `converted from
    /// INPUT`): where the checkpoint came from, its authors and licence.
    #[arg(long)]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// Where to download the checkpoint from. It is converted with the imagenet normalisation
    /// and the name resnet56, as the default checkpoint needs; convert other checkpoints with
    /// `convert`.
    #[arg(long, env = "RESNET_WEIGHTS_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Expected sha256 of the download (hex).
    #[arg(long, env = "RESNET_WEIGHTS_SHA256", default_value = DEFAULT_SHA256)]
    pub sha256: String,
    /// Output safetensors file (written atomically; parent directories are created). Shares
    /// `RESNET_WEIGHTS` with `serve`, so a fetch writes where the server reads.
    #[arg(long, env = "RESNET_WEIGHTS", default_value = DEFAULT_WEIGHTS_PATH)]
    pub output: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Labelled images: safetensors with `images` u8 [N,3,32,32] and `labels` i64 [N].
    #[arg(long)]
    pub data: PathBuf,
    /// Reference logits (safetensors) to compare against.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Tensor in --reference holding [N,classes] logits.
    #[arg(long, default_value = "logits")]
    pub reference_key: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub batch_sizes: Vec<usize>,
    /// Measured seconds per batch size (after warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Print JSON lines (the default output is JSON lines too; kept for symmetry with eval).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// Address of the server to check.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Its port (`RESNET_PORT`, so it follows the server's configuration).
    #[arg(long, env = "RESNET_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// How long to wait for the answer.
    #[arg(long, default_value_t = 2_000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Each image is decoded, resized, cropped and normalised exactly as `serve` does \
(and as torchvision does on the PIL image), with the mean/std stored in the weights file. Output: \
one float32 [3,32,32] tensor per image, named by its file name. A file the service would refuse \
is reported with the status and error code the API would answer; then nothing is written and \
the exit status is non-zero."
)]
pub struct PreprocessArgs {
    /// Image files (PNG, JPEG, GIF, BMP, WebP, TIFF).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Weights file whose normalisation (mean/std) is applied; by default the weights `serve`
    /// would use (weights/resnet56.safetensors when it exists, else the built-in model).
    #[arg(long, env = "RESNET_WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// Output safetensors file (written atomically; parent directories are created).
    #[arg(long, short)]
    pub output: PathBuf,
    /// As `serve --max-image-pixels`.
    #[arg(
        long,
        env = "RESNET_MAX_IMAGE_PIXELS",
        default_value_t = ServerConfig::default().max_image_pixels
    )]
    pub max_image_pixels: u64,
    /// As `serve --load-truncated-images`.
    #[arg(long, env = "RESNET_LOAD_TRUNCATED_IMAGES", value_parser = clap::builder::BoolishValueParser::new())]
    pub load_truncated_images: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::auth::AccessOptions;
    use crate::model::fetch::FetchOptions;

    fn serve_args(argv: &[&str]) -> ServeArgs {
        match Cli::try_parse_from(argv).unwrap().into_command() {
            Command::Serve(args) => args,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn no_subcommand_means_serve_with_defaults() {
        let args = serve_args(&["resnet-serve", "--port", "9000"]);
        assert_eq!(args.port, 9000);
        assert_eq!(args.model.weights, None);
        assert!(!args.offline);
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// Whether a flag's `RESNET_*` variable is set here (then the defaults cannot be checked,
    /// and the test says so).
    fn flag_variables_set() -> bool {
        fn walk(command: &clap::Command, set: &mut Vec<String>) {
            for arg in command.get_arguments() {
                if let Some(name) = arg.get_env().filter(|n| std::env::var_os(n).is_some()) {
                    set.push(name.to_string_lossy().into_owned());
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, set);
            }
        }
        let mut set = Vec::new();
        walk(&<Cli as clap::CommandFactory>::command(), &mut set);
        if !set.is_empty() {
            eprintln!("skipped: flag variables set in this environment: {set:?}");
        }
        !set.is_empty()
    }

    #[test]
    fn serve_flags_default_to_the_domain_defaults() {
        if flag_variables_set() {
            return;
        }
        let args = serve_args(&["resnet-serve"]);
        assert_eq!(LoadOptions::from(&args.model), LoadOptions::default());
        assert_eq!(ServerConfig::from(&args), ServerConfig::default());
        assert_eq!(ConnectionLimits::from(&args), ConnectionLimits::default());
        assert_eq!(TelemetryOptions::from(&args), TelemetryOptions::default());
        assert_eq!(AccessOptions::from(&args), AccessOptions::default());
    }

    #[test]
    fn cuda_graphs_are_on_unless_turned_off() {
        if flag_variables_set() {
            return;
        }
        assert!(serve_args(&["resnet-serve"]).model.cuda_graphs);
        for off in ["false", "0", "off"] {
            let args = serve_args(&["resnet-serve", "--cuda-graphs", off]);
            assert!(
                !LoadOptions::from(&args.model).cuda_graphs,
                "--cuda-graphs {off}"
            );
        }
        assert!(
            serve_args(&["resnet-serve", "--cuda-graphs", "true"])
                .model
                .cuda_graphs
        );
    }

    /// Every variant has a value, and each parses back to itself.
    fn round_trips<T: ValueEnum + PartialEq + std::fmt::Debug>() {
        for variant in T::value_variants() {
            let value = variant.to_possible_value().expect("no variant is skipped");
            assert_eq!(T::from_str(value.get_name(), false).as_ref(), Ok(variant));
        }
    }

    #[test]
    fn fetch_flags_default_to_the_fetch_defaults() {
        if flag_variables_set() {
            return;
        }
        let cli = Cli::try_parse_from(["resnet-serve", "fetch-weights"]).unwrap();
        let Command::FetchWeights(args) = cli.into_command() else {
            panic!("expected fetch-weights");
        };
        assert_eq!(FetchOptions::from(&args), FetchOptions::default());
    }

    #[test]
    fn hand_written_value_enums_round_trip() {
        round_trips::<EngineChoice>();
        round_trips::<SimdChoice>();
        round_trips::<NormalizationPreset>();
    }
}
