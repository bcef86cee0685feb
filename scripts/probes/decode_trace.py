#!/usr/bin/env python3
"""Reads the per-block decode trace of scripts/probes/decode_block_trace.patch.

With the patch applied and DUO_DECODE_TRACE=FILE, every decode launch records per block (8 u64):
start after griddepcontrol.wait, KV loop end, split counted, merge end (merging blocks), SM |
tiles << 32, and entry (before the wait), in %globaltimer ns. The host keeps them on the device
and appends them (grid, 1, 1, then the words) at each Context::synchronize, so queued launches
still overlap. Prints, per launch, min/median/max of each time relative to its first block's
entry, and how long before the previous launch's end it entered.
Usage: decode_trace.py FILE [FIRST_LAUNCH [COUNT]]"""
import struct, sys
data = open(sys.argv[1], 'rb').read(); off = 0; L = []
while off < len(data):
    gx, gy, gz = struct.unpack_from('<3Q', data, off); off += 24
    recs = struct.unpack_from('<%dQ' % (gx*8), data, off); off += gx*64
    bl = [recs[i*8:i*8+8] for i in range(gx)]
    L.append(bl)
first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
count = int(sys.argv[3]) if len(sys.argv) > 3 else 16
prev_end = None
q = lambda v: '%6.1f/%6.1f/%6.1f' % (v[0], v[len(v)//2], v[-1])
for li in range(first, min(first+count, len(L))):
    bl = L[li]
    t0 = min(b[5] for b in bl)
    rel = lambda x: (x - t0)/1e3
    work = [b for b in bl if (b[4] >> 32) > 0]
    enter = sorted(rel(b[5]) for b in bl)
    start = sorted(rel(b[0]) for b in bl)
    loop = sorted(rel(b[1]) for b in work)
    counted = sorted(rel(b[2]) for b in bl)
    merged = sorted(rel(b[3]) for b in bl if b[3])
    end = max(counted[-1], merged[-1] if merged else 0)
    tiles = sorted(b[4] >> 32 for b in bl)
    gap = '' if prev_end is None else 'first enter %+.1f us after prev end' % ((t0 - prev_end)/1e3)
    print('launch %d: %d blocks, tiles %d/%d/%d, end %.1f us %s' % (li, len(bl), tiles[0], tiles[len(tiles)//2], tiles[-1], end, gap))
    print('   enter %s | after wait %s | loop end %s | counted %s | merged %s' % (q(enter), q(start), q(loop) if loop else '-', q(counted), q(merged) if merged else '-'))
    prev_end = t0 + end*1e3
