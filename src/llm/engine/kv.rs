//! One sequence's KV cache: per layer, keys and values of every position so far, row-major
//! (position × kv_heads·head_dim), f32, with room reserved up front for the prompt and the
//! longest completion so that decoding does not reallocate.

/// Keys and values of one sequence.
#[derive(Debug, Clone)]
pub struct SeqCache {
    kv_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl SeqCache {
    pub fn new(layers: usize, kv_dim: usize, capacity: usize) -> Self {
        Self {
            kv_dim,
            keys: (0..layers).map(|_| Vec::with_capacity(capacity * kv_dim)).collect(),
            values: (0..layers).map(|_| Vec::with_capacity(capacity * kv_dim)).collect(),
            len: 0,
        }
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
        self.keys[layer].len() / self.kv_dim
    }

    pub(crate) fn push(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
    }

    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    pub(crate) fn commit(&mut self, new: usize) {
        self.len += new;
    }

    /// A copy of the first `n` positions, with room for `capacity` (a prefix-cache hit).
    pub fn prefix(&self, n: usize, capacity: usize) -> Self {
        let n = n.min(self.len);
        let take = |src: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            src.iter()
                .map(|l| {
                    let mut v = Vec::with_capacity(capacity.max(n) * self.kv_dim);
                    v.extend_from_slice(&l[..n * self.kv_dim]);
                    v
                })
                .collect()
        };
        Self { kv_dim: self.kv_dim, keys: take(&self.keys), values: take(&self.values), len: n }
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        2 * 4 * self.keys.len() * self.len * self.kv_dim
    }
}
