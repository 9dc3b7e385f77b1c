use candle_core::{Device, Tensor};

use super::model::per_user_dot;
use super::*;
use crate::data::{Dataset, Split};
use crate::rec::sasrec::SasRecConfig;
use crate::rec::Model;
use crate::rng::rng_for;

use crate::data::preprocess::ItemRow;

const N: usize = 12;
const E: usize = 8;

fn toy() -> Dataset {
    let items = (0..N).map(|i| ItemRow { raw_id: i.to_string(), info: Default::default() }).collect();
    let lens = [6usize, 9, 4, 7];
    let mut ds = Dataset::from_interactions("toy", lens.iter().map(|l| l.to_string()).collect(), items, &[]);
    for (u, &l) in lens.iter().enumerate() {
        ds.train[u] = (0..l).map(|j| ((u * 5 + j * 3) % N) as u32).collect();
        ds.valid[u] = ((u + 1) % N) as u32;
        ds.test[u] = ((u + 2) % N) as u32;
    }
    ds
}

fn vec_for(seed: u64, n: usize) -> Vec<f32> {
    let mut r = rng_for(seed, 99, 0);
    (0..n).map(|_| crate::rng::standard_normal(&mut r)).collect()
}

/// Item i has `counts[i]` reasons; reason j of item i is written by user (i + j) % 4.
fn bank(counts: &[usize]) -> FeatureBank {
    let mut reasons = Vec::new();
    let mut lists = Vec::new();
    let mut texts = Vec::new();
    for (i, &c) in counts.iter().enumerate() {
        let mut l = Vec::new();
        for j in 0..c {
            l.push(((reasons.len() / E) as u32, ((i + j) % 4) as u32));
            reasons.extend(vec_for((i * 100 + j) as u64, E));
            texts.push(format!("reason {j} of item {i}"));
        }
        lists.push(l);
    }
    FeatureBank { dim: E, patterns: vec_for(7, 4 * E), has_pattern: vec![true; 4], reasons, texts, lists }
}

fn model(b: FeatureBank, variant: Variant) -> Curec {
    let cfg = CurecConfig { variant, hidden: 8, din_history: 3, ..Default::default() };
    let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
    Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).unwrap()
}

fn scores(m: &Curec, ds: &Dataset, users: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let hist: Vec<Vec<u32>> = users.iter().map(|&u| ds.history(u, Split::Test)).collect();
    let (s, w) = m.score_with_weights(users, &hist).unwrap();
    (s.flatten_all().unwrap().to_vec1().unwrap(), w.flatten_all().unwrap().to_vec1().unwrap())
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() < 1e-5, "entry {i}: {x} vs {y}");
    }
}

#[test]
fn one_reason_gets_weight_one_and_padding_changes_nothing() {
    let ds = toy();
    let mut counts = vec![1usize; N];
    counts[3] = 0;
    let m1 = model(bank(&counts), Variant::Attention);
    // User 2 wrote no reason of item 1 (authors of item 1's only reason: user 1).
    let (s1, w1) = scores(&m1, &ds, &[2]);
    assert!((w1[1] - 1.0).abs() < 1e-6, "weight of a lone reason: {}", w1[1]);
    // Item 5 gains reasons: the list length (padding of every other item) grows to 4.
    counts[5] = 4;
    let m2 = model(bank(&counts), Variant::Attention);
    let (s2, _) = scores(&m2, &ds, &[2]);
    for i in (0..N).filter(|&i| i != 5) {
        assert!((s1[i] - s2[i]).abs() < 1e-5, "item {i}: {} vs {}", s1[i], s2[i]);
    }
}

#[test]
fn scores_do_not_depend_on_reason_order() {
    let ds = toy();
    let counts = vec![3usize; N];
    for variant in [Variant::Attention, Variant::Ap, Variant::Mlp, Variant::Sa] {
        let b = bank(&counts);
        let mut r = b.clone();
        for l in &mut r.lists {
            l.reverse();
        }
        let (a, _) = scores(&model(b, variant), &ds, &[0, 1, 2, 3]);
        let (c, _) = scores(&model(r, variant), &ds, &[0, 1, 2, 3]);
        close(&a, &c);
    }
}

#[test]
fn scoring_explicit_lists_equals_full_ranking() {
    // The correction's reward (Eq. 12) scores an item under candidate lists; with the bank's
    // own lists (and no own-reason masking) it must agree with the full ranking.
    let ds = toy();
    let counts = [2usize, 0, 3, 1, 4, 2, 0, 1, 1, 2, 3, 1];
    let cases = [Variant::Attention, Variant::Ap, Variant::Mlp, Variant::Sa].map(|v| (v, false));
    for (variant, bilinear) in cases.into_iter().chain([(Variant::Attention, true), (Variant::Ap, true)]) {
        let b = bank(&counts);
        let cfg =
            CurecConfig { variant, hidden: 8, din_history: 3, mask_own_reasons: false, bilinear, ..Default::default() };
        let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
        let m = Curec::new(&cfg, &tcfg, N, b.clone(), 5, &Device::Cpu).unwrap();
        for u in 0..4u32 {
            let hist = ds.history(u, Split::Test);
            let (all, _) = m.score_all(&[u], std::slice::from_ref(&hist), false).unwrap();
            let all: Vec<f32> = all.flatten_all().unwrap().to_vec1().unwrap();
            let pattern = &b.patterns[u as usize * E..(u as usize + 1) * E];
            for i in 0..N as u32 {
                let list: Vec<Vec<f32>> = b.lists[i as usize]
                    .iter()
                    .map(|&(r, _)| b.reasons[r as usize * E..(r as usize + 1) * E].to_vec())
                    .collect();
                // Twice, to check that candidates in one call do not interact.
                let got = m.score_lists(&hist, pattern, i, &[list.clone(), list]).unwrap();
                for g in got {
                    assert!(
                        (g - all[i as usize]).abs() < 1e-4,
                        "{variant:?} (bilinear {bilinear}) user {u} item {i}: {g} vs {}",
                        all[i as usize]
                    );
                }
            }
        }
    }
}

#[test]
fn batched_full_ranking_equals_one_user_at_a_time() {
    let ds = toy();
    for bilinear in [false, true] {
        let b = bank(&[2, 0, 3, 1, 4, 2, 0, 1, 1, 2, 3, 1]);
        let cfg = CurecConfig { hidden: 8, din_history: 3, bilinear, ..Default::default() };
        let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
        let m = Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).unwrap();
        let (all, wall) = scores(&m, &ds, &[0, 1, 2, 3]);
        let per = N * m.bank().max_list();
        for u in 0..4u32 {
            let (one, w) = scores(&m, &ds, &[u]);
            close(&one, &all[u as usize * N..(u as usize + 1) * N]);
            close(&w, &wall[u as usize * per..(u as usize + 1) * per]);
        }
    }
}

#[test]
fn per_user_dot_is_the_plain_dot_per_position() {
    let (u, n, d) = (3usize, 5usize, 4usize);
    let s = Tensor::from_vec(vec_for(1, u * n * d), (u, n, d), &Device::Cpu).unwrap();
    // Positions of users 2, 0, 2, 2 (user 1 has none), in no particular order.
    let slot = [2u32, 0, 2, 2];
    let g = Tensor::from_vec(vec_for(2, slot.len() * d), (slot.len(), d), &Device::Cpu).unwrap();
    let got: Vec<Vec<f32>> = per_user_dot(&s, &g, &slot).unwrap().to_vec2().unwrap();
    let (sv, gv): (Vec<f32>, Vec<f32>) =
        (s.flatten_all().unwrap().to_vec1().unwrap(), g.flatten_all().unwrap().to_vec1().unwrap());
    for (p, &sl) in slot.iter().enumerate() {
        for i in 0..n {
            let want: f32 = (0..d).map(|k| sv[(sl as usize * n + i) * d + k] * gv[p * d + k]).sum();
            assert!((got[p][i] - want).abs() < 1e-5, "position {p} item {i}: {} vs {want}", got[p][i]);
        }
    }
}

#[test]
fn the_bilinear_term_leaves_the_other_weights_as_they_were() {
    // Its weights are created last: the rest of the model starts exactly as without it.
    let b = bank(&[2, 0, 3, 1, 4, 2, 0, 1, 1, 2, 3, 1]);
    let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
    let plain =
        Curec::new(&CurecConfig { hidden: 8, ..Default::default() }, &tcfg, N, b.clone(), 5, &Device::Cpu).unwrap();
    let cfg = CurecConfig { hidden: 8, bilinear: true, ..Default::default() };
    let bil = Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).unwrap();
    let a = super::super::nn::named_values(&plain.params.varmap);
    let c = super::super::nn::named_values(&bil.params.varmap);
    assert_eq!(c.len(), a.len() + 2);
    for (name, v) in &a {
        assert_eq!(Some(v), c.iter().find(|(n, _)| n == name).map(|(_, v)| v), "{name}");
    }
}

#[test]
fn own_reasons_are_masked_for_their_author_only() {
    let ds = toy();
    // Item 4's two reasons are written by users 0 and 1 (authors (4 + j) % 4).
    let mut counts = vec![1usize; N];
    counts[4] = 2;
    let m = model(bank(&counts), Variant::Attention);
    let (_, w0) = scores(&m, &ds, &[0]);
    let l = m.bank().max_list();
    assert_eq!(w0[4 * l], 0.0, "user 0 must not see its own reason");
    assert!((w0[4 * l + 1] - 1.0).abs() < 1e-6);
    let (_, w2) = scores(&m, &ds, &[2]);
    assert!(w2[4 * l] > 0.0 && w2[4 * l + 1] > 0.0);
}

#[test]
fn sampled_softmax_covering_every_item_is_the_full_softmax() {
    let ds = toy();
    let b = bank(&[2, 0, 2, 1, 0, 3, 2, 2, 1, 0, 2, 2]);
    let mut full = model(b.clone(), Variant::Attention);
    let cfg = CurecConfig { hidden: 8, din_history: 3, sampled_negatives: 5000, ..Default::default() };
    let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
    let mut sampled = Curec::new(&cfg, &tcfg, N, b.clone(), 5, &Device::Cpu).unwrap();
    let a = full.train_epoch(&ds, 0).unwrap().unwrap();
    let c = sampled.train_epoch(&ds, 0).unwrap().unwrap();
    assert!((a - c).abs() < 1e-5, "{a} vs {c}");
    // With few negatives it still learns.
    let cfg = CurecConfig { sampled_negatives: 3, ..cfg };
    let mut few = Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).unwrap();
    let before = scores(&few, &ds, &[0, 1, 2, 3]).0;
    let first = few.train_epoch(&ds, 0).unwrap().unwrap();
    let mut last = first;
    for e in 1..15 {
        last = few.train_epoch(&ds, e).unwrap().unwrap();
    }
    assert!(last < first, "sampled loss {first} → {last}");
    assert_ne!(before, scores(&few, &ds, &[0, 1, 2, 3]).0);
}

#[test]
fn text_only_items_are_their_text_and_nothing_else() {
    let ds = toy();
    let mut b = bank(&[2, 0, 3, 1, 4, 2, 0, 1, 1, 2, 3, 1]);
    // Item 7 gets item 2's reasons (the same rows, the same authors): the same text.
    b.lists[7] = b.lists[2].clone();
    let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
    for (ids, equal) in [(false, true), (true, false)] {
        let cfg = CurecConfig { hidden: 8, din_history: 3, ids, ..Default::default() };
        let m = Curec::new(&cfg, &tcfg, N, b.clone(), 5, &Device::Cpu).unwrap();
        let names = super::super::nn::named_values(&m.params.varmap);
        assert_eq!(names.iter().any(|(n, _)| n == "item_emb"), ids, "ids = {ids}");
        let (s, _) = scores(&m, &ds, &[0, 1, 2, 3]);
        for u in 0..4 {
            let (a, c) = (s[u * N + 2], s[u * N + 7]);
            assert_eq!((a - c).abs() < 1e-6, equal, "ids = {ids}, user {u}: {a} vs {c}");
        }
    }
    let cfg = CurecConfig { ids: false, init_tower: Some("x.safetensors".into()), ..Default::default() };
    let err = Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).err().expect("text-only with a SASRec tower");
    assert!(err.to_string().contains("curec.init_tower"), "{err}");
}

#[test]
fn training_lowers_the_loss_and_every_weight_learns() {
    let ds = toy();
    for (variant, ids, bilinear) in [
        (Variant::Attention, true, false),
        (Variant::Text, true, false),
        (Variant::Sa, true, false),
        (Variant::Attention, false, false),
        (Variant::Attention, true, true),
        (Variant::Mlp, true, true),
    ] {
        let cfg = CurecConfig { variant, hidden: 8, din_history: 3, ids, bilinear, ..Default::default() };
        let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
        let mut m = Curec::new(&cfg, &tcfg, N, bank(&[2, 0, 2, 1, 0, 3, 2, 2, 1, 0, 2, 2]), 5, &Device::Cpu).unwrap();
        let before = super::super::nn::named_values(&m.params.varmap);
        let first = m.train_epoch(&ds, 0).unwrap().unwrap();
        let mut last = first;
        for e in 1..15 {
            last = m.train_epoch(&ds, e).unwrap().unwrap();
        }
        assert!(last < first, "{variant:?}: loss {first} → {last}");
        for ((name, b), (_, a)) in before.iter().zip(super::super::nn::named_values(&m.params.varmap)) {
            // The positional rows past the longest toy sequence never receive a gradient.
            if name == "pos_emb" {
                continue;
            }
            assert!(&a != b, "{variant:?}: {name} did not change");
        }
    }
}
