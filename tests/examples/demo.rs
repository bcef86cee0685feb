//! duo-attn demo: one DuoAttention layer (half retrieval, half streaming heads) through the fused
//! prefill kernel on the GPU, checked against the float64 reference. Without a Hopper GPU it says
//! so and runs the CPU reference on a few rows instead.
//!
//! `cargo run --release -p duo-attn-tests --example demo`
use duo_attn::reference::{Shape, attended_pairs, attention_row};
use duo_attn::{AttentionConfig, Context};
use duo_attn_tests::{alternating_kinds, compare, random_tensor, rng, rows_to_check};
use half::bf16;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let shape = Shape {
        batch: 1,
        seqlen_q: 8192,
        seqlen_k: 8192,
        heads_q: 32,
        heads_kv: 8,
        head_dim: 128,
    };
    let cfg = AttentionConfig::new(alternating_kinds(shape.heads_kv))
        .sink(64)
        .window(256);
    println!(
        "duo-attn demo: B={} Sq=Sk={} Hq={} Hkv={} D={} bf16, KV heads {:?}, sink {} window {}",
        shape.batch,
        shape.seqlen_q,
        shape.heads_q,
        shape.heads_kv,
        shape.head_dim,
        cfg.head_kinds,
        cfg.sink,
        cfg.window
    );
    let mut rng = rng("demo");
    let (q, q32) = random_tensor::<bf16>(&mut rng, shape.q_len());
    let (k, k32) = random_tensor::<bf16>(&mut rng, shape.kv_len());
    let (v, v32) = random_tensor::<bf16>(&mut rng, shape.kv_len());

    let ctx = match Context::new(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("\n*** NO GPU: {e}\n*** Running the CPU reference on a few rows instead.\n");
            let t = Instant::now();
            for (h, i) in [
                (0, 0),
                (0, shape.seqlen_q - 1),
                (4, shape.seqlen_q / 2),
                (31, shape.seqlen_q - 1),
            ] {
                let (row, lse) = attention_row(&shape, &cfg, &q32, &k32, &v32, 0, h, i);
                let kind = cfg.head_kinds[shape.kv_head(h)];
                println!(
                    "  head {h:2} ({kind:?}) row {i:5}: lse {lse:8.4}, out[0..4] {:.4?}",
                    &row[..4]
                );
            }
            println!("  ({:.1} ms on the CPU)", t.elapsed().as_secs_f64() * 1e3);
            return ExitCode::SUCCESS;
        }
    };
    println!("device: {:?}", ctx.info());
    let run = || -> duo_attn::Result<(Vec<f32>, Vec<f32>, f64)> {
        let dq = ctx.upload(&q, shape.q_shape())?;
        let dk = ctx.upload(&k, shape.kv_shape())?;
        let dv = ctx.upload(&v, shape.kv_shape())?;
        let mut out = ctx.alloc::<bf16, 4>(shape.q_shape())?;
        let mut lse = ctx.alloc::<f32, 3>(shape.lse_shape())?;
        out.fill(bf16::NAN)?;
        lse.fill(f32::NAN)?;
        let mut launch = || {
            ctx.attention(
                &dq.view(),
                &dk.view(),
                &dv.view(),
                &mut out.view_mut(),
                &mut lse.view_mut(),
                &cfg,
            )
        };
        launch()?; // warm-up (module JIT if any)
        ctx.synchronize()?;
        let reps = 20;
        let t = Instant::now();
        for _ in 0..reps {
            launch()?;
        }
        ctx.synchronize()?;
        let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        Ok((
            out.to_host()?.iter().map(|x| x.to_f32()).collect(),
            lse.to_host()?,
            ms,
        ))
    };
    let (out, lse, ms) = match run() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("GPU run failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rows = rows_to_check(&shape, &mut rng);
    let cmp = compare(&shape, &cfg, &q32, &k32, &v32, &out, &lse, &rows);
    let flops = 4.0 * shape.head_dim as f64 * attended_pairs(&shape, &cfg) as f64;
    println!(
        "time {ms:.3} ms/layer ({:.1} TFLOP/s over attended pairs; host timer, mean of 20)",
        flops / ms / 1e9
    );
    println!(
        "vs float64 reference on {} rows: rel err {:.2e}, worst row {:.2e}, worst lse {:.2e}, non-finite {} -> {}",
        cmp.rows,
        cmp.rel_err,
        cmp.worst_row_rel_err,
        cmp.worst_lse_err,
        cmp.non_finite,
        if cmp.passed() { "PASS" } else { "FAIL" }
    );
    if cmp.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
