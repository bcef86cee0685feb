//! `cargo xtask <command>`: developer tasks of duo-attn.
use clap::{Parser, Subcommand};
use duo_attn_kernel_build as kb;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(about = "duo-attn developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernels to PTX (sm_90a), assemble with ptxas when found, print registers,
    /// shared memory, stack and spills per kernel. Outputs go to target/kernels/.
    BuildKernels {
        /// Fail when a kernel spills, uses a local-memory stack or has its wgmma serialized.
        #[arg(long)]
        deny_spills: bool,
    },
    /// On a GPU host with Rust and PyTorch: measure the peers (peers.py), then run duo-bench, which
    /// merges them into one table and writes bench-out/bench.json and bench.svg.
    Bench {
        /// Fewer, shorter shapes.
        #[arg(long)]
        quick: bool,
        /// Head dim of the prefill shapes, ours and the peers' (the prefill issue's is 128).
        #[arg(long, default_value_t = 128)]
        prefill_head_dim: usize,
    },
    /// Build release test binaries, the demo and the bench with the kernels embedded into one folder, plus
    /// run.sh, for a GPU host with no Rust toolchain.
    GpuBundle {
        #[arg(long, default_value = "bundle")]
        out: PathBuf,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::BuildKernels { deny_spills } => build_kernels(deny_spills),
        Cmd::Bench {
            quick,
            prefill_head_dim,
        } => bench(quick, prefill_head_dim),
        Cmd::GpuBundle { out } => gpu_bundle(&workspace_root().join(out)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn build_kernels(deny_spills: bool) -> Result<()> {
    let root = workspace_root();
    let out_dir = root.join("target/kernels");
    let ptx = kb::build_ptx(&root, &out_dir)?;
    println!("PTX   {}", ptx.display());
    let Some(ptxas) = kb::find_ptxas() else {
        println!(
            "ptxas not found (set PTXAS or run scripts/setup.sh): no cubin, no resource table"
        );
        return Ok(());
    };
    let cubin = out_dir.join(format!("duo_attn_kernels.{}.cubin", kb::ARCH));
    let report = kb::assemble(&ptxas, &ptx, &cubin)?;
    println!("CUBIN {} (ptxas {})\n", cubin.display(), ptxas.display());
    print!("{}", kb::format_report(&report));
    let bad: Vec<&str> = report
        .iter()
        .filter(|k| k.spill_store_bytes + k.spill_load_bytes + k.stack_bytes > 0)
        .map(|k| k.name.as_str())
        .collect();
    if !bad.is_empty() {
        let msg = format!("kernels with spills or stack: {}", bad.join(", "));
        if deny_spills {
            return Err(msg.into());
        }
        println!("\nwarning: {msg}");
    }
    let serialized: Vec<&str> = report
        .iter()
        .filter(|k| k.wgmma_serialized)
        .map(|k| k.name.as_str())
        .collect();
    if !serialized.is_empty() {
        let msg = format!(
            "ptxas serialized the wgmma of: {} (C7520: a divergent path touches the accumulators)",
            serialized.join(", ")
        );
        if deny_spills {
            return Err(msg.into());
        }
        println!("\nwarning: {msg}");
    }
    match kb::find_cuobjdump() {
        Some(cuobjdump) => {
            println!(
                "\nSASS tensor-core instructions (cuobjdump {}):",
                cuobjdump.display()
            );
            print!(
                "{}",
                kb::format_sass_counts(&kb::sass_counts(&cuobjdump, &cubin)?)
            );
        }
        None => println!("\ncuobjdump not found (run scripts/setup.sh): no SASS counts"),
    }
    Ok(())
}

/// Runs cargo with `--message-format=json` and returns the executables it reports (only test
/// harnesses when `only_tests`: `cargo test --no-run` also reports the examples it builds).
fn cargo_executables(args: &[&str], only_tests: bool) -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("cargo {} failed", args.join(" ")).into());
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let wanted = !only_tests || msg["profile"]["test"].as_bool() == Some(true);
        if let (Some(exe), Some(name), true) = (
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
            wanted,
        ) {
            exes.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(exes)
}

fn bench(quick: bool, prefill_head_dim: usize) -> Result<()> {
    let root = workspace_root();
    let out = root.join("bench-out");
    std::fs::create_dir_all(&out)?;
    let peers = out.join("peers.json");
    let mut shape_flags = vec![
        "--prefill-head-dim".to_string(),
        prefill_head_dim.to_string(),
    ];
    if quick {
        shape_flags.push("--quick".into());
    }
    let status = Command::new("python3")
        .arg(root.join("xtask/bench/peers.py"))
        .arg("--out")
        .arg(&peers)
        .args(&shape_flags)
        .status()?;
    if !status.success() {
        return Err("peers.py failed (it needs PyTorch with CUDA and Triton)".into());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["run", "--release", "-p", "duo-attn-bench", "--"])
        .arg("--peers")
        .arg(&peers)
        .arg("--out-dir")
        .arg(&out)
        .args(&shape_flags)
        .status()?;
    if !status.success() {
        return Err("duo-bench failed".into());
    }
    Ok(())
}

const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs duo-attn's test binaries and demo on a GPU host (no Rust needed).
#   ./run.sh              all tests (GPU tests included), then the demo and the serve example
#   ./run.sh serve [ARGS] the serve example only (e.g. --prompt 32768 --steps 128)
#   ./run.sh sass         HGMMA/HMMA instruction counts per kernel (cuobjdump)
#   ./run.sh sanitize     compute-sanitizer memcheck, racecheck and synccheck on a small GPU test
#   ./run.sh rotary       rotary embeddings: PyTorch peers (rotary_peers.py), then duo-bench --rotary
#   ./run.sh bench [--quick] [--prefill-head-dim 64|256]  peers (PyTorch) then duo-bench: merged
#                         table, $BENCH_OUT/bench.{json,svg}
set -uo pipefail
cd "$(dirname "$0")"
export RUST_BACKTRACE=1
status=0
if [ "${1:-}" = "bench" ]; then
  shift
  out="${BENCH_OUT:-bench-out}"
  mkdir -p "$out"
  python3 peers.py --out "$out/peers.json" "$@" || exit 1
  exec bin/duo-bench --peers "$out/peers.json" --out-dir "$out" "$@"
fi
if [ "${1:-}" = "rotary" ]; then
  out="${BENCH_OUT:-bench-out}"
  mkdir -p "$out"
  python3 rotary_peers.py --out "$out/rotary-peers.json" || exit 1
  exec bin/duo-bench --rotary --rotary-peers "$out/rotary-peers.json" --out-dir "$out"
fi
if [ "${1:-}" = "serve" ]; then
  shift
  exec bin/serve "$@"
fi
if [ "${1:-}" = "sass" ]; then
  # Instruction mix per kernel: the Hopper kernels must show HGMMA.
  cuobjdump -sass kernels/*.cubin | awk '/Function :/ {f=$3} /HGMMA|HMMA/ {split($0,a," "); for(i in a) if (a[i] ~ /^H(G)?MMA/) c[f" "a[i]]++} END {for (k in c) print k, c[k]}' | sort
  exit 0
fi
if [ "${1:-}" = "sanitize" ]; then
  for tool in memcheck racecheck synccheck; do
    echo "=== compute-sanitizer --tool $tool ==="
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_prefill strided_packed_qkv_and_padded_output --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_prefill persistent_blocks_take_many_tiles --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_prefill varlen_matches_reference_per_sequence --exact --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_prefill split_kv_varlen_matches_reference_per_sequence --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_prefill split_kv_small_launches --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_prefill flash_window_small_launches --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_prefill alibi_small_launches --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_prefill foreign_device_memory --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_streams caller_stream_and_graph_capture --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_streams graph_replays_new_cache_seqlens --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_decode sanitizer_small_cache_schedule --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_cache_slots sanitizer_small_slot_schedule --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_cache_slots sanitizer_small_ragged_prefill --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_cache_slots sanitizer_small_paged_schedule --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_kvcache sanitizer_small_kvcache_prefill --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_streams graph_replays_cache_decode_steps --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_decode decode_paged_kv --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_decode cache_append_places_rows_by_kind --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_decode queued_dependent_launches_match_synchronized_plain_ones --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_decode decode_merges_many_splits --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_decode decode_cluster_merge_matches_reference --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_decode decode_alibi_small_launches --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_kv_append sanitizer_small_kv_append --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_kv_append graph_replays_decode_append_steps --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_rotary sanitizer_small_rotary --test-threads=1 || status=1
    compute-sanitizer --tool "$tool" --error-exitcode 99 bin/test-gpu_rotary_decode sanitizer_small_rotary_decode --test-threads=1 || status=1
  done
  exit $status
fi
for t in bin/test-*; do
  echo "=== $t ==="
  "$t" --test-threads=1 || status=1
done
echo "=== demo ==="
bin/demo || status=1
echo "=== serve ==="
bin/serve || status=1
echo "bundle run finished: status $status"
exit $status
"#;

fn gpu_bundle(out: &Path) -> Result<()> {
    let bin = out.join("bin");
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(&bin)?;
    let tests = cargo_executables(&["test", "--release", "--workspace", "--no-run"], true)?;
    for (name, exe) in &tests {
        std::fs::copy(exe, bin.join(format!("test-{name}")))?;
    }
    let demo = cargo_executables(
        &[
            "build",
            "--release",
            "-p",
            "duo-attn-tests",
            "--example",
            "demo",
        ],
        false,
    )?;
    let (_, demo_exe) = demo.first().ok_or("the demo example was not built")?;
    std::fs::copy(demo_exe, bin.join("demo"))?;
    let serve = cargo_executables(
        &[
            "build",
            "--release",
            "-p",
            "duo-attn-tests",
            "--example",
            "serve",
        ],
        false,
    )?;
    let (_, serve_exe) = serve.first().ok_or("the serve example was not built")?;
    std::fs::copy(serve_exe, bin.join("serve"))?;
    let bench = cargo_executables(&["build", "--release", "-p", "duo-attn-bench"], false)?;
    let (_, bench_exe) = bench.first().ok_or("duo-bench was not built")?;
    std::fs::copy(bench_exe, bin.join("duo-bench"))?;
    for script in ["peers.py", "rotary_peers.py"] {
        std::fs::copy(
            workspace_root().join("xtask/bench").join(script),
            out.join(script),
        )?;
    }
    // The module as built, for cuobjdump/nvdisasm on the GPU host.
    let kernels = out.join("kernels");
    std::fs::create_dir_all(&kernels)?;
    let ptx = kb::build_ptx(&workspace_root(), &workspace_root().join("target/kernels"))?;
    std::fs::copy(&ptx, kernels.join("duo_attn_kernels.ptx"))?;
    if let Some(ptxas) = kb::find_ptxas() {
        let cubin = kernels.join(format!("duo_attn_kernels.{}.cubin", kb::ARCH));
        kb::assemble(&ptxas, &ptx, &cubin)?;
    }
    let run = out.join("run.sh");
    std::fs::write(&run, RUN_SH)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))?;
    }
    println!(
        "bundle in {} ({} test binaries + demo): run ./run.sh on the GPU host",
        out.display(),
        tests.len()
    );
    Ok(())
}
