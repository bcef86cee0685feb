//! Device-side primitives over inline PTX: special registers, shared memory, barriers, warp
//! shuffles, fast math and global/shared loads and stores. Everything is `#[inline(always)]`:
//! the PTX module must hold no calls. Later wgmma/TMA/mbarrier wrappers go beside these.
use core::arch::asm;

macro_rules! special_reg {
    ($(#[$doc:meta])* $name:ident, $reg:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name() -> u32 {
            let r: u32;
            unsafe { asm!(concat!("mov.u32 {r}, ", $reg, ";"), r = out(reg32) r, options(pure, nomem, nostack)) };
            r
        }
    };
}

special_reg!(/// Thread index in the block (x).
    thread_idx_x, "%tid.x");
special_reg!(/// Block index in the grid (x).
    block_idx_x, "%ctaid.x");
special_reg!(/// Block index in the grid (y).
    block_idx_y, "%ctaid.y");
special_reg!(/// Block index in the grid (z).
    block_idx_z, "%ctaid.z");
special_reg!(/// Grid size in blocks (x).
    grid_dim_x, "%nctaid.x");
special_reg!(/// Lane index in the warp.
    lane_id, "%laneid");
special_reg!(/// This block's rank in its cluster (0 in a launch without clusters).
    cluster_cta_rank, "%cluster_ctarank");
special_reg!(/// Blocks in this block's cluster (1 in a launch without clusters).
    cluster_blocks, "%cluster_nctarank");

/// Declares `BYTES` of static shared memory for the calling kernel and returns its shared-window
/// address. Call it once per kernel (the PTX name is function-scoped; a second call in the same
/// kernel is an assembler error, not a silent alias).
#[inline(always)]
pub fn shared_memory_base<const BYTES: usize>() -> u32 {
    let r: u32;
    unsafe {
        asm!(
            ".shared .align 128 .b8 duo_smem[{n}];",
            "mov.u32 {r}, duo_smem;",
            n = const BYTES,
            r = out(reg32) r,
            options(pure, nomem, nostack),
        )
    };
    r
}

/// Block-wide barrier (`bar.sync 0`); also orders shared-memory accesses.
#[inline(always)]
pub fn sync_threads() {
    unsafe { asm!("bar.sync 0;", options(nostack)) };
}

/// Butterfly shuffle across the full warp.
#[inline(always)]
pub fn shfl_xor_f32(v: f32, lane_mask: u32) -> f32 {
    let r: f32;
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 0x1f, 0xffffffff;",
            r = out(reg32) r, v = in(reg32) v, m = in(reg32) lane_mask, options(nomem, nostack))
    };
    r
}

/// The max of `v` over the warp, in every lane (butterfly).
#[inline(always)]
pub fn warp_max_f32(v: f32) -> f32 {
    let mut m = v;
    for mask in [16, 8, 4, 2, 1] {
        m = max_f32(m, shfl_xor_f32(m, mask));
    }
    m
}

/// The sum of `v` over the warp, in every lane (butterfly).
#[inline(always)]
pub fn warp_sum_f32(v: f32) -> f32 {
    let mut total = v;
    for mask in [16, 8, 4, 2, 1] {
        total += shfl_xor_f32(total, mask);
    }
    total
}

/// The max of `v` over each aligned group of `width` lanes (a power of two up to 32), in every
/// lane of the group (butterfly, nearest lanes first).
#[inline(always)]
pub fn lane_group_max_f32(v: f32, width: usize) -> f32 {
    let (mut m, mut lanes) = (v, 1);
    while lanes < width {
        m = max_f32(m, shfl_xor_f32(m, lanes as u32));
        lanes *= 2;
    }
    m
}

/// The sum of `v` over each aligned group of `width` lanes (a power of two up to 32), in every
/// lane of the group (butterfly, nearest lanes first).
#[inline(always)]
pub fn lane_group_sum_f32(v: f32, width: usize) -> f32 {
    let (mut total, mut lanes) = (v, 1);
    while lanes < width {
        total += shfl_xor_f32(total, lanes as u32);
        lanes *= 2;
    }
    total
}

/// Lane `src`'s `v`, for every lane.
#[inline(always)]
pub fn shfl_idx_f32(v: f32, src: u32) -> f32 {
    let r: f32;
    unsafe {
        asm!("shfl.sync.idx.b32 {r}, {v}, {s}, 0x1f, 0xffffffff;",
            r = out(reg32) r, v = in(reg32) v, s = in(reg32) src, options(nomem, nostack))
    };
    r
}

/// `if c { a } else { b }` as one `selp`: never a branch, which LLVM makes of selects between
/// arrays, and which diverges when `c` differs between lanes.
#[inline(always)]
pub fn select_u32(c: bool, a: u32, b: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!(
            "{{ .reg .pred p;",
            "setp.ne.u32 p, {c}, 0;",
            "selp.b32 {r}, {a}, {b}, p; }}",
            r = out(reg32) r, c = in(reg32) c as u32, a = in(reg32) a, b = in(reg32) b,
            options(pure, nomem, nostack),
        )
    };
    r
}

/// Butterfly shuffle of a 32-bit word across the full warp.
#[inline(always)]
pub fn shfl_xor_u32(v: u32, lane_mask: u32) -> u32 {
    shfl_xor_f32(f32::from_bits(v), lane_mask).to_bits()
}

/// `v`, hidden from LLVM (a register move in asm): a loop counted by it keeps one copy of its
/// body, where a known small trip count gets fully unrolled. No memory, unlike `black_box`.
#[inline(always)]
pub fn opaque_i32(v: i32) -> i32 {
    let out: i32;
    unsafe {
        asm!("mov.b32 {o}, {i};", o = out(reg32) out, i = in(reg32) v, options(pure, nomem, nostack))
    };
    out
}

/// `v`, opaque to LLVM where it is read (a volatile `mov`): a test of a loop-invariant parameter
/// then stays at its use instead of being hoisted to the kernel's entry, where its result would
/// live through every loop as a predicate, which ptxas does not rematerialize from the parameter.
/// (`opaque_i32` is `pure`, so LLVM may still hoist it.)
#[inline(always)]
pub fn fresh_u32(v: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!("mov.b32 {r}, {v};", r = out(reg32) r, v = in(reg32) v, options(nomem, nostack))
    };
    r
}

/// Lane 0's `v`, broadcast to the warp (`shfl.sync.idx`). Branching on the result tells ptxas the
/// condition is warp-uniform (how CUTLASS picks warpgroup roles).
#[inline(always)]
pub fn warp_broadcast_u32(v: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!("shfl.sync.idx.b32 {r}, {v}, 0, 0x1f, 0xffffffff;",
            r = out(reg32) r, v = in(reg32) v, options(nomem, nostack))
    };
    r
}

/// Whether `c` holds in any lane of the warp (`vote.sync.any`). The result is warp-uniform, so a
/// branch on it never diverges.
#[inline(always)]
pub fn warp_any(c: bool) -> bool {
    let r: u32;
    unsafe {
        asm!(
            "{{ .reg .pred p, q;",
            "setp.ne.u32 p, {c}, 0;",
            "vote.sync.any.pred q, p, 0xffffffff;",
            "selp.u32 {r}, 1, 0, q; }}",
            r = out(reg32) r, c = in(reg32) c as u32, options(nomem, nostack),
        )
    };
    r != 0
}

/// 2^x with the SFU (`ex2.approx.ftz`); exact for `-inf` (gives 0).
#[inline(always)]
pub fn exp2_approx(x: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!("ex2.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack))
    };
    r
}

/// `a * b + c` with one rounding (`fma.rn.f32`).
#[inline(always)]
pub fn fma_f32(a: f32, b: f32, c: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!("fma.rn.f32 {r}, {a}, {b}, {c};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, c = in(reg32) c, options(pure, nomem, nostack))
    };
    r
}

/// `a - |b|` (`abs.f32` then `sub.rn.f32`, which ptxas folds into one FADD with an operand
/// modifier; LLVM writes a plain `abs` as an integer AND, a LOP3 of its own).
#[inline(always)]
pub fn sub_abs_f32(a: f32, b: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!(
            "{{ .reg .f32 t; abs.f32 t, {b}; sub.rn.f32 {r}, {a}, t; }}",
            r = out(reg32) r, a = in(reg32) a, b = in(reg32) b,
            options(pure, nomem, nostack)
        )
    };
    r
}

/// log2(x) with the SFU (`lg2.approx.ftz`).
#[inline(always)]
pub fn log2_approx(x: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!("lg2.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack))
    };
    r
}

/// Fast reciprocal (`rcp.approx.ftz`).
#[inline(always)]
pub fn rcp_approx(x: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!("rcp.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack))
    };
    r
}

#[inline(always)]
pub fn max_f32(a: f32, b: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!("max.f32 {r}, {a}, {b};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, options(pure, nomem, nostack))
    };
    r
}

/// Converts two f32 to a packed bf16x2 (`lo` in the low half), round to nearest even.
#[inline(always)]
pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    unsafe {
        asm!("cvt.rn.bf16x2.f32 {r}, {hi}, {lo};", r = out(reg32) r, hi = in(reg32) hi, lo = in(reg32) lo, options(pure, nomem, nostack))
    };
    r
}

/// Converts two f32 to a packed f16x2 (`lo` in the low half), round to nearest even.
#[inline(always)]
pub fn pack_f16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    unsafe {
        asm!("cvt.rn.f16x2.f32 {r}, {hi}, {lo};", r = out(reg32) r, hi = in(reg32) hi, lo = in(reg32) lo, options(pure, nomem, nostack))
    };
    r
}

/// A packed bf16x2 to two f32 (low half first): a bf16 is the top half of its f32.
#[inline(always)]
pub fn unpack_bf16x2(x: u32) -> [f32; 2] {
    [f32::from_bits(x << 16), f32::from_bits(x & 0xffff_0000)]
}

/// A packed f16x2 to two f32 (low half first), exactly.
#[inline(always)]
pub fn unpack_f16x2(x: u32) -> [f32; 2] {
    let (lo, hi): (f32, f32);
    unsafe {
        asm!(
            "{{ .reg .b16 l, h; mov.b32 {{l, h}}, {x}; cvt.f32.f16 {lo}, l; cvt.f32.f16 {hi}, h; }}",
            x = in(reg32) x, lo = out(reg32) lo, hi = out(reg32) hi,
            options(pure, nomem, nostack)
        )
    };
    [lo, hi]
}

/// Loads of four 32-bit values by one vector instruction `$op` from address `addr` (`$addr`
/// in register class `$reg`): global vector loads and `ldmatrix ... .x4`.
macro_rules! load_x4 {
    ($(#[$doc:meta])* $name:ident, $addr:ty, $reg:ident, $ty:ty, $op:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name(addr: $addr) -> [$ty; 4] {
            let (a, b, c, d): ($ty, $ty, $ty, $ty);
            unsafe {
                asm!(concat!($op, " {{{a}, {b}, {c}, {d}}}, [{p}];"),
                    a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
                    p = in($reg) addr, options(readonly, nostack))
            };
            [a, b, c, d]
        }
    };
}

// 16-byte global loads of four 32-bit values (address 16-byte aligned), one per cache operator.
load_x4!(
    /// Read-only (non-coherent cache) load: for inputs no block of the kernel writes.
    ld_global_nc_v4,
    u64,
    reg64,
    u32,
    "ld.global.nc.v4.u32"
);
load_x4!(
    /// Plain (coherent) load: for data this kernel may write, such as the rows an in-place
    /// kernel reads and then overwrites.
    ld_global_v4,
    u64,
    reg64,
    u32,
    "ld.global.v4.u32"
);
load_x4!(
    /// Cached in L2 only: for data other blocks of the same kernel wrote.
    ld_global_cg_v4_f32,
    u64,
    reg64,
    f32,
    "ld.global.cg.v4.f32"
);

load_x4!(
    /// 16-byte shared-memory load of four f32 (address 16-byte aligned).
    ld_shared_v4_f32,
    u32,
    reg32,
    f32,
    "ld.shared.v4.f32"
);

load_x4!(
    /// 16-byte load of four f32 from a cluster block's shared memory (an address from
    /// [`map_shared_to_rank`]).
    ld_shared_cluster_v4_f32,
    u32,
    reg32,
    f32,
    "ld.shared::cluster.v4.f32"
);

/// Load of one f32 from a cluster block's shared memory (an address from [`map_shared_to_rank`]).
#[inline(always)]
pub unsafe fn ld_shared_cluster_f32(addr: u32) -> f32 {
    let r: f32;
    unsafe {
        asm!("ld.shared::cluster.f32 {r}, [{p}];", r = out(reg32) r, p = in(reg32) addr,
            options(readonly, nostack))
    };
    r
}

/// The address in the cluster's shared window of offset `addr` (this block's shared memory) in
/// cluster block `rank`'s shared memory (`mapa`).
#[inline(always)]
pub fn map_shared_to_rank(addr: u32, rank: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!("mapa.shared::cluster.u32 {r}, {a}, {k};", r = out(reg32) r, a = in(reg32) addr,
            k = in(reg32) rank, options(pure, nomem, nostack))
    };
    r
}

/// Cluster-wide barrier: every thread of every block of the cluster arrives (releasing its
/// shared-memory writes) and waits (acquiring the others'). Every thread must call it, converged.
#[inline(always)]
pub fn cluster_sync() {
    unsafe {
        asm!(
            "barrier.cluster.arrive.release.aligned;",
            "barrier.cluster.wait.acquire.aligned;",
            options(nostack)
        )
    };
}

/// [`ld_global_cg_v4_f32`] under a predicate, without a branch: zeros where `pred` is false (and
/// nothing read, so `addr` need not be valid then).
#[inline(always)]
pub unsafe fn ld_global_cg_v4_f32_if(pred: bool, addr: u64) -> [f32; 4] {
    let (mut a, mut b, mut c, mut d) = (0f32, 0f32, 0f32, 0f32);
    unsafe {
        asm!(
            "{{ .reg .pred p;",
            "setp.ne.u32 p, {q}, 0;",
            "@p ld.global.cg.v4.f32 {{{a}, {b}, {c}, {d}}}, [{p}]; }}",
            q = in(reg32) pred as u32, p = in(reg64) addr,
            a = inout(reg32) a, b = inout(reg32) b, c = inout(reg32) c, d = inout(reg32) d,
            options(readonly, nostack),
        )
    };
    [a, b, c, d]
}

/// 4-byte read-only global load (address must be 4-byte aligned).
#[inline(always)]
pub unsafe fn ld_global_nc_u32(addr: u64) -> u32 {
    let r: u32;
    unsafe {
        asm!("ld.global.nc.u32 {r}, [{p}];", r = out(reg32) r, p = in(reg64) addr, options(readonly, nostack))
    };
    r
}

/// 4-byte coherent global load: for data kernels write (the non-coherent path may serve a stale
/// line within one launch).
#[inline(always)]
pub unsafe fn ld_global_u32(addr: u64) -> u32 {
    let r: u32;
    unsafe {
        asm!("ld.global.u32 {r}, [{p}];", r = out(reg32) r, p = in(reg64) addr, options(readonly, nostack))
    };
    r
}

#[inline(always)]
pub unsafe fn st_global_u32(addr: u64, v: u32) {
    unsafe {
        asm!("st.global.u32 [{p}], {v};", p = in(reg64) addr, v = in(reg32) v, options(nostack))
    };
}

/// `st.global.u32` under a predicate, without a branch: callers between warpgroup MMAs use it so
/// that ptxas sees no divergent path touching the accumulators (which would serialize wgmma).
#[inline(always)]
pub unsafe fn st_global_u32_if(pred: bool, addr: u64, v: u32) {
    unsafe {
        asm!(
            "{{ .reg .pred p;",
            "setp.ne.u32 p, {c}, 0;",
            "@p st.global.u32 [{p}], {v}; }}",
            c = in(reg32) pred as u32, p = in(reg64) addr, v = in(reg32) v, options(nostack),
        )
    };
}

/// 16-byte `st.global.v4` under a predicate, without a branch (see `st_global_u32_if`); `addr`
/// must be 16-byte aligned.
#[inline(always)]
pub unsafe fn st_global_v4_u32_if(pred: bool, addr: u64, v: [u32; 4]) {
    unsafe {
        asm!(
            "{{ .reg .pred p;",
            "setp.ne.u32 p, {c}, 0;",
            "@p st.global.v4.u32 [{p}], {{{a}, {b}, {d}, {e}}}; }}",
            c = in(reg32) pred as u32, p = in(reg64) addr,
            a = in(reg32) v[0], b = in(reg32) v[1], d = in(reg32) v[2], e = in(reg32) v[3],
            options(nostack),
        )
    };
}

/// `st.global.v2.f32` under a predicate, without a branch (see `st_global_u32_if`).
#[inline(always)]
pub unsafe fn st_global_v2_f32_if(pred: bool, addr: u64, v: [f32; 2]) {
    unsafe {
        asm!(
            "{{ .reg .pred p;",
            "setp.ne.u32 p, {c}, 0;",
            "@p st.global.v2.f32 [{p}], {{{a}, {b}}}; }}",
            c = in(reg32) pred as u32, p = in(reg64) addr,
            a = in(reg32) v[0], b = in(reg32) v[1],
            options(nostack),
        )
    };
}

/// `st.global` of an f32 under a predicate, without a branch (see `st_global_u32_if`).
#[inline(always)]
pub unsafe fn st_global_f32_if(pred: bool, addr: u64, v: f32) {
    unsafe { st_global_u32_if(pred, addr, v.to_bits()) }
}

/// 16-byte global store of four f32 (address 16-byte aligned).
#[inline(always)]
pub unsafe fn st_global_v4_f32(addr: u64, v: [f32; 4]) {
    unsafe {
        asm!("st.global.v4.f32 [{p}], {{{a}, {b}, {c}, {d}}};",
            p = in(reg64) addr, a = in(reg32) v[0], b = in(reg32) v[1], c = in(reg32) v[2], d = in(reg32) v[3],
            options(nostack))
    };
}

#[inline(always)]
pub unsafe fn st_global_f32(addr: u64, v: f32) {
    unsafe {
        asm!("st.global.f32 [{p}], {v};", p = in(reg64) addr, v = in(reg32) v, options(nostack))
    };
}

#[inline(always)]
pub unsafe fn st_shared_v4(addr: u32, v: [u32; 4]) {
    unsafe {
        asm!("st.shared.v4.u32 [{p}], {{{a}, {b}, {c}, {d}}};",
            p = in(reg32) addr, a = in(reg32) v[0], b = in(reg32) v[1], c = in(reg32) v[2], d = in(reg32) v[3],
            options(nostack))
    };
}

#[inline(always)]
pub unsafe fn st_shared_u16(addr: u32, v: u16) {
    unsafe {
        asm!("st.shared.u16 [{p}], {v};", p = in(reg32) addr, v = in(reg16) v, options(nostack))
    };
}

#[inline(always)]
pub unsafe fn ld_shared_u32(addr: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!("ld.shared.u32 {r}, [{p}];", r = out(reg32) r, p = in(reg32) addr, options(readonly, nostack))
    };
    r
}

/// Name of the module-scope dynamic shared memory array. `.extern .shared` cannot be declared
/// inside a function, so the kernel build (`duo-attn-kernel-build`) adds
/// `.extern .shared .align 1024 .b8 duo_dyn_smem[];` to the PTX module.
pub const DYNAMIC_SMEM_SYMBOL: &str = "duo_dyn_smem";

/// Shared-window address of the dynamic shared memory (1024-byte aligned, as 128-byte swizzled
/// wgmma/TMA tiles need).
#[inline(always)]
pub fn dynamic_shared_base() -> u32 {
    let r: u32;
    unsafe { asm!("mov.u32 {r}, duo_dyn_smem;", r = out(reg32) r, options(pure, nomem, nostack)) };
    r
}

/// Asynchronous 16-byte global-to-shared copy that zero-fills the bytes past `src_bytes`
/// (`src_bytes = 0` writes 16 zeros and reads nothing).
#[inline(always)]
pub unsafe fn cp_async_16(dst: u32, src: u64, src_bytes: u32) {
    unsafe {
        asm!("cp.async.cg.shared.global [{d}], [{s}], 16, {n};",
            d = in(reg32) dst, s = in(reg64) src, n = in(reg32) src_bytes, options(nostack))
    };
}

/// Closes the group of cp.async issued since the last commit.
#[inline(always)]
pub fn cp_async_commit() {
    unsafe { asm!("cp.async.commit_group;", options(nostack)) };
}

/// Waits until at most `N` committed cp.async groups are still in flight.
#[inline(always)]
pub fn cp_async_wait<const N: u32>() {
    unsafe { asm!("cp.async.wait_group {n};", n = const N, options(nostack)) };
}

/// Makes this thread's generic-proxy shared-memory writes visible to the async proxy (wgmma,
/// TMA); put it before the barrier that hands the data to them.
#[inline(always)]
pub fn fence_proxy_async_shared() {
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack)) };
}

/// Initialises an mbarrier in shared memory expecting `count` arrivals per phase.
#[inline(always)]
pub unsafe fn mbarrier_init(addr: u32, count: u32) {
    unsafe {
        asm!("mbarrier.init.shared::cta.b64 [{a}], {c};", a = in(reg32) addr, c = in(reg32) count, options(nostack))
    };
}

/// One arrival on an mbarrier.
#[inline(always)]
pub unsafe fn mbarrier_arrive(addr: u32) {
    unsafe {
        asm!("mbarrier.arrive.shared::cta.b64 _, [{a}];", a = in(reg32) addr, options(nostack))
    };
}

/// Arrives on the mbarrier once every cp.async this thread issued so far has landed (the arrival
/// is counted against the barrier's expected count: `.noinc`).
#[inline(always)]
pub unsafe fn cp_async_mbarrier_arrive(addr: u32) {
    unsafe {
        asm!("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [{a}];", a = in(reg32) addr, options(nostack))
    };
}

/// One arrival on an mbarrier that also expects `bytes` more bytes of bulk (TMA) copies to land in
/// the current phase.
#[inline(always)]
pub unsafe fn mbarrier_arrive_expect_tx(addr: u32, bytes: u32) {
    unsafe {
        asm!("mbarrier.arrive.expect_tx.shared::cta.b64 _, [{a}], {b};", a = in(reg32) addr,
            b = in(reg32) bytes, options(nostack))
    };
}

/// TMA load of one box of a rank-4 tensor map (`map`: generic address of the 64-byte aligned
/// map in parameter, constant or global space) at coordinates `c` (innermost first) into shared
/// memory at `dst`; completes `mbar`'s transaction count by the box's bytes. Coordinates past the
/// tensor's extent read zeros.
#[inline(always)]
pub unsafe fn tma_load_4d(dst: u32, map: u64, mbar: u32, c: [i32; 4]) {
    unsafe {
        asm!(
            "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [{d}], [{m}, {{{c0}, {c1}, {c2}, {c3}}}], [{b}];",
            d = in(reg32) dst, m = in(reg64) map, b = in(reg32) mbar,
            c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
            options(nostack)
        )
    };
}

/// Starts fetching a tensor map into the TMA unit's descriptor cache.
#[inline(always)]
pub unsafe fn prefetch_tensormap(map: u64) {
    unsafe { asm!("prefetch.tensormap [{m}];", m = in(reg64) map, options(nostack)) };
}

/// Blocks until the mbarrier's phase with the given parity has completed.
#[inline(always)]
pub unsafe fn mbarrier_wait(addr: u32, parity: u32) {
    loop {
        let done: u32;
        unsafe {
            asm!(
                "{{ .reg .pred p;",
                "mbarrier.try_wait.parity.shared::cta.b64 p, [{a}], {ph};",
                "selp.u32 {d}, 1, 0, p; }}",
                a = in(reg32) addr, ph = in(reg32) parity, d = out(reg32) done, options(nostack),
            )
        };
        if done != 0 {
            break;
        }
    }
}

/// Syncs the warp's lanes (and orders their shared-memory accesses).
#[inline(always)]
pub fn sync_warp() {
    unsafe { asm!("bar.warp.sync 0xffffffff;", options(nostack)) };
}

/// Waits at named barrier `id` until `threads` threads (arrivals included) have reached it.
#[inline(always)]
pub fn named_barrier_sync(id: u32, threads: u32) {
    unsafe {
        asm!("bar.sync {i}, {n};", i = in(reg32) id, n = in(reg32) threads, options(nostack))
    };
}

/// Arrives at named barrier `id` without waiting.
#[inline(always)]
pub fn named_barrier_arrive(id: u32, threads: u32) {
    unsafe {
        asm!("bar.arrive {i}, {n};", i = in(reg32) id, n = in(reg32) threads, options(nostack))
    };
}

/// Lowers this warpgroup's register allocation to `N` (all its threads must execute it).
#[inline(always)]
pub fn setmaxnreg_dec<const N: u32>() {
    unsafe { asm!("setmaxnreg.dec.sync.aligned.u32 {n};", n = const N, options(nostack)) };
}

/// Raises this warpgroup's register allocation to `N` (all its threads must execute it).
#[inline(always)]
pub fn setmaxnreg_inc<const N: u32>() {
    unsafe { asm!("setmaxnreg.inc.sync.aligned.u32 {n};", n = const N, options(nostack)) };
}

// `ldmatrix ... .x4` variants: four 8x8 16-bit matrices from shared memory, lanes 8i..8i+7
// giving the row addresses of matrix i.
load_x4!(
    /// Transposed: each thread receives elements `[2t][g]`, `[2t+1][g]` of each matrix
    /// (`g = lane / 4`, `t = lane % 4`), which is the mma B fragment of a row-major [k][n] tile.
    ldmatrix_x4_trans,
    u32,
    reg32,
    u32,
    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"
);
load_x4!(
    /// The `mma` m16n8k16 A fragment when the matrices are (rows 0-7 | 8-15) x (k 0-7 | 8-15).
    ldmatrix_x4,
    u32,
    reg32,
    u32,
    "ldmatrix.sync.aligned.m8n8.x4.shared.b16"
);

#[inline(always)]
pub unsafe fn st_global_v4(addr: u64, v: [u32; 4]) {
    unsafe {
        asm!("st.global.v4.u32 [{p}], {{{a}, {b}, {c}, {d}}};",
            p = in(reg64) addr, a = in(reg32) v[0], b = in(reg32) v[1], c = in(reg32) v[2], d = in(reg32) v[3],
            options(nostack))
    };
}

#[inline(always)]
pub unsafe fn st_shared_f32(addr: u32, v: f32) {
    unsafe {
        asm!("st.shared.f32 [{p}], {v};", p = in(reg32) addr, v = in(reg32) v, options(nostack))
    };
}

/// Two f32 to 8-byte-aligned shared memory in one access.
#[inline(always)]
pub unsafe fn st_shared_v2_f32(addr: u32, v: [f32; 2]) {
    unsafe {
        asm!("st.shared.v2.f32 [{p}], {{{a}, {b}}};",
            p = in(reg32) addr, a = in(reg32) v[0], b = in(reg32) v[1], options(nostack))
    };
}

#[inline(always)]
pub unsafe fn ld_shared_f32(addr: u32) -> f32 {
    let r: f32;
    unsafe {
        asm!("ld.shared.f32 {r}, [{p}];", r = out(reg32) r, p = in(reg32) addr, options(readonly, nostack))
    };
    r
}

/// As [`cp_async_16`], with a 128-byte L2 prefetch hint, for streaming reads of long contiguous
/// rows (decode). The 256-byte hint made the H200's L2 serve half the requests from prefetched
/// sectors and decode read 1.5-4% slower (no hint was level with it); on an H100 all three are
/// level (docs/perf-log.md, session 14).
#[inline(always)]
pub unsafe fn cp_async_16_prefetch(dst: u32, src: u64, src_bytes: u32) {
    unsafe {
        asm!("cp.async.cg.shared.global.L2::128B [{d}], [{s}], 16, {n};",
            d = in(reg32) dst, s = in(reg64) src, n = in(reg32) src_bytes, options(nostack))
    };
}

/// Orders this thread's earlier memory accesses before its later ones for every thread of the GPU
/// (`__threadfence()`).
#[inline(always)]
pub fn fence_acq_rel_gpu() {
    unsafe { asm!("fence.acq_rel.gpu;", options(nostack)) };
}

/// The start of every kernel: lets the next kernel on the stream launch
/// (`griddepcontrol.launch_dependents`), then waits until the kernels before this one have
/// finished and their memory is visible (`griddepcontrol.wait`). Launched with programmatic
/// stream serialization (the host's default), a kernel's blocks are then scheduled while the
/// previous kernel's last blocks still run, and the launch latency between the two is hidden.
/// Without that attribute both instructions do nothing. Every entry calls this before it touches
/// global memory (a read may see the previous kernel's output, a write may race its reads); the
/// `ptx` test checks that every entry holds the wait.
#[inline(always)]
pub fn enter_dependent_grid() {
    allow_dependent_grid();
    wait_for_previous_grid();
}

/// The first half of [`enter_dependent_grid`]: lets the next kernel on the stream launch.
#[inline(always)]
pub fn allow_dependent_grid() {
    unsafe { asm!("griddepcontrol.launch_dependents;", options(nostack)) };
}

/// The second half of [`enter_dependent_grid`]: waits until the kernels before this one have
/// finished and their memory is visible.
#[inline(always)]
pub fn wait_for_previous_grid() {
    unsafe { asm!("griddepcontrol.wait;", options(nostack)) };
}

/// A 4-byte global load that may race a write of the previous kernel (relaxed, GPU scope): for
/// values that only steer L2 prefetches issued before [`wait_for_previous_grid`], where a stale
/// value costs a useless prefetch and nothing else. The `ptx` test allows this load, and
/// [`prefetch_l2`], before the wait, and no other memory access.
#[inline(always)]
pub unsafe fn ld_relaxed_u32(addr: u64) -> u32 {
    let r: u32;
    unsafe {
        asm!("ld.relaxed.gpu.global.u32 {r}, [{p}];", r = out(reg32) r, p = in(reg64) addr, options(readonly, nostack))
    };
    r
}

/// Asks the L2 for `bytes` (a multiple of 16) of global memory from `addr` (16-byte aligned),
/// through the TMA unit (`cp.async.bulk.prefetch`). A hint: nothing waits for it, and since the
/// L2 is where every write lands, a line it brings in early is never stale, even if the previous
/// kernel writes it afterwards.
#[inline(always)]
pub unsafe fn prefetch_l2(addr: u64, bytes: u32) {
    unsafe {
        asm!("cp.async.bulk.prefetch.L2.global [{a}], {n};", a = in(reg64) addr, n = in(reg32) bytes,
            options(nostack))
    };
}

/// Atomic add on a global u32; returns the old value.
#[inline(always)]
pub unsafe fn atom_add_u32(addr: u64, v: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!("atom.global.add.u32 {r}, [{p}], {v};", r = out(reg32) r, p = in(reg64) addr, v = in(reg32) v,
            options(nostack))
    };
    r
}

/// f32 global load cached in L2 only: for data other blocks of the same kernel wrote.
#[inline(always)]
pub unsafe fn ld_global_cg_f32(addr: u64) -> f32 {
    let r: f32;
    unsafe {
        asm!("ld.global.cg.f32 {r}, [{p}];", r = out(reg32) r, p = in(reg64) addr, options(readonly, nostack))
    };
    r
}

#[inline(always)]
pub unsafe fn st_shared_u32(addr: u32, v: u32) {
    unsafe {
        asm!("st.shared.u32 [{p}], {v};", p = in(reg32) addr, v = in(reg32) v, options(nostack))
    };
}
