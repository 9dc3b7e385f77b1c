//! The benches behind `curec bench …`, one file per subject: [`llm`] (generation, prefill,
//! log-probs, SASRec steps), [`replay`] (the correction dataflow with a stand-in generator),
//! [`ingest`] (ingestion's incremental cost) and [`serve`] (loopback load on the service).
//! Each prints one JSON line; ratios are against a baseline run in the same process.

pub mod ingest;
pub mod llm;
pub mod replay;
pub mod serve;
