//! DuoAttention prefill: per-KV-head kinds, validation of every input, and the launch.
use crate::alibi::AlibiSlopes;
use crate::context::Context;
use crate::element::AttnElement;
use crate::error::{Error, Result};
use crate::split_kv::{PartialRows, SequenceRuns, SplitKv, SplitShape};
use crate::tensor::{DeviceTensor, TensorDesc, View, ViewMut};
use crate::tma::{TmaTensor, prefill_tensors};
use duo_attn_kernels::abi::{
    FastDiv, HEAD_MASK_WORDS, MAX_KV_HEADS, MAX_SEQLEN, PREFILL_BLOCK_M, PREFILL_MERGE_ROWS,
    PREFILL_THREADS, PrefillMergeParams, PrefillParams, TMA_MAPS, TensorMap, TmaPrefillParams,
    WG_BLOCK_M, WG_THREADS, WS_HEAD_DIMS, WS_THREADS, wg_smem_bytes, ws_block_n, ws_smem_bytes,
};

/// How a KV head (and every query head of its group) attends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeadKind {
    /// The whole context: causal or full, per [`AttentionConfig::causal`].
    Retrieval,
    /// The first `sink` keys plus the last `window` keys up to the query (causal, or up to
    /// [`AttentionConfig::right_window`] keys past it).
    Streaming,
}

/// Which prefill kernel runs. All compute the same function; `Auto` picks the fastest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PrefillKernel {
    /// The fastest Hopper kernel: `WgmmaTma` where TMA can address every operand (16-byte
    /// aligned, nonzero strides: any tensor the validation accepts, bar broadcast views), else
    /// `WgmmaWarpSpecialized`.
    #[default]
    Auto,
    /// Warp-level `mma.sync` kernel (the first kernel; kept as a cross-check).
    MmaSync,
    /// Hopper warpgroup-MMA kernel without warp specialisation: `wgmma` on 128-byte swizzled
    /// tiles, a 3-stage cp.async ring, one block barrier per 128-key tile. Simpler, slower.
    Wgmma,
    /// Warp-specialised Hopper kernel: a producer warpgroup fills an mbarrier-tracked ring
    /// (`setmaxnreg`), two consumer warpgroups ping-pong their GEMMs and overlap each softmax with
    /// the previous tile's PV GEMM (FA3-style). Loads with cp.async from 128 producer threads.
    WgmmaWarpSpecialized,
    /// `WgmmaWarpSpecialized` with TMA loads: one producer thread issues bulk tensor copies
    /// through tensor maps (`cuTensorMapEncodeTiled` at launch). An error where TMA cannot
    /// address an operand.
    WgmmaTma,
}

/// What one attention call computes, besides the tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    /// One kind per KV head.
    pub head_kinds: Vec<HeadKind>,
    /// Retrieval heads: causal (default) or full attention.
    pub causal: bool,
    /// Streaming heads: attention-sink tokens at the start of the sequence.
    pub sink: u32,
    /// Streaming heads: recent keys, the query's own position included (`q - k < window`).
    pub window: u32,
    /// Causal retrieval heads and streaming heads: keys up to `right_window` positions after
    /// the query are visible too (FlashAttention's `window_size[1]`; default 0, causal).
    /// Prefill only: decode and the DuoAttention cache reject a nonzero value
    /// ([`Error::RightWindowUnsupported`]). Values past any sequence length act as unbounded.
    pub right_window: u32,
    /// ALiBi slopes (FlashAttention's `alibi_slopes`): `-slope * |q - k|` added to each scaled
    /// score. Prefill (plain, varlen and over a KV cache) on the TMA kernel and its cp.async
    /// fallback at head dims 64 and 128, and decode over contiguous or paged K/V at every head
    /// dim; elsewhere (the DuoAttention cache included) [`Error::AlibiUnsupported`].
    pub alibi: Option<AlibiSlopes>,
    /// Scale of `q.k`; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Kernel choice (default: `Auto`).
    pub kernel: PrefillKernel,
    /// Split-KV of the TMA kernel (FlashAttention's `num_splits`): `None` (default) splits a
    /// launch whose query tiles are too few to fill the GPU (chunked prefill against a long
    /// context), each tile's KV blocks into near-equal runs merged by their LSE; `Some(n)` asks
    /// for `n` splits (1: never; capped at `PREFILL_MAX_SPLITS` and at one KV block per split).
    /// The other kernels never split.
    pub kv_splits: Option<usize>,
}

impl AttentionConfig {
    /// DuoAttention's usual streaming setting: 64 sink and 256 recent tokens, causal retrieval.
    pub fn new(head_kinds: Vec<HeadKind>) -> Self {
        AttentionConfig {
            head_kinds,
            causal: true,
            sink: 64,
            window: 256,
            right_window: 0,
            alibi: None,
            softmax_scale: None,
            kernel: PrefillKernel::Auto,
            kv_splits: None,
        }
    }

    /// Every head a retrieval head.
    pub fn all_retrieval(heads_kv: usize) -> Self {
        Self::new(vec![HeadKind::Retrieval; heads_kv])
    }

    /// Every head a streaming head.
    pub fn all_streaming(heads_kv: usize, sink: u32, window: u32) -> Self {
        Self::new(vec![HeadKind::Streaming; heads_kv])
            .sink(sink)
            .window(window)
    }

    /// Sets [`AttentionConfig::causal`].
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Sets [`AttentionConfig::sink`].
    pub fn sink(mut self, sink: u32) -> Self {
        self.sink = sink;
        self
    }
    /// Sets [`AttentionConfig::window`].
    pub fn window(mut self, window: u32) -> Self {
        self.window = window;
        self
    }
    /// Sets [`AttentionConfig::right_window`].
    pub fn right_window(mut self, right: u32) -> Self {
        self.right_window = right;
        self
    }

    /// Sets [`AttentionConfig::alibi`].
    pub fn alibi(mut self, slopes: AlibiSlopes) -> Self {
        self.alibi = Some(slopes);
        self
    }

    /// FlashAttention's mask arguments for a layer of `heads_kv` KV heads: `causal` and
    /// `window_size = (left, right)`, each side a key count or -1 for unbounded, with
    /// bottom-right aligned positions as in FlashAttention 2.1 and later. Query position `p`
    /// sees key `k` when `p - left <= k <= p + right`; `causal` sets `right` to 0.
    ///
    /// A bounded `left` maps to streaming heads without sink tokens (`window = left + 1`),
    /// so the kernels visit only the blocks inside the band; an unbounded one to retrieval heads
    /// (non-causal when both sides are unbounded). Any other value than -1 or a count is
    /// [`Error::InvalidWindowSize`].
    pub fn flash(heads_kv: usize, causal: bool, window_size: (i64, i64)) -> Result<Self> {
        let (left, right) = window_size;
        let side = |x: i64| match x {
            -1 => Ok(None),
            // Past any sequence length a side is as good as unbounded.
            0.. => Ok(Some(x.min(MAX_SEQLEN as i64) as u32)),
            _ => Err(Error::InvalidWindowSize { left, right }),
        };
        let (left, right) = (side(left)?, if causal { Some(0) } else { side(right)? });
        Ok(match (left, right) {
            (None, None) => Self::all_retrieval(heads_kv).causal(false),
            (None, Some(right)) => Self::all_retrieval(heads_kv).right_window(right),
            (Some(left), right) => Self::all_streaming(heads_kv, 0, left + 1)
                .right_window(right.unwrap_or(MAX_SEQLEN as u32)),
        })
    }

    /// Sets [`AttentionConfig::softmax_scale`] (finite and positive, else the call fails with
    /// [`Error::InvalidScale`]).
    pub fn softmax_scale(mut self, scale: f32) -> Self {
        self.softmax_scale = Some(scale);
        self
    }
    /// Sets [`AttentionConfig::kernel`].
    pub fn kernel(mut self, kernel: PrefillKernel) -> Self {
        self.kernel = kernel;
        self
    }
    /// See [`AttentionConfig::kv_splits`].
    pub fn kv_splits(mut self, splits: Option<usize>) -> Self {
        self.kv_splits = splits;
        self
    }

    /// The scale applied for head dim `d`.
    pub fn scale_for(&self, head_dim: usize) -> f32 {
        self.softmax_scale.unwrap_or(1.0 / (head_dim as f32).sqrt())
    }
}

/// A validated launch: kernel entry, grid, block, dynamic shared memory and parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefillPlan {
    /// The kernel's entry name in the embedded module.
    pub entry: String,
    /// `(query tiles, Hq, B)`: one block per work tile, or, for a persistent kernel, the work
    /// space its blocks walk (the launch then has one block per resident slot).
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
    /// The kernel's parameter block (device addresses included).
    pub params: PrefillParams,
    /// The kernel walks work tiles in a loop (`QueryTile::from_work`).
    pub persistent: bool,
    /// The TMA kernel's operands (`TMA_Q..TMA_STREAM_V`), encoded into tensor maps at launch.
    pub tma: Option<[TmaTensor; TMA_MAPS]>,
    /// Where the launch may split its tiles' KV blocks (split-KV; chosen at launch, when the
    /// GPU's size is known).
    pub split: Option<SplitKv>,
    /// Varlen keys start at row 0 of each sequence's batch entry (a caller's KV cache): the
    /// launch points `cu_seqlens_k` at `B` zero words of its scratch.
    pub zero_key_starts: bool,
}

impl PrefillPlan {
    /// Work tiles of the grid: query tiles x heads x sequences.
    fn work_tiles(&self) -> usize {
        let (m_blocks, heads, batch) = self.grid;
        m_blocks as usize * heads as usize * batch as usize
    }

    /// Sets the grid (query tiles, heads, sequences) and the persistent kernel's copy of it.
    /// The persistent kernel indexes its work tiles in i32, and its blocks' last claims run past
    /// the last tile (by up to one per block), so half the i32 range is the limit; the other
    /// kernels index by grid coordinates.
    fn set_grid(&mut self, grid: (u32, u32, u32)) -> Result<()> {
        self.grid = grid;
        self.params.m_blocks = grid.0 as i32;
        self.params.m_blocks_div = FastDiv::new(grid.0);
        self.params.batch = grid.2 as i32;
        if self.persistent {
            check_limit(
                "the number of prefill work tiles (query tiles x heads x sequences)",
                self.work_tiles(),
                i32::MAX as usize / 2,
            )?;
        }
        Ok(())
    }
}

/// Vector loads are 16 bytes wide (and TMA needs 16-byte strides).
const ALIGN: u64 = 16;
/// CUDA grid y/z limit (heads and batch ride on them).
const MAX_GRID_YZ: usize = 65535;

pub(crate) fn check_device<const N: usize>(
    t: &TensorDesc<N>,
    tensor: &'static str,
    device: u32,
) -> Result<()> {
    if t.device != device {
        return Err(Error::WrongDevice {
            tensor,
            tensor_device: t.device,
            context_device: device,
        });
    }
    Ok(())
}

pub(crate) fn check_shape<const N: usize>(
    t: &TensorDesc<N>,
    tensor: &'static str,
    expected: [usize; N],
    why: &'static str,
) -> Result<()> {
    if t.shape != expected {
        return Err(Error::ShapeMismatch {
            tensor,
            got: t.shape.to_vec(),
            expected: expected.to_vec(),
            why,
        });
    }
    Ok(())
}

/// Rules for a `[B, S, H, D]` operand: head dim contiguous, 16-byte aligned base and strides, in bounds.
pub(crate) fn check_bshd(t: &TensorDesc<4>, tensor: &'static str) -> Result<()> {
    if t.strides[3] != 1 {
        return Err(Error::NonContiguousHeadDim {
            tensor,
            stride: t.strides[3],
        });
    }
    if !t.ptr.is_multiple_of(ALIGN) {
        return Err(Error::Misaligned {
            tensor,
            what: "the base address",
            value: t.ptr,
            align: ALIGN,
        });
    }
    for (what, stride) in [
        ("the batch stride", t.strides[0]),
        ("the sequence stride", t.strides[1]),
        ("the head stride", t.strides[2]),
    ] {
        // A stride past the address space reaches out of any buffer.
        let bytes = stride.checked_mul(t.elem_bytes).ok_or(Error::OutOfBounds {
            tensor,
            needed: usize::MAX,
            available: t.available,
        })? as u64;
        if !bytes.is_multiple_of(ALIGN) {
            return Err(Error::Misaligned {
                tensor,
                what,
                value: bytes,
                align: ALIGN,
            });
        }
    }
    t.check_in_bounds(tensor)
}

pub(crate) fn check_limit(what: &'static str, value: usize, limit: usize) -> Result<()> {
    if value > limit {
        return Err(Error::TooLarge { what, value, limit });
    }
    Ok(())
}

/// Checks q `[B, Sq, Hq, D]`, out (same shape), lse `[B, Hq, Sq]` and the scale: devices, shapes,
/// head dim, limits, layout. Returns `[B, Sq, Hq, D]`.
pub(crate) fn check_queries(
    q: &TensorDesc<4>,
    out: &TensorDesc<4>,
    lse: &TensorDesc<3>,
    cfg: &AttentionConfig,
    device: u32,
) -> Result<[usize; 4]> {
    for (t, name) in [(q, "q"), (out, "out")] {
        check_device(t, name, device)?;
    }
    check_device(lse, "lse", device)?;
    for (t, name) in [(q, "q"), (out, "out")] {
        t.check_not_empty(name)?;
    }
    lse.check_not_empty("lse")?;
    let [batch, seqlen_q, heads_q, head_dim] = q.shape;
    if !WS_HEAD_DIMS.contains(&head_dim) {
        return Err(Error::UnsupportedHeadDim {
            head_dim,
            // check_queries serves prefill and decode alike.
            by: "the attention kernels (prefill and decode)",
            supported: "64, 128 or 256 (256: in prefill, the TMA kernel only)",
        });
    }
    check_shape(out, "out", q.shape, "out must match q")?;
    check_shape(lse, "lse", [batch, heads_q, seqlen_q], "lse is [B, Hq, Sq]")?;
    check_limit("seqlen_q", seqlen_q, MAX_SEQLEN)?;
    check_limit("the batch size", batch, MAX_GRID_YZ)?;
    check_limit("the number of query heads", heads_q, MAX_GRID_YZ)?;
    if let Some(alibi) = &cfg.alibi {
        if alibi.device() != device {
            return Err(Error::WrongDevice {
                tensor: "alibi slopes",
                tensor_device: alibi.device(),
                context_device: device,
            });
        }
        if alibi.heads() != heads_q {
            return Err(Error::InvalidAlibi {
                why: format!(
                    "{} slopes per row, but q has {heads_q} query heads",
                    alibi.heads()
                ),
            });
        }
    }
    let scale = cfg.scale_for(head_dim);
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidScale(scale));
    }
    for (t, name) in [(q, "q"), (out, "out")] {
        check_bshd(t, name)?;
    }
    lse.check_contiguous("lse")?;
    lse.check_in_bounds("lse")?;
    out.check_non_overlapping("out")?;
    Ok(q.shape)
}

/// Checks a K/V pair `[B, S, H, D]` against q's B and D; returns S.
pub(crate) fn check_kv(
    k: (&TensorDesc<4>, &'static str),
    v: (&TensorDesc<4>, &'static str),
    batch: usize,
    heads: usize,
    head_dim: usize,
    device: u32,
    why: &'static str,
) -> Result<usize> {
    for (t, name) in [k, v] {
        check_device(t, name, device)?;
        t.check_not_empty(name)?;
    }
    let seqlen = k.0.shape[1];
    check_shape(k.0, k.1, [batch, seqlen, heads, head_dim], why)?;
    check_shape(v.0, v.1, k.0.shape, "v must match k")?;
    check_limit("seqlen_k", seqlen, MAX_SEQLEN)?;
    for (t, name) in [k, v] {
        check_bshd(t, name)?;
    }
    Ok(seqlen)
}

/// Outputs must not overlap any input, nor each other.
pub(crate) fn check_no_aliasing(
    out: &TensorDesc<4>,
    lse: &TensorDesc<3>,
    inputs: &[(&TensorDesc<4>, &'static str)],
) -> Result<()> {
    let (out_start, out_end) = out.byte_range();
    let (lse_start, lse_end) = lse.byte_range();
    for &(t, name) in inputs {
        if t.overlaps(out_start, out_end) {
            return Err(Error::Aliasing {
                output: "out",
                input: name,
            });
        }
        if t.overlaps(lse_start, lse_end) {
            return Err(Error::Aliasing {
                output: "lse",
                input: name,
            });
        }
    }
    if out.overlaps(lse_start, lse_end) {
        return Err(Error::Aliasing {
            output: "lse",
            input: "out",
        });
    }
    Ok(())
}

/// Query heads must split evenly over the KV heads, with one kind per KV head.
pub(crate) fn check_heads(heads_q: usize, heads_kv: usize, cfg: &AttentionConfig) -> Result<()> {
    if heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) {
        return Err(Error::HeadGroupMismatch { heads_q, heads_kv });
    }
    if cfg.head_kinds.len() != heads_kv {
        return Err(Error::HeadKindsLength {
            got: cfg.head_kinds.len(),
            expected: heads_kv,
        });
    }
    check_limit("the number of KV heads", heads_kv, MAX_KV_HEADS)
}

/// The streaming-head bitmask of the launch parameters.
pub(crate) fn streaming_mask(kinds: &[HeadKind]) -> [u32; HEAD_MASK_WORDS] {
    let mut mask = [0u32; HEAD_MASK_WORDS];
    for (h, kind) in kinds.iter().enumerate() {
        if *kind == HeadKind::Streaming {
            mask[h / 32] |= 1 << (h % 32);
        }
    }
    mask
}

pub(crate) fn strides3(t: &TensorDesc<4>) -> [i64; 3] {
    [
        t.strides[0] as i64,
        t.strides[1] as i64,
        t.strides[2] as i64,
    ]
}

/// Sink/window values past any sequence length act as `MAX_SEQLEN` and keep kernel arithmetic
/// in i32.
pub(crate) fn clamp_len(x: u32) -> i32 {
    (x as usize).min(MAX_SEQLEN) as i32
}

/// A right window past any sequence length acts as `MAX_SEQLEN - 1`, so that a query position
/// plus one plus it stays inside i32.
pub(crate) fn clamp_right(x: u32) -> i32 {
    (x as usize).min(MAX_SEQLEN - 1) as i32
}

/// ALiBi slopes per batch entry need one row per entry (or varlen sequence).
pub(crate) fn check_alibi_rows(cfg: &AttentionConfig, batch: usize) -> Result<()> {
    match &cfg.alibi {
        Some(a) if a.rows() != 1 && a.rows() != batch => Err(Error::InvalidAlibi {
            why: format!(
                "{} rows of slopes for a batch of {batch}: give one row, or one per entry",
                a.rows()
            ),
        }),
        _ => Ok(()),
    }
}

/// Validates a prefill call and builds its launch. Pure: no GPU needed, so every rule is unit-tested.
///
/// q/out `[B, Sq, Hq, D]`, k/v `[B, Sk, Hkv, D]`, lse `[B, Hq, Sq]` (contiguous f32).
pub fn plan_prefill<T: AttnElement>(
    q: &TensorDesc<4>,
    k: &TensorDesc<4>,
    v: &TensorDesc<4>,
    out: &TensorDesc<4>,
    lse: &TensorDesc<3>,
    cfg: &AttentionConfig,
    device: u32,
) -> Result<PrefillPlan> {
    let [batch, _, heads_q, head_dim] = check_queries(q, out, lse, cfg, device)?;
    check_alibi_rows(cfg, batch)?;
    let heads_kv = k.shape[2];
    check_heads(heads_q, heads_kv, cfg)?;
    let seqlen_k = check_kv(
        (k, "k"),
        (v, "v"),
        batch,
        heads_kv,
        head_dim,
        device,
        "k is [B, Sk, Hkv, D] with q's B and D",
    )?;
    check_no_aliasing(out, lse, &[(q, "q"), (k, "k"), (v, "v")])?;
    let args = prefill_params(q, out, lse, cfg, (k, v, seqlen_k), None);
    prefill_launch::<T>(cfg.kernel, q.shape, args)
}

/// A prefill's launch parameters, and the tensor maps of its operands or why TMA cannot address
/// one of them.
pub(crate) struct PrefillArgs {
    pub params: PrefillParams,
    /// `AttentionConfig::kv_splits` and `head_kinds` (for the split choice).
    pub kv_splits: Option<usize>,
    pub head_kinds: Vec<HeadKind>,
    pub tma: std::result::Result<[TmaTensor; TMA_MAPS], (&'static str, String)>,
}

/// Launch parameters of a validated prefill: retrieval K/V (or all heads' K/V) and, for the
/// DuoAttention cache, the streaming heads' own K/V.
pub(crate) fn prefill_params(
    q: &TensorDesc<4>,
    out: &TensorDesc<4>,
    lse: &TensorDesc<3>,
    cfg: &AttentionConfig,
    kv: (&TensorDesc<4>, &TensorDesc<4>, usize),
    stream: Option<(&TensorDesc<4>, &TensorDesc<4>, usize)>,
) -> PrefillArgs {
    let [_, seqlen_q, heads_q, head_dim] = q.shape;
    let (k, v, seqlen_k) = kv;
    let (sk, sv, seqlen_k_stream) = stream.unwrap_or(kv);
    let tma = prefill_tensors(q, kv, (sk, sv, seqlen_k_stream));
    let (alibi_slopes, alibi_batch_stride, alibi_neg_inv_scale) =
        AlibiSlopes::kernel_args(cfg, heads_q, head_dim);
    let params = PrefillParams {
        q: q.ptr,
        k: k.ptr,
        v: v.ptr,
        o: out.ptr,
        lse: lse.ptr,
        streaming_heads: streaming_mask(&cfg.head_kinds),
        q_strides: strides3(q),
        k_strides: strides3(k),
        v_strides: strides3(v),
        o_strides: strides3(out),
        seqlen_q: seqlen_q as i32,
        seqlen_k: seqlen_k as i32,
        heads_q: heads_q as i32,
        heads_kv: cfg.head_kinds.len() as i32,
        sink: clamp_len(cfg.sink),
        window: clamp_len(cfg.window),
        causal: cfg.causal as i32,
        right: clamp_right(cfg.right_window),
        scale_log2: cfg.scale_for(head_dim) * std::f32::consts::LOG2_E,
        split_kv: stream.is_some() as i32,
        seqlen_k_stream: seqlen_k_stream as i32,
        stream_k: sk.ptr,
        stream_v: sv.ptr,
        stream_k_strides: strides3(sk),
        stream_v_strides: strides3(sv),
        cu_seqlens_q: 0,
        cu_seqlens_k: 0,
        ends_k: 0,
        ends_k_stream: 0,
        lse_strides: [(heads_q * seqlen_q) as i64, seqlen_q as i64],
        m_blocks: 0, // set with the grid (PrefillPlan::set_grid)
        batch: 0,
        work_counter: 0,                  // set at launch
        m_blocks_div: FastDiv::default(), // set with the grid
        heads_q_div: FastDiv::new(heads_q as u32),
        // Callers have checked the head counts (`check_heads`); no panic path if one did not.
        group_div: FastDiv::new(heads_q.checked_div(cfg.head_kinds.len()).unwrap_or(0) as u32),
        kv_splits: 1,
        kv_splits_div: FastDiv::new(1),
        partial_o: 0, // set at launch
        partial_lse: 0,
        page_table: 0,
        page_table_stride: 0,
        page_shift: 0,
        alibi_slopes,
        alibi_batch_stride,
        alibi_neg_inv_scale,
    };
    PrefillArgs {
        params,
        kv_splits: cfg.kv_splits,
        head_kinds: cfg.head_kinds.clone(),
        tma,
    }
}

/// Entry infix, query rows per work tile, threads, dynamic shared memory and persistence of a
/// kernel variant.
fn kernel_shape(
    kernel: PrefillKernel,
    head_dim: usize,
) -> (&'static str, usize, usize, usize, bool) {
    match kernel {
        PrefillKernel::MmaSync => ("", PREFILL_BLOCK_M, PREFILL_THREADS, 0, false),
        PrefillKernel::Wgmma => (
            "wgmma_",
            WG_BLOCK_M,
            WG_THREADS,
            wg_smem_bytes(head_dim),
            false,
        ),
        PrefillKernel::WgmmaTma => (
            "wgmma_tma_",
            WG_BLOCK_M,
            WS_THREADS,
            ws_smem_bytes(head_dim),
            true,
        ),
        PrefillKernel::Auto | PrefillKernel::WgmmaWarpSpecialized => (
            "wgmma_ws_",
            WG_BLOCK_M,
            WS_THREADS,
            ws_smem_bytes(head_dim),
            true,
        ),
    }
}

/// The split-KV option of a TMA launch: its entries and the shape of its work, over
/// `sequences` of `m_blocks` query tiles each.
fn split_kv<T: AttnElement>(
    p: &PrefillParams,
    (head_dim, kinds): (usize, &[HeadKind]),
    requested: Option<usize>,
    (m_blocks, sequences): (usize, SequenceRuns),
    rows: PartialRows,
) -> SplitKv {
    let alibi = if p.alibi_slopes != 0 { "alibi_" } else { "" };
    SplitKv {
        entry: format!(
            "duo_prefill_wgmma_tma_{alibi}split_{}_d{head_dim}",
            T::KERNEL_NAME
        ),
        merge_entry: format!("duo_prefill_merge_{}_d{head_dim}", T::KERNEL_NAME),
        requested,
        head_dim,
        rows,
        shape: SplitShape {
            heads_q: p.heads_q.max(0) as usize,
            kinds: kinds.to_vec(),
            causal: p.causal != 0,
            sink: p.sink.max(0) as usize,
            window: p.window.max(0) as usize,
            right: p.right.max(0) as usize,
            block_n: ws_block_n(head_dim),
            m_blocks,
            sequences,
        },
    }
}

/// Entry, grid, block and shared memory of a prefill with q of shape `[B, Sq, Hq, D]`.
pub(crate) fn prefill_launch<T: AttnElement>(
    kernel: PrefillKernel,
    q_shape: [usize; 4],
    args: PrefillArgs,
) -> Result<PrefillPlan> {
    let [batch, seqlen_q, heads_q, head_dim] = q_shape;
    // D = 256 has only the TMA build: a consumer's accumulators leave the 128 cp.async producer
    // threads too few registers.
    if head_dim > 128 {
        if let (PrefillKernel::Auto | PrefillKernel::WgmmaTma, Err((tensor, why))) =
            (kernel, &args.tma)
        {
            return Err(Error::WideHeadDimLayout {
                tensor,
                why: why.clone(),
            });
        }
        if kernel != PrefillKernel::Auto && kernel != PrefillKernel::WgmmaTma {
            return Err(Error::UnsupportedHeadDim {
                head_dim,
                by: "the mma.sync, plain wgmma and cp.async prefill kernels",
                supported: "64 or 128 (256 runs on the TMA kernel: `Auto` or `WgmmaTma`)",
            });
        }
    }
    // Auto takes TMA loads wherever the tensor maps can address the operands.
    let (kernel, tma) = match (kernel, args.tma) {
        (PrefillKernel::Auto, Ok(tma)) => (PrefillKernel::WgmmaTma, Some(tma)),
        (PrefillKernel::Auto, Err(_)) => (PrefillKernel::WgmmaWarpSpecialized, None),
        (PrefillKernel::WgmmaTma, Ok(tma)) => (kernel, Some(tma)),
        (PrefillKernel::WgmmaTma, Err((tensor, why))) => {
            return Err(Error::TmaLayout { tensor, why });
        }
        (kernel, _) => (kernel, None),
    };
    let (variant, block_m, block, shared_bytes, persistent) = kernel_shape(kernel, head_dim);
    // ALiBi has builds of the warp-specialised kernels at D <= 128 (`_alibi_` entries).
    let alibi = args.params.alibi_slopes != 0;
    if alibi
        && !matches!(
            kernel,
            PrefillKernel::WgmmaTma | PrefillKernel::WgmmaWarpSpecialized
        )
    {
        return Err(Error::AlibiUnsupported {
            by: "the mma.sync and plain wgmma prefill kernels",
        });
    }
    if alibi && head_dim > 128 {
        return Err(Error::AlibiUnsupported {
            by: "head dim 256 (its consumers have no registers to spare for the bias)",
        });
    }
    let variant = if alibi {
        format!("{variant}alibi_")
    } else {
        variant.to_string()
    };
    // Split-KV: the TMA kernel (every head dim).
    let split = (kernel == PrefillKernel::WgmmaTma).then(|| {
        let p = &args.params;
        let (seqlen_k, seqlen_k_stream) = (p.seqlen_k as usize, p.seqlen_k_stream as usize);
        let sequences = vec![((seqlen_q, seqlen_k, seqlen_k_stream), batch)];
        let rows = PartialRows {
            batch,
            heads_q,
            seqlen_q,
        };
        let m_blocks = seqlen_q.div_ceil(WG_BLOCK_M);
        let heads = (head_dim, &args.head_kinds[..]);
        split_kv::<T>(p, heads, args.kv_splits, (m_blocks, sequences), rows)
    });
    let mut plan = PrefillPlan {
        entry: format!("duo_prefill_{variant}{}_d{}", T::KERNEL_NAME, head_dim),
        grid: (0, 0, 0),
        block: block as u32,
        shared_bytes: shared_bytes as u32,
        params: args.params,
        persistent,
        tma,
        split,
        zero_key_starts: false,
    };
    plan.set_grid((
        seqlen_q.div_ceil(block_m) as u32,
        heads_q as u32,
        batch as u32,
    ))?;
    Ok(plan)
}

/// Checks a `[B + 1]` prefix sum of sequence lengths over `total` packed rows; returns the
/// longest sequence.
pub(crate) fn check_cu_seqlens(which: &'static str, cu: &[i32], total: usize) -> Result<usize> {
    let bad = |why: String| Err(Error::InvalidCuSeqlens { which, why });
    if cu.len() < 2 {
        return bad(format!(
            "it has {} entries; a batch of B sequences needs B + 1 >= 2",
            cu.len()
        ));
    }
    if cu[0] != 0 {
        return bad(format!("it starts at {}, not 0", cu[0]));
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return bad(format!(
            "it decreases at index {}: {} -> {}",
            i + 1,
            cu[i],
            cu[i + 1]
        ));
    }
    let last = cu[cu.len() - 1];
    if last as usize != total {
        return bad(format!(
            "it ends at {last} but the packed tensor has {total} rows"
        ));
    }
    Ok(cu
        .windows(2)
        .map(|w| (w[1] - w[0]) as usize)
        .max()
        .unwrap_or(0))
}

/// A packed `[total, H, D]` tensor seen as a batch of one, `[1, total, H, D]`, so that the
/// fixed-length checks apply to it unchanged.
pub(crate) fn as_batch_of_one(t: &TensorDesc<3>) -> TensorDesc<4> {
    TensorDesc {
        ptr: t.ptr,
        shape: [1, t.shape[0], t.shape[1], t.shape[2]],
        strides: [0, t.strides[0], t.strides[1], t.strides[2]],
        available: t.available,
        elem_bytes: t.elem_bytes,
        device: t.device,
    }
}

/// A varlen LSE `[Hq, total]` seen as `[1, Hq, total]`.
pub(crate) fn lse_as_batch_of_one(lse: &TensorDesc<2>) -> TensorDesc<3> {
    TensorDesc {
        ptr: lse.ptr,
        shape: [1, lse.shape[0], lse.shape[1]],
        strides: [0, lse.strides[0], lse.strides[1]],
        available: lse.available,
        elem_bytes: lse.elem_bytes,
        device: lse.device,
    }
}

/// Validates a varlen prefill call (FlashAttention's varlen layout) and builds its launch.
///
/// q/out `[total_q, Hq, D]`, k/v `[total_k, Hkv, D]`, lse `[Hq, total_q]` (contiguous f32);
/// `cu_seqlens_q/k` are the host copies of the `[B + 1]` prefix sums whose device addresses are
/// the second elements. Sequence `b` is query rows `cu_q[b]..cu_q[b+1]` against key rows
/// `cu_k[b]..cu_k[b+1]`, bottom-right aligned like fixed-length batches.
#[allow(clippy::too_many_arguments)]
pub fn plan_prefill_varlen<T: AttnElement>(
    q: &TensorDesc<3>,
    k: &TensorDesc<3>,
    v: &TensorDesc<3>,
    out: &TensorDesc<3>,
    lse: &TensorDesc<2>,
    cu_seqlens_q: (&[i32], u64),
    cu_seqlens_k: (&[i32], u64),
    cfg: &AttentionConfig,
    device: u32,
) -> Result<PrefillPlan> {
    let mut plan = plan_prefill::<T>(
        &as_batch_of_one(q),
        &as_batch_of_one(k),
        &as_batch_of_one(v),
        &as_batch_of_one(out),
        &lse_as_batch_of_one(lse),
        cfg,
        device,
    )?;
    let (cu_q, cu_q_ptr) = cu_seqlens_q;
    let (cu_k, cu_k_ptr) = cu_seqlens_k;
    check_cu_seqlens("cu_seqlens_q", cu_q, q.shape[0])?;
    check_cu_seqlens("cu_seqlens_k", cu_k, k.shape[0])?;
    if cu_k.len() != cu_q.len() {
        return Err(Error::InvalidCuSeqlens {
            which: "cu_seqlens_k",
            why: format!(
                "it has {} entries but cu_seqlens_q has {}",
                cu_k.len(),
                cu_q.len()
            ),
        });
    }
    let sequences: Vec<_> = cu_q
        .windows(2)
        .zip(cu_k.windows(2))
        .map(|(q, k)| {
            let seqlen_k = (k[1] - k[0]) as usize;
            ((q[1] - q[0]) as usize, seqlen_k, seqlen_k)
        })
        .collect();
    // Packed keys end where the next sequence starts.
    let arrays = VarlenArrays {
        cu_seqlens_q: cu_q_ptr,
        starts_k: cu_k_ptr,
        ends_k: cu_k_ptr + 4,
        ends_k_stream: cu_k_ptr + 4,
    };
    into_varlen::<T>(&mut plan, cfg, q.shape, &sequences, arrays)?;
    Ok(plan)
}

/// Device arrays of a varlen launch (see `PrefillParams`): `[B + 1]` query prefix sums, each
/// sequence's first key row, and its end row in each K/V source.
pub(crate) struct VarlenArrays {
    pub cu_seqlens_q: u64,
    pub starts_k: u64,
    pub ends_k: u64,
    pub ends_k_stream: u64,
}

/// Turns a plan over packed queries `[total_q, Hq, D]` (planned as a batch of one) into a varlen
/// launch over `sequences`, each (query rows, keys in the retrieval or only source, keys in the
/// streaming source), whose rows and keys the device `arrays` hold.
pub(crate) fn into_varlen<T: AttnElement>(
    plan: &mut PrefillPlan,
    cfg: &AttentionConfig,
    [total_q, heads_q, head_dim]: [usize; 3],
    sequences: &[(usize, usize, usize)],
    arrays: VarlenArrays,
) -> Result<()> {
    let batch = sequences.len();
    check_limit("the number of varlen sequences", batch, MAX_GRID_YZ)?;
    check_alibi_rows(cfg, batch)?;
    let longest = |f: fn(&(usize, usize, usize)) -> usize| sequences.iter().map(f).max();
    let max_q = longest(|s| s.0).unwrap_or(0);
    let (_, rows_per_block, ..) = kernel_shape(cfg.kernel, head_dim);
    plan.set_grid((
        max_q.div_ceil(rows_per_block).max(1) as u32,
        plan.grid.1,
        batch as u32,
    ))?;
    let p = &mut plan.params;
    p.seqlen_q = max_q as i32;
    p.seqlen_k = longest(|s| s.1).unwrap_or(0) as i32;
    p.seqlen_k_stream = longest(|s| s.2).unwrap_or(0) as i32;
    p.cu_seqlens_q = arrays.cu_seqlens_q;
    p.cu_seqlens_k = arrays.starts_k;
    p.ends_k = arrays.ends_k;
    p.ends_k_stream = arrays.ends_k_stream;
    p.lse_strides = [0, total_q as i64];
    if plan.split.is_some() {
        // Partial rows follow the LSE's `[Hq, total_q]`: merged as one sequence of total_q rows.
        let rows = PartialRows {
            batch: 1,
            heads_q,
            seqlen_q: total_q,
        };
        plan.split = Some(split_kv::<T>(
            &plan.params,
            (head_dim, &cfg.head_kinds),
            cfg.kv_splits,
            (
                plan.grid.0 as usize,
                sequences.iter().map(|&s| (s, 1)).collect(),
            ),
            rows,
        ));
    }
    Ok(())
}

impl Context {
    /// Launches a plan of [`plan_prefill`], [`plan_prefill_varlen`] or
    /// [`crate::plan_prefill_kvcache`] without validating again:
    /// for a serving loop that keeps a batch's plan, and for varlen calls whose prefix sums the
    /// caller already holds on the host (`attention_varlen` copies them back on every call).
    ///
    /// # Safety
    /// The plan must come from `plan_prefill*` on this context's device, for tensors that are
    /// still allocated, and a varlen or KV-cache plan's device arrays (prefix sums, key counts,
    /// block table rows) must hold the host copies it was planned with. The kernels address
    /// memory from the plan's pointers and from those arrays.
    pub unsafe fn launch_prefill_plan(&self, plan: &PrefillPlan) -> Result<()> {
        self.launch_prefill(plan)
    }

    /// Launches a validated prefill plan.
    pub(crate) fn launch_prefill(&self, plan: &PrefillPlan) -> Result<()> {
        // Scratch counters past the two the persistent scheduler uses are zero between launches
        // (every launch leaves the ones it used at zero): `B` of them are the key starts.
        let zero_starts = if plan.zero_key_starts {
            plan.grid.2 as usize
        } else {
            0
        };
        let with_starts = |mut params: PrefillParams, counters: u64| {
            if zero_starts > 0 {
                params.cu_seqlens_k = counters + 8;
            }
            params
        };
        if !plan.persistent {
            let launch = |params: &PrefillParams| {
                self.launch(
                    &plan.entry,
                    plan.grid,
                    plan.block,
                    plan.shared_bytes,
                    params,
                )
            };
            if zero_starts == 0 {
                return launch(&plan.params);
            }
            return self.with_scratch(0, 2 + zero_starts, |scratch| {
                launch(&with_starts(plan.params, scratch.counters))
            });
        }
        let slots = self.info().multiprocessors as usize
            * self.resident_blocks_per_sm(&plan.entry, plan.block, plan.shared_bytes)? as usize;
        // The split count replays this launch's scheduler (`split_kv`), once per launch shape.
        let splits = plan
            .split
            .as_ref()
            .map_or(1, |split| self.kv_splits(split, slots));
        let merge = match &plan.split {
            Some(split) if splits > 1 => {
                let rows = split.rows.count();
                check_limit("split-KV partial rows", splits * rows, i32::MAX as usize)?;
                Some((split, rows))
            }
            _ => None,
        };
        let partials = merge.map_or(0, |(split, rows)| splits * rows * (split.head_dim + 1));
        // A plain call's streaming slots repeat K and V: encode each distinct operand once.
        let maps = match &plan.tma {
            Some(tensors) => {
                let mut maps = [TensorMap::default(); TMA_MAPS];
                for (i, tensor) in tensors.iter().enumerate() {
                    maps[i] = match tensors[..i].iter().position(|t| t == tensor) {
                        Some(j) => maps[j],
                        None => tensor.encode()?,
                    };
                }
                Some(maps)
            }
            None => None,
        };
        let work_items = (plan.work_tiles() * splits).min(slots).max(1);
        let grid = (work_items as u32, 1, 1);
        self.with_scratch(partials, 2 + zero_starts, |scratch| {
            let mut params = with_starts(plan.params, scratch.counters);
            params.work_counter = scratch.counters;
            let mut entry = plan.entry.as_str();
            if let Some((split, rows)) = merge {
                params.kv_splits = splits as i32;
                params.kv_splits_div = FastDiv::new(splits as u32);
                params.partial_o = scratch.partials;
                params.partial_lse = scratch.partials + 4 * (splits * rows * split.head_dim) as u64;
                entry = &split.entry;
            }
            match maps {
                Some(maps) => {
                    let tma_params = TmaPrefillParams {
                        maps,
                        prefill: params,
                    };
                    self.launch(entry, grid, plan.block, plan.shared_bytes, &tma_params)?;
                }
                None => self.launch(entry, grid, plan.block, plan.shared_bytes, &params)?,
            }
            let Some((split, rows)) = merge else {
                return Ok(());
            };
            let merge_params = PrefillMergeParams {
                partial_o: params.partial_o,
                partial_lse: params.partial_lse,
                o: params.o,
                lse: params.lse,
                o_strides: params.o_strides,
                lse_strides: params.lse_strides,
                batch: split.rows.batch as i32,
                heads_q: split.rows.heads_q as i32,
                seqlen_q: split.rows.seqlen_q as i32,
                kv_splits: params.kv_splits,
            };
            self.launch(
                &split.merge_entry,
                (rows.div_ceil(PREFILL_MERGE_ROWS) as u32, 1, 1),
                (32 * PREFILL_MERGE_ROWS) as u32,
                0,
                &merge_params,
            )
        })
    }

    /// Varlen prefill (FlashAttention's varlen layout): q/out `[total_q, Hq, D]`, k/v
    /// `[total_k, Hkv, D]`, lse `[Hq, total_q]`, and `[B + 1]` i32 prefix sums of the query and
    /// key lengths. The prefix sums are copied to the host (a small synchronous copy, after the
    /// context's stream has finished what it queued, which may write them) and checked, so a bad
    /// one is an error, never an out-of-bounds access.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_varlen<T: AttnElement>(
        &self,
        q: &View<'_, T, 3>,
        k: &View<'_, T, 3>,
        v: &View<'_, T, 3>,
        out: &mut ViewMut<'_, T, 3>,
        lse: &mut ViewMut<'_, f32, 2>,
        cu_seqlens_q: &DeviceTensor<i32, 1>,
        cu_seqlens_k: &DeviceTensor<i32, 1>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        // On a non-blocking stream the copy below would not wait for the stream's work.
        self.synchronize()?;
        let cu_q = cu_seqlens_q.to_host()?;
        let cu_k = cu_seqlens_k.to_host()?;
        let plan = plan_prefill_varlen::<T>(
            q.desc(),
            k.desc(),
            v.desc(),
            out.desc(),
            lse.desc(),
            (&cu_q, cu_seqlens_q.view().desc().ptr),
            (&cu_k, cu_seqlens_k.view().desc().ptr),
            cfg,
            self.ordinal(),
        )?;
        self.launch_prefill(&plan)
    }

    /// Prefill attention over one layer: every query head attends per its KV head's kind, in one
    /// launch. Writes `out` and the natural-log `lse`; rows that see no key get 0 and `-inf`.
    /// Queued on the context's stream; call [`Context::synchronize`] to wait and see kernel errors.
    pub fn attention<T: AttnElement>(
        &self,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        let plan = plan_prefill::<T>(
            q.desc(),
            k.desc(),
            v.desc(),
            out.desc(),
            lse.desc(),
            cfg,
            self.ordinal(),
        )?;
        self.launch_prefill(&plan)
    }
}
