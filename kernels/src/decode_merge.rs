//! The decode's split merge, the launch's tail: how a row group's split blocks combine their
//! partial rows (normalised O and natural-log LSE) into the final ones. A cluster that is exactly
//! the row group's splits merges through distributed shared memory (here); otherwise the last
//! split block to count itself merges the partial rows the others left in global memory (inline
//! at the end of `decode::decode`, with the constants below).
use crate::abi::{DECODE_MAX_CLUSTER, decode_threads};
use crate::device::*;
use crate::mma::Element;
use crate::softmax::merged_lse;
use crate::tile::min_i32;

/// Most O loads in flight per thread in the global merge.
pub(crate) const MERGE_DEPTH: usize = 16;

/// O loads in flight per thread in the global merge: 16 (64 registers) at D = 128; 8 at D = 256,
/// which spills with 16; 4 at D = 64, whose entries have a 128-register cap (8 spilled in the
/// paged ones).
pub(crate) const fn merge_depth(d: usize) -> usize {
    match d {
        128 => MERGE_DEPTH,
        256 => MERGE_DEPTH / 2,
        _ => MERGE_DEPTH / 4,
    }
}
pub(crate) const LOG2_E: f32 = core::f32::consts::LOG2_E;

/// How a decode block's row group merges its splits (`decode`'s tail).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Merge {
    /// One split: the block's rows are the final rows.
    Alone,
    /// The cluster is the row group's splits: each block leaves its partial rows in its shared
    /// memory, and each merges a share of the items from all of them.
    Cluster,
    /// Partial rows in the global workspace; the last block to count itself merges them.
    Global,
}

/// The cluster merge: once every block of the cluster (the row group's `splits` splits, rank =
/// split) has its partial rows in shared memory (LSE at `part_lse`, O rows of `D` f32 at
/// `part_o`), block `split` merges its contiguous share of the `rows_here x D / 4` items (four
/// columns each) from all of them by their LSE and stores the final rows; a second cluster
/// barrier keeps every block's shared memory alive until the others have read it.
#[inline(always)]
pub(crate) unsafe fn merge_in_cluster<E: Element, const D: usize>(
    part_lse: u32,
    part_o: u32,
    rows_here: usize,
    split: i32,
    splits: i32,
    store_o: impl Fn(usize, usize, [f32; 4]),
    store_lse: impl Fn(usize, f32),
) {
    cluster_sync(); // every split's partial rows in its shared memory
    let threads = const { decode_threads(D) };
    let splits = (splits as usize).max(1);
    let items = rows_here * (D / 4);
    let share = items.div_ceil(splits);
    let first = split as usize * share;
    let end = min_i32((first + share) as i32, items as i32) as usize;
    for item in (first + thread_idx_x() as usize..end).step_by(threads) {
        let (row, col) = (item / (D / 4), 4 * (item % (D / 4)));
        let lse_at = part_lse + (row * 4) as u32;
        let o_at = part_o + ((row * D + col) * 4) as u32;
        let mut lse = [f32::NEG_INFINITY; DECODE_MAX_CLUSTER];
        let mut xs = [[0f32; 4]; DECODE_MAX_CLUSTER];
        for s in 0..DECODE_MAX_CLUSTER {
            if s < splits {
                unsafe {
                    lse[s] = ld_shared_cluster_f32(map_shared_to_rank(lse_at, s as u32));
                    xs[s] = ld_shared_cluster_v4_f32(map_shared_to_rank(o_at, s as u32));
                }
            }
        }
        let m = lse.iter().fold(f32::NEG_INFINITY, |m, &l| max_f32(m, l));
        let (mut total, mut o) = (0f32, [0f32; 4]);
        if m != f32::NEG_INFINITY {
            for (l, x) in lse.iter().zip(&xs) {
                let w = exp2_approx((l - m) * LOG2_E);
                total += w;
                for c in 0..4 {
                    o[c] += w * x[c];
                }
            }
        }
        let inv = if total > 0.0 { rcp_approx(total) } else { 0.0 };
        store_o(row, col, o.map(|v| v * inv));
        if col == 0 {
            store_lse(row, merged_lse(m, total));
        }
    }
    cluster_sync(); // no block leaves while another still reads its shared memory
}
