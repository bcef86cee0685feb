#!/usr/bin/env python3
"""Peers for duo-bench, measured on this GPU with PyTorch: SDPA (cuDNN and flash backends),
FlexAttention (causal mask; sink+window block mask), a mixed layer as cuDNN SDPA on the retrieval
heads plus FlexAttention on the streaming heads, and decode with SDPA. Writes JSON that duo-bench
merges (same case keys; times are medians from triton.testing.do_bench).

    python3 peers.py --out peers.json [--quick] [--prefill-head-dim 256] [--decode-head-dim 256]
        [--only decode,decode-mixed]

`--only` takes duo-bench's modes and skips the other peers. `--alibi` (duo-bench's timing flag
for its ALiBi builds) measures FlexAttention with an ALiBi score_mod (ALiBi's standard slopes) on
the full causal and streaming cases instead, as `flex-alibi`: the peer those runs compare with.
Other flags (duo-bench's, which run.sh passes to both) are ignored.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

SINK, WINDOW = 128, 1024  # must match xtask/bench/src/cases.rs


def median_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def alibi_slopes(n):
    """ALiBi's reference get_slopes (as duo_attn::AlibiSlopes::standard)."""
    def pow2(m):
        return [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]
    p = 1 << (n.bit_length() - 1)
    return pow2(p) + pow2(2 * p)[0::2][: n - p]


def causal(b, h, q, kv):
    return kv <= q


def sink_window(b, h, q, kv):
    return (kv <= q) & ((kv < SINK) | (q - kv < WINDOW))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="peers.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prefill-head-dim", type=int, default=128, choices=[64, 128, 256])
    ap.add_argument("--decode-head-dim", type=int, default=128, choices=[64, 128, 256])
    ap.add_argument("--only", default="", help="modes as duo-bench's --only (comma separated)")
    ap.add_argument("--alibi", action="store_true", help="FlexAttention with ALiBi (see above)")
    args, _ = ap.parse_known_args()
    only = set(args.only.split(",")) if args.only else {
        "full", "streaming", "mixed", "decode", "decode-mixed", "chunked", "chunked-mixed",
        "chunked-varlen"}
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)
    dev = "cuda"
    records = []

    def record(mode, batch, sq, sk, hq, hkv, impl, fn, head_dim=128):
        try:
            ms = median_ms(fn)
        except Exception as e:  # a peer that cannot run a shape is left out, loudly
            print(f"  {impl} {mode} B={batch} S={sk}: failed: {e}", file=sys.stderr)
            return
        records.append(dict(mode=mode, batch=batch, seqlen_q=sq, seqlen_k=sk, heads_q=hq, heads_kv=hkv,
                            head_dim=head_dim, impl=impl, ms=ms))
        print(f"  {mode:10} B={batch:2} Sq={sq:6} Sk={sk:6} {impl:16} {ms:9.3f} ms", flush=True)

    prefill_lens = [4096, 8192] if args.quick else [4096, 8192, 16384, 32768]
    if not only & {"full", "streaming", "mixed"}:
        prefill_lens = []
    h, d = 32, args.prefill_head_dim
    for s in prefill_lens:
        q, k, v = (torch.randn(1, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        bm_causal = create_block_mask(causal, None, None, s, s, device=dev)
        bm_stream = create_block_mask(sink_window, None, None, s, s, device=dev)

        def sdpa(backend, q=q, k=k, v=v):
            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return run

        if args.alibi:
            slopes = torch.tensor(alibi_slopes(h), device=dev, dtype=torch.float32)

            def alibi(score, b, hh, qi, kv):
                return score - slopes[hh] * (qi - kv).abs()

            record("full", 1, s, s, h, h, "flex-alibi",
                   lambda: flex(q, k, v, score_mod=alibi, block_mask=bm_causal), d)
            record("streaming", 1, s, s, h, h, "flex-alibi",
                   lambda: flex(q, k, v, score_mod=alibi, block_mask=bm_stream), d)
            del q, k, v
            torch.cuda.empty_cache()
            continue
        record("full", 1, s, s, h, h, "cudnn-sdpa", sdpa(SDPBackend.CUDNN_ATTENTION), d)
        record("full", 1, s, s, h, h, "flash-sdpa", sdpa(SDPBackend.FLASH_ATTENTION), d)
        record("full", 1, s, s, h, h, "flex", lambda: flex(q, k, v, block_mask=bm_causal), d)
        record("streaming", 1, s, s, h, h, "flex", lambda: flex(q, k, v, block_mask=bm_stream), d)
        half = h // 2
        qr, kr, vr = (t[:, :half].contiguous() for t in (q, k, v))
        qs, ks, vs = (t[:, half:].contiguous() for t in (q, k, v))

        def mixed():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
            flex(qs, ks, vs, block_mask=bm_stream)

        record("mixed", 1, s, s, h, h, "cudnn+flex", mixed, d)
        del q, k, v, qr, kr, vr, qs, ks, vs
        torch.cuda.empty_cache()

    d = args.decode_head_dim
    decode_batches = [] if "decode" not in only else [1, 8] if args.quick else [1, 8, 32]
    decode_lens = [4096, 32768] if args.quick else [4096, 16384, 32768, 131072]
    hq, hkv = 32, 8
    for b in decode_batches:
        for s in decode_lens:
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
            record("decode", b, 1, s, hq, hkv, "sdpa",
                   lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), d)

            def flash_decode(q=q, k=k, v=v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            record("decode", b, 1, s, hq, hkv, "flash-sdpa", flash_decode, d)
            del q, k, v
            torch.cuda.empty_cache()

    # Decode with half the KV heads streaming: SDPA on the retrieval half over the whole cache plus
    # SDPA on the streaming half over its sink + window rows (sliced beforehand, as a cache holds them).
    mixed_lens = [] if "decode-mixed" not in only else [4096, 32768] if args.quick else [32768, 131072]
    for b, s in [(b, s) for b in (1, 8) for s in mixed_lens]:
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        qr, qs = q[:, : hq // 2].contiguous(), q[:, hq // 2 :].contiguous()
        kr, vr = k[:, : hkv // 2].contiguous(), v[:, : hkv // 2].contiguous()
        keep = lambda t: torch.cat([t[:, hkv // 2 :, :SINK], t[:, hkv // 2 :, max(SINK, s - WINDOW) :]], dim=2)
        ks, vs = keep(k).contiguous(), keep(v).contiguous()

        def mixed_decode(qr=qr, kr=kr, vr=vr, qs=qs, ks=ks, vs=vs):
            F.scaled_dot_product_attention(qr, kr, vr, enable_gqa=True)
            F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)

        record("decode-mixed", b, 1, s, hq, hkv, "sdpa-split", mixed_decode, d)
        del q, k, v, qr, qs, kr, vr, ks, vs
        torch.cuda.empty_cache()

    # Chunked prefill: a chunk of sq new queries at the end of an sk-token context (bottom-right
    # causal: query i sits at position sk - sq + i), GQA 32/8. SDPA takes the lower-right causal
    # bias (PyTorch picks its backend, flash where it can); FlexAttention a lower-right mask. The
    # mixed layer: SDPA on the retrieval half, FlexAttention's sink + window mask on the other.
    chunks = [128, 2048] if args.quick else [128, 512, 2048]
    contexts = [32768] if args.quick else [32768, 131072]
    if not only & {"chunked", "chunked-mixed"}:
        contexts = []
    hq, hkv, d = 32, 8, args.prefill_head_dim
    for sk in contexts:
        for sq in chunks:
            from torch.nn.attention.bias import causal_lower_right

            off = sk - sq
            q = torch.randn(1, hq, sq, d, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(1, hkv, sk, d, device=dev, dtype=torch.bfloat16) for _ in range(2))

            def lr_causal(b, h, qi, kv, off=off):
                return kv <= qi + off

            def lr_sink_window(b, h, qi, kv, off=off):
                pos = qi + off
                return (kv <= pos) & ((kv < SINK) | (pos - kv < WINDOW))

            bias = causal_lower_right(sq, sk)
            bm_causal = create_block_mask(lr_causal, None, None, sq, sk, device=dev)
            bm_stream = create_block_mask(lr_sink_window, None, None, sq, sk, device=dev)

            def sdpa_lr(q, k, v, bias=bias):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

            if "chunked" in only:
                record("chunked", 1, sq, sk, hq, hkv, "sdpa-lr", lambda: sdpa_lr(q, k, v), d)
                record("chunked", 1, sq, sk, hq, hkv, "flex",
                       lambda: flex(q, k, v, block_mask=bm_causal, enable_gqa=True), d)
            if "chunked-mixed" in only:
                qr, qs = q[:, : hq // 2].contiguous(), q[:, hq // 2 :].contiguous()
                kr, vr = k[:, : hkv // 2].contiguous(), v[:, : hkv // 2].contiguous()
                ks, vs = k[:, hkv // 2 :].contiguous(), v[:, hkv // 2 :].contiguous()

                def chunked_mixed(qr=qr, kr=kr, vr=vr, qs=qs, ks=ks, vs=vs):
                    sdpa_lr(qr, kr, vr)
                    flex(qs, ks, vs, block_mask=bm_stream, enable_gqa=True)

                record("chunked-mixed", 1, sq, sk, hq, hkv, "sdpa-lr+flex", chunked_mixed, d)
                del qr, qs, kr, vr, ks, vs
            del q, k, v
            torch.cuda.empty_cache()

    # A varlen batch of chunks (duo-bench's chunked-varlen): b sequences of sq new queries at the
    # end of contexts of sk * (i + 1) / b tokens. PyTorch has no varlen SDPA for this: SDPA with
    # the lower-right causal bias once per sequence, and FlexAttention over the packed sequences
    # with a document mask (bottom-right causal within each sequence).
    batches = [4] if args.quick else [4, 8]
    chunks = [128] if args.quick else [128, 512]
    contexts = ([32768] if args.quick else [32768, 131072]) if "chunked-varlen" in only else []
    for sk in contexts:
        for b in batches:
            for sq in chunks:
                from torch.nn.attention.bias import causal_lower_right

                lens_k = [sk * (i + 1) // b for i in range(b)]
                qs = [torch.randn(1, hq, sq, d, device=dev, dtype=torch.bfloat16) for _ in range(b)]
                ks = [torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16) for n in lens_k]
                vs = [torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16) for n in lens_k]
                biases = [causal_lower_right(sq, n) for n in lens_k]

                def sdpa_loop(qs=qs, ks=ks, vs=vs, biases=biases):
                    for q, k, v, bias in zip(qs, ks, vs, biases):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

                record("chunked-varlen", b, sq, sk, hq, hkv, "sdpa-lr-loop", sdpa_loop, d)
                qp, kp, vp = torch.cat(qs, dim=2), torch.cat(ks, dim=2), torch.cat(vs, dim=2)
                total_q, total_k = b * sq, sum(lens_k)
                doc_q = torch.arange(b, device=dev).repeat_interleave(sq)
                doc_k = torch.repeat_interleave(
                    torch.arange(b, device=dev), torch.tensor(lens_k, device=dev))
                start_q = torch.arange(b, device=dev) * sq
                start_k = torch.tensor([0] + lens_k[:-1], device=dev).cumsum(0)
                offset = torch.tensor(lens_k, device=dev) - sq

                def doc_causal(bb, h, qi, kv):
                    doc = doc_q[qi]
                    pos = qi - start_q[doc] + offset[doc]
                    return (doc_k[kv] == doc) & (kv - start_k[doc] <= pos)

                bm_doc = create_block_mask(doc_causal, None, None, total_q, total_k, device=dev)
                record("chunked-varlen", b, sq, sk, hq, hkv, "flex-doc",
                       lambda: flex(qp, kp, vp, block_mask=bm_doc, enable_gqa=True), d)
                del qs, ks, vs, qp, kp, vp
                torch.cuda.empty_cache()

    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, records=records)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}: {len(records)} records")


if __name__ == "__main__":
    main()
