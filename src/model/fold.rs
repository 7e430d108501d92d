//! Batch-norm folding: an inference-mode `BN(conv(x) + b)` is itself a convolution, with each
//! output channel's filter scaled and its bias shifted. Done once at load, in f64, for both
//! engines that fold: the fast CPU engine and the candle engine on CUDA.

/// PyTorch's `nn.BatchNorm2d` default epsilon.
pub const BN_EPS: f64 = 1e-5;

/// The four per-channel tensors of an inference-mode batch norm.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
}

/// A convolution with its batch norm folded in: `weight` is `[cout, cin, k, k]` (PyTorch order).
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedConv {
    pub cout: usize,
    pub cin: usize,
    pub k: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Folds `bn` into a `[cout, cin, k, k]` convolution with an optional bias:
/// `s = gamma / sqrt(var + eps)`, `w' = w * s`, `b' = (b - mean) * s + beta`.
///
/// The caller guarantees the lengths agree (`weight.len() == cout * cin * k * k`, every batch-norm
/// vector and the bias of length `cout`); they come from a shape-checked weights file.
pub fn fold_batch_norm(
    weight: &[f32],
    bias: Option<&[f32]>,
    bn: &BatchNorm,
    cin: usize,
    k: usize,
) -> FoldedConv {
    let cout = bn.weight.len();
    let per_filter = cin * k * k;
    assert_eq!(weight.len(), cout * per_filter, "conv weight size");
    let mut folded = Vec::with_capacity(weight.len());
    let mut folded_bias = Vec::with_capacity(cout);
    for (co, filter) in weight.chunks_exact(per_filter).enumerate() {
        let scale = f64::from(bn.weight[co]) / (f64::from(bn.running_var[co]) + BN_EPS).sqrt();
        folded.extend(filter.iter().map(|&w| (f64::from(w) * scale) as f32));
        let b = bias.map_or(0.0, |b| f64::from(b[co]));
        folded_bias
            .push(((b - f64::from(bn.running_mean[co])) * scale + f64::from(bn.bias[co])) as f32);
    }
    FoldedConv {
        cout,
        cin,
        k,
        weight: folded,
        bias: folded_bias,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct evaluation of `BN(conv(x) + b)` at one output position, for a 1-pixel input patch.
    fn conv_then_bn(
        weight: &[f32],
        bias: Option<&[f32]>,
        bn: &BatchNorm,
        patch: &[f32],
        co: usize,
    ) -> f64 {
        let per = patch.len();
        let conv: f64 = weight[co * per..(co + 1) * per]
            .iter()
            .zip(patch)
            .map(|(&w, &x)| f64::from(w) * f64::from(x))
            .sum::<f64>()
            + bias.map_or(0.0, |b| f64::from(b[co]));
        (conv - f64::from(bn.running_mean[co])) / (f64::from(bn.running_var[co]) + BN_EPS).sqrt()
            * f64::from(bn.weight[co])
            + f64::from(bn.bias[co])
    }

    fn sample_bn() -> BatchNorm {
        BatchNorm {
            weight: vec![0.5, -1.25, 2.0],
            bias: vec![0.1, 0.0, -0.3],
            running_mean: vec![0.2, -0.4, 1.5],
            running_var: vec![0.9, 0.01, 4.0],
        }
    }

    #[test]
    fn folded_conv_equals_conv_then_batch_norm_with_and_without_bias() {
        let (cin, k) = (2, 3);
        let bn = sample_bn();
        let weight: Vec<f32> = (0..3 * cin * k * k)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let patch: Vec<f32> = (0..cin * k * k)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let conv_bias = [0.3f32, -0.7, 1.1];
        for bias in [Some(&conv_bias[..]), None] {
            let folded = fold_batch_norm(&weight, bias, &bn, cin, k);
            assert_eq!((folded.cout, folded.cin, folded.k), (3, cin, k));
            for co in 0..3 {
                let per = cin * k * k;
                let got: f64 = folded.weight[co * per..(co + 1) * per]
                    .iter()
                    .zip(&patch)
                    .map(|(&w, &x)| f64::from(w) * f64::from(x))
                    .sum::<f64>()
                    + f64::from(folded.bias[co]);
                let want = conv_then_bn(&weight, bias, &bn, &patch, co);
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "channel {co}, bias {}: {got} vs {want}",
                    bias.is_some()
                );
            }
        }
    }

    #[test]
    fn identity_batch_norm_leaves_the_conv_unchanged() {
        let bn = BatchNorm {
            weight: vec![1.0; 2],
            bias: vec![0.0; 2],
            running_mean: vec![0.0; 2],
            running_var: vec![1.0 - BN_EPS as f32; 2],
        };
        let weight = [1.5f32, -2.0];
        let folded = fold_batch_norm(&weight, Some(&[0.25, -0.5]), &bn, 1, 1);
        for (a, b) in folded.weight.iter().zip(weight) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!((folded.bias[0] - 0.25).abs() < 1e-6 && (folded.bias[1] + 0.5).abs() < 1e-6);
    }
}
