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
use crate::attention::{
    AttentionConfig, HeadKind, PrefillKernel, check_heads, check_kv, check_no_aliasing,
    check_queries, prefill_launch, prefill_params,
};
use crate::context::Context;
use crate::decode::{DecodeKv, MAX_DECODE_QUERIES, kv_source};
use crate::element::AttnElement;
use crate::error::{Error, Result};
use crate::pattern::{Binarize, HeadPattern};
use crate::tensor::{DeviceTensor, TensorDesc, View, ViewMut};
use duo_attn_kernels::abi::{CacheParams, DECODE_HEAD_DIMS, KvSource, MAX_KV_HEADS, MAX_SEQLEN};
use duo_attn_kernels::ring;

/// Threads per block of the cache kernels (`duo_attn_kernels::cache::CACHE_THREADS`).
const CACHE_THREADS: usize = 256;

/// Sizes of a [`DuoCache`].
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    pub batch: usize,
    /// Most tokens per sequence (retrieval caches are allocated for this many).
    pub max_len: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    /// Streaming heads: attention-sink tokens.
    pub sink: u32,
    /// Streaming heads: recent tokens each query sees, itself included.
    pub window: u32,
    /// `None`: `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Kernel of the prefill chunks.
    pub prefill_kernel: PrefillKernel,
}

/// Bytes held by a cache, and what a full cache for every head would hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheMemory {
    /// Retrieval heads' full caches (K and V, all layers).
    pub full_bytes: usize,
    /// Streaming heads' rings (K and V, all layers).
    pub ring_bytes: usize,
    /// A full `[B, max_len, Hkv, D]` K and V for every layer: what DuoAttention saves against.
    pub all_full_bytes: usize,
}

impl CacheMemory {
    pub fn total_bytes(&self) -> usize {
        self.full_bytes + self.ring_bytes
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
    let (sink, recent) = ring_slots(cfg.sink, cfg.window, cfg.max_len);
    let row = cfg.batch * cfg.head_dim * elem_bytes * 2; // K and V of one token of one head
    let (mut full, mut rings) = (0, 0);
    for layer in kinds {
        let streaming = layer
            .as_ref()
            .iter()
            .filter(|&&k| k == HeadKind::Streaming)
            .count();
        full += row * cfg.max_len * (layer.as_ref().len() - streaming);
        rings += row * (sink + recent) * streaming;
    }
    CacheMemory {
        full_bytes: full,
        ring_bytes: rings,
        all_full_bytes: row * cfg.max_len * cfg.heads_kv * kinds.len(),
    }
}

/// One layer: its head kinds, caches and cached length.
struct LayerCache<T: AttnElement> {
    cfg: AttentionConfig,
    streaming: usize,
    full: Option<(DeviceTensor<T, 4>, DeviceTensor<T, 4>)>,
    ring: Option<(DeviceTensor<T, 4>, DeviceTensor<T, 4>)>,
    len: usize,
}

/// Sizes of the ring: (sink slots, recent slots), given the cache capacity.
pub fn ring_slots(sink: u32, window: u32, max_len: usize) -> (usize, usize) {
    let sink = (sink as usize).min(max_len);
    let recent = (window as usize + MAX_DECODE_QUERIES - 1).min(max_len);
    (sink, recent)
}

/// A DuoAttention KV cache over all layers of a model, on one device.
pub struct DuoCache<T: AttnElement> {
    cfg: CacheConfig,
    sink: usize,
    recent: usize,
    layers: Vec<LayerCache<T>>,
    device: u32,
    /// Streaming heads' prefill context (K, V), grown on demand.
    scratch: Option<(DeviceTensor<T, 2>, DeviceTensor<T, 2>)>,
}

/// A cache tensor, stored head-major `[B, H, slots, D]` (each head's rows contiguous, so decode
/// streams long runs of memory), seen as the `[B, len, H, D]` the kernels index.
fn cache_desc<T: AttnElement>(t: &DeviceTensor<T, 4>, len: usize) -> TensorDesc<4> {
    let stored = *t.view().desc();
    let [b, h, slots, d] = stored.shape;
    TensorDesc {
        shape: [b, len, h, d],
        strides: [h * slots * d, d, slots * d, 1],
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
        if kinds.is_empty() {
            return bad("no layers".into());
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

    /// Allocates the caches for layers of the given head kinds.
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
                full: alloc(cfg.max_len, retrieval)?,
                ring: alloc(sink + recent, streaming)?,
                len: 0,
            });
        }
        Ok(DuoCache {
            cfg,
            sink,
            recent,
            layers,
            device: ctx.ordinal(),
            scratch: None,
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

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

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

    /// Tokens cached in `layer`.
    pub fn len(&self, layer: usize) -> Result<usize> {
        Ok(self.layer(layer)?.len)
    }

    /// Forgets every cached token (the memory stays allocated).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| l.len = 0);
    }

    /// Bytes held, and the bytes a full cache for every head would hold.
    pub fn memory(&self) -> CacheMemory {
        let kinds: Vec<&[HeadKind]> = self.layers.iter().map(|l| &l.cfg.head_kinds[..]).collect();
        cache_memory(&self.cfg, &kinds, std::mem::size_of::<T>())
    }

    /// Copies a layer's caches to the host (for tests and inspection): full K, full V
    /// `[B, H_retrieval, max_len, D]`, ring K, ring V `[B, H_streaming, sink + recent, D]`; `None`
    /// where the layer has no head of that kind. Synchronous.
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
        Ok((get(&l.full)?, get(&l.ring)?))
    }

    fn layer(&self, layer: usize) -> Result<&LayerCache<T>> {
        self.layers.get(layer).ok_or(Error::LayerOutOfRange {
            layer,
            layers: self.layers.len(),
        })
    }

    /// Checks new K/V `[B, n, Hkv, D]` and the room left; returns n.
    fn check_new(&self, layer: usize, k: &TensorDesc<4>, v: &TensorDesc<4>) -> Result<usize> {
        let l = self.layer(layer)?;
        let c = &self.cfg;
        let n = check_kv(
            (k, "k"),
            (v, "v"),
            c.batch,
            c.heads_kv,
            c.head_dim,
            self.device,
            "new k is [B, n, Hkv, D] with the cache's B, Hkv and D",
        )?;
        if l.len + n > c.max_len {
            return Err(Error::CacheFull {
                capacity: c.max_len,
                len: l.len,
                adding: n,
            });
        }
        Ok(n)
    }

    /// Checks q/out/lse of an attention call against the cache sizes; returns n.
    fn check_queries(
        &self,
        layer: usize,
        q: &TensorDesc<4>,
        out: &TensorDesc<4>,
        lse: &TensorDesc<3>,
        n: usize,
    ) -> Result<()> {
        let l = self.layer(layer)?;
        let c = &self.cfg;
        let [b, sq, hq, d] = check_queries(q, out, lse, &l.cfg, self.device)?;
        check_heads(hq, c.heads_kv, &l.cfg)?;
        if [b, sq, hq, d] != [c.batch, n, c.heads_q, c.head_dim] {
            return Err(Error::ShapeMismatch {
                tensor: "q",
                got: q.shape.to_vec(),
                expected: vec![c.batch, n, c.heads_q, c.head_dim],
                why: "q is [B, n, Hq, D] with the cache's sizes and the new k's n",
            });
        }
        Ok(())
    }

    fn sources(&self, layer: usize) -> (KvSource, KvSource) {
        let l = &self.layers[layer];
        let src = |t: &Option<(DeviceTensor<T, 4>, DeviceTensor<T, 4>)>| {
            t.as_ref().map_or(KvSource::default(), |(k, v)| {
                let len = k.shape()[2];
                kv_source(&cache_desc(k, len), &cache_desc(v, len))
            })
        };
        (src(&l.full), src(&l.ring))
    }

    fn cache_params(&self, layer: usize, new: KvSource, n: usize, out: KvSource) -> CacheParams {
        let (full, stream) = self.sources(layer);
        let l = &self.layers[layer];
        CacheParams {
            new,
            full,
            stream,
            out,
            streaming_heads: crate::attention::streaming_mask(&l.cfg.head_kinds),
            n_new: n as i32,
            heads_kv: self.cfg.heads_kv as i32,
            head_dim: self.cfg.head_dim as i32,
            start: l.len as i32,
            sink: self.sink as i32,
            recent: self.recent as i32,
        }
    }

    fn launch_cache_kernel(
        &self,
        ctx: &Context,
        entry: &str,
        rows: usize,
        params: &CacheParams,
    ) -> Result<()> {
        let items = rows * self.cfg.heads_kv * self.cfg.head_dim / 8;
        let grid = (
            items.div_ceil(CACHE_THREADS) as u32,
            self.cfg.batch as u32,
            1,
        );
        ctx.launch(entry, grid, CACHE_THREADS as u32, 0, params)
    }

    /// Appends new K/V rows `[B, n, Hkv, D]` to `layer` (positions `len..len + n`) on the GPU:
    /// retrieval heads into their full cache, streaming heads into their ring.
    pub fn append(
        &mut self,
        ctx: &Context,
        layer: usize,
        k: &View<'_, T, 4>,
        v: &View<'_, T, 4>,
    ) -> Result<()> {
        self.check_device(ctx)?;
        let n = self.check_new(layer, k.desc(), v.desc())?;
        self.append_unchecked(ctx, layer, k.desc(), v.desc(), n)
    }

    fn append_unchecked(
        &mut self,
        ctx: &Context,
        layer: usize,
        k: &TensorDesc<4>,
        v: &TensorDesc<4>,
        n: usize,
    ) -> Result<()> {
        let params = self.cache_params(layer, kv_source(k, v), n, KvSource::default());
        self.launch_cache_kernel(ctx, "duo_cache_append", n, &params)?;
        self.layers[layer].len += n;
        Ok(())
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
        self.check_device(ctx)?;
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

    /// The dispatcher: one layer's attention for `n` new tokens per sequence. q `[B, n, Hq, D]`,
    /// new k/v `[B, n, Hkv, D]`, out like q, lse `[B, Hq, n]`. Decodes when `n <= 16` and the
    /// layer already holds context, else runs a prefill chunk; either way the new K/V are
    /// appended and every query sees exactly the keys its head kind allows over the whole
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
        let n = q.shape()[1];
        if n <= MAX_DECODE_QUERIES && self.len(layer)? > 0 {
            self.decode(ctx, layer, q, k, v, out, lse)
        } else {
            self.prefill(ctx, layer, q, k, v, out, lse)
        }
    }

    /// A chunk of prefill: appends the chunk, then runs the prefill kernel with retrieval heads
    /// over the full cache and streaming heads over their sink + recent context plus the chunk.
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
        let start = self.layers[layer].len;
        let (b, hs, d) = (
            self.cfg.batch,
            self.layers[layer].streaming,
            self.cfg.head_dim,
        );

        // Streaming heads: gather [sink rows | recent rows | chunk] before the append rotates the ring.
        let (sink_rows, recent_rows, _) =
            ring::history(start as i32, self.sink as i32, self.recent as i32);
        let stream_len = (sink_rows + recent_rows) as usize + n;
        let mut stream_descs = None;
        if hs > 0 {
            let need = b * stream_len * hs * d;
            if self.scratch.as_ref().is_none_or(|(k, _)| k.len() < need) {
                // Chunks queued with the old buffers finish before they are freed.
                ctx.synchronize()?;
                self.scratch = None;
                self.scratch = Some((ctx.alloc([need, 1])?, ctx.alloc([need, 1])?));
            }
            let desc = |t: &DeviceTensor<T, 2>| {
                TensorDesc::contiguous(
                    t.view().desc().ptr,
                    [b, stream_len, hs, d],
                    std::mem::size_of::<T>(),
                    self.device,
                )
            };
            let (sk, sv) = self
                .scratch
                .as_ref()
                .map(|(k, v)| (desc(k), desc(v)))
                .ok_or(Error::InvalidCacheConfig(
                    "scratch allocation vanished".into(),
                ))?;
            let params =
                self.cache_params(layer, kv_source(k.desc(), v.desc()), n, kv_source(&sk, &sv));
            self.launch_cache_kernel(ctx, "duo_cache_gather_stream", stream_len, &params)?;
            stream_descs = Some((sk, sv));
        }

        self.append_unchecked(ctx, layer, k.desc(), v.desc(), n)?;
        let l = &self.layers[layer];
        let full_descs = l
            .full
            .as_ref()
            .map(|(k, v)| (cache_desc(k, start + n), cache_desc(v, start + n)));
        // A kind without heads is never read; its slot takes the other kind's tensors.
        let (fk, fv, flen, sk, sv, slen) = match (full_descs, stream_descs) {
            (Some((fk, fv)), Some((sk, sv))) => (fk, fv, start + n, sk, sv, stream_len),
            (Some((fk, fv)), None) => (fk, fv, start + n, fk, fv, start + n),
            (None, Some((sk, sv))) => (sk, sv, stream_len, sk, sv, stream_len),
            (None, None) => return Err(Error::InvalidCacheConfig("a layer without heads".into())),
        };
        let args = prefill_params(
            q.desc(),
            out.desc(),
            lse.desc(),
            &l.cfg,
            (&fk, &fv, flen),
            Some((&sk, &sv, slen)),
        );
        ctx.launch_prefill(&prefill_launch::<T>(l.cfg.kernel, q.shape(), args)?)
    }

    /// Decode of 1..=16 new tokens per sequence: appends them, then attends over both caches
    /// (retrieval heads: every cached position; streaming heads: their ring).
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
        let n = self.check_call(ctx, layer, q, k, v, out, lse, MAX_DECODE_QUERIES)?;
        self.append_unchecked(ctx, layer, k.desc(), v.desc(), n)?;
        let (full, stream) = self.sources(layer);
        let l = &self.layers[layer];
        let kv = DecodeKv::Cache {
            full,
            stream,
            seqlen: l.len,
            recent: self.recent,
        };
        // `check_call` made sure the context runs on the cache's device.
        let plan = ctx.decode_plan::<T>(q.desc(), kv, out.desc(), lse.desc(), &l.cfg)?;
        ctx.launch_decode(plan)
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
