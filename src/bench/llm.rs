//! `curec bench …`: throughput measurements that print one JSON line each, so runs can be
//! compared side by side (and with the Hugging Face reference in `benches/hf_reference.py`).

use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use crate::llm::engine::{Engine, EngineConfig, Logits, QLlm, Request, SeqStep};
use crate::llm::{generate, log_probs_with, Grad, Llm, SamplingConfig, Tokenizer};

/// A fixed English prompt, repeated/cut to `tokens` tokens (without chat template).
pub fn prompt_ids(llm: &Llm, tokens: usize) -> Result<Vec<u32>> {
    text_ids(&llm.tokenizer, tokens)
}

fn text_ids(tok: &Tokenizer, tokens: usize) -> Result<Vec<u32>> {
    let text = "The user watched Toy Story (1995), Jumanji (1995), Heat (1995) and GoldenEye (1995). \
                Describe what kind of films this user enjoys and suggest what to watch next. ";
    let mut ids = Vec::new();
    while ids.len() < tokens {
        ids.extend(tok.encode(text)?);
    }
    ids.truncate(tokens.max(1));
    Ok(ids)
}

/// `batch` distinct prompts of `tokens` tokens (the first token varies, so nothing is shared).
fn distinct_prompts(tok: &Tokenizer, batch: usize, tokens: usize, vocab: usize) -> Result<Vec<Vec<u32>>> {
    let ids = text_ids(tok, tokens)?;
    Ok((0..batch)
        .map(|i| {
            let mut p = ids.clone();
            p[0] = (p[0] + i as u32) % vocab as u32;
            p
        })
        .collect())
}

/// Generation with the engine: `batch` distinct prompts of `prompt_tokens`, exactly `new_tokens`
/// each (EOS ignored), all admitted at once. `tokens_per_s` counts generated tokens over the
/// whole time (prefill included); `decode_tokens_per_s` only the decoding steps.
pub fn engine_generate_throughput(
    llm: &mut QLlm,
    batch: usize,
    new_tokens: usize,
    prompt_tokens: usize,
) -> Result<serde_json::Value> {
    anyhow::ensure!(batch > 0, "bench generate: --batch must be at least 1");
    anyhow::ensure!(new_tokens > 0, "bench generate: --new-tokens must be at least 1");
    anyhow::ensure!(prompt_tokens > 0, "bench generate: --prompt-tokens must be at least 1");
    let prompts = distinct_prompts(&llm.tokenizer, batch, prompt_tokens, llm.model.cfg.vocab_size)?;
    let sampling = SamplingConfig { temperature: 1.0, top_p: 1.0, max_new_tokens: new_tokens, stop: vec![], seed: 1 };
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request { prompt: p.clone(), key: i as u64, sampling: sampling.clone() })
        .collect();
    let saved = std::mem::take(&mut llm.tokenizer.stop_ids);
    let cfg = EngineConfig { max_batch: batch, prefix_cache_mib: 0 };
    let result = (|| -> Result<(f64, Vec<crate::llm::Generation>, crate::llm::engine::EngineStats)> {
        // Warm-up (allocations, page faults, thread pool) outside the timing.
        let warm = Request {
            prompt: prompts[0][..prompts[0].len().min(8)].to_vec(),
            key: 0,
            sampling: SamplingConfig { max_new_tokens: 2, ..sampling.clone() },
        };
        Engine::new(&llm.model, &llm.tokenizer, cfg).run(&[warm])?;
        let mut engine = Engine::new(&llm.model, &llm.tokenizer, cfg);
        let t0 = Instant::now();
        let out = engine.run(&requests)?;
        Ok((t0.elapsed().as_secs_f64(), out, engine.stats()))
    })();
    llm.tokenizer.stop_ids = saved;
    let (secs, out, stats) = result?;
    let generated: usize = out.iter().map(|g| g.tokens.len()).sum();
    Ok(json!({
        "bench": "generate",
        "engine": "quantized",
        "kernel": crate::llm::kernels::kernel().name(),
        "model": llm.source.display().to_string(),
        "params": llm.model.cfg.num_params(),
        "weight_mib": llm.model.weight_bytes() as f64 / (1 << 20) as f64,
        "threads": rayon::current_num_threads(),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "generated_tokens": generated,
        "seconds": secs,
        "tokens_per_s": generated as f64 / secs,
        "prefill_seconds": stats.prefill_seconds,
        "decode_seconds": stats.decode_seconds,
        "decode_tokens_per_s": stats.decode_tokens as f64 / stats.decode_seconds.max(1e-12),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Prefill of one `tokens`-token sequence with last-token logits only (what llama.cpp's pp
/// measures); median of `repeats` runs after one warm-up.
pub fn engine_prefill_throughput(llm: &QLlm, tokens: usize, repeats: usize) -> Result<serde_json::Value> {
    anyhow::ensure!(tokens > 0, "bench prefill: --tokens must be at least 1");
    let ids = text_ids(&llm.tokenizer, tokens)?;
    let run = || -> Result<f64> {
        let mut cache = llm.model.new_cache(ids.len());
        let t0 = Instant::now();
        llm.model.forward(&mut [SeqStep { tokens: &ids, cache: &mut cache, logits: Logits::Last }])?;
        Ok(t0.elapsed().as_secs_f64())
    };
    run()?;
    let mut times = (0..repeats.max(1)).map(|_| run()).collect::<Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    Ok(json!({
        "bench": "prefill",
        "engine": "quantized",
        "kernel": crate::llm::kernels::kernel().name(),
        "model": llm.source.display().to_string(),
        "threads": rayon::current_num_threads(),
        "tokens": ids.len(),
        "seconds": secs,
        "tokens_per_s": ids.len() as f64 / secs,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Generation throughput: `batch` copies of a `prompt_tokens` prompt, exactly `new_tokens` new
/// tokens each (EOS ignored by sampling with no stop ids), aggregate tokens/s.
pub fn generate_throughput(
    llm: &mut Llm,
    batch: usize,
    new_tokens: usize,
    prompt_tokens: usize,
) -> Result<serde_json::Value> {
    let ids = prompt_ids(llm, prompt_tokens)?;
    let prompts = vec![ids; batch];
    let keys: Vec<u64> = (0..batch as u64).collect();
    let cfg = SamplingConfig { temperature: 1.0, top_p: 1.0, max_new_tokens: new_tokens, stop: vec![], seed: 1 };
    let saved = std::mem::take(&mut llm.tokenizer.stop_ids);
    // Warm-up (allocations, page faults) outside the timing.
    generate(
        &llm.model,
        &llm.tokenizer,
        &prompts[..1],
        &keys[..1],
        &SamplingConfig { max_new_tokens: 2, ..cfg.clone() },
        true,
    )?;
    let t0 = Instant::now();
    let out = generate(&llm.model, &llm.tokenizer, &prompts, &keys, &cfg, true);
    let secs = t0.elapsed().as_secs_f64();
    llm.tokenizer.stop_ids = saved;
    let out = out?;
    let generated: usize = out.iter().map(|g| g.tokens.len()).sum();
    Ok(json!({
        "bench": "generate",
        "model": llm.source.display().to_string(),
        "params": llm.model.cfg.num_params(),
        "device": format!("{:?}", llm.model.device()),
        "dtype": format!("{:?}", llm.model.dtype()),
        "threads": rayon::current_num_threads(),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "generated_tokens": generated,
        "seconds": secs,
        "tokens_per_s": generated as f64 / secs,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Log-prob throughput: `batch` sequences of `seq_len` tokens (`completion` of them completion,
/// default half): without gradient, or (`backward`) a LoRA training step's forward and backward
/// with activation checkpointing. Measured twice in the same process: with `batch` distinct
/// prompts (one row each, the baseline) and with one prompt shared by all `batch` completions, as
/// in a GRPO group (packed into one row, the prompt computed once); `packed_speedup` is the ratio
/// of their times.
pub fn logprob_throughput(
    llm: &Llm,
    batch: usize,
    seq_len: usize,
    completion: Option<usize>,
    backward: bool,
) -> Result<serde_json::Value> {
    let ids = prompt_ids(llm, seq_len)?;
    let c = completion.unwrap_or(seq_len / 2).clamp(1, seq_len.saturating_sub(1).max(1));
    let half = seq_len - c;
    anyhow::ensure!(half >= 1, "bench logprobs: the prompt needs at least one token (seq_len > completion)");
    let vocab = llm.model.cfg.vocab_size;
    let distinct: Vec<(Vec<u32>, Vec<u32>)> =
        distinct_prompts(&llm.tokenizer, batch, half, vocab)?.into_iter().map(|p| (p, ids[half..].to_vec())).collect();
    let shared: Vec<(Vec<u32>, Vec<u32>)> = (0..batch).map(|_| (ids[..half].to_vec(), ids[half..].to_vec())).collect();
    let mode = if backward { Grad::Checkpointed } else { Grad::None };
    let run = |pairs: &[(Vec<u32>, Vec<u32>)]| -> Result<(f64, f64, f32)> {
        let t0 = Instant::now();
        let (lp, ck) = log_probs_with(&llm.model, pairs, true, mode)?;
        let fwd = t0.elapsed().as_secs_f64();
        let mut bwd = 0.0;
        if let Some(ck) = ck {
            let t1 = Instant::now();
            let loss = (lp.log_probs.sum_all()? / (batch * c) as f64)?;
            let grads = llm.model.backward_checkpointed(&loss, ck)?;
            bwd = t1.elapsed().as_secs_f64();
            drop(grads);
        }
        let mean: f32 = (lp.log_probs.sum_all()? / lp.mask.sum_all()?)?.to_scalar()?;
        Ok((fwd, bwd, mean))
    };
    let (fwd, bwd, mean) = run(&distinct)?;
    let (pfwd, pbwd, pmean) = run(&shared)?;
    Ok(json!({
        "bench": "logprobs",
        "model": llm.source.display().to_string(),
        "batch": batch,
        "seq_len": seq_len,
        "completion_tokens": c,
        "forward_seconds": fwd,
        "backward_seconds": bwd,
        "tokens_per_s": (batch * seq_len) as f64 / fwd,
        "mean_log_prob": mean,
        "packed_forward_seconds": pfwd,
        "packed_backward_seconds": pbwd,
        "packed_mean_log_prob": pmean,
        "packed_speedup": (fwd + bwd) / (pfwd + pbwd).max(1e-12),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Peak resident set size of this process (Linux `VmHWM`), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// One SASRec training step (forward, softmax cross-entropy over all items, backward) on the
/// first `steps` batches of the epoch-0 windows of a prepared dataset, timed two ways in this
/// process: the full pass with the target rows selected afterwards (the baseline), and
/// [`SasRecTower::encode_at`], whose last block computes only the target positions.
pub fn sasrec_step_throughput(
    ds: &crate::data::Dataset,
    cfg: &crate::rec::sasrec::SasRecConfig,
    steps: usize,
) -> Result<serde_json::Value> {
    use crate::ops::cross_entropy;
    use crate::rec::sasrec::SasRecTower;
    use crate::rng::rng_for;
    use candle_core::{Device, Tensor};
    use rand::seq::SliceRandom;

    let model = crate::rec::sasrec::SasRec::new(cfg, ds.n_items, 2024, &Device::Cpu)?;
    let tower = model.tower();
    let mut windows = tower.windows(ds);
    windows.shuffle(&mut rng_for(2024, 2, 0));
    let batches: Vec<_> = windows.chunks(cfg.batch_size).take(steps.max(1)).collect();
    if batches.is_empty() {
        anyhow::bail!(
            "dataset {}: no training windows to time (every user has fewer than 2 train interactions)",
            ds.name
        );
    }
    let table = tower.item_table()?;
    // One training step on batch `bi`, either way: (seconds, loss, targets).
    let step = |restricted: bool, bi: usize| -> Result<(f64, f64, usize)> {
        let batch = batches[bi];
        let (inputs, rows, targets) = SasRecTower::batch(ds, batch);
        let t = inputs.iter().map(|s| s.len()).max().unwrap_or(1);
        let mut rng = rng_for(2024, 3, bi as u64);
        let t0 = Instant::now();
        let h = if restricted {
            tower.encode_at(&inputs, &rows, Some(&mut rng))?
        } else {
            let x = tower.encode(&inputs, Some(&mut rng))?;
            x.reshape((batch.len() * t, cfg.dim))?.index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?
        };
        let loss = cross_entropy(&h.matmul(&table.t()?)?, &Tensor::new(targets.as_slice(), &Device::Cpu)?)?;
        let grads = loss.backward()?;
        let seconds = t0.elapsed().as_secs_f64();
        drop(grads);
        Ok((seconds, loss.to_scalar::<f32>()? as f64, targets.len()))
    };
    let run = |restricted: bool| -> Result<(f64, f64, usize)> {
        let (mut seconds, mut loss_sum, mut targets_seen) = (0f64, 0f64, 0usize);
        for bi in 0..batches.len() {
            let (s, l, n) = step(restricted, bi)?;
            seconds += s;
            loss_sum += l;
            targets_seen += n;
        }
        Ok((seconds, loss_sum / batches.len() as f64, targets_seen))
    };
    // One untimed step each way first, so that the allocator's and the thread pool's warm-up does
    // not fall on whichever way is timed first.
    step(false, 0)?;
    step(true, 0)?;
    let (full, full_loss, n) = run(false)?;
    let (at, at_loss, _) = run(true)?;
    Ok(json!({
        "bench": "sasrec",
        "dataset": ds.name,
        "max_len": cfg.max_len,
        "stride": cfg.stride,
        "batch_windows": cfg.batch_size,
        "steps": batches.len(),
        "targets": n,
        "windows_per_epoch": windows.len(),
        "full_seconds_per_step": full / batches.len() as f64,
        "target_rows_seconds_per_step": at / batches.len() as f64,
        "speedup": full / at.max(1e-12),
        "mean_loss_full": full_loss,
        "mean_loss_target_rows": at_loss,
        "peak_rss_mib": peak_rss_mib(),
    }))
}
