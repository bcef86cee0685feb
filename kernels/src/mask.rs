//! Which keys a query sees, per head kind, at three granularities: one (query, key) pair, a whole
//! KV block (fully visible, so no element mask is needed), and the KV block ranges a query tile visits.
//! Pure integer arithmetic, shared by the kernels and tested on the CPU against the reference mask.
//!
//! Positions are bottom-right aligned: query row `i` sits at position `seqlen_k - seqlen_q + i`.
//! Callers keep every sequence length and the sink/window values at or under `abi::MAX_SEQLEN`,
//! so all differences below fit in `i32`.

/// `a / b` without a panic path (the host guarantees `b > 0`; 0 keeps the kernel total).
#[inline(always)]
pub fn div_or_zero(a: i32, b: i32) -> i32 {
    match core::num::NonZeroU32::new(b as u32) {
        Some(b) => (a as u32 / b) as i32,
        None => 0,
    }
}

/// The mask of one head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadMask {
    /// A streaming head (sink and window) rather than a retrieval head.
    pub streaming: bool,
    /// Retrieval heads only: causal or full.
    pub causal: bool,
    /// Streaming heads: keys `< sink` are visible to every query at or after them.
    pub sink: i32,
    /// Streaming heads: keys with `q_pos - k < window` are visible.
    pub window: i32,
    /// Keys of the sequence.
    pub seqlen_k: i32,
    /// Causal retrieval heads and streaming heads: keys up to `q_pos + right` are visible
    /// (FlashAttention's `window_size[1]`; 0 is causal). `0..MAX_SEQLEN`, so sums stay in `i32`.
    pub right: i32,
}

/// The keys one query row sees, as bounds that test branch-free: key `k` is visible when
/// `k <= last` and `k` is outside the hidden gap `gap_start..=gap_end` (a streaming head's keys
/// between its sink and its window; empty for retrieval heads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowBounds {
    /// The last visible key.
    pub last: i32,
    /// The first hidden key of the gap.
    pub gap_start: i32,
    /// The last hidden key of the gap.
    pub gap_end: i32,
}

impl RowBounds {
    /// For keys `k >= 0`. Bitwise `&`/`|` so the compiler emits selects, not branches.
    #[inline(always)]
    pub fn visible(&self, k: i32) -> bool {
        (k <= self.last) & ((k < self.gap_start) | (k > self.gap_end))
    }
}

/// Half-open block index range `[start, end)`; empty when `start >= end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    /// First block.
    pub start: i32,
    /// One past the last block.
    pub end: i32,
}

impl BlockRange {
    /// No block.
    pub const EMPTY: BlockRange = BlockRange { start: 0, end: 0 };
    /// Blocks in the range (0 when empty).
    #[inline(always)]
    pub fn len(&self) -> i32 {
        if self.end > self.start {
            self.end - self.start
        } else {
            0
        }
    }
    /// Whether the range holds no block.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `i`-th tile of the ranges `[first, second]` (a decode walks its head's tiles in this
/// order, `per_split` of them per split).
#[inline(always)]
pub fn nth_tile([first, second]: &[BlockRange; 2], i: i32) -> i32 {
    if i < first.len() {
        first.start + i
    } else {
        second.start + i - first.len()
    }
}

/// The split that walks tile `tile` of the ranges `[first, second]` when each split walks
/// `per_split` of them in order ([`nth_tile`]); 0 for a tile no split walks. The decode's fused
/// append writes a new key through this split, its only reader.
#[inline(always)]
pub fn split_of_tile([first, second]: &[BlockRange; 2], tile: i32, per_split: i32) -> i32 {
    let nth = if tile >= first.start && tile < first.end {
        tile - first.start
    } else if tile >= second.start && tile < second.end {
        first.len() + tile - second.start
    } else {
        0
    };
    div_or_zero(nth, per_split)
}

#[inline(always)]
fn ceil_div(a: i32, b: i32) -> i32 {
    (a + b - 1) / b
}

impl HeadMask {
    /// Is key `k` (0-based) visible to the query at position `q_pos`?
    #[inline(always)]
    pub fn visible(&self, q_pos: i32, k: i32) -> bool {
        if k < 0 || k >= self.seqlen_k {
            return false;
        }
        let reach = q_pos + self.right;
        if self.streaming {
            k <= reach && (k < self.sink || q_pos - k < self.window)
        } else {
            !self.causal || k <= reach
        }
    }

    /// The bounds of the query at position `q_pos`: `row_bounds(q).visible(k) == visible(q, k)`
    /// for every key `k >= 0`.
    #[inline(always)]
    pub fn row_bounds(&self, q_pos: i32) -> RowBounds {
        let last_key = self.seqlen_k - 1;
        // One sum for both kinds: decode's code (right = 0) then stays what it was.
        let reach = q_pos + self.right;
        if self.streaming {
            // Hidden: sink <= k <= q_pos - window (k > q_pos - window is inside the window).
            RowBounds {
                last: min(last_key, reach),
                gap_start: self.sink,
                gap_end: q_pos - self.window,
            }
        } else {
            RowBounds {
                last: if self.causal {
                    min(last_key, reach)
                } else {
                    last_key
                },
                gap_start: i32::MAX,
                gap_end: i32::MIN,
            }
        }
    }

    /// The (at most two) KV block ranges that hold every key visible to some query at positions
    /// `q_lo..=q_hi`: for streaming heads the sink blocks, then the window blocks, nothing between.
    #[inline(always)]
    pub fn block_ranges(&self, q_lo: i32, q_hi: i32, block_n: i32) -> [BlockRange; 2] {
        // Keys more than `right` after the last query position are invisible to every head kind
        // but full retrieval.
        let reach = q_hi + self.right;
        let causal_end = if reach < 0 {
            0
        } else {
            min(self.seqlen_k, reach + 1)
        };
        if !self.streaming {
            let end = if self.causal {
                causal_end
            } else {
                self.seqlen_k
            };
            return [
                BlockRange {
                    start: 0,
                    end: ceil_div(end, block_n),
                },
                BlockRange::EMPTY,
            ];
        }
        let sink_end = min(self.sink, causal_end);
        let sink_blocks = ceil_div(sink_end, block_n);
        // Row `q` sees `q - window < k <= q + right` besides its sink: with both 0 no key.
        let window_start = if (self.window | self.right) == 0 {
            causal_end
        } else {
            max(0, q_lo - self.window + 1)
        };
        let window_blocks = BlockRange {
            start: max(window_start / block_n, sink_blocks),
            end: if window_start >= causal_end {
                0
            } else {
                ceil_div(causal_end, block_n)
            },
        };
        [
            BlockRange {
                start: 0,
                end: sink_blocks,
            },
            window_blocks,
        ]
    }

    /// The part of each of `block_ranges`' two ranges whose blocks every query at `q_lo..=q_hi`
    /// sees whole (`block_fully_visible`), so a kernel can run them in a loop without element-mask
    /// code. Conservative where exactness would split a range: the last sink block is counted
    /// partial when it reaches past the sink, even if the window covers it.
    #[inline(always)]
    pub fn full_block_ranges(&self, q_lo: i32, q_hi: i32, block_n: i32) -> [BlockRange; 2] {
        self.full_block_ranges_of(self.block_ranges(q_lo, q_hi, block_n), q_lo, q_hi, block_n)
    }

    /// `full_block_ranges` from `block_ranges(q_lo, q_hi, block_n)`, for a caller that has them.
    #[inline(always)]
    pub fn full_block_ranges_of(
        &self,
        ranges: [BlockRange; 2],
        q_lo: i32,
        q_hi: i32,
        block_n: i32,
    ) -> [BlockRange; 2] {
        // The last key every row sees, and the blocks that end at or before it.
        let common_last = if self.streaming || self.causal {
            min(q_lo + self.right, self.seqlen_k - 1)
        } else {
            self.seqlen_k - 1
        };
        let common_end = if common_last < 0 {
            0
        } else {
            (common_last + 1) / block_n
        };
        let clip = |r: BlockRange, start: i32, end: i32| BlockRange {
            start: max(r.start, start),
            end: min(r.end, end),
        };
        if !self.streaming {
            return [clip(ranges[0], 0, common_end), BlockRange::EMPTY];
        }
        // Sink blocks also lie wholly inside the sink; window blocks start inside the window of
        // the tile's last row (key >= q_hi - window + 1).
        let window_first = q_hi - self.window + 1;
        let window_start = if window_first <= 0 {
            0
        } else {
            ceil_div(window_first, block_n)
        };
        [
            clip(ranges[0], 0, min(common_end, self.sink / block_n)),
            clip(ranges[1], window_start, common_end),
        ]
    }

    /// Are all keys of block `[n0, n0 + block_n)` visible to every query at `q_lo..=q_hi`?
    /// Such blocks skip the element mask.
    #[inline(always)]
    pub fn block_fully_visible(&self, q_lo: i32, q_hi: i32, n0: i32, block_n: i32) -> bool {
        let n_last = n0 + block_n - 1;
        if n_last >= self.seqlen_k {
            return false;
        }
        let reach = q_lo + self.right;
        if self.streaming {
            n_last <= reach && (n_last < self.sink || q_hi - n0 < self.window)
        } else {
            !self.causal || n_last <= reach
        }
    }
}

#[inline(always)]
fn min(a: i32, b: i32) -> i32 {
    if a < b { a } else { b }
}

#[inline(always)]
fn max(a: i32, b: i32) -> i32 {
    if a > b { a } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused append's owner of a tile is the split that walks it, for decode-shaped masks
    /// (the last queries of `sk` keys) of both kinds, and split 0 for a tile no split walks.
    #[test]
    fn a_tile_belongs_to_the_split_that_walks_it() {
        for sk in [1, 9, 40, 333] {
            for n_q in [1, 4, 16] {
                for streaming in [false, true] {
                    for (sink, window) in [(0, 0), (4, 0), (4, 5), (8, 70), (100, 1000)] {
                        let m = HeadMask {
                            streaming,
                            causal: true,
                            sink,
                            window,
                            right: 0,
                            seqlen_k: sk,
                        };
                        let bn = 8;
                        let ranges = m.block_ranges(sk - n_q, sk - 1, bn);
                        let total = ranges[0].len() + ranges[1].len();
                        for per_split in 1..=4 {
                            let walked: [i32; 64] =
                                core::array::from_fn(|i| nth_tile(&ranges, i as i32));
                            for tile in 0..ceil_div(sk, bn) {
                                let owner = split_of_tile(&ranges, tile, per_split);
                                match (0..total).find(|&i| walked[i as usize] == tile) {
                                    Some(i) => assert_eq!(owner, i / per_split, "{m:?} {tile}"),
                                    None => assert_eq!(owner, 0, "{m:?} {tile}"),
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every visible (query, key) pair lies in a visited block, and "fully visible" blocks really are.
    /// Block sizes 8 and 10 (a block size need not be a power of two).
    #[test]
    fn block_ranges_cover_exactly_the_visible_keys() {
        for bn in [8, 10] {
            block_ranges_cover_exactly_the_visible_keys_for(bn);
        }
    }

    /// Left windows, each with no right window and with a few.
    fn windows() -> impl Iterator<Item = (i32, i32)> {
        [0, 1, 3, 8, 20, 1000]
            .into_iter()
            .flat_map(|w| [0, 1, 9, 30].into_iter().map(move |r| (w, r)))
    }

    fn block_ranges_cover_exactly_the_visible_keys_for(bn: i32) {
        for &(sq, sk) in &[(1, 1), (5, 17), (17, 5), (33, 33), (40, 70), (70, 40)] {
            for &streaming in &[false, true] {
                for &causal in &[false, true] {
                    for &sink in &[0, 1, 4, 9, 100] {
                        for (window, right) in windows() {
                            let m = HeadMask {
                                streaming,
                                causal,
                                sink,
                                window,
                                right,
                                seqlen_k: sk,
                            };
                            for tile in 0..(sq + 15) / 16 {
                                let rows = (tile * 16)..core::cmp::min(sq, tile * 16 + 16);
                                let q_lo = sk - sq + rows.start;
                                let q_hi = sk - sq + rows.end - 1;
                                let ranges = m.block_ranges(q_lo, q_hi, bn);
                                assert!(ranges[0].end <= ranges[1].start || ranges[1].is_empty());
                                let visited =
                                    |b: i32| ranges.iter().any(|r| r.start <= b && b < r.end);
                                for k in 0..sk {
                                    let any = (q_lo..=q_hi).any(|q| m.visible(q, k));
                                    if any {
                                        assert!(visited(k / bn), "{m:?} q {q_lo}..={q_hi} key {k}");
                                    }
                                }
                                for q in q_lo..=q_hi {
                                    let bounds = m.row_bounds(q);
                                    for k in 0..sk + 3 {
                                        assert_eq!(
                                            bounds.visible(k),
                                            m.visible(q, k),
                                            "{m:?} {q} {k}"
                                        );
                                    }
                                }
                                for b in 0..(sk + bn - 1) / bn {
                                    if m.block_fully_visible(q_lo, q_hi, b * bn, bn) {
                                        for q in q_lo..=q_hi {
                                            for k in b * bn..b * bn + bn {
                                                assert!(
                                                    m.visible(q, k),
                                                    "{m:?} block {b} q {q} k {k}"
                                                );
                                            }
                                        }
                                    }
                                }
                                // Full ranges: inside the visited ranges, every block fully
                                // visible, and at most one fully visible block left out (the
                                // last sink block under the window).
                                let full = m.full_block_ranges(q_lo, q_hi, bn);
                                let mut missed = 0;
                                for (f, r) in full.iter().zip(ranges.iter()) {
                                    for b in f.start..f.end {
                                        assert!(r.start <= b && b < r.end, "{m:?} {f:?} {r:?}");
                                        assert!(m.block_fully_visible(q_lo, q_hi, b * bn, bn));
                                    }
                                    for b in r.start..r.end {
                                        let in_full = f.start <= b && b < f.end;
                                        if !in_full && m.block_fully_visible(q_lo, q_hi, b * bn, bn)
                                        {
                                            missed += 1;
                                        }
                                    }
                                }
                                assert!(
                                    missed <= 1,
                                    "{m:?} q {q_lo}..={q_hi}: {full:?} {ranges:?}"
                                );
                                // Streaming tiles visit no block that holds no visible key.
                                if streaming {
                                    for r in ranges {
                                        for b in r.start..r.end {
                                            let useful = (q_lo..=q_hi).any(|q| {
                                                (b * bn..b * bn + bn).any(|k| m.visible(q, k))
                                            });
                                            assert!(
                                                useful,
                                                "{m:?} q {q_lo}..={q_hi} visits useless block {b}"
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A retrieval head's decode step (queries at the last `n_q` positions) visits blocks
    /// `0..ceil(len / bn)`, as the decode's fused append assumes when it finds its split's keys.
    #[test]
    fn decode_retrieval_heads_visit_every_block() {
        for bn in [64, 128] {
            for len in 1..400 {
                for n_q in 1..=16.min(len) {
                    for causal in [false, true] {
                        let m = HeadMask {
                            streaming: false,
                            causal,
                            sink: 4,
                            window: 40,
                            right: 0,
                            seqlen_k: len,
                        };
                        let want = BlockRange {
                            start: 0,
                            end: ceil_div(len, bn),
                        };
                        assert_eq!(
                            m.block_ranges(len - n_q, len - 1, bn),
                            [want, BlockRange::EMPTY]
                        );
                    }
                }
            }
        }
    }
}
