//! The CUREC reward model (paper §4.3.2, Eq. 7–11): a SASRec user tower over item IDs, a matcher
//! between the user's pattern embedding and the item's reason embeddings, and a DIN head.
//!
//! For user u (at a position of the sequence) and item i:
//! - e_u: SASRec hidden state; e_i: item ID embedding (shared with the tower).
//! - s_ui (Eq. 8), by variant:
//!   - `attention`: multi-head attention, query W_q e_{p_u}, keys/values W_k E_{Q_i}, W_v E_{Q_i},
//!     output W_o; padding reasons are masked, so a list of one reason gets weight 1 and the
//!     result does not depend on the order of the list;
//!   - `ap` / `mlp` / `sa`: the reasons fused without looking at the user (mean of W_v E_{Q_i}; mean
//!     of a per-reason MLP; mean of one self-attention layer over the list), plus the projected
//!     pattern (the concatenation [fused reasons; pattern] followed by a linear layer);
//!   - `text`: like `ap` with the item's own description as its only "reason".
//!
//!   An item without reasons gets a learned vector s_∅. Reasons written for u itself are masked
//!   when scoring for u (its training interactions' reasons would otherwise leak the label:
//!   at test time the target's list never holds a reason of the user).
//! - DIN (Eq. 10): attention pooling of the last `din_history` history item embeddings w.r.t.
//!   the target, v_ui = Σ_j softmax_j(⟨W_a h_j, e_i⟩/√d) h_j, then
//!   ŷ_ui = ⟨e_u, e_i⟩ + w₂ᵀ ReLU(A e_u + B e_i + C s_ui + D v_ui + b₁) + b₂.
//!   (The first layer is applied term by term, so scoring every item costs O(N·(L + H)·d) per
//!   user instead of an MLP over N concatenations.)
//! - With `bilinear` (an extension, off by default): ŷ_ui also gets ⟨G e_u + R e_{p_u}, s_ui⟩, so
//!   the user's state and pattern meet the item's matched text directly in the score instead of
//!   only through DIN's ReLU layer (s_ui is then built per user, `U × N × d`).
//! - Loss (Eq. 11): softmax cross-entropy over all items, at every position of the train sequence.

use candle_core::Tensor;
use candle_nn::{AdamW, Linear};
use serde::{Deserialize, Serialize};

use super::nn::Params;
use super::sasrec::SasRecTower;

mod fusion;
mod model;
#[cfg(test)]
mod tests;
mod train;

const INIT_STD: f32 = 0.02;
const NEG: f32 = -1e9;

/// How s_ui is built (paper Table 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Multi-head attention from the pattern over the reasons (CUREC).
    Attention,
    /// Raw item descriptions instead of reasons, fused with the pattern.
    Text,
    /// Average pooling of the reasons, concatenated with the pattern.
    Ap,
    /// Per-reason MLP, then average pooling, concatenated with the pattern.
    Mlp,
    /// Self-attention over the reasons, then average pooling, concatenated with the pattern.
    Sa,
}

impl Variant {
    /// Every variant, in the order the CLI lists them.
    pub const ALL: [Variant; 5] = [Variant::Attention, Variant::Text, Variant::Ap, Variant::Mlp, Variant::Sa];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Attention => "attention",
            Variant::Text => "text",
            Variant::Ap => "ap",
            Variant::Mlp => "mlp",
            Variant::Sa => "sa",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CurecConfig {
    pub variant: Variant,
    /// `minilm`, a BERT directory, or `llm:<model>`.
    pub encoder: String,
    /// Most recent reasons kept per item (L).
    pub reasons_per_item: usize,
    /// Heads of the pattern→reason attention.
    pub heads: usize,
    /// History items pooled by DIN's target attention.
    pub din_history: usize,
    /// Hidden width of the DIN head.
    pub hidden: usize,
    /// Target positions per optimisation step (bounds memory: positions × items × hidden floats).
    pub positions_per_batch: usize,
    /// Mask the user's own reasons when scoring for that user.
    pub mask_own_reasons: bool,
    /// Sampled softmax for large catalogues: the batch's targets plus this many uniformly drawn
    /// items per batch (0 = softmax over all items, the paper's Eq. 11).
    pub sampled_negatives: usize,
    /// Features directory from `curec features` (the CLI's `--features` sets it).
    pub features: Option<std::path::PathBuf>,
    /// Train on each user's most recent N targets per epoch (the input still shows up to
    /// `sasrec.max_len` items before each); 0 = every target of the train sequence.
    pub positions_per_user: usize,
    /// Start the user tower and item embeddings from a trained SASRec checkpoint
    /// (`<sasrec run>/model.safetensors`); the other weights start fresh. With `--seeds`, a
    /// `{seed}` in the path becomes each run's seed (`<sasrec>/seed-{seed}/model.safetensors`).
    pub init_tower: Option<std::path::PathBuf>,
    /// With `init_tower`: keep the tower and item embeddings fixed and train the matcher and the
    /// DIN head only.
    pub freeze_tower: bool,
    /// Trainable item-ID embeddings (the CUREC model). `false` is the text-only setting of the
    /// controls: every item enters the user tower, DIN and the output layer as a projection of a
    /// fixed text vector, the mean of its bank list (its description for `text`, its pooled
    /// reasons otherwise; zero without any), so the text channel alone must tell items apart.
    pub ids: bool,
    /// Add the bilinear term ⟨G e_u + R e_{p_u}, s_ui⟩ to the score (not in the paper: a fusion in
    /// which the text meets the user's state and pattern directly, for the with-IDs controls).
    pub bilinear: bool,
    /// Variants `curec run` trains, each into `<train.out>/curec-<variant>`.
    pub variants: Vec<Variant>,
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
}

impl Default for CurecConfig {
    fn default() -> Self {
        Self {
            variant: Variant::Attention,
            encoder: "minilm".into(),
            reasons_per_item: 20,
            heads: 2,
            din_history: 10,
            hidden: 32,
            positions_per_batch: 1024,
            mask_own_reasons: true,
            sampled_negatives: 0,
            features: None,
            positions_per_user: 0,
            init_tower: None,
            freeze_tower: true,
            ids: true,
            bilinear: false,
            variants: vec![Variant::Attention],
            max_epochs: 100,
            patience: 5,
        }
    }
}

/// Text features in embedding form: one pattern vector per user, a reason list per item.
#[derive(Debug, Clone)]
pub struct FeatureBank {
    /// Encoder dimension.
    pub dim: usize,
    /// `n_users × dim`; zero for users without a pattern.
    pub patterns: Vec<f32>,
    pub has_pattern: Vec<bool>,
    /// Reason vectors, `n_reasons × dim`.
    pub reasons: Vec<f32>,
    /// Reason texts (the explanation), one per reason row.
    pub texts: Vec<String>,
    /// Per item: (reason row, author user) oldest first; at most L.
    pub lists: Vec<Vec<(u32, u32)>>,
}

impl FeatureBank {
    pub fn n_reasons(&self) -> usize {
        self.reasons.len() / self.dim.max(1)
    }
    pub fn max_list(&self) -> usize {
        self.lists.iter().map(Vec::len).max().unwrap_or(0).max(1)
    }

    /// Per item, the mean of its list's vectors (zero for an empty list): `n_items × dim`.
    pub fn pooled(&self) -> Vec<f32> {
        let d = self.dim;
        let mut out = vec![0f32; self.lists.len() * d];
        for (i, list) in self.lists.iter().enumerate() {
            let row = &mut out[i * d..(i + 1) * d];
            for &(r, _) in list {
                for (o, v) in row.iter_mut().zip(&self.reasons[r as usize * d..(r as usize + 1) * d]) {
                    *o += v;
                }
            }
            let n = list.len().max(1) as f32;
            row.iter_mut().for_each(|o| *o /= n);
        }
        out
    }
}

struct Matcher {
    q: Linear,
    /// Keys: the attention matcher only.
    k: Option<Linear>,
    v: Linear,
    /// Output projection: the attention matcher only.
    o: Option<Linear>,
    /// Fusion variants: per-reason MLP (`mlp`) or self-attention (`sa`) layers.
    mlp: Option<(Linear, Linear)>,
    sa: Option<(Linear, Linear, Linear)>,
    empty: Tensor,
}

pub struct Curec {
    cfg: CurecConfig,
    tower: SasRecTower,
    seed: u64,
    params: Params,
    matcher: Matcher,
    w_att: Linear,
    a: Linear,
    b: Linear,
    c: Linear,
    dd: Linear,
    w2: Linear,
    /// `bilinear`: G (`d × d`, applied to e_u) and R (`e × d`, applied to the pattern vector).
    bil: Option<(Tensor, Tensor)>,
    bank: FeatureBank,
    /// `(n_reasons + 1) × enc_dim`, last row zero (padding).
    reasons_t: Tensor,
    patterns_t: Tensor,
    opt: AdamW,
    /// Reason keys/values for scoring, cleared whenever the weights or the bank change.
    inference: std::sync::Mutex<Option<std::sync::Arc<(Slots, ReasonSide, Tensor)>>>,
}

/// Keys and values of every reason slot (see [`Curec::reason_side`]).
struct ReasonSide {
    k: Option<Tensor>,
    v: Tensor,
    /// The values through `W_o` (per head) and `C`: `N × L × hidden` per head (attention) or
    /// one (pooling). User-independent, so scoring computes them once per set of weights;
    /// training leaves them `None` and [`Curec::matching_for`] projects per batch.
    z: Option<Vec<Tensor>>,
}

/// What [`Curec::matching`] gives the head.
struct Matched {
    /// C·s_ui + b_c, `U × N × hidden`.
    c: Tensor,
    /// Matching weights `U × N × L` (asked for only).
    weights: Option<Tensor>,
    /// `bilinear`: s_ui (`U × N × d`) and R e_{p_u} (`U × d`).
    bilinear: Option<(Tensor, Tensor)>,
}

/// Per-batch reason slots: which reason row fills slot l of item n, and who wrote it.
struct Slots {
    idx: Tensor,
    /// `N × L`: 1 for a real reason, 0 for padding.
    base: Vec<f32>,
    /// Slots written by each user.
    by_author: std::collections::HashMap<u32, Vec<usize>>,
    l: usize,
    /// Items covered, in slot order (`None`: all items in id order).
    items: Option<Vec<u32>>,
    n: usize,
}
