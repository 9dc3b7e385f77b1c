//! Patterns, reasons and the CUREC reward model end to end on the embedded ml-latest-small with a
//! tiny random LLM (no downloads; the LLM is also the encoder): the features contract, a resume
//! after a torn write that gives the same Parquet bytes (with another batch size, on 2 timely
//! workers instead of 1), the reward
//! model's metrics, `curec eval` and `curec recommend`, and the error paths.

use std::path::Path;
use std::process::{Command, Output};

use curec::config::JobConfig;
use curec::data::Split;
use curec::features::store::{self, PatternRow, ReasonRow};
use curec::features::FeaturesConfig;
use curec::pipeline::features::generate_features;
use curec::rec::curec::Variant;
use curec::rec::ModelKind;
use serde_json::Value;

mod common;
use common::setup;

fn curec_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_curec")).args(args).env("CUREC_LOG", "warn").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn fcfg(users: usize, reasons_per_user: usize) -> FeaturesConfig {
    FeaturesConfig {
        users,
        reasons_per_user,
        pattern_history: 4,
        reason_history: 3,
        max_new_tokens_pattern: 6,
        max_new_tokens_reason: 6,
        batch: 3,
        ..Default::default()
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn keep_lines(path: &Path, n: usize, torn: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut kept: String = text.split_inclusive('\n').take(n).collect();
    kept.push_str(torn);
    std::fs::write(path, kept).unwrap();
}

#[test]
fn features_contract_and_a_torn_resume_give_the_same_bytes() {
    let s = setup();
    let model = s.model.to_str().unwrap();
    let a = s.base.join("a");
    let m = generate_features(&s.data, model, &a, &fcfg(5, 2)).unwrap();
    assert_eq!(m["patterns"], 5);
    assert_eq!(m["reasons"], 10);
    assert_eq!(m["limits"]["reasons_per_user"], 2);
    for f in ["patterns.parquet", "reasons.parquet", "manifest.json"] {
        assert!(a.join(f).is_file(), "{f} missing");
    }
    // Parquet holds what the progress logs hold.
    let logged: Vec<PatternRow> = store::read_log(&a.join("patterns.jsonl")).unwrap();
    let parquet = store::read_patterns(&a.join(store::PATTERNS)).unwrap();
    let mut by_user = logged.clone();
    by_user.sort_by_key(|r| r.user);
    assert_eq!(
        parquet.iter().map(|r| (r.user, r.timestamp, r.text.clone())).collect::<Vec<_>>(),
        by_user.iter().map(|r| (r.user, r.timestamp, r.text.clone())).collect::<Vec<_>>()
    );
    let reasons = store::read_reasons(&a.join(store::REASONS)).unwrap();
    let logged: Vec<ReasonRow> = store::read_log(&a.join("reasons.jsonl")).unwrap();
    assert_eq!(reasons.len(), logged.len());
    // Each reason is for the user's own train interaction, at its time.
    assert!(reasons.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));

    // A run killed mid-write (torn last lines, no Parquet yet) resumes, with another batch size and
    // two timely workers, to the same bytes.
    let b = s.base.join("b");
    generate_features(&s.data, model, &b, &fcfg(5, 2)).unwrap();
    for f in ["manifest.json", "patterns.parquet", "reasons.parquet"] {
        std::fs::remove_file(b.join(f)).unwrap();
    }
    keep_lines(&b.join("patterns.jsonl"), 2, "{\"user\":12,\"times");
    keep_lines(&b.join("reasons.jsonl"), 3, "");
    let mut one = fcfg(5, 2);
    one.batch = 1;
    one.workers = 2;
    let m2 = generate_features(&s.data, model, &b, &one).unwrap();
    assert_eq!(m2["patterns"], 5);
    assert_eq!(read(&a.join("patterns.parquet")), read(&b.join("patterns.parquet")));
    assert_eq!(read(&a.join("reasons.parquet")), read(&b.join("reasons.parquet")));
    // Finished: a rerun returns the manifest; another config is refused.
    assert_eq!(generate_features(&s.data, model, &b, &one).unwrap()["patterns"], 5);
    let err = generate_features(&s.data, model, &b, &fcfg(5, 3)).unwrap_err().to_string();
    assert!(err.contains("another config"), "{err}");
}

#[test]
fn reward_model_trains_evaluates_and_explains() {
    let s = setup();
    let model = s.model.to_str().unwrap();
    let feats = s.base.join("features");
    generate_features(&s.data, model, &feats, &fcfg(30, 3)).unwrap();
    let mut cfg = JobConfig::default();
    cfg.curec.features = Some(feats.clone());
    cfg.curec.encoder = format!("llm:{model}");
    cfg.curec.positions_per_user = 4;
    cfg.sasrec.max_len = 20;
    cfg.curec.max_epochs = 2;
    cfg.train.bootstrap = 50;
    let run = s.base.join("run");
    let m = curec::pipeline::stages::train(ModelKind::Curec, &s.data, &run, &cfg).unwrap();
    assert_eq!(m["model"], "curec");
    assert_eq!(m["variant"], "attention");
    for k in [1, 5, 10, 20] {
        for metric in ["recall", "ndcg"] {
            let v = m[format!("{metric}@{k}")].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{metric}@{k} = {v}");
        }
    }
    assert!(m["train_seconds"].as_f64().unwrap() > 0.0);
    // The embedding cache was written next to the features.
    assert!(std::fs::read_dir(&feats).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("embeddings-")));

    // `curec eval` reloads the run and gets the same test metrics.
    let ev = curec::pipeline::stages::eval_run(&run, None, Split::Test).unwrap();
    assert!((ev["ndcg@10"].as_f64().unwrap() - m["ndcg@10"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(ev["variant"], "attention");

    // `curec recommend` for a user that has a pattern.
    let patterns = store::read_patterns(&feats.join(store::PATTERNS)).unwrap();
    let raw = patterns[0].user;
    let ds = curec::data::prepared::read_dataset(&s.data).unwrap();
    let raw_user = ds.users[raw as usize].clone();
    let recs = curec::recommend::recommend(&run, &raw_user, 5, 3).unwrap();
    assert_eq!(recs.len(), 5);
    assert!(recs.windows(2).all(|w| w[0].score >= w[1].score));
    let seen: std::collections::HashSet<&str> = ds
        .history(raw, Split::Test)
        .iter()
        .chain(std::iter::once(&ds.test[raw as usize]))
        .map(|&i| ds.items[i as usize].raw_id.as_str())
        .collect();
    for r in &recs {
        assert!(!seen.contains(r.item.as_str()), "{} was already seen", r.item);
        assert!(r.reasons.len() <= 3);
        let total: f32 = r.reasons.iter().map(|w| w.weight).sum();
        assert!(total <= 1.0 + 1e-5, "weights sum to {total}");
        assert!(r.reasons.windows(2).all(|w| w[0].weight >= w[1].weight));
    }
    let out = curec_cli(&["recommend", "--model-dir", run.to_str().unwrap(), "--user", &raw_user, "-k", "3", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    for r in arr {
        assert!(r["item"].is_string() && r["title"].is_string() && r["score"].is_number() && r["reasons"].is_array());
    }

    // The text variant trains from item descriptions alone.
    cfg.curec.variant = Variant::Text;
    cfg.curec.max_epochs = 1;
    let m = curec::pipeline::stages::train(ModelKind::Curec, &s.data, &s.base.join("text"), &cfg).unwrap();
    assert_eq!(m["variant"], "text");

    // Errors: one line, non-zero exit.
    let data = s.data.to_str().unwrap();
    let o = curec_cli(&["train", "curec", "--data", data, "--out", s.base.join("x").to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("--features"), "{}", stderr(&o));
    let o = curec_cli(&["recommend", "--model-dir", run.to_str().unwrap(), "--user", "no-such-user"]);
    assert!(!o.status.success() && stderr(&o).contains("no such user"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    let o = curec_cli(&["recommend", "--model-dir", s.base.join("nope").to_str().unwrap(), "--user", "1"]);
    assert!(!o.status.success() && stderr(&o).contains("metrics.json"), "{}", stderr(&o));
    let o = curec_cli(&[
        "features",
        "--data",
        s.base.join("missing").to_str().unwrap(),
        "--model",
        model,
        "--out",
        s.base.join("f2").to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("missing"), "{}", stderr(&o));
    let o = curec_cli(&[
        "train",
        "curec",
        "--data",
        data,
        "--features",
        s.base.join("missing").to_str().unwrap(),
        "--out",
        s.base.join("y").to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("not a features directory"), "{}", stderr(&o));
}

#[test]
fn run_job_chains_features_and_reward_model_variants() {
    let s = setup();
    let model = s.model.to_str().unwrap().to_string();
    let out = s.base.join("job");
    let mut cfg = JobConfig::default();
    cfg.prepare.out = Some(s.data.clone());
    cfg.train.out = Some(out.clone());
    cfg.train.models = vec![];
    cfg.train.bootstrap = 20;
    cfg.features = FeaturesConfig { model: Some(model.clone()), ..fcfg(8, 2) };
    cfg.curec.encoder = format!("llm:{model}");
    cfg.curec.variants = vec![Variant::Attention, Variant::Ap];
    cfg.curec.max_epochs = 1;
    cfg.curec.positions_per_user = 2;
    cfg.sasrec.max_len = 10;
    let rows = curec::pipeline::stages::run_job(&cfg, false).unwrap();
    assert_eq!(rows.iter().map(|r| r["variant"].as_str().unwrap()).collect::<Vec<_>>(), ["attention", "ap"]);
    assert!(out.join("features/manifest.json").is_file());
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(table.contains("| curec-attention |") && table.contains("| curec-ap |"), "{table}");
    // A second run reuses every stage's output.
    let again = curec::pipeline::stages::run_job(&cfg, false).unwrap();
    for (a, b) in again.iter().zip(&rows) {
        // Same training time: read back, not retrained (floats equal up to JSON's last digit).
        assert!((a["train_seconds"].as_f64().unwrap() - b["train_seconds"].as_f64().unwrap()).abs() < 1e-9);
        assert!((a["ndcg@10"].as_f64().unwrap() - b["ndcg@10"].as_f64().unwrap()).abs() < 1e-12);
    }
}

/// The text-path controls: `--writer oracle|shuffled` (no model), the text-only reward model
/// (`curec.ids = false`) trained from them, and `curec compare` between two runs.
#[test]
fn control_writers_text_only_training_and_paired_comparison() {
    let s = setup();
    let data = s.data.to_str().unwrap();
    let model = s.model.to_str().unwrap();
    let dir = |n: &str| s.base.join(n).to_str().unwrap().to_string();
    let sets = ["--set", "features.users=40"];
    for w in ["oracle", "shuffled"] {
        let o = curec_cli(&[&["features", "--data", data, "--out", &dir(w), "--writer", w][..], &sets].concat());
        assert!(o.status.success(), "{w}: {}", stderr(&o));
        let m: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            (m["writer"].as_str(), m["patterns"].as_u64(), m["reasons"].as_u64()),
            (Some(w), Some(40), Some(160))
        );
    }
    let oracle = store::read_reasons(&s.base.join("oracle").join(store::REASONS)).unwrap();
    let shuffled = store::read_reasons(&s.base.join("shuffled").join(store::REASONS)).unwrap();
    assert!(oracle.iter().all(|r| r.text.starts_with("Fans of ")), "{:?}", oracle[0]);
    let key = |r: &ReasonRow| (r.user, r.item, r.timestamp);
    assert_eq!(oracle.iter().map(key).collect::<Vec<_>>(), shuffled.iter().map(key).collect::<Vec<_>>());
    let texts = |rs: &[ReasonRow]| {
        let mut t: Vec<String> = rs.iter().map(|r| r.text.clone()).collect();
        t.sort();
        t
    };
    assert_eq!(texts(&oracle), texts(&shuffled));
    let moved = oracle.iter().zip(&shuffled).filter(|(a, b)| a.text != b.text).count();
    assert!(moved > oracle.len() / 2, "only {moved} of {} texts moved", oracle.len());
    let patterns = store::read_patterns(&s.base.join("oracle").join(store::PATTERNS)).unwrap();
    assert!(patterns.iter().all(|p| p.text.contains("Favourite genres: ") && p.text.contains("Recently watched: ")));
    // The same command again: complete, nothing rewritten.
    let before = read(&s.base.join("oracle").join(store::REASONS));
    let o =
        curec_cli(&[&["features", "--data", data, "--out", &dir("oracle"), "--writer", "oracle"][..], &sets].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(before, read(&s.base.join("oracle").join(store::REASONS)));
    // Errors: the LLM writer needs a model, the controls take none.
    let o = curec_cli(&["features", "--data", data, "--out", &dir("f-llm")]);
    assert!(!o.status.success() && stderr(&o).contains("--model"), "{}", stderr(&o));
    let o = curec_cli(&["features", "--data", data, "--out", &dir("f-x"), "--writer", "oracle", "--model", model]);
    assert!(!o.status.success() && stderr(&o).contains("needs no model"), "{}", stderr(&o));

    // Text only: no item-ID embeddings; metrics and per-user ranks as for any run.
    let enc = format!("curec.encoder=\"llm:{model}\"");
    let train = |out: &str, extra: &[&str]| {
        let (feats, out_dir) = (dir("oracle"), dir(out));
        let args = [
            &["train", "curec", "--data", data, "--features", &feats, "--out", &out_dir][..],
            &["--set", &enc, "--set", "curec.max_epochs=1", "--set", "curec.positions_per_user=4"],
            &["--set", "sasrec.max_len=20", "--set", "train.bootstrap=50"],
            extra,
        ]
        .concat();
        let o = curec_cli(&args);
        assert!(o.status.success(), "{out}: {}", stderr(&o));
        serde_json::from_slice::<Value>(&std::fs::read(s.base.join(out).join("metrics.json")).unwrap()).unwrap()
    };
    let m = train("text-only", &["--set", "curec.ids=false"]);
    assert!(m["ndcg@10"].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)), "{m}");
    assert_eq!(m["config"]["curec"]["ids"], false);
    let ckpt =
        candle_core::safetensors::load(s.base.join("text-only/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(ckpt.contains_key("item_proj.weight") && !ckpt.contains_key("item_emb"));
    // The paper's strongest baselines: KAR-style (features from --features) and BERT4Rec.
    let small = [
        "--max-epochs",
        "1",
        "--set",
        "sasrec.max_len=20",
        "--set",
        "bert4rec.max_len=20",
        "--set",
        "train.bootstrap=50",
    ];
    let (feats, kar, bert) = (dir("oracle"), dir("kar"), dir("bert4rec"));
    let o = curec_cli(
        &[&["train", "kar", "--data", data, "--features", &feats, "--out", &kar, "--set", &enc][..], &small].concat(),
    );
    assert!(o.status.success(), "kar: {}", stderr(&o));
    let o = curec_cli(&[&["train", "bert4rec", "--data", data, "--out", &bert][..], &small].concat());
    assert!(o.status.success(), "bert4rec: {}", stderr(&o));
    for (run, model) in [(&kar, "kar"), (&bert, "bert4rec")] {
        let m: Value = serde_json::from_slice(&read(&Path::new(run).join("metrics.json"))).unwrap();
        assert_eq!(m["model"], model);
        assert!(m["ndcg@10"].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)), "{m}");
    }
    let o = curec_cli(&["train", "kar", "--data", data, "--out", &dir("kar2")]);
    assert!(!o.status.success() && stderr(&o).contains("--features"), "{}", stderr(&o));

    let o = curec_cli(&["train", "pop", "--data", data, "--out", &dir("pop"), "--set", "train.bootstrap=50"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ranks: Value = serde_json::from_slice(&read(&s.base.join("pop").join("ranks.json"))).unwrap();
    let ds = curec::data::prepared::read_dataset(&s.data).unwrap();
    assert_eq!(ranks["test"].as_array().unwrap().len(), ds.n_users);

    // A run against itself differs by exactly 0; against Pop the groups cover every user once.
    let cmp = |a: &str, b: &str| {
        let o = curec_cli(&["compare", &dir(a), &dir(b), "--json", "--resamples", "200"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    let same = cmp("pop", "pop");
    assert_eq!(same["all"]["diff"]["mean"], 0.0);
    assert_eq!(same["all"]["verdict"], "no difference shown");
    let c = cmp("text-only", "pop");
    let users: u64 = ["tail", "mid", "head"].iter().map(|g| c[g]["diff"]["users"].as_u64().unwrap()).sum();
    assert_eq!(users, ds.n_users as u64);
    let (a, b) = (c["all"]["a"]["mean"].as_f64().unwrap(), c["all"]["b"]["mean"].as_f64().unwrap());
    assert!((a - m["ndcg@10"].as_f64().unwrap()).abs() < 1e-9, "{a} vs {m}");
    assert!((c["all"]["diff"]["mean"].as_f64().unwrap() - (a - b)).abs() < 1e-9);
    let tail_max = c["tail"]["target_train_count"][1].as_u64().unwrap();
    assert!(tail_max <= c["head"]["target_train_count"][0].as_u64().unwrap());
    check_report(&s.base);

    let o = curec_cli(&["compare", &dir("pop"), &dir("oracle")]);
    assert!(!o.status.success() && stderr(&o).contains("ranks.json"), "{}", stderr(&o));
    let o = curec_cli(&["compare", &dir("pop"), &dir("pop"), "--metric", "mrr"]);
    assert!(!o.status.success() && stderr(&o).contains("ndcg@K"), "{}", stderr(&o));
}

/// `curec report` over a directory of runs: one self-contained page whose numbers equal the runs'
/// metrics files, with curves and explanation cards; rendered by headless Chromium when it is
/// installed (`.ci/run` installs it).
fn check_report(base: &Path) {
    let page = base.join("page.html");
    let o = curec_cli(&["report", base.to_str().unwrap(), "--out", page.to_str().unwrap(), "--explain-users", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(!html.contains("<script") && !html.contains("http://") && !html.contains("https://"), "not self-contained");
    let mut rows = 0;
    for part in html.split("<tr data-run=\"").skip(1) {
        let run = &part[..part.find('"').unwrap()];
        let at = part.find("data-ndcg10=\"").unwrap() + "data-ndcg10=\"".len();
        let shown: f64 = part[at..at + part[at..].find('"').unwrap()].parse().unwrap();
        let m: Value = serde_json::from_slice(&read(&base.join(run).join("metrics.json"))).unwrap();
        assert_eq!(shown, m["ndcg@10"].as_f64().unwrap(), "{run}");
        rows += 1;
    }
    assert!(rows >= 4, "{rows} result rows");
    for section in ["<h2>What this run is", "<h2>Results", "<h2>Training", "<h2>Explanations: text-only", "<svg"] {
        assert!(html.contains(section), "no {section}");
    }
    // The page opens with what the run is, and the first explanations come right after the
    // results, before the curves.
    let at = |s: &str| html.find(s).unwrap();
    assert!(at("<h2>What this run is") < at("<h2>Results") && at("<h2>Explanations") < at("<h2>Training"));
    assert!(html.contains("Data: ") && html.contains("Features ("), "what the run is, from its files");
    let chromium =
        ["chromium", "chromium-browser"].into_iter().find(|c| Command::new(c).arg("--version").output().is_ok());
    let Some(chromium) = chromium else {
        eprintln!("SKIPPED: rendering the report needs Chromium (apt-get install chromium); .ci/run installs it");
        assert!(std::env::var_os("CI").is_none(), "CI must install Chromium for the report test");
        return;
    };
    let png = base.join("page.png");
    let o = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600"])
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(png.is_file(), "no screenshot: {}", stderr(&o));
    let img = read(&png);
    assert!(img.starts_with(b"\x89PNG") && img.len() > 20_000, "blank screenshot? {} bytes", img.len());
}

#[test]
fn a_killed_features_run_keeps_its_finished_batches_and_resumes_to_the_same_bytes() {
    // Batches of one job: each batch's rows must be on disk before the next batch starts, so a
    // `kill -9` in the middle loses at most the batch in flight (before, every row reached the log
    // only when the last batch was done, and a killed run started over).
    let s = setup();
    let (data, model) = (s.data.to_str().unwrap(), s.model.to_str().unwrap());
    let dir = |n: &str| s.base.join(n).to_str().unwrap().to_string();
    let sets = [
        "--set",
        "features.users=60",
        "--set",
        "features.reasons_per_user=8",
        "--set",
        "features.batch=1",
        "--set",
        "features.max_new_tokens_reason=24",
        "--set",
        "features.max_new_tokens_pattern=24",
    ];
    let whole =
        curec_cli(&[&["features", "--data", data, "--model", model, "--out", &dir("whole")][..], &sets].concat());
    assert!(whole.status.success(), "{}", stderr(&whole));
    let mut child = Command::new(env!("CARGO_BIN_EXE_curec"))
        .args([&["features", "--data", data, "--model", model, "--out", &dir("killed")][..], &sets].concat())
        .env("CUREC_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = s.base.join("killed").join("patterns.jsonl");
    let t0 = std::time::Instant::now();
    let seen_running = loop {
        let lines = std::fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0);
        if lines >= 3 {
            break child.try_wait().unwrap().is_none();
        }
        if child.try_wait().unwrap().is_some() || t0.elapsed().as_secs() > 120 {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    child.kill().ok();
    child.wait().unwrap();
    assert!(seen_running, "no rows reached the log while the run was going");
    // Killed early: most of the 60 patterns and 480 reasons were still to do (before, the first
    // row reached the log only after every batch had been generated).
    let count =
        |f: &str| std::fs::read_to_string(s.base.join("killed").join(f)).map(|t| t.lines().count()).unwrap_or(0);
    let done = count("patterns.jsonl") + count("reasons.jsonl");
    assert!(done < 270, "{done} of 540 rows were already logged when the run was killed");
    let resumed =
        curec_cli(&[&["features", "--data", data, "--model", model, "--out", &dir("killed")][..], &sets].concat());
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    for f in ["patterns.parquet", "reasons.parquet"] {
        assert_eq!(read(&s.base.join("whole").join(f)), read(&s.base.join("killed").join(f)), "{f}");
    }
}
