//! TMA tensor maps of the prefill operands: which `[B, S, H, D]` tensors the bulk tensor copy
//! engine can address (pure rules, testable without a GPU), and their encoding through the driver
//! (`cuTensorMapEncodeTiled`, which cust 0.3 does not bind).
//!
//! Every operand is a rank-4 map, innermost first `(D, rows, heads, batch)`, with a box of 64
//! columns (128 bytes, the 128-byte swizzle span the kernel's shared-memory tiles use) by a tile's
//! rows (`WG_BLOCK_M` for Q, `ws_block_n(D)` for K and V). Rows past `rows` read as zeros, as the
//! cp.async loads' zero-fill.
use crate::error::{RawCudaStatus, Result};
use crate::tensor::TensorDesc;
use duo_attn_kernels::abi::{TMA_BOX_COLS, TensorMap, WG_BLOCK_M, ws_block_n};
use std::ffi::c_void;

/// Largest byte stride and extent a tensor map takes.
const MAX_STRIDE_BYTES: u64 = 1 << 40;
const MAX_DIM: u64 = 1 << 32;
/// Byte alignment of the base address and of every stride.
const TMA_ALIGN: u64 = 16;

/// One operand as TMA sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmaTensor {
    /// Device address of element 0.
    pub base: u64,
    /// Extents, innermost first: head dim, rows, heads, batch.
    pub dims: [u64; 4],
    /// Byte strides of rows, heads and batch.
    pub strides: [u64; 3],
    /// Rows of the box (one tile).
    pub box_rows: u32,
}

impl TmaTensor {
    /// The map of a validated `[B, S, H, D]` operand (head dim contiguous) of which the first
    /// `rows` rows are read in boxes of `box_rows`, or why TMA cannot address it (the cp.async
    /// kernel then runs).
    pub fn new(
        t: &TensorDesc<4>,
        rows: usize,
        box_rows: usize,
    ) -> std::result::Result<Self, String> {
        let [batch, _, heads, head_dim] = t.shape;
        let elem = t.elem_bytes as u64;
        if !head_dim.is_multiple_of(TMA_BOX_COLS) {
            return Err(format!(
                "head dim {head_dim} is not a multiple of the {TMA_BOX_COLS}-column box"
            ));
        }
        if !t.ptr.is_multiple_of(TMA_ALIGN) {
            return Err(format!(
                "base address {:#x} is not {TMA_ALIGN}-byte aligned",
                t.ptr
            ));
        }
        let dims = [
            head_dim as u64,
            rows.max(1) as u64,
            heads.max(1) as u64,
            batch.max(1) as u64,
        ];
        if let Some(d) = dims.iter().find(|&&d| d > MAX_DIM) {
            return Err(format!("extent {d} is over the TMA limit {MAX_DIM}"));
        }
        // Strides of (rows, heads, batch). A dimension of extent 1 is never stepped along, so its
        // stride (which views may leave at 0) is replaced by the tensor's byte extent: any legal
        // value serves, and this one keeps the strides increasing as in a packed tensor.
        let raw =
            [t.strides[1], t.strides[2], t.strides[0]].map(|s| (s as u64).saturating_mul(elem));
        let extent = (1..4)
            .map(|i| (dims[i] - 1) * raw[i - 1])
            .sum::<u64>()
            .saturating_add(head_dim as u64 * elem)
            .next_multiple_of(TMA_ALIGN);
        let mut strides = [0u64; 3];
        for i in 0..3 {
            strides[i] = if dims[i + 1] == 1 {
                extent.clamp(TMA_ALIGN, MAX_STRIDE_BYTES - TMA_ALIGN)
            } else {
                raw[i]
            };
            let s = strides[i];
            if s == 0 || !s.is_multiple_of(TMA_ALIGN) || s >= MAX_STRIDE_BYTES {
                return Err(format!(
                    "byte stride {s} is not a nonzero multiple of {TMA_ALIGN} under 2^40"
                ));
            }
        }
        Ok(TmaTensor {
            base: t.ptr,
            dims,
            strides,
            box_rows: box_rows as u32,
        })
    }

    /// Encodes the map (a driver call; needs no context).
    pub fn encode(&self) -> Result<TensorMap> {
        // The driver writes a 64-byte aligned map; the kernel parameter holds a copy.
        #[repr(C, align(64))]
        struct Aligned(TensorMap);
        let mut map = Aligned(TensorMap::default());
        let box_dim = [TMA_BOX_COLS as u32, self.box_rows, 1, 1];
        let element_strides = [1u32; 4];
        // SAFETY: every pointer is to a live local of the length the rank (4) implies; the driver
        // only reads them and writes the 128-byte map.
        let status = unsafe {
            cuTensorMapEncodeTiled(
                &mut map.0,
                CU_TENSOR_MAP_DATA_TYPE_UINT16,
                4,
                self.base as *mut c_void,
                self.dims.as_ptr(),
                self.strides.as_ptr(),
                box_dim.as_ptr(),
                element_strides.as_ptr(),
                CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        status.during_raw("encoding a TMA tensor map")?;
        Ok(map.0)
    }
}

/// The five maps of a TMA prefill (`TMA_Q..TMA_STREAM_V`), or why one operand does not fit.
pub(crate) fn prefill_tensors(
    q: &TensorDesc<4>,
    kv: (&TensorDesc<4>, &TensorDesc<4>, usize),
    stream: (&TensorDesc<4>, &TensorDesc<4>, usize),
) -> std::result::Result<[TmaTensor; 5], (&'static str, String)> {
    let kv_box = ws_block_n(q.shape[3]);
    let map = |t: &TensorDesc<4>, rows: usize, box_rows: usize, name: &'static str| {
        TmaTensor::new(t, rows, box_rows).map_err(|why| (name, why))
    };
    Ok([
        map(q, q.shape[1], WG_BLOCK_M, "q")?,
        map(kv.0, kv.2, kv_box, "k")?,
        map(kv.1, kv.2, kv_box, "v")?,
        map(stream.0, stream.2, kv_box, "streaming k")?,
        map(stream.1, stream.2, kv_box, "streaming v")?,
    ])
}

// Driver enums (cuda.h, CUDA 12.0+).
const CU_TENSOR_MAP_DATA_TYPE_UINT16: u32 = 1;
const CU_TENSOR_MAP_INTERLEAVE_NONE: u32 = 0;
const CU_TENSOR_MAP_SWIZZLE_128B: u32 = 3;
const CU_TENSOR_MAP_L2_PROMOTION_L2_256B: u32 = 3;
const CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: u32 = 0;

// libcuda is linked by cust; this entry point is in every driver since CUDA 12.0.
unsafe extern "C" {
    fn cuTensorMapEncodeTiled(
        tensor_map: *mut TensorMap,
        data_type: u32,
        rank: u32,
        global_address: *mut c_void,
        global_dim: *const u64,
        global_strides: *const u64,
        box_dim: *const u32,
        element_strides: *const u32,
        interleave: u32,
        swizzle: u32,
        l2_promotion: u32,
        oob_fill: u32,
    ) -> cust::sys::CUresult;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(shape: [usize; 4], strides: [usize; 4], ptr: u64) -> TensorDesc<4> {
        TensorDesc {
            ptr,
            shape,
            strides,
            available: usize::MAX / 4,
            elem_bytes: 2,
            device: 0,
        }
    }

    #[test]
    fn packed_tensor_maps_directly() {
        let t = desc([2, 100, 8, 128], [100 * 8 * 128, 8 * 128, 128, 1], 0x1000);
        let m = TmaTensor::new(&t, 100, 128).unwrap();
        assert_eq!(m.dims, [128, 100, 8, 2]);
        assert_eq!(m.strides, [8 * 128 * 2, 128 * 2, 100 * 8 * 128 * 2]);
    }

    #[test]
    fn unit_extents_get_a_legal_stride() {
        // A varlen tensor seen as a batch of one has batch stride 0.
        let t = desc([1, 300, 4, 64], [0, 4 * 64, 64, 1], 0x1000);
        let m = TmaTensor::new(&t, 300, 128).unwrap();
        assert_eq!(m.dims, [64, 300, 4, 1]);
        assert_eq!(m.strides[..2], [4 * 64 * 2, 64 * 2]);
        assert!(m.strides[2] >= 300 * 4 * 64 * 2 && m.strides[2].is_multiple_of(16));
    }

    #[test]
    fn rows_beyond_the_read_rows_are_not_in_the_map() {
        let t = desc([1, 4096, 2, 128], [4096 * 256, 256, 128, 1], 0x1000);
        assert_eq!(TmaTensor::new(&t, 777, 128).unwrap().dims[1], 777);
    }

    #[test]
    fn broadcast_and_misaligned_operands_are_refused() {
        let broadcast = desc([1, 64, 4, 128], [0, 128, 0, 1], 0x1000);
        assert!(
            TmaTensor::new(&broadcast, 64, 128)
                .unwrap_err()
                .contains("stride 0")
        );
        let odd = desc([1, 64, 1, 128], [0, 136, 128, 1], 0x1008);
        assert!(
            TmaTensor::new(&odd, 64, 128)
                .unwrap_err()
                .contains("aligned")
        );
        let odd_head_dim = desc([1, 64, 1, 96], [0, 96, 96, 1], 0x1000);
        assert!(TmaTensor::new(&odd_head_dim, 64, 128).is_err());
    }
}
