//! Text encoders for patterns, reasons and item descriptions (paper Eq. 7), behind one trait:
//! the LLM itself (mean-pooled last hidden state, [`llm_encoder`]) or a sentence encoder
//! (all-MiniLM-L6-v2, [`minilm`]). Embeddings are cached in Parquet keyed by the text's sha256
//! ([`cache`]), so re-running a stage encodes only new texts.

pub mod cache;
pub mod llm_encoder;
pub mod minilm;

use anyhow::Result;
use candle_core::Device;

pub use cache::EmbeddingCache;

/// Texts in, one vector per text out (same order).
pub trait Encoder {
    /// A stable name (part of the cache file name and of the run manifest).
    fn name(&self) -> &str;
    fn dim(&self) -> usize;
    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;
}

/// `minilm` (default; all-MiniLM-L6-v2, fetched and verified on first use), a BERT directory, or
/// `llm:<model>` (a GGUF file, HF directory or pinned LLM name, mean-pooled).
pub fn load(spec: &str, device: &Device) -> Result<Box<dyn Encoder>> {
    if let Some(model) = spec.strip_prefix("llm:") {
        return Ok(Box::new(llm_encoder::LlmEncoder::load(model, device)?));
    }
    let name = if spec == "minilm" { "minilm-l6-v2" } else { spec };
    let path = crate::llm::resolve(name)?;
    anyhow::ensure!(
        path.is_dir() && path.join("config.json").is_file(),
        "--encoder '{spec}': expected minilm, a BERT model directory or llm:<model>"
    );
    Ok(Box::new(minilm::MiniLm::load(&path, device)?))
}
