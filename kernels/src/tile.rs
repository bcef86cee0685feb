//! Per-tile bookkeeping shared by the prefill kernels: which head and rows a block owns, its mask,
//! operand addresses, and the epilogue that writes O and LSE.
use crate::abi::{FastDiv, PrefillParams, split_range};
use crate::device::{
    block_idx_x, block_idx_y, block_idx_z, fresh_u32, grid_dim_x, ld_global_nc_u32, select_u32,
    shfl_xor_u32, st_global_f32_if, st_global_v2_f32_if, st_global_v4_u32_if,
};
use crate::heads::kind_and_rank;
use crate::mask::HeadMask;
use crate::mma::Element;
use crate::softmax::{RowState, mask_scores, online_softmax, rescale};

#[inline(always)]
pub fn min_i32(a: i32, b: i32) -> i32 {
    if a < b { a } else { b }
}

/// Byte offset of element `(batch, pos, head, col)` of a 16-bit tensor with element strides.
#[inline(always)]
pub fn elem_offset(strides: &[i64; 3], batch: i64, pos: i32, head: i32, col: usize) -> u64 {
    ((batch * strides[0] + pos as i64 * strides[1] + head as i64 * strides[2] + col as i64) * 2)
        as u64
}

/// Byte offset of `(row, col)` from a row-0 address, 16-bit elements.
#[inline(always)]
pub fn row_offset(stride: i64, row: i32, col: usize) -> u64 {
    ((row as i64 * stride + col as i64) * 2) as u64
}

/// `QueryTile::softmax_scores` masking modes.
pub const MASK_NONE: u32 = 0;
pub const MASK_KEYS: u32 = 1;
pub const MASK_TEST: u32 = 2;

/// Index of the LSE entry of sequence `batch`'s query row `start_q` (its first, for a varlen
/// sequence) in head `head`.
#[inline(always)]
fn lse_row(p: &PrefillParams, batch: i64, head: i32, start_q: i32) -> i64 {
    batch * p.lse_strides[0] + head as i64 * p.lse_strides[1] + start_q as i64
}

/// What one block of `block_m` query rows works on: its head, mask, rows, and the row-0
/// addresses of its sequence (fixed-length batch entry or varlen sequence) and K/V source.
pub struct QueryTile {
    pub head: i32,
    /// The tile's batch entry or varlen sequence.
    pub batch: i32,
    pub mask: HeadMask,
    /// Byte addresses of this tile's K and V at position 0 (batch and head applied), their
    /// sequence strides in elements, and their length (the source depends on the head's kind).
    pub k_base: u64,
    pub v_base: u64,
    pub k_row_stride: i64,
    pub v_row_stride: i64,
    pub seqlen_k: i32,
    /// This sequence's query rows.
    pub seqlen_q: i32,
    /// Byte addresses of row 0 (column 0) of this sequence and head in Q and O, and of its LSE
    /// row 0; rows step by the sequence strides (elements).
    pub q: u64,
    pub o: u64,
    pub lse: u64,
    pub q_stride: i64,
    pub o_stride: i64,
    /// First query row of the tile.
    pub m0: i32,
    /// `seqlen_k - seqlen_q` of the tile's source: query row `i` sits at position `offset + i`.
    pub offset: i32,
    /// Positions of the tile's first and last valid query rows.
    pub q_lo: i32,
    pub q_hi: i32,
    /// TMA coordinates: the sequence's first row in Q/O and in its K/V source (varlen sequences
    /// start inside packed tensors), the K/V head index in that source, and the K/V batch index
    /// (0 where the source has batch stride 0: packed varlen K/V, whose maps hold one packed
    /// sequence; Q's is `q_batch_coord`); K/V come from the streaming maps.
    pub q_row0: i32,
    pub k_row0: i32,
    pub kv_index: i32,
    pub batch_coord: i32,
    pub from_stream: bool,
    /// Split-KV: this work tile is split `kv_split` of `kv_splits` (0 of 1 without split-KV:
    /// constants then, so the split arithmetic folds away) and `o` / `lse` point at its partial
    /// rows (f32; query rows `kv_splits` partial rows apart).
    pub kv_split: i32,
    pub kv_splits: i32,
    pub kv_splits_div: FastDiv,
}

impl QueryTile {
    /// Grid `(query tiles, Hq, B)`; the x order is reversed so the longest causal tiles start first.
    #[inline(always)]
    pub fn from_grid(p: &PrefillParams, block_m: i32) -> Self {
        let m_block = (grid_dim_x() - 1 - block_idx_x()) as i32;
        Self::new(
            p,
            block_m,
            m_block,
            block_idx_y() as i32,
            block_idx_z() as i64,
            false,
        )
    }

    /// Work tile `work` of a persistent kernel: (sequence, head) major, as the grid order of
    /// `from_grid`, so the blocks running at any moment share one or a few heads' K/V in L2
    /// (a heaviest-first order across all heads measured 35% slower: each head's K/V then
    /// streams from DRAM); within a head the last, longest causal tiles come first.
    ///
    /// With `SPLIT` (split-KV), work tile `work` is split `work % kv_splits` of query tile
    /// `work / kv_splits`: a tile's splits run side by side, sharing its Q in L2. Its `o` and
    /// `lse` are then its partial rows (query rows `kv_splits` partial rows apart).
    #[inline(always)]
    pub fn from_work<const SPLIT: bool>(
        p: &PrefillParams,
        block_m: i32,
        head_dim: usize,
        work: i32,
    ) -> Self {
        // Host-computed multiply-and-shift divisions (`FastDiv`): no zero test for ptxas to hoist
        // before the role split, and a short chain on the tile switch's critical path.
        let (tile_work, split) = if SPLIT {
            let tile_work = p.kv_splits_div.quotient(work as u32) as i32;
            (tile_work, work - tile_work * p.kv_splits)
        } else {
            (work, 0)
        };
        let pair = p.m_blocks_div.quotient(tile_work as u32) as i32;
        let m_block = p.m_blocks - 1 - (tile_work - pair * p.m_blocks);
        let batch = p.heads_q_div.quotient(pair as u32) as i32;
        let head = pair - batch * p.heads_q;
        // The D = 256 builds are short of registers in their consumers (the split build by two,
        // the plain one, whose work tiles overlap, by one): there the flag tests are made per
        // tile (`fresh_u32`) rather than once at entry and carried.
        let per_tile_flags = head_dim > 128;
        let mut tile = Self::new(p, block_m, m_block, head, batch as i64, per_tile_flags);
        if SPLIT {
            // Partial rows: the LSE's rows (`[B, Hq, Sq]`, varlen `[Hq, total_q]`), each widened
            // to `kv_splits` partial rows side by side, which the merge reads together.
            let row0 =
                lse_row(p, batch as i64, head, tile.q_row0) * p.kv_splits as i64 + split as i64;
            tile.kv_split = split;
            tile.kv_splits = p.kv_splits;
            tile.kv_splits_div = p.kv_splits_div;
            tile.lse = p.partial_lse + 4 * row0 as u64;
            tile.o = p.partial_o + 4 * (row0 * head_dim as i64) as u64;
            tile.o_stride = head_dim as i64 * p.kv_splits as i64;
        }
        tile
    }

    /// KV blocks `[lo, hi)` of this work tile's split among the `blocks` its query tile visits
    /// (all of them without split-KV).
    #[inline(always)]
    pub fn split_blocks(&self, blocks: i32) -> (i32, i32) {
        if self.kv_splits == 1 {
            (0, blocks)
        } else {
            split_range(blocks, self.kv_split, self.kv_splits_div)
        }
    }

    #[inline(always)]
    fn new(
        p: &PrefillParams,
        block_m: i32,
        m_block: i32,
        head: i32,
        batch: i64,
        per_tile_flags: bool,
    ) -> Self {
        let flag = |v: u32| if per_tile_flags { fresh_u32(v) } else { v };
        let kv_head = p.group_div.quotient(head as u32) as i32;
        let (streaming, rank) = kind_and_rank(&p.streaming_heads, kv_head as usize);
        let from_stream;
        let kv_index;
        let varlen;
        // Two forms, so that every entry but the D = 256 ones keeps its code.
        if per_tile_flags {
            let split_kv = fresh_u32(p.split_kv as u32) != 0;
            from_stream = streaming && split_kv;
            kv_index = if split_kv { rank } else { kv_head };
            varlen = fresh_u32((p.cu_seqlens_q | p.cu_seqlens_q >> 32) as u32) != 0;
        } else {
            from_stream = streaming && p.split_kv != 0;
            kv_index = if p.split_kv != 0 { rank } else { kv_head };
            varlen = p.cu_seqlens_q != 0;
        }
        // Scalar selects (not references into the parameter block), so the parameters stay in
        // the constant bank instead of being copied to the stack.
        let pick = |stream: i64, plain: i64| if from_stream { stream } else { plain };
        let k_strides = [
            pick(p.stream_k_strides[0], p.k_strides[0]),
            pick(p.stream_k_strides[1], p.k_strides[1]),
            pick(p.stream_k_strides[2], p.k_strides[2]),
        ];
        let v_strides = [
            pick(p.stream_v_strides[0], p.v_strides[0]),
            pick(p.stream_v_strides[1], p.v_strides[1]),
            pick(p.stream_v_strides[2], p.v_strides[2]),
        ];
        let k = pick(p.stream_k as i64, p.k as i64) as u64;
        let v = pick(p.stream_v as i64, p.v as i64) as u64;
        let seqlen_k = pick(p.seqlen_k_stream as i64, p.seqlen_k as i64) as i32;
        let ends_k = pick(p.ends_k_stream as i64, p.ends_k as i64) as u64;
        // Varlen: this sequence's query rows from the prefix sums, its key rows from
        // `cu_seqlens_k` to `ends_k` (packed, or the first rows of its batch entry).
        let (start_q, seqlen_q, start_k, seqlen_k) = if varlen {
            let at = |cu: u64, i: i64| unsafe { ld_global_nc_u32(cu + 4 * i as u64) } as i32;
            let q0 = at(p.cu_seqlens_q, batch);
            let (k0, k_end) = (at(p.cu_seqlens_k, batch), at(ends_k, batch));
            (q0, at(p.cu_seqlens_q, batch + 1) - q0, k0, k_end - k0)
        } else {
            (0, p.seqlen_q, 0, seqlen_k)
        };
        let mask = HeadMask {
            streaming,
            causal: flag(p.causal as u32) != 0,
            sink: p.sink,
            window: flag(p.window as u32) as i32,
            right: flag(p.right as u32) as i32,
            seqlen_k,
        };
        let m0 = m_block * block_m;
        let offset = seqlen_k - seqlen_q;
        let lse_row0 = lse_row(p, batch, head, start_q);
        QueryTile {
            head,
            batch: batch as i32,
            mask,
            k_base: k + elem_offset(&k_strides, batch, start_k, kv_index, 0),
            v_base: v + elem_offset(&v_strides, batch, start_k, kv_index, 0),
            k_row_stride: k_strides[1],
            v_row_stride: v_strides[1],
            seqlen_k,
            seqlen_q,
            q: p.q + elem_offset(&p.q_strides, batch, start_q, head, 0),
            o: p.o + elem_offset(&p.o_strides, batch, start_q, head, 0),
            lse: p.lse + 4 * lse_row0 as u64,
            q_stride: p.q_strides[1],
            o_stride: p.o_strides[1],
            m0,
            offset,
            q_lo: offset + m0,
            q_hi: offset + min_i32(m0 + block_m, seqlen_q) - 1,
            q_row0: start_q,
            k_row0: start_k,
            kv_index,
            batch_coord: if k_strides[0] == 0 { 0 } else { batch as i32 },
            from_stream,
            kv_split: 0,
            kv_splits: 1,
            kv_splits_div: FastDiv::new(1),
        }
    }

    /// Q's TMA batch coordinate: varlen queries are one packed sequence (their K/V may not be).
    #[inline(always)]
    pub fn q_batch_coord(&self, p: &PrefillParams) -> i32 {
        if p.cu_seqlens_q != 0 {
            0
        } else {
            self.batch_coord
        }
    }

    /// No query row of this sequence falls in the tile (varlen: shorter than the longest).
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.m0 >= self.seqlen_q
    }

    /// One KV block's softmax step for this thread's rows: `softmax_scores` with the block test,
    /// then the output accumulator rescaled.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn softmax_step<const SN: usize, const ON: usize>(
        &self,
        s: &mut [f32; SN],
        o: &mut [f32; ON],
        state: &mut RowState,
        n0: i32,
        block_n: i32,
        q_pos: [i32; 2],
        t: usize,
        scale_log2: f32,
    ) {
        let alpha = self
            .softmax_scores::<MASK_TEST, false, SN>(s, state, n0, block_n, q_pos, t, scale_log2);
        rescale(o, alpha);
    }

    /// Masks the scores of keys `n0..n0 + block_n` as `MASK` says (`MASK_NONE`: the caller knows
    /// every row sees the whole block, no mask code; `MASK_KEYS`: element masks; `MASK_TEST`:
    /// element masks unless the block is fully visible to the whole tile), folds them into the
    /// running state (`s` becomes P) and returns the rows' rescale factors (`LAZY` as in
    /// `online_softmax`).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn softmax_scores<const MASK: u32, const LAZY: bool, const SN: usize>(
        &self,
        s: &mut [f32; SN],
        state: &mut RowState,
        n0: i32,
        block_n: i32,
        q_pos: [i32; 2],
        t: usize,
        scale_log2: f32,
    ) -> [f32; 2] {
        if MASK != MASK_NONE {
            let full = MASK == MASK_TEST
                && self
                    .mask
                    .block_fully_visible(self.q_lo, self.q_hi, n0, block_n);
            mask_scores(s, &self.mask, full, q_pos, n0, t);
        }
        online_softmax::<LAZY, SN>(s, state, scale_log2)
    }

    /// Normalises this thread's two rows of O (accumulator layout: element `4j + e` is row
    /// `rows[e / 2]`, column `8j + 2t + e % 2`) and writes them, plus the LSE from the quad leader.
    /// The quad trades words first (`quad_transpose`), so each thread writes 16 contiguous bytes
    /// per store: a quarter of the store instructions, full 32-byte sectors. Rows past the
    /// sequence are not written; the stores are predicated, not branched over, so the persistent
    /// kernel's accumulators are never read on a divergent path.
    #[inline(always)]
    pub fn store_rows<E: Element, const N: usize>(
        &self,
        o: &[f32; N],
        rows: [i32; 2],
        t: usize,
        inv: [f32; 2],
        lse: [f32; 2],
    ) {
        self.store_cols::<E, N>(o, rows, t, inv, 0);
        self.store_lse(rows, t, lse);
    }

    /// `store_rows` without the LSE, for an accumulator that holds columns `col0..col0 + N / 2`
    /// of O (a head dim split over several accumulators).
    #[inline(always)]
    pub fn store_cols<E: Element, const N: usize>(
        &self,
        o: &[f32; N],
        rows: [i32; 2],
        t: usize,
        inv: [f32; 2],
        col0: usize,
    ) {
        const { assert!(N % 16 == 0) };
        for r in 0..2 {
            let row = rows[r];
            let valid = row < self.seqlen_q;
            let o_row = self.o + row_offset(self.o_stride, min_i32(row, self.seqlen_q), col0);
            for group in 0..N / 16 {
                // This thread's words of columns 8j + 2t (+1) for j = 4 group + u.
                let words: [u32; 4] = core::array::from_fn(|u| {
                    let i = 4 * (4 * group + u) + 2 * r;
                    E::pack(o[i] * inv[r], o[i + 1] * inv[r])
                });
                // Columns 8j .. 8j + 7 for j = 4 group + t: 16 bytes.
                let chunk = quad_transpose(words, t);
                let addr = o_row + ((4 * group + t) * 16) as u64;
                unsafe { st_global_v4_u32_if(valid, addr, chunk) };
            }
        }
    }

    /// `store_cols`, or with `PARTIAL` (split-KV) `store_cols_f32`.
    #[inline(always)]
    pub fn store_o<E: Element, const PARTIAL: bool, const N: usize>(
        &self,
        o: &[f32; N],
        rows: [i32; 2],
        t: usize,
        inv: [f32; 2],
        col0: usize,
    ) {
        if PARTIAL {
            self.store_cols_f32::<N>(o, rows, t, inv, col0);
        } else {
            self.store_cols::<E, N>(o, rows, t, inv, col0);
        }
    }

    /// `store_cols` for split-KV partial rows: O normalised, as f32 pairs (8 bytes; a quad
    /// writes 32 contiguous bytes), at `o` with row stride `o_stride` f32.
    #[inline(always)]
    pub fn store_cols_f32<const N: usize>(
        &self,
        o: &[f32; N],
        rows: [i32; 2],
        t: usize,
        inv: [f32; 2],
        col0: usize,
    ) {
        for r in 0..2 {
            let row = rows[r];
            let valid = row < self.seqlen_q;
            let row_at = min_i32(row, self.seqlen_q) as i64 * self.o_stride + col0 as i64;
            let o_row = self.o + 4 * row_at as u64;
            for j in 0..N / 4 {
                let i = 4 * j + 2 * r;
                let addr = o_row + ((8 * j + 2 * t) * 4) as u64;
                unsafe { st_global_v2_f32_if(valid, addr, [o[i] * inv[r], o[i + 1] * inv[r]]) };
            }
        }
    }

    /// The LSE of this thread's two rows, written by the quad leader (rows past the sequence are
    /// not written).
    #[inline(always)]
    pub fn store_lse(&self, rows: [i32; 2], t: usize, lse: [f32; 2]) {
        for r in 0..2 {
            let valid = rows[r] < self.seqlen_q;
            // Partial rows of a split tile lie `kv_splits` apart (1 elsewhere: folds away).
            let addr = self.lse + 4 * (rows[r] * self.kv_splits) as u64;
            unsafe { st_global_f32_if(valid & (t == 0), addr, lse[r]) };
        }
    }
}

/// `out[k] = a[k ^ x]` for a runtime `x` in 0..4, with selects (no branch, no local memory).
#[inline(always)]
fn xor_permute(a: [u32; 4], x: usize) -> [u32; 4] {
    let (odd, high) = (x & 1 != 0, x & 2 != 0);
    let b: [u32; 4] = core::array::from_fn(|k| select_u32(odd, a[k ^ 1], a[k]));
    core::array::from_fn(|k| select_u32(high, b[k ^ 2], b[k]))
}

/// Transposes a 4 x 4 matrix of words held by the four threads of a quad: thread `t` passes in
/// row `t` (`m[t][0..4]`) and gets column `t` (`m[0..4][t]`). Three butterfly shuffles: round `k`
/// sends `m[t][t ^ k]` to thread `t ^ k`, which receives the `m[t ^ k][t]` it needs.
#[inline(always)]
fn quad_transpose(row: [u32; 4], t: usize) -> [u32; 4] {
    let send = xor_permute(row, t); // send[k] = m[t][t ^ k]
    let got: [u32; 4] = core::array::from_fn(|k| {
        if k == 0 {
            send[0]
        } else {
            shfl_xor_u32(send[k], k as u32)
        }
    }); // got[k] = m[t ^ k][t]
    xor_permute(got, t) // column t in row order: m[s][t] = got[s ^ t]
}
