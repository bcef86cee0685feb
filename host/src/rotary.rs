//! Rotary position embeddings (RoPE) on the device: FlashAttention's `apply_rotary_emb` (and the
//! rotation its `flash_attn_with_kvcache` applies with `rotary_cos` / `rotary_sin`), so a Rust
//! service needs no kernel of its own between its Q/K projections and attention.
//!
//! A [`RotaryTable`] holds the cosines and sines `[positions, rotary_dim / 2]` (f32) of one
//! model. [`Context::apply_rotary`] turns `[B, S, H, D]` rows in place, for example Q and K cut
//! out of a packed QKV buffer as one view (their heads are adjacent), at positions
//! [`RotaryPositions::From`] a start or, per sequence, from a device array such as a decode
//! step's `cache_seqlens`; [`Context::apply_rotary_to`] writes the result elsewhere and
//! [`Context::apply_rotary_varlen`] takes packed varlen batches.
//!
//! ```no_run
//! use duo_attn::{Context, RotaryPositions, RotaryTable};
//! use half::bf16;
//! # fn main() -> Result<(), duo_attn::Error> {
//! let ctx = Context::new(0)?;
//! let (b, s, hq, hkv, d) = (1, 512, 32, 8, 128);
//! // Llama's table: base 500000, the whole head dim, halves paired (not interleaved).
//! let rope = RotaryTable::rope(&ctx, 8192, d, 500_000.0, false)?;
//! let mut qkv = ctx.alloc::<bf16, 4>([b, s, hq + 2 * hkv, d])?;
//! // ... the QKV projection writes `qkv` ...
//! let mut q_and_k = qkv.strided_view_mut(0, [b, s, hq + hkv, d], [s * (hq + 2 * hkv) * d, (hq + 2 * hkv) * d, d, 1])?;
//! ctx.apply_rotary(&mut q_and_k, &rope, RotaryPositions::From(0))?;
//! # Ok(()) }
//! ```
use crate::attention::{
    as_batch_of_one, check_bshd, check_device, check_limit, check_shape, strides3,
};
use crate::context::Context;
use crate::decode::DecodePlan;
use crate::decode::check_device_array;
use crate::element::AttnElement;
use crate::element::DType;
use crate::error::{Error, Result};
use crate::tensor::{DeviceTensor, TensorDesc, View, ViewMut};
use duo_attn_kernels::abi::{self, ROTARY_THREADS, RotaryParams, decode_turns_q, rotary_items};
use std::sync::Arc;

/// The cosines and sines of a rotary embedding, f32 `[positions, rotary_dim / 2]` each on the
/// device, and how a head row pairs its elements. Cheap to clone: an uploaded table is shared.
///
/// Position `p` turns pair `j` (elements `j` and `j + rotary_dim / 2` of a head row, or `2j` and
/// `2j + 1` when interleaved) by the angle of `cos[p][j]`, `sin[p][j]`:
/// `(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`. Elements past the rotary dim stay.
/// FlashAttention takes the tables in q's element type; these are f32 (convert once).
#[derive(Clone)]
pub struct RotaryTable {
    storage: Storage,
    rows: usize,
    half: usize,
    interleaved: bool,
}

/// Where the device copy lives.
#[derive(Clone)]
enum Storage {
    /// Uploaded by a constructor, freed with the last clone.
    Owned(Arc<[DeviceTensor<f32, 2>; 2]>),
    /// A caller's device memory (`from_device_ptrs`).
    Foreign { cos: u64, sin: u64, device: u32 },
}

impl RotaryTable {
    /// A table from its values: `cos` and `sin` are `[positions, rotary_dim / 2]` row-major.
    /// The rotary dim is a positive multiple of 16 (every RoPE model with head dim 64, 128 or
    /// 256 rotates such a part: all of it, a half or a quarter); values are finite.
    pub fn new(
        ctx: &Context,
        cos: &[f32],
        sin: &[f32],
        rotary_dim: usize,
        interleaved: bool,
    ) -> Result<Self> {
        let rows = check_table(cos, sin, rotary_dim)?;
        let shape = [rows, rotary_dim / 2];
        let tables = [ctx.upload(cos, shape)?, ctx.upload(sin, shape)?];
        Ok(RotaryTable {
            storage: Storage::Owned(Arc::new(tables)),
            rows,
            half: rotary_dim / 2,
            interleaved,
        })
    }

    /// The table of `positions` positions for inverse frequencies `inv_freq` (one per pair, so
    /// the rotary dim is `2 * inv_freq.len()`): angle `p * inv_freq[j]`, computed in f64. Scaled
    /// RoPE variants (linear, NTK, Llama 3's) are a change of `inv_freq`:
    /// [`RotaryTable::rope_inv_freq`] gives the plain ones to start from.
    pub fn from_inv_freq(
        ctx: &Context,
        positions: usize,
        inv_freq: &[f64],
        interleaved: bool,
    ) -> Result<Self> {
        let (cos, sin) = rope_values(positions, inv_freq);
        Self::new(ctx, &cos, &sin, 2 * inv_freq.len(), interleaved)
    }

    /// RoPE's table (Su et al.; GPT-NeoX, Llama, Mistral with `interleaved` false, GPT-J with
    /// true) for `positions` positions: inverse frequencies `base^(-2j / rotary_dim)`.
    pub fn rope(
        ctx: &Context,
        positions: usize,
        rotary_dim: usize,
        base: f64,
        interleaved: bool,
    ) -> Result<Self> {
        Self::from_inv_freq(
            ctx,
            positions,
            &Self::rope_inv_freq(rotary_dim, base),
            interleaved,
        )
    }

    /// RoPE's inverse frequencies, `base^(-2j / rotary_dim)` for `j < rotary_dim / 2`.
    pub fn rope_inv_freq(rotary_dim: usize, base: f64) -> Vec<f64> {
        (0..rotary_dim / 2)
            .map(|j| base.powf(-2.0 * j as f64 / rotary_dim as f64))
            .collect()
    }

    /// A table already in device memory: `cos` and `sin` point at f32 `[rows, rotary_dim / 2]`
    /// row-major on device `device` (vLLM's `cos_sin_cache` halves, converted to f32).
    ///
    /// # Safety
    /// Both addresses must hold that many f32 on that device, and stay allocated and unchanged
    /// while any call that takes this table runs.
    pub unsafe fn from_device_ptrs(
        cos: u64,
        sin: u64,
        device: u32,
        rows: usize,
        rotary_dim: usize,
        interleaved: bool,
    ) -> Result<Self> {
        check_dims(rows, rotary_dim)?;
        for (name, ptr) in [("cos", cos), ("sin", sin)] {
            if ptr == 0 || !ptr.is_multiple_of(16) {
                return Err(Error::InvalidRotary {
                    why: format!(
                        "the {name} table's address {ptr:#x} is null or not 16-byte aligned"
                    ),
                });
            }
        }
        Ok(RotaryTable {
            storage: Storage::Foreign { cos, sin, device },
            rows,
            half: rotary_dim / 2,
            interleaved,
        })
    }

    /// Positions in the table.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements of a head row that turn (twice the pairs).
    pub fn rotary_dim(&self) -> usize {
        2 * self.half
    }

    /// Whether pairs are adjacent elements (GPT-J) rather than half a rotary dim apart.
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// Device ordinal of the table.
    pub fn device(&self) -> u32 {
        match &self.storage {
            Storage::Owned(t) => t[0].device(),
            Storage::Foreign { device, .. } => *device,
        }
    }

    /// The kernels' view of the table.
    pub(crate) fn abi(&self) -> abi::RotaryTable {
        let (cos, sin) = match &self.storage {
            Storage::Owned(t) => (t[0].view().desc().ptr, t[1].view().desc().ptr),
            Storage::Foreign { cos, sin, .. } => (*cos, *sin),
        };
        abi::RotaryTable {
            cos,
            sin,
            rows: self.rows as i32,
            half: self.half as i32,
            interleaved: self.interleaved as u32,
            f16: 0,
        }
    }
}

impl std::fmt::Debug for RotaryTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotaryTable")
            .field("rows", &self.rows)
            .field("rotary_dim", &self.rotary_dim())
            .field("interleaved", &self.interleaved)
            .field("device", &self.device())
            .finish()
    }
}

/// A rotary dim the kernel takes and a table row count it can index.
fn check_dims(rows: usize, rotary_dim: usize) -> Result<()> {
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(16) {
        return Err(Error::InvalidRotary {
            why: format!("rotary dim {rotary_dim} is not a positive multiple of 16"),
        });
    }
    if rows == 0 || rows > i32::MAX as usize {
        return Err(Error::InvalidRotary {
            why: format!("{rows} positions: a table holds 1 to 2^31 - 1"),
        });
    }
    Ok(())
}

/// Equal, finite `[rows, rotary_dim / 2]` tables; returns the rows.
fn check_table(cos: &[f32], sin: &[f32], rotary_dim: usize) -> Result<usize> {
    let half = (rotary_dim / 2).max(1);
    if cos.len() != sin.len() || !cos.len().is_multiple_of(half) {
        return Err(Error::InvalidRotary {
            why: format!(
                "cos ({}) and sin ({}) values are not two equal [positions, {half}] tables",
                cos.len(),
                sin.len()
            ),
        });
    }
    let rows = cos.len() / half;
    check_dims(rows, rotary_dim)?;
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if let Some(i) = t.iter().position(|x| !x.is_finite()) {
            return Err(Error::InvalidRotary {
                why: format!("{name} value {i} is {}", t[i]),
            });
        }
    }
    Ok(rows)
}

/// `cos` and `sin` of `p * inv_freq[j]`, `[positions, inv_freq.len()]` row-major.
fn rope_values(positions: usize, inv_freq: &[f64]) -> (Vec<f32>, Vec<f32>) {
    let angles = (0..positions).flat_map(|p| inv_freq.iter().map(move |f| p as f64 * f));
    angles.map(|a| (a.cos() as f32, a.sin() as f32)).unzip()
}

/// Where each row of a rotary call sits.
#[derive(Clone, Copy, Debug)]
pub enum RotaryPositions<'a> {
    /// Row `s` of every sequence at position `start + s` (0: a prompt from its start).
    From(usize),
    /// Row `s` of sequence `b` at position `offsets[b] + s`: a device `[B]` i32 array, such as
    /// a decode step's `cache_seqlens` before its append (FlashAttention's `seqlen_offsets`).
    PerSequence(View<'a, i32, 1>),
}

/// The launch that turns a decode's queries before it ([`use_decode_rotary`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct QueryTurn {
    pub(crate) entry: String,
    pub(crate) plan: RotaryPlan,
}

fn rotary_entry<T: AttnElement>() -> String {
    format!("duo_rotary_{}", T::KERNEL_NAME)
}

/// A checked rotary launch.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RotaryPlan {
    pub(crate) params: RotaryParams,
    pub(crate) blocks: u32,
}

/// A `[len]` i32 device array, contiguous, inside its allocation, that the call's output does
/// not overlap.
fn check_i32_array(
    t: &TensorDesc<1>,
    name: &'static str,
    len: usize,
    why: &'static str,
    written: &TensorDesc<4>,
    device: u32,
) -> Result<()> {
    check_device_array(t, name, len, why, device)?;
    let (start, end) = written.byte_range();
    if t.overlaps(start, end) {
        return Err(Error::Aliasing {
            output: "out",
            input: name,
        });
    }
    Ok(())
}

fn check_table_device(table: &RotaryTable, device: u32) -> Result<()> {
    if table.device() != device {
        return Err(Error::WrongDevice {
            tensor: "rotary table",
            tensor_device: table.device(),
            context_device: device,
        });
    }
    Ok(())
}

fn check_rotary_dim(table: &RotaryTable, head_dim: usize) -> Result<()> {
    if table.rotary_dim() > head_dim {
        return Err(Error::InvalidRotary {
            why: format!(
                "rotary dim {} is larger than the head dim {head_dim}",
                table.rotary_dim()
            ),
        });
    }
    Ok(())
}

/// `table` checked for head rows of `head_dim` elements `T` on `device`, as the kernels that
/// turn rows while they move them take it (the decode and the KV cache append).
pub(crate) fn fused_table<T: AttnElement>(
    table: &RotaryTable,
    head_dim: usize,
    device: u32,
) -> Result<abi::RotaryTable> {
    check_table_device(table, device)?;
    check_rotary_dim(table, head_dim)?;
    Ok(abi::RotaryTable {
        f16: (T::DTYPE == DType::F16) as u32,
        ..table.abi()
    })
}

/// Points a checked decode plan at `table`: the step's new keys turn in its append, its queries
/// in the kernel or, where it cannot turn them ([`decode_turns_q`]), by a launch before it into
/// a contiguous copy `q` `[B, n, Hq, D]` (in the workspace). `plan.params.seqlens` holds the
/// counts, `advanced` when an append before the launch already moved them on by `n`.
pub(crate) fn use_decode_rotary<T: AttnElement>(
    plan: &mut DecodePlan,
    table: &RotaryTable,
    q: &TensorDesc<4>,
    advanced: bool,
    device: u32,
) -> Result<()> {
    plan.params.rotary = fused_table::<T>(table, plan.head_dim, device)?;
    if decode_turns_q(plan.head_dim, table.half, table.interleaved) {
        return Ok(());
    }
    let [batch, n, heads, head_dim] = q.shape;
    let rows = batch * n;
    let items = rotary_items(table.half, table.interleaved, head_dim, true);
    let threads = rows * heads * items;
    let params = RotaryParams {
        table: table.abi(),
        src: q.ptr,
        src_strides: strides3(q),
        dst: 0, // the workspace's, at launch
        dst_strides: [
            (n * heads * head_dim) as i64,
            (heads * head_dim) as i64,
            head_dim as i64,
        ],
        cu_seqlens: 0,
        offsets: plan.params.seqlens,
        offset: if advanced { -(n as i32) } else { 0 },
        rows: rows as i32,
        seqlen: n as i32,
        batch: batch as i32,
        heads: heads as i32,
        head_dim: head_dim as i32,
        copy_rest: 1,
        pad: 0,
    };
    let blocks = threads.div_ceil(ROTARY_THREADS as usize) as u32;
    plan.q_turn = Some(QueryTurn {
        entry: rotary_entry::<T>(),
        plan: RotaryPlan { params, blocks },
    });
    Ok(())
}

/// Validates a rotation of `src` `[B, S, H, D]` into `dst` (the same tensor when `in_place`;
/// varlen: `[1, total, H, D]` with `cu_seqlens` `[B + 1]`) and builds its launch (pure).
pub(crate) fn plan_rotary(
    table: &RotaryTable,
    (src, dst, in_place): (&TensorDesc<4>, &TensorDesc<4>, bool),
    positions: &RotaryPositions<'_>,
    cu_seqlens: Option<&TensorDesc<1>>,
    device: u32,
) -> Result<RotaryPlan> {
    check_table_device(table, device)?;
    for (t, name) in [(src, "x"), (dst, "out")] {
        check_device(t, name, device)?;
        t.check_not_empty(name)?;
        check_bshd(t, name)?;
    }
    check_shape(dst, "out", src.shape, "the output has x's shape")?;
    let [batch, seqlen, heads, head_dim] = src.shape;
    if !head_dim.is_multiple_of(8) {
        return Err(Error::UnsupportedHeadDim {
            head_dim,
            by: "rotary embeddings",
            supported: "multiples of 8",
        });
    }
    check_rotary_dim(table, head_dim)?;
    // One thread writes each element: a view whose rows overlap would be written twice, and an
    // output overlapping the input would race its reads.
    dst.check_non_overlapping(if in_place { "x" } else { "out" })?;
    let (dst_start, dst_end) = dst.byte_range();
    if !in_place && src.overlaps(dst_start, dst_end) {
        return Err(Error::Aliasing {
            output: "out",
            input: "x",
        });
    }
    let (sequences, rows) = match cu_seqlens {
        Some(cu) => {
            let sequences = cu.shape[0].saturating_sub(1).max(1);
            let why = "varlen prefix sums: [B + 1] i32";
            check_i32_array(cu, "cu_seqlens", sequences + 1, why, dst, device)?;
            (sequences, seqlen)
        }
        None => (batch, batch.saturating_mul(seqlen)),
    };
    let (offsets, offset) = match positions {
        RotaryPositions::From(start) => {
            // Fixed-length rows reach `start + S - 1`; a varlen sequence's extent is on the
            // device, and its rows past the table stay as they are.
            let last = if cu_seqlens.is_some() {
                *start
            } else {
                start.saturating_add(seqlen - 1)
            };
            if last >= table.rows() {
                return Err(Error::InvalidRotary {
                    why: format!(
                        "rows from position {start} reach position {last}, past the table's {} positions",
                        table.rows()
                    ),
                });
            }
            (0, *start as i32)
        }
        RotaryPositions::PerSequence(v) => {
            let why = "one first position per sequence: [B] i32";
            check_i32_array(v.desc(), "offsets", sequences, why, dst, device)?;
            (v.desc().ptr, 0)
        }
    };
    let copy_rest = !in_place && table.rotary_dim() < head_dim;
    let items = rotary_items(table.half, table.interleaved, head_dim, copy_rest);
    let threads = rows.saturating_mul(heads).saturating_mul(items);
    check_limit(
        "threads of a rotary launch (rows x heads x 16-byte chunks)",
        threads,
        i32::MAX as usize,
    )?;
    let strides = |t: &TensorDesc<4>| {
        let batch_stride = if cu_seqlens.is_some() {
            0
        } else {
            t.strides[0] as i64
        };
        [batch_stride, t.strides[1] as i64, t.strides[2] as i64]
    };
    let params = RotaryParams {
        table: table.abi(),
        src: src.ptr,
        src_strides: strides(src),
        dst: dst.ptr,
        dst_strides: strides(dst),
        cu_seqlens: cu_seqlens.map_or(0, |c| c.ptr),
        offsets,
        offset,
        rows: rows as i32,
        seqlen: seqlen as i32,
        batch: sequences as i32,
        heads: heads as i32,
        head_dim: head_dim as i32,
        copy_rest: copy_rest as u32,
        pad: 0,
    };
    Ok(RotaryPlan {
        params,
        blocks: threads.div_ceil(ROTARY_THREADS as usize) as u32,
    })
}

impl Context {
    /// Rotates `x` `[B, S, H, D]` in place by `table` (RoPE), row `s` of batch entry `b` at the
    /// position `positions` gives it. Any strides with a contiguous head dim, 16-byte aligned;
    /// head dims that are multiples of 8, at least the rotary dim. Rotate Q and K together when
    /// they sit in one buffer (a packed QKV's first `Hq + Hkv` heads are one view). With device
    /// offsets ([`RotaryPositions::PerSequence`]), rows whose position falls outside the table
    /// stay as they are.
    pub fn apply_rotary<T: AttnElement>(
        &self,
        x: &mut ViewMut<'_, T, 4>,
        table: &RotaryTable,
        positions: RotaryPositions<'_>,
    ) -> Result<()> {
        let x = x.desc();
        let plan = plan_rotary(table, (x, x, true), &positions, None, self.ordinal())?;
        self.launch_rotary::<T>(plan)
    }

    /// [`Context::apply_rotary`] into `out` (x's shape, not overlapping it): the elements past
    /// the rotary dim are copied.
    pub fn apply_rotary_to<T: AttnElement>(
        &self,
        x: &View<'_, T, 4>,
        out: &mut ViewMut<'_, T, 4>,
        table: &RotaryTable,
        positions: RotaryPositions<'_>,
    ) -> Result<()> {
        let (src, dst) = (x.desc(), out.desc());
        let plan = plan_rotary(table, (src, dst, false), &positions, None, self.ordinal())?;
        self.launch_rotary::<T>(plan)
    }

    /// [`Context::apply_rotary`] on a packed varlen batch `[total, H, D]` in place: sequence `b`
    /// is rows `cu_seqlens[b]..cu_seqlens[b + 1]` (`[B + 1]` i32 on the device, FlashAttention's
    /// layout), its row `s` at the position `positions` gives it. Rows outside every sequence,
    /// or whose position falls outside the table, stay as they are.
    pub fn apply_rotary_varlen<T: AttnElement>(
        &self,
        x: &mut ViewMut<'_, T, 3>,
        cu_seqlens: &View<'_, i32, 1>,
        table: &RotaryTable,
        positions: RotaryPositions<'_>,
    ) -> Result<()> {
        let x = as_batch_of_one(x.desc());
        let cu = Some(cu_seqlens.desc());
        let plan = plan_rotary(table, (&x, &x, true), &positions, cu, self.ordinal())?;
        self.launch_rotary::<T>(plan)
    }

    fn launch_rotary<T: AttnElement>(&self, plan: RotaryPlan) -> Result<()> {
        self.launch_rotary_plan(&rotary_entry::<T>(), &plan)
    }

    pub(crate) fn launch_rotary_plan(&self, entry: &str, plan: &RotaryPlan) -> Result<()> {
        self.launch(entry, (plan.blocks, 1, 1), ROTARY_THREADS, 0, &plan.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn table(rows: usize, rotary_dim: usize, interleaved: bool) -> RotaryTable {
        unsafe { RotaryTable::from_device_ptrs(GB, 2 * GB, 0, rows, rotary_dim, interleaved) }
            .unwrap()
    }

    fn bf16s(ptr: u64, shape: [usize; 4]) -> TensorDesc<4> {
        TensorDesc::contiguous(ptr, shape, 2, 0)
    }

    fn i32s(ptr: u64, len: usize) -> TensorDesc<1> {
        TensorDesc::contiguous(ptr, [len], 4, 0)
    }

    /// A packed QKV buffer's first `hq + hkv` heads, rotated in place from position 5.
    #[test]
    fn packed_q_and_k_rotate_in_place() {
        let (b, s, hq, hkv, d) = (2, 7, 8, 2, 128);
        let h = hq + 2 * hkv;
        let mut x = bf16s(3 * GB, [b, s, hq + hkv, d]);
        x.strides = [s * h * d, h * d, d, 1];
        x.available = b * s * h * d;
        let plan = plan_rotary(
            &table(64, 128, false),
            (&x, &x, true),
            &RotaryPositions::From(5),
            None,
            0,
        )
        .unwrap();
        let p = plan.params;
        assert_eq!(
            (p.rows, p.seqlen, p.batch, p.heads, p.head_dim),
            (14, 7, 2, 10, 128)
        );
        assert_eq!(
            (p.offset, p.offsets, p.cu_seqlens, p.copy_rest),
            (5, 0, 0, 0)
        );
        assert_eq!(
            p.src_strides,
            [(s * h * d) as i64, (h * d) as i64, d as i64]
        );
        assert_eq!(
            (p.src, p.dst, p.table.cos, p.table.half),
            (3 * GB, 3 * GB, GB, 64)
        );
        // Eight chunk pairs per head row.
        assert_eq!(plan.blocks as usize, (14 * 10 * 8usize).div_ceil(256));
    }

    /// Out of place, a partial rotary dim copies the rest; interleaved rows take one thread per
    /// chunk; varlen tensors have no batch stride.
    #[test]
    fn items_and_varlen_layout() {
        let x = bf16s(3 * GB, [1, 40, 4, 256]);
        let out = bf16s(4 * GB, [1, 40, 4, 256]);
        let t = table(64, 64, true);
        let cu = i32s(5 * GB, 4);
        let offsets = i32s(6 * GB, 3);
        let offsets = View::from_desc(offsets);
        let pos = RotaryPositions::PerSequence(offsets);
        let plan = plan_rotary(&t, (&x, &out, false), &pos, Some(&cu), 0).unwrap();
        let p = plan.params;
        assert_eq!(
            (p.rows, p.batch, p.copy_rest, p.offsets),
            (40, 3, 1, 6 * GB)
        );
        assert_eq!(p.src_strides[0], 0);
        // 64 / 8 interleaved chunks plus (256 - 64) / 8 copied ones.
        assert_eq!(rotary_items(32, true, 256, true), 8 + 24);
        assert_eq!(plan.blocks as usize, (40 * 4 * 32usize).div_ceil(256));
    }

    #[test]
    fn bad_calls_are_typed_errors() {
        let x = bf16s(3 * GB, [2, 16, 4, 64]);
        let t = table(100, 64, false);
        let from = |s| RotaryPositions::From(s);
        let plan = |t: &RotaryTable,
                    src: &TensorDesc<4>,
                    dst: &TensorDesc<4>,
                    pos: &RotaryPositions<'_>,
                    cu: Option<&TensorDesc<1>>| {
            plan_rotary(t, (src, dst, src == dst), pos, cu, 0)
        };
        // Positions 85..100 fit, 86..101 do not.
        assert!(plan(&t, &x, &x, &from(84), None).is_ok());
        let err = plan(&t, &x, &x, &from(85), None).unwrap_err();
        assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
        // Rotary dim past the head dim.
        let err = plan(&table(100, 128, false), &x, &x, &from(0), None).unwrap_err();
        assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
        // Output overlapping the input, or of another shape.
        let near = bf16s(3 * GB + 64, [2, 16, 4, 64]);
        let err = plan(&t, &x, &near, &from(0), None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Aliasing {
                    output: "out",
                    input: "x"
                }
            ),
            "{err}"
        );
        let other = bf16s(4 * GB, [2, 16, 4, 32]);
        let err = plan(&t, &x, &other, &from(0), None).unwrap_err();
        assert!(
            matches!(err, Error::ShapeMismatch { tensor: "out", .. }),
            "{err}"
        );
        // Offsets: one per sequence, clear of the output.
        let short = RotaryPositions::PerSequence(View::from_desc(i32s(5 * GB, 1)));
        let err = plan(&t, &x, &x, &short, None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ShapeMismatch {
                    tensor: "offsets",
                    ..
                }
            ),
            "{err}"
        );
        let inside = RotaryPositions::PerSequence(View::from_desc(i32s(3 * GB + 128, 2)));
        let err = plan(&t, &x, &x, &inside, None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Aliasing {
                    input: "offsets",
                    ..
                }
            ),
            "{err}"
        );
        // Overlapping rows in place, a head dim not of 16-byte chunks, misaligned strides.
        let mut rows_overlap = x;
        rows_overlap.strides[1] = 64;
        let err = plan(&t, &rows_overlap, &rows_overlap, &from(0), None).unwrap_err();
        assert!(matches!(err, Error::OverlappingOutput { .. }), "{err}");
        let mut narrow = bf16s(3 * GB, [2, 16, 4, 68]);
        narrow.strides = [16 * 4 * 72, 4 * 72, 72, 1];
        narrow.available = 2 * 16 * 4 * 72;
        let err = plan(&t, &narrow, &narrow, &from(0), None).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedHeadDim { head_dim: 68, .. }),
            "{err}"
        );
        let odd = bf16s(3 * GB + 2, [2, 16, 4, 64]);
        let err = plan(&t, &odd, &odd, &from(0), None).unwrap_err();
        assert!(matches!(err, Error::Misaligned { .. }), "{err}");
        // Varlen prefix sums: [B + 1], contiguous.
        let one = bf16s(3 * GB, [1, 16, 4, 64]);
        let mut cu = i32s(5 * GB, 3);
        cu.strides = [2];
        cu.available = 8;
        let err = plan(&t, &one, &one, &from(0), Some(&cu)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotContiguous {
                    tensor: "cu_seqlens",
                    ..
                }
            ),
            "{err}"
        );
        // Devices.
        let elsewhere = TensorDesc { device: 1, ..x };
        let err = plan(&t, &elsewhere, &elsewhere, &from(0), None).unwrap_err();
        assert!(matches!(err, Error::WrongDevice { .. }), "{err}");
        let far = unsafe { RotaryTable::from_device_ptrs(GB, 2 * GB, 1, 100, 64, false) }.unwrap();
        let err = plan(&far, &x, &x, &from(0), None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongDevice {
                    tensor: "rotary table",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn tables_are_checked() {
        let ok = check_table(&[1.0; 32], &[0.0; 32], 16).unwrap();
        assert_eq!(ok, 4);
        for (cos, sin, dim) in [
            (&[1.0f32; 32][..], &[0.0f32; 32][..], 24),
            (&[1.0; 32][..], &[0.0; 24][..], 16),
            (&[1.0; 30][..], &[0.0; 30][..], 16),
            (&[][..], &[][..], 16),
            (&[f32::NAN; 8][..], &[0.0; 8][..], 16),
            (&[1.0; 8][..], &[0.0; 8][..], 0),
        ] {
            let err = check_table(cos, sin, dim).unwrap_err();
            assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
        }
        for ptr in [0, GB + 8] {
            let err = unsafe { RotaryTable::from_device_ptrs(ptr, GB, 0, 8, 64, false) };
            assert!(matches!(err, Err(Error::InvalidRotary { .. })));
        }
    }

    /// RoPE's angles: position `p`, pair `j` at `p * base^(-2j / dim)`.
    #[test]
    fn rope_values_follow_the_frequencies() {
        let inv = RotaryTable::rope_inv_freq(16, 10_000.0);
        assert_eq!(inv.len(), 8);
        assert_eq!(inv[0], 1.0);
        approx::assert_relative_eq!(inv[4], 10_000f64.powf(-0.5), max_relative = 1e-12);
        let (cos, sin) = rope_values(3, &inv);
        assert_eq!((cos.len(), cos[0], sin[0]), (24, 1.0, 0.0));
        approx::assert_relative_eq!(cos[8] as f64, 1f64.cos(), max_relative = 1e-7);
        approx::assert_relative_eq!(
            sin[2 * 8 + 1] as f64,
            (2.0 * inv[1]).sin(),
            max_relative = 1e-7
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use crate::decode::props::{REGION, apply, inside, odd_dim};
    use proptest::prelude::*;

    /// Every address `duo_rotary_*` forms from the plan lies inside the operands: the rows it
    /// reads and writes (all of a head row at most), the prefix sums and offsets it reads.
    fn plan_inside(
        p: &RotaryPlan,
        (src, dst): (&TensorDesc<4>, &TensorDesc<4>),
        cu: Option<&TensorDesc<1>>,
        offsets: Option<&TensorDesc<1>>,
    ) -> std::result::Result<(), TestCaseError> {
        let c = &p.params;
        let (rows, heads, d) = (c.rows as i64, c.heads as i64, c.head_dim as i64);
        prop_assert!(rows >= 1 && heads >= 1 && d % 8 == 0 && 2 * c.table.half as i64 <= d);
        let items = rotary_items(
            c.table.half as usize,
            c.table.interleaved != 0,
            d as usize,
            c.copy_rest != 0,
        ) as i64;
        let threads = p.blocks as i64 * ROTARY_THREADS as i64;
        prop_assert!(threads >= rows * heads * items && threads <= i32::MAX as i64 + 256);
        for (what, t, ptr, s) in [
            ("x", src, c.src, c.src_strides),
            ("out", dst, c.dst, c.dst_strides),
        ] {
            let extents = if c.cu_seqlens != 0 {
                prop_assert_eq!(s[0], 0);
                vec![(rows, s[1]), (heads, s[2])]
            } else {
                prop_assert!(c.seqlen >= 1 && rows % c.seqlen as i64 == 0);
                let batch = rows / c.seqlen as i64;
                vec![(batch, s[0]), (c.seqlen as i64, s[1]), (heads, s[2])]
            };
            inside(what, t, ptr, &extents, d)?;
        }
        let batch = c.batch as i64;
        match cu {
            Some(t) => inside("cu_seqlens", t, c.cu_seqlens, &[(batch + 1, 1)], 1)?,
            None => prop_assert_eq!(c.cu_seqlens, 0),
        }
        match offsets {
            Some(t) => inside("offsets", t, c.offsets, &[(batch, 1)], 1)?,
            None => prop_assert_eq!(c.offsets, 0),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn rotary_plans_stay_inside_their_operands(
            (b, s, h, d) in (1usize..9, 1usize..3000, 1usize..49, prop_oneof![Just(64usize), Just(128), Just(256), Just(96)]),
            (rotary_dim, interleaved, table_rows) in (prop_oneof![Just(16usize), Just(64), Just(128), Just(256)], any::<bool>(), 1usize..5000),
            (in_place, varlen, per_sequence, start) in (any::<bool>(), any::<bool>(), any::<bool>(), 0usize..5000),
            edits in prop::collection::vec((0usize..4, 0usize..5, odd_dim(), any::<u64>()), 0..3),
        ) {
            let at = |i: u64| REGION * (i + 1);
            let shape = if varlen { [1, b * s, h, d] } else { [b, s, h, d] };
            let mut src = TensorDesc::contiguous(at(0), shape, 2, 0);
            let mut dst = if in_place { src } else { TensorDesc::contiguous(at(1), shape, 2, 0) };
            let mut cu = TensorDesc::contiguous(at(2), [b + 1], 4, 0);
            let mut offsets = TensorDesc::contiguous(at(3), [b], 4, 0);
            for e in &edits {
                match e.0 {
                    0 => apply(&mut src, *e),
                    1 => apply(&mut dst, *e),
                    2 => apply(&mut cu, *e),
                    _ => apply(&mut offsets, *e),
                }
            }
            if in_place {
                dst = src;
            }
            let table = unsafe {
                RotaryTable::from_device_ptrs(at(4), at(5), 0, table_rows, rotary_dim, interleaved)
            }
            .unwrap();
            let positions = if per_sequence {
                RotaryPositions::PerSequence(View::from_desc(offsets))
            } else {
                RotaryPositions::From(start)
            };
            let cu = varlen.then_some(&cu);
            if let Ok(p) = plan_rotary(&table, (&src, &dst, in_place), &positions, cu, 0) {
                plan_inside(&p, (&src, &dst), cu, per_sequence.then_some(&offsets))?;
            }
        }
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;
    use crate::attention::{AttentionConfig, HeadKind};
    use crate::decode::{DecodeKv, DecodePaging, plan_decode};
    use half::{bf16, f16};

    const GB: u64 = 1 << 30;

    fn table(rotary_dim: usize, interleaved: bool) -> RotaryTable {
        unsafe { RotaryTable::from_device_ptrs(GB, 2 * GB, 0, 4096, rotary_dim, interleaved) }
            .unwrap()
    }

    /// A decode plan of 3 sequences, 2 new tokens, 8 query and 2 KV heads at head dim `d`, its
    /// counts at 7 GB.
    fn plan(d: usize) -> (DecodePlan, TensorDesc<4>) {
        let at = |i: u64| (3 + i) * GB;
        let q = TensorDesc::contiguous(at(0), [3, 2, 8, d], 2, 0);
        let k = TensorDesc::contiguous(at(1), [3, 1000, 2, d], 2, 0);
        let v = TensorDesc::contiguous(at(2), [3, 1000, 2, d], 2, 0);
        let out = TensorDesc::contiguous(at(3), [3, 2, 8, d], 2, 0);
        let lse = TensorDesc::contiguous(at(4), [3, 8, 2], 4, 0);
        let cfg = AttentionConfig::new(vec![HeadKind::Retrieval; 2]);
        let kv = DecodeKv::Plain { k: &k, v: &v };
        let mut plan = plan_decode::<bf16>(&q, kv, &out, &lse, &cfg, 0, 132).unwrap();
        plan.params.seqlens = 7 * GB;
        (plan, q)
    }

    /// Tables the kernel turns Q by set the plan's table only; the others (D <= 128, halves of a
    /// partial rotary dim) queue a turn of Q into a contiguous copy at the counts, less the new
    /// tokens once an append before the step advanced them.
    #[test]
    fn queries_turn_in_the_kernel_or_before_it() {
        for (d, rotary_dim, interleaved, in_kernel) in [
            (64, 64, false, true),
            (64, 32, true, true),
            (64, 32, false, false),
            (128, 128, false, true),
            (128, 64, false, false),
            (256, 128, false, true),
            (256, 64, true, true),
        ] {
            let t = table(rotary_dim, interleaved);
            for advanced in [false, true] {
                let (mut p, q) = plan(d);
                use_decode_rotary::<f16>(&mut p, &t, &q, advanced, 0).unwrap();
                let r = p.params.rotary;
                assert_eq!(
                    (r.cos, r.sin, r.rows, r.half),
                    (GB, 2 * GB, 4096, rotary_dim as i32 / 2)
                );
                assert_eq!((r.interleaved != 0, r.f16), (interleaved, 1));
                match &p.q_turn {
                    None => assert!(in_kernel, "D={d} rotary dim {rotary_dim}"),
                    Some(turn) => {
                        assert!(!in_kernel, "D={d} rotary dim {rotary_dim}");
                        assert_eq!(turn.entry, "duo_rotary_f16");
                        let c = &turn.plan.params;
                        assert_eq!((c.src, c.dst, c.offsets), (3 * GB, 0, 7 * GB));
                        assert_eq!(c.offset, if advanced { -2 } else { 0 });
                        assert_eq!((c.rows, c.seqlen, c.batch, c.heads), (6, 2, 3, 8));
                        assert_eq!(c.dst_strides, [16 * d as i64, 8 * d as i64, d as i64]);
                        assert_eq!(
                            c.copy_rest, 1,
                            "the elements past the rotary dim are copied"
                        );
                        let items = rotary_items(rotary_dim / 2, interleaved, d, true);
                        assert_eq!(turn.plan.blocks as usize, (6 * 8 * items).div_ceil(256));
                    }
                }
            }
        }
    }

    #[test]
    fn decode_tables_are_checked() {
        let (mut p, q) = plan(64);
        let err = use_decode_rotary::<bf16>(&mut p, &table(128, false), &q, false, 0).unwrap_err();
        assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
        let err = use_decode_rotary::<bf16>(&mut p, &table(64, false), &q, false, 1).unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongDevice {
                    tensor: "rotary table",
                    ..
                }
            ),
            "{err}"
        );
        let err = fused_table::<bf16>(&table(128, false), 64, 0).unwrap_err();
        assert!(matches!(err, Error::InvalidRotary { .. }), "{err}");
        assert_eq!(fused_table::<bf16>(&table(64, true), 64, 0).unwrap().f16, 0);
    }

    /// With a table the D = 64 entries that look up a page per row leave the append to a launch
    /// of its own, as paged D = 256 entries always do.
    #[test]
    fn which_entries_fuse_an_append() {
        for (d, paging, plain, turned) in [
            (64, DecodePaging::None, true, true),
            (64, DecodePaging::Rows, true, false),
            (64, DecodePaging::Tiles, true, true),
            (128, DecodePaging::Rows, true, true),
            (256, DecodePaging::None, true, true),
            (256, DecodePaging::Rows, false, false),
            (256, DecodePaging::Tiles, false, false),
        ] {
            let (mut p, _) = plan(d);
            p.paging = paging;
            assert_eq!(
                (p.fuses_append(false), p.fuses_append(true)),
                (plain, turned),
                "D={d} {paging:?}"
            );
        }
    }
}
