//! Online softmax over score fragments in the mma/wgmma accumulator layout, shared by the kernels.
//!
//! A thread holds two query rows (`rows[0]`, `rows[1]` = row + 8) of a 16-row slab; score element
//! `4j + e` belongs to row `e / 2` and key `n0 + 8j + 2t + e % 2` (`t = lane % 4`). The four
//! threads of a quad hold the rest of each row, so row reductions shuffle over lanes ^1 and ^2.
use crate::device::{
    exp2_approx, fma_f32, ld_global_nc_u32, log2_approx, max_f32, rcp_approx, select_u32,
    shfl_xor_f32, sub_abs_f32, warp_any,
};
use crate::mask::HeadMask;
use crate::mma::Element;

const LN_2: f32 = core::f32::consts::LN_2;

/// Running max (log2 domain) and partial sum of one thread's two rows.
#[derive(Clone, Copy)]
pub struct RowState {
    pub max: [f32; 2],
    pub sum: [f32; 2],
}

impl RowState {
    #[inline(always)]
    pub fn new() -> Self {
        RowState {
            max: [f32::NEG_INFINITY; 2],
            sum: [0.0; 2],
        }
    }
}

impl Default for RowState {
    fn default() -> Self {
        Self::new()
    }
}

/// Hides the keys the mask hides (raw score -> -inf). `full` blocks (every key visible to every
/// row of the tile) skip it; the others test each key against per-row bounds with selects, no
/// branches (this loop runs once per score per tile).
#[inline(always)]
pub fn mask_scores<const N: usize>(
    s: &mut [f32; N],
    mask: &HeadMask,
    full: bool,
    q_pos: [i32; 2],
    n0: i32,
    t: usize,
) {
    if full {
        return;
    }
    let bounds = [mask.row_bounds(q_pos[0]), mask.row_bounds(q_pos[1])];
    for (i, v) in s.iter_mut().enumerate() {
        let (j, e) = (i / 4, i % 4);
        let key = n0 + (8 * j + 2 * t + (e & 1)) as i32;
        if !bounds[e / 2].visible(key) {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// ALiBi (`HeadDim<D, true>` builds): adds `slope_raw * |q_pos - key|` to each raw score of
/// KV block `n0`. `slope_raw` is `-slope / softmax_scale` (at most 0: the host takes slopes >= 0),
/// so the scaled score the softmax exponentiates is `scale * q.k - slope * |q_pos - key|`,
/// FlashAttention's bias. Distances are exact in f32 below 2^24 keys. Masked scores are set to
/// -inf after this, so every block takes it, fully visible or not.
///
/// Two instructions per score: `x = sigma * (q_pos - key)` as one FFMA from a per-row product and
/// the score's constant column offset, then `s - |x|` as one FADD (the absolute value is an
/// operand modifier of FADD; written on bit patterns it was a LOP3 of its own).
#[inline(always)]
pub fn alibi_scores<const N: usize>(
    s: &mut [f32; N],
    slope_raw: f32,
    q_pos: [i32; 2],
    n0: i32,
    t: usize,
) {
    alibi_scores_by_row(s, [slope_raw; 2], q_pos, n0, t);
}

/// ALiBi: the `-slope / softmax_scale` that [`alibi_scores`] takes, from the f32 slope at
/// `slopes[index]` (device memory) and the launch's `-1 / softmax_scale`.
///
/// # Safety
/// `slopes + 4 * index` must be a readable f32 in global memory.
#[inline(always)]
pub unsafe fn alibi_slope_raw(slopes: u64, index: u64, neg_inv_scale: f32) -> f32 {
    f32::from_bits(unsafe { ld_global_nc_u32(slopes + 4 * index) }) * neg_inv_scale
}

/// [`alibi_scores`] with a slope per row (rows `g` and `g + 8` of the fragment): the decode
/// kernel packs several query heads of a group into one tile.
#[inline(always)]
pub fn alibi_scores_by_row<const N: usize>(
    s: &mut [f32; N],
    slope_raw: [f32; 2],
    q_pos: [i32; 2],
    n0: i32,
    t: usize,
) {
    // sigma = -slope_raw >= 0; row r's sigma * (distance to the quad's first key of column
    // group 0).
    let row = [
        -slope_raw[0] * (q_pos[0] - n0 - 2 * t as i32) as f32,
        -slope_raw[1] * (q_pos[1] - n0 - 2 * t as i32) as f32,
    ];
    for (i, v) in s.iter_mut().enumerate() {
        let (j, e) = (i / 4, i % 4);
        let x = fma_f32(slope_raw[e / 2], (8 * j + (e & 1)) as f32, row[e / 2]);
        *v = sub_abs_f32(*v, x);
    }
}

/// With lazy rescaling, how far (log2 domain) a row's block max may exceed its running max before
/// the running max moves (FlashAttention-4). Below it the running max stays put, the rescale
/// factor is exactly 1 and the caller may skip the output rescale; probabilities then reach at
/// most 2^8, far inside f32, bf16 and f16 range, and O, the row sum and the LSE all refer to the
/// same running max, so the result is the same.
pub const LAZY_MAX_LOG2: f32 = 8.0;

/// Folds a block of raw (unscaled, masked) scores into the running state: `s` becomes the
/// unnormalised probabilities `exp2(s * scale_log2 - max)` (one FFMA and one EX2 per score; the
/// max is taken on raw scores, valid as the scale is > 0), and the returned per-row factors
/// rescale the output accumulator. `LAZY`: the running max moves only by more than
/// [`LAZY_MAX_LOG2`], and a row whose max stayed gets a factor of exactly 1 ([`needs_rescale`]).
#[inline(always)]
pub fn online_softmax<const LAZY: bool, const N: usize>(
    s: &mut [f32; N],
    state: &mut RowState,
    scale_log2: f32,
) -> [f32; 2] {
    let mut alpha = [0f32; 2];
    for r in 0..2 {
        // Four independent running maxima per row, then a tree: one chain of N / 2 dependent
        // max.f32 (ptxas keeps the order of the asm) put about 32 ALU latencies on the
        // critical path of every block's softmax.
        let mut partial = [f32::NEG_INFINITY; 4];
        let mut k = 0;
        for (i, &v) in s.iter().enumerate() {
            if (i % 4) / 2 == r {
                partial[k % 4] = if k < 4 { v } else { max_f32(partial[k % 4], v) };
                k += 1;
            }
        }
        let mut m = max_f32(
            max_f32(partial[0], partial[1]),
            max_f32(partial[2], partial[3]),
        );
        m = max_f32(m, shfl_xor_f32(m, 1));
        m = max_f32(m, shfl_xor_f32(m, 2));
        let block_max = m * scale_log2;
        let m = if LAZY {
            // -inf + 8 is -inf: a row's first visible scores always set its max.
            let moves = block_max > state.max[r] + LAZY_MAX_LOG2;
            f32::from_bits(select_u32(
                moves,
                block_max.to_bits(),
                state.max[r].to_bits(),
            ))
        } else {
            max_f32(state.max[r], block_max)
        };
        // A row with nothing visible yet keeps m = -inf; subtract 0 then so exp2 gives 0, not NaN.
        let m_sub = if m == f32::NEG_INFINITY { 0.0 } else { m };
        alpha[r] = exp2_approx(state.max[r] - m_sub);
        state.max[r] = m;
        let mut sum = 0f32;
        for (i, v) in s.iter_mut().enumerate() {
            if (i % 4) / 2 == r {
                *v = exp2_approx(fma_f32(*v, scale_log2, -m_sub));
                sum += *v;
            }
        }
        state.sum[r] = state.sum[r] * alpha[r] + sum;
    }
    alpha
}

/// Multiplies each row of an output accumulator (same layout) by its factor.
#[inline(always)]
pub fn rescale<const N: usize>(o: &mut [f32; N], alpha: [f32; 2]) {
    for (i, v) in o.iter_mut().enumerate() {
        *v *= alpha[(i % 4) / 2];
    }
}

/// Whether any row of the warp needs its output rescaled (a factor other than 1). Warp-uniform:
/// with lazy rescaling a consumer branches on it to skip the rescale's FMULs (one per output
/// element and block), which outnumber the block's exponentials at D = 256.
#[inline(always)]
pub fn needs_rescale(alpha: [f32; 2]) -> bool {
    warp_any(alpha[0] != 1.0 || alpha[1] != 1.0)
}

/// Final per-row normaliser (1 / sum, 0 for rows that saw nothing) and natural-log LSE
/// (-inf for rows that saw nothing). Shuffles: call with the whole warp. Straight-line code
/// (SFU reciprocal and log, then selects): the persistent kernel runs it between warpgroup MMAs,
/// where a divergent branch would make ptxas serialize every wgmma.
#[inline(always)]
pub fn finish(state: &RowState) -> ([f32; 2], [f32; 2]) {
    let mut inv = [0f32; 2];
    let mut lse = [f32::NEG_INFINITY; 2];
    for r in 0..2 {
        let mut sum = state.sum[r];
        sum += shfl_xor_f32(sum, 1);
        sum += shfl_xor_f32(sum, 2);
        let reciprocal = rcp_approx(sum);
        let log = (state.max[r] + log2_approx(sum)) * LN_2;
        // Selects, never branches: the warp-specialised consumer runs this while its next
        // tile's first S GEMM is in flight, and ptxas serializes every wgmma of a kernel that
        // diverges while one runs (C7515).
        let seen = sum > 0.0;
        let pick = |a: f32, b: f32| f32::from_bits(select_u32(seen, a.to_bits(), b.to_bits()));
        inv[r] = pick(reciprocal, 0.0);
        lse[r] = pick(log, f32::NEG_INFINITY);
    }
    (inv, lse)
}

/// The natural-log LSE of partial results merged by their LSEs: `m` their max, `total` the sum
/// of their `exp(lse - m)`; -inf when none saw a key (`total` 0).
#[inline(always)]
pub fn merged_lse(m: f32, total: f32) -> f32 {
    if total > 0.0 {
        m + log2_approx(total) * LN_2
    } else {
        f32::NEG_INFINITY
    }
}

/// P (the softmax'd scores of a 64 x BN S accumulator, `N = BN / 2` per thread) as the register
/// A fragments of the PV GEMM's `K = BN / 16` k-steps: key tiles 2kk and 2kk+1 of S form the
/// fragment of k-step kk.
#[inline(always)]
pub fn p_fragments<E: Element, const N: usize, const K: usize>(s: &[f32; N]) -> [[u32; 4]; K] {
    const { assert!(N == 8 * K) };
    core::array::from_fn(|kk| {
        let j = 8 * kk;
        [
            E::pack(s[j], s[j + 1]),
            E::pack(s[j + 2], s[j + 3]),
            E::pack(s[j + 4], s[j + 5]),
            E::pack(s[j + 6], s[j + 7]),
        ]
    })
}
