//! New K/V rows into a caller's KV cache (`Context::append_kv`, `_paged`) and decode steps that
//! fuse that append (`Context::decode_attention_append`, `_paged_append`), against a host model
//! of the cache and the float64 reference. Cache rows past each sequence's count start as NaN,
//! so a decode that read one fails; every cache element is compared bit for bit afterwards (the
//! new rows where they belong, nothing else touched), and so are the counts (kept or advanced).
use cust::stream::{Stream, StreamFlags};
use duo_attn::reference::Shape;
use duo_attn::{AttentionConfig, AttnElement, Context, DeviceTensor, Error, NewKv, SeqlensUpdate};
use duo_attn_tests::{
    CacheLayout, Graph, alibi_slopes, alternating_kinds, compare_per_sequence_lengths, device_sync,
    gpu_or_skip, notice, random_tensor, rng, scatter_pages, shuffled_pages,
};
use half::{bf16, f16};
use rand::Rng;
use rand::rngs::StdRng;

/// Keys per sequence a contiguous cache holds (a paged one: rounded up to whole pages, see
/// `CacheLayout::capacity`).
const CAPACITY: usize = 3000;

/// Counts before the append: empty, short, mid, near the end (rows past the capacity dropped),
/// negative and past the capacity (clamped), and full.
const LENS: [i32; 7] = [0, 129, 1500, 2995, -7, 99_999, 3000];

/// A caller's cache on the device and its host model (dense `[B, capacity, Hkv, D]`).
struct Cache<T: AttnElement> {
    layout: CacheLayout,
    cap: usize,
    heads_kv: usize,
    head_dim: usize,
    k: DeviceTensor<T, 4>,
    v: DeviceTensor<T, 4>,
    /// Paged: the block table and the pool pages in table order.
    table: Option<(DeviceTensor<i32, 2>, Vec<i32>)>,
    host_k: Vec<T>,
    host_v: Vec<T>,
}

impl<T: AttnElement> Cache<T> {
    /// Random rows below each count, NaN past it (and in the pool's spare pages).
    fn new(ctx: &Context, rng: &mut StdRng, (hkv, d): (usize, usize), layout: CacheLayout) -> Self {
        let (b, cap) = (LENS.len(), layout.capacity(CAPACITY));
        let row = hkv * d;
        let mut host = [0, 1].map(|_| random_tensor::<T>(rng, b * cap * row).0);
        for x in &mut host {
            for (seq, &len) in LENS.iter().enumerate() {
                let len = len.clamp(0, cap as i32) as usize;
                x[(seq * cap + len) * row..(seq + 1) * cap * row].fill(T::nan());
            }
        }
        let [host_k, host_v] = host;
        let (k, v, table) = match layout {
            CacheLayout::Contiguous => {
                let shape = [b, cap, hkv, d];
                (
                    ctx.upload(&host_k, shape).unwrap(),
                    ctx.upload(&host_v, shape).unwrap(),
                    None,
                )
            }
            CacheLayout::Paged(page) => {
                let per_seq = cap / page;
                let order = shuffled_pages(rng, b * per_seq + 3);
                let pool = [order.len(), page, hkv, d];
                let scatter = |x: &[T]| scatter_pages(x, (cap, row), page, &order, T::nan());
                let table = ctx.upload(&order[..b * per_seq], [b, per_seq]).unwrap();
                (
                    ctx.upload(&scatter(&host_k), pool).unwrap(),
                    ctx.upload(&scatter(&host_v), pool).unwrap(),
                    Some((table, order)),
                )
            }
        };
        Cache {
            layout,
            cap,
            heads_kv: hkv,
            head_dim: d,
            k,
            v,
            table,
            host_k,
            host_v,
        }
    }

    /// The host model after appending `new` (`[B, n, Hkv, D]` each) at the counts `lens`; each
    /// sequence's count afterwards.
    fn append_on_host(&mut self, (k, v): (&[T], &[T]), n: usize, lens: &[i32]) -> Vec<i32> {
        let (row, cap) = (self.heads_kv * self.head_dim, self.cap);
        lens.iter()
            .enumerate()
            .map(|(b, &len)| {
                let start = len.clamp(0, cap as i32) as usize;
                let end = (start + n).min(cap);
                let (at, from) = ((b * cap + start) * row, b * n * row);
                let rows = (end - start) * row;
                self.host_k[at..at + rows].copy_from_slice(&k[from..from + rows]);
                self.host_v[at..at + rows].copy_from_slice(&v[from..from + rows]);
                end as i32
            })
            .collect()
    }

    /// Whether the device cache equals the host model bit for bit (NaN where the model has NaN).
    fn matches_host(&self) -> bool {
        let want = |x: &[T]| match (&self.layout, &self.table) {
            (CacheLayout::Paged(page), Some((_, order))) => {
                let row = self.heads_kv * self.head_dim;
                scatter_pages(x, (self.cap, row), *page, order, T::nan())
            }
            _ => x.to_vec(),
        };
        let same = |a: &[T], b: &[T]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    let (x, y) = (x.to_f32(), y.to_f32());
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
                })
        };
        same(&self.k.to_host().unwrap(), &want(&self.host_k))
            && same(&self.v.to_host().unwrap(), &want(&self.host_v))
    }
}

/// The counts a call leaves: kept as given, or advanced past the new rows (clamped).
fn counts_after(update: SeqlensUpdate, lens: &[i32], ends: &[i32]) -> Vec<i32> {
    match update {
        SeqlensUpdate::Keep => lens.to_vec(),
        SeqlensUpdate::Advance => ends.to_vec(),
    }
}

/// Appends `n` random rows alone; whether the cache and the counts came out as the model says.
fn append_case<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    (d, layout, n): (usize, CacheLayout, usize),
    update: SeqlensUpdate,
) -> bool {
    let (b, hkv) = (LENS.len(), 3);
    let mut cache = Cache::<T>::new(ctx, rng, (hkv, d), layout);
    let (k, _) = random_tensor::<T>(rng, b * n * hkv * d);
    let (v, _) = random_tensor::<T>(rng, b * n * hkv * d);
    let (dk, dv) = (
        ctx.upload(&k, [b, n, hkv, d]).unwrap(),
        ctx.upload(&v, [b, n, hkv, d]).unwrap(),
    );
    let mut lens = ctx.upload(&LENS, [b]).unwrap();
    let new = NewKv {
        k: dk.view(),
        v: dv.view(),
        seqlens: update,
        rotary: None,
    };
    let (ck, cv) = (&mut cache.k, &mut cache.v);
    match &cache.table {
        None => ctx.append_kv(
            &mut ck.view_mut(),
            &mut cv.view_mut(),
            new,
            &mut lens.view_mut(),
        ),
        Some((table, _)) => ctx.append_kv_paged(
            &mut ck.view_mut(),
            &mut cv.view_mut(),
            new,
            &table.view(),
            &mut lens.view_mut(),
        ),
    }
    .unwrap();
    ctx.synchronize().unwrap();
    let ends = cache.append_on_host((&k, &v), n, &LENS);
    let (cache_ok, lens_ok) = (
        cache.matches_host(),
        lens.to_host().unwrap() == counts_after(update, &LENS, &ends),
    );
    notice(&format!(
        "append D={d} {:?} {layout:?} n={n} {update:?}: cache {cache_ok}, counts {lens_ok}",
        T::DTYPE
    ));
    cache_ok && lens_ok
}

#[test]
fn append_kv_writes_rows_at_each_count() {
    let test = "append_kv_writes_rows_at_each_count";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut failed = Vec::new();
    for (i, d) in [64, 128, 256].into_iter().enumerate() {
        for layout in [
            CacheLayout::Contiguous,
            CacheLayout::Paged(16),
            CacheLayout::Paged(256),
        ] {
            for n in [1, 37, 700] {
                let update = if (i + n) % 2 == 0 {
                    SeqlensUpdate::Keep
                } else {
                    SeqlensUpdate::Advance
                };
                let passed = if n == 37 {
                    append_case::<f16>(&ctx, &mut rng, (d, layout, n), update)
                } else {
                    append_case::<bf16>(&ctx, &mut rng, (d, layout, n), update)
                };
                if !passed {
                    failed.push(format!("D={d} {layout:?} n={n} {update:?}"));
                }
            }
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
}

/// One decode step's inputs and outputs on the device (`n` queries of 8 heads per sequence, and
/// the new rows), with host copies for the model and the reference.
struct StepIo<T: AttnElement> {
    shape: Shape,
    q: DeviceTensor<T, 4>,
    k_new: DeviceTensor<T, 4>,
    v_new: DeviceTensor<T, 4>,
    out: DeviceTensor<T, 4>,
    lse: DeviceTensor<f32, 3>,
    /// q as f32, then the new keys and values.
    host: (Vec<f32>, Vec<T>, Vec<T>),
}

impl<T: AttnElement> StepIo<T> {
    fn new(ctx: &Context, cache: &Cache<T>, n: usize) -> Self {
        let (b, hkv, d) = (LENS.len(), cache.heads_kv, cache.head_dim);
        let shape = Shape {
            batch: b,
            seqlen_q: n,
            seqlen_k: cache.cap,
            heads_q: 8,
            heads_kv: hkv,
            head_dim: d,
        };
        StepIo {
            q: ctx.alloc(shape.q_shape()).unwrap(),
            k_new: ctx.alloc([b, n, hkv, d]).unwrap(),
            v_new: ctx.alloc([b, n, hkv, d]).unwrap(),
            out: ctx.alloc(shape.q_shape()).unwrap(),
            lse: ctx.alloc(shape.lse_shape()).unwrap(),
            host: (Vec::new(), Vec::new(), Vec::new()),
            shape,
        }
    }

    /// Fresh random inputs, poisoned outputs (synchronous copies on the legacy stream).
    fn refill(&mut self, rng: &mut StdRng) {
        let (q, q32) = random_tensor::<T>(rng, self.shape.q_len());
        let (k, _) = random_tensor::<T>(rng, self.k_new.len());
        let (v, _) = random_tensor::<T>(rng, self.v_new.len());
        self.q.copy_from_host(&q).unwrap();
        self.k_new.copy_from_host(&k).unwrap();
        self.v_new.copy_from_host(&v).unwrap();
        self.out.fill(T::nan()).unwrap();
        self.lse.fill(f32::NAN).unwrap();
        self.host = (q32, k, v);
    }

    /// Queues the step on `ctx`'s stream.
    fn queue(
        &mut self,
        ctx: &Context,
        cache: &mut Cache<T>,
        lens: &mut DeviceTensor<i32, 1>,
        cfg: &AttentionConfig,
        update: SeqlensUpdate,
    ) {
        let new = NewKv {
            k: self.k_new.view(),
            v: self.v_new.view(),
            seqlens: update,
            rotary: None,
        };
        let (ck, cv) = (&mut cache.k, &mut cache.v);
        let (o, l, dl) = (
            &mut self.out.view_mut(),
            &mut self.lse.view_mut(),
            &mut lens.view_mut(),
        );
        let q = &self.q.view();
        match &cache.table {
            None => ctx.decode_attention_append(
                q,
                &mut ck.view_mut(),
                &mut cv.view_mut(),
                new,
                o,
                l,
                dl,
                cfg,
            ),
            Some((table, _)) => ctx.decode_attention_paged_append(
                q,
                &mut ck.view_mut(),
                &mut cv.view_mut(),
                new,
                o,
                l,
                &table.view(),
                dl,
                cfg,
            ),
        }
        .unwrap();
    }

    /// After the step ran: the model appends its rows at `host_lens` (then updated as `update`
    /// says); whether the outputs match the reference over each sequence's keys after the
    /// append, and the device cache and counts the model.
    fn check(
        &self,
        cache: &mut Cache<T>,
        (lens, host_lens): (&DeviceTensor<i32, 1>, &mut Vec<i32>),
        cfg: &AttentionConfig,
        update: SeqlensUpdate,
    ) -> bool {
        let (q32, k, v) = &self.host;
        let n = self.shape.seqlen_q;
        let ends = cache.append_on_host((k, v), n, host_lens);
        let to_f32 = |x: &[T]| x.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
        let (k32, v32) = (to_f32(&cache.host_k), to_f32(&cache.host_v));
        let out32 = to_f32(&self.out.to_host().unwrap());
        let lse = self.lse.to_host().unwrap();
        let shape = &self.shape;
        let cmps = compare_per_sequence_lengths(shape, cfg, q32, &k32, &v32, &out32, &lse, &ends);
        *host_lens = counts_after(update, host_lens, &ends);
        let (cache_ok, lens_ok) = (cache.matches_host(), lens.to_host().unwrap() == *host_lens);
        let case = format!(
            "decode append D={} {:?} {:?} n={n} sink {} window {} alibi {} {update:?}",
            shape.head_dim,
            T::DTYPE,
            cache.layout,
            cfg.sink,
            cfg.window,
            cfg.alibi.is_some()
        );
        let outputs_ok = cmps.iter().all(|c| c.passed());
        for (cmp, end) in cmps.iter().zip(&ends) {
            if !cmp.passed() {
                notice(&format!("{case}, {end} keys: {cmp:?}"));
            }
        }
        notice(&format!(
            "{case}: cache {cache_ok}, counts {lens_ok}, outputs {outputs_ok}"
        ));
        cache_ok && lens_ok && outputs_ok
    }
}

/// One decode step with its append fused over `cache`, whose counts are `lens` on the device and
/// `host_lens` in the model (both updated); whether it came out as [`StepIo::check`] says.
fn decode_step<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    cache: &mut Cache<T>,
    (lens, host_lens): (&mut DeviceTensor<i32, 1>, &mut Vec<i32>),
    n: usize,
    cfg: &AttentionConfig,
    update: SeqlensUpdate,
) -> bool {
    let mut io = StepIo::new(ctx, cache, n);
    io.refill(rng);
    io.queue(ctx, cache, lens, cfg, update);
    ctx.synchronize().unwrap();
    io.check(cache, (lens, host_lens), cfg, update)
}

/// [`decode_step`] on a fresh cache at `LENS`.
fn decode_case<T: AttnElement>(
    ctx: &Context,
    rng: &mut StdRng,
    (d, layout, n): (usize, CacheLayout, usize),
    cfg: &AttentionConfig,
    update: SeqlensUpdate,
) -> bool {
    let mut cache = Cache::<T>::new(ctx, rng, (cfg.head_kinds.len(), d), layout);
    let mut lens = ctx.upload(&LENS, [LENS.len()]).unwrap();
    let counts = (&mut lens, &mut LENS.to_vec());
    decode_step(ctx, rng, &mut cache, counts, n, cfg, update)
}

/// The fused append over every head dim, contiguous caches and pages under and over a KV tile
/// (paged D = 256 appends in a launch of its own), 1 to 16 new tokens, counts kept and advanced,
/// and streaming heads whose windows split over two blocks (700), hold only the new rows (5), or
/// leave them unread (0); ALiBi on some.
#[test]
fn decode_append_matches_reference() {
    let test = "decode_append_matches_reference";
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
            for (sink, window) in [(8, 700), (4, 5), (8, 0)] {
                case += 1;
                let n = [1, 3, 16][case % 3];
                let mut cfg = AttentionConfig::new(alternating_kinds(4))
                    .sink(sink)
                    .window(window)
                    .causal(case % 4 != 3);
                if case % 5 == 0 {
                    cfg = cfg.alibi(alibi_slopes(&ctx, &mut rng, (8, LENS.len()), false));
                }
                let update = if case % 2 == 0 {
                    SeqlensUpdate::Keep
                } else {
                    SeqlensUpdate::Advance
                };
                let passed = if case % 3 == 1 {
                    decode_case::<f16>(&ctx, &mut rng, (d, layout, n), &cfg, update)
                } else {
                    decode_case::<bf16>(&ctx, &mut rng, (d, layout, n), &cfg, update)
                };
                if !passed {
                    failed.push(format!(
                        "D={d} {layout:?} sink {sink} window {window} n={n}"
                    ));
                }
            }
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
}

/// Small launches of every path for compute-sanitizer: the append alone (kept and advanced,
/// contiguous and paged) and fused into decode (contiguous, pages under and over a tile, and
/// paged D = 256's separate append).
#[test]
fn sanitizer_small_kv_append() {
    let test = "sanitizer_small_kv_append";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut passed = true;
    for (d, layout) in [
        (64, CacheLayout::Contiguous),
        (128, CacheLayout::Paged(16)),
        (256, CacheLayout::Paged(128)),
    ] {
        for update in [SeqlensUpdate::Keep, SeqlensUpdate::Advance] {
            passed &= append_case::<bf16>(&ctx, &mut rng, (d, layout, 5), update);
            let cfg = AttentionConfig::new(alternating_kinds(2))
                .sink(4)
                .window(rng.random_range(0..300));
            passed &= decode_case::<bf16>(&ctx, &mut rng, (d, layout, 4), &cfg, update);
        }
    }
    assert!(passed);
}

/// Decode steps one after another over one cache, each advancing the counts on the device for
/// the next (no host copy between them), with a different number of new tokens each, and a step
/// that keeps them between two that advance.
#[test]
fn decode_append_steps_advance_the_counts() {
    let test = "decode_append_steps_advance_the_counts";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut passed = true;
    for (d, layout) in [(128, CacheLayout::Contiguous), (64, CacheLayout::Paged(16))] {
        let cfg = AttentionConfig::new(alternating_kinds(2))
            .sink(4)
            .window(300);
        let mut cache = Cache::<bf16>::new(&ctx, &mut rng, (2, d), layout);
        let mut lens = ctx.upload(&LENS, [LENS.len()]).unwrap();
        let mut host_lens = LENS.to_vec();
        for (n, update) in [
            (1, SeqlensUpdate::Advance),
            (4, SeqlensUpdate::Advance),
            (2, SeqlensUpdate::Keep),
            (16, SeqlensUpdate::Advance),
        ] {
            let counts = (&mut lens, &mut host_lens);
            passed &= decode_step(&ctx, &mut rng, &mut cache, counts, n, &cfg, update);
        }
    }
    assert!(passed);
}

/// Typed errors of the decode with an append, checked before anything is queued: new rows of
/// another token count than q or of another head count than the cache, and counts of another
/// batch.
#[test]
fn decode_append_errors() {
    let test = "decode_append_errors";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let (b, n, hq, hkv, d, s) = (2, 3, 4, 2, 64, 256);
    let q = ctx.alloc::<bf16, 4>([b, n, hq, d]).unwrap();
    let mut k = ctx.alloc::<bf16, 4>([b, s, hkv, d]).unwrap();
    let mut v = ctx.alloc::<bf16, 4>([b, s, hkv, d]).unwrap();
    let mut out = ctx.alloc::<bf16, 4>([b, n, hq, d]).unwrap();
    let mut lse = ctx.alloc::<f32, 3>([b, hq, n]).unwrap();
    let cfg = AttentionConfig::new(alternating_kinds(hkv))
        .sink(4)
        .window(32);
    let mut call = |new_shape: [usize; 4], lens: &[i32]| {
        let new = ctx.alloc::<bf16, 4>(new_shape).unwrap();
        let mut lens = ctx.upload(lens, [lens.len()]).unwrap();
        ctx.decode_attention_append(
            &q.view(),
            &mut k.view_mut(),
            &mut v.view_mut(),
            NewKv::keep(new.view(), new.view()),
            &mut out.view_mut(),
            &mut lse.view_mut(),
            &mut lens.view_mut(),
            &cfg,
        )
        .unwrap_err()
    };
    let err = call([b, n + 1, hkv, d], &[5, 9]);
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                tensor: "k_new",
                ..
            }
        ),
        "{err}"
    );
    let err = call([b, n, hkv + 1, d], &[5, 9]);
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                tensor: "k_new",
                ..
            }
        ),
        "{err}"
    );
    let err = call([b, n, hkv, d], &[5, 9, 1]);
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
    // Nothing was queued: the stream is clean.
    ctx.synchronize().unwrap();
}

/// A decode step with its append, on a caller's non-blocking stream, captured in a CUDA graph
/// and replayed on fresh inputs: each replay appends where the counts the previous one advanced
/// on the device point (no host copy between), until the fullest sequences drop their rows at the
/// capacity; paged, so the graph also replays the table lookups.
#[test]
fn graph_replays_decode_append_steps() {
    let test = "graph_replays_decode_append_steps";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let theirs = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let raw = theirs.as_inner();
    // SAFETY: `theirs` outlives `on_theirs`.
    let on_theirs = unsafe { ctx.on_stream(raw) }.unwrap();
    let cfg = AttentionConfig::new(alternating_kinds(2))
        .sink(4)
        .window(300);
    let update = SeqlensUpdate::Advance;
    let mut cache = Cache::<bf16>::new(&ctx, &mut rng, (2, 128), CacheLayout::Paged(16));
    let mut lens = ctx.upload(&LENS, [LENS.len()]).unwrap();
    let mut host_lens = LENS.to_vec();
    let mut io = StepIo::new(&ctx, &cache, 4);
    let mut passed = true;
    // Eager once (sizes the scratch), then captured, then replayed.
    io.refill(&mut rng);
    device_sync();
    io.queue(&on_theirs, &mut cache, &mut lens, &cfg, update);
    on_theirs.synchronize().unwrap();
    passed &= io.check(&mut cache, (&lens, &mut host_lens), &cfg, update);
    let graph = Graph::capture(&theirs, || {
        io.queue(&on_theirs, &mut cache, &mut lens, &cfg, update)
    });
    for _ in 0..5 {
        io.refill(&mut rng);
        device_sync();
        graph.launch(&theirs);
        on_theirs.synchronize().unwrap();
        passed &= io.check(&mut cache, (&lens, &mut host_lens), &cfg, update);
    }
    drop(graph);
    assert!(passed);
    // The fullest sequences reached the capacity: later rows were dropped.
    assert!(host_lens.contains(&(cache.cap as i32)), "{host_lens:?}");
}
