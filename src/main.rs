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
        #[arg(long)]
        seed: Option<u64>,
        /// Upper bound on epochs.
        #[arg(long)]
        max_epochs: Option<usize>,
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

fn main() -> ExitCode {
    curec::alloc::tune();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CUREC_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    match run(Cli::parse()) {
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
        Command::Train { model, data, out, config, seed, max_epochs, mut sets } => {
            sets.extend(seed.map(|v| format!("train.seed={v}")));
            if let Some(e) = max_epochs {
                sets.push(format!("ncf.max_epochs={e}"));
                sets.push(format!("sasrec.max_epochs={e}"));
            }
            let cfg = JobConfig::load(config.as_deref(), &sets)?;
            let m = jobs::train(model, &data, &out, &cfg)?;
            println!("{}\n{}", jobs::table_header(), jobs::table_row(&m));
        }
        Command::Eval { run, data, split } => {
            let split = Split::parse(&split)
                .filter(|s| *s != Split::Train)
                .ok_or_else(|| anyhow::anyhow!("--split '{split}': expected valid or test"))?;
            let m = jobs::eval_run(&run, data.as_deref(), split)?;
            println!("{}\n{}", jobs::table_header(), jobs::table_row(&m));
        }
        Command::Run { job, force, sets } => {
            let cfg = JobConfig::load(Some(&job), &sets)?;
            jobs::run_job(&cfg, force)?;
        }
    }
    Ok(())
}
