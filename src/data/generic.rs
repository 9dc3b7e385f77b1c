//! The generic log: one CSV (comma-separated, with header) or Parquet file with columns
//! `user, item, timestamp, rating` and optionally `title` and `text` (item side information) and
//! `op` (`add`, the default, or `delete`: a retraction, which only `curec ingest` accepts).
//! Also home of [`CsvRows`], the checked CSV reader the MovieLens CSV reader shares.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::Array;
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::lines::{rating_field, timestamp_field};
use super::{DataError, ItemInfo, RawLog};

const REQUIRED: [&str; 4] = ["user", "item", "timestamp", "rating"];
const OPTIONAL: [&str; 3] = ["title", "text", "op"];

/// Whether an `op` field is a retraction (`delete`) or an addition (`add` or empty).
fn is_delete(path: &Path, line: usize, op: &str) -> Result<bool, DataError> {
    match op.trim() {
        "" | "add" => Ok(false),
        "delete" => Ok(true),
        other => Err(DataError::row(path, line, format!("column op: expected 'add' or 'delete', found '{other}'"))),
    }
}

/// Locate the log: the path itself if it is a file, else the single `.csv`/`.parquet` file in the directory.
pub fn find_file(input: &Path) -> Result<PathBuf, DataError> {
    if input.is_file() {
        return Ok(input.to_path_buf());
    }
    let entries = std::fs::read_dir(input).map_err(|e| DataError::io(input, e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("csv") | Some("parquet")))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(DataError::file(input, "no .csv or .parquet log found (generic format)")),
        n => Err(DataError::file(input, format!("{n} .csv/.parquet files found; pass the log file itself"))),
    }
}

pub fn read(input: &Path) -> Result<RawLog, DataError> {
    let path = find_file(input)?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => read_parquet(&path),
        _ => read_csv(&path),
    }
}

fn read_csv(path: &Path) -> Result<RawLog, DataError> {
    let mut log = RawLog::default();
    let mut rows = CsvRows::open_with(path, &REQUIRED, &OPTIONAL)?;
    while let Some((line, r)) = rows.next_row()? {
        let ts = timestamp_field(path, line, "timestamp", r[2])?;
        let rating = rating_field(path, line, "rating", r[3])?;
        if r[0].trim().is_empty() || r[1].trim().is_empty() {
            return Err(DataError::row(path, line, "columns user and item must not be empty"));
        }
        if is_delete(path, line, r[6])? {
            log.deletes.push((log.interactions.len(), line));
        }
        log.push(r[0].trim(), r[1].trim(), ts, rating);
        add_info(&mut log, r[1].trim(), r[4], r[5]);
    }
    Ok(log)
}

/// First non-empty title/text seen for an item wins.
fn add_info(log: &mut RawLog, item: &str, title: &str, text: &str) {
    if title.is_empty() && text.is_empty() {
        return;
    }
    let i = log.items.intern(item);
    log.info.entry(i).or_insert_with(|| ItemInfo {
        title: if title.is_empty() { item.to_string() } else { title.to_string() },
        text: if text.is_empty() { title.to_string() } else { text.to_string() },
    });
}

fn read_parquet(path: &Path) -> Result<RawLog, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let perr = |e: parquet::errors::ParquetError| DataError::file(path, format!("not a readable Parquet file: {e}"));
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(perr)?.with_batch_size(65536).build().map_err(perr)?;
    let mut log = RawLog::default();
    let mut row = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| DataError::file(path, format!("reading Parquet: {e}")))?;
        let col = |name: &str, required: bool| -> Result<Option<Vec<Option<String>>>, DataError> {
            match batch.schema().index_of(name) {
                Ok(i) => column_strings(path, name, batch.column(i).as_ref()).map(Some),
                Err(_) if required => Err(DataError::file(
                    path,
                    format!("missing column '{name}': expected columns user, item, timestamp, rating[, title, text]"),
                )),
                Err(_) => Ok(None),
            }
        };
        let cols: Vec<Vec<Option<String>>> =
            REQUIRED.iter().map(|n| col(n, true).map(Option::unwrap)).collect::<Result<_, _>>()?;
        let title = col("title", false)?;
        let text = col("text", false)?;
        let op = col("op", false)?;
        for r in 0..batch.num_rows() {
            let line = row + r + 1;
            let get = |c: usize| -> Result<&str, DataError> {
                cols[c][r]
                    .as_deref()
                    .ok_or_else(|| DataError::row(path, line, format!("column {}: null value", REQUIRED[c])))
            };
            let ts = timestamp_field(path, line, "timestamp", get(2)?)?;
            let rating = rating_field(path, line, "rating", get(3)?)?;
            if is_delete(path, line, op.as_ref().and_then(|v| v[r].as_deref()).unwrap_or(""))? {
                log.deletes.push((log.interactions.len(), line));
            }
            log.push(get(0)?, get(1)?, ts, rating);
            let opt = |c: &Option<Vec<Option<String>>>| c.as_ref().and_then(|v| v[r].clone()).unwrap_or_default();
            add_info(&mut log, get(1)?, &opt(&title), &opt(&text));
        }
        row += batch.num_rows();
    }
    if row == 0 {
        return Err(DataError::file(path, "file has no rows"));
    }
    Ok(log)
}

/// Any integer, float or string column rendered as text (ids may be either; numbers are parsed later).
fn column_strings(path: &Path, name: &str, a: &dyn Array) -> Result<Vec<Option<String>>, DataError> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    macro_rules! prim {
        ($t:ty) => {
            a.as_primitive::<$t>().iter().map(|v| v.map(|v| v.to_string())).collect()
        };
    }
    Ok(match a.data_type() {
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 => prim!(Float32Type),
        DataType::Float64 => prim!(Float64Type),
        DataType::Utf8 => a.as_string::<i32>().iter().map(|v| v.map(str::to_string)).collect(),
        DataType::LargeUtf8 => a.as_string::<i64>().iter().map(|v| v.map(str::to_string)).collect(),
        other => {
            return Err(DataError::file(
                path,
                format!("column '{name}': unsupported type {other}, expected integer, float or string"),
            ))
        }
    })
}

/// A comma-separated file with a header, read row by row with the required columns located by name.
pub struct CsvRows {
    path: PathBuf,
    reader: csv::Reader<File>,
    /// Column index for each requested name (`None` for an absent optional column).
    idx: Vec<Option<usize>>,
    record: csv::StringRecord,
    rows: usize,
}

impl CsvRows {
    pub fn open(path: &Path, required: &[&str]) -> Result<Self, DataError> {
        Self::open_with(path, required, &[])
    }

    /// Required columns come first in each row, then the optional ones ("" when the file lacks them).
    pub fn open_with(path: &Path, required: &[&str], optional: &[&str]) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
            return Err(DataError::file(path, "file is empty"));
        }
        let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(file);
        let header = reader.headers().map_err(|e| csv_error(path, e))?.clone();
        let names: Vec<&str> = header.iter().map(|h| h.trim().trim_start_matches('\u{feff}')).collect();
        if names.len() == 1 && [';', '\t', '|'].iter().any(|s| names[0].contains(*s)) {
            return Err(DataError::row(
                path,
                1,
                format!("header '{}' is not comma-separated: expected columns {}", names[0], required.join(",")),
            ));
        }
        let mut idx = Vec::new();
        for want in required {
            let i = names.iter().position(|n| n == want).ok_or_else(|| {
                DataError::row(
                    path,
                    1,
                    format!(
                        "missing column '{want}': expected columns {} (found {})",
                        required.join(","),
                        names.join(",")
                    ),
                )
            })?;
            idx.push(Some(i));
        }
        for want in optional {
            idx.push(names.iter().position(|n| n == want));
        }
        Ok(CsvRows { path: path.to_path_buf(), reader, idx, record: csv::StringRecord::new(), rows: 0 })
    }

    /// The next row as (1-based line number, fields in requested order); errors on a file without rows.
    pub fn next_row(&mut self) -> Result<Option<(usize, Vec<&str>)>, DataError> {
        let more = self.reader.read_record(&mut self.record).map_err(|e| csv_error(&self.path, e))?;
        if !more {
            if self.rows == 0 {
                return Err(DataError::file(&self.path, "file has a header but no rows"));
            }
            return Ok(None);
        }
        self.rows += 1;
        let line = self.record.position().map(|p| p.line() as usize).unwrap_or(self.rows + 1);
        let rec = &self.record;
        Ok(Some((line, self.idx.iter().map(|i| i.and_then(|i| rec.get(i)).unwrap_or("")).collect())))
    }
}

fn csv_error(path: &Path, e: csv::Error) -> DataError {
    let line = e.position().map(|p| p.line() as usize);
    let msg = match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("expected {expected_len} comma-separated fields as in the header, found {len}")
        }
        csv::ErrorKind::Utf8 { .. } => "invalid UTF-8".to_string(),
        _ => e.to_string(),
    };
    match line {
        Some(l) => DataError::row(path, l, msg),
        None => DataError::file(path, msg),
    }
}
