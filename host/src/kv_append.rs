//! New keys and values into a caller's KV cache: FlashAttention's `k` and `v` arguments of
//! `flash_attn_with_kvcache`. Sequence `b`'s `n` new rows go to positions
//! `cache_seqlens[b]..cache_seqlens[b] + n` of its cache, batch-strided `[B, S_max, Hkv, D]` or
//! paged (`[pages, page_size, Hkv, D]` with a block table), on the device.
//!
//! Alone ([`Context::append_kv`], [`Context::append_kv_paged`]: before a prefill over the cache,
//! or any chunk length), or fused into a decode step ([`Context::decode_attention_append`],
//! [`Context::decode_attention_paged_append`]): each decode block first writes the new rows that
//! fall in the KV tiles it reads, so the step is one launch, as for the DuoAttention cache.
//!
//! The counts are read on the device, so a wrong one never writes outside the cache: counts are
//! clamped into `0..=capacity` (`S_max`, or `max_pages * page_size`), rows that would land at or
//! past the capacity are dropped, and a paged row whose table entry is outside the pool is not
//! written. [`SeqlensUpdate`] says whether the call then advances the counts.
//!
//! ```no_run
//! use duo_attn::{AttentionConfig, Context, HeadKind, NewKv};
//! use half::bf16;
//! # fn main() -> Result<(), duo_attn::Error> {
//! let ctx = Context::new(0)?;
//! let (b, s_max, hq, hkv, d) = (2, 4096, 8, 2, 128);
//! let mut k_cache = ctx.alloc::<bf16, 4>([b, s_max, hkv, d])?;
//! let mut v_cache = ctx.alloc::<bf16, 4>([b, s_max, hkv, d])?;
//! let mut cache_seqlens = ctx.upload(&[100i32, 2000], [b])?;
//! let cfg = AttentionConfig::new(vec![HeadKind::Retrieval, HeadKind::Streaming]).sink(4).window(256);
//! // One decode step: a new token per sequence.
//! let q = ctx.alloc::<bf16, 4>([b, 1, hq, d])?;
//! let (k_new, v_new) = (ctx.alloc::<bf16, 4>([b, 1, hkv, d])?, ctx.alloc::<bf16, 4>([b, 1, hkv, d])?);
//! let mut out = ctx.alloc::<bf16, 4>([b, 1, hq, d])?;
//! let mut lse = ctx.alloc::<f32, 3>([b, hq, 1])?;
//! ctx.decode_attention_append(
//!     &q.view(),
//!     &mut k_cache.view_mut(),
//!     &mut v_cache.view_mut(),
//!     NewKv::advance(k_new.view(), v_new.view()), // the counts become 101 and 2001
//!     &mut out.view_mut(),
//!     &mut lse.view_mut(),
//!     &mut cache_seqlens.view_mut(),
//!     &cfg,
//! )?;
//! # Ok(()) }
//! ```
use crate::attention::{AttentionConfig, check_kv, check_limit, check_no_aliasing};
use crate::cache::CACHE_THREADS;
use crate::context::Context;
use crate::decode::{
    DecodeKv, DecodePlan, check_block_table, check_cache_seqlens, kv_source, paged_capacity,
    use_block_table, use_cache_seqlens,
};
use crate::element::AttnElement;
use crate::error::{Error, Result};
use crate::kvcache::KvCacheDesc;
use crate::rotary::{RotaryTable, fused_table, use_decode_rotary};
use crate::tensor::{TensorDesc, View, ViewMut};
use duo_attn_kernels::abi::{CacheParams, DECODE_HEAD_DIMS, MAX_KV_HEADS, MAX_SEQLEN};

/// What an append does to the caller's `cache_seqlens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqlensUpdate {
    /// Leaves them, as FlashAttention does: one array can serve every layer of a step, and the
    /// caller advances it once the step's last layer has run (or passes `Advance` there).
    Keep,
    /// Advances each count by the rows appended (up to the capacity) on the device, once every
    /// block of the launch has read it, so later work on the stream sees the new counts and a
    /// captured CUDA graph replays step after step.
    Advance,
}

/// A step's new keys and values, `[B, n, Hkv, D]` each: sequence `b`'s rows go to positions
/// `cache_seqlens[b]..cache_seqlens[b] + n` of its cache.
#[derive(Clone, Copy, Debug)]
pub struct NewKv<'a, T: AttnElement> {
    /// New keys.
    pub k: View<'a, T, 4>,
    /// New values, shaped as `k`.
    pub v: View<'a, T, 4>,
    /// What the call does to `cache_seqlens` afterwards.
    pub seqlens: SeqlensUpdate,
    /// RoPE applied on the way (FlashAttention's `rotary_cos` / `rotary_sin`): see
    /// [`NewKv::rotated`].
    pub rotary: Option<&'a RotaryTable>,
}

impl<'a, T: AttnElement> NewKv<'a, T> {
    /// New rows that leave `cache_seqlens` as they are (FlashAttention's behaviour).
    pub fn keep(k: View<'a, T, 4>, v: View<'a, T, 4>) -> Self {
        NewKv {
            k,
            v,
            seqlens: SeqlensUpdate::Keep,
            rotary: None,
        }
    }

    /// New rows after which `cache_seqlens` are advanced by `n` on the device.
    pub fn advance(k: View<'a, T, 4>, v: View<'a, T, 4>) -> Self {
        NewKv {
            k,
            v,
            seqlens: SeqlensUpdate::Advance,
            rotary: None,
        }
    }

    /// These rows turned by `table` (RoPE) as they go into the cache, new key `i` of sequence
    /// `b` at position `cache_seqlens[b] + i`; in a decode step ([`Context::decode_attention_append`])
    /// query token `i` turns at the same position as new key `i`. The caller's `k` and `q` stay as
    /// they are: FlashAttention's `flash_attn_with_kvcache` with `rotary_cos`, `rotary_sin` and
    /// `rotary_interleaved`, except that its non-causal calls turn every query at
    /// `cache_seqlens[b]`. Rows whose position lies outside the table are not turned. One
    /// launch, as without a table, but at head dim 64 over pages smaller than 128 rows, where
    /// the keys turn in an append launched before the step; and at head dims up to 128 with a
    /// rotary dim that is not the head dim and pairs half of it apart, where the queries turn
    /// into the workspace before the step.
    pub fn rotated(self, table: &'a RotaryTable) -> Self {
        NewKv {
            rotary: Some(table),
            ..self
        }
    }
}

/// A checked append: the kernel's parameters (counts from the workspace still to fill in) and
/// its grid.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AppendPlan {
    pub(crate) params: CacheParams,
    pub(crate) grid: (u32, u32, u32),
    pub(crate) advance: bool,
}

/// How errors name the cache tensors, by layout.
fn cache_names(cache: &KvCacheDesc<'_>) -> (&'static str, &'static str) {
    match cache {
        KvCacheDesc::Contiguous { .. } => ("k_cache", "v_cache"),
        KvCacheDesc::Paged { .. } => ("k_pages", "v_pages"),
    }
}

/// Validates an append of `new` (`[B, n, Hkv, D]`) into `cache` at the device counts `seqlens`
/// and builds its launch (pure: no GPU needed).
pub(crate) fn plan_append(
    cache: KvCacheDesc<'_>,
    (k_new, v_new, update): (&TensorDesc<4>, &TensorDesc<4>, SeqlensUpdate),
    seqlens: &TensorDesc<1>,
    device: u32,
) -> Result<AppendPlan> {
    let (k_name, v_name) = cache_names(&cache);
    let (k, v, batch, capacity, paging) = match cache {
        KvCacheDesc::Contiguous { k, v } => {
            let s_max = check_kv(
                (k, k_name),
                (v, v_name),
                k.shape[0],
                k.shape[2],
                k.shape[3],
                device,
                "v_cache must match k_cache: [B, S_max, Hkv, D]",
            )?;
            (k, v, k.shape[0], s_max, None)
        }
        KvCacheDesc::Paged {
            k_pages,
            v_pages,
            block_table,
        } => {
            check_kv(
                (k_pages, k_name),
                (v_pages, v_name),
                k_pages.shape[0],
                k_pages.shape[2],
                k_pages.shape[3],
                device,
                "v_pages must match k_pages: [pages, page_size, Hkv, D]",
            )?;
            let batch = block_table.shape[0];
            let stride = check_block_table(block_table, batch, device)?;
            let capacity = paged_capacity(block_table, k_pages)?;
            check_limit(
                "a block table row's capacity (pages per sequence x page size)",
                capacity,
                MAX_SEQLEN,
            )?;
            check_limit("pages in the pool", k_pages.shape[0], MAX_SEQLEN)?;
            let shift = k_pages.shape[1].trailing_zeros() as i32;
            (
                k_pages,
                v_pages,
                batch,
                capacity,
                Some((block_table, stride, shift)),
            )
        }
    };
    let [_, _, heads_kv, head_dim] = k.shape;
    if !DECODE_HEAD_DIMS.contains(&head_dim) {
        return Err(Error::UnsupportedHeadDim {
            head_dim,
            by: "the KV cache append",
            supported: "64, 128 or 256",
        });
    }
    check_limit("the number of KV heads", heads_kv, MAX_KV_HEADS)?;
    check_limit("sequences of an append (its grid's y extent)", batch, 65535)?;
    // Each cache row is written by one thread: a view whose rows overlap would be written twice.
    k.check_non_overlapping(k_name)?;
    v.check_non_overlapping(v_name)?;
    let n = check_kv(
        (k_new, "k_new"),
        (v_new, "v_new"),
        batch,
        heads_kv,
        head_dim,
        device,
        "k_new is [B, n, Hkv, D] with the cache's B, Hkv and D",
    )?;
    check_cache_seqlens(seqlens, batch, device)?;
    // Nothing the append reads may lie in the caches it writes.
    let table = paging.map(|(t, _, _)| t);
    for (output, written) in [(k_name, k), (v_name, v)] {
        let (start, end) = written.byte_range();
        let read: [(bool, &'static str); 4] = [
            (k_new.overlaps(start, end), "k_new"),
            (v_new.overlaps(start, end), "v_new"),
            (seqlens.overlaps(start, end), "cache_seqlens"),
            (table.is_some_and(|t| t.overlaps(start, end)), "block_table"),
        ];
        if let Some(&(_, input)) = read.iter().find(|(hit, _)| *hit) {
            return Err(Error::Aliasing { output, input });
        }
    }
    let items = n * heads_kv * head_dim / 8;
    let (block_table, block_table_stride, page_shift) = paging
        .map_or((0, 0, 0), |(t, stride, shift)| {
            (t.ptr, stride as i32, shift)
        });
    let params = CacheParams {
        new: kv_source(k_new, v_new),
        full: kv_source(k, v),
        lens: seqlens.ptr,
        n_new: n as i32,
        heads_kv: heads_kv as i32,
        head_dim: head_dim as i32,
        capacity: capacity as i32,
        pad_block: 1,
        block_table,
        block_table_stride,
        page_shift,
        num_pages: if paging.is_some() {
            k.shape[0] as i32
        } else {
            0
        },
        // Every head is stored at its own index of `full` (no streaming heads, no rings).
        ..CacheParams::default()
    };
    Ok(AppendPlan {
        params,
        grid: (items.div_ceil(CACHE_THREADS) as u32, batch as u32, 1),
        advance: update == SeqlensUpdate::Advance,
    })
}

impl Context {
    /// Writes `new`'s rows into a KV cache `[B, S_max, Hkv, D]` (FlashAttention's
    /// `flash_attn_with_kvcache` with `k` and `v`, without the attention): sequence `b`'s rows
    /// go to positions `cache_seqlens[b]..` (`[B]` i32, on the device), then the counts stay or
    /// advance as `new.seqlens` says. Any number of new rows: append a prefill chunk, then run
    /// [`Context::attention_kvcache`] over the cache. Counts are clamped into `0..=S_max`, and
    /// rows past `S_max` are dropped. Head dims 64, 128 and 256; bf16 or f16.
    pub fn append_kv<T: AttnElement>(
        &self,
        k_cache: &mut ViewMut<'_, T, 4>,
        v_cache: &mut ViewMut<'_, T, 4>,
        new: NewKv<'_, T>,
        cache_seqlens: &mut ViewMut<'_, i32, 1>,
    ) -> Result<()> {
        let cache = KvCacheDesc::Contiguous {
            k: k_cache.desc(),
            v: v_cache.desc(),
        };
        self.run_append(cache, new, cache_seqlens.desc())
    }

    /// [`Context::append_kv`] into paged K/V (vLLM's and FlashAttention's layout): pages
    /// `[pages, page_size, Hkv, D]`, page size a power of two, and a device `block_table`
    /// `[B, max_pages]` i32 whose row `b` lists sequence `b`'s pages in key order (the pages of
    /// the new rows included). A row whose table entry lies outside the pool is not written.
    pub fn append_kv_paged<T: AttnElement>(
        &self,
        k_pages: &mut ViewMut<'_, T, 4>,
        v_pages: &mut ViewMut<'_, T, 4>,
        new: NewKv<'_, T>,
        block_table: &View<'_, i32, 2>,
        cache_seqlens: &mut ViewMut<'_, i32, 1>,
    ) -> Result<()> {
        let cache = KvCacheDesc::Paged {
            k_pages: k_pages.desc(),
            v_pages: v_pages.desc(),
            block_table: block_table.desc(),
        };
        self.run_append(cache, new, cache_seqlens.desc())
    }

    /// Decode attention that first appends the step's new keys and values to the KV cache
    /// `[B, S_max, Hkv, D]` (FlashAttention's `flash_attn_with_kvcache` with `k`, `v` and
    /// `cache_seqlens`): sequence `b`'s `n` new rows go to positions `cache_seqlens[b]..`, and
    /// its `n` queries (q `[B, n, Hq, D]`, 1 <= n <= 16) attend over its first
    /// `cache_seqlens[b] + n` keys (at most `S_max`). One launch: each block writes the new rows
    /// that fall in the KV tiles it reads before it reads them. Then `cache_seqlens` stay or
    /// advance as `new.seqlens` says. Otherwise as [`Context::decode_attention_seqlens`]: mixed
    /// head kinds, GQA, ALiBi, every head dim.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_append<T: AttnElement>(
        &self,
        q: &View<'_, T, 4>,
        k_cache: &mut ViewMut<'_, T, 4>,
        v_cache: &mut ViewMut<'_, T, 4>,
        new: NewKv<'_, T>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
        cache_seqlens: &mut ViewMut<'_, i32, 1>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        let (k, v) = (k_cache.desc(), v_cache.desc());
        let cache = KvCacheDesc::Contiguous { k, v };
        let (o, l) = (out.desc(), lse.desc());
        let plan = self.decode_plan::<T>(q.desc(), DecodeKv::Plain { k, v }, o, l, cfg)?;
        self.run_decode_append(plan, (q.desc(), cache), new, cache_seqlens.desc(), (o, l))
    }

    /// [`Context::decode_attention_append`] over paged K/V: pages `[pages, page_size, Hkv, D]`
    /// and a device `block_table` `[B, max_pages]` i32 as in
    /// [`Context::decode_attention_paged`], whose rows must list the pages of the new rows too.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_paged_append<T: AttnElement>(
        &self,
        q: &View<'_, T, 4>,
        k_pages: &mut ViewMut<'_, T, 4>,
        v_pages: &mut ViewMut<'_, T, 4>,
        new: NewKv<'_, T>,
        out: &mut ViewMut<'_, T, 4>,
        lse: &mut ViewMut<'_, f32, 3>,
        block_table: &View<'_, i32, 2>,
        cache_seqlens: &mut ViewMut<'_, i32, 1>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        let (k, v, table) = (k_pages.desc(), v_pages.desc(), block_table.desc());
        let (o, l) = (out.desc(), lse.desc());
        let capacity = paged_capacity(table, k)?;
        let kv = DecodeKv::Paged { k, v, capacity };
        let mut plan = self.decode_plan::<T>(q.desc(), kv, o, l, cfg)?;
        use_block_table(&mut plan, table, k, o, l, self.ordinal())?;
        let cache = KvCacheDesc::Paged {
            k_pages: k,
            v_pages: v,
            block_table: table,
        };
        self.run_decode_append(plan, (q.desc(), cache), new, cache_seqlens.desc(), (o, l))
    }

    /// Queues a checked append alone.
    fn run_append<T: AttnElement>(
        &self,
        cache: KvCacheDesc<'_>,
        new: NewKv<'_, T>,
        seqlens: &TensorDesc<1>,
    ) -> Result<()> {
        let mut plan = plan_append(
            cache,
            (new.k.desc(), new.v.desc(), new.seqlens),
            seqlens,
            self.ordinal(),
        )?;
        if let Some(table) = new.rotary {
            let d = new.k.desc().shape[3];
            plan.params.rotary = fused_table::<T>(table, d, self.ordinal())?;
        }
        self.launch_append(plan)
    }

    /// Launches an append, its per-sequence counts (when it advances) from the workspace.
    fn launch_append(&self, mut plan: AppendPlan) -> Result<()> {
        let batch = plan.grid.1 as usize;
        let counters = if plan.advance { batch } else { 0 };
        self.with_scratch(0, counters, |scratch| {
            if plan.advance {
                plan.params.arrivals = scratch.counters;
            }
            self.launch(
                "duo_cache_append",
                plan.grid,
                CACHE_THREADS as u32,
                0,
                &plan.params,
            )
        })
    }

    /// Points a checked decode plan over `cache` at `new` and the counts, and queues it: the
    /// append fused into the decode, or (entries that do not fuse it: paged at head dim 256) an
    /// append launch before it.
    fn run_decode_append<T: AttnElement>(
        &self,
        mut plan: DecodePlan,
        (q, cache): (&TensorDesc<4>, KvCacheDesc<'_>),
        new: NewKv<'_, T>,
        seqlens: &TensorDesc<1>,
        (out, lse): (&TensorDesc<4>, &TensorDesc<3>),
    ) -> Result<()> {
        let (k_new, v_new) = (new.k.desc(), new.v.desc());
        let mut append = plan_append(cache, (k_new, v_new, new.seqlens), seqlens, self.ordinal())?;
        let n_q = plan.params.n_q;
        if append.params.n_new != n_q {
            return Err(Error::ShapeMismatch {
                tensor: "k_new",
                got: k_new.shape.to_vec(),
                expected: vec![k_new.shape[0], n_q as usize, k_new.shape[2], k_new.shape[3]],
                why: "a decode appends one new key per query token: k_new's n is q's n",
            });
        }
        check_no_aliasing(out, lse, &[(k_new, "k_new"), (v_new, "v_new")])?;
        use_cache_seqlens(&mut plan, seqlens, out, lse, self.ordinal())?;
        let fused = plan.fuses_append(new.rotary.is_some());
        if let Some(table) = new.rotary {
            let advanced = !fused && append.advance;
            use_decode_rotary::<T>(&mut plan, table, q, advanced, self.ordinal())?;
            // The keys turn by the same checked table, in whichever launch appends them.
            append.params.rotary = plan.params.rotary;
        }
        if !fused {
            // The append first. Kept counts: the decode adds the `n_q` new keys itself (`append`
            // set); advanced ones: it reads them after the append.
            let advance = append.advance;
            self.launch_append(append)?;
            if !advance {
                plan.params.append = kv_source(k_new, v_new);
            }
            return self.launch_decode(plan);
        }
        plan.params.append = kv_source(k_new, v_new);
        plan.params.seq_blocks = (plan.grid.0 / plan.params.batch as u32) as i32;
        self.launch_decode_with(plan, append.advance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn t4(ptr: u64, shape: [usize; 4]) -> TensorDesc<4> {
        TensorDesc::contiguous(ptr, shape, 2, 0)
    }

    /// A contiguous cache of 3 sequences x 100 keys, 2 KV heads at head dim 64, new rows of 4.
    fn contiguous() -> (TensorDesc<4>, TensorDesc<4>, TensorDesc<4>, TensorDesc<4>) {
        let cache = [3, 100, 2, 64];
        let new = [3, 4, 2, 64];
        (
            t4(GB, cache),
            t4(2 * GB, cache),
            t4(3 * GB, new),
            t4(4 * GB, new),
        )
    }

    fn seqlens(ptr: u64, n: usize) -> TensorDesc<1> {
        TensorDesc::contiguous(ptr, [n], 4, 0)
    }

    fn plan(
        (k, v, kn, vn): (
            &TensorDesc<4>,
            &TensorDesc<4>,
            &TensorDesc<4>,
            &TensorDesc<4>,
        ),
        lens: &TensorDesc<1>,
    ) -> Result<AppendPlan> {
        let cache = KvCacheDesc::Contiguous { k, v };
        plan_append(cache, (kn, vn, SeqlensUpdate::Advance), lens, 0)
    }

    #[test]
    fn a_contiguous_append_addresses_every_head_at_its_index() {
        let (k, v, kn, vn) = contiguous();
        let p = plan((&k, &v, &kn, &vn), &seqlens(5 * GB, 3)).unwrap();
        assert_eq!(p.grid, (1, 3, 1)); // 4 rows x 2 heads x 8 chunks = 64 items
        assert!(p.advance);
        let c = &p.params;
        assert_eq!(
            (c.n_new, c.heads_kv, c.head_dim, c.capacity),
            (4, 2, 64, 100)
        );
        assert_eq!(
            (c.full.k, c.new.v, c.lens, c.arrivals),
            (GB, 4 * GB, 5 * GB, 0)
        );
        assert_eq!(c.full.k_strides, [100 * 128, 128, 64]);
        assert_eq!((c.streaming_heads, c.block_table), ([0; 8], 0));
    }

    #[test]
    fn a_paged_append_takes_the_table_and_its_capacity() {
        let pool = [40, 16, 2, 64];
        let (k, v) = (t4(GB, pool), t4(2 * GB, pool));
        let (kn, vn) = (t4(3 * GB, [3, 4, 2, 64]), t4(4 * GB, [3, 4, 2, 64]));
        let table = TensorDesc::contiguous(6 * GB, [3, 10], 4, 0);
        let cache = KvCacheDesc::Paged {
            k_pages: &k,
            v_pages: &v,
            block_table: &table,
        };
        let lens = seqlens(5 * GB, 3);
        let p = plan_append(cache, (&kn, &vn, SeqlensUpdate::Keep), &lens, 0).unwrap();
        let c = &p.params;
        assert!(!p.advance);
        assert_eq!((c.capacity, c.num_pages, c.page_shift), (160, 40, 4));
        assert_eq!((c.block_table, c.block_table_stride), (6 * GB, 10));
        // A page size that is not a power of two.
        let odd = [40, 24, 2, 64];
        let (k, v) = (t4(GB, odd), t4(2 * GB, odd));
        let cache = KvCacheDesc::Paged {
            k_pages: &k,
            v_pages: &v,
            block_table: &table,
        };
        let err = plan_append(cache, (&kn, &vn, SeqlensUpdate::Keep), &lens, 0).unwrap_err();
        assert!(matches!(err, Error::InvalidPagedKv { .. }), "{err}");
    }

    #[test]
    fn bad_appends_are_typed_errors() {
        let (k, v, kn, vn) = contiguous();
        let lens = seqlens(5 * GB, 3);
        fn err(
            k: &TensorDesc<4>,
            v: &TensorDesc<4>,
            kn: &TensorDesc<4>,
            vn: &TensorDesc<4>,
            lens: &TensorDesc<1>,
        ) -> Error {
            plan((k, v, kn, vn), lens).unwrap_err()
        }
        // New rows of another head count, and counts of another batch.
        let e = err(&k, &v, &t4(3 * GB, [3, 4, 1, 64]), &vn, &lens);
        assert!(
            matches!(
                e,
                Error::ShapeMismatch {
                    tensor: "k_new",
                    ..
                }
            ),
            "{e}"
        );
        let e = err(&k, &v, &kn, &vn, &seqlens(5 * GB, 2));
        assert!(
            matches!(
                e,
                Error::ShapeMismatch {
                    tensor: "cache_seqlens",
                    ..
                }
            ),
            "{e}"
        );
        // A head dim the kernels do not take.
        let (k32, v32) = (t4(GB, [3, 100, 2, 32]), t4(2 * GB, [3, 100, 2, 32]));
        let (kn32, vn32) = (t4(3 * GB, [3, 4, 2, 32]), t4(4 * GB, [3, 4, 2, 32]));
        let e = err(&k32, &v32, &kn32, &vn32, &lens);
        assert!(
            matches!(e, Error::UnsupportedHeadDim { head_dim: 32, .. }),
            "{e}"
        );
        // New rows inside the cache they go to, and counts inside the values.
        let inside = t4(GB + 1024, [3, 4, 2, 64]);
        let e = err(&k, &v, &inside, &vn, &lens);
        assert!(
            matches!(
                e,
                Error::Aliasing {
                    output: "k_cache",
                    input: "k_new"
                }
            ),
            "{e}"
        );
        let e = err(&k, &v, &kn, &vn, &seqlens(2 * GB + 64, 3));
        assert!(
            matches!(
                e,
                Error::Aliasing {
                    output: "v_cache",
                    input: "cache_seqlens"
                }
            ),
            "{e}"
        );
        // A cache view whose sequences share rows would be written twice.
        let mut shared = k;
        shared.strides[0] = 0;
        let e = err(&shared, &v, &kn, &vn, &lens);
        assert!(
            matches!(
                e,
                Error::OverlappingOutput {
                    tensor: "k_cache",
                    ..
                }
            ),
            "{e}"
        );
        // Misaligned new rows, and new rows on another device.
        let e = err(&k, &v, &t4(3 * GB + 2, [3, 4, 2, 64]), &vn, &lens);
        assert!(
            matches!(
                e,
                Error::Misaligned {
                    tensor: "k_new",
                    ..
                }
            ),
            "{e}"
        );
        let mut elsewhere = vn;
        elsewhere.device = 1;
        let e = err(&k, &v, &kn, &elsewhere, &lens);
        assert!(
            matches!(
                e,
                Error::WrongDevice {
                    tensor: "v_new",
                    ..
                }
            ),
            "{e}"
        );
    }
}

/// Property tests of the append plan (no GPU): random appends, mostly valid ones bent by edits.
/// Planning returns a typed error or a plan, never a panic, and a plan keeps every address the
/// append kernel forms inside the tensors it was given.
#[cfg(test)]
mod props {
    use super::*;
    use crate::decode::props::{REGION, apply, inside, odd_dim};
    use proptest::prelude::*;

    /// Every address `duo_cache_append` forms from `p` lies inside the operands: the new rows it
    /// reads, the cache rows it writes (a page below `num_pages` when paged), the table entries
    /// and counts it reads.
    fn plan_inside(
        p: &AppendPlan,
        (k, v, kn, vn): (
            &TensorDesc<4>,
            &TensorDesc<4>,
            &TensorDesc<4>,
            &TensorDesc<4>,
        ),
        table: Option<&TensorDesc<2>>,
        lens: &TensorDesc<1>,
    ) -> std::result::Result<(), TestCaseError> {
        let c = &p.params;
        let batch = p.grid.1 as i64;
        let (n, heads, d) = (c.n_new as i64, c.heads_kv as i64, c.head_dim as i64);
        prop_assert!(p.grid.1 <= 65535 && d % 8 == 0 && n >= 1);
        let items = p.grid.0 as i64 * CACHE_THREADS as i64;
        prop_assert!(items >= n * heads * d / 8, "the grid covers every new row");
        for (what, t, ptr, s) in [
            ("k_new", kn, c.new.k, c.new.k_strides),
            ("v_new", vn, c.new.v, c.new.v_strides),
        ] {
            inside(what, t, ptr, &[(batch, s[0]), (n, s[1]), (heads, s[2])], d)?;
        }
        // Rows `0..capacity` of every sequence, or every row of every page.
        let (outer, rows) = match table {
            Some(_) => (c.num_pages as i64, 1i64 << c.page_shift),
            None => (batch, c.capacity as i64),
        };
        for (what, t, ptr, s) in [
            ("k cache", k, c.full.k, c.full.k_strides),
            ("v cache", v, c.full.v, c.full.v_strides),
        ] {
            inside(
                what,
                t,
                ptr,
                &[(outer, s[0]), (rows, s[1]), (heads, s[2])],
                d,
            )?;
        }
        if let Some(t) = table {
            let entries = ((c.capacity as i64 - 1) >> c.page_shift) + 1;
            let stride = c.block_table_stride as i64;
            inside(
                "block table",
                t,
                c.block_table,
                &[(batch, stride), (entries, 1)],
                1,
            )?;
        } else {
            prop_assert_eq!(c.block_table, 0);
        }
        inside("cache_seqlens", lens, c.lens, &[(batch, 1)], 1)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn append_plans_stay_inside_their_operands(
            (b, s, hkv, d, n) in (1usize..9, 1usize..3000, 1usize..9, prop_oneof![Just(64usize), Just(128), Just(256)], 1usize..40),
            page in prop_oneof![Just(None), (0u32..9).prop_map(|e| Some(1usize << e)), Just(Some(24))],
            edits in prop::collection::vec((0usize..6, 0usize..5, odd_dim(), any::<u64>()), 0..3),
        ) {
            let at = |i: u64| REGION * (i + 1);
            let (mut k, mut v, mut table) = match page {
                None => {
                    let shape = [b, s, hkv, d];
                    (TensorDesc::contiguous(at(0), shape, 2, 0), TensorDesc::contiguous(at(1), shape, 2, 0), None)
                }
                Some(page) => {
                    let per_seq = s.div_ceil(page);
                    let pool = [b * per_seq + 1, page, hkv, d];
                    let table = TensorDesc::contiguous(at(5), [b, per_seq], 4, 0);
                    (TensorDesc::contiguous(at(0), pool, 2, 0), TensorDesc::contiguous(at(1), pool, 2, 0), Some(table))
                }
            };
            let new = [b, n, hkv, d];
            let mut kn = TensorDesc::contiguous(at(2), new, 2, 0);
            let mut vn = TensorDesc::contiguous(at(3), new, 2, 0);
            let mut lens = TensorDesc::contiguous(at(4), [b], 4, 0);
            for e in &edits {
                match e.0 {
                    0 => apply(&mut k, *e),
                    1 => apply(&mut v, *e),
                    2 => apply(&mut kn, *e),
                    3 => apply(&mut vn, *e),
                    4 => apply(&mut lens, *e),
                    _ => if let Some(t) = &mut table { apply(t, *e) },
                }
            }
            let cache = match &table {
                None => KvCacheDesc::Contiguous { k: &k, v: &v },
                Some(t) => KvCacheDesc::Paged { k_pages: &k, v_pages: &v, block_table: t },
            };
            if let Ok(p) = plan_append(cache, (&kn, &vn, SeqlensUpdate::Advance), &lens, 0) {
                plan_inside(&p, (&k, &v, &kn, &vn), table.as_ref(), &lens)?;
            }
        }
    }
}
