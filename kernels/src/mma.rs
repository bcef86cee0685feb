//! Warp-level tensor-core MMA (`mma.sync.m16n8k16`, f32 accumulate) per element type.
//!
//! Fragment layouts (PTX ISA, m16n8k16 for 16-bit types), with `g = lane / 4`, `t = lane % 4`:
//! A (16x16, row-major): regs 0/1 hold rows g / g+8 at columns 2t..2t+1, regs 2/3 the same rows at
//! columns 2t+8..2t+9. B (16x8, "col"): reg 0 holds k = 2t..2t+1 of column g, reg 1 k = 2t+8..2t+9.
//! C (16x8 f32): c0,c1 row g columns 2t,2t+1; c2,c3 row g+8.
use crate::device::{ld_shared_u32, pack_bf16x2, pack_f16x2, unpack_bf16x2, unpack_f16x2};
use core::arch::asm;

/// A 16-bit element type the tensor cores take.
pub trait Element {
    /// `acc += a * b` on one m16n8k16 tile.
    fn mma(acc: &mut [f32; 4], a: &[u32; 4], b: [u32; 2]);
    /// Two f32 to a packed pair, `lo` in the low half.
    fn pack(lo: f32, hi: f32) -> u32;
    /// A packed pair to two f32, the low half first (exact).
    fn unpack(x: u32) -> [f32; 2];
}

pub enum Bf16 {}
pub enum F16 {}

macro_rules! mma_element {
    ($ty:ty, $ptx_ty:literal, $pack:ident, $unpack:ident) => {
        impl Element for $ty {
            #[inline(always)]
            fn mma(acc: &mut [f32; 4], a: &[u32; 4], b: [u32; 2]) {
                unsafe {
                    asm!(
                        concat!("mma.sync.aligned.m16n8k16.row.col.f32.", $ptx_ty, ".", $ptx_ty, ".f32 ",
                            "{{{c0}, {c1}, {c2}, {c3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, ",
                            "{{{c0}, {c1}, {c2}, {c3}}};"),
                        c0 = inout(reg32) acc[0], c1 = inout(reg32) acc[1],
                        c2 = inout(reg32) acc[2], c3 = inout(reg32) acc[3],
                        a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                        b0 = in(reg32) b[0], b1 = in(reg32) b[1],
                        options(pure, nomem, nostack),
                    )
                }
            }
            #[inline(always)]
            fn pack(lo: f32, hi: f32) -> u32 {
                $pack(lo, hi)
            }
            #[inline(always)]
            fn unpack(x: u32) -> [f32; 2] {
                $unpack(x)
            }
        }
    };
}

mma_element!(Bf16, "bf16", pack_bf16x2, unpack_bf16x2);
mma_element!(F16, "f16", pack_f16x2, unpack_f16x2);

/// The 4 accumulators of 8-column tile `j` of a flat accumulator array (m16n8 C layout).
#[inline(always)]
pub fn quad<const N: usize>(a: &[f32; N], j: usize) -> [f32; 4] {
    [a[4 * j], a[4 * j + 1], a[4 * j + 2], a[4 * j + 3]]
}

#[inline(always)]
pub fn set_quad<const N: usize>(a: &mut [f32; N], j: usize, v: [f32; 4]) {
    a[4 * j..4 * j + 4].copy_from_slice(&v);
}

/// One m16n8 tile of `S = Q K^T`: the Q A-fragments (`KQ` k-steps of 16) against 8 keys of a
/// row-major K tile in shared memory, where `k_row` is the address of this thread's key row
/// (`g`) at column `2t`.
#[inline(always)]
pub fn qk_tile<E: Element, const KQ: usize>(qa: &[[u32; 4]; KQ], k_row: u32) -> [f32; 4] {
    let mut c = [0f32; 4];
    for (kk, frag) in qa.iter().enumerate() {
        let addr = k_row + (kk * 32) as u32;
        // SAFETY: the caller's K tile spans D = 16 * KQ columns from `k_row`.
        let b = unsafe { [ld_shared_u32(addr), ld_shared_u32(addr + 16)] };
        E::mma(&mut c, frag, b);
    }
    c
}
