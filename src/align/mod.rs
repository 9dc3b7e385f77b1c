//! Recommendation-alignment pretraining (paper §4.2): prompts from the time-ordered train log,
//! the rule reward, GRPO on LoRA adapters (or all weights), checkpoints that resume after a kill,
//! and the evaluation of the aligned model against the base model and random choice.

pub mod eval;
pub mod plot;
pub mod reward;
pub mod run;
pub mod task;

pub use reward::{match_candidate, RuleReward, RuleRewardConfig};
pub use run::{pretrain, pretrain_until, PretrainConfig};
pub use task::AlignTask;
