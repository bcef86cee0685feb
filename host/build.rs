//! Builds the kernels crate to PTX (sm_90a) and embeds it; also a cubin when ptxas is available,
//! so binaries copied to a GPU host load without JIT. Set `DUO_ATTN_PTX=<file>` to embed a prebuilt
//! PTX instead (no NVPTX toolchain needed then).
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=DUO_ATTN_PTX");
    println!("cargo:rerun-if-env-changed=PTXAS");
    for path in [
        "kernels/src",
        "kernels/Cargo.toml",
        "xtask/kernel-build/src",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }

    let ptx = match std::env::var_os("DUO_ATTN_PTX") {
        Some(p) => PathBuf::from(p),
        None => {
            let target_dir = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join("target"))
                .join("kernels");
            match duo_attn_kernel_build::build_ptx(&workspace, &target_dir) {
                Ok(p) => p,
                Err(e) => panic!("duo-attn: building the GPU kernels failed: {e}"),
            }
        }
    };
    let embedded_ptx = out_dir.join("duo_attn_kernels.ptx");
    copy(&ptx, &embedded_ptx);

    // The cubin is optional: an empty file means "load the PTX".
    let cubin = out_dir.join("duo_attn_kernels.cubin");
    match duo_attn_kernel_build::find_ptxas() {
        Some(ptxas) => {
            if let Err(e) = duo_attn_kernel_build::assemble(&ptxas, &embedded_ptx, &cubin) {
                panic!("duo-attn: ptxas rejected the kernels: {e}");
            }
        }
        None => {
            println!(
                "cargo:warning=ptxas not found: embedding PTX only (the driver JIT-compiles it at load)"
            );
            std::fs::write(&cubin, b"").unwrap();
        }
    }
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        panic!(
            "duo-attn: copying {} to {}: {e}",
            from.display(),
            to.display()
        );
    }
}
