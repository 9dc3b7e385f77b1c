//! curec: CUREC (an LLM-in-the-loop recommender) as a dataflow engine.
//!
//! Layers, bottom up (a module imports only modules in layers below it; `docs/architecture.md`):
//! - ground floor: [`io`] (atomic writes, JSON), [`rng`] (seeded streams), [`progress`], [`alloc`];
//! - data and metrics: [`data`] (raw logs → prepared Parquet), [`eval`] (full-ranking metrics);
//! - kernels and the LLM runtime: [`ops`] (fused kernels with backward passes), [`llm`] (loading,
//!   tokenizer, generation, log-probs, LoRA, the quantized engine);
//! - models: [`rec`] (the recommenders and CUREC's reward model in candle), [`embed`] (text
//!   encoders), [`grpo`] (the GRPO trainer), [`prompts`] (CUREC's prompt templates);
//! - CUREC's stages: [`align`] (recommendation-alignment pretraining), [`features`] (patterns and
//!   reasons), [`replay`] (the chronological correction as a timely dataflow: operators, state,
//!   snapshots);
//! - jobs: [`config`] (job files, range-checked by [`config_check`]), [`run_dir`] (run
//!   directories), [`tables`] (Markdown tables of metrics), [`pipeline`] (every stage as a function), [`recommend`] (top-k with reasons);
//! - faces: [`report`] (`report.html` and tables), [`serve`] (the HTTP service), [`bench`].

pub mod alloc;
pub mod io;
pub mod progress;
pub mod rng;

pub mod data;
pub mod eval;

pub mod llm;
pub mod ops;

pub mod embed;
pub mod grpo;
pub mod prompts;
pub mod rec;

pub mod align;
pub mod features;
pub mod replay;

pub mod config;
pub mod config_check;
pub mod pipeline;
pub mod recommend;
pub mod run_dir;
pub mod tables;

pub mod bench;
pub mod report;
pub mod serve;
