//! GPU tests of the DuoAttention cache's sequence slots (continuous batching): slots prefilled
//! apart or together in one ragged launch, decoded together at their own lengths, reset and
//! refilled, each output checked per slot against the float64 reference over that slot's own
//! sequence. Without a Hopper GPU each test prints a SKIPPED notice and passes.
use duo_attn::{
    AttnElement, CacheConfig, CachePaging, Context, DeviceScalar, DuoCache, Error, HeadKind,
    PrefillKernel,
};
use duo_attn_tests::{
    SlotHistory, gpu_or_skip, notice, prefix_sums, random_tensor, rng, sanitizer_cache, tiny_cache,
};
use half::{bf16, f16};
use rand::rngs::StdRng;

const R: HeadKind = HeadKind::Retrieval;
const S: HeadKind = HeadKind::Streaming;

fn to_f32<T: DeviceScalar>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// One step of a continuous-batching schedule over a cache's sequence slots.
#[derive(Clone, Debug)]
enum SlotStep {
    /// `n` new tokens for slots `first..first + count` through `CacheSlots::forward`.
    Forward {
        first: usize,
        count: usize,
        n: usize,
    },
    /// `n` new tokens for every slot through `DuoCache::forward` (decode at own lengths).
    All {
        n: usize,
    },
    Reset {
        slot: usize,
    },
    /// Chunks of these lengths for slots `first..` in one ragged prefill
    /// (`CacheSlots::prefill_varlen`); an empty chunk leaves its slot as it was.
    Ragged {
        first: usize,
        chunks: &'static [usize],
    },
    /// `Ragged`, with NaN K/V for slot `first + poisoned` (a broken request; its output is not
    /// checked). The other slots' outputs must not see it, then or after its reset.
    PoisonedRagged {
        first: usize,
        chunks: &'static [usize],
        poisoned: usize,
    },
}

/// Runs `steps` over every layer of a cache, checking every call's output per slot against the
/// reference over that slot's own sequence; returns the failures.
fn slot_schedule<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    kinds: Vec<Vec<HeadKind>>,
    cfg: CacheConfig,
    steps: &[SlotStep],
    label: &str,
) -> Vec<String> {
    let (slots, hq, hkv, d) = (cfg.batch, cfg.heads_q, cfg.heads_kv, cfg.head_dim);
    let mut cache = DuoCache::<T>::new(ctx, cfg, kinds.clone()).unwrap();
    let mut hist: Vec<SlotHistory> = kinds
        .iter()
        .map(|_| SlotHistory::new(slots, hkv, d))
        .collect();
    let mut failures = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let (first, count, n) = match *step {
            SlotStep::Reset { slot } => {
                cache.slots(slot..slot + 1).unwrap().reset(ctx).unwrap();
                hist.iter_mut().for_each(|h| h.reset(slot));
                continue;
            }
            SlotStep::Ragged { first, chunks } => {
                for (layer, h) in hist.iter_mut().enumerate() {
                    let what = format!("{label}: step {i} {step:?} layer {layer}");
                    let slots = (first, chunks, None);
                    failures.extend(ragged_step(ctx, rng, &mut cache, (layer, h), slots, &what));
                }
                continue;
            }
            SlotStep::PoisonedRagged {
                first,
                chunks,
                poisoned,
            } => {
                for (layer, h) in hist.iter_mut().enumerate() {
                    let what = format!("{label}: step {i} {step:?} layer {layer}");
                    let slots = (first, chunks, Some(poisoned));
                    failures.extend(ragged_step(ctx, rng, &mut cache, (layer, h), slots, &what));
                }
                continue;
            }
            SlotStep::Forward { first, count, n } => (first, count, n),
            SlotStep::All { n } => (0, slots, n),
        };
        for (layer, h) in hist.iter_mut().enumerate() {
            let (q, q32) = random_tensor::<T>(rng, count * n * hq * d);
            let (k, k32) = random_tensor::<T>(rng, count * n * hkv * d);
            let (v, v32) = random_tensor::<T>(rng, count * n * hkv * d);
            let dq = ctx.upload(&q, [count, n, hq, d]).unwrap();
            let dk = ctx.upload(&k, [count, n, hkv, d]).unwrap();
            let dv = ctx.upload(&v, [count, n, hkv, d]).unwrap();
            let mut out = ctx.alloc::<T, 4>([count, n, hq, d]).unwrap();
            let mut lse = ctx.alloc::<f32, 3>([count, hq, n]).unwrap();
            out.fill(T::nan()).unwrap();
            lse.fill(f32::NAN).unwrap();
            let (qv, kv, vv) = (dq.view(), dk.view(), dv.view());
            let (o, l) = (&mut out.view_mut(), &mut lse.view_mut());
            match step {
                SlotStep::All { .. } => cache.forward(ctx, layer, &qv, &kv, &vv, o, l),
                _ => cache
                    .slots(first..first + count)
                    .unwrap()
                    .forward(ctx, layer, &qv, &kv, &vv, o, l),
            }
            .unwrap();
            ctx.synchronize().unwrap();
            h.push(first, n, &k32, &v32);
            let want: Vec<usize> = (first..first + count).map(|s| h.len(s)).collect();
            let got = &cache.lens(layer).unwrap()[first..first + count];
            assert_eq!(got, want, "{label}: step {i} layer {layer}: lengths");
            let attn = cache.attention_config(layer).unwrap();
            let out32 = to_f32(&out.to_host().unwrap());
            for (slot, cmp) in
                h.compare(first, (n, hq), attn, &q32, &out32, &lse.to_host().unwrap())
            {
                if !cmp.passed() {
                    failures.push(format!(
                        "{label}: step {i} {step:?} layer {layer} slot {slot} (len {}): {cmp:?}",
                        h.len(slot)
                    ));
                }
            }
        }
    }
    // The device's lengths match the host's record.
    let host: Vec<Vec<usize>> = (0..kinds.len())
        .map(|l| cache.lens(l).unwrap().to_vec())
        .collect();
    cache.read_back_lengths(ctx).unwrap();
    for (layer, want) in host.iter().enumerate() {
        assert_eq!(
            cache.lens(layer).unwrap(),
            &want[..],
            "{label}: device lengths"
        );
    }
    failures
}

/// One ragged prefill of `chunks[i]` new tokens into slot `first + i` of `layer`, each slot's
/// rows checked against the reference over its own sequence; returns the failures. Chunk
/// `poisoned` (if any) holds NaN K/V and goes unchecked.
fn ragged_step<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    cache: &mut DuoCache<T>,
    (layer, h): (usize, &mut SlotHistory),
    (first, chunks, poisoned): (usize, &[usize], Option<usize>),
    what: &str,
) -> Vec<String> {
    let c = cache.config();
    let (hq, hkv, d) = (c.heads_q, c.heads_kv, c.head_dim);
    let total: usize = chunks.iter().sum();
    let cu = prefix_sums(chunks.iter().copied());
    let (q, q32) = random_tensor::<T>(rng, total * hq * d);
    let (mut k, k32) = random_tensor::<T>(rng, total * hkv * d);
    let (mut v, v32) = random_tensor::<T>(rng, total * hkv * d);
    if let Some(p) = poisoned {
        let rows = cu[p] as usize * hkv * d..cu[p + 1] as usize * hkv * d;
        k[rows.clone()].fill(T::nan());
        v[rows].fill(T::nan());
    }
    let dq = ctx.upload(&q, [total, hq, d]).unwrap();
    let dk = ctx.upload(&k, [total, hkv, d]).unwrap();
    let dv = ctx.upload(&v, [total, hkv, d]).unwrap();
    let mut out = ctx.alloc::<T, 3>([total, hq, d]).unwrap();
    let mut lse = ctx.alloc::<f32, 2>([hq, total]).unwrap();
    out.fill(T::nan()).unwrap();
    lse.fill(f32::NAN).unwrap();
    let range = first..first + chunks.len();
    cache
        .slots(range.clone())
        .unwrap()
        .prefill_varlen(
            ctx,
            layer,
            &dq.view(),
            &dk.view(),
            &dv.view(),
            &cu,
            &mut out.view_mut(),
            &mut lse.view_mut(),
        )
        .unwrap();
    ctx.synchronize().unwrap();
    let out32 = to_f32(&out.to_host().unwrap());
    let lse32 = lse.to_host().unwrap();
    let attn = cache.attention_config(layer).unwrap();
    let mut failures = Vec::new();
    for (i, &n) in chunks.iter().enumerate() {
        let (slot, r0) = (first + i, cu[i] as usize);
        if n == 0 {
            continue;
        }
        let kv = |x: &[f32]| x[r0 * hkv * d..][..n * hkv * d].to_vec();
        h.push(slot, n, &kv(&k32), &kv(&v32));
        if poisoned == Some(i) {
            continue;
        }
        // This slot's rows as a batch of one: q/out `[1, n, Hq, D]`, lse `[1, Hq, n]`.
        let rows = |x: &[f32]| x[r0 * hq * d..][..n * hq * d].to_vec();
        let lse_i: Vec<f32> = (0..hq)
            .flat_map(|head| lse32[head * total + r0..][..n].to_vec())
            .collect();
        for (slot, cmp) in h.compare(slot, (n, hq), attn, &rows(&q32), &rows(&out32), &lse_i) {
            if !cmp.passed() {
                failures.push(format!("{what} slot {slot} (len {}): {cmp:?}", h.len(slot)));
            }
        }
    }
    let want: Vec<usize> = range.clone().map(|s| h.len(s)).collect();
    assert_eq!(
        &cache.lens(layer).unwrap()[range],
        &want[..],
        "{what}: lengths"
    );
    failures
}

/// Runs short `steps` on a bf16 cache of one layer (a retrieval and a streaming KV head, D 64,
/// sink 3, window 10: `sanitizer_cache`) with `batch` slots of 120 tokens (300 when paged),
/// small enough for compute-sanitizer (`run.sh sanitize`); asserts that every check passed.
fn small_schedule(test: &str, batch: usize, paging: Option<CachePaging>, steps: &[SlotStep]) {
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let max_len = if paging.is_some() { 300 } else { 120 };
    let cfg = CacheConfig {
        paging,
        ..sanitizer_cache(batch, max_len)
    };
    let kinds = vec![vec![R, S]];
    let failures = slot_schedule::<bf16>(&ctx, &mut rng(test), kinds, cfg, steps, test);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs `steps` on bf16 caches of three layer mixes (Hq 8, Hkv 4, sink 4, window 24) for each
/// (head dim, prefill kernel) of `runs`, then on an f16 MQA cache (Hq 6, sink 40, window 9,
/// scale 0.07), each of `batch` slots of `max_len` tokens, paged by `paging` or not; asserts
/// that every check passed.
fn slot_matrix(
    test: &str,
    (batch, max_len, paging): (usize, usize, Option<CachePaging>),
    runs: &[(usize, PrefillKernel)],
    steps: &[SlotStep],
) {
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let (ctx, rng) = (&ctx, &mut rng(test));
    let mut failures = Vec::new();
    let kinds = vec![vec![R, S, S, R], vec![S, S, S, S], vec![R, R, R, R]];
    for &(head_dim, prefill_kernel) in runs {
        let cfg = CacheConfig {
            batch,
            max_len,
            heads_q: 8,
            heads_kv: 4,
            head_dim,
            sink: 4,
            window: 24,
            softmax_scale: None,
            prefill_kernel,
            paging,
        };
        let label = format!("bf16 d{head_dim} {prefill_kernel:?} {paging:?}");
        failures.extend(slot_schedule::<bf16>(
            ctx,
            rng,
            kinds.clone(),
            cfg,
            steps,
            &label,
        ));
    }
    let cfg = CacheConfig {
        batch,
        max_len,
        heads_q: 6,
        heads_kv: 1,
        head_dim: 128,
        sink: 40,
        window: 9,
        softmax_scale: Some(0.07),
        prefill_kernel: PrefillKernel::Auto,
        paging,
    };
    let mqa = vec![vec![S], vec![R]];
    let label = format!("f16 MQA {paging:?}");
    failures.extend(slot_schedule::<f16>(ctx, rng, mqa, cfg, steps, &label));
    notice(&format!("{test}: {} failures", failures.len()));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Continuous batching: sequence slots prefilled one at a time (in chunks) while the others
/// hold context, decoded together at their own lengths (1, 3 and 16 tokens), reset and refilled;
/// every output checked per slot against the reference over that slot's sequence.
#[test]
fn cache_slots_continuous_batching() {
    let runs = [128, 64, 256].map(|d| (d, PrefillKernel::Auto));
    let shape = (3, 300, None);
    slot_matrix(
        "cache_slots_continuous_batching",
        shape,
        &runs,
        &batching_steps(),
    );
}

/// A paged cache (128-token pages from a pool smaller than `batch x max_len`, reused across
/// resets, some of them holding a broken request's NaN rows) through a schedule whose prefills
/// and decode steps cross page boundaries, then the ragged schedule; head dims 128 and 64.
#[test]
fn cache_slots_paged() {
    use SlotStep::*;
    let steps = [
        Forward {
            first: 0,
            count: 1,
            n: 250,
        },
        Forward {
            first: 1,
            count: 1,
            n: 120,
        },
        All { n: 16 }, // slots 0 and 1 take a page in decode, empty slot 2 its first
        Ragged {
            first: 0,
            chunks: &[130, 0, 200],
        },
        Reset { slot: 1 },
        PoisonedRagged {
            first: 0,
            chunks: &[1, 300, 5],
            poisoned: 1,
        },
        Reset { slot: 1 },
        Forward {
            first: 1,
            count: 1,
            n: 129,
        }, // the NaN pages again: one row past a page boundary
        All { n: 3 },
        Reset { slot: 1 },
        Reset { slot: 2 },
        Forward {
            first: 1,
            count: 2,
            n: 140,
        }, // two slots at one length: one paged prefill chunk
        All { n: 1 },
    ];
    let runs = [128, 64].map(|d| (d, PrefillKernel::Auto));
    let paging = |pages| {
        Some(CachePaging {
            page_size: 128,
            pages,
        })
    };
    let test = "cache_slots_paged";
    slot_matrix(test, (3, 512, paging(10)), &runs, &steps);
    slot_matrix(test, (4, 600, paging(9)), &runs, &ragged_steps());
}

/// A paged cache hands out pages as slots grow and takes them back on reset; a call the pool
/// cannot serve is a typed error that changes nothing; `reserve` takes pages ahead; the
/// downloaded cache holds what was appended.
#[test]
fn cache_paged_pages() {
    let Some(ctx) = gpu_or_skip("cache_paged_pages") else {
        return;
    };
    let (hkv, d) = (2, 64);
    let cfg = CacheConfig {
        paging: Some(CachePaging {
            page_size: 128,
            pages: 3,
        }),
        ..tiny_cache(2, 512)
    };
    let mut cache = DuoCache::<bf16>::new(&ctx, cfg, vec![vec![R, S]]).unwrap();
    assert_eq!(cache.free_pages(), Some(3));
    let rng = &mut rng("cache_paged_pages");
    let mut prefill = |cache: &mut DuoCache<bf16>, slot: usize, n: usize| {
        let (k, _) = random_tensor::<bf16>(rng, n * hkv * d);
        let x = |data: &[bf16]| ctx.upload(data, [1, n, hkv, d]).unwrap();
        let (dq, dk, dv) = (x(&k), x(&k), x(&k));
        let mut out = ctx.alloc::<bf16, 4>([1, n, 2, d]).unwrap();
        let mut lse = ctx.alloc::<f32, 3>([1, 2, n]).unwrap();
        let (o, l) = (&mut out.view_mut(), &mut lse.view_mut());
        let r = cache.slots(slot..slot + 1).unwrap().forward(
            &ctx,
            0,
            &dq.view(),
            &dk.view(),
            &dv.view(),
            o,
            l,
        );
        (r, k)
    };
    let (r, k0) = prefill(&mut cache, 0, 200);
    r.unwrap();
    assert_eq!(cache.slot_pages(0).unwrap(), &[0, 1]);
    assert_eq!(cache.free_pages(), Some(1));
    // The retrieval head's rows of slot 0, in place in the downloaded `[B, 1, max_len, D]`.
    let (full, _) = cache.download(0).unwrap();
    let (fk, fv) = full.unwrap();
    for row in 0..200 {
        let want = &k0[(row * hkv) * d..][..d];
        assert_eq!(&fk[row * d..][..d], want, "K row {row}");
        assert_eq!(&fv[row * d..][..d], want, "V row {row}");
    }
    let (r, _) = prefill(&mut cache, 1, 200);
    assert!(
        matches!(
            r,
            Err(Error::CachePagesExhausted {
                needed: 2,
                free: 1,
                pages: 3
            })
        ),
        "{r:?}"
    );
    assert_eq!(cache.lens(0).unwrap(), &[200, 0]);
    assert_eq!(cache.free_pages(), Some(1));
    prefill(&mut cache, 1, 100).0.unwrap();
    assert_eq!(cache.slot_pages(1).unwrap(), &[2]);
    let err = cache.slots(1..2).unwrap().reserve(&ctx, 29);
    assert!(
        matches!(err, Err(Error::CachePagesExhausted { needed: 1, .. })),
        "{err:?}"
    );
    cache.slots(1..2).unwrap().reserve(&ctx, 28).unwrap();
    cache.slots(0..1).unwrap().reset(&ctx).unwrap();
    assert_eq!(cache.free_pages(), Some(2));
    assert!(cache.slot_pages(0).unwrap().is_empty());
    cache.slots(1..2).unwrap().reserve(&ctx, 100).unwrap();
    assert_eq!(cache.slot_pages(1).unwrap(), &[2, 0]);
    let err = cache.slots(1..2).unwrap().reserve(&ctx, 413);
    assert!(
        matches!(
            err,
            Err(Error::CacheFull {
                slot: 1,
                len: 100,
                adding: 413,
                ..
            })
        ),
        "{err:?}"
    );
    ctx.synchronize().unwrap();
    cache.read_back_lengths(&ctx).unwrap();
    assert_eq!(cache.lens(0).unwrap(), &[0, 100]);
}

/// Continuous batching: slots prefilled one at a time (in chunks) while the others hold
/// context, decoded together at their own lengths, reset and refilled.
fn batching_steps() -> Vec<SlotStep> {
    use SlotStep::*;
    vec![
        Forward {
            first: 0,
            count: 1,
            n: 50,
        },
        Forward {
            first: 2,
            count: 1,
            n: 33,
        },
        All { n: 1 }, // slot 1 is empty: its token sees itself
        All { n: 3 },
        Reset { slot: 1 },
        Forward {
            first: 1,
            count: 1,
            n: 70,
        },
        All { n: 16 },
        Forward {
            first: 0,
            count: 1,
            n: 40,
        }, // a chunk into a slot mid-decode
        All { n: 1 },
        All { n: 1 },
        Reset { slot: 0 },
        All { n: 2 },
        Forward {
            first: 1,
            count: 2,
            n: 1,
        },
        Reset { slot: 2 },
        Reset { slot: 1 },
        Forward {
            first: 1,
            count: 2,
            n: 20,
        }, // two slots at one length: one prefill chunk
        All { n: 5 },
    ]
}

/// A short continuous-batching schedule (slots prefilled apart, decoded together, reset), small
/// enough for compute-sanitizer (`run.sh sanitize`).
#[test]
fn sanitizer_small_slot_schedule() {
    use SlotStep::*;
    let steps = [
        Forward {
            first: 1,
            count: 1,
            n: 30,
        },
        All { n: 1 },
        Forward {
            first: 0,
            count: 1,
            n: 20,
        },
        All { n: 16 },
        Reset { slot: 1 },
        All { n: 2 },
    ];
    small_schedule("sanitizer_small_slot_schedule", 2, None, &steps);
}

/// Slot ranges outside the batch, and a prefill chunk over slots at different lengths, are
/// typed errors that change nothing.
#[test]
fn cache_slot_errors() {
    let Some(ctx) = gpu_or_skip("cache_slot_errors") else {
        return;
    };
    let mut cache = DuoCache::<bf16>::new(&ctx, tiny_cache(2, 64), vec![vec![R, S]]).unwrap();
    assert!(matches!(
        cache.slots(1..3).err(),
        Some(Error::SlotOutOfRange {
            start: 1,
            end: 3,
            slots: 2
        })
    ));
    assert!(matches!(
        cache.slots(1..1).err(),
        Some(Error::SlotOutOfRange { .. })
    ));
    let x = |b: usize, n: usize| {
        ctx.upload(&vec![bf16::ONE; b * n * 2 * 64], [b, n, 2, 64])
            .unwrap()
    };
    let (q, k, v) = (x(1, 20), x(1, 20), x(1, 20));
    let mut out = ctx.alloc::<bf16, 4>([1, 20, 2, 64]).unwrap();
    let mut lse = ctx.alloc::<f32, 3>([1, 2, 20]).unwrap();
    let (qv, kv, vv) = (q.view(), k.view(), v.view());
    cache
        .slots(0..1)
        .unwrap()
        .forward(
            &ctx,
            0,
            &qv,
            &kv,
            &vv,
            &mut out.view_mut(),
            &mut lse.view_mut(),
        )
        .unwrap();
    assert_eq!(cache.lens(0).unwrap(), &[20, 0]);
    assert!(matches!(
        cache.len(0),
        Err(Error::UnevenCacheLengths { .. })
    ));
    // A whole-batch prefill chunk over slots at 20 and 0 tokens.
    let (q2, k2, v2) = (x(2, 20), x(2, 20), x(2, 20));
    let mut out2 = ctx.alloc::<bf16, 4>([2, 20, 2, 64]).unwrap();
    let mut lse2 = ctx.alloc::<f32, 3>([2, 2, 20]).unwrap();
    let err = cache.prefill(
        &ctx,
        0,
        &q2.view(),
        &k2.view(),
        &v2.view(),
        &mut out2.view_mut(),
        &mut lse2.view_mut(),
    );
    assert!(
        matches!(err, Err(Error::UnevenCacheLengths { layer: 0, first: 0, ref lens }) if lens == &[20, 0]),
        "{err:?}"
    );
    // A batch of one for a range of two slots.
    let err = cache.slots(0..2).unwrap().forward(
        &ctx,
        0,
        &qv,
        &kv,
        &vv,
        &mut out.view_mut(),
        &mut lse.view_mut(),
    );
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
    // The room left is per slot.
    let (q3, k3, v3) = (x(1, 45), x(1, 45), x(1, 45));
    let mut out3 = ctx.alloc::<bf16, 4>([1, 45, 2, 64]).unwrap();
    let mut lse3 = ctx.alloc::<f32, 3>([1, 2, 45]).unwrap();
    let mut slot = |s: usize| {
        cache.slots(s..s + 1).unwrap().forward(
            &ctx,
            0,
            &q3.view(),
            &k3.view(),
            &v3.view(),
            &mut out3.view_mut(),
            &mut lse3.view_mut(),
        )
    };
    assert!(matches!(
        slot(0),
        Err(Error::CacheFull {
            slot: 0,
            len: 20,
            adding: 45,
            ..
        })
    ));
    slot(1).unwrap();
    assert_eq!(cache.lens(0).unwrap(), &[20, 45]);
    cache.read_back_lengths(&ctx).unwrap();
    assert_eq!(cache.lens(0).unwrap(), &[20, 45]);
}

/// Ragged prefill: chunks of different lengths (empty ones included) into slots at different
/// lengths in one launch per layer, between decode steps, resets and single-slot chunks; every
/// row checked per slot against the reference over that slot's own sequence. Every head dim,
/// both element types, and the cp.async, plain wgmma and mma.sync prefill kernels at D = 128.
#[test]
fn cache_ragged_prefill() {
    let runs = [
        (128, PrefillKernel::Auto),
        (64, PrefillKernel::Auto),
        (256, PrefillKernel::Auto),
        (128, PrefillKernel::WgmmaWarpSpecialized),
        (128, PrefillKernel::Wgmma),
        (128, PrefillKernel::MmaSync),
    ];
    slot_matrix(
        "cache_ragged_prefill",
        (4, 600, None),
        &runs,
        &ragged_steps(),
    );
}

/// Ragged prefills between decode steps, resets and single-slot chunks, with a poisoned
/// request whose NaN rows stay in the cache (and, paged, in pages other slots get next).
fn ragged_steps() -> Vec<SlotStep> {
    use SlotStep::*;
    vec![
        Ragged {
            first: 0,
            chunks: &[50, 0, 130, 7],
        },
        All { n: 1 },
        Ragged {
            first: 0,
            chunks: &[20, 64, 0, 200],
        },
        All { n: 3 },
        Reset { slot: 2 },
        Ragged {
            first: 1,
            chunks: &[1, 90, 16],
        },
        All { n: 16 },
        Forward {
            first: 0,
            count: 1,
            n: 5,
        },
        Ragged {
            first: 0,
            chunks: &[0, 0, 0, 3],
        },
        All { n: 1 },
        Ragged {
            first: 2,
            chunks: &[140, 33],
        },
        // A broken request's NaN K/V fill slot 0's cache rows and the streaming context's
        // scratch; after its reset, padding rows of the next calls must not carry them.
        PoisonedRagged {
            first: 0,
            chunks: &[150, 10, 0, 2],
            poisoned: 0,
        },
        Reset { slot: 0 },
        Ragged {
            first: 0,
            chunks: &[3, 5, 1, 0],
        },
        All { n: 1 },
    ]
}

/// A short ragged schedule for compute-sanitizer (`run.sh sanitize`): the gather, the append and
/// the prefill kernel with per-slot key counts, around a decode step.
#[test]
fn sanitizer_small_ragged_prefill() {
    use SlotStep::*;
    let steps = [
        Ragged {
            first: 0,
            chunks: &[20, 0, 35],
        },
        All { n: 1 },
        Ragged {
            first: 0,
            chunks: &[5, 40, 1],
        },
    ];
    small_schedule("sanitizer_small_ragged_prefill", 3, None, &steps);
}

/// A paged cache's schedule for compute-sanitizer (`run.sh sanitize`): the append through the
/// block table, the paged prefill (uniform and ragged) and decode, pages reused after a reset.
#[test]
fn sanitizer_small_paged_schedule() {
    use SlotStep::*;
    let steps = [
        Ragged {
            first: 0,
            chunks: &[20, 0, 35],
        },
        All { n: 1 },
        Forward {
            first: 1,
            count: 1,
            n: 140,
        },
        Reset { slot: 0 },
        Ragged {
            first: 0,
            chunks: &[5, 40, 100],
        },
        All { n: 16 },
    ];
    let paging = CachePaging {
        page_size: 128,
        pages: 5,
    };
    small_schedule("sanitizer_small_paged_schedule", 3, Some(paging), &steps);
}

/// A ragged prefill's bad input is a typed error, and leaves the cache as it was.
#[test]
fn cache_ragged_prefill_errors() {
    let Some(ctx) = gpu_or_skip("cache_ragged_prefill_errors") else {
        return;
    };
    let mut cache = DuoCache::<bf16>::new(&ctx, tiny_cache(2, 64), vec![vec![R, S]]).unwrap();
    let x = |rows: usize| {
        ctx.upload(&vec![bf16::ONE; rows * 2 * 64], [rows, 2, 64])
            .unwrap()
    };
    let (q, k, v) = (x(50), x(50), x(50));
    let mut out = ctx.alloc::<bf16, 3>([50, 2, 64]).unwrap();
    let mut lse = ctx.alloc::<f32, 2>([2, 50]).unwrap();
    let mut call = |cache: &mut DuoCache<bf16>, k: &duo_attn::DeviceTensor<bf16, 3>, cu: &[i32]| {
        cache.prefill_varlen(
            &ctx,
            0,
            &q.view(),
            &k.view(),
            &v.view(),
            cu,
            &mut out.view_mut(),
            &mut lse.view_mut(),
        )
    };
    let err = call(&mut cache, &k, &[0, 50]);
    assert!(
        matches!(
            err,
            Err(Error::InvalidCuSeqlens {
                which: "cu_seqlens",
                ..
            })
        ),
        "one entry per slot plus one: {err:?}"
    );
    let err = call(&mut cache, &k, &[0, 20, 40]);
    assert!(
        matches!(err, Err(Error::InvalidCuSeqlens { .. })),
        "ends short of the rows: {err:?}"
    );
    let err = call(&mut cache, &k, &[0, 30, 20]);
    assert!(
        matches!(err, Err(Error::InvalidCuSeqlens { .. })),
        "{err:?}"
    );
    let short_k = x(40);
    let err = call(&mut cache, &short_k, &[0, 20, 50]);
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
    call(&mut cache, &k, &[0, 10, 50]).unwrap();
    assert_eq!(cache.lens(0).unwrap(), &[10, 40]);
    // Slot 1 has room for 24 more.
    let err = call(&mut cache, &k, &[0, 20, 50]);
    assert!(
        matches!(
            err,
            Err(Error::CacheFull {
                slot: 1,
                len: 40,
                adding: 30,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(cache.lens(0).unwrap(), &[10, 40]);
    call(&mut cache, &k, &[0, 50, 50]).unwrap();
    assert_eq!(cache.lens(0).unwrap(), &[60, 40]);
    cache.read_back_lengths(&ctx).unwrap();
    assert_eq!(cache.lens(0).unwrap(), &[60, 40]);
}
