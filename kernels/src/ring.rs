//! Slot arithmetic of a streaming head's ring cache, shared by the kernels and the host.
//!
//! A streaming head keeps `sink + recent` slots per sequence: positions `< sink` live in slot
//! `pos` forever; every later position `p` lives in slot `sink + (p - sink) % recent`, so the
//! ring holds the last `recent` positions (fewer early on). All functions are total: a zero
//! `recent` (which the host rejects) gives slot `sink` and no recent positions.

/// `a % b` for `a >= 0`, without a panic path (0 when `b == 0`).
#[inline(always)]
pub fn rem_or_zero(a: i32, b: i32) -> i32 {
    match core::num::NonZeroU32::new(b as u32) {
        Some(b) => (a as u32 % b) as i32,
        None => 0,
    }
}

/// Slot of position `pos`.
#[inline(always)]
pub fn slot_of(pos: i32, sink: i32, recent: i32) -> i32 {
    if pos < sink {
        pos
    } else {
        sink + rem_or_zero(pos - sink, recent)
    }
}

/// First position kept in the recent slots once `len` positions were written.
#[inline(always)]
pub fn recent_start(len: i32, sink: i32, recent: i32) -> i32 {
    let lo = len - recent;
    if lo > sink { lo } else { sink }
}

/// Position held by `slot` once `len` positions were written, or -1 if the slot is empty.
#[inline(always)]
pub fn position_of(slot: i32, len: i32, sink: i32, recent: i32) -> i32 {
    RingPositions::new(len, sink, recent).position(slot)
}

/// [`position_of`] for one `len` and many slots: the division is done once, at `new`, and each
/// slot then takes a compare and a select (a decode tile maps every key of a ring this way).
#[derive(Clone, Copy, Debug)]
pub struct RingPositions {
    len: i32,
    sink: i32,
    recent: i32,
    /// First position kept in the recent slots.
    lo: i32,
    /// Recent slot (from `sink` on) that holds `lo`.
    lo_slot: i32,
}

impl RingPositions {
    /// The map of a ring of `sink + recent` slots that has seen `len` positions.
    #[inline(always)]
    pub fn new(len: i32, sink: i32, recent: i32) -> Self {
        let lo = recent_start(len, sink, recent);
        RingPositions {
            len,
            sink,
            recent,
            lo,
            lo_slot: rem_or_zero(lo - sink, recent),
        }
    }

    /// Position held by `slot`, or -1 if the slot is empty.
    #[inline(always)]
    pub fn position(&self, slot: i32) -> i32 {
        if slot < self.sink {
            return if slot < self.len { slot } else { -1 };
        }
        // Recent slot r holds lo + (r - lo_slot) mod recent; r < recent and lo_slot < recent, so
        // the modulo is one conditional add.
        let r = slot - self.sink;
        let d = if r >= self.lo_slot {
            r - self.lo_slot
        } else {
            r - self.lo_slot + self.recent
        };
        let pos = self.lo + d;
        if r < self.recent && pos < self.len {
            pos
        } else {
            -1
        }
    }

    /// Do slots `n0..n1` all hold a position that every query at `q_lo..=q_hi` sees, with
    /// `window` recent positions each (`p <= q_lo`, and `p < sink` or `q_hi - p < window`)? Then a
    /// decode tile of those slots needs no element mask. Exact up to one case taken as false: a
    /// run of recent slots across the ring's wrap (the slot of the oldest position), which holds
    /// the ring's newest and oldest positions, often masked anyway.
    #[inline(always)]
    pub fn slots_fully_visible(&self, n0: i32, n1: i32, q_lo: i32, q_hi: i32, window: i32) -> bool {
        // Every slot filled (the filled slots are 0..filled_slots).
        if n1 > filled_slots(self.len, self.sink, self.recent) || n0 < 0 {
            return false;
        }
        // Sink slots hold their own position: seen once it is at most q_lo.
        let sink_end = if n1 < self.sink { n1 } else { self.sink };
        if sink_end > n0 && sink_end - 1 > q_lo {
            return false;
        }
        // Recent slots r0..r1 hold positions lo + d for d = (r - lo_slot) mod recent, increasing
        // with r unless the run crosses the wrap.
        let r0 = if n0 > self.sink { n0 - self.sink } else { 0 };
        let r1 = n1 - self.sink;
        if r1 <= r0 {
            return true;
        }
        let d0 = if r0 >= self.lo_slot {
            r0 - self.lo_slot
        } else {
            r0 - self.lo_slot + self.recent
        };
        let d1 = d0 + (r1 - r0);
        // Seen positions: from q_hi - window + 1 (the last query's window) to q_lo (causal).
        let (first_seen, last_seen) = (q_hi - window + 1, q_lo);
        d1 <= self.recent && self.lo + d0 >= first_seen && self.lo + d1 - 1 <= last_seen
    }
}

/// Slots holding a position once `len` positions were written: they fill in order (the sink
/// slots, then the recent ones until the ring wraps), so the filled slots are `0..filled_slots`
/// and a reader can zero the rest instead of reading memory never written.
#[inline(always)]
pub fn filled_slots(len: i32, sink: i32, recent: i32) -> i32 {
    if len < sink + recent {
        len
    } else {
        sink + recent
    }
}

/// Rows of the cached history a streaming head's prefill chunk reads: `(sink_rows, recent_rows,
/// recent_start)` after `len` cached positions. Rows `0..sink_rows` are positions `0..sink_rows`;
/// the next `recent_rows` are positions `recent_start..len`.
#[inline(always)]
pub fn history(len: i32, sink: i32, recent: i32) -> (i32, i32, i32) {
    let sink_rows = if len < sink { len } else { sink };
    let lo = recent_start(len, sink, recent);
    let recent_rows = if len > lo { len - lo } else { 0 };
    (sink_rows, recent_rows, lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes positions 0..len through `slot_of` into a simulated ring and checks `position_of`
    /// and `history` against it.
    #[test]
    fn ring_matches_simulation() {
        for sink in [0, 1, 4] {
            for recent in [1, 3, 8] {
                let mut ring = [-1i32; 16];
                for len in 0..40 {
                    if len > 0 {
                        let p = len - 1;
                        ring[slot_of(p, sink, recent) as usize] = p;
                    }
                    for slot in 0..sink + recent {
                        assert_eq!(position_of(slot, len, sink, recent), ring[slot as usize]);
                        let filled = slot < filled_slots(len, sink, recent);
                        assert_eq!(filled, ring[slot as usize] >= 0, "len {len} slot {slot}");
                    }
                    // Whole runs of slots: fully visible only if each slot is.
                    let rp = RingPositions::new(len, sink, recent);
                    for window in [1, 2, recent, recent + 2] {
                        for n_q in 1..=3.min(len.max(1)) {
                            let (q_lo, q_hi) = (len - n_q, len - 1);
                            for n0 in 0..sink + recent {
                                for n1 in n0 + 1..=sink + recent {
                                    let each = (n0..n1).all(|slot| {
                                        let p = position_of(slot, len, sink, recent);
                                        p >= 0 && p <= q_lo && (p < sink || q_hi - p < window)
                                    });
                                    let run = rp.slots_fully_visible(n0, n1, q_lo, q_hi, window);
                                    assert!(
                                        !run || each,
                                        "len {len} sink {sink} recent {recent} window {window} n_q {n_q} slots {n0}..{n1}"
                                    );
                                    // Exact but for runs across the wrap.
                                    let wraps = (n0.max(sink)..n1).any(|slot| {
                                        slot > n0.max(sink) && slot - sink == rp.lo_slot
                                    });
                                    if each && !wraps {
                                        assert!(
                                            run,
                                            "len {len} sink {sink} recent {recent} window {window} n_q {n_q} slots {n0}..{n1} missed"
                                        );
                                    }
                                }
                            }
                        }
                    }
                    let (s, r, lo) = history(len, sink, recent);
                    let mut kept: [i32; 16] = [-1; 16];
                    let mut n = 0;
                    for p in (0..s).chain(lo..lo + r) {
                        kept[n] = p;
                        n += 1;
                    }
                    let mut want: [i32; 16] = [-1; 16];
                    let mut m = 0;
                    let mut held: [i32; 16] = ring;
                    held[..(sink + recent) as usize].sort_unstable();
                    for &p in held[..(sink + recent) as usize].iter().filter(|&&p| p >= 0) {
                        want[m] = p;
                        m += 1;
                    }
                    assert_eq!(
                        (n, kept),
                        (m, want),
                        "sink {sink} recent {recent} len {len}"
                    );
                }
            }
        }
    }
}
