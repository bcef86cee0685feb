//! Paged retrieval caches: each layer's retrieval heads keep their K/V in a pool of fixed-size
//! pages, and a sequence slot holds pages only for the tokens it has cached (vLLM's layout), so a
//! server sizes its memory by the tokens it holds, not by `batch x max_len`.
//!
//! One block table serves every layer: page `p` of a slot is page `p` of each layer's pool. The
//! host hands out pages (a free list) before each append that needs them and writes their
//! entries into the device table on the cache's stream; a slot's reset returns them.
use super::*;
use crate::decode::CachePages;

/// Sizes of a paged cache ([`CacheConfig::paging`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachePaging {
    /// Tokens per page: a power of two and a multiple of the prefill's 128-key blocks.
    pub page_size: usize,
    /// Pages in each layer's pool, shared by all slots.
    pub pages: usize,
}

/// The host's page bookkeeping and the device block table `[B, max_pages]` (-1: no page).
pub(super) struct PageTable {
    pub(super) paging: CachePaging,
    /// Entries per slot: `ceil(max_len / page_size)`.
    pub(super) max_pages: usize,
    /// Pages no slot holds, handed out from the end.
    free: Vec<i32>,
    /// Each slot's pages in key order.
    owned: Vec<Vec<i32>>,
    table: DeviceTensor<i32, 2>,
}

impl PageTable {
    /// An empty table (every entry -1, set on the context's stream).
    pub(super) fn new(
        ctx: &Context,
        paging: CachePaging,
        batch: usize,
        max_len: usize,
    ) -> Result<Self> {
        let max_pages = max_len.div_ceil(paging.page_size);
        let table = ctx.alloc::<i32, 2>([batch, max_pages])?;
        ctx.fill_words(
            table.view().desc().ptr,
            4 * max_pages,
            max_pages,
            batch,
            u32::MAX,
        )?;
        Ok(PageTable {
            paging,
            max_pages,
            free: (0..paging.pages as i32).rev().collect(),
            owned: vec![Vec::new(); batch],
            table,
        })
    }

    pub(super) fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages slot `slot` holds, in key order.
    pub(super) fn pages(&self, slot: usize) -> &[i32] {
        &self.owned[slot]
    }

    /// Device address of slot `slot`'s table row.
    pub(super) fn row(&self, slot: usize) -> u64 {
        self.table.view().desc().ptr + (4 * slot * self.max_pages) as u64
    }

    /// The table from slot `first`'s row on, as the kernels read it.
    pub(super) fn rows_from(&self, first: usize) -> CachePages {
        CachePages {
            table: self.row(first),
            stride: self.max_pages as i64,
            shift: self.paging.page_size.trailing_zeros() as i32,
            pages: self.paging.pages as i32,
        }
    }

    /// Gives each slot `first + i` pages for `tokens[i]` tokens (at most `max_len`), all or
    /// nothing: `CachePagesExhausted` when the pool lacks them, with nothing changed.
    pub(super) fn ensure(&mut self, ctx: &Context, first: usize, tokens: &[usize]) -> Result<()> {
        // Pages each slot lacks.
        let missing: Vec<usize> = tokens
            .iter()
            .zip(&self.owned[first..])
            .map(|(&t, owned)| {
                let want = t.div_ceil(self.paging.page_size).min(self.max_pages);
                want.saturating_sub(owned.len())
            })
            .collect();
        let needed: usize = missing.iter().sum();
        if needed == 0 {
            return Ok(());
        }
        if needed > self.free.len() {
            return Err(Error::CachePagesExhausted {
                needed,
                free: self.free.len(),
                pages: self.paging.pages,
            });
        }
        // A decode step takes at most a page per slot: those entries go one by one, as memsets
        // (which a CUDA graph captures). A prefill's go in one copy of the slots' rows.
        let one_each = missing.iter().all(|&m| m <= 1);
        for (i, &m) in missing.iter().enumerate().filter(|&(_, &m)| m > 0) {
            let slot = first + i;
            let at = self.row(slot) + 4 * self.owned[slot].len() as u64;
            let take = self.free.len() - m;
            self.owned[slot].extend(self.free.drain(take..).rev());
            if one_each {
                // m == 1: the page just taken.
                let page = self.owned[slot][self.owned[slot].len() - 1];
                ctx.fill_words(at, 4, 1, 1, page as u32)?;
            }
        }
        if one_each {
            return Ok(());
        }
        let mut rows = vec![-1; tokens.len() * self.max_pages];
        for (row, pages) in rows.chunks_mut(self.max_pages).zip(&self.owned[first..]) {
            row[..pages.len()].copy_from_slice(pages);
        }
        ctx.copy_words_to_device(self.row(first), &rows)
    }

    /// Returns the pages of `slots` to the pool and clears their table rows (on the context's
    /// stream, so work queued before reads them first; later appends reuse them in order).
    pub(super) fn release(&mut self, ctx: &Context, slots: Range<usize>) -> Result<()> {
        let pitch = 4 * self.max_pages;
        ctx.fill_words(
            self.row(slots.start),
            pitch,
            self.max_pages,
            slots.len(),
            u32::MAX,
        )?;
        for slot in slots {
            // Returned last-first, so a slot refilled at once gets its pages back in order.
            self.free.extend(self.owned[slot].drain(..).rev());
        }
        Ok(())
    }
}
