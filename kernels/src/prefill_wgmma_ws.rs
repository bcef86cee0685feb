//! Warp-specialised Hopper prefill kernel (sm_90a), the default (`PrefillKernel::Auto`).
//! An intermittent deadlock under back-to-back launches was traced to the ping-pong leaving named
//! barrier 1 half-arrived at CTA exit (see docs/perf-log.md); both named barriers are balanced now.
//!
//! A work tile is `WG_BLOCK_M = 128` query rows of one head; it walks the KV blocks the head's
//! mask reaches (sink and window blocks only for streaming heads). The kernel is warp-specialised:
//! warpgroup 0 is the producer, warpgroups 1 and 2 are consumers (64 query rows each,
//! `setmaxnreg` up to 240 registers while the producer drops to 24 in the TMA build; 216 and 72
//! with cp.async, whose 128 producer threads need more). The
//! producer loads Q once per work tile, then K/V tiles of `BN` keys into a shared-memory ring
//! (three stages of 128 keys; of 48 at D = 256, see `ws_shape`), in one of two ways:
//! with TMA (`TMA = true`, the default) one thread issues bulk tensor copies through tensor maps
//! and the other producer warps leave; else all 128 producer threads copy 16-byte chunks with
//! cp.async (the fallback for operands TMA cannot address). The kernel is persistent: one block
//! per SM claims work tiles from a global counter (see `producer`). Each stage has a "full"
//! mbarrier (the producer's copies landed) and an "empty" one (both consumers done reading).
//! Named barriers alternate the consumers' GEMM issue (ping-pong), so one consumer's softmax
//! overlaps the other's tensor-core work, and each consumer issues S_i together with the previous
//! tile's O += P V, so its softmax also overlaps its own PV GEMM (FA3). The KV blocks every row
//! of a tile sees whole run in loops without mask code; only the others test keys. S = Q K^T is a
//! `wgmma m64nBNk16` with K K-major in shared memory. In the TMA build at D <= 128 each consumer
//! loads its Q rows into registers (A fragments) when a tile starts and releases Q's buffer at
//! once, so the next tile's Q loads while this one runs. At D = 256 it holds the first half of
//! its Q rows in registers (10 of its 16 k-steps already spill) and reads the rest from shared
//! memory: with 48-key blocks, reading all of Q there for every block made shared memory, not the
//! tensor cores, the bound. Q read from shared memory is released after the tile's last S GEMM.
//! P goes from the S accumulators straight into register A fragments for `O += P V`, with V read
//! N-major (transposed by wgmma). Work tiles overlap where they meet (`consumer`): the last PV of
//! a tile and the first S GEMM of the next go in one ping-pong turn, and the finished tile's
//! epilogue runs beside that S GEMM. Only the D = 256 split build ends each tile before the next
//! (`consumer_serial`: there the overlap spills).
//!
//! Q, K and V tiles lie in shared memory in the 128-byte-swizzled layout of
//! `smem_layout::swizzled`.
use crate::abi::{
    PrefillParams, TMA_BOX_COLS, TMA_K, TMA_MAPS, TMA_Q, TMA_STREAM_K, TMA_STREAM_V, TMA_V,
    TensorMap, TmaPrefillParams, WG_BLOCK_M, WS_CONSUMER_REGISTERS, WS_PRODUCER_REGISTERS,
    WS_TMA_CONSUMER_REGISTERS, WS_TMA_PRODUCER_REGISTERS, ws_barrier_offset,
};
use crate::device::*;
use crate::mask::BlockRange;
use crate::mma::{Bf16, Element, F16};
use crate::smem_layout::{descriptor, descriptor_plus, swizzled};
use crate::softmax::{RowState, alibi_slope_raw, finish, needs_rescale};
use crate::tile::{MASK_KEYS, MASK_NONE, MASK_TEST, QueryTile};
use crate::wgmma::{WgmmaElement, wgmma_commit, wgmma_fence, wgmma_wait};
use crate::ws_shape::{HeadDim, WsShape};
use core::arch::asm;

const BM: usize = WG_BLOCK_M;
/// Threads of the producer warpgroup, and of the two consumer warpgroups.
const PRODUCERS: usize = 128;
const CONSUMERS: usize = 256;

/// Starts async copies of rows `row0..row0 + rows` of a `[.., S, H, D]` operand (one head) into a
/// swizzled tile; rows at or past `limit` are zero-filled. The `PRODUCERS` producer threads share
/// the work: each keeps one 16-byte column chunk and walks rows `PRODUCERS / (D / 8)` apart, a
/// multiple of 8 (D <= 128), so its swizzle never changes and every address just steps (few
/// registers).
#[inline(always)]
unsafe fn load_tile<H: WsShape>(
    dst: u32,
    rows: usize,
    src: u64,
    seq_stride: i64,
    row0: i32,
    limit: i32,
    tid: usize,
) {
    let chunks = H::D / 8;
    let step_rows = PRODUCERS / chunks;
    let (chunk, first_row) = (tid % chunks, tid / chunks);
    let mut dst = dst + swizzled(rows, first_row, chunk);
    let mut pos = row0 + first_row as i32;
    let mut addr = src + ((pos as i64 * seq_stride + (chunk * 8) as i64) * 2) as u64;
    let step_bytes = (step_rows as i64 * seq_stride * 2) as u64;
    for _ in 0..rows / step_rows {
        let valid = pos < limit;
        unsafe {
            cp_async_16(
                dst,
                if valid { addr } else { src },
                if valid { 16 } else { 0 },
            )
        };
        dst += (step_rows * 128) as u32;
        pos += step_rows as i32;
        addr = addr.wrapping_add(step_bytes);
    }
}

/// Starts the TMA loads of one Q or K/V tile (`rows` rows from `row`, the map's box rows; all
/// `D` columns, one box per 64-column block) into a swizzled tile; they complete on `mbar`.
#[inline(always)]
unsafe fn tma_tile<H: WsShape>(
    dst: u32,
    rows: usize,
    map: u64,
    mbar: u32,
    [row, head, batch]: [i32; 3],
) {
    for block in 0..H::D / TMA_BOX_COLS {
        let dst = dst + (block * rows * 128) as u32;
        unsafe {
            tma_load_4d(
                dst,
                map,
                mbar,
                [(block * TMA_BOX_COLS) as i32, row, head, batch],
            )
        };
    }
}

/// TMA coordinates `[row, head, batch]` of key row `row` of the tile's K/V source, through the
/// block table where that source is paged (`PrefillParams::page_table`).
#[inline(always)]
unsafe fn kv_coords(p: &PrefillParams, tile: &QueryTile, row: i32, batch: i32) -> [i32; 3] {
    if p.page_table == 0 || tile.from_stream {
        return [row, tile.kv_index, batch];
    }
    let entry = batch as i64 * p.page_table_stride as i64 + (row >> p.page_shift) as i64;
    let page = unsafe { ld_global_nc_u32(p.page_table + 4 * entry as u64) } as i32;
    [row & ((1 << p.page_shift) - 1), tile.kv_index, page]
}

/// Zeroes rows `from..BN` of a swizzled K/V tile (whole rows: the swizzle stays inside a row's
/// 128 bytes of each 64-column block), 16 bytes per lane of the producer warp.
#[inline(always)]
unsafe fn zero_rows<H: WsShape>(tile: u32, from: i32, lane: usize) {
    let from = if from > 0 { from as u32 } else { 0 };
    let chunks = (H::BN as u32 - from.min(H::BN as u32)) * 8;
    for block in 0..H::D / TMA_BOX_COLS {
        let start = tile + (block * H::BN * 128) as u32 + from * 128;
        let mut c = lane as u32;
        while c < chunks {
            unsafe { st_shared_v4(start + 16 * c, [0; 4]) };
            c += 32;
        }
    }
}

/// Issues `O += P V` for one KV tile: P as register A fragments (k-step kk = keys 16kk..16kk+15),
/// V N-major in shared memory (head dim contiguous): LBO steps between 64-column blocks, SBO
/// between groups of 8 keys; a 128-column half of V starts two column blocks on.
#[inline(always)]
fn mma_pv<E: WgmmaElement, H: WsShape>(o: &mut H::O, pa: &H::P, v_tile: u32) {
    let v_base = descriptor(v_tile, (H::BN * 128) as u32, 1024);
    for (kk, a) in pa.as_ref().iter().enumerate() {
        let v = |half: usize| descriptor_plus(v_base, ((2 * half * H::BN + kk * 16) * 128) as u32);
        H::mma_pv_step::<E>(o, a, v);
    }
}

/// The KV blocks a work tile visits: `block_ranges`' (at most two) ranges as one index space.
#[derive(Clone, Copy)]
struct TileBlocks {
    ranges: [BlockRange; 2],
}

impl TileBlocks {
    /// With `SPLIT` (split-KV), only the tile's split's run of the query tile's blocks: the
    /// ranges are cut to it, so the rest of the kernel walks them as it walks a whole tile.
    #[inline(always)]
    fn of<const SPLIT: bool>(tile: &QueryTile, bn: usize) -> Self {
        let ranges = tile.mask.block_ranges(tile.q_lo, tile.q_hi, bn as i32);
        if !SPLIT {
            return TileBlocks { ranges };
        }
        let [first, second] = ranges;
        let (lo, hi) = tile.split_blocks(TileBlocks { ranges }.count(tile));
        // Indices `lo..hi` of `first ++ second`, as two ranges (each start <= end).
        let (f, n) = (first.len(), second.len());
        let clamp = |i: i32, len: i32| {
            if i < 0 {
                0
            } else if i > len {
                len
            } else {
                i
            }
        };
        TileBlocks {
            ranges: [
                BlockRange {
                    start: first.start + clamp(lo, f),
                    end: first.start + clamp(hi, f),
                },
                BlockRange {
                    start: second.start + clamp(lo - f, n),
                    end: second.start + clamp(hi - f, n),
                },
            ],
        }
    }

    /// How many; none for a tile with no query rows (a varlen sequence shorter than the longest).
    /// A select, not a branch: ptxas must see no divergent path between warpgroup MMAs, and
    /// these values come from memory (varlen).
    #[inline(always)]
    fn count(&self, tile: &QueryTile) -> i32 {
        let [first, second] = self.ranges;
        let blocks = first.len() + second.len();
        if tile.is_empty() { 0 } else { blocks }
    }

    /// The KV block at index `i`.
    #[inline(always)]
    fn n_block(&self, i: i32) -> i32 {
        let [first, second] = self.ranges;
        if i < first.len() {
            first.start + i
        } else {
            second.start + i - first.len()
        }
    }

    /// The two index ranges (ascending, within `0..blocks`, `blocks` the tile's count) of the
    /// blocks every row of the tile sees whole: the consumers run them without element-mask code.
    #[inline(always)]
    fn full_segments(&self, tile: &QueryTile, blocks: i32, bn: usize) -> [(i32, i32); 2] {
        let [first, second] = self.ranges;
        let [full_first, full_second] =
            tile.mask
                .full_block_ranges_of(self.ranges, tile.q_lo, tile.q_hi, bn as i32);
        let clamp = |i: i32| if i < blocks { i } else { blocks };
        // An empty full range sits at the end of its range, so the masked run before it covers
        // the whole range.
        let segment = |full: BlockRange, range: BlockRange, base: i32| {
            let (start, end) = if full.is_empty() {
                (range.len(), range.len())
            } else {
                (full.start - range.start, full.end - range.start)
            };
            (clamp(base + start), clamp(base + end))
        };
        [
            segment(full_first, first, 0),
            segment(full_second, second, first.len()),
        ]
    }
}

/// Shared-memory layout of one block: Q, the K/V ring, then the mbarriers and work slots.
struct Smem<H> {
    base: u32,
    shape: core::marker::PhantomData<H>,
}

impl<H> Clone for Smem<H> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<H> Copy for Smem<H> {}

impl<H: WsShape> Smem<H> {
    const STAGE_BYTES: u32 = (2 * H::BN * H::D * 2) as u32;

    fn new() -> Self {
        Smem {
            base: dynamic_shared_base(),
            shape: core::marker::PhantomData,
        }
    }
    fn q(self) -> u32 {
        self.base
    }
    fn k(self, stage: usize) -> u32 {
        self.base + (BM * H::D * 2) as u32 + stage as u32 * Self::STAGE_BYTES
    }
    fn v(self, stage: usize) -> u32 {
        self.k(stage) + (H::BN * H::D * 2) as u32
    }
    // mbarriers: Q full and Q empty (phase n: the block's n-th work tile), then per stage a full
    // (producer copies landed) and an empty (consumers done) barrier. Phase k of a stage's
    // barriers belongs to the block's K/V tile STAGES k + stage, counted across work tiles.
    fn barriers(self) -> u32 {
        self.base + ws_barrier_offset(H::D) as u32
    }
    fn q_full(self) -> u32 {
        self.barriers()
    }
    fn q_empty(self) -> u32 {
        self.barriers() + 8
    }
    fn full(self, stage: usize) -> u32 {
        self.barriers() + 8 * (2 + stage) as u32
    }
    fn empty(self, stage: usize) -> u32 {
        self.barriers() + 8 * (2 + H::STAGES + stage) as u32
    }
    /// Work slots (u32, after the barriers): the work index of the block's n-th tile for the
    /// consumers at slot n % 2, the cp.async producers' broadcast of the next claim at
    /// slot 2 + n % 2, and the tile's KV block count at slot 4 + n % 2.
    fn work_slot(self, n: i32) -> u32 {
        self.barriers() + (8 * (2 + 2 * H::STAGES)) as u32 + 4 * (n & 1) as u32
    }
    fn claim_slot(self, n: i32) -> u32 {
        self.work_slot(n) + 8
    }
    fn blocks_slot(self, n: i32) -> u32 {
        self.work_slot(n) + 16
    }
    /// The producer's own barrier for a KV tile whose V tail it zeroes (the cache entries) before
    /// it arrives at the stage's full barrier itself; phase n: the n-th such tile.
    fn tail(self) -> u32 {
        self.work_slot(0) + 24
    }
}

/// Generic address of tensor map `i` (`TMA_Q..TMA_STREAM_V`) of the maps at `maps`.
fn tensor_map(maps: u64, i: usize) -> u64 {
    maps + (i * size_of::<TensorMap>()) as u64
}

/// Ring stage and full/empty phase parity of the block's K/V tile `g` (counted across work tiles).
fn stage_of<H: WsShape>(g: i32) -> usize {
    (g % H::STAGES as i32) as usize
}
fn parity<H: WsShape>(g: i32) -> u32 {
    ((g / H::STAGES as i32) & 1) as u32
}

/// The kernel body, one instantiation per (element, head dim, loads); `maps` is the generic
/// address of the `TMA_MAPS` tensor maps (`TmaPrefillParams`) when `TMA`.
#[inline(always)]
unsafe fn prefill_wgmma<
    E: Element + WgmmaElement,
    H: WsShape,
    const TMA: bool,
    const SPLIT: bool,
    const CACHE: bool,
>(
    p: &PrefillParams,
    maps: u64,
) {
    const {
        assert!(ws_barrier_offset(H::D) == BM * H::D * 2 + H::STAGES * 2 * H::BN * H::D * 2);
        // KV blocks of whole PV k-steps (16 keys) and swizzle atoms (8 rows); at most 128 keys.
        assert!(H::D % TMA_BOX_COLS == 0 && H::BN.is_multiple_of(16) && H::BN <= 128);
    };
    let smem = Smem::<H>::new();
    let tid = thread_idx_x() as usize;
    // <= i32::MAX / 2, checked by the host.
    let work_tiles = p.m_blocks * p.heads_q * p.batch * if SPLIT { p.kv_splits } else { 1 };
    if tid == 0 {
        unsafe {
            // Full barriers: with TMA, the loading thread's arrival (with the expected bytes);
            // else every producer's cp.async arrival, and for Q thread 0's, which publishes the
            // work slot.
            let loaders = if TMA { 0 } else { PRODUCERS as u32 };
            mbarrier_init(smem.q_full(), loaders + 1);
            mbarrier_init(smem.q_empty(), CONSUMERS as u32);
            for stage in 0..H::STAGES {
                mbarrier_init(smem.full(stage), loaders.max(1));
                mbarrier_init(smem.empty(stage), CONSUMERS as u32);
            }
            if CACHE {
                mbarrier_init(smem.tail(), 1);
            }
            if TMA {
                for i in 0..TMA_MAPS {
                    prefetch_tensormap(tensor_map(maps, i));
                }
            }
        }
    }
    sync_threads();

    // The warpgroup's role, broadcast from lane 0 so ptxas knows it is warp-uniform (a branch it
    // cannot prove uniform around the consumers' loop makes it serialize every wgmma: C7520).
    let warpgroup = warp_broadcast_u32((tid / 128) as u32) as usize;
    if warpgroup == 0 {
        if TMA {
            setmaxnreg_dec::<WS_TMA_PRODUCER_REGISTERS>();
        } else {
            setmaxnreg_dec::<WS_PRODUCER_REGISTERS>();
        }
        // With TMA, the first warp runs the loop (one thread issues) and the others leave.
        if !TMA || tid < 32 {
            unsafe { producer::<H, TMA, SPLIT, CACHE>(p, smem, maps, tid, work_tiles) };
        }
    } else {
        if TMA {
            setmaxnreg_inc::<WS_TMA_CONSUMER_REGISTERS>();
        } else {
            setmaxnreg_inc::<WS_CONSUMER_REGISTERS>();
        }
        // The subtraction in u32: in usize its high word (a borrow to LLVM) stayed live through
        // the consumer loop for the exit test, and the D = 256 split build spilled it.
        let (wg, wtid) = ((warpgroup as u32 - 1) as usize, tid % 128);
        match (TMA && H::Q_IN_REGISTERS, overlap_tiles::<H, SPLIT>()) {
            (true, true) => unsafe { consumer::<E, H, TMA, true, SPLIT>(p, smem, wg, wtid) },
            (false, true) => unsafe { consumer::<E, H, TMA, false, SPLIT>(p, smem, wg, wtid) },
            (true, false) => unsafe {
                consumer_serial::<E, H, TMA, true, SPLIT>(p, smem, wg, wtid)
            },
            (false, false) => unsafe {
                consumer_serial::<E, H, TMA, false, SPLIT>(p, smem, wg, wtid)
            },
        }
    }
}

/// The producer: claims work tiles from the global counter (the first is the block index), in
/// `from_work`'s order, so the blocks running at once work on neighbouring tiles (L2) and a block
/// that finishes early takes the next tile (balance). Per tile: Q once the consumers are done with
/// the previous Q, then every KV tile into an emptied stage. Run by the 128 producer threads
/// (cp.async) or by the first producer warp, whose thread 0 issues every copy (TMA).
#[inline(always)]
unsafe fn producer<H: WsShape, const TMA: bool, const SPLIT: bool, const CACHE: bool>(
    p: &PrefillParams,
    smem: Smem<H>,
    maps: u64,
    tid: usize,
    work_tiles: i32,
) {
    let map = |i: usize| tensor_map(maps, i);
    // load_tile's fixed-swizzle walk needs whole rows per pass and a row step that is a multiple
    // of 8 (D <= 128: D = 256 has only the TMA build).
    const { assert!(TMA || (PRODUCERS % (H::D / 8) == 0 && (PRODUCERS / (H::D / 8)) % 8 == 0)) };
    let (mut kv_tiles, mut q_tiles, mut tails) = (0i32, 0i32, 0u32);
    let mut work = block_idx_x() as i32;
    loop {
        unsafe {
            if q_tiles > 0 {
                mbarrier_wait(smem.q_empty(), ((q_tiles - 1) & 1) as u32);
            }
        }
        if work >= work_tiles {
            unsafe {
                // -1 tells the consumers to stop (they need no tile count, which would live
                // across `setmaxnreg` and was spilled in the cp.async build).
                if tid == 0 {
                    st_shared_u32(smem.work_slot(q_tiles), u32::MAX);
                    if overlap_tiles::<H, SPLIT>() {
                        st_shared_u32(smem.blocks_slot(q_tiles), 0);
                    }
                    mbarrier_arrive(smem.q_full());
                }
                if !TMA {
                    mbarrier_arrive(smem.q_full()); // no Q: the consumers stop
                }
            }
            break;
        }
        // Release: the slots are visible with the phase (which the Q bytes complete). With
        // `overlap_tiles` the tile's KV block count goes with its work index, so that consumers
        // start its first S GEMM before they have worked out the tile; else the index is
        // published before the producer works out the tile, so it is not live across that (the
        // producer has 24 registers, and D = 256 spilled).
        let publish = |blocks: i32| {
            if tid == 0 {
                unsafe {
                    st_shared_u32(smem.work_slot(q_tiles), work as u32);
                    if overlap_tiles::<H, SPLIT>() {
                        st_shared_u32(smem.blocks_slot(q_tiles), blocks as u32);
                    }
                    if TMA {
                        mbarrier_arrive_expect_tx(smem.q_full(), (BM * H::D * 2) as u32);
                    } else {
                        mbarrier_arrive(smem.q_full());
                    }
                }
            }
        };
        if !overlap_tiles::<H, SPLIT>() {
            publish(0);
        }
        let tile = QueryTile::from_work::<SPLIT>(p, BM as i32, H::D, work);
        let visited = TileBlocks::of::<SPLIT>(&tile, H::BN);
        let blocks = visited.count(&tile);
        if overlap_tiles::<H, SPLIT>() {
            publish(blocks);
        }
        let (k_map, v_map) = if tile.from_stream {
            (map(TMA_STREAM_K), map(TMA_STREAM_V))
        } else {
            (map(TMA_K), map(TMA_V))
        };
        let batch = tile.batch_coord;
        unsafe {
            if !TMA {
                let (q, stride) = (tile.q, tile.q_stride);
                load_tile::<H>(smem.q(), BM, q, stride, tile.m0, tile.seqlen_q, tid);
                cp_async_mbarrier_arrive(smem.q_full());
            } else if tid == 0 {
                let row = tile.q_row0 + tile.m0;
                let at = [row, tile.head, tile.q_batch_coord(p)];
                tma_tile::<H>(smem.q(), BM, map(TMA_Q), smem.q_full(), at);
            }
        }
        for i in 0..blocks {
            let g = kv_tiles + i;
            let stage = stage_of::<H>(g);
            let n0 = visited.n_block(i) * H::BN as i32;
            let (k, v, full) = (smem.k(stage), smem.v(stage), smem.full(stage));
            unsafe {
                if g >= H::STAGES as i32 {
                    mbarrier_wait(smem.empty(stage), parity::<H>(g - H::STAGES as i32));
                }
                if !TMA {
                    let (len, k_stride, v_stride) =
                        (tile.seqlen_k, tile.k_row_stride, tile.v_row_stride);
                    load_tile::<H>(k, H::BN, tile.k_base, k_stride, n0, len, tid);
                    load_tile::<H>(v, H::BN, tile.v_base, v_stride, n0, len, tid);
                    cp_async_mbarrier_arrive(full);
                } else {
                    // Warp-uniform: the block ends past the sequence's keys, whose rows a caller's
                    // cache may fill with anything (NaN: 0 x NaN in P V). Only the cache
                    // entries: the others' code stays as it was (ptxas scheduled the plain
                    // kernel's consumers differently with it, 1% slower at full causal 32k).
                    let tail = CACHE && n0 + H::BN as i32 > tile.seqlen_k;
                    if tid == 0 {
                        let landed = if tail { smem.tail() } else { full };
                        mbarrier_arrive_expect_tx(landed, Smem::<H>::STAGE_BYTES);
                        let row = tile.k_row0 + n0;
                        let at = if CACHE {
                            kv_coords(p, &tile, row, batch)
                        } else {
                            [row, tile.kv_index, batch]
                        };
                        tma_tile::<H>(k, H::BN, k_map, landed, at);
                        tma_tile::<H>(v, H::BN, v_map, landed, at);
                    }
                    if tail {
                        mbarrier_wait(smem.tail(), tails & 1);
                        tails += 1;
                        zero_rows::<H>(v, tile.seqlen_k - n0, tid);
                        fence_proxy_async_shared(); // the zeros before wgmma's (async) reads
                        sync_warp();
                        if tid == 0 {
                            mbarrier_arrive(full);
                        }
                    }
                }
            }
        }
        kv_tiles += blocks;
        // Claim the next tile and broadcast it: a shuffle within the TMA warp; for the cp.async
        // warpgroup two shared slots, so a fast thread 0 never overwrites the claim others still
        // read.
        let mut claimed = 0;
        if tid == 0 {
            claimed = unsafe { atom_add_u32(p.work_counter, 1) } + grid_dim_x();
        }
        if TMA {
            work = warp_broadcast_u32(claimed) as i32;
        } else {
            if tid == 0 {
                unsafe { st_shared_u32(smem.claim_slot(q_tiles), claimed) };
            }
            named_barrier_sync(3, PRODUCERS as u32);
            work = unsafe { ld_shared_u32(smem.claim_slot(q_tiles)) } as i32;
        }
        q_tiles += 1;
    }
    if !TMA {
        cp_async_wait::<0>();
    }
    // The last block to stop claiming resets the counters for the next launch (every other block
    // has made its final claim before counting itself done).
    if tid == 0 {
        fence_acq_rel_gpu();
        let done = unsafe { atom_add_u32(p.work_counter + 4, 1) };
        if done == grid_dim_x() - 1 {
            fence_acq_rel_gpu();
            unsafe {
                st_global_u32(p.work_counter, 0);
                st_global_u32(p.work_counter + 4, 0);
            }
        }
    }
}

/// Waits until K/V tile `g` of the ring has landed in `full` (phase `parity`).
#[inline(always)]
unsafe fn wait_kv<const TMA: bool>(full: u32, parity: u32) {
    unsafe { mbarrier_wait(full, parity) };
    if !TMA {
        fence_proxy_async_shared(); // cp.async (generic proxy) data -> wgmma (async proxy)
    }
}

/// K-steps of the S GEMM whose Q fragments a consumer holds in registers when `QREG`: all of them
/// at D <= 128; the first 8 (head-dim columns 0..128) at D = 256, where all 16 would not fit
/// beside O. The rest is read from shared memory.
const Q_REGISTER_STEPS: usize = 8;

/// A consumer's register copy of Q: one A fragment per k-step.
type QFragments = [[u32; 4]; Q_REGISTER_STEPS];

/// Whether a consumer holding Q in registers (`QREG`) holds all of it, so that Q's buffer is free
/// as soon as the tile starts; else it is released after the tile's last S GEMM.
#[inline(always)]
const fn q_whole_in_registers<H: WsShape, const QREG: bool>() -> bool {
    QREG && H::D / 16 <= Q_REGISTER_STEPS
}

/// Q (consumer `wg`'s 64 rows) as the register A fragments of the S GEMM's first
/// `Q_REGISTER_STEPS` k-steps (zero past D / 16), read with ldmatrix from the swizzled tile:
/// lanes 8i..8i+7 address matrix i, rows 0-7 | 8-15 of the warp's 16 by key-dim columns 0-7 |
/// 8-15 of the k-step.
#[inline(always)]
unsafe fn q_fragments<H: WsShape>(smem: Smem<H>, wg: usize, wtid: usize) -> QFragments {
    let lane = wtid % 32;
    let row = 64 * wg + 16 * (wtid / 32) + lane % 8 + 8 * ((lane / 8) % 2);
    core::array::from_fn(|kk| {
        if kk < H::D / 16 {
            let chunk = 2 * kk + lane / 16;
            unsafe { ldmatrix_x4(smem.q() + swizzled(BM, row, chunk)) }
        } else {
            [0; 4]
        }
    })
}

/// Issues S = Q K^T for consumer `wg`'s 64 query rows and the BN keys of `stage`: D / 16
/// k-steps, K K-major in shared memory; Q from the registers `q` when `QREG` (its first
/// `Q_REGISTER_STEPS` k-steps), else K-major in shared memory too.
#[inline(always)]
fn mma_qk<E: WgmmaElement, H: WsShape, const QREG: bool>(
    s: &mut H::S,
    smem: Smem<H>,
    wg: usize,
    stage: usize,
    q: &QFragments,
) {
    let k_base = descriptor(smem.k(stage), 16, 1024);
    let q_base = descriptor(smem.q() + (wg * 64 * 128) as u32, 16, 1024);
    for kk in 0..H::D / 16 {
        let (block, within) = ((kk / 4) as u32, (kk % 4) as u32 * 32);
        let b = descriptor_plus(k_base, block * (H::BN * 128) as u32 + within);
        if QREG && kk < Q_REGISTER_STEPS {
            // S was zeroed by the caller: every k-step accumulates.
            H::mma_qk_rs_step::<E>(s, &q[kk], b);
        } else {
            let a = descriptor_plus(q_base, block * (BM * 128) as u32 + within);
            H::mma_qk_step::<E>(s, a, b, (kk > 0) as u32);
        }
    }
}

/// What a consumer thread's softmax of one KV block needs besides the scores (the tile, its two
/// rows, its place in the quad, the scale).
struct SoftmaxStep<'a> {
    tile: &'a QueryTile,
    q_pos: [i32; 2],
    t: usize,
    scale_log2: f32,
    /// ALiBi builds: the tile's `-slope / softmax_scale` (`softmax::alibi_scores`).
    alibi_slope_raw: f32,
}

impl SoftmaxStep<'_> {
    /// `s` (raw scores of KV block `n_block`) becomes P; returns the rows' rescale factors.
    /// `MASK` as in `QueryTile::softmax_scores`.
    #[inline(always)]
    fn run<H: WsShape, const MASK: u32>(
        &self,
        s: &mut H::S,
        state: &mut RowState,
        n_block: i32,
    ) -> [f32; 2] {
        let n0 = n_block * H::BN as i32;
        H::softmax::<MASK>(
            self.tile,
            s,
            state,
            n0,
            self.q_pos,
            self.t,
            self.scale_log2,
            self.alibi_slope_raw,
        )
    }
}

/// What one consumer carries through a work tile's KV blocks.
struct TileLoop<'a, H> {
    smem: Smem<H>,
    wg: usize,
    my_turn: u32,
    their_turn: u32,
    /// The block's K/V tile count before this work tile (ring position of its block 0).
    kv_tiles: i32,
    blocks: i32,
    step: SoftmaxStep<'a>,
    /// Q's A fragments when the consumer holds Q in registers.
    q: &'a QFragments,
}

impl<H: WsShape> TileLoop<'_, H> {
    /// KV block `i >= 1` of the tile: S_i with O += P_{i-1} V_{i-1} in one ping-pong turn, softmax_i
    /// while that PV runs, then the rescale. `MASK` as in `QueryTile::softmax_scores`.
    #[inline(always)]
    unsafe fn block<
        E: Element + WgmmaElement,
        const TMA: bool,
        const MASK: u32,
        const QREG: bool,
    >(
        &self,
        i: i32,
        n_block: i32,
        o: &mut H::O,
        state: &mut RowState,
        pa: &mut H::P,
    ) {
        let (smem, g) = (self.smem, self.kv_tiles + i);
        let stage = stage_of::<H>(g);
        unsafe { wait_kv::<TMA>(smem.full(stage), parity::<H>(g)) };

        named_barrier_sync(self.my_turn, CONSUMERS as u32);
        let mut s = H::zero_s();
        H::fence_s(&mut s);
        H::fence_o(o);
        wgmma_fence();
        mma_qk::<E, H, QREG>(&mut s, smem, self.wg, stage, self.q);
        wgmma_commit();
        mma_pv::<E, H>(o, pa, smem.v(stage_of::<H>(g - 1)));
        wgmma_commit();
        named_barrier_arrive(self.their_turn, CONSUMERS as u32);
        wgmma_wait::<1>(); // S_i is done; P_{i-1} V_{i-1} may still run
        H::fence_s(&mut s);
        if i == self.blocks - 1 && !q_whole_in_registers::<H, QREG>() {
            // The tile's last S GEMM is done: Q may be overwritten. Releasing it here rather
            // than after the last PV and the epilogue hides the next Q load behind them.
            unsafe { mbarrier_arrive(smem.q_empty()) };
        }
        let alpha = self.step.run::<H, MASK>(&mut s, state, n_block);

        wgmma_wait::<0>();
        H::fence_o(o);
        unsafe { mbarrier_arrive(smem.empty(stage_of::<H>(g - 1))) }; // K and V of g - 1 are read
        // No wgmma runs here, so this warp-uniform branch costs ptxas nothing.
        if !H::LAZY_RESCALE || needs_rescale(alpha) {
            H::rescale(o, alpha);
        }
        *pa = H::p_fragments::<E>(&s);
    }
}

/// A work tile's last `O += P V` (on K/V stage `stage`), alone; then the stage is released.
#[inline(always)]
unsafe fn last_pv<E: WgmmaElement, H: WsShape>(
    o: &mut H::O,
    pa: &H::P,
    smem: Smem<H>,
    stage: usize,
) {
    H::fence_o(o);
    wgmma_fence();
    mma_pv::<E, H>(o, pa, smem.v(stage));
    wgmma_commit();
    wgmma_wait::<0>();
    H::fence_o(o);
    unsafe { mbarrier_arrive(smem.empty(stage)) };
}

/// The epilogue of work tile `work` (none when negative: nothing is stored): this thread's rows
/// of O, normalised, and their LSE. The output addresses are worked out again from the work index
/// rather than carried through the KV loop: at D = 256 (O alone 128 registers) the consumer
/// otherwise spills. Branch-free (`finish`, predicated stores): it may run while the next tile's
/// first S GEMM is in flight.
#[inline(always)]
unsafe fn store_tile<E: Element, H: WsShape, const SPLIT: bool>(
    p: &PrefillParams,
    work: i32,
    o: &H::O,
    state: &RowState,
    row_in_tile: i32,
    t: usize,
) {
    let any = if work < 0 { 0 } else { work };
    let mut tile = QueryTile::from_work::<SPLIT>(p, BM as i32, H::D, any);
    tile.seqlen_q = select_u32(work < 0, 0, tile.seqlen_q as u32) as i32; // no rows
    let row = tile.m0 + row_in_tile;
    let (inv, lse) = finish(state);
    H::store::<E, SPLIT>(&tile, o, [row, row + 8], t, inv, lse);
}

/// A consumer thread's place: its warpgroup, its thread in it, its quad position, its first row
/// in a work tile (the second is 8 on) and its ping-pong barriers.
#[derive(Clone, Copy)]
struct ConsumerThread {
    wg: usize,
    wtid: usize,
    t: usize,
    row_in_tile: i32,
    my_turn: u32,
    their_turn: u32,
}

impl ConsumerThread {
    /// Ping-pong: consumer w issues its GEMMs after passing named barrier 1 + w, which the other
    /// consumer arrives at once it has issued its own S GEMM. Consumer 1 lets 0 go first. Both
    /// consumers walk the same KV tiles, so the alternation runs on across work tiles.
    #[inline(always)]
    fn new(wg: usize, wtid: usize) -> Self {
        let lane = lane_id() as usize;
        let me = ConsumerThread {
            wg,
            wtid,
            t: lane % 4,
            row_in_tile: (64 * wg + 16 * (wtid / 32) + lane / 4) as i32,
            my_turn: 1 + wg as u32,
            their_turn: 2 - wg as u32,
        };
        if wg == 1 {
            named_barrier_arrive(me.their_turn, CONSUMERS as u32);
        }
        me
    }

    /// Balances the ping-pong at exit: consumer 1 arrived at barrier 1 once more than consumer 0
    /// synced there (its first arrival lets consumer 0 start). A CTA must not exit with a named
    /// barrier half arrived: a later CTA on the same SM could find the stale arrivals and pass
    /// barrier 1 out of turn, which deadlocks the pair (the intermittent hang seen in
    /// back-to-back launches before this sync existed).
    #[inline(always)]
    fn balance_ping_pong(self) {
        if self.wg == 0 {
            named_barrier_sync(self.my_turn, CONSUMERS as u32);
        }
    }

    /// With Q in registers (`QREG`), its A fragments, read at tile start. When they are all of Q
    /// (D <= 128) the buffer is released at once (unless `release` is false: no tile), so the
    /// producer loads the next tile's Q while this one runs (else consumers waited for it at each
    /// tile switch: 6% of a streaming layer's consumer time, ncu).
    #[inline(always)]
    unsafe fn q_registers<H: WsShape, const QREG: bool>(
        self,
        smem: Smem<H>,
        release: bool,
    ) -> QFragments {
        if QREG {
            let q = unsafe { q_fragments::<H>(smem, self.wg, self.wtid) };
            fence_proxy_async_shared(); // these reads before the TMA rewrite of the buffer
            if q_whole_in_registers::<H, QREG>() && release {
                unsafe { mbarrier_arrive(smem.q_empty()) };
            }
            q
        } else {
            [[0; 4]; Q_REGISTER_STEPS]
        }
    }

    /// Issues a tile's S_0 (block 0 on ring stage `stage` of the block's K/V tile `g`) in this
    /// consumer's turn and waits for it.
    #[inline(always)]
    unsafe fn first_scores<E: WgmmaElement, H: WsShape, const TMA: bool, const QREG: bool>(
        self,
        smem: Smem<H>,
        g: i32,
        q: &QFragments,
    ) -> H::S {
        let stage = stage_of::<H>(g);
        unsafe { wait_kv::<TMA>(smem.full(stage), parity::<H>(g)) };
        named_barrier_sync(self.my_turn, CONSUMERS as u32);
        let mut s = H::zero_s();
        H::fence_s(&mut s);
        wgmma_fence();
        mma_qk::<E, H, QREG>(&mut s, smem, self.wg, stage, q);
        wgmma_commit();
        named_barrier_arrive(self.their_turn, CONSUMERS as u32);
        wgmma_wait::<0>();
        s
    }

    /// A work tile's KV blocks from S_0 (done, in `s`) on: softmax_0, then blocks 1.. Returns O
    /// without the last block's PV, that block's P and the row state.
    ///
    /// FA3-style lag: iteration i issues S_i together with O += P_{i-1} V_{i-1}, then runs
    /// softmax_i while that PV is on the tensor cores. With O~_i = alpha_i (O~_{i-1} +
    /// P_{i-1} V_{i-1}), the final O is O~_last + P_last V_last, issued by the caller. Block 0
    /// (S_0 alone) is peeled off the loop: with a PV issue under `if i > 0`, ptxas closes the
    /// second batch with a dummy HGMMA on every iteration, and the wait for S_i then waited for
    /// P_{i-1} V_{i-1} too, losing the overlap (seen in the SASS and in ncu's stall sampling: the
    /// dummy and that wait held 16% of all stall samples).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile_blocks<
        E: Element + WgmmaElement,
        H: WsShape,
        const TMA: bool,
        const QREG: bool,
        const SPLIT: bool,
    >(
        self,
        p: &PrefillParams,
        smem: Smem<H>,
        tile: &QueryTile,
        blocks: i32,
        mut s: H::S,
        kv_tiles: i32,
        q: &QFragments,
    ) -> (H::O, H::P, RowState) {
        let visited = TileBlocks::of::<SPLIT>(tile, H::BN);
        let n_block = |i: i32| visited.n_block(i);
        let rows = [tile.m0 + self.row_in_tile, tile.m0 + self.row_in_tile + 8];
        let q_pos = [tile.offset + rows[0], tile.offset + rows[1]];
        let mut state = RowState::new();
        let step = SoftmaxStep {
            tile,
            q_pos,
            t: self.t,
            scale_log2: p.scale_log2,
            alibi_slope_raw: if H::ALIBI {
                let at = (tile.batch * p.alibi_batch_stride + tile.head) as u64;
                unsafe { alibi_slope_raw(p.alibi_slopes, at, p.alibi_neg_inv_scale) }
            } else {
                0.0
            },
        };
        let mut o = H::zero_o();
        let mut pa = H::zero_p();
        if blocks > 0 {
            H::fence_s(&mut s);
            if blocks == 1 && !q_whole_in_registers::<H, QREG>() {
                unsafe { mbarrier_arrive(smem.q_empty()) }; // see TileLoop::block
            }
            step.run::<H, MASK_TEST>(&mut s, &mut state, n_block(0)); // O is 0: no rescale
            pa = H::p_fragments::<E>(&s);
        } else if !q_whole_in_registers::<H, QREG>() {
            unsafe { mbarrier_arrive(smem.q_empty()) }; // a tile without KV blocks never read Q
        }
        // Blocks 1.. in runs: partially visible blocks (element masks) and fully visible ones
        // (no mask code at all: a mask test in the loop cost 5-6% of full causal attention).
        let tile_loop = TileLoop::<H> {
            smem,
            wg: self.wg,
            my_turn: self.my_turn,
            their_turn: self.their_turn,
            kv_tiles,
            blocks,
            step,
            q,
        };
        let full = visited.full_segments(tile, blocks, H::BN);
        let mut next = 1;
        // Three runs of (masked, full) blocks, the last full run empty. The count is opaque to
        // LLVM so that it keeps one copy of each loop body instead of unrolling five.
        for run in 0..opaque_i32(3) {
            let (full_start, full_end) = match run {
                0 => full[0],
                1 => full[1],
                _ => (blocks, blocks),
            };
            for i in next..full_start {
                unsafe {
                    tile_loop.block::<E, TMA, MASK_KEYS, QREG>(
                        i,
                        n_block(i),
                        &mut o,
                        &mut state,
                        &mut pa,
                    )
                };
            }
            let from = if full_start > next { full_start } else { next };
            for i in from..full_end {
                unsafe {
                    tile_loop.block::<E, TMA, MASK_NONE, QREG>(
                        i,
                        n_block(i),
                        &mut o,
                        &mut state,
                        &mut pa,
                    )
                };
            }
            if full_end > next {
                next = full_end;
            }
        }
        (o, pa, state)
    }
}

/// Whether a consumer issues a work tile's first S GEMM together with the previous tile's last PV
/// GEMM and runs that tile's epilogue meanwhile (S, O and P live at once, as in the KV loop, plus
/// the epilogue's addresses). Every build but the D = 256 split one, whose consumer then spills
/// three words (two of Q's fragment addresses and a parameter); it runs serial tiles. (Loading Q's
/// second column block at an immediate offset frees two addresses and made it fit, but the plain
/// D = 256 kernel then ran 4% slower and D = 128 mixed 8k 5-10%, while the split chunks gained
/// nothing measurable: session 20.)
const fn overlap_tiles<H: WsShape, const SPLIT: bool>() -> bool {
    !(SPLIT && H::D > 128)
}

/// The work index of the block's `q_tiles`-th tile (negative: stop), once the producer has
/// published it with the tile's Q. Broadcast from lane 0, so ptxas sees a warp-uniform loop exit.
#[inline(always)]
unsafe fn next_work<H: WsShape>(smem: Smem<H>, q_tiles: i32) -> i32 {
    unsafe {
        mbarrier_wait(smem.q_full(), (q_tiles & 1) as u32);
        warp_broadcast_u32(ld_shared_u32(smem.work_slot(q_tiles))) as i32
    }
}

/// Consumer warpgroup `wg` (0 or 1; `wtid` its thread): 64 query rows of each work tile the
/// producer publishes, until it publishes none. Work tiles overlap where they meet
/// (`overlap_tiles`): one ping-pong turn issues the last `O += P V` of a tile together
/// with the first S GEMM of the next (the producer publishes each tile's KV block count beside
/// its work index, so that GEMM starts before the consumer has worked out the tile), and the
/// finished tile's epilogue runs while that S GEMM is on the tensor cores.
#[inline(always)]
unsafe fn consumer<
    E: Element + WgmmaElement,
    H: WsShape,
    const TMA: bool,
    const QREG: bool,
    const SPLIT: bool,
>(
    p: &PrefillParams,
    smem: Smem<H>,
    wg: usize,
    wtid: usize,
) {
    let me = ConsumerThread::new(wg, wtid);
    let (mut kv_tiles, mut q_tiles) = (0i32, 0i32);
    // The previous work tile (-1: none yet) and its KV block count; its O, the P of its last
    // block and its row state stay live until its epilogue, at the start of the next tile.
    let (mut prev_work, mut prev_blocks) = (-1i32, 0i32);
    let mut o = H::zero_o();
    let mut state = RowState::new();
    let mut pa = H::zero_p();
    loop {
        let work = unsafe { next_work(smem, q_tiles) };
        // Broadcast, so ptxas sees warp-uniform branches around the GEMMs.
        let blocks = warp_broadcast_u32(unsafe { ld_shared_u32(smem.blocks_slot(q_tiles)) }) as i32;
        let q = unsafe { me.q_registers::<H, QREG>(smem, work >= 0) };
        let epilogue = |o: &H::O, state: &RowState| unsafe {
            store_tile::<E, H, SPLIT>(p, prev_work, o, state, me.row_in_tile, me.t)
        };
        // The previous tile's last PV (on its last stage) and this tile's S_0 (on the next).
        let last = stage_of::<H>(kv_tiles + H::STAGES as i32 - 1);
        let overlapped = blocks > 0 && prev_blocks > 0;
        let mut s = if overlapped {
            // The usual case. Only here does a wgmma run on past a branch: ptxas serializes
            // every wgmma of the kernel (C7520) where paths that meet differ in what is in
            // flight, or where a branch touches accumulators while a wgmma runs (so `finish`
            // and the stores are branch-free).
            let first = stage_of::<H>(kv_tiles);
            unsafe { wait_kv::<TMA>(smem.full(first), parity::<H>(kv_tiles)) };
            named_barrier_sync(me.my_turn, CONSUMERS as u32);
            let mut s = H::zero_s();
            H::fence_s(&mut s);
            H::fence_o(&mut o);
            wgmma_fence();
            mma_pv::<E, H>(&mut o, &pa, smem.v(last));
            wgmma_commit();
            mma_qk::<E, H, QREG>(&mut s, smem, wg, first, &q);
            wgmma_commit();
            named_barrier_arrive(me.their_turn, CONSUMERS as u32);
            wgmma_wait::<1>(); // the PV is done; S_0 may still run
            H::fence_o(&mut o);
            unsafe { mbarrier_arrive(smem.empty(last)) };
            epilogue(&o, &state);
            wgmma_wait::<0>();
            s
        } else {
            // The first tile, a tile after one without KV blocks, the end: one after the other,
            // S_0 below.
            if prev_blocks > 0 {
                unsafe { last_pv::<E, H>(&mut o, &pa, smem, last) };
            }
            epilogue(&o, &state);
            H::zero_s()
        };
        if work < 0 {
            break;
        }
        let tile = QueryTile::from_work::<SPLIT>(p, BM as i32, H::D, work);
        if !overlapped && blocks > 0 {
            s = unsafe { me.first_scores::<E, H, TMA, QREG>(smem, kv_tiles, &q) };
        }
        (o, pa, state) = unsafe {
            me.tile_blocks::<E, H, TMA, QREG, SPLIT>(p, smem, &tile, blocks, s, kv_tiles, &q)
        };
        (prev_work, prev_blocks) = (work, blocks);
        kv_tiles += blocks;
        q_tiles += 1;
    }
    me.balance_ping_pong();
}

/// The consumer without `overlap_tiles` (the D = 256 split build): each work tile ends with its
/// own last PV and epilogue before the next starts.
#[inline(always)]
unsafe fn consumer_serial<
    E: Element + WgmmaElement,
    H: WsShape,
    const TMA: bool,
    const QREG: bool,
    const SPLIT: bool,
>(
    p: &PrefillParams,
    smem: Smem<H>,
    wg: usize,
    wtid: usize,
) {
    let me = ConsumerThread::new(wg, wtid);
    let (mut kv_tiles, mut q_tiles) = (0i32, 0i32);
    loop {
        let work = unsafe { next_work(smem, q_tiles) };
        if work < 0 {
            break;
        }
        let tile = QueryTile::from_work::<SPLIT>(p, BM as i32, H::D, work);
        let blocks = TileBlocks::of::<SPLIT>(&tile, H::BN).count(&tile);
        let q = unsafe { me.q_registers::<H, QREG>(smem, true) };
        let mut s = H::zero_s();
        if blocks > 0 {
            s = unsafe { me.first_scores::<E, H, TMA, QREG>(smem, kv_tiles, &q) };
        }
        let (mut o, pa, state) = unsafe {
            me.tile_blocks::<E, H, TMA, QREG, SPLIT>(p, smem, &tile, blocks, s, kv_tiles, &q)
        };
        if blocks > 0 {
            let last = stage_of::<H>(kv_tiles + blocks - 1);
            unsafe { last_pv::<E, H>(&mut o, &pa, smem, last) };
        }
        kv_tiles += blocks;
        q_tiles += 1;
        // The work index again from its slot (the producer rewrites it only after this
        // consumer releases the next tile's Q): kept live through the KV loop, it made the
        // D = 256 consumer spill.
        let work = warp_broadcast_u32(unsafe { ld_shared_u32(smem.work_slot(q_tiles - 1)) });
        unsafe { store_tile::<E, H, SPLIT>(p, work as i32, &o, &state, me.row_in_tile, me.t) };
    }
    me.balance_ping_pong();
}

macro_rules! wgmma_entry {
    ($name:ident, $elem:ty, $d:literal) => {
        wgmma_entry!($name, $elem, $d, false);
    };
    ($name:ident, $elem:ty, $d:literal, $alibi:literal) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: PrefillParams) {
            enter_dependent_grid();
            unsafe { prefill_wgmma::<$elem, HeadDim<$d, $alibi>, false, false, false>(&p, 0) }
        }
    };
}

/// TMA entries: the tensor maps stay in parameter space, where TMA reads them; the entry names its
/// own parameter in PTX (`<entry>_param_0`) to take their address. `$split`: the split-KV build;
/// `$cache`: the build for a caller's KV cache (paged, and the V tail zeroed past the keys).
macro_rules! tma_entry {
    ($name:ident, $elem:ty, $d:literal) => {
        tma_entry!($name, $elem, $d, false, false);
    };
    ($name:ident, $elem:ty, $d:literal, $split:literal, $cache:literal) => {
        tma_entry!($name, $elem, $d, $split, $cache, false);
    };
    ($name:ident, $elem:ty, $d:literal, $split:literal, $cache:literal, $alibi:literal) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: TmaPrefillParams) {
            let maps: u64;
            unsafe {
                asm!(
                    concat!("mov.b64 {m}, ", stringify!($name), "_param_0;"),
                    "cvta.param.u64 {m}, {m};",
                    m = out(reg64) maps,
                    options(pure, nomem, nostack)
                )
            };
            enter_dependent_grid();
            unsafe {
                prefill_wgmma::<$elem, HeadDim<$d, $alibi>, true, $split, $cache>(
                    &p.prefill, maps,
                )
            }
        }
    };
}

wgmma_entry!(duo_prefill_wgmma_ws_bf16_d64, Bf16, 64);
wgmma_entry!(duo_prefill_wgmma_ws_bf16_d128, Bf16, 128);
wgmma_entry!(duo_prefill_wgmma_ws_f16_d64, F16, 64);
wgmma_entry!(duo_prefill_wgmma_ws_f16_d128, F16, 128);
tma_entry!(duo_prefill_wgmma_tma_bf16_d64, Bf16, 64);
tma_entry!(duo_prefill_wgmma_tma_bf16_d128, Bf16, 128);
tma_entry!(duo_prefill_wgmma_tma_f16_d64, F16, 64);
tma_entry!(duo_prefill_wgmma_tma_f16_d128, F16, 128);
tma_entry!(duo_prefill_wgmma_tma_bf16_d256, Bf16, 256);
tma_entry!(duo_prefill_wgmma_tma_f16_d256, F16, 256);
tma_entry!(duo_prefill_wgmma_tma_split_bf16_d64, Bf16, 64, true, false);
tma_entry!(
    duo_prefill_wgmma_tma_split_bf16_d128,
    Bf16,
    128,
    true,
    false
);
tma_entry!(duo_prefill_wgmma_tma_split_f16_d64, F16, 64, true, false);
tma_entry!(duo_prefill_wgmma_tma_split_f16_d128, F16, 128, true, false);
tma_entry!(
    duo_prefill_wgmma_tma_split_bf16_d256,
    Bf16,
    256,
    true,
    false
);
tma_entry!(duo_prefill_wgmma_tma_split_f16_d256, F16, 256, true, false);
tma_entry!(duo_prefill_wgmma_tma_cache_bf16_d64, Bf16, 64, false, true);
tma_entry!(duo_prefill_wgmma_tma_cache_f16_d64, F16, 64, false, true);
tma_entry!(
    duo_prefill_wgmma_tma_cache_bf16_d128,
    Bf16,
    128,
    false,
    true
);
tma_entry!(duo_prefill_wgmma_tma_cache_f16_d128, F16, 128, false, true);
tma_entry!(
    duo_prefill_wgmma_tma_cache_bf16_d256,
    Bf16,
    256,
    false,
    true
);
tma_entry!(duo_prefill_wgmma_tma_cache_f16_d256, F16, 256, false, true);
tma_entry!(
    duo_prefill_wgmma_tma_cache_split_bf16_d64,
    Bf16,
    64,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_split_f16_d64,
    F16,
    64,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_split_bf16_d128,
    Bf16,
    128,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_split_f16_d128,
    F16,
    128,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_split_bf16_d256,
    Bf16,
    256,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_split_f16_d256,
    F16,
    256,
    true,
    true
);

// ALiBi builds: the TMA kernel (plain and split-KV) and its cp.async fallback, D 64 and 128.
// At D = 256 the bias's registers (the slope, the rows' distances) spill 8-28 bytes in the
// consumers, so that head dim has no ALiBi build.
wgmma_entry!(duo_prefill_wgmma_ws_alibi_bf16_d64, Bf16, 64, true);
wgmma_entry!(duo_prefill_wgmma_ws_alibi_bf16_d128, Bf16, 128, true);
wgmma_entry!(duo_prefill_wgmma_ws_alibi_f16_d64, F16, 64, true);
wgmma_entry!(duo_prefill_wgmma_ws_alibi_f16_d128, F16, 128, true);
tma_entry!(
    duo_prefill_wgmma_tma_alibi_bf16_d64,
    Bf16,
    64,
    false,
    false,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_alibi_bf16_d128,
    Bf16,
    128,
    false,
    false,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_alibi_f16_d64,
    F16,
    64,
    false,
    false,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_alibi_f16_d128,
    F16,
    128,
    false,
    false,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_alibi_split_bf16_d64,
    Bf16,
    64,
    true,
    false,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_alibi_split_bf16_d128,
    Bf16,
    128,
    true,
    false,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_alibi_split_f16_d64,
    F16,
    64,
    true,
    false,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_alibi_split_f16_d128,
    F16,
    128,
    true,
    false,
    true
);

// ALiBi over a caller's KV cache (prefill with `cache_seqlens` or a block table), D 64 and 128.
tma_entry!(
    duo_prefill_wgmma_tma_cache_alibi_bf16_d64,
    Bf16,
    64,
    false,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_alibi_f16_d64,
    F16,
    64,
    false,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_alibi_bf16_d128,
    Bf16,
    128,
    false,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_alibi_f16_d128,
    F16,
    128,
    false,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_alibi_split_bf16_d64,
    Bf16,
    64,
    true,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_alibi_split_f16_d64,
    F16,
    64,
    true,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_alibi_split_bf16_d128,
    Bf16,
    128,
    true,
    true,
    true
);
tma_entry!(
    duo_prefill_wgmma_tma_cache_alibi_split_f16_d128,
    F16,
    128,
    true,
    true,
    true
);
