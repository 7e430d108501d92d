//! Which SIMD instruction set the fast engine's kernels use: run-time detection of what the CPU
//! offers, and the check that a forced level is actually available.

use crate::model::SimdChoice;

/// An instruction set the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    /// AVX-512F (with AVX2 and FMA): 16 f32 lanes, 32 vector registers.
    Avx512,
    /// AVX2 + FMA: 8 f32 lanes, 16 vector registers.
    Avx2,
    /// Portable Rust, correct on every target.
    Scalar,
}

impl SimdLevel {
    /// Lower-case name, as used in the engine name (`fast-avx512`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2",
            Self::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_supported(self) -> bool {
        match self {
            Self::Scalar => true,
            // The AVX-512 build of the Winograd transforms also uses AVX2 and FMA (every
            // AVX-512F CPU has them; checked anyway).
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512 | Self::Avx2 => false,
        }
    }

    /// The best level this CPU supports.
    pub fn detect() -> Self {
        [Self::Avx512, Self::Avx2]
            .into_iter()
            .find(|level| level.is_supported())
            .unwrap_or(Self::Scalar)
    }

    /// Every level this CPU supports, best first.
    pub fn supported() -> Vec<Self> {
        [Self::Avx512, Self::Avx2, Self::Scalar]
            .into_iter()
            .filter(|level| level.is_supported())
            .collect()
    }

    /// Resolves `--simd`: `auto` detects, an explicit level must be supported by this CPU.
    pub fn resolve(choice: SimdChoice) -> Result<Self, UnsupportedSimd> {
        let level = match choice {
            SimdChoice::Auto => return Ok(Self::detect()),
            SimdChoice::Avx512 => Self::Avx512,
            SimdChoice::Avx2 => Self::Avx2,
            SimdChoice::Scalar => Self::Scalar,
        };
        if level.is_supported() {
            Ok(level)
        } else {
            Err(UnsupportedSimd {
                requested: level,
                best: Self::detect(),
            })
        }
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A forced SIMD level that this CPU does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("--simd {requested}: this CPU does not support it (the best it supports is {best})")]
pub struct UnsupportedSimd {
    pub requested: SimdLevel,
    pub best: SimdLevel,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_a_supported_level_and_scalar_is_always_available() {
        assert!(SimdLevel::resolve(SimdChoice::Auto).unwrap().is_supported());
        assert_eq!(
            SimdLevel::resolve(SimdChoice::Scalar).unwrap(),
            SimdLevel::Scalar
        );
        assert_eq!(SimdLevel::supported().first(), Some(&SimdLevel::detect()));
    }

    #[test]
    fn forcing_a_level_matches_detection() {
        for (choice, level) in [
            (SimdChoice::Avx512, SimdLevel::Avx512),
            (SimdChoice::Avx2, SimdLevel::Avx2),
        ] {
            match SimdLevel::resolve(choice) {
                Ok(got) => assert_eq!(got, level),
                Err(e) => {
                    assert!(!level.is_supported());
                    assert!(e.to_string().contains("does not support"), "{e}");
                }
            }
        }
    }
}
