//! curec: CUREC (an LLM-in-the-loop recommender) as a dataflow engine.
//!
//! Stages, one module each: [`data`] (raw logs → prepared Parquet), [`eval`] (full-ranking
//! metrics), [`rec`] (recommenders in candle), [`config`] (job files) and [`jobs`] (the CLI's
//! commands as functions).

pub mod alloc;
pub mod config;
pub mod data;
pub mod eval;
pub mod jobs;
pub mod rec;
