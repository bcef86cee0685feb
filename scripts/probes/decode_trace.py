#!/usr/bin/env python3
"""Reads the per-block decode trace of scripts/probes/decode_block_trace.patch.

With the patch applied and DUO_DECODE_TRACE=FILE, every decode launch records per block 24 u64
(%globaltimer ns): 0 start after griddepcontrol.wait, 1 KV loop end, 2 split counted, 3 merge end
(merging blocks), 4 SM | tiles << 32, 5 entry (before the wait), 6 partial rows stored, 7 merge
weights done, 8-15 tile i landed (i < 8), 16 after the loop's barrier, 17 warps' stats and O in
shared memory, 18 row weights done, 19 after the fused append, 20 first loads issued, 21 Q loads
issued. The host keeps them on the device and appends them (grid, 1, 1, then the words) at each
Context::synchronize, so queued launches still overlap.
Prints, per launch, when its blocks' waits and loops end, and per tile count the median of each
phase of a block: the prologue (append, plan and first loads, Q, first tile landing), each
tile's step, and the tail.
Usage: decode_trace.py FILE [FIRST_LAUNCH (negative: from the end) [COUNT]]"""
import struct, sys
data = open(sys.argv[1], 'rb').read(); off = 0; L = []
while off < len(data):
    gx, gy, gz = struct.unpack_from('<3Q', data, off); off += 24
    recs = struct.unpack_from('<%dQ' % (gx * 24), data, off); off += gx * 192
    L.append([recs[i * 24:i * 24 + 24] for i in range(gx)])
first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
count = int(sys.argv[3]) if len(sys.argv) > 3 else 8
if first < 0:
    first = len(L) + first
med = lambda v: sorted(v)[len(v) // 2] if v else float('nan')
for li in range(first, min(first + count, len(L))):
    bl = L[li]; t0 = min(b[5] for b in bl)
    us = lambda a, b: (a - b) / 1e3
    print('launch %d: %d blocks; wait end %.1f us; last loop end %.1f; end %.1f' % (
        li, len(bl), us(max(b[0] for b in bl), t0), us(max(b[1] for b in bl), t0),
        us(max(max(b[2], b[3]) for b in bl), t0)))
    by = {}
    for b in bl:
        by.setdefault(b[4] >> 32, []).append(b)
    for n, bs in sorted(by.items()):
        if n == 0:
            continue
        m = lambda i, j: med([us(b[i], b[j]) for b in bs])
        steps = ' '.join('%.2f' % m(9 + i, 8 + i) for i in range(min(n, 8) - 1))
        merging = [b for b in bs if b[3]]
        print('  %d tiles x %3d blocks: wait->tile 0 %.2f (append %.2f, plan+issue %.2f, q %.2f, land %.2f)'
              ' | steps %s | last tile->loop end %.2f | ->stored %.2f (barrier %.2f, warps %.2f, weights %.2f,'
              ' items %.2f) | ->counted %.2f | merge %s' % (
                  n, len(bs), m(8, 0), m(19, 0), m(20, 19), m(21, 20), m(8, 21), steps,
                  med([us(b[1], b[8 + min(n, 8) - 1]) for b in bs]), m(6, 1), m(16, 1), m(17, 16),
                  m(18, 17), m(6, 18), m(2, 6),
                  '%.2f (weights %.2f)' % (med([us(b[3], b[2]) for b in merging]),
                                           med([us(b[7], b[2]) for b in merging])) if merging else '-'))
