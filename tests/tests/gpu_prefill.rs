//! The prefill kernel against the float64 reference on a Hopper GPU. Without one every test here
//! prints a SKIPPED notice and returns.
use duo_attn::reference::Shape;
use duo_attn::{AlibiSlopes, AttentionConfig, Context, DType, Error, HeadKind, PrefillKernel};
use duo_attn_tests::{
    Comparison, alibi_slopes, alternating_kinds, compare, gpu_or_skip, notice, random_tensor, rng,
    rows_to_check, run_decode_case, run_prefill, run_prefill_case, run_scaled_keys_case,
    run_varlen_case,
};
use half::{bf16, f16};
use rand::{Rng, rngs::StdRng};

const SEQLENS: [usize; 5] = [1, 17, 128, 1000, 4096];
const HEADS: [(usize, usize); 3] = [(8, 8), (32, 8), (8, 1)];
const HEAD_DIMS: [usize; 2] = [64, 128];
const SINKS: [u32; 3] = [0, 4, 128];
const WINDOWS: [u32; 4] = [0, 1, 256, 5000];
/// Every prefill kernel, the TMA one (what `Auto` runs) first.
const ALL_KERNELS: [PrefillKernel; 4] = [
    PrefillKernel::WgmmaTma,
    PrefillKernel::WgmmaWarpSpecialized,
    PrefillKernel::Wgmma,
    PrefillKernel::MmaSync,
];

/// Mixed head kinds with at least one of each when there are two or more KV heads.
fn mixed_kinds(rng: &mut StdRng, heads_kv: usize, case: usize) -> Vec<HeadKind> {
    if heads_kv == 1 {
        return vec![if case.is_multiple_of(2) {
            HeadKind::Streaming
        } else {
            HeadKind::Retrieval
        }];
    }
    let mut kinds: Vec<HeadKind> = (0..heads_kv)
        .map(|_| {
            if rng.random_bool(0.5) {
                HeadKind::Streaming
            } else {
                HeadKind::Retrieval
            }
        })
        .collect();
    kinds[0] = HeadKind::Streaming;
    kinds[heads_kv - 1] = HeadKind::Retrieval;
    kinds
}

struct Case {
    shape: Shape,
    cfg: AttentionConfig,
    dtype: DType,
}

/// Every (Sq, Sk) pair x head layout x head dim; batch, sink, window, dtype and causality rotate
/// so that every sink x window x batch combination appears (period 24) across the 150 cases.
fn matrix(rng: &mut StdRng) -> Vec<Case> {
    matrix_of(rng, &HEAD_DIMS)
}

fn matrix_of(rng: &mut StdRng, head_dims: &[usize]) -> Vec<Case> {
    let mut cases = Vec::new();
    for &sq in &SEQLENS {
        for &sk in &SEQLENS {
            for &(hq, hkv) in &HEADS {
                for &d in head_dims {
                    let n = cases.len();
                    let shape = Shape {
                        batch: 1 + n % 2,
                        seqlen_q: sq,
                        seqlen_k: sk,
                        heads_q: hq,
                        heads_kv: hkv,
                        head_dim: d,
                    };
                    let cfg = AttentionConfig::new(mixed_kinds(rng, hkv, n))
                        .sink(SINKS[(n / 2) % 3])
                        .window(WINDOWS[(n / 6) % 4])
                        .causal(n % 5 != 4);
                    let dtype = if (n / 3) % 2 == 0 {
                        DType::BF16
                    } else {
                        DType::F16
                    };
                    cases.push(Case { shape, cfg, dtype });
                }
            }
        }
    }
    cases
}

fn run(ctx: &Context, case: &Case, rng: &mut StdRng) -> Result<Comparison, Error> {
    match case.dtype {
        DType::BF16 => run_prefill_case::<bf16>(ctx, &case.shape, &case.cfg, rng),
        DType::F16 => run_prefill_case::<f16>(ctx, &case.shape, &case.cfg, rng),
        DType::F32 | DType::I32 => unreachable!("not an attention input type"),
    }
}

#[test]
fn prefill_matches_reference_over_the_matrix() {
    matrix_for(
        PrefillKernel::Wgmma,
        "prefill_matches_reference_over_the_matrix",
    );
}

/// The warp-specialised kernel with TMA loads (what `Auto` runs).
#[test]
fn tma_prefill_matches_reference_over_the_matrix() {
    matrix_for(
        PrefillKernel::WgmmaTma,
        "tma_prefill_matches_reference_over_the_matrix",
    );
}

/// Head dim 256 (the TMA kernel only: 48-key blocks, three stages, O in two n128 halves): the
/// same (Sq, Sk) x heads grid with its own rotation of sinks, windows, dtypes and causality.
#[test]
fn tma_prefill_head_dim_256_matches_reference() {
    let test = "tma_prefill_head_dim_256_matches_reference";
    run_matrix(PrefillKernel::WgmmaTma, test, |rng| matrix_of(rng, &[256]));
}

/// Split-KV forced on the TMA kernel's matrix (D 64, 128 and 256): 2, 3, 7 or 32 splits per query
/// tile, merged by their LSE; a tile with fewer KV blocks than splits leaves some splits empty
/// (their partial rows: O = 0, LSE = -inf). The plain matrix splits where few tiles meet long
/// contexts (the launch's own choice).
#[test]
fn split_kv_prefill_matches_reference_over_the_matrix() {
    let test = "split_kv_prefill_matches_reference_over_the_matrix";
    run_matrix(PrefillKernel::WgmmaTma, test, |rng| {
        let mut cases = matrix_of(rng, &[64, 128, 256]);
        for (n, case) in cases.iter_mut().enumerate() {
            case.cfg.kv_splits = Some([2, 3, 7, 32][n % 4]);
        }
        cases
    });
}

/// A small split-KV launch for compute-sanitizer (`run.sh sanitize`): a chunk of 100 queries
/// against 3000 keys, mixed heads, GQA, three forced splits and the launch's own choice, D 64,
/// 128 and 256, both dtypes; and 24 splits at D = 64 (the merge's lanes 16-31 hold weights but
/// no columns there).
#[test]
fn split_kv_small_launches() {
    let Some(ctx) = gpu_or_skip("split_kv_small_launches") else {
        return;
    };
    let mut rng = rng("split kv small");
    let mut failures = Vec::new();
    for (n, (d, splits)) in [
        (64, Some(3)),
        (128, Some(3)),
        (128, None),
        (64, None),
        (64, Some(24)),
        (256, Some(3)),
        (256, None),
    ]
    .into_iter()
    .enumerate()
    {
        let shape = Shape {
            batch: 2,
            seqlen_q: 100,
            seqlen_k: 3000,
            heads_q: 8,
            heads_kv: 2,
            head_dim: d,
        };
        let cfg = AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
            .sink(16)
            .window(700)
            .kv_splits(splits);
        let cmp = if n % 2 == 0 {
            run_prefill_case::<bf16>(&ctx, &shape, &cfg, &mut rng)
        } else {
            run_prefill_case::<f16>(&ctx, &shape, &cfg, &mut rng)
        }
        .unwrap();
        let label = format!("split-KV D={d} splits {splits:?}: {cmp:?}");
        notice(&label);
        if !cmp.passed() {
            failures.push(label);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The warp-specialised kernel with cp.async loads (`Auto`'s fallback).
#[test]
fn warp_specialised_prefill_matches_reference_over_the_matrix() {
    matrix_for(
        PrefillKernel::WgmmaWarpSpecialized,
        "warp_specialised_prefill_matches_reference_over_the_matrix",
    );
}

#[test]
fn mma_sync_prefill_matches_reference_over_the_matrix() {
    matrix_for(
        PrefillKernel::MmaSync,
        "mma_sync_prefill_matches_reference_over_the_matrix",
    );
}

fn matrix_for(kernel: PrefillKernel, test: &str) {
    run_matrix(kernel, test, matrix);
}

fn run_matrix(kernel: PrefillKernel, test: &str, cases_of: impl Fn(&mut StdRng) -> Vec<Case>) {
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut cases = cases_of(&mut rng);
    for case in &mut cases {
        case.cfg.kernel = kernel;
    }
    let mut failures = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let s = &case.shape;
        let streaming = case
            .cfg
            .head_kinds
            .iter()
            .filter(|&&k| k == HeadKind::Streaming)
            .count();
        let label = format!(
            "#{n:3} {:?} B={} Sq={:4} Sk={:4} H={:2}/{} D={:3} causal={} sink={:3} window={:4} streaming {}/{}",
            case.dtype,
            s.batch,
            s.seqlen_q,
            s.seqlen_k,
            s.heads_q,
            s.heads_kv,
            s.head_dim,
            case.cfg.causal as u8,
            case.cfg.sink,
            case.cfg.window,
            streaming,
            s.heads_kv
        );
        let cmp = run(&ctx, case, &mut rng).unwrap_or_else(|e| panic!("{label}: {e}"));
        let verdict = if cmp.passed() { "ok" } else { "FAIL" };
        notice(&format!(
            "{label}: rel {:.2e} row {:.2e} lse {:.2e} nonfinite {} masked-mismatch {} rows {} {verdict}",
            cmp.rel_err,
            cmp.worst_row_rel_err,
            cmp.worst_lse_err,
            cmp.non_finite,
            cmp.masked_row_mismatches,
            cmp.rows
        ));
        if !cmp.passed() {
            failures.push(label);
        }
    }
    notice(&format!(
        "{kernel:?} prefill matrix on {}: {} cases, {} failed",
        ctx.info().name,
        cases.len(),
        failures.len()
    ));
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

/// Scores that grow along the keys (key j scaled by 1 + 8 j / Sk), so each row's running max
/// keeps moving up past the first KV block and the O rescale multiplies by factors well below 1;
/// with plain random inputs the max settles in the first block and the factors stay near 1.
/// Every kernel, D 64 and 128 (and 256 on the TMA kernel), both dtypes, causal retrieval and
/// streaming heads.
#[test]
fn growing_scores_rescale_the_output() {
    let Some(ctx) = gpu_or_skip("growing_scores_rescale_the_output") else {
        return;
    };
    let mut rng = rng("growing scores");
    let mut failures = Vec::new();
    let mut cases = 0;
    for kernel in ALL_KERNELS {
        let dims: &[usize] = if kernel == PrefillKernel::WgmmaTma {
            &[64, 128, 256]
        } else {
            &[64, 128]
        };
        // The TMA kernel also with five KV splits forced: the splits' LSEs then
        // differ widely, which the merge must weigh right.
        let splits: &[Option<usize>] = if kernel == PrefillKernel::WgmmaTma {
            &[None, Some(5)]
        } else {
            &[None]
        };
        for (&d, &kv_splits) in dims.iter().flat_map(|d| splits.iter().map(move |s| (d, s))) {
            for (sq, sk) in [(3000, 3000), (700, 3000)] {
                let shape = Shape {
                    batch: 1,
                    seqlen_q: sq,
                    seqlen_k: sk,
                    heads_q: 4,
                    heads_kv: 2,
                    head_dim: d,
                };
                let cfg = AttentionConfig::new(vec![HeadKind::Retrieval, HeadKind::Streaming])
                    .sink(64)
                    .window(1500)
                    .kernel(kernel)
                    .kv_splits(kv_splits);
                let cmp = if (d + sq) % 2 == 0 {
                    run_scaled_keys_case::<bf16>(&ctx, &shape, &cfg, &mut rng, false, 8.0)
                } else {
                    run_scaled_keys_case::<f16>(&ctx, &shape, &cfg, &mut rng, false, 8.0)
                }
                .unwrap();
                cases += 1;
                let label =
                    format!("{kernel:?} D={d} Sq={sq} Sk={sk} splits {kv_splits:?}: {cmp:?}");
                notice(&label);
                if !cmp.passed() {
                    failures.push(label);
                }
            }
        }
    }
    notice(&format!(
        "growing scores: {cases} cases, {} failed",
        failures.len()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Q, K and V carved out of one packed `[B, S, Hq + 2 Hkv, D]` tensor; the output written into
/// a buffer with padded rows. Exercises every stride the kernel takes.
#[test]
fn strided_packed_qkv_and_padded_output() {
    let Some(ctx) = gpu_or_skip("strided_packed_qkv_and_padded_output") else {
        return;
    };
    let mut rng = rng("strided layouts");
    let (b, s, hq, hkv, d) = (2, 300, 8, 2, 128);
    let heads = hq + 2 * hkv;
    let (packed, packed32) = random_tensor::<bf16>(&mut rng, b * s * heads * d);
    let dev = ctx.upload(&packed, [b * s * heads * d]).unwrap();
    let strides = [s * heads * d, heads * d, d, 1];
    let q = dev.strided_view(0, [b, s, hq, d], strides).unwrap();
    let k = dev.strided_view(hq * d, [b, s, hkv, d], strides).unwrap();
    let v = dev
        .strided_view((hq + hkv) * d, [b, s, hkv, d], strides)
        .unwrap();
    // Output rows padded to 2 * Hq * D elements.
    let out_row = 2 * hq * d;
    let mut out = ctx.alloc::<bf16, 1>([b * s * out_row]).unwrap();
    out.fill(bf16::NAN).unwrap();
    let mut lse = ctx.alloc::<f32, 3>([b, hq, s]).unwrap();
    lse.fill(f32::NAN).unwrap();
    let cfg = AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
        .sink(16)
        .window(100);
    {
        let mut out_view = out
            .strided_view_mut(0, [b, s, hq, d], [s * out_row, out_row, d, 1])
            .unwrap();
        ctx.attention(&q, &k, &v, &mut out_view, &mut lse.view_mut(), &cfg)
            .unwrap();
    }
    ctx.synchronize().unwrap();

    // Unpack to the dense layouts the reference takes.
    let gather = |first: usize, count: usize, src: &[f32], row: usize| -> Vec<f32> {
        let mut dst = Vec::with_capacity(b * s * count * d);
        for t in 0..b * s {
            dst.extend_from_slice(&src[t * row + first * d..][..count * d]);
        }
        dst
    };
    let (q32, k32, v32) = (
        gather(0, hq, &packed32, heads * d),
        gather(hq, hkv, &packed32, heads * d),
        gather(hq + hkv, hkv, &packed32, heads * d),
    );
    let out_host: Vec<f32> = out.to_host().unwrap().iter().map(|x| x.to_f32()).collect();
    // The padding must still hold the poison: the kernel writes only inside the view.
    for t in 0..b * s {
        assert!(
            out_host[t * out_row + hq * d..(t + 1) * out_row]
                .iter()
                .all(|x| x.is_nan()),
            "wrote into row padding"
        );
    }
    let out32 = gather(0, hq, &out_host, out_row);
    let shape = Shape {
        batch: b,
        seqlen_q: s,
        seqlen_k: s,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    };
    let rows = rows_to_check(&shape, &mut rng);
    let cmp = compare(
        &shape,
        &cfg,
        &q32,
        &k32,
        &v32,
        &out32,
        &lse.to_host().unwrap(),
        &rows,
    );
    notice(&format!("strided layouts: {cmp:?}"));
    assert!(cmp.passed(), "{cmp:?}");
}

/// Buffers another library allocated (cust's own `DeviceBuffer` here, as cudarc or candle would
/// hold them) run through foreign views and match the reference; the driver's record of each
/// allocation bounds the views, and addresses it does not know are errors.
#[test]
fn foreign_device_memory() {
    use cust::memory::{CopyDestination, DeviceBuffer};
    use duo_attn::tensor::contiguous_strides;
    let Some(ctx) = gpu_or_skip("foreign_device_memory") else {
        return;
    };
    let mut rng = rng("foreign memory");
    let shape = Shape {
        batch: 2,
        seqlen_q: 300,
        seqlen_k: 777,
        heads_q: 8,
        heads_kv: 2,
        head_dim: 128,
    };
    let bits = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<u16>>();
    let (q, q32) = random_tensor::<bf16>(&mut rng, shape.q_len());
    let (k, k32) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let (v, v32) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let dq = DeviceBuffer::from_slice(&bits(&q)).unwrap();
    let dk = DeviceBuffer::from_slice(&bits(&k)).unwrap();
    let dv = DeviceBuffer::from_slice(&bits(&v)).unwrap();
    let dout = DeviceBuffer::from_slice(&vec![bf16::NAN.to_bits(); shape.q_len()]).unwrap();
    let lse_len = shape.lse_shape().iter().product();
    let dlse = DeviceBuffer::from_slice(&vec![f32::NAN; lse_len]).unwrap();
    let addr = |b: &DeviceBuffer<u16>| b.as_device_ptr().as_raw();
    let cfg = AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
        .sink(16)
        .window(100);
    // SAFETY: the buffers outlive the views and the synchronize below; nothing else touches them.
    unsafe {
        let dense = |s: [usize; 4]| (s, contiguous_strides(s));
        let (qs, qst) = dense(shape.q_shape());
        let (ks, kst) = dense(shape.kv_shape());
        let q_view = ctx.foreign_view::<bf16, 4>(addr(&dq), qs, qst).unwrap();
        let k_view = ctx.foreign_view::<bf16, 4>(addr(&dk), ks, kst).unwrap();
        let v_view = ctx.foreign_view::<bf16, 4>(addr(&dv), ks, kst).unwrap();
        let mut out_view = ctx
            .foreign_view_mut::<bf16, 4>(addr(&dout), qs, qst)
            .unwrap();
        let lse_shape = shape.lse_shape();
        let mut lse_view = ctx
            .foreign_view_mut::<f32, 3>(
                dlse.as_device_ptr().as_raw(),
                lse_shape,
                contiguous_strides(lse_shape),
            )
            .unwrap();
        ctx.attention(
            &q_view,
            &k_view,
            &v_view,
            &mut out_view,
            &mut lse_view,
            &cfg,
        )
        .unwrap();
    }
    ctx.synchronize().unwrap();
    let mut out_bits = vec![0u16; shape.q_len()];
    dout.copy_to(&mut out_bits[..]).unwrap();
    let out32: Vec<f32> = out_bits
        .iter()
        .map(|&b| bf16::from_bits(b).to_f32())
        .collect();
    let mut lse = vec![0f32; lse_len];
    dlse.copy_to(&mut lse[..]).unwrap();
    let rows = rows_to_check(&shape, &mut rng);
    let cmp = compare(&shape, &cfg, &q32, &k32, &v32, &out32, &lse, &rows);
    notice(&format!("foreign device memory: {cmp:?}"));
    assert!(cmp.passed(), "{cmp:?}");

    // The allocation bounds the view. The driver may round an allocation up, so ask it first how
    // far the buffer reaches from 100 elements before the end of `q`.
    let inner = addr(&dq) + 2 * (shape.q_len() as u64 - 100);
    // SAFETY (every call below): `dq` outlives the views, which are never used.
    let err = unsafe { ctx.foreign_view::<bf16, 1>(inner, [1 << 40], [1]) }.unwrap_err();
    let Error::OutOfBounds { available, .. } = err else {
        panic!("a view past the allocation: {err}");
    };
    assert!((100..100 + (1 << 20)).contains(&available), "{available}");
    let fits = unsafe { ctx.foreign_view::<bf16, 1>(inner, [available], [1]) };
    assert!(fits.is_ok(), "{:?}", fits.err());
    let err = unsafe { ctx.foreign_view::<bf16, 1>(inner, [available + 1], [1]) }.unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { .. }), "{err}");
    notice(&format!(
        "100 elements before the end of q: {available} available"
    ));
    let err = unsafe { ctx.foreign_view::<bf16, 1>(addr(&dq) + 1, [8], [1]) }.unwrap_err();
    assert!(matches!(err, Error::Misaligned { .. }), "{err}");
    let err = unsafe { ctx.foreign_view::<bf16, 1>(0, [8], [1]) }.unwrap_err();
    assert!(matches!(err, Error::ForeignPointer { .. }), "{err}");
    let host = [0u16; 64];
    let err = unsafe { ctx.foreign_view::<bf16, 1>(host.as_ptr() as u64, [8], [1]) }.unwrap_err();
    assert!(matches!(err, Error::ForeignPointer { .. }), "{err}");
    notice(&format!("a host address: {err}"));
}

/// One context shared by threads (it is `Sync`): split-KV prefill and decode launches from four
/// threads at once, each asking for more split partials than the last, so the context's scratch
/// buffer grows (and its old one is freed) while other threads launch. Every result is checked.
#[test]
fn one_context_many_threads() {
    let Some(ctx) = gpu_or_skip("one_context_many_threads") else {
        return;
    };
    std::thread::scope(|scope| {
        for t in 0..4usize {
            let ctx = &ctx;
            scope.spawn(move || {
                let mut rng = rng(&format!("thread {t}"));
                for j in 0..6usize {
                    // A 128-query chunk against 4k keys, its split count forced to grow.
                    let chunk = Shape {
                        batch: 1,
                        seqlen_q: 128,
                        seqlen_k: 4096,
                        heads_q: 32,
                        heads_kv: 8,
                        head_dim: 128,
                    };
                    let cfg = AttentionConfig::new(alternating_kinds(8))
                        .sink(4)
                        .window(1000)
                        .kv_splits(Some(1 + j + t));
                    let cmp = run_prefill_case::<bf16>(ctx, &chunk, &cfg, &mut rng).unwrap();
                    assert!(cmp.passed(), "thread {t}, prefill {j}: {cmp:?}");
                    let decode = Shape {
                        batch: 2,
                        seqlen_q: 1 + j,
                        seqlen_k: 3000 + 1000 * t,
                        ..chunk
                    };
                    let cfg = AttentionConfig::new(alternating_kinds(8))
                        .sink(4)
                        .window(1000);
                    let cmp = run_decode_case::<bf16>(ctx, &decode, &cfg, &mut rng).unwrap();
                    assert!(cmp.passed(), "thread {t}, decode {j}: {cmp:?}");
                }
                notice(&format!(
                    "thread {t}: 6 split prefills and 6 decodes passed"
                ));
            });
        }
    });
}

/// More work tiles than resident blocks, so each persistent block runs several tiles back to back
/// (the tile-boundary overlap of the TMA kernel; at D = 256 also the Q buffer released after a
/// tile's last S GEMM while half of Q sits in registers, and lazy rescaling). Small enough for
/// `compute-sanitizer` (`run.sh sanitize` runs it).
#[test]
fn persistent_blocks_take_many_tiles() {
    let Some(ctx) = gpu_or_skip("persistent_blocks_take_many_tiles") else {
        return;
    };
    let mut rng = rng("many tiles");
    for d in [64, 128, 256] {
        let shape = Shape {
            batch: 2,
            seqlen_q: 512,
            seqlen_k: 640,
            heads_q: 32,
            heads_kv: 8,
            head_dim: d,
        };
        let cfg = AttentionConfig::new(alternating_kinds(8))
            .sink(4)
            .window(100)
            .kernel(PrefillKernel::WgmmaTma);
        let cmp = run_prefill_case::<bf16>(&ctx, &shape, &cfg, &mut rng).unwrap();
        notice(&format!("many tiles per block, D={d}: {cmp:?}"));
        assert!(cmp.passed(), "D={d}: {cmp:?}");
    }
}

/// Same inputs twice give bit-identical outputs (a race would show as run-to-run differences).
#[test]
fn prefill_is_deterministic() {
    let Some(ctx) = gpu_or_skip("prefill_is_deterministic") else {
        return;
    };
    let mut rng = rng("determinism");
    let shape = Shape {
        batch: 1,
        seqlen_q: 1000,
        seqlen_k: 1500,
        heads_q: 16,
        heads_kv: 4,
        head_dim: 64,
    };
    let (q, _) = random_tensor::<f16>(&mut rng, shape.q_len());
    let (k, _) = random_tensor::<f16>(&mut rng, shape.kv_len());
    let (v, _) = random_tensor::<f16>(&mut rng, shape.kv_len());
    let cfg = AttentionConfig::new(vec![
        HeadKind::Streaming,
        HeadKind::Retrieval,
        HeadKind::Streaming,
        HeadKind::Retrieval,
    ]);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (out, lse) = run_prefill(&ctx, &shape, &cfg, &q, &k, &v).unwrap();
        let bits: Vec<u16> = out.iter().map(|x| x.to_bits()).collect();
        let lse_bits: Vec<u32> = lse.iter().map(|x| x.to_bits()).collect();
        runs.push((bits, lse_bits));
    }
    assert!(runs[0] == runs[1], "two runs on the same inputs differ");
}

#[test]
fn host_and_device_errors() {
    let Some(ctx) = gpu_or_skip("host_and_device_errors") else {
        return;
    };
    let err = ctx
        .upload(&[bf16::ONE; 10], [2, 4])
        .err()
        .expect("10 elements for a 2x4 shape must fail");
    assert!(
        matches!(
            err,
            Error::HostLength {
                expected: 8,
                got: 10,
                ..
            }
        ),
        "{err}"
    );
    let count = Context::device_count().unwrap();
    let err = Context::new(count)
        .err()
        .expect("an ordinal past the last device must fail");
    assert!(matches!(err, Error::DeviceOutOfRange { .. }), "{err}");
}

/// A full grid (full causal, B1, 4k, 32 heads, D128: 1024 blocks) launched 20 times in a row:
/// an earlier pipelining variant hung here under load while passing every single-shot test.
/// B=1, 4k x 4k, 32 heads, D=128: a full grid of 1024 blocks for the launch-pattern tests.
fn full_grid_shape() -> Shape {
    Shape {
        batch: 1,
        seqlen_q: 4096,
        seqlen_k: 4096,
        heads_q: 32,
        heads_kv: 32,
        head_dim: 128,
    }
}

#[test]
fn full_grid_repeated_launches() {
    let Some(ctx) = gpu_or_skip("full_grid_repeated_launches") else {
        return;
    };
    let mut rng = rng("full grid repeated");
    let shape = full_grid_shape();
    let cfg = AttentionConfig::all_retrieval(32);
    let (q, _) = random_tensor::<bf16>(&mut rng, shape.q_len());
    let (k, _) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    for _ in 0..20 {
        let (out, lse) = run_prefill(&ctx, &shape, &cfg, &q, &k, &k).unwrap();
        assert!(out.iter().all(|x| x.to_f32().is_finite()) && lse.iter().all(|x| x.is_finite()));
    }
}

/// The warp-specialised kernel under the launch pattern that once hung it (named barrier left
/// half-arrived at CTA exit, fixed): 300 full-grid launches queued back to back (mixed head kinds,
/// so CTAs of very different lengths share SMs), one synchronize at the end. A watchdog turns a
/// hang into a failed run instead of a stuck one.
#[test]
fn warp_specialised_back_to_back_stress() {
    let Some(ctx) = gpu_or_skip("warp_specialised_back_to_back_stress") else {
        return;
    };
    let mut rng = rng("ws stress");
    let shape = full_grid_shape();
    let cfg = AttentionConfig::new(alternating_kinds(32))
        .sink(128)
        .window(1024);
    let (q, _) = random_tensor::<bf16>(&mut rng, shape.q_len());
    let (k, _) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let dq = ctx.upload(&q, shape.q_shape()).unwrap();
    let dk = ctx.upload(&k, shape.kv_shape()).unwrap();
    let mut out = ctx.alloc::<bf16, 4>(shape.q_shape()).unwrap();
    let mut lse = ctx.alloc::<f32, 3>(shape.lse_shape()).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(120));
        if !watch.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("warp_specialised_back_to_back_stress: no progress in 120 s: DEADLOCK");
            std::process::exit(101);
        }
    });
    // Both load paths of the warp-specialised kernel (TMA, cp.async), 300 launches each.
    for kernel in [PrefillKernel::WgmmaTma, PrefillKernel::WgmmaWarpSpecialized] {
        let cfg = cfg.clone().kernel(kernel);
        for _ in 0..300 {
            ctx.attention(
                &dq.view(),
                &dk.view(),
                &dk.view(),
                &mut out.view_mut(),
                &mut lse.view_mut(),
                &cfg,
            )
            .unwrap();
        }
    }
    ctx.synchronize().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let out = out.to_host().unwrap();
    assert!(out.iter().all(|x| x.to_f32().is_finite()));
}

/// Varlen batches (packed `[total, H, D]`, `cu_seqlens`): sequences with Sq < Sk, Sq = Sk, an
/// empty query sequence and an empty key sequence, mixed head kinds, against the reference run
/// per sequence; every kernel at D = 128, the TMA kernel at D = 256.
#[test]
fn varlen_matches_reference_per_sequence() {
    let Some(ctx) = gpu_or_skip("varlen_matches_reference_per_sequence") else {
        return;
    };
    let mut rng = rng("varlen");
    let lens = [(100, 300), (517, 517), (0, 50), (37, 0), (1, 1000)];
    let mut failures = Vec::new();
    // Head dim 256 runs on the TMA kernel only.
    for (d, kernels) in [(128, &ALL_KERNELS[..]), (256, &ALL_KERNELS[..1])] {
        for &kernel in kernels {
            let cfg = AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
                .sink(8)
                .window(64)
                .kernel(kernel);
            failures.extend(check_varlen(&ctx, &mut rng, (8, 2, d), &lens, &cfg));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Split-KV on varlen batches (partial rows in the LSE's packed `[Hq, total_q]` order): one long
/// sequence among short ones, an empty query sequence and an empty key sequence, mixed head
/// kinds, D 64, 128 and 256; the launch's own choice (it splits: the tiles fill a tenth of the GPU),
/// and 3 or 32 splits forced (short sequences' tiles then have empty splits). Small enough for
/// compute-sanitizer (`run.sh sanitize`).
#[test]
fn split_kv_varlen_matches_reference_per_sequence() {
    let Some(ctx) = gpu_or_skip("split_kv_varlen_matches_reference_per_sequence") else {
        return;
    };
    let mut rng = rng("split kv varlen");
    let lens = [
        (128, 4000),
        (64, 300),
        (0, 50),
        (37, 0),
        (1, 1000),
        (200, 2500),
    ];
    let mut failures = Vec::new();
    for (d, splits) in [
        (128, None),
        (64, None),
        (128, Some(3)),
        (64, Some(32)),
        (256, None),
        (256, Some(7)),
    ] {
        let cfg = AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
            .sink(16)
            .window(700)
            .kernel(PrefillKernel::WgmmaTma)
            .kv_splits(splits);
        failures.extend(check_varlen(&ctx, &mut rng, (8, 2, d), &lens, &cfg));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// FlashAttention's `causal` and `window_size = (left, right)` (`AttentionConfig::flash`):
/// bands to the left, to the right and both ways, Sq < Sk, Sq = Sk and Sq > Sk, GQA, every
/// kernel at D 64 and 128 and the TMA kernel at D 256, split-KV forced on some TMA cases; then
/// DuoAttention's mixed heads with a right window, and a varlen batch.
#[test]
fn flash_window_sizes_match_reference() {
    let test = "flash_window_sizes_match_reference";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let windows: [(bool, (i64, i64)); 9] = [
        (false, (-1, -1)),
        (true, (-1, -1)),
        (false, (-1, 37)),
        (true, (255, -1)),
        (false, (100, 100)),
        (false, (0, 300)),
        (false, (1000, -1)),
        (false, (3, 7)),
        (false, (200, 0)),
    ];
    let shapes = [(1000, 1000), (300, 4096), (517, 200), (17, 1000)];
    let mut failures = Vec::new();
    let mut n = 0;
    for &kernel in &ALL_KERNELS {
        let dims: &[usize] = if kernel == PrefillKernel::WgmmaTma {
            &[64, 128, 256]
        } else {
            &[64, 128]
        };
        for &(sq, sk) in &shapes {
            for &(causal, window_size) in &windows {
                n += 1;
                let shape = Shape {
                    batch: 1 + n % 2,
                    seqlen_q: sq,
                    seqlen_k: sk,
                    heads_q: 8,
                    heads_kv: 2,
                    head_dim: dims[n % dims.len()],
                };
                let mut cfg = AttentionConfig::flash(2, causal, window_size)
                    .unwrap()
                    .kernel(kernel);
                if kernel == PrefillKernel::WgmmaTma && n % 3 == 0 {
                    cfg = cfg.kv_splits(Some(3));
                }
                let case = Case {
                    shape,
                    cfg,
                    dtype: if n % 2 == 0 { DType::BF16 } else { DType::F16 },
                };
                let label = format!(
                    "{kernel:?} {:?} B={} Sq={sq} Sk={sk} D={} causal={causal} window_size={window_size:?} splits {:?}",
                    case.dtype, shape.batch, shape.head_dim, case.cfg.kv_splits
                );
                check_case(&ctx, &case, &mut rng, label, &mut failures);
            }
        }
    }
    // DuoAttention's heads with a right window: streaming sink + window + right, causal
    // retrieval + right.
    for (n, &kernel) in ALL_KERNELS.iter().enumerate() {
        let shape = Shape {
            batch: 2,
            seqlen_q: 700,
            seqlen_k: 1500,
            heads_q: 8,
            heads_kv: 2,
            head_dim: 128,
        };
        let cfg = AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
            .sink(16)
            .window(300)
            .right_window(45)
            .kernel(kernel);
        let case = Case {
            shape,
            cfg,
            dtype: if n % 2 == 0 { DType::BF16 } else { DType::F16 },
        };
        let label = format!("{kernel:?} mixed heads, right window 45");
        check_case(&ctx, &case, &mut rng, label, &mut failures);
    }
    let lens = [(100, 300), (517, 517), (0, 50), (37, 0), (1, 1000)];
    for splits in [None, Some(3)] {
        let cfg = AttentionConfig::flash(2, false, (120, 40))
            .unwrap()
            .kernel(PrefillKernel::WgmmaTma)
            .kv_splits(splits);
        failures.extend(check_varlen(&ctx, &mut rng, (8, 2, 128), &lens, &cfg));
    }
    notice(&format!("{test}: {} failed", failures.len()));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A small `window_size` launch per kernel for compute-sanitizer (`run.sh sanitize`): a band
/// both ways over 100 queries and 300 keys, GQA; the TMA kernel also at D 256 and with three
/// forced splits.
#[test]
fn flash_window_small_launches() {
    let runs: Vec<_> = ALL_KERNELS
        .iter()
        .map(|&k| (k, 128, None))
        .chain([
            (PrefillKernel::WgmmaTma, 256, None),
            (PrefillKernel::WgmmaTma, 64, Some(3)),
        ])
        .collect();
    small_launches("flash_window_small_launches", &runs, |_, _| {
        AttentionConfig::flash(2, false, (70, 20)).unwrap()
    });
}

/// Small launches for compute-sanitizer: batch 2 of 100 queries over 300 keys, 4 query heads on
/// 2 KV heads, one launch per (kernel, head dim, splits) run with the config `cfg` makes.
fn small_launches(
    test: &str,
    runs: &[(PrefillKernel, usize, Option<usize>)],
    cfg: impl Fn(&Context, &mut StdRng) -> AttentionConfig,
) {
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut failures = Vec::new();
    for (n, &(kernel, d, splits)) in runs.iter().enumerate() {
        let shape = Shape {
            batch: 2,
            seqlen_q: 100,
            seqlen_k: 300,
            heads_q: 4,
            heads_kv: 2,
            head_dim: d,
        };
        let case = Case {
            shape,
            cfg: cfg(&ctx, &mut rng).kernel(kernel).kv_splits(splits),
            dtype: if n % 2 == 0 { DType::BF16 } else { DType::F16 },
        };
        let label = format!("{test}: {kernel:?} D={d} splits {splits:?}");
        check_case(&ctx, &case, &mut rng, label, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// ALiBi (`AttentionConfig::alibi`, FlashAttention's `alibi_slopes`) on the warp-specialised
/// kernels' builds: TMA (with and without forced splits) and cp.async, D 64 and 128, Sq below,
/// at and above Sk, GQA; causal mixed DuoAttention heads, non-causal retrieval heads and a
/// FlashAttention band; the standard slopes per head and random slopes per batch entry; then a
/// varlen batch.
#[test]
fn alibi_matches_reference() {
    let test = "alibi_matches_reference";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let mut rng = rng(test);
    let mut failures = Vec::new();
    let mut n = 0;
    for kernel in [PrefillKernel::WgmmaTma, PrefillKernel::WgmmaWarpSpecialized] {
        for d in [64, 128] {
            for (sq, sk) in [(1000, 1000), (300, 4096), (517, 200)] {
                for masks in 0..3 {
                    n += 1;
                    let batch = 1 + n % 2;
                    let shape = Shape {
                        batch,
                        seqlen_q: sq,
                        seqlen_k: sk,
                        heads_q: 8,
                        heads_kv: 2,
                        head_dim: d,
                    };
                    let slopes = alibi_slopes(&ctx, &mut rng, (8, batch), n % 2 == 0);
                    let cfg = match masks {
                        0 => AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
                            .sink(4)
                            .window(300),
                        1 => AttentionConfig::all_retrieval(2).causal(false),
                        _ => AttentionConfig::flash(2, false, (255, 30)).unwrap(),
                    };
                    let mut cfg = cfg.kernel(kernel).alibi(slopes);
                    if kernel == PrefillKernel::WgmmaTma && n % 3 == 0 {
                        cfg = cfg.kv_splits(Some(3));
                    }
                    let case = Case {
                        shape,
                        cfg,
                        dtype: if n % 4 < 2 { DType::BF16 } else { DType::F16 },
                    };
                    let label = format!(
                        "{kernel:?} {:?} B={batch} Sq={sq} Sk={sk} D={d} masks {masks} slopes {:?} splits {:?}",
                        case.dtype, case.cfg.alibi, case.cfg.kv_splits
                    );
                    check_case(&ctx, &case, &mut rng, label, &mut failures);
                }
            }
        }
    }
    let lens = [(100, 300), (517, 517), (0, 50), (37, 0), (1, 1000)];
    for splits in [None, Some(3)] {
        let slopes = AlibiSlopes::new(&ctx, &AlibiSlopes::standard(8)).unwrap();
        let cfg = AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
            .sink(8)
            .window(64)
            .kernel(PrefillKernel::WgmmaTma)
            .kv_splits(splits)
            .alibi(slopes);
        failures.extend(check_varlen(&ctx, &mut rng, (8, 2, 128), &lens, &cfg));
    }
    notice(&format!("{test}: {n} cases, {} failed", failures.len()));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A small ALiBi launch per build for compute-sanitizer (`run.sh sanitize`): per-batch slopes,
/// 100 queries over 300 keys, causal mixed heads; TMA with and without three splits, cp.async.
#[test]
fn alibi_small_launches() {
    let runs = [
        (PrefillKernel::WgmmaTma, 128, None),
        (PrefillKernel::WgmmaTma, 64, Some(3)),
        (PrefillKernel::WgmmaWarpSpecialized, 128, None),
    ];
    small_launches("alibi_small_launches", &runs, |ctx, rng| {
        AttentionConfig::new(vec![HeadKind::Streaming, HeadKind::Retrieval])
            .sink(8)
            .window(90)
            .alibi(alibi_slopes(ctx, rng, (4, 2), false))
    });
}

/// One case against the reference, its comparison noticed under `label`, which a failure adds
/// to `failures`.
fn check_case(
    ctx: &Context,
    case: &Case,
    rng: &mut StdRng,
    label: String,
    failures: &mut Vec<String>,
) {
    let cmp = run(ctx, case, rng).unwrap_or_else(|e| panic!("{label}: {e}"));
    notice(&format!("{label}: {cmp:?}"));
    if !cmp.passed() {
        failures.push(label);
    }
}

/// One varlen launch checked per sequence (`run_varlen_case`); the failures, labelled.
fn check_varlen(
    ctx: &Context,
    rng: &mut StdRng,
    heads: (usize, usize, usize),
    lens: &[(usize, usize)],
    cfg: &AttentionConfig,
) -> Vec<String> {
    let what = format!(
        "varlen {:?} D={} splits {:?}",
        cfg.kernel, heads.2, cfg.kv_splits
    );
    let cmps = run_varlen_case(ctx, rng, heads, lens, cfg).unwrap();
    let mut failures = Vec::new();
    for (b, (cmp, &(sq, sk))) in cmps.iter().zip(lens).enumerate() {
        let label = format!("{what} seq {b} (Sq {sq}, Sk {sk}): {cmp:?}");
        notice(&label);
        if !cmp.passed() {
            failures.push(label);
        }
    }
    failures
}
