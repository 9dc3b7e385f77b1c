//! The LLM runtime on tiny randomly initialised models of both families (no downloads), a tiny
//! GGUF written in the test (config, llama.cpp q/k permutation, tokenizer from metadata), and —
//! when the pinned models are in the cache — the real SmolLM2/Qwen files against reference
//! values from Hugging Face transformers (`datasets/fixtures/llm/*.json`).

mod common;

use common::tiny_tokenizer;
use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use curec::llm::model::{causal_bias, padded_bias};
use curec::llm::{
    completion_log_probs, generate, CausalLm, ChatTemplate, Family, KvCache, LlmConfig, LoraConfig, SamplingConfig,
};
use curec::prompts::{parse_completion, parse_pattern_update, Prompt, PromptKind};

fn tiny(family: Family) -> CausalLm {
    CausalLm::random(LlmConfig::tiny(family), 7, DType::F32, &Device::Cpu).unwrap()
}

fn tensor_ids(ids: &[u32]) -> (Tensor, Tensor) {
    let n = ids.len();
    let t = Tensor::new(ids, &Device::Cpu).unwrap().reshape((1, n)).unwrap();
    let p = Tensor::new((0..n as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu).unwrap().reshape((1, n)).unwrap();
    (t, p)
}

fn full_logits(m: &CausalLm, ids: &[u32], adapters: bool) -> Vec<Vec<f32>> {
    let (t, p) = tensor_ids(ids);
    let h = m.forward(&t, &p, None, None, adapters).unwrap();
    m.logits(&h).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn shapes_for_both_families() {
    for fam in [Family::Qwen2, Family::Llama] {
        let m = tiny(fam);
        let ids = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &Device::Cpu).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 3, 4], [0, 1, 2, 3, 4]], &Device::Cpu).unwrap();
        let h = m.forward(&ids, &pos, None, None, true).unwrap();
        assert_eq!(h.dims(), &[2, 5, 32]);
        assert_eq!(m.logits(&h).unwrap().dims(), &[2, 5, 97]);
        let n: usize = m.named_weights().iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(n, m.cfg.num_params(), "{fam:?}: parameter count");
    }
}

#[test]
fn kv_cache_equals_full_recomputation() {
    for fam in [Family::Qwen2, Family::Llama] {
        let m = tiny(fam);
        let ids: Vec<u32> = vec![5, 17, 3, 88, 42, 9, 61, 23];
        let full = full_logits(&m, &ids, true);
        // Prefill 3 tokens, then feed one at a time.
        let mut cache = KvCache::new(m.cfg.num_layers);
        let (t, p) = tensor_ids(&ids[..3]);
        let h = m.forward(&t, &p, None, Some(&mut cache), true).unwrap();
        let mut inc: Vec<Vec<f32>> = m.logits(&h).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        for (i, &id) in ids.iter().enumerate().skip(3) {
            let t = Tensor::new(&[[id]], &Device::Cpu).unwrap();
            let p = Tensor::new(&[[i as u32]], &Device::Cpu).unwrap();
            let bias = causal_bias(1, 1, i, &Device::Cpu).unwrap();
            let h = m.forward(&t, &p, Some(&bias), Some(&mut cache), true).unwrap();
            inc.push(m.logits(&h).unwrap().squeeze(0).unwrap().squeeze(0).unwrap().to_vec1().unwrap());
        }
        assert_eq!(cache.len(), ids.len());
        for (a, b) in full.iter().zip(&inc) {
            assert!(max_abs_diff(a, b) < 1e-4, "{fam:?}: cached logits differ by {}", max_abs_diff(a, b));
        }
    }
}

#[test]
fn batched_generation_equals_unbatched() {
    let tok = tiny_tokenizer();
    for fam in [Family::Qwen2, Family::Llama] {
        let m = tiny(fam);
        let prompts: Vec<Vec<u32>> = vec![vec![3, 4, 5, 6, 7, 8, 9], vec![11, 12], vec![20, 30, 40, 50]];
        let keys = [10u64, 11, 12];
        for cfg in [
            SamplingConfig::greedy(12),
            SamplingConfig { temperature: 1.0, top_p: 0.9, max_new_tokens: 12, stop: vec![], seed: 5 },
        ] {
            let batched = generate(&m, &tok, &prompts, &keys, &cfg, true).unwrap();
            for (i, p) in prompts.iter().enumerate() {
                let single = generate(&m, &tok, std::slice::from_ref(p), &[keys[i]], &cfg, true).unwrap();
                assert_eq!(single[0].tokens, batched[i].tokens, "{fam:?} prompt {i} temperature {}", cfg.temperature);
                assert_eq!(single[0].tokens.len(), 12);
            }
            // Same seed, same bytes; another seed, other samples.
            assert_eq!(generate(&m, &tok, &prompts, &keys, &cfg, true).unwrap(), batched);
        }
        let a = generate(
            &m,
            &tok,
            &prompts,
            &keys,
            &SamplingConfig { temperature: 1.0, seed: 1, ..Default::default() },
            true,
        );
        let b = generate(
            &m,
            &tok,
            &prompts,
            &keys,
            &SamplingConfig { temperature: 1.0, seed: 2, ..Default::default() },
            true,
        );
        assert_ne!(a.unwrap(), b.unwrap(), "different seeds must give different samples");
    }
}

#[test]
fn left_padded_batch_matches_single_sequence_logits() {
    let m = tiny(Family::Qwen2);
    let short = [7u32, 8, 9];
    let long = [1u32, 2, 3, 4, 5, 6];
    // Row 0 left-padded by 3.
    let ids = Tensor::new(&[[0u32, 0, 0, 7, 8, 9], [1, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
    let pos = Tensor::new(&[[0u32, 0, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let valid = vec![vec![false, false, false, true, true, true], vec![true; 6]];
    let bias = padded_bias(&valid, 6, &Device::Cpu).unwrap();
    let h = m.forward(&ids, &pos, Some(&bias), None, true).unwrap();
    let l: Vec<Vec<Vec<f32>>> = m.logits(&h).unwrap().to_vec3().unwrap();
    let s = full_logits(&m, &short, true);
    let g = full_logits(&m, &long, true);
    for k in 0..3 {
        assert!(max_abs_diff(&l[0][3 + k], &s[k]) < 1e-4);
    }
    for k in 0..6 {
        assert!(max_abs_diff(&l[1][k], &g[k]) < 1e-4);
    }
}

#[test]
fn log_probs_equal_direct_softmax() {
    let m = tiny(Family::Llama);
    let pairs = vec![(vec![1u32, 2, 3], vec![4u32, 5, 6, 7]), (vec![9u32, 8, 7, 6, 5], vec![40u32, 41])];
    let lp = completion_log_probs(&m, &pairs, true).unwrap();
    let got: Vec<Vec<f32>> = lp.log_probs.to_vec2().unwrap();
    let mask: Vec<Vec<f32>> = lp.mask.to_vec2().unwrap();
    for (r, (p, c)) in pairs.iter().enumerate() {
        let seq: Vec<u32> = p.iter().chain(c).copied().collect();
        let logits = full_logits(&m, &seq, true);
        for (k, &target) in c.iter().enumerate() {
            let row = &logits[p.len() + k - 1];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            let want = row[target as usize] as f64 - lse;
            assert!((got[r][k] as f64 - want).abs() < 1e-4, "row {r} token {k}: {} vs {want}", got[r][k]);
            assert_eq!(mask[r][k], 1.0);
        }
        for k in c.len()..got[r].len() {
            assert_eq!((got[r][k], mask[r][k]), (0.0, 0.0), "padding must be masked");
        }
    }
}

#[test]
fn zero_init_lora_leaves_outputs_unchanged_and_trains_only_adapters() {
    for fam in [Family::Qwen2, Family::Llama] {
        let mut m = tiny(fam);
        let ids = [3u32, 1, 4, 1, 5, 9, 2, 6];
        let before = full_logits(&m, &ids, false);
        m.add_lora(&LoraConfig::default()).unwrap();
        let after = full_logits(&m, &ids, true);
        for (a, b) in before.iter().zip(&after) {
            assert_eq!(a, b, "{fam:?}: a fresh adapter (B = 0) must not change the logits");
        }
        let vars = m.lora_vars();
        assert_eq!(vars.len(), 2 * 7 * m.cfg.num_layers);
        let pairs = vec![(ids[..4].to_vec(), ids[4..].to_vec())];
        let loss = completion_log_probs(&m, &pairs, true).unwrap().log_probs.sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &vars {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            // B gets a gradient at once; A only once B is non-zero.
            if name.ends_with("lora_B.weight") {
                assert!(norm > 0.0, "{fam:?} {name}: zero gradient");
            }
        }
        for (name, w) in m.named_weights() {
            assert!(grads.get(&w).is_none(), "{fam:?}: frozen base weight {name} received a gradient");
        }
        // After one step on B, A's gradient is non-zero too.
        for (name, v) in &vars {
            if name.ends_with("lora_B.weight") {
                let g = grads.get(v.as_tensor()).unwrap();
                v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap()).unwrap();
            }
        }
        let loss = completion_log_probs(&m, &pairs, true).unwrap().log_probs.sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &vars {
            let norm: f32 = grads.get(v.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0, "{fam:?} {name}: zero gradient after a step");
        }
        // Adapters off = the reference policy = the base model.
        assert_eq!(full_logits(&m, &ids, false), before);
        assert_ne!(full_logits(&m, &ids, true), before);
        // Folding the adapters into the weights gives the adapted model; a frozen copy does not
        // follow later updates.
        let merged = m.merged().unwrap();
        let frozen = m.frozen_copy().unwrap();
        let adapted = full_logits(&m, &ids, true);
        for (a, b) in full_logits(&merged, &ids, false).iter().zip(&adapted) {
            assert!(max_abs_diff(a, b) < 1e-4, "{fam:?}: merged weights differ from adapters on");
        }
        for (_, v) in &vars {
            v.set(&(v.as_tensor() * 2.0).unwrap()).unwrap();
        }
        assert_eq!(full_logits(&frozen, &ids, false), full_logits(&merged, &ids, false).clone());
        assert_ne!(full_logits(&m, &ids, true), adapted);
    }
}

#[test]
fn identical_prompts_prefilled_once_generate_as_if_alone() {
    let tok = tiny_tokenizer();
    let m = tiny(Family::Qwen2);
    let p = vec![5u32, 6, 7, 8];
    let q = vec![9u32, 10];
    let cfg = SamplingConfig { temperature: 1.0, top_p: 1.0, max_new_tokens: 10, stop: vec![], seed: 3 };
    let grouped = generate(&m, &tok, &[p.clone(), q.clone(), p.clone(), p.clone()], &[1, 2, 3, 4], &cfg, true).unwrap();
    for (i, (prompt, key)) in [(&p, 1u64), (&q, 2), (&p, 3), (&p, 4)].into_iter().enumerate() {
        let alone = generate(&m, &tok, std::slice::from_ref(prompt), &[key], &cfg, true).unwrap();
        assert_eq!(alone[0].tokens, grouped[i].tokens, "row {i}");
    }
    assert_ne!(grouped[0].tokens, grouped[2].tokens, "different keys, different samples");
}

#[test]
fn full_fine_tuning_reaches_every_weight() {
    for fam in [Family::Qwen2, Family::Llama] {
        let mut m = tiny(fam);
        let vars = m.train_full().unwrap();
        assert_eq!(vars.len(), m.named_weights().len());
        let pairs = vec![(vec![1u32, 2, 3, 4], vec![5u32, 6, 7, 8, 9])];
        let loss = completion_log_probs(&m, &pairs, false).unwrap().log_probs.sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &vars {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{fam:?} {name}: no gradient"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0, "{fam:?} {name}: zero gradient (graph cut?)");
        }
    }
}

#[test]
fn lora_adapters_round_trip_through_safetensors() {
    let mut m = tiny(Family::Qwen2);
    let cfg = LoraConfig { rank: 4, alpha: 8.0, targets: vec!["q_proj".into(), "down_proj".into()], seed: 3 };
    m.add_lora(&cfg).unwrap();
    for (_, v) in m.lora_vars() {
        let noise = v.as_tensor().randn_like(0.0, 0.1).unwrap();
        v.set(&noise).unwrap();
    }
    let ids = [5u32, 6, 7, 8];
    let want = full_logits(&m, &ids, true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.safetensors");
    m.save_lora(&path, &cfg).unwrap();
    let mut fresh = tiny(Family::Qwen2);
    let loaded = fresh.load_lora(&path).unwrap();
    assert_eq!(loaded, cfg);
    assert_eq!(fresh.lora_vars().len(), 2 * 2 * fresh.cfg.num_layers);
    assert_eq!(full_logits(&fresh, &ids, true), want);
    // A file that is not an adapter is a one-line error naming it.
    let bogus = dir.path().join("bogus.safetensors");
    std::fs::write(&bogus, b"not safetensors").unwrap();
    let err = format!("{:#}", fresh.load_lora(&bogus).unwrap_err());
    assert!(err.contains("bogus.safetensors"), "{err}");
}

#[test]
fn chat_templates_render_both_families() {
    let qwen = ChatTemplate::from_jinja(Some("{% if messages[0]['role'] == 'system' %}… You are Qwen, created by Alibaba Cloud. You are a helpful assistant. <|im_start|>"));
    assert_eq!(
        qwen.render(None, "Hi"),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let smol = ChatTemplate::from_jinja(Some(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face",
    ));
    assert!(smol.render(Some("Be brief."), "Hi").starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
    let llama3 = ChatTemplate::from_jinja(Some("<|start_header_id|>"));
    assert!(llama3.render(None, "Hi").ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
}

#[test]
fn prompts_render_and_completions_parse() {
    for kind in PromptKind::ALL {
        let p = Prompt::builtin(kind);
        let values: BTreeMap<&str, String> = kind.placeholders().iter().map(|k| (*k, format!("<<{k}>>"))).collect();
        let text = p.render(&values).unwrap();
        for k in kind.placeholders() {
            assert!(text.contains(&format!("<<{k}>>")), "{kind:?} lacks {k}");
        }
        assert!(text.contains("<think>") && text.contains("<answer>"), "{kind:?} must ask for think/answer");
    }
    let err = Prompt::parse(PromptKind::Pattern, "About {history} and {item}".into()).unwrap_err().to_string();
    assert!(err.contains("unknown placeholder {item}"), "{err}");
    let err = Prompt::parse(PromptKind::Reason, "About {history}".into()).unwrap_err().to_string();
    assert!(err.contains("missing placeholder {item}"), "{err}");

    let ok = parse_completion("<think>\n The user likes\n sci-fi.\n</think>\n\n<answer> Alien (1979) </answer>\n");
    assert_eq!(ok.think.as_deref(), Some("The user likes\n sci-fi."));
    assert_eq!(ok.answer.as_deref(), Some("Alien (1979)"));
    assert!(ok.well_formed);
    let upper = parse_completion("<THINK>x</THINK><Answer>y</Answer>");
    assert_eq!((upper.answer.as_deref(), upper.well_formed), (Some("y"), true));
    let no_think = parse_completion("<answer>Heat</answer>");
    assert_eq!((no_think.think, no_think.answer.as_deref(), no_think.well_formed), (None, Some("Heat"), false));
    let cut = parse_completion("<think>hmm</think><answer>Heat (1995)");
    assert_eq!((cut.answer.as_deref(), cut.well_formed), (Some("Heat (1995)"), false));
    let chatter = parse_completion("Sure! <think>a</think><answer>b</answer>");
    assert!(!chatter.well_formed);
    let twice = parse_completion("<think>a</think><answer>b</answer><answer>c</answer>");
    assert!(!twice.well_formed);
    let none = parse_completion("I think Heat.");
    assert_eq!(none, Default::default());
    assert_eq!(
        parse_pattern_update("Pattern: Likes 90s action.\nReason: Heat is a 90s heist film."),
        Some(("Likes 90s action.".into(), "Heat is a 90s heist film.".into()))
    );
    assert_eq!(parse_pattern_update("Pattern: only"), None);
    // The first label dropped: the text before `Reason:` is the pattern.
    assert_eq!(
        parse_pattern_update("Likes 90s action. Reason: Heat is a 90s heist film."),
        Some(("Likes 90s action.".into(), "Heat is a 90s heist film.".into()))
    );
    assert_eq!(parse_pattern_update("Reason: nothing before it"), None);
}

#[test]
fn sampler_respects_greedy_and_top_p() {
    use curec::llm::sampling::sample;
    let logits = [0.0f32, 5.0, 4.9, -3.0];
    let mut rng = curec::rng::rng_for(1, 2, 3);
    assert_eq!(sample(&logits, 0.0, 1.0, &mut rng), 1);
    // top_p tiny keeps only the best token.
    for _ in 0..50 {
        assert_eq!(sample(&logits, 1.0, 0.01, &mut rng), 1);
    }
    // top_p = 1 at high temperature reaches the tail.
    let seen: std::collections::HashSet<u32> = (0..2000).map(|_| sample(&logits, 5.0, 1.0, &mut rng)).collect();
    assert_eq!(seen.len(), 4);
}

#[test]
fn checkpointed_backward_equals_full_graph_backward() {
    use curec::llm::{log_probs_with, Grad};
    let pairs = vec![(vec![1u32, 2, 3], vec![4u32, 5, 6, 7]), (vec![9u32, 8, 7, 6, 5], vec![40u32, 41])];
    for full_ft in [false, true] {
        let mut m = tiny(Family::Qwen2);
        let vars = if full_ft {
            m.train_full().unwrap()
        } else {
            m.add_lora(&LoraConfig::default()).unwrap();
            // Non-zero B so that every adapter matrix has a gradient.
            for (_, v) in m.lora_vars() {
                v.set(&v.as_tensor().randn_like(0.0, 0.05).unwrap()).unwrap();
            }
            m.lora_vars()
        };
        let loss =
            |lp: &curec::llm::CompletionLogProbs| (lp.log_probs.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let (full, _) = log_probs_with(&m, &pairs, true, Grad::Full).unwrap();
        let g_full = loss(&full).backward().unwrap();
        let (ck_lp, ck) = log_probs_with(&m, &pairs, true, Grad::Checkpointed).unwrap();
        let g_ck = m.backward_checkpointed(&loss(&ck_lp), ck.unwrap()).unwrap();
        let (none, ck) = log_probs_with(&m, &pairs, true, Grad::None).unwrap();
        assert!(ck.is_none() && !none.log_probs.track_op(), "Grad::None must not keep a graph");
        assert!(
            max_abs_diff(
                &none.log_probs.flatten_all().unwrap().to_vec1().unwrap(),
                &full.log_probs.flatten_all().unwrap().to_vec1().unwrap()
            ) < 1e-5
        );
        for (name, v) in &vars {
            let a: Vec<f32> = g_full.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = g_ck
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no checkpointed gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            assert!(
                max_abs_diff(&a, &b) / scale < 1e-4,
                "full_ft={full_ft} {name}: gradients differ by {}",
                max_abs_diff(&a, &b)
            );
        }
    }
}

#[test]
fn completions_sharing_a_prompt_are_packed_without_changing_log_probs_or_gradients() {
    // A GRPO group: one prompt, completions of different lengths (one empty), plus a second
    // prompt in between. Packed into shared rows, every log-prob and every adapter gradient must
    // equal scoring each pair alone (nothing to pack).
    use curec::llm::{log_probs_with, Grad};
    let a = vec![5u32, 9, 2, 7, 1];
    let b = vec![3u32, 3, 8];
    let pairs = vec![
        (a.clone(), vec![4u32, 5, 6, 7]),
        (a.clone(), vec![11u32]),
        (b.clone(), vec![12u32, 13]),
        (a.clone(), vec![20u32, 21, 22]),
        (a.clone(), vec![]),
        (b.clone(), vec![30u32, 31, 32, 33, 34]),
    ];
    for fam in [Family::Qwen2, Family::Llama] {
        let mut m = tiny(fam);
        m.add_lora(&LoraConfig::default()).unwrap();
        for (_, v) in m.lora_vars() {
            v.set(&v.as_tensor().randn_like(0.0, 0.05).unwrap()).unwrap();
        }
        let weights: Vec<f32> = (0..pairs.len() * 5).map(|i| 0.3 + 0.1 * (i % 7) as f32).collect();
        let w = Tensor::from_vec(weights, (pairs.len(), 5), &Device::Cpu).unwrap();
        let loss_of = |lp: &Tensor, rows: std::ops::Range<usize>| {
            let wr = w.narrow(0, rows.start, rows.len()).unwrap().narrow(1, 0, lp.dim(1).unwrap()).unwrap();
            (lp * wr).unwrap().sum_all().unwrap()
        };
        for grad in [Grad::Full, Grad::Checkpointed] {
            let (packed, ck) = log_probs_with(&m, &pairs, true, grad).unwrap();
            let loss = loss_of(&packed.log_probs, 0..pairs.len());
            let g_packed = match ck {
                Some(ck) => m.backward_checkpointed(&loss, ck).unwrap(),
                None => loss.backward().unwrap(),
            };
            let got: Vec<Vec<f32>> = packed.log_probs.to_vec2().unwrap();
            let mask: Vec<Vec<f32>> = packed.mask.to_vec2().unwrap();
            let mut g_alone: Vec<Vec<f32>> = Vec::new();
            for (i, pair) in pairs.iter().enumerate() {
                let (one, _) = log_probs_with(&m, std::slice::from_ref(pair), true, Grad::Full).unwrap();
                let one_v: Vec<f32> = one.log_probs.flatten_all().unwrap().to_vec1().unwrap();
                for k in 0..pair.1.len() {
                    assert!((got[i][k] - one_v[k]).abs() < 1e-5, "{fam:?} {grad:?} pair {i} token {k}");
                    assert_eq!(mask[i][k], 1.0);
                }
                assert!(got[i][pair.1.len()..].iter().all(|&x| x == 0.0), "padding must be zero");
                assert!(mask[i][pair.1.len()..].iter().all(|&x| x == 0.0), "padding must be masked");
                if pair.1.is_empty() {
                    continue;
                }
                let grads = loss_of(&one.log_probs, i..i + 1).backward().unwrap();
                for (k, (_, v)) in m.lora_vars().iter().enumerate() {
                    let g: Vec<f32> = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    if g_alone.len() <= k {
                        g_alone.push(g);
                    } else {
                        g_alone[k].iter_mut().zip(&g).for_each(|(s, x)| *s += x);
                    }
                }
            }
            for ((name, v), want) in m.lora_vars().iter().zip(&g_alone) {
                let got: Vec<f32> = g_packed.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
                assert!(
                    max_abs_diff(&got, want) / scale < 1e-4,
                    "{fam:?} {grad:?} {name}: packed gradient differs by {}",
                    max_abs_diff(&got, want)
                );
            }
        }
    }
}
