//! Range checks of every job setting, run by [`JobConfig::load`] before any stage uses a value:
//! a zero width, a dropout of 1.5, a negative learning rate or a NaN temperature is refused with
//! one line naming the key, the value and the allowed range, instead of a panic deep in a model
//! or a run that trains on nonsense.

use anyhow::{bail, Result};

use crate::config::JobConfig;

/// The first bad setting ends the check.
struct Check;

impl Check {
    fn at_least(&self, key: &str, v: usize, min: usize) -> Result<()> {
        if v < min {
            bail!("{key} = {v}: expected at least {min}");
        }
        Ok(())
    }

    /// `v` in the interval written as `what` (e.g. "[0, 1)"), tested by `ok`.
    fn within(&self, key: &str, v: f64, what: &str, ok: impl Fn(f64) -> bool) -> Result<()> {
        if !v.is_finite() || !ok(v) {
            bail!("{key} = {v}: expected a number in {what}");
        }
        Ok(())
    }

    fn positive(&self, key: &str, v: f64) -> Result<()> {
        self.within(key, v, "(0, ∞)", |x| x > 0.0)
    }

    fn probability(&self, key: &str, v: f64) -> Result<()> {
        self.within(key, v, "[0, 1)", |x| (0.0..1.0).contains(&x))
    }

    /// Attention: `heads` ≥ 1 dividing `dim` ≥ 1.
    fn heads(&self, section: &str, dim: usize, heads: usize) -> Result<()> {
        self.at_least(&format!("{section}.dim"), dim, 1)?;
        self.at_least(&format!("{section}.heads"), heads, 1)?;
        if !dim.is_multiple_of(heads) {
            bail!("{section}.heads = {heads}: expected a divisor of {section}.dim = {dim}");
        }
        Ok(())
    }
}

impl JobConfig {
    /// Every setting within its range (see the module docs); the stage-specific checks
    /// (`features`, `replay`, `grpo`, `lora`, `pretrain`) run here too.
    pub fn validate(&self) -> Result<()> {
        let c = Check;
        let t = &self.train;
        c.at_least("train.eval_batch", t.eval_batch, 1)?;
        c.at_least("train.bootstrap", t.bootstrap, 1)?;

        let p = &self.preprocess;
        c.within("preprocess.rating_above", p.rating_above as f64, "(-∞, ∞)", |_| true)?;
        if p.split != "leave-one-out" && p.split != "time" {
            bail!("preprocess.split = '{}': expected 'leave-one-out' or 'time'", p.split);
        }
        c.within("preprocess.head", p.head, "(0, 1)", |x| x > 0.0 && x < 1.0)?;

        let s = &self.sasrec;
        c.heads("sasrec", s.dim, s.heads)?;
        c.at_least("sasrec.max_len", s.max_len, 1)?;
        c.at_least("sasrec.blocks", s.blocks, 1)?;
        c.at_least("sasrec.inner", s.inner, 1)?;
        c.probability("sasrec.dropout", s.dropout as f64)?;
        c.positive("sasrec.lr", s.lr)?;
        c.at_least("sasrec.batch_size", s.batch_size, 1)?;
        c.at_least("sasrec.max_epochs", s.max_epochs, 1)?;

        let b = &self.bert4rec;
        c.heads("bert4rec", b.dim, b.heads)?;
        c.at_least("bert4rec.max_len", b.max_len, 2)?;
        c.at_least("bert4rec.blocks", b.blocks, 1)?;
        c.at_least("bert4rec.inner", b.inner, 1)?;
        c.within("bert4rec.mask_ratio", b.mask_ratio, "(0, 1)", |x| x > 0.0 && x < 1.0)?;
        c.probability("bert4rec.last_ratio", b.last_ratio)?;
        c.probability("bert4rec.dropout", b.dropout as f64)?;
        c.positive("bert4rec.lr", b.lr)?;
        c.at_least("bert4rec.batch_size", b.batch_size, 1)?;
        c.at_least("bert4rec.max_epochs", b.max_epochs, 1)?;

        let n = &self.ncf;
        c.at_least("ncf.dim", n.dim, 1)?;
        for (j, &w) in n.mlp.iter().enumerate() {
            c.at_least(&format!("ncf.mlp[{j}]"), w, 1)?;
        }
        c.probability("ncf.dropout", n.dropout as f64)?;
        c.at_least("ncf.negatives", n.negatives, 1)?;
        c.positive("ncf.lr", n.lr)?;
        c.at_least("ncf.batch_size", n.batch_size, 1)?;
        c.at_least("ncf.max_epochs", n.max_epochs, 1)?;

        c.at_least("kar.hidden", self.kar.hidden, 1)?;

        let r = &self.curec;
        if !self.sasrec.dim.is_multiple_of(r.heads.max(1)) || r.heads == 0 {
            bail!("curec.heads = {}: expected a divisor of sasrec.dim = {}", r.heads, self.sasrec.dim);
        }
        c.at_least("curec.reasons_per_item", r.reasons_per_item, 1)?;
        c.at_least("curec.din_history", r.din_history, 1)?;
        c.at_least("curec.hidden", r.hidden, 1)?;
        c.at_least("curec.positions_per_batch", r.positions_per_batch, 1)?;
        c.at_least("curec.max_epochs", r.max_epochs, 1)?;

        let g = &self.grpo;
        g.validate()?;
        c.within("grpo.temperature", g.temperature as f64, "[0, ∞)", |x| x >= 0.0)?;
        c.within("grpo.top_p", g.top_p as f64, "(0, 1]", |x| x > 0.0 && x <= 1.0)?;
        c.within("grpo.std_eps", g.std_eps as f64, "(0, ∞)", |x| x > 0.0)?;
        c.within("grpo.grad_clip", g.grad_clip, "[0, ∞)", |x| x >= 0.0)?;
        c.probability("grpo.adamw.beta1", g.adamw.beta1)?;
        c.probability("grpo.adamw.beta2", g.adamw.beta2)?;
        c.positive("grpo.adamw.eps", g.adamw.eps)?;
        c.within("grpo.adamw.weight_decay", g.adamw.weight_decay, "[0, ∞)", |x| x >= 0.0)?;
        self.lora.validate()?;
        c.within("lora.alpha", self.lora.alpha, "(0, ∞)", |x| x > 0.0)?;

        self.pretrain.validate()?;
        c.at_least("pretrain.eval_max_new_tokens", self.pretrain.eval_max_new_tokens, 1)?;

        let f = &self.features;
        f.validate()?;
        c.within("features.temperature", f.temperature as f64, "[0, ∞)", |x| x >= 0.0)?;

        self.replay.validate()?;
        c.at_least("replay.max_new_tokens_update", self.replay.max_new_tokens_update, 1)?;
        c.at_least("replay.max_new_tokens_reason", self.replay.max_new_tokens_reason, 1)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each probe is refused with one line naming the key (the value, and what was expected).
    #[test]
    fn every_out_of_range_setting_names_its_key() {
        let probes = [
            ("sasrec.heads=0", "sasrec.heads = 0: expected at least 1"),
            ("sasrec.heads=3", "sasrec.heads = 3: expected a divisor of sasrec.dim = 64"),
            ("sasrec.dim=0", "sasrec.dim = 0: expected at least 1"),
            ("curec.heads=0", "curec.heads = 0: expected a divisor of sasrec.dim"),
            ("sasrec.dropout=1.5", "sasrec.dropout = 1.5: expected a number in [0, 1)"),
            ("sasrec.lr=-1", "sasrec.lr = -1: expected a number in (0, ∞)"),
            ("sasrec.lr=nan", "sasrec.lr = NaN: expected a number in (0, ∞)"),
            ("grpo.top_p=2", "grpo.top_p = 2: expected a number in (0, 1]"),
            ("features.temperature=nan", "features.temperature = NaN"),
            ("features.top_p=0", "features.top_p"),
            ("bert4rec.mask_ratio=1.0", "bert4rec.mask_ratio = 1: expected a number in (0, 1)"),
            ("ncf.mlp=[64, 0]", "ncf.mlp[1] = 0: expected at least 1"),
            ("replay.slice=0", "replay.slice"),
            ("lora.rank=0", "lora.rank"),
        ];
        for (set, want) in probes {
            let e = JobConfig::load(None, &[set.to_string()]).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(want), "--set {set}: {e}");
            assert!(!e.contains('\n'), "--set {set}: one line, got {e}");
        }
        JobConfig::default().validate().expect("the defaults are valid");
    }
}
