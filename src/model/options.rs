//! How to load a model: the device, engine and SIMD choices, and [`LoadOptions`], which
//! [`super::Model::load`] takes, with their defaults.

use std::path::PathBuf;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA when built with it and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, got {other:?}")),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Which implementation of the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// The fused CPU kernels on CPU, candle-nn on CUDA.
    #[default]
    Auto,
    /// Batch-norm-folded, channels-last, fused SIMD kernels (CPU only).
    Fast,
    /// The plain candle-nn layers: the reference implementation, and the CUDA path (there with
    /// batch norm folded into the convolutions).
    Candle,
}

/// SIMD instruction set for the fast CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimdChoice {
    /// The best the CPU supports, detected at run time.
    #[default]
    Auto,
    Avx512,
    Avx2,
    /// Portable scalar code, correct everywhere.
    Scalar,
}

impl SimdChoice {
    /// The name `--simd` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2",
            Self::Scalar => "scalar",
        }
    }
}

/// How to build a [`super::Model`]: which weights, where, and with which engine. The defaults
/// are the command line's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Weights file; `None`: the default file when it exists, else the embedded weights (see
    /// [`super::WeightsSource::resolve`]).
    pub weights: Option<PathBuf>,
    pub device: DeviceChoice,
    pub engine: EngineChoice,
    /// SIMD level of the fast CPU engine.
    pub simd: SimdChoice,
    /// Threads for the fast CPU engine (0 = one per available core).
    pub threads: usize,
    /// On CUDA, replay each batch size's forward pass as a captured CUDA graph (`cuda_graphs.rs`)
    /// instead of launching its kernels one by one.
    pub cuda_graphs: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights: None,
            device: DeviceChoice::default(),
            engine: EngineChoice::default(),
            simd: SimdChoice::default(),
            threads: 0,
            cuda_graphs: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse() {
        assert_eq!("cuda:1".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(1)));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn device_choices_display_as_they_parse() {
        for device in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(3)] {
            assert_eq!(device.to_string().parse::<DeviceChoice>(), Ok(device));
        }
    }
}
