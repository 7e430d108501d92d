//! `fetch-weights`: download the default pretrained checkpoint, verify its sha256, convert it
//! with the normalisation it was trained with, and write it atomically.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::convert::{self, ConvertError, ConvertOptions, Normalization, NormalizationPreset};
use super::weights::DEFAULT_WEIGHTS_PATH;

/// The public pretrained ResNet56 (BSD-2-Clause, Yerlan Idelbayev).
pub const DEFAULT_URL: &str =
    "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet56-4bfd9763.th";
/// sha256 of [`DEFAULT_URL`]'s file.
pub const DEFAULT_SHA256: &str = "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367";
/// Largest download accepted (the default checkpoint is 3.4 MB).
pub const MAX_DOWNLOAD_BYTES: u64 = 256 << 20;
/// The model name stored in the fetched weights.
pub const FETCHED_MODEL_NAME: &str = "resnet56";

/// What to download and where to write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOptions {
    /// Where the checkpoint is downloaded from.
    pub url: String,
    /// Expected sha256 of the download (hex, either case).
    pub sha256: String,
    /// The safetensors file written.
    pub output: PathBuf,
}

impl Default for FetchOptions {
    /// The default checkpoint, written where `serve` looks for weights.
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.into(),
            sha256: DEFAULT_SHA256.into(),
            output: PathBuf::from(DEFAULT_WEIGHTS_PATH),
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
const TOTAL_TIMEOUT: Duration = Duration::from_secs(600);

/// Why the weights could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("--sha256 {value:?} is not 64 hexadecimal digits")]
    InvalidSha256 { value: String },
    #[error("downloading {url}: {reason}")]
    Download { url: String, reason: String },
    #[error("downloading {url}: the server answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("downloading {url}: larger than the {limit} bytes accepted")]
    TooLarge { url: String, limit: u64 },
    #[error(
        "sha256 mismatch for {url}: expected {expected}, got {actual}; nothing was written to {output}"
    )]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
        output: PathBuf,
    },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

/// Removes the download's temporary file however the fetch ends.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove temporary download");
            }
        }
    }
}

/// Lower-case hex of a sha256 given on the command line, or an error.
fn parse_sha256(value: &str) -> Result<String, FetchError> {
    let hex = value.trim().to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(FetchError::InvalidSha256 {
            value: value.to_string(),
        })
    }
}

/// Streams `url` into `dest` (at most [`MAX_DOWNLOAD_BYTES`]); returns the byte count and sha256.
fn download(url: &str, dest: &Path) -> Result<(u64, String), FetchError> {
    let failed = |reason: String| FetchError::Download {
        url: url.to_string(),
        reason,
    };
    let too_large = || FetchError::TooLarge {
        url: url.to_string(),
        limit: MAX_DOWNLOAD_BYTES,
    };
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(RESPONSE_TIMEOUT))
        .timeout_global(Some(TOTAL_TIMEOUT))
        .http_status_as_error(false)
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let response = agent.get(url).call().map_err(|e| failed(e.to_string()))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(FetchError::Status {
            url: url.to_string(),
            status,
        });
    }
    let mut body = response.into_body();
    if body
        .content_length()
        .is_some_and(|n| n > MAX_DOWNLOAD_BYTES)
    {
        return Err(too_large());
    }
    let io_err = |error| FetchError::Io {
        path: dest.to_path_buf(),
        error,
    };
    let mut file = File::create(dest).map_err(io_err)?;
    let mut reader = body.as_reader().take(MAX_DOWNLOAD_BYTES + 1);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buffer)
            .map_err(|e| failed(e.to_string()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_DOWNLOAD_BYTES {
            return Err(too_large());
        }
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n]).map_err(io_err)?;
    }
    file.sync_all().map_err(io_err)?;
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((total, digest))
}

/// Downloads `options.url`, checks its sha256, converts it (imagenet normalisation, name
/// `resnet56`, source = the URL) and writes `options.output` atomically. Returns the output
/// path.
pub fn fetch_weights(options: &FetchOptions) -> Result<PathBuf, FetchError> {
    let expected = parse_sha256(&options.sha256)?;
    let output = options.output.clone();
    let dir = match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|error| FetchError::Io {
        path: dir.clone(),
        error,
    })?;
    let file_name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weights".into());
    let temp = TempFile(dir.join(format!(".{file_name}.download-{}", std::process::id())));
    tracing::info!(url = %options.url, output = %output.display(), "downloading pretrained weights");
    let (size, actual) = download(&options.url, &temp.0)?;
    if actual != expected {
        return Err(FetchError::ChecksumMismatch {
            url: options.url.clone(),
            expected,
            actual,
            output,
        });
    }
    tracing::info!(bytes = size, sha256 = %actual, "download verified");
    let bytes = convert::read_input(&temp.0)?;
    let convert_options = ConvertOptions {
        normalization: Normalization::Preset(NormalizationPreset::Imagenet),
        labels: None,
        name: Some(FETCHED_MODEL_NAME.into()),
        source: Some(options.url.clone()),
    };
    let label = PathBuf::from(options.url.rsplit('/').next().unwrap_or(&options.url));
    let converted = convert::convert_bytes(&label, &bytes, &convert_options, &output)?;
    convert::write_atomic(&output, &converted.bytes)?;
    convert::log_converted(&label, &output, &converted);
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_arguments_are_checked() {
        assert_eq!(
            parse_sha256(&DEFAULT_SHA256.to_uppercase()).unwrap(),
            DEFAULT_SHA256
        );
        for bad in ["", "abc", &format!("{}x", &DEFAULT_SHA256[1..])] {
            assert!(matches!(
                parse_sha256(bad),
                Err(FetchError::InvalidSha256 { .. })
            ));
        }
    }
}
