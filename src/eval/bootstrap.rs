//! Percentile bootstrap over users: a few hundred test users make single numbers noisy, so every
//! report carries a 95% interval for its headline metrics.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// 95% percentile interval of the mean of `values`, from `resamples` draws with replacement.
pub fn mean_ci95(values: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = values.len();
    let mut means: Vec<f64> =
        (0..resamples.max(1)).map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_brackets_the_mean_and_is_degenerate_for_constants() {
        let v: Vec<f64> = (0..200).map(|i| (i % 10) as f64 / 10.0).collect();
        let (lo, hi) = mean_ci95(&v, 1000, 7);
        assert!(lo < 0.45 && hi > 0.45 && hi - lo < 0.15, "{lo} {hi}");
        let (lo, hi) = mean_ci95(&[0.3; 50], 100, 1);
        assert!((lo - 0.3).abs() < 1e-12 && (hi - 0.3).abs() < 1e-12);
        assert_eq!(mean_ci95(&v, 300, 9), mean_ci95(&v, 300, 9));
    }
}
