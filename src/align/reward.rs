//! The rule reward r_pre of alignment pretraining (paper §4.2): format, legal, correct.
//!
//! - **format**: 1 when the completion is exactly `<think>…</think>` then `<answer>…</answer>`;
//!   with `partial_format`, otherwise 0.75 × (tags present in order) / 4, so that a small model
//!   that never writes the whole format still gets a gradient towards it.
//! - **legal**: the answer names one candidate ([`match_candidate`]).
//! - **correct**: that candidate is the held-out item.
//!
//! The total is the weighted sum. Completions are scored with the prompt-side prefix (e.g. an
//! opening `<think>` put after the assistant header) in front.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::task::AlignTask;
use crate::data::preprocess::ItemRow;
use crate::grpo::{Reward, Scored};
use crate::prompts::parse_completion;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleRewardConfig {
    pub format: f32,
    pub legal: f32,
    pub correct: f32,
    /// Partial format credit for the tags present (see the module docs).
    pub partial_format: bool,
}

impl Default for RuleRewardConfig {
    fn default() -> Self {
        Self { format: 1.0, legal: 1.0, correct: 1.0, partial_format: true }
    }
}

/// Lowercase, every non-alphanumeric character a space, spaces collapsed.
pub fn normalize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_alphanumeric() { c.to_lowercase().next().unwrap_or(c) } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The normalised forms a title is recognised by: as written, without a trailing "(year)", and
/// with a trailing ", The"/", A"/", An" moved to the front (MovieLens writes "Matrix, The (1999)").
fn title_keys(title: &str) -> Vec<String> {
    let t = title.trim();
    let no_year = match t.rfind('(') {
        Some(i) if t.ends_with(')') && t[i + 1..t.len() - 1].trim().chars().all(|c| c.is_ascii_digit() || c == '-') => {
            t[..i].trim()
        }
        _ => t,
    };
    let mut keys = vec![normalize(t), normalize(no_year)];
    for art in ["The", "A", "An", "Les", "La", "Le", "Il", "Das", "Der", "Die"] {
        if let Some(stem) = no_year.strip_suffix(&format!(", {art}")) {
            let moved = format!("{art} {stem}");
            keys.push(normalize(&format!("{moved} {}", &t[no_year.len()..])));
            keys.push(normalize(&moved));
        }
    }
    keys.retain(|k| !k.is_empty());
    keys.dedup();
    keys
}

/// Which candidate a free-text answer names, trying in order:
/// 1. exact title (after trimming whitespace and surrounding quotes);
/// 2. normalised title ([`normalize`]; with or without the year, article moved or not), after
///    dropping a leading list number such as "3. ";
/// 3. candidate index: "3", "#3", "3.", "candidate 3", "option 3" (1-based).
///
/// A rule that matches more than one candidate matches none (the answer is ambiguous).
pub fn match_candidate(answer: &str, titles: &[&str]) -> Option<usize> {
    let a = answer.trim().trim_matches(|c| c == '"' || c == '\'' || c == '*').trim();
    let unique = |hits: Vec<usize>| (hits.len() == 1).then(|| hits[0]);
    if let Some(i) = unique((0..titles.len()).filter(|&i| titles[i].trim() == a).collect()) {
        return Some(i);
    }
    let n = normalize(a);
    let words: Vec<&str> = n.split(' ').collect();
    let without_number = match words.first() {
        Some(w) if words.len() > 1 && w.chars().all(|c| c.is_ascii_digit()) => words[1..].join(" "),
        _ => n.clone(),
    };
    for form in [&n, &without_number] {
        let hits: Vec<usize> = (0..titles.len()).filter(|&i| title_keys(titles[i]).contains(form)).collect();
        if let Some(i) = unique(hits) {
            return Some(i);
        }
    }
    let index = match words.as_slice() {
        [w] => w.parse::<usize>().ok(),
        ["candidate" | "option" | "item" | "movie", w] => w.parse::<usize>().ok(),
        _ => None,
    };
    index.filter(|&k| k >= 1 && k <= titles.len()).map(|k| k - 1)
}

/// Format credit of a completion (see the module docs).
pub fn format_score(text: &str, partial: bool) -> f32 {
    format_credit(text, parse_completion(text).well_formed, partial)
}

/// [`format_score`] for a completion already parsed.
fn format_credit(text: &str, well_formed: bool, partial: bool) -> f32 {
    if well_formed {
        return 1.0;
    }
    if !partial {
        return 0.0;
    }
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    let mut present = 0;
    for tag in ["<think>", "</think>", "<answer>", "</answer>"] {
        if let Some(i) = lower[from..].find(tag) {
            present += 1;
            from += i + tag.len();
        }
    }
    0.75 * present as f32 / 4.0
}

/// What one completion said, judged against its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    pub well_formed: bool,
    /// Index into the task's candidates.
    pub choice: Option<usize>,
    pub correct: bool,
}

pub struct RuleReward<'a> {
    pub cfg: RuleRewardConfig,
    pub items: &'a [ItemRow],
    /// Prompt-side text the completion continues (prepended before parsing).
    pub prefix: String,
}

impl RuleReward<'_> {
    pub fn judge(&self, task: &AlignTask, completion: &str) -> (Judged, f32) {
        let text = format!("{}{completion}", self.prefix);
        let parsed = parse_completion(&text);
        let titles: Vec<&str> = task.candidates.iter().map(|&i| self.items[i as usize].info.title.as_str()).collect();
        let choice = parsed.answer.as_deref().and_then(|a| match_candidate(a, &titles));
        let correct = choice.is_some_and(|c| task.candidates[c] == task.target);
        let format = format_credit(&text, parsed.well_formed, self.cfg.partial_format);
        (Judged { well_formed: parsed.well_formed, choice, correct }, format)
    }
}

impl Reward<AlignTask> for RuleReward<'_> {
    fn names(&self) -> Vec<String> {
        vec!["format".into(), "legal".into(), "correct".into()]
    }

    fn score(&self, batch: &[(&AlignTask, &str)]) -> Result<Vec<Scored>> {
        Ok(batch
            .iter()
            .map(|(task, text)| {
                let (j, format) = self.judge(task, text);
                let parts = vec![format, j.choice.is_some() as u8 as f32, j.correct as u8 as f32];
                let c = &self.cfg;
                Scored { total: c.format * parts[0] + c.legal * parts[1] + c.correct * parts[2], parts }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TITLES: [&str; 4] = ["Matrix, The (1999)", "Heat (1995)", "Toy Story (1995)", "Toy Story 2 (1999)"];

    #[test]
    fn exact_normalised_and_index_matches() {
        assert_eq!(match_candidate("Heat (1995)", &TITLES), Some(1));
        assert_eq!(match_candidate("  \"Heat (1995)\" ", &TITLES), Some(1));
        assert_eq!(match_candidate("heat", &TITLES), Some(1));
        assert_eq!(match_candidate("The Matrix", &TITLES), Some(0));
        assert_eq!(match_candidate("the matrix (1999)", &TITLES), Some(0));
        assert_eq!(match_candidate("Matrix, The", &TITLES), Some(0));
        assert_eq!(match_candidate("3. Toy Story (1995)", &TITLES), Some(2));
        assert_eq!(match_candidate("toy story 2", &TITLES), Some(3));
        assert_eq!(match_candidate("Toy Story", &TITLES), Some(2));
        assert_eq!(match_candidate("2", &TITLES), Some(1));
        assert_eq!(match_candidate("Candidate 4", &TITLES), Some(3));
        assert_eq!(match_candidate("#1", &TITLES), Some(0));
    }

    #[test]
    fn non_answers_do_not_match() {
        assert_eq!(match_candidate("5", &TITLES), None);
        assert_eq!(match_candidate("0", &TITLES), None);
        assert_eq!(match_candidate("Heat (1995) or Toy Story (1995)", &TITLES), None);
        assert_eq!(match_candidate("Casino (1995)", &TITLES), None);
        assert_eq!(match_candidate("", &TITLES), None);
        // Ambiguous: two candidates share the normalised form.
        assert_eq!(match_candidate("heat", &["Heat (1995)", "Heat (1986)"]), None);
    }

    #[test]
    fn format_credit() {
        assert_eq!(format_score("<think>a</think>\n<answer>b</answer>", true), 1.0);
        assert_eq!(format_score("<think>a</think> text <answer>b</answer>", false), 0.0);
        assert_eq!(format_score("<think>a</think> text <answer>b</answer>", true), 0.75);
        assert_eq!(format_score("<think>a</think>", true), 0.375);
        assert_eq!(format_score("no tags", true), 0.0);
    }

    #[test]
    fn rule_reward_components_and_weights() {
        use crate::data::ItemInfo;
        let items: Vec<ItemRow> = TITLES
            .iter()
            .map(|t| ItemRow { raw_id: t.to_string(), info: ItemInfo { title: t.to_string(), text: String::new() } })
            .collect();
        let cfg = RuleRewardConfig { format: 0.5, legal: 1.0, correct: 2.0, partial_format: false };
        let r = RuleReward { cfg, items: &items, prefix: "<think>".into() };
        let task = AlignTask { record: 0, user: 0, target: 1, history: vec![], candidates: vec![2, 1, 0], example: 0 };
        let s = r
            .score(&[
                (&task, "likes crime</think><answer>Heat</answer>"),
                (&task, "x</think><answer>The Matrix</answer>"),
                (&task, "x</think>Heat"),
            ])
            .unwrap();
        assert_eq!(s[0].parts, vec![1.0, 1.0, 1.0]);
        assert_eq!(s[0].total, 3.5);
        assert_eq!(s[1].parts, vec![1.0, 1.0, 0.0]);
        assert_eq!(s[2].parts, vec![0.0, 0.0, 0.0]);
    }
}
