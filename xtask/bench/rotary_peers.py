#!/usr/bin/env python3
"""Peers of `duo-bench --rotary`, measured on this GPU with PyTorch: the rotary embedding of
Hugging Face's Llama (`q * cos + rotate_half(q) * sin` on Q and K, cos/sin in bf16), eager and
under torch.compile, and flash-attn's `apply_rotary_emb` (Triton) when that package is installed.
Same shapes as duo-bench: Q and K heads of a packed QKV buffer (32 + 8 heads of 8 KV heads' layer,
D 128, bf16), prefill of one sequence and one decode token per sequence. Times are medians from
triton.testing.do_bench. Writes a JSON list that `duo-bench --rotary --rotary-peers` merges.

    python3 rotary_peers.py --out rotary-peers.json
"""
import argparse
import json
import sys

import torch
import triton.testing

HQ, HKV, D = 32, 8, 128
H = HQ + 2 * HKV


def median_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rotary(q, k, cos, sin):
    # q [B, S, Hq, D], k [B, S, Hkv, D]; cos/sin [B, S, 1, D].
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def tables(positions, dev):
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    ang = positions.float()[..., None] * inv
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos(), emb.sin()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="rotary-peers.json")
    args, _ = ap.parse_known_args()
    dev = "cuda"
    compiled = torch.compile(hf_rotary, dynamic=False)
    try:
        from flash_attn.layers.rotary import apply_rotary_emb
    except Exception as e:  # not installed: that peer is left out, loudly
        print(f"flash-attn rotary not available: {e}", file=sys.stderr)
        apply_rotary_emb = None
    records = []

    def record(case, batch, seqlen, impl, fn):
        try:
            ms = median_ms(fn)
        except Exception as e:
            print(f"  {impl} {case} B={batch} S={seqlen}: failed: {e}", file=sys.stderr)
            return
        records.append(dict(case=case, batch=batch, seqlen=seqlen, implementation=impl, ms=ms))
        print(f"  {case:14} B={batch:2} S={seqlen:6} {impl:24} {ms:9.4f} ms", flush=True)

    def peers(case, b, s, positions):
        qkv = torch.randn(b, s, H, D, device=dev, dtype=torch.bfloat16)
        q, k = qkv[:, :, :HQ], qkv[:, :, HQ:HQ + HKV]
        cos, sin = tables(positions, dev)  # [B, S, D] f32
        c16, s16 = cos[:, :, None].to(torch.bfloat16), sin[:, :, None].to(torch.bfloat16)
        record(case, b, s if case == "prefill" else 1, "torch eager (HF)", lambda: hf_rotary(q, k, c16, s16))
        record(case, b, s if case == "prefill" else 1, "torch.compile (HF)", lambda: compiled(q, k, c16, s16))
        if apply_rotary_emb is not None:
            # flash-attn's in-place rotation of Q and K together ([B, S, Hq + Hkv, D] view).
            qk = qkv[:, :, : HQ + HKV]
            half_cos = cos[0, :, : D // 2].to(torch.bfloat16).contiguous()
            half_sin = sin[0, :, : D // 2].to(torch.bfloat16).contiguous()
            if case == "prefill":
                fn = lambda: apply_rotary_emb(qk, half_cos, half_sin, inplace=True)
            else:
                offs = positions[:, 0].to(torch.int32)
                full = tables(torch.arange(1 << 17, device=dev)[None], dev)
                fc = full[0][0, :, : D // 2].to(torch.bfloat16).contiguous()
                fs = full[1][0, :, : D // 2].to(torch.bfloat16).contiguous()
                fn = lambda: apply_rotary_emb(qk, fc, fs, inplace=True, seqlen_offsets=offs)
            record(case, b, s if case == "prefill" else 1, "flash-attn (Triton)", fn)

    for s in [4096, 32768, 131072]:
        peers("prefill", 1, s, torch.arange(s, device=dev)[None])
    for b in [1, 8, 32]:
        peers("decode rotary", b, 1, torch.full((b, 1), 4000, device=dev))
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
