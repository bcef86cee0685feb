//! Every way a call can fail, as one typed error with a message that says what to fix.

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed call: each variant names what was wrong and its message says what to fix.
///
/// The checks run on the host before the launches they guard; [`Error::Cuda`] and
/// [`Error::Driver`] report the driver itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `cuInit` failed: no CUDA driver or no visible device.
    #[error(
        "no CUDA device is available (cuInit: {0}); duo-attn needs an NVIDIA Hopper GPU (sm_90)"
    )]
    NoDevice(cust::error::CudaError),
    /// The device ordinal asked for is not among the visible devices.
    #[error("device ordinal {ordinal} does not exist: {count} CUDA device(s) visible")]
    DeviceOutOfRange {
        /// The ordinal asked for.
        ordinal: u32,
        /// Devices visible to the process.
        count: u32,
    },
    /// The device is not a Hopper GPU (compute capability 9.0).
    #[error(
        "device {ordinal} ({name}) has compute capability {major}.{minor}; duo-attn's kernels need sm_90 (Hopper: H100/H200)"
    )]
    UnsupportedDevice {
        /// The device's ordinal.
        ordinal: u32,
        /// The device's name as the driver reports it.
        name: String,
        /// Compute capability, major part.
        major: i32,
        /// Compute capability, minor part.
        minor: i32,
    },
    /// A driver call made through `cust` failed.
    #[error("CUDA error during {during}: {source}")]
    Cuda {
        /// What the library was doing.
        during: &'static str,
        /// The driver's error.
        source: cust::error::CudaError,
    },
    /// A driver call that `cust` does not wrap (tensor maps, extended launches) failed.
    #[error("CUDA driver error {name} ({status}) during {during}")]
    Driver {
        /// What the library was doing.
        during: &'static str,
        /// The raw `CUresult`.
        status: i32,
        /// The driver's name of the status (`cuGetErrorName`), e.g. `CUDA_ERROR_INVALID_VALUE`.
        name: String,
    },
    /// Host data to upload does not have as many elements as the shape needs.
    #[error("host data for `{tensor}` has {got} elements but shape {shape:?} needs {expected}")]
    HostLength {
        /// The tensor being uploaded.
        tensor: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// Elements the shape holds.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// The byte size of a tensor overflows `usize`.
    #[error(
        "a tensor of shape {shape:?} with {elem_bytes}-byte elements is larger than any allocation can be"
    )]
    AllocationTooLarge {
        /// The shape asked for.
        shape: Vec<usize>,
        /// Bytes per element.
        elem_bytes: usize,
    },
    /// A tensor to allocate or an operand has a dimension of size 0.
    #[error("`{tensor}` has a zero-sized dimension: shape {shape:?}")]
    EmptyDimension {
        /// The operand.
        tensor: &'static str,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// An operand's shape does not agree with the others'.
    #[error("`{tensor}` has shape {got:?} but {expected:?} was expected ({why})")]
    ShapeMismatch {
        /// The operand.
        tensor: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// The shape the other operands imply.
        expected: Vec<usize>,
        /// The rule that relates them.
        why: &'static str,
    },
    /// The head dim is not one the chosen kernel supports.
    #[error("head dim {head_dim} is not supported by {by}: use {supported}")]
    UnsupportedHeadDim {
        /// The head dim given.
        head_dim: usize,
        /// The kernel or operation that rejects it.
        by: &'static str,
        /// The head dims it takes.
        supported: &'static str,
    },
    /// The query heads are not a whole number of groups per KV head.
    #[error("query heads ({heads_q}) must be a multiple of KV heads ({heads_kv}) for GQA/MQA")]
    HeadGroupMismatch {
        /// Query heads.
        heads_q: usize,
        /// KV heads.
        heads_kv: usize,
    },
    /// `AttentionConfig::head_kinds` does not have one entry per KV head.
    #[error("head_kinds lists {got} KV heads but the K/V tensors have {expected}")]
    HeadKindsLength {
        /// Entries in `head_kinds`.
        got: usize,
        /// KV heads of the K/V operands.
        expected: usize,
    },
    /// The last (head dim) axis of an operand is strided.
    #[error("`{tensor}`: the head dim must be contiguous (stride 1), got stride {stride}")]
    NonContiguousHeadDim {
        /// The operand.
        tensor: &'static str,
        /// Its head-dim stride, in elements.
        stride: usize,
    },
    /// An operand that must be packed (such as the decode's `cache_seqlens` and block table) is
    /// strided.
    #[error(
        "`{tensor}` must be contiguous: shape {shape:?} has strides {strides:?}, expected {expected:?}"
    )]
    NotContiguous {
        /// The operand.
        tensor: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// Its strides, in elements.
        strides: Vec<usize>,
        /// The packed strides.
        expected: Vec<usize>,
    },
    /// A view reaches past the end of the buffer it was cut from.
    #[error(
        "`{tensor}` reaches element {needed} past its start but its buffer holds only {available} from there"
    )]
    OutOfBounds {
        /// The operand.
        tensor: &'static str,
        /// Elements the view spans from its start.
        needed: usize,
        /// Elements its buffer holds from there.
        available: usize,
    },
    /// A base address or stride is not a multiple of the alignment the kernels load with.
    #[error(
        "`{tensor}`: {what} ({value} bytes) must be a multiple of {align} bytes for vectorised loads"
    )]
    Misaligned {
        /// The operand.
        tensor: &'static str,
        /// The address or stride at fault.
        what: &'static str,
        /// Its value in bytes.
        value: u64,
        /// The alignment needed, in bytes.
        align: u64,
    },
    /// An output's strides map two elements to one address.
    #[error(
        "`{tensor}` has overlapping strides {strides:?} for shape {shape:?}: two outputs would share an address"
    )]
    OverlappingOutput {
        /// The output.
        tensor: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// Its strides, in elements.
        strides: Vec<usize>,
    },
    /// An output shares device memory with an input the same launch reads.
    #[error("output `{output}` overlaps input `{input}` in device memory")]
    Aliasing {
        /// The output.
        output: &'static str,
        /// The input it overlaps.
        input: &'static str,
    },
    /// A varlen `cu_seqlens` array is not a valid prefix sum of the packed operands.
    #[error("`{which}` is not a valid varlen prefix sum: {why}")]
    InvalidCuSeqlens {
        /// `cu_seqlens_q` or `cu_seqlens_k`.
        which: &'static str,
        /// The first entry at fault and why.
        why: String,
    },
    /// `softmax_scale` is not finite and positive.
    #[error("softmax_scale must be finite and > 0, got {0}")]
    InvalidScale(f32),
    /// A FlashAttention `window_size` side below -1.
    #[error(
        "window_size ({left}, {right}) is invalid: each side is a key count (>= 0) or -1 for unbounded"
    )]
    InvalidWindowSize {
        /// The left side given.
        left: i64,
        /// The right side given.
        right: i64,
    },
    /// ALiBi slopes that do not fit the call: their count, rows or values.
    #[error("ALiBi slopes: {why}")]
    InvalidAlibi {
        /// What does not fit.
        why: String,
    },
    /// A rotary table that does not fit the call: its dims, values, positions or address.
    #[error("rotary embedding: {why}")]
    InvalidRotary {
        /// What does not fit.
        why: String,
    },
    /// ALiBi slopes were given to an operation or kernel without an ALiBi build.
    #[error(
        "ALiBi is not supported by {by}; it runs in prefill (plain, varlen and over a KV cache) on PrefillKernel::Auto, WgmmaTma or WgmmaWarpSpecialized at head dims 64 and 128, and in decode over contiguous or paged K/V"
    )]
    AlibiUnsupported {
        /// The operation or kernel.
        by: &'static str,
    },
    /// `AttentionConfig::right_window` is nonzero for an operation whose queries cannot see
    /// keys after them.
    #[error(
        "right_window {right} is not supported by {by}: its queries are the sequence's last tokens, so only a causal mask (right_window 0) applies"
    )]
    RightWindowUnsupported {
        /// The value given.
        right: u32,
        /// The operation.
        by: &'static str,
    },
    /// A length or count over the largest the kernels support (their index arithmetic is 32-bit).
    #[error("{what} is {value}, over the supported maximum {limit}")]
    TooLarge {
        /// The size at fault.
        what: &'static str,
        /// Its value.
        value: usize,
        /// The largest supported.
        limit: usize,
    },
    /// `PrefillKernel::WgmmaTma` was forced on an operand TMA cannot address.
    #[error(
        "the TMA prefill kernel cannot address `{tensor}`: {why}; use PrefillKernel::Auto, which falls back to cp.async loads"
    )]
    TmaLayout {
        /// The operand.
        tensor: &'static str,
        /// What TMA cannot take about it.
        why: String,
    },
    /// A head dim 256 prefill has an operand TMA cannot address (D = 256 runs only with TMA).
    #[error(
        "head dim 256 runs only with TMA loads, and TMA cannot address `{tensor}`: {why}; make the operand 16-byte aligned with nonzero strides (e.g. contiguous)"
    )]
    WideHeadDimLayout {
        /// The operand.
        tensor: &'static str,
        /// What TMA cannot take about it.
        why: String,
    },
    /// A decode has more new tokens per sequence than one decode block holds.
    #[error("decode takes 1 to {max} query tokens per sequence, got {got}; use prefill for more")]
    DecodeQueryBlock {
        /// New tokens per sequence given.
        got: usize,
        /// The most a decode takes.
        max: usize,
    },
    /// Appending to a cache slot would pass the cache's capacity.
    #[error(
        "the KV cache holds at most {capacity} tokens per sequence; slot {slot} has {len} cached + {adding} new, which do not fit"
    )]
    CacheFull {
        /// Tokens a slot holds at most.
        capacity: usize,
        /// The slot.
        slot: usize,
        /// Tokens it holds.
        len: usize,
        /// Tokens the call adds.
        adding: usize,
    },
    /// A paged cache's pool has too few free pages for the call.
    #[error(
        "the paged KV cache's pool has {free} free pages of {pages}, and this call needs {needed} more; reset finished slots or size the pool larger (`CachePaging::pages`)"
    )]
    CachePagesExhausted {
        /// Pages the call needs.
        needed: usize,
        /// Pages free.
        free: usize,
        /// Pages in the pool.
        pages: usize,
    },
    /// A slot range names slots the cache does not have.
    #[error("cache slots {start}..{end} do not exist: the cache has {slots} sequence slots")]
    SlotOutOfRange {
        /// First slot of the range.
        start: usize,
        /// One past its last slot.
        end: usize,
        /// Slots in the cache.
        slots: usize,
    },
    /// A chunk over several slots needs them at one length, and they are not.
    #[error(
        "a prefill chunk over several sequences needs them at one length, but layer {layer} holds {lens:?} tokens in slots {first}.. ; prefill them in one ragged launch (`prefill_varlen`) or each through `DuoCache::slots`"
    )]
    UnevenCacheLengths {
        /// The layer.
        layer: usize,
        /// First slot of the range.
        first: usize,
        /// Tokens each slot of the range holds.
        lens: Vec<usize>,
    },
    /// A layer index past the cache's layers.
    #[error("layer {layer} does not exist: the cache has {layers} layers")]
    LayerOutOfRange {
        /// The layer asked for.
        layer: usize,
        /// Layers in the cache.
        layers: usize,
    },
    /// A `CacheConfig` that cannot describe a cache (the message says which field).
    #[error("invalid cache configuration: {0}")]
    InvalidCacheConfig(String),
    /// A head pattern file or threshold that cannot be used (the message says why).
    #[error("head pattern: {0}")]
    Pattern(String),
    /// A head pattern file could not be read.
    #[error("reading head pattern file {path}: {source}")]
    PatternIo {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A paged K/V operand (pages or block table) that does not fit the call.
    #[error("paged K/V: {why}")]
    InvalidPagedKv {
        /// What is wrong with it.
        why: String,
    },
    /// A `cache_seqlens` entry outside the keys its cache holds.
    #[error(
        "`cache_seqlens` entry {seq} is {got}, outside 0..={capacity} (the keys its cache holds)"
    )]
    InvalidCacheSeqlens {
        /// The sequence.
        seq: usize,
        /// Its entry.
        got: i32,
        /// Keys its cache holds.
        capacity: usize,
    },
    /// A caller's stream that a context cannot queue on.
    #[error("the stream cannot be used: {why}")]
    ForeignStream {
        /// Why: the driver could not tell its context, or it belongs to another one.
        why: String,
    },
    /// A foreign device address that cannot be viewed.
    #[error("device address {ptr:#x} cannot be viewed: {why}")]
    ForeignPointer {
        /// The address.
        ptr: u64,
        /// What the driver's record of it says.
        why: String,
    },
    /// An operand on another device than the context's.
    #[error(
        "`{tensor}` lives on device {tensor_device} but this context runs on device {context_device}"
    )]
    WrongDevice {
        /// The operand.
        tensor: &'static str,
        /// Its device.
        tensor_device: u32,
        /// The context's device.
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
