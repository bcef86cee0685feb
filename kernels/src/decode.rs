//! Decode attention: a few new query tokens per sequence against a long KV cache, memory-bound.
//!
//! One block serves one (batch, KV head, split) and up to 16 query rows: every query head of the
//! KV head's group times every new token (GQA packing, so K/V are read once per group). Eight warps
//! split each 128-key tile (16 keys each; at D = 256 four warps and 64-key tiles, with Q in shared
//! memory) and keep their own online softmax; a cp.async ring of three K/V stages (one block per
//! SM) keeps loads in flight; the warps merge through shared memory at the end. Long caches are
//! split across blocks (`tiles_per_split`) and merged by their LSE inside the launch: a row group
//! of 2 to 16 splits launched as one thread-block cluster merges through distributed shared
//! memory, each block a share of the rows; otherwise the last split block of the row group to
//! finish merges the partial rows the others left in global memory. A single split writes its
//! rows directly.
//! Streaming heads read only their sink and window blocks, or, in a DuoAttention cache, their
//! `sink + recent` ring slots, mapped back to true positions.
//! The `duo_decode_alibi_*` builds add ALiBi's `-slope * |q - k|` (a slope per query head, so
//! per fragment row) to each score; they read contiguous or paged K/V, never a ring.
use crate::abi::{
    DECODE_MAX_SPLITS, DECODE_MIN_TILES_PER_SPLIT, DECODE_ROWS, DECODE_STAGES, DecodeParams,
    decode_block_n, decode_fuses_append, decode_paged_smem_bytes, decode_q_in_shared,
    decode_ring_bytes, decode_smem_bytes, decode_threads, decode_tile_offset,
    decode_turns_appended_keys,
};
use crate::decode_merge::{LOG2_E, MERGE_DEPTH, Merge, merge_depth, merge_in_cluster};
use crate::device::*;
use crate::heads::DecodeBlock;
use crate::mask::{BlockRange, HeadMask, div_or_zero, nth_tile, split_of_tile};
use crate::mma::{Bf16, Element, F16, quad, set_quad};
use crate::ring::{RingPositions, filled_slots, slot_of};
use crate::rotary::{fragments_turn, turn_fragments, turn_words};
use crate::softmax::{
    RowState, alibi_scores_by_row, alibi_slope_raw, mask_scores, merged_lse, online_softmax,
    rescale,
};
use crate::tile::min_i32;

/// Padding (f32) of each row of the warp merge's O buffer: 8 words put the 8 rows a warp store
/// touches in distinct bank groups (unpadded rows, 512 bytes apart at D = 128, made those stores
/// 8-way bank conflicted: ncu).
const MERGE_ROW_PAD: usize = 8;
/// Most 16-byte chunks one thread loads of a K or V tile (D = 256: 64 x 256 / 8 / 128).
const MAX_TILE_CHUNKS: usize = 16;
const LN_2: f32 = core::f32::consts::LN_2;

/// 16-byte chunks one thread loads of a `decode_block_n(D) x D` tile.
const fn tile_chunks(d: usize) -> usize {
    decode_block_n(d) * d / 8 / decode_threads(d)
}

/// Row and column chunk (8 elements) of this thread's `c`-th chunk of a tile.
#[inline(always)]
fn tile_chunk<const D: usize>(tid: usize, c: usize) -> (usize, usize) {
    let chunk = tid + c * const { decode_threads(D) };
    (chunk / (D / 8), chunk % (D / 8))
}

/// Queues the cp.async loads of one `decode_block_n(D) x D` tile into a swizzled shared-memory
/// tile ([`decode_tile_offset`]): row `r` of the tile starts `r * row_bytes` bytes after `tile`
/// (the address of its row 0, a row that exists); rows from `rows` on are zero-filled. A thread's
/// chunks are one column chunk of rows `r0, r0 + R, ..`, so each next address is one 64-bit add.
#[inline(always)]
unsafe fn load_tile<const D: usize>(dst: u32, tile: u64, row_bytes: i64, rows: i32, tid: usize) {
    let rows_per_pass = const {
        assert!(decode_threads(D) % (D / 8) == 0);
        decode_threads(D) / (D / 8)
    };
    let (r0, part) = (tid / (D / 8), tid % (D / 8));
    let mut src = tile.wrapping_add((r0 as i64 * row_bytes + 16 * part as i64) as u64);
    let step = (rows_per_pass as i64 * row_bytes) as u64;
    for c in 0..const { tile_chunks(D) } {
        let row = r0 + c * rows_per_pass;
        let valid = (row as i32) < rows;
        let addr = dst + decode_tile_offset(D, row, part) as u32;
        let from = if valid { src } else { tile };
        unsafe { cp_async_16_prefetch(addr, from, if valid { 16 } else { 0 }) };
        src = src.wrapping_add(step);
    }
}

/// How a decode entry finds its K/V rows (a const parameter: separate entries, so that each
/// loader keeps its own code).
mod paging {
    /// Contiguous K/V, strided by batch entry.
    pub const NONE: u8 = 0;
    /// Through the block table, one page per row: pages smaller than a tile.
    pub const ROWS: u8 = 1;
    /// Through the block table, one page per tile: pages of at least `decode_block_n(D)` rows,
    /// so a tile's rows lie in one page and load as a contiguous tile's do, from a base moved
    /// once per tile.
    pub const TILES: u8 = 2;
}

/// Sequence `batch`'s key count in `seqlens`, clamped into `0..=seqlen` so that no value reaches
/// past the K/V rows. A coherent load: with the append fused, this launch advances it.
#[inline(always)]
unsafe fn sequence_len(p: &DecodeParams, batch: i64) -> i32 {
    clamped_len(p, unsafe { ld_global_u32(p.seqlens + 4 * batch as u64) })
}

/// A `seqlens` entry clamped into `0..=seqlen`.
#[inline(always)]
fn clamped_len(p: &DecodeParams, raw: u32) -> i32 {
    let len = raw as i32;
    if len < 0 { 0 } else { min_i32(len, p.seqlen) }
}

/// Whether this entry runs `p`'s fused append (`DecodeParams::append`).
#[inline(always)]
fn fuses_append<const D: usize, const PAGING: u8>(p: &DecodeParams) -> bool {
    p.append.k != 0
        && const { decode_fuses_append(D, PAGING != paging::NONE) }
        && (p.rotary.cos == 0 || const { turns_appended_keys::<D, PAGING>() })
}

/// Whether this entry's fused append turns the new keys ([`decode_turns_appended_keys`]).
const fn turns_appended_keys<const D: usize, const PAGING: u8>() -> bool {
    decode_turns_appended_keys(D, PAGING == paging::ROWS)
}

/// The keys this step attends, from the sequence's clamped count `len` before it: with an
/// append (`append.k` set: fused into this launch, or queued before it on entries that do not
/// fuse it), its `n_q` new keys too.
#[inline(always)]
fn step_keys(p: &DecodeParams, len: i32) -> i32 {
    if p.append.k != 0 {
        min_i32(len + p.n_q, p.seqlen)
    } else {
        len
    }
}

/// Chunks of `DECODE_ROWS` query rows per KV head: its group's query heads times the new tokens.
#[inline(always)]
fn row_chunks_of(p: &DecodeParams) -> i32 {
    let rows_per_head = div_or_zero(p.heads_q, p.heads_kv) * p.n_q;
    div_or_zero(rows_per_head + DECODE_ROWS as i32 - 1, DECODE_ROWS as i32)
}

/// Tiles each of a head's `splits` splits walks, of its `total` visited tiles. The host planned
/// the splits for the longest sequence; with per-sequence counts each sequence spreads its own
/// tiles over them (a captured graph replays at any length).
#[inline(always)]
fn split_share(p: &DecodeParams, total: i32, splits: i32) -> i32 {
    if p.seqlens != 0 {
        let even = div_or_zero(total + splits - 1, splits);
        let least = min_i32(p.tiles_per_split, DECODE_MIN_TILES_PER_SPLIT as i32);
        if even > least { even } else { least }
    } else {
        p.tiles_per_split
    }
}

/// Where a KV head's keys and values live: base addresses (its sequence and head applied) and
/// element strides, by scalar selects so the parameters stay in the constant bank.
struct HeadKv {
    /// Key `k` is row `k % page` of page `table[k / page]` (stride 0 runs between pages).
    paged: bool,
    k_base: u64,
    v_base: u64,
    ks: [i64; 3],
    vs: [i64; 3],
}

impl HeadKv {
    /// With a ring (`ring`, the DuoAttention cache) streaming heads read their ring and every
    /// head is indexed by its rank among its kind; else head `kv_head` of `full`. Paged K/V
    /// (`block_table`): a paged DuoAttention cache (head dims 64 and 128 only: the branch costs
    /// D = 256 48 bytes of spills) keeps its rings batch-strided, so only retrieval heads read
    /// pages.
    #[inline(always)]
    fn of<const D: usize, const PAGING: u8>(
        p: &DecodeParams,
        streaming: bool,
        rank: i32,
        kv_head: i32,
        batch: i64,
    ) -> Self {
        let use_ring = streaming && p.ring != 0;
        let index = if p.ring != 0 { rank } else { kv_head } as i64;
        let pick = |ring: i64, full: i64| if use_ring { ring } else { full };
        let ks = [
            pick(p.stream.k_strides[0], p.full.k_strides[0]),
            pick(p.stream.k_strides[1], p.full.k_strides[1]),
            pick(p.stream.k_strides[2], p.full.k_strides[2]),
        ];
        let vs = [
            pick(p.stream.v_strides[0], p.full.v_strides[0]),
            pick(p.stream.v_strides[1], p.full.v_strides[1]),
            pick(p.stream.v_strides[2], p.full.v_strides[2]),
        ];
        let paged = PAGING != paging::NONE && !(D <= 128 && use_ring);
        let seq = if paged { 0 } else { batch };
        let k_base = pick(p.stream.k as i64, p.full.k as i64) as u64
            + ((seq * ks[0] + index * ks[2]) * 2) as u64;
        let v_base = pick(p.stream.v as i64, p.full.v as i64) as u64
            + ((seq * vs[0] + index * vs[2]) * 2) as u64;
        HeadKv {
            paged,
            k_base,
            v_base,
            ks,
            vs,
        }
    }
}

/// The fused append (`DecodeParams::append`): this block writes the new rows of its sequence
/// and KV head that fall in the KV tiles of its split, the only blocks to read them (the row
/// chunks of one split write the same bytes). A new row no block reads (a streaming head's key
/// outside its sink and window) goes with split 0. Everything is worked out afresh from the block
/// index, so nothing here stays live into the decode. (With it, ptxas took 154-162 registers at
/// D = 64: those entries are capped at 128, for two blocks per SM, by `entry_directives`.)
#[inline(always)]
unsafe fn append_own_rows<E: Element, const D: usize, const PAGING: u8>(
    p: &DecodeParams,
    row_chunks: i32,
    start: i32,
) {
    let bn = decode_block_n(D) as i32;
    let DecodeBlock {
        streaming,
        rank,
        kv_head,
        batch,
        split,
        splits,
        ..
    } = DecodeBlock::of(p, fresh_u32(block_idx_x()) as i32, row_chunks);
    let end = min_i32(start + p.n_q, p.seqlen);
    let use_ring = streaming && p.ring != 0;
    // The head's tiles after the append, as the decode walks them: a ring's filled slots, else
    // the mask's block ranges (every key, for a retrieval head).
    let n_keys = if use_ring {
        filled_slots(end, p.sink, p.recent)
    } else {
        end
    };
    let tiles = visited_tiles(&head_mask(p, streaming, end), use_ring, p.n_q, n_keys, bn);
    let per_split = split_share(p, tiles[0].len() + tiles[1].len(), splits);
    let kv = HeadKv::of::<D, PAGING>(p, streaming, rank, kv_head, batch);
    let table = p.block_table + (batch * p.block_table_stride * 4) as u64;
    let threads = const { decode_threads(D) };
    for idx in (thread_idx_x() as usize..p.n_q as usize * (D / 8)).step_by(threads) {
        let (r, part) = ((idx / (D / 8)) as i32, (idx % (D / 8)) as i64);
        let pos = start + r;
        // A ring row that a later new row overwrites, or a position past the capacity, is not
        // written (as in `duo_cache_append`).
        let (key, kept) = if use_ring {
            let last = start + p.n_q;
            (
                slot_of(pos, p.sink, p.recent),
                pos < p.sink || pos >= last - p.recent,
            )
        } else {
            (pos, pos < p.seqlen)
        };
        if !kept || split_of_tile(&tiles, key / bn, per_split) != split {
            continue;
        }
        // The row's offsets: its page's row (a page the host has not given the sequence is not
        // written), else its key or slot.
        let (k_row, v_row) = if kv.paged {
            let entry = table + 4 * (pos >> p.page_shift) as u64;
            let page = unsafe { ld_global_nc_u32(entry) } as i32;
            if page < 0 || page >= p.num_pages {
                continue;
            }
            let (page, row) = (page as i64, (pos & ((1 << p.page_shift) - 1)) as i64);
            (
                page * kv.ks[0] + row * kv.ks[1],
                page * kv.vs[0] + row * kv.vs[1],
            )
        } else {
            (key as i64 * kv.ks[1], key as i64 * kv.vs[1])
        };
        let new_at = |base: u64, st: &[i64; 3], col: i64| {
            base + ((batch * st[0] + r as i64 * st[1] + kv_head as i64 * st[2] + col) * 2) as u64
        };
        let k_at = |col: i32| new_at(p.append.k, &p.append.k_strides, col as i64);
        unsafe {
            // RoPE (`DecodeParams::rotary`): the key turns at its position.
            let k = if !const { turns_appended_keys::<D, PAGING>() } {
                ld_global_nc_v4(k_at(8 * part as i32))
            } else {
                turn_words::<E, 4>(&p.rotary, pos, 8 * part as i32, |c| {
                    ld_global_nc_v4(k_at(c))
                })
            };
            let v = ld_global_nc_v4(new_at(p.append.v, &p.append.v_strides, 8 * part));
            st_global_v4(kv.k_base + ((k_row + 8 * part) * 2) as u64, k);
            st_global_v4(kv.v_base + ((v_row + 8 * part) * 2) as u64, v);
        }
    }
}

/// The mask of a decode head (streaming or retrieval) over `seqlen` keys.
#[inline(always)]
fn head_mask(p: &DecodeParams, streaming: bool, seqlen: i32) -> HeadMask {
    HeadMask {
        streaming,
        causal: p.causal != 0,
        sink: p.sink,
        window: p.window,
        seqlen_k: seqlen,
        // Decode has no right window: its queries are the sequence's last keys.
        right: 0,
    }
}

/// The KV tiles a head walks for the step's queries (the last `n_q` of `mask.seqlen_k` keys): a
/// ring's filled slots (`n_keys` of them), else the mask's block ranges.
#[inline(always)]
fn visited_tiles(
    mask: &HeadMask,
    use_ring: bool,
    n_q: i32,
    n_keys: i32,
    bn: i32,
) -> [BlockRange; 2] {
    if use_ring {
        [
            BlockRange {
                start: 0,
                end: div_or_zero(n_keys + bn - 1, bn),
            },
            BlockRange::EMPTY,
        ]
    } else {
        mask.block_ranges(mask.seqlen_k - n_q, mask.seqlen_k - 1, bn)
    }
}

/// Before the wait for the previous kernel (`DecodeParams::prefetch_tiles`): asks the L2 for the
/// first K/V tiles this block will walk, so their reads from memory overlap the previous kernel's
/// tail and this kernel's own start. Everything here is a hint: the length and page entries are
/// read racily (the previous kernel may be advancing them; a stale value fetches a wrong tile),
/// clamped as the decode clamps them so that every address stays inside the K/V tensors, and the
/// L2 holds no stale lines, so the decode's own loads after the wait are unaffected. Only tiles of
/// contiguous rows (head-major K/V, or pages of whole tiles) are fetched, one request per tile.
#[inline(always)]
unsafe fn prefetch_first_tiles<const D: usize, const PAGING: u8>(p: &DecodeParams) {
    let bn = decode_block_n(D) as i32;
    let tid = thread_idx_x() as i32;
    if tid >= 2 * p.prefetch_tiles || PAGING == paging::ROWS {
        return;
    }
    let DecodeBlock {
        streaming,
        rank,
        kv_head,
        batch,
        split,
        splits,
        ..
    } = DecodeBlock::of(p, block_idx_x() as i32, row_chunks_of(p));
    let seqlen = if p.seqlens != 0 {
        let raw = unsafe { ld_relaxed_u32(p.seqlens + 4 * batch as u64) };
        step_keys(p, clamped_len(p, raw))
    } else {
        p.seqlen
    };
    let use_ring = streaming && p.ring != 0;
    let n_keys = if use_ring {
        filled_slots(seqlen, p.sink, p.recent)
    } else {
        seqlen
    };
    let mask = head_mask(p, streaming, seqlen);
    let tiles = visited_tiles(&mask, use_ring, p.n_q, n_keys, bn);
    let total = tiles[0].len() + tiles[1].len();
    let per_split = split_share(p, total, splits);
    // Thread 2i fetches tile i's K, thread 2i + 1 its V.
    let i = split * per_split + tid / 2;
    if i >= min_i32(split * per_split + per_split, total) {
        return;
    }
    let n0 = bn * nth_tile(&tiles, i);
    let rows = min_i32(bn, n_keys - n0);
    let kv = HeadKv::of::<D, PAGING>(p, streaming, rank, kv_head, batch);
    let (base, st) = if tid % 2 == 0 {
        (kv.k_base, kv.ks)
    } else {
        (kv.v_base, kv.vs)
    };
    if rows <= 0 || st[1] != D as i64 {
        return;
    }
    let row0 = if kv.paged {
        let table = p.block_table + (batch * p.block_table_stride * 4) as u64;
        let entry = unsafe { ld_relaxed_u32(table + 4 * (n0 >> p.page_shift) as u64) } as i32;
        let page = if entry < 0 {
            0
        } else {
            min_i32(entry, p.num_pages - 1)
        };
        page as i64 * st[0] + (n0 & ((1 << p.page_shift) - 1)) as i64 * st[1]
    } else {
        n0 as i64 * st[1]
    };
    unsafe { prefetch_l2(base + (row0 * 2) as u64, (rows as usize * D * 2) as u32) };
}

/// The decode body, per (element, head dim): `KQ = D / 16` k-steps, `ON = D / 2` accumulators;
/// `PAGING`: how K/V rows are found ([`paging`]).
#[inline(always)]
unsafe fn decode<
    E: Element,
    const D: usize,
    const KQ: usize,
    const ON: usize,
    const PAGING: u8,
    const ALIBI: bool,
>(
    p: &DecodeParams,
) {
    // Keys per tile, threads and warps (one per 16 keys), the merge's per-warp row statistics
    // (max, sum) at the start of shared memory, and where Q lives.
    let (bn, threads, q_shared) =
        const { (decode_block_n(D), decode_threads(D), decode_q_in_shared(D)) };
    let warps = threads / 32;
    let stats_bytes = warps * DECODE_ROWS * 8;
    let o_stride = D + MERGE_ROW_PAD; // row stride (f32) of the warp merge's O buffer
    const {
        let (bn, warps) = (decode_block_n(D), decode_threads(D) / 32);
        assert!(
            1024 + DECODE_ROWS * DECODE_MAX_SPLITS * 4 <= decode_ring_bytes(D)
                && KQ * 16 == D
                && ON * 2 == D
                && DECODE_ROWS == 16
                && bn == 16 * warps
                && warps * DECODE_ROWS * 8 + warps * DECODE_ROWS * (D + MERGE_ROW_PAD) * 4
                    <= decode_ring_bytes(D)
                && decode_paged_smem_bytes(D) <= 227 * 1024
                && tile_chunks(D) <= MAX_TILE_CHUNKS
        )
    };
    let smem = dynamic_shared_base();
    let tile_bytes = (bn * D * 2) as u32;
    let q_smem = smem + decode_ring_bytes(D) as u32;
    let k_smem = |stage: usize| smem + stage as u32 * 2 * tile_bytes;
    let v_smem = |stage: usize| k_smem(stage) + tile_bytes;

    let tid = thread_idx_x() as usize;
    let lane = lane_id() as usize;
    let warp = tid / 32;
    let (g, t) = (lane / 4, lane % 4);

    let group = div_or_zero(p.heads_q, p.heads_kv);
    let rows_per_head = group * p.n_q;
    let row_chunks = row_chunks_of(p);
    let DecodeBlock {
        streaming,
        rank,
        kv_head,
        chunk,
        batch,
        split,
        splits,
    } = DecodeBlock::of(p, block_idx_x() as i32, row_chunks);
    let row_base = chunk * DECODE_ROWS as i32;
    // This sequence's key count: its own (`seqlens`, clamped into `0..=seqlen` so that no value
    // reaches past the K/V rows) or the batch's; with the append fused, `seqlens` holds the
    // count before this step's `n_q` new keys. Loaded once, by the first thing after the wait
    // that needs it (a second load was a second trip to the L2 on every block's way to its
    // first tile).
    let len_before = if p.seqlens != 0 {
        unsafe { sequence_len(p, batch) }
    } else {
        p.seqlen
    };
    // The fused append (`DecodeParams::append`) first, on its own: nothing of it stays live.
    let fused_append = fuses_append::<D, PAGING>(p);
    if fused_append {
        unsafe { append_own_rows::<E, D, PAGING>(p, row_chunks, len_before) };
        sync_threads(); // the new rows before any thread's loads of them
    }
    let seqlen = if p.seqlens != 0 {
        step_keys(p, len_before)
    } else {
        p.seqlen
    };
    let row_head_token = |row: i32| head_and_token(p, kv_head, group, row);

    let use_ring = streaming && p.ring != 0;
    let paged_entry = PAGING != paging::NONE;
    let HeadKv {
        paged,
        k_base,
        v_base,
        ks,
        vs,
    } = HeadKv::of::<D, PAGING>(p, streaming, rank, kv_head, batch);
    let table = p.block_table + (batch * p.block_table_stride * 4) as u64;
    let in_page = (1i32 << p.page_shift) - 1;
    // The page of key `k` (a key below the sequence's count, so its table entry is inside the
    // row), clamped into the pool so that no entry reads outside it.
    let page_of = |k: i32| {
        let page = unsafe { ld_global_nc_u32(table + 4 * (k >> p.page_shift) as u64) } as i32;
        if page < 0 {
            0
        } else {
            min_i32(page, p.num_pages - 1)
        }
    };
    // Paged: per stage, the table entries of the stage's tile: entry j is the page of key
    // `n0 + (j << page_shift)` (one entry when a page holds the whole tile).
    let page_slots = smem + decode_smem_bytes(D) as u32;
    let page_slot = |stage: usize, j: i32| page_slots + ((stage * bn) as u32 + j as u32) * 4;
    let entries = if PAGING == paging::TILES || p.page_shift >= bn.trailing_zeros() as i32 {
        1
    } else {
        bn as i32 >> p.page_shift
    };
    // A ring's unfilled slots hold memory never written (NaN bit patterns included): they are
    // zero-filled like rows past the end, or a masked key's P = 0 would multiply a NaN V row.
    let n_keys = if use_ring {
        filled_slots(seqlen, p.sink, p.recent)
    } else {
        seqlen
    };

    // This thread's two query rows: (query head in the group, token) packed as head * n_q + token.
    let mut q_pos = [-1i32; 2];
    let mut q_head = [0i32; 2];
    let mut token = [0i32; 2];
    let mut valid = [false; 2];
    for r in 0..2 {
        let row = row_base + (g + 8 * r) as i32;
        (q_head[r], token[r]) = row_head_token(row);
        valid[r] = row < rows_per_head;
        if valid[r] {
            q_pos[r] = seqlen - p.n_q + token[r];
        }
    }
    let (q_lo, q_hi) = (seqlen - p.n_q, seqlen - 1);
    let mask = head_mask(p, streaming, seqlen);
    // ALiBi builds: each row's `-slope / softmax_scale` (its query head's slope).
    let mut slope_raw = [0f32; 2];
    if ALIBI {
        for r in 0..2 {
            if valid[r] {
                let at = (batch * p.alibi_batch_stride as i64 + q_head[r] as i64) as u64;
                slope_raw[r] =
                    unsafe { alibi_slope_raw(p.alibi_slopes, at, p.alibi_neg_inv_scale) };
            }
        }
    }

    // The tiles this head visits (ring: all slots; else the mask's ranges), and this split's share.
    let tiles = visited_tiles(&mask, use_ring, p.n_q, n_keys, bn as i32);
    let total = tiles[0].len() + tiles[1].len();
    let per_split = split_share(p, total, splits);
    let t0 = split * per_split;
    let count = min_i32(t0 + per_split, total) - t0;
    let n_block = |i: i32| nth_tile(&tiles, t0 + i);
    // The per-row paged loader is inlined by force (at D = 256 LLVM kept it a call); the others
    // are left to LLVM, which inlines them (forcing them changes the plain entries' code).
    let load_paged = #[inline(always)]
    |i: i32| {
        let stage = (i % DECODE_STAGES as i32) as usize;
        let n0 = n_block(i) * bn as i32;
        // Each of this thread's rows: its page from the entries fetched a tile ahead
        // (`fetch_page`), then its K and V chunks. Row r of the tile lies in the tile's page
        // r >> page_shift (tiles start on page boundaries, or lie inside one page); entries past
        // the keys hold page 0 and serve only rows past the keys, which load nothing.
        for c in 0..const { tile_chunks(D) } {
            let (row, part) = tile_chunk::<D>(tid, c);
            let key = n0 + row as i32;
            let valid = key < n_keys;
            let page = unsafe { ld_shared_u32(page_slot(stage, row as i32 >> p.page_shift)) };
            let at = |base: u64, strides: &[i64; 3]| {
                let off = page as i64 * strides[0] + (key & in_page) as i64 * strides[1];
                if valid {
                    base + ((off + 8 * part as i64) * 2) as u64
                } else {
                    base
                }
            };
            let dst = decode_tile_offset(D, row, part) as u32;
            let bytes = if valid { 16 } else { 0 };
            unsafe {
                cp_async_16_prefetch(k_smem(stage) + dst, at(k_base, &ks), bytes);
                cp_async_16_prefetch(v_smem(stage) + dst, at(v_base, &vs), bytes);
            }
        }
    };
    let load_plain = |i: i32| {
        let stage = (i % DECODE_STAGES as i32) as usize;
        let n0 = n_block(i) * bn as i32;
        let (k_tile, v_tile) = (
            k_base.wrapping_add((n0 as i64 * ks[1] * 2) as u64),
            v_base.wrapping_add((n0 as i64 * vs[1] * 2) as u64),
        );
        unsafe {
            load_tile::<D>(k_smem(stage), k_tile, ks[1] * 2, n_keys - n0, tid);
            load_tile::<D>(v_smem(stage), v_tile, vs[1] * 2, n_keys - n0, tid);
        }
    };
    // One page per tile: the tile's rows are rows `n0 & in_page..` of its page (entry 0 of the
    // stage), so it loads as a contiguous tile does from that row. (Sharing one closure with
    // `load_plain` put both forms in the paged entries' loop and calls in their PTX.)
    let load_tiles = |i: i32| {
        let stage = (i % DECODE_STAGES as i32) as usize;
        let n0 = n_block(i) * bn as i32;
        let (k_row0, v_row0) = if paged {
            let page = unsafe { ld_shared_u32(page_slot(stage, 0)) } as i64;
            let row = (n0 & in_page) as i64;
            (page * ks[0] + row * ks[1], page * vs[0] + row * vs[1])
        } else {
            (n0 as i64 * ks[1], n0 as i64 * vs[1])
        };
        unsafe {
            let k_tile = k_base.wrapping_add((k_row0 * 2) as u64);
            let v_tile = v_base.wrapping_add((v_row0 * 2) as u64);
            load_tile::<D>(k_smem(stage), k_tile, ks[1] * 2, n_keys - n0, tid);
            load_tile::<D>(v_smem(stage), v_tile, vs[1] * 2, n_keys - n0, tid);
        }
    };
    // A macro, not a closure: LLVM kept such a closure a call in the paged entries, and forcing
    // it inline cost the plain entries 13 instructions per tile in SASS.
    macro_rules! load {
        ($i:expr) => {
            match PAGING {
                paging::ROWS if paged => load_paged($i),
                paging::TILES => load_tiles($i),
                _ => load_plain($i),
            }
        };
    }
    // Paged: this thread's table entry of tile `x` (thread j < entries fetches entry j; 0 for a
    // page past the sequence's keys or a tile past the split's), clamped into the pool.
    let fetch_page = |x: i32| {
        let j = tid as i32;
        if !paged || j >= entries || x >= count {
            return 0;
        }
        let key = n_block(x) * bn as i32 + (j << p.page_shift);
        if key < n_keys { page_of(key) } else { 0 }
    };
    let stash_page = |x: i32, page: i32| {
        if paged_entry && (tid as i32) < entries {
            let stage = (x % DECODE_STAGES as i32) as usize;
            unsafe { st_shared_u32(page_slot(stage, tid as i32), page as u32) };
        }
    };
    if paged_entry {
        // The entries of the first `DECODE_STAGES` tiles: those the prologue loads, and the one
        // the first iteration loads.
        let mut first_pages = [0i32; DECODE_STAGES];
        for (x, page) in first_pages.iter_mut().enumerate() {
            *page = fetch_page(x as i32);
        }
        for (x, &page) in first_pages.iter().enumerate() {
            stash_page(x as i32, page);
        }
        sync_threads();
    }

    for i in 0..DECODE_STAGES as i32 - 1 {
        if i < count {
            load!(i);
        }
        cp_async_commit();
    }

    // Q after the first K/V tiles are in flight: its latency hides under theirs. Up to D = 128
    // each thread holds its A fragments (rows g and g + 8) in registers; at D = 256 the block
    // stores the 16 x D query tile in shared memory, swizzled as the K/V tiles, and each k-step
    // reads its fragments with ldmatrix (the first loop barrier orders the stores).
    // Address of element `col` of query (head, token) in this batch entry.
    let q_at = |head: i32, tok: i32, col: i64| {
        let off = batch * p.q_strides[0]
            + tok as i64 * p.q_strides[1]
            + head as i64 * p.q_strides[2]
            + col;
        p.q + (off * 2) as u64
    };
    // RoPE (`DecodeParams::rotary`): each query row turns as it loads, at its token's position.
    let mut qa = [[0u32; 4]; KQ];
    if q_shared {
        for idx in (tid..DECODE_ROWS * D / 8).step_by(threads) {
            let (row, chunk) = (idx / (D / 8), idx % (D / 8));
            let global_row = row_base + row as i32;
            let mut v = [0u32; 4];
            if global_row < rows_per_head {
                let (head, tok) = row_head_token(global_row);
                let load = |col: i32| {
                    let base = q_at(head, tok, col as i64);
                    core::array::from_fn(|j| unsafe { ld_global_nc_u32(base + 4 * j as u64) })
                };
                let col = 8 * chunk as i32;
                let pos = q_lo + tok;
                v = unsafe { turn_words::<E, 4>(&p.rotary, pos, col, load) };
            }
            unsafe { st_shared_v4(q_smem + decode_tile_offset(D, row, chunk) as u32, v) };
        }
    }
    for r in 0..2 {
        if valid[r] && !q_shared {
            let base = q_at(q_head[r], token[r], 2 * t as i64);
            for (kk, frag) in qa.iter_mut().enumerate() {
                frag[r] = unsafe { ld_global_nc_u32(base + (kk * 32) as u64) };
                frag[r + 2] = unsafe { ld_global_nc_u32(base + (kk * 32 + 16) as u64) };
            }
            if fragments_turn(&p.rotary, D) {
                unsafe { turn_fragments::<E, KQ>(&p.rotary, q_pos[r], t, r, &mut qa) };
            }
        }
    }

    let ring_positions = RingPositions::new(seqlen, p.sink, p.recent);
    let mut acc = [0f32; ON];
    let mut state = RowState::new();
    let kw = 16 * warp;
    for i in 0..count {
        cp_async_wait::<{ DECODE_STAGES as u32 - 2 }>();
        sync_threads(); // tile i landed for all threads; tile i - 1's stage is free
        let next = i + DECODE_STAGES as i32 - 1;
        if next < count {
            load!(next);
        }
        cp_async_commit();
        // Paged: the entries of the tile after `next`, in flight under this tile's S GEMM and
        // softmax; stashed in tile i's stage (whose entries were read when it was loaded), read
        // after the next barrier.
        let ahead = i + DECODE_STAGES as i32;
        let ahead_page = fetch_page(ahead);
        let stage = (i % DECODE_STAGES as i32) as usize;
        let n0 = n_block(i) * bn as i32;

        // S = Q K^T for 16 rows x this warp's 16 keys. Per k-step one ldmatrix brings the B
        // fragments of both 8-key halves: lanes 8i..8i+7 address key rows kw + 8(i / 2) + 0..7,
        // column chunk 2kk + i % 2.
        let mut s = [0f32; 8];
        let (mut s0, mut s1) = ([0f32; 4], [0f32; 4]);
        // Q from shared memory: lanes 8i..8i+7 address query rows 8(i % 2) + 0..7, chunk
        // 2kk + i / 2 (the A fragment's order).
        let k_row = kw + lane % 8 + 8 * (lane / 16);
        for (kk, frag) in qa.iter().enumerate() {
            let a = if q_shared {
                let q_row = lane % 8 + 8 * ((lane / 8) % 2);
                let q_at = q_smem + decode_tile_offset(D, q_row, 2 * kk + lane / 16) as u32;
                unsafe { ldmatrix_x4(q_at) }
            } else {
                *frag
            };
            let chunk = 2 * kk + (lane / 8) % 2;
            let b =
                unsafe { ldmatrix_x4(k_smem(stage) + decode_tile_offset(D, k_row, chunk) as u32) };
            E::mma(&mut s0, &a, [b[0], b[1]]);
            E::mma(&mut s1, &a, [b[2], b[3]]);
        }
        set_quad(&mut s, 0, s0);
        set_quad(&mut s, 1, s1);

        let key0 = n0 + kw as i32;
        // ALiBi entries take no ring (`DecodeParams::alibi_slopes`): a key is its position.
        if ALIBI {
            alibi_scores_by_row(&mut s, slope_raw, q_pos, key0, t);
        }
        // Ring tiles whose slots every row sees whole (all but the one or two that hold the
        // oldest and newest positions) skip the element mask, as fully visible blocks do.
        if use_ring && !ring_positions.slots_fully_visible(n0, n0 + bn as i32, q_lo, q_hi, p.window)
        {
            for (e, v) in s.iter_mut().enumerate() {
                let slot = key0 + (8 * (e / 4) + 2 * t + (e & 1)) as i32;
                let pos = if slot < n_keys {
                    ring_positions.position(slot)
                } else {
                    -1
                };
                if pos < 0 || !mask.visible(q_pos[(e % 4) / 2], pos) {
                    *v = f32::NEG_INFINITY;
                }
            }
        } else if !use_ring {
            let full = mask.block_fully_visible(q_lo, q_hi, n0, bn as i32);
            mask_scores(&mut s, &mask, full, q_pos, key0, t);
        }
        let alpha = online_softmax::<false, _>(&mut s, &mut state, p.scale_log2);
        rescale(&mut acc, alpha);
        // Before the P V GEMM, whose registers peak (D = 256 would spill).
        stash_page(ahead, ahead_page);

        // O += P V: P is the A fragment of one 16-key step; V fragments come transposed.
        let pa = [
            E::pack(s[0], s[1]),
            E::pack(s[2], s[3]),
            E::pack(s[4], s[5]),
            E::pack(s[6], s[7]),
        ];
        let v_row = kw + lane % 8 + 8 * ((lane / 8) % 2);
        for jd in 0..D / 16 {
            let addr = v_smem(stage) + decode_tile_offset(D, v_row, 2 * jd + lane / 16) as u32;
            let b = unsafe { ldmatrix_x4_trans(addr) };
            let mut c = quad(&acc, 2 * jd);
            E::mma(&mut c, &pa, [b[0], b[1]]);
            set_quad(&mut acc, 2 * jd, c);
            let mut c = quad(&acc, 2 * jd + 1);
            E::mma(&mut c, &pa, [b[2], b[3]]);
            set_quad(&mut acc, 2 * jd + 1, c);
        }
    }
    cp_async_wait::<0>();
    sync_threads(); // every stage consumed: the ring's memory becomes the reduction buffer

    // The block's place again, worked out afresh rather than kept through the KV loop (at D = 256
    // the paged entries otherwise spill), and what depends on it.
    let DecodeBlock {
        kv_head,
        chunk,
        batch,
        split,
        splits,
        ..
    } = DecodeBlock::of(p, fresh_u32(block_idx_x()) as i32, row_chunks);
    let by = kv_head * row_chunks + chunk;
    let row_base = chunk * DECODE_ROWS as i32;
    // The chunk's rows that exist (its last chunk may be partly empty).
    let rows_here = min_i32(DECODE_ROWS as i32, rows_per_head - row_base) as usize;
    let row_head_token = |row: i32| head_and_token(p, kv_head, group, row);
    // Index of (split, this batch entry, head, token) in the `[splits, B, Hq, n_q]` partials.
    let partial_row = |s: i32, head: i32, tok: i32| {
        ((s as i64 * p.batch as i64 + batch) * p.heads_q as i64 + head as i64) * p.n_q as i64
            + tok as i64
    };

    // How the row group's splits merge (the same for every block of a cluster): a single split
    // writes its rows as they are; a cluster that is exactly the group's splits, in split order,
    // merges through distributed shared memory; else through the global partials and the last
    // block to count itself.
    let merge = if splits == 1 {
        Merge::Alone
    } else if cluster_blocks() == splits as u32 && cluster_cta_rank() == split as u32 {
        Merge::Cluster
    } else {
        Merge::Global
    };
    // The final rows: O as four columns `col..` of chunk row `row`, and a row's LSE.
    let store_o = |row: usize, col: usize, o: [f32; 4]| {
        let (head, tok) = row_head_token(row_base + row as i32);
        let off = batch * p.o_strides[0]
            + tok as i64 * p.o_strides[1]
            + head as i64 * p.o_strides[2]
            + col as i64;
        unsafe {
            st_global_u32(p.o + (off * 2) as u64, E::pack(o[0], o[1]));
            st_global_u32(p.o + (off * 2 + 4) as u64, E::pack(o[2], o[3]));
        }
    };
    let store_lse = |row: usize, lse: f32| {
        let (head, tok) = row_head_token(row_base + row as i32);
        let idx = (batch * p.heads_q as i64 + head as i64) * p.n_q as i64 + tok as i64;
        unsafe { st_global_f32(p.lse + (idx * 4) as u64, lse) };
    };

    // Merge the warps: stats [warp][row] = (max, sum), then O [warp][row][D] unnormalised; past
    // both, a cluster merge's partial rows: LSE [row], then O [row][D].
    let stats = smem;
    let o_buf = smem + stats_bytes as u32;
    let part_lse = o_buf + (warps * DECODE_ROWS * o_stride * 4) as u32;
    let part_o = part_lse + (DECODE_ROWS * 4) as u32;
    const {
        let warps = decode_threads(D) / 32;
        assert!(
            warps * DECODE_ROWS * (8 + (D + MERGE_ROW_PAD) * 4) + DECODE_ROWS * (D + 1) * 4
                <= decode_ring_bytes(D)
        )
    };
    let stat_at = |w: usize, row: usize| stats + ((w * DECODE_ROWS + row) * 8) as u32;
    let mut sum = state.sum;
    for v in sum.iter_mut() {
        *v += shfl_xor_f32(*v, 1);
        *v += shfl_xor_f32(*v, 2);
    }
    for r in 0..2 {
        let row = g + 8 * r;
        if t == 0 {
            unsafe {
                st_shared_f32(stat_at(warp, row), state.max[r]);
                st_shared_f32(stat_at(warp, row) + 4, sum[r]);
            }
        }
    }
    // Column pairs (2t, 2t + 1) as one 8-byte store: each half warp then hits 32 distinct banks.
    // Rows past the chunk's are not stored (a GQA group of one token fills 4 of the 16).
    for e in (0..ON).step_by(2) {
        let row = g + 8 * ((e % 4) / 2);
        let col = 8 * (e / 4) + 2 * t;
        let at = o_buf + (((warp * 16 + row) * o_stride + col) * 4) as u32;
        if row < rows_here {
            unsafe { st_shared_v2_f32(at, [acc[e], acc[e + 1]]) };
        }
    }
    sync_threads();

    // Each warp's weight in each row, exp2(m_w - m) / l, once: `warps` neighbouring threads per
    // row find the row's max m and sum l by shuffles, and each writes its warp's weight over that
    // warp's max. The row's first thread writes the row's LSE partial.
    if tid < DECODE_ROWS * warps {
        let (row, w) = (tid / warps, tid % warps);
        let (mw, lw) = unsafe {
            (
                ld_shared_f32(stat_at(w, row)),
                ld_shared_f32(stat_at(w, row) + 4),
            )
        };
        let m = lane_group_max_f32(mw, warps);
        let f = if m == f32::NEG_INFINITY {
            0.0
        } else {
            exp2_approx(mw - m)
        };
        let l = lane_group_sum_f32(f * lw, warps);
        let (weight, lse) = if l > 0.0 {
            (f * rcp_approx(l), (m + log2_approx(l)) * LN_2)
        } else {
            (0.0, f32::NEG_INFINITY)
        };
        unsafe { st_shared_f32(stat_at(w, row), weight) };
        if w == 0 && row < rows_here {
            match merge {
                Merge::Alone => store_lse(row, lse),
                Merge::Cluster => unsafe { st_shared_f32(part_lse + (row * 4) as u32, lse) },
                Merge::Global => {
                    let (head, tok) = row_head_token(row_base + row as i32);
                    let at = p.lse_partial + (partial_row(split, head, tok) * 4) as u64;
                    unsafe { st_global_f32(at, lse) };
                }
            }
        }
    }
    sync_threads();
    // The block's partial rows: four columns per item, the warps' O by their weights.
    for idx in (tid..rows_here * (D / 4)).step_by(threads) {
        let (row, col) = (idx / (D / 4), 4 * (idx % (D / 4)));
        let mut o = [0f32; 4];
        for w in 0..warps {
            let wr = w * DECODE_ROWS + row;
            let (weight, x) = unsafe {
                (
                    ld_shared_f32(stat_at(w, row)),
                    ld_shared_v4_f32(o_buf + ((wr * o_stride + col) * 4) as u32),
                )
            };
            for c in 0..4 {
                o[c] += weight * x[c];
            }
        }
        match merge {
            Merge::Alone => store_o(row, col, o),
            Merge::Cluster => unsafe {
                let at = part_o + ((row * D + col) * 4) as u32;
                st_shared_v4(at, o.map(f32::to_bits));
            },
            Merge::Global => {
                let (head, tok) = row_head_token(row_base + row as i32);
                let row_at = partial_row(split, head, tok) * D as i64 + col as i64;
                unsafe { st_global_v4_f32(p.o_partial + (row_at * 4) as u64, o) };
            }
        }
    }

    // Global merge: the last split block of this row group to get here merges all splits. One
    // thread publishes the block's partial rows (the barrier, then a release fence before the
    // count) and, in the last block, acquires the other blocks' (a fence after the count, then
    // the barrier), as cooperative groups' grid barrier does.
    sync_threads(); // every partial row stored; the shared stats and O buffer no longer read
    let flag = smem;
    if tid == 0 && merge == Merge::Global {
        let group_index = by as i64 + batch * p.heads_kv as i64 * row_chunks as i64;
        let counter = p.counters + 4 * group_index as u64;
        fence_acq_rel_gpu();
        let last = unsafe { atom_add_u32(counter, 1) } == (splits - 1) as u32;
        if last {
            fence_acq_rel_gpu();
            unsafe { st_global_u32(counter, 0) }; // ready for the next launch: no other block uses it now
        }
        unsafe { st_shared_u32(flag, last as u32) };
    }
    // The fused append's length: the sequence's last block to count itself advances it (every
    // block read it before its count; none reads it after). A thread of another warp counts,
    // beside the row group's count.
    if tid == 32 && fused_append && p.arrivals != 0 {
        fence_acq_rel_gpu(); // the block's reads of the length, before its arrival
        let arrivals = p.arrivals + 4 * batch as u64;
        if unsafe { atom_add_u32(arrivals, 1) } == (p.seq_blocks - 1) as u32 {
            fence_acq_rel_gpu();
            let len = unsafe { sequence_len(p, batch) };
            unsafe {
                st_global_u32(
                    p.seqlens + 4 * batch as u64,
                    min_i32(len + p.n_q, p.seqlen) as u32,
                );
                st_global_u32(arrivals, 0);
            }
        }
    }
    match merge {
        Merge::Alone => return,
        Merge::Cluster => {
            unsafe {
                merge_in_cluster::<E, D>(
                    part_lse, part_o, rows_here, split, splits, store_o, store_lse,
                )
            };
            return;
        }
        Merge::Global => {}
    }
    sync_threads();
    if unsafe { ld_shared_u32(flag) } == 0 {
        return;
    }
    // The global merge stays inline here: as a function of its own (`decode_merge`) ptxas
    // scheduled the tail differently, and serve B = 1 at 32k ran 1-5% slower in eight paired
    // rounds (session 33).
    // The merge is on the launch's critical path (the last block of each row group runs it
    // alone), so its loads go out together: every split's LSE, and each thread's first
    // `merge_depth` splits of O, which need no weight yet.
    let weights = smem + 1024;
    let splits = (splits as usize).max(1);
    let weight_at = |row: usize, s: usize| weights + ((row * DECODE_MAX_SPLITS + s) * 4) as u32;
    // O items: four columns of a chunk row each; where the items are fewer than the threads (a
    // GQA group of one token: 4 rows of 16), `tpi` neighbouring threads share an item's splits
    // and add up by shuffles.
    let items = rows_here * (D / 4);
    let mut tpi = 1;
    while tpi < 8 && 2 * tpi * items <= threads {
        tpi *= 2;
    }
    let depth = const { merge_depth(D) };
    // Bytes from one split's partial rows to the next's.
    let split_bytes = (p.batch as i64 * p.heads_q as i64 * p.n_q as i64 * D as i64 * 4) as u64;
    // Splits `s0, s0 + tpi, ...` of an item (zeros past the last split or for no item).
    let load_o = |item: usize, s0: usize| {
        let (row, col) = (item / (D / 4), 4 * (item % (D / 4)));
        let (head, tok) = row_head_token(row_base + row as i32);
        let row_at = partial_row(s0 as i32, head, tok) * D as i64 + col as i64;
        let at = p.o_partial.wrapping_add((row_at * 4) as u64);
        let mut xs = [[0f32; 4]; MERGE_DEPTH];
        for (k, x) in xs.iter_mut().enumerate().take(depth) {
            let live = item < items && s0 + k * tpi < splits;
            let src = at.wrapping_add((k * tpi) as u64 * split_bytes);
            *x = unsafe { ld_global_cg_v4_f32_if(live, src) };
        }
        xs
    };
    // 1. Each (row, split) LSE into shared memory, one per thread; the thread's first LSE load
    // goes out before its O loads, so that it is not queued behind them.
    let lse_count = rows_here * splits;
    let lse_src = |idx: usize| {
        let (row, s) = (idx / splits, idx % splits);
        let (head, tok) = row_head_token(row_base + row as i32);
        (
            weight_at(row, s),
            p.lse_partial + (partial_row(s as i32, head, tok) * 4) as u64,
        )
    };
    let (lse_dst, lse_at) = lse_src(tid.min(lse_count - 1));
    let lse = unsafe { ld_global_cg_f32(lse_at) };
    let first = load_o(tid / tpi, tid % tpi);
    if tid < lse_count {
        unsafe { st_shared_f32(lse_dst, lse) };
    }
    for idx in (tid + threads..lse_count).step_by(threads) {
        let (dst, at) = lse_src(idx);
        unsafe { st_shared_f32(dst, ld_global_cg_f32(at)) };
    }
    sync_threads();
    // 2. Per row (one warp each, lanes over splits): the merged LSE, then each split's weight
    // exp(lse_s - lse) in place of its LSE (0 for a split that saw no key).
    for row in (warp..DECODE_ROWS).step_by(warps) {
        let global_row = row_base + row as i32;
        if global_row >= rows_per_head {
            continue;
        }
        let mut m = f32::NEG_INFINITY;
        for s in (lane..splits).step_by(32) {
            m = max_f32(m, unsafe { ld_shared_f32(weight_at(row, s)) });
        }
        let m = warp_max_f32(m);
        let mut total = 0f32;
        if m != f32::NEG_INFINITY {
            for s in (lane..splits).step_by(32) {
                total += exp2_approx((unsafe { ld_shared_f32(weight_at(row, s)) } - m) * LOG2_E);
            }
        }
        let total = warp_sum_f32(total);
        let lse = merged_lse(m, total);
        for s in (lane..splits).step_by(32) {
            let w = if total > 0.0 {
                exp2_approx((unsafe { ld_shared_f32(weight_at(row, s)) } - lse) * LOG2_E)
            } else {
                0.0
            };
            unsafe { st_shared_f32(weight_at(row, s), w) };
        }
        if lane == 0 {
            store_lse(row, lse);
        }
    }
    sync_threads();
    // 3. O: the weighted sum of each item's splits, `merge_depth` splits per thread and batch of
    // loads (the first batch already in registers).
    for base in (0..items * tpi).step_by(threads) {
        let slot = base + tid;
        let (item, part) = (slot / tpi, slot % tpi);
        let active = item < items;
        let row = item / (D / 4);
        let mut o = [0f32; 4];
        if active {
            for s0 in (part..splits).step_by(depth * tpi) {
                let xs = if base == 0 && s0 == part {
                    first
                } else {
                    load_o(item, s0)
                };
                for (k, x) in xs.iter().enumerate().take(depth) {
                    let s = s0 + k * tpi;
                    let w = if s < splits {
                        unsafe { ld_shared_f32(weight_at(row, s)) }
                    } else {
                        0.0
                    };
                    for c in 0..4 {
                        o[c] += w * x[c];
                    }
                }
            }
        }
        let mut lanes = 1;
        while lanes < tpi {
            for v in o.iter_mut() {
                *v += shfl_xor_f32(*v, lanes as u32);
            }
            lanes *= 2;
        }
        if active && part == 0 {
            store_o(row, 4 * (item % (D / 4)), o);
        }
    }
}

/// Row `row` of KV head `kv_head`'s group of `group` query heads: (query head
/// `kv_head * group + row / n_q`, token `row % n_q`).
#[inline(always)]
fn head_and_token(p: &DecodeParams, kv_head: i32, group: i32, row: i32) -> (i32, i32) {
    let gi = div_or_zero(row, p.n_q);
    (kv_head * group + gi, row - gi * p.n_q)
}

macro_rules! decode_entry {
    ($name:ident, $elem:ty, $d:literal, $paging:expr) => {
        decode_entry!($name, $elem, $d, $paging, false);
    };
    ($name:ident, $elem:ty, $d:literal, $paging:expr, $alibi:literal) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: DecodeParams) {
            allow_dependent_grid();
            if block_idx_x() as i32 >= p.blocks {
                return; // rounding to whole clusters
            }
            if p.prefetch_tiles > 0 {
                unsafe { prefetch_first_tiles::<$d, { $paging }>(&p) };
            }
            wait_for_previous_grid();
            unsafe { decode::<$elem, $d, { $d / 16 }, { $d / 2 }, { $paging }, $alibi>(&p) }
        }
    };
}

decode_entry!(duo_decode_bf16_d64, Bf16, 64, paging::NONE);
decode_entry!(duo_decode_bf16_d128, Bf16, 128, paging::NONE);
decode_entry!(duo_decode_bf16_d256, Bf16, 256, paging::NONE);
decode_entry!(duo_decode_f16_d64, F16, 64, paging::NONE);
decode_entry!(duo_decode_f16_d128, F16, 128, paging::NONE);
decode_entry!(duo_decode_f16_d256, F16, 256, paging::NONE);
decode_entry!(duo_decode_paged_bf16_d64, Bf16, 64, paging::ROWS);
decode_entry!(duo_decode_paged_bf16_d128, Bf16, 128, paging::ROWS);
decode_entry!(duo_decode_paged_bf16_d256, Bf16, 256, paging::ROWS);
decode_entry!(duo_decode_paged_f16_d64, F16, 64, paging::ROWS);
decode_entry!(duo_decode_paged_f16_d128, F16, 128, paging::ROWS);
decode_entry!(duo_decode_paged_f16_d256, F16, 256, paging::ROWS);
decode_entry!(duo_decode_paged_tiles_bf16_d64, Bf16, 64, paging::TILES);
decode_entry!(duo_decode_paged_tiles_bf16_d128, Bf16, 128, paging::TILES);
decode_entry!(duo_decode_paged_tiles_bf16_d256, Bf16, 256, paging::TILES);
decode_entry!(duo_decode_paged_tiles_f16_d64, F16, 64, paging::TILES);
decode_entry!(duo_decode_paged_tiles_f16_d128, F16, 128, paging::TILES);
decode_entry!(duo_decode_paged_tiles_f16_d256, F16, 256, paging::TILES);

// ALiBi builds (FlashAttention's `alibi_slopes` over a KV cache, contiguous or paged).
decode_entry!(duo_decode_alibi_bf16_d64, Bf16, 64, paging::NONE, true);
decode_entry!(duo_decode_alibi_f16_d64, F16, 64, paging::NONE, true);
decode_entry!(duo_decode_alibi_bf16_d128, Bf16, 128, paging::NONE, true);
decode_entry!(duo_decode_alibi_f16_d128, F16, 128, paging::NONE, true);
decode_entry!(duo_decode_alibi_bf16_d256, Bf16, 256, paging::NONE, true);
decode_entry!(duo_decode_alibi_f16_d256, F16, 256, paging::NONE, true);
decode_entry!(
    duo_decode_alibi_paged_bf16_d64,
    Bf16,
    64,
    paging::ROWS,
    true
);
decode_entry!(duo_decode_alibi_paged_f16_d64, F16, 64, paging::ROWS, true);
decode_entry!(
    duo_decode_alibi_paged_bf16_d128,
    Bf16,
    128,
    paging::ROWS,
    true
);
decode_entry!(
    duo_decode_alibi_paged_f16_d128,
    F16,
    128,
    paging::ROWS,
    true
);
decode_entry!(
    duo_decode_alibi_paged_bf16_d256,
    Bf16,
    256,
    paging::ROWS,
    true
);
decode_entry!(
    duo_decode_alibi_paged_f16_d256,
    F16,
    256,
    paging::ROWS,
    true
);
decode_entry!(
    duo_decode_alibi_paged_tiles_bf16_d64,
    Bf16,
    64,
    paging::TILES,
    true
);
decode_entry!(
    duo_decode_alibi_paged_tiles_f16_d64,
    F16,
    64,
    paging::TILES,
    true
);
decode_entry!(
    duo_decode_alibi_paged_tiles_bf16_d128,
    Bf16,
    128,
    paging::TILES,
    true
);
decode_entry!(
    duo_decode_alibi_paged_tiles_f16_d128,
    F16,
    128,
    paging::TILES,
    true
);
decode_entry!(
    duo_decode_alibi_paged_tiles_bf16_d256,
    Bf16,
    256,
    paging::TILES,
    true
);
decode_entry!(
    duo_decode_alibi_paged_tiles_f16_d256,
    F16,
    256,
    paging::TILES,
    true
);
