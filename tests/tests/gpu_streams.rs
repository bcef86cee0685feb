//! Contexts on other streams: a caller's non-blocking stream (as cudarc or a framework would hand
//! one over), CUDA graph capture of operations on it, a context's own second stream, and a stream
//! of another CUDA context (refused); a captured decode replayed with new per-sequence lengths. On machines without a Hopper GPU every test says loudly
//! that it skipped.
use cust::stream::{Stream, StreamFlags};
use cust::sys;
use duo_attn::reference::Shape;
use duo_attn::{
    AttentionConfig, CacheConfig, CachePaging, Context, DeviceTensor, DuoCache, Error, HeadKind,
    PrefillKernel,
};
use duo_attn_tests::{
    Comparison, Graph, SlotHistory, alternating_kinds, check, compare,
    compare_per_sequence_lengths, device_sync, gpu_or_skip, notice, random_tensor, rng,
    rows_to_check, run_decode_case, run_prefill_case,
};
use half::bf16;
use rand::rngs::StdRng;

/// One operation's inputs and outputs on the device, with host copies for the reference.
struct Case {
    shape: Shape,
    cfg: AttentionConfig,
    decode: bool,
    q: DeviceTensor<bf16, 4>,
    k: DeviceTensor<bf16, 4>,
    v: DeviceTensor<bf16, 4>,
    out: DeviceTensor<bf16, 4>,
    lse: DeviceTensor<f32, 3>,
    host: [Vec<f32>; 3],
}

impl Case {
    fn new(ctx: &Context, shape: Shape, cfg: AttentionConfig, decode: bool) -> Case {
        let out = ctx.alloc(shape.q_shape()).unwrap();
        let lse = ctx.alloc(shape.lse_shape()).unwrap();
        let q = ctx.alloc(shape.q_shape()).unwrap();
        let k = ctx.alloc(shape.kv_shape()).unwrap();
        let v = ctx.alloc(shape.kv_shape()).unwrap();
        let host = [vec![], vec![], vec![]];
        Case {
            shape,
            cfg,
            decode,
            q,
            k,
            v,
            out,
            lse,
            host,
        }
    }

    /// Fresh random inputs and NaN outputs (legacy-stream copies: call `device_sync` after).
    fn refill(&mut self, rng: &mut StdRng) {
        let s = &self.shape;
        for (i, (t, n)) in [
            (&mut self.q, s.q_len()),
            (&mut self.k, s.kv_len()),
            (&mut self.v, s.kv_len()),
        ]
        .into_iter()
        .enumerate()
        {
            let (x, x32) = random_tensor::<bf16>(rng, n);
            t.copy_from_host(&x).unwrap();
            self.host[i] = x32;
        }
        self.poison();
    }

    fn poison(&mut self) {
        self.out.fill(bf16::NAN).unwrap();
        self.lse.fill(f32::NAN).unwrap();
    }

    /// Queues the operation on `ctx`'s stream.
    fn queue(&mut self, ctx: &Context) {
        let (q, k, v) = (self.q.view(), self.k.view(), self.v.view());
        let (o, l) = (&mut self.out.view_mut(), &mut self.lse.view_mut());
        if self.decode {
            ctx.decode_attention(&q, &k, &v, o, l, &self.cfg).unwrap();
        } else {
            ctx.attention(&q, &k, &v, o, l, &self.cfg).unwrap();
        }
    }

    fn untouched(&self) -> bool {
        let out = self.out.to_host().unwrap();
        let lse = self.lse.to_host().unwrap();
        out.iter().all(|x| x.is_nan()) && lse.iter().all(|x| x.is_nan())
    }

    fn compare(&self, rng: &mut StdRng) -> Comparison {
        let out32: Vec<f32> = self
            .out
            .to_host()
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let lse = self.lse.to_host().unwrap();
        let rows = rows_to_check(&self.shape, rng);
        let [q, k, v] = &self.host;
        compare(&self.shape, &self.cfg, q, k, v, &out32, &lse, &rows)
    }
}

/// A split-KV prefill chunk (scratch partials, the merge kernel) and a decode step.
fn cases(ctx: &Context, splits: usize, seqlen_k: usize) -> Vec<Case> {
    let chunk = Shape {
        batch: 1,
        seqlen_q: 128,
        seqlen_k,
        heads_q: 16,
        heads_kv: 4,
        head_dim: 128,
    };
    let prefill_cfg = AttentionConfig::new(alternating_kinds(4))
        .sink(8)
        .window(700)
        .kv_splits(Some(splits));
    let decode = Shape {
        batch: 2,
        seqlen_q: 3,
        ..chunk
    };
    let decode_cfg = AttentionConfig::new(alternating_kinds(4))
        .sink(8)
        .window(700);
    vec![
        Case::new(ctx, chunk, prefill_cfg, false),
        Case::new(ctx, decode, decode_cfg, true),
    ]
}

fn assert_passed(cases: &[Case], rng: &mut StdRng, what: &str) {
    for case in cases {
        let kind = if case.decode { "decode" } else { "prefill" };
        let cmp = case.compare(rng);
        notice(&format!("{what}, {kind}: {cmp:?}"));
        assert!(cmp.passed(), "{what}, {kind}: {cmp:?}");
    }
}

/// Operations on a caller's non-blocking stream run there, in order with the caller's work, and a
/// CUDA graph captured on it replays them: on new inputs, and after a larger launch outgrew the
/// scratch memory the graph addresses (kept alive since the capture).
#[test]
fn caller_stream_and_graph_capture() {
    let Some(ctx) = gpu_or_skip("caller_stream_and_graph_capture") else {
        return;
    };
    let mut rng = rng("caller stream");
    // Stands in for another library's stream.
    let theirs = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let raw = theirs.as_inner();
    // SAFETY: `theirs` outlives `on_theirs` (dropped at the end of the test, in reverse order).
    let on_theirs = unsafe { ctx.on_stream(raw) }.unwrap();
    assert!(on_theirs.stream().is_none());
    assert_eq!(on_theirs.raw_stream(), raw);

    // Eager, on their stream.
    let mut work = cases(&on_theirs, 3, 2000);
    for case in &mut work {
        case.refill(&mut rng);
    }
    device_sync();
    for case in &mut work {
        case.queue(&on_theirs);
    }
    on_theirs.synchronize().unwrap();
    assert_passed(&work, &mut rng, "eager on a caller's stream");

    // Captured: nothing runs until the graph is launched.
    for case in &mut work {
        case.refill(&mut rng);
    }
    device_sync();
    let graph = Graph::capture(&theirs, || {
        for case in &mut work {
            case.queue(&on_theirs);
        }
    });
    device_sync();
    assert!(
        work.iter().all(Case::untouched),
        "a captured operation ran at capture time: it was not queued on the caller's stream"
    );
    let replay = |what: &str, work: &mut [Case], rng: &mut StdRng| {
        graph.launch(&theirs);
        on_theirs.synchronize().unwrap();
        assert_passed(work, rng, what);
    };
    replay("graph launch", &mut work, &mut rng);

    // The graph reads its buffers anew on every launch.
    for case in &mut work {
        case.refill(&mut rng);
    }
    device_sync();
    replay("graph replay on new inputs", &mut work, &mut rng);

    // A larger split launch outgrows the scratch the graph addresses; the old buffers stay.
    let mut larger = cases(&on_theirs, 8, 6000);
    for case in &mut larger {
        case.refill(&mut rng);
    }
    device_sync();
    for case in &mut larger {
        case.queue(&on_theirs);
    }
    on_theirs.synchronize().unwrap();
    assert_passed(&larger, &mut rng, "larger launch after the capture");
    for case in &mut work {
        case.poison();
    }
    device_sync();
    replay("graph replay after the scratch grew", &mut work, &mut rng);
}

/// A captured decode with per-sequence key counts (`decode_attention_seqlens`) replays with the
/// counts the array holds at each launch: a serving loop's decode step, its lengths updated on
/// the device between replays.
#[test]
fn graph_replays_new_cache_seqlens() {
    let Some(ctx) = gpu_or_skip("graph_replays_new_cache_seqlens") else {
        return;
    };
    let mut rng = rng("graph seqlens");
    let theirs = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let raw = theirs.as_inner();
    // SAFETY: `theirs` outlives `on_theirs`.
    let on_theirs = unsafe { ctx.on_stream(raw) }.unwrap();
    let shape = Shape {
        batch: 4,
        seqlen_q: 2,
        seqlen_k: 4000,
        heads_q: 16,
        heads_kv: 4,
        head_dim: 128,
    };
    let cfg = AttentionConfig::new(alternating_kinds(4))
        .sink(8)
        .window(700);
    let (q, q32) = random_tensor::<bf16>(&mut rng, shape.q_len());
    let (k, k32) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let (v, v32) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let dq = ctx.upload(&q, shape.q_shape()).unwrap();
    let dk = ctx.upload(&k, shape.kv_shape()).unwrap();
    let dv = ctx.upload(&v, shape.kv_shape()).unwrap();
    let steps: [[i32; 4]; 3] = [
        [4000, 100, 1, 2500],
        [3999, 101, 0, 3700],
        [17, 4000, 2, 640],
    ];
    let mut lens = ctx.upload(&steps[0], [4]).unwrap();
    let mut out = ctx.alloc::<bf16, 4>(shape.q_shape()).unwrap();
    let mut lse = ctx.alloc::<f32, 3>(shape.lse_shape()).unwrap();
    let queue = |out: &mut DeviceTensor<bf16, 4>,
                 lse: &mut DeviceTensor<f32, 3>,
                 lens: &DeviceTensor<i32, 1>| {
        on_theirs
            .decode_attention_seqlens(
                &dq.view(),
                &dk.view(),
                &dv.view(),
                &mut out.view_mut(),
                &mut lse.view_mut(),
                &lens.view(),
                &cfg,
            )
            .unwrap();
    };
    let check_step =
        |what: &str, out: &DeviceTensor<bf16, 4>, lse: &DeviceTensor<f32, 3>, step: &[i32]| {
            let out32: Vec<f32> = out.to_host().unwrap().iter().map(|x| x.to_f32()).collect();
            let lse = lse.to_host().unwrap();
            let cmps =
                compare_per_sequence_lengths(&shape, &cfg, &q32, &k32, &v32, &out32, &lse, step);
            for (cmp, len) in cmps.iter().zip(step) {
                notice(&format!("{what}, length {len}: {cmp:?}"));
                assert!(cmp.passed(), "{what}, length {len}: {cmp:?}");
            }
        };

    // Eager once: sizes the scratch.
    out.fill(bf16::NAN).unwrap();
    lse.fill(f32::NAN).unwrap();
    device_sync();
    queue(&mut out, &mut lse, &lens);
    on_theirs.synchronize().unwrap();
    check_step("eager", &out, &lse, &steps[0]);

    let graph = Graph::capture(&theirs, || queue(&mut out, &mut lse, &lens));
    for (i, step) in steps.iter().enumerate() {
        lens.copy_from_host(step).unwrap();
        out.fill(bf16::NAN).unwrap();
        lse.fill(f32::NAN).unwrap();
        device_sync();
        graph.launch(&theirs);
        on_theirs.synchronize().unwrap();
        check_step(&format!("graph replay {i}"), &out, &lse, step);
    }
}

/// A context on a new stream of its own shares the kernels and runs beside the first: two threads,
/// one context each, at once.
#[test]
fn contexts_on_two_streams() {
    let Some(ctx) = gpu_or_skip("contexts_on_two_streams") else {
        return;
    };
    let second = ctx.on_new_stream().unwrap();
    assert_ne!(second.raw_stream(), ctx.raw_stream());
    assert!(second.stream().is_some());
    std::thread::scope(|scope| {
        for (t, ctx) in [&ctx, &second].into_iter().enumerate() {
            scope.spawn(move || {
                let mut rng = rng(&format!("stream {t}"));
                for j in 0..4usize {
                    let chunk = Shape {
                        batch: 1,
                        seqlen_q: 128,
                        seqlen_k: 3000 + 500 * j,
                        heads_q: 32,
                        heads_kv: 8,
                        head_dim: 128,
                    };
                    let cfg = AttentionConfig::new(alternating_kinds(8))
                        .sink(4)
                        .window(900)
                        .kv_splits(Some(2 + j + t));
                    let cmp = run_prefill_case::<bf16>(ctx, &chunk, &cfg, &mut rng).unwrap();
                    assert!(cmp.passed(), "stream {t}, prefill {j}: {cmp:?}");
                    let decode = Shape {
                        batch: 2,
                        seqlen_q: 1 + j,
                        ..chunk
                    };
                    let cfg = AttentionConfig::new(vec![HeadKind::Retrieval; 8]);
                    let cmp = run_decode_case::<bf16>(ctx, &decode, &cfg, &mut rng).unwrap();
                    assert!(cmp.passed(), "stream {t}, decode {j}: {cmp:?}");
                }
                notice(&format!(
                    "stream {t}: 4 split prefills and 4 decodes passed"
                ));
            });
        }
    });
}

/// A stream of another CUDA context of the device (not the primary one, where the kernels are
/// loaded) is refused with a typed error.
#[test]
fn stream_of_another_context_is_refused() {
    let Some(ctx) = gpu_or_skip("stream_of_another_context_is_refused") else {
        return;
    };
    let mut device: sys::CUdevice = 0;
    let mut other: sys::CUcontext = std::ptr::null_mut();
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY (every driver call here): live out-parameters; the context and stream made here are
    // destroyed here.
    unsafe {
        check(
            sys::cuDeviceGet(&mut device, ctx.ordinal() as i32),
            "device",
        );
        check(
            sys::cuCtxCreate_v2(&mut other, 0, device),
            "create a context",
        );
        check(sys::cuStreamCreate(&mut stream, 0), "create a stream in it");
    }
    let err = unsafe { ctx.on_stream(stream) }.err();
    notice(&format!("stream of another context: {err:?}"));
    assert!(matches!(err, Some(Error::ForeignStream { .. })), "{err:?}");
    unsafe {
        check(sys::cuStreamDestroy_v2(stream), "destroy the stream");
        check(sys::cuCtxDestroy_v2(other), "destroy the context");
    }
    // The context still works.
    let mut rng = rng("after another context");
    let shape = Shape {
        batch: 1,
        seqlen_q: 200,
        seqlen_k: 300,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 64,
    };
    let cfg = AttentionConfig::new(alternating_kinds(2))
        .sink(4)
        .window(50);
    let cmp = run_prefill_case::<bf16>(&ctx, &shape, &cfg, &mut rng).unwrap();
    assert!(cmp.passed(), "{cmp:?}");
}

/// A decode step of a whole DuoAttention cache (every layer, slots at different lengths)
/// captured once and replayed: each replay appends at and attends over the lengths the device
/// holds, which it advances; `read_back_lengths` then brings the host's record up to date, eager
/// calls carry on from there, and a slot reset and refilled between replays is decoded at its
/// new length.
#[test]
fn graph_replays_cache_decode_steps() {
    cache_decode_graph("graph_replays_cache_decode_steps", None);
}

/// `graph_replays_cache_decode_steps` on a paged cache: pages reserved before the capture serve
/// the replays, one slot crossing into its second page during them.
#[test]
fn graph_replays_paged_cache_decode_steps() {
    let paging = CachePaging {
        page_size: 128,
        pages: 10,
    };
    cache_decode_graph("graph_replays_paged_cache_decode_steps", Some(paging));
}

fn cache_decode_graph(test: &str, paging: Option<CachePaging>) {
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng("graph cache decode");
    let theirs = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let raw = theirs.as_inner();
    // SAFETY: `theirs` outlives `on_theirs`.
    let on_theirs = unsafe { ctx.on_stream(raw) }.unwrap();
    let (slots, hq, hkv, d, n) = (3, 8, 4, 128, 1);
    let cfg = CacheConfig {
        batch: slots,
        max_len: 2048,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        sink: 4,
        window: 100,
        softmax_scale: None,
        prefill_kernel: PrefillKernel::Auto,
        paging,
    };
    let kinds = vec![alternating_kinds(hkv), vec![HeadKind::Retrieval; hkv]];
    let layers = kinds.len();
    let mut cache = DuoCache::<bf16>::new(&on_theirs, cfg, kinds).unwrap();
    let mut hist: Vec<SlotHistory> = (0..layers)
        .map(|_| SlotHistory::new(slots, hkv, d))
        .collect();

    // Prefill one slot (every layer) eagerly with `count` tokens.
    let prefill =
        |rng: &mut StdRng, cache: &mut DuoCache<bf16>, hist: &mut [SlotHistory], slot, len| {
            for (layer, h) in hist.iter_mut().enumerate() {
                let (q, _) = random_tensor::<bf16>(rng, len * hq * d);
                let (k, k32) = random_tensor::<bf16>(rng, len * hkv * d);
                let (v, v32) = random_tensor::<bf16>(rng, len * hkv * d);
                let dq = ctx.upload(&q, [1, len, hq, d]).unwrap();
                let dk = ctx.upload(&k, [1, len, hkv, d]).unwrap();
                let dv = ctx.upload(&v, [1, len, hkv, d]).unwrap();
                let mut out = ctx.alloc::<bf16, 4>([1, len, hq, d]).unwrap();
                let mut lse = ctx.alloc::<f32, 3>([1, hq, len]).unwrap();
                device_sync();
                cache
                    .slots(slot..slot + 1)
                    .unwrap()
                    .forward(
                        &on_theirs,
                        layer,
                        &dq.view(),
                        &dk.view(),
                        &dv.view(),
                        &mut out.view_mut(),
                        &mut lse.view_mut(),
                    )
                    .unwrap();
                on_theirs.synchronize().unwrap();
                h.push(slot, len, &k32, &v32);
            }
        };
    prefill(&mut rng, &mut cache, &mut hist, 0, 700);
    prefill(&mut rng, &mut cache, &mut hist, 1, 126);
    prefill(&mut rng, &mut cache, &mut hist, 2, 1);

    // One decode step's buffers per layer, refilled before each launch.
    struct Step {
        q: DeviceTensor<bf16, 4>,
        k: DeviceTensor<bf16, 4>,
        v: DeviceTensor<bf16, 4>,
        out: DeviceTensor<bf16, 4>,
        lse: DeviceTensor<f32, 3>,
        q32: Vec<f32>,
    }
    let mut step: Vec<Step> = (0..layers)
        .map(|_| Step {
            q: ctx.alloc([slots, n, hq, d]).unwrap(),
            k: ctx.alloc([slots, n, hkv, d]).unwrap(),
            v: ctx.alloc([slots, n, hkv, d]).unwrap(),
            out: ctx.alloc([slots, n, hq, d]).unwrap(),
            lse: ctx.alloc([slots, hq, n]).unwrap(),
            q32: Vec::new(),
        })
        .collect();
    // New inputs for every layer (pushed to the history), outputs poisoned.
    let refill = |rng: &mut StdRng, step: &mut [Step], hist: &mut [SlotHistory]| {
        for (s, h) in step.iter_mut().zip(hist.iter_mut()) {
            let (q, q32) = random_tensor::<bf16>(rng, slots * n * hq * d);
            let (k, k32) = random_tensor::<bf16>(rng, slots * n * hkv * d);
            let (v, v32) = random_tensor::<bf16>(rng, slots * n * hkv * d);
            s.q.copy_from_host(&q).unwrap();
            s.k.copy_from_host(&k).unwrap();
            s.v.copy_from_host(&v).unwrap();
            s.out.fill(bf16::NAN).unwrap();
            s.lse.fill(f32::NAN).unwrap();
            s.q32 = q32;
            h.push(0, n, &k32, &v32);
        }
        device_sync();
    };
    let queue = |cache: &mut DuoCache<bf16>, step: &mut [Step]| {
        for (layer, s) in step.iter_mut().enumerate() {
            cache
                .decode(
                    &on_theirs,
                    layer,
                    &s.q.view(),
                    &s.k.view(),
                    &s.v.view(),
                    &mut s.out.view_mut(),
                    &mut s.lse.view_mut(),
                )
                .unwrap();
        }
    };
    let check = |what: &str, cache: &DuoCache<bf16>, step: &[Step], hist: &[SlotHistory]| {
        for (layer, (s, h)) in step.iter().zip(hist).enumerate() {
            let out32: Vec<f32> = s
                .out
                .to_host()
                .unwrap()
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let attn = cache.attention_config(layer).unwrap();
            let lse = s.lse.to_host().unwrap();
            for (slot, cmp) in h.compare(0, (n, hq), attn, &s.q32, &out32, &lse) {
                let len = h.len(slot);
                notice(&format!(
                    "{what}, layer {layer} slot {slot} (len {len}): {cmp:?}"
                ));
                assert!(cmp.passed(), "{what}, layer {layer} slot {slot}: {cmp:?}");
            }
        }
    };

    // Eager once (sizes the scratch), then capture one step of every layer, with room (pages,
    // when paged) for the tokens of the capture and every replay: slot 1 passes 128 in them.
    refill(&mut rng, &mut step, &mut hist);
    queue(&mut cache, &mut step);
    on_theirs.synchronize().unwrap();
    check("eager", &cache, &step, &hist);
    cache.reserve(&on_theirs, 8).unwrap();
    let graph = Graph::capture(&theirs, || queue(&mut cache, &mut step));
    for replay in 0..3 {
        refill(&mut rng, &mut step, &mut hist);
        graph.launch(&theirs);
        on_theirs.synchronize().unwrap();
        check(&format!("replay {replay}"), &cache, &step, &hist);
    }
    cache.read_back_lengths(&on_theirs).unwrap();
    for (layer, h) in hist.iter().enumerate() {
        let want: Vec<usize> = (0..slots).map(|s| h.len(s)).collect();
        assert_eq!(
            cache.lens(layer).unwrap(),
            &want[..],
            "lengths after replays"
        );
    }
    // Eager again from the device's lengths; then slot 0 restarts with a short prompt and the
    // graph decodes it at its new length beside the others.
    refill(&mut rng, &mut step, &mut hist);
    queue(&mut cache, &mut step);
    on_theirs.synchronize().unwrap();
    check("eager after replays", &cache, &step, &hist);
    cache.slots(0..1).unwrap().reset(&on_theirs).unwrap();
    hist.iter_mut().for_each(|h| h.reset(0));
    prefill(&mut rng, &mut cache, &mut hist, 0, 20);
    for replay in 0..2 {
        refill(&mut rng, &mut step, &mut hist);
        graph.launch(&theirs);
        on_theirs.synchronize().unwrap();
        check(
            &format!("replay {replay} after a reset"),
            &cache,
            &step,
            &hist,
        );
    }
    drop(graph);
}
