//! Shared helpers of the integration tests and the demo: random inputs, GPU detection with a loud
//! skip notice, and comparison of kernel outputs with the float64 reference.
use cust::context::CurrentContext;
use cust::stream::Stream;
use cust::sys::{self, CUresult};
use duo_attn::reference::{Shape, attention_row};
use duo_attn::{
    AlibiSlopes, AttentionConfig, AttnElement, CacheConfig, Context, DeviceScalar, Error, HeadKind,
    PrefillKernel,
};
use half::bf16;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use rand_distr::StandardNormal;
use rayon::prelude::*;
use std::io::Write;

/// Writes straight to stderr, past the test harness's output capture, so skips are always seen.
pub fn notice(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// The first GPU if it is a Hopper device; otherwise prints why the calling test skips.
pub fn gpu_or_skip(test: &str) -> Option<Context> {
    match Context::new(0) {
        Ok(ctx) => Some(ctx),
        Err(
            e @ (Error::NoDevice(_)
            | Error::UnsupportedDevice { .. }
            | Error::DeviceOutOfRange { .. }),
        ) => {
            notice(&format!("\n*** SKIPPED GPU TEST `{test}`: {e} ***\n"));
            None
        }
        Err(e) => panic!("{test}: opening the GPU failed: {e}"),
    }
}

/// A seeded RNG; the seed comes from `DUO_ATTN_SEED` or the clock (printed so failures replay).
/// KV head kinds alternating retrieval, streaming, retrieval, ...: the mixed layer of the demo
/// and the tests.
pub fn alternating_kinds(heads_kv: usize) -> Vec<HeadKind> {
    (0..heads_kv)
        .map(|h| {
            if h % 2 == 0 {
                HeadKind::Retrieval
            } else {
                HeadKind::Streaming
            }
        })
        .collect()
}

pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("DUO_ATTN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    notice(&format!(
        "{test}: seed {seed} (set DUO_ATTN_SEED to replay)"
    ));
    StdRng::seed_from_u64(seed)
}

/// `n` standard-normal values rounded to `T`, and the same values as f32 (exact) for the reference.
pub fn random_tensor<T: DeviceScalar>(rng: &mut impl Rng, n: usize) -> (Vec<T>, Vec<f32>) {
    // Chunks of 1 Mi values, each from its own generator seeded by `rng`, filled in parallel: a
    // decode bench case holds billions of values (B = 32, 128k: 4.3 G per K/V tensor), which
    // took most of a bench run's wall time on one thread. One sequence per `rng` state, so a
    // seed still replays.
    const CHUNK: usize = 1 << 20;
    let seeds: Vec<u64> = (0..n.div_ceil(CHUNK)).map(|_| rng.random()).collect();
    let mut data = vec![T::from_f32(0.0); n];
    data.par_chunks_mut(CHUNK)
        .zip(seeds)
        .for_each(|(chunk, seed)| {
            let mut chunk_rng = StdRng::seed_from_u64(seed);
            for x in chunk {
                *x = T::from_f32(chunk_rng.sample::<f32, _>(StandardNormal));
            }
        });
    let f32s = data.par_iter().map(|x| x.to_f32()).collect();
    (data, f32s)
}

/// Query rows `(b, h, i)` to compare: all of them when the reference is cheap, otherwise the first
/// and last 40 rows of every head (tile and mask edges live there) plus 40 random rows between.
pub fn rows_to_check(shape: &Shape, rng: &mut impl Rng) -> Vec<(usize, usize, usize)> {
    const FULL_BUDGET: usize = 1 << 32; // multiply-adds
    let cost = shape.batch * shape.heads_q * shape.seqlen_q * shape.seqlen_k * shape.head_dim;
    let mut rows = Vec::new();
    for b in 0..shape.batch {
        for h in 0..shape.heads_q {
            if cost <= FULL_BUDGET || shape.seqlen_q <= 120 {
                rows.extend((0..shape.seqlen_q).map(|i| (b, h, i)));
            } else {
                let sq = shape.seqlen_q;
                rows.extend((0..40).map(|i| (b, h, i)));
                rows.extend((sq - 40..sq).map(|i| (b, h, i)));
                rows.extend((0..40).map(|_| (b, h, rng.random_range(40..sq - 40))));
            }
        }
    }
    rows
}

/// How a kernel output compares with the reference.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    pub rows: usize,
    /// ||out - ref|| / ||ref|| over all compared rows.
    pub rel_err: f64,
    /// Worst per-row ||out - ref|| / max(||ref||, 1e-3).
    pub worst_row_rel_err: f64,
    /// Worst |lse - ref| / max(1, |ref|) over rows that see keys.
    pub worst_lse_err: f64,
    /// Elements that are NaN/inf (unwritten poison or a broken kernel), output and LSE.
    pub non_finite: usize,
    /// Rows where the kernel and the reference disagree on "sees no key" (LSE -inf, output 0).
    pub masked_row_mismatches: usize,
}

impl Comparison {
    pub const REL_TOL: f64 = 1e-2;
    pub const ROW_TOL: f64 = 2e-2;
    pub const LSE_TOL: f64 = 1e-3;

    pub fn passed(&self) -> bool {
        self.non_finite == 0
            && self.masked_row_mismatches == 0
            && self.rel_err < Self::REL_TOL
            && self.worst_row_rel_err < Self::ROW_TOL
            && self.worst_lse_err < Self::LSE_TOL
    }
}

/// Compares `out` (`[B, Sq, Hq, D]`) and `lse` (`[B, Hq, Sq]`) with the reference on `rows`;
/// every element of both is also checked for NaN/inf.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    shape: &Shape,
    cfg: &AttentionConfig,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    rows: &[(usize, usize, usize)],
) -> Comparison {
    let d = shape.head_dim;
    let non_finite_out = out.par_iter().filter(|x| !x.is_finite()).count();
    let non_finite_lse = lse
        .par_iter()
        .filter(|x| x.is_nan() || **x == f32::INFINITY)
        .count();
    let per_row: Vec<(f64, f64, f64, f64, bool)> = rows
        .par_iter()
        .map(|&(b, h, i)| {
            let (want, want_lse) = attention_row(shape, cfg, q, k, v, b, h, i);
            let got = &out[((b * shape.seqlen_q + i) * shape.heads_q + h) * d..][..d];
            let got_lse = lse[(b * shape.heads_q + h) * shape.seqlen_q + i] as f64;
            let err2: f64 = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).powi(2))
                .sum();
            let ref2: f64 = want.iter().map(|w| w * w).sum();
            let row_rel = err2.sqrt() / ref2.sqrt().max(1e-3);
            let masked = want_lse == f64::NEG_INFINITY;
            let (lse_err, mismatch) = if masked {
                (
                    0.0,
                    got_lse != f64::NEG_INFINITY || got.iter().any(|&x| x != 0.0),
                )
            } else {
                (
                    (got_lse - want_lse).abs() / want_lse.abs().max(1.0),
                    got_lse == f64::NEG_INFINITY,
                )
            };
            (err2, ref2, row_rel, lse_err, mismatch)
        })
        .collect();
    let (err2, ref2) = per_row
        .iter()
        .fold((0.0, 0.0), |(e, r), x| (e + x.0, r + x.1));
    Comparison {
        rows: rows.len(),
        rel_err: if ref2 > 0.0 {
            err2.sqrt() / ref2.sqrt()
        } else {
            err2.sqrt()
        },
        worst_row_rel_err: per_row.iter().map(|x| x.2).fold(0.0, f64::max),
        worst_lse_err: per_row.iter().map(|x| x.3).fold(0.0, f64::max),
        non_finite: non_finite_out + non_finite_lse,
        masked_row_mismatches: per_row.iter().filter(|x| x.4).count(),
    }
}

/// Runs prefill once on the GPU on host inputs, with the outputs poisoned (NaN) first, and
/// returns the output `[B, Sq, Hq, D]` and LSE `[B, Hq, Sq]` after a synchronize.
pub fn run_prefill<T: AttnElement>(
    ctx: &Context,
    shape: &Shape,
    cfg: &AttentionConfig,
    q: &[T],
    k: &[T],
    v: &[T],
) -> Result<(Vec<T>, Vec<f32>), Error> {
    run_poisoned(ctx, shape, cfg, q, k, v, false)
}

/// One prefill (`decode == false`) or plain decode call on host inputs, outputs poisoned first.
fn run_poisoned<T: AttnElement>(
    ctx: &Context,
    shape: &Shape,
    cfg: &AttentionConfig,
    q: &[T],
    k: &[T],
    v: &[T],
    decode: bool,
) -> Result<(Vec<T>, Vec<f32>), Error> {
    let dq = ctx.upload(q, shape.q_shape())?;
    let dk = ctx.upload(k, shape.kv_shape())?;
    let dv = ctx.upload(v, shape.kv_shape())?;
    let mut out = ctx.alloc::<T, 4>(shape.q_shape())?;
    let mut lse = ctx.alloc::<f32, 3>(shape.lse_shape())?;
    out.fill(T::nan())?;
    lse.fill(f32::NAN)?;
    let (q, k, v) = (dq.view(), dk.view(), dv.view());
    let (o, l) = (&mut out.view_mut(), &mut lse.view_mut());
    if decode {
        ctx.decode_attention(&q, &k, &v, o, l, cfg)?;
    } else {
        ctx.attention(&q, &k, &v, o, l, cfg)?;
    }
    ctx.synchronize()?;
    Ok((out.to_host()?, lse.to_host()?))
}

/// Runs one prefill case on the GPU on fresh random inputs (outputs poisoned with NaN first) and
/// compares it with the reference.
pub fn run_prefill_case<T: AttnElement>(
    ctx: &Context,
    shape: &Shape,
    cfg: &AttentionConfig,
    rng: &mut StdRng,
) -> Result<Comparison, Error> {
    run_scaled_keys_case::<T>(ctx, shape, cfg, rng, false, 0.0)
}

/// Runs one decode (`Context::decode_attention`, plain K/V) on fresh random inputs, outputs
/// poisoned first, and compares it with the reference (every row: decode has at most 16 queries,
/// so `rows_to_check` takes them all).
pub fn run_decode_case<T: AttnElement>(
    ctx: &Context,
    shape: &Shape,
    cfg: &AttentionConfig,
    rng: &mut StdRng,
) -> Result<Comparison, Error> {
    run_scaled_keys_case::<T>(ctx, shape, cfg, rng, true, 0.0)
}

/// Like [`run_prefill_case`] (or [`run_decode_case`] with `decode`), with key `j`'s vector
/// scaled by `1 + growth * j / seqlen_k`: scores grow along the keys, so a row's running max
/// keeps moving up block after block (with plain random inputs it settles in the first KV block,
/// and the output rescale then multiplies by about 1).
pub fn run_scaled_keys_case<T: AttnElement>(
    ctx: &Context,
    shape: &Shape,
    cfg: &AttentionConfig,
    rng: &mut StdRng,
    decode: bool,
    growth: f32,
) -> Result<Comparison, Error> {
    let (q, q32) = random_tensor::<T>(rng, shape.q_len());
    let (mut k, mut k32) = random_tensor::<T>(rng, shape.kv_len());
    if growth != 0.0 {
        // [B, Sk, Hkv, D]: one key position is Hkv * D consecutive values.
        let per_key = shape.heads_kv * shape.head_dim;
        for (i, (x, x32)) in k.iter_mut().zip(k32.iter_mut()).enumerate() {
            let j = (i / per_key) % shape.seqlen_k;
            *x = T::from_f32(*x32 * (1.0 + growth * j as f32 / shape.seqlen_k as f32));
            *x32 = x.to_f32();
        }
    }
    let (v, v32) = random_tensor::<T>(rng, shape.kv_len());
    let (out, lse) = run_poisoned(ctx, shape, cfg, &q, &k, &v, decode)?;
    let out32: Vec<f32> = out.iter().map(|x| x.to_f32()).collect();
    let rows = rows_to_check(shape, rng);
    Ok(compare(shape, cfg, &q32, &k32, &v32, &out32, &lse, &rows))
}

/// The `[B + 1]` prefix sum of `B` row counts, from 0 (a `cu_seqlens`).
pub fn prefix_sums(counts: impl IntoIterator<Item = usize>) -> Vec<i32> {
    std::iter::once(0)
        .chain(counts.into_iter().scan(0, |acc, n| {
            *acc += n as i32;
            Some(*acc)
        }))
        .collect()
}

/// The `[B + 1]` prefix sums (`cu_seqlens_q`, `cu_seqlens_k`) of sequences `lens` (query rows,
/// key rows).
pub fn cu_seqlens(lens: &[(usize, usize)]) -> (Vec<i32>, Vec<i32>) {
    (
        prefix_sums(lens.iter().map(|l| l.0)),
        prefix_sums(lens.iter().map(|l| l.1)),
    )
}

/// One varlen prefill (`Context::attention_varlen`, bf16) of sequences `lens` (query and key
/// rows) with `(Hq, Hkv, D)` heads, on fresh random packed inputs with the outputs poisoned
/// first; each sequence compared with the reference on its own (all its rows; NaN/inf in its
/// output or LSE rows counts). Every packed row belongs to one sequence, so an unwritten row
/// fails its sequence.
pub fn run_varlen_case(
    ctx: &Context,
    rng: &mut StdRng,
    (hq, hkv, d): (usize, usize, usize),
    lens: &[(usize, usize)],
    cfg: &AttentionConfig,
) -> Result<Vec<Comparison>, Error> {
    let (cu_q, cu_k) = cu_seqlens(lens);
    let (total_q, total_k) = (cu_q[lens.len()] as usize, cu_k[lens.len()] as usize);
    let (q, q32) = random_tensor::<bf16>(rng, total_q * hq * d);
    let (k, k32) = random_tensor::<bf16>(rng, total_k * hkv * d);
    let (v, v32) = random_tensor::<bf16>(rng, total_k * hkv * d);
    let dq = ctx.upload(&q, [total_q, hq, d])?;
    let dk = ctx.upload(&k, [total_k, hkv, d])?;
    let dv = ctx.upload(&v, [total_k, hkv, d])?;
    let dcu_q = ctx.upload(&cu_q, [cu_q.len()])?;
    let dcu_k = ctx.upload(&cu_k, [cu_k.len()])?;
    let mut out = ctx.alloc::<bf16, 3>([total_q, hq, d])?;
    let mut lse = ctx.alloc::<f32, 2>([hq, total_q])?;
    out.fill(bf16::NAN)?;
    lse.fill(f32::NAN)?;
    ctx.attention_varlen(
        &dq.view(),
        &dk.view(),
        &dv.view(),
        &mut out.view_mut(),
        &mut lse.view_mut(),
        &dcu_q,
        &dcu_k,
        cfg,
    )?;
    ctx.synchronize()?;
    let out32: Vec<f32> = out.to_host()?.iter().map(|x| x.to_f32()).collect();
    let lse_all = lse.to_host()?;
    let rows_of = |x: &[f32], start: usize, n: usize, h: usize| -> Vec<f32> {
        x[start * h * d..(start + n) * h * d].to_vec()
    };
    Ok(lens
        .iter()
        .enumerate()
        .map(|(b, &(sq, sk))| {
            let (q0, k0) = (cu_q[b] as usize, cu_k[b] as usize);
            let keys = (
                &rows_of(&k32, k0, sk, hkv)[..],
                &rows_of(&v32, k0, sk, hkv)[..],
            );
            compare_packed_sequence(
                cfg,
                (hq, hkv, d),
                (b, q0, sq),
                (&q32, keys),
                &out32,
                &lse_all,
            )
        })
        .collect())
}

/// ALiBi slopes for `rows` batch entries (or sequences) of `hq` query heads: ALiBi's standard
/// ones (one row for all) when `standard`, else random ones in `0..0.2`, a row per entry.
pub fn alibi_slopes(
    ctx: &Context,
    rng: &mut StdRng,
    (hq, rows): (usize, usize),
    standard: bool,
) -> AlibiSlopes {
    if standard {
        return AlibiSlopes::new(ctx, &AlibiSlopes::standard(hq)).unwrap();
    }
    let slopes: Vec<f32> = (0..rows * hq).map(|_| rng.random_range(0.0..0.2)).collect();
    AlibiSlopes::per_batch(ctx, &slopes, rows).unwrap()
}

/// `cfg` for sequence `seq` seen by the reference as a batch of one: its own row of ALiBi slopes.
fn for_sequence(cfg: &AttentionConfig, seq: usize) -> AttentionConfig {
    let mut cfg = cfg.clone();
    cfg.alibi = cfg
        .alibi
        .map(|a| a.row(seq).expect("a row of slopes per sequence"));
    cfg
}

/// Compares one sequence of a varlen call with the reference on all its rows: query rows
/// `q0..q0 + sq` of the packed `q`/`out` (`[total_q, Hq, D]`) and `lse` (`[Hq, total_q]`), against
/// its own key rows `k`/`v` (`[Sk, Hkv, D]`); `seq` is its index (its row of ALiBi slopes).
pub fn compare_packed_sequence(
    cfg: &AttentionConfig,
    (hq, hkv, d): (usize, usize, usize),
    (seq, q0, sq): (usize, usize, usize),
    (q, (k, v)): (&[f32], (&[f32], &[f32])),
    out: &[f32],
    lse: &[f32],
) -> Comparison {
    let cfg = &for_sequence(cfg, seq);
    let total_q = lse.len() / hq;
    let shape = Shape {
        batch: 1,
        seqlen_q: sq,
        seqlen_k: k.len() / (hkv * d),
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    };
    let seq_lse: Vec<f32> = (0..hq)
        .flat_map(|h| lse[h * total_q + q0..][..sq].to_vec())
        .collect();
    let rows: Vec<(usize, usize, usize)> = (0..hq)
        .flat_map(|h| (0..sq).map(move |i| (0, h, i)))
        .collect();
    let packed = q0 * hq * d..(q0 + sq) * hq * d;
    compare(
        &shape,
        cfg,
        &q[packed.clone()],
        k,
        v,
        &out[packed],
        &seq_lse,
        &rows,
    )
}

/// Compares a decode with per-sequence key counts (`Context::decode_attention_seqlens`) with the
/// reference, one sequence at a time: sequence `b` is a batch of one over its first `lens[b]`
/// keys, clamped into `0..=shape.seqlen_k` as the kernel clamps them (`shape.seqlen_k` is the
/// K/V tensors' length). Every row of every sequence is compared.
#[allow(clippy::too_many_arguments)]
pub fn compare_per_sequence_lengths(
    shape: &Shape,
    cfg: &AttentionConfig,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    lens: &[i32],
) -> Vec<Comparison> {
    let row = shape.heads_kv * shape.head_dim;
    lens.iter()
        .enumerate()
        .map(|(b, &len)| {
            let len = len.clamp(0, shape.seqlen_k as i32) as usize;
            let one = Shape {
                batch: 1,
                seqlen_k: len,
                ..*shape
            };
            let seq = b * shape.seqlen_k * row..(b * shape.seqlen_k + len) * row;
            let kv = (q, &k[seq.clone()], &v[seq]);
            compare_sequence(&one, cfg, b, kv, out, lse)
        })
        .collect()
}

/// Compares sequence `b` of a call's output (q/out `[b, Sq, Hq, D]`, lse `[b, Hq, Sq]`) with the
/// reference over its own keys (`k`/`v` `[Sk, Hkv, D]`, `one` a batch-of-one shape), on every row.
pub fn compare_sequence(
    one: &Shape,
    cfg: &AttentionConfig,
    b: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
    out: &[f32],
    lse: &[f32],
) -> Comparison {
    let (hq, sq) = (one.heads_q, one.seqlen_q);
    let q_rows = sq * hq * one.head_dim;
    let rows: Vec<_> = (0..hq)
        .flat_map(|h| (0..sq).map(move |i| (0, h, i)))
        .collect();
    let cfg = &for_sequence(cfg, b);
    compare(
        one,
        cfg,
        &q[b * q_rows..][..q_rows],
        k,
        v,
        &out[b * q_rows..][..q_rows],
        &lse[b * hq * sq..][..hq * sq],
        &rows,
    )
}

/// Random K/V values for `shape` (`[B, S_max, Hkv, D]`) whose rows at or past each sequence's
/// key count (clamped as the kernel clamps it) are NaN, so a kernel that read one would show it.
pub fn kv_with_nan_tails<T: DeviceScalar>(
    rng: &mut impl Rng,
    shape: &Shape,
    lens: &[i32],
) -> (Vec<T>, Vec<f32>) {
    let (mut x, x32) = random_tensor::<T>(rng, shape.kv_len());
    let row = shape.heads_kv * shape.head_dim;
    for (b, &len) in lens.iter().enumerate() {
        let len = len.clamp(0, shape.seqlen_k as i32) as usize;
        let seq = &mut x[b * shape.seqlen_k * row..][..shape.seqlen_k * row];
        seq[len * row..].fill(T::nan());
    }
    (x, x32)
}

/// Where a caller's KV cache lives: batch-strided, or in pages of this many keys.
#[derive(Clone, Copy, Debug)]
pub enum CacheLayout {
    Contiguous,
    Paged(usize),
}

impl CacheLayout {
    /// Keys per sequence of a cache made for `keys`: those, rounded up to whole pages when paged
    /// (a block table row's capacity).
    pub fn capacity(self, keys: usize) -> usize {
        match self {
            CacheLayout::Contiguous => keys,
            CacheLayout::Paged(page) => keys.next_multiple_of(page),
        }
    }
}

/// Pool pages `0..pages` in random order: a paged cache's placement, sequence `b`'s page `j` at
/// entry `b * pages_per_sequence + j` (the block table's rows); entries past those are spare.
pub fn shuffled_pages(rng: &mut impl Rng, pages: usize) -> Vec<i32> {
    let mut order: Vec<i32> = (0..pages as i32).collect();
    order.shuffle(rng);
    order
}

/// A `[B, s, row]` cache (`row` elements per key) copied into a pool of `order.len()` pages of
/// `page` keys: sequence `b`'s page `j` goes to pool page `order[b * ceil(s / page) + j]`, and
/// pool rows no key lands in hold `fill`.
pub fn scatter_pages<T: Copy>(
    cache: &[T],
    (s, row): (usize, usize),
    page: usize,
    order: &[i32],
    fill: T,
) -> Vec<T> {
    let (per_seq, batch) = (s.div_ceil(page), cache.len() / (s * row));
    let mut pool = vec![fill; order.len() * page * row];
    for (slot, &p) in order.iter().take(batch * per_seq).enumerate() {
        let (seq, first) = (slot / per_seq, (slot % per_seq) * page);
        let rows = page.min(s - first);
        pool[p as usize * page * row..][..rows * row]
            .copy_from_slice(&cache[(seq * s + first) * row..][..rows * row]);
    }
    pool
}

/// Host copy of the K/V rows each sequence slot of one cache layer holds, to run the reference
/// over each slot's own sequence (`DuoCache` slots at different lengths).
pub struct SlotHistory {
    /// Per slot: `[len, Hkv, D]` rows of K, then of V.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    row: usize,
}

impl SlotHistory {
    pub fn new(slots: usize, heads_kv: usize, head_dim: usize) -> Self {
        SlotHistory {
            k: vec![Vec::new(); slots],
            v: vec![Vec::new(); slots],
            row: heads_kv * head_dim,
        }
    }

    pub fn len(&self, slot: usize) -> usize {
        self.k[slot].len() / self.row
    }

    pub fn is_empty(&self) -> bool {
        self.k.iter().all(|k| k.is_empty())
    }

    /// Appends new K/V `[b, n, Hkv, D]` to slots `first..first + b`.
    pub fn push(&mut self, first: usize, n: usize, k: &[f32], v: &[f32]) {
        let per = n * self.row;
        for (i, (ks, vs)) in k.chunks(per).zip(v.chunks(per)).enumerate() {
            self.k[first + i].extend_from_slice(ks);
            self.v[first + i].extend_from_slice(vs);
        }
    }

    pub fn reset(&mut self, slot: usize) {
        self.k[slot].clear();
        self.v[slot].clear();
    }

    /// Compares a call's output over slots `first..first + b` (q/out `[b, n, Hq, D]`, lse
    /// `[b, Hq, n]`; its K/V already pushed) with the reference over each slot's sequence, whose
    /// last `n` positions the queries hold. Every row is compared.
    #[allow(clippy::too_many_arguments)]
    pub fn compare(
        &self,
        first: usize,
        (n, heads_q): (usize, usize),
        cfg: &AttentionConfig,
        q: &[f32],
        out: &[f32],
        lse: &[f32],
    ) -> Vec<(usize, Comparison)> {
        let head_dim = self.row / cfg.head_kinds.len();
        let b = q.len() / (n * heads_q * head_dim);
        (0..b)
            .map(|i| {
                let slot = first + i;
                let shape = Shape {
                    batch: 1,
                    seqlen_q: n,
                    seqlen_k: self.len(slot),
                    heads_q,
                    heads_kv: cfg.head_kinds.len(),
                    head_dim,
                };
                let kv = (q, &self.k[slot][..], &self.v[slot][..]);
                (slot, compare_sequence(&shape, cfg, i, kv, out, lse))
            })
            .collect()
    }
}

/// A small cache (2 KV heads, D = 64, sink 4, window 8) for the error tests.
pub fn tiny_cache(batch: usize, max_len: usize) -> CacheConfig {
    CacheConfig {
        batch,
        max_len,
        heads_q: 2,
        heads_kv: 2,
        head_dim: 64,
        sink: 4,
        window: 8,
        softmax_scale: None,
        prefill_kernel: PrefillKernel::Auto,
        paging: None,
    }
}

/// The sanitizer tests' cache: 2 KV heads, D = 64, sink 3, window 10 (rings that wrap quickly).
pub fn sanitizer_cache(batch: usize, max_len: usize) -> CacheConfig {
    CacheConfig {
        batch,
        max_len,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 64,
        sink: 3,
        window: 10,
        softmax_scale: None,
        prefill_kernel: PrefillKernel::Auto,
        paging: None,
    }
}

/// Asserts that a CUDA driver call succeeded.
pub fn check(status: CUresult, what: &str) {
    assert_eq!(status, CUresult::CUDA_SUCCESS, "{what}");
}

/// An instantiated CUDA graph of what `queue` puts on `stream` (captured in global mode),
/// destroyed on drop.
pub struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

impl Graph {
    pub fn capture(stream: &Stream, queue: impl FnOnce()) -> Graph {
        let raw = stream.as_inner();
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        let global = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL;
        // SAFETY (each call): a valid stream and live out-parameters.
        check(
            unsafe { sys::cuStreamBeginCapture_v2(raw, global) },
            "begin capture",
        );
        queue();
        check(
            unsafe { sys::cuStreamEndCapture(raw, &mut graph) },
            "end capture",
        );
        check(
            unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) },
            "instantiate the graph",
        );
        Graph { graph, exec }
    }

    pub fn launch(&self, stream: &Stream) {
        // SAFETY: an instantiated graph, a live stream.
        check(
            unsafe { sys::cuGraphLaunch(self.exec, stream.as_inner()) },
            "launch the graph",
        );
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: handles made by `capture`, destroyed once.
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
            sys::cuGraphDestroy(self.graph);
        }
    }
}

/// Waits for the whole device: orders `DeviceTensor`'s legacy-stream copies and fills with work
/// on a non-blocking stream.
pub fn device_sync() {
    CurrentContext::synchronize().unwrap();
}
