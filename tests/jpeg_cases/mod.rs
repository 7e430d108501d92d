//! The JPEG cases of `tests/fixtures/jpeg/expected.json` (written by `make_fixtures.py` with
//! Pillow): each a fixture file, possibly cut short or patched, and what Pillow does with it
//! with `ImageFile.LOAD_TRUNCATED_IMAGES` off and on.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use resnet_serve::preprocess::{
    decode_rgb8_with, resize_shorter_and_center_crop, DecodeOptions, PreprocessError,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Manifest {
    pillow: String,
    libjpeg_turbo: String,
    cases: Vec<RawCase>,
}

#[derive(Deserialize)]
struct RawCase {
    name: String,
    file: String,
    cut: Option<usize>,
    patches: Option<Vec<(usize, String)>>,
    append: Option<String>,
    strict: RawOutcome,
    load_truncated: RawOutcome,
}

#[derive(Deserialize)]
struct RawOutcome {
    error: Option<String>,
    mode: Option<String>,
    size: Option<[u32; 2]>,
    rgb_sha256: Option<String>,
    crop32_sha256: Option<String>,
}

/// What Pillow does with a case.
#[derive(Debug, Clone)]
pub enum Expected {
    /// `Image.open(...).convert("RGB")` succeeds: its size and the digests (first 16 hex digits
    /// of SHA-256) of its RGB bytes and of the 32x32 crop torchvision makes of it.
    Opens {
        width: u32,
        height: u32,
        rgb_sha256: String,
        crop32_sha256: String,
    },
    /// It raises this (`Type: message`).
    Refused(String),
}

impl Expected {
    /// Whether Pillow's refusal speaks of truncation.
    pub fn says_truncated(&self) -> bool {
        matches!(self, Self::Refused(m) if m.to_lowercase().contains("truncated"))
    }
}

pub struct Case {
    pub name: String,
    pub bytes: Vec<u8>,
    pub strict: Expected,
    pub load_truncated: Expected,
}

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex in the manifest"))
        .collect()
}

fn expected(raw: RawOutcome, case: &str) -> Expected {
    if let Some(error) = raw.error {
        return Expected::Refused(error);
    }
    let [width, height] = raw.size.unwrap_or_else(|| panic!("{case}: no size"));
    assert!(raw.mode.is_some(), "{case}: no mode");
    Expected::Opens {
        width,
        height,
        rgb_sha256: raw
            .rgb_sha256
            .unwrap_or_else(|| panic!("{case}: no digest")),
        crop32_sha256: raw
            .crop32_sha256
            .unwrap_or_else(|| panic!("{case}: no digest")),
    }
}

/// The cases of `dir/expected.json`, their bytes built from the files in `dir`.
pub fn load(dir: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(dir.join("expected.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let manifest: Manifest = serde_json::from_str(&text).expect("a valid expected.json");
    eprintln!(
        "{}: expectations from Pillow {} (libjpeg-turbo {})",
        dir.display(),
        manifest.pillow,
        manifest.libjpeg_turbo
    );
    manifest
        .cases
        .into_iter()
        .map(|raw| {
            let mut bytes =
                std::fs::read(dir.join(&raw.file)).unwrap_or_else(|e| panic!("{}: {e}", raw.file));
            if let Some(cut) = raw.cut {
                bytes.truncate(cut);
            }
            for (offset, patch) in raw.patches.iter().flatten() {
                let patch = hex(patch);
                bytes[*offset..offset + patch.len()].copy_from_slice(&patch);
            }
            bytes.extend(hex(raw.append.as_deref().unwrap_or("")));
            Case {
                strict: expected(raw.strict, &raw.name),
                load_truncated: expected(raw.load_truncated, &raw.name),
                name: raw.name,
                bytes,
            }
        })
        .collect()
}

/// The digest the manifest records: the first 16 hex digits of SHA-256.
pub fn short_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Decodes `case` as the service does and compares with what Pillow did.
pub fn check(case: &Case, load_truncated: bool, want: &Expected) -> Result<(), String> {
    let options = DecodeOptions {
        max_pixels: 1 << 24,
        load_truncated,
    };
    match (want, decode_rgb8_with(&case.bytes, &options)) {
        (
            Expected::Opens {
                width,
                height,
                rgb_sha256,
                crop32_sha256,
            },
            Ok(image),
        ) => {
            if (image.width, image.height) != (*width, *height) {
                return Err(format!(
                    "size {}x{}, Pillow's {width}x{height}",
                    image.width, image.height
                ));
            }
            if short_sha256(&image.pixels) != *rgb_sha256 {
                return Err("decoded RGB differs from Pillow's".into());
            }
            let crop = resize_shorter_and_center_crop(&image, 32);
            if short_sha256(&crop.pixels) != *crop32_sha256 {
                return Err("32x32 input differs from torchvision's".into());
            }
            Ok(())
        }
        (Expected::Opens { .. }, Err(e)) => Err(format!("Pillow opens it, refused here: {e}")),
        (Expected::Refused(pillow), Ok(_)) => {
            Err(format!("Pillow refuses it ({pillow}), decoded here"))
        }
        (Expected::Refused(pillow), Err(e)) => refusal_agrees(pillow, &e),
    }
}

/// A refusal here agrees with Pillow's: an invalid image (422), a truncation where Pillow
/// speaks of one, with Pillow's own count of unprocessed bytes when it gives one.
fn refusal_agrees(pillow: &str, ours: &PreprocessError) -> Result<(), String> {
    let truncated = pillow.to_lowercase().contains("truncated");
    match ours {
        PreprocessError::Truncated(_) if truncated => {}
        PreprocessError::Decode(_) if !truncated => {}
        PreprocessError::Truncated(_) if pillow.contains("cannot identify") => {}
        other => return Err(format!("refused as {other:?}, Pillow: {pillow}")),
    }
    if truncated && !ours.to_string().contains("image file is truncated") {
        return Err(format!(
            "message {:?} does not say truncated, Pillow: {pillow}",
            ours.to_string()
        ));
    }
    if let Some(detail) = pillow.strip_prefix("OSError: image file is truncated") {
        let ours = ours.to_string();
        if !ours.contains(&format!("image file is truncated{detail}")) {
            return Err(format!("message {ours:?}, Pillow: {pillow}"));
        }
    }
    Ok(())
}
