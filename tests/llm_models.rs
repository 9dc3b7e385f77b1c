//! The real pinned models against reference values from Hugging Face transformers on the same
//! GGUF files (`datasets/fixtures/llm/*.json`, written by `benches/hf_reference.py reference`):
//! tokenizer ids built from GGUF metadata, prompt logits, greedy continuation.
//!
//! The generation engine (quantized) on the same references, and its GGUF block decoders
//! against candle's.
//!
//! Tests never download: they run when the model is in the cache (`curec model fetch …`; `.ci/run`
//! fetches them first) and otherwise say loudly that they were skipped. Under `CI=true` a missing
//! model fails the test instead: the only real-model checks must not vanish from CI.

use std::path::PathBuf;

use candle_core::{DType, Device};
use curec::llm::engine::{completion_log_probs_quantized, Engine, EngineConfig, Logits, QLlm, Request, SeqStep};
use curec::llm::fetch::Pins;
use curec::llm::kernels::gguf::{dequantize_row, Quantize};
use curec::llm::{generate, Llm, SamplingConfig};

fn cached(name: &str) -> Option<PathBuf> {
    let pins = Pins::builtin();
    let m = pins.find(name).unwrap();
    if m.is_cached() {
        Some(m.main_path())
    } else {
        let msg = format!("{name} is not in {} (run `curec model fetch {name}`)", m.dir().display());
        assert!(std::env::var("CI").map_or(true, |v| v.is_empty() || v == "false"), "CI=true and {msg}");
        eprintln!("SKIPPED: {msg}");
        None
    }
}

fn reference(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("datasets/fixtures/llm/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_model(name: &str, eos: u32) {
    let Some(path) = cached(name) else { return };
    let r = reference(name);
    let llm = Llm::load(&path, &Device::Cpu, DType::F32).unwrap();
    // Tokenizer from GGUF metadata = the transformers tokenizer, and it round-trips.
    for (text, want) in r["texts"].as_array().unwrap().iter().zip(r["ids"].as_array().unwrap()) {
        let text = text.as_str().unwrap();
        let got = llm.tokenizer.encode(text).unwrap();
        assert_eq!(got, ids(want), "{name}: ids of {text:?}");
        assert_eq!(llm.tokenizer.decode(&got, false).unwrap(), text, "{name}: round trip of {text:?}");
    }
    let prompt = r["prompt"].as_str().unwrap();
    let prompt_ids = llm.tokenizer.encode(prompt).unwrap();
    assert_eq!(prompt_ids, ids(&r["prompt_ids"]));
    assert!(llm.chat.render(None, "What is the capital of France?").ends_with(prompt), "{name}: chat template");
    // Logits of the last prompt position: same top 5, values within 1e-2.
    let n = prompt_ids.len();
    let t = candle_core::Tensor::new(prompt_ids.as_slice(), &Device::Cpu).unwrap().reshape((1, n)).unwrap();
    let p = candle_core::Tensor::new((0..n as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu)
        .unwrap()
        .reshape((1, n))
        .unwrap();
    let h = llm.model.forward(&t, &p, None, None, false).unwrap();
    let logits: Vec<Vec<f32>> = llm.model.logits(&h).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let last = &logits[n - 1];
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    assert_eq!(top5, ids(&r["top5_ids"]), "{name}: top-5 next tokens");
    for (i, want) in top5.iter().zip(r["top5_logits"].as_array().unwrap()) {
        let d = (last[*i as usize] as f64 - want.as_f64().unwrap()).abs();
        assert!(d < 1e-2, "{name}: logit of {i} differs by {d}");
    }
    for (got, want) in logits[0].iter().zip(r["logits_first_pos_first8"].as_array().unwrap()) {
        assert!((*got as f64 - want.as_f64().unwrap()).abs() < 1e-2, "{name}: first-position logits");
    }
    // Greedy continuation.
    let out = generate(&llm.model, &llm.tokenizer, &[prompt_ids], &[0], &SamplingConfig::greedy(16), false).unwrap();
    let mut want = ids(&r["greedy_ids"]);
    if want.last() == Some(&eos) {
        want.pop();
    }
    assert_eq!(out[0].tokens, want, "{name}: greedy continuation {:?}", out[0].text);
    assert!(out[0].text.contains("Paris"), "{name}: {:?}", out[0].text);
}

#[test]
fn smollm2_matches_transformers() {
    check_model("smollm2-135m-instruct", 2);
}

#[test]
fn qwen_matches_transformers() {
    check_model("qwen2.5-0.5b-instruct", 151645);
}

#[test]
fn minilm_matches_transformers_sentence_embeddings() {
    use curec::embed::Encoder;
    let Some(dir) = cached("minilm-l6-v2") else { return };
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/fixtures/minilm/reference.json");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let enc = curec::embed::minilm::MiniLm::load(&dir, &Device::Cpu).unwrap();
    let texts: Vec<&str> = r["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    for (t, want) in texts.iter().zip(r["ids"].as_array().unwrap()) {
        assert_eq!(enc.tokenize(t).unwrap(), ids(want), "{t}");
    }
    // Batched (padded) and one at a time give the reference vectors.
    let all = enc.encode(&texts).unwrap();
    for (i, want) in r["embeddings"].as_array().unwrap().iter().enumerate() {
        let one = &enc.encode(&texts[i..=i]).unwrap()[0];
        for (got, w) in [&all[i], one].into_iter().zip(std::iter::repeat(want)) {
            let w: Vec<f32> = w.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let err = got.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-5, "sentence {i}: max abs error {err}");
        }
    }
}

/// The engine on a real model: top-5 next tokens and the greedy continuation equal transformers'
/// (f32) reference; per-token log-probs of that continuation within 0.02 nats of the f32 path.
fn check_real(name: &str, eos: u32) {
    let Some(path) = cached(name) else { return };
    let r = reference(name);
    let q = QLlm::load(&path, Quantize::Auto).unwrap();
    let prompt = ids(&r["prompt_ids"]);
    let mut cache = q.model.new_cache(prompt.len());
    let logits = q
        .model
        .forward(&mut [SeqStep { tokens: &prompt, cache: &mut cache, logits: Logits::All }])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let v = q.model.cfg.vocab_size;
    let last = &logits[(prompt.len() - 1) * v..];
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    assert_eq!(top5, ids(&r["top5_ids"]), "{name}: top-5 next tokens");
    let mut want = ids(&r["greedy_ids"]);
    if want.last() == Some(&eos) {
        want.pop();
    }
    let out = Engine::new(&q.model, &q.tokenizer, EngineConfig::default())
        .run(&[Request { prompt: prompt.clone(), key: 0, sampling: SamplingConfig::greedy(16) }])
        .unwrap();
    assert_eq!(out[0].tokens, want, "{name}: greedy continuation {:?}", out[0].text);
    let f32_model = Llm::load(&path, &Device::Cpu, DType::F32).unwrap();
    let exact =
        curec::llm::log_probs_with(&f32_model.model, &[(prompt.clone(), want.clone())], false, curec::llm::Grad::None)
            .unwrap()
            .0;
    let exact: Vec<f32> = exact.log_probs.flatten_all().unwrap().to_vec1().unwrap();
    let got = completion_log_probs_quantized(&q.model, &prompt, &want).unwrap();
    let mad = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).sum::<f32>() / got.len() as f32;
    eprintln!("{name}: mean |Δ log-prob| against f32 = {mad:.4} nats/token");
    assert!(mad < 0.02, "{name}: mean |Δ log-prob| {mad}");
}

#[test]
fn smollm2_engine_matches_transformers() {
    check_real("smollm2-135m-instruct", 2);
}

#[test]
fn qwen_engine_matches_transformers() {
    check_real("qwen2.5-0.5b-instruct", 151645);
}

#[test]
fn gguf_row_decoders_equal_candle_dequantize() {
    use candle_core::quantized::gguf_file;
    let mut seen = std::collections::BTreeSet::new();
    for name in ["smollm2-135m-instruct", "qwen2.5-0.5b-instruct"] {
        let Some(path) = cached(name) else { return };
        let mut f = std::fs::File::open(&path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let mut names: Vec<&String> = c.tensor_infos.keys().filter(|n| n.ends_with(".weight")).collect();
        names.sort();
        for n in names {
            let info = &c.tensor_infos[n];
            if info.shape.rank() != 2 || !seen.insert(format!("{:?}", info.ggml_dtype)) {
                continue;
            }
            let t = c.tensor(&mut f, n, &Device::Cpu).unwrap();
            let all: Vec<Vec<f32>> = t.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
            for r in [0, all.len() / 2, all.len() - 1] {
                assert_eq!(dequantize_row(&t, r).unwrap(), all[r], "{name}: {n} ({:?}) row {r}", info.ggml_dtype);
            }
        }
    }
    assert!(seen.len() >= 4, "types checked: {seen:?}");
}
