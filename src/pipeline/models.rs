//! The model factory: an untrained model of a [`ModelKind`] built from a job's config, and for
//! the text models (CUREC, KAR) their features read from disk and encoded. It sits in the
//! pipeline, not beside `ModelKind` in `rec/`, because it reads the job config and the features
//! directory, which are layers above the recommenders.

use anyhow::Context;
use candle_core::Device;
use serde_json::{json, Value};

use crate::config::JobConfig;
use crate::data::Dataset;
use crate::embed::EmbeddingCache;
use crate::features::bank::build_bank;
use crate::features::Features;
use crate::rec::curec::{Curec, Variant};
use crate::rec::kar::Kar;
use crate::rec::{bert4rec::Bert4Rec, ncf::Ncf, pop::Pop, sasrec::SasRec, Model, ModelKind};

/// Build an untrained model of `kind` for `ds`.
pub fn build_model(kind: ModelKind, ds: &Dataset, cfg: &JobConfig, device: &Device) -> anyhow::Result<Box<dyn Model>> {
    let seed = cfg.train.seed;
    Ok(match kind {
        ModelKind::Pop => Box::new(Pop::new(ds.n_items)),
        ModelKind::Ncf => Box::new(Ncf::new(&cfg.ncf, ds.n_users, ds.n_items, seed, device)?),
        ModelKind::Sasrec => Box::new(SasRec::new(&cfg.sasrec, ds.n_items, seed, device)?),
        ModelKind::Bert4rec => Box::new(Bert4Rec::new(&cfg.bert4rec, ds.n_items, seed, device)?),
        ModelKind::Curec => Box::new(build_curec(ds, cfg, device)?),
        ModelKind::Kar => Box::new(build_kar(ds, cfg, device)?),
    })
}

/// The reward model with its feature bank (features encoded through the cache in the features dir).
pub fn build_curec(ds: &Dataset, cfg: &JobConfig, device: &Device) -> anyhow::Result<Curec> {
    let dir = cfg
        .curec
        .features
        .as_deref()
        .context("curec: no features directory; pass --features <dir> (from `curec features`)")?;
    let feats = Features::load(dir)?;
    let encoder = crate::embed::load(&cfg.curec.encoder, device)?;
    let mut cache = EmbeddingCache::open(dir, encoder.as_ref())?;
    let bank = build_bank(ds, &feats, cfg.curec.variant, cfg.curec.reasons_per_item, encoder.as_ref(), &mut cache)?;
    Curec::new(&cfg.curec, &cfg.sasrec, ds.n_items, bank, cfg.train.seed, device)
}

/// The KAR-style baseline over the features in `curec.features` (patterns and reason lists, and
/// item descriptions for items without reasons), encoded with `curec.encoder`.
pub fn build_kar(ds: &Dataset, cfg: &JobConfig, device: &Device) -> anyhow::Result<Kar> {
    let dir = cfg
        .curec
        .features
        .as_deref()
        .context("kar: no features directory; pass --features <dir> (from `curec features`)")?;
    let feats = Features::load(dir)?;
    let encoder = crate::embed::load(&cfg.curec.encoder, device)?;
    let mut cache = EmbeddingCache::open(dir, encoder.as_ref())?;
    let n = cfg.curec.reasons_per_item;
    let reasons = build_bank(ds, &feats, Variant::Ap, n, encoder.as_ref(), &mut cache)?;
    let descriptions = build_bank(ds, &feats, Variant::Text, n, encoder.as_ref(), &mut cache)?;
    Kar::new(&cfg.kar, &cfg.sasrec, &reasons, &descriptions, cfg.train.seed, device)
}

pub fn model_config(kind: ModelKind, cfg: &JobConfig) -> Value {
    let mut c = match kind {
        ModelKind::Pop => json!({}),
        ModelKind::Ncf => serde_json::to_value(&cfg.ncf).unwrap_or_default(),
        ModelKind::Sasrec => serde_json::to_value(&cfg.sasrec).unwrap_or_default(),
        ModelKind::Bert4rec => serde_json::to_value(&cfg.bert4rec).unwrap_or_default(),
        ModelKind::Curec => json!({"sasrec": cfg.sasrec, "curec": cfg.curec}),
        ModelKind::Kar => json!({"sasrec": cfg.sasrec, "kar": cfg.kar, "features": cfg.curec.features,
            "encoder": cfg.curec.encoder, "reasons_per_item": cfg.curec.reasons_per_item}),
    };
    c["seed"] = json!(cfg.train.seed);
    c
}
