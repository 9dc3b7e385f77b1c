//! The command line's types: every command, flag and its help text (clap derive), and the value
//! parsers for counts, temperatures, top-p and the library's named enums. Nothing here runs a
//! stage; [`super::dispatch`] does.

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use curec::features::Writer;
use curec::rec::curec::Variant;
use curec::rec::ModelKind;

/// CUREC: an LLM-in-the-loop recommender as a dataflow engine.
#[derive(Parser)]
#[command(name = "curec", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Raw log → prepared Parquet dataset (rating > 3, 30/10 k-core, time order, leave-one-out).
    Prepare {
        /// Raw dataset directory (or a single .csv/.parquet/.jsonl log).
        #[arg(long)]
        input: PathBuf,
        /// Output directory for interactions/items/users.parquet and stats.json.
        #[arg(long)]
        out: PathBuf,
        /// auto, ml-1m, ml-100k, movielens-csv, amazon2023 or generic.
        #[arg(long, default_value = "auto")]
        format: String,
        /// Job file whose [preprocess] table sets the protocol.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Keep ratings strictly above this.
        #[arg(long)]
        rating_above: Option<f32>,
        /// Minimum interactions per user.
        #[arg(long)]
        user_core: Option<usize>,
        /// Minimum interactions per item.
        #[arg(long)]
        item_core: Option<usize>,
        /// `leave-one-out` (the paper's protocol) or `time`: the first `preprocess.head` (80%) of
        /// the positives by time as the dataset (core filter and ids from them alone), every later
        /// positive as `stream.parquet`, new users and items included.
        #[arg(long, value_parser = ["leave-one-out", "time"])]
        split: Option<String>,
        /// Override any job-file key: section.key=value (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Train a baseline with early stopping on validation NDCG@10 and evaluate it on the test split.
    Train {
        #[arg(value_parser = named(&ModelKind::ALL, ModelKind::name))]
        model: ModelKind,
        /// Prepared dataset directory.
        #[arg(long)]
        data: PathBuf,
        /// Run directory (metrics.json, model.safetensors, config.toml, history.json).
        #[arg(long)]
        out: PathBuf,
        /// Job file with [train], [ncf], [sasrec] tables.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// Train once per seed (comma-separated) into <out>/seed-<s>/ and write the mean, sd, min and
        /// max over seeds to <out>/metrics.json; finished seeds with the same config are reused.
        #[arg(long)]
        seeds: Option<String>,
        /// Upper bound on epochs.
        #[arg(long)]
        max_epochs: Option<usize>,
        /// curec: features directory written by `curec features`.
        #[arg(long)]
        features: Option<PathBuf>,
        /// curec: how reasons meet the pattern (attention = CUREC; text, ap, mlp, sa = Table 3 variants).
        #[arg(long, value_parser = named(&Variant::ALL, Variant::name))]
        variant: Option<Variant>,
        /// Override any job-file key: section.key=value (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Generate user interest patterns and recommendation reasons with an LLM (paper §4.3.1);
    /// writes patterns.parquet, reasons.parquet and manifest.json. Resumes after a kill.
    Features {
        /// Prepared dataset directory.
        #[arg(long)]
        data: PathBuf,
        /// GGUF file, Hugging Face directory or pinned name (default: features.model of the job file).
        #[arg(long)]
        model: Option<String>,
        /// Features directory.
        #[arg(long)]
        out: PathBuf,
        /// Job file with a [features] table.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Who writes the texts: the LLM (default), or a control that needs no model: `oracle`
        /// (collaborative reasons from the train split) or `shuffled` (the oracle's texts on random
        /// rows). Overrides features.writer.
        #[arg(long, value_parser = named(&Writer::ALL, Writer::name))]
        writer: Option<Writer>,
        /// Override any job-file key: section.key=value (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Top-k recommendations for one user from a trained run, with the matched reasons.
    Recommend {
        /// Run directory written by `curec train`.
        #[arg(long)]
        model_dir: PathBuf,
        /// The user's raw id (as in the input log).
        #[arg(long)]
        user: String,
        #[arg(short = 'k', long, default_value_t = 10)]
        k: usize,
        /// Reasons shown per item.
        #[arg(long, default_value_t = 3)]
        reasons: usize,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Recommendation-alignment pretraining (GRPO with the rule reward, paper §4.2); writes
    /// eval.json, the adapter, steps.jsonl and curve.svg. Resumes after a kill.
    Pretrain {
        /// Prepared dataset directory.
        #[arg(long)]
        data: PathBuf,
        /// GGUF file, Hugging Face directory or pinned name (default: pretrain.model of the job file).
        #[arg(long)]
        model: Option<String>,
        /// Run directory.
        #[arg(long)]
        out: PathBuf,
        /// Job file with [pretrain], [grpo], [lora] tables.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override any job-file key: section.key=value (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Re-evaluate a trained run from its checkpoint.
    Eval {
        /// Run directory written by `curec train`.
        #[arg(long)]
        run: PathBuf,
        /// Prepared dataset (default: the one the run was trained on).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value = "test")]
        split: String,
    },
    /// Paired comparison of two runs on the same users: per-user metric of A minus B, with a 95%
    /// bootstrap interval, overall and by the held-out item's train popularity (tail/mid/head
    /// thirds of the users). A run is a `curec train` directory or a `--seeds` directory.
    Compare {
        a: PathBuf,
        b: PathBuf,
        #[arg(long, default_value = "ndcg@10")]
        metric: String,
        #[arg(long, default_value = "test")]
        split: String,
        /// Bootstrap resamples.
        #[arg(long, default_value_t = 2000)]
        resamples: usize,
        /// Print the JSON object instead of a Markdown table.
        #[arg(long)]
        json: bool,
    },
    /// One self-contained HTML page (inline SVG, no network) of a run directory: results with
    /// intervals, training and GRPO curves, replay slices, explanation cards.
    Report {
        /// Run directory (the main job's, or any directory holding `curec train` runs); more
        /// directories may follow.
        #[arg(required = true)]
        run: Vec<PathBuf>,
        /// Output file (default: `<run>/report.html`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Users with explanation cards per CUREC run.
        #[arg(long, default_value_t = 3)]
        explain_users: usize,
    },
    /// Pinned models: fetch (download, verify sha256, assemble) or list.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
    /// Generate text with an LLM (chat template applied unless --raw).
    Generate {
        /// A pinned model name, a GGUF file or a Hugging Face model directory.
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128, value_parser = positive)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 2024)]
        seed: u64,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0, value_parser = temperature)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0, value_parser = top_p)]
        top_p: f32,
        /// System prompt (default: the model's own).
        #[arg(long)]
        system: Option<String>,
        /// Feed the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// LoRA adapter file to apply.
        #[arg(long)]
        lora: Option<PathBuf>,
        /// Stop string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// cpu or cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Weight/activation dtype: auto (f32), f32, bf16 or f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
    },
    /// Throughput benchmarks; each prints one JSON line.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Chronological CoT correction (paper §4.4): every stage of the job (reused when its output
    /// exists), then the time-sliced replay of the train log as a timely dataflow, snapshots, and
    /// the reward model evaluated with the corrected features.
    Replay {
        job: PathBuf,
        /// Run directory (snapshots/, metrics.json, epochs.jsonl); stages go to train.out, else here.
        #[arg(long)]
        out: PathBuf,
        /// Timely worker threads (per process).
        #[arg(short = 'w', long)]
        workers: Option<usize>,
        #[command(flatten)]
        cluster: Cluster,
        /// "w/o Update": GRPO steps, but patterns and reasons are not rewritten during the replay.
        #[arg(long)]
        no_update: bool,
        /// "w/o Corr.": no correction; the reward model with the initial features.
        #[arg(long)]
        no_correction: bool,
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Feed new interactions (CSV or Parquet: user, item, timestamp, rating) through the replay's
    /// operators from its newest snapshot; prints a JSON summary line.
    Ingest {
        /// A `curec replay` run directory.
        #[arg(long = "from")]
        from: PathBuf,
        file: PathBuf,
        #[arg(short = 'w', long)]
        workers: Option<usize>,
        /// Also take GRPO steps with the reward model (default: only rewrite the state).
        #[arg(long)]
        grpo: bool,
    },
    /// Serve a trained run over HTTP: recommendations with reasons, durable ingestion of new
    /// interactions through the replay's operators, /healthz, /metrics (Prometheus) and the report
    /// at /. Stops cleanly on SIGTERM or Ctrl-C
    Serve {
        /// A run directory (`curec replay` to ingest; `curec train` runs serve recommendations only).
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// Milliseconds the ingest worker waits for more rows after the first pending one.
        #[arg(long, default_value_t = 500)]
        ingest_delay_ms: u64,
        /// Milliseconds ingested batches may stay in the resident dataflow's memory before a
        /// checkpoint (a snapshot; recommendations then see them). 0: a checkpoint after every
        /// batch. Acknowledged rows are durable in the write-ahead log either way.
        #[arg(long, default_value_t = 0)]
        checkpoint_every_ms: u64,
    },
    /// Run a job file: prepare the data if needed, then train and evaluate every listed model.
    Run {
        job: PathBuf,
        /// Prepare the data again even if the prepared directory exists.
        #[arg(long)]
        force: bool,
        #[arg(long = "set")]
        sets: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum ModelAction {
    /// Download and verify a pinned model into $CUREC_HOME (idempotent).
    Fetch {
        /// smollm2-135m-instruct, qwen2.5-0.5b-instruct, minilm-l6-v2 (or `all`).
        names: Vec<String>,
    },
    /// List the pinned models and whether they are cached.
    List,
}

/// Timely's cluster options, shared by the commands that run the correction dataflow.
#[derive(clap::Args)]
pub struct Cluster {
    /// Timely processes: run the same command once per process, each with its `--process`
    /// (`curec replay`: the stages before the correction must be complete; process 0 writes the
    /// run).
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub processes: usize,
    /// This process's index, 0..processes.
    #[arg(long, default_value_t = 0)]
    pub process: usize,
    /// One `host:port` per process, in process order (timely's host file); default
    /// localhost:2101, localhost:2102, …
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
}

impl Cluster {
    /// The topology of `threads` workers per process on these processes (the host file read).
    pub fn topology(&self, threads: usize) -> anyhow::Result<curec::replay::Topology> {
        let mut t =
            curec::replay::Topology { threads, processes: self.processes, process: self.process, hosts: Vec::new() };
        t.validate()?;
        if let Some(h) = &self.hostfile {
            t.hosts = curec::replay::Topology::read_hostfile(h, self.processes)?;
        }
        Ok(t)
    }
}

/// The synthetic log of the dataflow benches (`bench replay`, `bench ingest`).
#[derive(clap::Args, Clone, Copy)]
pub struct SyntheticLog {
    #[arg(long, default_value_t = 2_000_000, value_parser = positive)]
    pub interactions: usize,
    #[arg(long, default_value_t = 100_000, value_parser = positive)]
    pub users: usize,
    #[arg(long, default_value_t = 50_000, value_parser = positive)]
    pub items: usize,
    /// Interactions per time slice (epoch).
    #[arg(long, default_value_t = 100_000, value_parser = positive)]
    pub slice: usize,
}

impl SyntheticLog {
    pub fn spec(&self, snapshot_every: u64, cost_ns: u64) -> curec::bench::replay::BenchSpec {
        let Self { interactions, users, items, slice } = *self;
        curec::bench::replay::BenchSpec { interactions, users, items, slice, snapshot_every, cost_ns, seed: 2024 }
    }
}

#[derive(Subcommand)]
pub enum BenchWhat {
    /// Loopback load on `curec serve` over a copy of a run: requests/s and p50/p99 latency for
    /// recommendations, for ingestion and for a mix (stops by itself).
    Serve {
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value_t = 4, value_parser = positive)]
        clients: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(short = 'k', long, default_value_t = 10, value_parser = positive)]
        k: usize,
        /// Interactions per POST in the ingestion and mix phases.
        #[arg(long, default_value_t = 100, value_parser = positive)]
        rows_per_post: usize,
    },
    /// Aggregate generation tokens/s for a batch.
    Generate {
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 1, value_parser = positive)]
        batch: usize,
        #[arg(long, default_value_t = 64, value_parser = positive)]
        new_tokens: usize,
        #[arg(long, default_value_t = 32, value_parser = positive)]
        prompt_tokens: usize,
        /// `quantized` (the engine: quantized weights, continuous batching) or `candle` (the
        /// f32 candle model, the reference path; the only one off the CPU).
        #[arg(long, default_value = "quantized")]
        engine: String,
        /// Weight format for the quantized engine: auto (GGUF 4- and 5-bit blocks kept, the rest Q8_0), q8_0, q5_1 or q4_k.
        #[arg(long, default_value = "auto")]
        quantize: String,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Weight/activation dtype of the candle engine: auto (f32), f32, bf16 or f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
    },
    /// Prefill throughput of one sequence, last-token logits only (as llama.cpp's pp).
    Prefill {
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 512, value_parser = positive)]
        tokens: usize,
        /// Weight format: auto (GGUF 4- and 5-bit blocks kept, the rest Q8_0), q8_0, q5_1 or q4_k.
        #[arg(long, default_value = "auto")]
        quantize: String,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = positive)]
        repeats: usize,
    },
    /// Correction dataflow without the LLM (a fixed-cost stand-in generator): source, state
    /// folding and snapshots on `--workers` (× `--processes`); in one process without `--out`,
    /// also on 1 worker as the baseline. `per_worker_per_s` is the run on the topology given.
    Replay {
        #[command(flatten)]
        log: SyntheticLog,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        snapshot_every: u64,
        /// Busy time of the stand-in per interaction.
        #[arg(long, default_value_t = 0)]
        cost_ns: u64,
        /// Timely worker threads (per process).
        #[arg(short = 'w', long, default_value_t = 2, value_parser = positive)]
        workers: usize,
        #[command(flatten)]
        cluster: Cluster,
        /// Leave a run directory here (data/, snapshots/, bench.json) that `curec ingest --from`
        /// accepts; the run is then timed once, on the topology given.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Ingestion's incremental cost: the synthetic log of `bench replay` replayed into a
    /// temporary run, then `--batches` batches of `--new` interactions ingested one-shot (as
    /// `curec ingest`) and into a resident session (as `curec serve`); prints the timings and
    /// `replay_over_resident` / `replay_over_one_shot` (how many batches cost one replay).
    Ingest {
        /// The log replayed (its slice is also the ingests' slice).
        #[command(flatten)]
        log: SyntheticLog,
        /// Interactions per ingested batch.
        #[arg(long, default_value_t = 1000, value_parser = positive)]
        new: usize,
        /// Batches timed each way (the medians are compared).
        #[arg(long, default_value_t = 5, value_parser = positive)]
        batches: usize,
        /// Timely worker threads.
        #[arg(short = 'w', long, default_value_t = 1, value_parser = positive)]
        workers: usize,
    },
    /// SASRec training steps on a prepared dataset's windows: the full pass against the one
    /// that computes the last block only at the targets (`speedup`), in one process.
    Sasrec {
        /// Prepared dataset directory.
        #[arg(long)]
        data: PathBuf,
        /// A job file whose [sasrec] table sets the model (default: the built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a job file key, e.g. `--set sasrec.stride=1` (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Batches timed.
        #[arg(long, default_value_t = 5, value_parser = positive)]
        steps: usize,
    },
    /// Per-token log-prob throughput for batch × seq_len (half prompt, half completion).
    Logprobs {
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 8, value_parser = positive)]
        batch: usize,
        #[arg(long, default_value_t = 256, value_parser = positive)]
        seq_len: usize,
        /// Completion tokens of each sequence (default: half of seq_len).
        #[arg(long)]
        completion: Option<usize>,
        /// Also run the backward pass through fresh LoRA adapters (rank 8, all projections).
        #[arg(long)]
        backward: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Weight/activation dtype: auto (f32), f32, bf16 or f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
    },
}

/// A count flag: an integer of at least 1.
pub fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected an integer of at least 1, found '{s}'")),
    }
}

/// `--temperature`: a finite number ≥ 0 (0 = greedy).
pub fn temperature(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("expected a finite number ≥ 0 (0 = greedy), found '{s}'")),
    }
}

/// `--top-p`: a number in (0, 1].
pub fn top_p(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("expected a number in (0, 1], found '{s}'")),
    }
}

/// A library enum as a clap value: its names are the possible values, parsed back by name (the
/// library types stay free of clap).
pub fn named<T: Copy + Send + Sync + 'static>(
    all: &'static [T],
    name: fn(T) -> &'static str,
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(all.iter().map(move |&v| PossibleValue::new(name(v))))
        .map(move |s| *all.iter().find(|&&v| name(v) == s).expect("clap checked the possible values"))
}
