//! The split-KV prefill's merge (`duo_prefill_merge_*`): each query row's `kv_splits` partial rows
//! (O normalised in f32, and its LSE, written by the `_split` TMA entries) combine by their LSE
//! into the row of O and its LSE. One warp per row: lane `s` holds split `s`'s weight, and each
//! lane sums four columns of every split per 128 columns of the head dim (16-byte loads).
use crate::abi::{PREFILL_MAX_SPLITS, PREFILL_MERGE_ROWS, PrefillMergeParams};
use crate::device::*;
use crate::mask::div_or_zero;
use crate::mma::{Bf16, Element, F16};
use crate::softmax::merged_lse;

const LOG2_E: f32 = core::f32::consts::LOG2_E;

#[inline(always)]
unsafe fn merge<E: Element, const D: usize>(p: &PrefillMergeParams) {
    const { assert!(PREFILL_MAX_SPLITS <= 32 && D % 4 == 0) };
    // 128-column passes over the head dim: one at D <= 128, two at D = 256.
    let passes = D.div_ceil(128);
    let tid = thread_idx_x() as usize;
    let (warp, lane) = (tid / 32, tid % 32);
    // Query rows `[B, Hq, Sq]` (a varlen launch: `[1, Hq, total_q]`; below 2^31 partial rows,
    // checked by the host).
    let rows = p.batch * p.heads_q * p.seqlen_q;
    let row = block_idx_x() as i32 * PREFILL_MERGE_ROWS as i32 + warp as i32;
    if row >= rows {
        return;
    }
    let splits = p.kv_splits.clamp(1, PREFILL_MAX_SPLITS as i32) as usize;
    // Partial rows `[B, Hq, Sq, kv_splits]`: a row's splits side by side.
    let partial = |s: usize| row as i64 * splits as i64 + s as i64;

    // The merged LSE, and this lane's split's weight exp(lse_s - lse) (0 past the splits, for
    // a split that saw no key, and for a row that saw none).
    let lse_s = if lane < splits {
        unsafe { ld_global_cg_f32(p.partial_lse + 4 * partial(lane) as u64) }
    } else {
        f32::NEG_INFINITY
    };
    let m = warp_max_f32(lse_s);
    let e = if m != f32::NEG_INFINITY {
        exp2_approx((lse_s - m) * LOG2_E)
    } else {
        0.0
    };
    let total = warp_sum_f32(e);
    let lse = merged_lse(m, total);
    let w = if total > 0.0 { e / total } else { 0.0 };

    // Row (b, h, i) of `[B, Hq, Sq]`.
    let bh = div_or_zero(row, p.seqlen_q);
    let i = row - bh * p.seqlen_q;
    let b = div_or_zero(bh, p.heads_q);
    let h = bh - b * p.heads_q;
    let o_row = p.o
        + ((b as i64 * p.o_strides[0] + i as i64 * p.o_strides[1] + h as i64 * p.o_strides[2]) * 2)
            as u64;
    // Lane `l` sums columns `128 j + 4l..+4` of pass `j` (at D = 64 only lanes 0-15 have
    // columns). The weight shuffles run on the whole warp: a lane outside the column test would
    // leave its split's weight undefined for the others (the first version's bug at D = 64 with
    // over 16 splits).
    let col = |j: usize| 128 * j + 4 * lane;
    let mut o = [[0f32; 4]; 2];
    for s in 0..splits {
        let ws = shfl_idx_f32(w, s as u32);
        for (j, o) in o.iter_mut().enumerate().take(passes) {
            if col(j) < D {
                let at = p.partial_o + 4 * (partial(s) * D as i64 + col(j) as i64) as u64;
                let x = unsafe { ld_global_cg_v4_f32(at) };
                for c in 0..4 {
                    o[c] += ws * x[c];
                }
            }
        }
    }
    for (j, o) in o.iter().enumerate().take(passes) {
        if col(j) < D {
            let at = o_row + 2 * col(j) as u64;
            unsafe {
                st_global_u32(at, E::pack(o[0], o[1]));
                st_global_u32(at + 4, E::pack(o[2], o[3]));
            }
        }
    }
    if lane == 0 {
        let at = b as i64 * p.lse_strides[0] + h as i64 * p.lse_strides[1] + i as i64;
        unsafe { st_global_f32(p.lse + 4 * at as u64, lse) };
    }
}

macro_rules! merge_entry {
    ($name:ident, $elem:ty, $d:literal) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: PrefillMergeParams) {
            enter_dependent_grid();
            unsafe { merge::<$elem, $d>(&p) }
        }
    };
}

merge_entry!(duo_prefill_merge_bf16_d64, Bf16, 64);
merge_entry!(duo_prefill_merge_bf16_d128, Bf16, 128);
merge_entry!(duo_prefill_merge_f16_d64, F16, 64);
merge_entry!(duo_prefill_merge_f16_d128, F16, 128);
merge_entry!(duo_prefill_merge_bf16_d256, Bf16, 256);
merge_entry!(duo_prefill_merge_f16_d256, F16, 256);
