//! First prefill attention kernel: tiled flash attention with warp-level `mma.sync` (sm_80+ path).
//!
//! One block computes `BLOCK_M = 64` query rows of one query head (4 warps x 16 rows). It walks only
//! the KV blocks the head's mask can reach (`HeadMask::block_ranges`): all blocks up to the
//! diagonal for retrieval heads, just the sink and window blocks for streaming heads. K is staged in
//! shared memory row-major, V transposed, both padded so fragment reads are bank-conflict free.
//! Online softmax in f32 with exp2; P goes from the S accumulators straight to A fragments.
//! Correct and complete, not fast: the Hopper TMA/wgmma kernel replaces it on sm_90.
use crate::abi::{
    HEAD_MASK_WORDS, PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_THREADS, PrefillParams,
};
use crate::device::*;
use crate::mask::HeadMask;
use crate::mma::{Bf16, Element, F16};

const BM: i32 = PREFILL_BLOCK_M as i32;
const LN_2: f32 = core::f32::consts::LN_2;

/// Row pitch (in elements) of K in shared memory: D + 8 of padding.
const fn k_pitch(d: usize) -> usize {
    d + 8
}

/// Row pitch (in elements) of transposed V in shared memory: `bn` keys + 8 of padding.
const fn vt_pitch(bn: usize) -> usize {
    bn + 8
}

/// Keys per KV tile for head dim `d`: D = 128 takes half tiles so that Q fragments, the O
/// accumulator and S fit in registers without spills.
pub const fn prefill_block_n(d: usize) -> usize {
    if d > 64 {
        PREFILL_BLOCK_N / 2
    } else {
        PREFILL_BLOCK_N
    }
}

/// Static shared memory of the kernel for head dim `d`: K tile plus transposed V tile.
pub const fn prefill_smem_bytes(d: usize) -> usize {
    let bn = prefill_block_n(d);
    (bn * k_pitch(d) + d * vt_pitch(bn)) * 2
}

#[inline(always)]
fn min_i32(a: i32, b: i32) -> i32 {
    if a < b { a } else { b }
}

/// `a / b` without a panic path (the host guarantees `b > 0`; 0 keeps the kernel total).
#[inline(always)]
fn div_or_zero(a: i32, b: i32) -> i32 {
    match core::num::NonZeroU32::new(b as u32) {
        Some(b) => (a as u32 / b) as i32,
        None => 0,
    }
}

/// Bit `head` of the streaming-head mask. Selected with constant indices so the parameter array
/// is never copied to local memory.
#[inline(always)]
fn is_streaming(mask: &[u32; HEAD_MASK_WORDS], head: usize) -> bool {
    let mut word = 0;
    for (w, &bits) in mask.iter().enumerate() {
        if w == head / 32 {
            word = bits;
        }
    }
    (word >> (head % 32)) & 1 != 0
}

/// Byte offset of element `(batch, pos, head, col)` given element strides.
#[inline(always)]
fn elem_offset(strides: &[i64; 3], batch: i64, pos: i32, head: i32, col: usize) -> u64 {
    ((batch * strides[0] + pos as i64 * strides[1] + head as i64 * strides[2] + col as i64) * 2)
        as u64
}

/// The kernel body, one instantiation per (element, head dim). `KQ = D / 16` k-steps of QK^T,
/// `DT = D / 8` output column tiles, `BN` keys per KV tile in `NT = BN / 8` score tiles.
#[inline(always)]
unsafe fn prefill<
    E: Element,
    const D: usize,
    const KQ: usize,
    const DT: usize,
    const BN: usize,
    const NT: usize,
    const SMEM: usize,
>(
    p: &PrefillParams,
) {
    const {
        assert!(
            KQ * 16 == D
                && DT * 8 == D
                && BN == prefill_block_n(D)
                && NT * 8 == BN
                && SMEM == prefill_smem_bytes(D)
        )
    };
    let vt_row = vt_pitch(BN);
    let smem = shared_memory_base::<SMEM>();
    let k_smem = smem;
    let vt_smem = smem + (BN * k_pitch(D) * 2) as u32;

    let tid = thread_idx_x() as usize;
    let lane = lane_id() as usize;
    let warp = tid / 32;
    let (g, t) = (lane / 4, lane % 4);

    // Causal tiles further down hold more work: launch them first.
    let m_block = (grid_dim_x() - 1 - block_idx_x()) as i32;
    let head = block_idx_y() as i32;
    let batch = block_idx_z() as i64;
    let kv_head = div_or_zero(head, div_or_zero(p.heads_q, p.heads_kv));
    let streaming = is_streaming(&p.streaming_heads, kv_head as usize);
    let mask = HeadMask {
        streaming,
        causal: p.causal != 0,
        sink: p.sink,
        window: p.window,
        seqlen_k: p.seqlen_k,
    };

    let (sq, sk) = (p.seqlen_q, p.seqlen_k);
    let m0 = m_block * BM;
    let offset = sk - sq;
    let q_lo = offset + m0;
    let q_hi = offset + min_i32(m0 + BM, sq) - 1;
    let row0 = m0 + (warp * 16 + g) as i32;
    let rows = [row0, row0 + 8];

    // Q fragments for the whole head dim stay in registers. Rows past the end read as zero.
    let mut qa = [[0u32; 4]; KQ];
    for (r, &row) in rows.iter().enumerate() {
        if row < sq {
            let base = p.q + elem_offset(&p.q_strides, batch, row, head, 2 * t);
            for (kk, frag) in qa.iter_mut().enumerate() {
                frag[r] = unsafe { ld_global_nc_u32(base + (kk * 32) as u64) };
                frag[r + 2] = unsafe { ld_global_nc_u32(base + (kk * 32 + 16) as u64) };
            }
        }
    }

    let mut acc = [[0f32; 4]; DT];
    let mut row_max = [f32::NEG_INFINITY; 2];
    let mut row_sum = [0f32; 2];
    // Visit the (at most two) block ranges as one flat loop, so no range array lives in memory.
    let [first, second] = mask.block_ranges(q_lo, q_hi, BN as i32);
    for i in 0..first.len() + second.len() {
        {
            let n_block = if i < first.len() {
                first.start + i
            } else {
                second.start + i - first.len()
            };
            let n0 = n_block * BN as i32;
            sync_threads(); // the previous tile is consumed
            // Stage K (row-major) and V (transposed) in 16-byte chunks; keys past the end are zero.
            for c in 0..BN * D / 8 / PREFILL_THREADS {
                let chunk = tid + c * PREFILL_THREADS;
                let (row, col) = (chunk / (D / 8), chunk % (D / 8) * 8);
                let key = n0 + row as i32;
                let (kc, vc) = if key < sk {
                    unsafe {
                        (
                            ld_global_nc_v4(
                                p.k + elem_offset(&p.k_strides, batch, key, kv_head, col),
                            ),
                            ld_global_nc_v4(
                                p.v + elem_offset(&p.v_strides, batch, key, kv_head, col),
                            ),
                        )
                    }
                } else {
                    ([0; 4], [0; 4])
                };
                unsafe { st_shared_v4(k_smem + ((row * k_pitch(D) + col) * 2) as u32, kc) };
                for e in 0..8 {
                    let half = (vc[e / 2] >> (16 * (e % 2))) as u16;
                    unsafe {
                        st_shared_u16(vt_smem + (((col + e) * vt_row + row) * 2) as u32, half)
                    };
                }
            }
            sync_threads();

            // S = Q K^T for this warp's 16 rows x 64 keys.
            let mut s = [[0f32; 4]; NT];
            for (j, s_tile) in s.iter_mut().enumerate() {
                let k_row = k_smem + (((8 * j + g) * k_pitch(D) + 2 * t) * 2) as u32;
                for (kk, frag) in qa.iter().enumerate() {
                    let addr = k_row + (kk * 32) as u32;
                    let b = unsafe { [ld_shared_u32(addr), ld_shared_u32(addr + 16)] };
                    E::mma(s_tile, frag, b);
                }
            }

            // Scale into the log2 domain; element masks only on blocks not fully visible.
            let full = mask.block_fully_visible(q_lo, q_hi, n0, BN as i32);
            for (j, s_tile) in s.iter_mut().enumerate() {
                for (e, v) in s_tile.iter_mut().enumerate() {
                    let key = n0 + (8 * j + 2 * t + (e & 1)) as i32;
                    let q_pos = offset + rows[e / 2];
                    *v = if full || mask.visible(q_pos, key) {
                        *v * p.scale_log2
                    } else {
                        f32::NEG_INFINITY
                    };
                }
            }

            // Online softmax, one row at a time (accumulator elements 0,1 are row g; 2,3 row g+8).
            for r in 0..2 {
                let mut m = row_max[r];
                for s_tile in &s {
                    m = max_f32(m, max_f32(s_tile[2 * r], s_tile[2 * r + 1]));
                }
                m = max_f32(m, shfl_xor_f32(m, 1));
                m = max_f32(m, shfl_xor_f32(m, 2));
                // A row with nothing visible yet keeps m = -inf; subtract 0 then so exp2 gives 0, not NaN.
                let m_sub = if m == f32::NEG_INFINITY { 0.0 } else { m };
                let alpha = exp2_approx(row_max[r] - m_sub);
                row_max[r] = m;
                let mut sum = 0f32;
                for s_tile in s.iter_mut() {
                    for e in 2 * r..2 * r + 2 {
                        s_tile[e] = exp2_approx(s_tile[e] - m_sub);
                        sum += s_tile[e];
                    }
                }
                row_sum[r] = row_sum[r] * alpha + sum;
                for a in acc.iter_mut() {
                    a[2 * r] *= alpha;
                    a[2 * r + 1] *= alpha;
                }
            }

            // O += P V: the S accumulators of key tiles 2kk, 2kk+1 are the A fragment of k-step kk.
            for kk in 0..BN / 16 {
                let (lo, hi) = (&s[2 * kk], &s[2 * kk + 1]);
                let pa = [
                    E::pack(lo[0], lo[1]),
                    E::pack(lo[2], lo[3]),
                    E::pack(hi[0], hi[1]),
                    E::pack(hi[2], hi[3]),
                ];
                for (jd, a) in acc.iter_mut().enumerate() {
                    let addr = vt_smem + (((8 * jd + g) * vt_row + 16 * kk + 2 * t) * 2) as u32;
                    let b = unsafe { [ld_shared_u32(addr), ld_shared_u32(addr + 16)] };
                    E::mma(a, &pa, b);
                }
            }
        }
    }

    // Epilogue: normalise, write O and the natural-log LSE. Fully masked rows: O = 0, LSE = -inf.
    for r in 0..2 {
        let mut sum = row_sum[r];
        sum += shfl_xor_f32(sum, 1);
        sum += shfl_xor_f32(sum, 2);
        let row = rows[r];
        if row < sq {
            let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            let o_row = p.o + elem_offset(&p.o_strides, batch, row, head, 2 * t);
            for (jd, a) in acc.iter().enumerate() {
                unsafe {
                    st_global_u32(
                        o_row + (jd * 16) as u64,
                        E::pack(a[2 * r] * inv, a[2 * r + 1] * inv),
                    )
                };
            }
            if t == 0 {
                let lse = if sum > 0.0 {
                    (row_max[r] + log2_approx(sum)) * LN_2
                } else {
                    f32::NEG_INFINITY
                };
                let idx = (batch * p.heads_q as i64 + head as i64) * sq as i64 + row as i64;
                unsafe { st_global_f32(p.lse + 4 * idx as u64, lse) };
            }
        }
    }
}

macro_rules! prefill_entry {
    ($name:ident, $elem:ty, $d:literal) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: PrefillParams) {
            unsafe {
                prefill::<
                    $elem,
                    $d,
                    { $d / 16 },
                    { $d / 8 },
                    { prefill_block_n($d) },
                    { prefill_block_n($d) / 8 },
                    { prefill_smem_bytes($d) },
                >(&p)
            }
        }
    };
}

prefill_entry!(duo_prefill_bf16_d64, Bf16, 64);
prefill_entry!(duo_prefill_bf16_d128, Bf16, 128);
prefill_entry!(duo_prefill_f16_d64, F16, 64);
prefill_entry!(duo_prefill_f16_d128, F16, 128);
