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
    if slot < sink {
        return if slot < len { slot } else { -1 };
    }
    let lo = recent_start(len, sink, recent);
    let r = slot - sink;
    let d = rem_or_zero(r + recent - rem_or_zero(lo - sink, recent), recent);
    let pos = lo + d;
    if r < recent && pos < len { pos } else { -1 }
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
