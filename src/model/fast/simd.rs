//! Which SIMD instruction set the fast engine's kernels use: run-time detection of what the CPU
//! offers, and the check that a forced level is actually available.

use crate::model::SimdChoice;

/// An instruction set the kernels are written for. Only the kernel selectors look at it; what
/// they are given is always a [`SimdLevel`], which vouches that the CPU has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F (with AVX2 and FMA): 16 f32 lanes, 32 vector registers.
    Avx512,
    /// AVX2 + FMA: 8 f32 lanes, 16 vector registers.
    Avx2,
    /// Portable Rust, correct on every target.
    Scalar,
}

impl Isa {
    /// Whether this CPU can run kernels of this instruction set.
    fn is_supported(self) -> bool {
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
}

/// An instruction set that this CPU supports: the only way to get one is detection
/// ([`Self::detect`], [`Self::supported`], [`Self::resolve`]), so the kernels selected for it
/// can be run without checking again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimdLevel(Isa);

impl SimdLevel {
    /// The portable level, which every CPU supports.
    pub const SCALAR: Self = Self(Isa::Scalar);

    /// Lower-case name, as used in the engine name (`fast-avx512`) and by `--simd`.
    pub fn as_str(self) -> &'static str {
        match self.0 {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }

    /// The instruction set, for the kernel selectors.
    pub(crate) fn isa(self) -> Isa {
        self.0
    }

    /// The best level this CPU supports.
    pub fn detect() -> Self {
        Self::supported().first().copied().unwrap_or(Self::SCALAR)
    }

    /// Every level this CPU supports, best first.
    pub fn supported() -> Vec<Self> {
        [Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .map(Self)
            .collect()
    }

    /// Resolves `--simd`: `auto` detects, an explicit level must be supported by this CPU.
    pub fn resolve(choice: SimdChoice) -> Result<Self, UnsupportedSimd> {
        let isa = match choice {
            SimdChoice::Auto => return Ok(Self::detect()),
            SimdChoice::Avx512 => Isa::Avx512,
            SimdChoice::Avx2 => Isa::Avx2,
            SimdChoice::Scalar => Isa::Scalar,
        };
        if isa.is_supported() {
            Ok(Self(isa))
        } else {
            Err(UnsupportedSimd {
                requested: choice,
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
#[error("--simd {}: this CPU does not support it (the best it supports is {best})", requested.as_str())]
pub struct UnsupportedSimd {
    pub requested: SimdChoice,
    pub best: SimdLevel,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_a_supported_level_and_scalar_is_always_available() {
        let auto = SimdLevel::resolve(SimdChoice::Auto).unwrap();
        assert!(SimdLevel::supported().contains(&auto));
        assert_eq!(
            SimdLevel::resolve(SimdChoice::Scalar).unwrap(),
            SimdLevel::SCALAR
        );
        assert_eq!(SimdLevel::supported().first(), Some(&SimdLevel::detect()));
        assert_eq!(SimdLevel::supported().last(), Some(&SimdLevel::SCALAR));
    }

    #[test]
    fn forcing_a_level_matches_detection() {
        for (choice, isa) in [
            (SimdChoice::Avx512, Isa::Avx512),
            (SimdChoice::Avx2, Isa::Avx2),
        ] {
            match SimdLevel::resolve(choice) {
                Ok(got) => {
                    assert_eq!(got.isa(), isa);
                    assert!(SimdLevel::supported().contains(&got));
                }
                Err(e) => {
                    assert!(!isa.is_supported());
                    assert!(SimdLevel::supported().iter().all(|l| l.isa() != isa));
                    assert_eq!(e.requested, choice);
                    assert!(e.to_string().contains("does not support"), "{e}");
                }
            }
        }
    }
}
