//! Element types: what lives in device tensors, and which of them the attention kernels take.
use cust::memory::DeviceCopy;
use half::{bf16, f16};

/// Data types of device tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// `half::bf16`.
    BF16,
    /// `half::f16`.
    F16,
    /// `f32` (LSE outputs, split partials).
    F32,
    /// `i32` (varlen prefix sums, key counts, block tables).
    I32,
}

/// A scalar stored in device memory. `Raw` is the bit-identical type cust copies (`half` 2's types
/// are not `DeviceCopy`: cust_core implements it for `half` 1 only).
pub trait DeviceScalar: Copy + bytemuck::Pod + Send + Sync + 'static {
    /// The type cust copies, bit-identical to `Self`.
    type Raw: DeviceCopy + bytemuck::Pod;
    /// The type's tag.
    const DTYPE: DType;
    /// The value as `f32` (exact for every type but `i32` beyond 2^24).
    fn to_f32(self) -> f32;
    /// `v` in this type: rounded to nearest even for the 16-bit types, truncated toward zero
    /// (saturating) for `i32`.
    fn from_f32(v: f32) -> Self;
    /// A NaN pattern of this type, used to poison outputs in tests.
    fn nan() -> Self;
}

/// 16-bit types the attention kernels take for Q, K, V and O.
pub trait AttnElement: DeviceScalar<Raw = u16> {
    /// Kernel entry-name suffix.
    const KERNEL_NAME: &'static str;
}

impl DeviceScalar for bf16 {
    type Raw = u16;
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn nan() -> Self {
        bf16::NAN
    }
}

impl DeviceScalar for f16 {
    type Raw = u16;
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn nan() -> Self {
        f16::NAN
    }
}

impl DeviceScalar for f32 {
    type Raw = f32;
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn nan() -> Self {
        f32::NAN
    }
}

/// `i32` tensors hold varlen prefix sums (`cu_seqlens`); their "NaN" poison is `i32::MIN`.
impl DeviceScalar for i32 {
    type Raw = i32;
    const DTYPE: DType = DType::I32;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> Self {
        v as i32
    }
    fn nan() -> Self {
        i32::MIN
    }
}

impl AttnElement for bf16 {
    const KERNEL_NAME: &'static str = "bf16";
}

impl AttnElement for f16 {
    const KERNEL_NAME: &'static str = "f16";
}
