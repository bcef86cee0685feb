//! The float64 reference against a naive masked softmax (full score matrix, explicit mask), on
//! small random cases and the mask edge cases.
use approx::assert_relative_eq;
use duo_attn::reference::{Shape, attention, key_visible, visible_keys};
use duo_attn::{AttentionConfig, HeadKind};
use duo_attn_tests::{alternating_kinds, random_tensor};
use half::bf16;
use rand::{SeedableRng, rngs::StdRng};

/// Naive attention: scores for all (i, j), mask written as index inequalities, softmax, P @ V.
fn naive(
    shape: &Shape,
    cfg: &AttentionConfig,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let Shape {
        batch,
        seqlen_q: sq,
        seqlen_k: sk,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    } = *shape;
    let scale = cfg.scale_for(d) as f64;
    let off = sk as i64 - sq as i64;
    let mut out = vec![0.0; shape.q_len()];
    let mut lse = vec![0.0; shape.lse_len()];
    for b in 0..batch {
        for h in 0..hq {
            let g = h * hkv / hq;
            for i in 0..sq {
                let last_visible = i as i64 + off; // causal: j <= i + off
                let allowed = |j: usize| -> bool {
                    let j = j as i64;
                    match cfg.head_kinds[g] {
                        HeadKind::Retrieval => !cfg.causal || j <= last_visible,
                        HeadKind::Streaming => {
                            j <= last_visible
                                && (j < cfg.sink as i64 || j > last_visible - cfg.window as i64)
                        }
                    }
                };
                let scores: Vec<f64> = (0..sk)
                    .map(|j| {
                        if !allowed(j) {
                            return f64::NEG_INFINITY;
                        }
                        (0..d)
                            .map(|x| {
                                q[((b * sq + i) * hq + h) * d + x] as f64
                                    * k[((b * sk + j) * hkv + g) * d + x] as f64
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let li = (b * hq + h) * sq + i;
                if m == f64::NEG_INFINITY {
                    lse[li] = f64::NEG_INFINITY;
                    continue;
                }
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                lse[li] = m + z.ln();
                for x in 0..d {
                    out[((b * sq + i) * hq + h) * d + x] = (0..sk)
                        .map(|j| {
                            (scores[j] - m).exp() / z * v[((b * sk + j) * hkv + g) * d + x] as f64
                        })
                        .sum();
                }
            }
        }
    }
    (out, lse)
}

fn check(shape: Shape, cfg: AttentionConfig, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (_, q) = random_tensor::<bf16>(&mut rng, shape.q_len());
    let (_, k) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let (_, v) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let (out, lse) = attention(&shape, &cfg, &q, &k, &v);
    let (want_out, want_lse) = naive(&shape, &cfg, &q, &k, &v);
    for (a, b) in out.iter().zip(&want_out) {
        assert_relative_eq!(a, b, epsilon = 1e-12, max_relative = 1e-10);
    }
    for (a, b) in lse.iter().zip(&want_lse) {
        if b.is_infinite() {
            assert_eq!(a, b, "{shape:?} {cfg:?}");
        } else {
            assert_relative_eq!(a, b, epsilon = 1e-12, max_relative = 1e-10);
        }
    }
}

fn shape(batch: usize, sq: usize, sk: usize, hq: usize, hkv: usize, d: usize) -> Shape {
    Shape {
        batch,
        seqlen_q: sq,
        seqlen_k: sk,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    }
}

#[test]
fn matches_naive_on_small_mixed_cases() {
    let mut seed = 1;
    for &(sq, sk) in &[(1, 1), (1, 9), (7, 7), (5, 12), (12, 5), (16, 16)] {
        for &(hq, hkv) in &[(2, 2), (4, 2), (3, 1)] {
            for &causal in &[true, false] {
                let cfg = AttentionConfig::new(alternating_kinds(hkv))
                    .causal(causal)
                    .sink(2)
                    .window(3);
                check(shape(2, sq, sk, hq, hkv, 8), cfg, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn mask_edge_cases() {
    let s = |sq, sk| shape(1, sq, sk, 2, 2, 8);
    let both = || vec![HeadKind::Streaming, HeadKind::Retrieval];
    let cases = [
        (
            "sink 0",
            s(9, 9),
            AttentionConfig::new(both()).sink(0).window(3),
        ),
        (
            "window 0",
            s(9, 9),
            AttentionConfig::new(both()).sink(3).window(0),
        ),
        (
            "sink 0 window 0 (streaming rows see nothing)",
            s(9, 9),
            AttentionConfig::new(both()).sink(0).window(0),
        ),
        (
            "sink >= Sk",
            s(9, 9),
            AttentionConfig::new(both()).sink(50).window(1),
        ),
        (
            "window >= Sk",
            s(9, 9),
            AttentionConfig::new(both()).sink(0).window(50),
        ),
        (
            "Sq = 1",
            s(1, 13),
            AttentionConfig::new(both()).sink(2).window(4),
        ),
        (
            "Sq < Sk",
            s(4, 13),
            AttentionConfig::new(both()).sink(2).window(4),
        ),
        (
            "Sq > Sk (early rows see nothing)",
            s(13, 4),
            AttentionConfig::new(both()).sink(2).window(4),
        ),
        (
            "full retrieval, Sq > Sk",
            s(13, 4),
            AttentionConfig::new(both()).causal(false),
        ),
        (
            "explicit scale",
            s(6, 6),
            AttentionConfig::new(both()).softmax_scale(0.05),
        ),
    ];
    for (i, (name, shape, cfg)) in cases.into_iter().enumerate() {
        eprintln!("{name}");
        check(shape, cfg, 100 + i as u64);
    }
}

#[test]
fn fully_masked_rows_give_zero_and_neg_inf() {
    let shape = shape(1, 6, 3, 1, 1, 8);
    let mut rng = StdRng::seed_from_u64(7);
    let (_, q) = random_tensor::<bf16>(&mut rng, shape.q_len());
    let (_, k) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let (_, v) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let (out, lse) = attention(&shape, &AttentionConfig::all_retrieval(1), &q, &k, &v);
    // Query rows 0..3 sit at positions -3..-1: before every key.
    for i in 0..3 {
        assert_eq!(lse[i], f64::NEG_INFINITY);
        assert!(out[i * 8..(i + 1) * 8].iter().all(|&x| x == 0.0));
    }
    assert!(lse[3..].iter().all(|x| x.is_finite()));
}

#[test]
fn visible_key_count_matches_the_mask() {
    for kind in [HeadKind::Retrieval, HeadKind::Streaming] {
        for causal in [true, false] {
            for sink in [0, 1, 3, 20] {
                for (window, right) in [0, 1, 4, 20]
                    .into_iter()
                    .flat_map(|w| [0, 1, 6, 40].map(|r| (w, r)))
                {
                    let cfg = AttentionConfig::new(vec![kind])
                        .causal(causal)
                        .sink(sink)
                        .window(window)
                        .right_window(right);
                    for sk in [1, 5, 12] {
                        for q_pos in -3..15 {
                            let count = (0..sk as i64)
                                .filter(|&k| key_visible(kind, &cfg, q_pos, k))
                                .count() as u64;
                            assert_eq!(
                                visible_keys(kind, &cfg, q_pos, sk),
                                count,
                                "{kind:?} {cfg:?} q {q_pos} sk {sk}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `AttentionConfig::flash` is FlashAttention's band: position `p` sees key `k` when
/// `p - left <= k <= p + right` (-1: that side unbounded; `causal` makes `right` 0).
#[test]
fn flash_window_size_is_the_band() {
    let sides = [-1i64, 0, 1, 5, 30];
    for causal in [false, true] {
        for left in sides {
            for right in sides {
                let cfg = AttentionConfig::flash(2, causal, (left, right)).unwrap();
                let right = if causal { 0 } else { right };
                for kind in cfg.head_kinds.iter().copied() {
                    for q_pos in -4..40i64 {
                        for k in 0..40i64 {
                            let band = (left < 0 || k >= q_pos - left)
                                && (right < 0 || k <= q_pos + right);
                            assert_eq!(
                                key_visible(kind, &cfg, q_pos, k),
                                band,
                                "causal {causal} ({left}, {right}) q {q_pos} k {k}"
                            );
                        }
                    }
                }
            }
        }
    }
    for bad in [(-2, 0), (0, -5), (i64::MIN, -1)] {
        assert!(matches!(
            AttentionConfig::flash(1, false, bad),
            Err(duo_attn::Error::InvalidWindowSize { .. })
        ));
    }
}

/// The kernels' mask (`HeadMask`, shared with the host) sees exactly the reference's keys.
#[test]
fn kernel_mask_matches_the_reference() {
    use duo_attn_kernels::mask::HeadMask;
    for kind in [HeadKind::Retrieval, HeadKind::Streaming] {
        for causal in [true, false] {
            for (sink, window, right) in [(0, 0, 0), (3, 5, 0), (0, 8, 2), (2, 0, 3), (4, 1, 30)] {
                let cfg = AttentionConfig::new(vec![kind])
                    .causal(causal)
                    .sink(sink)
                    .window(window)
                    .right_window(right);
                let mask = HeadMask {
                    streaming: kind == HeadKind::Streaming,
                    causal,
                    sink: sink as i32,
                    window: window as i32,
                    right: right as i32,
                    seqlen_k: 24,
                };
                for q_pos in -5..30 {
                    for k in 0..24 {
                        assert_eq!(
                            mask.visible(q_pos, k),
                            key_visible(kind, &cfg, q_pos as i64, k as i64),
                            "{cfg:?} q {q_pos} k {k}"
                        );
                    }
                }
            }
        }
    }
}
