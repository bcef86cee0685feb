//! Every way a call can fail, as one typed error with a message that says what to fix.

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no CUDA device is available (cuInit: {0}); duo-attn needs an NVIDIA Hopper GPU (sm_90)"
    )]
    NoDevice(cust::error::CudaError),
    #[error("device ordinal {ordinal} does not exist: {count} CUDA device(s) visible")]
    DeviceOutOfRange { ordinal: u32, count: u32 },
    #[error(
        "device {ordinal} ({name}) has compute capability {major}.{minor}; duo-attn's kernels need sm_90 (Hopper: H100/H200)"
    )]
    UnsupportedDevice {
        ordinal: u32,
        name: String,
        major: i32,
        minor: i32,
    },
    #[error("CUDA error during {during}: {source}")]
    Cuda {
        during: &'static str,
        source: cust::error::CudaError,
    },
    #[error("CUDA driver error {name} ({status}) during {during}")]
    Driver {
        during: &'static str,
        status: i32,
        /// The driver's name of the status (`cuGetErrorName`), e.g. `CUDA_ERROR_INVALID_VALUE`.
        name: String,
    },
    #[error("host data for `{tensor}` has {got} elements but shape {shape:?} needs {expected}")]
    HostLength {
        tensor: &'static str,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error(
        "a tensor of shape {shape:?} with {elem_bytes}-byte elements is larger than any allocation can be"
    )]
    AllocationTooLarge {
        shape: Vec<usize>,
        elem_bytes: usize,
    },
    #[error("`{tensor}` has a zero-sized dimension: shape {shape:?}")]
    EmptyDimension {
        tensor: &'static str,
        shape: Vec<usize>,
    },
    #[error("`{tensor}` has shape {got:?} but {expected:?} was expected ({why})")]
    ShapeMismatch {
        tensor: &'static str,
        got: Vec<usize>,
        expected: Vec<usize>,
        why: &'static str,
    },
    #[error("head dim {head_dim} is not supported by {by}: use {supported}")]
    UnsupportedHeadDim {
        head_dim: usize,
        by: &'static str,
        supported: &'static str,
    },
    #[error("query heads ({heads_q}) must be a multiple of KV heads ({heads_kv}) for GQA/MQA")]
    HeadGroupMismatch { heads_q: usize, heads_kv: usize },
    #[error("head_kinds lists {got} KV heads but the K/V tensors have {expected}")]
    HeadKindsLength { got: usize, expected: usize },
    #[error("`{tensor}`: the head dim must be contiguous (stride 1), got stride {stride}")]
    NonContiguousHeadDim { tensor: &'static str, stride: usize },
    #[error(
        "`{tensor}` must be contiguous: shape {shape:?} has strides {strides:?}, expected {expected:?}"
    )]
    NotContiguous {
        tensor: &'static str,
        shape: Vec<usize>,
        strides: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "`{tensor}` reaches element {needed} past its start but its buffer holds only {available} from there"
    )]
    OutOfBounds {
        tensor: &'static str,
        needed: usize,
        available: usize,
    },
    #[error(
        "`{tensor}`: {what} ({value} bytes) must be a multiple of {align} bytes for vectorised loads"
    )]
    Misaligned {
        tensor: &'static str,
        what: &'static str,
        value: u64,
        align: u64,
    },
    #[error(
        "`{tensor}` has overlapping strides {strides:?} for shape {shape:?}: two outputs would share an address"
    )]
    OverlappingOutput {
        tensor: &'static str,
        shape: Vec<usize>,
        strides: Vec<usize>,
    },
    #[error("output `{output}` overlaps input `{input}` in device memory")]
    Aliasing {
        output: &'static str,
        input: &'static str,
    },
    #[error("`{which}` is not a valid varlen prefix sum: {why}")]
    InvalidCuSeqlens { which: &'static str, why: String },
    #[error("softmax_scale must be finite and > 0, got {0}")]
    InvalidScale(f32),
    #[error("{what} is {value}, over the supported maximum {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },
    #[error(
        "the TMA prefill kernel cannot address `{tensor}`: {why}; use PrefillKernel::Auto, which falls back to cp.async loads"
    )]
    TmaLayout { tensor: &'static str, why: String },
    #[error(
        "head dim 256 runs only with TMA loads, and TMA cannot address `{tensor}`: {why}; make the operand 16-byte aligned with nonzero strides (e.g. contiguous)"
    )]
    WideHeadDimLayout { tensor: &'static str, why: String },
    #[error("decode takes 1 to {max} query tokens per sequence, got {got}; use prefill for more")]
    DecodeQueryBlock { got: usize, max: usize },
    #[error(
        "the KV cache holds at most {capacity} tokens per sequence; slot {slot} has {len} cached + {adding} new, which do not fit"
    )]
    CacheFull {
        capacity: usize,
        slot: usize,
        len: usize,
        adding: usize,
    },
    #[error(
        "the paged KV cache's pool has {free} free pages of {pages}, and this call needs {needed} more; reset finished slots or size the pool larger (`CachePaging::pages`)"
    )]
    CachePagesExhausted {
        needed: usize,
        free: usize,
        pages: usize,
    },
    #[error("cache slots {start}..{end} do not exist: the cache has {slots} sequence slots")]
    SlotOutOfRange {
        start: usize,
        end: usize,
        slots: usize,
    },
    #[error(
        "a prefill chunk over several sequences needs them at one length, but layer {layer} holds {lens:?} tokens in slots {first}.. ; prefill them in one ragged launch (`prefill_varlen`) or each through `DuoCache::slots`"
    )]
    UnevenCacheLengths {
        layer: usize,
        first: usize,
        lens: Vec<usize>,
    },
    #[error("layer {layer} does not exist: the cache has {layers} layers")]
    LayerOutOfRange { layer: usize, layers: usize },
    #[error("invalid cache configuration: {0}")]
    InvalidCacheConfig(String),
    #[error("head pattern: {0}")]
    Pattern(String),
    #[error("reading head pattern file {path}: {source}")]
    PatternIo {
        path: String,
        source: std::io::Error,
    },
    #[error("paged K/V: {why}")]
    InvalidPagedKv { why: String },
    #[error(
        "`cache_seqlens` entry {seq} is {got}, outside 0..={capacity} (the keys its cache holds)"
    )]
    InvalidCacheSeqlens {
        seq: usize,
        got: i32,
        capacity: usize,
    },
    #[error("the stream cannot be used: {why}")]
    ForeignStream { why: String },
    #[error("device address {ptr:#x} cannot be viewed: {why}")]
    ForeignPointer { ptr: u64, why: String },
    #[error(
        "`{tensor}` lives on device {tensor_device} but this context runs on device {context_device}"
    )]
    WrongDevice {
        tensor: &'static str,
        tensor_device: u32,
        context_device: u32,
    },
}

/// Attaches what was being done to a CUDA error.
pub(crate) trait CudaContext<T> {
    fn during(self, during: &'static str) -> Result<T>;
}

/// Maps a raw driver status (for driver calls cust does not wrap) to our error.
pub(crate) trait RawCudaStatus {
    fn during_raw(self, during: &'static str) -> Result<()>;
}

impl RawCudaStatus for cust::sys::CUresult {
    fn during_raw(self, during: &'static str) -> Result<()> {
        if self == cust::sys::CUresult::CUDA_SUCCESS {
            return Ok(());
        }
        // cust has no public conversion; report the code and the driver's name of it.
        let mut name: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: the driver writes a pointer to a static string, or fails for unknown codes.
        let named = unsafe { cust::sys::cuGetErrorName(self, &mut name) };
        let name = if named == cust::sys::CUresult::CUDA_SUCCESS && !name.is_null() {
            // SAFETY: a NUL-terminated static string from the driver.
            unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        } else {
            "(unnamed)".to_string()
        };
        Err(Error::Driver {
            during,
            status: self as i32,
            name,
        })
    }
}

impl<T> CudaContext<T> for std::result::Result<T, cust::error::CudaError> {
    fn during(self, during: &'static str) -> Result<T> {
        self.map_err(|source| Error::Cuda { during, source })
    }
}
