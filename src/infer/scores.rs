//! From logits to what clients read: softmax probabilities and the ranking of classes, in one
//! place for every protocol.

/// Softmax of one row of logits, computed in f64 so that large logits neither overflow nor
/// lose the small probabilities.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / total) as f32).collect()
}

/// Row-wise [`softmax`] of `classes`-wide logits.
pub fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    logits.chunks(classes.max(1)).flat_map(softmax).collect()
}

/// The most probable class (the lower index on a tie) and its softmax probability, without
/// computing the whole distribution.
pub fn top1(logits: &[f32]) -> (usize, f32) {
    let best = ranked_first(logits);
    let max = logits.get(best).copied().unwrap_or(0.0);
    let total: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (best, (1.0 / total) as f32)
}

fn ranked_first(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if l.total_cmp(&logits[best]).is_gt() {
            best = i;
        }
    }
    best
}

/// Class indices from most to least probable; ties keep the lower index first.
pub fn ranked(logits: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert_eq!(p[0], 0.5);
        assert_eq!(p[1], 0.5);
        assert_eq!(p[2], 0.0);
        let rows = softmax_rows(&[0.0, 0.0, 2.0_f32.ln(), 0.0], 2);
        assert_eq!(rows, [0.5, 0.5, 2.0 / 3.0, 1.0 / 3.0]);
    }

    #[test]
    fn ranking_is_by_logit_with_ties_in_index_order() {
        assert_eq!(ranked(&[0.1, 3.0, 0.1, -2.0]), [1, 0, 2, 3]);
        assert_eq!(ranked(&[2.0, 2.0])[0], top1(&[2.0, 2.0]).0);
    }

    #[test]
    fn top1_agrees_with_the_full_softmax() {
        let logits = [0.3, -1.0, 2.5, 2.4, 0.0];
        let (class, p) = top1(&logits);
        assert_eq!(class, ranked(&logits)[0]);
        assert!((p - softmax(&logits)[class]).abs() < 1e-7);
    }
}
