//! The LLM runtime: real Qwen2/Llama-family weights (GGUF dequantized, or Hugging Face
//! safetensors) in a trainable candle model of our own, the tokenizer (tokenizer.json or built
//! from GGUF metadata), batched generation with a KV cache, per-token log-probs, LoRA, chat
//! templates, CUREC's prompts and their parser, and the pinned-model fetcher.

pub mod attention;
pub mod chat;
pub mod config;
pub mod engine;
pub mod fetch;
pub mod generate;
pub mod kernels;
pub mod logprob;
pub mod lora;
pub mod model;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

pub use chat::ChatTemplate;
pub use config::{Family, LlmConfig};
pub use generate::generate;
pub use logprob::{completion_log_probs, log_probs_with, CompletionLogProbs, Grad};
pub use lora::LoraConfig;
pub use model::{CausalLm, KvCache};
pub use sampling::{Finish, Generation, SamplingConfig};
pub use tokenizer::Tokenizer;

/// A model, its tokenizer and its chat template.
pub struct Llm {
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    /// Where it was loaded from.
    pub source: PathBuf,
    /// The engine's quantized copy (adapters folded in), made on first use by
    /// [`Llm::engine_model`]; change the adapters of `model` only before that.
    quantized: std::sync::OnceLock<engine::QModel>,
    /// The engine's prefix cache, kept across calls (a user's prompts in successive batches).
    pub prefix: std::sync::Mutex<engine::PrefixCache>,
    /// What [`Self::generate_engine`] did, summed over calls (prefix-cache counts are the cache's own).
    pub engine_stats: std::sync::Mutex<engine::EngineStats>,
}

/// The tokenizer (a `tokenizer.json` beside the file, or built from the GGUF metadata) and the
/// chat template of a GGUF file.
pub(crate) fn text_side(
    path: &Path,
    content: &candle_core::quantized::gguf_file::Content,
) -> Result<(Tokenizer, ChatTemplate)> {
    let sibling = path.with_file_name("tokenizer.json");
    let tokenizer = if sibling.exists() {
        Tokenizer::from_file(&sibling)?
    } else {
        Tokenizer::from_gguf(content).with_context(|| format!("{}", path.display()))?
    };
    let jinja = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    Ok((tokenizer, ChatTemplate::from_jinja(jinja.as_deref())))
}

/// `cpu` or `cuda[:N]`; `cuda` needs a build with `--features cuda`.
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal =
                s.strip_prefix("cuda:").map(str::parse).transpose().context("--device cuda:N: N must be an integer")?;
            if !cfg!(feature = "cuda") {
                bail!("--device {s}: this curec was built without CUDA; rebuild with `cargo build --release --features cuda`");
            }
            Ok(Device::new_cuda(ordinal.unwrap_or(0))?)
        }
        other => bail!("--device '{other}': expected cpu or cuda[:N]"),
    }
}

/// f32 on every device. On the CPU candle's matmuls are fastest in f32. On an H200, f32 matched
/// transformers' log-probs to five digits, while bf16 changed SmolLM2's greedy answer and moved
/// its mean log-prob by 1.2%; f16 matched. Pass `--dtype bf16|f16` to trade exactness for memory.
pub fn default_dtype(_dev: &Device) -> DType {
    DType::F32
}

/// `auto` (see [`default_dtype`]), `f32`, `bf16` or `f16`.
pub fn parse_dtype(spec: &str, dev: &Device) -> Result<DType> {
    Ok(match spec {
        "auto" => default_dtype(dev),
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("--dtype '{other}': expected auto, f32, bf16 or f16"),
    })
}

/// Resolve `--model`: an existing GGUF file or HF directory, or a pinned name (fetched on first use).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let pins = fetch::Pins::builtin();
    match pins.find(spec) {
        Some(m) if m.is_cached() => Ok(m.main_path()),
        Some(m) => fetch::fetch(m),
        None => bail!(
            "--model '{spec}': no such file or directory, and not a pinned model (expected a GGUF file, a Hugging Face model directory or one of {})",
            pins.names().join(", ")
        ),
    }
}

impl Llm {
    /// Load from a GGUF file or a Hugging Face directory.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let (cfg, w, tokenizer, jinja) = if path.is_dir() {
            let (cfg, w) = weights::load_hf_dir(path, dtype, device)?;
            let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
            let jinja = std::fs::read_to_string(path.join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["chat_template"].as_str().map(String::from));
            (cfg, w, tokenizer, jinja)
        } else {
            let (content, cfg, w) = weights::load_gguf(path, dtype, device)?;
            let (tokenizer, chat) = text_side(path, &content)?;
            let model = CausalLm::from_weights(cfg, w, dtype, device)?;
            return Ok(Self::from_parts(model, tokenizer, chat, path.to_path_buf()));
        };
        let model = CausalLm::from_weights(cfg, w, dtype, device)?;
        Ok(Self::from_parts(model, tokenizer, ChatTemplate::from_jinja(jinja.as_deref()), path.to_path_buf()))
    }

    /// A model, tokenizer and template put together (tests, stand-ins).
    pub fn from_parts(model: CausalLm, tokenizer: Tokenizer, chat: ChatTemplate, source: PathBuf) -> Self {
        let prefix =
            std::sync::Mutex::new(engine::PrefixCache::new(engine::EngineConfig::default().prefix_cache_mib << 20));
        Self { model, tokenizer, chat, source, quantized: Default::default(), prefix, engine_stats: Default::default() }
    }

    /// Use `q` as the engine's model (e.g. the GGUF file's own blocks, loaded with
    /// [`engine::QModel::load_gguf`], when `model` carries no adapters); false if one was set.
    pub fn set_engine_model(&self, q: engine::QModel) -> bool {
        self.quantized.set(q).is_ok()
    }

    /// Generate with the engine on [`Self::engine_model`], keeping the prefix cache across calls.
    pub fn generate_engine(
        &self,
        prompts: &[Vec<u32>],
        keys: &[u64],
        sampling: &SamplingConfig,
    ) -> Result<Vec<Generation>> {
        let q = self.engine_model()?;
        let cache = std::mem::replace(
            &mut *self.prefix.lock().map_err(|_| anyhow::anyhow!("prefix cache lock poisoned"))?,
            engine::PrefixCache::new(0),
        );
        let requests = engine::requests(prompts, keys, sampling)?;
        let mut e = engine::Engine::with_prefix(q, &self.tokenizer, engine::EngineConfig::default(), cache);
        let out = e.run(&requests);
        if let Ok(mut total) = self.engine_stats.lock() {
            total.add(&e.stats());
        }
        *self.prefix.lock().map_err(|_| anyhow::anyhow!("prefix cache lock poisoned"))? = e.into_prefix();
        out
    }

    /// The engine's quantized copy of `model` with its adapters, made once.
    pub fn engine_model(&self) -> Result<&engine::QModel> {
        if let Some(q) = self.quantized.get() {
            return Ok(q);
        }
        let q = engine::quantize_model(&self.model, true)?;
        Ok(self.quantized.get_or_init(|| q))
    }

    /// Apply the chat template and tokenize.
    pub fn chat_ids(&self, system: Option<&str>, user: &str) -> Result<Vec<u32>> {
        self.prompt_ids(system, user, "")
    }

    /// Apply the chat template, append `prefix` (text the assistant turn starts with, which the
    /// completion continues) and tokenize.
    pub fn prompt_ids(&self, system: Option<&str>, user: &str, prefix: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(&format!("{}{prefix}", self.chat.render(system, user)))
    }
}
