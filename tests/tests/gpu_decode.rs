//! GPU tests of decode (plain K/V and the DuoAttention cache), the cache append, and chunked
//! prefill through the cache, against the float64 reference over the whole sequence so far.
//! Without a Hopper GPU each test prints a SKIPPED notice and passes.
use duo_attn::reference::Shape;
use duo_attn::{
    AttentionConfig, AttnElement, CacheConfig, CachePaging, Context, DeviceScalar, DeviceTensor,
    DuoCache, Error, HeadKind, PrefillKernel,
};
use duo_attn_tests::{
    Comparison, alibi_slopes, alternating_kinds, compare, compare_per_sequence_lengths,
    gpu_or_skip, kv_with_nan_tails, notice, random_tensor, rng, run_decode_case,
    run_scaled_keys_case, sanitizer_cache, tiny_cache,
};
use half::{bf16, f16};
use rand::{Rng, rngs::StdRng};

const R: HeadKind = HeadKind::Retrieval;
const S: HeadKind = HeadKind::Streaming;

fn to_f32<T: DeviceScalar>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

#[test]
fn decode_plain_matrix() {
    let Some(ctx) = gpu_or_skip("decode_plain_matrix") else {
        return;
    };
    let mut rng = rng("decode_plain_matrix");
    let mut failures = Vec::new();
    let mut cases = 0;
    for (b, hq, hkv) in [(1, 8, 2), (3, 4, 4), (2, 8, 1)] {
        for sk in [1, 17, 64, 1000, 5000] {
            for nq in [1, 4, 16] {
                for d in [64, 128, 256] {
                    // More new queries than keys (sk 1 or 1000 with 16) run too: the first
                    // queries, before every key, see none (causal rows of zeros, LSE -inf).
                    let shape = Shape {
                        batch: b,
                        seqlen_q: nq,
                        seqlen_k: sk,
                        heads_q: hq,
                        heads_kv: hkv,
                        head_dim: d,
                    };
                    let kinds: Vec<_> = (0..hkv).map(|h| if h % 2 == 1 { S } else { R }).collect();
                    let cfg = AttentionConfig::new(kinds)
                        .sink(4)
                        .window(rng.random_range(1..300));
                    let cmp = if (sk + nq + d) % 2 == 0 {
                        run_decode_case::<bf16>(&ctx, &shape, &cfg, &mut rng)
                    } else {
                        run_decode_case::<f16>(&ctx, &shape, &cfg, &mut rng)
                    }
                    .unwrap();
                    cases += 1;
                    if !cmp.passed() {
                        failures.push(format!("{shape:?} window {}: {cmp:?}", cfg.window));
                    }
                }
            }
        }
    }
    notice(&format!(
        "decode_plain_matrix: {cases} cases, {} failed",
        failures.len()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A long MQA cache at B = 1: one row group of blocks takes most of the GPU, so the in-kernel
/// merge combines more than 32 splits (its lanes loop over splits; the matrix's caches are too
/// short for that since short caches get splits of at least four tiles).
/// Decode with a key count per sequence (`cache_seqlens`): counts past the K/V rows (clamped),
/// zero, under the query count, negative (clamped to 0), and in between, at every head dim, both
/// element types and causal and full retrieval heads. K/V rows past each count are NaN, so a
/// kernel that read one would fail.
#[test]
fn decode_with_cache_seqlens() {
    let Some(ctx) = gpu_or_skip("decode_with_cache_seqlens") else {
        return;
    };
    let mut rng = rng("cache seqlens");
    for d in [64, 128, 256] {
        for causal in [true, false] {
            let cfg = AttentionConfig::new(alternating_kinds(4))
                .sink(8)
                .window(700)
                .causal(causal);
            let (shape, lens) = seqlens_shape(d);
            let passed = if d == 128 {
                seqlens_case::<f16>(&ctx, &mut rng, &shape, &cfg, &lens)
            } else {
                seqlens_case::<bf16>(&ctx, &mut rng, &shape, &cfg, &lens)
            };
            assert!(passed, "D={d}, causal {causal}");
        }
    }
}

/// Seven sequences of 3 new queries over 3000-row K/V and their key counts: past the rows
/// (clamped), zero, under the query count, negative (clamped to 0) and in between.
fn seqlens_shape(d: usize) -> (Shape, [i32; 7]) {
    let shape = Shape {
        batch: 7,
        seqlen_q: 3,
        seqlen_k: 3000,
        heads_q: 16,
        heads_kv: 4,
        head_dim: d,
    };
    (shape, [99_999, 0, 2, 1500, 129, -7, 3000])
}

fn seqlens_case<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    shape: &Shape,
    cfg: &AttentionConfig,
    lens: &[i32],
) -> bool {
    let (q, q32) = random_tensor::<T>(rng, shape.q_len());
    let (k, k32) = kv_with_nan_tails::<T>(rng, shape, lens);
    let (v, v32) = kv_with_nan_tails::<T>(rng, shape, lens);
    let dq = ctx.upload(&q, shape.q_shape()).unwrap();
    let dk = ctx.upload(&k, shape.kv_shape()).unwrap();
    let dv = ctx.upload(&v, shape.kv_shape()).unwrap();
    let dlens = ctx.upload(lens, [lens.len()]).unwrap();
    let mut out = ctx.alloc::<T, 4>(shape.q_shape()).unwrap();
    let mut lse = ctx.alloc::<f32, 3>(shape.lse_shape()).unwrap();
    out.fill(T::nan()).unwrap();
    lse.fill(f32::NAN).unwrap();
    ctx.decode_attention_seqlens(
        &dq.view(),
        &dk.view(),
        &dv.view(),
        &mut out.view_mut(),
        &mut lse.view_mut(),
        &dlens.view(),
        cfg,
    )
    .unwrap();
    ctx.synchronize().unwrap();
    let out32 = to_f32(&out.to_host().unwrap());
    let lse = lse.to_host().unwrap();
    let cmps = compare_per_sequence_lengths(shape, cfg, &q32, &k32, &v32, &out32, &lse, lens);
    let case = format!(
        "cache_seqlens D={} {:?} causal {}",
        shape.head_dim,
        T::DTYPE,
        cfg.causal
    );
    all_passed(&case, &cmps, lens)
}

/// Prints each sequence's comparison; whether all passed.
fn all_passed(case: &str, cmps: &[Comparison], lens: &[i32]) -> bool {
    for (cmp, len) in cmps.iter().zip(lens) {
        notice(&format!("{case}, length {len}: {cmp:?}"));
    }
    cmps.iter().all(Comparison::passed)
}

/// Decode over paged K/V: pages shuffled through a pool, page sizes from 16 to 256 rows (under
/// and over the kernel's 64- or 128-key tiles), a count past the table row's capacity (clamped),
/// 0 and under the query count; every pool row no sequence owns is NaN, and table entries past a
/// sequence's pages point outside the pool (never read).
#[test]
fn decode_paged_kv() {
    let Some(ctx) = gpu_or_skip("decode_paged_kv") else {
        return;
    };
    let mut rng = rng("paged kv");
    // Pages stored [page, Hkv, D] (vLLM's layout) or, through strides, [Hkv, page, D].
    for (d, page, heads_major) in [
        (64, 16, false),
        (128, 32, false),
        (128, 256, true),
        (128, 16, true),
        (256, 16, false),
        (256, 128, true),
    ] {
        let cfg = AttentionConfig::new(alternating_kinds(4))
            .sink(8)
            .window(700);
        let lens = [1000, 0, 2, 99_999, 777, 1500];
        let passed = paged_case(&ctx, &mut rng, (d, page, heads_major), &cfg, &lens);
        assert!(passed, "D={d}, page {page}, heads major {heads_major}");
    }
}

fn paged_case(
    ctx: &Context,
    rng: &mut StdRng,
    (d, page, heads_major): (usize, usize, bool),
    cfg: &AttentionConfig,
    lens: &[i32],
) -> bool {
    let max_pages = 1500usize.div_ceil(page) + 1;
    let capacity = max_pages * page;
    let shape = Shape {
        batch: lens.len(),
        seqlen_q: 3,
        seqlen_k: capacity,
        heads_q: 16,
        heads_kv: 4,
        head_dim: d,
    };
    // Dense keys and values for the reference, then scattered into shuffled pages.
    let (q, q32) = random_tensor::<bf16>(rng, shape.q_len());
    let (k, k32) = random_tensor::<bf16>(rng, shape.kv_len());
    let (v, v32) = random_tensor::<bf16>(rng, shape.kv_len());
    let used: Vec<usize> = lens
        .iter()
        .map(|&l| (l.clamp(0, capacity as i32) as usize).div_ceil(page))
        .collect();
    let pages = used.iter().sum::<usize>() + 5;
    let mut order: Vec<usize> = (0..pages).collect();
    for i in (1..pages).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let row = shape.heads_kv * d;
    let mut k_pages = vec![bf16::NAN; pages * page * row];
    let mut v_pages = k_pages.clone();
    let mut table = vec![i32::MAX; lens.len() * max_pages];
    let mut next = 0;
    for (b, &n) in used.iter().enumerate() {
        for p in 0..n {
            let at = order[next];
            next += 1;
            table[b * max_pages + p] = at as i32;
            for r in 0..page {
                let key = p * page + r;
                if key >= (lens[b].clamp(0, capacity as i32) as usize) {
                    break;
                }
                for h in 0..shape.heads_kv {
                    let dense = (b * capacity + key) * row + h * d;
                    let paged = if heads_major {
                        ((at * shape.heads_kv + h) * page + r) * d
                    } else {
                        (at * page + r) * row + h * d
                    };
                    k_pages[paged..paged + d].copy_from_slice(&k[dense..dense + d]);
                    v_pages[paged..paged + d].copy_from_slice(&v[dense..dense + d]);
                }
            }
        }
        // Past its pages: an index outside the pool, clamped if it were ever read.
        if n < max_pages {
            table[b * max_pages + n] = -1;
        }
    }
    let dq = ctx.upload(&q, shape.q_shape()).unwrap();
    let pool = [pages, page, shape.heads_kv, d];
    let strides = if heads_major {
        [row * page, d, page * d, 1]
    } else {
        [page * row, row, d, 1]
    };
    let dk = ctx.upload(&k_pages, pool).unwrap();
    let dv = ctx.upload(&v_pages, pool).unwrap();
    let dtable = ctx.upload(&table, [lens.len(), max_pages]).unwrap();
    let dlens = ctx.upload(lens, [lens.len()]).unwrap();
    let mut out = ctx.alloc::<bf16, 4>(shape.q_shape()).unwrap();
    let mut lse = ctx.alloc::<f32, 3>(shape.lse_shape()).unwrap();
    out.fill(bf16::NAN).unwrap();
    lse.fill(f32::NAN).unwrap();
    ctx.decode_attention_paged(
        &dq.view(),
        &dk.strided_view(0, pool, strides).unwrap(),
        &dv.strided_view(0, pool, strides).unwrap(),
        &mut out.view_mut(),
        &mut lse.view_mut(),
        &dtable.view(),
        &dlens.view(),
        cfg,
    )
    .unwrap();
    ctx.synchronize().unwrap();
    let out32 = to_f32(&out.to_host().unwrap());
    let lse = lse.to_host().unwrap();
    let cmps = compare_per_sequence_lengths(&shape, cfg, &q32, &k32, &v32, &out32, &lse, lens);
    let case = format!("paged D={d}, page {page}, heads major {heads_major}");
    all_passed(&case, &cmps, lens)
}

/// ALiBi in decode (the `duo_decode_alibi_*` entries): contiguous K/V over a GQA matrix (every
/// head dim, 1 to 16 new queries, caches short to long enough to split, mixed heads and
/// non-causal retrieval heads), per-sequence key counts, and paged K/V of pages under and over a
/// tile (the per-row and per-tile lookups); standard slopes and random ones per sequence.
#[test]
fn decode_alibi_matches_reference() {
    let test = "decode_alibi_matches_reference";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut failures = Vec::new();
    let mut cases = 0;
    for d in [64, 128, 256] {
        for (sk, nq) in [(1, 1), (300, 4), (5000, 1), (20_000, 16)] {
            for causal in [true, false] {
                cases += 1;
                let shape = Shape {
                    batch: 2,
                    seqlen_q: nq,
                    seqlen_k: sk,
                    heads_q: 8,
                    heads_kv: 2,
                    head_dim: d,
                };
                let slopes = alibi_slopes(&ctx, &mut rng, (8, 2), cases % 2 == 0);
                let cfg = AttentionConfig::new(vec![S, R])
                    .sink(4)
                    .window(200)
                    .causal(causal)
                    .alibi(slopes);
                let cmp = if cases % 3 == 0 {
                    run_decode_case::<f16>(&ctx, &shape, &cfg, &mut rng)
                } else {
                    run_decode_case::<bf16>(&ctx, &shape, &cfg, &mut rng)
                }
                .unwrap();
                let label = format!("{shape:?} causal {causal} {:?}: {cmp:?}", cfg.alibi);
                notice(&format!("{test}: {label}"));
                if !cmp.passed() {
                    failures.push(label);
                }
            }
        }
    }
    for d in [64, 128, 256] {
        cases += 1;
        let (shape, lens) = seqlens_shape(d);
        let cfg = AttentionConfig::new(alternating_kinds(4))
            .sink(8)
            .window(700)
            .alibi(alibi_slopes(&ctx, &mut rng, (16, 7), false));
        if !seqlens_case::<bf16>(&ctx, &mut rng, &shape, &cfg, &lens) {
            failures.push(format!("cache_seqlens D={d}"));
        }
    }
    for (d, page, heads_major) in [(64, 16, false), (128, 256, true), (256, 128, false)] {
        cases += 1;
        let cfg = AttentionConfig::new(alternating_kinds(4))
            .sink(8)
            .window(700)
            .alibi(alibi_slopes(&ctx, &mut rng, (16, 6), d == 128));
        let lens = [1000, 0, 2, 99_999, 777, 1500];
        if !paged_case(&ctx, &mut rng, (d, page, heads_major), &cfg, &lens) {
            failures.push(format!("paged D={d}, page {page}"));
        }
    }
    notice(&format!("{test}: {cases} cases, {} failed", failures.len()));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Small ALiBi decodes for compute-sanitizer (`run.sh sanitize`): contiguous with per-sequence
/// counts and paged by rows and by tiles, random slopes per sequence.
#[test]
fn decode_alibi_small_launches() {
    let test = "decode_alibi_small_launches";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let cfg = AttentionConfig::new(alternating_kinds(4))
        .sink(8)
        .window(300)
        .alibi(alibi_slopes(&ctx, &mut rng, (16, 3), false));
    let lens = [700, 0, 300];
    let shape = Shape {
        batch: 3,
        seqlen_q: 2,
        seqlen_k: 700,
        heads_q: 16,
        heads_kv: 4,
        head_dim: 128,
    };
    assert!(seqlens_case::<bf16>(&ctx, &mut rng, &shape, &cfg, &lens));
    for page in [16, 128] {
        assert!(paged_case(&ctx, &mut rng, (64, page, false), &cfg, &lens));
    }
}

#[test]
fn decode_merges_many_splits() {
    let Some(ctx) = gpu_or_skip("decode_merges_many_splits") else {
        return;
    };
    let mut rng = rng("decode many splits");
    let mut failures = Vec::new();
    for nq in [1, 4] {
        let shape = Shape {
            batch: 1,
            seqlen_q: nq,
            seqlen_k: 40_000,
            heads_q: 8,
            heads_kv: 1,
            head_dim: 128,
        };
        let cfg = AttentionConfig::new(vec![R]);
        let cmp = run_decode_case::<bf16>(&ctx, &shape, &cfg, &mut rng).unwrap();
        notice(&format!("decode many splits, queries={nq}: {cmp:?}"));
        if !cmp.passed() {
            failures.push(format!("queries={nq}: {cmp:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Row groups of 2 to 16 splits merge in thread-block clusters through distributed shared memory
/// (`Context::set_decode_clusters`, on by default); off, the same launches merge through the
/// global partials. Both against the reference, over caches that split 2 to 16 ways (and 1, where
/// each block writes its rows), streaming row groups of one split beside clustered retrieval
/// ones, layers of streaming heads only (which split alike), every head dim and both types.
#[test]
fn decode_cluster_merge_matches_reference() {
    let Some(mut ctx) = gpu_or_skip("decode_cluster_merge_matches_reference") else {
        return;
    };
    let mut rng = rng("decode_cluster_merge_matches_reference");
    let mut failures = Vec::new();
    let mut cases = 0;
    for clusters in [true, false] {
        ctx.set_decode_clusters(clusters);
        for (hq, kinds, window) in [
            (8, vec![R, S], 200),
            (4, vec![R, R, S, S], 100),
            (8, vec![S, S], 3000),
        ] {
            for sk in [300, 1500, 3000, 6000] {
                for (nq, d) in [(1, 128), (4, 64), (16, 256), (3, 128)] {
                    let shape = Shape {
                        batch: 1,
                        seqlen_q: nq,
                        seqlen_k: sk,
                        heads_q: hq,
                        heads_kv: kinds.len(),
                        head_dim: d,
                    };
                    let cfg = AttentionConfig::new(kinds.clone()).sink(4).window(window);
                    let cmp = if d == 64 {
                        run_decode_case::<f16>(&ctx, &shape, &cfg, &mut rng)
                    } else {
                        run_decode_case::<bf16>(&ctx, &shape, &cfg, &mut rng)
                    }
                    .unwrap();
                    cases += 1;
                    if !cmp.passed() {
                        failures.push(format!("clusters {clusters} {shape:?} {kinds:?}: {cmp:?}"));
                    }
                }
            }
        }
    }
    notice(&format!(
        "decode_cluster_merge_matches_reference: {cases} cases, {} failed",
        failures.len()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Scores that grow along the keys (see `gpu_prefill`'s test of the same name): the running max
/// of every split keeps moving, so the output rescale works with factors well below 1.
#[test]
fn decode_growing_scores_rescale_the_output() {
    let Some(ctx) = gpu_or_skip("decode_growing_scores_rescale_the_output") else {
        return;
    };
    let mut rng = rng("decode growing scores");
    let mut failures = Vec::new();
    for d in [64, 128, 256] {
        for nq in [1, 16] {
            let shape = Shape {
                batch: 2,
                seqlen_q: nq,
                seqlen_k: 9000,
                heads_q: 8,
                heads_kv: 2,
                head_dim: d,
            };
            let cfg = AttentionConfig::new(vec![R, S]).sink(16).window(2000);
            let cmp =
                run_scaled_keys_case::<bf16>(&ctx, &shape, &cfg, &mut rng, true, 8.0).unwrap();
            notice(&format!(
                "decode growing scores D={d} queries={nq}: {cmp:?}"
            ));
            if !cmp.passed() {
                failures.push(format!("D={d} queries={nq}: {cmp:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Host copy of every token's K/V of one layer, to run the reference on the whole sequence.
struct History {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
}

/// Rows of positions `0..len` of a `[B, T, H, D]` history as a dense `[B, len, H, D]` array.
fn prefix(x: &[f32], b: usize, total: usize, len: usize, hd: usize) -> Vec<f32> {
    (0..b)
        .flat_map(|bi| x[bi * total * hd..][..len * hd].iter().copied())
        .collect()
}

/// Runs a schedule of (tokens per call) through `DuoCache::forward` on `layers` layers and
/// compares every call's output with the reference over the sequence so far.
#[allow(clippy::too_many_arguments)]
fn cache_schedule<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    kinds: Vec<Vec<HeadKind>>,
    cfg: CacheConfig,
    schedule: &[usize],
    label: &str,
) -> Vec<String> {
    let total: usize = schedule.iter().sum();
    let (b, hq, hkv, d) = (cfg.batch, cfg.heads_q, cfg.heads_kv, cfg.head_dim);
    let mut cache = DuoCache::<T>::new(ctx, cfg.clone(), kinds.clone()).unwrap();
    let layers = kinds.len();
    let mut hist: Vec<History> = (0..layers)
        .map(|_| History {
            k: vec![0.0; b * total * hkv * d],
            v: vec![0.0; b * total * hkv * d],
            len: 0,
        })
        .collect();
    let mut failures = Vec::new();
    for (step, &n) in schedule.iter().enumerate() {
        for (layer, h) in hist.iter_mut().enumerate() {
            let (q, q32) = random_tensor::<T>(rng, b * n * hq * d);
            let (k, k32) = random_tensor::<T>(rng, b * n * hkv * d);
            let (v, v32) = random_tensor::<T>(rng, b * n * hkv * d);
            for bi in 0..b {
                let dst = (bi * total + h.len) * hkv * d;
                let src = bi * n * hkv * d;
                h.k[dst..dst + n * hkv * d].copy_from_slice(&k32[src..src + n * hkv * d]);
                h.v[dst..dst + n * hkv * d].copy_from_slice(&v32[src..src + n * hkv * d]);
            }
            h.len += n;
            let dq = ctx.upload(&q, [b, n, hq, d]).unwrap();
            let dk = ctx.upload(&k, [b, n, hkv, d]).unwrap();
            let dv = ctx.upload(&v, [b, n, hkv, d]).unwrap();
            let mut out = ctx.alloc::<T, 4>([b, n, hq, d]).unwrap();
            let mut lse = ctx.alloc::<f32, 3>([b, hq, n]).unwrap();
            out.fill(T::nan()).unwrap();
            lse.fill(f32::NAN).unwrap();
            cache
                .forward(
                    ctx,
                    layer,
                    &dq.view(),
                    &dk.view(),
                    &dv.view(),
                    &mut out.view_mut(),
                    &mut lse.view_mut(),
                )
                .unwrap();
            ctx.synchronize().unwrap();
            assert_eq!(cache.len(layer).unwrap(), h.len);
            let shape = Shape {
                batch: b,
                seqlen_q: n,
                seqlen_k: h.len,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
            };
            let kk = prefix(&h.k, b, total, h.len, hkv * d);
            let vv = prefix(&h.v, b, total, h.len, hkv * d);
            let rows: Vec<_> = (0..b)
                .flat_map(|bi| (0..hq).flat_map(move |hh| (0..n).map(move |i| (bi, hh, i))))
                .filter(|_| n <= 64 || rng.random_bool(0.25))
                .collect();
            let attn = cache.attention_config(layer).unwrap();
            let cmp = compare(
                &shape,
                attn,
                &q32,
                &kk,
                &vv,
                &to_f32(&out.to_host().unwrap()),
                &lse.to_host().unwrap(),
                &rows,
            );
            if !cmp.passed() {
                failures.push(format!(
                    "{label}: step {step} (n {n}, len {}) layer {layer}: {cmp:?}",
                    h.len
                ));
            }
        }
    }
    failures
}

#[test]
fn cache_chunked_prefill_then_decode_matches_reference() {
    let Some(ctx) = gpu_or_skip("cache_chunked_prefill_then_decode_matches_reference") else {
        return;
    };
    let mut rng = rng("cache_chunked_prefill_then_decode_matches_reference");
    let mut failures = Vec::new();
    // Small windows so the rings wrap many times; chunks larger and smaller than the ring.
    let schedule = [100, 1, 150, 37, 300, 1, 1, 3, 16, 7, 1, 1, 2, 16, 16, 1];
    for (d, kernel) in [
        (128, PrefillKernel::Auto),
        (64, PrefillKernel::MmaSync),
        (256, PrefillKernel::Auto),
    ] {
        let cfg = CacheConfig {
            batch: 2,
            max_len: 700,
            heads_q: 8,
            heads_kv: 4,
            head_dim: d,
            sink: 4,
            window: 40,
            softmax_scale: None,
            prefill_kernel: kernel,
            paging: None,
        };
        let kinds = vec![vec![R, S, S, R], vec![S, S, S, S], vec![R, R, R, R]];
        let label = format!("bf16 d{d} {kernel:?}");
        failures.extend(cache_schedule::<bf16>(
            &ctx, &mut rng, kinds, cfg, &schedule, &label,
        ));
    }
    // fp16, MQA, a sink larger than the window, one decode-only start after a 1-token prefill.
    let cfg = CacheConfig {
        batch: 1,
        max_len: 400,
        heads_q: 6,
        heads_kv: 1,
        head_dim: 128,
        sink: 70,
        window: 9,
        softmax_scale: Some(0.05),
        prefill_kernel: PrefillKernel::Auto,
        paging: None,
    };
    let schedule = [1, 1, 5, 200, 16, 1, 64, 1];
    failures.extend(cache_schedule::<f16>(
        &ctx,
        &mut rng,
        vec![vec![S], vec![R]],
        cfg,
        &schedule,
        "f16 MQA",
    ));
    notice(&format!(
        "cache_chunked_prefill_then_decode_matches_reference: {} failures",
        failures.len()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cache_append_places_rows_by_kind() {
    let Some(ctx) = gpu_or_skip("cache_append_places_rows_by_kind") else {
        return;
    };
    let (b, hkv, d) = (2, 3, 64);
    let cfg = CacheConfig {
        batch: b,
        max_len: 64,
        heads_q: 3,
        heads_kv: hkv,
        head_dim: d,
        sink: 2,
        window: 3, // ring: 2 sink + 3 + 15 = 18 recent slots
        softmax_scale: None,
        prefill_kernel: PrefillKernel::Auto,
        paging: None,
    };
    let mut cache = DuoCache::<bf16>::new(&ctx, cfg, vec![vec![R, S, R]]).unwrap();
    let (sink, recent) = cache.ring_shape();
    // Value encodes (batch, position, head, column) exactly in bf16 (integers < 256).
    let value =
        |bi: usize, pos: usize, h: usize, c: usize| ((bi * 7 + pos * 3 + h * 5 + c) % 251) as f32;
    let mut len = 0;
    for n in [5, 1, 30, 2, 9] {
        let mut k = vec![bf16::ZERO; b * n * hkv * d];
        for bi in 0..b {
            for i in 0..n {
                for h in 0..hkv {
                    for c in 0..d {
                        k[((bi * n + i) * hkv + h) * d + c] =
                            bf16::from_f32(value(bi, len + i, h, c));
                    }
                }
            }
        }
        let neg: Vec<bf16> = k.iter().map(|x| -*x).collect();
        let dk = ctx.upload(&k, [b, n, hkv, d]).unwrap();
        let dv = ctx.upload(&neg, [b, n, hkv, d]).unwrap();
        cache.append(&ctx, 0, &dk.view(), &dv.view()).unwrap();
        len += n;
    }
    ctx.synchronize().unwrap();
    let (full, ring) = cache.download(0).unwrap();
    let (fk, fv) = full.unwrap();
    let (rk, rv) = ring.unwrap();
    for bi in 0..b {
        for pos in 0..len {
            for (rank, h) in [(0, 0), (1, 2)] {
                let at = ((bi * 2 + rank) * 64 + pos) * d + 5; // [B, H_retrieval, max_len, D]
                assert_eq!(
                    fk[at].to_f32(),
                    value(bi, pos, h, 5),
                    "full k b{bi} pos {pos} head {h}"
                );
                assert_eq!(fv[at].to_f32(), -value(bi, pos, h, 5));
            }
        }
        let slots = sink + recent;
        for slot in 0..slots {
            let pos = duo_attn_kernels::ring::position_of(
                slot as i32,
                len as i32,
                sink as i32,
                recent as i32,
            );
            assert!(pos >= 0, "slot {slot} empty after {len} tokens");
            let at = (bi * slots + slot) * d + 9; // [B, 1 streaming head, slots, D]
            assert_eq!(
                rk[at].to_f32(),
                value(bi, pos as usize, 1, 9),
                "ring slot {slot}"
            );
            assert_eq!(rv[at].to_f32(), -value(bi, pos as usize, 1, 9));
        }
    }
}

#[test]
fn cache_errors() {
    let Some(ctx) = gpu_or_skip("cache_errors") else {
        return;
    };
    let mut cache = DuoCache::<bf16>::new(&ctx, tiny_cache(1, 32), vec![vec![R, S]]).unwrap();
    let x = |n: usize| {
        ctx.upload(&vec![bf16::ONE; n * 2 * 64], [1, n, 2, 64])
            .unwrap()
    };
    let (q, k, v) = (x(20), x(20), x(20));
    let mut out = ctx.alloc::<bf16, 4>([1, 20, 2, 64]).unwrap();
    let mut lse = ctx.alloc::<f32, 3>([1, 2, 20]).unwrap();
    // `forward` (the dispatcher) or `decode` directly.
    let mut call = |cache: &mut DuoCache<bf16>, layer: usize, decode: bool| {
        let (q, k, v) = (q.view(), k.view(), v.view());
        let (o, l) = (&mut out.view_mut(), &mut lse.view_mut());
        if decode {
            cache.decode(&ctx, layer, &q, &k, &v, o, l)
        } else {
            cache.forward(&ctx, layer, &q, &k, &v, o, l)
        }
    };
    assert!(matches!(
        call(&mut cache, 1, false),
        Err(Error::LayerOutOfRange {
            layer: 1,
            layers: 1
        })
    ));
    call(&mut cache, 0, false).unwrap();
    assert!(matches!(
        call(&mut cache, 0, false),
        Err(Error::CacheFull {
            capacity: 32,
            slot: 0,
            len: 20,
            adding: 20
        })
    ));
    let err = call(&mut cache, 0, true);
    assert!(matches!(
        err,
        Err(Error::CacheFull { .. }) | Err(Error::DecodeQueryBlock { .. })
    ));
    cache.reset(&ctx).unwrap();
    let err = call(&mut cache, 0, true);
    assert!(
        matches!(err, Err(Error::DecodeQueryBlock { got: 20, max: 16 })),
        "{err:?}"
    );
    ctx.synchronize().unwrap();
}

/// A small schedule that exercises every decode-side kernel (gather, append, split-KV prefill,
/// decode with its in-kernel split merge) quickly enough for compute-sanitizer (`run.sh sanitize`).
#[test]
fn sanitizer_small_cache_schedule() {
    let Some(ctx) = gpu_or_skip("sanitizer_small_cache_schedule") else {
        return;
    };
    let mut rng = rng("sanitizer_small_cache_schedule");
    let cfg = sanitizer_cache(1, 160);
    let failures = cache_schedule::<bf16>(
        &ctx,
        &mut rng,
        vec![vec![R, S]],
        cfg,
        &[20, 1, 3, 70, 1, 16],
        "small",
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One call's inputs and outputs in [`queued_steps`]: q, k, v, out, lse.
type StepTensors<T> = (
    DeviceTensor<T, 4>,
    DeviceTensor<T, 4>,
    DeviceTensor<T, 4>,
    DeviceTensor<T, 4>,
    DeviceTensor<f32, 3>,
);

/// Runs `schedule` through a fresh cache over every layer and returns each call's output and
/// LSE bits. `sync`: the host waits after every call; else the whole schedule is queued at once,
/// so kernel follows kernel on the stream.
fn queued_steps(
    ctx: &Context,
    cfg: &CacheConfig,
    kinds: &[Vec<HeadKind>],
    calls: &mut [StepTensors<bf16>],
    sync: bool,
) -> Vec<(Vec<u16>, Vec<u32>)> {
    let mut cache = DuoCache::<bf16>::new(ctx, cfg.clone(), kinds.to_vec()).unwrap();
    for (_, _, _, out, lse) in calls.iter_mut() {
        out.fill(bf16::NAN).unwrap();
        lse.fill(f32::NAN).unwrap();
    }
    ctx.synchronize().unwrap();
    for (i, (q, k, v, out, lse)) in calls.iter_mut().enumerate() {
        let layer = i % kinds.len();
        let (q, k, v) = (q.view(), k.view(), v.view());
        let (mut out, mut lse) = (out.view_mut(), lse.view_mut());
        cache
            .forward(ctx, layer, &q, &k, &v, &mut out, &mut lse)
            .unwrap();
        if sync {
            ctx.synchronize().unwrap();
        }
    }
    ctx.synchronize().unwrap();
    calls
        .iter()
        .map(|(_, _, _, out, lse)| {
            let out = out.to_host().unwrap().iter().map(|x| x.to_bits()).collect();
            let lse = lse.to_host().unwrap().iter().map(|x| x.to_bits()).collect();
            (out, lse)
        })
        .collect()
}

/// Dependent launches (the default: each kernel may start while the one before it finishes and
/// waits on the device for it) over a whole queued schedule, prefill chunks and decode steps of
/// every layer back to back, give the same bits as plain launches with the host waiting after
/// every call. The other cache tests check those against the float64 reference.
#[test]
fn queued_dependent_launches_match_synchronized_plain_ones() {
    let Some(mut ctx) = gpu_or_skip("queued_dependent_launches_match_synchronized_plain_ones")
    else {
        return;
    };
    let mut rng = rng("queued_dependent_launches_match_synchronized_plain_ones");
    let kinds = vec![vec![R, S, S, R], vec![S, S, S, S], vec![R, R, R, R]];
    let schedule = [300, 1, 1, 16, 1, 130, 1, 3, 1, 1];
    let mut mismatches = Vec::new();
    for paging in [
        None,
        Some(CachePaging {
            page_size: 128,
            pages: 3 * 6,
        }),
    ] {
        let cfg = CacheConfig {
            batch: 3,
            max_len: 700,
            heads_q: 8,
            heads_kv: 4,
            head_dim: 128,
            sink: 4,
            window: 40,
            softmax_scale: None,
            prefill_kernel: PrefillKernel::Auto,
            paging,
        };
        let (b, hq, hkv, d) = (cfg.batch, cfg.heads_q, cfg.heads_kv, cfg.head_dim);
        let mut calls: Vec<StepTensors<bf16>> = schedule
            .iter()
            .flat_map(|&n| std::iter::repeat_n(n, kinds.len()))
            .map(|n| {
                let mut up = |heads: usize| {
                    let (x, _) = random_tensor::<bf16>(&mut rng, b * n * heads * d);
                    ctx.upload(&x, [b, n, heads, d]).unwrap()
                };
                (
                    up(hq),
                    up(hkv),
                    up(hkv),
                    ctx.alloc::<bf16, 4>([b, n, hq, d]).unwrap(),
                    ctx.alloc::<f32, 3>([b, hq, n]).unwrap(),
                )
            })
            .collect();
        ctx.set_dependent_launch(false);
        let plain = queued_steps(&ctx, &cfg, &kinds, &mut calls, true);
        ctx.set_dependent_launch(true);
        let queued = queued_steps(&ctx, &cfg, &kinds, &mut calls, false);
        for (i, (p, q)) in plain.iter().zip(&queued).enumerate() {
            if p != q {
                mismatches.push(format!(
                    "paging {paging:?}: call {i} (layer {}) differs",
                    i % kinds.len()
                ));
            }
            if p.1.iter().any(|&x| f32::from_bits(x).is_nan()) {
                mismatches.push(format!("paging {paging:?}: call {i} left NaN in its LSE"));
            }
        }
    }
    notice(&format!(
        "queued_dependent_launches_match_synchronized_plain_ones: {} mismatches",
        mismatches.len()
    ));
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
