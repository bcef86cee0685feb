#!/usr/bin/env python3
"""Reads a clock trace of the warp-specialised prefill kernel and prints where a work tile's time goes.

How to take one (a timing probe, not a result):
  git apply scripts/probes/ws_clock_trace.patch      # the kernel stores SM clocks in the LSE output
  cargo build --release -p duo-attn-bench            # then undo the patch: git checkout kernels/
  duo-bench --probe-skip-check --only streaming --seqlens 32768 --dump-lse DIR   (on the GPU)
  python3 scripts/probes/trace_tiles.py DIR/streaming-32768.lse [heads] [seqlen]

Slots per work tile (LSE rows m0 .. m0 + 127 of its head; SM cycles, low 32 bits): consumer w
(0, 1) at 40w + 0 next Q ready, + 1 boundary turn issued, + 2 epilogue done, + 3 S_0 done,
+ 4 softmax_0 done, + 4 + i turn of block i acquired; 79 the block index; the producer at 80 loop
top, 81 after the Q-buffer wait, 82 tile decoded and published, 83 Q load issued, 84 + i KV
block i issued. Slots stop at 127, so consumer 0's block slots run into consumer 1's past 35
blocks: read traces of layers whose tiles visit at most 35 KV blocks (streaming heads), not
long causal ones.
"""
import collections
import sys

import numpy as np


def diff(a, b):
    return (int(b) - int(a)) & 0xFFFFFFFF


def main():
    path = sys.argv[1]
    heads = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    seqlen = int(sys.argv[3]) if len(sys.argv) > 3 else 32768
    words = np.fromfile(path, dtype=np.uint32).reshape(heads, seqlen)
    tiles = [words[h, m * 128:(m + 1) * 128].astype(np.int64)
             for h in range(heads) for m in range(seqlen // 128)]
    by_block = collections.defaultdict(list)
    for t in tiles:
        by_block[int(t[79])].append(t)
    stats = collections.defaultdict(list)
    for ts in by_block.values():
        ts.sort(key=lambda t: t[0])
        for k, t in enumerate(ts):
            for wg in (0, 1):
                b = 40 * wg
                stats[f"consumer {wg}: Q ready -> boundary turn issued"].append(diff(t[b], t[b + 1]))
                stats[f"consumer {wg}: turn -> epilogue done"].append(diff(t[b + 1], t[b + 2]))
                stats[f"consumer {wg}: epilogue -> S_0 done"].append(diff(t[b + 2], t[b + 3]))
                stats[f"consumer {wg}: S_0 -> tile set up, softmax_0 done"].append(diff(t[b + 3], t[b + 4]))
                stats[f"consumer {wg}: softmax_0 -> turn of block 1"].append(diff(t[b + 4], t[b + 5]))
            if k + 1 < len(ts):
                stats["tile period (consumer 0, Q ready to Q ready)"].append(diff(t[0], ts[k + 1][0]))
            stats["producer: loop top -> Q buffer free"].append(diff(t[80], t[81]))
            stats["producer: decode + publish"].append(diff(t[81], t[82]))
            stats["producer: published -> consumer 0 Q ready"].append(diff(t[82], t[0]))
    print(f"{len(by_block)} blocks, {len(tiles)} tiles; SM cycles")
    for name, v in stats.items():
        v = np.array(v)
        v = v[v < 10**7]
        print(f"{name:52s} median {np.median(v):7.0f}  p10 {np.percentile(v, 10):7.0f}  p90 {np.percentile(v, 90):7.0f}")
    print("KV block i: median cycles from its turn to the next (consumer 0), producer lead (turn - issue)")
    for i in range(1, 12):
        gaps, lead = [], []
        for t in tiles:
            if t[84 + i] == 0 or t[4 + i] == 0:
                continue
            lead.append(diff(t[84 + i], t[4 + i]))
            if t[5 + i] != 0:
                gaps.append(diff(t[4 + i], t[5 + i]))
        if lead:
            g = f"{np.median(gaps):7.0f}" if gaps else "      -"
            print(f"  block {i:2d}: {len(lead):5d} tiles, to next turn {g}, lead {np.median(lead):7.0f}")


if __name__ == "__main__":
    main()
