//! Every validation error of the prefill call, one test each, on plain descriptors (no GPU).
use duo_attn::{AttentionConfig, Error, HeadKind, PrefillKernel, TensorDesc, plan_prefill};
use half::bf16;

const DEV: u32 = 0;
const B: usize = 2;
const SQ: usize = 100;
const SK: usize = 300;
const HQ: usize = 8;
const HKV: usize = 2;
const D: usize = 64;

struct Call {
    q: TensorDesc<4>,
    k: TensorDesc<4>,
    v: TensorDesc<4>,
    out: TensorDesc<4>,
    lse: TensorDesc<3>,
    cfg: AttentionConfig,
}

/// A valid call: each tensor in its own (fake, aligned) allocation.
fn valid() -> Call {
    call_of([B, SQ, SK, HQ, HKV, D], 0x1_0000_0000)
}

/// Contiguous q/k/v/out/lse of `[batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim]`, one
/// retrieval and one streaming KV head kind, allocations `spacing` bytes apart.
fn call_of([b, sq, sk, hq, hkv, d]: [usize; 6], spacing: u64) -> Call {
    let at = |i: u64| 0x7000_0000_0000 + i * spacing;
    Call {
        q: TensorDesc::contiguous(at(0), [b, sq, hq, d], 2, DEV),
        k: TensorDesc::contiguous(at(1), [b, sk, hkv, d], 2, DEV),
        v: TensorDesc::contiguous(at(2), [b, sk, hkv, d], 2, DEV),
        out: TensorDesc::contiguous(at(3), [b, sq, hq, d], 2, DEV),
        lse: TensorDesc::contiguous(at(4), [b, hq, sq], 4, DEV),
        cfg: AttentionConfig::new(vec![HeadKind::Retrieval, HeadKind::Streaming]),
    }
}

fn plan(c: &Call) -> Result<duo_attn::PrefillPlan, Error> {
    plan_prefill::<bf16>(&c.q, &c.k, &c.v, &c.out, &c.lse, &c.cfg, DEV)
}

fn fails(edit: impl FnOnce(&mut Call)) -> Error {
    let mut c = valid();
    edit(&mut c);
    let err = plan(&c).expect_err("the call should have been rejected");
    eprintln!("rejected: {err}");
    err
}

#[test]
fn valid_call_plans_a_launch() {
    let mut c = valid();
    c.cfg = c.cfg.kernel(PrefillKernel::MmaSync);
    let p = plan(&c).unwrap();
    assert_eq!(p.entry, "duo_prefill_bf16_d64");
    assert_eq!(p.grid, (2, HQ as u32, B as u32));
    assert_eq!((p.block, p.shared_bytes), (128, 0));
    assert_eq!(p.params.streaming_heads[0], 0b10);
    assert_eq!(
        (p.params.seqlen_q, p.params.seqlen_k),
        (SQ as i32, SK as i32)
    );
    assert_eq!(
        p.params.q_strides,
        [(SQ * HQ * D) as i64, (HQ * D) as i64, D as i64]
    );
}

#[test]
fn auto_picks_the_tma_kernel() {
    let p = plan(&valid()).unwrap();
    assert_eq!(p.entry, "duo_prefill_wgmma_tma_bf16_d64");
    // One map per operand (q, k, v, and k/v again for the streaming slots of a plain call):
    // innermost first (D, rows, heads, batch), byte strides.
    let tma = p.tma.expect("tensor maps");
    assert_eq!(tma[0].dims, [D as u64, SQ as u64, HQ as u64, B as u64]);
    assert_eq!(tma[1].dims, [D as u64, SK as u64, HKV as u64, B as u64]);
    assert_eq!(
        tma[1].strides,
        [
            (HKV * D * 2) as u64,
            (D * 2) as u64,
            (SK * HKV * D * 2) as u64
        ]
    );
    assert_eq!((tma[3], tma[4]), (tma[1], tma[2]));
    assert!(p.persistent);
}

/// Split-KV is offered to the TMA kernel at every head dim: its entries, and the launch's work tiles
/// in claim order with the KV blocks each visits (a streaming head's by its sink and window).
#[test]
fn tma_plans_offer_split_kv() {
    let mut c = call_of([1, 128, 32768, 32, 8, 128], 0x1_0000_0000);
    c.cfg = AttentionConfig::all_retrieval(8);
    let split = plan(&c).unwrap().split.expect("split-KV offered");
    assert_eq!(split.entry, "duo_prefill_wgmma_tma_split_bf16_d128");
    assert_eq!(split.merge_entry, "duo_prefill_merge_bf16_d128");
    assert_eq!(split.shape.work().tile_blocks, vec![256; 32]);
    assert_eq!(split.shape.work().max_blocks, 256);
    // Half streaming: sink 64 (one block) + window 256 from the chunk's first row (keys
    // 32385.., blocks 253-255): 4 blocks for each query head of a streaming KV head.
    c.cfg = AttentionConfig::new([HeadKind::Retrieval, HeadKind::Streaming].repeat(4));
    let split = plan(&c).unwrap().split.unwrap();
    assert_eq!(
        split.shape.work().tile_blocks,
        [[256; 4], [4; 4]].concat().repeat(4)
    );
    assert_eq!(split.shape.work().max_blocks, 256);
    // All streaming: the longest tile is the window's.
    c.cfg = AttentionConfig::all_streaming(8, 64, 256);
    let split = plan(&c).unwrap().split.unwrap();
    assert_eq!(split.shape.work().max_blocks, 4);
    // D = 256 too, on 48-key blocks: a 128-query chunk at the end of 4096 keys visits 86 of
    // them for a retrieval head, 11 for a streaming one (sink 64: 2; window 256 from key 3713:
    // blocks 77-85).
    let split = plan(&call_of([1, 128, 4096, 8, 2, 256], 0x1_0000_0000))
        .unwrap()
        .split
        .expect("split-KV offered at D = 256");
    assert_eq!(split.entry, "duo_prefill_wgmma_tma_split_bf16_d256");
    assert_eq!(split.merge_entry, "duo_prefill_merge_bf16_d256");
    assert_eq!(split.shape.work().tile_blocks, [[86; 4], [11; 4]].concat());
    // Not on the other kernels.
    c.cfg = c.cfg.kernel(PrefillKernel::WgmmaWarpSpecialized);
    assert_eq!(plan(&c).unwrap().split, None);
}

/// TMA cannot address a view with a zero stride over several heads (a broadcast K): Auto falls
/// back to cp.async loads, an explicit TMA request is a typed error.
#[test]
fn broadcast_operands_fall_back_to_cp_async_loads() {
    let mut c = valid();
    c.k.strides[2] = 0;
    c.v.strides[2] = 0;
    assert_eq!(plan(&c).unwrap().entry, "duo_prefill_wgmma_ws_bf16_d64");
    assert_eq!(plan(&c).unwrap().tma, None);
    c.cfg = c.cfg.kernel(PrefillKernel::WgmmaTma);
    let err = plan(&c).expect_err("TMA cannot address a broadcast K");
    assert!(matches!(err, Error::TmaLayout { tensor: "k", .. }), "{err}");
}

/// Head dim 256 runs on the TMA kernel only: 48-key K/V boxes and three stages (Q 64 KiB + 3 x
/// 48 KiB), every other kernel a typed error, and so is an operand TMA cannot address.
#[test]
fn head_dim_256_takes_the_tma_kernel() {
    let wide = || call_of([B, SQ, SK, HQ, HKV, 256], 0x1_0000_0000);
    let p = plan(&wide()).unwrap();
    assert_eq!(p.entry, "duo_prefill_wgmma_tma_bf16_d256");
    assert_eq!(
        (p.block, p.shared_bytes),
        (384, (128 * 256 + 3 * 2 * 48 * 256) * 2 + 8 * 8 + 24 + 8)
    );
    let tma = p.tma.expect("tensor maps");
    assert_eq!(
        tma.map(|m| m.box_rows),
        [128, 48, 48, 48, 48],
        "Q boxes are a query tile, K/V boxes a KV block"
    );
    for kernel in [
        PrefillKernel::MmaSync,
        PrefillKernel::Wgmma,
        PrefillKernel::WgmmaWarpSpecialized,
    ] {
        let mut c = wide();
        c.cfg = c.cfg.kernel(kernel);
        let err = plan(&c).expect_err("only the TMA kernel takes D = 256");
        assert!(
            matches!(err, Error::UnsupportedHeadDim { head_dim: 256, .. }),
            "{kernel:?}: {err}"
        );
    }
    let mut c = wide();
    c.k.strides[2] = 0;
    c.v.strides[2] = 0;
    let err = plan(&c).expect_err("no cp.async fallback at D = 256");
    assert!(
        matches!(err, Error::WideHeadDimLayout { tensor: "k", .. }),
        "{err}"
    );
}

#[test]
fn warp_specialised_cp_async_kernel_on_request() {
    let mut c = valid();
    c.cfg = c.cfg.kernel(PrefillKernel::WgmmaWarpSpecialized);
    let p = plan(&c).unwrap();
    assert_eq!(p.entry, "duo_prefill_wgmma_ws_bf16_d64");
    assert_eq!(p.tma, None);
    // Persistent: the grid is the work space (query tiles, Hq, B), also in the parameters.
    assert!(p.persistent);
    assert_eq!(p.grid, (1, HQ as u32, B as u32));
    assert_eq!((p.params.m_blocks, p.params.batch), (1, B as i32));
    // Producer + 2 consumer warpgroups; Q (128 x 64) plus three stages of K and V (128 x 64
    // each), bf16, then 8 mbarriers, 6 work slots and the tail mbarrier.
    assert_eq!(
        (p.block, p.shared_bytes),
        (384, (128 * 64 + 3 * 2 * 128 * 64) * 2 + 8 * 8 + 24 + 8)
    );
}

#[test]
fn wgmma_kernel_without_warp_specialisation_on_request() {
    let mut c = valid();
    c.cfg = c.cfg.kernel(PrefillKernel::Wgmma);
    let p = plan(&c).unwrap();
    assert_eq!(p.entry, "duo_prefill_wgmma_bf16_d64");
    // Two warpgroups; the same tiles, no mbarriers.
    assert_eq!(
        (p.block, p.shared_bytes),
        (256, (128 * 64 + 3 * 2 * 128 * 64) * 2)
    );
}

#[test]
fn huge_sink_and_window_are_clamped_not_rejected() {
    let mut c = valid();
    c.cfg = c.cfg.sink(u32::MAX).window(u32::MAX);
    let p = plan(&c).unwrap();
    assert_eq!((p.params.sink, p.params.window), (1 << 30, 1 << 30));
}

/// A right window reaches the kernels clamped below `MAX_SEQLEN` (a position plus one plus it
/// stays inside i32); FlashAttention's `window_size` maps onto head kinds.
#[test]
fn right_windows_are_clamped_and_flash_windows_map_to_head_kinds() {
    let mut c = valid();
    c.cfg = c.cfg.right_window(u32::MAX);
    assert_eq!(plan(&c).unwrap().params.right, (1 << 30) - 1);
    c.cfg = AttentionConfig::flash(HKV, false, (127, 3)).unwrap();
    let p = plan(&c).unwrap().params;
    assert_eq!(p.streaming_heads[0], 0b11);
    assert_eq!((p.sink, p.window, p.right), (0, 128, 3));
    c.cfg = AttentionConfig::flash(HKV, true, (-1, 50)).unwrap();
    let p = plan(&c).unwrap().params;
    assert_eq!((p.streaming_heads[0], p.causal, p.right), (0, 1, 0));
    c.cfg = AttentionConfig::flash(HKV, false, (-1, -1)).unwrap();
    assert_eq!(plan(&c).unwrap().params.causal, 0);
    c.cfg = AttentionConfig::flash(HKV, false, (5, -1)).unwrap();
    assert_eq!(plan(&c).unwrap().params.right, (1 << 30) - 1);
}

/// ALiBi: the warp-specialised kernels' `_alibi_` builds at D <= 128, slopes per head or per
/// batch entry; everything else is a typed error.
#[test]
fn alibi_plans_and_rules() {
    use duo_attn::AlibiSlopes;
    let slopes = |rows: usize, heads: usize, device: u32| {
        let host = vec![0.25f32; rows * heads];
        unsafe { AlibiSlopes::from_device_ptr(0x7f00_0000_0000, device, &host, rows) }.unwrap()
    };
    let mut c = valid();
    c.cfg = c.cfg.alibi(slopes(1, HQ, DEV));
    let p = plan(&c).unwrap();
    assert_eq!(p.entry, "duo_prefill_wgmma_tma_alibi_bf16_d64");
    assert_eq!(
        p.split.as_ref().unwrap().entry,
        "duo_prefill_wgmma_tma_alibi_split_bf16_d64"
    );
    assert_eq!(
        (p.params.alibi_slopes, p.params.alibi_batch_stride),
        (0x7f00_0000_0000, 0)
    );
    assert_eq!(p.params.alibi_neg_inv_scale, -(D as f32).sqrt());
    c.cfg = c.cfg.alibi(slopes(B, HQ, DEV));
    assert_eq!(plan(&c).unwrap().params.alibi_batch_stride, HQ as i32);
    c.cfg.kernel = PrefillKernel::WgmmaWarpSpecialized;
    assert_eq!(
        plan(&c).unwrap().entry,
        "duo_prefill_wgmma_ws_alibi_bf16_d64"
    );
    for kernel in [PrefillKernel::MmaSync, PrefillKernel::Wgmma] {
        c.cfg.kernel = kernel;
        assert!(matches!(plan(&c), Err(Error::AlibiUnsupported { .. })));
    }
    let wrong = [
        (slopes(1, HQ + 1, DEV), "heads"),
        (slopes(B + 1, HQ, DEV), "rows"),
    ];
    for (s, what) in wrong {
        let mut c = valid();
        c.cfg = c.cfg.alibi(s);
        assert!(
            matches!(plan(&c), Err(Error::InvalidAlibi { .. })),
            "{what}"
        );
    }
    let mut c = valid();
    c.cfg = c.cfg.alibi(slopes(1, HQ, DEV + 1));
    assert!(matches!(plan(&c), Err(Error::WrongDevice { .. })));
    let mut c = call_of([B, SQ, SK, HQ, HKV, 256], 0x1_0000_0000);
    c.cfg = c.cfg.alibi(slopes(1, HQ, DEV));
    assert!(matches!(plan(&c), Err(Error::AlibiUnsupported { .. })));
}

#[test]
fn wrong_device() {
    assert!(matches!(
        fails(|c| c.k.device = 1),
        Error::WrongDevice {
            tensor: "k",
            tensor_device: 1,
            ..
        }
    ));
}

#[test]
fn empty_dimension() {
    assert!(matches!(
        fails(|c| c.q.shape[1] = 0),
        Error::EmptyDimension { tensor: "q", .. }
    ));
}

#[test]
fn unsupported_head_dim() {
    let err = fails(|c| {
        for t in [&mut c.q, &mut c.k, &mut c.v, &mut c.out] {
            t.shape[3] = 96;
        }
    });
    assert!(matches!(
        err,
        Error::UnsupportedHeadDim { head_dim: 96, .. }
    ));
}

#[test]
fn shape_mismatch() {
    assert!(matches!(
        fails(|c| c.v.shape[1] = SK - 1),
        Error::ShapeMismatch { tensor: "v", .. }
    ));
    assert!(matches!(
        fails(|c| c.k.shape[0] = 1),
        Error::ShapeMismatch { tensor: "k", .. }
    ));
    assert!(matches!(
        fails(|c| c.out.shape[2] = HQ - 1),
        Error::ShapeMismatch { tensor: "out", .. }
    ));
    assert!(matches!(
        fails(|c| c.lse.shape = [B, SQ, HQ]),
        Error::ShapeMismatch { tensor: "lse", .. }
    ));
}

#[test]
fn head_group_mismatch() {
    let err = fails(|c| {
        c.k.shape[2] = 3;
        c.v.shape[2] = 3;
        c.cfg.head_kinds = vec![HeadKind::Retrieval; 3];
    });
    assert!(matches!(
        err,
        Error::HeadGroupMismatch {
            heads_q: 8,
            heads_kv: 3
        }
    ));
}

#[test]
fn head_kinds_length() {
    assert!(matches!(
        fails(|c| c.cfg.head_kinds.push(HeadKind::Streaming)),
        Error::HeadKindsLength {
            got: 3,
            expected: 2
        }
    ));
}

#[test]
fn too_large() {
    let err = fails(|c| {
        c.k.shape[1] = (1 << 30) + 1;
        c.v.shape[1] = (1 << 30) + 1;
    });
    assert!(matches!(
        err,
        Error::TooLarge {
            what: "seqlen_k",
            ..
        }
    ));
}

#[test]
fn invalid_scale() {
    assert!(matches!(
        fails(|c| c.cfg.softmax_scale = Some(f32::NAN)),
        Error::InvalidScale(_)
    ));
    assert!(matches!(
        fails(|c| c.cfg.softmax_scale = Some(-1.0)),
        Error::InvalidScale(_)
    ));
}

#[test]
fn non_contiguous_head_dim() {
    assert!(matches!(
        fails(|c| c.q.strides[3] = 2),
        Error::NonContiguousHeadDim {
            tensor: "q",
            stride: 2
        }
    ));
}

#[test]
fn misaligned() {
    assert!(matches!(
        fails(|c| c.k.ptr += 2),
        Error::Misaligned {
            tensor: "k",
            what: "the base address",
            ..
        }
    ));
    let err = fails(|c| {
        // 68-element rows: 136 bytes, not a multiple of 16.
        c.v.strides = [SK * HKV * 68, HKV * 68, 68, 1];
        c.v.available = B * SK * HKV * 68;
    });
    assert!(matches!(
        err,
        Error::Misaligned {
            tensor: "v",
            what: "the head stride",
            value: 136,
            ..
        }
    ));
}

#[test]
fn out_of_bounds() {
    assert!(matches!(
        fails(|c| c.q.available -= 1),
        Error::OutOfBounds { tensor: "q", .. }
    ));
}

/// Strides whose extent overflows the address space are out of bounds, not a wrapped (and
/// then passing) bounds check or an overflow panic.
#[test]
fn overflowing_strides_are_out_of_bounds() {
    // 16-byte multiples far past any buffer; the last overflows the span and its byte size.
    for stride in [
        (usize::MAX / 2) & !7,
        (usize::MAX / 4) & !7,
        usize::MAX & !7,
    ] {
        assert!(matches!(
            fails(|c| c.k.strides[0] = stride),
            Error::OutOfBounds { tensor: "k", .. }
        ));
    }
}

#[test]
fn lse_not_contiguous() {
    let err = fails(|c| {
        c.lse.strides = [HQ * SQ * 2, SQ * 2, 2];
        c.lse.available = B * HQ * SQ * 2;
    });
    assert!(matches!(err, Error::NotContiguous { tensor: "lse", .. }));
}

#[test]
fn overlapping_output() {
    // Heads written over each other: head stride 8 < head dim 64.
    assert!(matches!(
        fails(|c| c.out.strides[2] = 8),
        Error::OverlappingOutput { tensor: "out", .. }
    ));
}

#[test]
fn aliasing() {
    assert!(matches!(
        fails(|c| c.out.ptr = c.q.ptr),
        Error::Aliasing {
            output: "out",
            input: "q"
        }
    ));
    assert!(matches!(
        fails(|c| c.lse.ptr = c.out.ptr),
        Error::Aliasing {
            output: "lse",
            input: "out"
        }
    ));
}

mod varlen {
    use super::*;
    use duo_attn::plan_prefill_varlen;

    const TOTAL_Q: usize = 300;
    const TOTAL_K: usize = 700;

    struct VarlenCall {
        q: TensorDesc<3>,
        k: TensorDesc<3>,
        v: TensorDesc<3>,
        out: TensorDesc<3>,
        lse: TensorDesc<2>,
        cu_q: Vec<i32>,
        cu_k: Vec<i32>,
    }

    fn valid() -> VarlenCall {
        let at = |i: u64| 0x7000_0000_0000 + i * 0x1_0000_0000;
        VarlenCall {
            q: TensorDesc::contiguous(at(0), [TOTAL_Q, HQ, D], 2, DEV),
            k: TensorDesc::contiguous(at(1), [TOTAL_K, HKV, D], 2, DEV),
            v: TensorDesc::contiguous(at(2), [TOTAL_K, HKV, D], 2, DEV),
            out: TensorDesc::contiguous(at(3), [TOTAL_Q, HQ, D], 2, DEV),
            lse: TensorDesc::contiguous(at(4), [HQ, TOTAL_Q], 4, DEV),
            cu_q: vec![0, 100, 100, 300],
            cu_k: vec![0, 250, 260, 700],
        }
    }

    fn plan(c: &VarlenCall) -> Result<duo_attn::PrefillPlan, Error> {
        let cfg = AttentionConfig::new(vec![HeadKind::Retrieval, HeadKind::Streaming]);
        plan_prefill_varlen::<bf16>(
            &c.q,
            &c.k,
            &c.v,
            &c.out,
            &c.lse,
            (&c.cu_q, 0x100),
            (&c.cu_k, 0x200),
            &cfg,
            DEV,
        )
    }

    #[test]
    fn valid_varlen_call_plans_one_block_column_per_sequence() {
        let p = plan(&valid()).unwrap();
        // Longest query sequence 200 rows: 2 tiles of 128; 3 sequences on grid z.
        assert_eq!(p.grid, (2, HQ as u32, 3));
        assert_eq!((p.params.seqlen_q, p.params.seqlen_k), (200, 440));
        assert_eq!(
            (p.params.cu_seqlens_q, p.params.cu_seqlens_k),
            (0x100, 0x200)
        );
        assert_eq!((p.params.ends_k, p.params.ends_k_stream), (0x204, 0x204));
        assert_eq!(p.params.q_strides, [0, (HQ * D) as i64, D as i64]);
        assert_eq!(p.params.lse_strides, [0, TOTAL_Q as i64]);
    }

    /// Varlen launches split like fixed-length ones: partial rows in the LSE's packed order
    /// (`[1, Hq, total_q]`), work counted per sequence (empty ones count nothing).
    #[test]
    fn varlen_plans_offer_split_kv() {
        let split = plan(&valid()).unwrap().split.expect("split-KV offered");
        let rows = duo_attn::PartialRows {
            batch: 1,
            heads_q: HQ,
            seqlen_q: TOTAL_Q,
        };
        assert_eq!(split.rows, rows);
        // Sequences (100 x 250), (0 x 10), (200 x 440) keys, D = 64 (128-key blocks); query
        // heads 0-3 retrieval, 4-7 streaming (sink 64, window 256), two query tiles each. The
        // empty sequence and sequence 0's second tile list 0 blocks.
        let seq0 = [0, 2];
        let seq2_retrieval = [4, 3]; // rows 128..200 see keys ..440, rows 0..128 ..368
        let seq2_streaming = [4, 3]; // the window reaches back past the sink
        let want: Vec<u32> = [
            [seq0; 8].concat(),
            vec![0; 16],
            [[seq2_retrieval; 4].concat(), [seq2_streaming; 4].concat()].concat(),
        ]
        .concat();
        assert_eq!(split.shape.work().tile_blocks, want);
        assert_eq!(split.shape.work().max_blocks, 4);
    }

    fn fails(edit: impl FnOnce(&mut VarlenCall)) -> Error {
        let mut c = valid();
        edit(&mut c);
        let err = plan(&c).expect_err("the call should have been rejected");
        eprintln!("rejected: {err}");
        err
    }

    #[test]
    fn invalid_cu_seqlens() {
        let which = |e: Error| match e {
            Error::InvalidCuSeqlens { which, .. } => which,
            other => panic!("expected InvalidCuSeqlens, got {other}"),
        };
        assert_eq!(which(fails(|c| c.cu_q = vec![0])), "cu_seqlens_q");
        assert_eq!(which(fails(|c| c.cu_q = vec![1, 100, 300])), "cu_seqlens_q");
        assert_eq!(
            which(fails(|c| c.cu_k = vec![0, 300, 260, 700])),
            "cu_seqlens_k"
        );
        assert_eq!(which(fails(|c| c.cu_q = vec![0, 100, 299])), "cu_seqlens_q");
        assert_eq!(which(fails(|c| c.cu_k = vec![0, 700])), "cu_seqlens_k");
    }

    #[test]
    fn packed_tensors_get_the_fixed_length_checks() {
        assert!(matches!(
            fails(|c| c.v.shape[0] = TOTAL_K - 1),
            Error::ShapeMismatch { tensor: "v", .. }
        ));
        assert!(matches!(
            fails(|c| c.lse.shape = [TOTAL_Q, HQ]),
            Error::ShapeMismatch { tensor: "lse", .. }
        ));
        assert!(matches!(
            fails(|c| c.out.ptr = c.q.ptr),
            Error::Aliasing {
                output: "out",
                input: "q"
            }
        ));
    }
}

/// The persistent kernel numbers its work tiles (query tiles x heads x sequences) in i32 (with
/// headroom for the blocks' final claims): a call with more is an error, not a wrapped index.
/// 65535 sequences x 64 heads x 513 query tiles.
#[test]
fn too_many_work_tiles() {
    let sq = 512 * 128 + 1;
    let c = call_of([65535, sq, sq, 64, 2, 64], 0x4000_0000_0000);
    let err = plan(&c).expect_err("the call should have been rejected");
    eprintln!("rejected: {err}");
    assert!(matches!(
        err,
        Error::TooLarge {
            what: "the number of prefill work tiles (query tiles x heads x sequences)",
            ..
        }
    ));
    // The non-persistent kernels index by grid coordinates and take it.
    let mut c = c;
    c.cfg = c.cfg.kernel(PrefillKernel::Wgmma);
    assert!(plan(&c).is_ok());
}

/// At D = 256 (48-key blocks) the replayed split choice, whose constants were fitted at D = 128,
/// picks the counts measured fastest on an H100 (session 19, docs/perf-log.md): four splits for
/// a 128-query chunk at 32k or 128k keys, alone or as varlen batches of 4 or 8 chunks (where 2
/// and 6 ran within 1% of 4), and no split for 512-query chunks.
#[test]
fn d256_split_choices_match_the_measured_best() {
    let choose = |batch: usize, sq: usize, sk: usize| {
        let lens: Vec<(usize, usize)> = (0..batch).map(|i| (sq, sk * (i + 1) / batch)).collect();
        let (mut cq, mut ck) = (vec![0i32], vec![0i32]);
        for &(q, k) in &lens {
            cq.push(cq[cq.len() - 1] + q as i32);
            ck.push(ck[ck.len() - 1] + k as i32);
        }
        let (tq, tk) = (cq[batch] as usize, ck[batch] as usize);
        let at = |i: u64| 0x7000_0000_0000 + i * 0x10_0000_0000;
        let plan = duo_attn::plan_prefill_varlen::<bf16>(
            &TensorDesc::contiguous(at(0), [tq, 32, 256], 2, DEV),
            &TensorDesc::contiguous(at(1), [tk, 8, 256], 2, DEV),
            &TensorDesc::contiguous(at(2), [tk, 8, 256], 2, DEV),
            &TensorDesc::contiguous(at(3), [tq, 32, 256], 2, DEV),
            &TensorDesc::contiguous(at(4), [32, tq], 4, DEV),
            (&cq, at(5)),
            (&ck, at(6)),
            &AttentionConfig::all_retrieval(8),
            DEV,
        )
        .unwrap();
        let split = plan.split.expect("split-KV offered at D = 256");
        duo_attn::split_kv::SplitChoices::default().choose(&split, 132)
    };
    for sk in [32768, 131072] {
        assert_eq!(choose(1, 128, sk), 4, "one 128-query chunk at {sk}");
        assert_eq!(choose(4, 128, sk), 4, "4 x 128 at {sk}");
        assert!([2, 4, 6].contains(&choose(8, 128, sk)), "8 x 128 at {sk}");
        assert_eq!(choose(4, 512, sk), 1, "4 x 512 at {sk}");
        assert_eq!(choose(8, 512, sk), 1, "8 x 512 at {sk}");
    }
}

/// A KV-cache prefill plans a varlen launch whose keys start at row 0 of each batch entry and end
/// at the device counts, with the tail guard on; paged adds the block table. Paged K/V need the
/// TMA kernel and pages of whole KV blocks (so not head dim 256).
#[test]
fn kvcache_prefill_plans_and_rules() {
    use duo_attn::{KvCacheDesc, plan_prefill_kvcache};
    let at = |i: u64| 0x7000_0000_0000 + i * 0x1_0000_0000;
    let (total, s_max) = (10, 512);
    let plan_with = |d: usize, page: Option<usize>, kernel: PrefillKernel| {
        let q = TensorDesc::contiguous(at(0), [total, HQ, d], 2, DEV);
        let out = TensorDesc::contiguous(at(1), [total, HQ, d], 2, DEV);
        let lse = TensorDesc::contiguous(at(2), [HQ, total], 4, DEV);
        let cfg =
            AttentionConfig::new(vec![HeadKind::Retrieval, HeadKind::Streaming]).kernel(kernel);
        let cu = ([0, 4, 10], at(3));
        let lens = ([300, 512], at(4));
        let (pages, rows) = page.map_or((2, s_max), |page| (16, page));
        let k = TensorDesc::contiguous(at(5), [pages, rows, HKV, d], 2, DEV);
        let v = TensorDesc::contiguous(at(6), [pages, rows, HKV, d], 2, DEV);
        let table = TensorDesc::contiguous(at(7), [2, s_max / rows], 4, DEV);
        let cache = match page {
            None => KvCacheDesc::Contiguous { k: &k, v: &v },
            Some(_) => KvCacheDesc::Paged {
                k_pages: &k,
                v_pages: &v,
                block_table: &table,
            },
        };
        let (cu, lens) = ((&cu.0[..], cu.1), (&lens.0[..], lens.1));
        plan_prefill_kvcache::<bf16>(&q, cache, &out, &lse, cu, lens, &cfg, DEV)
    };
    let p = plan_with(128, None, PrefillKernel::Auto).unwrap();
    assert!(p.zero_key_starts);
    assert_eq!(p.entry, "duo_prefill_wgmma_tma_cache_bf16_d128");
    assert_eq!(
        p.split.as_ref().map(|s| s.entry.as_str()),
        Some("duo_prefill_wgmma_tma_cache_split_bf16_d128")
    );
    assert_eq!(
        (
            p.params.cu_seqlens_q,
            p.params.ends_k,
            p.params.ends_k_stream
        ),
        (at(3), at(4), at(4))
    );
    assert_eq!(p.params.page_table, 0);
    assert_eq!((p.params.seqlen_q, p.params.seqlen_k), (6, 512));
    let p = plan_with(64, Some(256), PrefillKernel::Auto).unwrap();
    assert_eq!(p.entry, "duo_prefill_wgmma_tma_cache_bf16_d64");
    assert_eq!(
        (
            p.params.page_table,
            p.params.page_table_stride,
            p.params.page_shift
        ),
        (at(7), 2, 8)
    );
    // The pages' tensor map: rows of one page, a page per batch index.
    assert_eq!(p.tma.unwrap()[1].dims, [64, 256, HKV as u64, 16]);
    for (d, page, kernel) in [
        (256, 256, PrefillKernel::Auto),
        (128, 64, PrefillKernel::Auto),
        (128, 128, PrefillKernel::MmaSync),
        (128, 128, PrefillKernel::WgmmaWarpSpecialized),
    ] {
        let err = plan_with(d, Some(page), kernel).unwrap_err();
        eprintln!("rejected: {err}");
        assert!(matches!(err, Error::InvalidPagedKv { .. }), "{err}");
    }
}

/// Prefill over a caller's KV cache takes ALiBi on its own cache builds (`_cache_alibi_`), one
/// row of slopes or one per sequence; head dim 256 has no ALiBi build: a typed error.
#[test]
fn kvcache_prefill_takes_alibi() {
    use duo_attn::{AlibiSlopes, KvCacheDesc, plan_prefill_kvcache};
    let at = |i: u64| 0x7000_0000_0000 + i * 0x1_0000_0000;
    let plan = |d: usize, rows: usize, paged: bool| {
        let q = TensorDesc::contiguous(at(0), [10, HQ, d], 2, DEV);
        let out = TensorDesc::contiguous(at(1), [10, HQ, d], 2, DEV);
        let lse = TensorDesc::contiguous(at(2), [HQ, 10], 4, DEV);
        let (k, v) = if paged {
            (
                TensorDesc::contiguous(at(5), [8, 128, HKV, d], 2, DEV),
                TensorDesc::contiguous(at(6), [8, 128, HKV, d], 2, DEV),
            )
        } else {
            (
                TensorDesc::contiguous(at(5), [2, 512, HKV, d], 2, DEV),
                TensorDesc::contiguous(at(6), [2, 512, HKV, d], 2, DEV),
            )
        };
        let table = TensorDesc::contiguous(at(7), [2, 4], 4, DEV);
        let host = vec![0.5; rows * HQ];
        let slopes = unsafe { AlibiSlopes::from_device_ptr(at(8), DEV, &host, rows) }.unwrap();
        let cfg = AttentionConfig::all_retrieval(HKV).alibi(slopes);
        let cache = if paged {
            KvCacheDesc::Paged {
                k_pages: &k,
                v_pages: &v,
                block_table: &table,
            }
        } else {
            KvCacheDesc::Contiguous { k: &k, v: &v }
        };
        let (cu, lens) = ((&[0, 4, 10][..], at(3)), (&[300, 512][..], at(4)));
        plan_prefill_kvcache::<bf16>(&q, cache, &out, &lse, cu, lens, &cfg, DEV)
    };
    for (rows, paged) in [(1, false), (2, false), (2, true)] {
        let p = plan(128, rows, paged).unwrap();
        assert_eq!(p.entry, "duo_prefill_wgmma_tma_cache_alibi_bf16_d128");
        assert_ne!(p.params.alibi_slopes, 0);
        let stride = if rows == 1 { 0 } else { HQ as i32 };
        assert_eq!(p.params.alibi_batch_stride, stride);
        if let Some(split) = p.split {
            assert_eq!(
                split.entry,
                "duo_prefill_wgmma_tma_cache_alibi_split_bf16_d128"
            );
        }
    }
    let err = plan(128, 3, false).unwrap_err();
    assert!(matches!(err, Error::InvalidAlibi { .. }), "{err}");
    let err = plan(256, 1, false).unwrap_err();
    assert!(matches!(err, Error::AlibiUnsupported { .. }), "{err}");
}
