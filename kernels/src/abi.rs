//! Launch ABI shared by the kernels and the host: parameter structs passed by value, tile sizes,
//! head-kind codes and kernel entry names. `#[repr(C)]` on both sides, so one definition serves both.

/// Query rows per thread block of the prefill kernel (4 warps x 16 rows).
pub const PREFILL_BLOCK_M: usize = 64;
/// Keys per KV tile of the prefill kernel.
pub const PREFILL_BLOCK_N: usize = 64;
/// Threads per block of the prefill kernel.
pub const PREFILL_THREADS: usize = 128;

/// Query rows per block of the Hopper (wgmma) prefill kernels: two warpgroups of 64 rows.
pub const WG_BLOCK_M: usize = 128;
/// Keys per KV tile of the Hopper prefill kernels.
pub const WG_BLOCK_N: usize = 128;
/// K/V stages in the Hopper prefill kernels' shared-memory ring.
pub const WG_STAGES: usize = 3;
/// Threads per block of the default Hopper prefill kernel (two warpgroups that load and compute).
pub const WG_THREADS: usize = 256;

/// Dynamic shared memory of the default Hopper prefill kernel for head dim `d`: Q, then
/// `WG_STAGES` stages of (K, V), all bf16/f16. D = 128: 224 KiB of the 227 KiB a block may have.
pub const fn wg_smem_bytes(d: usize) -> usize {
    WG_BLOCK_M * d * 2 + WG_STAGES * 2 * WG_BLOCK_N * d * 2
}

/// Threads per block of the warp-specialised Hopper kernel (the default): a producer warpgroup
/// (loads) and two consumer warpgroups (math).
pub const WS_THREADS: usize = 384;
/// Registers per thread after `setmaxnreg`, cp.async build: the producer gives its registers to
/// the consumers. 168 at entry x 384 threads = 72 x 128 + 216 x 256: the pool balances exactly.
pub const WS_PRODUCER_REGISTERS: u32 = 72;
/// Registers per consumer thread after `setmaxnreg`, cp.async build.
pub const WS_CONSUMER_REGISTERS: u32 = 216;
/// The TMA build (its producer is one warp with one issuing thread, which fits in 24): 24 x 128 +
/// 240 x 256, the same pool. D = 256 needs it (O alone is 128 registers), D <= 128 holds Q in
/// registers with it.
pub const WS_TMA_PRODUCER_REGISTERS: u32 = 24;
/// Registers per consumer thread after `setmaxnreg`, TMA build.
pub const WS_TMA_CONSUMER_REGISTERS: u32 = 240;
const _: () = assert!(
    WS_PRODUCER_REGISTERS * 128 + WS_CONSUMER_REGISTERS * 256 == 168 * 384
        && WS_TMA_PRODUCER_REGISTERS * 128 + WS_TMA_CONSUMER_REGISTERS * 256 == 168 * 384
);

/// Head dims of the warp-specialised TMA kernel (the other prefill kernels: 64 and 128).
pub const WS_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Keys per KV block of the warp-specialised kernel for head dim `d`: 128, or 48 at D = 256,
/// where a consumer's O accumulator alone is 128 registers and Q takes 64 KiB: three stages of 48
/// keys fit beside Q (two stages of 64 left the consumers waiting for K/V 39% of the time).
pub const fn ws_block_n(d: usize) -> usize {
    if d > 128 { 48 } else { WG_BLOCK_N }
}

/// Byte offset of the warp-specialised kernel's mbarriers (after Q and the K/V ring).
pub const fn ws_barrier_offset(d: usize) -> usize {
    WG_BLOCK_M * d * 2 + WG_STAGES * 2 * ws_block_n(d) * d * 2
}

/// Dynamic shared memory of the warp-specialised kernel: Q, the K/V ring, then mbarriers (Q full
/// and Q empty; full and empty per stage), six u32 work slots and the tail mbarrier (the cache entries').
/// D = 128: 224 KiB of the 227 KiB a block may have; D = 256: 208 KiB.
pub const fn ws_smem_bytes(d: usize) -> usize {
    ws_barrier_offset(d) + (2 + 2 * WG_STAGES) * 8 + 6 * 4 + 8
}

/// Most KV heads per layer: head kinds travel in the launch parameters as a bitmask.
pub const MAX_KV_HEADS: usize = 256;
/// Words of the streaming-head bitmask.
pub const HEAD_MASK_WORDS: usize = MAX_KV_HEADS / 32;

/// Largest sequence length the kernels accept: position arithmetic stays inside `i32`.
pub const MAX_SEQLEN: usize = 1 << 30;

/// Parameters of the prefill kernel (`duo_prefill_*` entries), passed by value.
///
/// Layouts: q/o `[B, Sq, Hq, D]`, k/v `[B, Sk, Hkv, D]` with the given element strides and the last
/// dimension contiguous; lse `[B, Hq, Sq]` contiguous f32; head_kinds `[Hkv]` u32.
/// Grid: `(ceil(Sq / BLOCK_M), Hq, B)`, block: `PREFILL_THREADS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefillParams {
    /// Device address of Q.
    pub q: u64,
    /// Device address of K (the retrieval heads' with `split_kv`).
    pub k: u64,
    /// Device address of V (the retrieval heads' with `split_kv`).
    pub v: u64,
    /// Device address of O.
    pub o: u64,
    /// Device address of the f32 LSE (natural log), laid out by `lse_strides`.
    pub lse: u64,
    /// Bit `h` set: KV head `h` is a streaming head.
    pub streaming_heads: [u32; HEAD_MASK_WORDS],
    /// Element strides of (batch, sequence, head).
    pub q_strides: [i64; 3],
    /// Element strides of K, as `q_strides`.
    pub k_strides: [i64; 3],
    /// Element strides of V, as `q_strides`.
    pub v_strides: [i64; 3],
    /// Element strides of O, as `q_strides`.
    pub o_strides: [i64; 3],
    /// Query rows per sequence (varlen: the most).
    pub seqlen_q: i32,
    /// Keys per sequence (varlen: the most).
    pub seqlen_k: i32,
    /// Query heads.
    pub heads_q: i32,
    /// KV heads (`heads_q` is a multiple).
    pub heads_kv: i32,
    /// Streaming heads: keys `< sink` are always visible (clamped to `MAX_SEQLEN` by the host).
    pub sink: i32,
    /// Streaming heads: keys with `q_pos - k_pos < window` are visible (clamped likewise).
    pub window: i32,
    /// Retrieval heads: 1 = causal, 0 = full.
    pub causal: i32,
    /// Causal retrieval heads and streaming heads: keys up to `right` positions after the
    /// query are visible too (FlashAttention's `window_size[1]`; 0: causal). Clamped to
    /// `MAX_SEQLEN - 1` by the host.
    pub right: i32,
    /// softmax_scale * log2(e): scores go through exp2.
    pub scale_log2: f32,
    /// 0: KV head `h` reads head `h` of `k`/`v` (the plain attention API). 1 (the DuoAttention
    /// cache): retrieval heads read `k`/`v` and streaming heads read `stream_k`/`stream_v`, each
    /// at its rank among the KV heads of its kind, with that source's own length; query rows are
    /// bottom-right aligned to each source.
    pub split_kv: i32,
    /// With `split_kv`: keys of the streaming heads' source.
    pub seqlen_k_stream: i32,
    /// With `split_kv`: device address of the streaming heads' K.
    pub stream_k: u64,
    /// With `split_kv`: device address of the streaming heads' V.
    pub stream_v: u64,
    /// Element strides of `stream_k`, as `q_strides`.
    pub stream_k_strides: [i64; 3],
    /// Element strides of `stream_v`, as `q_strides`.
    pub stream_v_strides: [i64; 3],
    /// Varlen batches: device pointers to `[B + 1]` i32 prefix sums of the query and key lengths
    /// (both 0 for fixed-length batches). Sequence `b` is rows `cu[b]..cu[b + 1]` of packed
    /// `[total, H, D]` tensors (batch strides 0); `seqlen_q/k` (and `seqlen_k_stream`) are then
    /// the maxima. Keys end at `ends_k` (below).
    pub cu_seqlens_q: u64,
    /// Varlen: the keys' `[B + 1]` prefix sums (see `cu_seqlens_q`).
    pub cu_seqlens_k: u64,
    /// Varlen: device `[B]` i32 arrays, per K/V source (retrieval or all heads, then the
    /// streaming heads'), of each sequence's end row: sequence `b` reads key rows
    /// `cu_seqlens_k[b]..ends_k[b]` of its batch entry. Packed K/V: `cu_seqlens_k + 4` for both.
    /// The DuoAttention cache's ragged prefill: batch-strided K/V, `cu_seqlens_k` zeros and the
    /// ends each sequence's key count in that source (FlashAttention's `seqused_k`).
    pub ends_k: u64,
    /// Varlen: the streaming heads' source's ends (see `ends_k`).
    pub ends_k_stream: u64,
    /// LSE element strides of (batch, head): `[Hq * Sq, Sq]` for `[B, Hq, Sq]`, `[0, total_q]`
    /// for varlen `[Hq, total_q]` (rows then offset by the sequence start).
    pub lse_strides: [i64; 2],
    /// Query tiles per (sequence, head) and sequences: the persistent kernel's work space
    /// (`m_blocks * heads_q * batch` tiles; set at launch).
    pub m_blocks: i32,
    /// Sequences.
    pub batch: i32,
    /// Persistent kernel: two u32 counters (work tiles claimed, blocks done), zero at launch and
    /// left zero by the kernel's last block.
    pub work_counter: u64,
    /// Divisions by `m_blocks`, `heads_q` and the query heads per KV head, as a multiply and a
    /// shift: a work tile's decode sits on the consumers' critical path at each tile switch, and
    /// `div.u32` is a long dependent chain in SASS.
    pub m_blocks_div: FastDiv,
    /// Division by `heads_q` (see `m_blocks_div`).
    pub heads_q_div: FastDiv,
    /// Division by the query heads per KV head (see `m_blocks_div`).
    pub group_div: FastDiv,
    /// Split-KV (the `_split` TMA entries only; 1 elsewhere): work tile `w` is split `w %
    /// kv_splits` of query tile `w / kv_splits`, which walks that share of the tile's KV blocks
    /// (`split_range`) and writes its O (normalised, f32) and LSE to `partial_o` / `partial_lse`
    /// (the LSE's rows, `[B, Hq, Sq]` or varlen `[Hq, total_q]`, each `kv_splits` partial rows
    /// side by side; O rows of D) for `duo_prefill_merge_*`. Few query tiles
    /// against a long context (chunked prefill) then still fill every SM.
    pub kv_splits: i32,
    /// Division by `kv_splits`.
    pub kv_splits_div: FastDiv,
    /// Split-KV: device address of the f32 partial O rows.
    pub partial_o: u64,
    /// Split-KV: device address of the f32 partial LSE rows.
    pub partial_lse: u64,
    /// Paged K/V in the retrieval (or only) source, `duo_prefill_wgmma_tma_cache_*` entries only
    /// (0: not paged; those entries also zero V's rows past each sequence's keys): a device
    /// `[B, page_table_stride]` i32 table of page indices, K/V pages `[pages, 2^page_shift, H, D]`
    /// (batch stride = page stride). Key row `r` of sequence `b` is row `r & (page - 1)` of page
    /// `page_table[b][r >> page_shift]`; a page is a whole number of KV blocks. A page index
    /// outside the pool reads zeros (TMA's out-of-bounds fill), never other memory.
    pub page_table: u64,
    /// Paged: entries from one sequence's table row to the next.
    pub page_table_stride: i32,
    /// Paged: log2 of the rows per page.
    pub page_shift: i32,
    /// ALiBi entries (`_alibi_`) only: device address of f32 slopes, query head `h` of batch
    /// entry (or varlen sequence) `b` at `alibi_slopes[b * alibi_batch_stride + h]`.
    pub alibi_slopes: u64,
    /// ALiBi: 0 for one slope per head, `heads_q` for one per (batch entry, head).
    pub alibi_batch_stride: i32,
    /// ALiBi: `-1 / softmax_scale`; the kernels add `slope * alibi_neg_inv_scale * |q - k|` to
    /// raw scores (`softmax::alibi_scores`).
    pub alibi_neg_inv_scale: f32,
}

/// KV blocks `[lo, hi)` of split `split` of a tile that walks `blocks` of them in `splits`
/// near-equal runs (`splits_div` divides by `splits`): every split of a tile with at least
/// `splits` blocks gets one or more. Shared by the kernels and the host's tests.
#[inline(always)]
pub fn split_range(blocks: i32, split: i32, splits_div: FastDiv) -> (i32, i32) {
    let at = |s: i32| splits_div.quotient((s * blocks) as u32) as i32;
    (at(split), at(split + 1))
}

/// Most KV splits of a prefill (the merge holds one weight per split in registers).
pub const PREFILL_MAX_SPLITS: usize = 32;

/// Parameters of the split-KV merge (`duo_prefill_merge_*`): per query row of `[B, Hq, Sq]`, the
/// LSE-weighted sum of its `kv_splits` partial rows (layouts as in `PrefillParams`), written to
/// `o` (`[B, Sq, Hq, D]` element strides) and `lse` (strides of batch and head, rows contiguous).
/// A varlen launch merges as one sequence of `total_q` rows (`B = 1`, `Sq = total_q`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefillMergeParams {
    /// Device address of the f32 partial O rows (`PrefillParams::partial_o`).
    pub partial_o: u64,
    /// Device address of the f32 partial LSE rows (`PrefillParams::partial_lse`).
    pub partial_lse: u64,
    /// Device address of O.
    pub o: u64,
    /// Device address of the f32 LSE.
    pub lse: u64,
    /// Element strides of O: (batch, sequence, head).
    pub o_strides: [i64; 3],
    /// Element strides of the LSE: (batch, head).
    pub lse_strides: [i64; 2],
    /// Sequences (1 for a varlen launch).
    pub batch: i32,
    /// Query heads.
    pub heads_q: i32,
    /// Query rows per sequence (`total_q` for a varlen launch).
    pub seqlen_q: i32,
    /// Partial rows per query row.
    pub kv_splits: i32,
}

/// Query rows per block of the merge (one warp each).
pub const PREFILL_MERGE_ROWS: usize = 8;

/// `n / d` for `n < 2^31` as one widening multiply and a shift (Granlund and Montgomery): with
/// `l = ceil(log2 d)`, `multiplier = ceil(2^(31 + l) / d)` (below 2^32) and `shift = 31 + l`, the
/// product's error stays below `n / 2^(31 + l) < 1 / d`, too little to reach the next integer.
/// `d = 0` gives a zero quotient.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastDiv {
    /// `ceil(2^shift / d)`.
    pub multiplier: u32,
    /// `31 + ceil(log2 d)`.
    pub shift: u32,
}

impl FastDiv {
    /// The pair for divisor `d`.
    pub const fn new(d: u32) -> Self {
        if d == 0 {
            return FastDiv {
                multiplier: 0,
                shift: 0,
            };
        }
        let l = u32::BITS - (d - 1).leading_zeros(); // ceil(log2 d); 0 for d = 1
        let shift = 31 + l;
        let multiplier = (1u64 << shift).div_ceil(d as u64);
        FastDiv {
            multiplier: multiplier as u32,
            shift,
        }
    }

    /// `n / d` for `n < 2^31`.
    #[inline(always)]
    pub fn quotient(self, n: u32) -> u32 {
        ((n as u64 * self.multiplier as u64) >> self.shift) as u32
    }
}

/// An encoded TMA tensor map (`CUtensorMap`, opaque to us): what `cuTensorMapEncodeTiled` writes,
/// 128 bytes. TMA wants it 64-byte aligned; rustc's NVPTX kernel ABI takes by-value parameters
/// aligned to at most 16, so the kernel build raises the TMA entries' parameter to `.align 64`
/// (`duo-attn-kernel-build`), and the host encodes into a 64-byte aligned buffer and copies.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TensorMap(pub [u64; 16]);

/// Tensor maps of the TMA prefill kernel, in [`TmaPrefillParams::maps`] order.
pub const TMA_Q: usize = 0;
/// K (the retrieval heads' with `PrefillParams::split_kv`).
pub const TMA_K: usize = 1;
/// V (the retrieval heads' with `PrefillParams::split_kv`).
pub const TMA_V: usize = 2;
/// The streaming heads' K (`PrefillParams::stream_k`).
pub const TMA_STREAM_K: usize = 3;
/// The streaming heads' V (`PrefillParams::stream_v`).
pub const TMA_STREAM_V: usize = 4;
/// Tensor maps per launch.
pub const TMA_MAPS: usize = 5;

/// Parameters of the TMA prefill kernels (`duo_prefill_wgmma_tma_*`): the tensor maps of Q, K,
/// V and the streaming heads' K and V, each `[B, S, H, D]` as a rank-4 map (innermost first:
/// D, S, H, B; varlen tensors as one sequence of `total` rows), with a box of 64 columns (128 B,
/// the 128-byte swizzle span) by 128 rows, then the plain prefill parameters. The kernel reads the
/// maps where they are, in parameter space (`cvta.param`), so they come first (offsets multiples
/// of 128 from the 64-byte aligned parameter).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TmaPrefillParams {
    /// Indexed by `TMA_Q` .. `TMA_STREAM_V`.
    pub maps: [TensorMap; TMA_MAPS],
    /// The parameters every prefill kernel takes.
    pub prefill: PrefillParams,
}

/// Columns of a TMA box (one 128-byte-swizzled column block of a Q or K/V tile); its rows are a
/// tile's: `WG_BLOCK_M` for Q, `ws_block_n(D)` for K and V.
pub const TMA_BOX_COLS: usize = 64;

/// Prefill kernel entry names, by (element, head dim): the mma.sync kernel, the plain wgmma
/// kernel, the warp-specialised wgmma kernel with cp.async loads and with TMA loads, its split-KV
/// build and the split-KV merge.
pub const PREFILL_ENTRIES: [(&str, &str, usize); 62] = [
    ("duo_prefill_bf16_d64", "bf16", 64),
    ("duo_prefill_bf16_d128", "bf16", 128),
    ("duo_prefill_f16_d64", "f16", 64),
    ("duo_prefill_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_ws_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_ws_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_ws_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_ws_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_tma_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_tma_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_tma_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_tma_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_tma_bf16_d256", "bf16", 256),
    ("duo_prefill_wgmma_tma_f16_d256", "f16", 256),
    ("duo_prefill_wgmma_tma_split_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_tma_split_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_tma_split_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_tma_split_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_tma_split_bf16_d256", "bf16", 256),
    ("duo_prefill_wgmma_tma_split_f16_d256", "f16", 256),
    ("duo_prefill_wgmma_tma_cache_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_tma_cache_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_tma_cache_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_tma_cache_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_tma_cache_bf16_d256", "bf16", 256),
    ("duo_prefill_wgmma_tma_cache_f16_d256", "f16", 256),
    ("duo_prefill_wgmma_tma_cache_split_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_tma_cache_split_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_tma_cache_split_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_tma_cache_split_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_tma_cache_split_bf16_d256", "bf16", 256),
    ("duo_prefill_wgmma_tma_cache_split_f16_d256", "f16", 256),
    ("duo_prefill_merge_bf16_d64", "bf16", 64),
    ("duo_prefill_merge_bf16_d128", "bf16", 128),
    ("duo_prefill_merge_f16_d64", "f16", 64),
    ("duo_prefill_merge_f16_d128", "f16", 128),
    ("duo_prefill_merge_bf16_d256", "bf16", 256),
    ("duo_prefill_merge_f16_d256", "f16", 256),
    ("duo_prefill_wgmma_ws_alibi_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_ws_alibi_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_ws_alibi_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_ws_alibi_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_tma_alibi_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_tma_alibi_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_tma_alibi_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_tma_alibi_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_tma_alibi_split_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_tma_alibi_split_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_tma_alibi_split_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_tma_alibi_split_f16_d128", "f16", 128),
    ("duo_prefill_wgmma_tma_cache_alibi_bf16_d64", "bf16", 64),
    ("duo_prefill_wgmma_tma_cache_alibi_f16_d64", "f16", 64),
    ("duo_prefill_wgmma_tma_cache_alibi_bf16_d128", "bf16", 128),
    ("duo_prefill_wgmma_tma_cache_alibi_f16_d128", "f16", 128),
    (
        "duo_prefill_wgmma_tma_cache_alibi_split_bf16_d64",
        "bf16",
        64,
    ),
    ("duo_prefill_wgmma_tma_cache_alibi_split_f16_d64", "f16", 64),
    (
        "duo_prefill_wgmma_tma_cache_alibi_split_bf16_d128",
        "bf16",
        128,
    ),
    (
        "duo_prefill_wgmma_tma_cache_alibi_split_f16_d128",
        "f16",
        128,
    ),
];

/// Head dims the decode kernel (and so the DuoAttention cache) serves.
pub const DECODE_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Keys per KV tile of the decode kernel for head dim `d` (16 per warp): 128 up to D = 128 (8
/// warps, one block per SM: twice the warps of the 4-warp, 64-key version kept more loads issued
/// per SM, B=8 32k 2.86 -> 2.91 TB/s, 128k 2.90 -> 3.00), 64 at D = 256 so that three stages fit.
pub const fn decode_block_n(d: usize) -> usize {
    if d > 128 { 64 } else { 128 }
}

/// Threads per decode block for head dim `d`: one warp per 16 keys of a tile.
pub const fn decode_threads(d: usize) -> usize {
    32 * decode_block_n(d) / 16
}

/// Whether the decode kernel keeps the query fragments in shared memory rather than registers:
/// at D = 256 they would take 64 registers beside the 128 of the accumulators, and spill.
pub const fn decode_q_in_shared(d: usize) -> bool {
    d > 128
}

/// Query rows (query heads of one KV group x query tokens) per decode block.
pub const DECODE_ROWS: usize = 16;
/// K/V stages of the decode kernel's cp.async ring (3 x 64 KiB at D = 128: one block per SM; two
/// stages measured 1% slower on all-retrieval decode, 2-3% faster on half-streaming decode).
pub const DECODE_STAGES: usize = 3;
/// Most KV splits of one decode call (the merging block keeps a weight per split and row in shared memory).
pub const DECODE_MAX_SPLITS: usize = 256;

/// Fewest K/V tiles a decode split walks when the cache has enough of them: a short cache split
/// into one full wave leaves each block one or two tiles, too few for its load ring, and more
/// partials to merge. Measured on an H100 (B = 1, GQA 32/8, 4k): 8 splits of 4 tiles 5% faster
/// than 16 of 2; 8 tiles per split 5% slower. The host plans with it; with per-sequence key
/// counts the kernel spreads each sequence's own tiles by it too.
pub const DECODE_MIN_TILES_PER_SPLIT: usize = 4;

/// Byte offset of 16-byte chunk `chunk` of key row `row` in a decode K/V tile of head dim `d`.
/// Rows are unpadded and chunks XOR-swizzled by the row's low three bits: the 16-byte cp.async
/// writes of one warp land on distinct banks (so each 128-byte run of global memory travels as
/// one L2 request), and so do the fragment reads of eight consecutive rows. A padded row (D + 8)
/// had put the second row of every warp's write on the first row's banks; the split requests
/// read 1.5x the sectors from L2 (ncu on an H200, docs/perf-log.md session 15).
pub const fn decode_tile_offset(d: usize, row: usize, chunk: usize) -> usize {
    row * d * 2 + ((chunk ^ (row & 7)) * 16)
}

/// Bytes of the decode kernel's K/V ring for head dim `d` (the cross-warp reduction reuses it).
pub const fn decode_ring_bytes(d: usize) -> usize {
    DECODE_STAGES * 2 * decode_block_n(d) * d * 2
}

/// Dynamic shared memory of the decode kernel for head dim `d`: the K/V ring, then the query
/// tile where it lives in shared memory ([`decode_q_in_shared`]).
pub const fn decode_smem_bytes(d: usize) -> usize {
    decode_ring_bytes(d)
        + if decode_q_in_shared(d) {
            DECODE_ROWS * d * 2
        } else {
            0
        }
}

/// Dynamic shared memory of the paged decode entries: the plain entries', then per stage the
/// page-table entries of that stage's tile (one per page it touches: at most one per key row),
/// fetched a tile ahead so that no tile's loads wait on the table.
pub const fn decode_paged_smem_bytes(d: usize) -> usize {
    decode_smem_bytes(d) + DECODE_STAGES * decode_block_n(d) * 4
}

/// A key/value source with its element strides of (batch, sequence, head).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KvSource {
    /// Device address of K.
    pub k: u64,
    /// Device address of V.
    pub v: u64,
    /// Element strides of K: (batch, sequence, head).
    pub k_strides: [i64; 3],
    /// Element strides of V: (batch, sequence, head).
    pub v_strides: [i64; 3],
}

/// Parameters of the decode kernel (`duo_decode_*`): a block of `n_q` new query tokens per
/// sequence against a KV cache whose length (new tokens included) is `seqlen`.
///
/// q `[B, n_q, Hq, D]` strided. With `ring == 0` every KV head `h` reads head `h` of `full`
/// (`[B, >= seqlen, Hkv, D]`), and streaming heads visit only their sink and window blocks.
/// With `ring == 1` (the DuoAttention cache) retrieval heads read `full` and streaming heads read
/// `stream`, a ring of `sink + recent` slots (`[B, sink + recent, Hs, D]`), each at its rank
/// among the heads of its kind. Outputs are per split: `o_partial` f32 `[splits, B, Hq, n_q, D]`
/// (normalised within the split) and `lse_partial` f32 `[splits, B, Hq, n_q]` (natural log,
/// -inf for a split that saw nothing); `duo_decode_combine` merges them.
/// Grid: one-dimensional, `B x ceil(G * n_q / DECODE_ROWS)` row chunks per KV head times each head's
/// splits (see `stream_splits`), block `decode_threads(D)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeParams {
    /// Device address of Q.
    pub q: u64,
    /// Element strides of Q: (batch, token, head).
    pub q_strides: [i64; 3],
    /// K/V of every head (`ring == 0`) or of the retrieval heads (`ring == 1`).
    pub full: KvSource,
    /// With `ring == 1`: the streaming heads' rings.
    pub stream: KvSource,
    /// Device address of the f32 partial O rows of the global merge.
    pub o_partial: u64,
    /// Device address of the f32 partial LSE rows of the global merge.
    pub lse_partial: u64,
    /// One u32 per row group: split blocks done, zero between launches.
    pub counters: u64,
    /// Device address of O, `[B, n_q, Hq, D]` by `o_strides`.
    pub o: u64,
    /// Device address of the f32 LSE, `[B, Hq, n_q]` contiguous.
    pub lse: u64,
    /// Element strides of O: (batch, token, head).
    pub o_strides: [i64; 3],
    /// Bit `h` set: KV head `h` is a streaming head.
    pub streaming_heads: [u32; HEAD_MASK_WORDS],
    /// Splits of each retrieval head's tiles.
    pub splits: i32,
    /// Sequences.
    pub batch: i32,
    /// New query tokens per sequence.
    pub n_q: i32,
    /// Query heads.
    pub heads_q: i32,
    /// KV heads (`heads_q` is a multiple).
    pub heads_kv: i32,
    /// Keys per sequence, new tokens included (see `seqlens`).
    pub seqlen: i32,
    /// Streaming heads: attention-sink tokens.
    pub sink: i32,
    /// Streaming heads: keys with `q_pos - k_pos < window` are visible.
    pub window: i32,
    /// Streaming ring: recent slots (after the `sink` fixed ones).
    pub recent: i32,
    /// 1: streaming heads read their rings in `stream` (the DuoAttention cache).
    pub ring: i32,
    /// Retrieval heads: 1 = causal, 0 = full.
    pub causal: i32,
    /// KV tiles each split walks (of the head's visited tiles, in order), planned for `seqlen`.
    /// With `seqlens`, a sequence spreads its own tiles over the splits instead: as evenly as
    /// they go, at least `min(tiles_per_split, DECODE_MIN_TILES_PER_SPLIT)` per split.
    pub tiles_per_split: i32,
    /// Splits of each streaming head's tiles (`splits` is the retrieval heads'). The grid is
    /// one-dimensional: `B x retrieval heads x row chunks x splits` retrieval blocks, then
    /// `B x streaming heads x row chunks x stream_splits` streaming blocks.
    pub stream_splits: i32,
    /// Divisions by `splits`, `stream_splits`, the row chunks per KV head and the retrieval and
    /// streaming head counts, for the block's place in the grid (`heads::DecodeBlock`).
    pub split_divs: [FastDiv; 2],
    /// Division by the row chunks per KV head.
    pub row_chunks_div: FastDiv,
    /// Divisions by the retrieval and the streaming head counts.
    pub kind_heads_divs: [FastDiv; 2],
    /// softmax_scale * log2(e): scores go through exp2.
    pub scale_log2: f32,
    /// 0, or a device `[batch]` i32 array of per-sequence key counts (`cache_seqlens`), each
    /// clamped into `0..=seqlen` by the kernel; `seqlen` is then the K/V tensors' length.
    pub seqlens: u64,
    /// 0, or paged K/V (the `duo_decode_paged_*` entries, with `seqlens`): a device i32 block
    /// table, row `b` (`block_table_stride` entries apart) listing sequence `b`'s pages in key
    /// order. `full`'s stride 0 then runs between pages of `1 << page_shift` rows, `num_pages` of
    /// them (entries are clamped into the pool), and `seqlen` is the table row's capacity in keys.
    /// The `duo_decode_paged_tiles_*` entries look up one page per KV tile and need pages of at
    /// least `decode_block_n(D)` rows; the `duo_decode_paged_*` ones take any power of two.
    pub block_table: u64,
    /// Entries from one sequence's table row to the next.
    pub block_table_stride: i64,
    /// Pages in the pool.
    pub num_pages: i32,
    /// log2 of the rows per page.
    pub page_shift: i32,
    /// The append fused into a decode step, of the DuoAttention cache or of a caller's KV cache
    /// (0 in `append.k`: no append). `seqlens` is then the device lengths before the step: every
    /// block reads its sequence's length `len` (clamped into `0..=seqlen`) and attends over
    /// `min(len + n_q, seqlen)` keys. Before its first load, each block writes the new rows
    /// `append` `[B, n_q, Hkv, D]` that fall in the keys (at their positions, below `seqlen`, in
    /// `full` or its pages) or ring slots (a cache's streaming heads, skipping a row that a later
    /// new row overwrites) it reads, as `duo_cache_append` would: each such key or slot
    /// belongs to exactly one split, its only reader (a key no split reads goes with split 0).
    /// With `arrivals` set, the last of a sequence's `seq_blocks` blocks to count itself in
    /// `arrivals[b]` advances `seqlens[b]` and zeroes the count. An entry that does not fuse
    /// the append ([`decode_fuses_append`]) still attends over the `n_q` new keys: the host then
    /// queues `duo_cache_append` before it.
    pub append: KvSource,
    /// With `append`: one u32 per sequence, zero between launches; 0: `seqlens` stay as they are
    /// (a caller's `cache_seqlens`, which it advances itself).
    pub arrivals: u64,
    /// With `append`: blocks per sequence (the launch's blocks over `batch`).
    pub seq_blocks: i32,
    /// K/V tiles (of the first ones this block walks) that each block asks the L2 for before it
    /// waits for the previous kernel (`cp.async.bulk.prefetch`): the loads then overlap that
    /// kernel's tail. 0: none. Contiguous rows only (head-major K/V, whole-tile pages).
    pub prefetch_tiles: i32,
    /// Blocks with work: the grid may be rounded up to whole clusters, and blocks from `blocks`
    /// on return at once. A launch in clusters of `splits` blocks (the host's choice, for 2 to
    /// `DECODE_MAX_CLUSTER` splits) merges each row group's splits through distributed shared
    /// memory: a block whose cluster is exactly its row group's splits, in split order, takes
    /// that path (so a streaming row group of one split, or a cluster that is not one row group,
    /// keeps the other paths).
    pub blocks: i32,
    /// ALiBi entries (`duo_decode_alibi_*`) only: device address of f32 slopes, query head `h`
    /// of sequence `b` at `alibi_slopes[b * alibi_batch_stride + h]`. Keys sit at their own
    /// positions, so these entries take no ring (`ring == 0`).
    pub alibi_slopes: u64,
    /// ALiBi: 0 (one row of slopes for every sequence) or the query heads.
    pub alibi_batch_stride: i32,
    /// ALiBi: `-1 / softmax_scale` (see `PrefillParams::alibi_neg_inv_scale`).
    pub alibi_neg_inv_scale: f32,
    /// RoPE fused into the step (`rotary.cos != 0`; with `append` and `seqlens`): the fused
    /// append writes the new K rows turned, new key `i` of sequence `b` at its position
    /// `seqlens[b] + i`, and Q rows turn as they load, query token `i` at the position of the
    /// step's `i`-th new key (the step's keys less `n_q`, plus `i`), where
    /// [`decode_turns_q`] holds (else the host turned Q before the launch). The caller's Q and
    /// new K stay as they are. A position outside the table leaves its row unturned.
    pub rotary: RotaryTable,
}

/// Most blocks of a decode cluster (Hopper's non-portable cluster size; 8 is portable): row
/// groups of 2 to this many splits may merge through distributed shared memory.
pub const DECODE_MAX_CLUSTER: usize = 16;

/// Whether the decode entries for head dim `d` (`paged`: the `duo_decode_paged*` ones) take
/// [`DecodeParams::append`]. Not the paged D = 256 ones, where it spills (a paged DuoAttention
/// cache takes head dims 64 and 128 only).
pub const fn decode_fuses_append(d: usize, paged: bool) -> bool {
    !(d > 128 && paged)
}

/// Whether the decode entries for head dim `d` turn Q rows by a [`DecodeParams::rotary`] table
/// of `half` pairs (`interleaved` or not) themselves. Up to D = 128 each thread holds its query
/// rows' A fragments in registers, which hold both elements of every pair when pairs are
/// interleaved or the halves of the whole head dim; at D = 256 the rows pass through shared
/// memory and any table turns.
pub const fn decode_turns_q(d: usize, half: usize, interleaved: bool) -> bool {
    d > 128 || interleaved || 2 * half == d
}

/// Whether the decode entries for head dim `d` that fuse the append (`paged_rows`: the
/// `duo_decode_paged_*` ones that look up a page per row) also turn the new keys by
/// [`DecodeParams::rotary`]. Not at D = 64 with a lookup per row, where it spills under the
/// 128-register cap: with a table the host queues `duo_cache_append` (which turns them) first.
pub const fn decode_turns_appended_keys(d: usize, paged_rows: bool) -> bool {
    !(d == 64 && paged_rows)
}

/// Parameters of the cache kernels, which move 16-byte chunks of K/V rows.
///
/// `duo_cache_append`: new rows `[B, n_new, Hkv, D]` (positions `start..start + n_new`) go to
/// `full` at their position (retrieval heads, by rank) or to the ring (streaming heads, by rank):
/// positions `< sink` to slot `pos`, later ones to slot `sink + (pos - sink) % recent`; a row
/// that a later row of the same call would overwrite is skipped.
///
/// With `lens` set, the append reads each sequence's `start` from `lens[b]` (clamped into
/// `0..=capacity`) and, with `arrivals` set too, advances it to `min(start + n_new, capacity)`
/// once every block of the sequence has read it (the last block to count itself in
/// `arrivals[b]` writes it and zeroes the count), so the cache's lengths live on the device and a
/// captured step replays. Rows at or past `capacity` never reach `full`.
///
/// With `block_table` set, `full` is a pool of pages (a paged cache): position `pos` of sequence
/// `b` is row `pos % page` of page `block_table[b * block_table_stride + pos / page]`, and
/// `full`'s stride 0 runs between pages. A row whose entry lies outside `0..num_pages` (a page
/// the host has not given the sequence) is not written.
///
/// `duo_cache_gather_stream`: builds a streaming head's prefill context `[B, n_hist + n_new, Hs,
/// D]` in `out`: the cached sink rows, the cached recent rows in position order, then the new rows.
/// Grid: `(ceil(rows * Hkv * D / 8 / 256), B)`, block 256, rows = `n_new` (append) or
/// `n_hist + n_new` (gather).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CacheParams {
    /// The new rows (append).
    pub new: KvSource,
    /// The retrieval heads' full caches.
    pub full: KvSource,
    /// The streaming heads' rings.
    pub stream: KvSource,
    /// The gather's output.
    pub out: KvSource,
    /// `[B]` i32 cached lengths on the device (append), or 0: `start` for every sequence.
    pub lens: u64,
    /// `[B]` u32 block counts of the append, zero between launches (with `lens`); 0: the
    /// append leaves `lens` as they are (a caller's `cache_seqlens` that it advances itself).
    pub arrivals: u64,
    /// 0, or a device `[B + 1]` i32 prefix sum of the new rows per sequence (a ragged prefill):
    /// sequence `b`'s new rows are rows `cu_new[b]..cu_new[b + 1]` of `new` (packed, batch
    /// stride 0), and `n_new` is the most of them.
    pub cu_new: u64,
    /// 0, or a device `[B]` i32 array of each sequence's cached length for the gather (in
    /// place of `start`).
    pub starts: u64,
    /// Bit `h` set: KV head `h` is a streaming head.
    pub streaming_heads: [u32; HEAD_MASK_WORDS],
    /// New rows per sequence (ragged: the most).
    pub n_new: i32,
    /// KV heads.
    pub heads_kv: i32,
    /// Head dim.
    pub head_dim: i32,
    /// Cached length before the new rows (gather without `starts`; append without `lens`).
    pub start: i32,
    /// Ring slots that hold the sink tokens.
    pub sink: i32,
    /// Ring slots that hold the recent tokens.
    pub recent: i32,
    /// Rows of `full` per sequence.
    pub capacity: i32,
    /// Gather: rows per sequence of `out` (0: just its context and new rows).
    pub out_rows: i32,
    /// A ragged prefill's KV block (1 otherwise): the gather zeroes `out`'s rows past a
    /// sequence's own, and the append the full cache's rows past the new ones, up to the next
    /// multiple of it. The prefill's TMA loads them with its last keys (masked), and stale
    /// non-finite values there would still reach O (0 x NaN).
    pub pad_block: i32,
    /// 0, or a device `[B, block_table_stride]` i32 table of the pages of `full` (see above).
    pub block_table: u64,
    /// Entries from one sequence's table row to the next.
    pub block_table_stride: i32,
    /// Rows per page: `1 << page_shift`.
    pub page_shift: i32,
    /// Pages in the pool.
    pub num_pages: i32,
    /// `duo_cache_append`: RoPE on the new K rows (`rotary.cos != 0`), each turned at its
    /// position `start + i` as it is written (the new rows stay as they are).
    pub rotary: RotaryTable,
}

/// A rotary embedding table (FlashAttention's `rotary_cos` / `rotary_sin`): f32
/// `[rows, half]` each, row-major, where `half` is the rotary dim over two. Position `p`'s pair
/// `j` turns by the angle whose cosine and sine are `cos[p * half + j]` and `sin[p * half + j]`.
/// Non-interleaved (GPT-NeoX, Llama): pair `j` is elements `j` and `j + half` of a head's row;
/// interleaved (GPT-J): elements `2j` and `2j + 1`. Elements at and past `2 * half` stay.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RotaryTable {
    /// Device address of the cosines (16-byte aligned); 0: no rotation.
    pub cos: u64,
    /// Device address of the sines (16-byte aligned).
    pub sin: u64,
    /// Positions in the table.
    pub rows: i32,
    /// Rotary dim / 2 (a multiple of 8): f32 per table row.
    pub half: i32,
    /// 1: interleaved pairs, 0: pairs half a rotary dim apart.
    pub interleaved: u32,
    /// The rows' element type where a kernel does not know it by its entry (the cache append):
    /// 1 f16, 0 bf16. Also keeps the struct's size a multiple of 8 bytes.
    pub f16: u32,
}

/// `duo_rotary_{bf16,f16}`: rotates (RoPE) rows of `src` `[.., heads, head_dim]` into `dst` (the
/// same address: in place) by `table`. Row `r` of the launch (`0..rows`) belongs to sequence `b`
/// at index `s` within it: with `cu_seqlens` (varlen, `[batch + 1]` i32 prefix sums) `b` is the
/// sequence whose range holds `r` and the tensor row is `r`; else `b = r / seqlen` and the
/// tensor row is `s = r % seqlen` of batch entry `b`. Its position is `offsets[b] + offset + s`
/// (`offsets` a device `[batch]` i32, or 0: `offset + s`). A row whose position lies outside the table, or
/// (varlen) outside every sequence, is copied unrotated (`dst != src`) or left as it is.
/// Element strides are (batch, row, head); the head dim is contiguous. Grid: one-dimensional,
/// `ceil(rows * heads * items / ROTARY_THREADS)` blocks of `ROTARY_THREADS`, `items` from
/// [`rotary_items`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RotaryParams {
    /// The table.
    pub table: RotaryTable,
    /// Device address of the input rows.
    pub src: u64,
    /// Element strides of `src`: (batch, row, head); batch 0 for varlen.
    pub src_strides: [i64; 3],
    /// Device address of the output rows (`src`: in place).
    pub dst: u64,
    /// Element strides of `dst`.
    pub dst_strides: [i64; 3],
    /// 0, or the device `[batch + 1]` i32 row prefix sums of a varlen batch.
    pub cu_seqlens: u64,
    /// 0, or a device `[batch]` i32 array of each sequence's first position.
    pub offsets: u64,
    /// The first position of every sequence (added to `offsets[b]` when `offsets` is set).
    pub offset: i32,
    /// Rows of the launch (`batch * seqlen`, or the varlen total).
    pub rows: i32,
    /// Rows per batch entry (without `cu_seqlens`).
    pub seqlen: i32,
    /// Sequences.
    pub batch: i32,
    /// Heads per row.
    pub heads: i32,
    /// Elements per head row (a multiple of 8, at least the rotary dim).
    pub head_dim: i32,
    /// 1: also copy the elements past the rotary dim (out of place).
    pub copy_rest: u32,
    /// Padding.
    pub pad: u32,
}

/// Threads per block of the rotary kernel.
pub const ROTARY_THREADS: u32 = 256;

/// Threads per head row of the rotary kernel: one per 16-byte chunk pair (non-interleaved) or
/// chunk (interleaved) of the rotary dim, plus one per chunk past it when those are copied.
pub const fn rotary_items(
    half: usize,
    interleaved: bool,
    head_dim: usize,
    copy_rest: bool,
) -> usize {
    let rotated = if interleaved { half / 4 } else { half / 8 };
    let rest = if copy_rest {
        (head_dim - 2 * half) / 8
    } else {
        0
    };
    rotated + rest
}

/// Decode kernel entry names, by (element, head dim).
pub const DECODE_ENTRIES: [(&str, &str, usize); 36] = [
    ("duo_decode_bf16_d64", "bf16", 64),
    ("duo_decode_bf16_d128", "bf16", 128),
    ("duo_decode_bf16_d256", "bf16", 256),
    ("duo_decode_f16_d64", "f16", 64),
    ("duo_decode_f16_d128", "f16", 128),
    ("duo_decode_f16_d256", "f16", 256),
    ("duo_decode_paged_bf16_d64", "bf16", 64),
    ("duo_decode_paged_bf16_d128", "bf16", 128),
    ("duo_decode_paged_bf16_d256", "bf16", 256),
    ("duo_decode_paged_f16_d64", "f16", 64),
    ("duo_decode_paged_f16_d128", "f16", 128),
    ("duo_decode_paged_f16_d256", "f16", 256),
    ("duo_decode_paged_tiles_bf16_d64", "bf16", 64),
    ("duo_decode_paged_tiles_bf16_d128", "bf16", 128),
    ("duo_decode_paged_tiles_bf16_d256", "bf16", 256),
    ("duo_decode_paged_tiles_f16_d64", "f16", 64),
    ("duo_decode_paged_tiles_f16_d128", "f16", 128),
    ("duo_decode_paged_tiles_f16_d256", "f16", 256),
    ("duo_decode_alibi_bf16_d64", "bf16", 64),
    ("duo_decode_alibi_f16_d64", "f16", 64),
    ("duo_decode_alibi_bf16_d128", "bf16", 128),
    ("duo_decode_alibi_f16_d128", "f16", 128),
    ("duo_decode_alibi_bf16_d256", "bf16", 256),
    ("duo_decode_alibi_f16_d256", "f16", 256),
    ("duo_decode_alibi_paged_bf16_d64", "bf16", 64),
    ("duo_decode_alibi_paged_f16_d64", "f16", 64),
    ("duo_decode_alibi_paged_bf16_d128", "bf16", 128),
    ("duo_decode_alibi_paged_f16_d128", "f16", 128),
    ("duo_decode_alibi_paged_bf16_d256", "bf16", 256),
    ("duo_decode_alibi_paged_f16_d256", "f16", 256),
    ("duo_decode_alibi_paged_tiles_bf16_d64", "bf16", 64),
    ("duo_decode_alibi_paged_tiles_f16_d64", "f16", 64),
    ("duo_decode_alibi_paged_tiles_bf16_d128", "bf16", 128),
    ("duo_decode_alibi_paged_tiles_f16_d128", "f16", 128),
    ("duo_decode_alibi_paged_tiles_bf16_d256", "bf16", 256),
    ("duo_decode_alibi_paged_tiles_f16_d256", "f16", 256),
];

/// The remaining entries: cache maintenance and rotary embeddings.
pub const SUPPORT_ENTRIES: [&str; 4] = [
    "duo_cache_append",
    "duo_cache_gather_stream",
    "duo_rotary_bf16",
    "duo_rotary_f16",
];

/// Every kernel entry of the module.
pub fn all_entries() -> impl Iterator<Item = &'static str> {
    PREFILL_ENTRIES
        .iter()
        .chain(DECODE_ENTRIES.iter())
        .map(|e| e.0)
        .chain(SUPPORT_ENTRIES)
}

#[cfg(test)]
mod tests {
    use super::FastDiv;

    fn check(d: u32, n: u32) {
        assert_eq!(FastDiv::new(d).quotient(n), n / d, "{n} / {d}");
    }

    /// Every divisor up to 2^12 and a spread of larger ones (powers of two and their
    /// neighbours, the worst cases for the rounding), against numerators at both ends of
    /// `0..2^31`, around multiples of the divisor, and from a fixed pseudo-random walk.
    #[test]
    fn fast_division_matches_integer_division() {
        let mut divisors: [u32; 4096 + 3 * 31] = [0; 4096 + 3 * 31];
        for (i, d) in divisors.iter_mut().take(4096).enumerate() {
            *d = i as u32 + 1;
        }
        for b in 1..32 {
            let p = 1u32 << b;
            divisors[4096 + 3 * (b - 1)..4096 + 3 * b].copy_from_slice(&[p - 1, p, p + 1]);
        }
        let mut x = 0x2545_f491u32;
        for &d in &divisors {
            for n in [0, 1, d - 1, d, d + 1, (1 << 31) - 1, (1 << 31) - 2] {
                if n < 1 << 31 {
                    check(d, n);
                }
            }
            let top = ((1u64 << 31) - 1) / d as u64 * d as u64;
            for n in [top.wrapping_sub(1), top, top + d as u64 - 1] {
                if n < 1 << 31 {
                    check(d, n as u32);
                }
            }
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                check(d, x >> 1);
            }
        }
        assert_eq!(FastDiv::new(0).quotient(12345), 0);
    }

    /// The decode tile's swizzle: each row's chunks stay in the row (a permutation); each
    /// group of eight lanes of a cp.async (eight consecutive chunks of one row) writes 128
    /// contiguous bytes, i.e. all 32 banks; and the eight row addresses of an `ldmatrix` matrix
    /// (rows r..r+8 from a multiple of 8, one logical chunk) fall on distinct banks.
    #[test]
    fn decode_tile_swizzle_is_conflict_free() {
        use super::{DECODE_HEAD_DIMS, decode_block_n, decode_tile_offset};
        for d in DECODE_HEAD_DIMS {
            let chunks = d / 8;
            for row in 0..decode_block_n(d) {
                let mut seen = [false; 32];
                for c in 0..chunks {
                    let off = decode_tile_offset(d, row, c);
                    assert_eq!(off / (2 * d), row);
                    let slot = off % (2 * d) / 16;
                    assert!(!seen[slot], "d {d} row {row} chunk {c}");
                    seen[slot] = true;
                }
                for first in (0..chunks).step_by(8) {
                    let mut offs: [usize; 8] =
                        core::array::from_fn(|i| decode_tile_offset(d, row, first + i));
                    offs.sort_unstable();
                    assert!(
                        offs[0].is_multiple_of(128) && offs.windows(2).all(|w| w[1] == w[0] + 16)
                    );
                }
            }
            for row0 in (0..decode_block_n(d)).step_by(8) {
                for c in 0..chunks {
                    let mut banks: [usize; 8] =
                        core::array::from_fn(|i| decode_tile_offset(d, row0 + i, c) % 128 / 16);
                    banks.sort_unstable();
                    assert!(
                        banks.iter().enumerate().all(|(i, &b)| b == i),
                        "d {d} chunk {c}"
                    );
                }
            }
        }
    }
}
