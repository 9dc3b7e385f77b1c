//! The tokenizer: `tokenizer.json` when the model ships one, otherwise an equivalent
//! `tokenizers::Tokenizer` built from the GGUF metadata (`tokenizer.ggml.tokens`, `.merges`,
//! `.token_type`, `.pre`): byte-level BPE with the architecture's pre-tokenizer split, control
//! tokens as special added tokens. Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`,
//! as in Qwen2, SmolLM2 and Llama 3) can be built this way.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};

const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A loaded tokenizer plus the ids the runtime needs.
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    /// Token ids that end a generation (EOS, `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>` when present).
    pub stop_ids: Vec<u32>,
    /// Id used to pad batches (never attended to).
    pub pad_id: u32,
    /// BOS id to prepend, when the model wants one.
    pub bos_id: Option<u32>,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Self::finish(inner, None, None)
    }

    /// Build from a GGUF header.
    pub fn from_gguf(c: &gguf_file::Content) -> Result<Self> {
        let (json, eos, bos) = gguf_tokenizer_json(c)?;
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json)?)
            .map_err(|e| anyhow!("building the tokenizer from GGUF metadata: {e}"))?;
        Self::finish(inner, eos, bos)
    }

    fn finish(mut inner: tokenizers::Tokenizer, eos: Option<u32>, bos: Option<u32>) -> Result<Self> {
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for s in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>"] {
            if let Some(id) = inner.token_to_id(s) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        let pad_id = stop_ids.first().copied().unwrap_or(0);
        Ok(Self { inner, stop_ids, pad_id, bos_id: bos })
    }

    /// Encode text, parsing special tokens such as `<|im_start|>` in it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(b) = self.bos_id {
            ids.insert(0, b);
        }
        Ok(ids)
    }

    /// Decode ids; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("decoding: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn meta<'a>(c: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    c.metadata.get(key)
}

/// The tokenizer.json document equivalent to the GGUF vocabulary, plus EOS and (when the file
/// says to add it) BOS ids.
pub fn gguf_tokenizer_json(c: &gguf_file::Content) -> Result<(Value, Option<u32>, Option<u32>)> {
    let model = meta(c, "tokenizer.ggml.model").map(|v| v.to_string().cloned()).transpose()?.unwrap_or_default();
    if model != "gpt2" {
        bail!("GGUF tokenizer model '{model}' is not byte-level BPE: give the model directory a tokenizer.json");
    }
    let tokens = meta(c, "tokenizer.ggml.tokens").context("GGUF lacks tokenizer.ggml.tokens")?.to_vec()?;
    let tokens: Vec<String> = tokens.iter().map(|t| t.to_string().cloned()).collect::<candle_core::Result<_>>()?;
    let types: Vec<i32> = match meta(c, "tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<candle_core::Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    let merges: Vec<String> = match meta(c, "tokenizer.ggml.merges") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_string().cloned()).collect::<candle_core::Result<_>>()?,
        None => bail!("GGUF lacks tokenizer.ggml.merges"),
    };
    let pre = meta(c, "tokenizer.ggml.pre").map(|v| v.to_string().cloned()).transpose()?.unwrap_or_default();
    let id = |k: &str| meta(c, k).and_then(|v| v.to_u32().ok());
    let add_bos = meta(c, "tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
    let eos = id("tokenizer.ggml.eos_token_id");
    let bos = if add_bos { id("tokenizer.ggml.bos_token_id") } else { None };

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (i, (tok, ty)) in tokens.iter().zip(types.iter().chain(std::iter::repeat(&1))).enumerate() {
        vocab.insert(tok.clone(), json!(i));
        // 3 = control, 4 = user-defined: matched whole before BPE, as in the HF tokenizer.
        if *ty == 3 || *ty == 4 {
            added.push(json!({"id": i, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == 3}));
        }
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level.clone()]})
    };
    let (normalizer, pre_tokenizer) = match pre.as_str() {
        "qwen2" => (json!({"type": "NFC"}), split(QWEN2_SPLIT)),
        "llama-bpe" | "llama3" => (Value::Null, split(LLAMA3_SPLIT)),
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}),
        ),
        "gpt2" | "default" | "" => (
            Value::Null,
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
        ),
        other => bail!("GGUF pre-tokenizer '{other}' is not supported: expected qwen2, llama-bpe, smollm or gpt2"),
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    Ok((doc, eos, bos))
}
