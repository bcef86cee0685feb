//! The embedded kernel module: every entry is there for sm_90a, and (when ptxas is installed)
//! assembles with no spills, no local-memory stack and no serialized wgmma.
use duo_attn::kernels::{CUBIN, PTX};
use duo_attn_kernels::abi::all_entries;
use duo_attn_tests::notice;

#[test]
fn ptx_targets_sm90a_and_holds_every_entry() {
    assert!(
        PTX.contains(".target sm_90a"),
        "PTX is not built for sm_90a"
    );
    for entry in all_entries() {
        assert!(
            PTX.contains(&format!(".entry {entry}(")),
            "missing kernel entry {entry}"
        );
    }
    // Every device function must be inlined: a `call` means a leftover panic path or helper.
    assert!(
        !PTX.lines().any(|l| l.trim_start().starts_with("call")),
        "PTX contains calls"
    );
}

#[test]
fn ptx_assembles_without_spills() {
    let Some(ptxas) = duo_attn_kernel_build::find_ptxas() else {
        notice(
            "\n*** SKIPPED `ptx_assembles_without_spills`: ptxas not found (run scripts/setup.sh) ***\n",
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("duo-attn-ptx-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ptx, cubin) = (dir.join("k.ptx"), dir.join("k.cubin"));
    std::fs::write(&ptx, PTX).unwrap();
    let report = duo_attn_kernel_build::assemble(&ptxas, &ptx, &cubin).expect("ptxas failed");
    notice(&duo_attn_kernel_build::format_report(&report));
    assert_eq!(report.len(), all_entries().count());
    for k in &report {
        assert_eq!(
            (k.spill_store_bytes, k.spill_load_bytes),
            (0, 0),
            "{} spills",
            k.name
        );
        assert_eq!(k.stack_bytes, 0, "{} uses a local-memory stack", k.name);
        assert!(
            !k.wgmma_serialized,
            "{}: ptxas serialized its wgmma (C7520): a divergent path touches the accumulators",
            k.name
        );
    }
    assert!(
        !CUBIN.is_empty(),
        "ptxas is installed, so build.rs should have embedded a cubin"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The SASS of the embedded cubin (cuobjdump, offline): every Hopper prefill entry runs its
/// GEMMs as warpgroup MMAs (HGMMA), the mma.sync prefill and the decode kernels as warp MMAs.
#[test]
fn sass_shows_tensor_core_instructions() {
    let Some(cuobjdump) = duo_attn_kernel_build::find_cuobjdump() else {
        notice(
            "\n*** SKIPPED `sass_shows_tensor_core_instructions`: cuobjdump not found (run scripts/setup.sh) ***\n",
        );
        return;
    };
    if CUBIN.is_empty() {
        notice(
            "\n*** SKIPPED `sass_shows_tensor_core_instructions`: no cubin embedded (no ptxas) ***\n",
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("duo-attn-sass-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cubin = dir.join("k.cubin");
    std::fs::write(&cubin, CUBIN).unwrap();
    let counts = duo_attn_kernel_build::sass_counts(&cuobjdump, &cubin).expect("cuobjdump failed");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(counts.len(), all_entries().count());
    notice(&duo_attn_kernel_build::format_sass_counts(&counts));
    for k in &counts {
        let is = |kind: &str| k.name.starts_with(kind);
        if is("duo_prefill_wgmma") {
            assert!(
                k.hgmma > 0 && k.hmma == 0,
                "{}: HGMMA {}, HMMA {} (warpgroup MMAs only expected)",
                k.name,
                k.hgmma,
                k.hmma
            );
        } else if is("duo_prefill_merge") || is("duo_cache") || is("duo_rotary") {
            assert_eq!(k.hgmma + k.hmma, 0, "{}: tensor-core instructions", k.name);
        } else {
            assert!(k.hmma > 0, "{}: no HMMA", k.name);
        }
    }
    // A split-KV entry is its TMA twin with other tile bounds and epilogue: the same GEMMs, but
    // at D = 256 only the twin overlaps work tiles, and its boundary turn is one more copy of
    // the last PV GEMM (3 k-steps x 2 halves) and of the S GEMM (16 k-steps).
    let hgmma = |name: &str| counts.iter().find(|k| k.name == name).map(|k| k.hgmma);
    for k in counts.iter().filter(|k| k.name.contains("_tma_split_")) {
        let twin = k.name.replace("_tma_split_", "_tma_");
        let boundary_turn = if k.name.ends_with("_d256") {
            3 * 2 + 16
        } else {
            0
        };
        assert_eq!(
            Some(k.hgmma + boundary_turn),
            hgmma(&twin),
            "{} against {twin}",
            k.name
        );
    }
}

/// Every entry runs `griddepcontrol.wait` before its first global memory access: launched with
/// programmatic stream serialization (the host's default), a kernel may start while the one
/// before it still runs, and only that wait orders it after that kernel's reads and writes.
/// Two exceptions, which only steer L2 prefetches (`device::prefetch_l2`, never stale since every
/// write lands in the L2) and may read a value the previous kernel is changing:
/// `ld.relaxed.gpu.global` and `cp.async.bulk.prefetch.L2`.
#[test]
fn every_entry_waits_for_the_previous_grid_before_touching_memory() {
    let mut entries = 0;
    for (i, body) in PTX.split(".entry ").enumerate().skip(1) {
        let name = body.split('(').next().unwrap_or("?");
        let lines: Vec<&str> = body.lines().map(str::trim).collect();
        let wait = lines
            .iter()
            .position(|l| l.starts_with("griddepcontrol.wait"))
            .unwrap_or_else(|| panic!("entry {name} (#{i}) never waits for the previous grid"));
        let early = lines[..wait].iter().find(|l| {
            let op = l.split_whitespace().next().unwrap_or("");
            let memory = [
                "ld.", "st.", "atom.", "red.", "cp.", "prefetch", "mbarrier", "fence",
            ];
            let hint = [
                "ld.param",
                "ld.relaxed.gpu.global",
                "cp.async.bulk.prefetch.L2",
            ];
            memory.iter().any(|m| op.starts_with(m)) && !hint.iter().any(|h| op.starts_with(h))
        });
        assert!(
            early.is_none(),
            "entry {name} touches memory before griddepcontrol.wait: {early:?}"
        );
        entries += 1;
    }
    assert_eq!(entries, all_entries().count());
}
