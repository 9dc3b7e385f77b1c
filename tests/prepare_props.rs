//! Property test of `curec prepare` on hostile input: random CSV lines (numbers, garbage,
//! infinities, huge and negative timestamps, missing and extra fields, quotes, blank lines) give
//! either one error line naming the log file (and the line, for a bad row) or a prepared dataset
//! that reads back with train, valid and test rows for every user. Never a panic.

use proptest::prelude::*;

fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u32..6).prop_map(|n| n.to_string()),
        (-3i64..1_000_000).prop_map(|n| n.to_string()),
        Just("inf".to_string()),
        Just("NaN".to_string()),
        Just("-0".to_string()),
        Just("9223372036854775807".to_string()),
        Just("1e400".to_string()),
        Just(String::new()),
        Just("\"q,x\"".to_string()),
        "[a-z]{1,3}",
        (0.0f64..6.0).prop_map(|x| format!("{x:.1}")),
    ]
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0u32..5, 0u32..6, 0i64..50, 0u32..6).prop_map(|(u, i, t, r)| format!("u{u},m{i},{t},{r}")),
        2 => prop::collection::vec(field(), 2..6).prop_map(|f| f.join(",")),
        1 => Just(String::new()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prepare_errors_by_line_or_gives_a_valid_dataset(lines in prop::collection::vec(line(), 0..40)) {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("log.csv");
        std::fs::write(&log, format!("user,item,timestamp,rating\n{}\n", lines.join("\n"))).unwrap();
        let out = tmp.path().join("out");
        let cfg = curec::config::JobConfig::load(
            None,
            &["preprocess.user_core=3".into(), "preprocess.item_core=1".into()],
        )
        .unwrap();
        match curec::pipeline::stages::prepare(&log, &out, "generic", &cfg) {
            Ok(stats) => {
                let ds = curec::data::prepared::read_dataset(&out).unwrap();
                prop_assert_eq!(stats["users"].as_u64(), Some(ds.n_users as u64));
                prop_assert!(ds.n_users > 0);
                for u in 0..ds.n_users {
                    prop_assert!(!ds.train[u].is_empty());
                    prop_assert!((ds.valid[u] as usize) < ds.n_items && (ds.test[u] as usize) < ds.n_items);
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                prop_assert!(!msg.contains('\n'), "one line: {}", msg);
                let names_file = msg.contains("log.csv");
                let filtered = msg.starts_with("no interactions left after keeping ratings");
                prop_assert!(names_file || filtered, "names the file: {}", msg);
                prop_assert!(!out.join("interactions.parquet").exists(), "nothing written: {}", msg);
            }
        }
    }
}
