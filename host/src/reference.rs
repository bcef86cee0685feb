//! Float64 CPU reference of exactly what the kernels compute, for tests and the demo.
//!
//! Layouts are dense row-major host arrays: q/out `[B, Sq, Hq, D]`, k/v `[B, Sk, Hkv, D]`,
//! lse `[B, Hq, Sq]`. Query row `i` sits at position `Sk - Sq + i` (bottom-right alignment);
//! query head `h` reads KV head `h / (Hq / Hkv)`. LSE is the natural log of the softmax
//! denominator of the scaled scores, ALiBi biases included (`cfg.alibi`'s row `b`, or its only
//! row); rows that see no key give output 0 and LSE `-inf`.
use crate::attention::{AttentionConfig, HeadKind};

/// Problem sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Batch entries.
    pub batch: usize,
    /// Query rows per entry.
    pub seqlen_q: usize,
    /// Keys per entry.
    pub seqlen_k: usize,
    /// Query heads.
    pub heads_q: usize,
    /// KV heads.
    pub heads_kv: usize,
    /// Head dim.
    pub head_dim: usize,
}

impl Shape {
    /// Elements of q (and out).
    pub fn q_len(&self) -> usize {
        self.batch * self.seqlen_q * self.heads_q * self.head_dim
    }
    /// Elements of k (and v).
    pub fn kv_len(&self) -> usize {
        self.batch * self.seqlen_k * self.heads_kv * self.head_dim
    }
    /// Elements of lse.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads_q * self.seqlen_q
    }
    /// `[B, Sq, Hq, D]`, of q and out.
    pub fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.seqlen_q, self.heads_q, self.head_dim]
    }
    /// `[B, Sk, Hkv, D]`, of k and v.
    pub fn kv_shape(&self) -> [usize; 4] {
        [self.batch, self.seqlen_k, self.heads_kv, self.head_dim]
    }
    /// `[B, Hq, Sq]`, of lse.
    pub fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.heads_q, self.seqlen_q]
    }
    /// KV head read by query head `h`.
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.heads_q / self.heads_kv)
    }
    /// Position of query row `i`.
    pub fn q_pos(&self, i: usize) -> i64 {
        self.seqlen_k as i64 - self.seqlen_q as i64 + i as i64
    }
}

/// Does the query at position `q_pos` see key `k` under a head of `kind`? Written apart from the
/// kernels' `HeadMask`, which the tests check against it.
pub fn key_visible(kind: HeadKind, cfg: &AttentionConfig, q_pos: i64, k: i64) -> bool {
    let reach = q_pos + cfg.right_window as i64;
    match kind {
        HeadKind::Retrieval => !cfg.causal || k <= reach,
        HeadKind::Streaming => k <= reach && (k < cfg.sink as i64 || q_pos - k < cfg.window as i64),
    }
}

/// How many keys the query at `q_pos` sees (closed form of counting [`key_visible`]); used to
/// count FLOPs as `4 * D` per attended pair.
pub fn visible_keys(kind: HeadKind, cfg: &AttentionConfig, q_pos: i64, seqlen_k: usize) -> u64 {
    let sk = seqlen_k as i64;
    // Keys 0..causal_end are at most `right_window` after the query.
    let causal_end = (q_pos + cfg.right_window as i64 + 1).clamp(0, sk);
    match kind {
        HeadKind::Retrieval if !cfg.causal => seqlen_k as u64,
        HeadKind::Retrieval => causal_end as u64,
        HeadKind::Streaming => {
            let window_start = (q_pos - cfg.window as i64 + 1).clamp(0, causal_end);
            let sink = (cfg.sink as i64).min(window_start);
            (sink + causal_end - window_start) as u64
        }
    }
}

/// Attended (query, key) pairs of a whole problem.
pub fn attended_pairs(shape: &Shape, cfg: &AttentionConfig) -> u64 {
    let per_head = |kind| {
        (0..shape.seqlen_q)
            .map(|i| visible_keys(kind, cfg, shape.q_pos(i), shape.seqlen_k))
            .sum::<u64>()
    };
    let group = (shape.heads_q / shape.heads_kv) as u64;
    cfg.head_kinds
        .iter()
        .map(|&kind| per_head(kind) * group)
        .sum::<u64>()
        * shape.batch as u64
}

/// One output row `(b, h, i)`: the `D` outputs and the LSE.
#[allow(clippy::too_many_arguments)]
pub fn attention_row(
    shape: &Shape,
    cfg: &AttentionConfig,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    h: usize,
    i: usize,
) -> (Vec<f64>, f64) {
    let d = shape.head_dim;
    let kvh = shape.kv_head(h);
    let kind = cfg.head_kinds[kvh];
    let scale = cfg.scale_for(d) as f64;
    let q_row = &q[((b * shape.seqlen_q + i) * shape.heads_q + h) * d..][..d];
    let kv_row = |j: usize| ((b * shape.seqlen_k + j) * shape.heads_kv + kvh) * d;
    let q_pos = shape.q_pos(i);
    // ALiBi: FlashAttention's bias on the scaled score.
    let slope = cfg.alibi.as_ref().map_or(0.0, |a| a.slope(b, h) as f64);

    let scores: Vec<(usize, f64)> = (0..shape.seqlen_k)
        .filter(|&j| key_visible(kind, cfg, q_pos, j as i64))
        .map(|j| {
            let k_row = &k[kv_row(j)..][..d];
            let dot: f64 = q_row
                .iter()
                .zip(k_row)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            (j, dot * scale - slope * (q_pos - j as i64).abs() as f64)
        })
        .collect();
    let mut out = vec![0.0; d];
    if scores.is_empty() {
        return (out, f64::NEG_INFINITY);
    }
    let max = scores
        .iter()
        .map(|&(_, s)| s)
        .fold(f64::NEG_INFINITY, f64::max);
    let mut denom = 0.0;
    for &(j, s) in &scores {
        let p = (s - max).exp();
        denom += p;
        for (o, &x) in out.iter_mut().zip(&v[kv_row(j)..][..d]) {
            *o += p * x as f64;
        }
    }
    out.iter_mut().for_each(|o| *o /= denom);
    (out, max + denom.ln())
}

/// The whole output `[B, Sq, Hq, D]` and LSE `[B, Hq, Sq]`.
pub fn attention(
    shape: &Shape,
    cfg: &AttentionConfig,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let d = shape.head_dim;
    let mut out = vec![0.0; shape.q_len()];
    let mut lse = vec![0.0; shape.lse_len()];
    for b in 0..shape.batch {
        for h in 0..shape.heads_q {
            for i in 0..shape.seqlen_q {
                let (row, l) = attention_row(shape, cfg, q, k, v, b, h, i);
                out[((b * shape.seqlen_q + i) * shape.heads_q + h) * d..][..d]
                    .copy_from_slice(&row);
                lse[(b * shape.heads_q + h) * shape.seqlen_q + i] = l;
            }
        }
    }
    (out, lse)
}

/// Float64 RoPE of one head row `x` at table position `pos`: pair `j < half` (elements `j` and
/// `j + half`, or `2j` and `2j + 1` when `interleaved`) turned by `cos[pos * half + j]`,
/// `sin[pos * half + j]` (tables `[positions, half]`); the elements past `2 * half` stay.
pub fn rotary_row(
    x: &[f64],
    (cos, sin): (&[f32], &[f32]),
    half: usize,
    interleaved: bool,
    pos: usize,
) -> Vec<f64> {
    let mut y = x.to_vec();
    for j in 0..half {
        let (i1, i2) = if interleaved {
            (2 * j, 2 * j + 1)
        } else {
            (j, j + half)
        };
        let (c, s) = (cos[pos * half + j] as f64, sin[pos * half + j] as f64);
        y[i1] = x[i1] * c - x[i2] * s;
        y[i2] = x[i2] * c + x[i1] * s;
    }
    y
}
