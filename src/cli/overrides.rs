//! Flags lowered into job-file overrides: a command's convenience flags (`--seed`,
//! `--max-epochs`, `--workers`, …) become the `section.key=value` strings that `--set` takes, so
//! a flag and the key it stands for go through the same parsing and range checks, and the
//! resolved config saved beside the outputs records them (as ripgrep lowers its flags into one
//! set of options).

use std::path::Path;

use curec::rec::curec::Variant;

/// A TOML string literal (for `--set` values built from paths).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `curec prepare`'s protocol flags.
pub fn prepare(
    rating_above: Option<f32>,
    user_core: Option<usize>,
    item_core: Option<usize>,
    split: Option<&str>,
) -> Vec<String> {
    let mut sets = Vec::new();
    sets.extend(split.map(|s| format!("preprocess.split={}", toml_str(s))));
    sets.extend(rating_above.map(|v| format!("preprocess.rating_above={v:?}")));
    sets.extend(user_core.map(|v| format!("preprocess.user_core={v}")));
    sets.extend(item_core.map(|v| format!("preprocess.item_core={v}")));
    sets
}

/// `curec train`'s flags: `--max-epochs` caps every model's epochs.
pub fn train(
    seed: Option<u64>,
    features: Option<&Path>,
    variant: Option<Variant>,
    max_epochs: Option<usize>,
) -> Vec<String> {
    let mut sets = Vec::new();
    sets.extend(seed.map(|v| format!("train.seed={v}")));
    sets.extend(features.map(|f| format!("curec.features={}", toml_str(&f.display().to_string()))));
    sets.extend(variant.map(|v| format!("curec.variant=\"{}\"", v.name())));
    if let Some(e) = max_epochs {
        for model in ["ncf", "sasrec", "bert4rec", "curec"] {
            sets.push(format!("{model}.max_epochs={e}"));
        }
    }
    sets
}

/// `curec replay`'s flags: the worker count and the ablations.
pub fn replay(workers: Option<usize>, no_update: bool, no_correction: bool) -> Vec<String> {
    let mut sets = Vec::new();
    sets.extend(workers.map(|w| format!("replay.workers={w}")));
    if no_update {
        sets.push("replay.update=false".into());
    }
    if no_correction {
        sets.push("replay.correct=false".into());
    }
    sets
}
