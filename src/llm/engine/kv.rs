//! One sequence's KV cache: per layer, keys and values of every position so far, in IEEE half
//! precision ([`Kv`], as llama.cpp's default cache): decoding reads every cached position of every
//! layer per token, so the cache's bytes, not the arithmetic, bound long-context decoding, and
//! half precision halves them (attention converts a head's keys and values to f32 once per task
//! and computes in f32). Values are row-major (position × kv_heads·head_dim). Keys are stored in
//! blocks of [`KEY_BLOCK`] positions, transposed within a block ([kv_head][dim][position]), so
//! that the attention scores of a block are one 16-wide FMA per head dimension with no
//! horizontal sums.
//!
//! A cache is a chain: read-only [`Segment`]s shared with the prefix cache and with other
//! sequences (a prompt prefix computed once: the instructions, a user's history), then the
//! positions this sequence computed itself, with room reserved up front for the prompt and the
//! longest completion so that decoding does not reallocate. Taking a cached prefix clones
//! pointers instead of copying megabytes of keys and values, and every sequence of a batch that
//! shares a prefix reads the same memory. Shared positions always end on a key-block boundary,
//! so a block never straddles two segments.

use std::sync::Arc;

use half::slice::HalfFloatSliceExt;

/// One cached key or value component.
pub type Kv = half::f16;

/// Positions per transposed key block.
pub const KEY_BLOCK: usize = 16;

/// One layer of a cache as [`SeqCache::layer`] gives it: key blocks and value rows.
pub(crate) type LayerView<'a> = (Vec<&'a [Kv]>, Vec<&'a [Kv]>);

/// Keys and values of a run of positions, per layer.
#[derive(Debug, Clone)]
pub struct Segment {
    keys: Vec<Vec<Kv>>,
    values: Vec<Vec<Kv>>,
}

impl Segment {
    fn new(layers: usize, kv_dim: usize, capacity: usize) -> Self {
        Self {
            keys: (0..layers).map(|_| Vec::with_capacity(capacity.div_ceil(KEY_BLOCK) * KEY_BLOCK * kv_dim)).collect(),
            values: (0..layers).map(|_| Vec::with_capacity(capacity * kv_dim)).collect(),
        }
    }

    fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| std::mem::size_of::<Kv>() * v.len()).sum()
    }
}

/// Keys and values of one sequence.
#[derive(Debug, Clone)]
pub struct SeqCache {
    kv_dim: usize,
    /// Shared segments and how many of their positions this sequence uses (each a multiple of
    /// [`KEY_BLOCK`], except in the last segment of a prefix-cache entry).
    shared: Vec<(Arc<Segment>, usize)>,
    /// Positions held in `shared`.
    base: usize,
    /// Positions from `base` on.
    own: Segment,
    len: usize,
}

impl SeqCache {
    pub fn new(layers: usize, kv_dim: usize, capacity: usize) -> Self {
        Self { kv_dim, shared: Vec::new(), base: 0, own: Segment::new(layers, kv_dim, capacity), len: 0 }
    }

    /// Positions held (after the last completed forward call).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions held in one layer (during a forward call, including the rows pushed so far).
    pub(crate) fn len_layer(&self, layer: usize) -> usize {
        self.base + self.own.values[layer].len() / self.kv_dim
    }

    pub(crate) fn push(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        // `base` is a multiple of KEY_BLOCK, so own positions keep the global block alignment.
        let p = self.own.values[layer].len() / self.kv_dim;
        let keys = &mut self.own.keys[layer];
        if p.is_multiple_of(KEY_BLOCK) {
            keys.resize(keys.len() + KEY_BLOCK * self.kv_dim, Kv::ZERO);
        }
        let base = (p / KEY_BLOCK) * KEY_BLOCK * self.kv_dim + p % KEY_BLOCK;
        for (c, &x) in k.iter().enumerate() {
            keys[base + c * KEY_BLOCK] = Kv::from_f32(x);
        }
        let values = &mut self.own.values[layer];
        let at = values.len();
        values.resize(at + v.len(), Kv::ZERO);
        values[at..].convert_from_f32_slice(v);
    }

    /// One layer's key blocks (each `KEY_BLOCK · kv_dim` values) and value rows (each `kv_dim`
    /// values), in position order, covering every position held in that layer.
    pub(crate) fn layer(&self, layer: usize) -> LayerView<'_> {
        let (d, bd) = (self.kv_dim, KEY_BLOCK * self.kv_dim);
        let total = self.len_layer(layer);
        let mut blocks = Vec::with_capacity(total.div_ceil(KEY_BLOCK));
        let mut rows = Vec::with_capacity(total);
        let parts = self.shared.iter().map(|(s, n)| (&**s, *n)).chain(std::iter::once((&self.own, total - self.base)));
        for (seg, n) in parts {
            blocks.extend(seg.keys[layer][..n.div_ceil(KEY_BLOCK) * bd].chunks_exact(bd));
            rows.extend(seg.values[layer][..n * d].chunks_exact(d));
        }
        (blocks, rows)
    }

    pub(crate) fn commit(&mut self, new: usize) {
        self.len += new;
    }

    /// A cache holding the first `n` positions, with room for `capacity` in all: the shared
    /// segments that cover them up to the last key-block boundary, and a copy of the rest
    /// (fewer than [`KEY_BLOCK`] positions, or the positions this cache computed itself).
    pub fn prefix(&self, n: usize, capacity: usize) -> Self {
        let n = n.min(self.len);
        let m = n / KEY_BLOCK * KEY_BLOCK;
        let layers = self.own.keys.len();
        let mut shared = Vec::new();
        let mut start = 0;
        let mut rest: Option<(&Segment, usize)> = None; // (segment, its first position to copy)
        for (seg, used) in &self.shared {
            if start >= n {
                break;
            }
            let take = (*used).min(m.saturating_sub(start));
            if take > 0 {
                shared.push((seg.clone(), take));
            }
            if start + take < n && start + take < start + used {
                rest = Some((seg, take));
                break;
            }
            start += used;
        }
        let base = shared.iter().map(|(_, u)| u).sum::<usize>();
        debug_assert_eq!(base % KEY_BLOCK, 0);
        let mut out = Self {
            kv_dim: self.kv_dim,
            shared,
            base,
            own: Segment::new(layers, self.kv_dim, capacity.max(n).saturating_sub(base)),
            len: base,
        };
        // Copy positions base..n: the tail of one shared segment, or the own positions.
        let (seg, from) = match rest {
            Some(r) => r,
            None => (&self.own, base.saturating_sub(self.base)),
        };
        let count = n - base;
        for layer in 0..layers {
            for p in from..from + count {
                let k = self.key_at(seg, layer, p);
                let d = self.kv_dim;
                let v = seg.values[layer][p * d..(p + 1) * d].to_f32_vec();
                out.push(layer, &k, &v);
            }
        }
        out.commit(count);
        out
    }

    fn key_at(&self, seg: &Segment, layer: usize, p: usize) -> Vec<f32> {
        let at = (p / KEY_BLOCK) * KEY_BLOCK * self.kv_dim + p % KEY_BLOCK;
        (0..self.kv_dim).map(|c| seg.keys[layer][at + c * KEY_BLOCK].to_f32()).collect()
    }

    /// The first `n` positions as a chain of shared segments only (what the prefix cache
    /// keeps): this cache's shared segments, and its own positions up to `n` copied into a new
    /// segment that later caches share.
    pub fn share(&self, n: usize) -> Self {
        let n = n.min(self.len);
        if n <= self.base {
            return self.prefix(n, 0);
        }
        let (d, bd) = (self.kv_dim, KEY_BLOCK * self.kv_dim);
        let count = n - self.base;
        let seg = Segment {
            keys: self.own.keys.iter().map(|k| k[..count.div_ceil(KEY_BLOCK) * bd].to_vec()).collect(),
            values: self.own.values.iter().map(|v| v[..count * d].to_vec()).collect(),
        };
        let mut shared = self.shared.clone();
        shared.push((Arc::new(seg), count));
        let layers = self.own.keys.len();
        Self { kv_dim: d, shared, base: n, own: Segment::new(layers, d, 0), len: n }
    }

    /// The shared segments this cache points to, for counting memory once per segment.
    pub(crate) fn segments(&self) -> impl Iterator<Item = (*const Segment, usize)> + '_ {
        self.shared.iter().map(|(s, _)| (Arc::as_ptr(s), s.bytes()))
    }

    /// Bytes of keys and values this cache holds by itself (shared segments excluded).
    pub fn own_bytes(&self) -> usize {
        self.own.bytes()
    }
}
