//! From generated text features to the reward model's [`FeatureBank`]: the newest pattern per user
//! and the most recent L reasons per item (or, for the `text` variant, each item's description),
//! encoded through the embedding cache.

use anyhow::Result;

use super::store::{latest_patterns, reason_lists};
use super::Features;
use crate::data::Dataset;
use crate::embed::{EmbeddingCache, Encoder};
use crate::prompts::item_text;
use crate::rec::curec::{FeatureBank, Variant};

pub fn build_bank(
    ds: &Dataset,
    feats: &Features,
    variant: Variant,
    reasons_per_item: usize,
    encoder: &dyn Encoder,
    cache: &mut EmbeddingCache,
) -> Result<FeatureBank> {
    let dim = encoder.dim();
    let latest = latest_patterns(&feats.patterns);
    let mut users: Vec<u32> = latest.keys().copied().filter(|&u| (u as usize) < ds.n_users).collect();
    users.sort_unstable();
    let ptexts: Vec<&str> = users.iter().map(|u| latest[u].text.as_str()).collect();
    let progress = |done: usize, total: usize| tracing::debug!("encoded {done}/{total}");
    let pvecs = cache.embed(encoder, &ptexts, progress)?;
    let mut patterns = vec![0f32; ds.n_users * dim];
    let mut has_pattern = vec![false; ds.n_users];
    for (&u, v) in users.iter().zip(&pvecs) {
        patterns[u as usize * dim..(u as usize + 1) * dim].copy_from_slice(v);
        has_pattern[u as usize] = true;
    }
    type Lists = Vec<Vec<(u32, u32)>>;
    let (texts, lists): (Vec<&str>, Lists) = if variant == Variant::Text {
        let texts: Vec<&str> = (0..ds.n_items as u32).map(|i| item_text(&ds.items, i)).collect();
        (texts, (0..ds.n_items as u32).map(|i| vec![(i, u32::MAX)]).collect())
    } else {
        let rl = reason_lists(&feats.reasons, ds.n_items, reasons_per_item);
        let mut texts = Vec::new();
        let mut lists = Vec::with_capacity(ds.n_items);
        for l in rl {
            let mut slots = Vec::with_capacity(l.len());
            for r in l {
                slots.push((texts.len() as u32, r.user));
                texts.push(r.text.as_str());
            }
            lists.push(slots);
        }
        (texts, lists)
    };
    let rvecs = cache.embed(encoder, &texts, progress)?;
    cache.save()?;
    let texts = texts.into_iter().map(str::to_string).collect();
    Ok(FeatureBank { dim, patterns, has_pattern, reasons: rvecs.into_iter().flatten().collect(), texts, lists })
}
