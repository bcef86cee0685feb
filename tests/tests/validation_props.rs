//! Property tests of the planning layer (no GPU): random calls, most of them valid ones bent by a
//! few random edits (a dimension, a stride, a pointer, a length, a config value set to something
//! odd or absurd). Whatever comes in, planning returns a typed error or a plan, never a panic
//! (overflow included: the tests run with overflow checks in debug builds), and every plan keeps
//! the kernel inside the memory it was given: the largest offset each operand's kernel
//! parameters can reach, and every tensor map's extent, lie inside that operand's allocation.
use duo_attn::{
    AlibiSlopes, AttentionConfig, Binarize, CacheConfig, CachePaging, DuoCache, HeadKind,
    HeadPattern, KvCacheDesc, PrefillKernel, PrefillPlan, TensorDesc, cache_memory, plan_prefill,
    plan_prefill_kvcache, plan_prefill_varlen,
};
use half::bf16;
use proptest::prelude::*;
use proptest::test_runner::Config;

const DEV: u32 = 0;
/// Fake device addresses: each operand in its own 2^44-byte region, so that no two overlap
/// unless an edit makes them.
const REGION: u64 = 1 << 44;

/// A dimension an edit may set: small, typical, or absurd.
fn odd_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..=3,
        Just(63usize),
        Just(64),
        Just(128),
        Just(129),
        Just(256),
        Just(512),
        1usize..5000,
        Just(1 << 31),
        Just(1 << 40),
        Just(usize::MAX / 3),
        Just(usize::MAX),
    ]
}

fn odd_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..=3,
        1u32..5000,
        Just(1 << 30),
        Just(i32::MAX as u32),
        Just(u32::MAX)
    ]
}

fn any_kernel() -> impl Strategy<Value = PrefillKernel> {
    prop_oneof![
        4 => Just(PrefillKernel::Auto),
        1 => Just(PrefillKernel::MmaSync),
        1 => Just(PrefillKernel::Wgmma),
        1 => Just(PrefillKernel::WgmmaWarpSpecialized),
        1 => Just(PrefillKernel::WgmmaTma),
    ]
}

/// The config part of a call: head kinds (one per KV head), sink, window, causal, scale,
/// kernel, split count.
#[derive(Clone, Debug)]
struct Knobs {
    streaming: Vec<bool>,
    sink: u32,
    window: u32,
    right: u32,
    causal: bool,
    scale: Option<f32>,
    kernel: PrefillKernel,
    kv_splits: Option<usize>,
    /// ALiBi slopes: (rows, query heads past the call's); the rows from 1 to 3, whatever the
    /// batch, and now and then a head too many.
    alibi: Option<(usize, usize)>,
}

fn knobs(heads_kv: usize) -> impl Strategy<Value = Knobs> {
    (
        prop::collection::vec(any::<bool>(), heads_kv),
        prop_oneof![3 => 0u32..300, 1 => odd_u32()],
        prop_oneof![3 => 0u32..3000, 1 => odd_u32()],
        prop_oneof![4 => Just(0u32), 1 => 0u32..500, 1 => odd_u32()],
        any::<bool>(),
        prop_oneof![
            16 => Just(None),
            4 => (0.01f32..1.0).prop_map(Some),
            1 => prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(-1.0f32), Just(0.0f32)]
                .prop_map(Some),
        ],
        any_kernel(),
        prop_oneof![3 => Just(None), 1 => (0usize..300).prop_map(Some)],
        prop_oneof![
            3 => Just(None),
            1 => (1usize..4, prop_oneof![4 => Just(0usize), 1 => Just(1usize)]).prop_map(Some),
        ],
    )
        .prop_map(
            |(streaming, sink, window, right, causal, scale, kernel, kv_splits, alibi)| Knobs {
                streaming,
                sink,
                window,
                right,
                causal,
                scale,
                kernel,
                kv_splits,
                alibi,
            },
        )
}

impl Knobs {
    /// The config of a call with `hq` query heads.
    fn config(&self, hq: usize) -> AttentionConfig {
        let kinds = self
            .streaming
            .iter()
            .map(|&s| match s {
                true => HeadKind::Streaming,
                false => HeadKind::Retrieval,
            })
            .collect();
        let mut cfg = AttentionConfig::new(kinds)
            .sink(self.sink)
            .window(self.window)
            .right_window(self.right)
            .causal(self.causal)
            .kernel(self.kernel)
            .kv_splits(self.kv_splits);
        if let Some(scale) = self.scale {
            cfg = cfg.softmax_scale(scale);
        }
        if let Some((rows, extra)) = self.alibi {
            let host = vec![0.5; rows * (hq + extra)];
            let at = 0x1000_0000 + 9 * REGION;
            let slopes = unsafe { AlibiSlopes::from_device_ptr(at, DEV, &host, rows) };
            cfg = cfg.alibi(slopes.expect("valid slopes"));
        }
        cfg
    }
}

/// A plan with ALiBi reads slope `b * alibi_batch_stride + h` for every batch entry (or varlen
/// sequence) `b < batch` and query head `h < hq`: all inside the slopes given.
fn alibi_inside(
    plan: &PrefillPlan,
    cfg: &AttentionConfig,
    batch: usize,
    hq: usize,
) -> Result<(), TestCaseError> {
    let p = &plan.params;
    match &cfg.alibi {
        None => prop_assert_eq!(p.alibi_slopes, 0),
        Some(a) => {
            prop_assert_ne!(p.alibi_slopes, 0);
            let last = (batch.max(1) - 1) * p.alibi_batch_stride as usize + hq - 1;
            prop_assert!(
                last < a.rows() * a.heads(),
                "slope {last} of {}",
                a.host().len()
            );
        }
    }
    Ok(())
}

/// One random edit of a tensor descriptor.
#[derive(Clone, Debug)]
enum Edit {
    Dim(usize, usize),
    Stride(usize, usize),
    /// Fewer elements available than the shape spans.
    Shrink(usize),
    /// A pointer off 16-byte alignment, or at another operand's region (aliasing).
    Ptr(u64),
    ElemBytes(usize),
    Device(u32),
}

fn edit(rank: usize) -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0..rank, odd_dim()).prop_map(|(i, n)| Edit::Dim(i, n)),
        (0..rank, odd_dim()).prop_map(|(i, s)| Edit::Stride(i, s)),
        (1usize..1000).prop_map(Edit::Shrink),
        prop_oneof![
            (1u64..16).prop_map(|o| o * 2),
            (0u64..6).prop_map(|r| r * REGION),
            any::<u64>(),
        ]
        .prop_map(Edit::Ptr),
        prop_oneof![Just(1usize), Just(4), Just(8)].prop_map(Edit::ElemBytes),
        (1u32..3).prop_map(Edit::Device),
    ]
}

fn apply<const N: usize>(t: &mut TensorDesc<N>, e: &Edit) {
    match *e {
        Edit::Dim(i, n) => t.shape[i % N] = n,
        Edit::Stride(i, s) => t.strides[i % N] = s,
        Edit::Shrink(n) => t.available = t.available.saturating_sub(n),
        Edit::Ptr(p) => {
            // Small values move the pointer within its region; others replace it.
            t.ptr = if p < 64 { t.ptr + p } else { p }
        }
        Edit::ElemBytes(b) => t.elem_bytes = b,
        Edit::Device(d) => t.device = d,
    }
}

/// Up to `count` edits (none in half the calls), each aimed at one of `tensors` operands.
fn edits(tensors: usize, count: usize) -> impl Strategy<Value = Vec<(usize, Edit)>> {
    prop_oneof![
        Just(Vec::new()),
        prop::collection::vec((0..tensors, edit(4)), 1..=count)
    ]
}

/// Byte range `[start, end)` of an allocation.
fn allocation<const N: usize>(t: &TensorDesc<N>) -> (u128, u128) {
    let start = t.ptr as u128;
    (
        start,
        start + (t.available as u128) * (t.elem_bytes as u128),
    )
}

/// The largest element offset `base + sum (n_i - 1) * s_i` (+ the row's `d` elements) reaches,
/// from kernel parameters (element strides), checked against `t`'s allocation in bytes.
fn inside<const N: usize>(
    what: &str,
    t: &TensorDesc<N>,
    ptr: u64,
    extents: &[(i64, i64)],
    row: i64,
) -> Result<(), TestCaseError> {
    let mut last: i128 = 0;
    for &(n, s) in extents {
        prop_assert!(n >= 1 && s >= 0, "{what}: extent {n} or stride {s}");
        last += (n as i128 - 1) * s as i128;
    }
    let elem = t.elem_bytes as i128;
    let start = ptr as i128;
    let end = start + (last + row as i128) * elem;
    let (lo, hi) = allocation(t);
    prop_assert!(
        start >= lo as i128 && end <= hi as i128,
        "{what}: the kernel may touch bytes {start:#x}..{end:#x}, outside {lo:#x}..{hi:#x}"
    );
    Ok(())
}

/// Every tensor map's box walk stays inside the allocation of the operand it reads.
fn maps_inside(plan: &PrefillPlan, operands: [&TensorDesc<4>; 5]) -> Result<(), TestCaseError> {
    let Some(maps) = plan.tma else {
        return Ok(());
    };
    for (map, t) in maps.iter().zip(operands) {
        let mut last = map.base as u128;
        for (&n, &s) in map.dims[1..].iter().zip(&map.strides) {
            prop_assert!(n >= 1, "tensor map extent {n}");
            last += (n as u128 - 1) * s as u128;
        }
        let end = last + map.dims[0] as u128 * t.elem_bytes as u128;
        let (lo, hi) = allocation(t);
        prop_assert!(
            map.base as u128 >= lo && end <= hi,
            "tensor map {map:?} reaches {end:#x}, outside {lo:#x}..{hi:#x}"
        );
    }
    Ok(())
}

/// A valid fixed-length call's descriptors: `[B, S, H, D]` q/k/v/out and `[B, Hq, Sq]` lse.
fn fixed_call(
    (b, sq, sk, hkv, group, d): (usize, usize, usize, usize, usize, usize),
) -> ([TensorDesc<4>; 4], TensorDesc<3>) {
    let at = |i: u64| 0x1000_0000 + i * REGION;
    let hq = hkv * group;
    (
        [
            TensorDesc::contiguous(at(0), [b, sq, hq, d], 2, DEV),
            TensorDesc::contiguous(at(1), [b, sk, hkv, d], 2, DEV),
            TensorDesc::contiguous(at(2), [b, sk, hkv, d], 2, DEV),
            TensorDesc::contiguous(at(3), [b, sq, hq, d], 2, DEV),
        ],
        TensorDesc::contiguous(at(4), [b, hq, sq], 4, DEV),
    )
}

fn shapes() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize)> {
    (
        1usize..4,
        1usize..600,
        1usize..2000,
        1usize..5,
        prop_oneof![Just(1usize), Just(2), Just(4)],
        prop_oneof![4 => Just(128usize), 2 => Just(64), 1 => Just(256), 1 => Just(96)],
    )
}

/// A fixed-length plan's parameters against the descriptors it was planned from.
fn fixed_plan_inside(
    plan: &PrefillPlan,
    [q, k, v, out]: &[TensorDesc<4>; 4],
    lse: &TensorDesc<3>,
) -> Result<(), TestCaseError> {
    let p = &plan.params;
    let d = q.shape[3] as i64;
    let b = p.batch.max(1) as i64;
    prop_assert_eq!(q.strides[3], 1);
    let rows =
        |n: i32, s: &[i64; 3], heads: i32| [(b, s[0]), (n as i64, s[1]), (heads as i64, s[2])];
    inside("q", q, p.q, &rows(p.seqlen_q, &p.q_strides, p.heads_q), d)?;
    inside("k", k, p.k, &rows(p.seqlen_k, &p.k_strides, p.heads_kv), d)?;
    inside("v", v, p.v, &rows(p.seqlen_k, &p.v_strides, p.heads_kv), d)?;
    inside(
        "out",
        out,
        p.o,
        &rows(p.seqlen_q, &p.o_strides, p.heads_q),
        d,
    )?;
    let stream = p.seqlen_k_stream;
    if stream > 0 {
        inside(
            "stream k",
            k,
            p.stream_k,
            &rows(stream, &p.stream_k_strides, p.heads_kv),
            d,
        )?;
        inside(
            "stream v",
            v,
            p.stream_v,
            &rows(stream, &p.stream_v_strides, p.heads_kv),
            d,
        )?;
    }
    inside(
        "lse",
        lse,
        p.lse,
        &[(b, p.lse_strides[0]), (p.heads_q as i64, p.lse_strides[1])],
        p.seqlen_q as i64,
    )?;
    maps_inside(plan, [q, k, v, k, v])?;
    let (gx, gy, gz) = plan.grid;
    prop_assert!(gx >= 1 && (1..=65535).contains(&gy) && (1..=65535).contains(&gz));
    prop_assert!(plan.block <= 1024 && plan.shared_bytes <= 227 * 1024);
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: 768, ..Config::default() })]

    /// Fixed-length prefill: an error or a plan inside its operands, never a panic.
    #[test]
    fn fixed_length_plans_stay_inside_their_operands(
        (shape, kn, ed) in shapes().prop_flat_map(|s| (Just(s), knobs(s.3), edits(5, 3)))
    ) {
        let (mut t4, mut lse) = fixed_call(shape);
        for (which, e) in &ed {
            match which {
                4 => apply(&mut lse, e),
                i => apply(&mut t4[*i], e),
            }
        }
        let cfg = kn.config(shape.3 * shape.4);
        let [q, k, v, out] = &t4;
        if let Ok(plan) = plan_prefill::<bf16>(q, k, v, out, &lse, &cfg, DEV) {
            fixed_plan_inside(&plan, &t4, &lse)?;
            alibi_inside(&plan, &cfg, q.shape[0], q.shape[2])?;
        }
    }

    /// Varlen prefill with random prefix sums (out of order, negative, past the tensors):
    /// an error or a plan, never a panic; a plan's sequences lie inside the packed tensors.
    #[test]
    fn varlen_plans_reject_bad_prefix_sums_without_panicking(
        (shape, kn) in shapes().prop_flat_map(|s| (Just(s), knobs(s.3))),
        lens_q in prop::collection::vec(0i32..300, 1..5),
        lens_k in prop::collection::vec(0i32..900, 1..5),
        bend in prop_oneof![
            2 => Just(None),
            1 => (0usize..6, prop_oneof![Just(-1i32), Just(i32::MAX), Just(i32::MIN), 0i32..2000])
                .prop_map(Some),
        ],
        spare in prop_oneof![3 => Just(0usize), 1 => 1usize..3],
    ) {
        let (_, _, _, hkv, group, d) = shape;
        let hq = hkv * group;
        let sums = |lens: &[i32]| -> Vec<i32> {
            std::iter::once(0).chain(lens.iter().scan(0i32, |acc, &n| { *acc += n; Some(*acc) })).collect()
        };
        let (mut cu_q, mut cu_k) = (sums(&lens_q), sums(&lens_k));
        cu_k.resize(cu_q.len(), *cu_k.last().unwrap());
        let total_q = *cu_q.last().unwrap() as usize + spare;
        let total_k = *cu_k.last().unwrap() as usize + spare;
        if let Some((i, x)) = bend {
            let which = if i % 2 == 0 { &mut cu_q } else { &mut cu_k };
            let n = which.len();
            which[(i / 2) % n] = x;
        }
        let at = |i: u64| 0x1000_0000 + i * REGION;
        let q = TensorDesc::contiguous(at(0), [total_q, hq, d], 2, DEV);
        let k = TensorDesc::contiguous(at(1), [total_k, hkv, d], 2, DEV);
        let v = TensorDesc::contiguous(at(2), [total_k, hkv, d], 2, DEV);
        let out = TensorDesc::contiguous(at(3), [total_q, hq, d], 2, DEV);
        let lse = TensorDesc::contiguous(at(4), [hq, total_q], 4, DEV);
        let cfg = kn.config(hq);
        let planned = plan_prefill_varlen::<bf16>(
            &q, &k, &v, &out, &lse, (&cu_q, at(5)), (&cu_k, at(5) + 4096), &cfg, DEV,
        );
        if let Ok(plan) = &planned {
            alibi_inside(plan, &cfg, cu_q.len() - 1, hq)?;
        }
        if planned.is_ok() {
            for w in cu_q.windows(2).chain(cu_k.windows(2)) {
                prop_assert!(0 <= w[0] && w[0] <= w[1]);
            }
            prop_assert!(*cu_q.last().unwrap() as usize <= total_q);
            prop_assert!(*cu_k.last().unwrap() as usize <= total_k);
        }
    }

    /// Prefill over a caller's KV cache, contiguous or paged, with random key counts, table
    /// shapes and edits: an error or a plan, never a panic; a plan's counts fit the cache.
    #[test]
    fn kv_cache_plans_reject_bad_counts_without_panicking(
        (shape, kn, ed) in shapes().prop_flat_map(|s| (Just(s), knobs(s.3), edits(4, 2))),
        lens_q in prop::collection::vec(1i32..200, 1..4),
        paged in any::<bool>(),
        page_log in prop_oneof![3 => 7u32..10, 1 => 4u32..7],
        pages in 1usize..40,
        table_cols in prop_oneof![0usize..12, Just(1 << 40)],
        // Key counts as a share of what each sequence can hold past its queries, or odd ones.
        counts in prop::collection::vec(
            prop_oneof![6 => (0.0f64..=1.0).prop_map(Ok), 1 => prop_oneof![Just(-1i32), Just(i32::MAX), 0i32..5000].prop_map(Err)],
            4,
        ),
    ) {
        let (_, _, s_max, hkv, group, d) = shape;
        let hq = hkv * group;
        let batch = lens_q.len();
        let page = 1usize << page_log;
        let cu_q: Vec<i32> = std::iter::once(0)
            .chain(lens_q.iter().scan(0, |a, &n| { *a += n; Some(*a) }))
            .collect();
        let total_q = *cu_q.last().unwrap() as usize;
        let capacity = match paged {
            true => table_cols.saturating_mul(page),
            false => s_max,
        };
        let counts: Vec<i32> = counts[..batch]
            .iter()
            .zip(&lens_q)
            .map(|(c, &n)| match *c {
                Ok(share) => {
                    let room = capacity.min(1 << 20).saturating_sub(n as usize) as f64;
                    n + (share * room) as i32
                }
                Err(x) => x,
            })
            .collect();
        let counts = &counts[..];
        let at = |i: u64| 0x1000_0000 + i * REGION;
        let mut t = if paged {
            [
                TensorDesc::contiguous(at(1), [pages, page, hkv, d], 2, DEV),
                TensorDesc::contiguous(at(2), [pages, page, hkv, d], 2, DEV),
            ]
        } else {
            [
                TensorDesc::contiguous(at(1), [batch, s_max, hkv, d], 2, DEV),
                TensorDesc::contiguous(at(2), [batch, s_max, hkv, d], 2, DEV),
            ]
        };
        let mut q = TensorDesc::contiguous(at(0), [total_q, hq, d], 2, DEV);
        let mut out = TensorDesc::contiguous(at(3), [total_q, hq, d], 2, DEV);
        for (which, e) in &ed {
            match which {
                0 => apply(&mut q, e),
                3 => apply(&mut out, e),
                i => apply(&mut t[*i - 1], e),
            }
        }
        let lse = TensorDesc::contiguous(at(4), [hq, total_q], 4, DEV);
        let table = TensorDesc::contiguous(at(5), [batch, table_cols], 4, DEV);
        let [k, v] = &t;
        let cache = match paged {
            true => KvCacheDesc::Paged { k_pages: k, v_pages: v, block_table: &table },
            false => KvCacheDesc::Contiguous { k, v },
        };
        let cfg = kn.config(hq);
        let planned = plan_prefill_kvcache::<bf16>(
            &q, cache, &out, &lse, (&cu_q, at(6)), (counts, at(7)), &cfg, DEV,
        );
        if let Ok(plan) = &planned {
            alibi_inside(plan, &cfg, batch, hq)?;
        }
        if planned.is_ok() {
            let capacity = match paged {
                true => table_cols.saturating_mul(k.shape[1]),
                false => k.shape[1],
            };
            for &n in counts {
                prop_assert!(n >= 0 && n as usize <= capacity, "count {n} of {capacity}");
            }
        }
    }

    /// DuoAttention cache sizes, sensible or absurd: the check returns a typed error or passes,
    /// and the memory arithmetic saturates rather than panics; a checked config's counts fit.
    #[test]
    fn cache_configs_check_without_panicking(
        batch in odd_dim(),
        max_len in odd_dim(),
        heads_kv in prop_oneof![1usize..9, odd_dim()],
        group in prop_oneof![Just(1usize), Just(4), odd_dim()],
        head_dim in odd_dim(),
        sink in odd_u32(),
        window in odd_u32(),
        scale in prop_oneof![3 => Just(None), 1 => any::<f32>().prop_map(Some)],
        kernel in any_kernel(),
        paging in prop::option::of((odd_dim(), odd_dim())),
        layers in 0usize..4,
        kinds_seed in any::<u64>(),
    ) {
        let cfg = CacheConfig {
            batch,
            max_len,
            heads_q: heads_kv.saturating_mul(group),
            heads_kv,
            head_dim,
            sink,
            window,
            softmax_scale: scale,
            prefill_kernel: kernel,
            paging: paging.map(|(page_size, pages)| CachePaging { page_size, pages }),
        };
        let width = (heads_kv.min(300) + (kinds_seed % 3) as usize).saturating_sub(1);
        let kinds: Vec<Vec<HeadKind>> = (0..layers)
            .map(|l| {
                (0..width)
                    .map(|h| match (kinds_seed >> ((l * 7 + h) % 64)) & 1 {
                        0 => HeadKind::Retrieval,
                        _ => HeadKind::Streaming,
                    })
                    .collect()
            })
            .collect();
        let memory = cache_memory(&cfg, &kinds, 2);
        let _ = (memory.total_bytes(), memory.saving());
        if DuoCache::<bf16>::check(&cfg, &kinds).is_ok() {
            prop_assert!(cfg.batch >= 1 && cfg.max_len >= 1 && cfg.window >= 1);
            prop_assert_eq!(cfg.heads_q % cfg.heads_kv, 0);
            prop_assert!(kinds.iter().all(|k| k.len() == cfg.heads_kv) && !kinds.is_empty());
            prop_assert!(cfg.softmax_scale.is_none_or(|s| s.is_finite() && s > 0.0));
        }
    }

    /// A pattern built by hand (empty, ragged, NaN or out-of-range gates) and any binarisation:
    /// a typed error or head kinds of the gates' shape, with exactly the asked-for sparsity.
    #[test]
    fn hand_built_patterns_binarise_without_panicking(
        gates in prop::collection::vec(
            prop::collection::vec(
                prop_oneof![8 => 0.0f64..=1.0, 1 => Just(0.0), 1 => Just(f64::NAN), 1 => -2.0f64..3.0],
                0..6,
            ),
            0..5,
        ),
        how in prop_oneof![
            (-0.5f64..1.5).prop_map(Binarize::Sparsity),
            Just(Binarize::Sparsity(f64::NAN)),
            (-0.5f64..1.5).prop_map(Binarize::Threshold),
            Just(Binarize::Threshold(f64::INFINITY)),
        ],
    ) {
        let pattern = HeadPattern { gates: gates.clone(), sink: None, recent: None };
        if let Ok(kinds) = pattern.head_kinds(how) {
            prop_assert_eq!(kinds.len(), gates.len());
            for (k, g) in kinds.iter().zip(&gates) {
                prop_assert_eq!(k.len(), g.len());
            }
            if let Binarize::Sparsity(s) = how {
                let n = gates.iter().map(Vec::len).sum::<usize>();
                let streaming = kinds.iter().flatten().filter(|&&k| k == HeadKind::Streaming).count();
                let want = match s {
                    s if s <= 0.0 => 0,
                    s if s >= 1.0 => n,
                    s => (s * (n - 1) as f64).ceil() as usize,
                };
                prop_assert_eq!(streaming, want);
            }
        }
    }

    /// A gate file of arbitrary text: parsed or a typed error, never a panic.
    #[test]
    fn pattern_text_never_panics(text in "[0-9.eE+\\-\t \n,a-z]{0,200}") {
        let _ = HeadPattern::parse_tsv(&text);
    }
}
