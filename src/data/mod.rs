//! Data: raw interaction logs in every supported format, the CUREC preprocessing, and the prepared
//! Parquet dataset that every later stage reads.
//!
//! Flow: a reader (`movielens`, `amazon`, `generic`) turns a raw log into a [`RawLog`] with interned
//! raw ids; [`preprocess`] applies the paper's protocol (§5.1.1, §5.1.3); [`prepared`] writes and
//! reads the Parquet files; [`Dataset`] is the in-memory view the models train on.

pub mod amazon;
pub mod dataset;
pub mod error;
pub mod generic;
pub mod lines;
pub mod movielens;
pub mod prepared;
pub mod preprocess;
pub mod time_split;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use dataset::{Dataset, Split};
pub use error::DataError;

/// Raw ids (strings in the source file) mapped to dense indices in order of first appearance.
#[derive(Debug, Default, Clone)]
pub struct Interner {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Interner {
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), i);
        i
    }
    pub fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }
    pub fn name(&self, i: u32) -> &str {
        &self.names[i as usize]
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// One interaction as read, before any filtering. `user`/`item` index the log's interners.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawInteraction {
    pub user: u32,
    pub item: u32,
    /// Seconds since the Unix epoch.
    pub timestamp: i64,
    pub rating: f32,
}

/// Item side information used for prompts: a display title and a longer text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ItemInfo {
    pub title: String,
    pub text: String,
}

/// A raw log: interactions in file order plus whatever item metadata the source has.
#[derive(Debug, Default, Clone)]
pub struct RawLog {
    pub users: Interner,
    pub items: Interner,
    pub interactions: Vec<RawInteraction>,
    /// Metadata by interned item index (items without metadata are absent).
    pub info: HashMap<u32, ItemInfo>,
    /// Rows whose optional `op` column says `delete` (generic format): (row index into
    /// `interactions`, 1-based line). Only `curec ingest` accepts them.
    pub deletes: Vec<(usize, usize)>,
}

impl RawLog {
    pub fn push(&mut self, user: &str, item: &str, timestamp: i64, rating: f32) {
        let user = self.users.intern(user);
        let item = self.items.intern(item);
        self.interactions.push(RawInteraction { user, item, timestamp, rating });
    }
    /// Attach metadata to an item (interning it, so metadata may precede the ratings).
    pub fn set_info(&mut self, item: &str, info: ItemInfo) {
        let i = self.items.intern(item);
        self.info.insert(i, info);
    }
}

/// The raw formats `curec prepare` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// MovieLens-1M: `ratings.dat` + `movies.dat`, `::`-separated, latin-1.
    Ml1m,
    /// MovieLens-100K: `u.data` (tab-separated) + `u.item` (`|`-separated, latin-1).
    Ml100k,
    /// MovieLens CSV (ml-latest-small, ml-25m): `ratings.csv` + `movies.csv`.
    MovielensCsv,
    /// Amazon Reviews 2023: `<Category>.jsonl` + `meta_<Category>.jsonl`.
    Amazon2023,
    /// A generic log: one CSV or Parquet file with columns user, item, timestamp, rating[, text].
    Generic,
}

impl Format {
    pub const ALL: [(&'static str, Format); 5] = [
        ("ml-1m", Format::Ml1m),
        ("ml-100k", Format::Ml100k),
        ("movielens-csv", Format::MovielensCsv),
        ("amazon2023", Format::Amazon2023),
        ("generic", Format::Generic),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, f)| *f == self).map(|(n, _)| *n).unwrap_or("generic")
    }

    pub fn parse(s: &str) -> Result<Format, DataError> {
        if s == "auto" {
            return Err(DataError::msg("format 'auto' must be resolved with Format::detect"));
        }
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, f)| *f).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|(n, _)| *n).collect();
            DataError::msg(format!("unknown format '{s}': expected auto or one of {}", names.join(", ")))
        })
    }

    /// Guess the format from the files present at `input` (a directory or a single file).
    pub fn detect(input: &Path) -> Result<Format, DataError> {
        if !input.exists() {
            return Err(DataError::msg(format!("{}: no such file or directory", input.display())));
        }
        if input.is_file() {
            return match input.extension().and_then(|e| e.to_str()) {
                Some("csv") | Some("parquet") => Ok(Format::Generic),
                Some("jsonl") => Ok(Format::Amazon2023),
                _ => Err(unknown_format(input)),
            };
        }
        let has = |name: &str| input.join(name).is_file();
        if has("ratings.dat") {
            Ok(Format::Ml1m)
        } else if has("u.data") {
            Ok(Format::Ml100k)
        } else if has("ratings.csv") {
            Ok(Format::MovielensCsv)
        } else if amazon::find_files(input).is_ok() {
            Ok(Format::Amazon2023)
        } else if generic::find_file(input).is_ok() {
            Ok(Format::Generic)
        } else {
            Err(unknown_format(input))
        }
    }
}

fn unknown_format(input: &Path) -> DataError {
    DataError::msg(format!(
        "{}: cannot detect the format: expected ratings.dat (ml-1m), u.data (ml-100k), ratings.csv \
         (movielens-csv), <Category>.jsonl + meta_<Category>.jsonl (amazon2023), or one .csv/.parquet \
         log with columns user,item,timestamp,rating (generic); pass --format to force one",
        input.display()
    ))
}

/// Read a raw log in the given format from a directory (or, for generic/Amazon, a file).
pub fn read_raw(input: &Path, format: Format) -> Result<RawLog, DataError> {
    match format {
        Format::Ml1m => movielens::read_ml1m(input),
        Format::Ml100k => movielens::read_ml100k(input),
        Format::MovielensCsv => movielens::read_csv(input),
        Format::Amazon2023 => amazon::read(input),
        Format::Generic => generic::read(input),
    }
}

/// `dir/name`, failing with a message that names the expected file when it is missing.
pub(crate) fn required_file(dir: &Path, name: &str, what: &str) -> Result<PathBuf, DataError> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(DataError::msg(format!("{}: missing file, expected {what}", p.display())))
    }
}
