//! The generation engine on tiny random models of both families: the quantized model against
//! the f32 candle model, batch invariance, continuous batching, the prefix cache, per-request
//! settings. The real pinned models are checked in `llm_models.rs`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::tiny_tokenizer;
use curec::llm::engine::{Engine, EngineConfig, Logits, QModel, Request, SeqStep};
use curec::llm::kernels::gguf::Quantize;
use curec::llm::{CausalLm, Family, LlmConfig, SamplingConfig};

fn tiny(family: Family) -> CausalLm {
    let cfg = LlmConfig { max_position: 4096, ..LlmConfig::tiny(family) };
    CausalLm::random(cfg, 7, DType::F32, &Device::Cpu).unwrap()
}

fn f32_logits(m: &CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    let n = ids.len();
    let t = Tensor::new(ids, &Device::Cpu).unwrap().reshape((1, n)).unwrap();
    let p = Tensor::new((0..n as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu).unwrap().reshape((1, n)).unwrap();
    let h = m.forward(&t, &p, None, None, false).unwrap();
    m.logits(&h).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

fn q_logits(q: &QModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = q.new_cache(ids.len());
    q.forward(&mut [SeqStep { tokens: ids, cache: &mut cache, logits: Logits::All }]).unwrap().pop().unwrap().unwrap()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

#[test]
fn quantized_model_follows_the_f32_model_for_both_families() {
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 97).collect();
    for fam in [Family::Qwen2, Family::Llama] {
        let m = tiny(fam);
        let want = f32_logits(&m, &ids);
        for quant in [Quantize::Q8, Quantize::Q4] {
            let q = QModel::from_causal(&m, quant).unwrap();
            let got = q_logits(&q, &ids);
            let v = q.cfg.vocab_size;
            let mut mean = 0f32;
            for (i, w) in want.iter().enumerate() {
                let g = &got[i * v..(i + 1) * v];
                mean += g.iter().zip(w).map(|(a, b)| (a - b).abs()).sum::<f32>() / v as f32;
            }
            mean /= want.len() as f32;
            let bound = if quant == Quantize::Q8 { 2e-3 } else { 2e-2 };
            assert!(mean < bound, "{fam:?} {quant:?}: mean |Δlogit| {mean}");
            if quant == Quantize::Q8 {
                let agree =
                    want.iter().enumerate().filter(|(i, w)| argmax(w) == argmax(&got[i * v..(i + 1) * v])).count();
                assert!(agree >= want.len() - 1, "{fam:?}: argmax agrees at {agree} of {} positions", want.len());
            }
        }
    }
}

/// Mean over positions of the mean |Δ logit| between `got` (rows × vocab, flat) and `want`.
fn mean_abs_diff(got: &[f32], want: &[Vec<f32>]) -> f32 {
    let v = want[0].len();
    want.iter()
        .enumerate()
        .map(|(i, w)| got[i * v..(i + 1) * v].iter().zip(w).map(|(a, b)| (a - b).abs()).sum::<f32>() / v as f32)
        .sum::<f32>()
        / want.len() as f32
}

#[test]
fn lora_adapters_beside_the_quantized_base_follow_the_f32_model_with_adapters() {
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 97).collect();
    for fam in [Family::Qwen2, Family::Llama] {
        let mut m = tiny(fam);
        // Every projection but k gets an adapter (k's stays the base weight alone).
        let targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec();
        m.add_lora(&curec::llm::LoraConfig { rank: 4, alpha: 8.0, targets, ..Default::default() }).unwrap();
        // B starts at zero; give every adapter a seeded non-zero A and B.
        for (i, (_, var)) in m.lora_vars().into_iter().enumerate() {
            let n = var.as_tensor().elem_count();
            let vals: Vec<f32> = (0..n).map(|j| (((i * 131 + j * 37) % 101) as f32 / 101.0 - 0.5) * 0.4).collect();
            var.set(&Tensor::from_vec(vals, var.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let n = ids.len();
        let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().reshape((1, n)).unwrap();
        let p =
            Tensor::new((0..n as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu).unwrap().reshape((1, n)).unwrap();
        let h = m.forward(&t, &p, None, None, true).unwrap();
        let want: Vec<Vec<f32>> = m.logits(&h).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let mut q = QModel::from_causal(&m, Quantize::Q8).unwrap();
        let base_logits = q_logits(&q, &ids);
        let base = mean_abs_diff(&base_logits, &want);
        q.set_adapters(&m).unwrap();
        let got = q_logits(&q, &ids);
        let with = mean_abs_diff(&got, &want);
        assert!(with < 2e-3, "{fam:?}: mean |Δlogit| {with} with the adapters set");
        assert!(base > 20.0 * with, "{fam:?}: the adapters change the logits ({base} without them vs {with})");
        let v = q.cfg.vocab_size;
        let agree = want.iter().enumerate().filter(|(i, w)| argmax(w) == argmax(&got[i * v..(i + 1) * v])).count();
        assert!(agree >= want.len() - 1, "{fam:?}: argmax agrees at {agree} of {} positions", want.len());
        // Taking them off gives the base model back, to the bit (GRPO's quantized reference).
        q.clear_adapters();
        assert_eq!(q_logits(&q, &ids), base_logits, "{fam:?}: the base after clear_adapters");
    }
}

#[test]
fn incremental_decoding_equals_one_pass_and_prefix_chunks_change_nothing() {
    // The tiny shape, and the pinned models' attention shapes (SmolLM2: 3 query heads per KV
    // head, Qwen2.5: 7; head_dim 64), which take the grouped-head decoding kernels.
    let shapes = [(4, 2, 8, 32), (9, 3, 64, 64), (14, 2, 64, 64)];
    for (num_heads, num_kv_heads, head_dim, hidden_size) in shapes {
        let cfg = LlmConfig {
            max_position: 4096,
            num_heads,
            num_kv_heads,
            head_dim,
            hidden_size,
            ..LlmConfig::tiny(Family::Qwen2)
        };
        let m = CausalLm::random(cfg, 7, DType::F32, &Device::Cpu).unwrap();
        let q = QModel::from_causal(&m, Quantize::Q8).unwrap();
        incremental_equals_one_pass(&q);
    }
}

fn incremental_equals_one_pass(q: &QModel) {
    let ids: Vec<u32> = (0..90).map(|i| (i * 5 + 1) % 97).collect();
    let all = q_logits(q, &ids);
    let v = q.cfg.vocab_size;
    // 10 tokens, then 1 at a time: every row bit-identical to the one-pass rows.
    let mut cache = q.new_cache(ids.len());
    let first = q.forward(&mut [SeqStep { tokens: &ids[..10], cache: &mut cache, logits: Logits::All }]).unwrap();
    assert_eq!(first[0].as_deref().unwrap(), &all[..10 * v]);
    for i in 10..ids.len() {
        let out =
            q.forward(&mut [SeqStep { tokens: &ids[i..i + 1], cache: &mut cache, logits: Logits::Last }]).unwrap();
        assert_eq!(out[0].as_deref().unwrap(), &all[i * v..(i + 1) * v], "position {i}");
    }
}

fn req(prompt: Vec<u32>, key: u64, n: usize, temperature: f32) -> Request {
    Request {
        prompt,
        key,
        sampling: SamplingConfig { temperature, top_p: 0.95, max_new_tokens: n, stop: vec![], seed: 5 },
    }
}

/// Each request run by itself (batch 1, no prefix cache): the reference every batching must match.
fn each_alone(q: &QModel, tok: &curec::llm::Tokenizer, requests: &[Request]) -> Vec<curec::llm::Generation> {
    requests
        .iter()
        .map(|r| {
            let cfg = EngineConfig { max_batch: 1, prefix_cache_mib: 0 };
            Engine::new(q, tok, cfg).run(std::slice::from_ref(r)).unwrap().pop().unwrap()
        })
        .collect()
}

#[test]
fn a_request_gives_the_same_tokens_alone_in_any_batch_and_with_cache_hits() {
    let q = QModel::from_causal(&tiny(Family::Llama), Quantize::Q8).unwrap();
    let tok = tiny_tokenizer();
    let shared: Vec<u32> = (0..100).map(|i| (i * 11 + 2) % 97).collect();
    let mut requests = Vec::new();
    for i in 0..7u32 {
        let mut p = shared.clone();
        p.extend((0..(i as usize % 4 + 1)).map(|j| (i * 13 + j as u32) % 97));
        requests.push(req(p, i as u64, 5 + 3 * (i as usize % 3), 1.0));
    }
    requests.push(req(vec![3, 1, 4], 99, 12, 0.0)); // greedy, short prompt
    let alone = each_alone(&q, &tok, &requests);
    for (max_batch, mib) in [(3, 0), (8, 0), (3, 64), (8, 64)] {
        let mut e = Engine::new(&q, &tok, EngineConfig { max_batch, prefix_cache_mib: mib });
        let got = e.run(&requests).unwrap();
        assert_eq!(got, alone, "max_batch {max_batch}, prefix cache {mib} MiB");
        let s = e.stats();
        if mib > 0 {
            assert!(s.prefix.hits >= 5, "the shared 100-token prefix is reused: {s:?}");
            assert!(s.prefix.tokens_reused >= 5 * 99, "{s:?}");
            let prompt_tokens: usize = requests.iter().map(|r| r.prompt.len()).sum();
            assert_eq!(s.prefill_tokens + s.prefix.tokens_reused, prompt_tokens as u64);
        } else {
            assert_eq!(s.prefix.hits, 0);
        }
    }
    // Different keys draw different streams; the same key the same one.
    assert_ne!(alone[0].tokens, alone[3].tokens);
}

#[test]
fn a_finished_row_is_replaced_at_the_next_step() {
    let q = QModel::from_causal(&tiny(Family::Qwen2), Quantize::Q8).unwrap();
    let tok = tiny_tokenizer();
    // One long request and six one-token ones on two slots: the short ones pass through the
    // second slot while the long one decodes, so the run takes as many steps as the long one.
    // A static batch of two would wait for the long one first: 30 + 3 steps.
    let mut requests = vec![req(vec![1, 2, 3], 0, 30, 1.0)];
    requests.extend((1..7).map(|i| req(vec![4, 5, i as u32], i, 1, 1.0)));
    let mut e = Engine::new(&q, &tok, EngineConfig { max_batch: 2, prefix_cache_mib: 0 });
    let out = e.run(&requests).unwrap();
    assert_eq!(out[0].tokens.len(), 30);
    assert!(out[1..].iter().all(|g| g.tokens.len() == 1));
    assert_eq!(e.stats().steps, 30, "{:?}", e.stats());
}

#[test]
fn stop_strings_end_a_request_and_are_cut() {
    let q = QModel::from_causal(&tiny(Family::Qwen2), Quantize::Q8).unwrap();
    let tok = tiny_tokenizer();
    let base = req(vec![7, 8, 9], 1, 20, 0.0);
    let free = Engine::new(&q, &tok, EngineConfig::default()).run(std::slice::from_ref(&base)).unwrap().pop().unwrap();
    assert_eq!(free.tokens.len(), 20);
    let third = tok.decode(&free.tokens[2..3], true).unwrap();
    let stop = Request { sampling: SamplingConfig { stop: vec![third.clone()], ..base.sampling.clone() }, ..base };
    let got = Engine::new(&q, &tok, EngineConfig::default()).run(&[stop]).unwrap().pop().unwrap();
    assert_eq!(got.finish, curec::llm::sampling::Finish::Stop);
    assert!(!got.text.contains(&third) && got.tokens.len() <= 3, "{got:?}");
}

#[test]
fn prompts_that_extend_each_other_share_one_chain_of_cached_keys_and_give_the_same_tokens() {
    // A user's successive reason prompts: each one is the previous prompt plus a line, lengths
    // off the 8-position key blocks, so cache hits hand out chains of shared segments whose
    // last block is copied.
    let q = QModel::from_causal(&tiny(Family::Qwen2), Quantize::Q8).unwrap();
    let tok = tiny_tokenizer();
    let mut prompts: Vec<Vec<u32>> = vec![(0..37).map(|i| (i * 7 + 3) % 97).collect()];
    for k in 1..12u32 {
        let mut p = prompts.last().unwrap().clone();
        p.extend((0..(k as usize % 5 + 3)).map(|j| (k * 17 + j as u32 * 3) % 97));
        prompts.push(p);
    }
    let requests: Vec<Request> =
        prompts.iter().enumerate().map(|(i, p)| req(p.clone(), i as u64, 4 + i % 3, 1.0)).collect();
    let alone = each_alone(&q, &tok, &requests);
    for max_batch in [1, 3, 12] {
        let mut e = Engine::new(&q, &tok, EngineConfig { max_batch, prefix_cache_mib: 16 });
        // Twice: the second pass hits entries built from chains.
        for pass in 0..2 {
            let got = e.run(&requests).unwrap();
            assert_eq!(got, alone, "max_batch {max_batch}, pass {pass}");
        }
        let s = e.stats();
        assert!(s.prefix.hits >= 12, "{s:?}");
        // Memory is counted once per shared segment: the entries hold about one copy of the
        // longest prompt, not one copy per prompt.
        let per_position = q.cfg.num_layers * 2 * q.cfg.num_kv_heads * q.cfg.head_dim * 4;
        let longest = prompts.last().unwrap().len();
        let all: usize = prompts.iter().map(|p| p.len()).sum();
        assert!(
            s.prefix.bytes < (longest + 8 * 12) * per_position,
            "{} bytes for {all} prompt positions",
            s.prefix.bytes
        );
    }
}

/// GRPO's quantized reference pass: a group's completions scored together (the prompt computed
/// once, its keys and values shared, one batched call) give each completion the same log-probs,
/// bit for bit, as scoring it alone, and stay close to the f32 model's.
#[test]
fn grouped_completion_scoring_equals_scoring_each_alone() {
    use curec::llm::engine::{completion_log_probs_quantized, pairs_log_probs_quantized};
    let m = tiny(Family::Qwen2);
    let q = QModel::from_causal(&m, Quantize::Q8).unwrap();
    let p1: Vec<u32> = (0..37).map(|i| (i * 5 + 1) % 97).collect();
    let p2: Vec<u32> = (0..12).map(|i| (i * 3 + 2) % 97).collect();
    let c = |n: usize, s: u32| -> Vec<u32> { (0..n as u32).map(|i| (i * 11 + s) % 97).collect() };
    // Two groups (p1 × 3 completions, p2 × 2), lengths 1 to 19, one completion of one token.
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = vec![
        (p1.clone(), c(19, 1)),
        (p1.clone(), c(1, 2)),
        (p1.clone(), c(8, 3)),
        (p2.clone(), c(5, 4)),
        (p2.clone(), c(13, 5)),
    ];
    let got = pairs_log_probs_quantized(&q, &pairs).unwrap();
    let f32_lp = curec::llm::log_probs_with(&m, &pairs, false, curec::llm::Grad::None).unwrap().0;
    let f32_rows: Vec<Vec<f32>> = f32_lp.log_probs.to_vec2().unwrap();
    for (i, (p, comp)) in pairs.iter().enumerate() {
        assert_eq!(got[i].len(), comp.len(), "pair {i}: one log-prob per completion token");
        let alone = completion_log_probs_quantized(&q, p, comp).unwrap();
        assert_eq!(got[i], alone, "pair {i}: grouped ≠ alone");
        let mad = got[i].iter().zip(&f32_rows[i]).map(|(a, b)| (a - b).abs()).sum::<f32>() / comp.len() as f32;
        assert!(mad < 0.02, "pair {i}: mean |Δ log-prob| against f32 {mad}");
    }
}
