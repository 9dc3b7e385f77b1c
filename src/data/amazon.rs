//! Amazon Reviews 2023: reviews `<Category>.jsonl` (user_id, parent_asin, rating, timestamp in ms) and
//! metadata `meta_<Category>.jsonl` (parent_asin, title, categories, description list).
//! Item text: "title; categories: a > b; description: first ~300 characters".

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::lines::{numbered, read_text, Encoding};
use super::{DataError, ItemInfo, RawLog};

/// Characters of the description kept for the item text.
const DESCRIPTION_CHARS: usize = 300;

/// (reviews, metadata) files: a reviews `.jsonl` file, or a directory with `X.jsonl` and `meta_X.jsonl`.
pub fn find_files(input: &Path) -> Result<(PathBuf, Option<PathBuf>), DataError> {
    if input.is_file() {
        let name = input.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let meta = input.with_file_name(format!("meta_{name}"));
        return Ok((input.to_path_buf(), meta.is_file().then_some(meta)));
    }
    let entries = std::fs::read_dir(input).map_err(|e| DataError::io(input, e))?;
    let mut reviews: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".jsonl") && !n.starts_with("meta_")
        })
        .collect();
    reviews.sort();
    match reviews.len() {
        1 => {
            let r = reviews.remove(0);
            let meta = input.join(format!("meta_{}", r.file_name().unwrap().to_string_lossy()));
            Ok((r, meta.is_file().then_some(meta)))
        }
        0 => Err(DataError::file(input, "no <Category>.jsonl reviews file found (amazon2023)")),
        n => Err(DataError::file(input, format!("{n} review .jsonl files found; pass one file"))),
    }
}

pub fn read(input: &Path) -> Result<RawLog, DataError> {
    let (reviews, meta) = find_files(input)?;
    let mut log = RawLog::default();
    let text = read_text(&reviews, Encoding::Utf8)?;
    for (line, l) in numbered(&text) {
        let v = parse_object(&reviews, line, l)?;
        let user = string_key(&reviews, line, &v, "user_id")?;
        let item = string_key(&reviews, line, &v, "parent_asin")?;
        let rating = super::lines::rating(&reviews, line, "rating", number_key(&reviews, line, &v, "rating")?)?;
        let ts_ms = number_key(&reviews, line, &v, "timestamp")?;
        let ts = super::lines::timestamp(
            &reviews,
            line,
            "timestamp",
            if ts_ms.is_finite() { ts_ms as i64 / 1000 } else { -1 },
        )?;
        log.push(user, item, ts, rating);
    }
    if let Some(meta) = meta {
        let text = read_text(&meta, Encoding::Utf8)?;
        for (line, l) in numbered(&text) {
            let v = parse_object(&meta, line, l)?;
            let item = string_key(&meta, line, &v, "parent_asin")?;
            let title = v.get("title").and_then(Value::as_str).unwrap_or("").trim().to_string();
            let cats: Vec<&str> = strings(v.get("categories"));
            let desc: Vec<&str> = strings(v.get("description"));
            log.set_info(item, item_info(item, &title, &cats, &desc.join(" ")));
        }
    }
    Ok(log)
}

pub fn item_info(asin: &str, title: &str, categories: &[&str], description: &str) -> ItemInfo {
    let title = if title.is_empty() { asin.to_string() } else { title.to_string() };
    let mut text = title.clone();
    if !categories.is_empty() {
        text.push_str("; categories: ");
        text.push_str(&categories.join(" > "));
    }
    let d = description.trim();
    if !d.is_empty() {
        text.push_str("; description: ");
        let cut: String = d.chars().take(DESCRIPTION_CHARS).collect();
        text.push_str(&cut);
        if d.chars().count() > DESCRIPTION_CHARS {
            text.push('…');
        }
    }
    ItemInfo { title, text }
}

fn strings(v: Option<&Value>) -> Vec<&str> {
    match v {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).collect(),
        Some(Value::String(s)) if !s.trim().is_empty() => vec![s.trim()],
        _ => vec![],
    }
}

fn parse_object(path: &Path, line: usize, l: &str) -> Result<Value, DataError> {
    let v: Value = serde_json::from_str(l)
        .map_err(|e| DataError::row(path, line, format!("expected one JSON object per line: {e}")))?;
    if !v.is_object() {
        return Err(DataError::row(path, line, "expected one JSON object per line"));
    }
    Ok(v)
}

fn string_key<'a>(path: &Path, line: usize, v: &'a Value, key: &str) -> Result<&'a str, DataError> {
    match v.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim()),
        Some(_) => Err(DataError::row(path, line, format!("key '{key}': expected a non-empty string"))),
        None => Err(DataError::row(path, line, format!("missing key '{key}'"))),
    }
}

fn number_key(path: &Path, line: usize, v: &Value, key: &str) -> Result<f64, DataError> {
    match v.get(key) {
        Some(Value::Number(n)) => {
            n.as_f64().ok_or_else(|| DataError::row(path, line, format!("key '{key}': expected a number")))
        }
        Some(_) => Err(DataError::row(path, line, format!("key '{key}': expected a number"))),
        None => Err(DataError::row(path, line, format!("missing key '{key}'"))),
    }
}
