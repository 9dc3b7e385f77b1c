//! Group-relative advantages (paper Eq. 4): each completion's reward minus its group's mean,
//! divided by the group's standard deviation (unbiased, as `torch.std`) plus ε. A group whose
//! rewards are all equal has no signal: its advantages are zero.

/// `rewards` laid out group after group, `group` completions each.
pub fn group_advantages(rewards: &[f32], group: usize, eps: f32) -> Vec<f32> {
    assert!(group > 0 && rewards.len().is_multiple_of(group), "rewards must fill whole groups");
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        if zero_variance(g) {
            out.extend(std::iter::repeat_n(0.0, g.len()));
            continue;
        }
        let n = g.len() as f64;
        let mean = g.iter().map(|&r| r as f64).sum::<f64>() / n;
        let var = g.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let std = var.sqrt();
        out.extend(g.iter().map(|&r| ((r as f64 - mean) / (std + eps as f64)) as f32));
    }
    out
}

/// All rewards of the group are equal (or there is only one).
pub fn zero_variance(group: &[f32]) -> bool {
    group.windows(2).all(|w| w[0] == w[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_group() {
        // mean 1.5, unbiased std sqrt(5/3) = 1.290994
        let a = group_advantages(&[0.0, 1.0, 2.0, 3.0], 4, 0.0);
        let want = [-1.161895, -0.387298, 0.387298, 1.161895];
        for (x, y) in a.iter().zip(want) {
            assert!((x - y).abs() < 1e-5, "{a:?}");
        }
    }

    #[test]
    fn equal_rewards_give_zero_and_groups_are_independent() {
        let a = group_advantages(&[2.0, 2.0, 0.0, 1.0], 2, 1e-4);
        assert_eq!(&a[..2], &[0.0, 0.0]);
        assert!((a[2] + a[3]).abs() < 1e-6 && a[3] > 0.0);
        assert!(zero_variance(&[1.0]) && zero_variance(&[3.0, 3.0, 3.0]) && !zero_variance(&[3.0, 3.5]));
    }
}
