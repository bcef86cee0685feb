//! Rotary position embeddings (RoPE) on rows of Q or K, in place or into another tensor: the
//! work of FlashAttention's `apply_rotary_emb`. Memory-bound: each thread turns one 16-byte chunk
//! of a head row (interleaved pairs) or two chunks half a rotary dim apart (the other layout) in
//! f32, with the table's cosines and sines at the row's position.
use crate::abi::{ROTARY_THREADS, RotaryParams};
use crate::device::{
    block_idx_x, enter_dependent_grid, fma_f32, ld_global_nc_u32, ld_global_nc_v4, ld_global_v4,
    st_global_v4, thread_idx_x,
};
use crate::mask::div_or_zero;
use crate::mma::{Bf16, Element, F16};

/// Sequence `b` of launch row `r` and the row's index `s` within it, or None when a varlen
/// row lies outside every sequence (prefix sums that do not cover it). Whatever the device
/// arrays hold, `0 <= b < batch` and `s >= 0`.
#[inline(always)]
fn locate(p: &RotaryParams, r: i32) -> Option<(i32, i32)> {
    if p.cu_seqlens == 0 {
        let b = div_or_zero(r, p.seqlen);
        return Some((b, r - b * p.seqlen));
    }
    let cu = |i: i32| unsafe { ld_global_nc_u32(p.cu_seqlens + 4 * i as u64) } as i32;
    // The last sequence that starts at or before `r`, by bisection: cu[lo] <= r < cu[hi].
    let (mut lo, mut hi) = (0, p.batch);
    if cu(lo) > r || cu(hi) <= r {
        return None;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if cu(mid) <= r {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some((lo, r - cu(lo)))
}

/// Four f32 of a table at element `at` (16-byte aligned).
#[inline(always)]
unsafe fn table4(base: u64, at: i64) -> [f32; 4] {
    unsafe { ld_global_nc_v4(base + (4 * at) as u64) }.map(f32::from_bits)
}

/// `(x1, x2)` turned by the angle of cosine `c` and sine `s`.
#[inline(always)]
fn turn(x1: f32, x2: f32, c: f32, s: f32) -> (f32, f32) {
    (fma_f32(x1, c, -(x2 * s)), fma_f32(x2, c, x1 * s))
}

#[inline(always)]
unsafe fn rotary<E: Element>(p: &RotaryParams) {
    enter_dependent_grid();
    let t = &p.table;
    let half = t.half;
    let interleaved = t.interleaved != 0;
    let rotated = if interleaved { half / 4 } else { half / 8 };
    let rest = if p.copy_rest != 0 {
        (p.head_dim - 2 * half) / 8
    } else {
        0
    };
    let items = rotated + rest;
    let lin = (block_idx_x() * ROTARY_THREADS + thread_idx_x()) as i32;
    let per_row = p.heads * items;
    let row = div_or_zero(lin, per_row);
    if per_row <= 0 || row >= p.rows {
        return;
    }
    let in_row = lin - row * per_row;
    let head = div_or_zero(in_row, items);
    let item = in_row - head * items;
    let seq = locate(p, row);
    let (batch, s) = seq.unwrap_or((0, 0));
    // Varlen tensors are [total, H, D]: the launch row is the tensor row (batch stride 0).
    let tensor_row = if p.cu_seqlens != 0 { row } else { s };
    let at = |base: u64, st: &[i64; 3], chunk: i32| {
        base + ((batch as i64 * st[0]
            + tensor_row as i64 * st[1]
            + head as i64 * st[2]
            + 8 * chunk as i64)
            * 2) as u64
    };
    let first = if p.offsets != 0 {
        unsafe { ld_global_nc_u32(p.offsets + 4 * batch as u64) as i32 as i64 }
    } else {
        p.offset as i64
    };
    let pos = first + s as i64;
    let turns = seq.is_some() && pos >= 0 && pos < t.rows as i64;
    let copy = |chunk: i32| unsafe {
        let x = ld_global_v4(at(p.src, &p.src_strides, chunk));
        st_global_v4(at(p.dst, &p.dst_strides, chunk), x);
    };
    if item >= rotated {
        copy(2 * half / 8 + item - rotated);
        return;
    }
    if !turns {
        // Unrotated: copied out of place, left as it is in place.
        if p.dst != p.src {
            copy(item);
            if !interleaved {
                copy(item + half / 8);
            }
        }
        return;
    }
    let row_at = pos * half as i64;
    if interleaved {
        // Chunk `item` holds pairs 4 item .. 4 item + 4, one per 32-bit word.
        let x = unsafe { ld_global_v4(at(p.src, &p.src_strides, item)) };
        let j = row_at + 4 * item as i64;
        let (c, sn) = unsafe { (table4(t.cos, j), table4(t.sin, j)) };
        let y: [u32; 4] = core::array::from_fn(|k| {
            let [x1, x2] = E::unpack(x[k]);
            let (y1, y2) = turn(x1, x2, c[k], sn[k]);
            E::pack(y1, y2)
        });
        unsafe { st_global_v4(at(p.dst, &p.dst_strides, item), y) };
    } else {
        // Chunk `item` holds the first elements of pairs 8 item .. 8 item + 8, chunk
        // `item + half / 8` their second elements.
        let second = item + half / 8;
        let (a, b) = unsafe {
            (
                ld_global_v4(at(p.src, &p.src_strides, item)),
                ld_global_v4(at(p.src, &p.src_strides, second)),
            )
        };
        let j = row_at + 8 * item as i64;
        let (c, sn) = unsafe {
            (
                [table4(t.cos, j), table4(t.cos, j + 4)],
                [table4(t.sin, j), table4(t.sin, j + 4)],
            )
        };
        let mut ya = [0u32; 4];
        let mut yb = [0u32; 4];
        for k in 0..4 {
            let [a1, a2] = E::unpack(a[k]);
            let [b1, b2] = E::unpack(b[k]);
            let (e1, e2) = (2 * k, 2 * k + 1);
            let (c1, s1) = (c[e1 / 4][e1 % 4], sn[e1 / 4][e1 % 4]);
            let (c2, s2) = (c[e2 / 4][e2 % 4], sn[e2 / 4][e2 % 4]);
            let (ya1, yb1) = turn(a1, b1, c1, s1);
            let (ya2, yb2) = turn(a2, b2, c2, s2);
            ya[k] = E::pack(ya1, ya2);
            yb[k] = E::pack(yb1, yb2);
        }
        unsafe {
            st_global_v4(at(p.dst, &p.dst_strides, item), ya);
            st_global_v4(at(p.dst, &p.dst_strides, second), yb);
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn duo_rotary_bf16(p: RotaryParams) {
    unsafe { rotary::<Bf16>(&p) }
}

#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn duo_rotary_f16(p: RotaryParams) {
    unsafe { rotary::<F16>(&p) }
}
