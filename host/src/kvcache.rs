//! Prefill attention over a caller's KV cache: FlashAttention's `flash_attn_with_kvcache` for
//! chunks of any length, with its `cache_seqlens` and `page_table` (`seqused_k` of its varlen API).
//!
//! Queries come packed (`[total_q, Hq, D]` with `cu_seqlens_q`, FlashAttention's varlen layout);
//! keys stay where the caller keeps them, batch-strided `[B, S_max, Hkv, D]` or in pages
//! `[pages, page_size, Hkv, D]` listed by a block table, and sequence `b` reads its first
//! `cache_seqlens[b]` keys. Its queries are the last of those positions (bottom-right aligned):
//! append a chunk's K/V to the cache, then attend. Streaming heads read only the KV blocks of
//! their sink and window, as everywhere.
//!
//! Rows past a sequence's count may hold anything, NaN included. The TMA kernel loads them with
//! the sequence's last KV block, and its cache build (`duo_prefill_wgmma_tma_cache_*`) zeroes
//! them in V before use (masked keys get P = 0, and 0 x NaN is NaN: FlashAttention 3 carries
//! such NaN into the output); the cp.async kernels never load them.
use crate::attention::{
    AttentionConfig, PrefillKernel, PrefillPlan, VarlenArrays, as_batch_of_one, check_cu_seqlens,
    check_heads, check_kv, check_limit, check_no_aliasing, check_queries, into_varlen,
    lse_as_batch_of_one, prefill_launch, prefill_params,
};
use crate::context::Context;
use crate::decode::{check_block_table, check_clear_of_outputs, paged_capacity};
use crate::element::AttnElement;
use crate::error::{Error, Result};
use crate::tensor::{DeviceTensor, TensorDesc, View, ViewMut};
use duo_attn_kernels::abi::ws_block_n;

/// Where a KV-cache prefill reads its keys (see [`Context::attention_kvcache`] and
/// [`Context::attention_kvcache_paged`]).
#[derive(Clone, Copy, Debug)]
pub enum KvCacheDesc<'a> {
    /// `[B, S_max, Hkv, D]` K and V: sequence `b`'s keys are the first rows of batch entry `b`.
    Contiguous {
        /// The key cache.
        k: &'a TensorDesc<4>,
        /// The value cache, shaped as `k`.
        v: &'a TensorDesc<4>,
    },
    /// Pages `[pages, page_size, Hkv, D]` of K and V shared by the batch, and the device
    /// `[B, max_pages]` i32 table whose row `b` lists sequence `b`'s pages in key order.
    Paged {
        /// The key pages.
        k_pages: &'a TensorDesc<4>,
        /// The value pages, shaped as `k_pages`.
        v_pages: &'a TensorDesc<4>,
        /// The block table.
        block_table: &'a TensorDesc<2>,
    },
}

/// Validates a KV-cache prefill and builds its launch (pure: no GPU needed).
///
/// q/out `[total_q, Hq, D]`, lse `[Hq, total_q]`; `cu_seqlens_q` (`[B + 1]`) and `cache_seqlens`
/// (`[B]`, each at most the keys its cache holds: `S_max`, or `max_pages * page_size`) are the
/// host copies of device arrays whose addresses are the second elements. Paged K/V run on the
/// TMA kernel, with a power-of-two page size that holds whole KV blocks (a multiple of 128 keys;
/// head dim 256, whose blocks are 48 keys, is not paged).
#[allow(clippy::too_many_arguments)]
pub fn plan_prefill_kvcache<T: AttnElement>(
    q: &TensorDesc<3>,
    cache: KvCacheDesc<'_>,
    out: &TensorDesc<3>,
    lse: &TensorDesc<2>,
    cu_seqlens_q: (&[i32], u64),
    cache_seqlens: (&[i32], u64),
    cfg: &AttentionConfig,
    device: u32,
) -> Result<PrefillPlan> {
    let (q4, out4, lse3) = (
        as_batch_of_one(q),
        as_batch_of_one(out),
        lse_as_batch_of_one(lse),
    );
    let [_, total_q, heads_q, head_dim] = check_queries(&q4, &out4, &lse3, cfg, device)?;
    let (cu_q, cu_q_ptr) = cu_seqlens_q;
    check_cu_seqlens("cu_seqlens_q", cu_q, total_q)?;
    let batch = cu_q.len() - 1;
    let (k, v, names, kv_batch, why) = match cache {
        KvCacheDesc::Contiguous { k, v } => (
            k,
            v,
            ("k_cache", "v_cache"),
            batch,
            "k_cache is [B, S_max, Hkv, D] with cu_seqlens_q's B and q's D",
        ),
        KvCacheDesc::Paged {
            k_pages, v_pages, ..
        } => (
            k_pages,
            v_pages,
            ("k_pages", "v_pages"),
            k_pages.shape[0],
            "k_pages is [pages, page_size, Hkv, D] with q's D",
        ),
    };
    let heads_kv = k.shape[2];
    check_heads(heads_q, heads_kv, cfg)?;
    let rows = check_kv(
        (k, names.0),
        (v, names.1),
        kv_batch,
        heads_kv,
        head_dim,
        device,
        why,
    )?;
    let (capacity, paging) = match cache {
        KvCacheDesc::Contiguous { .. } => (rows, None),
        KvCacheDesc::Paged { block_table, .. } => {
            let paging = check_pages(k, block_table, batch, head_dim, cfg.kernel, device)?;
            check_clear_of_outputs(block_table, "block_table", &out4, &lse3)?;
            (paged_capacity(block_table, k)?, Some(paging))
        }
    };
    let (seqlens, seqlens_ptr) = cache_seqlens;
    if seqlens.len() != batch {
        return Err(Error::ShapeMismatch {
            tensor: "cache_seqlens",
            got: vec![seqlens.len()],
            expected: vec![batch],
            why: "one key count per sequence of cu_seqlens_q",
        });
    }
    if let Some((seq, &got)) = seqlens
        .iter()
        .enumerate()
        .find(|&(_, &n)| n < 0 || n as usize > capacity)
    {
        return Err(Error::InvalidCacheSeqlens { seq, got, capacity });
    }
    check_no_aliasing(&out4, &lse3, &[(&q4, "q"), (k, names.0), (v, names.1)])?;

    let args = prefill_params(&q4, &out4, &lse3, cfg, (k, v, rows), None);
    let mut plan = prefill_launch::<T>(cfg.kernel, q4.shape, args)?;
    let sequences: Vec<_> = cu_q
        .windows(2)
        .zip(seqlens)
        .map(|(w, &n)| ((w[1] - w[0]) as usize, n as usize, n as usize))
        .collect();
    let arrays = VarlenArrays {
        cu_seqlens_q: cu_q_ptr,
        starts_k: 0, // zeros at launch (`zero_key_starts`)
        ends_k: seqlens_ptr,
        ends_k_stream: seqlens_ptr,
    };
    into_varlen::<T>(&mut plan, cfg, q.shape, &sequences, arrays)?;
    plan.zero_key_starts = true;
    use_cache_build::<T>(&mut plan, head_dim, paging)?;
    Ok(plan)
}

/// A checked block table: its address, row stride and the page size's log2.
pub(crate) struct Paging {
    pub(crate) table: u64,
    pub(crate) stride: i32,
    pub(crate) shift: i32,
}

/// Switches a TMA plan to the cache build, which zeroes V's rows past each sequence's keys and
/// reads the retrieval heads' keys through `paging`'s block table. Without TMA (the cp.async
/// kernels never load rows past the keys) the plan stays as it is, unless it must read pages.
pub(crate) fn use_cache_build<T: AttnElement>(
    plan: &mut PrefillPlan,
    head_dim: usize,
    paging: Option<Paging>,
) -> Result<()> {
    if plan.tma.is_none() {
        if paging.is_some() {
            return Err(Error::InvalidPagedKv {
                why: "TMA cannot address the pages (`PrefillKernel::WgmmaTma` says why), and \
                      the cp.async kernels do not read pages"
                    .into(),
            });
        }
        return Ok(());
    }
    let name = T::KERNEL_NAME;
    // `prefill_launch` has already refused ALiBi where no build has it (D 256).
    let alibi = if plan.params.alibi_slopes != 0 {
        "alibi_"
    } else {
        ""
    };
    plan.entry = format!("duo_prefill_wgmma_tma_cache_{alibi}{name}_d{head_dim}");
    if let Some(split) = &mut plan.split {
        split.entry = format!("duo_prefill_wgmma_tma_cache_{alibi}split_{name}_d{head_dim}");
    }
    if let Some(Paging {
        table,
        stride,
        shift,
    }) = paging
    {
        plan.params.page_table = table;
        plan.params.page_table_stride = stride;
        plan.params.page_shift = shift;
    }
    Ok(())
}

/// Paged prefill's rules beyond decode's: the TMA kernel, pages of whole KV blocks, a page
/// stride (the batch coordinate of the pages' tensor map is the page).
fn check_pages(
    k_pages: &TensorDesc<4>,
    table: &TensorDesc<2>,
    batch: usize,
    head_dim: usize,
    kernel: PrefillKernel,
    device: u32,
) -> Result<Paging> {
    let bad = |why: String| Err(Error::InvalidPagedKv { why });
    if !matches!(kernel, PrefillKernel::Auto | PrefillKernel::WgmmaTma) {
        return bad(format!(
            "paged prefill runs on the TMA kernel (`PrefillKernel::Auto` or `WgmmaTma`), not \
             {kernel:?}"
        ));
    }
    let (pages, page_size) = (k_pages.shape[0], k_pages.shape[1]);
    let block_n = ws_block_n(head_dim);
    if head_dim > 128 {
        return bad(format!(
            "head dim {head_dim} loads KV blocks of {block_n} keys, which no power-of-two page \
             holds whole: paged prefill takes head dim 64 or 128"
        ));
    }
    if !page_size.is_power_of_two() || !page_size.is_multiple_of(block_n) {
        return bad(format!(
            "the page size ({page_size}, dim 1 of k_pages) must be a power of two and a multiple \
             of the prefill's KV block ({block_n} keys)"
        ));
    }
    if pages > 1 && k_pages.strides[0] == 0 {
        return bad("the pages must not share memory (page stride 0)".into());
    }
    check_limit("pages in the pool", pages, i32::MAX as usize)?;
    let stride = check_block_table(table, batch, device)?;
    check_limit(
        "the block table's row stride",
        stride as usize,
        i32::MAX as usize,
    )?;
    Ok(Paging {
        table: table.ptr,
        stride: stride as i32,
        shift: page_size.trailing_zeros() as i32,
    })
}

impl Context {
    /// Prefill attention over a KV cache with a key count per sequence (FlashAttention's
    /// `flash_attn_with_kvcache` with `cache_seqlens`, for chunks of any length): q/out
    /// `[total_q, Hq, D]` packed by `cu_seqlens_q` (`[B + 1]` i32), lse `[Hq, total_q]`, k/v
    /// `[B, S_max, Hkv, D]` of which sequence `b` reads its first `cache_seqlens[b]` rows
    /// (`[B]` i32); its queries are the last positions of those keys. Rows past a count may hold
    /// anything, NaN included. Both arrays are copied to the host (a small synchronous copy after
    /// the stream's queued work) and checked; [`plan_prefill_kvcache`] plans from host copies.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_kvcache<T: AttnElement>(
        &self,
        q: &View<'_, T, 3>,
        k_cache: &View<'_, T, 4>,
        v_cache: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 3>,
        lse: &mut ViewMut<f32, 2>,
        cu_seqlens_q: &DeviceTensor<i32, 1>,
        cache_seqlens: &DeviceTensor<i32, 1>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        let cache = KvCacheDesc::Contiguous {
            k: k_cache.desc(),
            v: v_cache.desc(),
        };
        self.run_kvcache::<T>(q, cache, out, lse, cu_seqlens_q, cache_seqlens, cfg)
    }

    /// [`Context::attention_kvcache`] over paged K/V (vLLM's and FlashAttention's layout):
    /// pages `[pages, page_size, Hkv, D]` and a device `block_table` `[B, max_pages]` i32 whose
    /// row `b` lists sequence `b`'s pages in key order. The page size is a power of two and a
    /// multiple of 128 keys (head dims 64 and 128; the TMA kernel). A page index outside the pool
    /// reads zeros, never other memory; entries past a sequence's count are not read.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_kvcache_paged<T: AttnElement>(
        &self,
        q: &View<'_, T, 3>,
        k_pages: &View<'_, T, 4>,
        v_pages: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 3>,
        lse: &mut ViewMut<f32, 2>,
        block_table: &View<'_, i32, 2>,
        cu_seqlens_q: &DeviceTensor<i32, 1>,
        cache_seqlens: &DeviceTensor<i32, 1>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        let cache = KvCacheDesc::Paged {
            k_pages: k_pages.desc(),
            v_pages: v_pages.desc(),
            block_table: block_table.desc(),
        };
        self.run_kvcache::<T>(q, cache, out, lse, cu_seqlens_q, cache_seqlens, cfg)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_kvcache<T: AttnElement>(
        &self,
        q: &View<'_, T, 3>,
        cache: KvCacheDesc<'_>,
        out: &mut ViewMut<'_, T, 3>,
        lse: &mut ViewMut<f32, 2>,
        cu_seqlens_q: &DeviceTensor<i32, 1>,
        cache_seqlens: &DeviceTensor<i32, 1>,
        cfg: &AttentionConfig,
    ) -> Result<()> {
        let (out4, lse3) = (as_batch_of_one(out.desc()), lse_as_batch_of_one(lse.desc()));
        // The kernel reads both arrays while it writes out and lse.
        for (t, name) in [
            (cu_seqlens_q, "cu_seqlens_q"),
            (cache_seqlens, "cache_seqlens"),
        ] {
            crate::attention::check_device(t.view().desc(), name, self.ordinal())?;
            check_clear_of_outputs(t.view().desc(), name, &out4, &lse3)?;
        }
        // On a non-blocking stream the copies below would not wait for the stream's work.
        self.synchronize()?;
        let cu_q = cu_seqlens_q.to_host()?;
        let seqlens = cache_seqlens.to_host()?;
        let plan = plan_prefill_kvcache::<T>(
            q.desc(),
            cache,
            out.desc(),
            lse.desc(),
            (&cu_q, cu_seqlens_q.view().desc().ptr),
            (&seqlens, cache_seqlens.view().desc().ptr),
            cfg,
            self.ordinal(),
        )?;
        self.launch_prefill(&plan)
    }
}
