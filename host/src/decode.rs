//! Decode attention: 1..16 new query tokens per sequence against a long KV cache, split across
//! SMs and merged by LSE. Over plain K/V tensors ([`Context::decode_attention`]) or, inside
//! [`crate::DuoCache`], over the retrieval (full) and streaming (ring) caches of a layer.
use crate::alibi::AlibiSlopes;
use crate::attention::{
    AttentionConfig, HeadKind, check_alibi_rows, check_device, check_heads, check_kv, check_limit,
    check_no_aliasing, check_queries, check_shape, clamp_len, streaming_mask, strides3,
};
use crate::context::Context;
use crate::element::AttnElement;
use crate::error::{Error, Result};
use crate::rotary::QueryTurn;
use crate::tensor::{TensorDesc, View, ViewMut};
use duo_attn_kernels::abi::{
    DECODE_HEAD_DIMS, DECODE_MAX_CLUSTER, DECODE_MAX_SPLITS, DECODE_MIN_TILES_PER_SPLIT,
    DECODE_ROWS, DecodeParams, FastDiv, KvSource, MAX_SEQLEN, decode_block_n, decode_fuses_append,
    decode_paged_smem_bytes, decode_smem_bytes, decode_threads, decode_turns_appended_keys,
};

/// Most new query tokens per sequence of one decode call.
pub const MAX_DECODE_QUERIES: usize = 16;

/// A validated decode launch (splits merge inside the kernel).
#[derive(Clone, Debug, PartialEq)]
pub struct DecodePlan {
    /// The kernel's entry name in the embedded module.
    pub entry: String,
    /// Blocks (x: every retrieval head's splits, then every streaming head's).
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
    /// `o_partial`/`lse_partial`/`counters` are filled in at launch from the context's
    /// workspace.
    pub params: DecodeParams,
    /// The most splits of any head (the partials' leading extent).
    pub splits: usize,
    /// Row groups (batch entry, KV head, chunk of query rows): one merge counter each.
    pub groups: usize,
    /// Head dim of Q, K, V and O.
    pub head_dim: usize,
    /// Blocks per cluster that would merge each row group's splits in distributed shared memory
    /// (`decode_cluster`; 1: none). The launch uses it where the context allows and the GPU holds
    /// every cluster at once.
    pub cluster: usize,
    /// How the entry finds K/V rows.
    pub(crate) paging: DecodePaging,
    /// With a rotary table the kernel cannot apply to Q itself: the launch that turns Q into the
    /// workspace first.
    pub(crate) q_turn: Option<QueryTurn>,
}

impl DecodePlan {
    /// f32 elements of workspace the splits need (partial O, then partial LSE).
    pub fn workspace_len(&self) -> usize {
        let rows =
            self.params.batch as usize * self.params.heads_q as usize * self.params.n_q as usize;
        let d = self.head_dim;
        self.splits * rows * (d + 1)
    }

    /// Whether the entry fuses an append into the step (`rotary`: one that turns the new keys).
    pub(crate) fn fuses_append(&self, rotary: bool) -> bool {
        let d = self.head_dim;
        decode_fuses_append(d, self.paging != DecodePaging::None)
            && (!rotary || decode_turns_appended_keys(d, self.paging == DecodePaging::Rows))
    }
}

pub(crate) fn kv_source(k: &TensorDesc<4>, v: &TensorDesc<4>) -> KvSource {
    KvSource {
        k: k.ptr,
        v: v.ptr,
        k_strides: strides3(k),
        v_strides: strides3(v),
    }
}

/// Where the decode reads K/V.
pub(crate) enum DecodeKv<'a> {
    /// Every KV head `h` reads head `h` of `[B, Sk, Hkv, D]` tensors.
    Plain {
        k: &'a TensorDesc<4>,
        v: &'a TensorDesc<4>,
    },
    /// Paged K/V `[pages, page_size, Hkv, D]` whose block table rows hold `capacity` keys.
    Paged {
        k: &'a TensorDesc<4>,
        v: &'a TensorDesc<4>,
        capacity: usize,
    },
    /// The DuoAttention cache of one layer (validated by the cache); `full` is a pool of pages
    /// when `pages` is set.
    Cache {
        full: KvSource,
        stream: KvSource,
        seqlen: usize,
        recent: usize,
        pages: Option<CachePages>,
    },
}

/// A paged DuoAttention cache's block table rows for a decode (validated by the cache).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CachePages {
    pub(crate) table: u64,
    pub(crate) stride: i64,
    pub(crate) shift: i32,
    pub(crate) pages: i32,
}

impl DecodeKv<'_> {
    /// How the decode entry for head dim `d` finds these K/V rows.
    fn paging(&self, d: usize) -> DecodePaging {
        let page_size = match self {
            DecodeKv::Plain { .. } | DecodeKv::Cache { pages: None, .. } => {
                return DecodePaging::None;
            }
            DecodeKv::Paged { k, .. } => k.shape[1],
            DecodeKv::Cache { pages: Some(p), .. } => 1usize << p.shift.clamp(0, 31),
        };
        if page_size >= decode_block_n(d) {
            DecodePaging::Tiles
        } else {
            DecodePaging::Rows
        }
    }
}

/// How a decode entry finds its K/V rows (the kernels' `decode::paging`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecodePaging {
    /// Contiguous K/V.
    None,
    /// Paged, a table lookup per row: pages smaller than a KV tile.
    Rows,
    /// Paged, a table lookup per KV tile: pages of at least `decode_block_n(d)` rows, whose
    /// tiles load as contiguous ones do.
    Tiles,
}

/// The decode kernel entry for element `T` and head dim `d` (`DECODE_ENTRIES`), with ALiBi or
/// without.
fn decode_entry<T: AttnElement>(d: usize, paging: DecodePaging, alibi: bool) -> String {
    let paged = match paging {
        DecodePaging::None => "",
        DecodePaging::Rows => "paged_",
        DecodePaging::Tiles => "paged_tiles_",
    };
    let alibi = if alibi { "alibi_" } else { "" };
    format!("duo_decode_{alibi}{paged}{}_d{d}", T::KERNEL_NAME)
}

/// Dynamic shared memory of the decode entry for head dim `d`, contiguous or paged.
fn decode_shared_bytes(d: usize, paging: DecodePaging) -> usize {
    if paging == DecodePaging::None {
        decode_smem_bytes(d)
    } else {
        decode_paged_smem_bytes(d)
    }
}

/// Splits of the longest heads' tiles so that their `blocks` x splits blocks make one full wave
/// of the GPU's `resident` block slots: every block streams the same number of tiles, so a
/// partial second wave would leave SMs idle (measured: 2.2 waves lost ~10% at B=8, 32k). Short
/// caches take fewer splits, of `DECODE_MIN_TILES_PER_SPLIT` tiles.
fn choose_splits(blocks: usize, max_tiles: usize, resident: usize) -> (usize, usize) {
    let max_tiles = max_tiles.max(1);
    let target = (resident / blocks.max(1)).min(max_tiles.div_ceil(DECODE_MIN_TILES_PER_SPLIT));
    let splits = target.clamp(1, max_tiles.min(DECODE_MAX_SPLITS));
    let per_split = max_tiles.div_ceil(splits);
    (max_tiles.div_ceil(per_split), per_split)
}

/// Blocks per cluster of a decode launch: each retrieval row group's splits, when there are 2 to
/// `DECODE_MAX_CLUSTER` of them, so that they merge through distributed shared memory. Clusters
/// are consecutive blocks, so the streaming row groups after the retrieval ones must then split
/// as many ways (their clusters merge too) or not at all (each block writes its rows); otherwise
/// 1 (no clusters). A layer of streaming heads only splits them all alike.
fn decode_cluster(kinds: &KindSplits, streaming: usize) -> usize {
    let c = kinds.splits;
    let streams_fit = streaming == 0 || kinds.stream_splits == 1 || kinds.stream_splits == c;
    if (2..=DECODE_MAX_CLUSTER).contains(&c) && streams_fit {
        c
    } else {
        1
    }
}

/// K/V tiles each decode block asks the L2 for before it waits for the previous kernel
/// (`DecodeParams::prefetch_tiles`). Serve on an H100 (8 layers, B = 1, session 30): 16k
/// 0.198-0.202 ms per token against 0.219-0.224 without, 4k 0.156 against 0.166; B = 4 and the
/// isolated bench kernels level. Three tiles were no better, and four slowed the bench's B = 1 4k
/// (0.018 ms against 0.016: its K/V stays in the L2 between reps, so there is nothing to gain).
const DECODE_PREFETCH_TILES: i32 = 2;

/// How a decode splits each head kind's KV tiles across blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KindSplits {
    /// Splits of a retrieval head's tiles (of a streaming head's when the layer has none).
    splits: usize,
    tiles_per_split: usize,
    stream_splits: usize,
    /// Blocks of the launch: every retrieval head's splits, then every streaming head's.
    blocks: usize,
}

impl KindSplits {
    /// Splits for `columns` (batch entries x row chunks) of each of `heads` (retrieval,
    /// streaming), whose heads walk at most `tiles` (retrieval, streaming) KV tiles. Retrieval
    /// blocks fill one wave of the GPU's `resident` block slots. A few streaming blocks (at most
    /// an eighth of the slots) get slots of their own, so none waits for a retrieval block to
    /// end; more would leave too few retrieval blocks to draw the memory bandwidth (B = 8, half
    /// streaming, 96 instead of 128 retrieval blocks: up to 11% slower at 128k, session 28), so
    /// they queue behind the retrieval blocks. Streaming heads split at the retrieval heads'
    /// tiles per split, so most take one block.
    fn plan(
        columns: usize,
        (retrieval, streaming): (usize, usize),
        (full_tiles, stream_tiles): (usize, usize),
        resident: usize,
    ) -> Self {
        if retrieval == 0 {
            let (splits, per) = choose_splits(columns * streaming, stream_tiles, resident);
            return Self {
                splits,
                tiles_per_split: per,
                stream_splits: splits,
                blocks: columns * streaming * splits,
            };
        }
        // Retrieval splits on the slots left beside `reserved` streaming blocks.
        let with_reserved = |reserved: usize| {
            let (splits, per) = choose_splits(columns * retrieval, full_tiles, resident - reserved);
            let stream_splits = stream_tiles.max(1).div_ceil(per).min(DECODE_MAX_SPLITS);
            Self {
                splits,
                tiles_per_split: per,
                stream_splits,
                blocks: columns * (retrieval * splits + streaming * stream_splits),
            }
        };
        // A slot per streaming head first; where their windows split (short caches: B = 1 at
        // 16k took 128 + 12 blocks on 132 slots) and every streaming block still fits in an
        // eighth of the wave, a slot per streaming block.
        let heads = columns * streaming;
        let plan = with_reserved(if 8 * heads <= resident { heads } else { 0 });
        let stream_blocks = heads * plan.stream_splits;
        if plan.blocks > resident && stream_blocks > heads && 8 * stream_blocks <= resident {
            return with_reserved(stream_blocks);
        }
        plan
    }
}

/// Validates a decode and builds its launches. Pure (no GPU).
pub(crate) fn plan_decode<T: AttnElement>(
    q: &TensorDesc<4>,
    kv: DecodeKv<'_>,
    out: &TensorDesc<4>,
    lse: &TensorDesc<3>,
    cfg: &AttentionConfig,
    device: u32,
    resident_blocks: usize,
) -> Result<DecodePlan> {
    let [batch, n_q, heads_q, head_dim] = check_queries(q, out, lse, cfg, device)?;
    check_alibi_rows(cfg, batch)?;
    if cfg.right_window != 0 {
        return Err(Error::RightWindowUnsupported {
            right: cfg.right_window,
            by: "decode",
        });
    }
    if n_q > MAX_DECODE_QUERIES {
        return Err(Error::DecodeQueryBlock {
            got: n_q,
            max: MAX_DECODE_QUERIES,
        });
    }
    let heads_kv = cfg.head_kinds.len();
    let paging = kv.paging(head_dim);
    let mut cache_pages = None;
    let (full, stream, seqlen, recent, ring) = match kv {
        DecodeKv::Plain { k, v } => {
            check_heads(heads_q, k.shape[2], cfg)?;
            let sk = check_kv(
                (k, "k"),
                (v, "v"),
                batch,
                k.shape[2],
                head_dim,
                device,
                "k is [B, Sk, Hkv, D] with q's B and D",
            )?;
            check_no_aliasing(out, lse, &[(q, "q"), (k, "k"), (v, "v")])?;
            let src = kv_source(k, v);
            (src, src, sk, 0, false)
        }
        DecodeKv::Paged { k, v, capacity } => {
            check_heads(heads_q, k.shape[2], cfg)?;
            check_kv(
                (k, "k_pages"),
                (v, "v_pages"),
                k.shape[0],
                k.shape[2],
                head_dim,
                device,
                "k_pages is [pages, page_size, Hkv, D] with q's D",
            )?;
            check_no_aliasing(out, lse, &[(q, "q"), (k, "k_pages"), (v, "v_pages")])?;
            check_limit(
                "a block table row's capacity (pages per sequence x page size)",
                capacity,
                MAX_SEQLEN,
            )?;
            let src = kv_source(k, v);
            (src, src, capacity, 0, false)
        }
        DecodeKv::Cache {
            full,
            stream,
            seqlen,
            recent,
            pages,
        } => {
            check_heads(heads_q, heads_kv, cfg)?;
            // The ALiBi builds read keys at their own positions, not a ring's slots.
            if cfg.alibi.is_some() {
                return Err(Error::AlibiUnsupported {
                    by: "the DuoAttention cache's decode",
                });
            }
            cache_pages = pages;
            (full, stream, seqlen, recent, true)
        }
    };

    // The most KV tiles any head walks: the whole cache for retrieval heads; the sink and window
    // blocks (or the ring) for streaming heads.
    let bn = decode_block_n(head_dim);
    let window_tiles = if ring {
        (cfg.sink as usize + recent).div_ceil(bn)
    } else {
        (cfg.sink as usize).min(seqlen).div_ceil(bn)
            + (cfg.window as usize + n_q).min(seqlen).div_ceil(bn)
            + 1
    };
    let full_tiles = seqlen.div_ceil(bn);
    let stream_tiles = window_tiles.min(full_tiles);
    let group = heads_q / heads_kv;
    let row_chunks = (group * n_q).div_ceil(DECODE_ROWS);
    let retrieval = cfg
        .head_kinds
        .iter()
        .filter(|&&k| k == HeadKind::Retrieval)
        .count();
    let kinds = KindSplits::plan(
        batch * row_chunks,
        (retrieval, heads_kv - retrieval),
        (full_tiles, stream_tiles),
        resident_blocks,
    );

    let (alibi_slopes, alibi_batch_stride, alibi_neg_inv_scale) =
        AlibiSlopes::kernel_args(cfg, heads_q, head_dim);
    let params = DecodeParams {
        q: q.ptr,
        q_strides: strides3(q),
        full,
        stream,
        o_partial: 0,
        lse_partial: 0,
        counters: 0,
        o: out.ptr,
        lse: lse.ptr,
        o_strides: strides3(out),
        streaming_heads: streaming_mask(&cfg.head_kinds),
        splits: kinds.splits as i32,
        batch: batch as i32,
        n_q: n_q as i32,
        heads_q: heads_q as i32,
        heads_kv: heads_kv as i32,
        seqlen: seqlen as i32,
        sink: clamp_len(cfg.sink),
        window: clamp_len(cfg.window),
        recent: recent as i32,
        ring: ring as i32,
        causal: cfg.causal as i32,
        tiles_per_split: kinds.tiles_per_split as i32,
        stream_splits: kinds.stream_splits as i32,
        split_divs: [
            FastDiv::new(kinds.splits as u32),
            FastDiv::new(kinds.stream_splits as u32),
        ],
        row_chunks_div: FastDiv::new(row_chunks as u32),
        kind_heads_divs: [
            FastDiv::new(retrieval as u32),
            FastDiv::new((heads_kv - retrieval) as u32),
        ],
        scale_log2: cfg.scale_for(head_dim) * std::f32::consts::LOG2_E,
        seqlens: 0,
        block_table: cache_pages.map_or(0, |p| p.table),
        block_table_stride: cache_pages.map_or(0, |p| p.stride),
        num_pages: cache_pages.map_or(0, |p| p.pages),
        page_shift: cache_pages.map_or(0, |p| p.shift),
        // The DuoAttention cache's decode step fuses its append (`DuoCache::decode`).
        append: KvSource::default(),
        arrivals: 0,
        seq_blocks: 0,
        prefetch_tiles: DECODE_PREFETCH_TILES,
        blocks: kinds.blocks as i32,
        alibi_slopes,
        alibi_batch_stride,
        alibi_neg_inv_scale,
        rotary: Default::default(),
    };
    Ok(DecodePlan {
        entry: decode_entry::<T>(head_dim, paging, cfg.alibi.is_some()),
        grid: (kinds.blocks as u32, 1, 1),
        block: decode_threads(head_dim) as u32,
        shared_bytes: decode_shared_bytes(head_dim, paging) as u32,
        params,
        splits: kinds.splits.max(kinds.stream_splits),
        groups: batch * heads_kv * row_chunks,
        head_dim,
        cluster: decode_cluster(&kinds, heads_kv - retrieval),
        paging,
        q_turn: None,
    })
}

/// A device array the kernel reads while it writes `out` and `lse` must not overlap them.
pub(crate) fn check_clear_of_outputs<const N: usize>(
    t: &TensorDesc<N>,
    input: &'static str,
    out: &TensorDesc<4>,
    lse: &TensorDesc<3>,
) -> Result<()> {
    for (output, (start, end)) in [("out", out.byte_range()), ("lse", lse.byte_range())] {
        if t.overlaps(start, end) {
            return Err(Error::Aliasing { output, input });
        }
    }
    Ok(())
}

/// How errors name the per-sequence key counts.
const CACHE_SEQLENS: &str = "cache_seqlens";

/// Points a plain decode plan at per-sequence key counts: `[B]` i32 on the plan's device,
/// contiguous, and not overlapping the outputs (the kernel reads them while it writes those).
pub(crate) fn use_cache_seqlens(
    plan: &mut DecodePlan,
    seqlens: &TensorDesc<1>,
    out: &TensorDesc<4>,
    lse: &TensorDesc<3>,
    device: u32,
) -> Result<()> {
    check_cache_seqlens(seqlens, plan.params.batch as usize, device)?;
    check_clear_of_outputs(seqlens, CACHE_SEQLENS, out, lse)?;
    plan.params.seqlens = seqlens.ptr;
    Ok(())
}

/// Checks per-sequence key counts: `[batch]` i32 on `device`, contiguous, inside its allocation.
pub(crate) fn check_cache_seqlens(
    seqlens: &TensorDesc<1>,
    batch: usize,
    device: u32,
) -> Result<()> {
    let why = "one key count per sequence: [B] with q's B";
    check_device_array(seqlens, CACHE_SEQLENS, batch, why, device)
}

/// Checks a device array the kernels index from 0: `[len]` on `device`, contiguous, inside its
/// allocation.
pub(crate) fn check_device_array(
    t: &TensorDesc<1>,
    name: &'static str,
    len: usize,
    why: &'static str,
    device: u32,
) -> Result<()> {
    check_device(t, name, device)?;
    check_shape(t, name, [len], why)?;
    if len > 1 && t.strides[0] != 1 {
        return Err(Error::NotContiguous {
            tensor: name,
            shape: t.shape.to_vec(),
            strides: t.strides.to_vec(),
            expected: vec![1],
        });
    }
    t.check_in_bounds(name)
}

/// How errors name the block table.
const BLOCK_TABLE: &str = "block_table";

/// Points a paged decode plan at its block table: `[B, max_pages]` i32 on the plan's device,
/// contiguous along a row, clear of the outputs; the pages' count and size come from `k_pages`
/// (`[pages, page_size, Hkv, D]`, page size a power of two).
pub(crate) fn use_block_table(
    plan: &mut DecodePlan,
    table: &TensorDesc<2>,
    k_pages: &TensorDesc<4>,
    out: &TensorDesc<4>,
    lse: &TensorDesc<3>,
    device: u32,
) -> Result<()> {
    let stride = check_block_table(table, plan.params.batch as usize, device)?;
    check_clear_of_outputs(table, BLOCK_TABLE, out, lse)?;
    let (pages, page_size) = (k_pages.shape[0], k_pages.shape[1]);
    check_limit("pages in the pool", pages, MAX_SEQLEN)?;
    plan.params.block_table = table.ptr;
    plan.params.block_table_stride = stride;
    plan.params.num_pages = pages as i32;
    plan.params.page_shift = page_size.trailing_zeros() as i32;
    Ok(())
}

/// Checks a block table `[batch, max_pages]` i32 on `device`, contiguous along a row; returns
/// its row stride (0 for one row).
pub(crate) fn check_block_table(table: &TensorDesc<2>, batch: usize, device: u32) -> Result<i64> {
    check_device(table, BLOCK_TABLE, device)?;
    let [rows, max_pages] = table.shape;
    check_shape(
        table,
        BLOCK_TABLE,
        [batch, max_pages],
        "one row of page indices per sequence: [B, max_pages] with q's B",
    )?;
    table.check_not_empty(BLOCK_TABLE)?;
    if max_pages > 1 && table.strides[1] != 1 {
        return Err(Error::NotContiguous {
            tensor: BLOCK_TABLE,
            shape: table.shape.to_vec(),
            strides: table.strides.to_vec(),
            expected: vec![max_pages, 1],
        });
    }
    table.check_in_bounds(BLOCK_TABLE)?;
    Ok(if rows > 1 { table.strides[0] as i64 } else { 0 })
}

/// The keys one block table row addresses: `max_pages` pages of `page_size` rows (a power of
/// two, so the kernel finds a key's page by a shift).
pub(crate) fn paged_capacity(table: &TensorDesc<2>, k_pages: &TensorDesc<4>) -> Result<usize> {
    let page_size = k_pages.shape[1];
    if !page_size.is_power_of_two() {
        return Err(Error::InvalidPagedKv {
            why: format!("the page size ({page_size}, dim 1 of k_pages) must be a power of two"),
        });
    }
    Ok(table.shape[1].saturating_mul(page_size))
}

impl Context {
    /// Decode attention over plain K/V tensors: q `[B, n, Hq, D]` with 1 <= n <= 16 new tokens
    /// (the last `n` positions of the `Sk` keys), k/v `[B, Sk, Hkv, D]`, out like q, lse
    /// `[B, Hq, n]`. GQA groups share one pass over K/V, and long caches are split across SMs.
    /// Streaming heads read only their sink and window blocks.
    pub fn decode_attention<T: AttnElement>(
        &self,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        let (k, v) = (k.desc(), v.desc());
        let plan = self.decode_plan::<T>(
            q.desc(),
            DecodeKv::Plain { k, v },
            out.desc(),
            lse.desc(),
            cfg,
        )?;
        self.launch_decode(plan)
    }

    /// Decode attention with a key count per sequence (FlashAttention's `cache_seqlens`): k/v
    /// `[B, S_max, Hkv, D]` hold sequence `b`'s keys in rows `0..cache_seqlens[b]`, and its `n`
    /// queries sit at the last `n` of those positions. Otherwise as
    /// [`Context::decode_attention`].
    ///
    /// `cache_seqlens` is a `[B]` i32 device array, read by the kernel: a serving loop updates it
    /// on the device, and a captured CUDA graph replays with whatever it holds at launch. Counts
    /// outside `0..=S_max` are clamped into it, so none reads past the K/V rows. A query whose
    /// position is negative (a count under `n`) sees no key: output 0, LSE `-inf`. The split
    /// count is planned for `S_max`; each sequence spreads its own tiles over those splits.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_seqlens<T: AttnElement>(
        &self,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
        cache_seqlens: &View<'_, i32, 1>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        let (k, v) = (k.desc(), v.desc());
        let mut plan = self.decode_plan::<T>(
            q.desc(),
            DecodeKv::Plain { k, v },
            out.desc(),
            lse.desc(),
            cfg,
        )?;
        use_cache_seqlens(
            &mut plan,
            cache_seqlens.desc(),
            out.desc(),
            lse.desc(),
            self.ordinal(),
        )?;
        self.launch_decode(plan)
    }

    /// Decode attention over paged K/V (vLLM's and FlashAttention's `block_table` layout): pages
    /// `[pages, page_size, Hkv, D]` shared by all sequences, page size a power of two; row `b` of
    /// `block_table` (`[B, max_pages]` i32, on the device) lists sequence `b`'s pages in key
    /// order, and `cache_seqlens` (`[B]` i32, on the device) its key count. Otherwise as
    /// [`Context::decode_attention_seqlens`]: counts are clamped into the row's capacity
    /// (`max_pages * page_size`), and a page index outside the pool is clamped into it, so no
    /// value in either array reads outside `k_pages`/`v_pages` (a wrong one gives wrong
    /// attention, never an out-of-bounds access). Entries past a sequence's count are not read.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_paged<T: AttnElement>(
        &self,
        q: &View<'_, T, 4>,
        k_pages: &View<'_, T, 4>,
        v_pages: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
        block_table: &View<'_, i32, 2>,
        cache_seqlens: &View<'_, i32, 1>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        let (k, v, table) = (k_pages.desc(), v_pages.desc(), block_table.desc());
        let capacity = paged_capacity(table, k)?;
        let (o, l) = (out.desc(), lse.desc());
        let kv = DecodeKv::Paged { k, v, capacity };
        let mut plan = self.decode_plan::<T>(q.desc(), kv, o, l, cfg)?;
        use_cache_seqlens(&mut plan, cache_seqlens.desc(), o, l, self.ordinal())?;
        use_block_table(&mut plan, table, k, o, l, self.ordinal())?;
        self.launch_decode(plan)
    }

    /// The checked plan of a decode on this context's device, for as many resident blocks as
    /// the entry it will launch (contiguous or paged) fits on the GPU.
    pub(crate) fn decode_plan<T: AttnElement>(
        &self,
        q: &TensorDesc<4>,
        kv: DecodeKv<'_>,
        out: &TensorDesc<4>,
        lse: &TensorDesc<3>,
        cfg: &AttentionConfig,
    ) -> Result<DecodePlan> {
        let d = q.shape[3];
        let resident = self.decode_resident_blocks::<T>(d, kv.paging(d), cfg.alibi.is_some())?;
        plan_decode::<T>(q, kv, out, lse, cfg, self.ordinal(), resident)
    }

    /// Decode blocks the whole GPU holds at once for head dim `d` (1 if `d` is unsupported; the
    /// plan rejects it).
    fn decode_resident_blocks<T: AttnElement>(
        &self,
        d: usize,
        paging: DecodePaging,
        alibi: bool,
    ) -> Result<usize> {
        if !DECODE_HEAD_DIMS.contains(&d) {
            return Ok(1);
        }
        let entry = decode_entry::<T>(d, paging, alibi);
        let per_sm = self.resident_blocks_per_sm(
            &entry,
            decode_threads(d) as u32,
            decode_shared_bytes(d, paging) as u32,
        )?;
        Ok(per_sm as usize * self.info().multiprocessors as usize)
    }

    /// Runs a decode plan with its partials in the context's workspace.
    pub(crate) fn launch_decode(&self, plan: DecodePlan) -> Result<()> {
        self.launch_decode_with(plan, false)
    }

    /// [`Context::launch_decode`]; with `arrivals`, the fused append's per-sequence counts
    /// (`DecodeParams::arrivals`) come from the workspace too, after the merge counters, so the
    /// launch advances `seqlens`.
    pub(crate) fn launch_decode_with(&self, mut plan: DecodePlan, arrivals: bool) -> Result<()> {
        let rows = plan.params.batch as u64 * plan.params.heads_q as u64 * plan.params.n_q as u64;
        let groups = plan.groups;
        let counters = groups
            + if arrivals {
                plan.params.batch as usize
            } else {
                0
            };
        // The grid rounded up to whole clusters (blocks past `params.blocks` return at once).
        let cluster = self.decode_launch_cluster(&plan)?;
        let grid = (
            (plan.params.blocks as u32).next_multiple_of(cluster as u32),
            plan.grid.1,
            plan.grid.2,
        );
        // A query turn's copy of Q (2-byte elements) after the partials, 16-byte aligned.
        let partials = plan.workspace_len().next_multiple_of(4);
        let q_copy = plan.q_turn.as_ref().map_or(0, |t| {
            let p = &t.plan.params;
            (p.rows as usize * p.heads as usize * p.head_dim as usize).div_ceil(2)
        });
        self.with_scratch(partials + q_copy, counters, |scratch| {
            if let Some(QueryTurn { entry, plan: turn }) = &plan.q_turn {
                let mut turn = turn.clone();
                turn.params.dst = scratch.partials + 4 * partials as u64;
                self.launch_rotary_plan(entry, &turn)?;
                plan.params.q = turn.params.dst;
                plan.params.q_strides = turn.params.dst_strides;
            }
            plan.params.o_partial = scratch.partials;
            plan.params.lse_partial =
                scratch.partials + 4 * plan.splits as u64 * rows * plan.head_dim as u64;
            plan.params.counters = scratch.counters;
            if arrivals {
                plan.params.arrivals = scratch.counters + 4 * groups as u64;
            }
            self.launch_in_clusters(
                &plan.entry,
                grid,
                plan.block,
                plan.shared_bytes,
                &plan.params,
                cluster as u32,
            )
        })
    }

    /// The cluster size a decode plan launches with: its own where the context merges in
    /// clusters and the GPU holds all of the launch's clusters at once (a cluster that waited for
    /// SMs would hold back its row group's merge), else 1.
    fn decode_launch_cluster(&self, plan: &DecodePlan) -> Result<usize> {
        if plan.cluster <= 1 || !self.decode_clusters() {
            return Ok(1);
        }
        let clusters = (plan.params.blocks as usize).div_ceil(plan.cluster);
        let resident = self.resident_clusters(
            &plan.entry,
            plan.block,
            plan.shared_bytes,
            plan.cluster as u32,
        )?;
        Ok(if clusters <= resident as usize {
            plan.cluster
        } else {
            1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streaming heads take the blocks their tiles fill; a few of them get slots of their own.
    #[test]
    fn streaming_heads_take_only_the_blocks_they_fill() {
        // B = 1, 4 + 4 KV heads, 128k keys (1024 tiles), windows of 10 tiles: the 4 streaming
        // blocks keep their own slots, the retrieval heads split 32 ways (before: 33 splits for
        // every head, 128 blocks without a tile).
        let b1 = KindSplits::plan(1, (4, 4), (1024, 10), 132);
        assert_eq!((b1.splits, b1.stream_splits, b1.blocks), (32, 1, 132));
        // B = 8: 32 streaming blocks would cost the retrieval heads a quarter of the wave.
        let b8 = KindSplits::plan(8, (4, 4), (1024, 10), 132);
        assert_eq!((b8.splits, b8.stream_splits, b8.blocks), (4, 1, 160));
        // Short caches: streaming heads split at the retrieval heads' tiles per split.
        let short = KindSplits::plan(1, (4, 4), (32, 10), 132);
        assert_eq!((short.tiles_per_split, short.stream_splits), (4, 3));
        // Windows that split still fit one wave with the retrieval splits: 16k keys (128 tiles)
        // took 32 x 4 + 4 x 3 = 140 blocks on 132 slots; now 26 splits of 5 and 4 x 2.
        let b1_16k = KindSplits::plan(1, (4, 4), (128, 10), 132);
        assert_eq!(
            (b1_16k.splits, b1_16k.stream_splits, b1_16k.blocks),
            (26, 2, 112)
        );
        // Every mix of a few streaming heads fits one wave when their blocks get slots.
        for (columns, tiles, r, s) in [(1, 64, 6, 2), (1, 256, 4, 4), (2, 100, 3, 5), (1, 48, 7, 1)]
        {
            let plan = KindSplits::plan(columns, (r, s), (tiles, 10), 132);
            if 8 * columns * s * plan.stream_splits <= 132 {
                assert!(plan.blocks <= 132, "{plan:?}");
            }
        }
        // One kind: no block for the other.
        let all_streaming = KindSplits::plan(2, (0, 8), (1024, 10), 132);
        assert_eq!(all_streaming.blocks, 2 * 8 * all_streaming.stream_splits);
        let all_retrieval = KindSplits::plan(2, (8, 0), (1024, 10), 132);
        assert_eq!(all_retrieval.blocks, 2 * 8 * all_retrieval.splits);
    }

    /// Row groups of 2 to 16 splits run as clusters when the streaming ones split as many ways
    /// or not at all.
    #[test]
    fn clusters_take_row_groups_of_two_to_sixteen_splits() {
        // B = 1 at 4k, 4 + 4 heads: 8 retrieval splits, one per streaming head.
        let b1 = KindSplits::plan(1, (4, 4), (32, 3), 132);
        assert_eq!(
            (b1.splits, b1.stream_splits, decode_cluster(&b1, 4)),
            (8, 1, 8)
        );
        // A serving cache of 4k + 64 keys: 9 splits of 4 tiles.
        let b1 = KindSplits::plan(1, (4, 4), (33, 3), 132);
        assert_eq!((b1.splits, decode_cluster(&b1, 4)), (9, 9));
        // 32 splits at 128k: more than a cluster holds.
        let long = KindSplits::plan(1, (4, 4), (1024, 10), 132);
        assert_eq!((long.splits, decode_cluster(&long, 4)), (32, 1));
        // Streaming heads split 2 ways beside 4 retrieval splits: no clusters.
        let odd = KindSplits {
            splits: 4,
            tiles_per_split: 4,
            stream_splits: 2,
            blocks: 12,
        };
        assert_eq!(decode_cluster(&odd, 1), 1);
        assert_eq!(decode_cluster(&odd, 0), 4);
        // One split: nothing to merge.
        let one = KindSplits::plan(64, (8, 0), (32, 1), 132);
        assert_eq!((one.splits, decode_cluster(&one, 0)), (1, 1));
    }

    /// One full wave of splits, but no split shorter than `DECODE_MIN_TILES_PER_SPLIT` tiles when the
    /// cache has that many per block.
    #[test]
    fn short_caches_take_fewer_longer_splits() {
        // B = 1, 8 KV heads on 132 SMs: 4k keys are 32 tiles -> 8 splits of 4 (not 16 of 2).
        assert_eq!(choose_splits(8, 32, 132), (8, 4));
        // 8k: 64 tiles -> the full wave of 16 splits already has 4 each.
        assert_eq!(choose_splits(8, 64, 132), (16, 4));
        // 128k: 1024 tiles, 16 splits of 64.
        assert_eq!(choose_splits(8, 1024, 132), (16, 64));
        // Fewer tiles than the minimum: one split.
        assert_eq!(choose_splits(8, 3, 132), (1, 3));
    }

    /// Pages of at least a KV tile take the one-lookup-per-tile entries; smaller ones the
    /// per-row entries.
    #[test]
    fn page_size_picks_the_paged_entry() {
        let cache = |shift: Option<i32>| DecodeKv::Cache {
            full: KvSource::default(),
            stream: KvSource::default(),
            seqlen: 4096,
            recent: 0,
            pages: shift.map(|shift| CachePages {
                table: 0,
                stride: 0,
                shift,
                pages: 1,
            }),
        };
        for (d, shift, paging) in [
            (128, None, DecodePaging::None),
            (128, Some(6), DecodePaging::Rows),
            (128, Some(7), DecodePaging::Tiles),
            (64, Some(8), DecodePaging::Tiles),
            (256, Some(5), DecodePaging::Rows),
            (256, Some(6), DecodePaging::Tiles),
        ] {
            assert_eq!(cache(shift).paging(d), paging, "d {d}, shift {shift:?}");
        }
        use half::bf16;
        assert_eq!(
            decode_entry::<bf16>(128, DecodePaging::Tiles, false),
            "duo_decode_paged_tiles_bf16_d128"
        );
        assert_eq!(
            decode_entry::<bf16>(64, DecodePaging::Rows, true),
            "duo_decode_alibi_paged_bf16_d64"
        );
        assert_eq!(
            decode_entry::<bf16>(256, DecodePaging::None, false),
            "duo_decode_bf16_d256"
        );
        for paging in [DecodePaging::None, DecodePaging::Rows, DecodePaging::Tiles] {
            for (d, alibi) in [64, 128, 256]
                .into_iter()
                .flat_map(|d| [(d, false), (d, true)])
            {
                let entry = decode_entry::<bf16>(d, paging, alibi);
                assert!(
                    duo_attn_kernels::abi::DECODE_ENTRIES
                        .iter()
                        .any(|e| e.0 == entry),
                    "{entry} is not a kernel entry"
                );
            }
        }
    }

    #[test]
    fn splits_cover_all_tiles() {
        for blocks in [1, 8, 64, 512, 4096] {
            for tiles in [1, 2, 7, 64, 500, 2048] {
                let (splits, per) = choose_splits(blocks, tiles, 264);
                assert!((1..=DECODE_MAX_SPLITS).contains(&splits));
                assert!(splits * per >= tiles && (splits - 1) * per < tiles);
            }
        }
    }

    /// Each head dim gets its entry and block shape: 8 warps on 128-key tiles up to D = 128,
    /// 4 warps on 64-key tiles with Q in shared memory at D = 256 (whose tiles are then counted
    /// in 64 keys).
    #[test]
    fn plans_take_the_block_shape_of_their_head_dim() {
        use crate::attention::HeadKind;
        use half::bf16;
        let at = |i: u64| 0x7000_0000_0000 + i * 0x1_0000_0000;
        for (d, threads, smem, tiles) in [
            (64, 256, 3 * 2 * 128 * 64 * 2, 8),
            (128, 256, 3 * 2 * 128 * 128 * 2, 8),
            (256, 128, 3 * 2 * 64 * 256 * 2 + 16 * 256 * 2, 16),
        ] {
            let q = TensorDesc::contiguous(at(0), [1, 1, 8, d], 2, 0);
            let k = TensorDesc::contiguous(at(1), [1, 1000, 2, d], 2, 0);
            let v = TensorDesc::contiguous(at(2), [1, 1000, 2, d], 2, 0);
            let out = TensorDesc::contiguous(at(3), [1, 1, 8, d], 2, 0);
            let lse = TensorDesc::contiguous(at(4), [1, 8, 1], 4, 0);
            let cfg = AttentionConfig::new(vec![HeadKind::Retrieval; 2]);
            let plan =
                plan_decode::<bf16>(&q, DecodeKv::Plain { k: &k, v: &v }, &out, &lse, &cfg, 0, 1)
                    .unwrap();
            assert_eq!(plan.entry, format!("duo_decode_bf16_d{d}"));
            assert_eq!(
                (plan.block as usize, plan.shared_bytes as usize),
                (threads, smem)
            );
            // One resident block: a single split walks every tile of the 1000 keys.
            assert_eq!((plan.splits, plan.params.tiles_per_split), (1, tiles));
        }
    }

    /// Decode's queries are the last tokens: a right window is a typed error, not ignored.
    #[test]
    fn a_right_window_is_rejected() {
        use crate::attention::HeadKind;
        use half::bf16;
        let at = |i: u64| 0x7000_0000_0000 + i * 0x1_0000_0000;
        let q = TensorDesc::contiguous(at(0), [1, 1, 8, 128], 2, 0);
        let k = TensorDesc::contiguous(at(1), [1, 1000, 2, 128], 2, 0);
        let v = TensorDesc::contiguous(at(2), [1, 1000, 2, 128], 2, 0);
        let out = TensorDesc::contiguous(at(3), [1, 1, 8, 128], 2, 0);
        let lse = TensorDesc::contiguous(at(4), [1, 8, 1], 4, 0);
        let cfg = AttentionConfig::new(vec![HeadKind::Retrieval; 2]).right_window(3);
        let err = plan_decode::<bf16>(&q, DecodeKv::Plain { k: &k, v: &v }, &out, &lse, &cfg, 0, 1)
            .unwrap_err();
        assert!(matches!(
            err,
            Error::RightWindowUnsupported {
                right: 3,
                by: "decode"
            }
        ));
    }

    /// ALiBi decodes on its own entries, one row of slopes or one per sequence; a DuoAttention
    /// cache's rings (slots, not positions) have no ALiBi build.
    #[test]
    fn alibi_takes_its_entries_and_rows() {
        use crate::attention::HeadKind;
        use half::bf16;
        let at = |i: u64| 0x7000_0000_0000 + i * 0x1_0000_0000;
        let q = TensorDesc::contiguous(at(0), [2, 1, 8, 128], 2, 0);
        let k = TensorDesc::contiguous(at(1), [2, 1000, 2, 128], 2, 0);
        let v = TensorDesc::contiguous(at(2), [2, 1000, 2, 128], 2, 0);
        let out = TensorDesc::contiguous(at(3), [2, 1, 8, 128], 2, 0);
        let lse = TensorDesc::contiguous(at(4), [2, 8, 1], 4, 0);
        let cfg = |rows: usize| {
            let host = vec![0.5; 8 * rows];
            let slopes = unsafe { crate::AlibiSlopes::from_device_ptr(at(5), 0, &host, rows) };
            AttentionConfig::new(vec![HeadKind::Retrieval; 2])
                .softmax_scale(0.25)
                .alibi(slopes.unwrap())
        };
        let plain = || DecodeKv::Plain { k: &k, v: &v };
        for (rows, stride) in [(1, 0), (2, 8)] {
            let plan = plan_decode::<bf16>(&q, plain(), &out, &lse, &cfg(rows), 0, 1).unwrap();
            assert_eq!(plan.entry, "duo_decode_alibi_bf16_d128");
            let p = &plan.params;
            assert_eq!(p.alibi_slopes, at(5));
            assert_eq!(
                (p.alibi_batch_stride, p.alibi_neg_inv_scale),
                (stride, -4.0)
            );
        }
        let err = plan_decode::<bf16>(&q, plain(), &out, &lse, &cfg(3), 0, 1).unwrap_err();
        assert!(matches!(err, Error::InvalidAlibi { .. }), "{err}");
        let ring = DecodeKv::Cache {
            full: kv_source(&k, &v),
            stream: kv_source(&k, &v),
            seqlen: 1000,
            recent: 64,
            pages: None,
        };
        let err = plan_decode::<bf16>(&q, ring, &out, &lse, &cfg(1), 0, 1).unwrap_err();
        assert!(matches!(err, Error::AlibiUnsupported { .. }), "{err}");
    }

    /// `cache_seqlens` must be `[B]` i32 on the context's device, contiguous, and clear of the
    /// outputs; a good one reaches the kernel's parameters.
    #[test]
    fn cache_seqlens_are_checked() {
        use crate::attention::HeadKind;
        use half::bf16;
        let at = |i: u64| 0x7000_0000_0000 + i * 0x1_0000_0000;
        let q = TensorDesc::contiguous(at(0), [3, 2, 8, 128], 2, 0);
        let k = TensorDesc::contiguous(at(1), [3, 1000, 2, 128], 2, 0);
        let v = TensorDesc::contiguous(at(2), [3, 1000, 2, 128], 2, 0);
        let out = TensorDesc::contiguous(at(3), [3, 2, 8, 128], 2, 0);
        let lse = TensorDesc::contiguous(at(4), [3, 8, 2], 4, 0);
        let cfg = AttentionConfig::new(vec![HeadKind::Retrieval, HeadKind::Streaming]);
        let plan = plan_decode::<bf16>(
            &q,
            DecodeKv::Plain { k: &k, v: &v },
            &out,
            &lse,
            &cfg,
            0,
            132,
        )
        .unwrap();
        let attach = |lens: TensorDesc<1>| {
            let mut plan = plan.clone();
            use_cache_seqlens(&mut plan, &lens, &out, &lse, 0).map(|()| plan.params.seqlens)
        };
        let lens = TensorDesc::contiguous(at(5), [3], 4, 0);
        assert_eq!(attach(lens).unwrap(), at(5));
        let err = attach(TensorDesc::contiguous(at(5), [2], 4, 0)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ShapeMismatch {
                    tensor: "cache_seqlens",
                    ..
                }
            ),
            "{err}"
        );
        let err = attach(TensorDesc::contiguous(at(5), [3], 4, 1)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongDevice {
                    tensor: "cache_seqlens",
                    ..
                }
            ),
            "{err}"
        );
        let strided = TensorDesc {
            strides: [2],
            available: 6,
            ..lens
        };
        let err = attach(strided).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotContiguous {
                    tensor: "cache_seqlens",
                    ..
                }
            ),
            "{err}"
        );
        // Inside the LSE output.
        let err = attach(TensorDesc::contiguous(at(4) + 8, [3], 4, 0)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Aliasing {
                    output: "lse",
                    input: "cache_seqlens"
                }
            ),
            "{err}"
        );
    }

    /// Paged K/V: the page size must be a power of two; the block table `[B, max_pages]` i32,
    /// contiguous along a row and clear of the outputs; a good one sets the kernel's paging
    /// parameters, and the row's capacity bounds the keys.
    #[test]
    fn block_tables_are_checked() {
        use crate::attention::HeadKind;
        use half::bf16;
        let at = |i: u64| 0x7000_0000_0000 + i * 0x1_0000_0000;
        let q = TensorDesc::contiguous(at(0), [3, 1, 8, 128], 2, 0);
        let out = TensorDesc::contiguous(at(3), [3, 1, 8, 128], 2, 0);
        let lse = TensorDesc::contiguous(at(4), [3, 8, 1], 4, 0);
        let cfg = AttentionConfig::new(vec![HeadKind::Retrieval, HeadKind::Streaming]);
        let plan_with = |page: usize, table: TensorDesc<2>| -> Result<DecodePlan> {
            let k = TensorDesc::contiguous(at(1), [40, page, 2, 128], 2, 0);
            let v = TensorDesc::contiguous(at(2), [40, page, 2, 128], 2, 0);
            let capacity = paged_capacity(&table, &k)?;
            let kv = DecodeKv::Paged {
                k: &k,
                v: &v,
                capacity,
            };
            let mut plan = plan_decode::<bf16>(&q, kv, &out, &lse, &cfg, 0, 132)?;
            use_block_table(&mut plan, &table, &k, &out, &lse, 0)?;
            Ok(plan)
        };
        let table = TensorDesc::contiguous(at(5), [3, 10], 4, 0);
        let plan = plan_with(16, table).unwrap();
        let p = &plan.params;
        assert_eq!(
            (
                p.block_table,
                p.block_table_stride,
                p.num_pages,
                p.page_shift,
                p.seqlen
            ),
            (at(5), 10, 40, 4, 160)
        );
        let err = plan_with(24, table).unwrap_err();
        assert!(matches!(err, Error::InvalidPagedKv { .. }), "{err}");
        let err = plan_with(16, TensorDesc::contiguous(at(5), [2, 10], 4, 0)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ShapeMismatch {
                    tensor: "block_table",
                    ..
                }
            ),
            "{err}"
        );
        let column_major = TensorDesc {
            strides: [1, 3],
            ..table
        };
        let err = plan_with(16, column_major).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotContiguous {
                    tensor: "block_table",
                    ..
                }
            ),
            "{err}"
        );
        let err = plan_with(16, TensorDesc::contiguous(at(3), [3, 10], 4, 0)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Aliasing {
                    output: "out",
                    input: "block_table"
                }
            ),
            "{err}"
        );
        let err = plan_with(16, TensorDesc::contiguous(at(5), [3, 10], 4, 1)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongDevice {
                    tensor: "block_table",
                    ..
                }
            ),
            "{err}"
        );
    }
}

/// Property tests of the decode plan (no GPU): random calls, mostly valid ones bent by an edit.
/// Planning returns a typed error or a plan, never a panic (overflow included, in debug builds),
/// and a plan's parameters keep every address the kernel forms inside the tensors it was given.
#[cfg(test)]
pub(crate) mod props {
    use super::*;
    use duo_attn_kernels::heads::DecodeBlock;
    use half::bf16;
    use proptest::prelude::*;

    /// Each operand in its own 2^44-byte region of fake device addresses.
    pub(crate) const REGION: u64 = 1 << 44;

    /// Bytes `[start, end)` the kernel may reach from `ptr` through element strides `extents`
    /// `(count, stride)`, plus a row of `row` elements, lie inside `t`'s allocation.
    pub(crate) fn inside<const N: usize>(
        what: &str,
        t: &TensorDesc<N>,
        ptr: u64,
        extents: &[(i64, i64)],
        row: i64,
    ) -> std::result::Result<(), TestCaseError> {
        let mut last: i128 = row as i128;
        for &(n, s) in extents {
            prop_assert!(n >= 1 && s >= 0, "{what}: extent {n}, stride {s}");
            last += (n as i128 - 1) * s as i128;
        }
        let elem = t.elem_bytes as i128;
        let (lo, hi) = (t.ptr as i128, t.ptr as i128 + t.available as i128 * elem);
        let (start, end) = (ptr as i128, ptr as i128 + last * elem);
        prop_assert!(
            start >= lo && end <= hi,
            "{what}: {start:#x}..{end:#x} outside {lo:#x}..{hi:#x}"
        );
        Ok(())
    }

    pub(crate) fn odd_dim() -> impl Strategy<Value = usize> {
        prop_oneof![
            0usize..=3,
            Just(64usize),
            Just(128),
            Just(256),
            1usize..5000,
            Just(1 << 31),
            Just(usize::MAX / 3),
            Just(usize::MAX),
        ]
    }

    /// An edit of one operand (0 q, 1 k, 2 v, 3 out, 4 lse): a dimension, a stride, fewer
    /// elements available, a misaligned or aliased pointer, another device.
    fn edit() -> impl Strategy<Value = (usize, usize, usize, u64)> {
        (0usize..5, 0usize..5, odd_dim(), any::<u64>())
    }

    pub(crate) fn apply<const N: usize>(
        t: &mut TensorDesc<N>,
        (_, kind, n, x): (usize, usize, usize, u64),
    ) {
        let i = (x % N as u64) as usize;
        match kind {
            0 => t.shape[i] = n,
            1 => t.strides[i] = n,
            2 => t.available = t.available.saturating_sub(n % 1000 + 1),
            3 => {
                t.ptr = if x % 2 == 0 {
                    t.ptr + 2 * (x % 8)
                } else {
                    REGION * (x % 6)
                }
            }
            _ => t.device = 1,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        /// The splits cover every tile of both kinds, within the merge's split limit, and the
        /// block count is what the kernel's grid decode assumes.
        #[test]
        fn splits_cover_every_tile(
            columns in 1usize..64,
            retrieval in 0usize..16,
            streaming in 0usize..16,
            full_tiles in prop_oneof![1usize..64, 1usize..(1 << 17)],
            stream_share in 0.0f64..=1.0,
            resident in prop_oneof![Just(132usize), Just(264), 1usize..600],
        ) {
            prop_assume!(retrieval + streaming >= 1);
            let stream_tiles = ((full_tiles as f64 * stream_share) as usize).max(1);
            let k = KindSplits::plan(columns, (retrieval, streaming), (full_tiles, stream_tiles), resident);
            prop_assert!((1..=DECODE_MAX_SPLITS).contains(&k.splits), "{k:?}");
            prop_assert!((1..=DECODE_MAX_SPLITS).contains(&k.stream_splits), "{k:?}");
            let longest = if retrieval > 0 { full_tiles } else { stream_tiles };
            prop_assert!(k.splits * k.tiles_per_split >= longest, "{k:?}");
            prop_assert!(k.stream_splits * k.tiles_per_split >= stream_tiles, "{k:?}");
            let splits = if retrieval > 0 { k.splits } else { 0 };
            prop_assert_eq!(k.blocks, columns * (retrieval * splits + streaming * k.stream_splits));
        }

        /// Where a launch runs in clusters, each cluster is one row group's splits in split
        /// order (the kernel's cluster merge) or blocks of one split each (which merge alone):
        /// never blocks of two row groups that both merge, and blocks past the launch's own
        /// only in clusters that do not merge.
        #[test]
        fn clusters_hold_whole_row_groups(
            batch in 1usize..9,
            chunks in 1usize..3,
            streaming in prop::collection::vec(any::<bool>(), 1..12),
            full_tiles in prop_oneof![1usize..64, 1usize..4096],
            stream_share in 0.0f64..=1.0,
            resident in prop_oneof![Just(132usize), Just(264), 1usize..600],
        ) {
            let stream = streaming.iter().filter(|&&s| s).count();
            let retrieval = streaming.len() - stream;
            let stream_tiles = ((full_tiles as f64 * stream_share) as usize).max(1);
            let k = KindSplits::plan(batch * chunks, (retrieval, stream), (full_tiles, stream_tiles), resident);
            let c = decode_cluster(&k, stream);
            if c == 1 {
                return Ok(());
            }
            let mut mask = [0u32; duo_attn_kernels::abi::HEAD_MASK_WORDS];
            for (h, _) in streaming.iter().enumerate().filter(|(_, s)| **s) {
                mask[h / 32] |= 1 << (h % 32);
            }
            let p = DecodeParams {
                streaming_heads: mask,
                heads_kv: streaming.len() as i32,
                batch: batch as i32,
                splits: k.splits as i32,
                stream_splits: k.stream_splits as i32,
                split_divs: [FastDiv::new(k.splits as u32), FastDiv::new(k.stream_splits as u32)],
                row_chunks_div: FastDiv::new(chunks as u32),
                kind_heads_divs: [FastDiv::new(retrieval as u32), FastDiv::new(stream as u32)],
                ..Default::default()
            };
            let of = |x: usize| DecodeBlock::of(&p, x as i32, chunks as i32);
            for first in (0..k.blocks).step_by(c) {
                let lead = of(first);
                if lead.splits == 1 {
                    for x in first..(first + c).min(k.blocks) {
                        prop_assert_eq!(of(x).splits, 1, "block {} of {:?}", x, k);
                    }
                    continue;
                }
                prop_assert_eq!(lead.splits as usize, c, "{:?}", k);
                prop_assert!(first + c <= k.blocks, "a merging cluster is cut short: {:?}", k);
                for (rank, x) in (first..first + c).enumerate() {
                    let b = of(x);
                    prop_assert_eq!(
                        (b.batch, b.kv_head, b.chunk, b.split as usize),
                        (lead.batch, lead.kv_head, lead.chunk, rank),
                        "block {} of {:?}", x, k
                    );
                }
            }
        }

        /// Plain and paged decode: an error or a plan whose parameters stay inside q, k, v, out
        /// and lse, never a panic.
        #[test]
        fn decode_plans_stay_inside_their_operands(
            b in 1usize..5,
            n_q in prop_oneof![4 => 1usize..4, 1 => 1usize..20],
            sk in 1usize..3000,
            heads_kv in 1usize..5,
            group in prop_oneof![Just(1usize), Just(4), Just(8)],
            d in prop_oneof![4 => Just(128usize), 2 => Just(64), 1 => Just(256), 1 => Just(80)],
            streaming in prop::collection::vec(any::<bool>(), 4),
            sink in prop_oneof![0u32..300, Just(u32::MAX)],
            window in prop_oneof![0u32..3000, Just(u32::MAX)],
            paged in prop::option::of((1usize..40, 4u32..9, 1usize..64)),
            edits in prop_oneof![Just(vec![]), prop::collection::vec(edit(), 1..3)],
            resident in prop_oneof![Just(132usize), 1usize..600],
        ) {
            let hq = heads_kv * group;
            let at = |i: u64| 0x1000_0000 + i * REGION;
            let mut q = TensorDesc::contiguous(at(0), [b, n_q, hq, d], 2, 0);
            let kv_shape = match paged {
                Some((pages, log, _)) => [pages, 1 << log, heads_kv, d],
                None => [b, sk, heads_kv, d],
            };
            let mut k = TensorDesc::contiguous(at(1), kv_shape, 2, 0);
            let mut v = TensorDesc::contiguous(at(2), kv_shape, 2, 0);
            let mut out = TensorDesc::contiguous(at(3), [b, n_q, hq, d], 2, 0);
            let mut lse = TensorDesc::contiguous(at(4), [b, hq, n_q], 4, 0);
            for e in edits {
                match e.0 {
                    0 => apply(&mut q, e),
                    1 => apply(&mut k, e),
                    2 => apply(&mut v, e),
                    3 => apply(&mut out, e),
                    _ => apply(&mut lse, e),
                }
            }
            let kinds = streaming[..heads_kv]
                .iter()
                .map(|&s| if s { HeadKind::Streaming } else { HeadKind::Retrieval })
                .collect();
            let cfg = AttentionConfig::new(kinds).sink(sink).window(window);
            let kv = match paged {
                Some((_, log, cols)) => DecodeKv::Paged { k: &k, v: &v, capacity: cols << log },
                None => DecodeKv::Plain { k: &k, v: &v },
            };
            let Ok(plan) = plan_decode::<bf16>(&q, kv, &out, &lse, &cfg, 0, resident) else {
                return Ok(());
            };
            let p = &plan.params;
            let row = |n: i32, s: [i64; 3], heads: i32| {
                [(p.batch as i64, s[0]), (n as i64, s[1]), (heads as i64, s[2])]
            };
            let d = d as i64;
            inside("q", &q, p.q, &row(p.n_q, p.q_strides, p.heads_q), d)?;
            inside("out", &out, p.o, &row(p.n_q, p.o_strides, p.heads_q), d)?;
            inside("lse", &lse, p.lse, &[(p.batch as i64 * p.heads_q as i64 * p.n_q as i64, 1)], 1)?;
            // Paged: rows come from any page of the pool; else the first `seqlen` of each entry.
            let (entries, rows) = match paged {
                Some(_) => (k.shape[0] as i32, k.shape[1] as i32),
                None => (p.batch, p.seqlen),
            };
            let kv_rows = |s: [i64; 3]| [(entries as i64, s[0]), (rows as i64, s[1]), (p.heads_kv as i64, s[2])];
            inside("k", &k, p.full.k, &kv_rows(p.full.k_strides), d)?;
            inside("v", &v, p.full.v, &kv_rows(p.full.v_strides), d)?;
            // More new queries than keys is a valid decode (bottom-right aligned: the first
            // queries see no key), so `seqlen < n_q` is not asserted against.
            prop_assert!(plan.grid.0 >= 1 && plan.block <= 1024);
            prop_assert!(plan.params.seqlen >= 1);
        }
    }
}
