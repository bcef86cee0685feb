//! Timing with CUDA events: warm-up, rotating input sets larger than L2, median of many reps.
use crate::cases::Case;
use crate::clock::{ClockSampler, ClockStats};
use cust::event::{Event, EventFlags};
use duo_attn::{Context, DeviceTensor, Result};
use duo_attn_tests::random_tensor;
use half::bf16;
use rand::rngs::StdRng;

pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub reps: usize,
    /// The SM clock while the timed reps ran.
    pub clock: Option<ClockStats>,
}

/// GPU time spent per case, about (more reps for fast cases, at least `MIN_REPS`).
const BUDGET_MS: f64 = 300.0;
const MIN_REPS: usize = 5;
const MAX_REPS: usize = 200;
const MAX_SETS: usize = 8;

pub fn time_case(
    ctx: &Context,
    case: &Case,
    cfg: &duo_attn::AttentionConfig,
    rng: &mut StdRng,
    dump_lse: Option<&std::path::Path>,
    clock: &ClockSampler,
) -> Result<Timing> {
    if let Some(lens) = case.varlen_lens() {
        return time_varlen_case(ctx, case, &lens, cfg, rng, clock);
    }
    let shape = case.shape();
    let set_bytes = 2 * (shape.q_len() + 2 * shape.kv_len());
    let sets = input_sets(ctx, set_bytes);
    let (q, _) = random_tensor::<bf16>(rng, shape.q_len());
    let (kv, _) = random_tensor::<bf16>(rng, shape.kv_len());
    // Decode reads K/V head-major ([B, Hkv, S, D], as a KV cache and the peers hold them), seen
    // through strides as [B, S, Hkv, D]; prefill reads them [B, S, H, D] as stored.
    let stored = if case.is_decode() {
        [shape.batch, shape.heads_kv, shape.seqlen_k, shape.head_dim]
    } else {
        shape.kv_shape()
    };
    let mut inputs: Vec<[DeviceTensor<bf16, 4>; 3]> = Vec::new();
    for _ in 0..sets {
        inputs.push([
            ctx.upload(&q, shape.q_shape())?,
            ctx.upload(&kv, stored)?,
            ctx.upload(&kv, stored)?,
        ]);
    }
    let mut out = ctx.alloc::<bf16, 4>(shape.q_shape())?;
    let mut lse = ctx.alloc::<f32, 3>(shape.lse_shape())?;
    let launch = |i: usize| {
        let [q, k, v] = &inputs[i % sets];
        fn kv_view<'a>(
            t: &'a DeviceTensor<bf16, 4>,
            case: &Case,
            shape: &duo_attn::reference::Shape,
        ) -> Result<duo_attn::View<'a, bf16, 4>> {
            if case.is_decode() {
                let (s, h, d) = (shape.seqlen_k, shape.heads_kv, shape.head_dim);
                t.strided_view(0, shape.kv_shape(), [h * s * d, d, s * d, 1])
            } else {
                Ok(t.view())
            }
        }
        let (q, k, v) = (
            q.view(),
            kv_view(k, case, &shape)?,
            kv_view(v, case, &shape)?,
        );
        let (o, l) = (&mut out.view_mut(), &mut lse.view_mut());
        if case.is_decode() {
            ctx.decode_attention(&q, &k, &v, o, l, cfg)
        } else {
            ctx.attention(&q, &k, &v, o, l, cfg)
        }
    };
    let timing = time_launches(ctx, clock, launch)?;
    if let Some(path) = dump_lse {
        let bytes: Vec<u8> = lse
            .to_host()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        if let Err(e) = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, bytes))
        {
            eprintln!("writing {}: {e}", path.display());
        }
    }
    Ok(timing)
}

/// A decode case whose step appends its `n` new keys and values to the cache first (each
/// sequence's count `Sk - n` before the step, kept for the next rep): in the decode launch
/// (`fused`, `decode_attention_append`) or in an append launch before it (`append_kv`, then
/// `decode_attention_seqlens` over `Sk` keys). K/V head-major as in [`time_case`].
pub fn time_append_decode(
    ctx: &Context,
    case: &Case,
    fused: bool,
    cfg: &duo_attn::AttentionConfig,
    rng: &mut StdRng,
    clock: &ClockSampler,
) -> Result<Timing> {
    use duo_attn::NewKv;
    let shape = case.shape();
    let (b, n, h, s, d) = (
        shape.batch,
        shape.seqlen_q,
        shape.heads_kv,
        shape.seqlen_k,
        shape.head_dim,
    );
    let sets = input_sets(ctx, 2 * (shape.q_len() + 2 * shape.kv_len()));
    let (q, _) = random_tensor::<bf16>(rng, shape.q_len());
    let (kv, _) = random_tensor::<bf16>(rng, shape.kv_len());
    let (new, _) = random_tensor::<bf16>(rng, b * n * h * d);
    let stored = [b, h, s, d];
    let mut inputs: Vec<[DeviceTensor<bf16, 4>; 3]> = Vec::new();
    for _ in 0..sets {
        inputs.push([
            ctx.upload(&q, shape.q_shape())?,
            ctx.upload(&kv, stored)?,
            ctx.upload(&kv, stored)?,
        ]);
    }
    let (k_new, v_new) = (
        ctx.upload(&new, [b, n, h, d])?,
        ctx.upload(&new, [b, n, h, d])?,
    );
    let mut before = ctx.upload(&vec![(s - n) as i32; b], [b])?;
    let after = ctx.upload(&vec![s as i32; b], [b])?;
    let mut out = ctx.alloc::<bf16, 4>(shape.q_shape())?;
    let mut lse = ctx.alloc::<f32, 3>(shape.lse_shape())?;
    let strides = [h * s * d, d, s * d, 1];
    time_launches(ctx, clock, |i| {
        let [q, k, v] = &mut inputs[i % sets];
        let mut k = k.strided_view_mut(0, shape.kv_shape(), strides)?;
        let mut v = v.strided_view_mut(0, shape.kv_shape(), strides)?;
        let new = NewKv::keep(k_new.view(), v_new.view());
        let (o, l) = (&mut out.view_mut(), &mut lse.view_mut());
        if fused {
            let lens = &mut before.view_mut();
            ctx.decode_attention_append(&q.view(), &mut k, &mut v, new, o, l, lens, cfg)
        } else {
            ctx.append_kv(&mut k, &mut v, new, &mut before.view_mut())?;
            let (k, v) = (k.as_view(), v.as_view());
            ctx.decode_attention_seqlens(&q.view(), &k, &v, o, l, &after.view(), cfg)
        }
    })
}

/// A decode case over paged K/V: a pool of `B * S / page` pages, each stored `[Hkv, page, D]`
/// (`heads_major`) or `[page, Hkv, D]`, each sequence's pages shuffled through it by the block
/// table, every sequence full.
pub fn time_paged_decode(
    ctx: &Context,
    case: &Case,
    page: usize,
    heads_major: bool,
    cfg: &duo_attn::AttentionConfig,
    rng: &mut StdRng,
    clock: &ClockSampler,
) -> Result<Timing> {
    use rand::Rng;
    let shape = case.shape();
    let per_seq = shape.seqlen_k.div_ceil(page);
    let pages = shape.batch * per_seq;
    let pool = [pages, page, shape.heads_kv, shape.head_dim];
    let pool_len: usize = pool.iter().product();
    let sets = input_sets(ctx, 2 * (shape.q_len() + 2 * pool_len));
    let (q, _) = random_tensor::<bf16>(rng, shape.q_len());
    let (kv, _) = random_tensor::<bf16>(rng, pool_len);
    let mut order: Vec<i32> = (0..pages as i32).collect();
    for i in (1..pages).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let lens = vec![shape.seqlen_k as i32; shape.batch];
    let mut inputs: Vec<[DeviceTensor<bf16, 4>; 3]> = Vec::new();
    for _ in 0..sets {
        inputs.push([
            ctx.upload(&q, shape.q_shape())?,
            ctx.upload(&kv, pool)?,
            ctx.upload(&kv, pool)?,
        ]);
    }
    let table = ctx.upload(&order, [shape.batch, per_seq])?;
    let lens = ctx.upload(&lens, [shape.batch])?;
    let mut out = ctx.alloc::<bf16, 4>(shape.q_shape())?;
    let mut lse = ctx.alloc::<f32, 3>(shape.lse_shape())?;
    let (h, d) = (shape.heads_kv, shape.head_dim);
    let strides = if heads_major {
        [h * page * d, d, page * d, 1]
    } else {
        [page * h * d, h * d, d, 1]
    };
    time_launches(ctx, clock, |i| {
        let [q, k, v] = &inputs[i % sets];
        ctx.decode_attention_paged(
            &q.view(),
            &k.strided_view(0, pool, strides)?,
            &v.strided_view(0, pool, strides)?,
            &mut out.view_mut(),
            &mut lse.view_mut(),
            &table.view(),
            &lens.view(),
            cfg,
        )
    })
}

/// Enough distinct input sets of `set_bytes` that consecutive launches cannot hit in L2.
fn input_sets(ctx: &Context, set_bytes: usize) -> usize {
    (2 * ctx.info().l2_cache_bytes)
        .div_ceil(set_bytes)
        .clamp(1, MAX_SETS)
}

/// A varlen prefill (`Context::attention_varlen`) of sequences `lens` on packed inputs.
fn time_varlen_case(
    ctx: &Context,
    case: &Case,
    lens: &[(usize, usize)],
    cfg: &duo_attn::AttentionConfig,
    rng: &mut StdRng,
    clock: &ClockSampler,
) -> Result<Timing> {
    let (cu_q, cu_k) = duo_attn_tests::cu_seqlens(lens);
    let (total_q, total_k) = (cu_q[lens.len()] as usize, cu_k[lens.len()] as usize);
    let (hq, hkv, d) = (case.heads_q, case.heads_kv, case.head_dim);
    let sets = input_sets(ctx, 2 * (total_q * hq + 2 * total_k * hkv) * d);
    let (q, _) = random_tensor::<bf16>(rng, total_q * hq * d);
    let (kv, _) = random_tensor::<bf16>(rng, total_k * hkv * d);
    let mut inputs: Vec<[DeviceTensor<bf16, 3>; 3]> = Vec::new();
    for _ in 0..sets {
        inputs.push([
            ctx.upload(&q, [total_q, hq, d])?,
            ctx.upload(&kv, [total_k, hkv, d])?,
            ctx.upload(&kv, [total_k, hkv, d])?,
        ]);
    }
    let dcu_q = ctx.upload(&cu_q, [cu_q.len()])?;
    let dcu_k = ctx.upload(&cu_k, [cu_k.len()])?;
    let mut out = ctx.alloc::<bf16, 3>([total_q, hq, d])?;
    let mut lse = ctx.alloc::<f32, 2>([hq, total_q])?;
    // `attention_varlen` copies the prefix sums back to the host on every call; a serving loop
    // that holds them plans the call itself, as here.
    let plans = inputs
        .iter()
        .map(|[q, k, v]| {
            duo_attn::plan_prefill_varlen::<bf16>(
                q.view().desc(),
                k.view().desc(),
                v.view().desc(),
                out.view_mut().desc(),
                lse.view_mut().desc(),
                (&cu_q, dcu_q.view().desc().ptr),
                (&cu_k, dcu_k.view().desc().ptr),
                cfg,
                ctx.ordinal(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: plans of live tensors on this context, whose device prefix sums are the host ones.
    let launch = |i: usize| unsafe { ctx.launch_prefill_plan(&plans[i % sets]) };
    time_launches(ctx, clock, launch)
}

/// A varlen chunk batch whose keys sit in a KV cache (`plan_prefill_kvcache`): sequence `b`'s
/// `lens[b].1` keys at the front of its `[S, Hkv, D]` entry (`S` the longest), or in `page`-row
/// pages shuffled through a pool (`Some(page)`); rows past each count are NaN, as a caller's
/// cache may hold (the kernel zeroes them in V).
pub fn time_kvcache_case(
    ctx: &Context,
    case: &Case,
    page: Option<usize>,
    cfg: &duo_attn::AttentionConfig,
    rng: &mut StdRng,
    clock: &ClockSampler,
) -> Result<Timing> {
    use duo_attn::KvCacheDesc;
    let lens = case
        .varlen_lens()
        .unwrap_or_else(|| vec![(case.seqlen_q, case.seqlen_k)]);
    let cu_q = duo_attn_tests::prefix_sums(lens.iter().map(|l| l.0));
    let counts: Vec<i32> = lens.iter().map(|l| l.1 as i32).collect();
    let (b, total_q) = (lens.len(), cu_q[lens.len()] as usize);
    let (hq, hkv, d, s) = (case.heads_q, case.heads_kv, case.head_dim, case.seqlen_k);
    let row = hkv * d;
    let (q, _) = random_tensor::<bf16>(rng, total_q * hq * d);
    let shape = duo_attn::reference::Shape {
        batch: b,
        seqlen_q: 0,
        seqlen_k: s,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    };
    let (kv, _) = duo_attn_tests::kv_with_nan_tails::<bf16>(rng, &shape, &counts);
    // Paged: each sequence's pages at shuffled places of the pool (`order` is the table).
    let (stored, kv_shape, order) = match page {
        None => (kv, [b, s, hkv, d], None),
        Some(page) => {
            let order = duo_attn_tests::shuffled_pages(rng, b * s.div_ceil(page));
            let pool = duo_attn_tests::scatter_pages(&kv, (s, row), page, &order, bf16::NAN);
            (pool, [order.len(), page, hkv, d], Some(order))
        }
    };
    let sets = input_sets(ctx, 2 * (total_q * hq * d + 2 * stored.len()));
    let mut inputs: Vec<(DeviceTensor<bf16, 3>, [DeviceTensor<bf16, 4>; 2])> = Vec::new();
    for _ in 0..sets {
        inputs.push((
            ctx.upload(&q, [total_q, hq, d])?,
            [
                ctx.upload(&stored, kv_shape)?,
                ctx.upload(&stored, kv_shape)?,
            ],
        ));
    }
    let table = match &order {
        Some(order) => Some(ctx.upload(order, [b, order.len() / b])?),
        None => None,
    };
    let dcu = ctx.upload(&cu_q, [b + 1])?;
    let dcounts = ctx.upload(&counts, [b])?;
    let mut out = ctx.alloc::<bf16, 3>([total_q, hq, d])?;
    let mut lse = ctx.alloc::<f32, 2>([hq, total_q])?;
    let plans = inputs
        .iter()
        .map(|(q, [k, v])| {
            let (k, v) = (k.view(), v.view());
            let table = table.as_ref().map(|t| t.view());
            let cache = match &table {
                None => KvCacheDesc::Contiguous {
                    k: k.desc(),
                    v: v.desc(),
                },
                Some(t) => KvCacheDesc::Paged {
                    k_pages: k.desc(),
                    v_pages: v.desc(),
                    block_table: t.desc(),
                },
            };
            duo_attn::plan_prefill_kvcache::<bf16>(
                q.view().desc(),
                cache,
                out.view_mut().desc(),
                lse.view_mut().desc(),
                (&cu_q, dcu.view().desc().ptr),
                (&counts, dcounts.view().desc().ptr),
                cfg,
                ctx.ordinal(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: plans of live tensors on this context, whose device arrays hold the host copies.
    let launch = |i: usize| unsafe { ctx.launch_prefill_plan(&plans[i % sets]) };
    time_launches(ctx, clock, launch)
}

/// Times `launch(i)` (input set `i`) with CUDA events: warm-up, then enough reps for the budget.
pub fn time_launches(
    ctx: &Context,
    clock: &ClockSampler,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<Timing> {
    let cuda = |e: cust::error::CudaError| duo_attn::Error::Cuda {
        during: "timing with events",
        source: e,
    };
    // One event pair per rep, all reps queued back to back and read after one synchronize: the
    // host's launch overhead overlaps the previous rep's GPU work, as in triton's do_bench (which
    // the peers use). Synchronising after every rep would add host time to short kernels.
    let event = || Event::new(EventFlags::DEFAULT).map_err(cuda);
    // The bench's contexts come from `Context::new`, which owns its stream.
    let stream = ctx.stream().ok_or_else(|| duo_attn::Error::ForeignStream {
        why: "the bench times a context that owns its stream".into(),
    })?;
    let mut run = |reps: usize, first: usize| -> Result<Vec<f64>> {
        let pairs = (0..reps)
            .map(|_| Ok((event()?, event()?)))
            .collect::<Result<Vec<_>>>()?;
        for (i, (start, stop)) in pairs.iter().enumerate() {
            start.record(stream).map_err(cuda)?;
            launch(first + i)?;
            stop.record(stream).map_err(cuda)?;
        }
        ctx.synchronize()?;
        pairs
            .iter()
            .map(|(start, stop)| Ok(stop.elapsed_time_f32(start).map_err(cuda)? as f64))
            .collect()
    };
    run(3, 0)?; // warm-up
    let first = run(1, 0)?[0];
    let reps = ((BUDGET_MS / first.max(1e-3)) as usize).clamp(MIN_REPS, MAX_REPS);
    let (times, clock) = clock.sample_while(|| run(reps, 0));
    let mut times = times?;
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: times[reps / 2],
        min_ms: times[0],
        reps,
        clock,
    })
}
