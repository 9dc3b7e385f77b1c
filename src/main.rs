//! The `curec` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use curec::config::JobConfig;
use curec::data::Split;
use curec::jobs;
use curec::rec::ModelKind;

// glibc malloc spent 40-50% of wall time in sys calls during CPU training (DESIGN.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CUREC: an LLM-in-the-loop recommender as a dataflow engine.
#[derive(Parser)]
#[command(name = "curec", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        /// Override any job-file key: section.key=value (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Train a baseline with early stopping on validation NDCG@10 and evaluate it on the test split.
    Train {
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
        #[arg(long)]
        variant: Option<curec::rec::curec::Variant>,
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
        #[arg(long, value_enum)]
        writer: Option<curec::features::Writer>,
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
enum ModelAction {
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
struct Cluster {
    /// Timely processes: run the same command once per process, each with its `--process`
    /// (`curec replay`: the stages before the correction must be complete; process 0 writes the
    /// run).
    #[arg(long, default_value_t = 1, value_parser = positive)]
    processes: usize,
    /// This process's index, 0..processes.
    #[arg(long, default_value_t = 0)]
    process: usize,
    /// One `host:port` per process, in process order (timely's host file); default
    /// localhost:2101, localhost:2102, …
    #[arg(long)]
    hostfile: Option<PathBuf>,
}

impl Cluster {
    /// The topology of `threads` workers per process on these processes (the host file read).
    fn topology(&self, threads: usize) -> anyhow::Result<curec::replay::Topology> {
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
struct SyntheticLog {
    #[arg(long, default_value_t = 2_000_000, value_parser = positive)]
    interactions: usize,
    #[arg(long, default_value_t = 100_000, value_parser = positive)]
    users: usize,
    #[arg(long, default_value_t = 50_000, value_parser = positive)]
    items: usize,
    /// Interactions per time slice (epoch).
    #[arg(long, default_value_t = 100_000, value_parser = positive)]
    slice: usize,
}

impl SyntheticLog {
    fn spec(&self, snapshot_every: u64, cost_ns: u64) -> curec::replay::bench::BenchSpec {
        let Self { interactions, users, items, slice } = *self;
        curec::replay::bench::BenchSpec { interactions, users, items, slice, snapshot_every, cost_ns, seed: 2024 }
    }
}

#[derive(Subcommand)]
enum BenchWhat {
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

/// A TOML string literal (for `--set` values built from paths).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn load_llm(spec: &str, device: &str, dtype: &str) -> anyhow::Result<curec::llm::Llm> {
    let dev = curec::llm::device(device)?;
    let dtype = curec::llm::parse_dtype(dtype, &dev)?;
    let path = curec::llm::resolve(spec)?;
    curec::llm::Llm::load(&path, &dev, dtype)
}

/// `--split valid|test` (the train split has no held-out item to rank).
fn held_out_split(s: &str) -> anyhow::Result<Split> {
    Split::parse(s)
        .filter(|s| *s != Split::Train)
        .ok_or_else(|| anyhow::anyhow!("--split '{s}': expected valid or test"))
}

fn main() -> ExitCode {
    // `curec … | head` closes stdout early: die quietly as other Unix tools do, instead of
    // panicking in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // candle asks for its thread count at every matmul and, unless RAYON_NUM_THREADS is set,
    // answers by reading /proc/cpuinfo each time (a third of a small request's CPU in `curec
    // serve`). Ask once, before any thread starts, and pin the same answer.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    curec::alloc::tune();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CUREC_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: CI logs and files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .without_time()
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // A bad flag: clap's first line (it names the flag, the value and what was expected),
            // like every other error, without the usage block.
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: bad arguments"));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Prepare { input, out, format, config, rating_above, user_core, item_core, mut sets } => {
            sets.extend(rating_above.map(|v| format!("preprocess.rating_above={v:?}")));
            sets.extend(user_core.map(|v| format!("preprocess.user_core={v}")));
            sets.extend(item_core.map(|v| format!("preprocess.item_core={v}")));
            let cfg = JobConfig::load(config.as_deref(), &sets)?;
            let stats = jobs::prepare(&input, &out, &format, &cfg)?;
            println!("{}", serde_json::to_string(&stats)?);
        }
        Command::Train { model, data, out, config, seed, seeds, max_epochs, features, variant, mut sets } => {
            sets.extend(seed.map(|v| format!("train.seed={v}")));
            sets.extend(features.map(|f| format!("curec.features={}", toml_str(&f.display().to_string()))));
            sets.extend(variant.map(|v| format!("curec.variant=\"{}\"", v.name())));
            if let Some(e) = max_epochs {
                sets.push(format!("ncf.max_epochs={e}"));
                sets.push(format!("sasrec.max_epochs={e}"));
                sets.push(format!("bert4rec.max_epochs={e}"));
                sets.push(format!("curec.max_epochs={e}"));
            }
            let cfg = JobConfig::load(config.as_deref(), &sets)?;
            if let Some(seeds) = seeds {
                let seeds = curec::seeds::parse_seeds(&seeds)?;
                println!("{}", jobs::table_header());
                let m = curec::seeds::train_seeds(model, &data, &out, &cfg, &seeds)?;
                println!("{}", jobs::table_row(&m));
            } else {
                let m = jobs::train(model, &data, &out, &cfg)?;
                println!("{}\n{}", jobs::table_header(), jobs::table_row(&m));
            }
        }
        Command::Pretrain { data, model, out, config, sets } => {
            let cfg = JobConfig::load(config.as_deref(), &sets)?;
            let Some(model) = model.or(cfg.pretrain.model.clone()) else {
                anyhow::bail!("pretrain: no model; pass --model or set pretrain.model in the job file");
            };
            let eval = curec::align::pretrain(&data, &model, &out, &cfg.pretrain, &cfg.grpo, &cfg.lora)?;
            println!("{}", jobs::pretrain_table(&model, &eval));
        }
        Command::Features { data, model, out, config, writer, sets } => {
            let mut cfg = JobConfig::load(config.as_deref(), &sets)?;
            if let Some(w) = writer {
                cfg.features.writer = w;
            }
            let model_given = model.is_some();
            let model = match (model.or(cfg.features.model.clone()), cfg.features.writer) {
                (Some(m), curec::features::Writer::Llm) => m,
                (None, curec::features::Writer::Llm) => {
                    anyhow::bail!("features: no model; pass --model or set features.model in the job file (or pass --writer oracle|shuffled)")
                }
                (Some(_), w) if model_given => {
                    anyhow::bail!("features: --model is for --writer llm; --writer {} needs no model", w.name())
                }
                (_, w) => w.name().to_string(),
            };
            let m = curec::features::generate_features(&data, &model, &out, &cfg.features)?;
            println!("{}", serde_json::to_string(&m)?);
        }
        Command::Recommend { model_dir, user, k, reasons, json } => {
            let recs = jobs::recommend(&model_dir, &user, k, reasons)?;
            if json {
                println!("{}", serde_json::to_string(&recs)?);
            } else {
                for (rank, r) in recs.iter().enumerate() {
                    println!("{:>2}. {} [{}] score {:.3}", rank + 1, r.title, r.item, r.score);
                    for w in &r.reasons {
                        println!("      {:.2}  {}", w.weight, w.text);
                    }
                }
            }
        }
        Command::Eval { run, data, split } => {
            let split = held_out_split(&split)?;
            let m = jobs::eval_run(&run, data.as_deref(), split)?;
            println!("{}\n{}", jobs::table_header(), jobs::table_row(&m));
        }
        Command::Compare { a, b, metric, split, resamples, json } => {
            let split = held_out_split(&split)?;
            let c = curec::eval::compare::compare(&a, &b, &metric, split, resamples, 2024)?;
            if json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                println!("{}", curec::eval::compare::markdown(&c));
            }
        }
        Command::Report { run, out, explain_users } => {
            let path = curec::report::write_report(&run, out.as_deref(), explain_users)?;
            println!("{}", path.display());
        }
        Command::Model { action: ModelAction::List } => {
            for m in curec::llm::fetch::Pins::builtin().model {
                let state = if m.is_cached() { "cached" } else { "not fetched" };
                println!("{:<24} {:<8} {:<12} {}", m.name, m.kind, state, m.dir().display());
            }
        }
        Command::Model { action: ModelAction::Fetch { names } } => {
            let pins = curec::llm::fetch::Pins::builtin();
            if names.is_empty() {
                anyhow::bail!("model fetch: name a model ({}) or `all`", pins.names().join(", "));
            }
            let list: Vec<String> = if names.iter().any(|n| n == "all") {
                pins.names().iter().map(|s| s.to_string()).collect()
            } else {
                names
            };
            for n in &list {
                let m = pins.find(n).ok_or_else(|| {
                    anyhow::anyhow!("model fetch: unknown model '{n}', expected one of {}", pins.names().join(", "))
                })?;
                let p = curec::llm::fetch::fetch(m)?;
                println!("{}", p.display());
            }
        }
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
            seed,
            temperature,
            top_p,
            system,
            raw,
            lora,
            stop,
            device,
            dtype,
        } => {
            let mut llm = load_llm(&model, &device, &dtype)?;
            if let Some(l) = lora {
                llm.model.load_lora(&l)?;
            }
            let ids = if raw { llm.tokenizer.encode(&prompt)? } else { llm.chat_ids(system.as_deref(), &prompt)? };
            let cfg = curec::llm::SamplingConfig { temperature, top_p, max_new_tokens, stop, seed };
            let out = curec::llm::generate::Generator::for_model(&llm.model, true)?.generate(
                &llm.tokenizer,
                &[ids],
                &[0],
                &cfg,
            )?;
            println!("{}", out[0].text);
        }
        Command::Bench {
            what: BenchWhat::Generate { model, batch, new_tokens, prompt_tokens, engine, quantize, device, dtype },
        } => {
            let v = match engine.as_str() {
                "quantized" if device == "cpu" => {
                    let q = curec::llm::kernels::gguf::Quantize::parse(&quantize)?;
                    let mut llm = curec::llm::engine::QLlm::load(&curec::llm::resolve(&model)?, q)?;
                    curec::bench::engine_generate_throughput(&mut llm, batch, new_tokens, prompt_tokens)?
                }
                "quantized" => {
                    anyhow::bail!("--engine quantized runs on the CPU only; use --engine candle with --device {device}")
                }
                "candle" => {
                    anyhow::ensure!(
                        batch > 0 && new_tokens > 0 && prompt_tokens > 0,
                        "bench generate: --batch, --new-tokens and --prompt-tokens must be at least 1"
                    );
                    let mut llm = load_llm(&model, &device, &dtype)?;
                    curec::bench::generate_throughput(&mut llm, batch, new_tokens, prompt_tokens)?
                }
                other => anyhow::bail!("--engine '{other}': expected quantized or candle"),
            };
            println!("{v}");
        }
        Command::Bench { what: BenchWhat::Prefill { model, tokens, quantize, repeats } } => {
            let q = curec::llm::kernels::gguf::Quantize::parse(&quantize)?;
            let llm = curec::llm::engine::QLlm::load(&curec::llm::resolve(&model)?, q)?;
            println!("{}", curec::bench::engine_prefill_throughput(&llm, tokens, repeats)?);
        }
        Command::Bench { what: BenchWhat::Sasrec { data, config, sets, steps } } => {
            let job = curec::config::JobConfig::load(config.as_deref(), &sets)?;
            let ds = curec::data::prepared::read_dataset(&data)?;
            println!("{}", curec::bench::sasrec_step_throughput(&ds, &job.sasrec, steps)?);
        }
        Command::Bench { what: BenchWhat::Logprobs { model, batch, seq_len, completion, backward, device, dtype } } => {
            let mut llm = load_llm(&model, &device, &dtype)?;
            if backward {
                llm.model.add_lora(&curec::llm::LoraConfig::default())?;
            }
            let v = curec::bench::logprob_throughput(&llm, batch, seq_len, completion, backward)?;
            println!("{v}");
        }
        Command::Bench { what: BenchWhat::Replay { log, snapshot_every, cost_ns, workers, cluster, out } } => {
            anyhow::ensure!(
                log.users > 0 && log.items > 0 && log.slice > 0 && snapshot_every > 0,
                "bench replay: sizes must be positive"
            );
            let topology = cluster.topology(workers)?;
            let spec = log.spec(snapshot_every, cost_ns);
            println!("{}", curec::replay::bench::replay_throughput(&spec, &topology, out.as_deref())?);
        }
        Command::Bench { what: BenchWhat::Ingest { log, new, batches, workers } } => {
            println!("{}", curec::replay::bench_ingest::ingest_cost(&log.spec(10, 0), new, batches, workers)?);
        }
        Command::Replay { job, out, workers, cluster, no_update, no_correction, mut sets } => {
            if let Some(w) = workers {
                sets.push(format!("replay.workers={w}"));
            }
            if no_update {
                sets.push("replay.update=false".into());
            }
            if no_correction {
                sets.push("replay.correct=false".into());
            }
            let cfg = JobConfig::load(Some(&job), &sets)?;
            let topology = cluster.topology(cfg.replay.workers)?;
            let Some(m) = curec::replay::replay_on(&cfg, &out, &topology)? else {
                println!(
                    "process {} of {}: the dataflow is done; process 0 writes the run",
                    cluster.process, cluster.processes
                );
                return Ok(());
            };
            println!("{}\n{}", jobs::table_header(), jobs::table_row(&m));
            // The report: the replay and every stage before it (the job's train.out).
            let mut roots = vec![out.clone()];
            roots.extend(cfg.train.out.clone().filter(|t| t.is_dir() && *t != out));
            let t0 = std::time::Instant::now();
            let report = curec::report::write_report(&roots, None, 3)?;
            jobs::record_stage(&out, "report", t0)?;
            // Wall time per stage run by this command or earlier ones (reused stages keep theirs).
            for r in roots.iter().rev() {
                if let Some(t) = jobs::stages_table(r) {
                    println!("\nstages ({}):\n{t}", r.display());
                }
            }
            println!("report: {}", report.display());
        }
        Command::Ingest { from, file, workers, grpo } => {
            let v = curec::replay::ingest(&from, &file, workers, grpo)?;
            println!("{v}");
        }
        Command::Serve { run, addr, ingest_delay_ms, checkpoint_every_ms } => {
            curec::serve::serve(&curec::serve::ServeOptions {
                run,
                addr,
                ingest_delay: std::time::Duration::from_millis(ingest_delay_ms),
                checkpoint_every: std::time::Duration::from_millis(checkpoint_every_ms),
            })?;
        }
        Command::Bench { what: BenchWhat::Serve { run, clients, seconds, k, rows_per_post } } => {
            let v =
                curec::serve::bench::run(&curec::serve::bench::ServeBench { run, clients, seconds, k, rows_per_post })?;
            println!("{v}");
        }
        Command::Run { job, force, sets } => {
            let cfg = JobConfig::load(Some(&job), &sets)?;
            jobs::run_job(&cfg, force)?;
            if let Some(out) = cfg.train.out.as_ref().filter(|o| o.is_dir()) {
                println!("report: {}", curec::report::write_report(std::slice::from_ref(out), None, 3)?.display());
            }
        }
    }
    Ok(())
}

/// A count flag: an integer of at least 1.
fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected an integer of at least 1, found '{s}'")),
    }
}

/// `--temperature`: a finite number ≥ 0 (0 = greedy).
fn temperature(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("expected a finite number ≥ 0 (0 = greedy), found '{s}'")),
    }
}

/// `--top-p`: a number in (0, 1].
fn top_p(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("expected a number in (0, 1], found '{s}'")),
    }
}
