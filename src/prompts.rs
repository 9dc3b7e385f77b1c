//! CUREC's four prompt templates (paper §4.2, §4.3.1, §4.4.2) and the parser for the
//! `<think>…</think><answer>…</answer>` completions they ask for.
//!
//! The templates are text files with `{placeholders}`; the defaults live in
//! `dataflows/prompts/` and are compiled in, and a job can point at edited copies.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::data::preprocess::ItemRow;

/// Which CUREC prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PromptKind {
    /// Recommendation alignment: {history}, {candidates}, {example} (a candidate title used in the
    /// format example) → think + answer (one candidate).
    Alignment,
    /// Pattern generation: {history} → think + answer (the interest pattern).
    Pattern,
    /// Reason generation: {history}, {item} → think + answer (the reason).
    Reason,
    /// Pattern update: {pattern}, {item} → think + answer ("Pattern: …" and "Reason: …").
    PatternUpdate,
}

impl PromptKind {
    pub const ALL: [PromptKind; 4] =
        [PromptKind::Alignment, PromptKind::Pattern, PromptKind::Reason, PromptKind::PatternUpdate];

    pub fn file_name(self) -> &'static str {
        match self {
            PromptKind::Alignment => "alignment.txt",
            PromptKind::Pattern => "pattern.txt",
            PromptKind::Reason => "reason.txt",
            PromptKind::PatternUpdate => "pattern_update.txt",
        }
    }

    pub fn placeholders(self) -> &'static [&'static str] {
        match self {
            PromptKind::Alignment => &["history", "candidates", "example"],
            PromptKind::Pattern => &["history"],
            PromptKind::Reason => &["history", "item"],
            PromptKind::PatternUpdate => &["pattern", "item"],
        }
    }

    fn default_text(self) -> &'static str {
        match self {
            PromptKind::Alignment => include_str!("../dataflows/prompts/alignment.txt"),
            PromptKind::Pattern => include_str!("../dataflows/prompts/pattern.txt"),
            PromptKind::Reason => include_str!("../dataflows/prompts/reason.txt"),
            PromptKind::PatternUpdate => include_str!("../dataflows/prompts/pattern_update.txt"),
        }
    }
}

/// A checked template.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub kind: PromptKind,
    text: String,
}

impl Prompt {
    pub fn builtin(kind: PromptKind) -> Self {
        Self { kind, text: kind.default_text().to_string() }
    }

    /// Read `dir/<kind file>` if `dir` is given and has it, else the built-in default.
    pub fn load(kind: PromptKind, dir: Option<&Path>) -> Result<Self> {
        let Some(path) = dir.map(|d| d.join(kind.file_name())).filter(|p| p.exists()) else {
            return Ok(Self::builtin(kind));
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::parse(kind, text).with_context(|| format!("{}", path.display()))
    }

    /// Check that the text uses exactly the kind's placeholders (each at least once).
    pub fn parse(kind: PromptKind, text: String) -> Result<Self> {
        let used = placeholders_in(&text);
        for p in &used {
            if !kind.placeholders().contains(&p.as_str()) {
                bail!("unknown placeholder {{{p}}}: this prompt takes {}", list(kind));
            }
        }
        for p in kind.placeholders() {
            if !used.iter().any(|u| u == p) {
                bail!("missing placeholder {{{p}}}: this prompt takes {}", list(kind));
            }
        }
        Ok(Self { kind, text })
    }

    /// Fill the placeholders.
    pub fn render(&self, values: &BTreeMap<&str, String>) -> Result<String> {
        let mut out = String::with_capacity(self.text.len() + 256);
        for part in parts(&self.text) {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Name(name) => {
                    out.push_str(values.get(name).with_context(|| format!("prompt value {{{name}}} not given"))?)
                }
            }
        }
        Ok(out)
    }
}

/// An item as the prompts show it: its text (title, year, genres), or its title when it has none.
pub fn item_text(items: &[ItemRow], item: u32) -> &str {
    let info = &items[item as usize].info;
    if info.text.is_empty() {
        &info.title
    } else {
        &info.text
    }
}

/// Numbered lines `1. …`, one per item: its text when `full`, else its title.
pub fn numbered_items(items: &[ItemRow], ids: &[u32], full: bool) -> String {
    ids.iter()
        .enumerate()
        .map(|(i, &it)| {
            let text = if full { item_text(items, it) } else { items[it as usize].info.title.as_str() };
            format!("{}. {text}", i + 1)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A template split into literal text and `{placeholder}` names.
enum Part<'a> {
    Text(&'a str),
    Name(&'a str),
}

/// Split at `{name}` (lowercase letters and `_`); any other brace is literal text.
fn parts(text: &str) -> Vec<Part<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut from = 0;
    while let Some(open) = text[from..].find('{').map(|o| from + o) {
        let after = &text[open + 1..];
        match after.find('}') {
            Some(close) if is_name(&after[..close]) => {
                out.push(Part::Text(&text[start..open]));
                out.push(Part::Name(&after[..close]));
                start = open + close + 2;
                from = start;
            }
            _ => from = open + 1,
        }
    }
    out.push(Part::Text(&text[start..]));
    out
}

fn list(kind: PromptKind) -> String {
    kind.placeholders().iter().map(|p| format!("{{{p}}}")).collect::<Vec<_>>().join(", ")
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
}

fn placeholders_in(text: &str) -> Vec<String> {
    parts(text)
        .into_iter()
        .filter_map(|p| match p {
            Part::Name(n) => Some(n.to_string()),
            Part::Text(_) => None,
        })
        .collect()
}

/// What a completion said.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub think: Option<String>,
    pub answer: Option<String>,
    /// Exactly one `<think>…</think>` followed by exactly one `<answer>…</answer>`, nothing but
    /// whitespace around them (the format reward's rule).
    pub well_formed: bool,
}

/// The first `open … close` section: (start of `open`, body, end of `close`). Tags are found in
/// `lower` (the ASCII-lowercased `text`, which keeps byte offsets).
fn between<'a>(text: &'a str, lower: &str, open: &str, close: &str) -> Option<(usize, &'a str, usize)> {
    let a = lower.find(open)?;
    let start = a + open.len();
    let b = start + lower[start..].find(close)?;
    Some((a, &text[start..b], b + close.len()))
}

/// Parse `<think>` and `<answer>` sections: case-insensitive tags, multi-line bodies, trimmed.
/// An answer without its closing tag (generation cut at the stop string) is taken to the end.
pub fn parse_completion(text: &str) -> Parsed {
    let lower = text.to_ascii_lowercase();
    let think = between(text, &lower, "<think>", "</think>");
    let answer = between(text, &lower, "<answer>", "</answer>");
    let answer_text = match answer {
        Some((_, body, _)) => Some(body.trim().to_string()),
        None => lower.rfind("<answer>").map(|a| text[a + "<answer>".len()..].trim().to_string()),
    };
    let count = |tag: &str| lower.matches(tag).count();
    let well_formed = match (think, answer) {
        (Some((t0, _, t1)), Some((a0, _, a1))) => {
            t1 <= a0
                && text[..t0].trim().is_empty()
                && text[t1..a0].trim().is_empty()
                && text[a1..].trim().is_empty()
                && ["<think>", "</think>", "<answer>", "</answer>"].iter().all(|t| count(t) == 1)
        }
        _ => false,
    };
    Parsed {
        think: think.map(|(_, b, _)| b.trim().to_string()),
        answer: answer_text.filter(|a| !a.is_empty()),
        well_formed,
    }
}

/// Split a pattern-update answer into (pattern, reason) from its `Pattern:` / `Reason:` lines.
/// An answer with a `Reason:` line but no `Pattern:` label (small models often drop the first
/// label) takes the text before `Reason:` as the pattern.
pub fn parse_pattern_update(answer: &str) -> Option<(String, String)> {
    let lower = answer.to_ascii_lowercase();
    let r = lower.find("reason:")?;
    let Some(p) = lower.find("pattern:") else {
        let (pattern, reason) = (answer[..r].trim(), answer[r + 7..].trim());
        return (!pattern.is_empty() && !reason.is_empty()).then(|| (pattern.to_string(), reason.to_string()));
    };
    let (pattern, reason) =
        if p < r { (&answer[p + 8..r], &answer[r + 7..]) } else { (&answer[p + 8..], &answer[r + 7..p]) };
    let (pattern, reason) = (pattern.trim(), reason.trim());
    (!pattern.is_empty() && !reason.is_empty()).then(|| (pattern.to_string(), reason.to_string()))
}
