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

/// Threads per block of the warp-specialised Hopper kernel (experimental): a producer warpgroup
/// (loads) and two consumer warpgroups (math).
pub const WS_THREADS: usize = 384;
/// Registers per thread after `setmaxnreg`: the producer gives its registers to the consumers.
pub const WS_PRODUCER_REGISTERS: u32 = 64;
pub const WS_CONSUMER_REGISTERS: u32 = 208;

/// Byte offset of the warp-specialised kernel's mbarriers (after Q and the K/V ring).
pub const fn ws_barrier_offset(d: usize) -> usize {
    wg_smem_bytes(d)
}

/// Dynamic shared memory of the warp-specialised kernel: as the default one, then mbarriers
/// (Q full; full and empty per stage).
pub const fn ws_smem_bytes(d: usize) -> usize {
    ws_barrier_offset(d) + (1 + 2 * WG_STAGES) * 8
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
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub streaming_heads: [u32; HEAD_MASK_WORDS],
    /// Element strides of (batch, sequence, head).
    pub q_strides: [i64; 3],
    pub k_strides: [i64; 3],
    pub v_strides: [i64; 3],
    pub o_strides: [i64; 3],
    pub seqlen_q: i32,
    pub seqlen_k: i32,
    pub heads_q: i32,
    pub heads_kv: i32,
    /// Streaming heads: keys `< sink` are always visible (clamped to `MAX_SEQLEN` by the host).
    pub sink: i32,
    /// Streaming heads: keys with `q_pos - k_pos < window` are visible (clamped likewise).
    pub window: i32,
    /// Retrieval heads: 1 = causal, 0 = full.
    pub causal: i32,
    /// softmax_scale * log2(e): scores go through exp2.
    pub scale_log2: f32,
}

/// Prefill kernel entry names, by (element, head dim): the mma.sync kernel, the default wgmma
/// kernel, the warp-specialised wgmma kernel.
pub const PREFILL_ENTRIES: [(&str, &str, usize); 12] = [
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
];
