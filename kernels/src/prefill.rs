//! First prefill attention kernel: tiled flash attention with warp-level `mma.sync` (sm_80+ path).
//!
//! One block computes `BLOCK_M = 64` query rows of one query head (4 warps x 16 rows). It walks only
//! the KV blocks the head's mask can reach (`HeadMask::block_ranges`): all blocks up to the
//! diagonal for retrieval heads, just the sink and window blocks for streaming heads. K is staged in
//! shared memory row-major, V transposed, both padded so fragment reads are bank-conflict free.
//! Online softmax in f32 with exp2; P goes from the S accumulators straight to A fragments.
//! Correct and complete, not fast: the Hopper TMA/wgmma kernel replaces it on sm_90.
use crate::abi::{PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_THREADS, PrefillParams};
use crate::device::*;
use crate::mma::{Bf16, Element, F16, qk_tile, quad, set_quad};
use crate::softmax::{RowState, finish};
use crate::tile::{QueryTile, row_offset};

const BM: i32 = PREFILL_BLOCK_M as i32;

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

/// The 4 accumulators of 8-column tile `j` of a flat accumulator array.

/// The kernel body, one instantiation per (element, head dim). `KQ = D / 16` k-steps of QK^T,
/// `ON = D / 2` output accumulators, `BN` keys per KV tile with `SN = BN / 2` score accumulators.
#[inline(always)]
unsafe fn prefill<
    E: Element,
    const D: usize,
    const KQ: usize,
    const ON: usize,
    const BN: usize,
    const SN: usize,
    const SMEM: usize,
>(
    p: &PrefillParams,
) {
    const {
        assert!(
            KQ * 16 == D
                && ON * 2 == D
                && BN == prefill_block_n(D)
                && SN * 2 == BN
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
    let tile = QueryTile::from_grid(p, BM);
    if tile.is_empty() {
        return; // the whole block, before any barrier: this varlen sequence has no rows here
    }
    let sk = tile.seqlen_k;
    let row0 = tile.m0 + (warp * 16 + g) as i32;
    let rows = [row0, row0 + 8];
    let q_pos = [tile.offset + rows[0], tile.offset + rows[1]];

    // Q fragments for the whole head dim stay in registers. Rows past the end read as zero.
    let mut qa = [[0u32; 4]; KQ];
    for (r, &row) in rows.iter().enumerate() {
        if row < tile.seqlen_q {
            let base = tile.q + row_offset(tile.q_stride, row, 2 * t);
            for (kk, frag) in qa.iter_mut().enumerate() {
                frag[r] = unsafe { ld_global_nc_u32(base + (kk * 32) as u64) };
                frag[r + 2] = unsafe { ld_global_nc_u32(base + (kk * 32 + 16) as u64) };
            }
        }
    }

    let mut acc = [0f32; ON];
    let mut state = RowState::new();
    // Visit the (at most two) block ranges as one flat loop, so no range array lives in memory.
    let [first, second] = tile.mask.block_ranges(tile.q_lo, tile.q_hi, BN as i32);
    for i in 0..first.len() + second.len() {
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
                            tile.k_base
                                + ((key as i64 * tile.k_row_stride + col as i64) * 2) as u64,
                        ),
                        ld_global_nc_v4(
                            tile.v_base
                                + ((key as i64 * tile.v_row_stride + col as i64) * 2) as u64,
                        ),
                    )
                }
            } else {
                ([0; 4], [0; 4])
            };
            unsafe { st_shared_v4(k_smem + ((row * k_pitch(D) + col) * 2) as u32, kc) };
            for e in 0..8 {
                let half = (vc[e / 2] >> (16 * (e % 2))) as u16;
                unsafe { st_shared_u16(vt_smem + (((col + e) * vt_row + row) * 2) as u32, half) };
            }
        }
        sync_threads();

        // S = Q K^T for this warp's 16 rows x BN keys.
        let mut s = [0f32; SN];
        for j in 0..BN / 8 {
            let k_row = k_smem + (((8 * j + g) * k_pitch(D) + 2 * t) * 2) as u32;
            set_quad(&mut s, j, qk_tile::<E, KQ>(&qa, k_row));
        }

        tile.softmax_step(
            &mut s,
            &mut acc,
            &mut state,
            n0,
            BN as i32,
            q_pos,
            t,
            p.scale_log2,
        );

        // O += P V: the S accumulators of key tiles 2kk, 2kk+1 are the A fragment of k-step kk.
        for kk in 0..BN / 16 {
            let (lo, hi) = (quad(&s, 2 * kk), quad(&s, 2 * kk + 1));
            let pa = [
                E::pack(lo[0], lo[1]),
                E::pack(lo[2], lo[3]),
                E::pack(hi[0], hi[1]),
                E::pack(hi[2], hi[3]),
            ];
            for jd in 0..D / 8 {
                let addr = vt_smem + (((8 * jd + g) * vt_row + 16 * kk + 2 * t) * 2) as u32;
                let b = unsafe { [ld_shared_u32(addr), ld_shared_u32(addr + 16)] };
                let mut c = quad(&acc, jd);
                E::mma(&mut c, &pa, b);
                set_quad(&mut acc, jd, c);
            }
        }
    }

    // Epilogue: normalise, write O and the natural-log LSE. Fully masked rows: O = 0, LSE = -inf.
    let (inv, lse) = finish(&state);
    tile.store_rows::<E, ON>(&acc, rows, t, inv, lse);
}

macro_rules! prefill_entry {
    ($name:ident, $elem:ty, $d:literal) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: PrefillParams) {
            enter_dependent_grid();
            unsafe {
                prefill::<
                    $elem,
                    $d,
                    { $d / 16 },
                    { $d / 2 },
                    { prefill_block_n($d) },
                    { prefill_block_n($d) / 2 },
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
