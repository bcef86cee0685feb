//! Rotary embeddings (`--rotary`): `Context::apply_rotary` on the Q and K heads of a packed QKV
//! buffer (Llama 3 8B's layer: 32 query and 8 KV heads, D 128, the whole head dim turned), in
//! place, and what the launch adds to a decode step (`decode_attention_append` over a KV cache,
//! its new K/V from the same buffer) when it runs before it, against the rotation fused into the
//! step (`NewKv::rotated`). Peers (`--rotary-peers`, written by
//! `rotary_peers.py` on the same GPU) are PyTorch's eager rotation (`x * cos + rotate_half(x) *
//! sin`, as Hugging Face's Llama) and the same under `torch.compile`.
use crate::clock::ClockSampler;
use crate::timing::{Timing, time_launches};
use duo_attn::{
    AttentionConfig, Context, DeviceTensor, HeadKind, NewKv, Result, RotaryPositions, RotaryTable,
};
use duo_attn_tests::random_tensor;
use half::bf16;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
/// Heads per row of the packed QKV buffer.
const H: usize = HQ + 2 * HKV;

/// One timed case: a prefill rotation (`rows` = B x S) or a decode step with and without it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RotaryRecord {
    pub case: String,
    pub batch: usize,
    pub seqlen: usize,
    pub implementation: String,
    pub ms: f64,
}

/// Bytes a rotation of `rows` rows moves: the Q and K heads read and written, bf16.
fn bytes(rows: usize) -> f64 {
    (2 * rows * (HQ + HKV) * D * 2) as f64
}

/// Runs every case, merges the peers and prints a table.
pub fn run(
    ctx: &Context,
    rng: &mut StdRng,
    clock: &ClockSampler,
    peers: Vec<RotaryRecord>,
) -> Result<Vec<RotaryRecord>> {
    let mut records = Vec::new();
    let table = RotaryTable::rope(ctx, 1 << 17, D, 500_000.0, false)?;
    for seqlen in [4096, 32768, 131072] {
        let t = time_prefill(ctx, rng, clock, &table, seqlen)?;
        records.push(record("prefill", 1, seqlen, "ours", &t));
    }
    for (batch, seqlen) in [(1, 4096), (8, 4096), (8, 131072), (32, 32768)] {
        for step in [Step::Alone, Step::RotaryFirst, Step::Fused] {
            let t = time_decode(ctx, rng, clock, &table, (batch, seqlen), step)?;
            records.push(record("decode step", batch, seqlen, step.name(), &t));
        }
    }
    for batch in [1, 8, 32] {
        let t = time_rotary_rows(ctx, rng, clock, &table, batch)?;
        records.push(record("decode rotary", batch, 1, "ours", &t));
    }
    records.extend(peers);
    print_table(&records);
    Ok(records)
}

fn record(
    case: &str,
    batch: usize,
    seqlen: usize,
    implementation: &str,
    t: &Timing,
) -> RotaryRecord {
    RotaryRecord {
        case: case.into(),
        batch,
        seqlen,
        implementation: implementation.into(),
        ms: t.median_ms,
    }
}

/// A packed QKV buffer `[B, S, H, D]` of random values.
fn qkv(ctx: &Context, rng: &mut StdRng, b: usize, s: usize) -> Result<DeviceTensor<bf16, 4>> {
    let (host, _) = random_tensor::<bf16>(rng, b * s * H * D);
    ctx.upload(&host, [b, s, H, D])
}

/// The Q and K heads of a packed buffer as one view.
fn q_and_k(x: &mut DeviceTensor<bf16, 4>) -> Result<duo_attn::ViewMut<'_, bf16, 4>> {
    let [b, s, _, _] = x.shape();
    x.strided_view_mut(0, [b, s, HQ + HKV, D], [s * H * D, H * D, D, 1])
}

fn time_prefill(
    ctx: &Context,
    rng: &mut StdRng,
    clock: &ClockSampler,
    table: &RotaryTable,
    seqlen: usize,
) -> Result<Timing> {
    let mut x = qkv(ctx, rng, 1, seqlen)?;
    time_launches(ctx, clock, |_| {
        ctx.apply_rotary(&mut q_and_k(&mut x)?, table, RotaryPositions::From(0))
    })
}

/// The rotation of one decode step's rows alone (B rows).
fn time_rotary_rows(
    ctx: &Context,
    rng: &mut StdRng,
    clock: &ClockSampler,
    table: &RotaryTable,
    batch: usize,
) -> Result<Timing> {
    let mut x = qkv(ctx, rng, batch, 1)?;
    let offsets = ctx.upload(&vec![4000i32; batch], [batch])?;
    time_launches(ctx, clock, |_| {
        let pos = RotaryPositions::PerSequence(offsets.view());
        ctx.apply_rotary(&mut q_and_k(&mut x)?, table, pos)
    })
}

/// How a timed decode step treats RoPE.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    /// No rotation: the step alone.
    Alone,
    /// `apply_rotary` on Q and K in place, then the step.
    RotaryFirst,
    /// The rotation inside the step (`NewKv::rotated`).
    Fused,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Alone => "ours: decode alone",
            Step::RotaryFirst => "ours: rotary + decode",
            Step::Fused => "ours: fused rotary",
        }
    }
}

/// A decode step over a `[B, seqlen, Hkv, D]` cache holding `seqlen - 1` keys: its new token's
/// Q, K and V in a packed buffer, turned as `step` says at the cache counts, by
/// `decode_attention_append` (counts kept, so every rep is the same step). Half the KV heads
/// streaming, as the DuoAttention layers.
fn time_decode(
    ctx: &Context,
    rng: &mut StdRng,
    clock: &ClockSampler,
    table: &RotaryTable,
    (batch, seqlen): (usize, usize),
    step: Step,
) -> Result<Timing> {
    let mut x = qkv(ctx, rng, batch, 1)?;
    let (cache, _) = random_tensor::<bf16>(rng, batch * seqlen * HKV * D);
    let mut k_cache = ctx.upload(&cache, [batch, seqlen, HKV, D])?;
    let mut v_cache = ctx.upload(&cache, [batch, seqlen, HKV, D])?;
    let mut lens = ctx.upload(&vec![(seqlen - 1) as i32; batch], [batch])?;
    let mut out = ctx.alloc::<bf16, 4>([batch, 1, HQ, D])?;
    let mut lse = ctx.alloc::<f32, 3>([batch, HQ, 1])?;
    let kinds = (0..HKV)
        .map(|h| match h < HKV / 2 {
            true => HeadKind::Retrieval,
            false => HeadKind::Streaming,
        })
        .collect();
    let cfg = AttentionConfig::new(kinds)
        .sink(crate::cases::SINK)
        .window(crate::cases::WINDOW);
    let strides = [H * D, H * D, D, 1];
    time_launches(ctx, clock, |_| {
        if step == Step::RotaryFirst {
            let pos = RotaryPositions::PerSequence(lens.view());
            ctx.apply_rotary(&mut q_and_k(&mut x)?, table, pos)?;
        }
        let q = x.strided_view(0, [batch, 1, HQ, D], strides)?;
        let k = x.strided_view(HQ * D, [batch, 1, HKV, D], strides)?;
        let v = x.strided_view((HQ + HKV) * D, [batch, 1, HKV, D], strides)?;
        ctx.decode_attention_append(
            &q,
            &mut k_cache.view_mut(),
            &mut v_cache.view_mut(),
            match step {
                Step::Fused => NewKv::keep(k, v).rotated(table),
                _ => NewKv::keep(k, v),
            },
            &mut out.view_mut(),
            &mut lse.view_mut(),
            &mut lens.view_mut(),
            &cfg,
        )
    })
}

fn print_table(records: &[RotaryRecord]) {
    let mut cases: BTreeMap<(String, usize, usize), Vec<&RotaryRecord>> = BTreeMap::new();
    for r in records {
        cases
            .entry((r.case.clone(), r.batch, r.seqlen))
            .or_default()
            .push(r);
    }
    println!(
        "\nrotary embeddings: Q and K heads of a packed QKV buffer (Hq {HQ}, Hkv {HKV}, D {D}, bf16, rotary dim {D}), in place; decode steps over a [B, S, Hkv, D] cache, half the KV heads streaming\n"
    );
    println!(
        "{:<14} {:>3} {:>7} {:<24} {:>10} {:>10} {:>9}",
        "case", "B", "S", "implementation", "ms", "GB/s", "vs ours"
    );
    for ((case, batch, seqlen), rs) in &cases {
        let ours = rs.iter().find(|r| r.implementation == "ours").map(|r| r.ms);
        for r in rs {
            let rows = if case == "prefill" { *seqlen } else { *batch };
            let rate = if case == "decode step" {
                "-".to_string()
            } else {
                format!("{:.0}", bytes(rows) / (r.ms * 1e-3) / 1e9)
            };
            let vs = match ours {
                Some(o) if r.implementation != "ours" => format!("{:.2}x", r.ms / o),
                _ => "-".into(),
            };
            println!(
                "{case:<14} {batch:>3} {seqlen:>7} {:<24} {:>10.4} {rate:>10} {vs:>9}",
                r.implementation, r.ms
            );
        }
    }
}
