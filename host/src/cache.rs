//! The DuoAttention KV cache and the per-layer dispatcher.
//!
//! Per layer, retrieval KV heads keep a full cache `[B, H_retrieval, max_len, D]`; streaming KV
//! heads keep a ring of `sink + recent` slots `[B, H_streaming, sink + recent, D]` whose size does
//! not depend on the context length: sink slots are fixed, recent slots rotate (see
//! `duo_attn_kernels::ring`). `recent = window + 15`, so a 16-token decode block, appended before
//! it attends, still finds every key of its earliest query's window.
//!
//! [`DuoCache::forward`] is the dispatcher: given one layer's new Q/K/V, it runs chunked prefill
//! (the prefill kernel over the cached context plus the chunk) or decode (the split-KV decode
//! kernel over both caches), with each KV head attending per its kind, and appends the new K/V.
//!
//! Each batch entry is a sequence slot with its own length (continuous batching):
//! [`DuoCache::slots`] runs the same operations on a range of slots, and
//! [`CacheSlots::prefill_varlen`] prefills chunks of their own lengths into slots at their own
//! lengths in one launch (FlashAttention's varlen layout). The lengths live on the
//! device, where the append advances them and decode reads them, so a captured decode step
//! replays; the host keeps a record of them for its checks.
use crate::attention::{
    AttentionConfig, HeadKind, PrefillKernel, check_heads, check_kv, check_no_aliasing,
    check_queries, prefill_launch, prefill_params,
};
use crate::context::Context;
use crate::decode::{DecodeKv, MAX_DECODE_QUERIES, kv_source};
use crate::element::AttnElement;
use crate::error::{Error, Result};
use crate::kvcache::{Paging, use_cache_build};
use crate::pattern::{Binarize, HeadPattern};
use crate::rotary::{RotaryPositions, RotaryTable, use_decode_rotary};
use crate::tensor::{DeviceTensor, TensorDesc, View, ViewMut};
use duo_attn_kernels::abi::{
    self, CacheParams, DECODE_HEAD_DIMS, KvSource, MAX_KV_HEADS, MAX_SEQLEN, ws_block_n,
};
use duo_attn_kernels::ring;
use std::ops::Range;

mod pages;
mod ragged;

pub use pages::CachePaging;
use pages::PageTable;

/// Threads per block of the cache kernels (`duo_attn_kernels::cache::CACHE_THREADS`).
pub(crate) const CACHE_THREADS: usize = 256;

/// Sizes of a [`DuoCache`].
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    /// Sequence slots.
    pub batch: usize,
    /// Most tokens per sequence (retrieval caches are allocated for this many).
    pub max_len: usize,
    /// Query heads (a multiple of `heads_kv`).
    pub heads_q: usize,
    /// KV heads: one head kind each, per layer.
    pub heads_kv: usize,
    /// Head dim: 64, 128 or 256.
    pub head_dim: usize,
    /// Streaming heads: attention-sink tokens.
    pub sink: u32,
    /// Streaming heads: recent tokens each query sees, itself included.
    pub window: u32,
    /// `None`: `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Kernel of the prefill chunks.
    pub prefill_kernel: PrefillKernel,
    /// `None`: each slot's retrieval caches hold `max_len` rows. `Some`: they draw pages from a
    /// pool as the slot grows (head dims 64 and 128, the TMA prefill kernel); see
    /// [`CachePaging`].
    pub paging: Option<CachePaging>,
}

/// Bytes held by a cache, and what a full cache for every head would hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheMemory {
    /// Retrieval heads' full caches (K and V, all layers): `batch x max_len` rows per head, or
    /// the pools of a paged cache.
    pub full_bytes: usize,
    /// Streaming heads' rings (K and V, all layers).
    pub ring_bytes: usize,
    /// A full `[B, max_len, Hkv, D]` K and V for every layer: what DuoAttention saves against.
    pub all_full_bytes: usize,
}

impl CacheMemory {
    /// Bytes the cache holds: its full caches and rings.
    pub fn total_bytes(&self) -> usize {
        self.full_bytes.saturating_add(self.ring_bytes)
    }
    /// Fraction of `all_full_bytes` saved.
    pub fn saving(&self) -> f64 {
        1.0 - self.total_bytes() as f64 / self.all_full_bytes.max(1) as f64
    }
}

/// Memory of a cache with these sizes and head kinds, elements of `elem_bytes` (pure).
pub fn cache_memory<K: AsRef<[HeadKind]>>(
    cfg: &CacheConfig,
    kinds: &[K],
    elem_bytes: usize,
) -> CacheMemory {
    // Saturating: sizes no device holds (which `DuoCache::check` lets through only up to its
    // limits) report usize::MAX rather than panic or wrap.
    let mul = |xs: &[usize]| xs.iter().fold(1usize, |a, &x| a.saturating_mul(x));
    let (sink, recent) = ring_slots(cfg.sink, cfg.window, cfg.max_len);
    let row = mul(&[cfg.batch, cfg.head_dim, elem_bytes, 2]); // K and V of one token of one head
    // Full-cache bytes per retrieval head and layer.
    let full_head = match cfg.paging {
        Some(p) => mul(&[p.pages, p.page_size, cfg.head_dim, elem_bytes, 2]),
        None => mul(&[row, cfg.max_len]),
    };
    let (mut full, mut rings) = (0usize, 0usize);
    for layer in kinds {
        let streaming = layer
            .as_ref()
            .iter()
            .filter(|&&k| k == HeadKind::Streaming)
            .count();
        full = full.saturating_add(mul(&[full_head, layer.as_ref().len() - streaming]));
        rings = rings.saturating_add(mul(&[row, sink.saturating_add(recent), streaming]));
    }
    CacheMemory {
        full_bytes: full,
        ring_bytes: rings,
        all_full_bytes: mul(&[row, cfg.max_len, cfg.heads_kv, kinds.len()]),
    }
}

/// Sizes of the ring: (sink slots, recent slots), given the cache capacity.
pub fn ring_slots(sink: u32, window: u32, max_len: usize) -> (usize, usize) {
    let sink = (sink as usize).min(max_len);
    let recent = (window as usize + MAX_DECODE_QUERIES - 1).min(max_len);
    (sink, recent)
}

/// One layer: its head kinds, caches and each sequence slot's cached length.
struct LayerCache<T: AttnElement> {
    cfg: AttentionConfig,
    streaming: usize,
    full: Option<(DeviceTensor<T, 4>, DeviceTensor<T, 4>)>,
    ring: Option<(DeviceTensor<T, 4>, DeviceTensor<T, 4>)>,
    /// Tokens cached per slot: the host's record of what the device holds.
    lens: Vec<usize>,
}

/// A DuoAttention KV cache over all layers of a model, on one device.
///
/// Its batch entries are sequence slots, each at its own length: a serving loop prefills a new
/// request into a free slot ([`DuoCache::slots`]) while the others decode, and decodes all
/// slots in one batch ([`DuoCache::decode`]), each query attending over its own sequence.
pub struct DuoCache<T: AttnElement> {
    cfg: CacheConfig,
    sink: usize,
    recent: usize,
    layers: Vec<LayerCache<T>>,
    device: u32,
    /// `[layers, 2, B]` i32: each slot's cached length, then the append's block counts (zero
    /// between launches). The append reads and advances these lengths on the device, and decode
    /// reads them there, so a captured decode step replays at growing lengths.
    lengths: DeviceTensor<i32, 3>,
    /// A paged cache's pages and block table.
    pages: Option<PageTable>,
    /// Streaming heads' prefill context (K, V), grown on demand.
    scratch: Option<(DeviceTensor<T, 2>, DeviceTensor<T, 2>)>,
    /// A ragged prefill's per-slot arrays (`ragged::SlotPlan::words`), grown on demand, and the
    /// words last copied there: the layers of one model step find them unchanged and skip the
    /// copy (from pageable memory, which waits for the stream's queued work).
    ragged: Option<DeviceTensor<i32, 1>>,
    ragged_words: Vec<i32>,
}

/// A prefill's (full, streaming) K/V sources: a kind without heads is never read, so its source
/// takes the other kind's.
fn both_sources<X: Copy>(full: Option<X>, stream: Option<X>) -> Result<(X, X)> {
    match (full, stream) {
        (Some(f), Some(s)) => Ok((f, s)),
        (Some(f), None) => Ok((f, f)),
        (None, Some(s)) => Ok((s, s)),
        (None, None) => Err(Error::InvalidCacheConfig("a layer without heads".into())),
    }
}

/// A cache tensor, stored head-major `[B, H, slots, D]` (each head's rows contiguous, so decode
/// streams long runs of memory), seen as the `[B, len, H, D]` the kernels index, for the
/// sequence slots `seqs`.
fn cache_desc<T: AttnElement>(
    t: &DeviceTensor<T, 4>,
    len: usize,
    seqs: &Range<usize>,
) -> TensorDesc<4> {
    let stored = *t.view().desc();
    let [_, h, slots, d] = stored.shape;
    let skip = seqs.start * h * slots * d;
    TensorDesc {
        ptr: stored.ptr + (skip * stored.elem_bytes) as u64,
        shape: [seqs.len(), len, h, d],
        strides: [h * slots * d, d, slots * d, 1],
        available: stored.available - skip,
        ..stored
    }
}

impl<T: AttnElement> DuoCache<T> {
    /// Checks the sizes and the head kinds (`kinds[layer][kv_head]`) without allocating.
    pub fn check(cfg: &CacheConfig, kinds: &[Vec<HeadKind>]) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidCacheConfig(msg));
        if cfg.batch == 0 || cfg.max_len == 0 || cfg.heads_q == 0 || cfg.heads_kv == 0 {
            return bad(format!(
                "batch ({}), max_len ({}), heads_q ({}) and heads_kv ({}) must all be > 0",
                cfg.batch, cfg.max_len, cfg.heads_q, cfg.heads_kv
            ));
        }
        if !DECODE_HEAD_DIMS.contains(&cfg.head_dim) {
            return Err(Error::UnsupportedHeadDim {
                head_dim: cfg.head_dim,
                by: "the decode kernel",
                supported: "64, 128 or 256",
            });
        }
        let tma = matches!(
            cfg.prefill_kernel,
            PrefillKernel::Auto | PrefillKernel::WgmmaTma
        );
        if cfg.head_dim > 128 && !tma {
            return Err(Error::UnsupportedHeadDim {
                head_dim: cfg.head_dim,
                by: "the mma.sync, plain wgmma and cp.async prefill kernels (the cache's prefill_kernel)",
                supported: "64 or 128 (256 runs on the TMA kernel: `Auto` or `WgmmaTma`)",
            });
        }
        if !cfg.heads_q.is_multiple_of(cfg.heads_kv) {
            return Err(Error::HeadGroupMismatch {
                heads_q: cfg.heads_q,
                heads_kv: cfg.heads_kv,
            });
        }
        if cfg.heads_kv > MAX_KV_HEADS || cfg.max_len > MAX_SEQLEN || cfg.batch > 65535 {
            return bad(format!(
                "at most {MAX_KV_HEADS} KV heads, {MAX_SEQLEN} tokens and 65535 sequences"
            ));
        }
        if cfg.window == 0 {
            return bad("window must be >= 1 (a query sees at least itself)".into());
        }
        if let Some(scale) = cfg.softmax_scale.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::InvalidScale(scale));
        }
        if kinds.is_empty() {
            return bad("no layers".into());
        }
        if let Some(paging) = cfg.paging {
            Self::check_paging(cfg, paging)?;
        }
        for (layer, row) in kinds.iter().enumerate() {
            if row.len() != cfg.heads_kv {
                return bad(format!(
                    "layer {layer} lists {} head kinds for {} KV heads",
                    row.len(),
                    cfg.heads_kv
                ));
            }
        }
        Ok(())
    }

    /// A paged cache's rules: the prefill reads pages through TMA in whole 128-key blocks.
    fn check_paging(cfg: &CacheConfig, p: CachePaging) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidCacheConfig(msg));
        if cfg.head_dim > 128 {
            return bad(format!(
                "a paged cache takes head dim 64 or 128, not {}: the prefill kernel loads KV \
                 blocks of 48 keys at 256, which no power-of-two page holds whole",
                cfg.head_dim
            ));
        }
        let block = ws_block_n(cfg.head_dim);
        if !p.page_size.is_power_of_two() || !p.page_size.is_multiple_of(block) {
            return bad(format!(
                "the page size ({}) must be a power of two and a multiple of the prefill's KV \
                 block ({block} keys)",
                p.page_size
            ));
        }
        if p.pages == 0 || p.pages > MAX_SEQLEN {
            return bad(format!(
                "a paged cache's pool holds 1 to {MAX_SEQLEN} pages, not {}",
                p.pages
            ));
        }
        if !matches!(
            cfg.prefill_kernel,
            PrefillKernel::Auto | PrefillKernel::WgmmaTma
        ) {
            return bad(format!(
                "a paged cache's prefill reads pages with TMA: `PrefillKernel::Auto` or \
                 `WgmmaTma`, not {:?}",
                cfg.prefill_kernel
            ));
        }
        Ok(())
    }

    /// Allocates the caches for layers of the given head kinds, every slot empty. Waits for the
    /// context's stream (the lengths are zeroed there), so any context of the device may use it.
    pub fn new(ctx: &Context, cfg: CacheConfig, kinds: Vec<Vec<HeadKind>>) -> Result<Self> {
        Self::check(&cfg, &kinds)?;
        let (sink, recent) = ring_slots(cfg.sink, cfg.window, cfg.max_len);
        let mut layers = Vec::with_capacity(kinds.len());
        for row in kinds {
            let streaming = row.iter().filter(|&&k| k == HeadKind::Streaming).count();
            let retrieval = row.len() - streaming;
            let alloc = |len: usize, heads: usize| -> Result<_> {
                if heads == 0 {
                    return Ok(None);
                }
                let shape = [cfg.batch, heads, len, cfg.head_dim]; // head-major, see cache_desc
                Ok(Some((ctx.alloc::<T, 4>(shape)?, ctx.alloc::<T, 4>(shape)?)))
            };
            // A paged cache's pool: `[pages, heads, page_size, D]`, each page head-major too.
            let alloc_full = |heads: usize| -> Result<_> {
                match (cfg.paging, heads) {
                    (_, 0) => Ok(None),
                    (None, _) => alloc(cfg.max_len, heads),
                    (Some(p), _) => {
                        let shape = [p.pages, heads, p.page_size, cfg.head_dim];
                        Ok(Some((ctx.alloc::<T, 4>(shape)?, ctx.alloc::<T, 4>(shape)?)))
                    }
                }
            };
            let attention = AttentionConfig::new(row)
                .sink(sink as u32)
                .window(cfg.window)
                .causal(true)
                .kernel(cfg.prefill_kernel);
            let attention = match cfg.softmax_scale {
                Some(s) => attention.softmax_scale(s),
                None => attention,
            };
            layers.push(LayerCache {
                cfg: attention,
                streaming,
                full: alloc_full(retrieval)?,
                ring: alloc(sink + recent, streaming)?,
                lens: vec![0; cfg.batch],
            });
        }
        let lengths = ctx.alloc::<i32, 3>([layers.len(), 2, cfg.batch])?;
        let words = lengths.len();
        ctx.fill_words(lengths.view().desc().ptr, 4 * words, words, 1, 0)?;
        let pages = cfg
            .paging
            .map(|p| PageTable::new(ctx, p, cfg.batch, cfg.max_len))
            .transpose()?;
        ctx.synchronize()?;
        Ok(DuoCache {
            cfg,
            sink,
            recent,
            layers,
            device: ctx.ordinal(),
            lengths,
            pages,
            scratch: None,
            ragged: None,
            ragged_words: Vec::new(),
        })
    }

    /// A cache for a model of `layers` layers whose head kinds come from a DuoAttention pattern,
    /// binarised by `how`.
    pub fn from_pattern(
        ctx: &Context,
        cfg: CacheConfig,
        layers: usize,
        pattern: &HeadPattern,
        how: Binarize,
    ) -> Result<Self> {
        pattern.check_model(layers, cfg.heads_kv)?;
        Self::new(ctx, cfg, pattern.head_kinds(how)?)
    }

    /// The sizes it was made with.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Layers it holds.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Ring sizes: (sink slots, recent slots).
    pub fn ring_shape(&self) -> (usize, usize) {
        (self.sink, self.recent)
    }

    /// Head kinds of a layer.
    pub fn head_kinds(&self, layer: usize) -> Result<&[HeadKind]> {
        Ok(&self.layer(layer)?.cfg.head_kinds)
    }

    /// The attention settings a layer runs with (for references and checks).
    pub fn attention_config(&self, layer: usize) -> Result<&AttentionConfig> {
        Ok(&self.layer(layer)?.cfg)
    }

    /// Tokens cached in `layer`, when every slot holds as many (else `UnevenCacheLengths`).
    pub fn len(&self, layer: usize) -> Result<usize> {
        let lens = self.lens(layer)?;
        match lens.iter().all(|&l| l == lens[0]) {
            true => Ok(lens[0]),
            false => Err(Error::UnevenCacheLengths {
                layer,
                first: 0,
                lens: lens.to_vec(),
            }),
        }
    }

    /// Tokens cached in `layer`, per sequence slot.
    pub fn lens(&self, layer: usize) -> Result<&[usize]> {
        Ok(&self.layer(layer)?.lens)
    }

    /// Where `layer`'s next tokens sit, per slot: its cached lengths as the device holds them,
    /// for [`Context::apply_rotary`] on a step's Q and K before the step's append, decode or
    /// forward (stream order: the rotation reads the lengths before the step advances them, so
    /// a captured step replays at the lengths the device holds).
    pub fn rotary_positions(&self, layer: usize) -> Result<RotaryPositions<'_>> {
        self.positions_of(layer, 0..self.cfg.batch)
    }

    /// The device lengths of `layer` for slots `seqs`, as rotary positions.
    fn positions_of(&self, layer: usize, seqs: Range<usize>) -> Result<RotaryPositions<'_>> {
        self.layer(layer)?;
        let (ptr, _) = self.device_lengths(layer, seqs.start);
        let n = seqs.len();
        let desc = TensorDesc {
            ptr,
            shape: [n],
            strides: [1],
            available: n,
            elem_bytes: 4,
            device: self.lengths.device(),
        };
        Ok(RotaryPositions::PerSequence(View::from_desc(desc)))
    }

    /// Forgets every cached token of every slot (the memory stays allocated), on the context's
    /// stream.
    pub fn reset(&mut self, ctx: &Context) -> Result<()> {
        self.slots(0..self.cfg.batch)?.reset(ctx)
    }

    /// [`CacheSlots::reserve`] for every slot: room, and a paged cache's pages, for `tokens`
    /// more tokens in each (before capturing decode steps that a graph will replay).
    pub fn reserve(&mut self, ctx: &Context, tokens: usize) -> Result<()> {
        self.slots(0..self.cfg.batch)?.reserve(ctx, tokens)
    }

    /// Reads the lengths the device holds back into the host's record (waits for the context's
    /// stream). Needed after replaying captured cache steps: the device advanced the lengths, the
    /// host's record did not (its checks of the room left run on that record).
    pub fn read_back_lengths(&mut self, ctx: &Context) -> Result<()> {
        self.check_device(ctx)?;
        ctx.synchronize()?;
        let all = self.lengths.to_host()?;
        let b = self.cfg.batch;
        for (layer, l) in self.layers.iter_mut().enumerate() {
            for (len, &dev) in l.lens.iter_mut().zip(&all[layer * 2 * b..][..b]) {
                *len = dev.max(0) as usize;
            }
        }
        Ok(())
    }

    /// The sequence slots `seqs` (a range of the batch): prefill, decode, append or reset them
    /// alone, with q/k/v/out/lse of batch `seqs.len()`.
    pub fn slots(&mut self, seqs: Range<usize>) -> Result<CacheSlots<'_, T>> {
        if seqs.is_empty() || seqs.end > self.cfg.batch {
            return Err(Error::SlotOutOfRange {
                start: seqs.start,
                end: seqs.end,
                slots: self.cfg.batch,
            });
        }
        Ok(CacheSlots { cache: self, seqs })
    }

    /// Bytes held, and the bytes a full cache for every head would hold.
    pub fn memory(&self) -> CacheMemory {
        let kinds: Vec<&[HeadKind]> = self.layers.iter().map(|l| &l.cfg.head_kinds[..]).collect();
        cache_memory(&self.cfg, &kinds, std::mem::size_of::<T>())
    }

    /// Copies a layer's caches to the host (for tests and inspection): full K, full V
    /// `[B, H_retrieval, max_len, D]` (a paged cache's pages put in place, zeros where a slot
    /// has no page), ring K, ring V `[B, H_streaming, sink + recent, D]`; `None` where the layer
    /// has no head of that kind. Synchronous.
    #[allow(clippy::type_complexity)]
    pub fn download(
        &self,
        layer: usize,
    ) -> Result<(Option<(Vec<T>, Vec<T>)>, Option<(Vec<T>, Vec<T>)>)> {
        let l = self.layer(layer)?;
        let get = |t: &Option<(DeviceTensor<T, 4>, DeviceTensor<T, 4>)>| -> Result<_> {
            t.as_ref()
                .map(|(k, v)| Ok((k.to_host()?, v.to_host()?)))
                .transpose()
        };
        let full = get(&l.full)?;
        let full = match (&self.pages, full) {
            (Some(pages), Some((k, v))) => {
                let heads = l.cfg.head_kinds.len() - l.streaming;
                let unpage = |pool: &[T]| self.unpage(pages, heads, pool);
                Some((unpage(&k), unpage(&v)))
            }
            (_, full) => full,
        };
        Ok((full, get(&l.ring)?))
    }

    /// A pool `[pages, heads, page_size, D]` as the slots' `[B, heads, max_len, D]`.
    fn unpage(&self, pages: &PageTable, heads: usize, pool: &[T]) -> Vec<T> {
        let (max_len, d, ps) = (self.cfg.max_len, self.cfg.head_dim, pages.paging.page_size);
        let mut out = vec![T::from_f32(0.0); self.cfg.batch * heads * max_len * d];
        for slot in 0..self.cfg.batch {
            for (j, &page) in pages.pages(slot).iter().enumerate() {
                let rows = ps.min(max_len - j * ps);
                for h in 0..heads {
                    let from = ((page as usize * heads + h) * ps) * d;
                    let to = ((slot * heads + h) * max_len + j * ps) * d;
                    out[to..to + rows * d].copy_from_slice(&pool[from..from + rows * d]);
                }
            }
        }
        out
    }

    /// A paged cache's free pages (shared by every slot and layer); `None` when not paged.
    pub fn free_pages(&self) -> Option<usize> {
        self.pages.as_ref().map(|p| p.free_pages())
    }

    /// The pages slot `slot` holds, in key order (a paged cache; empty otherwise).
    pub fn slot_pages(&self, slot: usize) -> Result<&[i32]> {
        if slot >= self.cfg.batch {
            return Err(Error::SlotOutOfRange {
                start: slot,
                end: slot + 1,
                slots: self.cfg.batch,
            });
        }
        Ok(self.pages.as_ref().map_or(&[], |p| p.pages(slot)))
    }

    /// Appends new K/V rows `[B, n, Hkv, D]` to `layer` on the GPU, each sequence at its own
    /// length: retrieval heads into their full cache, streaming heads into their ring.
    pub fn append(
        &mut self,
        ctx: &Context,
        layer: usize,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
    ) -> Result<()> {
        self.slots(0..self.cfg.batch)?.append(ctx, layer, k, v)
    }

    /// The dispatcher: one layer's attention for `n` new tokens per sequence. q `[B, n, Hq, D]`,
    /// new k/v `[B, n, Hkv, D]`, out like q, lse `[B, Hq, n]`. Decodes when `n <= 16` and some
    /// sequence already holds context, else runs a prefill chunk; either way the new K/V are
    /// appended and every query sees exactly the keys its head kind allows over its own
    /// sequence so far.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
    ) -> Result<()> {
        self.slots(0..self.cfg.batch)?
            .forward(ctx, layer, q, k, v, out, lse)
    }

    /// A chunk of prefill over every sequence (all at one length): appends the chunk, then runs
    /// the prefill kernel with retrieval heads over the full cache and streaming heads over their
    /// sink + recent context plus the chunk.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
    ) -> Result<()> {
        self.slots(0..self.cfg.batch)?
            .prefill(ctx, layer, q, k, v, out, lse)
    }

    /// Decode of 1..=16 new tokens per sequence, each at its own length: appends them, then
    /// attends over both caches (retrieval heads: every cached position; streaming heads: their
    /// ring). The kernels read the lengths on the device and advance them there, so a captured
    /// step replays at the lengths the device holds (see [`DuoCache::read_back_lengths`]).
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
    ) -> Result<()> {
        self.slots(0..self.cfg.batch)?
            .decode(ctx, layer, q, k, v, out, lse)
    }

    /// [`DuoCache::decode`] with RoPE fused in: the new keys go into the caches turned by
    /// `rotary`, key `i` of sequence `b` at its position `len(b) + i`, and query token `i` turns
    /// at the same position, as [`Context::apply_rotary`] at [`DuoCache::rotary_positions`]
    /// before [`DuoCache::decode`] would turn them, without a launch of its own and leaving
    /// `q` and `k` as they are. Rows at positions outside the table are not turned. (Queries
    /// whose rotary dim is not the head dim, pairs half of it apart, turn in a launch before the
    /// step, into the workspace.)
    #[allow(clippy::too_many_arguments)]
    pub fn decode_rotary(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        rotary: &RotaryTable,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
    ) -> Result<()> {
        self.slots(0..self.cfg.batch)?
            .decode_rotary(ctx, layer, q, k, v, rotary, out, lse)
    }

    fn layer(&self, layer: usize) -> Result<&LayerCache<T>> {
        self.layers.get(layer).ok_or(Error::LayerOutOfRange {
            layer,
            layers: self.layers.len(),
        })
    }

    fn check_device(&self, ctx: &Context) -> Result<()> {
        if ctx.ordinal() != self.device {
            return Err(Error::WrongDevice {
                tensor: "cache",
                tensor_device: self.device,
                context_device: ctx.ordinal(),
            });
        }
        Ok(())
    }

    /// The block table of `seqs` for a prefill of `layer`, when its retrieval heads read pages.
    fn paging_for(&self, layer: usize, seqs: &Range<usize>) -> Option<Paging> {
        self.layers[layer].full.as_ref()?;
        let t = self.pages.as_ref()?.rows_from(seqs.start);
        Some(Paging {
            table: t.table,
            stride: t.stride as i32,
            shift: t.shift,
        })
    }

    /// Device addresses of `layer`'s lengths and append counts, from slot `first` on.
    fn device_lengths(&self, layer: usize, first: usize) -> (u64, u64) {
        let b = self.cfg.batch;
        let base = self.lengths.view().desc().ptr + (4 * (layer * 2 * b + first)) as u64;
        (base, base + 4 * b as u64)
    }

    /// A layer's full caches as the kernels index them: `[slots, len, H, D]` for `seqs`, or a
    /// paged cache's whole pool `[pages, page_size, H, D]` (whatever `len`); None without
    /// retrieval heads.
    fn full_descs(
        &self,
        layer: usize,
        len: usize,
        seqs: &Range<usize>,
    ) -> Option<(TensorDesc<4>, TensorDesc<4>)> {
        let (k, v) = self.layers[layer].full.as_ref()?;
        Some(match &self.pages {
            Some(pt) => {
                let (rows, pool) = (pt.paging.page_size, 0..pt.paging.pages);
                (cache_desc(k, rows, &pool), cache_desc(v, rows, &pool))
            }
            None => (cache_desc(k, len, seqs), cache_desc(v, len, seqs)),
        })
    }

    fn sources(&self, layer: usize, seqs: &Range<usize>) -> (KvSource, KvSource) {
        let l = &self.layers[layer];
        let full = self
            .full_descs(layer, self.cfg.max_len, seqs)
            .map_or(KvSource::default(), |(k, v)| kv_source(&k, &v));
        let ring = l.ring.as_ref().map_or(KvSource::default(), |(k, v)| {
            let len = k.shape()[2];
            kv_source(&cache_desc(k, len, seqs), &cache_desc(v, len, seqs))
        });
        (full, ring)
    }

    /// Cache kernel parameters for `seqs`, whose cached length (for the gather; the append
    /// reads the device's) is `start`.
    fn cache_params(
        &self,
        layer: usize,
        seqs: &Range<usize>,
        (new, n): (KvSource, usize),
        out: KvSource,
        start: usize,
    ) -> CacheParams {
        let (full, stream) = self.sources(layer, seqs);
        let (lens, arrivals) = self.device_lengths(layer, seqs.start);
        let pages = self.pages.as_ref().map(|p| p.rows_from(seqs.start));
        CacheParams {
            new,
            full,
            stream,
            out,
            lens,
            arrivals,
            cu_new: 0,
            starts: 0,
            streaming_heads: crate::attention::streaming_mask(&self.layers[layer].cfg.head_kinds),
            n_new: n as i32,
            heads_kv: self.cfg.heads_kv as i32,
            head_dim: self.cfg.head_dim as i32,
            start: start as i32,
            sink: self.sink as i32,
            recent: self.recent as i32,
            capacity: self.cfg.max_len as i32,
            out_rows: 0,
            pad_block: 1,
            block_table: pages.map_or(0, |p| p.table),
            block_table_stride: pages.map_or(0, |p| p.stride as i32),
            page_shift: pages.map_or(0, |p| p.shift),
            num_pages: pages.map_or(0, |p| p.pages),
            rotary: Default::default(),
        }
    }

    /// Streaming heads' prefill context of at least `elems` elements per K and V (every row a
    /// prefill reads is written by its gather first).
    fn ensure_scratch(&mut self, ctx: &Context, elems: usize) -> Result<()> {
        if self.scratch.as_ref().is_some_and(|(k, _)| k.len() >= elems) {
            return Ok(());
        }
        // Chunks queued with the old buffers finish before they are freed.
        ctx.synchronize()?;
        self.scratch = None;
        self.scratch = Some((ctx.alloc([elems, 1])?, ctx.alloc([elems, 1])?));
        Ok(())
    }

    fn launch_cache_kernel(
        &self,
        ctx: &Context,
        entry: &str,
        (rows, seqs): (usize, usize),
        params: &CacheParams,
    ) -> Result<()> {
        let items = rows * self.cfg.heads_kv * self.cfg.head_dim / 8;
        let grid = (items.div_ceil(CACHE_THREADS) as u32, seqs as u32, 1);
        ctx.launch(entry, grid, CACHE_THREADS as u32, 0, params)
    }
}

/// Sequence slots `seqs` of a [`DuoCache`] (from [`DuoCache::slots`]): the cache's operations on
/// these sequences alone, with q/k/v/out/lse of batch `seqs.len()`.
pub struct CacheSlots<'a, T: AttnElement> {
    cache: &'a mut DuoCache<T>,
    seqs: Range<usize>,
}

impl<T: AttnElement> CacheSlots<'_, T> {
    /// Tokens cached in `layer` by each of these slots.
    pub fn lens(&self, layer: usize) -> Result<&[usize]> {
        Ok(&self.cache.layer(layer)?.lens[self.seqs.clone()])
    }

    /// [`DuoCache::rotary_positions`] of these slots.
    pub fn rotary_positions(&self, layer: usize) -> Result<RotaryPositions<'_>> {
        self.cache.positions_of(layer, self.seqs.clone())
    }

    /// Forgets these slots' tokens in every layer (a finished request's slot, ready for the
    /// next), on the context's stream.
    pub fn reset(&mut self, ctx: &Context) -> Result<()> {
        let c = &mut *self.cache;
        c.check_device(ctx)?;
        let (lens, _) = c.device_lengths(0, self.seqs.start);
        let pitch = 4 * 2 * c.cfg.batch; // one layer's lengths and counts
        ctx.fill_words(lens, pitch, self.seqs.len(), c.layers.len(), 0)?;
        for l in &mut c.layers {
            l.lens[self.seqs.clone()].fill(0);
        }
        if let Some(pages) = &mut c.pages {
            pages.release(ctx, self.seqs.clone())?;
        }
        Ok(())
    }

    /// Makes room for `tokens` more tokens in each of these slots in every layer: checks that
    /// they fit (`CacheFull`) and, in a paged cache, gives the slots their pages now (else each
    /// append takes them as it needs them). A CUDA graph that captures decode steps replays
    /// appends the host does not see: reserve the tokens of every replay before capturing.
    pub fn reserve(&mut self, ctx: &Context, tokens: usize) -> Result<()> {
        let c = &mut *self.cache;
        c.check_device(ctx)?;
        let mut need = vec![0; self.seqs.len()];
        for l in &c.layers {
            for (i, (&len, need)) in l.lens[self.seqs.clone()].iter().zip(&mut need).enumerate() {
                if len + tokens > c.cfg.max_len {
                    return Err(Error::CacheFull {
                        capacity: c.cfg.max_len,
                        slot: self.seqs.start + i,
                        len,
                        adding: tokens,
                    });
                }
                *need = (*need).max(len + tokens);
            }
        }
        match &mut c.pages {
            Some(pages) => pages.ensure(ctx, self.seqs.start, &need),
            None => Ok(()),
        }
    }

    /// Appends new K/V rows `[b, n, Hkv, D]` (b = these slots) to `layer`, each at its own length.
    pub fn append(
        &mut self,
        ctx: &Context,
        layer: usize,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
    ) -> Result<()> {
        self.cache.check_device(ctx)?;
        let n = self.check_new(layer, k.desc(), v.desc())?;
        self.append_unchecked(ctx, layer, (k.desc(), v.desc(), n), Default::default())
    }

    /// [`DuoCache::forward`] for these slots: decode when `n <= 16` and one of them holds
    /// context, else a prefill chunk (which needs them at one length).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
    ) -> Result<()> {
        let n = q.shape()[1];
        if n <= MAX_DECODE_QUERIES && self.lens(layer)?.iter().any(|&l| l > 0) {
            self.decode(ctx, layer, q, k, v, out, lse)
        } else {
            self.prefill(ctx, layer, q, k, v, out, lse)
        }
    }

    /// [`DuoCache::prefill`] for these slots, which must hold one length.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
    ) -> Result<()> {
        let n = self.check_call(ctx, layer, q, k, v, out, lse, usize::MAX)?;
        let lens = self.lens(layer)?;
        if lens.iter().any(|&l| l != lens[0]) {
            return Err(Error::UnevenCacheLengths {
                layer,
                first: self.seqs.start,
                lens: lens.to_vec(),
            });
        }
        let start = lens[0];
        let seqs = self.seqs.clone();
        let c = &mut *self.cache;
        let (b, hs, d) = (seqs.len(), c.layers[layer].streaming, c.cfg.head_dim);

        // Streaming heads read [sink rows | recent rows | chunk], gathered into scratch memory
        // before the append rotates the ring.
        let (sink_rows, recent_rows, _) =
            ring::history(start as i32, c.sink as i32, c.recent as i32);
        let stream_len = (sink_rows + recent_rows) as usize + n;
        if hs > 0 {
            c.ensure_scratch(ctx, b * stream_len * hs * d)?;
        }
        let desc = |t: &DeviceTensor<T, 2>| {
            TensorDesc::contiguous(
                t.view().desc().ptr,
                [b, stream_len, hs, d],
                std::mem::size_of::<T>(),
                c.device,
            )
        };
        let stream_descs = match (hs, c.scratch.as_ref()) {
            (0, _) => None,
            (_, Some((k, v))) => Some((desc(k), desc(v))),
            (_, None) => {
                return Err(Error::InvalidCacheConfig(
                    "scratch allocation vanished".into(),
                ));
            }
        };
        let l = &c.layers[layer];
        let full_descs = c.full_descs(layer, start + n, &seqs);
        // A paged pool's tensor maps hold a page per batch index; the keys are counted apart.
        let map_rows = c.pages.as_ref().map_or(start + n, |p| p.paging.page_size);
        let full = full_descs.map(|(k, v)| (k, v, map_rows));
        let stream = stream_descs.map(|(k, v)| (k, v, stream_len));
        let ((fk, fv, flen), (sk, sv, slen)) = both_sources(full, stream)?;
        let mut args = prefill_params(
            q.desc(),
            out.desc(),
            lse.desc(),
            &l.cfg,
            (&fk, &fv, flen),
            Some((&sk, &sv, slen)),
        );
        let paging = c.paging_for(layer, &seqs);
        if paging.is_some() {
            args.params.seqlen_k = (start + n) as i32;
            if hs == 0 {
                args.params.seqlen_k_stream = (start + n) as i32;
            }
        }
        // Planned (and so checked) before anything is queued: an error leaves the cache as it was.
        let mut plan = prefill_launch::<T>(l.cfg.kernel, q.shape(), args)?;
        if paging.is_some() {
            use_cache_build::<T>(&mut plan, d, paging)?;
        }
        self.ensure_pages(ctx, layer, n)?;
        let c = &mut *self.cache;

        if let Some((sk, sv)) = stream_descs {
            let new = (kv_source(k.desc(), v.desc()), n);
            let params = c.cache_params(layer, &seqs, new, kv_source(&sk, &sv), start);
            c.launch_cache_kernel(ctx, "duo_cache_gather_stream", (stream_len, b), &params)?;
        }
        self.append_unchecked(ctx, layer, (k.desc(), v.desc(), n), Default::default())?;
        ctx.launch_prefill(&plan)
    }

    /// [`DuoCache::decode`] for these slots.
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
    ) -> Result<()> {
        self.decode_turned(ctx, layer, (q, k, v), None, out, lse)
    }

    /// [`DuoCache::decode_rotary`] for these slots.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_rotary(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        rotary: &RotaryTable,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
    ) -> Result<()> {
        self.decode_turned(ctx, layer, (q, k, v), Some(rotary), out, lse)
    }

    fn decode_turned(
        &mut self,
        ctx: &Context,
        layer: usize,
        (q, k, v): (&View<'_, T, 4>, &View<'_, T, 4>, &View<'_, T, 4>),
        rotary: Option<&RotaryTable>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
    ) -> Result<()> {
        let n = self.check_call(ctx, layer, q, k, v, out, lse, MAX_DECODE_QUERIES)?;
        let c = &*self.cache;
        let (full, stream) = c.sources(layer, &self.seqs);
        let l = &c.layers[layer];
        let longest = self.lens(layer)?.iter().copied().max().unwrap_or(0) + n;
        // Splits are planned for the longest sequence after the append; the kernel reads each
        // sequence's length on the device, clamped only by the capacity (lengths grow under
        // graph replay). Planned (and so checked) before anything is queued.
        let pages = c.pages.as_ref().map(|pt| pt.rows_from(self.seqs.start));
        let kv = DecodeKv::Cache {
            full,
            stream,
            seqlen: longest,
            recent: c.recent,
            pages,
        };
        // `check_call` made sure the context runs on the cache's device.
        let mut plan = ctx.decode_plan::<T>(q.desc(), kv, out.desc(), lse.desc(), &l.cfg)?;
        let (lens, arrivals) = c.device_lengths(layer, self.seqs.start);
        plan.params.seqlens = lens;
        plan.params.seqlen = c.cfg.max_len as i32;
        let fused = plan.fuses_append(rotary.is_some());
        if let Some(table) = rotary {
            use_decode_rotary::<T>(&mut plan, table, q.desc(), !fused, ctx.ordinal())?;
        }
        if !fused {
            // The keys turn by the decode's table (none without one).
            let key_turn = plan.params.rotary;
            self.append_unchecked(ctx, layer, (k.desc(), v.desc(), n), key_turn)?;
            return ctx.launch_decode(plan);
        }
        // The append runs inside the decode (`DecodeParams::append`): each block writes the new
        // rows it reads, and the sequence's last block advances its device length.
        self.ensure_pages(ctx, layer, n)?;
        plan.params.append = kv_source(k.desc(), v.desc());
        plan.params.arrivals = arrivals;
        plan.params.seq_blocks = (plan.grid.0 as usize / self.seqs.len()) as i32;
        ctx.launch_decode(plan)?;
        self.advance_lens(layer, n);
        Ok(())
    }

    /// Checks new K/V `[b, n, Hkv, D]` and the room left in every slot; returns n.
    fn check_new(&self, layer: usize, k: &TensorDesc<4>, v: &TensorDesc<4>) -> Result<usize> {
        let c = &self.cache.cfg;
        let lens = self.lens(layer)?;
        let n = check_kv(
            (k, "k"),
            (v, "v"),
            self.seqs.len(),
            c.heads_kv,
            c.head_dim,
            self.cache.device,
            "new k is [b, n, Hkv, D] with b the slots' count and the cache's Hkv and D",
        )?;
        for (i, &len) in lens.iter().enumerate() {
            if len + n > c.max_len {
                return Err(Error::CacheFull {
                    capacity: c.max_len,
                    slot: self.seqs.start + i,
                    len,
                    adding: n,
                });
            }
        }
        Ok(n)
    }

    /// Checks q/out/lse of an attention call against the cache sizes and the new tokens' `n`.
    fn check_queries(
        &self,
        layer: usize,
        q: &TensorDesc<4>,
        out: &TensorDesc<4>,
        lse: &TensorDesc<3>,
        n: usize,
    ) -> Result<()> {
        let l = self.cache.layer(layer)?;
        let c = &self.cache.cfg;
        let [b, sq, hq, d] = check_queries(q, out, lse, &l.cfg, self.cache.device)?;
        check_heads(hq, c.heads_kv, &l.cfg)?;
        let want = [self.seqs.len(), n, c.heads_q, c.head_dim];
        if [b, sq, hq, d] != want {
            return Err(Error::ShapeMismatch {
                tensor: "q",
                got: q.shape.to_vec(),
                expected: want.to_vec(),
                why: "q is [b, n, Hq, D] with b the slots' count, the cache's sizes and the new k's n",
            });
        }
        Ok(())
    }

    /// Every check of a prefill or decode call (at most `max_new` new tokens); returns n.
    #[allow(clippy::too_many_arguments)]
    fn check_call(
        &self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 4>,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
        out: &ViewMut<'_, T, 4>,
        lse: &ViewMut<'_, f32, 3>,
        max_new: usize,
    ) -> Result<usize> {
        self.cache.check_device(ctx)?;
        let n = self.check_new(layer, k.desc(), v.desc())?;
        if n > max_new {
            return Err(Error::DecodeQueryBlock {
                got: n,
                max: max_new,
            });
        }
        self.check_queries(layer, q.desc(), out.desc(), lse.desc(), n)?;
        check_no_aliasing(
            out.desc(),
            lse.desc(),
            &[(q.desc(), "q"), (k.desc(), "k"), (v.desc(), "v")],
        )?;
        Ok(n)
    }

    /// Gives these slots the pages of `n` more tokens in `layer` (a paged cache; else nothing).
    fn ensure_pages(&mut self, ctx: &Context, layer: usize, n: usize) -> Result<()> {
        let c = &mut *self.cache;
        if let Some(pages) = &mut c.pages {
            let need: Vec<usize> = c.layers[layer].lens[self.seqs.clone()]
                .iter()
                .map(|&len| len + n)
                .collect();
            pages.ensure(ctx, self.seqs.start, &need)?;
        }
        Ok(())
    }

    /// Queues the append (which reads and advances the device's lengths) and advances the host's;
    /// `rotary` turns the new keys (the default table: none).
    fn append_unchecked(
        &mut self,
        ctx: &Context,
        layer: usize,
        (k, v, n): (&TensorDesc<4>, &TensorDesc<4>, usize),
        rotary: abi::RotaryTable,
    ) -> Result<()> {
        self.ensure_pages(ctx, layer, n)?;
        let c = &mut *self.cache;
        let start = c.layers[layer].lens[self.seqs.start];
        let mut params = c.cache_params(
            layer,
            &self.seqs,
            (kv_source(k, v), n),
            KvSource::default(),
            start,
        );
        params.rotary = rotary;
        c.launch_cache_kernel(ctx, "duo_cache_append", (n, self.seqs.len()), &params)?;
        self.advance_lens(layer, n);
        Ok(())
    }

    /// The host's copy of these slots' lengths in `layer`, after an append of `n` rows.
    fn advance_lens(&mut self, layer: usize, n: usize) {
        for len in &mut self.cache.layers[layer].lens[self.seqs.clone()] {
            *len += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_covers_a_decode_block_window() {
        assert_eq!(ring_slots(64, 256, 1 << 20), (64, 271));
        assert_eq!(ring_slots(64, 256, 100), (64, 100));
    }
}
