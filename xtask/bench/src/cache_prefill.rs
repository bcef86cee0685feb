//! New requests prefilled into a DuoAttention cache (`--cache-prefill`): `B` prompts of
//! different lengths into empty slots of one layer (half the KV heads streaming), slot by slot
//! (`CacheSlots::prefill`, one launch each) against one ragged launch (`prefill_varlen`). No peer
//! runs this; both are ours. The ragged outputs are checked against the slot-by-slot ones.
//!
//! With `--cache-page-size P` a paged cache (`CachePaging`, a pool just large enough) runs the
//! ragged prefill beside the unpaged one, and both then time a decode step of every slot over
//! the prompts they hold.
use crate::cases::{SINK, WINDOW};
use cust::event::{Event, EventFlags};
use duo_attn::{
    CacheConfig, CachePaging, Context, DeviceTensor, DuoCache, HeadKind, PrefillKernel, Result,
};
use duo_attn_tests::{prefix_sums, random_tensor};
use half::bf16;
use rand::rngs::StdRng;
use serde::Serialize;

const HEADS_Q: usize = 32;
const HEADS_KV: usize = 8;
const HEAD_DIM: usize = 128;
const REPS: usize = 20;

/// One scenario's times (ms, medians of `REPS`).
#[derive(Debug, Serialize)]
pub struct CachePrefillRecord {
    pub slots: usize,
    pub prompts: Vec<usize>,
    pub slot_by_slot_ms: f64,
    pub ragged_ms: f64,
    /// With a page size: the ragged prefill into a paged cache.
    pub ragged_paged_ms: Option<f64>,
    /// With a page size: one decode step of every slot after the prompts, unpaged and paged.
    pub decode_ms: Option<f64>,
    pub decode_paged_ms: Option<f64>,
    /// Worst relative difference of the ragged outputs (and the paged ones) from the slot-by-slot
    /// ones.
    pub max_rel_diff: f64,
}

/// Decode steps a paged run times (each appends a token to every slot).
const DECODE_ROOM: usize = 64;

/// Prompts of `longest * (b + 1) / slots` tokens (a staggered arrival).
fn prompts(slots: usize, longest: usize) -> Vec<usize> {
    (0..slots).map(|b| longest * (b + 1) / slots).collect()
}

/// Runs every scenario and prints a table.
pub fn run(
    ctx: &Context,
    rng: &mut StdRng,
    page_size: Option<usize>,
) -> Result<Vec<CachePrefillRecord>> {
    println!(
        "\ncache prefill: new requests into empty slots of one layer (Hq {HEADS_Q}, Hkv {HEADS_KV}, D {HEAD_DIM}, half the KV heads streaming, sink {SINK}, window {WINDOW}), bf16{}",
        page_size.map_or(String::new(), |p| format!("; paged: {p}-token pages"))
    );
    print!(
        "{:>5} {:>8} {:>14} {:>10} {:>8}",
        "slots", "longest", "slot by slot", "ragged", "speedup"
    );
    if page_size.is_some() {
        print!(
            " {:>12} {:>10} {:>12}",
            "ragged paged", "decode", "decode paged"
        );
    }
    println!(" {:>9}", "rel diff");
    let ms = |t: Option<f64>| t.map_or(String::new(), |t| format!("{t:.3} ms"));
    let mut records = Vec::new();
    for slots in [4, 8, 16] {
        for longest in [512, 2048, 8192] {
            let r = scenario(ctx, rng, &prompts(slots, longest), page_size)?;
            print!(
                "{:>5} {:>8} {:>11.3} ms {:>7.3} ms {:>7.2}x",
                slots,
                longest,
                r.slot_by_slot_ms,
                r.ragged_ms,
                r.slot_by_slot_ms / r.ragged_ms,
            );
            if page_size.is_some() {
                print!(
                    " {:>12} {:>10} {:>12}",
                    ms(r.ragged_paged_ms),
                    ms(r.decode_ms),
                    ms(r.decode_paged_ms)
                );
            }
            println!(" {:>9.1e}", r.max_rel_diff);
            records.push(r);
        }
    }
    Ok(records)
}

fn scenario(
    ctx: &Context,
    rng: &mut StdRng,
    prompts: &[usize],
    page_size: Option<usize>,
) -> Result<CachePrefillRecord> {
    let slots = prompts.len();
    let total: usize = prompts.iter().sum();
    let kinds: Vec<HeadKind> = (0..HEADS_KV)
        .map(|h| match h < HEADS_KV / 2 {
            true => HeadKind::Retrieval,
            false => HeadKind::Streaming,
        })
        .collect();
    let longest = prompts.iter().copied().max().unwrap_or(1);
    let cfg = CacheConfig {
        batch: slots,
        max_len: longest + DECODE_ROOM,
        heads_q: HEADS_Q,
        heads_kv: HEADS_KV,
        head_dim: HEAD_DIM,
        sink: SINK,
        window: WINDOW,
        softmax_scale: None,
        prefill_kernel: PrefillKernel::Auto,
        paging: None,
    };
    // The paged cache's pool holds the prompts and the decode steps, no more.
    let paged_cfg = page_size.map(|page_size| CacheConfig {
        paging: Some(CachePaging {
            page_size,
            pages: prompts
                .iter()
                .map(|&n| (n + DECODE_ROOM).div_ceil(page_size))
                .sum(),
        }),
        ..cfg.clone()
    });
    let mut cache = DuoCache::<bf16>::new(ctx, cfg, vec![kinds.clone()])?;
    let mut paged = paged_cfg
        .map(|cfg| DuoCache::<bf16>::new(ctx, cfg, vec![kinds]))
        .transpose()?;
    let (q, _) = random_tensor::<bf16>(rng, total * HEADS_Q * HEAD_DIM);
    let (k, _) = random_tensor::<bf16>(rng, total * HEADS_KV * HEAD_DIM);
    let (v, _) = random_tensor::<bf16>(rng, total * HEADS_KV * HEAD_DIM);
    let packed = |x: &[bf16], h: usize| ctx.upload(x, [total, h, HEAD_DIM]);
    let (pq, pk, pv) = (
        packed(&q, HEADS_Q)?,
        packed(&k, HEADS_KV)?,
        packed(&v, HEADS_KV)?,
    );
    let cu = prefix_sums(prompts.iter().copied());
    // The same rows, one batch-of-one tensor per slot.
    let per_slot = |x: &[bf16], h: usize| -> Result<Vec<DeviceTensor<bf16, 4>>> {
        prompts
            .iter()
            .zip(cu.windows(2))
            .map(|(&n, w)| {
                let rows = &x[w[0] as usize * h * HEAD_DIM..][..n * h * HEAD_DIM];
                ctx.upload(rows, [1, n, h, HEAD_DIM])
            })
            .collect()
    };
    let (sq, sk, sv) = (
        per_slot(&q, HEADS_Q)?,
        per_slot(&k, HEADS_KV)?,
        per_slot(&v, HEADS_KV)?,
    );
    let mut out = ctx.alloc::<bf16, 3>([total, HEADS_Q, HEAD_DIM])?;
    let mut lse = ctx.alloc::<f32, 2>([HEADS_Q, total])?;
    // The paged cache's ragged outputs, only with a paged cache.
    let mut paged_outputs = paged
        .as_ref()
        .map(|_| -> Result<_> {
            Ok((
                ctx.alloc::<bf16, 3>([total, HEADS_Q, HEAD_DIM])?,
                ctx.alloc::<f32, 2>([HEADS_Q, total])?,
            ))
        })
        .transpose()?;
    let mut slot_out: Vec<_> = prompts
        .iter()
        .map(|&n| ctx.alloc::<bf16, 4>([1, n, HEADS_Q, HEAD_DIM]))
        .collect::<Result<_>>()?;
    let mut slot_lse: Vec<_> = prompts
        .iter()
        .map(|&n| ctx.alloc::<f32, 3>([1, HEADS_Q, n]))
        .collect::<Result<_>>()?;

    let mut slot_by_slot = |cache: &mut DuoCache<bf16>| -> Result<()> {
        for (b, (o, l)) in slot_out.iter_mut().zip(&mut slot_lse).enumerate() {
            let (q, k, v) = (sq[b].view(), sk[b].view(), sv[b].view());
            let (o, l) = (&mut o.view_mut(), &mut l.view_mut());
            cache.slots(b..b + 1)?.prefill(ctx, 0, &q, &k, &v, o, l)?;
        }
        Ok(())
    };
    let mut ragged = |cache: &mut DuoCache<bf16>| -> Result<()> {
        let (q, k, v) = (pq.view(), pk.view(), pv.view());
        let (o, l) = (&mut out.view_mut(), &mut lse.view_mut());
        cache.prefill_varlen(ctx, 0, &q, &k, &v, &cu, o, l)
    };
    let mut ragged_paged = |cache: &mut DuoCache<bf16>| -> Result<()> {
        let Some((o, l)) = paged_outputs.as_mut() else {
            return Ok(()); // only run beside a paged cache, which comes with its outputs
        };
        let (q, k, v) = (pq.view(), pk.view(), pv.view());
        cache.prefill_varlen(
            ctx,
            0,
            &q,
            &k,
            &v,
            &cu,
            &mut o.view_mut(),
            &mut l.view_mut(),
        )
    };
    let mut caches = vec![&mut cache];
    let mut runs: Vec<(usize, &mut Prefill<'_>)> = vec![(0, &mut slot_by_slot), (0, &mut ragged)];
    if let Some(p) = paged.as_mut() {
        caches.push(p);
        runs.push((1, &mut ragged_paged));
    }
    let times = time(ctx, &mut caches, &mut runs, true)?;
    drop(runs);

    // Decode steps over the prompts the last reps left (each step appends a token per slot).
    let (mut decode_ms, mut decode_paged_ms) = (None, None);
    if caches.len() == 2 {
        let (q, _) = random_tensor::<bf16>(rng, slots * HEADS_Q * HEAD_DIM);
        let (k, _) = random_tensor::<bf16>(rng, slots * HEADS_KV * HEAD_DIM);
        let one = |x: &[bf16], h: usize| ctx.upload(x, [slots, 1, h, HEAD_DIM]);
        let (dq, dk, dv) = (one(&q, HEADS_Q)?, one(&k, HEADS_KV)?, one(&k, HEADS_KV)?);
        let outputs = || -> Result<_> {
            Ok((
                ctx.alloc::<bf16, 4>([slots, 1, HEADS_Q, HEAD_DIM])?,
                ctx.alloc::<f32, 3>([slots, HEADS_Q, 1])?,
            ))
        };
        let ((mut o, mut l), (mut po, mut pl)) = (outputs()?, outputs()?);
        let mut step = |cache: &mut DuoCache<bf16>| -> Result<()> {
            let (o, l) = (&mut o.view_mut(), &mut l.view_mut());
            cache.decode(ctx, 0, &dq.view(), &dk.view(), &dv.view(), o, l)
        };
        let mut step_paged = |cache: &mut DuoCache<bf16>| -> Result<()> {
            let (o, l) = (&mut po.view_mut(), &mut pl.view_mut());
            cache.decode(ctx, 0, &dq.view(), &dk.view(), &dv.view(), o, l)
        };
        let mut runs: Vec<(usize, &mut Prefill<'_>)> = vec![(0, &mut step), (1, &mut step_paged)];
        let t = time(ctx, &mut caches, &mut runs, false)?;
        (decode_ms, decode_paged_ms) = (Some(t[0]), Some(t[1]));
    }
    drop(caches);

    // The last reps' outputs: the ragged rows (unpaged and paged) against each slot's own.
    let mut outputs = vec![out.to_host()?];
    if let Some((o, _)) = &paged_outputs {
        outputs.push(o.to_host()?);
    }
    let mut max_rel_diff = 0f64;
    for ragged_out in &outputs {
        for (o, w) in slot_out.iter().zip(cu.windows(2)) {
            let want = o.to_host()?;
            let got = &ragged_out[w[0] as usize * HEADS_Q * HEAD_DIM..][..want.len()];
            let (mut diff, mut norm) = (0f64, 0f64);
            for (g, w) in got.iter().zip(&want) {
                let (g, w) = (g.to_f64(), w.to_f64());
                diff += (g - w) * (g - w);
                norm += w * w;
            }
            max_rel_diff = max_rel_diff.max((diff / norm.max(f64::MIN_POSITIVE)).sqrt());
        }
    }
    Ok(CachePrefillRecord {
        slots,
        prompts: prompts.to_vec(),
        slot_by_slot_ms: times[0],
        ragged_ms: times[1],
        ragged_paged_ms: times.get(2).copied(),
        decode_ms,
        decode_paged_ms,
        max_rel_diff,
    })
}

/// One way of prefilling the scenario's requests into a reset cache.
type Prefill<'a> = dyn FnMut(&mut DuoCache<bf16>) -> Result<()> + 'a;

/// Median times of each run (what it does, to which of `caches`) over `REPS` reps after two warm-ups,
/// each rep from an empty cache when `reset` (the reset queued before the start event). The runs
/// alternate rep by rep, so all see the same clock under the power cap.
fn time(
    ctx: &Context,
    caches: &mut [&mut DuoCache<bf16>],
    runs: &mut [(usize, &mut Prefill<'_>)],
    reset: bool,
) -> Result<Vec<f64>> {
    let cuda = |e: cust::error::CudaError| duo_attn::Error::Cuda {
        during: "timing the cache prefill",
        source: e,
    };
    let stream = ctx.stream().ok_or_else(|| duo_attn::Error::ForeignStream {
        why: "the bench times a context that owns its stream".into(),
    })?;
    let mut times = vec![Vec::with_capacity(REPS); runs.len()];
    for rep in 0..REPS + 2 {
        for ((at, prefill), times) in runs.iter_mut().zip(&mut times) {
            let cache = &mut *caches[*at];
            if reset {
                cache.reset(ctx)?;
            }
            let (start, stop) = (
                Event::new(EventFlags::DEFAULT).map_err(cuda)?,
                Event::new(EventFlags::DEFAULT).map_err(cuda)?,
            );
            start.record(stream).map_err(cuda)?;
            prefill(cache)?;
            stop.record(stream).map_err(cuda)?;
            ctx.synchronize()?;
            if rep >= 2 {
                times.push(stop.elapsed_time_f32(&start).map_err(cuda)? as f64);
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[REPS / 2]
        })
        .collect())
}
