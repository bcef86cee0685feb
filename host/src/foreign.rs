//! Views of device memory that another library allocated (cudarc, candle, a framework reached
//! through FFI), so a service can run attention on its own buffers without a copy. The driver
//! says which device and allocation an address belongs to, so the device and the bounds are
//! checked as for duo-attn's own tensors; only the memory's lifetime is the caller's word.
use crate::context::Context;
use crate::element::DeviceScalar;
use crate::error::{Error, Result};
use crate::tensor::{TensorDesc, View, ViewMut};
use cust::sys::{CUpointer_attribute, CUresult, cuPointerGetAttributes};
use std::ffi::c_void;

/// How errors name a foreign view.
const TENSOR: &str = "foreign view";

/// `CU_MEMORYTYPE_DEVICE`: the only memory type the kernels take.
const MEMORY_TYPE_DEVICE: u32 = 2;

impl Context {
    /// A read-only view of `shape` elements with element `strides` at device address `ptr`,
    /// memory this crate did not allocate. It goes wherever a [`View`] goes, and operations
    /// check its layout as they check any view.
    ///
    /// Checked here, from the driver's record of the address: it is device memory on this
    /// context's device, allocated in this device's primary context (where CUDA runtimes such as
    /// PyTorch's, cudarc and candle allocate) or context-free (memory pools, virtual memory), the
    /// address is aligned to the element, and the view ends inside the allocation that holds
    /// `ptr`. Errors: [`Error::ForeignPointer`], [`Error::WrongDevice`], [`Error::Misaligned`],
    /// [`Error::OutOfBounds`].
    ///
    /// # Safety
    /// The allocation must stay allocated for `'a` (the driver cannot know when it will be
    /// freed), its elements must be valid `T`, and nothing may write them while operations
    /// queued on this context's stream read them (order other streams' work with events on
    /// [`Context::raw_stream`], or queue the operations on the caller's stream with
    /// [`Context::on_stream`]).
    pub unsafe fn foreign_view<'a, T: DeviceScalar, const N: usize>(
        &self,
        ptr: u64,
        shape: [usize; N],
        strides: [usize; N],
    ) -> Result<View<'a, T, N>> {
        let desc = self.foreign_desc::<T, N>(ptr, shape, strides)?;
        Ok(View::from_desc(desc))
    }

    /// A writable view of foreign device memory, checked as [`Context::foreign_view`].
    ///
    /// # Safety
    /// As [`Context::foreign_view`], and nothing else may read or write the memory while
    /// operations queued on this context's stream write it.
    pub unsafe fn foreign_view_mut<'a, T: DeviceScalar, const N: usize>(
        &self,
        ptr: u64,
        shape: [usize; N],
        strides: [usize; N],
    ) -> Result<ViewMut<'a, T, N>> {
        let desc = self.foreign_desc::<T, N>(ptr, shape, strides)?;
        Ok(ViewMut::from_desc(desc))
    }

    fn foreign_desc<T: DeviceScalar, const N: usize>(
        &self,
        ptr: u64,
        shape: [usize; N],
        strides: [usize; N],
    ) -> Result<TensorDesc<N>> {
        let elem_bytes = std::mem::size_of::<T>();
        if ptr == 0 {
            return Err(Error::ForeignPointer {
                ptr,
                why: "the address is null".into(),
            });
        }
        if !ptr.is_multiple_of(elem_bytes as u64) {
            return Err(Error::Misaligned {
                tensor: TENSOR,
                what: "the device address",
                value: ptr,
                align: elem_bytes as u64,
            });
        }
        self.make_current()?;
        let record = pointer_record(ptr).map_err(|status| Error::ForeignPointer {
            ptr,
            why: format!("the driver could not read its attributes ({status:?})"),
        })?;
        match record.memory_type {
            MEMORY_TYPE_DEVICE => {}
            0 => {
                return Err(Error::ForeignPointer {
                    ptr,
                    why: "the driver does not know it as CUDA memory: pass a device address".into(),
                });
            }
            other => {
                return Err(Error::ForeignPointer {
                    ptr,
                    why: format!(
                        "it is not device memory (CUmemorytype {other}); the kernels read and \
                         write device memory only"
                    ),
                });
            }
        }
        if record.device != self.ordinal() as i32 {
            return Err(Error::WrongDevice {
                tensor: TENSOR,
                tensor_device: record.device.max(0) as u32,
                context_device: self.ordinal(),
            });
        }
        // Memory-pool and virtual-memory allocations belong to no context (0).
        if record.context != 0 && record.context != self.raw_context() as usize {
            return Err(Error::ForeignPointer {
                ptr,
                why: "it was allocated in another CUDA context of this device, which duo-attn's \
                      kernels (in the device's primary context) cannot address"
                    .into(),
            });
        }
        // Elements from `ptr` to the end of its allocation.
        let end = record.range_start + record.range_size as u64;
        let available = end.saturating_sub(ptr) as usize / elem_bytes;
        let desc = TensorDesc {
            ptr,
            shape,
            strides,
            available,
            elem_bytes,
            device: self.ordinal(),
        };
        desc.check_in_bounds(TENSOR)?;
        Ok(desc)
    }
}

/// What the driver records of an address: `cuPointerGetAttributes`, which (unlike
/// `cuPointerGetAttribute`) answers for addresses it does not know, with zeros, rather than
/// failing (so `compute-sanitizer` sees no API error either).
#[derive(Default)]
struct PointerRecord {
    /// `CUmemorytype`; 0 for an address the driver does not know.
    memory_type: u32,
    device: i32,
    context: usize,
    range_start: u64,
    range_size: usize,
}

fn pointer_record(ptr: u64) -> std::result::Result<PointerRecord, CUresult> {
    use CUpointer_attribute::*;
    let mut record = PointerRecord::default();
    let mut attributes = [
        CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        CU_POINTER_ATTRIBUTE_CONTEXT,
        CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        CU_POINTER_ATTRIBUTE_RANGE_SIZE,
    ];
    // Each slot has the type the driver writes for its attribute (unsigned int, int, CUcontext,
    // CUdeviceptr, size_t).
    let mut data: [*mut c_void; 5] = [
        &mut record.memory_type as *mut u32 as *mut c_void,
        &mut record.device as *mut i32 as *mut c_void,
        &mut record.context as *mut usize as *mut c_void,
        &mut record.range_start as *mut u64 as *mut c_void,
        &mut record.range_size as *mut usize as *mut c_void,
    ];
    // SAFETY: five attributes, five live slots of the sizes the driver writes.
    let status = unsafe {
        cuPointerGetAttributes(
            attributes.len() as u32,
            attributes.as_mut_ptr(),
            data.as_mut_ptr(),
            ptr,
        )
    };
    match status {
        CUresult::CUDA_SUCCESS => Ok(record),
        status => Err(status),
    }
}
