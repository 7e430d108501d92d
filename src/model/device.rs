//! Choosing the device: `--device` resolved to a candle device, with CUDA driver failures told
//! in words (what was not found, and how to run on the CPU) rather than as a driver error code.

use candle_core::Device;

use super::{DeviceChoice, ModelError};

/// How to get going without a GPU; ends every CUDA device error.
const RUN_ON_CPU: &str =
    "to run on the CPU use --device cpu, or --device auto to use a GPU only when one is usable";

/// Resolves `--device` to a candle device. `auto` falls back to the CPU, with a warning, when
/// this build has CUDA but no usable GPU.
pub fn select_device(choice: DeviceChoice) -> Result<Device, ModelError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if candle_core::utils::cuda_is_available() => match open_cuda(0) {
            Ok(device) => Ok(device),
            Err(reason) => {
                tracing::warn!(%reason, "CUDA is compiled in but unusable; running on the CPU");
                Ok(Device::Cpu)
            }
        },
        DeviceChoice::Auto => Ok(Device::Cpu),
        DeviceChoice::Cuda(ordinal) => open_cuda(ordinal).map_err(|r| unusable(choice, r)),
    }
}

/// Whether `choice` may resolve to a GPU: `cuda:N`, or `auto` in a build with CUDA, as
/// [`select_device`] decides before it opens anything.
pub fn may_use_cuda(choice: DeviceChoice) -> bool {
    match choice {
        DeviceChoice::Cpu => false,
        DeviceChoice::Cuda(_) => true,
        DeviceChoice::Auto => candle_core::utils::cuda_is_available(),
    }
}

/// Fails, as [`select_device`] would, when `choice` names a CUDA device this build or machine
/// cannot open; cheap (no CUDA context is made), so a server can check before anything slower.
pub fn check_device(choice: DeviceChoice) -> Result<(), ModelError> {
    match choice {
        DeviceChoice::Cpu | DeviceChoice::Auto => Ok(()),
        DeviceChoice::Cuda(ordinal) => probe_cuda(ordinal).map_err(|r| unusable(choice, r)),
    }
}

/// A short, stable name for a device: `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn unusable(device: DeviceChoice, reason: String) -> ModelError {
    ModelError::Device {
        device,
        reason: format!("{reason}; {RUN_ON_CPU}"),
    }
}

/// Opens CUDA device `ordinal`, or says why not.
fn open_cuda(ordinal: usize) -> Result<Device, String> {
    // Ask the driver first: it answers quickly and with a reason, before any context is made.
    probe_cuda(ordinal)?;
    let device = Device::new_cuda(ordinal).map_err(|e| describe(&e))?;
    #[cfg(feature = "cuda")]
    cuda::track_no_events(&device);
    Ok(device)
}

/// Whether the driver has GPU `ordinal`, or why not.
#[cfg(feature = "cuda")]
fn probe_cuda(ordinal: usize) -> Result<(), String> {
    cuda::probe(ordinal)
}

/// This build has no CUDA: say so, and how to get it.
#[cfg(not(feature = "cuda"))]
fn probe_cuda(_ordinal: usize) -> Result<(), String> {
    Err("this binary was built without CUDA support \
         (rebuild with --features cuda,cudnn, e.g. scripts/build-cuda.sh)"
        .into())
}

#[cfg(feature = "cuda")]
use cuda::describe;

/// Without CUDA, `Device::new_cuda` is never reached: the probe fails first.
#[cfg(not(feature = "cuda"))]
fn describe(error: &candle_core::Error) -> String {
    error.to_string()
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Questions to the CUDA driver, and its errors in words.

    use candle_core::cuda::cudarc::driver::{result, sys::CUresult, DriverError};
    use candle_core::cuda::CudaError;

    /// Initialises the driver and checks that GPU `ordinal` exists.
    pub(super) fn probe(ordinal: usize) -> Result<(), String> {
        result::init().map_err(|e| explain(&e))?;
        let count = result::device::get_count().map_err(|e| explain(&e))?;
        let count = usize::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(match count {
                0 => "no CUDA device found: the NVIDIA driver reports no GPU".into(),
                n => format!(
                    "no CUDA device cuda:{ordinal}: the NVIDIA driver reports {n} GPU(s), \
                     cuda:0 to cuda:{}",
                    n - 1
                ),
            });
        }
        Ok(())
    }

    /// Stops the device's buffers from recording CUDA events for each use. Events order the
    /// work of several streams on one buffer, and a stream being captured into a CUDA graph
    /// must not wait on an event recorded outside the capture (see `model/cuda_graphs.rs`).
    pub(super) fn track_no_events(device: &candle_core::Device) {
        if let candle_core::Device::Cuda(cuda) = device {
            // SAFETY: the contract is to order, by hand, uses of one buffer on several streams.
            // candle issues all of a device's work on the one stream it made with the device,
            // and this crate makes no other, so every use of a buffer is ordered by that stream.
            unsafe { cuda.disable_event_tracking() };
        }
    }

    /// A candle error, in words when it is a CUDA driver error.
    pub(super) fn describe(error: &candle_core::Error) -> String {
        driver_error(error).map_or_else(|| error.to_string(), explain)
    }

    /// The driver error inside a candle error, through any context or backtrace around it.
    fn driver_error(error: &candle_core::Error) -> Option<&DriverError> {
        match error {
            candle_core::Error::Cuda(inner) => match inner.downcast_ref::<CudaError>() {
                Some(CudaError::Cuda(driver)) => Some(driver),
                _ => inner.downcast_ref::<DriverError>(),
            },
            candle_core::Error::WithBacktrace { inner, .. }
            | candle_core::Error::Context { inner, .. }
            | candle_core::Error::WithPath { inner, .. } => driver_error(inner),
            _ => None,
        }
    }

    /// What a driver error means for someone starting the server.
    fn explain(error: &DriverError) -> String {
        let code = error.0;
        let detail = error
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let what = match code {
            CUresult::CUDA_ERROR_NO_DEVICE => {
                "no CUDA device found: the NVIDIA driver reports no GPU"
            }
            CUresult::CUDA_ERROR_STUB_LIBRARY => {
                "no CUDA driver found: libcuda.so.1 is the CUDA toolkit's stub, not an NVIDIA \
                 driver (in a container, start it with GPU access, e.g. docker run --gpus all)"
            }
            CUresult::CUDA_ERROR_INVALID_DEVICE => "no such CUDA device",
            CUresult::CUDA_ERROR_NOT_INITIALIZED
            | CUresult::CUDA_ERROR_OPERATING_SYSTEM
            | CUresult::CUDA_ERROR_SYSTEM_NOT_READY
            | CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
            | CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE
            | CUresult::CUDA_ERROR_UNKNOWN => {
                "no usable CUDA driver: the NVIDIA driver failed to initialise"
            }
            _ => "CUDA device unusable",
        };
        if detail.is_empty() {
            format!("{what} ({code:?})")
        } else {
            format!("{what} ({code:?}: {detail})")
        }
    }
}
