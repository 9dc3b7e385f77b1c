//! Helpers shared by the integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use curec::config::JobConfig;
use curec::llm::{CausalLm, Family, LlmConfig};
use serde_json::json;

/// Tiny Qwen2-shaped model: config.json, model.safetensors, a word-level tokenizer.json.
pub fn tiny_model_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = LlmConfig { max_position: 4096, ..LlmConfig::tiny(Family::Qwen2) };
    let m = CausalLm::random(cfg.clone(), 11, DType::F32, &Device::Cpu).unwrap();
    let w = m.named_weights();
    safetensors::serialize_to_file(w.iter().map(|(k, v)| (k.as_str(), v)), None, &dir.join("model.safetensors"))
        .unwrap();
    let config = json!({"architectures": ["Qwen2ForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": cfg.max_position,
        "tie_word_embeddings": false});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    // Word-level vocabulary with the format tags as words, so that random completions sometimes
    // contain them and rewards vary within a group.
    let mut vocab = serde_json::Map::new();
    for i in 0..93u32 {
        vocab.insert(format!("t{i}"), json!(i));
    }
    for (i, tag) in ["<think>", "</think>", "<answer>", "</answer>"].iter().enumerate() {
        vocab.insert(tag.to_string(), json!(93 + i));
    }
    let tok = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary directory holding the embedded ml-latest-small prepared with the default protocol
/// (`data`) and the tiny model (`model`).
pub struct Setup {
    _tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub model: PathBuf,
    /// The temporary directory, for outputs.
    pub base: PathBuf,
}

pub fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    curec::pipeline::stages::prepare(&root().join("datasets/ml-latest-small"), &data, "auto", &JobConfig::default())
        .unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model);
    let base = tmp.path().to_path_buf();
    Setup { _tmp: tmp, data, model, base }
}

/// A tokenizer over the tiny models' vocabulary (`t0` … `t96`): word-level, no stop ids, pad 0;
/// generation tests work on ids.
pub fn tiny_tokenizer() -> curec::llm::Tokenizer {
    let mut vocab = serde_json::Map::new();
    for i in 0..97u32 {
        vocab.insert(format!("t{i}"), json!(i));
    }
    let doc = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}});
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    std::fs::write(&p, serde_json::to_vec(&doc).unwrap()).unwrap();
    let mut t = curec::llm::Tokenizer::from_file(&p).unwrap();
    t.stop_ids = vec![];
    t.pad_id = 0;
    t
}

pub struct Chain {
    pub _s: Setup,
    pub job: PathBuf,
    pub base: PathBuf,
}

/// Tiny LLM features, a reward model on them, and a replay job file.
pub fn chain() -> Chain {
    let s = setup();
    let model = s.model.to_str().unwrap().to_string();
    let feats = s.base.join("features");
    let fcfg = curec::features::FeaturesConfig {
        model: Some(model.clone()),
        users: 12,
        reasons_per_user: 3,
        max_new_tokens_pattern: 8,
        max_new_tokens_reason: 8,
        batch: 8,
        ..Default::default()
    };
    curec::pipeline::features::generate_features(&s.data, &model, &feats, &fcfg).unwrap();
    let mut cfg = JobConfig::default();
    cfg.curec.features = Some(feats.clone());
    cfg.curec.encoder = format!("llm:{model}");
    cfg.curec.positions_per_user = 4;
    cfg.sasrec.max_len = 20;
    cfg.curec.max_epochs = 1;
    cfg.train.bootstrap = 20;
    let rm = s.base.join("rm");
    curec::pipeline::stages::train(curec::rec::ModelKind::Curec, &s.data, &rm, &cfg).unwrap();
    let job = s.base.join("replay.toml");
    let text = format!(
        "[prepare]\nout = {data:?}\n[train]\nout = {stages:?}\nmodels = []\nbootstrap = 20\n\
         [features]\nmodel = {model:?}\nmax_new_tokens_reason = 8\n[sasrec]\nmax_len = 20\n\
         [grpo]\ngroup_size = 2\n\
         [replay]\nreward_model = {rm:?}\nusers = 6\nper_user = 2\nslice = 2\nsnapshot_every = 2\n\
         max_new_tokens_update = 8\nmax_new_tokens_reason = 6\n",
        data = s.data,
        stages = s.base.join("stages"),
        rm = rm,
    );
    std::fs::write(&job, text).unwrap();
    let base = s.base.clone();
    Chain { _s: s, job, base }
}
