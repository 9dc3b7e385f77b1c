//! Rewards behind one trait: the rule reward of alignment pretraining (paper §4.2) and, in the
//! chronological correction, the reward model (§4.4) plug in here. A reward scores a batch of
//! (task, completion text) pairs and says what each component means.

use anyhow::Result;

/// One completion's reward: the weighted total GRPO uses, and the raw components for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub total: f32,
    pub parts: Vec<f32>,
}

pub trait Reward<T> {
    /// Names of the components in [`Scored::parts`].
    fn names(&self) -> Vec<String>;
    /// Score completions (the generated text only; prompt-side prefixes are the reward's business).
    fn score(&self, batch: &[(&T, &str)]) -> Result<Vec<Scored>>;
}
