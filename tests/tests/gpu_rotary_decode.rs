//! RoPE fused into decode steps (`NewKv::rotated` with `Context::decode_attention_append` and
//! `_paged_append`, `Context::append_kv`, `DuoCache::decode_rotary`) against the same steps run
//! on inputs turned first by `Context::apply_rotary_to`, which `gpu_rotary` checks against the
//! float64 reference (and the steps without a table, which `gpu_kv_append` and
//! `gpu_cache_slots` check): outputs, LSE, caches and counts must match bit for bit, and the
//! caller's q and k must be left as they were. Tables of every kind the kernels treat apart:
//! halves of the whole head dim (turned in registers), interleaved pairs, and a rotary dim of
//! half the head dim (at D <= 128 halves paired: Q turned before the step), over contiguous
//! caches and pages under a KV tile (D = 64: the keys turn in an append launched first) and over
//! one (D = 256: likewise). The last sequence's positions run past the table: those rows stay.
use duo_attn::{
    AttentionConfig, AttnElement, CacheConfig, Context, DeviceTensor, DuoCache, Error, HeadKind,
    NewKv, PrefillKernel, RotaryPositions, RotaryTable, SeqlensUpdate,
};
use duo_attn_tests::{
    CacheLayout, alternating_kinds, gpu_or_skip, notice, random_tensor, rng, sanitizer_cache,
    scatter_pages, shuffled_pages,
};
use half::{bf16, f16};
use rand::Rng;
use rand::rngs::StdRng;

/// Keys per sequence of a caller's cache (whole pages of 16 and 128).
const CAPACITY: usize = 1024;
/// Counts before the step; the last sequence's new rows straddle the table's end.
const LENS: [i32; 4] = [0, 37, 700, 1000];
/// Positions in the tables.
const TABLE_ROWS: usize = 1003;

/// A table of random angles: `rotary_dim` elements turn, pairs interleaved or not.
fn random_table(
    ctx: &Context,
    rng: &mut StdRng,
    rotary_dim: usize,
    interleaved: bool,
) -> RotaryTable {
    let (cos, sin): (Vec<f32>, Vec<f32>) = (0..TABLE_ROWS * rotary_dim / 2)
        .map(|_| {
            let a: f64 = rng.random_range(-10.0..10.0);
            (a.cos() as f32, a.sin() as f32)
        })
        .unzip();
    RotaryTable::new(ctx, &cos, &sin, rotary_dim, interleaved).unwrap()
}

/// The tables of head dim `d`: (rotary dim, interleaved).
fn table_kinds(d: usize) -> [(usize, bool); 4] {
    [(d, false), (d, true), (d / 2, false), (d / 2, true)]
}

/// Whether two device tensors hold the same bits (NaN matching NaN).
fn same_bits<T: AttnElement, const N: usize>(
    a: &DeviceTensor<T, N>,
    b: &DeviceTensor<T, N>,
) -> bool {
    same_host(&a.to_host().unwrap(), &b.to_host().unwrap())
}

fn same_host<T: AttnElement>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let (x, y) = (x.to_f32(), y.to_f32());
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        })
}

fn same_f32<const N: usize>(a: &DeviceTensor<f32, N>, b: &DeviceTensor<f32, N>) -> bool {
    let (a, b) = (a.to_host().unwrap(), b.to_host().unwrap());
    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A caller's KV cache on the device: `[B, CAPACITY, Hkv, D]`, or a shuffled pool of pages and
/// its block table.
struct CallerCache<T: AttnElement> {
    k: DeviceTensor<T, 4>,
    v: DeviceTensor<T, 4>,
    table: Option<DeviceTensor<i32, 2>>,
    lens: DeviceTensor<i32, 1>,
}

impl<T: AttnElement> CallerCache<T> {
    /// Two equal caches of random rows.
    fn pair(
        ctx: &Context,
        rng: &mut StdRng,
        (hkv, d): (usize, usize),
        layout: CacheLayout,
    ) -> [Self; 2] {
        let b = LENS.len();
        let row = hkv * d;
        let (k, _) = random_tensor::<T>(rng, b * CAPACITY * row);
        let (v, _) = random_tensor::<T>(rng, b * CAPACITY * row);
        let order = match layout {
            CacheLayout::Paged(page) => Some((page, shuffled_pages(rng, b * CAPACITY / page + 2))),
            CacheLayout::Contiguous => None,
        };
        [0, 1].map(|_| {
            let (k, v, table) = match &order {
                None => {
                    let shape = [b, CAPACITY, hkv, d];
                    (
                        ctx.upload(&k, shape).unwrap(),
                        ctx.upload(&v, shape).unwrap(),
                        None,
                    )
                }
                Some((page, order)) => {
                    let pool = [order.len(), *page, hkv, d];
                    let scatter =
                        |x: &[T]| scatter_pages(x, (CAPACITY, row), *page, order, T::nan());
                    let per_seq = CAPACITY / page;
                    let table = ctx.upload(&order[..b * per_seq], [b, per_seq]).unwrap();
                    (
                        ctx.upload(&scatter(&k), pool).unwrap(),
                        ctx.upload(&scatter(&v), pool).unwrap(),
                        Some(table),
                    )
                }
            };
            CallerCache {
                k,
                v,
                table,
                lens: ctx.upload(&LENS, [b]).unwrap(),
            }
        })
    }

    /// A decode step with its append over this cache.
    fn decode(
        &mut self,
        ctx: &Context,
        q: &DeviceTensor<T, 4>,
        new: NewKv<'_, T>,
        (out, lse): (&mut DeviceTensor<T, 4>, &mut DeviceTensor<f32, 3>),
        cfg: &AttentionConfig,
    ) -> Result<(), Error> {
        let (k, v) = (&mut self.k.view_mut(), &mut self.v.view_mut());
        let (o, l, lens) = (
            &mut out.view_mut(),
            &mut lse.view_mut(),
            &mut self.lens.view_mut(),
        );
        match &self.table {
            None => ctx.decode_attention_append(&q.view(), k, v, new, o, l, lens, cfg),
            Some(t) => {
                ctx.decode_attention_paged_append(&q.view(), k, v, new, o, l, &t.view(), lens, cfg)
            }
        }
    }

    fn same_as(&self, other: &Self) -> bool {
        same_bits(&self.k, &other.k)
            && same_bits(&self.v, &other.v)
            && self.lens.to_host().unwrap() == other.lens.to_host().unwrap()
    }
}

/// A copy of `x` turned by `table` at the positions `lens[b] + s`.
fn turned<T: AttnElement>(
    ctx: &Context,
    x: &DeviceTensor<T, 4>,
    table: &RotaryTable,
    lens: &DeviceTensor<i32, 1>,
) -> DeviceTensor<T, 4> {
    let mut out = ctx.alloc::<T, 4>(x.shape()).unwrap();
    let pos = RotaryPositions::PerSequence(lens.view());
    ctx.apply_rotary_to(&x.view(), &mut out.view_mut(), table, pos)
        .unwrap();
    out
}

/// One decode step with a table, fused and after `apply_rotary_to`; whether every output,
/// cache element and count agrees and the inputs stayed.
fn decode_case<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    (d, layout, n): (usize, CacheLayout, usize),
    (rotary_dim, interleaved): (usize, bool),
    cfg: &AttentionConfig,
    update: SeqlensUpdate,
) -> bool {
    let (b, hkv) = (LENS.len(), cfg.head_kinds.len());
    let hq = 2 * hkv;
    let table = random_table(ctx, rng, rotary_dim, interleaved);
    let [mut fused, mut unfused] = CallerCache::<T>::pair(ctx, rng, (hkv, d), layout);
    let upload = |rng: &mut StdRng, shape: [usize; 4]| {
        let (x, _) = random_tensor::<T>(rng, shape.iter().product());
        (ctx.upload(&x, shape).unwrap(), x)
    };
    let (q, q_host) = upload(rng, [b, n, hq, d]);
    let (k, k_host) = upload(rng, [b, n, hkv, d]);
    let (v, _) = upload(rng, [b, n, hkv, d]);
    let nan_out = vec![T::nan(); b * n * hq * d];
    let mut outs = [0, 1].map(|_| ctx.upload(&nan_out, [b, n, hq, d]).unwrap());
    let mut lses = [0, 1].map(|_| ctx.upload(&vec![f32::NAN; b * hq * n], [b, hq, n]).unwrap());
    fn new<'a, T: AttnElement>(
        k: &'a DeviceTensor<T, 4>,
        v: &'a DeviceTensor<T, 4>,
        update: SeqlensUpdate,
    ) -> NewKv<'a, T> {
        match update {
            SeqlensUpdate::Keep => NewKv::keep(k.view(), v.view()),
            SeqlensUpdate::Advance => NewKv::advance(k.view(), v.view()),
        }
    }
    let [out_f, out_u] = &mut outs;
    let [lse_f, lse_u] = &mut lses;
    fused
        .decode(
            ctx,
            &q,
            new(&k, &v, update).rotated(&table),
            (out_f, lse_f),
            cfg,
        )
        .unwrap();
    let q_turned = turned(ctx, &q, &table, &unfused.lens);
    let k_turned = turned(ctx, &k, &table, &unfused.lens);
    unfused
        .decode(
            ctx,
            &q_turned,
            new(&k_turned, &v, update),
            (out_u, lse_u),
            cfg,
        )
        .unwrap();
    ctx.synchronize().unwrap();
    let checks = [
        ("out", same_bits(out_f, out_u)),
        ("lse", same_f32(lse_f, lse_u)),
        ("cache", fused.same_as(&unfused)),
        ("q kept", same_host(&q.to_host().unwrap(), &q_host)),
        ("k kept", same_host(&k.to_host().unwrap(), &k_host)),
        ("turned", !same_bits(&q, &q_turned)),
    ];
    let failed: Vec<_> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| *what)
        .collect();
    notice(&format!(
        "rotary decode D={d} {:?} {layout:?} n={n} rotary dim {rotary_dim} interleaved {interleaved} {update:?}: {}",
        T::DTYPE,
        if failed.is_empty() {
            "same".to_string()
        } else {
            format!("differs in {failed:?}")
        }
    ));
    failed.is_empty()
}

/// Every head dim and table kind over contiguous caches, pages under a KV tile and pages of one,
/// with GQA, mixed head kinds (a window split over two blocks), 1 and 5 new tokens, counts kept
/// and advanced, non-causal retrieval heads and ALiBi-free bf16 and f16.
#[test]
fn fused_decode_rotary_matches_turning_first() {
    let test = "fused_decode_rotary_matches_turning_first";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut failed = Vec::new();
    let mut case = 0;
    for d in [64, 128, 256] {
        for layout in [
            CacheLayout::Contiguous,
            CacheLayout::Paged(16),
            CacheLayout::Paged(128),
        ] {
            for kind in table_kinds(d) {
                case += 1;
                let n = [1, 5][case % 2];
                let cfg = AttentionConfig::new(alternating_kinds(4))
                    .sink(8)
                    .window(300)
                    .causal(case % 5 != 0);
                let update = [SeqlensUpdate::Keep, SeqlensUpdate::Advance][(case / 2) % 2];
                let passed = if case % 3 == 0 {
                    decode_case::<f16>(&ctx, &mut rng, (d, layout, n), kind, &cfg, update)
                } else {
                    decode_case::<bf16>(&ctx, &mut rng, (d, layout, n), kind, &cfg, update)
                };
                if !passed {
                    failed.push(format!("D={d} {layout:?} {kind:?} n={n} {update:?}"));
                }
            }
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
}

/// `append_kv` with a table writes the keys `apply_rotary_to` would have turned, values as they
/// are.
#[test]
fn append_kv_turns_the_keys() {
    let test = "append_kv_turns_the_keys";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut passed = true;
    for (d, layout, kind) in [
        (64, CacheLayout::Contiguous, (64, false)),
        (128, CacheLayout::Paged(16), (64, false)),
        (256, CacheLayout::Paged(128), (128, true)),
    ] {
        let (b, hkv, n) = (LENS.len(), 2, 9);
        let table = random_table(&ctx, &mut rng, kind.0, kind.1);
        let [mut fused, mut unfused] = CallerCache::<bf16>::pair(&ctx, &mut rng, (hkv, d), layout);
        let (k, _) = random_tensor::<bf16>(&mut rng, b * n * hkv * d);
        let k = ctx.upload(&k, [b, n, hkv, d]).unwrap();
        let (v, _) = random_tensor::<bf16>(&mut rng, b * n * hkv * d);
        let v = ctx.upload(&v, [b, n, hkv, d]).unwrap();
        let k_turned = turned(&ctx, &k, &table, &unfused.lens);
        for (cache, new) in [
            (
                &mut fused,
                NewKv::advance(k.view(), v.view()).rotated(&table),
            ),
            (&mut unfused, NewKv::advance(k_turned.view(), v.view())),
        ] {
            let (kc, vc, lens) = (
                &mut cache.k.view_mut(),
                &mut cache.v.view_mut(),
                &mut cache.lens.view_mut(),
            );
            match &cache.table {
                None => ctx.append_kv(kc, vc, new, lens).unwrap(),
                Some(t) => ctx.append_kv_paged(kc, vc, new, &t.view(), lens).unwrap(),
            }
        }
        ctx.synchronize().unwrap();
        let same = fused.same_as(&unfused);
        notice(&format!(
            "append_kv D={d} {layout:?} table {kind:?}: same {same}"
        ));
        passed &= same;
    }
    assert!(passed);
}

/// A DuoAttention cache: a prompt, then decode steps with `decode_rotary` on one cache and
/// `apply_rotary_to` at `rotary_positions` + `decode` on its twin; the outputs of every step agree
/// bit for bit. Each step reads every row its heads hold (retrieval heads all keys, streaming
/// heads their whole ring, which wraps), so a key written differently shows in a later step.
/// (The caches' rows past each length are never written, and differ.)
fn duo_cache_case<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    cfg: CacheConfig,
    (rotary_dim, interleaved): (usize, bool),
    (prompt, steps): (usize, &[usize]),
) -> bool {
    let (b, hq, hkv, d) = (cfg.batch, cfg.heads_q, cfg.heads_kv, cfg.head_dim);
    let kinds: Vec<Vec<HeadKind>> = vec![alternating_kinds(hkv)];
    let table = random_table(ctx, rng, rotary_dim, interleaved);
    let mut caches = [0, 1].map(|_| DuoCache::<T>::new(ctx, cfg.clone(), kinds.clone()).unwrap());
    let upload = |rng: &mut StdRng, shape: [usize; 4]| {
        let (x, _) = random_tensor::<T>(rng, shape.iter().product());
        ctx.upload(&x, shape).unwrap()
    };
    let mut passed = true;
    for (step, &n) in std::iter::once(&prompt).chain(steps).enumerate() {
        let q = upload(rng, [b, n, hq, d]);
        let k = upload(rng, [b, n, hkv, d]);
        let v = upload(rng, [b, n, hkv, d]);
        let mut outs = [0, 1].map(|_| ctx.alloc::<T, 4>([b, n, hq, d]).unwrap());
        let mut lses = [0, 1].map(|_| ctx.alloc::<f32, 3>([b, hq, n]).unwrap());
        let [fused, unfused] = &mut caches;
        let [out_f, out_u] = &mut outs;
        let [lse_f, lse_u] = &mut lses;
        if step == 0 {
            // The prompt, turned by both (a prefill takes turned rows).
            for cache in [&mut *fused, &mut *unfused] {
                let pos = RotaryPositions::From(0);
                let (mut qt, mut kt) =
                    (ctx.alloc(q.shape()).unwrap(), ctx.alloc(k.shape()).unwrap());
                ctx.apply_rotary_to(&q.view(), &mut qt.view_mut(), &table, pos)
                    .unwrap();
                ctx.apply_rotary_to(&k.view(), &mut kt.view_mut(), &table, pos)
                    .unwrap();
                let (o, l) = (&mut out_f.view_mut(), &mut lse_f.view_mut());
                cache
                    .forward(ctx, 0, &qt.view(), &kt.view(), &v.view(), o, l)
                    .unwrap();
                ctx.synchronize().unwrap();
            }
            continue;
        }
        let (o, l) = (&mut out_f.view_mut(), &mut lse_f.view_mut());
        fused
            .decode_rotary(ctx, 0, &q.view(), &k.view(), &v.view(), &table, o, l)
            .unwrap();
        let (mut qt, mut kt) = (ctx.alloc(q.shape()).unwrap(), ctx.alloc(k.shape()).unwrap());
        {
            let pos = unfused.rotary_positions(0).unwrap();
            ctx.apply_rotary_to(&q.view(), &mut qt.view_mut(), &table, pos)
                .unwrap();
            ctx.apply_rotary_to(&k.view(), &mut kt.view_mut(), &table, pos)
                .unwrap();
        }
        let (o, l) = (&mut out_u.view_mut(), &mut lse_u.view_mut());
        unfused
            .decode(ctx, 0, &qt.view(), &kt.view(), &v.view(), o, l)
            .unwrap();
        ctx.synchronize().unwrap();
        let same = same_bits(out_f, out_u) && same_f32(lse_f, lse_u);
        notice(&format!(
            "DuoCache D={d} {:?} paged {} rotary dim {rotary_dim} interleaved {interleaved}, step {step} (n={n}): same {same}",
            T::DTYPE,
            cfg.paging.is_some()
        ));
        passed &= same;
    }
    passed
}

/// DuoCache decode steps with a table at every head dim (paged at 64 and 128), rings that wrap
/// (window 16 after a 150-token prompt), GQA, a table kind per case.
#[test]
fn duo_cache_decode_rotary_matches_turning_first() {
    let test = "duo_cache_decode_rotary_matches_turning_first";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut passed = true;
    for (d, kind, paged) in [
        (64, (64, false), true),
        (128, (64, false), false),
        (128, (128, true), true),
        (256, (256, false), false),
    ] {
        let cfg = CacheConfig {
            batch: 3,
            max_len: 512,
            heads_q: 8,
            heads_kv: 4,
            head_dim: d,
            sink: 4,
            window: 16,
            softmax_scale: None,
            prefill_kernel: PrefillKernel::Auto,
            paging: paged.then_some(duo_attn::CachePaging {
                page_size: 128,
                pages: 12,
            }),
        };
        passed &= duo_cache_case::<bf16>(&ctx, &mut rng, cfg, kind, (150, &[1, 3, 1, 16]));
    }
    assert!(passed);
}

/// Small launches of every rotary decode path for compute-sanitizer: Q and keys turned in the
/// step (D 128, contiguous), Q turned before it with the keys in a separate append (D 64 over
/// pages of 16, halves of a partial rotary dim, counts advanced), shared-memory Q at D 256 over
/// pages of a tile, and a DuoCache step.
#[test]
fn sanitizer_small_rotary_decode() {
    let test = "sanitizer_small_rotary_decode";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let cfg = AttentionConfig::new(alternating_kinds(2))
        .sink(4)
        .window(40);
    let mut passed = true;
    for (d, layout, kind, update) in [
        (
            128,
            CacheLayout::Contiguous,
            (128, false),
            SeqlensUpdate::Keep,
        ),
        (
            64,
            CacheLayout::Paged(16),
            (32, false),
            SeqlensUpdate::Advance,
        ),
        (
            256,
            CacheLayout::Paged(128),
            (128, true),
            SeqlensUpdate::Keep,
        ),
    ] {
        passed &= decode_case::<bf16>(&ctx, &mut rng, (d, layout, 3), kind, &cfg, update);
    }
    let cache = sanitizer_cache(2, 256);
    passed &= duo_cache_case::<bf16>(&ctx, &mut rng, cache, (32, false), (20, &[2]));
    assert!(passed);
}

/// A table longer than the head dim, or on no device the call runs on, is refused before
/// anything is queued.
#[test]
fn rotary_decode_errors() {
    let test = "rotary_decode_errors";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let table = random_table(&ctx, &mut rng, 128, false);
    let [mut cache, _] =
        CallerCache::<bf16>::pair(&ctx, &mut rng, (2, 64), CacheLayout::Contiguous);
    let b = LENS.len();
    let q = ctx.alloc::<bf16, 4>([b, 1, 4, 64]).unwrap();
    let k = ctx.alloc::<bf16, 4>([b, 1, 2, 64]).unwrap();
    let mut out = ctx.alloc::<bf16, 4>([b, 1, 4, 64]).unwrap();
    let mut lse = ctx.alloc::<f32, 3>([b, 4, 1]).unwrap();
    let cfg = AttentionConfig::new(vec![HeadKind::Retrieval; 2]);
    let new = NewKv::advance(k.view(), k.view()).rotated(&table);
    let err = cache
        .decode(&ctx, &q, new, (&mut out, &mut lse), &cfg)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
    ctx.synchronize().unwrap();
    assert_eq!(cache.lens.to_host().unwrap(), LENS, "nothing ran");
    let (kc, vc, lens) = (
        &mut cache.k.view_mut(),
        &mut cache.v.view_mut(),
        &mut cache.lens.view_mut(),
    );
    let err = ctx.append_kv(kc, vc, new, lens).unwrap_err();
    assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
}
