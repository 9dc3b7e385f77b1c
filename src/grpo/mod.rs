//! GRPO (paper §4.2, Eq. 3–4): group-relative advantages, the clipped token loss with a k3 KL to
//! the reference policy (the same model with adapters off), AdamW with a cosine schedule, and a
//! reward trait. Alignment pretraining uses it with the rule reward; the chronological correction
//! reuses it with the reward model.

pub mod advantage;
pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod reward;
pub mod trainer;

pub use advantage::group_advantages;
pub use loss::{grpo_loss, Aggregation, LossConfig, LossStats};
pub use optim::{AdamW, AdamWConfig};
pub use reward::{Reward, Scored};
pub use trainer::{Completion, Grpo, GrpoConfig, Sample, StepReport, StepStats, Timing};
