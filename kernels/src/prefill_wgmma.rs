//! Hopper prefill kernel (sm_90a): warpgroup MMA on 128-byte-swizzled shared-memory tiles.
//!
//! A block of two warpgroups owns `WG_BLOCK_M = 128` query rows of one head (64 per warpgroup)
//! and walks the KV blocks the head's mask reaches (sink and window blocks only for streaming
//! heads). Q is loaded once. K/V tiles of 128 keys stream through a three-stage shared-memory
//! ring filled by cp.async, two tiles ahead, so one barrier per tile both publishes tile i and
//! frees the stage tile i + 2 goes into. S = Q K^T is a `wgmma m64n128k16` with both operands
//! K-major in shared memory. P goes from the S accumulators
//! straight into register A fragments for `O += P V`, with V read N-major (transposed by wgmma).
//!
//! Tile layout in shared memory (Q, K and V alike): the head dim is split into 64-element
//! (128-byte) column blocks, one after another, each `rows x 128 B`. Inside a block, 16-byte
//! chunk `c` of row `r` sits at chunk `c ^ (r % 8)`: the hardware's 128B swizzle, which needs
//! 1024-byte-aligned blocks.
use crate::abi::{PrefillParams, WG_BLOCK_M, WG_BLOCK_N, WG_STAGES, WG_THREADS, wg_smem_bytes};
use crate::device::*;
use crate::mma::{Bf16, Element, F16};
use crate::smem_layout::{descriptor, swizzled};
use crate::softmax::{RowState, finish, p_fragments};
use crate::tile::QueryTile;
use crate::wgmma::{WgmmaElement, fence_accumulators_64, wgmma_commit, wgmma_fence, wgmma_wait};

const BM: usize = WG_BLOCK_M;
const BN: usize = WG_BLOCK_N;

/// Starts async copies of rows `row0..row0 + rows` of a `[.., S, H, D]` operand (one head) into a
/// swizzled tile; rows at or past `limit` are zero-filled. All `WG_THREADS` threads take part.
#[inline(always)]
unsafe fn load_tile<const D: usize>(
    dst: u32,
    rows: usize,
    src: u64,
    seq_stride: i64,
    row0: i32,
    limit: i32,
    tid: usize,
) {
    for i in 0..rows * D / 8 / WG_THREADS {
        let c = tid + i * WG_THREADS;
        let (row, chunk) = (c / (D / 8), c % (D / 8));
        let pos = row0 + row as i32;
        let valid = pos < limit;
        let addr = if valid {
            src + ((pos as i64 * seq_stride + (chunk * 8) as i64) * 2) as u64
        } else {
            src
        };
        unsafe {
            cp_async_16(
                dst + swizzled(rows, row, chunk),
                addr,
                if valid { 16 } else { 0 },
            )
        };
    }
}

/// The kernel body, one instantiation per (element, head dim).
#[inline(always)]
unsafe fn prefill_wgmma<E: Element + WgmmaElement, const D: usize>(p: &PrefillParams) {
    const { assert!(wg_smem_bytes(D) == BM * D * 2 + WG_STAGES * 2 * BN * D * 2 && BN == 128) };
    let smem = dynamic_shared_base();
    let q_smem = smem;
    let stage_bytes = (2 * BN * D * 2) as u32;
    let k_smem = |stage: usize| smem + (BM * D * 2) as u32 + stage as u32 * stage_bytes;
    let v_smem = |stage: usize| k_smem(stage) + (BN * D * 2) as u32;

    let tid = thread_idx_x() as usize;
    let (wg, wtid) = (tid / 128, tid % 128);
    let lane = lane_id() as usize;
    let (g, t) = (lane / 4, lane % 4);
    let tile = QueryTile::from_grid(p, BM as i32);
    if tile.is_empty() {
        return; // the whole block, before any barrier: this varlen sequence has no rows here
    }
    let row0 = tile.m0 + (64 * wg + 16 * (wtid / 32) + g) as i32;
    let rows = [row0, row0 + 8];
    let q_pos = [tile.offset + rows[0], tile.offset + rows[1]];
    let k_src = tile.k_base;
    let v_src = tile.v_base;

    let [first, second] = tile.mask.block_ranges(tile.q_lo, tile.q_hi, BN as i32);
    let blocks = first.len() + second.len();
    let n_block = |i: i32| {
        if i < first.len() {
            first.start + i
        } else {
            second.start + i - first.len()
        }
    };

    let load_kv = |i: i32| {
        let (stage, n0) = ((i % WG_STAGES as i32) as usize, n_block(i) * BN as i32);
        unsafe {
            load_tile::<D>(
                k_smem(stage),
                BN,
                k_src,
                tile.k_row_stride,
                n0,
                tile.seqlen_k,
                tid,
            );
            load_tile::<D>(
                v_smem(stage),
                BN,
                v_src,
                tile.v_row_stride,
                n0,
                tile.seqlen_k,
                tid,
            );
        }
    };

    // Prologue: Q with KV tile 0 in one cp.async group, tile 1 in the next (groups may be empty).
    unsafe {
        load_tile::<D>(
            q_smem,
            BM,
            tile.q,
            tile.q_stride,
            tile.m0,
            tile.seqlen_q,
            tid,
        )
    };
    for i in 0..2 {
        if i < blocks {
            load_kv(i);
        }
        cp_async_commit();
    }

    let mut o = [0f32; 64];
    let mut state = RowState::new();
    for i in 0..blocks {
        let stage = (i % WG_STAGES as i32) as usize;
        cp_async_wait::<1>(); // all but the newest group: tile i (and Q) have landed
        fence_proxy_async_shared();
        // Publishes tile i, and every thread is past iteration i - 1, so its stage is free.
        sync_threads();
        if i + 2 < blocks {
            load_kv(i + 2);
        }
        cp_async_commit();

        // S = Q K^T: 64 rows of this warpgroup x 128 keys, D / 16 k-steps.
        let mut s = [0f32; 64];
        fence_accumulators_64(&mut s);
        wgmma_fence();
        for kk in 0..D / 16 {
            let (block, within) = ((kk / 4) as u32, (kk % 4) as u32 * 32);
            let a = descriptor(
                q_smem + block * (BM * 128) as u32 + (wg * 64 * 128) as u32 + within,
                16,
                1024,
            );
            let b = descriptor(k_smem(stage) + block * (BN * 128) as u32 + within, 16, 1024);
            E::mma_ss_m64n128k16(&mut s, a, b, (kk > 0) as u32);
        }
        wgmma_commit();
        wgmma_wait::<0>();
        fence_accumulators_64(&mut s);

        let n0 = n_block(i) * BN as i32;
        tile.softmax_step(
            &mut s,
            &mut o,
            &mut state,
            n0,
            BN as i32,
            q_pos,
            t,
            p.scale_log2,
        );

        // O += P V with P as register A fragments; V is N-major (head dim contiguous): LBO steps
        // between 64-column blocks, SBO between 8 keys.
        let pa = p_fragments::<E, 64, 8>(&s);
        fence_accumulators_64(&mut o);
        wgmma_fence();
        for (kk, a) in pa.iter().enumerate() {
            let b = descriptor(
                v_smem(stage) + (kk * 16 * 128) as u32,
                (BN * 128) as u32,
                1024,
            );
            if D == 64 {
                E::mma_rs_m64n64k16(&mut o, a, b);
            } else {
                E::mma_rs_m64n128k16(&mut o, a, b);
            }
        }
        wgmma_commit();
        wgmma_wait::<0>();
        fence_accumulators_64(&mut o);
    }
    cp_async_wait::<0>();

    let (inv, lse) = finish(&state);
    let o_used: &[f32; 64] = &o;
    if D == 64 {
        let mut o64 = [0f32; 32];
        o64.copy_from_slice(&o_used[..32]);
        tile.store_rows::<E, 32>(&o64, rows, t, inv, lse);
    } else {
        tile.store_rows::<E, 64>(o_used, rows, t, inv, lse);
    }
}

macro_rules! wgmma_entry {
    ($name:ident, $elem:ty, $d:literal) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: PrefillParams) {
            enter_dependent_grid();
            unsafe { prefill_wgmma::<$elem, $d>(&p) }
        }
    };
}

wgmma_entry!(duo_prefill_wgmma_bf16_d64, Bf16, 64);
wgmma_entry!(duo_prefill_wgmma_bf16_d128, Bf16, 128);
wgmma_entry!(duo_prefill_wgmma_f16_d64, F16, 64);
wgmma_entry!(duo_prefill_wgmma_f16_d128, F16, 128);
