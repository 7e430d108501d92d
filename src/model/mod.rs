//! The model: architecture spec, weights loading and conversion, and the forward-pass engines
//! behind one [`Model`] type that the batcher, `eval` and `bench` all use.

pub mod candle;
pub mod convert;
mod device;
pub mod embedded;
pub mod fast;
pub mod fetch;
pub mod fold;
mod options;
pub mod pytorch;
mod pytorch_pickle;
pub mod spec;
pub mod weights;

use candle_core::{Device, Module, Tensor};

use self::candle::BatchNormMode;
pub use device::{check_device, device_name, select_device};
pub use options::{DeviceChoice, EngineChoice, LoadOptions, SimdChoice};
pub use spec::{ModelSpec, Shortcut, INPUT_CHANNELS, INPUT_SIZE};
pub use weights::{Checkpoint, ModelMetadata, WeightsError, WeightsOrigin, WeightsSource};

/// Floats in one preprocessed image, `[3, 32, 32]`.
pub const IMAGE_FLOATS: usize = INPUT_CHANNELS * INPUT_SIZE * INPUT_SIZE;

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

/// Which forward-pass implementation a [`Model`] runs.
#[derive(Debug)]
enum Engine {
    Candle(candle::CandleResNet),
    Fast(fast::FastResNet),
}

/// A loaded, ready-to-run classifier.
#[derive(Debug)]
pub struct Model {
    pub spec: ModelSpec,
    pub metadata: ModelMetadata,
    /// Which weights were loaded: embedded or a file, and their sha256.
    pub weights: WeightsOrigin,
    device: Device,
    engine: Engine,
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
        let engine = match options.engine {
            EngineChoice::Fast if !on_cpu => {
                return Err(ModelError::Engine {
                    engine: options.engine,
                    device: device_name(&device),
                    reason: FAST_ENGINE_IS_CPU_ONLY.into(),
                })
            }
            EngineChoice::Fast | EngineChoice::Auto if on_cpu => Engine::Fast(
                fast::FastResNet::new(&spec, &tensors, options.simd, options.threads)?,
            ),
            _ => Engine::Candle(candle::CandleResNet::from_tensors(
                &spec,
                &tensors,
                &device,
                BatchNormMode::for_device(&device),
            )?),
        };
        Ok(Self {
            spec,
            metadata,
            weights: origin,
            device,
            engine,
        })
    }

    /// The device the forward pass runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The engine's name, as shown by `/v1/model`, `bench` and the metrics.
    pub fn engine_name(&self) -> String {
        match &self.engine {
            Engine::Candle(net) => match net.batch_norm_mode() {
                BatchNormMode::Separate => "candle".into(),
                BatchNormMode::Folded => "candle-folded".into(),
            },
            Engine::Fast(net) => net.name(),
        }
    }

    /// `[N, 3, 32, 32]` normalised images (any device) to `[N, classes]` logits on the model's device.
    pub fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let images = images.to_device(&self.device)?;
        match &self.engine {
            Engine::Candle(net) => net.forward(&images),
            Engine::Fast(net) => net.forward(&images),
        }
    }

    /// Logits for `n` normalised images laid out as `n * [3, 32, 32]` floats: `n * classes` floats.
    pub fn logits(&self, images: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        if images.len() != n * IMAGE_FLOATS {
            candle_core::bail!(
                "expected {} floats for {n} images, got {}",
                n * IMAGE_FLOATS,
                images.len()
            );
        }
        let input = Tensor::from_slice(
            images,
            (n, INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE),
            &self.device,
        )?;
        self.forward(&input)?.flatten_all()?.to_vec1()
    }
}
