//! Ragged prefill: chunks of different lengths into sequence slots at different lengths, in one
//! prefill launch per layer (FlashAttention's varlen layout for the new tokens).
//!
//! The prefill kernel reads each slot's keys from its batch entry of the cache (retrieval heads)
//! or of the gathered streaming context, up to that slot's own key count (`ends_k`), with its
//! queries packed by `cu_seqlens`. The gather and the append take the new rows packed too.
use super::*;
use crate::attention::{
    VarlenArrays, as_batch_of_one, check_cu_seqlens, into_varlen, lse_as_batch_of_one,
};
use duo_attn_kernels::abi::ws_block_n;

/// What a ragged prefill of one layer reads and writes per slot, planned on the host.
struct SlotPlan {
    /// `[b + 1]` prefix sums of the new rows per slot.
    cu: Vec<i32>,
    /// Per slot: cached length before the chunk, its new rows, its keys in the full cache and
    /// in the gathered streaming context (each with the chunk).
    starts: Vec<i32>,
    sequences: Vec<(usize, usize, usize)>,
}

impl SlotPlan {
    fn new(cu: &[i32], lens: &[usize], sink: usize, recent: usize) -> Self {
        let mut starts = Vec::with_capacity(lens.len());
        let mut sequences = Vec::with_capacity(lens.len());
        for (w, &len) in cu.windows(2).zip(lens) {
            let n = (w[1] - w[0]) as usize;
            let (sink_rows, recent_rows, _) = ring::history(len as i32, sink as i32, recent as i32);
            starts.push(len as i32);
            sequences.push((n, len + n, (sink_rows + recent_rows) as usize + n));
        }
        SlotPlan {
            cu: cu.to_vec(),
            starts,
            sequences,
        }
    }

    fn slots(&self) -> usize {
        self.starts.len()
    }

    fn longest(&self, f: fn(&(usize, usize, usize)) -> usize) -> usize {
        self.sequences.iter().map(f).max().unwrap_or(0)
    }

    /// The device arrays, one i32 buffer: `[cu (b + 1) | zeros (b) | full keys (b) | streaming
    /// keys (b) | starts (b)]`. The zeros are the first key row of every slot's batch entry.
    fn words(&self) -> Vec<i32> {
        let b = self.slots();
        let mut words = Vec::with_capacity(5 * b + 1);
        words.extend_from_slice(&self.cu);
        words.extend(std::iter::repeat_n(0, b));
        words.extend(self.sequences.iter().map(|s| s.1 as i32));
        words.extend(self.sequences.iter().map(|s| s.2 as i32));
        words.extend_from_slice(&self.starts);
        words
    }

    /// Device addresses of the arrays of `words`, from the buffer at `base`: (cu, zeros, full
    /// keys, streaming keys, starts).
    fn addresses(&self, base: u64) -> [u64; 5] {
        let b = self.slots() as u64;
        let at = |words: u64| base + 4 * words;
        [
            at(0),
            at(b + 1),
            at(2 * b + 1),
            at(3 * b + 1),
            at(4 * b + 1),
        ]
    }
}

impl<T: AttnElement> DuoCache<T> {
    /// A ragged prefill of every slot: [`CacheSlots::prefill_varlen`] over all of them.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_varlen(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 3>,
        k: &View<'_, T, 3>,
        v: &View<'_, T, 3>,
        cu_seqlens: &[i32],
        out: &mut ViewMut<'_, T, 3>,
        lse: &mut ViewMut<'_, f32, 2>,
    ) -> Result<()> {
        self.slots(0..self.cfg.batch)?
            .prefill_varlen(ctx, layer, q, k, v, cu_seqlens, out, lse)
    }

    /// The ragged arrays' buffer, at least `words` long.
    fn ensure_ragged(&mut self, ctx: &Context, words: usize) -> Result<u64> {
        if self.ragged.as_ref().is_none_or(|t| t.len() < words) {
            // Launches queued with the old buffer finish before it is freed.
            ctx.synchronize()?;
            self.ragged = None;
            self.ragged_words.clear();
            self.ragged = Some(ctx.alloc([words])?);
        }
        match &self.ragged {
            Some(t) => Ok(t.view().desc().ptr),
            None => Err(Error::InvalidCacheConfig(
                "ragged prefill arrays vanished".into(),
            )),
        }
    }
}

impl<T: AttnElement> CacheSlots<'_, T> {
    /// Prefills a chunk of its own length into each of these slots, each at its own cached
    /// length, in one prefill launch (plus the gather and the append): continuous batching's
    /// new requests and chunked prompts together.
    ///
    /// Slot `seqs.start + i` takes rows `cu_seqlens[i]..cu_seqlens[i + 1]` of the packed
    /// `q` `[total, Hq, D]` and `k`/`v` `[total, Hkv, D]`; an empty chunk leaves its slot as it
    /// was. `out` is `[total, Hq, D]`, `lse` `[Hq, total]` (FlashAttention's varlen layout).
    /// `cu_seqlens` is the host's `[slots + 1]` prefix sum from 0; the cache copies it, with the
    /// per-slot key counts, to the device on the context's stream when they changed (the layers
    /// of one model step share them). That copy comes from host memory the call owns, so this
    /// call is not for CUDA graph capture (nor is [`CacheSlots::prefill`], which may grow its
    /// buffers).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_varlen(
        &mut self,
        ctx: &Context,
        layer: usize,
        q: &View<'_, T, 3>,
        k: &View<'_, T, 3>,
        v: &View<'_, T, 3>,
        cu_seqlens: &[i32],
        out: &mut ViewMut<'_, T, 3>,
        lse: &mut ViewMut<'_, f32, 2>,
    ) -> Result<()> {
        let slots = self.check_ragged(ctx, layer, (q, k, v), cu_seqlens, (out, lse))?;
        let seqs = self.seqs.clone();
        let b = seqs.len();
        let c = &mut *self.cache;
        let (hs, d) = (c.layers[layer].streaming, c.cfg.head_dim);
        let stream_rows = slots.longest(|s| s.2);
        if hs > 0 {
            c.ensure_scratch(ctx, b * stream_rows * hs * d)?;
        }
        let words = slots.words();
        let [cu, zeros, full_ends, stream_ends, starts] =
            slots.addresses(c.ensure_ragged(ctx, words.len())?);

        // The streaming context: each slot's `[sink | recent | chunk]` at the front of its
        // batch entry, `stream_rows` rows apart; the gather zeroes the rows after it that the
        // slot's last KV block loads.
        let stream_descs = c.scratch.as_ref().filter(|_| hs > 0).map(|(sk, sv)| {
            let desc = |t: &DeviceTensor<T, 2>| {
                let shape = [b, stream_rows, hs, d];
                TensorDesc::contiguous(t.view().desc().ptr, shape, size_of::<T>(), c.device)
            };
            (desc(sk), desc(sv))
        });
        let l = &c.layers[layer];
        let full_rows = slots.longest(|s| s.1);
        let full_descs = c.full_descs(layer, full_rows, &seqs);
        let paging = c.paging_for(layer, &seqs);
        // Rows of each source's tensor maps: a paged pool's hold a page per batch index (the
        // keys are counted apart, by `ends_k`).
        let map_rows = c.pages.as_ref().map_or(full_rows, |p| p.paging.page_size);
        let full = full_descs.map(|(k, v)| (k, v, full_ends, map_rows));
        let stream = stream_descs.map(|(k, v)| (k, v, stream_ends, stream_rows));
        let ((fk, fv, fe, f_map), (sk, sv, se, s_map)) = both_sources(full, stream)?;
        let q4 = as_batch_of_one(q.desc());
        let args = prefill_params(
            &q4,
            &as_batch_of_one(out.desc()),
            &lse_as_batch_of_one(lse.desc()),
            &l.cfg,
            (&fk, &fv, f_map),
            Some((&sk, &sv, s_map)),
        );
        // Planned (and so checked) before anything is queued: an error leaves the cache as it was.
        let mut plan = prefill_launch::<T>(l.cfg.kernel, q4.shape, args)?;
        let arrays = VarlenArrays {
            cu_seqlens_q: cu,
            starts_k: zeros,
            ends_k: fe,
            ends_k_stream: se,
        };
        into_varlen::<T>(&mut plan, &l.cfg, q.shape(), &slots.sequences, arrays)?;
        if paging.is_some() {
            use_cache_build::<T>(&mut plan, d, paging)?;
        }
        // Pages for every slot's new rows, before anything is queued (all or nothing).
        if let Some(pages) = &mut c.pages {
            let need: Vec<usize> = slots.sequences.iter().map(|s| s.1).collect();
            pages.ensure(ctx, seqs.start, &need)?;
        }

        if c.ragged_words != words {
            ctx.copy_words_to_device(cu, &words)?;
            c.ragged_words = words;
        }
        let new = (
            kv_source(&as_batch_of_one(k.desc()), &as_batch_of_one(v.desc())),
            0,
        );
        let longest_new = slots.longest(|s| s.0);
        let ragged = |mut params: CacheParams| {
            params.cu_new = cu;
            params.n_new = longest_new as i32;
            params
        };
        if let Some((sk, sv)) = stream_descs {
            let mut params = ragged(c.cache_params(layer, &seqs, new, kv_source(&sk, &sv), 0));
            params.starts = starts;
            params.out_rows = stream_rows as i32;
            params.pad_block = ws_block_n(d) as i32;
            c.launch_cache_kernel(ctx, "duo_cache_gather_stream", (stream_rows, b), &params)?;
        }
        // The append also zeroes the full cache's rows after each slot's new ones that its last
        // KV block loads. A paged cache's prefill (the cache build) zeroes them in V itself.
        let mut params = ragged(c.cache_params(layer, &seqs, new, KvSource::default(), 0));
        params.pad_block = if c.pages.is_some() {
            1
        } else {
            ws_block_n(d) as i32
        };
        let rows = longest_new + params.pad_block as usize - 1;
        c.launch_cache_kernel(ctx, "duo_cache_append", (rows, b), &params)?;
        for (len, s) in c.layers[layer].lens[seqs].iter_mut().zip(&slots.sequences) {
            *len += s.0;
        }
        ctx.launch_prefill(&plan)
    }

    /// Every check of a ragged prefill; returns its per-slot plan.
    #[allow(clippy::type_complexity)]
    fn check_ragged(
        &self,
        ctx: &Context,
        layer: usize,
        (q, k, v): (&View<'_, T, 3>, &View<'_, T, 3>, &View<'_, T, 3>),
        cu_seqlens: &[i32],
        (out, lse): (&ViewMut<'_, T, 3>, &ViewMut<'_, f32, 2>),
    ) -> Result<SlotPlan> {
        let c = &*self.cache;
        c.check_device(ctx)?;
        let l = c.layer(layer)?;
        let b = self.seqs.len();
        if cu_seqlens.len() != b + 1 {
            return Err(Error::InvalidCuSeqlens {
                which: "cu_seqlens",
                why: format!(
                    "it has {} entries for {b} slots; it needs one more than the slots",
                    cu_seqlens.len()
                ),
            });
        }
        let (q4, out4) = (as_batch_of_one(q.desc()), as_batch_of_one(out.desc()));
        let lse3 = lse_as_batch_of_one(lse.desc());
        let [_, total, hq, d] = check_queries(&q4, &out4, &lse3, &l.cfg, c.device)?;
        check_heads(hq, c.cfg.heads_kv, &l.cfg)?;
        if [hq, d] != [c.cfg.heads_q, c.cfg.head_dim] {
            return Err(Error::ShapeMismatch {
                tensor: "q",
                got: q.shape().to_vec(),
                expected: vec![total, c.cfg.heads_q, c.cfg.head_dim],
                why: "q is [total, Hq, D] with the cache's Hq and D",
            });
        }
        check_cu_seqlens("cu_seqlens", cu_seqlens, total)?;
        let (k4, v4) = (as_batch_of_one(k.desc()), as_batch_of_one(v.desc()));
        let rows = check_kv(
            (&k4, "k"),
            (&v4, "v"),
            1,
            c.cfg.heads_kv,
            d,
            c.device,
            "new k is [total, Hkv, D] with the cache's Hkv and D",
        )?;
        if rows != total {
            return Err(Error::ShapeMismatch {
                tensor: "k",
                got: k.shape().to_vec(),
                expected: vec![total, c.cfg.heads_kv, d],
                why: "new k has a row per query row",
            });
        }
        check_no_aliasing(&out4, &lse3, &[(&q4, "q"), (&k4, "k"), (&v4, "v")])?;
        let lens = &l.lens[self.seqs.clone()];
        for (i, (w, &len)) in cu_seqlens.windows(2).zip(lens).enumerate() {
            let adding = (w[1] - w[0]) as usize;
            if len + adding > c.cfg.max_len {
                return Err(Error::CacheFull {
                    capacity: c.cfg.max_len,
                    slot: self.seqs.start + i,
                    len,
                    adding,
                });
            }
        }
        Ok(SlotPlan::new(cu_seqlens, lens, c.sink, c.recent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_plan_counts_each_slots_keys_and_lays_out_its_arrays() {
        // Sink 4, recent 20: slots at 0, 10 and 300 tokens taking 5, 0 and 7 new ones.
        let plan = SlotPlan::new(&[0, 5, 5, 12], &[0, 10, 300], 4, 20);
        assert_eq!(plan.sequences, [(5, 5, 5), (0, 10, 10), (7, 307, 31)]);
        assert_eq!(
            plan.words(),
            [0, 5, 5, 12, 0, 0, 0, 5, 10, 307, 5, 10, 31, 0, 10, 300]
        );
        assert_eq!(plan.longest(|s| s.2), 31);
        assert_eq!(
            plan.addresses(0x1000),
            [0x1000, 0x1010, 0x101c, 0x1028, 0x1034]
        );
    }
}
