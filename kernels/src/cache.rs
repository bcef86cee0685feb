//! DuoAttention KV cache maintenance: append new K/V rows to the retrieval (full) and streaming
//! (ring) caches, and gather a streaming head's cached context for a prefill chunk. Plain 16-byte
//! copies, one per thread; the element type does not matter.
use crate::abi::{CacheParams, KvSource};
use crate::device::{
    atom_add_u32, block_idx_x, block_idx_y, enter_dependent_grid, fence_acq_rel_gpu, grid_dim_x,
    ld_global_nc_u32, ld_global_nc_v4, ld_global_u32, ld_shared_u32, shared_memory_base,
    st_global_u32, st_global_v4, st_shared_u32, sync_threads, thread_idx_x,
};
use crate::heads::kind_and_rank;
use crate::mask::div_or_zero;
use crate::mma::{Bf16, F16};
use crate::ring::{history, slot_of};
use crate::rotary::turn_words;

/// Threads per block of the cache kernels.
pub const CACHE_THREADS: u32 = 256;

/// Byte address of 16-byte chunk `chunk` of row `(batch, pos, head)`.
#[inline(always)]
fn chunk_addr(base: u64, strides: &[i64; 3], batch: i64, pos: i32, head: i32, chunk: i32) -> u64 {
    base + ((batch * strides[0]
        + pos as i64 * strides[1]
        + head as i64 * strides[2]
        + 8 * chunk as i64)
        * 2) as u64
}

/// Copies chunk `chunk` of K and V row `(pos, head, batch)` of `src` to row `(pos, head, batch)`
/// of `dst` (the batch coordinate of a paged full cache is the page), the K chunk read by
/// `load_k` from its address (the append's RoPE turns it there).
#[inline(always)]
unsafe fn copy_kv(
    src: &KvSource,
    (src_pos, src_head, src_batch): (i32, i32, i64),
    dst: &KvSource,
    (dst_pos, dst_head, dst_batch): (i32, i32, i64),
    chunk: i32,
    load_k: impl FnOnce(u64) -> [u32; 4],
) {
    let from = |base: u64, strides: &[i64; 3]| {
        chunk_addr(base, strides, src_batch, src_pos, src_head, chunk)
    };
    let to = |base: u64, strides: &[i64; 3]| {
        chunk_addr(base, strides, dst_batch, dst_pos, dst_head, chunk)
    };
    unsafe {
        let k = load_k(from(src.k, &src.k_strides));
        let v = ld_global_nc_v4(from(src.v, &src.v_strides));
        st_global_v4(to(dst.k, &dst.k_strides), k);
        st_global_v4(to(dst.v, &dst.v_strides), v);
    }
}

/// This thread's `(row, kv head, chunk)` of a `rows x heads x D/8` grid, or None past the end.
#[inline(always)]
fn thread_item(rows: i32, p: &CacheParams) -> Option<(i32, i32, i32)> {
    let chunks = p.head_dim / 8;
    let lin = (block_idx_x() * CACHE_THREADS + thread_idx_x()) as i32;
    let per_row = p.heads_kv * chunks;
    let row = div_or_zero(lin, per_row);
    if row >= rows {
        return None;
    }
    let in_row = lin - row * per_row;
    let head = div_or_zero(in_row, chunks);
    Some((row, head, in_row - head * chunks))
}

/// Sequence `batch`'s new rows: their count and the first one's row in `new` (packed by
/// `cu_new`, else `n_new` rows of its batch entry).
#[inline(always)]
fn new_rows(p: &CacheParams, batch: i64) -> (i32, i32) {
    if p.cu_new == 0 {
        return (p.n_new, 0);
    }
    let at = |i: i64| unsafe { ld_global_nc_u32(p.cu_new + 4 * i as u64) } as i32;
    let first = at(batch);
    (at(batch + 1) - first, first)
}

#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn duo_cache_append(p: CacheParams) {
    enter_dependent_grid();
    let batch = block_idx_y() as i64;
    let lens = p.lens + 4 * batch as u64;
    let start = if p.lens != 0 {
        unsafe { read_start(&p, lens) }
    } else {
        p.start
    };
    let (n_new, first) = new_rows(&p, batch);
    // A ragged prefill (`pad_block` > 1) loads the full cache's rows after the new ones up to its
    // last KV block's end (masked): they are zeroed here, whatever a slot's last request left.
    let rows = round_up(start + n_new, p.pad_block) - start;
    if let Some((row, head, chunk)) = thread_item(rows, &p) {
        if row < n_new {
            unsafe { append_row(&p, (start, n_new, first), row, head, chunk, batch) };
        } else {
            unsafe { zero_full_row(&p, start + row, head, chunk, batch) };
        }
    }
    if p.lens != 0 && p.arrivals != 0 && thread_idx_x() == 0 {
        // The last block of the sequence to count itself advances its length: every block read
        // it before its count (the fence in `read_start`), and the fence below puts the write
        // after all of those counts. Later kernels on the stream see the new length.
        let arrivals = p.arrivals + 4 * batch as u64;
        if unsafe { atom_add_u32(arrivals, 1) } == grid_dim_x() - 1 {
            fence_acq_rel_gpu();
            let end = start.saturating_add(n_new).min(p.capacity);
            unsafe {
                st_global_u32(lens, end as u32);
                st_global_u32(arrivals, 0);
            }
        }
    }
}

/// The sequence's cached length (`lens[b]`, clamped into `0..=capacity`), read by thread 0 and
/// shared with the block. Thread 0's fence orders the read before its later count in
/// `arrivals`; it waits on that one load only (no copy has been issued yet).
#[inline(always)]
unsafe fn read_start(p: &CacheParams, lens: u64) -> i32 {
    let shared = shared_memory_base::<16>();
    if thread_idx_x() == 0 {
        let len = unsafe { ld_global_u32(lens) } as i32;
        let start = if len < 0 { 0 } else { len.min(p.capacity) };
        fence_acq_rel_gpu();
        unsafe { st_shared_u32(shared, start as u32) };
    }
    sync_threads();
    unsafe { ld_shared_u32(shared) as i32 }
}

/// `x` rounded up to a multiple of `block` (`block` <= 1: `x`).
#[inline(always)]
fn round_up(x: i32, block: i32) -> i32 {
    if block <= 1 {
        return x;
    }
    x + block - 1 - (x + block - 1) % block
}

/// Zeroes chunk `(pos, head, chunk)` of K and V in `dst`.
#[inline(always)]
unsafe fn zero_kv(dst: &KvSource, pos: i32, head: i32, batch: i64, chunk: i32) {
    unsafe {
        st_global_v4(
            chunk_addr(dst.k, &dst.k_strides, batch, pos, head, chunk),
            [0; 4],
        );
        st_global_v4(
            chunk_addr(dst.v, &dst.v_strides, batch, pos, head, chunk),
            [0; 4],
        );
    }
}

/// Where position `pos` of sequence `batch` lies in the full cache: `(batch, row)` of `full`, or
/// of its pool of pages `(page, row in the page)` when the cache is paged; None for a position
/// at or past `capacity`, or whose page the sequence has not been given.
#[inline(always)]
fn full_row(p: &CacheParams, pos: i32, batch: i64) -> Option<(i64, i32)> {
    if pos >= p.capacity {
        return None;
    }
    if p.block_table == 0 {
        return Some((batch, pos));
    }
    let entry = batch * p.block_table_stride as i64 + (pos >> p.page_shift) as i64;
    let page = unsafe { ld_global_nc_u32(p.block_table + 4 * entry as u64) } as i32;
    if page < 0 || page >= p.num_pages {
        return None;
    }
    Some((page as i64, pos & ((1 << p.page_shift) - 1)))
}

/// Zeroes position `pos` of `head`'s full cache (retrieval heads, below `capacity`).
#[inline(always)]
unsafe fn zero_full_row(p: &CacheParams, pos: i32, head: i32, chunk: i32, batch: i64) {
    let (streaming, rank) = kind_and_rank(&p.streaming_heads, head as usize);
    if streaming {
        return;
    }
    if let Some((at, row)) = full_row(p, pos, batch) {
        unsafe { zero_kv(&p.full, row, rank, at, chunk) };
    }
}

/// Copies new row `row` (position `start + row`; row `first + row` of `new`) of `head` to its
/// cache: the full cache below `capacity` (retrieval heads) or its ring slot (streaming heads).
#[inline(always)]
unsafe fn append_row(
    p: &CacheParams,
    (start, n_new, first): (i32, i32, i32),
    row: i32,
    head: i32,
    chunk: i32,
    batch: i64,
) {
    let (streaming, rank) = kind_and_rank(&p.streaming_heads, head as usize);
    let pos = start + row;
    let src = first + row;
    // RoPE (`CacheParams::rotary`): the key turns at its position, its pairs' other elements
    // read from the same new row.
    let turn = |_: u64| {
        let load = |col: i32| unsafe {
            let at = chunk_addr(p.new.k, &p.new.k_strides, batch, src, head, col / 8);
            ld_global_nc_v4(at)
        };
        let (t, col) = (&p.rotary, 8 * chunk);
        unsafe {
            if t.f16 != 0 {
                turn_words::<F16, 4>(t, pos, col, load)
            } else {
                turn_words::<Bf16, 4>(t, pos, col, load)
            }
        }
    };
    if !streaming {
        if let Some((at, row)) = full_row(p, pos, batch) {
            let to = (row, rank, at);
            unsafe { copy_kv(&p.new, (src, head, batch), &p.full, to, chunk, turn) };
        }
        return;
    }
    // A recent position survives this call only if no later new row maps to its slot.
    let end = start + n_new;
    if pos >= p.sink && pos < end - p.recent {
        return;
    }
    let to = (slot_of(pos, p.sink, p.recent), rank, batch);
    unsafe { copy_kv(&p.new, (src, head, batch), &p.stream, to, chunk, turn) };
}

#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn duo_cache_gather_stream(p: CacheParams) {
    enter_dependent_grid();
    let batch = block_idx_y() as i64;
    let start = if p.starts != 0 {
        unsafe { ld_global_nc_u32(p.starts + 4 * batch as u64) as i32 }
    } else {
        p.start
    };
    let (n_new, first) = new_rows(&p, batch);
    let (sink_rows, recent_rows, lo) = history(start, p.sink, p.recent);
    let n_hist = sink_rows + recent_rows;
    let rows = if p.out_rows > 0 {
        p.out_rows
    } else {
        n_hist + n_new
    };
    let Some((row, head, chunk)) = thread_item(rows, &p) else {
        return;
    };
    let (streaming, rank) = kind_and_rank(&p.streaming_heads, head as usize);
    if !streaming {
        return;
    }
    unsafe {
        if row >= n_hist + n_new {
            // Only the rows the last KV block loads.
            if row >= round_up(n_hist + n_new, p.pad_block) {
                return;
            }
            zero_kv(&p.out, row, rank, batch, chunk);
        } else if row >= n_hist {
            let new_row = (first + row - n_hist, head, batch);
            copy_kv(&p.new, new_row, &p.out, (row, rank, batch), chunk, |a| {
                ld_global_nc_v4(a)
            });
        } else {
            let pos = if row < sink_rows {
                row
            } else {
                lo + row - sink_rows
            };
            let from = (slot_of(pos, p.sink, p.recent), rank, batch);
            copy_kv(&p.stream, from, &p.out, (row, rank, batch), chunk, |a| {
                ld_global_nc_v4(a)
            });
        }
    }
}
