//! The model: architecture spec, weights loading and conversion, and the forward-pass engines
//! behind the one slice-based [`Engine`] trait, which [`Model`] (the loaded, chosen engine with
//! its description) implements for the batcher, `eval` and `bench`.

pub mod candle;
pub mod convert;
#[cfg(feature = "cuda")]
mod cuda_graphs;
mod device;
pub mod embedded;
pub mod engine;
pub mod fast;
pub mod fetch;
pub mod fold;
mod options;
pub mod pytorch;
mod pytorch_pickle;
pub mod spec;
pub mod weights;

use candle_core::Device;

use self::candle::{BatchNormMode, CandleEngine};
pub use device::{check_device, device_name, may_use_cuda, select_device};
pub use engine::{Engine, EngineError, FedBatch, Feed};
pub use options::{DeviceChoice, EngineChoice, LoadOptions, SimdChoice};
pub use spec::{ModelSpec, Shortcut, IMAGE_FLOATS, INPUT_CHANNELS, INPUT_SIZE};
pub use weights::{Checkpoint, ModelMetadata, WeightsError, WeightsOrigin, WeightsSource};

/// Why a model could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("device {device}: {reason}")]
    Device {
        device: DeviceChoice,
        reason: String,
    },
    #[error("engine {engine:?} cannot run on {device}: {reason}")]
    Engine {
        engine: EngineChoice,
        device: String,
        reason: String,
    },
    #[error("building the model: {0}")]
    Build(#[from] candle_core::Error),
    #[error("fast CPU engine: {0}")]
    Fast(#[from] fast::FastError),
}

const FAST_ENGINE_IS_CPU_ONLY: &str =
    "the fast engine runs on the CPU only (use --engine candle or auto, or --device cpu)";

/// A loaded, ready-to-run classifier: the chosen engine and what it runs.
pub struct Model {
    pub spec: ModelSpec,
    pub metadata: ModelMetadata,
    /// Which weights were loaded: embedded or a file, and their sha256.
    pub weights: WeightsOrigin,
    device: Device,
    engine_name: String,
    engine: Box<dyn Engine>,
}

impl Model {
    /// Loads the weights the options name (or the default ones, see
    /// [`WeightsSource::resolve`]) and builds the engine they ask for.
    pub fn load(options: &LoadOptions) -> Result<Self, ModelError> {
        let source = WeightsSource::resolve(options.weights.as_deref())?;
        let checkpoint = Checkpoint::load_source(&source)?;
        Self::from_checkpoint(checkpoint, options)
    }

    /// Builds the engine the options ask for from already loaded weights (their `weights` is
    /// not read).
    pub fn from_checkpoint(
        checkpoint: Checkpoint,
        options: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let device = select_device(options.device)?;
        let Checkpoint {
            spec,
            metadata,
            tensors,
            origin,
        } = checkpoint;
        let on_cpu = device.is_cpu();
        let (engine_name, engine): (String, Box<dyn Engine>) = match options.engine {
            EngineChoice::Fast if !on_cpu => {
                return Err(ModelError::Engine {
                    engine: options.engine,
                    device: device_name(&device),
                    reason: FAST_ENGINE_IS_CPU_ONLY.into(),
                })
            }
            EngineChoice::Fast | EngineChoice::Auto if on_cpu => {
                let net = fast::FastResNet::new(&spec, &tensors, options.simd, options.threads)?;
                (net.name(), Box::new(net))
            }
            _ => {
                let mode = BatchNormMode::for_device(&device);
                let net = candle::CandleResNet::from_tensors(&spec, &tensors, &device, mode)?;
                let name = match mode {
                    BatchNormMode::Separate => "candle",
                    BatchNormMode::Folded => "candle-folded",
                };
                (
                    name.into(),
                    Box::new(CandleEngine::new(net, device.clone(), options.cuda_graphs)),
                )
            }
        };
        Ok(Self {
            spec,
            metadata,
            weights: origin,
            device,
            engine_name,
            engine,
        })
    }

    /// The device the forward pass runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The engine's name, as shown by `/v1/model`, `bench` and the metrics.
    pub fn engine_name(&self) -> &str {
        &self.engine_name
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("spec", &self.spec)
            .field("weights", &self.weights)
            .field("device", &self.device)
            .field("engine", &self.engine_name)
            .finish_non_exhaustive()
    }
}

impl Engine for Model {
    fn logits(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>, EngineError> {
        self.engine.logits(images, n)
    }

    fn serve(&mut self, feed: &dyn Feed) {
        self.engine.serve(feed);
    }
}
