//! Rows of generated features, their append-only progress logs (JSON lines, for resume) and
//! their Parquet files. Parquet keeps several patterns per user and any number of reasons per
//! (user, item): readers take a user's newest pattern and an item's most recent reasons, so later
//! stages (the chronological correction) append instead of rewriting.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, UInt32Type};
use arrow_array::{Int64Array, StringArray, UInt32Array};
use arrow_schema::DataType;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::prepared::{batch, column, read_parquet, write_parquet};
use crate::data::DataError;

pub const PATTERNS: &str = "patterns.parquet";
pub const REASONS: &str = "reasons.parquet";
pub const MANIFEST: &str = "manifest.json";

/// Snapshot state files are split into this many partitions by key (user for patterns and
/// history, item for reasons). When the worker count divides it, every key of a partition lives on
/// one worker, so each worker writes its own partitions in parallel and the files do not depend on
/// the worker count; otherwise the board merges the rows and writes every partition.
pub const PARTITIONS: usize = 4;

pub fn part_path(dir: &Path, stem: &str, k: usize) -> PathBuf {
    dir.join(format!("{stem}-p{k}.parquet"))
}

/// The files of one kind (`patterns`, `reasons`, `history`) in a directory: `<stem>.parquet`
/// (from `curec features`) or its partitions (from a snapshot).
pub fn kind_files(dir: &Path, stem: &str) -> Vec<PathBuf> {
    let whole = dir.join(format!("{stem}.parquet"));
    if whole.is_file() {
        return vec![whole];
    }
    (0..PARTITIONS).map(|k| part_path(dir, stem, k)).filter(|p| p.is_file()).collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatternRow {
    pub user: u32,
    /// Time of the newest interaction the pattern has seen.
    pub timestamp: i64,
    pub text: String,
    /// The completion had an `<answer>` section (else `text` is the completion without tags).
    #[serde(default = "yes")]
    pub parsed: bool,
    #[serde(default)]
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReasonRow {
    pub user: u32,
    pub item: u32,
    pub timestamp: i64,
    pub text: String,
    #[serde(default = "yes")]
    pub parsed: bool,
    #[serde(default)]
    pub tokens: usize,
}

fn yes() -> bool {
    true
}

/// Read a JSON-lines progress log; a torn last line (a kill mid-write) is cut off the file.
pub fn read_log<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut rows = Vec::new();
    let mut good = 0usize;
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break;
        }
        match serde_json::from_str(line.trim_end()) {
            Ok(r) => rows.push(r),
            Err(_) => break,
        }
        good += line.len();
    }
    if good < text.len() {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(good as u64)?;
    }
    Ok(rows)
}

/// Append rows to a progress log and flush them to disk.
pub fn append_log<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open for appending", path.display()))?;
    let mut buf = String::new();
    for r in rows {
        buf.push_str(&serde_json::to_string(r)?);
        buf.push('\n');
    }
    f.write_all(buf.as_bytes())?;
    f.sync_data()?;
    Ok(())
}

pub fn write_patterns(path: &Path, rows: &[PatternRow], raw_users: &[String]) -> Result<(), DataError> {
    write_pattern_columns(path, rows, |r| (r.user, r.timestamp, r.text.as_str()), raw_users)
}

/// The `patterns.parquet` schema for any row type: `cols` gives (user, timestamp, text).
pub fn write_pattern_columns<T>(
    path: &Path,
    rows: &[T],
    cols: impl Fn(&T) -> (u32, i64, &str),
    raw_users: &[String],
) -> Result<(), DataError> {
    let raw = |u: u32| raw_users.get(u as usize).map_or("", String::as_str);
    write_parquet(
        path,
        &batch(
            vec![
                ("user", DataType::UInt32),
                ("raw_user", DataType::Utf8),
                ("timestamp", DataType::Int64),
                ("text", DataType::Utf8),
            ],
            vec![
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| cols(r).0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| raw(cols(r).0)))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| cols(r).1))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| cols(r).2))),
            ],
        ),
    )
}

pub fn write_reasons(path: &Path, rows: &[ReasonRow], raw_items: &[String]) -> Result<(), DataError> {
    write_reason_columns(path, rows, |r| (r.user, r.item, r.timestamp, r.text.as_str()), raw_items)
}

/// The `reasons.parquet` schema for any row type: `cols` gives (user, item, timestamp, text).
pub fn write_reason_columns<T>(
    path: &Path,
    rows: &[T],
    cols: impl Fn(&T) -> (u32, u32, i64, &str),
    raw_items: &[String],
) -> Result<(), DataError> {
    let raw = |i: u32| raw_items.get(i as usize).map_or("", String::as_str);
    write_parquet(
        path,
        &batch(
            vec![
                ("user", DataType::UInt32),
                ("item", DataType::UInt32),
                ("raw_item", DataType::Utf8),
                ("timestamp", DataType::Int64),
                ("text", DataType::Utf8),
            ],
            vec![
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| cols(r).0))),
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| cols(r).1))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| raw(cols(r).1)))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| cols(r).2))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| cols(r).3))),
            ],
        ),
    )
}

pub fn read_patterns(path: &Path) -> Result<Vec<PatternRow>, DataError> {
    let b = read_parquet(path)?;
    let user = column(path, &b, "user", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let ts = column(path, &b, "timestamp", DataType::Int64)?.as_primitive::<Int64Type>();
    let text = column(path, &b, "text", DataType::Utf8)?.as_string::<i32>();
    Ok((0..b.num_rows())
        .map(|r| PatternRow {
            user: user.value(r),
            timestamp: ts.value(r),
            text: text.value(r).to_string(),
            parsed: true,
            tokens: 0,
        })
        .collect())
}

pub fn read_reasons(path: &Path) -> Result<Vec<ReasonRow>, DataError> {
    let b = read_parquet(path)?;
    let user = column(path, &b, "user", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let item = column(path, &b, "item", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let ts = column(path, &b, "timestamp", DataType::Int64)?.as_primitive::<Int64Type>();
    let text = column(path, &b, "text", DataType::Utf8)?.as_string::<i32>();
    Ok((0..b.num_rows())
        .map(|r| ReasonRow {
            user: user.value(r),
            item: item.value(r),
            timestamp: ts.value(r),
            text: text.value(r).to_string(),
            parsed: true,
            tokens: 0,
        })
        .collect())
}

/// The patterns of a features directory or a replay snapshot (`patterns.parquet` or its partitions).
pub fn read_patterns_in(dir: &Path) -> Result<Vec<PatternRow>, DataError> {
    let mut rows = Vec::new();
    for p in kind_files(dir, "patterns") {
        rows.extend(read_patterns(&p)?);
    }
    Ok(rows)
}

/// The reasons of a features directory or a replay snapshot (`reasons.parquet` or its partitions).
pub fn read_reasons_in(dir: &Path) -> Result<Vec<ReasonRow>, DataError> {
    let mut rows = Vec::new();
    for p in kind_files(dir, "reasons") {
        rows.extend(read_reasons(&p)?);
    }
    Ok(rows)
}

/// Each user's newest pattern (ties: the later row).
pub fn latest_patterns(rows: &[PatternRow]) -> HashMap<u32, &PatternRow> {
    let mut m: HashMap<u32, &PatternRow> = HashMap::new();
    for r in rows {
        match m.get(&r.user) {
            Some(old) if old.timestamp > r.timestamp => {}
            _ => {
                m.insert(r.user, r);
            }
        }
    }
    m
}

/// Each item's reasons, oldest first, keeping the most recent `keep` (0 = all).
pub fn reason_lists(rows: &[ReasonRow], n_items: usize, keep: usize) -> Vec<Vec<&ReasonRow>> {
    let mut lists: Vec<Vec<&ReasonRow>> = vec![Vec::new(); n_items];
    for r in rows {
        if (r.item as usize) < n_items {
            lists[r.item as usize].push(r);
        }
    }
    for l in &mut lists {
        l.sort_by_key(|r| (r.timestamp, r.user));
        if keep > 0 && l.len() > keep {
            l.drain(..l.len() - keep);
        }
    }
    lists
}

/// Generated features in memory.
#[derive(Debug, Clone, Default)]
pub struct Features {
    pub patterns: Vec<PatternRow>,
    pub reasons: Vec<ReasonRow>,
}
impl Features {
    pub fn load(dir: &Path) -> Result<Self> {
        if kind_files(dir, "patterns").is_empty() || kind_files(dir, "reasons").is_empty() {
            bail!(
                "{}: not a features directory (expected patterns.parquet and reasons.parquet from `curec features`, or a replay snapshot)",
                dir.display()
            );
        }
        Ok(Self { patterns: read_patterns_in(dir)?, reasons: read_reasons_in(dir)? })
    }
}
