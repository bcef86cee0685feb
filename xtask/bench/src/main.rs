//! `duo-bench`: times duo-attn's kernels with CUDA events on the shapes of the prefill and decode
//! issues, merges the peers' times measured on the same GPU (`peers.py`), and prints one table;
//! writes `bench.json` and `bench.svg`. A broken kernel posts no time: each mode is checked against
//! the float64 reference first.
mod cache_prefill;
mod cases;
mod clock;
mod report;
mod rotary;
mod timing;

use cases::{Case, Mode, all_cases};
use clap::Parser;
use duo_attn::{AlibiSlopes, Context, PrefillKernel};
use duo_attn_tests::{Comparison, rng, run_decode_case, run_prefill_case, run_varlen_case};
use half::bf16;
use indicatif::{ProgressBar, ProgressStyle};
use report::{OURS, PeersFile, Record, Report};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    about = "duo-attn benchmark against PyTorch SDPA / FlexAttention measured on the same GPU"
)]
struct Args {
    /// JSON written by peers.py on this GPU, merged into the table and plot.
    #[arg(long)]
    peers: Option<PathBuf>,
    /// Where bench.json and bench.svg go.
    #[arg(long, default_value = "bench-out")]
    out_dir: PathBuf,
    /// Fewer, shorter shapes.
    #[arg(long)]
    quick: bool,
    /// Only these modes (comma separated), e.g. `--only decode,decode-mixed`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Mode>,
    /// Only these key lengths (comma separated), e.g. `--seqlens 32768,131072`.
    #[arg(long, value_delimiter = ',')]
    seqlens: Vec<usize>,
    /// Only these batch sizes (comma separated).
    #[arg(long, value_delimiter = ',')]
    batches: Vec<usize>,
    /// Prefill kernel to time: auto (default: the warp-specialised one with TMA loads), tma, ws
    /// (warp-specialised with cp.async loads), wgmma (without warp specialisation) or mma.
    #[arg(long, default_value = "auto", value_parser = ["auto", "tma", "wgmma", "ws", "mma"])]
    kernel: String,
    /// No GPU: re-print the table and re-draw the plot of an earlier run's bench.json.
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Timing probes only (a kernel variant that is wrong on purpose, e.g. with its softmax
    /// removed): skip the correctness gate. Figures from such runs are never reported as results.
    #[arg(long, hide = true)]
    probe_skip_check: bool,
    /// Head dim of the prefill cases (the prefill issue's is 128; 64 and 256 run too, without
    /// peers unless peers.py measured the same shapes).
    #[arg(long, default_value_t = 128, value_parser = parse_head_dim)]
    prefill_head_dim: usize,
    /// Head dim of the decode cases (128 by default; 64 and 256 run too, with peers when
    /// peers.py got the same flag).
    #[arg(long, default_value_t = 128, value_parser = parse_head_dim)]
    decode_head_dim: usize,
    /// Split-KV of the prefill cases (`AttentionConfig::kv_splits`; default: the launch chooses,
    /// 1: never split).
    #[arg(long)]
    kv_splits: Option<usize>,
    /// Timing probes: streaming heads use this window instead of the 1024 (to separate a
    /// work tile's fixed cost from its per-block cost). Not the shapes.
    #[arg(long, hide = true)]
    window: Option<u32>,
    /// Cases add ALiBi biases (ALiBi's standard slopes per query head), decode included. `run.sh
    /// bench --alibi` passes the flag to peers.py too, which then measures FlexAttention with the
    /// same bias (`flex-alibi`) on the full causal and streaming cases, and no other peer.
    #[arg(long)]
    alibi: bool,
    /// Decode cases read paged K/V (`decode_attention_paged`) with pages of this many rows,
    /// shuffled through the pool, instead of a contiguous cache (the gate checks plain decode).
    #[arg(long)]
    decode_page_size: Option<usize>,
    /// Page layout of `--decode-page-size`: hnd (each page `[Hkv, page, D]`, a head's rows
    /// contiguous) or nhd (`[page, Hkv, D]`, vLLM's FlashAttention layout).
    #[arg(long, default_value = "hnd", value_parser = ["hnd", "nhd"])]
    decode_page_layout: String,
    /// Decode cases append their new keys and values to the cache first: `fused` in the decode
    /// launch (`decode_attention_append`), `separate` in an append launch before it
    /// (`append_kv`, then `decode_attention_seqlens`). Contiguous caches; the gate checks plain
    /// decode.
    #[arg(long, value_parser = ["fused", "separate"])]
    decode_append: Option<String>,
    /// Chunked cases read K/V from a KV cache through `plan_prefill_kvcache`: `contiguous` (a
    /// `[B, S, Hkv, D]` cache with a key count per sequence) or a page size (paged, pages
    /// shuffled through the pool). Rows past each count are NaN. The gate checks packed varlen.
    #[arg(long, value_parser = parse_kv_cache)]
    prefill_kv_cache: Option<String>,
    /// Timing probes: after each prefill case, write its LSE output (raw little-endian f32, the
    /// last rep's) to `DIR/<mode>-<seqlen>.lse`; a trace variant of the kernel stores timestamps
    /// there instead of LSE values.
    #[arg(long, hide = true)]
    dump_lse: Option<PathBuf>,
    /// Instead of the cases: new requests of different lengths prefilled into a DuoAttention
    /// cache, slot by slot against one ragged launch (`prefill_varlen`); writes
    /// `cache-prefill.json`.
    #[arg(long)]
    cache_prefill: bool,
    /// Instead of the cases: rotary embeddings (`apply_rotary`) on a packed QKV buffer, and a
    /// decode step with and without the rotation before it; writes `rotary.json`.
    #[arg(long)]
    rotary: bool,
    /// With `--rotary`: the peers' JSON written by `rotary_peers.py` on the same GPU.
    #[arg(long)]
    rotary_peers: Option<PathBuf>,
    /// With `--cache-prefill`: a paged cache with pages of this many tokens runs the ragged
    /// prefill beside the unpaged one, and both time a decode step after it.
    #[arg(long)]
    cache_page_size: Option<usize>,
    /// Launch with plain `cuLaunchKernel`, not programmatic stream serialization
    /// (`Context::set_dependent_launch(false)`), to measure what the overlap gives.
    #[arg(long)]
    no_dependent_launch: bool,
    /// Merge the decode's splits through global memory, never in thread-block clusters
    /// (`Context::set_decode_clusters(false)`), to measure what the cluster merge gives.
    #[arg(long)]
    no_decode_clusters: bool,
}

fn parse_head_dim(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(d @ (64 | 128 | 256)) => Ok(d),
        _ => Err(format!(
            "`{s}`: the prefill kernels take head dims 64, 128 and 256"
        )),
    }
}

/// The correctness gate: one shape per kernel path, checked against the float64 reference
/// (the chunked ones split their KV blocks).
const GATE: [Case; 5] = [
    Case {
        mode: Mode::Mixed,
        batch: 1,
        seqlen_q: 4096,
        seqlen_k: 4096,
        heads_q: 32,
        heads_kv: 32,
        head_dim: 128,
    },
    Case {
        mode: Mode::Decode,
        batch: 2,
        seqlen_q: 1,
        seqlen_k: 4096,
        heads_q: 32,
        heads_kv: 8,
        head_dim: 128,
    },
    Case {
        mode: Mode::DecodeMixed,
        batch: 2,
        seqlen_q: 1,
        seqlen_k: 8192,
        heads_q: 32,
        heads_kv: 8,
        head_dim: 128,
    },
    Case {
        mode: Mode::ChunkedMixed,
        batch: 1,
        seqlen_q: 128,
        seqlen_k: 8192,
        heads_q: 32,
        heads_kv: 8,
        head_dim: 128,
    },
    Case {
        mode: Mode::ChunkedVarlen,
        batch: 4,
        seqlen_q: 64,
        seqlen_k: 8192,
        heads_q: 32,
        heads_kv: 8,
        head_dim: 128,
    },
];

fn parse_kv_cache(s: &str) -> Result<String, String> {
    match s.parse::<usize>() {
        Ok(_) => Ok(s.into()),
        Err(_) if s == "contiguous" => Ok(s.into()),
        Err(_) => Err(format!("`{s}`: `contiguous` or a page size")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(window) = args.window {
        println!("*** probe: streaming window {window}, not the issue's shapes ***");
        cases::set_window(window);
    }
    if let Some(path) = &args.from_json {
        let report = match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<Report>(&s).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("cannot read {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        return write_outputs(&args, report);
    }
    let mut ctx = match Context::new(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("duo-bench needs a Hopper GPU: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.no_dependent_launch {
        println!("*** kernels launched without programmatic stream serialization ***");
        ctx.set_dependent_launch(false);
    }
    if args.no_decode_clusters {
        println!("*** decode splits merged through global memory, not in clusters ***");
        ctx.set_decode_clusters(false);
    }
    let device = ctx.info().name.clone();
    println!("device: {device}");
    let mut rng = rng("bench");
    if args.cache_prefill {
        return run_cache_prefill(&args, &ctx, &mut rng);
    }
    if args.rotary {
        return run_rotary(&args, &ctx, &mut rng);
    }

    // Correctness gate: one shape per kernel path, against the float64 reference.
    let gate: &[Case] = if args.probe_skip_check {
        println!("*** probe: correctness gate skipped; these times are not results ***");
        &[]
    } else {
        &GATE
    };
    for case in gate {
        let check = if let Some(lens) = case.varlen_lens() {
            let heads = (case.heads_q, case.heads_kv, case.head_dim);
            run_varlen_case(&ctx, &mut rng, heads, &lens, &case.config()).map(worst)
        } else if case.is_decode() {
            run_decode_case::<bf16>(&ctx, &case.shape(), &case.config(), &mut rng)
        } else {
            run_prefill_case::<bf16>(&ctx, &case.shape(), &case.config(), &mut rng)
        };
        match check {
            Ok(cmp) if cmp.passed() => println!(
                "check {:<12} S={:<6} rel err {:.2e}: ok",
                case.mode.label(),
                case.seqlen_k,
                cmp.rel_err
            ),
            Ok(cmp) => {
                eprintln!(
                    "check {} FAILED, no times posted: {cmp:?}",
                    case.mode.label()
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("check {} failed to run: {e}", case.mode.label());
                return ExitCode::FAILURE;
            }
        }
    }

    let cases: Vec<Case> = all_cases(args.quick, args.prefill_head_dim, args.decode_head_dim)
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.contains(&c.mode))
        .filter(|c| args.seqlens.is_empty() || args.seqlens.contains(&c.seqlen_k))
        .filter(|c| args.batches.is_empty() || args.batches.contains(&c.batch))
        .collect();
    let clock = clock::ClockSampler::new(ctx.info().ordinal);
    let bar = ProgressBar::new(cases.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").unwrap());
    let mut records = Vec::new();
    for case in &cases {
        bar.set_message(format!(
            "{} B={} S={}",
            case.mode.label(),
            case.batch,
            case.seqlen_k
        ));
        let kernel = match args.kernel.as_str() {
            "wgmma" => PrefillKernel::Wgmma,
            "tma" => PrefillKernel::WgmmaTma,
            "ws" => PrefillKernel::WgmmaWarpSpecialized,
            "mma" => PrefillKernel::MmaSync,
            _ => PrefillKernel::Auto,
        };
        let dump = args.dump_lse.as_ref().map(|dir| {
            dir.join(format!(
                "{}-{}.lse",
                case.mode.label().replace(' ', "_").replace('/', "-"),
                case.seqlen_k
            ))
        });
        let mut cfg = case.config().kernel(kernel).kv_splits(args.kv_splits);
        if args.alibi {
            match AlibiSlopes::new(&ctx, &AlibiSlopes::standard(case.heads_q)) {
                Ok(slopes) => cfg = cfg.alibi(slopes),
                Err(e) => {
                    eprintln!("ALiBi slopes: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let kv_cache = args
            .prefill_kv_cache
            .as_deref()
            .filter(|_| case.is_chunked());
        let timed = match args.decode_page_size {
            _ if kv_cache.is_some() => {
                let page = kv_cache.and_then(|c| c.parse().ok());
                timing::time_kvcache_case(&ctx, case, page, &cfg, &mut rng, &clock)
            }
            _ if case.is_decode() && args.decode_append.is_some() => {
                let fused = args.decode_append.as_deref() == Some("fused");
                timing::time_append_decode(&ctx, case, fused, &cfg, &mut rng, &clock)
            }
            Some(page) if case.is_decode() => {
                let heads_major = args.decode_page_layout == "hnd";
                timing::time_paged_decode(&ctx, case, page, heads_major, &cfg, &mut rng, &clock)
            }
            _ => timing::time_case(&ctx, case, &cfg, &mut rng, dump.as_deref(), &clock),
        };
        match timed {
            Ok(t) => {
                let clock_note = t.clock.as_ref().map_or(String::new(), |c| {
                    let limits = if c.limits.is_empty() {
                        "none"
                    } else {
                        &c.limits
                    };
                    format!(
                        ", SM {:.0} MHz ({} samples; limits: {limits})",
                        c.mean_mhz, c.samples
                    )
                });
                // Through `suspend`, not `bar.println`: a hidden bar (output not a terminal, as
                // on the GPU hosts) would drop the line.
                bar.suspend(|| {
                    println!(
                        "{:<12} B={:<2} Sq={:<6} Sk={:<6} {:9.3} ms ({} reps{clock_note})",
                        case.mode.label(),
                        case.batch,
                        case.seqlen_q,
                        case.seqlen_k,
                        t.median_ms,
                        t.reps
                    )
                });
                records.push(Record {
                    case: *case,
                    implementation: OURS.into(),
                    ms: t.median_ms,
                    min_ms: Some(t.min_ms),
                    reps: Some(t.reps),
                    sm_mhz: t.clock.as_ref().map(|c| c.mean_mhz),
                    clock_limits: t.clock.map(|c| c.limits),
                });
            }
            Err(e) => bar.suspend(|| eprintln!("{case:?}: {e}")),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mut peers_device = None;
    let mut torch = None;
    if let Some(path) = &args.peers {
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<PeersFile>(&s).map_err(|e| e.to_string()))
        {
            Ok(p) => {
                if p.device != device {
                    eprintln!(
                        "warning: peers were measured on `{}`, we run on `{device}`",
                        p.device
                    );
                }
                peers_device = Some(p.device);
                torch = Some(p.torch);
                records.extend(p.records);
            }
            Err(e) => eprintln!("warning: could not read peers from {}: {e}", path.display()),
        }
    }

    let report = Report {
        date: report::today(),
        device,
        peers_device,
        torch,
        records,
    };
    write_outputs(&args, report)
}

/// `--cache-prefill`: the scenarios' table, and their records in `cache-prefill.json`. Fails when
/// a ragged output strays from the slot-by-slot one (bf16 rounding is far below 1e-2).
fn run_cache_prefill(args: &Args, ctx: &Context, rng: &mut rand::rngs::StdRng) -> ExitCode {
    let records = match cache_prefill::run(ctx, rng, args.cache_page_size) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cache prefill: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !write_records(args, ctx, "cache-prefill.json", &records) {
        return ExitCode::FAILURE;
    }
    if let Some(bad) = records
        .iter()
        .find(|r| r.max_rel_diff.is_nan() || r.max_rel_diff >= 1e-2)
    {
        eprintln!("cache prefill: ragged outputs differ from slot by slot: {bad:?}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `--rotary`: the table, and its records in `rotary.json`.
fn run_rotary(args: &Args, ctx: &Context, rng: &mut rand::rngs::StdRng) -> ExitCode {
    let peers = match &args.rotary_peers {
        None => Vec::new(),
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
        {
            Ok(p) => p,
            Err(e) => {
                eprintln!("reading {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let clock = clock::ClockSampler::new(ctx.info().ordinal);
    let records = match rotary::run(ctx, rng, &clock, peers) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rotary: {e}");
            return ExitCode::FAILURE;
        }
    };
    match write_records(args, ctx, "rotary.json", &records) {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    }
}

/// Writes `records` with the date and device to `name` in the output directory; false (after
/// saying why) when that fails.
fn write_records(args: &Args, ctx: &Context, name: &str, records: &impl serde::Serialize) -> bool {
    let path = args.out_dir.join(name);
    let json = serde_json::json!({
        "date": report::today(),
        "device": ctx.info().name,
        "records": records,
    });
    if let Err(e) = std::fs::create_dir_all(&args.out_dir)
        .and_then(|()| std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()))
    {
        eprintln!("writing {}: {e}", path.display());
        return false;
    }
    println!("\nwrote {}", path.display());
    true
}

/// A varlen launch's check: the first failing sequence's comparison, else the one with the
/// largest error.
fn worst(per_sequence: Vec<Comparison>) -> Comparison {
    per_sequence
        .iter()
        .find(|c| !c.passed())
        .or_else(|| {
            per_sequence
                .iter()
                .max_by(|a, b| a.rel_err.total_cmp(&b.rel_err))
        })
        .cloned()
        .unwrap_or_default()
}

/// Prints the merged table and writes bench.json and bench.svg.
fn write_outputs(args: &Args, report: Report) -> ExitCode {
    println!(
        "\nduo-attn bench, {}, {}; median of CUDA-event times; speedup = peer ms / our ms\n",
        report.date, report.device
    );
    print!("{}", report::table(&report.records));
    if let Err(e) = std::fs::create_dir_all(&args.out_dir) {
        eprintln!("cannot create {}: {e}", args.out_dir.display());
        return ExitCode::FAILURE;
    }
    let json_path = args.out_dir.join("bench.json");
    let svg_path = args.out_dir.join("bench.svg");
    if let Err(e) = std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap()) {
        eprintln!("writing {}: {e}", json_path.display());
        return ExitCode::FAILURE;
    }
    let title = format!("duo-attn vs peers, {}, {}", report.device, report.date);
    if let Err(e) = report::plot(&report.records, &svg_path, &title) {
        eprintln!("plotting: {e}");
        return ExitCode::FAILURE;
    }
    println!("\nwrote {} and {}", json_path.display(), svg_path.display());
    ExitCode::SUCCESS
}
