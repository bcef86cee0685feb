//! Per-head-dim shapes of the warp-specialised prefill kernel: the KV block size, the ring depth,
//! and a consumer's register tiles (scores S, output O, P as A fragments) with the wgmma
//! instructions that fill them.
//!
//! All walk their KV blocks through three stages: 128-key blocks at D = 64 and 128, 48-key blocks
//! at D = 256, where Q alone takes 64 KiB of shared memory and a consumer's O is 64 x 256 (128
//! registers, as two n128 accumulators: a 128-register operand list is past what ptxas takes
//! well). S is then 64 x 48.
use crate::abi::{WG_STAGES, ws_block_n};
use crate::mma::Element;
use crate::softmax::{RowState, alibi_scores, p_fragments, rescale};
use crate::tile::QueryTile;
use crate::wgmma::{WgmmaElement, fence_accumulators_24, fence_accumulators_64};

/// Head dim `D` of the warp-specialised kernel; `ALIBI`: the build that adds ALiBi biases.
pub struct HeadDim<const D: usize, const ALIBI: bool = false>;

/// What the kernel body needs to know about its head dim.
pub trait WsShape {
    const D: usize;
    /// The ALiBi build: scores take `alibi_scores` before the mask and the softmax.
    const ALIBI: bool = false;
    /// Keys per KV block.
    const BN: usize = ws_block_n(Self::D);
    /// K/V stages of the shared-memory ring.
    const STAGES: usize = WG_STAGES;
    /// A consumer's scores of one KV block (64 x BN, f32).
    type S: Copy;
    /// A consumer's output accumulator (64 x D, f32).
    type O: Copy;
    /// P as the register A fragments of the PV GEMM, one per 16-key k-step.
    type P: Copy + AsRef<[[u32; 4]]>;

    fn zero_s() -> Self::S;
    fn zero_o() -> Self::O;
    fn zero_p() -> Self::P;
    /// Register fences around asynchronous wgmma accumulators.
    fn fence_s(s: &mut Self::S);
    fn fence_o(o: &mut Self::O);
    /// One 16-deep k-step of S (+)= Q K^T, both operands shared-memory descriptors.
    fn mma_qk_step<E: WgmmaElement>(s: &mut Self::S, a: u64, b: u64, accumulate: u32);
    /// Whether the TMA build holds a consumer's Q in registers (A fragments) for the whole work
    /// tile: all of Q at D <= 128, so that Q's buffer is free for the next tile's Q right after
    /// the tile starts; at D = 256 its first half (32 registers; all of it would be 64), which
    /// halves the shared-memory reads of Q's S GEMMs.
    const Q_IN_REGISTERS: bool = false;
    /// Lazy rescaling (`online_softmax`): the output is rescaled only in blocks where a row's
    /// running max moved by more than `LAZY_MAX_LOG2`. At D = 256 the rescale is 128 FMULs per
    /// thread and 48-key block (against 24 exponentials), and skipping it made the layer 5-9%
    /// faster; at D = 128 the vote and the branch cost more than they saved (session 12).
    const LAZY_RESCALE: bool = false;
    /// One 16-deep k-step of S += Q K^T with Q's A fragment `a` in registers and K K-major in
    /// shared memory (only called when `Q_IN_REGISTERS`).
    fn mma_qk_rs_step<E: WgmmaElement>(_s: &mut Self::S, _a: &[u32; 4], _b: u64) {}
    /// One 16-key k-step of O += P V with A fragment `a`; `v(half)` is the V descriptor of
    /// columns `128 half ..` (D = 256 has two halves).
    fn mma_pv_step<E: WgmmaElement>(o: &mut Self::O, a: &[u32; 4], v: impl Fn(usize) -> u64);
    /// `QueryTile::softmax_scores` on this shape's scores, after `alibi_scores` with
    /// `alibi_slope_raw` in the ALiBi build (ignored in the others).
    #[allow(clippy::too_many_arguments)]
    fn softmax<const MASK: u32>(
        tile: &QueryTile,
        s: &mut Self::S,
        state: &mut RowState,
        n0: i32,
        q_pos: [i32; 2],
        t: usize,
        scale_log2: f32,
        alibi_slope_raw: f32,
    ) -> [f32; 2];
    fn rescale(o: &mut Self::O, alpha: [f32; 2]);
    fn p_fragments<E: Element>(s: &Self::S) -> Self::P;
    /// The epilogue: normalised O rows and the LSE; with `PARTIAL` (split-KV) O as f32 into the
    /// tile's partial rows (`QueryTile::store_o`).
    fn store<E: Element, const PARTIAL: bool>(
        tile: &QueryTile,
        o: &Self::O,
        rows: [i32; 2],
        t: usize,
        inv: [f32; 2],
        lse: [f32; 2],
    );
}

/// The score-side items of a shape: S of `$sn` registers per thread (BN = 2 $sn keys) filled by
/// `$qk`, fenced by `$fence`, P of `$pk` k-steps; `$lazy` sets the shape's `LAZY_RESCALE` (a literal,
/// which the softmax also takes: a const generic argument cannot name `Self` in a generic impl).
macro_rules! score_tiles {
    ($sn:literal, $pk:literal, $qk:ident, $fence:ident, $lazy:literal) => {
        const LAZY_RESCALE: bool = $lazy;
        type S = [f32; $sn];
        type P = [[u32; 4]; $pk];

        #[inline(always)]
        fn zero_s() -> Self::S {
            [0.0; $sn]
        }
        #[inline(always)]
        fn zero_p() -> Self::P {
            [[0; 4]; $pk]
        }
        #[inline(always)]
        fn fence_s(s: &mut Self::S) {
            $fence(s);
        }
        #[inline(always)]
        fn mma_qk_step<E: WgmmaElement>(s: &mut Self::S, a: u64, b: u64, accumulate: u32) {
            E::$qk(s, a, b, accumulate);
        }
        #[inline(always)]
        fn softmax<const MASK: u32>(
            tile: &QueryTile,
            s: &mut Self::S,
            state: &mut RowState,
            n0: i32,
            q_pos: [i32; 2],
            t: usize,
            scale_log2: f32,
            alibi_slope_raw: f32,
        ) -> [f32; 2] {
            let bn = Self::BN as i32;
            if Self::ALIBI {
                alibi_scores(s, alibi_slope_raw, q_pos, n0, t);
            }
            tile.softmax_scores::<MASK, $lazy, $sn>(s, state, n0, bn, q_pos, t, scale_log2)
        }
        #[inline(always)]
        fn p_fragments<E: Element>(s: &Self::S) -> Self::P {
            p_fragments::<E, $sn, $pk>(s)
        }
    };
}

/// D = 64 and 128: 128-key blocks, S and O one 64-register accumulator each (D = 64 uses the
/// first 32 registers of O, with n64 PV GEMMs).
macro_rules! narrow_shape {
    ($d:literal) => {
        impl<const A: bool> WsShape for HeadDim<$d, A> {
            const D: usize = $d;
            const ALIBI: bool = A;
            const Q_IN_REGISTERS: bool = true;
            type O = [f32; 64];
            score_tiles!(64, 8, mma_ss_m64n128k16, fence_accumulators_64, false);

            #[inline(always)]
            fn mma_qk_rs_step<E: WgmmaElement>(s: &mut Self::S, a: &[u32; 4], b: u64) {
                E::mma_rs_kmajor_m64n128k16(s, a, b);
            }

            #[inline(always)]
            fn zero_o() -> Self::O {
                [0.0; 64]
            }
            #[inline(always)]
            fn fence_o(o: &mut Self::O) {
                fence_accumulators_64(o);
            }
            #[inline(always)]
            fn mma_pv_step<E: WgmmaElement>(
                o: &mut Self::O,
                a: &[u32; 4],
                v: impl Fn(usize) -> u64,
            ) {
                if $d == 64 {
                    E::mma_rs_m64n64k16(o, a, v(0));
                } else {
                    E::mma_rs_m64n128k16(o, a, v(0));
                }
            }
            #[inline(always)]
            fn rescale(o: &mut Self::O, alpha: [f32; 2]) {
                rescale(o, alpha);
            }
            #[inline(always)]
            fn store<E: Element, const PARTIAL: bool>(
                tile: &QueryTile,
                o: &Self::O,
                rows: [i32; 2],
                t: usize,
                inv: [f32; 2],
                lse: [f32; 2],
            ) {
                if $d == 64 {
                    let mut used = [0f32; 32];
                    used.copy_from_slice(&o[..32]);
                    tile.store_o::<E, PARTIAL, 32>(&used, rows, t, inv, 0);
                } else {
                    tile.store_o::<E, PARTIAL, 64>(o, rows, t, inv, 0);
                }
                tile.store_lse(rows, t, lse);
            }
        }
    };
}

narrow_shape!(64);
narrow_shape!(128);

/// D = 256: 48-key blocks (S 24 registers, three k-steps of P), O as two 64 x 128 halves.
impl<const A: bool> WsShape for HeadDim<256, A> {
    const ALIBI: bool = A;
    const D: usize = 256;
    const Q_IN_REGISTERS: bool = true;
    type O = [[f32; 64]; 2];
    score_tiles!(24, 3, mma_ss_m64n48k16, fence_accumulators_24, true);

    #[inline(always)]
    fn mma_qk_rs_step<E: WgmmaElement>(s: &mut Self::S, a: &[u32; 4], b: u64) {
        E::mma_rs_kmajor_m64n48k16(s, a, b);
    }

    #[inline(always)]
    fn zero_o() -> Self::O {
        [[0.0; 64]; 2]
    }
    #[inline(always)]
    fn fence_o(o: &mut Self::O) {
        fence_accumulators_64(&mut o[0]);
        fence_accumulators_64(&mut o[1]);
    }
    #[inline(always)]
    fn mma_pv_step<E: WgmmaElement>(o: &mut Self::O, a: &[u32; 4], v: impl Fn(usize) -> u64) {
        E::mma_rs_m64n128k16(&mut o[0], a, v(0));
        E::mma_rs_m64n128k16(&mut o[1], a, v(1));
    }
    #[inline(always)]
    fn rescale(o: &mut Self::O, alpha: [f32; 2]) {
        rescale(&mut o[0], alpha);
        rescale(&mut o[1], alpha);
    }
    #[inline(always)]
    fn store<E: Element, const PARTIAL: bool>(
        tile: &QueryTile,
        o: &Self::O,
        rows: [i32; 2],
        t: usize,
        inv: [f32; 2],
        lse: [f32; 2],
    ) {
        tile.store_o::<E, PARTIAL, 64>(&o[0], rows, t, inv, 0);
        tile.store_o::<E, PARTIAL, 64>(&o[1], rows, t, inv, 128);
        tile.store_lse(rows, t, lse);
    }
}
