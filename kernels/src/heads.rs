//! Head kinds in launch parameters: the streaming-head bitmask, a head's kind and rank among
//! its kind, the inverse, and where a decode block sits in its one-dimensional grid. Pure integer
//! arithmetic, shared by the kernels and the host's tests.
use crate::abi::{DecodeParams, FastDiv, HEAD_MASK_WORDS};

/// Is KV head `head` a streaming head, and its rank among the KV heads of its kind. The mask words
/// are read with constant indices so the parameter array is never copied to local memory.
#[inline(always)]
pub fn kind_and_rank(mask: &[u32; HEAD_MASK_WORDS], head: usize) -> (bool, i32) {
    let mut streaming = false;
    let mut streaming_below = 0u32;
    for (w, &bits) in mask.iter().enumerate() {
        if w < head / 32 {
            streaming_below += bits.count_ones();
        } else if w == head / 32 {
            streaming = (bits >> (head % 32)) & 1 != 0;
            streaming_below += (bits & ((1u32 << (head % 32)) - 1)).count_ones();
        }
    }
    let rank = if streaming {
        streaming_below
    } else {
        head as u32 - streaming_below
    };
    (streaming, rank as i32)
}

/// How many KV heads the mask marks streaming.
#[inline(always)]
pub fn streaming_count(mask: &[u32; HEAD_MASK_WORDS]) -> i32 {
    mask.iter().map(|bits| bits.count_ones()).sum::<u32>() as i32
}

/// The KV head that is the `rank`-th of its kind (streaming or not), counting from head 0: the
/// inverse of `kind_and_rank`. `rank` must be below the kind's head count (retrieval heads past
/// the layer's last KV head are never reached). Branch-free: the word by running counts, then the
/// bit by halving (a loop over bits unrolled into thousands of instructions per entry).
#[inline(always)]
pub fn head_of_rank(mask: &[u32; HEAD_MASK_WORDS], streaming: bool, rank: i32) -> i32 {
    let flip = if streaming { 0 } else { u32::MAX };
    let (mut word, mut bits, mut left) = (0u32, 0u32, rank as u32);
    let mut before = 0u32; // heads of the kind in the words below `w`
    for (w, &m) in mask.iter().enumerate() {
        let kind = m ^ flip;
        let here = kind.count_ones();
        let inside = rank as u32 >= before && (rank as u32) < before + here;
        word = if inside { w as u32 } else { word };
        bits = if inside { kind } else { bits };
        left = if inside { rank as u32 - before } else { left };
        before += here;
    }
    // The `left`-th set bit of `bits`: halve the window while the lower half holds fewer.
    let mut pos = 0u32;
    for width in [16u32, 8, 4, 2, 1] {
        let low = ((bits >> pos) & ((1u32 << width) - 1)).count_ones();
        let up = left >= low;
        left = if up { left - low } else { left };
        pos = if up { pos + width } else { pos };
    }
    (word * 32 + pos) as i32
}

/// Which (kind, batch entry, rank among the kind's KV heads, row chunk, split) block `x` of the
/// one-dimensional grid serves: every retrieval block comes before any streaming block, so the
/// long blocks start first, and a streaming head has only the splits its few tiles fill
/// (`stream_splits`): no block is launched without tiles to walk.
pub struct DecodeBlock {
    /// The block serves a streaming head.
    pub streaming: bool,
    /// The head's rank among the KV heads of its kind.
    pub rank: i32,
    /// The KV head.
    pub kv_head: i32,
    /// The chunk of `DECODE_ROWS` query rows of the head's group.
    pub chunk: i32,
    /// The batch entry.
    pub batch: i64,
    /// The split of the head's tiles.
    pub split: i32,
    /// Splits of this block's head.
    pub splits: i32,
}

impl DecodeBlock {
    /// Block `x` of a launch with `row_chunks` row chunks per KV head.
    #[inline(always)]
    pub fn of(p: &DecodeParams, x: i32, row_chunks: i32) -> Self {
        let stream_heads = streaming_count(&p.streaming_heads);
        let retrieval_blocks = p.batch * (p.heads_kv - stream_heads) * row_chunks * p.splits;
        let streaming = x >= retrieval_blocks;
        let (at, splits, kind_heads) = if streaming {
            (x - retrieval_blocks, p.stream_splits, stream_heads)
        } else {
            (x, p.splits, p.heads_kv - stream_heads)
        };
        // Constant indices into the divisor pairs (a dynamic one copies them to local memory).
        let pick = |pair: &[FastDiv; 2]| if streaming { pair[1] } else { pair[0] };
        let column = pick(&p.split_divs).quotient(at as u32) as i32;
        let split = at - column * splits;
        let col = p.row_chunks_div.quotient(column as u32) as i32;
        let chunk = column - col * row_chunks;
        let batch = pick(&p.kind_heads_divs).quotient(col as u32) as i32;
        let rank = col - batch * kind_heads;
        // A layer of one kind needs no search for its heads.
        let kv_head = if stream_heads == 0 || stream_heads == p.heads_kv {
            rank
        } else {
            head_of_rank(&p.streaming_heads, streaming, rank)
        };
        DecodeBlock {
            streaming,
            rank,
            kv_head,
            chunk,
            batch: batch as i64,
            split,
            splits,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::HashSet;
    use std::vec::Vec;

    fn mask_of(streaming: &[bool]) -> [u32; HEAD_MASK_WORDS] {
        let mut mask = [0u32; HEAD_MASK_WORDS];
        for (h, &s) in streaming.iter().enumerate() {
            if s {
                mask[h / 32] |= 1 << (h % 32);
            }
        }
        mask
    }

    /// Kinds from a small xorshift, so that every word boundary is crossed.
    fn kinds(heads: usize, seed: u32) -> Vec<bool> {
        let mut x = seed | 1;
        (0..heads)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.is_multiple_of(3)
            })
            .collect()
    }

    #[test]
    fn head_of_rank_inverts_kind_and_rank() {
        for (heads, seed) in [(1, 1), (8, 7), (33, 3), (64, 11), (200, 5), (256, 9)] {
            let kinds = kinds(heads, seed);
            let mask = mask_of(&kinds);
            assert_eq!(
                streaming_count(&mask) as usize,
                kinds.iter().filter(|&&s| s).count()
            );
            for (h, &kind) in kinds.iter().enumerate() {
                let (streaming, rank) = kind_and_rank(&mask, h);
                assert_eq!(streaming, kind);
                assert_eq!(head_of_rank(&mask, streaming, rank), h as i32, "head {h}");
            }
        }
    }

    /// Every (batch entry, KV head, row chunk, split of that head's kind) is one block, retrieval
    /// blocks first.
    #[test]
    fn decode_blocks_cover_every_head_split_once() {
        for (heads, batch, chunks, splits, stream_splits) in [
            (8, 4, 1, 15, 1),
            (8, 3, 2, 4, 2),
            (33, 2, 1, 3, 1),
            (5, 1, 3, 1, 4),
        ] {
            let kinds = kinds(heads, heads as u32 * 7 + 1);
            let stream = kinds.iter().filter(|&&s| s).count() as i32;
            let p = DecodeParams {
                streaming_heads: mask_of(&kinds),
                heads_kv: heads as i32,
                batch,
                splits,
                stream_splits,
                split_divs: [
                    FastDiv::new(splits as u32),
                    FastDiv::new(stream_splits as u32),
                ],
                row_chunks_div: FastDiv::new(chunks as u32),
                kind_heads_divs: [
                    FastDiv::new((heads as i32 - stream) as u32),
                    FastDiv::new(stream as u32),
                ],
                ..Default::default()
            };
            let blocks =
                batch * chunks * ((heads as i32 - stream) * splits + stream * stream_splits);
            let mut seen = HashSet::new();
            let mut streaming_seen = false;
            for x in 0..blocks {
                let b = DecodeBlock::of(&p, x, chunks);
                assert_eq!(b.streaming, kinds[b.kv_head as usize]);
                assert!(
                    !streaming_seen || b.streaming,
                    "retrieval blocks come first"
                );
                streaming_seen |= b.streaming;
                let want = if b.streaming { stream_splits } else { splits };
                assert_eq!(b.splits, want);
                assert!(b.split < want && b.chunk < chunks && b.batch < batch as i64);
                assert_eq!(
                    kind_and_rank(&p.streaming_heads, b.kv_head as usize).1,
                    b.rank
                );
                assert!(seen.insert((b.batch, b.kv_head, b.chunk, b.split)));
            }
            assert_eq!(seen.len(), blocks as usize);
        }
    }
}
