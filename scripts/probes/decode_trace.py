#!/usr/bin/env python3
"""Reads the per-block decode trace of scripts/probes/decode_block_trace.patch (DUO_DECODE_TRACE=FILE:
every decode launch appends its grid and 8 u64 per block: start, loop end, count, merge end (ns),
SM | tiles << 32) and prints, per launch given, when working and empty blocks start, run and end.
Usage: decode_trace.py FILE 0,5,9"""
import struct, sys
def load(path):
    data = open(path, 'rb').read(); off = 0; out = []
    while off < len(data):
        gx, gy, gz = struct.unpack_from('<3Q', data, off); off += 24
        n = gx*gy*gz
        recs = struct.unpack_from('<%dQ' % (n*8), data, off); off += n*64
        blocks = []
        for i in range(n):
            r = recs[i*8:i*8+8]
            cnt = (r[4] >> 32); cnt = cnt - (1<<32) if cnt >= 1<<31 else cnt
            x = i % gx; y = (i // gx) % gy; z = i // (gx*gy)
            blocks.append(dict(x=x, y=y, z=z, start=r[0], loop=r[1], counted=r[2], merged=r[3], sm=r[4] & 0xffffffff, tiles=cnt))
        t0 = min(b['start'] for b in blocks)
        for b in blocks:
            for k in ('start','loop','counted','merged'):
                b[k] = (b[k]-t0)/1e3 if b[k] else None
        out.append(((gx,gy,gz), blocks))
    return out
if __name__ == '__main__':
    L = load(sys.argv[1])
    for li in [int(a) for a in sys.argv[2].split(',')]:
        g, bl = L[li]
        end = max(max(b['counted'], b['merged'] or 0) for b in bl)
        print('launch', li, g, 'end %.1f' % end)
        for kind, sel in [('work', [b for b in bl if b['tiles'] > 0]), ('empty', [b for b in bl if b['tiles'] <= 0])]:
            if not sel: continue
            st = sorted(b['start'] for b in sel); du = sorted(b['counted']-b['start'] for b in sel)
            le = sorted(b['loop'] for b in sel); ti = sorted(b['tiles'] for b in sel)
            q = lambda v: '%.1f/%.1f/%.1f' % (v[0], v[len(v)//2], v[-1])
            print(' ', kind, len(sel), 'start', q(st), 'dur', q(du), 'loop end', q(le), 'tiles', q(ti))
