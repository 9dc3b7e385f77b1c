//! A Parquet cache of text embeddings: `hash` (sha256 of the text, hex) and `vector`
//! (fixed-size list of f32), one file per encoder. Only texts not yet in it are encoded; the file is
//! rewritten atomically after new ones are added.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};

use super::Encoder;
use crate::data::prepared::write_parquet;

pub fn text_hash(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct EmbeddingCache {
    path: PathBuf,
    dim: usize,
    map: HashMap<String, Vec<f32>>,
    dirty: bool,
}

impl EmbeddingCache {
    /// `dir/embeddings-<encoder>.parquet`, loaded if it exists.
    pub fn open(dir: &Path, encoder: &dyn Encoder) -> Result<Self> {
        let slug: String =
            encoder.name().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let path = dir.join(format!("embeddings-{slug}.parquet"));
        let dim = encoder.dim();
        let map = if path.exists() { read(&path, dim)? } else { HashMap::new() };
        Ok(Self { path, dim, map, dirty: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Vectors for `texts` (in order), encoding the ones not cached, `chunk` at a time; `progress`
    /// is told how many were encoded so far.
    pub fn embed(
        &mut self,
        encoder: &dyn Encoder,
        texts: &[&str],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<Vec<f32>>> {
        let hashes: Vec<String> = texts.iter().map(|t| text_hash(t)).collect();
        let mut missing: Vec<usize> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, h) in hashes.iter().enumerate() {
            if !self.map.contains_key(h) && seen.insert(h.clone()) {
                missing.push(i);
            }
        }
        let total = missing.len();
        for (done, chunk) in missing.chunks(256).enumerate() {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let vecs = encoder.encode(&batch)?;
            for (&i, v) in chunk.iter().zip(vecs) {
                anyhow::ensure!(v.len() == self.dim, "encoder returned {} dims, expected {}", v.len(), self.dim);
                self.map.insert(hashes[i].clone(), v);
            }
            self.dirty = true;
            progress(((done + 1) * 256).min(total), total);
        }
        Ok(hashes.iter().map(|h| self.map[h].clone()).collect())
    }

    /// Write the cache if anything was added.
    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut keys: Vec<&String> = self.map.keys().collect();
        keys.sort();
        let values: Vec<f32> = keys.iter().flat_map(|k| self.map[*k].iter().copied()).collect();
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let list = FixedSizeListArray::try_new(
            item.clone(),
            self.dim as i32,
            Arc::new(Float32Array::from(values)) as ArrayRef,
            None,
        )?;
        let schema = Schema::new(vec![
            Field::new("hash", DataType::Utf8, false),
            Field::new("vector", DataType::FixedSizeList(item, self.dim as i32), false),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![Arc::new(StringArray::from_iter_values(keys.iter().map(|k| k.as_str()))), Arc::new(list)],
        )?;
        write_parquet(&self.path, &batch)?;
        self.dirty = false;
        Ok(())
    }
}

fn read(path: &Path, dim: usize) -> Result<HashMap<String, Vec<f32>>> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
        .build()?;
    let mut map = HashMap::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: reading Parquet", path.display()))?;
        let (Some(hash), Some(vector)) = (batch.column_by_name("hash"), batch.column_by_name("vector")) else {
            bail!("{}: expected columns hash and vector", path.display());
        };
        let (Some(hash), Some(vector)) = (hash.as_string_opt::<i32>(), vector.as_fixed_size_list_opt()) else {
            bail!("{}: expected hash as string and vector as a fixed-size list of f32", path.display());
        };
        if vector.value_length() as usize != dim {
            bail!("{}: vectors have {} dims, the encoder gives {dim}", path.display(), vector.value_length());
        }
        let values = vector.values().as_primitive::<Float32Type>().values();
        for r in 0..batch.num_rows() {
            let off = vector.value_offset_at(r);
            map.insert(hash.value(r).to_string(), values[off..off + dim].to_vec());
        }
    }
    Ok(map)
}
