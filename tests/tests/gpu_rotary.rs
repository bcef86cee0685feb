//! Rotary embeddings on the device (`Context::apply_rotary`, `_to`, `_varlen`) against the
//! float64 reference, on random rows and random tables. Every element of the written tensor is
//! checked: the turned ones against the reference (within half a unit in the last place of the
//! element type), everything else bit for bit (the V heads of a packed QKV buffer, elements past
//! the rotary dim, rows whose position falls outside the table, varlen rows outside every
//! sequence). Out-of-place outputs start as NaN.
use duo_attn::reference::rotary_row;
use duo_attn::{AttnElement, Context, DeviceTensor, Error, RotaryPositions, RotaryTable};
use duo_attn_tests::{gpu_or_skip, notice, random_tensor, rng};
use half::{bf16, f16};
use rand::Rng;
use rand::rngs::StdRng;

/// Positions in the test tables.
const TABLE_ROWS: usize = 96;
/// Rows per sequence of the fixed-length cases.
const SEQLEN: usize = 19;
/// Query and KV heads of the packed QKV case (the output's heads otherwise).
const HQ: usize = 4;
const HKV: usize = 2;

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Q and K of a packed `[B, S, Hq + 2 Hkv, D]` buffer, in place.
    PackedInPlace,
    /// A contiguous `[B, S, H, D]` into another.
    OutOfPlace,
    /// Packed sequences `[total + 2, H, D]` in place; the last two rows are in no sequence.
    Varlen,
}

/// What one element of the written tensor must hold afterwards.
#[derive(Clone, Copy)]
enum Want {
    /// These bits (as f32; NaN matches NaN).
    Same(f32),
    /// The reference's rotation.
    Turned(f64),
}

/// A random table of `(cos, sin)` of random angles, `[TABLE_ROWS, rotary_dim / 2]` each.
fn random_table(rng: &mut StdRng, rotary_dim: usize) -> (Vec<f32>, Vec<f32>) {
    (0..TABLE_ROWS * rotary_dim / 2)
        .map(|_| {
            let a: f64 = rng.random_range(-10.0..10.0);
            (a.cos() as f32, a.sin() as f32)
        })
        .unzip()
}

struct Case {
    mode: Mode,
    head_dim: usize,
    rotary_dim: usize,
    interleaved: bool,
    /// Device offsets per sequence (else from a start).
    per_sequence: bool,
}

/// Runs one case; returns the mismatches' description, if any.
fn run_case<T: AttnElement>(ctx: &Context, rng: &mut StdRng, c: &Case) -> Result<(), String> {
    let d = c.head_dim;
    let (cos, sin) = random_table(rng, c.rotary_dim);
    let table = RotaryTable::new(ctx, &cos, &sin, c.rotary_dim, c.interleaved).unwrap();
    let half = c.rotary_dim / 2;
    // Sequence lengths and each sequence's first position. Device offsets include one that
    // runs past the table and one below zero: those rows stay.
    let lens: Vec<usize> = match c.mode {
        Mode::Varlen => vec![5, 0, 17, 9],
        _ => vec![SEQLEN; 3],
    };
    let firsts: Vec<i32> = if c.per_sequence {
        let mut f: Vec<i32> = lens
            .iter()
            .map(|&n| rng.random_range(0..=(TABLE_ROWS - n.max(1)) as i32))
            .collect();
        f[0] = TABLE_ROWS as i32 - 3;
        f[1] = -2;
        f
    } else {
        let max_len = *lens.iter().max().unwrap();
        vec![rng.random_range(0..=(TABLE_ROWS - max_len) as i32); lens.len()]
    };
    let offsets = ctx.upload(&firsts, [lens.len()]).unwrap();
    let positions = if c.per_sequence {
        RotaryPositions::PerSequence(offsets.view())
    } else {
        RotaryPositions::From(firsts[0] as usize)
    };
    // Heads per row of the whole buffer and of the turned view.
    let (buffer_heads, heads) = match c.mode {
        Mode::PackedInPlace => (HQ + 2 * HKV, HQ + HKV),
        _ => (HQ, HQ),
    };
    let row = buffer_heads * d;
    // Logical rows: (element offset of the row in the buffer, position or None).
    let mut rows: Vec<(usize, Option<i64>)> = Vec::new();
    let total: usize = lens.iter().sum();
    let buffer_rows = match c.mode {
        Mode::Varlen => total + 2,
        _ => total,
    };
    let mut at = 0;
    for (b, &n) in lens.iter().enumerate() {
        for s in 0..n {
            rows.push(((at + s) * row, Some(firsts[b] as i64 + s as i64)));
        }
        at += n;
    }
    for r in total..buffer_rows {
        rows.push((r * row, None));
    }
    let (src_host, src_f32) = random_tensor::<T>(rng, buffer_rows * row);
    let mut src = ctx
        .upload(&src_host, [buffer_rows, buffer_heads, d])
        .unwrap();
    let mut dst: Option<DeviceTensor<T, 3>> = match c.mode {
        Mode::OutOfPlace => {
            let poison = vec![T::nan(); buffer_rows * row];
            Some(ctx.upload(&poison, [buffer_rows, buffer_heads, d]).unwrap())
        }
        _ => None,
    };
    // The model of the written tensor.
    let mut want: Vec<Want> = match c.mode {
        Mode::OutOfPlace => vec![Want::Same(f32::NAN); buffer_rows * row],
        _ => src_f32.iter().map(|&x| Want::Same(x)).collect(),
    };
    for &(base, pos) in &rows {
        for h in 0..heads {
            let at = base + h * d;
            let x = &src_f32[at..at + d];
            for (w, &v) in want[at..at + d].iter_mut().zip(x) {
                *w = Want::Same(v);
            }
            let Some(pos) = pos.filter(|p| (0..TABLE_ROWS as i64).contains(p)) else {
                continue;
            };
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let y = rotary_row(&x64, (&cos, &sin), half, c.interleaved, pos as usize);
            for (w, &v) in want[at..at + c.rotary_dim].iter_mut().zip(&y) {
                *w = Want::Turned(v);
            }
        }
    }
    let (b, s) = (lens.len(), SEQLEN);
    let result = match c.mode {
        Mode::PackedInPlace => {
            let strides = [s * row, row, d, 1];
            let mut qk = src.strided_view_mut(0, [b, s, heads, d], strides).unwrap();
            ctx.apply_rotary(&mut qk, &table, positions)
        }
        Mode::OutOfPlace => {
            let shape = [b, s, heads, d];
            let x = src.strided_view(0, shape, [s * row, row, d, 1]).unwrap();
            let out = dst.as_mut().unwrap();
            let mut out = out
                .strided_view_mut(0, shape, [s * row, row, d, 1])
                .unwrap();
            ctx.apply_rotary_to(&x, &mut out, &table, positions)
        }
        Mode::Varlen => {
            let mut cu = vec![0i32];
            for &n in &lens {
                cu.push(cu.last().unwrap() + n as i32);
            }
            let cu = ctx.upload(&cu, [lens.len() + 1]).unwrap();
            ctx.apply_rotary_varlen(&mut src.view_mut(), &cu.view(), &table, positions)
        }
    };
    result.map_err(|e| format!("call failed: {e}"))?;
    ctx.synchronize().unwrap();
    let got = dst.as_ref().unwrap_or(&src).to_host().unwrap();
    // Half a unit in the last place of T, relative, plus f32 rounding of the products.
    let ulp = if T::KERNEL_NAME == "bf16" {
        2f64.powi(-8)
    } else {
        2f64.powi(-11)
    };
    let (mut bad, mut turned, mut worst) = (Vec::new(), 0usize, 0f64);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let g = g.to_f32();
        let ok = match *w {
            Want::Same(v) => g.to_bits() == v.to_bits() || (g.is_nan() && v.is_nan()),
            Want::Turned(v) => {
                turned += 1;
                let err = (g as f64 - v).abs();
                worst = worst.max(err / v.abs().max(1e-3));
                g.is_finite() && err <= ulp * v.abs() + 1e-5
            }
        };
        if !ok && bad.len() < 5 {
            let (r, h, e) = (i / row, i / d % buffer_heads, i % d);
            bad.push(format!("row {r} head {h} elem {e}: got {g}"));
        }
    }
    if turned == 0 {
        return Err("no element was turned: the case tests nothing".into());
    }
    if !bad.is_empty() {
        return Err(format!(
            "{} (worst relative error {worst:.2e})",
            bad.join("; ")
        ));
    }
    Ok(())
}

fn matrix<T: AttnElement>(ctx: &Context, rng: &mut StdRng) -> Vec<String> {
    let mut failures = Vec::new();
    let mut cases = 0;
    for mode in [Mode::PackedInPlace, Mode::OutOfPlace, Mode::Varlen] {
        for head_dim in [64, 128, 256] {
            for rotary_dim in [head_dim, head_dim / 2, 16] {
                for interleaved in [false, true] {
                    for per_sequence in [false, true] {
                        let c = Case {
                            mode,
                            head_dim,
                            rotary_dim,
                            interleaved,
                            per_sequence,
                        };
                        cases += 1;
                        if let Err(e) = run_case::<T>(ctx, rng, &c) {
                            failures.push(format!(
                                "{} {mode:?} d {head_dim} rotary {rotary_dim} interleaved {interleaved} per-sequence {per_sequence}: {e}",
                                T::KERNEL_NAME
                            ));
                        }
                    }
                }
            }
        }
    }
    notice(&format!("rotary {}: {cases} cases", T::KERNEL_NAME));
    failures
}

#[test]
fn rotary_matches_reference() {
    let Some(ctx) = gpu_or_skip("rotary_matches_reference") else {
        return;
    };
    let mut rng = rng("rotary_matches_reference");
    let mut failures = matrix::<bf16>(&ctx, &mut rng);
    failures.extend(matrix::<f16>(&ctx, &mut rng));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// RoPE tables built on the host turn a row as the reference does with the same angles.
#[test]
fn rope_table_turns_by_its_angles() {
    let Some(ctx) = gpu_or_skip("rope_table_turns_by_its_angles") else {
        return;
    };
    let mut rng = rng("rope_table_turns_by_its_angles");
    let (d, positions, base) = (128, 4096, 500_000.0);
    let table = RotaryTable::rope(&ctx, positions, d, base, false).unwrap();
    let (s, h) = (8, 3);
    let (host, f32s) = random_tensor::<bf16>(&mut rng, s * h * d);
    let mut x = ctx.upload(&host, [1, s, h, d]).unwrap();
    let start = positions - s;
    ctx.apply_rotary(&mut x.view_mut(), &table, RotaryPositions::From(start))
        .unwrap();
    let want = rope_reference(&f32s, (1, s, h, d), &[start], base);
    assert_turned(&x.to_host().unwrap(), &want, "positions 4088..4096");
}

/// bf16 rows within half a unit in the last place of the reference's.
fn assert_turned(got: &[bf16], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f32() as f64;
        assert!(
            (g - w).abs() <= 2f64.powi(-8) * w.abs() + 1e-5,
            "{what}: element {i}: {g} against {w}"
        );
    }
}

#[test]
fn rotary_errors() {
    let Some(ctx) = gpu_or_skip("rotary_errors") else {
        return;
    };
    let table = RotaryTable::rope(&ctx, 64, 64, 10_000.0, false).unwrap();
    let mut x = ctx.alloc::<bf16, 4>([2, 16, 4, 64]).unwrap();
    let err = ctx
        .apply_rotary(&mut x.view_mut(), &table, RotaryPositions::From(60))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
    let wide = RotaryTable::rope(&ctx, 64, 128, 10_000.0, false).unwrap();
    let err = ctx
        .apply_rotary(&mut x.view_mut(), &wide, RotaryPositions::From(0))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
    let err = RotaryTable::rope(&ctx, 64, 24, 10_000.0, false).unwrap_err();
    assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
    let offsets = ctx.upload(&[0i32; 3], [3]).unwrap();
    let err = ctx
        .apply_rotary(
            &mut x.view_mut(),
            &table,
            RotaryPositions::PerSequence(offsets.view()),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                tensor: "offsets",
                ..
            }
        ),
        "{err}"
    );
    let y = ctx.alloc::<bf16, 4>([2, 16, 4, 64]).unwrap();
    let err = ctx
        .apply_rotary_to(
            &y.view(),
            &mut x.view_mut(),
            &wide,
            RotaryPositions::From(0),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
}

/// A small case of each mode for compute-sanitizer (`./run.sh sanitize`).
#[test]
fn sanitizer_small_rotary() {
    let Some(ctx) = gpu_or_skip("sanitizer_small_rotary") else {
        return;
    };
    let mut rng = rng("sanitizer_small_rotary");
    for mode in [Mode::PackedInPlace, Mode::OutOfPlace, Mode::Varlen] {
        for (interleaved, per_sequence) in [(false, true), (true, false)] {
            let c = Case {
                mode,
                head_dim: 128,
                rotary_dim: 64,
                interleaved,
                per_sequence,
            };
            run_case::<bf16>(&ctx, &mut rng, &c).unwrap();
        }
    }
}

/// Rows `x` (`[B, n, H, D]` f32 values) turned at positions `first[b] + s` by a RoPE table of
/// `d` dims and base `base`, as the reference does it.
fn rope_reference(
    x: &[f32],
    (b, n, h, d): (usize, usize, usize, usize),
    first: &[usize],
    base: f64,
) -> Vec<f64> {
    let inv = RotaryTable::rope_inv_freq(d, base);
    let mut y = Vec::with_capacity(x.len());
    for (seq, &f) in first.iter().enumerate().take(b) {
        for s in 0..n {
            let p = (f + s) as f64;
            let cos: Vec<f32> = inv.iter().map(|f| (p * f).cos() as f32).collect();
            let sin: Vec<f32> = inv.iter().map(|f| (p * f).sin() as f32).collect();
            for head in 0..h {
                let at = ((seq * n + s) * h + head) * d;
                let row: Vec<f64> = x[at..at + d].iter().map(|&v| v as f64).collect();
                y.extend(rotary_row(&row, (&cos, &sin), d / 2, false, 0));
            }
        }
    }
    y
}

/// A DuoAttention cache's rotary positions are its device lengths: per layer, per slot range,
/// and advanced by a decode step queued after the rotation (stream order).
#[test]
fn cache_positions_follow_the_device_lengths() {
    let Some(ctx) = gpu_or_skip("cache_positions_follow_the_device_lengths") else {
        return;
    };
    let mut rng = rng("cache_positions_follow_the_device_lengths");
    let cfg = duo_attn_tests::sanitizer_cache(3, 64);
    let (hq, hkv, d) = (cfg.heads_q, cfg.heads_kv, cfg.head_dim);
    let kinds = vec![duo_attn_tests::alternating_kinds(hkv); 2];
    let mut cache = duo_attn::DuoCache::<bf16>::new(&ctx, cfg, kinds).unwrap();
    let table = RotaryTable::rope(&ctx, 64, d, 10_000.0, false).unwrap();
    // Layer 1 holds 5, 9 and 3 tokens; layer 0 none.
    for (slot, n) in [(0, 5), (1, 9), (2, 3)] {
        let (k, _) = random_tensor::<bf16>(&mut rng, n * hkv * d);
        let k = ctx.upload(&k, [1, n, hkv, d]).unwrap();
        let mut slots = cache.slots(slot..slot + 1).unwrap();
        slots.append(&ctx, 1, &k.view(), &k.view()).unwrap();
    }
    let turn = |cache: &duo_attn::DuoCache<bf16>, layer: usize, x: &mut DeviceTensor<bf16, 4>| {
        let pos = cache.rotary_positions(layer).unwrap();
        ctx.apply_rotary(&mut x.view_mut(), &table, pos).unwrap();
    };
    let check = |x: &DeviceTensor<bf16, 4>, f32s: &[f32], first: &[usize], what: &str| {
        let [b, n, h, _] = x.shape();
        let want = rope_reference(f32s, (b, n, h, d), first, 10_000.0);
        assert_turned(&x.to_host().unwrap(), &want, what);
    };
    let (host, f32s) = random_tensor::<bf16>(&mut rng, 3 * 2 * hq * d);
    for (layer, first) in [(1, [5, 9, 3]), (0, [0, 0, 0])] {
        let mut x = ctx.upload(&host, [3, 2, hq, d]).unwrap();
        turn(&cache, layer, &mut x);
        check(&x, &f32s, &first, &format!("layer {layer}"));
    }
    // Slots 1..3 alone.
    let mut x = ctx.upload(&host[..2 * hq * d], [2, 1, hq, d]).unwrap();
    {
        let slots = cache.slots(1..3).unwrap();
        ctx.apply_rotary(
            &mut x.view_mut(),
            &table,
            slots.rotary_positions(1).unwrap(),
        )
        .unwrap();
    }
    check(&x, &f32s[..2 * hq * d], &[9, 3], "slots 1..3");
    // A decode step of layer 1 queued after a rotation advances the lengths the next one reads.
    let (q, _) = random_tensor::<bf16>(&mut rng, 3 * hq * d);
    let q = ctx.upload(&q, [3, 1, hq, d]).unwrap();
    let (kv, _) = random_tensor::<bf16>(&mut rng, 3 * hkv * d);
    let kv = ctx.upload(&kv, [3, 1, hkv, d]).unwrap();
    let mut out = ctx.alloc::<bf16, 4>([3, 1, hq, d]).unwrap();
    let mut lse = ctx.alloc::<f32, 3>([3, hq, 1]).unwrap();
    let mut x = ctx.upload(&host[..3 * hq * d], [3, 1, hq, d]).unwrap();
    turn(&cache, 1, &mut x);
    let (o, l) = (&mut out.view_mut(), &mut lse.view_mut());
    cache
        .decode(&ctx, 1, &q.view(), &kv.view(), &kv.view(), o, l)
        .unwrap();
    let mut y = ctx.upload(&host[..3 * hq * d], [3, 1, hq, d]).unwrap();
    turn(&cache, 1, &mut y);
    check(&x, &f32s[..3 * hq * d], &[5, 9, 3], "before the decode");
    check(&y, &f32s[..3 * hq * d], &[6, 10, 4], "after the decode");
}
