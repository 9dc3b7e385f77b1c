//! The prepared dataset on disk: `interactions.parquet`, `items.parquet`, `users.parquet`,
//! `stats.json`. Every file is written to a temporary name and renamed when complete.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int64Type, UInt32Type};
use arrow_array::{ArrayRef, Float32Array, Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::dataset::{Dataset, Split};
use super::preprocess::{Interaction, ItemRow, Prepared};
use super::{DataError, ItemInfo};

pub const INTERACTIONS: &str = "interactions.parquet";
pub const ITEMS: &str = "items.parquet";
pub const USERS: &str = "users.parquet";
pub const STATS: &str = "stats.json";
/// The stream after the head of a time split (`preprocess.split = "time"`).
pub const STREAM: &str = "stream.parquet";

/// Write bytes produced by `write` to `path` atomically ([`crate::io::write_atomic`]).
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> Result<(), DataError>) -> Result<(), DataError> {
    crate::io::write_atomic(path, write, DataError::io)
}

/// Write one record batch as a Parquet file (snappy, explicit row-group size), atomically.
pub fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<(), DataError> {
    write_atomic(path, |f| {
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(1 << 20))
            .build();
        let perr = |e: parquet::errors::ParquetError| DataError::file(path, format!("writing Parquet: {e}"));
        let mut w = ArrowWriter::try_new(f, batch.schema(), Some(props)).map_err(perr)?;
        w.write(batch).map_err(perr)?;
        w.close().map_err(perr)?;
        Ok(())
    })
}

/// Read a whole Parquet file into one batch.
pub fn read_parquet(path: &Path) -> Result<RecordBatch, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let perr = |e: parquet::errors::ParquetError| DataError::file(path, format!("not a readable Parquet file: {e}"));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(perr)?;
    let schema = builder.schema().clone();
    let reader = builder.with_batch_size(1 << 16).build().map_err(perr)?;
    let batches: Vec<RecordBatch> =
        reader.collect::<Result<_, _>>().map_err(|e| DataError::file(path, format!("reading Parquet: {e}")))?;
    concat_batches(&schema, &batches).map_err(|e| DataError::file(path, e))
}

fn concat_batches(schema: &Arc<Schema>, batches: &[RecordBatch]) -> Result<RecordBatch, String> {
    if batches.len() == 1 {
        return Ok(batches[0].clone());
    }
    // Concatenate column by column through the typed builders we use (u32, i64, f32, utf8).
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (c, field) in schema.fields().iter().enumerate() {
        let arr: ArrayRef = match field.data_type() {
            DataType::UInt32 => Arc::new(UInt32Array::from_iter(
                batches.iter().flat_map(|b| b.column(c).as_primitive::<UInt32Type>().iter()),
            )),
            DataType::Int64 => Arc::new(Int64Array::from_iter(
                batches.iter().flat_map(|b| b.column(c).as_primitive::<Int64Type>().iter()),
            )),
            DataType::Float32 => Arc::new(Float32Array::from_iter(
                batches.iter().flat_map(|b| b.column(c).as_primitive::<Float32Type>().iter()),
            )),
            DataType::Utf8 => {
                Arc::new(StringArray::from_iter(batches.iter().flat_map(|b| b.column(c).as_string::<i32>().iter())))
            }
            t => return Err(format!("column '{}': unsupported type {t}", field.name())),
        };
        cols.push(arr);
    }
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| e.to_string())
}

/// A record batch of non-nullable columns.
pub fn batch(fields: Vec<(&str, DataType)>, cols: Vec<ArrayRef>) -> RecordBatch {
    let schema = Schema::new(fields.into_iter().map(|(n, t)| Field::new(n, t, false)).collect::<Vec<_>>());
    RecordBatch::try_new(Arc::new(schema), cols).expect("columns match the schema by construction")
}

pub fn interactions_batch(xs: &[Interaction]) -> RecordBatch {
    batch(
        vec![
            ("user", DataType::UInt32),
            ("item", DataType::UInt32),
            ("timestamp", DataType::Int64),
            ("rating", DataType::Float32),
            ("split", DataType::Utf8),
        ],
        vec![
            Arc::new(UInt32Array::from_iter_values(xs.iter().map(|x| x.user))),
            Arc::new(UInt32Array::from_iter_values(xs.iter().map(|x| x.item))),
            Arc::new(Int64Array::from_iter_values(xs.iter().map(|x| x.timestamp))),
            Arc::new(Float32Array::from_iter_values(xs.iter().map(|x| x.rating))),
            Arc::new(StringArray::from_iter_values(xs.iter().map(|x| x.split.as_str()))),
        ],
    )
}

fn items_batch(items: &[ItemRow]) -> RecordBatch {
    batch(
        vec![
            ("item", DataType::UInt32),
            ("raw_id", DataType::Utf8),
            ("title", DataType::Utf8),
            ("text", DataType::Utf8),
        ],
        vec![
            Arc::new(UInt32Array::from_iter_values(0..items.len() as u32)),
            Arc::new(StringArray::from_iter_values(items.iter().map(|i| i.raw_id.as_str()))),
            Arc::new(StringArray::from_iter_values(items.iter().map(|i| i.info.title.as_str()))),
            Arc::new(StringArray::from_iter_values(items.iter().map(|i| i.info.text.as_str()))),
        ],
    )
}

fn users_batch(p: &Prepared) -> RecordBatch {
    let mut n = vec![0u32; p.users.len()];
    for x in &p.interactions {
        n[x.user as usize] += 1;
    }
    batch(
        vec![("user", DataType::UInt32), ("raw_id", DataType::Utf8), ("interactions", DataType::UInt32)],
        vec![
            Arc::new(UInt32Array::from_iter_values(0..p.users.len() as u32)),
            Arc::new(StringArray::from_iter_values(p.users.iter().map(String::as_str))),
            Arc::new(UInt32Array::from_iter_values(n)),
        ],
    )
}

/// Write the prepared dataset into `dir`; `stats.json` goes last, so its presence means complete.
pub fn write_dir(
    dir: &Path,
    p: &Prepared,
    stream: Option<&super::time_split::Stream>,
    stats: &serde_json::Value,
) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let _ = std::fs::remove_file(dir.join(STATS));
    match stream {
        Some(s) => write_stream(&dir.join(STREAM), s, &p.users)?,
        None => {
            let _ = std::fs::remove_file(dir.join(STREAM));
        }
    }
    write_parquet(&dir.join(INTERACTIONS), &interactions_batch(&p.interactions))?;
    write_parquet(&dir.join(ITEMS), &items_batch(&p.items))?;
    write_parquet(&dir.join(USERS), &users_batch(p))?;
    let json = serde_json::to_string_pretty(stats).expect("stats serialize");
    write_atomic(&dir.join(STATS), |f| {
        use std::io::Write;
        f.write_all(json.as_bytes()).map_err(|e| DataError::io(&dir.join(STATS), e))
    })
}

/// Column `name` of `b`, checked to have type `t` (errors name the file, the column and the types).
pub fn column<'a>(path: &Path, b: &'a RecordBatch, name: &str, t: DataType) -> Result<&'a ArrayRef, DataError> {
    let i = b.schema().index_of(name).map_err(|_| DataError::file(path, format!("missing column '{name}'")))?;
    let c = b.column(i);
    if c.data_type() != &t {
        return Err(DataError::file(path, format!("column '{name}': expected {t}, found {}", c.data_type())));
    }
    Ok(c)
}

pub fn read_interactions(path: &Path) -> Result<Vec<Interaction>, DataError> {
    let b = read_parquet(path)?;
    let user = column(path, &b, "user", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let item = column(path, &b, "item", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let ts = column(path, &b, "timestamp", DataType::Int64)?.as_primitive::<Int64Type>();
    let rating = column(path, &b, "rating", DataType::Float32)?.as_primitive::<Float32Type>();
    let split = column(path, &b, "split", DataType::Utf8)?.as_string::<i32>();
    (0..b.num_rows())
        .map(|r| {
            let s = split.value(r);
            let split = Split::parse(s).ok_or_else(|| {
                DataError::row(path, r + 1, format!("column split: expected train, valid or test, found '{s}'"))
            })?;
            Ok(Interaction {
                user: user.value(r),
                item: item.value(r),
                timestamp: ts.value(r),
                rating: rating.value(r),
                split,
            })
        })
        .collect()
}

fn read_items(path: &Path) -> Result<Vec<ItemRow>, DataError> {
    let b = read_parquet(path)?;
    let raw = column(path, &b, "raw_id", DataType::Utf8)?.as_string::<i32>();
    let title = column(path, &b, "title", DataType::Utf8)?.as_string::<i32>();
    let text = column(path, &b, "text", DataType::Utf8)?.as_string::<i32>();
    Ok((0..b.num_rows())
        .map(|r| ItemRow {
            raw_id: raw.value(r).to_string(),
            info: ItemInfo { title: title.value(r).to_string(), text: text.value(r).to_string() },
        })
        .collect())
}

fn read_users(path: &Path) -> Result<Vec<String>, DataError> {
    let b = read_parquet(path)?;
    let raw = column(path, &b, "raw_id", DataType::Utf8)?.as_string::<i32>();
    Ok((0..b.num_rows()).map(|r| raw.value(r).to_string()).collect())
}

/// Load a prepared directory written by `curec prepare`.
pub fn read_dataset(dir: &Path) -> Result<Dataset, DataError> {
    Ok(read_dataset_and_log(dir)?.0)
}

/// A prepared directory's id maps and interactions, without the dataset's split checks (what
/// `curec ingest` needs: every interaction, whatever its split).
pub struct Log {
    pub users: Vec<String>,
    pub items: Vec<ItemRow>,
    pub interactions: Vec<Interaction>,
}

/// Read [`Log`]: ids checked against users/items.parquet.
pub fn read_log(dir: &Path) -> Result<Log, DataError> {
    if !dir.join(STATS).is_file() {
        return Err(DataError::file(dir, "not a prepared dataset (no stats.json): run `curec prepare` first"));
    }
    let users = read_users(&dir.join(USERS))?;
    let items = read_items(&dir.join(ITEMS))?;
    let xs = read_interactions(&dir.join(INTERACTIONS))?;
    for (r, x) in xs.iter().enumerate() {
        if x.user as usize >= users.len() || x.item as usize >= items.len() {
            return Err(DataError::row(
                &dir.join(INTERACTIONS),
                r + 1,
                "user or item id out of range of users/items.parquet",
            ));
        }
    }
    Ok(Log { users, items, interactions: xs })
}

/// [`read_dataset`] and the interactions it was built from (with timestamps and ratings), from
/// one read of `interactions.parquet`.
pub fn read_dataset_and_log(dir: &Path) -> Result<(Dataset, Vec<Interaction>), DataError> {
    let Log { users, items, interactions: xs } = read_log(dir)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "dataset".into());
    let stats: serde_json::Value =
        std::fs::read_to_string(dir.join(STATS)).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    let name = stats.get("dataset").and_then(|v| v.as_str()).map(str::to_string).unwrap_or(name);
    let mut seen = vec![[0u32; 3]; users.len()];
    for (r, x) in xs.iter().enumerate() {
        let k = match x.split {
            Split::Train => 0,
            Split::Valid => 1,
            Split::Test => 2,
        };
        seen[x.user as usize][k] += 1;
        if k > 0 && seen[x.user as usize][k] > 1 {
            return Err(DataError::row(
                &dir.join(INTERACTIONS),
                r + 1,
                format!(
                    "user '{}' has a second {} row (leave-one-out keeps one)",
                    users[x.user as usize],
                    x.split.as_str()
                ),
            ));
        }
    }
    if let Some((u, s)) = seen.iter().enumerate().find(|(_, s)| s.contains(&0)) {
        let missing = ["train", "valid", "test"][s.iter().position(|&c| c == 0).unwrap_or(0)];
        return Err(DataError::file(
            &dir.join(INTERACTIONS),
            format!("user '{}' has no {missing} row (each user needs train, valid and test rows: run `curec prepare` again)", users[u]),
        ));
    }
    let ds = Dataset::from_interactions(&name, users, items, &xs);
    Ok((ds, xs))
}

/// `stream.parquet`: the stream of a time split, in time order (`raw_user` names users the head
/// does not hold; every item id is in `items.parquet`).
pub fn write_stream(path: &Path, s: &super::time_split::Stream, head_users: &[String]) -> Result<(), DataError> {
    let raw = |u: u32| -> &str {
        let u = u as usize;
        if u < head_users.len() {
            &head_users[u]
        } else {
            &s.new_users[u - head_users.len()]
        }
    };
    let b = batch(
        vec![
            ("user", DataType::UInt32),
            ("raw_user", DataType::Utf8),
            ("item", DataType::UInt32),
            ("timestamp", DataType::Int64),
            ("rating", DataType::Float32),
        ],
        vec![
            Arc::new(UInt32Array::from_iter_values(s.rows.iter().map(|r| r.user))),
            Arc::new(StringArray::from_iter_values(s.rows.iter().map(|r| raw(r.user)))),
            Arc::new(UInt32Array::from_iter_values(s.rows.iter().map(|r| r.item))),
            Arc::new(Int64Array::from_iter_values(s.rows.iter().map(|r| r.timestamp))),
            Arc::new(Float32Array::from_iter_values(s.rows.iter().map(|r| r.rating))),
        ],
    );
    write_parquet(path, &b)
}

/// The stream of a prepared directory (`stream.parquet`) and the raw ids of its new users;
/// a directory without one was not prepared with `--split time`.
pub fn read_stream(dir: &Path) -> Result<(Vec<super::time_split::StreamRow>, Vec<String>), DataError> {
    let path = dir.join(STREAM);
    if !path.is_file() {
        return Err(DataError::file(dir, "no stream.parquet: prepare the data with `curec prepare --split time`"));
    }
    let n_users = read_users(&dir.join(USERS))?.len();
    let n_items = read_items(&dir.join(ITEMS))?.len();
    let b = read_parquet(&path)?;
    let user = column(&path, &b, "user", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let raw = column(&path, &b, "raw_user", DataType::Utf8)?.as_string::<i32>();
    let item = column(&path, &b, "item", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let ts = column(&path, &b, "timestamp", DataType::Int64)?.as_primitive::<Int64Type>();
    let rating = column(&path, &b, "rating", DataType::Float32)?.as_primitive::<Float32Type>();
    let (mut rows, mut new_users) = (Vec::with_capacity(b.num_rows()), Vec::new());
    for r in 0..b.num_rows() {
        let u = user.value(r);
        if u as usize >= n_users + new_users.len() {
            if u as usize != n_users + new_users.len() {
                return Err(DataError::row(
                    &path,
                    r + 1,
                    "new user ids must follow the head's in order of first appearance",
                ));
            }
            new_users.push(raw.value(r).to_string());
        }
        if item.value(r) as usize >= n_items {
            return Err(DataError::row(&path, r + 1, "item id out of range of items.parquet"));
        }
        if r > 0 && ts.value(r) < ts.value(r - 1) {
            return Err(DataError::row(&path, r + 1, "the stream is not in time order"));
        }
        rows.push(super::time_split::StreamRow {
            user: u,
            item: item.value(r),
            timestamp: ts.value(r),
            rating: rating.value(r),
        });
    }
    Ok((rows, new_users))
}
