//! CPU tests of the decode side: head-pattern parsing and binarisation, cache configuration
//! checks, ring sizes and memory accounting. No GPU needed.
use duo_attn::{
    Binarize, CacheConfig, CachePaging, DuoCache, Error, HeadKind, HeadPattern, PrefillKernel,
    cache_memory, ring_slots,
};
use half::bf16;
use std::path::PathBuf;

const R: HeadKind = HeadKind::Retrieval;
const S: HeadKind = HeadKind::Streaming;

fn shipped_pattern() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../patterns/demo-8l-8h")
}

#[test]
fn shipped_pattern_loads_and_binarises() {
    let p = HeadPattern::load(shipped_pattern()).unwrap();
    assert_eq!((p.layers(), p.heads()), (8, 8));
    assert_eq!((p.sink, p.recent), (Some(64), Some(256)));
    assert!(
        p.gates.iter().flatten().all(|g| (0.0..=1.0).contains(g)),
        "clipped into [0, 1]"
    );
    p.check_model(8, 8).unwrap();

    assert!(
        p.gates.iter().flatten().filter(|&&g| g == 0.0).count() > 16,
        "ties at 0"
    );
    for sparsity in [0.25, 0.5, 0.75] {
        let kinds = p.head_kinds(Binarize::Sparsity(sparsity)).unwrap();
        let streaming = kinds.iter().flatten().filter(|&&k| k == S).count();
        // ceil(s * (N - 1)) heads, even though over a quarter of the gates tie at 0.
        assert_eq!(
            streaming,
            (sparsity * 63.0f64).ceil() as usize,
            "sparsity {sparsity}"
        );
        let cut = p.threshold(Binarize::Sparsity(sparsity)).unwrap();
        for (row, kinds) in p.gates.iter().zip(&kinds) {
            for (g, k) in row.iter().zip(kinds) {
                // Never a gate above the cut made streaming, nor one below it kept.
                assert!(!(*k == S && *g > cut || *k == R && *g < cut));
            }
        }
    }
    let all_r = p.head_kinds(Binarize::Sparsity(0.0)).unwrap();
    assert!(all_r.iter().flatten().all(|&k| k == R));
    let all_s = p.head_kinds(Binarize::Sparsity(1.0)).unwrap();
    assert!(all_s.iter().flatten().all(|&k| k == S));
    let by_threshold = p.head_kinds(Binarize::Threshold(0.5)).unwrap();
    for (row, kinds) in p.gates.iter().zip(&by_threshold) {
        for (g, k) in row.iter().zip(kinds) {
            assert_eq!(*k == R, *g >= 0.5);
        }
    }
}

#[test]
fn pattern_errors_are_clear() {
    let err = |text: &str| HeadPattern::parse_tsv(text).unwrap_err().to_string();
    assert!(err("0.5\t0.5\n0.5\n").contains("ragged"));
    assert!(err("0.5\t1.5\n").contains("outside [0, 1]"));
    assert!(err("0.5\t-0.2\n").contains("outside [0, 1]"));
    assert!(err("0.5\tabc\n").contains("not a number"));
    assert!(err("\n\n").contains("empty"));
    let p = HeadPattern::parse_tsv("0.1\t0.9\n0.2\t0.8\n").unwrap();
    assert!(
        p.check_model(3, 2)
            .unwrap_err()
            .to_string()
            .contains("2 layers x 2 KV heads")
    );
    assert!(p.check_model(2, 4).is_err());
    assert!(matches!(
        p.head_kinds(Binarize::Sparsity(1.5)),
        Err(Error::Pattern(_))
    ));
    assert!(matches!(
        p.head_kinds(Binarize::Threshold(f64::NAN)),
        Err(Error::Pattern(_))
    ));
    assert!(matches!(
        HeadPattern::load("/nonexistent/duo-pattern"),
        Err(Error::PatternIo { .. })
    ));
}

fn config() -> CacheConfig {
    CacheConfig {
        batch: 2,
        max_len: 1000,
        heads_q: 8,
        heads_kv: 4,
        head_dim: 128,
        sink: 64,
        window: 256,
        softmax_scale: None,
        prefill_kernel: PrefillKernel::Auto,
        paging: None,
    }
}

#[test]
fn memory_accounting_matches_the_arithmetic() {
    let cfg = config();
    let kinds = vec![vec![R, S, S, S], vec![S, S, S, S], vec![R, R, R, R]];
    let m = cache_memory(&cfg, &kinds, 2);
    let token = 2 * 128 * 2 * 2; // B * D * bf16 bytes * (K and V)
    let slots = 64 + 256 + 15;
    assert_eq!(ring_slots(64, 256, 1000), (64, 271));
    assert_eq!(
        m.full_bytes,
        token * 1000 * (1 + 4) /* retrieval heads: layers 0 and 2 */
    );
    assert_eq!(
        m.ring_bytes,
        token * slots * (3 + 4) /* streaming heads: layers 0 and 1 */
    );
    assert_eq!(m.all_full_bytes, token * 1000 * 12);
    let saving = 1.0 - (5.0 * 1000.0 + 7.0 * slots as f64) / 12000.0;
    assert!((m.saving() - saving).abs() < 1e-12);
}

#[test]
fn cache_config_errors() {
    let check = |f: fn(&mut CacheConfig), kinds: Vec<Vec<HeadKind>>| {
        let mut cfg = config();
        f(&mut cfg);
        DuoCache::<bf16>::check(&cfg, &kinds)
    };
    let ok = || vec![vec![R, S, R, S]];
    check(|_| {}, ok()).unwrap();
    assert!(matches!(
        check(|c| c.head_dim = 96, ok()),
        Err(Error::UnsupportedHeadDim { head_dim: 96, .. })
    ));
    // D = 256 prefills only on the TMA kernel.
    assert!(matches!(
        check(
            |c| {
                c.head_dim = 256;
                c.prefill_kernel = PrefillKernel::MmaSync;
            },
            ok()
        ),
        Err(Error::UnsupportedHeadDim { head_dim: 256, .. })
    ));
    check(|c| c.head_dim = 256, ok()).unwrap();
    assert!(matches!(
        check(|c| c.heads_q = 6, ok()),
        Err(Error::HeadGroupMismatch { .. })
    ));
    assert!(matches!(
        check(|c| c.window = 0, ok()),
        Err(Error::InvalidCacheConfig(_))
    ));
    assert!(matches!(
        check(|c| c.batch = 0, ok()),
        Err(Error::InvalidCacheConfig(_))
    ));
    assert!(matches!(
        check(|_| {}, vec![vec![R, S]]),
        Err(Error::InvalidCacheConfig(_))
    ));
    assert!(matches!(
        check(|_| {}, vec![]),
        Err(Error::InvalidCacheConfig(_))
    ));
    // A bad scale fails at creation, not at the first call.
    for scale in [f32::NAN, f32::INFINITY, 0.0, -1.0] {
        let mut cfg = config();
        cfg.softmax_scale = Some(scale);
        let err = DuoCache::<bf16>::check(&cfg, &ok());
        assert!(
            matches!(err, Err(Error::InvalidScale(_))),
            "{scale}: {err:?}"
        );
    }
    // Absurd sizes: the memory report saturates rather than overflows.
    let mut cfg = config();
    (cfg.batch, cfg.max_len) = (usize::MAX / 2, usize::MAX / 2);
    assert_eq!(cache_memory(&cfg, &ok(), 2).all_full_bytes, usize::MAX);
}

#[test]
fn paged_memory_counts_the_pools() {
    let cfg = CacheConfig {
        paging: Some(CachePaging {
            page_size: 256,
            pages: 3,
        }),
        ..config()
    };
    let kinds = vec![vec![R, S, S, S], vec![R, R, R, R]];
    let m = cache_memory(&cfg, &kinds, 2);
    // Each retrieval head of each layer holds a pool of 3 x 256 rows of K and V, whatever the
    // batch; the rings and the all-full baseline are as without paging.
    assert_eq!(m.full_bytes, 3 * 256 * 128 * 2 * 2 * 5);
    assert_eq!(m.ring_bytes, cache_memory(&config(), &kinds, 2).ring_bytes);
    assert_eq!(m.all_full_bytes, 2 * 128 * 2 * 2 * 1000 * 8);
}

#[test]
fn paged_cache_config_errors() {
    let check = |f: fn(&mut CacheConfig)| {
        let mut cfg = config();
        cfg.paging = Some(CachePaging {
            page_size: 128,
            pages: 8,
        });
        f(&mut cfg);
        DuoCache::<bf16>::check(&cfg, &[vec![R, S, R, S]])
    };
    check(|_| {}).unwrap();
    check(|c| c.head_dim = 64).unwrap();
    let bad = |f: fn(&mut CacheConfig), what: &str| {
        let err = check(f);
        assert!(
            matches!(err, Err(Error::InvalidCacheConfig(_))),
            "{what}: {err:?}"
        );
    };
    bad(|c| c.head_dim = 256, "48-key blocks at D = 256");
    bad(
        |c| c.paging.as_mut().unwrap().page_size = 64,
        "a page smaller than a KV block",
    );
    bad(
        |c| c.paging.as_mut().unwrap().page_size = 384,
        "not a power of two",
    );
    bad(|c| c.paging.as_mut().unwrap().pages = 0, "an empty pool");
    bad(
        |c| c.prefill_kernel = PrefillKernel::WgmmaWarpSpecialized,
        "pages need TMA",
    );
}
