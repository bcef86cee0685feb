//! Split-KV prefill (FlashAttention's `num_splits`): which launches split their query tiles' KV
//! blocks, and into how many runs. The choice replays the persistent kernel's scheduler on the
//! host: its work tiles in claim order, each split a run of KV blocks plus a fixed cost, taken by
//! whichever resident block frees first, then the merge's traffic.
use crate::attention::HeadKind;
use duo_attn_kernels::abi::{PREFILL_MAX_SPLITS, WG_BLOCK_M};
use duo_attn_kernels::mask::HeadMask;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A prefill launch's split-KV option: the entries and what the choice needs.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitKv {
    /// The split build of the kernel, and the merge.
    pub entry: String,
    /// The merge kernel's entry.
    pub merge_entry: String,
    /// `AttentionConfig::kv_splits`.
    pub requested: Option<usize>,
    /// Head dim of the rows merged.
    pub head_dim: usize,
    /// The rows the merge writes, and the partial rows' layout.
    pub rows: PartialRows,
    /// What the launch's work tiles follow from (`SplitShape::work` lists them).
    pub shape: SplitShape,
}

/// The inputs of a launch's work list: its heads and their kinds, masks, KV block size, query
/// tiles per sequence and its sequences. Kept instead of the list itself, which the choice
/// derives only when it has not seen the shape before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitShape {
    /// Query heads.
    pub heads_q: usize,
    /// One per KV head.
    pub kinds: Vec<HeadKind>,
    /// Retrieval heads are causal.
    pub causal: bool,
    /// Streaming heads' sink tokens.
    pub sink: usize,
    /// Streaming heads' window.
    pub window: usize,
    /// Causal retrieval and streaming heads' right window.
    pub right: usize,
    /// Keys per KV block of the kernel.
    pub block_n: usize,
    /// Query tiles per sequence (the longest sequence's).
    pub m_blocks: usize,
    /// The launch's sequences, alike ones run together.
    pub sequences: SequenceRuns,
}

/// Runs of alike sequences: ((query rows, retrieval keys, streaming keys), how many). The two key
/// counts differ for the DuoAttention cache.
pub type SequenceRuns = Vec<((usize, usize, usize), usize)>;

/// Query rows of a split launch, `[B, Hq, Sq]` as the LSE's: a fixed-length batch, or a varlen
/// batch packed as one sequence of `total_q` rows (`B = 1`). Each has `kv_splits` partial rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialRows {
    /// Batch entries (1 for a varlen batch).
    pub batch: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Query rows per entry (`total_q` for a varlen batch).
    pub seqlen_q: usize,
}

impl PartialRows {
    /// Rows of one split's partials.
    pub fn count(&self) -> usize {
        self.batch * self.heads_q * self.seqlen_q
    }
}

/// The launch's work as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitWork {
    /// KV blocks each work tile visits (an upper bound: whole blocks that meet its rows' keys),
    /// in the persistent kernel's claim order (sequence, head, last query tile first); 0 for
    /// the empty tiles of a varlen batch's shorter sequences. Empty when the launch has more than
    /// `MAX_REPLAY_TILES` tiles: it fills the GPU many times over and never splits by itself.
    pub tile_blocks: Vec<u32>,
    /// The longest tile's blocks (caps a requested split count at one block per split).
    pub max_blocks: usize,
}

/// Launches with more work tiles fill the GPU many times over; their work is not listed.
pub const MAX_REPLAY_TILES: usize = 1 << 14;

/// Fewest KV blocks per split (of the longest tile) when the launch chooses.
pub const MIN_BLOCKS_PER_SPLIT: usize = 8;

/// A work item's fixed cost beside its KV blocks, in 128-key block times: its Q load, the ring's
/// fill and its epilogue (f32 partial rows when split). Fitted with `MERGE_BLOCKS_PER_ROW` to
/// session 18's H100 runs, where the replay picked the fastest measured count (or one within 1%)
/// in all eight varlen chunk cases and the session-17 counts of the fixed-length ones.
pub const ITEM_COST_BLOCKS: f64 = 2.0;

/// The merge's cost per partial row, in block times of the whole GPU: it reads the row (D f32)
/// once the kernel has written it, about 8 D bytes at 3 TB/s against one 128-key block's compute
/// at D on an SM (1.6 us x D / 128; the ratio does not depend on D).
pub const MERGE_BLOCKS_PER_ROW: f64 = 2.2e-4;

/// The launch takes the fewest splits whose replayed time is within this share of the best:
/// each split costs a little more than the replay counts (more Q loads through L2).
pub const SPLIT_MARGIN: f64 = 0.03;

/// Counts above which splitting is not replayed (the replay costs host time at every launch):
/// tiles past `4 x slots` (the GPU is full several times over), split items past `16 x slots`
/// (runs already short beside the tail).
const NO_SPLIT_WAVES: usize = 4;
const MAX_ITEM_WAVES: usize = 16;

/// The split counts the launch replays.
const CANDIDATE_SPLITS: [usize; 10] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32];

/// KV blocks of `block_n` keys that a tile of query rows `m0..m0 + WG_BLOCK_M` (clipped to
/// `seqlen_q`) visits, its rows bottom-right aligned to `seqlen_k` keys: the kernels' own
/// `HeadMask::block_ranges`. Lengths and reaches are at most `MAX_SEQLEN` (the launch's checks).
#[allow(clippy::too_many_arguments)]
fn blocks_of_tile(
    kind: HeadKind,
    causal: bool,
    (sink, window, right): (usize, usize, usize),
    seqlen_q: usize,
    seqlen_k: usize,
    m0: usize,
    block_n: usize,
) -> u32 {
    if seqlen_k == 0 || m0 >= seqlen_q {
        return 0;
    }
    let mask = HeadMask {
        streaming: kind == HeadKind::Streaming,
        causal,
        sink: sink as i32,
        window: window as i32,
        right: right as i32,
        seqlen_k: seqlen_k as i32,
    };
    let offset = seqlen_k as i32 - seqlen_q as i32;
    let last = (m0 + WG_BLOCK_M).min(seqlen_q) as i32 - 1;
    let ranges = mask.block_ranges(offset + m0 as i32, offset + last, block_n as i32);
    ranges.iter().map(|r| r.len() as u32).sum()
}

impl SplitShape {
    /// The launch's work tiles in claim order (`SplitWork`).
    pub fn work(&self) -> SplitWork {
        let group = (self.heads_q / self.kinds.len().max(1)).max(1);
        let reach = (self.sink, self.window, self.right);
        let runs = self.sequences.iter().map(|&(_, n)| n).sum::<usize>();
        let tiles = runs * self.heads_q * self.m_blocks;
        let (mut tile_blocks, mut max_blocks) = (Vec::new(), 1);
        let listed = tiles <= MAX_REPLAY_TILES;
        if listed {
            tile_blocks.reserve(tiles);
        }
        for &((seqlen_q, seqlen_k, seqlen_k_stream), count) in &self.sequences {
            if count == 0 {
                continue;
            }
            let first = tile_blocks.len();
            for h in 0..self.heads_q {
                let kind = self
                    .kinds
                    .get(h / group)
                    .copied()
                    .unwrap_or(HeadKind::Retrieval);
                let keys = match kind {
                    HeadKind::Retrieval => seqlen_k,
                    HeadKind::Streaming => seqlen_k_stream,
                };
                let blocks = |m: usize| {
                    blocks_of_tile(kind, self.causal, reach, seqlen_q, keys, m, self.block_n)
                };
                // The sequence's last query tile is its longest.
                let last = seqlen_q.div_ceil(WG_BLOCK_M).max(1) - 1;
                max_blocks = max_blocks.max(blocks(last * WG_BLOCK_M) as usize);
                if listed {
                    tile_blocks.extend((0..self.m_blocks).rev().map(|m| blocks(m * WG_BLOCK_M)));
                }
            }
            // The run's other sequences list the same tiles as its first.
            if listed {
                let end = tile_blocks.len();
                for _ in 1..count {
                    tile_blocks.extend_from_within(first..end);
                }
            }
        }
        SplitWork {
            tile_blocks,
            max_blocks,
        }
    }
}

impl SplitWork {
    /// `tiles` tiles of `blocks` blocks each (tests and estimates).
    pub fn uniform(tiles: usize, blocks: u32) -> Self {
        SplitWork {
            tile_blocks: vec![blocks; tiles],
            max_blocks: blocks as usize,
        }
    }

    /// The launch's estimated time with `splits` splits on `slots` resident blocks, in block
    /// times: the scheduler replayed (each split's run of blocks plus `ITEM_COST_BLOCKS`, to the
    /// first free slot, in claim order), plus the merge of `partial_rows` rows per split.
    pub fn replay(&self, splits: usize, slots: usize, partial_rows: usize) -> f64 {
        // Slot finish times in 1/16 block: exact, and an ordered heap key.
        const UNIT: f64 = 16.0;
        let item = (ITEM_COST_BLOCKS * UNIT) as u64;
        let mut free: BinaryHeap<Reverse<u64>> = (0..slots.max(1)).map(|_| Reverse(0)).collect();
        let mut end = 0;
        for &blocks in self.tile_blocks.iter().filter(|&&b| b > 0) {
            let blocks = blocks as usize;
            for s in 0..splits {
                // `split_range`'s runs; an empty run still claims, loads Q and writes its rows.
                let run = ((s + 1) * blocks / splits - s * blocks / splits) as u64;
                let cost = if run > 0 {
                    run * UNIT as u64 + item
                } else {
                    item / 2
                };
                let Reverse(start) = free.pop().unwrap_or(Reverse(0));
                end = end.max(start + cost);
                free.push(Reverse(start + cost));
            }
        }
        let merge = if splits > 1 {
            (splits * partial_rows) as f64 * MERGE_BLOCKS_PER_ROW
        } else {
            0.0
        };
        end as f64 / UNIT + merge
    }
}

/// KV splits of a launch on `slots` resident blocks. `requested` wins, capped at one block per
/// split and `PREFILL_MAX_SPLITS`. Otherwise: 1 when the tiles fill the GPU many times over (or
/// were not listed); else the fewest of `CANDIDATE_SPLITS` whose replayed time (`SplitWork::replay`) is within
/// `SPLIT_MARGIN` of the best count's, each split at least `MIN_BLOCKS_PER_SPLIT` blocks of the
/// longest tile.
pub fn choose_kv_splits(
    requested: Option<usize>,
    work: &SplitWork,
    slots: usize,
    partial_rows: usize,
) -> usize {
    let cap = work.max_blocks.clamp(1, PREFILL_MAX_SPLITS);
    if let Some(n) = requested {
        return n.clamp(1, cap);
    }
    let slots = slots.max(1);
    let tiles = work.tile_blocks.iter().filter(|&&b| b > 0).count();
    if tiles == 0 || tiles >= NO_SPLIT_WAVES * slots {
        return 1;
    }
    let most = (work.max_blocks / MIN_BLOCKS_PER_SPLIT).clamp(1, cap);
    let times: Vec<(usize, f64)> = CANDIDATE_SPLITS
        .into_iter()
        .filter(|&s| s == 1 || (s <= most && tiles * s <= MAX_ITEM_WAVES * slots))
        .map(|s| (s, work.replay(s, slots, partial_rows)))
        .collect();
    let best = times.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
    times
        .iter()
        .find(|t| t.1 <= best * (1.0 + SPLIT_MARGIN))
        .map_or(1, |t| t.0)
}

/// Recent split choices, so the work list and its replay are made once per launch shape: a
/// serving step's layers share theirs. Exact keys, the last `SplitChoices::KEEP`.
#[derive(Debug, Default)]
pub struct SplitChoices {
    recent: std::collections::VecDeque<(SplitKey, usize)>,
}

/// What a launch's split choice depends on (a requested count is capped by the work's longest
/// tile, which also takes the work list to find).
#[derive(Debug, PartialEq, Eq)]
struct SplitKey {
    requested: Option<usize>,
    shape: SplitShape,
    slots: usize,
    rows: usize,
}

impl SplitChoices {
    const KEEP: usize = 8;

    /// `choose_kv_splits` for `split` on `slots` resident blocks, remembered.
    pub fn choose(&mut self, split: &SplitKv, slots: usize) -> usize {
        let rows = split.rows.count();
        let known = self.recent.iter().find(|(key, _)| {
            key.requested == split.requested
                && key.slots == slots
                && key.rows == rows
                && key.shape == split.shape
        });
        if let Some(&(_, splits)) = known {
            return splits;
        }
        let splits = choose_kv_splits(split.requested, &split.shape.work(), slots, rows);
        if self.recent.len() == Self::KEEP {
            self.recent.pop_front();
        }
        let key = SplitKey {
            requested: split.requested,
            shape: split.shape.clone(),
            slots,
            rows,
        };
        self.recent.push_back((key, splits));
        splits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duo_attn_kernels::abi::{FastDiv, split_range};

    /// Splits cover a tile's blocks once, in order, and none is empty when the tile has at least
    /// as many blocks as splits.
    #[test]
    fn split_ranges_cover_every_block_once() {
        for splits in 1..=PREFILL_MAX_SPLITS as i32 {
            let div = FastDiv::new(splits as u32);
            for blocks in 0..300 {
                let mut next = 0;
                for s in 0..splits {
                    let (lo, hi) = split_range(blocks, s, div);
                    assert_eq!(lo, next, "blocks {blocks} splits {splits} split {s}");
                    assert!(hi >= lo);
                    if blocks >= splits {
                        assert!(hi > lo, "blocks {blocks} splits {splits}: split {s} empty");
                    }
                    next = hi;
                }
                assert_eq!(next, blocks);
            }
        }
    }

    /// A causal launch of `heads_q` query heads over `kinds` (one per KV head), 128-key blocks.
    fn shape(
        heads_q: usize,
        kinds: &[HeadKind],
        m_blocks: usize,
        sequences: SequenceRuns,
    ) -> SplitShape {
        SplitShape {
            heads_q,
            kinds: kinds.to_vec(),
            causal: true,
            sink: 0,
            window: 0,
            right: 0,
            block_n: 128,
            m_blocks,
            sequences,
        }
    }

    #[test]
    fn tiles_count_the_blocks_they_visit() {
        let r = HeadKind::Retrieval;
        let s = HeadKind::Streaming;
        // A 128-row chunk at the end of 32k keys: all 256 blocks, causal or not.
        assert_eq!(blocks_of_tile(r, true, (0, 0, 0), 128, 32768, 0, 128), 256);
        // Sq = Sk causal: tile m sees m + 1 blocks; full attention all of them.
        assert_eq!(blocks_of_tile(r, true, (0, 0, 0), 1024, 1024, 384, 128), 4);
        assert_eq!(blocks_of_tile(r, false, (0, 0, 0), 1024, 1024, 384, 128), 8);
        // Streaming, sink 128 + window 1024, rows 4096..4224 of 8192: the sink block and the
        // window's 9 blocks (keys 3072..4224; row 4096's window starts at 3073).
        assert_eq!(
            blocks_of_tile(s, true, (128, 1024, 0), 8192, 8192, 4096, 128),
            1 + 9
        );
        // Near the start the window reaches the sink: no block counts twice.
        assert_eq!(
            blocks_of_tile(s, true, (128, 1024, 0), 8192, 8192, 128, 128),
            2
        );
        // Rows past the sequence, or no keys: nothing.
        assert_eq!(blocks_of_tile(r, true, (0, 0, 0), 100, 1000, 128, 128), 0);
        assert_eq!(blocks_of_tile(r, true, (0, 0, 0), 100, 0, 0, 128), 0);
    }

    #[test]
    fn work_lists_tiles_in_claim_order() {
        // Two sequences (128 and 256 queries at the end of 1024 and 512 keys), 2 query heads,
        // one retrieval KV head: sequence-major, then head, last query tile first.
        let seqs = vec![((128, 1024, 1024), 1), ((256, 512, 512), 1)];
        let work = shape(2, &[HeadKind::Retrieval], 2, seqs).work();
        assert_eq!(work.tile_blocks, [0, 8, 0, 8, 4, 3, 4, 3]);
        assert_eq!(work.max_blocks, 8);
    }

    #[test]
    fn alike_sequences_list_as_one_run() {
        let kinds = [HeadKind::Retrieval, HeadKind::Streaming];
        let one = ((300, 2000, 900), 1);
        let mut run = shape(4, &kinds, 3, vec![((300, 2000, 900), 3)]);
        run.sink = 16;
        run.window = 200;
        let mut each = run.clone();
        each.sequences = vec![one; 3];
        assert_eq!(run.work(), each.work());
        assert_eq!(run.work().tile_blocks.len(), 3 * 4 * 3);
    }

    #[test]
    fn launches_that_fill_the_gpu_do_not_split() {
        // Full causal 32k: 256 tiles x 32 heads of 1..256 blocks.
        let full = vec![((32768, 32768, 32768), 1)];
        let work = shape(32, &[HeadKind::Retrieval; 32], 256, full).work();
        assert_eq!(choose_kv_splits(None, &work, 132, 32 * 32768), 1);
        // 512-query chunks against 32k keys: 128 tiles of 256 blocks.
        assert_eq!(
            choose_kv_splits(None, &SplitWork::uniform(128, 256), 132, 512 * 32),
            1
        );
        // Many tiles, not listed.
        let many = SplitWork {
            tile_blocks: Vec::new(),
            max_blocks: 1024,
        };
        assert_eq!(choose_kv_splits(None, &many, 132, 1 << 20), 1);
    }

    #[test]
    fn few_long_tiles_split_to_fill_the_gpu() {
        // A 128-query chunk against 32k keys, 32 heads: 32 tiles of 256 blocks -> 4 splits
        // (128 of 132 slots), as measured fastest in session 17.
        let chunk = SplitWork::uniform(32, 256);
        assert_eq!(choose_kv_splits(None, &chunk, 132, 128 * 32), 4);
        // One tile against 128k keys: as many splits as allowed.
        assert_eq!(
            choose_kv_splits(None, &SplitWork::uniform(1, 1024), 132, 128),
            PREFILL_MAX_SPLITS
        );
        // 64 tiles of 1024 blocks (a 256-query chunk against 128k keys): 2 (128 of 132 slots).
        assert_eq!(
            choose_kv_splits(None, &SplitWork::uniform(64, 1024), 132, 256 * 32),
            2
        );
        // Short tiles split no finer than MIN_BLOCKS_PER_SPLIT blocks: 32 blocks -> at most 4.
        assert_eq!(
            choose_kv_splits(None, &SplitWork::uniform(8, 32), 132, 1024),
            4
        );
        assert_eq!(
            choose_kv_splits(None, &SplitWork::uniform(8, 7), 132, 1024),
            1
        );
    }

    /// The replay runs at every launch that could split: its worst cases stay well under a
    /// millisecond (printed; `cargo test --release -- --nocapture replay_cost`).
    #[test]
    fn replay_cost() {
        for (tiles, blocks) in [(1, 1024), (32, 256), (131, 1024), (527, 1024)] {
            let work = SplitWork::uniform(tiles, blocks);
            let t = std::time::Instant::now();
            let splits = choose_kv_splits(None, &work, 132, tiles * 128);
            let took = t.elapsed();
            eprintln!("{tiles} tiles of {blocks} blocks: {splits} splits in {took:?}");
        }
    }

    /// Session 18's varlen chunks (GQA 32/8 retrieval; sequence b of B at the end of
    /// Sk (b + 1) / B keys): the counts measured fastest on an H100 (or within 1% of it).
    #[test]
    fn varlen_chunks_split_as_measured() {
        let kinds = [HeadKind::Retrieval; 8];
        for (batch, sq, sk, want) in [
            (4, 128, 32768, 4),
            (4, 512, 32768, 1),
            (8, 128, 32768, 2),
            (8, 512, 32768, 1),
            (4, 128, 131072, 4),
            (4, 512, 131072, 1),
            (8, 128, 131072, 4),
            (8, 512, 131072, 1),
        ] {
            let seqs = (0..batch)
                .map(|b| ((sq, sk * (b + 1) / batch, sk * (b + 1) / batch), 1))
                .collect();
            let work = shape(32, &kinds, sq / 128, seqs).work();
            let got = choose_kv_splits(None, &work, 132, batch * sq * 32);
            assert_eq!(got, want, "B={batch} Sq={sq} Sk={sk}");
        }
    }

    #[test]
    fn choices_are_remembered_per_shape() {
        // `tiles` query heads of one 128-query chunk against 32k keys: tiles of 256 blocks.
        let split = |tiles, requested| SplitKv {
            entry: String::new(),
            merge_entry: String::new(),
            requested,
            head_dim: 128,
            rows: PartialRows {
                batch: 1,
                heads_q: 32,
                seqlen_q: 128,
            },
            shape: shape(
                tiles,
                &[HeadKind::Retrieval],
                1,
                vec![((128, 32768, 32768), 1)],
            ),
        };
        let mut choices = SplitChoices::default();
        for _ in 0..3 {
            assert_eq!(choices.choose(&split(32, None), 132), 4);
            assert_eq!(choices.choose(&split(32, None), 66), 2);
            assert_eq!(choices.choose(&split(32, Some(3)), 132), 3);
        }
        // A requested count is remembered too (its cap needs the work list).
        assert_eq!(choices.recent.len(), 3);
        assert_eq!(choices.choose(&split(32, Some(64)), 132), 32);
        for tiles in 1..20 {
            choices.choose(&split(tiles, None), 132);
        }
        assert_eq!(choices.recent.len(), SplitChoices::KEEP);
    }

    #[test]
    fn requested_splits_are_capped() {
        let work = SplitWork::uniform(8, 1024);
        assert_eq!(choose_kv_splits(Some(1), &work, 132, 1024), 1);
        assert_eq!(choose_kv_splits(Some(0), &work, 132, 1024), 1);
        assert_eq!(choose_kv_splits(Some(7), &work, 132, 1024), 7);
        assert_eq!(
            choose_kv_splits(Some(1000), &work, 132, 1024),
            PREFILL_MAX_SPLITS
        );
        // One block per split at most.
        let short = SplitWork::uniform(8, 3);
        assert_eq!(choose_kv_splits(Some(5), &short, 132, 1024), 3);
    }
}
