//! Typed tensors over device memory: an owning [`DeviceTensor`], borrowed [`View`]s/[`ViewMut`]s
//! with arbitrary element strides, and the plain [`TensorDesc`] the validation works on (so every
//! shape/stride/alignment rule is testable without a GPU).
use crate::element::DeviceScalar;
use crate::error::{CudaContext, Error, Result};
use cust::memory::{CopyDestination, DeviceBuffer};
use std::marker::PhantomData;

/// Row-major strides (in elements) of `shape`; they saturate for a shape no allocation can hold.
pub fn contiguous_strides<const N: usize>(shape: [usize; N]) -> [usize; N] {
    let mut strides = [1usize; N];
    for i in (0..N.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1]);
    }
    strides
}

/// Elements of `shape`, or `None` where the count overflows.
fn elements<const N: usize>(shape: [usize; N]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Where a tensor is and how it is laid out: device address, shape, element strides, the number
/// of elements addressable from `ptr` inside its allocation, element size and device ordinal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorDesc<const N: usize> {
    /// Device address of element 0.
    pub ptr: u64,
    /// Extents, outermost first.
    pub shape: [usize; N],
    /// Strides, in elements.
    pub strides: [usize; N],
    /// Elements addressable from `ptr` inside its allocation (the bound every view is checked
    /// against).
    pub available: usize,
    /// Bytes per element.
    pub elem_bytes: usize,
    /// The CUDA device ordinal of the memory.
    pub device: u32,
}

impl<const N: usize> TensorDesc<N> {
    /// A dense row-major tensor filling its allocation exactly. A shape whose element count
    /// overflows (no allocation holds it) gets no available elements, so every call rejects it.
    pub fn contiguous(ptr: u64, shape: [usize; N], elem_bytes: usize, device: u32) -> Self {
        let available = elements(shape).unwrap_or(0);
        TensorDesc {
            ptr,
            shape,
            strides: contiguous_strides(shape),
            available,
            elem_bytes,
            device,
        }
    }

    /// One past the largest element offset the tensor touches (0 if it has no elements).
    /// Saturates rather than overflows, so absurd shapes or strides fail the bounds check.
    pub fn span(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.shape
            .iter()
            .zip(&self.strides)
            .fold(1usize, |span, (&n, &s)| {
                span.saturating_add((n - 1).saturating_mul(s))
            })
    }

    /// Device byte range `[start, end)` the tensor touches.
    pub fn byte_range(&self) -> (u64, u64) {
        let bytes = self.span().saturating_mul(self.elem_bytes) as u64;
        (self.ptr, self.ptr.saturating_add(bytes))
    }

    pub(crate) fn check_not_empty(&self, tensor: &'static str) -> Result<()> {
        if self.shape.contains(&0) {
            return Err(Error::EmptyDimension {
                tensor,
                shape: self.shape.to_vec(),
            });
        }
        Ok(())
    }

    pub(crate) fn check_in_bounds(&self, tensor: &'static str) -> Result<()> {
        let needed = self.span();
        if needed > self.available {
            return Err(Error::OutOfBounds {
                tensor,
                needed,
                available: self.available,
            });
        }
        Ok(())
    }

    /// No two index tuples map to one address: sorted by stride, each stride covers the extent of
    /// all smaller dimensions. (Sufficient, and exact for the layouts kernels produce.)
    pub(crate) fn check_non_overlapping(&self, tensor: &'static str) -> Result<()> {
        let mut dims: Vec<(usize, usize)> = self
            .strides
            .iter()
            .copied()
            .zip(self.shape.iter().copied())
            .filter(|&(_, n)| n > 1)
            .collect();
        dims.sort_unstable();
        let mut extent = 1;
        for (stride, n) in dims {
            if stride < extent {
                return Err(Error::OverlappingOutput {
                    tensor,
                    shape: self.shape.to_vec(),
                    strides: self.strides.to_vec(),
                });
            }
            extent = stride.saturating_mul(n);
        }
        Ok(())
    }

    pub(crate) fn check_contiguous(&self, tensor: &'static str) -> Result<()> {
        let expected = contiguous_strides(self.shape);
        let matters = |i: usize| self.shape[i] > 1;
        if (0..N).any(|i| matters(i) && self.strides[i] != expected[i]) {
            return Err(Error::NotContiguous {
                tensor,
                shape: self.shape.to_vec(),
                strides: self.strides.to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    pub(crate) fn overlaps(&self, other_start: u64, other_end: u64) -> bool {
        let (start, end) = self.byte_range();
        start < other_end && other_start < end
    }
}

/// An owned tensor in device memory, dense row-major.
pub struct DeviceTensor<T: DeviceScalar, const N: usize> {
    buf: DeviceBuffer<T::Raw>,
    shape: [usize; N],
    device: u32,
}

impl<T: DeviceScalar, const N: usize> DeviceTensor<T, N> {
    /// Allocates uninitialised device memory; the context must be current (see `Context`).
    pub(crate) fn alloc(shape: [usize; N], device: u32) -> Result<Self> {
        let len = Self::elements_of(shape)?;
        if len == 0 {
            return Err(Error::EmptyDimension {
                tensor: "tensor",
                shape: shape.to_vec(),
            });
        }
        // SAFETY: T::Raw is Pod; every element is written before it is read back by our API.
        let buf = unsafe { DeviceBuffer::uninitialized(len) }.during("allocating a tensor")?;
        Ok(DeviceTensor { buf, shape, device })
    }

    /// Elements of `shape`, if their bytes fit one allocation (at most `isize::MAX`): else a
    /// wrapped count would allocate a small buffer under a huge shape.
    fn elements_of(shape: [usize; N]) -> Result<usize> {
        let elem_bytes = std::mem::size_of::<T::Raw>();
        elements(shape)
            .filter(|&n| {
                n.checked_mul(elem_bytes)
                    .is_some_and(|b| b <= isize::MAX as usize)
            })
            .ok_or_else(|| Error::AllocationTooLarge {
                shape: shape.to_vec(),
                elem_bytes,
            })
    }

    pub(crate) fn upload(data: &[T], shape: [usize; N], device: u32) -> Result<Self> {
        let expected = Self::elements_of(shape)?;
        if data.len() != expected {
            return Err(Error::HostLength {
                tensor: "tensor",
                shape: shape.to_vec(),
                expected,
                got: data.len(),
            });
        }
        let mut t = Self::alloc(shape, device)?;
        t.copy_from_host(data)?;
        Ok(t)
    }

    /// Extents, outermost first.
    pub fn shape(&self) -> [usize; N] {
        self.shape
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Device ordinal the memory lives on.
    pub fn device(&self) -> u32 {
        self.device
    }

    fn desc(&self) -> TensorDesc<N> {
        TensorDesc::contiguous(
            self.buf.as_device_ptr().as_raw(),
            self.shape,
            std::mem::size_of::<T>(),
            self.device,
        )
    }

    /// The whole tensor.
    pub fn view(&self) -> View<'_, T, N> {
        View {
            desc: self.desc(),
            _marker: PhantomData,
        }
    }

    /// The whole tensor, writable.
    pub fn view_mut(&mut self) -> ViewMut<'_, T, N> {
        ViewMut {
            desc: self.desc(),
            _marker: PhantomData,
        }
    }

    /// A strided view starting `offset` elements in, e.g. Q, K or V out of a packed QKV tensor.
    /// Bounds are checked here; layout rules are checked by the operation that takes the view.
    pub fn strided_view<const M: usize>(
        &self,
        offset: usize,
        shape: [usize; M],
        strides: [usize; M],
    ) -> Result<View<'_, T, M>> {
        Ok(View {
            desc: self.sub_desc(offset, shape, strides)?,
            _marker: PhantomData,
        })
    }

    /// A writable strided view, e.g. an output written into a slice of a larger buffer.
    pub fn strided_view_mut<const M: usize>(
        &mut self,
        offset: usize,
        shape: [usize; M],
        strides: [usize; M],
    ) -> Result<ViewMut<'_, T, M>> {
        Ok(ViewMut {
            desc: self.sub_desc(offset, shape, strides)?,
            _marker: PhantomData,
        })
    }

    fn sub_desc<const M: usize>(
        &self,
        offset: usize,
        shape: [usize; M],
        strides: [usize; M],
    ) -> Result<TensorDesc<M>> {
        let available = self.len().checked_sub(offset).ok_or(Error::OutOfBounds {
            tensor: "strided view",
            needed: offset,
            available: self.len(),
        })?;
        let desc = TensorDesc {
            ptr: self.buf.as_device_ptr().as_raw() + (offset * std::mem::size_of::<T>()) as u64,
            shape,
            strides,
            available,
            elem_bytes: std::mem::size_of::<T>(),
            device: self.device,
        };
        desc.check_in_bounds("strided view")?;
        Ok(desc)
    }

    /// Copies the whole tensor to the host (synchronous).
    pub fn to_host(&self) -> Result<Vec<T>> {
        let mut raw = vec![<T::Raw as bytemuck::Zeroable>::zeroed(); self.len()];
        self.buf
            .copy_to(&mut raw[..])
            .during("copying a tensor to the host")?;
        Ok(bytemuck::cast_slice(&raw).to_vec())
    }

    /// Overwrites the tensor with host data of the same length (synchronous).
    pub fn copy_from_host(&mut self, data: &[T]) -> Result<()> {
        if data.len() != self.len() {
            return Err(Error::HostLength {
                tensor: "tensor",
                shape: self.shape.to_vec(),
                expected: self.len(),
                got: data.len(),
            });
        }
        self.buf
            .copy_from(bytemuck::cast_slice::<T, T::Raw>(data))
            .during("copying a tensor to the device")
    }

    /// Sets every element to `value` (e.g. NaN to poison an output before a run).
    pub fn fill(&mut self, value: T) -> Result<()> {
        let bytes = bytemuck::bytes_of(&value);
        match bytes.len() {
            2 => self.buf.set_16(u16::from_ne_bytes([bytes[0], bytes[1]])),
            4 => self
                .buf
                .set_32(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
            _ => self.buf.set_8(bytes[0]),
        }
        .during("filling a tensor")
    }
}

/// A read-only view of device memory with shape and element strides.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T, const N: usize> {
    desc: TensorDesc<N>,
    _marker: PhantomData<&'a T>,
}

/// A writable view of device memory with shape and element strides.
#[derive(Debug)]
pub struct ViewMut<'a, T, const N: usize> {
    desc: TensorDesc<N>,
    _marker: PhantomData<&'a mut T>,
}

impl<T, const N: usize> View<'_, T, N> {
    /// The caller vouches for `desc` (its memory, bounds and lifetime).
    pub(crate) fn from_desc(desc: TensorDesc<N>) -> Self {
        View {
            desc,
            _marker: PhantomData,
        }
    }
    /// Where the view is and how it is laid out.
    pub fn desc(&self) -> &TensorDesc<N> {
        &self.desc
    }
    /// Extents, outermost first.
    pub fn shape(&self) -> [usize; N] {
        self.desc.shape
    }
    /// Strides, in elements.
    pub fn strides(&self) -> [usize; N] {
        self.desc.strides
    }
}

impl<T, const N: usize> ViewMut<'_, T, N> {
    /// The caller vouches for `desc` (its memory, bounds and lifetime).
    pub(crate) fn from_desc(desc: TensorDesc<N>) -> Self {
        ViewMut {
            desc,
            _marker: PhantomData,
        }
    }
    /// The same memory, read-only, for as long as this borrow: e.g. a KV cache that an append
    /// wrote, read by the attention that follows.
    pub fn as_view(&self) -> View<'_, T, N> {
        View::from_desc(self.desc)
    }
    /// Where the view is and how it is laid out.
    pub fn desc(&self) -> &TensorDesc<N> {
        &self.desc
    }
    /// Extents, outermost first.
    pub fn shape(&self) -> [usize; N] {
        self.desc.shape
    }
    /// Strides, in elements.
    pub fn strides(&self) -> [usize; N] {
        self.desc.strides
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// A shape whose element or byte count overflows is a typed error, never a wrapped (small)
    /// allocation under a huge shape.
    #[test]
    fn allocations_too_large_to_count_are_errors() {
        let count = DeviceTensor::<bf16, 4>::elements_of;
        assert_eq!(count([2, 3, 4, 5]).unwrap(), 120);
        for shape in [
            [1 << 32, 1 << 32, 1, 1], // 2^64 elements: wraps to 0
            [3, 1 << 62, 1, 1],       // wraps to 2^62
            [1, 1, 1, 1 << 62],       // 2^63 bytes: over isize::MAX
            [usize::MAX, 1, 1, 1],    // the bytes overflow
        ] {
            let err = count(shape).unwrap_err();
            assert!(matches!(err, Error::AllocationTooLarge { .. }), "{err}");
        }
        // A descriptor of such a shape holds nothing, so every bounds check rejects it.
        let desc = TensorDesc::contiguous(0x1000, [2, 1 << 32, 1 << 32, 1], 2, 0);
        assert_eq!(desc.available, 0);
        assert_eq!(desc.strides[0], usize::MAX);
    }
}
