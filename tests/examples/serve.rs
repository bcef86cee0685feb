//! DuoAttention serving on a stack of layers: head kinds from a DuoAttention pattern file, a
//! `DuoCache` (full caches for retrieval heads, sink + recent rings for streaming heads), chunked
//! prefill of a long prompt, then token-by-token decode through the per-layer dispatcher
//! (`DuoCache::forward`). Q/K/V per layer are random (a stand-in for a model's projections).
//! Prints the time per chunk and per token and the cache memory against a full cache for every
//! head (measured on the device and from the arithmetic), and checks outputs of a retrieval-heavy
//! and a streaming-heavy layer against the float64 reference over the whole sequence at a few
//! steps. Without a Hopper GPU it prints the plan and the memory arithmetic only.
//!
//! With `--stagger` the sequences' prompts differ in length and each is prefilled into its own
//! cache slot (`DuoCache::slots`); decode then batches the slots at their own lengths. With
//! `--ragged` as well, every slot's next chunk (shorter prompts run out first) goes into one
//! ragged prefill per layer (`DuoCache::prefill_varlen`) instead; the decode checks then verify
//! what those chunks left in the cache.
//!
//! With `--page-size P` the retrieval heads' caches are paged (`CachePaging`): a pool of just
//! the pages the sequences fill, instead of `batch x max_len` rows per head.
//!
//! `cargo run --release -p duo-attn-tests --example serve -- --prompt 16384 --steps 64`
use clap::Parser;
use duo_attn::reference::Shape;
use duo_attn::{
    Binarize, CacheConfig, CachePaging, Context, DuoCache, HeadKind, HeadPattern, PrefillKernel,
    cache_memory,
};
use duo_attn_tests::{compare, notice, prefix_sums};
use half::bf16;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 16384)]
    prompt: usize,
    /// Prefill chunk size.
    #[arg(long, default_value_t = 4096)]
    chunk: usize,
    /// Decode steps (one token per sequence each).
    #[arg(long, default_value_t = 64)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Continuous batching: sequence `b` gets a prompt of `prompt * (b + 1) / batch` tokens,
    /// prefilled into its cache slot alone, then every slot decodes at its own length.
    #[arg(long)]
    stagger: bool,
    /// With `--stagger`: prefill all slots together, one ragged launch per layer and chunk round.
    #[arg(long, requires = "stagger")]
    ragged: bool,
    /// Page the retrieval caches in pages of this many tokens (a power of two, >= 128).
    #[arg(long)]
    page_size: Option<usize>,
    /// Fraction of heads made streaming.
    #[arg(long, default_value_t = 0.5)]
    sparsity: f64,
    /// Pattern directory (DuoAttention format).
    #[arg(long)]
    pattern: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Launch with plain `cuLaunchKernel` (`Context::set_dependent_launch(false)`).
    #[arg(long)]
    no_dependent_launch: bool,
    /// Merge the decode's splits through global memory, never in clusters
    /// (`Context::set_decode_clusters(false)`).
    #[arg(long)]
    no_decode_clusters: bool,
}

impl Args {
    /// Slot `slot`'s prompt: `prompt`, or with `--stagger` `prompt * (slot + 1) / batch`.
    fn prompt_of(&self, slot: usize) -> usize {
        match self.stagger {
            true => (self.prompt * (slot + 1) / self.batch).max(1),
            false => self.prompt,
        }
    }
}

const HEADS_Q: usize = 32;
const HEADS_KV: usize = 8;
const HEAD_DIM: usize = 128;

/// `n` standard-normal bf16 values (and their f32), generated in parallel from `seed`.
fn random(seed: u64, n: usize) -> (Vec<bf16>, Vec<f32>) {
    let data: Vec<bf16> = (0..n.div_ceil(1 << 16))
        .into_par_iter()
        .flat_map_iter(|block| {
            let mut rng =
                SmallRng::seed_from_u64(seed ^ (block as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let len = (n - block * (1 << 16)).min(1 << 16);
            (0..len)
                .map(move |_| bf16::from_f32(rng.sample::<f32, _>(StandardNormal)))
                .collect::<Vec<_>>()
        })
        .collect();
    let f = data.par_iter().map(|x| x.to_f32()).collect();
    (data, f)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// A layer's K/V history on the host, `[B, max_len, Hkv, D]`, for the reference.
struct History {
    layer: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dir = args.pattern.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../patterns/demo-8l-8h")
    });
    let pattern = match HeadPattern::load(&dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let layers = pattern.layers();
    let kinds = pattern
        .head_kinds(Binarize::Sparsity(args.sparsity))
        .unwrap();
    let max_len = args.prompt + args.steps;
    // A paged cache's pool: the pages of every sequence's prompt and decode steps.
    let paging = args.page_size.map(|page_size| CachePaging {
        page_size,
        pages: (0..args.batch)
            .map(|b| (args.prompt_of(b) + args.steps).div_ceil(page_size))
            .sum(),
    });
    let cfg = CacheConfig {
        batch: args.batch,
        max_len,
        heads_q: HEADS_Q,
        heads_kv: HEADS_KV,
        head_dim: HEAD_DIM,
        sink: pattern.sink.unwrap_or(64),
        window: pattern.recent.unwrap_or(256),
        softmax_scale: None,
        prefill_kernel: PrefillKernel::Auto,
        paging,
    };
    println!(
        "duo-attn serve: {layers} layers, B={} Hq={HEADS_Q} Hkv={HEADS_KV} D={HEAD_DIM} bf16, prompt {} (chunks of {}), {} decode steps",
        args.batch, args.prompt, args.chunk, args.steps
    );
    println!(
        "pattern {} (sink {}, recent {}), sparsity {}:",
        dir.display(),
        cfg.sink,
        cfg.window,
        args.sparsity
    );
    for (l, row) in kinds.iter().enumerate() {
        let s: String = row
            .iter()
            .map(|k| if *k == HeadKind::Retrieval { 'R' } else { 's' })
            .collect();
        println!("  layer {l}: {s}");
    }
    if let Err(e) = DuoCache::<bf16>::check(&cfg, &kinds) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    if let Some(p) = paging {
        println!(
            "paged retrieval caches: {} pages of {} tokens per layer and retrieval head",
            p.pages, p.page_size
        );
    }
    let mem = cache_memory(&cfg, &kinds, 2);
    let (sink, recent) = duo_attn::ring_slots(cfg.sink, cfg.window, max_len);
    let retrieval: usize = kinds
        .iter()
        .flatten()
        .filter(|&&k| k == HeadKind::Retrieval)
        .count();
    let streaming = layers * HEADS_KV - retrieval;
    println!(
        "cache: {retrieval} retrieval heads x {max_len} tokens + {streaming} streaming heads x {} slots ({sink} sink + {recent} recent), K and V, {} B per token per head",
        sink + recent,
        args.batch * HEAD_DIM * 2 * 2
    );
    println!(
        "cache memory: {:.1} MiB (full {:.1} + rings {:.1}) vs {:.1} MiB for a full cache on every head: {:.1}% saved",
        mib(mem.total_bytes()),
        mib(mem.full_bytes),
        mib(mem.ring_bytes),
        mib(mem.all_full_bytes),
        100.0 * mem.saving()
    );

    let mut ctx = match Context::new(0) {
        Ok(c) => c,
        Err(e) => {
            println!("\n*** NO GPU: {e}\n*** Printed the plan and the memory arithmetic only.");
            return ExitCode::SUCCESS;
        }
    };
    ctx.set_dependent_launch(!args.no_dependent_launch);
    ctx.set_decode_clusters(!args.no_decode_clusters);
    println!("device: {}", ctx.info().name);
    let free_before = ctx.memory_info().unwrap().0;
    let mut cache = DuoCache::<bf16>::from_pattern(
        &ctx,
        cfg.clone(),
        layers,
        &pattern,
        Binarize::Sparsity(args.sparsity),
    )
    .unwrap();
    let free_after = ctx.memory_info().unwrap().0;
    let m = cache.memory();
    assert_eq!(m, mem);
    println!(
        "allocated on the device: {:.1} MiB (cuMemGetInfo; the arithmetic says {:.1} MiB, allocations round up to 2 MiB pages)",
        mib(free_before - free_after),
        mib(m.total_bytes())
    );

    // Check the layer with the most retrieval heads and the one with the most streaming heads.
    let count_r = |l: &usize| {
        kinds[*l]
            .iter()
            .filter(|&&k| k == HeadKind::Retrieval)
            .count()
    };
    let most_r = (0..layers).max_by_key(count_r).unwrap();
    let most_s = (0..layers).min_by_key(count_r).unwrap();
    let mut checked: Vec<History> = [most_r, most_s]
        .into_iter()
        .map(|layer| History {
            layer,
            k: vec![0.0; args.batch * max_len * HEADS_KV * HEAD_DIM],
            v: vec![0.0; args.batch * max_len * HEADS_KV * HEAD_DIM],
        })
        .collect();
    let kv_row = HEADS_KV * HEAD_DIM;
    let mut failures = 0;
    // One call per layer for the slots `seqs` (all of them: `DuoCache::forward`; else
    // `CacheSlots::forward`) with `n` new tokens each; returns the time of all layers, the host's
    // share of it (until the last layer is queued) and the failed checks.
    let run_step = |cache: &mut DuoCache<bf16>,
                    checked: &mut Vec<History>,
                    seqs: std::ops::Range<usize>,
                    n: usize,
                    seed: u64,
                    check: bool|
     -> (f64, f64, usize) {
        let b = seqs.len();
        // Inputs first (host generation and upload are not timed), then every layer.
        let inputs: Vec<_> = (0..layers)
            .map(|l| {
                let s = seed.wrapping_mul(1000) + l as u64 * 3;
                let q = random(s, b * n * HEADS_Q * HEAD_DIM);
                let k = random(s + 1, b * n * kv_row);
                let v = random(s + 2, b * n * kv_row);
                let dq = ctx.upload(&q.0, [b, n, HEADS_Q, HEAD_DIM]).unwrap();
                let dk = ctx.upload(&k.0, [b, n, HEADS_KV, HEAD_DIM]).unwrap();
                let dv = ctx.upload(&v.0, [b, n, HEADS_KV, HEAD_DIM]).unwrap();
                let out = ctx.alloc::<bf16, 4>([b, n, HEADS_Q, HEAD_DIM]).unwrap();
                let lse = ctx.alloc::<f32, 3>([b, HEADS_Q, n]).unwrap();
                (q.1, k.1, v.1, dq, dk, dv, out, lse)
            })
            .collect();
        let mut inputs = inputs;
        let all = seqs.len() == cache.config().batch;
        ctx.synchronize().unwrap();
        let t = Instant::now();
        for (l, (_, _, _, dq, dk, dv, out, lse)) in inputs.iter_mut().enumerate() {
            let (q, k, v) = (dq.view(), dk.view(), dv.view());
            let (o, s) = (&mut out.view_mut(), &mut lse.view_mut());
            match all {
                true => cache.forward(&ctx, l, &q, &k, &v, o, s),
                false => cache
                    .slots(seqs.clone())
                    .unwrap()
                    .forward(&ctx, l, &q, &k, &v, o, s),
            }
            .unwrap();
        }
        let queued_ms = t.elapsed().as_secs_f64() * 1e3;
        ctx.synchronize().unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // Each slot's length after the call.
        let totals = cache.lens(0).unwrap()[seqs.clone()].to_vec();
        let mut bad = 0;
        for h in checked.iter_mut() {
            let (q32, k32, v32, _, _, _, out, lse) = &inputs[h.layer];
            for (i, &total) in totals.iter().enumerate() {
                let dst = ((seqs.start + i) * max_len + total - n) * kv_row;
                h.k[dst..dst + n * kv_row].copy_from_slice(&k32[i * n * kv_row..][..n * kv_row]);
                h.v[dst..dst + n * kv_row].copy_from_slice(&v32[i * n * kv_row..][..n * kv_row]);
            }
            if !check {
                continue;
            }
            let out32: Vec<f32> = out.to_host().unwrap().iter().map(|x| x.to_f32()).collect();
            let lse = lse.to_host().unwrap();
            let mut rng = SmallRng::seed_from_u64(seed);
            let q_rows = n * HEADS_Q * HEAD_DIM;
            // Per slot: the reference over that slot's own sequence, on a few rows per head.
            let mut worst = duo_attn_tests::Comparison::default();
            let mut passed = true;
            for (i, &total) in totals.iter().enumerate() {
                let shape = Shape {
                    batch: 1,
                    seqlen_q: n,
                    seqlen_k: total,
                    heads_q: HEADS_Q,
                    heads_kv: HEADS_KV,
                    head_dim: HEAD_DIM,
                };
                let seq =
                    |x: &[f32]| x[(seqs.start + i) * max_len * kv_row..][..total * kv_row].to_vec();
                let rows: Vec<_> = (0..HEADS_Q)
                    .flat_map(|hq| {
                        let picks: Vec<usize> = if n <= 4 {
                            (0..n).collect()
                        } else {
                            vec![0, n - 1, rng.random_range(0..n)]
                        };
                        picks.into_iter().map(move |t| (0, hq, t))
                    })
                    .collect();
                let cmp = compare(
                    &shape,
                    cache.attention_config(h.layer).unwrap(),
                    &q32[i * q_rows..][..q_rows],
                    &seq(&h.k),
                    &seq(&h.v),
                    &out32[i * q_rows..][..q_rows],
                    &lse[i * HEADS_Q * n..][..HEADS_Q * n],
                    &rows,
                );
                passed &= cmp.passed();
                worst.rows += cmp.rows;
                worst.rel_err = worst.rel_err.max(cmp.rel_err);
                worst.worst_row_rel_err = worst.worst_row_rel_err.max(cmp.worst_row_rel_err);
                worst.worst_lse_err = worst.worst_lse_err.max(cmp.worst_lse_err);
                worst.non_finite += cmp.non_finite;
            }
            println!(
                "    check layer {} ({} of {} rows{}): rel err {:.2e}, worst row {:.2e}, lse {:.2e}, non-finite {} -> {}",
                h.layer,
                worst.rows,
                b * HEADS_Q * n,
                if b > 1 { ", worst sequence" } else { "" },
                worst.rel_err,
                worst.worst_row_rel_err,
                worst.worst_lse_err,
                worst.non_finite,
                if passed { "ok" } else { "FAILED" }
            );
            bad += !passed as usize;
        }
        (ms, queued_ms, bad)
    };

    // One ragged prefill per layer: slot `i` takes `chunks[i]` new tokens; returns the time of
    // all layers. Records the new K/V of the checked layers (outputs are checked by the tests;
    // the decode checks here verify the cache).
    let run_ragged = |cache: &mut DuoCache<bf16>,
                      checked: &mut Vec<History>,
                      chunks: &[usize],
                      seed: u64|
     -> f64 {
        let total: usize = chunks.iter().sum();
        let cu = prefix_sums(chunks.iter().copied());
        let starts = cache.lens(0).unwrap().to_vec();
        let mut inputs: Vec<_> = (0..layers)
            .map(|l| {
                let s = seed.wrapping_mul(1000) + l as u64 * 3;
                let q = random(s, total * HEADS_Q * HEAD_DIM);
                let k = random(s + 1, total * kv_row);
                let v = random(s + 2, total * kv_row);
                let dq = ctx.upload(&q.0, [total, HEADS_Q, HEAD_DIM]).unwrap();
                let dk = ctx.upload(&k.0, [total, HEADS_KV, HEAD_DIM]).unwrap();
                let dv = ctx.upload(&v.0, [total, HEADS_KV, HEAD_DIM]).unwrap();
                let out = ctx.alloc::<bf16, 3>([total, HEADS_Q, HEAD_DIM]).unwrap();
                let lse = ctx.alloc::<f32, 2>([HEADS_Q, total]).unwrap();
                (k.1, v.1, dq, dk, dv, out, lse)
            })
            .collect();
        ctx.synchronize().unwrap();
        let t = Instant::now();
        for (l, (_, _, dq, dk, dv, out, lse)) in inputs.iter_mut().enumerate() {
            let (q, k, v) = (dq.view(), dk.view(), dv.view());
            cache
                .prefill_varlen(
                    &ctx,
                    l,
                    &q,
                    &k,
                    &v,
                    &cu,
                    &mut out.view_mut(),
                    &mut lse.view_mut(),
                )
                .unwrap();
        }
        ctx.synchronize().unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        for h in checked.iter_mut() {
            let (k32, v32, ..) = &inputs[h.layer];
            for (slot, (&n, &start)) in chunks.iter().zip(&starts).enumerate() {
                let (src, dst) = (
                    cu[slot] as usize * kv_row,
                    (slot * max_len + start) * kv_row,
                );
                h.k[dst..dst + n * kv_row].copy_from_slice(&k32[src..][..n * kv_row]);
                h.v[dst..dst + n * kv_row].copy_from_slice(&v32[src..][..n * kv_row]);
            }
        }
        ms
    };

    println!("prefill:");
    let b = args.batch;
    if args.ragged {
        let prompts: Vec<usize> = (0..b).map(|s| args.prompt_of(s)).collect();
        let mut prefill_ms = 0.0;
        let mut round = 0;
        loop {
            let lens = cache.lens(0).unwrap().to_vec();
            let chunks: Vec<usize> = prompts
                .iter()
                .zip(&lens)
                .map(|(&p, &len)| args.chunk.min(p - len))
                .collect();
            if chunks.iter().all(|&n| n == 0) {
                break;
            }
            let ms = run_ragged(&mut cache, &mut checked, &chunks, 1 + round);
            prefill_ms += ms;
            println!(
                "  round {round}: chunks {chunks:?} at {lens:?}: {ms:.2} ms for {layers} layers"
            );
            round += 1;
        }
        let tokens: usize = prompts.iter().sum();
        println!(
            "  prefill total {prefill_ms:.1} ms ({:.0} tokens/s), one ragged launch per layer and round",
            tokens as f64 / prefill_ms * 1e3
        );
    }
    // Each group of slots prefilled together, and its prompt length.
    let groups: Vec<(std::ops::Range<usize>, usize)> = match args.stagger {
        _ if args.ragged => Vec::new(),
        true => (0..b).map(|s| (s..s + 1, args.prompt_of(s))).collect(),
        false => vec![(0..b, args.prompt)],
    };
    let mut prefill_ms = 0.0;
    let mut chunk_index = 0;
    for (seqs, prompt) in groups {
        let mut len = 0;
        while len < prompt {
            let n = args.chunk.min(prompt - len);
            let (ms, _, bad) = run_step(
                &mut cache,
                &mut checked,
                seqs.clone(),
                n,
                1 + chunk_index,
                true,
            );
            failures += bad;
            len += n;
            prefill_ms += ms;
            let slots = match args.stagger {
                true => format!("slot {}: ", seqs.start),
                false => String::new(),
            };
            println!(
                "  chunk {chunk_index}: {slots}tokens {}..{len}: {ms:.2} ms for {layers} layers",
                len - n
            );
            chunk_index += 1;
        }
    }
    if !args.ragged {
        let tokens: usize = cache.lens(0).unwrap().iter().sum();
        println!(
            "  prefill total {prefill_ms:.1} ms ({:.0} tokens/s)",
            tokens as f64 / prefill_ms * 1e3
        );
    }

    println!("decode:");
    let checkpoints = [0, args.steps / 2, args.steps.saturating_sub(1)];
    let (mut times, mut queued) = (Vec::new(), Vec::new());
    for step in 0..args.steps {
        let check = checkpoints.contains(&step);
        let (ms, queued_ms, bad) = run_step(
            &mut cache,
            &mut checked,
            0..b,
            1,
            10_000 + step as u64,
            check,
        );
        failures += bad;
        times.push(ms);
        queued.push(queued_ms);
        if check {
            println!(
                "  step {step} (context {:?}): {ms:.3} ms per token ({layers} layers)",
                cache.lens(0).unwrap()
            );
        }
    }
    times.sort_by(f64::total_cmp);
    queued.sort_by(f64::total_cmp);
    if !times.is_empty() {
        println!(
            "  time per token (all {layers} layers, B={}): median {:.3} ms, min {:.3} ms \
             (the host queued the layers in a median {:.3} ms)",
            b,
            times[times.len() / 2],
            times[0],
            queued[queued.len() / 2]
        );
    }
    if failures > 0 {
        notice(&format!("serve: {failures} checks FAILED"));
        return ExitCode::FAILURE;
    }
    println!("serve: all checks passed");
    ExitCode::SUCCESS
}
