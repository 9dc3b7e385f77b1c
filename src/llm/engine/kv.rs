//! One sequence's KV cache: per layer, keys and values of every position so far, f32, with room
//! reserved up front for the prompt and the longest completion so that decoding does not
//! reallocate. Values are row-major (position × kv_heads·head_dim). Keys are stored in blocks of
//! [`KEY_BLOCK`] positions, transposed within a block ([kv_head][dim][position]), so that the
//! attention scores of 8 keys are 8-wide FMAs over the head dimension with no horizontal sums.

/// Positions per transposed key block.
pub const KEY_BLOCK: usize = 8;

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
            keys: (0..layers).map(|_| Vec::with_capacity(capacity.div_ceil(KEY_BLOCK) * KEY_BLOCK * kv_dim)).collect(),
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
        self.values[layer].len() / self.kv_dim
    }

    pub(crate) fn push(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let p = self.len_layer(layer);
        let keys = &mut self.keys[layer];
        if p % KEY_BLOCK == 0 {
            keys.resize(keys.len() + KEY_BLOCK * self.kv_dim, 0.0);
        }
        let base = (p / KEY_BLOCK) * KEY_BLOCK * self.kv_dim + p % KEY_BLOCK;
        for (c, &x) in k.iter().enumerate() {
            keys[base + c * KEY_BLOCK] = x;
        }
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
        // Keys: whole blocks (slots past n are overwritten before they are read).
        let kn = n.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        let take = |src: &Vec<Vec<f32>>, rows: usize| -> Vec<Vec<f32>> {
            src.iter()
                .map(|l| {
                    let mut v = Vec::with_capacity(capacity.max(rows).div_ceil(KEY_BLOCK) * KEY_BLOCK * self.kv_dim);
                    v.extend_from_slice(&l[..rows * self.kv_dim]);
                    v
                })
                .collect()
        };
        Self { kv_dim: self.kv_dim, keys: take(&self.keys, kn), values: take(&self.values, n), len: n }
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        2 * 4 * self.keys.len() * self.len * self.kv_dim
    }
}
