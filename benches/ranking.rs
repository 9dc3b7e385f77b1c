//! Full-ranking inference: microseconds per user at batch 128 for SASRec (sequence length 200,
//! catalogues the size of ml-latest-small and ML-1M), the CUREC reward model (the same tower plus
//! pattern→reason attention over 20 reasons per item with MiniLM-sized 384-d embeddings, and the
//! DIN head) and Pop, in the same run; and SASRec's full pass over every position of the last
//! block (`sasrec_full_pass`), the baseline for scoring from the last position only.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use curec::data::preprocess::ItemRow;
use curec::data::{Dataset, Split};
use curec::eval::Scorer;
use curec::rec::curec::{Curec, CurecConfig, FeatureBank};
use curec::rec::pop::Pop;
use curec::rec::sasrec::{SasRec, SasRecConfig};
use curec::rec::Model;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn synthetic(n_users: usize, n_items: usize, len: usize) -> Dataset {
    let items = (0..n_items).map(|i| ItemRow { raw_id: i.to_string(), info: Default::default() }).collect();
    let mut ds = Dataset::from_interactions("synthetic", (0..n_users).map(|u| u.to_string()).collect(), items, &[]);
    for u in 0..n_users {
        ds.train[u] = (0..len).map(|j| ((u * 31 + j * 17) % n_items) as u32).collect();
        ds.valid[u] = (u % n_items) as u32;
        ds.test[u] = ((u + 1) % n_items) as u32;
    }
    ds
}

/// Random 384-d pattern per user and 20 reasons per item, written by other users.
fn bank(n_users: usize, n_items: usize) -> FeatureBank {
    let dim = 384;
    let per_item = 20;
    let mut x = 12345u64;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let patterns = (0..n_users * dim).map(|_| next()).collect();
    let reasons = (0..n_items * per_item * dim).map(|_| next()).collect();
    let lists = (0..n_items).map(|i| (0..per_item).map(|j| ((i * per_item + j) as u32, u32::MAX)).collect()).collect();
    FeatureBank {
        dim,
        patterns,
        has_pattern: vec![true; n_users],
        reasons,
        texts: vec![String::new(); n_items * per_item],
        lists,
    }
}

fn full_ranking(c: &mut Criterion) {
    curec::alloc::tune();
    let batch = 128usize;
    let users: Vec<u32> = (0..batch as u32).collect();
    let mut g = c.benchmark_group("full_ranking_batch128");
    g.throughput(Throughput::Elements(batch as u64));
    g.sample_size(20);
    for n_items in [1372usize, 3706] {
        let ds = synthetic(batch, n_items, 250);
        let sasrec = SasRec::new(&SasRecConfig::default(), n_items, 1, &Device::Cpu).unwrap();
        g.bench_with_input(BenchmarkId::new("sasrec", n_items), &ds, |b, ds| {
            b.iter(|| sasrec.score(ds, &users, Split::Test).unwrap())
        });
        // Baseline: every position through every block, then the last one taken (what scoring
        // did before the last block was restricted to the positions it needs).
        g.bench_with_input(BenchmarkId::new("sasrec_full_pass", n_items), &ds, |b, ds| {
            b.iter(|| {
                let tower = sasrec.tower();
                let hist: Vec<Vec<u32>> = users.iter().map(|&u| ds.history(u, Split::Test)).collect();
                let refs: Vec<&[u32]> = hist.iter().map(|h| &h[h.len().saturating_sub(tower.cfg.max_len)..]).collect();
                let x = tower.encode(&refs, None).unwrap();
                let t = x.dim(1).unwrap();
                let rows: Vec<u32> =
                    refs.iter().enumerate().map(|(r, s)| (r * t + s.len().clamp(1, t) - 1) as u32).collect();
                let last = x
                    .reshape((refs.len() * t, tower.cfg.dim))
                    .unwrap()
                    .index_select(&candle_core::Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(), 0)
                    .unwrap();
                last.matmul(&tower.item_table().unwrap().t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
        });
        let curec = Curec::new(
            &CurecConfig::default(),
            &SasRecConfig::default(),
            n_items,
            bank(batch, n_items),
            1,
            &Device::Cpu,
        )
        .unwrap();
        // The first call computes the reasons' keys and values, which scoring then reuses.
        curec.score(&ds, &users, Split::Test).unwrap();
        g.bench_with_input(BenchmarkId::new("curec", n_items), &ds, |b, ds| {
            b.iter(|| curec.score(ds, &users, Split::Test).unwrap())
        });
        let mut pop = Pop::new(n_items);
        pop.train_epoch(&ds, 0).unwrap();
        g.bench_with_input(BenchmarkId::new("pop", n_items), &ds, |b, ds| {
            b.iter(|| pop.score(ds, &users, Split::Test).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, full_ranking);
criterion_main!(benches);
