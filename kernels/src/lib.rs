//! duo-attn device code.
//!
//! Built for `nvptx64-nvidia-cuda` (sm_90a) by `cargo xtask build-kernels` / `host/build.rs`, which
//! emit one PTX module. On the host the same crate compiles to just the launch ABI ([`abi`]) and the
//! pure block/mask arithmetic ([`mask`]), so the host crate and CPU tests share one definition.
//!
//! We use rustc's own NVPTX backend, not rust-cuda's `cuda_std` (which needs rustc_codegen_nvvm);
//! `device` (built for the GPU only) is our small replacement: special registers, shared memory,
//! barriers, shuffles, math.
#![no_std]
// The shared ABI and arithmetic are documented; the GPU-only modules' macro-made entries are not.
#![cfg_attr(not(target_arch = "nvptx64"), warn(missing_docs))]
#![cfg_attr(
    target_arch = "nvptx64",
    feature(abi_ptx, asm_experimental_arch, stmt_expr_attributes)
)]

pub mod abi;
pub mod heads;
pub mod mask;
pub mod ring;
pub mod smem_layout;

#[cfg(target_arch = "nvptx64")]
pub mod cache;
#[cfg(target_arch = "nvptx64")]
pub mod decode;
#[cfg(target_arch = "nvptx64")]
mod decode_merge;
#[cfg(target_arch = "nvptx64")]
pub mod device;
#[cfg(target_arch = "nvptx64")]
pub mod mma;
#[cfg(target_arch = "nvptx64")]
pub mod prefill;
#[cfg(target_arch = "nvptx64")]
pub mod prefill_merge;
#[cfg(target_arch = "nvptx64")]
pub mod prefill_wgmma;
#[cfg(target_arch = "nvptx64")]
pub mod prefill_wgmma_ws;
#[cfg(target_arch = "nvptx64")]
pub mod rotary;
#[cfg(target_arch = "nvptx64")]
pub mod softmax;
#[cfg(target_arch = "nvptx64")]
pub mod tile;
#[cfg(target_arch = "nvptx64")]
pub mod wgmma;
#[cfg(target_arch = "nvptx64")]
pub mod ws_shape;

#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // Kernels are written so that no panic path survives optimisation; if one does, trap loudly.
    unsafe { core::arch::asm!("trap;", options(noreturn)) }
}
