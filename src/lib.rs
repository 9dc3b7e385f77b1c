//! curec: CUREC (an LLM-in-the-loop recommender) as a dataflow engine.
//!
//! Stages, one module each: [`data`] (raw logs → prepared Parquet), [`eval`] (full-ranking
//! metrics), [`rec`] (recommenders in candle), [`llm`] (the LLM runtime: loading, tokenizer,
//! generation, log-probs, LoRA, prompts), [`grpo`] (the GRPO trainer), [`align`]
//! (recommendation-alignment pretraining), [`ops`] (fused kernels with backward passes),
//! [`config`] (job files, range-checked by [`config_check`]) and [`jobs`] (the CLI's commands as functions).

pub mod align;
pub mod alloc;
pub mod bench;
pub mod config;
pub mod config_check;
pub mod data;
pub mod embed;
pub mod eval;
pub mod features;
pub mod grpo;
pub mod jobs;
pub mod llm;
pub mod ops;
pub mod progress;
pub mod rec;
pub mod replay;
pub mod report;
pub mod seeds;
pub mod serve;
