//! Rotary position embeddings (RoPE) on rows of Q or K, in place or into another tensor: the
//! work of FlashAttention's `apply_rotary_emb`. Memory-bound: each thread turns one 16-byte chunk
//! of a head row (interleaved pairs) or two chunks half a rotary dim apart (the other layout) in
//! f32, with the table's cosines and sines at the row's position.
use crate::abi::{ROTARY_THREADS, RotaryParams, RotaryTable, decode_turns_q};
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

/// `N` f32 of a table from index `at` on: 16-byte loads when `N` is a multiple of 4 (`at` is
/// then too), else one by one.
#[inline(always)]
unsafe fn table_n<const N: usize>(base: u64, at: i64) -> [f32; N] {
    let addr = |i: usize| base + (4 * (at + i as i64)) as u64;
    let mut v = [0f32; N];
    if N.is_multiple_of(4) {
        for i in (0..N).step_by(4) {
            let q = unsafe { ld_global_nc_v4(addr(i)) };
            v[i..i + 4].copy_from_slice(&q.map(f32::from_bits));
        }
    } else {
        for (i, e) in v.iter_mut().enumerate() {
            *e = f32::from_bits(unsafe { ld_global_nc_u32(addr(i)) });
        }
    }
    v
}

/// The table column (pair index) of element `col` of a head row (`col` even): interleaved,
/// element `col` is in pair `col / 2`; otherwise elements below `half` are the first of pair
/// `col` and the others the second of pair `col - half`.
#[inline(always)]
fn first_pair(col: i32, half: i32, interleaved: bool) -> i32 {
    if interleaved {
        col / 2
    } else if col < half {
        col
    } else {
        col - half
    }
}

/// `N` 32-bit words of a head row (its elements `col .. col + 2N`, `col` even), loaded by
/// `load(col)` and turned by `t` at position `pos`, in f32, as `duo_rotary` turns them: for the
/// kernels that fuse the rotation into their loads (the decode's Q, the appended K rows). As
/// loaded with no table (`t.cos == 0`), past the rotary dim, or at a position outside the table.
/// Without interleaving the pairs' other elements lie half a rotary dim away, and `load` brings
/// them too (the rotary dim is a multiple of 16, so `col .. col + 2N` never straddles a half
/// when `2N` divides 16). Every load is issued before any is used, without branches between
/// them, so the rotation adds no round trip to memory: words that do not turn read the table's
/// first entries and keep their own values.
#[inline(always)]
pub(crate) unsafe fn turn_words<E: Element, const N: usize>(
    t: &RotaryTable,
    pos: i32,
    col: i32,
    load: impl Fn(i32) -> [u32; N],
) -> [u32; N] {
    if t.cos == 0 {
        return load(col);
    }
    let (half, interleaved) = (t.half, t.interleaved != 0);
    let turns = col < 2 * half && pos >= 0 && pos < t.rows;
    let first = col < half;
    let pair = first_pair(col, half, interleaved);
    let j = if turns {
        pos as i64 * half as i64 + pair as i64
    } else {
        0
    };
    let other_col = if interleaved || !turns {
        col
    } else if first {
        col + half
    } else {
        col - half
    };
    let x = load(col);
    let other = load(other_col);
    // Interleaved: N pairs (read twice: nothing past them); else 2N, the first N then the next.
    let j2 = if interleaved { j } else { j + N as i64 };
    let (c, s) = unsafe {
        (
            [table_n::<N>(t.cos, j), table_n::<N>(t.cos, j2)],
            [table_n::<N>(t.sin, j), table_n::<N>(t.sin, j2)],
        )
    };
    if !turns {
        return x;
    }
    core::array::from_fn(|k| {
        let [x1, x2] = E::unpack(x[k]);
        if interleaved {
            let (y1, y2) = turn(x1, x2, c[0][k], s[0][k]);
            return E::pack(y1, y2);
        }
        let [o1, o2] = E::unpack(other[k]);
        let y = |x: f32, o: f32, e: usize| {
            let (c, s) = (c[e / N][e % N], s[e / N][e % N]);
            if first {
                turn(x, o, c, s).0
            } else {
                turn(o, x, c, s).1
            }
        };
        E::pack(y(x1, o1, 2 * k), y(x2, o2, 2 * k + 1))
    })
}

/// Whether the decode turns Q rows held in registers (head dims up to 128) by table `t`
/// ([`decode_turns_q`]): interleaved pairs lie in one word of a thread's A fragments, and the
/// halves of the whole head dim in words `KQ / 2` k-steps apart.
#[inline(always)]
pub(crate) fn fragments_turn(t: &RotaryTable, head_dim: usize) -> bool {
    t.cos != 0 && decode_turns_q(head_dim, t.half as usize, t.interleaved != 0)
}

/// Turns query row `r` (0: rows g, 1: rows g + 8) of a thread's `mma.m16n8k16` A fragments
/// `qa` at position `pos` by `t` ([`fragments_turn`] holds): word `qa[kk][r]` holds elements
/// `16 kk + 2 lane_t ..`, `qa[kk][r + 2]` elements 8 later. One form for both pairings, without
/// branches on the table: each element becomes `x c + o s'` with `o` its pair's other element
/// (the other half of its word, or the same word KQ / 2 k-steps away) and `s'` the sine signed
/// by its place in the pair; the products match `duo_rotary`'s bit for bit.
#[inline(always)]
pub(crate) unsafe fn turn_fragments<E: Element, const KQ: usize>(
    t: &RotaryTable,
    pos: i32,
    lane_t: usize,
    r: usize,
    qa: &mut [[u32; 4]; KQ],
) {
    let (half, interleaved) = (t.half, t.interleaved != 0);
    // Out of the table: every word reads the table's first entries and keeps its value.
    let inside = pos >= 0 && pos < t.rows;
    let row = if inside { pos as i64 * half as i64 } else { 0 };
    let q = *qa;
    for kk in 0..KQ {
        for (w, off) in [(r, 0), (r + 2, 8)] {
            let col = (16 * kk + 2 * lane_t + off) as i32;
            // Past an interleaved table's rotary dim the word stays.
            let turns = inside && col < 2 * half;
            let first = col < half;
            let other = if interleaved {
                q[kk][w].rotate_left(16)
            } else {
                q[(kk + KQ / 2) % KQ][w]
            };
            // Table entries of the word's two elements: one pair interleaved, two consecutive
            // pairs otherwise.
            let pair = first_pair(col, half, interleaved);
            let j = if turns { row + pair as i64 } else { 0 };
            let j2 = if interleaved { j } else { j + 1 };
            let entry = |base: u64, at: i64| {
                f32::from_bits(unsafe { ld_global_nc_u32(base + (4 * at) as u64) })
            };
            let (c1, c2) = (entry(t.cos, j), entry(t.cos, j2));
            let (s1, s2) = (entry(t.sin, j), entry(t.sin, j2));
            let (s1, s2) = if interleaved {
                (-s1, s2)
            } else if first {
                (-s1, -s2)
            } else {
                (s1, s2)
            };
            let ([x1, x2], [o1, o2]) = (E::unpack(q[kk][w]), E::unpack(other));
            let y = E::pack(fma_f32(x1, c1, o1 * s1), fma_f32(x2, c2, o2 * s2));
            qa[kk][w] = if turns { y } else { q[kk][w] };
        }
    }
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
    let first = p.offset as i64
        + if p.offsets != 0 {
            unsafe { ld_global_nc_u32(p.offsets + 4 * batch as u64) as i32 as i64 }
        } else {
            0
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
