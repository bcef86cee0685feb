//! The kernel module embedded at build time (see `build.rs`): PTX always, a cubin when ptxas was
//! found. Embedding keeps a binary self-contained when copied to a GPU host.

/// PTX of the kernels crate, `.target sm_90a`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/duo_attn_kernels.ptx"));

/// The same kernels assembled for sm_90a, or empty if ptxas was not available at build time.
pub const CUBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/duo_attn_kernels.cubin"));
