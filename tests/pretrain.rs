//! `curec pretrain` end to end on a tiny random model written as a Hugging Face directory (no
//! downloads) and the embedded ml-latest-small: the contract's eval.json, a kill in the middle
//! resumed to the same bytes as an uninterrupted run, and a resume under another config refused.

use std::path::Path;
use std::process::Command;

mod common;
use common::setup;

use curec::align::{pretrain, pretrain_until, PretrainConfig};
use curec::grpo::GrpoConfig;
use curec::llm::LoraConfig;
use serde_json::{json, Value};

fn configs() -> (PretrainConfig, GrpoConfig, LoraConfig) {
    let p = PretrainConfig {
        history_len: 3,
        sample: 6,
        prompts_per_step: 2,
        epochs: 2,
        checkpoint_every: 2,
        eval_users: 4,
        eval_max_new_tokens: 5,
        bootstrap: 50,
        ..Default::default()
    };
    let g = GrpoConfig { group_size: Some(3), max_new_tokens: 8, micro_batch: 4, lora_lr: 1e-2, ..Default::default() };
    (p, g, LoraConfig { rank: 2, ..Default::default() })
}

/// The step log without wall-clock fields.
fn steps_without_timing(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            for k in ["seconds", "gen_tokens_per_s", "train_tokens_per_s"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

fn eval_without_timing(v: &Value) -> Value {
    let mut v = v.clone();
    for k in ["train_seconds", "eval_seconds", "seconds_per_step"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

#[test]
fn killed_run_resumes_to_the_same_bytes() {
    let s = setup();
    let (p, g, l) = configs();
    let model = s.model.to_str().unwrap();
    let a = s.base.join("a");
    let ea = pretrain(&s.data, model, &a, &p, &g, &l).unwrap();
    for k in ["format_rate", "legal_rate", "hit_rate", "base_hit_rate", "random_hit_rate"] {
        assert!(ea[k].is_f64(), "eval.json lacks float {k}: {ea}");
    }
    assert_eq!(ea["random_hit_rate"], json!(0.1));
    assert_eq!(ea["steps"], json!(6));
    assert!(a.join("adapter.safetensors").exists() && a.join("curve.svg").exists());
    let log = steps_without_timing(&a);
    assert_eq!(log.len(), 6);
    let trained: u64 = log.iter().map(|v| v["rows_trained"].as_u64().unwrap()).sum();
    assert!(trained > 0, "no step had a group with signal: the resume check would be vacuous");

    let b = s.base.join("b");
    assert!(pretrain_until(&s.data, model, &b, &p, &g, &l, Some(4)).unwrap().is_none());
    assert!(b.join("checkpoint-4/state.json").exists() && !b.join("eval.json").exists());
    assert_eq!(steps_without_timing(&b).len(), 4);
    // A half-written step after the checkpoint (killed mid-step) must not survive the resume.
    std::fs::OpenOptions::new()
        .append(true)
        .open(b.join("steps.jsonl"))
        .map(|mut f| {
            use std::io::Write;
            writeln!(f, "{{\"step\": 5, \"partial\": true}}").unwrap();
        })
        .unwrap();
    let eb = pretrain(&s.data, model, &b, &p, &g, &l).unwrap();
    assert_eq!(
        std::fs::read(a.join("adapter.safetensors")).unwrap(),
        std::fs::read(b.join("adapter.safetensors")).unwrap(),
        "resumed adapter differs"
    );
    assert_eq!(steps_without_timing(&a), steps_without_timing(&b));
    assert_eq!(eval_without_timing(&ea), eval_without_timing(&eb));

    // A finished run started again with other evaluation settings is re-evaluated, not
    // retrained: same adapter and step log, the likelihood ranking added, training time kept.
    let adapter = std::fs::read(a.join("adapter.safetensors")).unwrap();
    let p2 = PretrainConfig { eval_users: 6, rank_answers: Some(curec::align::eval::AnswerLabel::Index), ..p.clone() };
    let ea2 = pretrain(&s.data, model, &a, &p2, &g, &l).unwrap();
    assert_eq!(std::fs::read(a.join("adapter.safetensors")).unwrap(), adapter);
    assert_eq!(steps_without_timing(&a), log);
    assert_eq!(ea2["eval_users"], json!(6));
    for k in ["likelihood_hit_rate", "base_likelihood_hit_rate", "likelihood_top_position_share"] {
        assert!(ea2[k].is_f64(), "eval.json lacks {k}: {ea2}");
    }
    assert_eq!(std::fs::read_to_string(a.join("eval_aligned_likelihood.jsonl")).unwrap().lines().count(), 6);
    let (t1, t2) = (ea["train_seconds"].as_f64().unwrap(), ea2["train_seconds"].as_f64().unwrap());
    assert!(t2 > 0.0 && t2 <= t1 + 0.5, "training time after re-evaluation: {t2} vs {t1}");

    // Same directory, another config: refused with a one-line reason.
    let other = GrpoConfig { lora_lr: 2e-2, ..g };
    let e = pretrain(&s.data, model, &b, &p, &other, &l).unwrap_err().to_string();
    assert!(e.contains("checkpoint-6") && e.contains("another config"), "{e}");
}

#[test]
fn cli_pretrain_writes_the_contract_and_rejects_bad_input() {
    let s = setup();
    let out = s.base.join("cli");
    let job = s.base.join("job.toml");
    std::fs::write(
        &job,
        "[pretrain]\nhistory_len = 2\nsample = 2\nepochs = 1\neval_users = 2\neval_max_new_tokens = 3\nbootstrap = 10\n\n[grpo]\ngroup_size = 2\nmax_new_tokens = 3\n",
    )
    .unwrap();
    let run =
        |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_curec")).args(args).env("CUREC_LOG", "warn").output().unwrap();
    let (data, model, o, j) =
        (s.data.to_str().unwrap(), s.model.to_str().unwrap(), out.to_str().unwrap(), job.to_str().unwrap());
    let ok = run(&["pretrain", "--data", data, "--model", model, "--out", o, "--config", j]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let eval: Value = serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert!(eval["hit_rate"].is_f64() && eval["base_hit_rate"].is_f64());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("| hit rate (95% CI) |"));

    let one_line = |args: &[&str], want: &str| {
        let r = run(args);
        assert!(!r.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&r.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(want), "{err} lacks {want}");
    };
    let fresh = s.base.join("fresh");
    let f = fresh.to_str().unwrap();
    one_line(&["pretrain", "--data", "/nonexistent/data", "--model", model, "--out", f], "/nonexistent/data");
    one_line(&["pretrain", "--data", data, "--model", model, "--out", f, "--set", "pretrain.nope=1"], "nope");
    one_line(&["pretrain", "--data", data, "--model", model, "--out", f, "--set", "grpo.epsilon=2"], "grpo.epsilon");
    let j2 = j;
    one_line(
        &[
            "pretrain",
            "--data",
            data,
            "--model",
            model,
            "--out",
            f,
            "--config",
            j2,
            "--set",
            "pretrain.orders_per_group=3",
        ],
        "orders_per_group",
    );
    assert!(!fresh.exists(), "a refused run must not leave its directory behind");
    one_line(&["pretrain", "--data", data, "--out", f], "no model");
    one_line(&["pretrain", "--data", data, "--model", "no-such-model", "--out", f], "no-such-model");
    assert!(!fresh.join("eval.json").exists());
}

#[test]
fn run_job_pretrains_after_the_baselines_and_skips_a_finished_stage() {
    let s = setup();
    let out = s.base.join("job-run");
    let job = s.base.join("run.toml");
    std::fs::write(
        &job,
        format!(
            "[prepare]\ninput = {:?}\nout = {:?}\n\n[train]\nmodels = [\"pop\"]\nout = {:?}\nbootstrap = 10\n\n\
             [pretrain]\nmodel = {:?}\nhistory_len = 2\nsample = 2\nepochs = 1\neval_users = 2\neval_max_new_tokens = 3\nbootstrap = 10\n\n\
             [grpo]\ngroup_size = 2\nmax_new_tokens = 3\n",
            s.data.to_str().unwrap(),
            s.data.to_str().unwrap(),
            out.to_str().unwrap(),
            s.model.to_str().unwrap()
        ),
    )
    .unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_curec"))
            .args(["run", job.to_str().unwrap()])
            .env("CUREC_LOG", "warn")
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let table = std::fs::read_to_string(out.join("pretrain.md")).unwrap();
    assert!(table.contains("aligned (GRPO, 1 steps)") && table.contains("random choice"), "{table}");
    assert!(out.join("pop/metrics.json").exists() && out.join("pretrain/adapter.safetensors").exists());
    let stamp = std::fs::metadata(out.join("pretrain/eval.json")).unwrap().modified().unwrap();
    let second = run();
    assert!(second.status.success());
    assert_eq!(std::fs::metadata(out.join("pretrain/eval.json")).unwrap().modified().unwrap(), stamp, "stage redone");
}

/// The prompt's format example is a history item and never a candidate, in training and in
/// validation tasks alike (the prompt files promise it; a candidate there made copying the
/// example a free legal answer).
#[test]
fn the_format_example_is_a_history_item_and_never_a_candidate() {
    use curec::align::task::{train_stream, train_task, valid_task};
    let s = setup();
    let ds = curec::data::prepared::read_dataset(&s.data).unwrap();
    let xs = curec::data::prepared::read_interactions(&s.data.join("interactions.parquet")).unwrap();
    let stream = train_stream(&ds, &xs, 1);
    let mut checked = 0;
    for r in stream.iter().step_by(97) {
        for epoch in 0..3 {
            let t = train_task(&ds, r, 5, 9, 7, epoch).unwrap();
            assert!(t.history.contains(&t.example), "train task {}: example {} not in history", r.index, t.example);
            assert!(!t.candidates.contains(&t.example), "train task {}: example {} is a candidate", r.index, t.example);
            checked += 1;
        }
    }
    for u in (0..ds.n_users as u32).step_by(7) {
        let t = valid_task(&ds, u, 5, 9, 7).unwrap();
        assert!(t.history.contains(&t.example) && !t.candidates.contains(&t.example), "valid task of user {u}");
        checked += 1;
    }
    assert!(checked > 1000, "only {checked} tasks checked");
}
