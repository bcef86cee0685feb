//! Prefill over a caller's KV cache (`Context::attention_kvcache` and `_paged`): packed queries
//! against each sequence's first `cache_seqlens[b]` keys, with every cache row past a count (and
//! every unused page) NaN, so a kernel that let one reach the output fails. Each sequence is
//! compared with the float64 reference on its own.
use duo_attn::reference::Shape;
use duo_attn::{AttentionConfig, AttnElement, Context, Error, HeadKind, PrefillKernel};
use duo_attn_tests::{
    CacheLayout, Comparison, alibi_slopes, compare_packed_sequence, gpu_or_skip, kv_with_nan_tails,
    notice, prefix_sums, random_tensor, rng, scatter_pages, shuffled_pages,
};
use half::{bf16, f16};
use rand::rngs::StdRng;

/// One KV-cache prefill of sequences `(query rows, key count)` over caches of `s_max` keys with
/// `(Hq, Hkv, D)` heads, on fresh random inputs with the outputs poisoned; per-sequence results.
fn run_case<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    (hq, hkv, d): (usize, usize, usize),
    s_max: usize,
    seqs: &[(usize, usize)],
    layout: CacheLayout,
    cfg: &AttentionConfig,
) -> Result<Vec<Comparison>, Error> {
    let b = seqs.len();
    let cu_q = prefix_sums(seqs.iter().map(|s| s.0));
    let lens: Vec<i32> = seqs.iter().map(|s| s.1 as i32).collect();
    let total_q = cu_q[b] as usize;
    let row = hkv * d;
    let (q, q32) = random_tensor::<T>(rng, total_q * hq * d);
    // The reference reads the random values; the device copies hold NaN past each count.
    let shape = Shape {
        batch: b,
        seqlen_q: 0,
        seqlen_k: s_max,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    };
    let (k, k32) = kv_with_nan_tails::<T>(rng, &shape, &lens);
    let (v, v32) = kv_with_nan_tails::<T>(rng, &shape, &lens);
    let dq = ctx.upload(&q, [total_q, hq, d])?;
    let dcu = ctx.upload(&cu_q, [b + 1])?;
    let dlens = ctx.upload(&lens, [b])?;
    let mut out = ctx.alloc::<T, 3>([total_q, hq, d])?;
    let mut lse = ctx.alloc::<f32, 2>([hq, total_q])?;
    out.fill(T::nan())?;
    lse.fill(f32::NAN)?;
    match layout {
        CacheLayout::Contiguous => {
            let dk = ctx.upload(&k, [b, s_max, hkv, d])?;
            let dv = ctx.upload(&v, [b, s_max, hkv, d])?;
            let (mut o, mut l) = (out.view_mut(), lse.view_mut());
            ctx.attention_kvcache(
                &dq.view(),
                &dk.view(),
                &dv.view(),
                &mut o,
                &mut l,
                &dcu,
                &dlens,
                cfg,
            )?;
        }
        CacheLayout::Paged(page) => {
            // Each sequence's pages scattered over a pool with spare (NaN) pages, in random order.
            let per_seq = s_max.div_ceil(page);
            let pages = b * per_seq + 3;
            let order = shuffled_pages(rng, pages);
            let pool_k = scatter_pages(&k, (s_max, row), page, &order, T::nan());
            let pool_v = scatter_pages(&v, (s_max, row), page, &order, T::nan());
            let table = &order[..b * per_seq];
            let dk = ctx.upload(&pool_k, [pages, page, hkv, d])?;
            let dv = ctx.upload(&pool_v, [pages, page, hkv, d])?;
            let dtable = ctx.upload(table, [b, per_seq])?;
            let (mut o, mut l) = (out.view_mut(), lse.view_mut());
            ctx.attention_kvcache_paged(
                &dq.view(),
                &dk.view(),
                &dv.view(),
                &mut o,
                &mut l,
                &dtable.view(),
                &dcu,
                &dlens,
                cfg,
            )?;
        }
    }
    ctx.synchronize()?;
    let out32: Vec<f32> = out.to_host()?.iter().map(|x| x.to_f32()).collect();
    let lse_all = lse.to_host()?;
    Ok(seqs
        .iter()
        .enumerate()
        .map(|(i, &(sq, sk))| {
            let keys = i * s_max * row..(i * s_max + sk) * row;
            let kv = (&k32[keys.clone()], &v32[keys]);
            let at = (i, cu_q[i] as usize, sq);
            compare_packed_sequence(cfg, (hq, hkv, d), at, (&q32, kv), &out32, &lse_all)
        })
        .collect())
}

/// Runs a case and labels its failing sequences.
#[allow(clippy::too_many_arguments)]
fn check<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    heads: (usize, usize, usize),
    s_max: usize,
    seqs: &[(usize, usize)],
    layout: CacheLayout,
    cfg: &AttentionConfig,
) -> Vec<String> {
    let what = format!(
        "{layout:?} {} {:?} D={} splits {:?}",
        T::KERNEL_NAME,
        cfg.kernel,
        heads.2,
        cfg.kv_splits
    );
    let cmps = run_case::<T>(ctx, rng, heads, s_max, seqs, layout, cfg).unwrap();
    let mut failures = Vec::new();
    for (i, (cmp, &(sq, sk))) in cmps.iter().zip(seqs).enumerate() {
        let label = format!("{what} seq {i} (Sq {sq}, keys {sk}): {cmp:?}");
        notice(&label);
        if !cmp.passed() {
            failures.push(label);
        }
    }
    failures
}

fn mixed(kernel: PrefillKernel, splits: Option<usize>) -> AttentionConfig {
    AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
        .sink(8)
        .window(200)
        .kernel(kernel)
        .kv_splits(splits)
}

/// Sequences: a chunk at the end of a longer cache, one that fills its cache, an empty chunk, a
/// single query, a chunk longer than its keys (its first rows see none), one key.
const SEQS: [(usize, usize); 6] = [(100, 300), (129, 1000), (0, 50), (1, 777), (60, 40), (5, 1)];

#[test]
fn kvcache_prefill_matches_reference() {
    let Some(ctx) = gpu_or_skip("kvcache_prefill_matches_reference") else {
        return;
    };
    let mut rng = rng("kvcache prefill");
    let mut failures = Vec::new();
    let mut run = |d: usize, cfg: AttentionConfig| {
        let heads = (8, 2, d);
        let seqs = &SEQS;
        failures.extend(check::<bf16>(
            &ctx,
            &mut rng,
            heads,
            1000,
            seqs,
            CacheLayout::Contiguous,
            &cfg,
        ));
    };
    for kernel in [
        PrefillKernel::Auto,
        PrefillKernel::WgmmaWarpSpecialized,
        PrefillKernel::Wgmma,
        PrefillKernel::MmaSync,
    ] {
        for d in [64, 128] {
            run(d, mixed(kernel, None));
        }
    }
    for (d, splits) in [(256, None), (128, Some(3)), (256, Some(5))] {
        run(d, mixed(PrefillKernel::WgmmaTma, splits));
    }
    // FlashAttention's window_size over the cache: a band both ways (chunk rows see later
    // chunk keys, never rows past a count), with and without splits, and the cp.async kernel.
    for (kernel, splits) in [
        (PrefillKernel::Auto, None),
        (PrefillKernel::Auto, Some(3)),
        (PrefillKernel::WgmmaWarpSpecialized, None),
    ] {
        let cfg = AttentionConfig::flash(2, false, (150, 40)).unwrap();
        run(128, cfg.kernel(kernel).kv_splits(splits));
    }
    // f16, MQA, all retrieval.
    let cfg = AttentionConfig::all_retrieval(1);
    let layout = CacheLayout::Contiguous;
    failures.extend(check::<f16>(
        &ctx,
        &mut rng,
        (4, 1, 128),
        1000,
        &SEQS,
        layout,
        &cfg,
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kvcache_paged_prefill_matches_reference() {
    let Some(ctx) = gpu_or_skip("kvcache_paged_prefill_matches_reference") else {
        return;
    };
    let mut rng = rng("kvcache paged prefill");
    let mut failures = Vec::new();
    for (d, page, splits) in [
        (128, 128, None),
        (64, 256, None),
        (128, 512, Some(3)),
        (64, 128, Some(32)),
    ] {
        let (cfg, layout) = (mixed(PrefillKernel::Auto, splits), CacheLayout::Paged(page));
        failures.extend(check::<bf16>(
            &ctx,
            &mut rng,
            (8, 2, d),
            1000,
            &SEQS,
            layout,
            &cfg,
        ));
    }
    let band = AttentionConfig::flash(8, false, (300, 10)).unwrap();
    failures.extend(check::<bf16>(
        &ctx,
        &mut rng,
        (8, 8, 128),
        1000,
        &SEQS,
        CacheLayout::Paged(256),
        &band,
    ));
    let (cfg, layout) = (
        AttentionConfig::all_streaming(2, 4, 100),
        CacheLayout::Paged(128),
    );
    failures.extend(check::<f16>(
        &ctx,
        &mut rng,
        (2, 2, 128),
        1000,
        &SEQS,
        layout,
        &cfg,
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// ALiBi over a caller's cache (the `_cache_alibi_` TMA builds, and the cp.async kernel's ALiBi
/// build): both layouts, with and without splits, D 64 and 128, mixed heads and a band, the
/// standard slopes and random ones per sequence (each query at its position in its cache).
#[test]
fn kvcache_alibi_matches_reference() {
    let test = "kvcache_alibi_matches_reference";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut failures = Vec::new();
    let (tma, cp_async) = (PrefillKernel::Auto, PrefillKernel::WgmmaWarpSpecialized);
    for (n, (layout, kernel, splits, d)) in [
        (CacheLayout::Contiguous, tma, None, 128),
        (CacheLayout::Contiguous, tma, Some(3), 64),
        (CacheLayout::Contiguous, cp_async, None, 128),
        (CacheLayout::Paged(128), tma, None, 64),
        (CacheLayout::Paged(256), tma, Some(3), 128),
    ]
    .into_iter()
    .enumerate()
    {
        for band in [false, true] {
            let standard = (n + band as usize).is_multiple_of(2);
            let slopes = alibi_slopes(&ctx, &mut rng, (8, SEQS.len()), standard);
            let cfg = if band {
                AttentionConfig::flash(2, false, (150, 40)).unwrap()
            } else {
                mixed(kernel, splits)
            };
            let cfg = cfg.kernel(kernel).kv_splits(splits).alibi(slopes);
            let heads = (8, 2, d);
            let found = check::<bf16>(&ctx, &mut rng, heads, 1000, &SEQS, layout, &cfg);
            failures.extend(found);
        }
    }
    let cfg = AttentionConfig::all_retrieval(2).alibi(alibi_slopes(
        &ctx,
        &mut rng,
        (8, SEQS.len()),
        false,
    ));
    let found = check::<f16>(
        &ctx,
        &mut rng,
        (8, 2, 128),
        1000,
        &SEQS,
        CacheLayout::Paged(128),
        &cfg,
    );
    failures.extend(found);
    notice(&format!("{test}: {} failed", failures.len()));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Small enough for compute-sanitizer (`run.sh sanitize`): both layouts, the TMA kernel with and
/// without split-KV, and the cp.async kernel; then ALiBi on two of them.
#[test]
fn sanitizer_small_kvcache_prefill() {
    let Some(ctx) = gpu_or_skip("sanitizer_small_kvcache_prefill") else {
        return;
    };
    let mut rng = rng("sanitizer kvcache prefill");
    let seqs = [(70, 200), (0, 9), (3, 3), (130, 130)];
    let mut failures = Vec::new();
    let (contiguous, paged) = (CacheLayout::Contiguous, CacheLayout::Paged(128));
    let (tma, cp_async) = (PrefillKernel::Auto, PrefillKernel::WgmmaWarpSpecialized);
    for (layout, kernel, splits) in [
        (contiguous, tma, None),
        (contiguous, cp_async, None),
        (paged, tma, None),
        (paged, tma, Some(2)),
    ] {
        let cfg = mixed(kernel, splits);
        failures.extend(check::<bf16>(
            &ctx,
            &mut rng,
            (4, 2, 64),
            256,
            &seqs,
            layout,
            &cfg,
        ));
    }
    // ALiBi's cache builds, slopes per sequence.
    for (layout, kernel, splits) in [(contiguous, cp_async, None), (paged, tma, Some(2))] {
        let slopes = alibi_slopes(&ctx, &mut rng, (4, seqs.len()), false);
        let cfg = mixed(kernel, splits).alibi(slopes);
        let found = check::<bf16>(&ctx, &mut rng, (4, 2, 64), 256, &seqs, layout, &cfg);
        failures.extend(found);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The device arrays are checked: a count past the cache, arrays on the wrong side of the
/// outputs, a page size the kernel cannot load whole, a kernel that cannot read pages.
#[test]
fn kvcache_prefill_errors() {
    let Some(ctx) = gpu_or_skip("kvcache_prefill_errors") else {
        return;
    };
    let (hq, hkv, d, s_max) = (4, 2, 64, 256);
    let q = ctx.alloc::<bf16, 3>([10, hq, d]).unwrap();
    let k = ctx.alloc::<bf16, 4>([2, s_max, hkv, d]).unwrap();
    let mut out = ctx.alloc::<bf16, 3>([10, hq, d]).unwrap();
    let mut lse = ctx.alloc::<f32, 2>([hq, 10]).unwrap();
    let cu = ctx.upload(&[0, 4, 10], [3]).unwrap();
    let cfg = mixed(PrefillKernel::Auto, None);
    let mut run = |lens: &[i32], cfg: &AttentionConfig| {
        let lens = ctx.upload(lens, [lens.len()]).unwrap();
        let (mut o, mut l) = (out.view_mut(), lse.view_mut());
        ctx.attention_kvcache(
            &q.view(),
            &k.view(),
            &k.view(),
            &mut o,
            &mut l,
            &cu,
            &lens,
            cfg,
        )
    };
    assert!(run(&[4, 256], &cfg).is_ok());
    let err = run(&[4, 257], &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidCacheSeqlens {
                seq: 1,
                got: 257,
                ..
            }
        ),
        "{err}"
    );
    let err = run(&[-1, 6], &cfg).unwrap_err();
    assert!(
        matches!(err, Error::InvalidCacheSeqlens { seq: 0, .. }),
        "{err}"
    );
    let err = run(&[4, 6, 8], &cfg).unwrap_err();
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

    let pages = |page: usize| ctx.alloc::<bf16, 4>([8, page, hkv, d]).unwrap();
    let table = ctx.upload(&[0, 1, 2, 3], [2, 2]).unwrap();
    let lens = ctx.upload(&[4, 200], [2]).unwrap();
    let mut paged = |pool: &duo_attn::DeviceTensor<bf16, 4>, cfg: &AttentionConfig| {
        let (mut o, mut l) = (out.view_mut(), lse.view_mut());
        let (p, t) = (pool.view(), table.view());
        ctx.attention_kvcache_paged(&q.view(), &p, &p, &mut o, &mut l, &t, &cu, &lens, cfg)
    };
    assert!(paged(&pages(128), &cfg).is_ok());
    let err = paged(&pages(64), &cfg).unwrap_err();
    assert!(matches!(err, Error::InvalidPagedKv { .. }), "{err}");
    let err = paged(&pages(96), &cfg).unwrap_err();
    assert!(matches!(err, Error::InvalidPagedKv { .. }), "{err}");
    let cp_async = mixed(PrefillKernel::WgmmaWarpSpecialized, None);
    let err = paged(&pages(128), &cp_async).unwrap_err();
    assert!(matches!(err, Error::InvalidPagedKv { .. }), "{err}");
    // 200 keys need two pages of 128, and the table rows hold two: 300 would not fit.
    let lens = ctx.upload(&[4, 300], [2]).unwrap();
    let (mut o, mut l) = (out.view_mut(), lse.view_mut());
    let pool = pages(128);
    let err = ctx
        .attention_kvcache_paged(
            &q.view(),
            &pool.view(),
            &pool.view(),
            &mut o,
            &mut l,
            &table.view(),
            &cu,
            &lens,
            &cfg,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidCacheSeqlens {
                seq: 1,
                got: 300,
                capacity: 256
            }
        ),
        "{err}"
    );
    ctx.synchronize().unwrap();
}
