//! Each command as a call into the library ([`curec::pipeline`] and the rest) and what it
//! prints: a JSON line, a Markdown table, or a path.

use curec::config::JobConfig;
use curec::data::Split;

use super::args::{BenchWhat, Cli, Command, ModelAction};
use super::overrides;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Prepare { input, out, format, config, rating_above, user_core, item_core, split, mut sets } => {
            sets.extend(overrides::prepare(rating_above, user_core, item_core, split.as_deref()));
            let cfg = JobConfig::load(config.as_deref(), &sets)?;
            let stats = curec::pipeline::stages::prepare(&input, &out, &format, &cfg)?;
            println!("{}", serde_json::to_string(&stats)?);
        }
        Command::Train { model, data, out, config, seed, seeds, max_epochs, features, variant, mut sets } => {
            sets.extend(overrides::train(seed, features.as_deref(), variant, max_epochs));
            let cfg = JobConfig::load(config.as_deref(), &sets)?;
            if let Some(seeds) = seeds {
                let seeds = curec::pipeline::seeds::parse_seeds(&seeds)?;
                println!("{}", curec::tables::table_header());
                let m = curec::pipeline::seeds::train_seeds(model, &data, &out, &cfg, &seeds)?;
                println!("{}", curec::tables::table_row(&m));
            } else {
                let m = curec::pipeline::stages::train(model, &data, &out, &cfg)?;
                println!("{}\n{}", curec::tables::table_header(), curec::tables::table_row(&m));
            }
        }
        Command::Pretrain { data, model, out, config, sets } => {
            let cfg = JobConfig::load(config.as_deref(), &sets)?;
            let Some(model) = model.or(cfg.pretrain.model.clone()) else {
                anyhow::bail!("pretrain: no model; pass --model or set pretrain.model in the job file");
            };
            let eval = curec::align::pretrain(&data, &model, &out, &cfg.pretrain, &cfg.grpo, &cfg.lora)?;
            println!("{}", curec::tables::pretrain_table(&model, &eval));
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
            let m = curec::pipeline::features::generate_features(&data, &model, &out, &cfg.features)?;
            println!("{}", serde_json::to_string(&m)?);
        }
        Command::Recommend { model_dir, user, k, reasons, json } => {
            let recs = curec::recommend::recommend(&model_dir, &user, k, reasons)?;
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
            let m = curec::pipeline::stages::eval_run(&run, data.as_deref(), split)?;
            println!("{}\n{}", curec::tables::table_header(), curec::tables::table_row(&m));
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
                    curec::bench::llm::engine_generate_throughput(&mut llm, batch, new_tokens, prompt_tokens)?
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
                    curec::bench::llm::generate_throughput(&mut llm, batch, new_tokens, prompt_tokens)?
                }
                other => anyhow::bail!("--engine '{other}': expected quantized or candle"),
            };
            println!("{v}");
        }
        Command::Bench { what: BenchWhat::Prefill { model, tokens, quantize, repeats } } => {
            let q = curec::llm::kernels::gguf::Quantize::parse(&quantize)?;
            let llm = curec::llm::engine::QLlm::load(&curec::llm::resolve(&model)?, q)?;
            println!("{}", curec::bench::llm::engine_prefill_throughput(&llm, tokens, repeats)?);
        }
        Command::Bench { what: BenchWhat::Sasrec { data, config, sets, steps } } => {
            let job = curec::config::JobConfig::load(config.as_deref(), &sets)?;
            let ds = curec::data::prepared::read_dataset(&data)?;
            println!("{}", curec::bench::llm::sasrec_step_throughput(&ds, &job.sasrec, steps)?);
        }
        Command::Bench { what: BenchWhat::Logprobs { model, batch, seq_len, completion, backward, device, dtype } } => {
            let mut llm = load_llm(&model, &device, &dtype)?;
            if backward {
                llm.model.add_lora(&curec::llm::LoraConfig::default())?;
            }
            let v = curec::bench::llm::logprob_throughput(&llm, batch, seq_len, completion, backward)?;
            println!("{v}");
        }
        Command::Bench { what: BenchWhat::Replay { log, snapshot_every, cost_ns, workers, cluster, out } } => {
            anyhow::ensure!(
                log.users > 0 && log.items > 0 && log.slice > 0 && snapshot_every > 0,
                "bench replay: sizes must be positive"
            );
            let topology = cluster.topology(workers)?;
            let spec = log.spec(snapshot_every, cost_ns);
            println!("{}", curec::bench::replay::replay_throughput(&spec, &topology, out.as_deref())?);
        }
        Command::Bench { what: BenchWhat::Ingest { log, new, batches, workers } } => {
            println!("{}", curec::bench::ingest::ingest_cost(&log.spec(10, 0), new, batches, workers)?);
        }
        Command::Replay { job, out, workers, cluster, no_update, no_correction, mut sets } => {
            sets.extend(overrides::replay(workers, no_update, no_correction));
            let cfg = JobConfig::load(Some(&job), &sets)?;
            let topology = cluster.topology(cfg.replay.workers)?;
            let Some(m) = curec::pipeline::replay::replay_on(&cfg, &out, &topology)? else {
                println!(
                    "process {} of {}: the dataflow is done; process 0 writes the run",
                    cluster.process, cluster.processes
                );
                return Ok(());
            };
            println!("{}\n{}", curec::tables::table_header(), curec::tables::table_row(&m));
            // The report: the replay and every stage before it (the job's train.out).
            let mut roots = vec![out.clone()];
            roots.extend(cfg.train.out.clone().filter(|t| t.is_dir() && *t != out));
            let t0 = std::time::Instant::now();
            let report = curec::report::write_report(&roots, None, 3)?;
            curec::run_dir::record_stage(&out, "report", t0)?;
            // Wall time per stage run by this command or earlier ones (reused stages keep theirs).
            for r in roots.iter().rev() {
                if let Some(t) = curec::tables::stages_table(r) {
                    println!("\nstages ({}):\n{t}", r.display());
                }
            }
            println!("report: {}", report.display());
        }
        Command::Ingest { from, file, workers, grpo } => {
            let v = curec::pipeline::session::ingest(&from, &file, workers, grpo)?;
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
                curec::bench::serve::run(&curec::bench::serve::ServeBench { run, clients, seconds, k, rows_per_post })?;
            println!("{v}");
        }
        Command::Run { job, force, sets } => {
            let cfg = JobConfig::load(Some(&job), &sets)?;
            curec::pipeline::stages::run_job(&cfg, force)?;
            if let Some(out) = cfg.train.out.as_ref().filter(|o| o.is_dir()) {
                println!("report: {}", curec::report::write_report(std::slice::from_ref(out), None, 3)?.display());
            }
        }
    }
    Ok(())
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
