//! New requests prefilled into a DuoAttention cache (`--cache-prefill`): `B` prompts of
//! different lengths into empty slots of one layer (half the KV heads streaming), slot by slot
//! (`CacheSlots::prefill`, one launch each) against one ragged launch (`prefill_varlen`). No peer
//! runs this; both are ours. The ragged outputs are first checked against the slot-by-slot ones.
use crate::cases::{SINK, WINDOW};
use cust::event::{Event, EventFlags};
use duo_attn::{CacheConfig, Context, DeviceTensor, DuoCache, HeadKind, PrefillKernel, Result};
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
    /// Worst relative difference of the ragged outputs from the slot-by-slot ones.
    pub max_rel_diff: f64,
}

/// Prompts of `longest * (b + 1) / slots` tokens (a staggered arrival).
fn prompts(slots: usize, longest: usize) -> Vec<usize> {
    (0..slots).map(|b| longest * (b + 1) / slots).collect()
}

/// Runs every scenario and prints a table.
pub fn run(ctx: &Context, rng: &mut StdRng) -> Result<Vec<CachePrefillRecord>> {
    println!(
        "\ncache prefill: new requests into empty slots of one layer (Hq {HEADS_Q}, Hkv {HEADS_KV}, D {HEAD_DIM}, half the KV heads streaming, sink {SINK}, window {WINDOW}), bf16"
    );
    println!(
        "{:>5} {:>8} {:>14} {:>10} {:>8} {:>9}",
        "slots", "longest", "slot by slot", "ragged", "speedup", "rel diff"
    );
    let mut records = Vec::new();
    for slots in [4, 8, 16] {
        for longest in [512, 2048, 8192] {
            let r = scenario(ctx, rng, &prompts(slots, longest))?;
            println!(
                "{:>5} {:>8} {:>11.3} ms {:>7.3} ms {:>7.2}x {:>9.1e}",
                slots,
                longest,
                r.slot_by_slot_ms,
                r.ragged_ms,
                r.slot_by_slot_ms / r.ragged_ms,
                r.max_rel_diff
            );
            records.push(r);
        }
    }
    Ok(records)
}

fn scenario(ctx: &Context, rng: &mut StdRng, prompts: &[usize]) -> Result<CachePrefillRecord> {
    let slots = prompts.len();
    let total: usize = prompts.iter().sum();
    let kinds = (0..HEADS_KV)
        .map(|h| match h < HEADS_KV / 2 {
            true => HeadKind::Retrieval,
            false => HeadKind::Streaming,
        })
        .collect();
    let cfg = CacheConfig {
        batch: slots,
        max_len: prompts.iter().copied().max().unwrap_or(1),
        heads_q: HEADS_Q,
        heads_kv: HEADS_KV,
        head_dim: HEAD_DIM,
        sink: SINK,
        window: WINDOW,
        softmax_scale: None,
        prefill_kernel: PrefillKernel::Auto,
    };
    let mut cache = DuoCache::<bf16>::new(ctx, cfg, vec![kinds])?;
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
    let [slot_by_slot_ms, ragged_ms] = time(ctx, &mut cache, [&mut slot_by_slot, &mut ragged])?;

    // The last reps' outputs: the ragged rows against each slot's own.
    let ragged_out = out.to_host()?;
    let mut max_rel_diff = 0f64;
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
    Ok(CachePrefillRecord {
        slots,
        prompts: prompts.to_vec(),
        slot_by_slot_ms,
        ragged_ms,
        max_rel_diff,
    })
}

/// One way of prefilling the scenario's requests into a reset cache.
type Prefill<'a> = dyn FnMut(&mut DuoCache<bf16>) -> Result<()> + 'a;

/// Median times of each of `prefills` over `REPS` reps after two warm-ups, each rep from an
/// empty cache (the reset, a memset of the full caches, queued before the start event). The
/// prefills alternate rep by rep, so both see the same clock under the power cap.
fn time(
    ctx: &Context,
    cache: &mut DuoCache<bf16>,
    mut prefills: [&mut Prefill<'_>; 2],
) -> Result<[f64; 2]> {
    let cuda = |e: cust::error::CudaError| duo_attn::Error::Cuda {
        during: "timing the cache prefill",
        source: e,
    };
    let stream = ctx.stream().ok_or_else(|| duo_attn::Error::ForeignStream {
        why: "the bench times a context that owns its stream".into(),
    })?;
    let mut times = [Vec::with_capacity(REPS), Vec::with_capacity(REPS)];
    for rep in 0..REPS + 2 {
        for (prefill, times) in prefills.iter_mut().zip(&mut times) {
            cache.reset(ctx)?;
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
    Ok(times.map(|mut t| {
        t.sort_by(f64::total_cmp);
        t[REPS / 2]
    }))
}
