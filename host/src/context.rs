//! A device, its loaded kernel module and a stream: what every operation runs through.
//!
//! Contexts of one device share the module, the device's primary CUDA context and the host-side
//! caches (`Shared`); each has its own stream and scratch memory, so work on different streams
//! never shares scratch.
use crate::element::DeviceScalar;
use crate::error::{CudaContext, Error, RawCudaStatus, Result};
use crate::kernels;
use crate::split_kv::{SplitChoices, SplitKv};
use crate::tensor::DeviceTensor;
use cust::context::{Context as CudaContext_, CurrentContext};
use cust::device::{Device, DeviceAttribute};
use cust::function::BlockSize;
use cust::memory::DeviceBuffer;
use cust::module::Module;
use cust::stream::{Stream, StreamFlags};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// What the context's device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The CUDA device ordinal.
    pub ordinal: u32,
    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// (major, minor): (9, 0) on Hopper.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors (132 on an H100 SXM or H200).
    pub multiprocessors: u32,
    /// L2 cache size, in bytes.
    pub l2_cache_bytes: usize,
    /// Device memory, in bytes.
    pub total_memory: usize,
}

/// Scratch memory of launches, grown on demand and reused: every user is queued on the context's
/// stream, so reuse is ordered.
#[derive(Default)]
struct Scratch {
    /// Split-KV partial rows and their LSE (prefill and decode).
    partials: Option<DeviceBuffer<f32>>,
    /// The persistent prefill scheduler's tile counter and decode's split counters: zero between
    /// launches (each launch resets the ones it used), zeroed on the stream when (re)allocated.
    /// So words past the two a prefill uses are zero during it: a KV-cache prefill's key starts.
    counters: Option<DeviceBuffer<u32>>,
    /// Set once a launch that uses the scratch was captured into a CUDA graph: the graph holds
    /// the addresses, so outgrown buffers are kept (in `retired`) until the context drops.
    captured: bool,
    retired: Vec<RetiredBuffer>,
}

/// An outgrown scratch buffer a captured graph may still address.
#[allow(dead_code)] // held only to be freed with the context
enum RetiredBuffer {
    Partials(DeviceBuffer<f32>),
    Counters(DeviceBuffer<u32>),
}

/// Where a context queues its work.
enum ContextStream {
    /// A stream the context created (a blocking stream) and destroys.
    Own(Stream),
    /// A caller's stream (`Context::on_stream`), which the caller keeps alive.
    Borrowed(cust::sys::CUstream),
}

// SAFETY: a CUstream handle may be used from any thread (the driver API is thread-safe); the
// caller of `Context::on_stream` vouches that the stream outlives the context.
unsafe impl Send for ContextStream {}
unsafe impl Sync for ContextStream {}

impl ContextStream {
    fn raw(&self) -> cust::sys::CUstream {
        match self {
            ContextStream::Own(s) => s.as_inner(),
            ContextStream::Borrowed(s) => *s,
        }
    }
}

/// What the contexts of one device share.
struct Shared {
    // Field order is drop order: the module goes before the CUDA context.
    module: Module,
    cuda: CudaContext_,
    info: DeviceInfo,
    /// Resident blocks per SM, by kernel entry (occupancy queries are cached).
    occupancy: Mutex<HashMap<String, u32>>,
    /// Resident clusters, by kernel entry and cluster size (`resident_clusters`; looked up by
    /// the entry's name, so a decode launch allocates no key).
    cluster_occupancy: Mutex<HashMap<String, [Option<u32>; MAX_CLUSTER as usize + 1]>>,
    /// Recent split-KV choices of prefill launches (each replays the scheduler on the host).
    split_choices: Mutex<SplitChoices>,
}

/// Device addresses of the scratch buffers for one launch (0: not asked for).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScratchPtrs {
    pub partials: u64,
    pub counters: u64,
}

/// One GPU with duo-attn's kernels loaded, and the stream its operations are queued on.
///
/// [`Context::new`] makes a blocking stream of its own, so synchronous copies such as
/// [`DeviceTensor::to_host`] see the results of queued operations. [`Context::on_new_stream`]
/// and [`Context::on_stream`] make further contexts of the same device, sharing the loaded
/// kernels, that queue on another stream (a new one, or a caller's).
pub struct Context {
    // Field order is drop order: the stream and the scratch go before the shared CUDA context.
    stream: ContextStream,
    /// Split-KV partials and launch counters (`with_scratch`).
    scratch: Mutex<Scratch>,
    shared: Arc<Shared>,
    /// Launch kernels with programmatic stream serialization (`set_dependent_launch`).
    dependent_launch: bool,
    /// Merge a decode's splits in clusters where they fit (`set_decode_clusters`).
    decode_clusters: bool,
}

impl Drop for Context {
    /// Waits for the work queued on the context's stream before its scratch memory is freed
    /// (not while the stream is being captured: a synchronize would end the capture).
    fn drop(&mut self) {
        if self.make_current().is_ok() && matches!(self.capturing(), Ok(false)) {
            let _ = self.synchronize();
        }
    }
}

impl Context {
    /// Number of visible CUDA devices; `Error::NoDevice` when the driver finds none.
    pub fn device_count() -> Result<u32> {
        cust::init(cust::CudaFlags::empty()).map_err(Error::NoDevice)?;
        Device::num_devices().during("counting devices")
    }

    /// Opens device `ordinal` (its primary context), checks it is a Hopper GPU (sm_90) and loads the
    /// embedded kernels.
    pub fn new(ordinal: u32) -> Result<Self> {
        let count = Self::device_count()?;
        if count == 0 {
            return Err(Error::NoDevice(cust::error::CudaError::NoDevice));
        }
        if ordinal >= count {
            return Err(Error::DeviceOutOfRange { ordinal, count });
        }
        let device = Device::get_device(ordinal).during("opening the device")?;
        let attr = |a| device.get_attribute(a).during("reading device attributes");
        let info = DeviceInfo {
            ordinal,
            name: device.name().during("reading the device name")?,
            compute_capability: (
                attr(DeviceAttribute::ComputeCapabilityMajor)?,
                attr(DeviceAttribute::ComputeCapabilityMinor)?,
            ),
            multiprocessors: attr(DeviceAttribute::MultiprocessorCount)? as u32,
            l2_cache_bytes: attr(DeviceAttribute::L2CacheSize)? as usize,
            total_memory: device.total_memory().during("reading device memory size")?,
        };
        if info.compute_capability != (9, 0) {
            let (major, minor) = info.compute_capability;
            return Err(Error::UnsupportedDevice {
                ordinal,
                name: info.name,
                major,
                minor,
            });
        }
        let cuda = CudaContext_::new(device).during("creating the context")?;
        let module = Self::load_module()?;
        let shared = Arc::new(Shared {
            module,
            cuda,
            info,
            occupancy: Mutex::new(HashMap::new()),
            cluster_occupancy: Mutex::new(HashMap::new()),
            split_choices: Mutex::new(SplitChoices::default()),
        });
        Self::with_shared(shared)
    }

    /// A context on a new stream of its own (a blocking stream, as [`Context::new`]'s).
    fn with_shared(shared: Arc<Shared>) -> Result<Self> {
        CurrentContext::set_current(&shared.cuda).during("making the context current")?;
        let stream = Stream::new(StreamFlags::DEFAULT, None).during("creating a stream")?;
        Ok(Context {
            stream: ContextStream::Own(stream),
            scratch: Mutex::new(Scratch::default()),
            shared,
            dependent_launch: true,
            decode_clusters: true,
        })
    }

    /// Another context of this device that shares the loaded kernels but queues on a new stream
    /// of its own, with its own scratch memory: work queued on two such contexts may overlap on
    /// the GPU (order it with events where it must not).
    pub fn on_new_stream(&self) -> Result<Context> {
        let mut ctx = Self::with_shared(self.shared.clone())?;
        ctx.dependent_launch = self.dependent_launch;
        ctx.decode_clusters = self.decode_clusters;
        Ok(ctx)
    }

    /// Another context of this device that shares the loaded kernels and queues its operations on
    /// `stream`, a stream of the caller's (cudarc's, candle's, a framework's), so they run in
    /// order with the caller's own work on it, and can be captured into a CUDA graph with it.
    /// The stream must belong to this device's primary context (where CUDA runtimes create
    /// theirs); else [`Error::ForeignStream`].
    ///
    /// On a non-blocking stream (`CU_STREAM_NON_BLOCKING`), the legacy default stream does not
    /// order with the context's work: [`DeviceTensor`]'s copies and `fill` run there, so order
    /// them yourself (synchronize the device after them, and [`Context::synchronize`] before
    /// reading results back).
    ///
    /// Graph capture: an operation captured on `stream` (`cuStreamBeginCapture`) queues nothing
    /// until the graph is launched, and the graph then replays it with the same arguments
    /// (addresses, lengths, split counts). Run each operation once before capturing it, so the
    /// context's scratch memory has its size; from the first captured launch on, outgrown
    /// scratch buffers are kept until the context drops, so a graph never addresses freed
    /// memory. Launch graphs on this stream (or ordered with it: they share the context's
    /// scratch), and destroy them before the context. `attention_varlen` reads the prefix sums
    /// back and cannot be captured; capture `launch_prefill_plan` instead.
    ///
    /// # Safety
    /// `stream` must stay valid (not destroyed) while the returned context and anything queued
    /// through it live.
    pub unsafe fn on_stream(&self, stream: cust::sys::CUstream) -> Result<Context> {
        self.make_current()?;
        let mut owner: cust::sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the caller vouches that `stream` is a valid stream handle (or 0, the legacy
        // default stream, whose context is the current one).
        let status = unsafe { cust::sys::cuStreamGetCtx(stream, &mut owner) };
        if status != cust::sys::CUresult::CUDA_SUCCESS {
            return Err(Error::ForeignStream {
                why: format!("the driver could not read which context owns it ({status:?})"),
            });
        }
        if owner != self.raw_context() {
            return Err(Error::ForeignStream {
                why: "it belongs to another CUDA context (another device, or a context other \
                      than the device's primary one, where duo-attn's kernels are loaded)"
                    .into(),
            });
        }
        Ok(Context {
            stream: ContextStream::Borrowed(stream),
            scratch: Mutex::new(Scratch::default()),
            shared: self.shared.clone(),
            dependent_launch: self.dependent_launch,
            decode_clusters: self.decode_clusters,
        })
    }

    /// Whether kernels are launched with programmatic stream serialization (on by default).
    ///
    /// On, each kernel may start while the kernel before it on the stream finishes: its blocks
    /// are scheduled and wait on the device (`griddepcontrol.wait`, the first thing every
    /// duo-attn kernel does) until that kernel's work is complete and visible. This hides the
    /// launch gap between dependent kernels (layer after layer, a prefill chunk's append and
    /// attention); results are the same either way. Off, launches are plain `cuLaunchKernel`s.
    /// Contexts made from this one ([`Context::on_new_stream`], [`Context::on_stream`]) start
    /// with its setting. Tested eager and in CUDA graph capture and replay on driver 580
    /// (CUDA 13.0); a driver that refuses the launch attribute (graph capture of dependent
    /// launches came after the attribute itself) fails the launch with `Error::Cuda`: turn this
    /// off there.
    pub fn set_dependent_launch(&mut self, on: bool) {
        self.dependent_launch = on;
    }

    /// See [`Context::set_dependent_launch`].
    pub fn dependent_launch(&self) -> bool {
        self.dependent_launch
    }

    /// Whether a decode whose row groups split 2 to 16 ways launches each row group's splits as
    /// one thread-block cluster and merges them through distributed shared memory (on by
    /// default), rather than through partial rows in global memory and a counter. Launches whose
    /// clusters would not all fit on the GPU at once keep the global merge. Results are the same
    /// either way (up to float rounding); contexts made from this one start with its setting.
    pub fn set_decode_clusters(&mut self, on: bool) {
        self.decode_clusters = on;
    }

    /// See [`Context::set_decode_clusters`].
    pub fn decode_clusters(&self) -> bool {
        self.decode_clusters
    }

    /// The cubin when one was embedded and loads, else the PTX (JIT-compiled by the driver).
    fn load_module() -> Result<Module> {
        if !kernels::CUBIN.is_empty()
            && let Ok(m) = Module::from_cubin(kernels::CUBIN, &[])
        {
            return Ok(m);
        }
        Module::from_ptx(kernels::PTX, &[]).during("loading the kernel module")
    }

    /// What the context's device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.shared.info
    }

    /// The context's device ordinal.
    pub fn ordinal(&self) -> u32 {
        self.shared.info.ordinal
    }

    /// The stream operations are queued on, when the context made it (for events or interop);
    /// `None` on a caller's stream ([`Context::on_stream`]). [`Context::raw_stream`] answers in
    /// both cases.
    pub fn stream(&self) -> Option<&Stream> {
        match &self.stream {
            ContextStream::Own(s) => Some(s),
            ContextStream::Borrowed(_) => None,
        }
    }

    /// The driver handle of the stream operations are queued on.
    pub fn raw_stream(&self) -> cust::sys::CUstream {
        self.stream.raw()
    }

    /// The CUDA context (the device's primary context).
    pub(crate) fn raw_context(&self) -> cust::sys::CUcontext {
        self.shared.cuda.as_raw()
    }

    /// Makes this context current on the calling thread (each public operation does this).
    pub(crate) fn make_current(&self) -> Result<()> {
        CurrentContext::set_current(&self.shared.cuda).during("making the context current")
    }

    /// Whether the stream is being captured into a CUDA graph.
    fn capturing(&self) -> Result<bool> {
        let mut status = cust::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: the context's stream is valid (owned, or vouched for by `on_stream`'s caller).
        unsafe { cust::sys::cuStreamIsCapturing(self.raw_stream(), &mut status) }
            .during_raw("asking whether the stream is being captured")?;
        Ok(status != cust::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// Uninitialised device tensor.
    pub fn alloc<T: DeviceScalar, const N: usize>(
        &self,
        shape: [usize; N],
    ) -> Result<DeviceTensor<T, N>> {
        self.make_current()?;
        DeviceTensor::alloc(shape, self.ordinal())
    }

    /// Device tensor holding `data` (row-major, `shape`).
    pub fn upload<T: DeviceScalar, const N: usize>(
        &self,
        data: &[T],
        shape: [usize; N],
    ) -> Result<DeviceTensor<T, N>> {
        self.make_current()?;
        DeviceTensor::upload(data, shape, self.ordinal())
    }

    /// Waits for all work queued on the context's stream; reports errors of kernels that ran.
    pub fn synchronize(&self) -> Result<()> {
        self.make_current()?;
        // SAFETY: the context's stream is valid (owned, or vouched for by `on_stream`'s caller).
        unsafe { cust::sys::cuStreamSynchronize(self.raw_stream()) }
            .during_raw("synchronizing the stream")
    }

    /// Sets `rows` runs of `width` 4-byte words, `pitch` bytes apart from `ptr` on, to `value`,
    /// queued on the context's stream (a graph captures it as a memset node).
    pub(crate) fn fill_words(
        &self,
        ptr: u64,
        pitch: usize,
        width: usize,
        rows: usize,
        value: u32,
    ) -> Result<()> {
        self.make_current()?;
        // SAFETY: the caller passes words inside one of its allocations; the stream is valid.
        unsafe { cust::sys::cuMemsetD2D32Async(ptr, pitch, value, width, rows, self.raw_stream()) }
            .during_raw("setting cache lengths")
    }

    /// Copies `words` to device address `dst`, queued on the context's stream. The host words are
    /// staged before this returns (pageable memory), so the caller may drop them at once.
    pub(crate) fn copy_words_to_device(&self, dst: u64, words: &[i32]) -> Result<()> {
        self.make_current()?;
        // SAFETY: the caller passes `words.len()` words inside one of its allocations; the source
        // is a live slice of that length; the stream is valid.
        unsafe {
            cust::sys::cuMemcpyHtoDAsync_v2(
                dst,
                words.as_ptr().cast(),
                std::mem::size_of_val(words),
                self.raw_stream(),
            )
        }
        .during_raw("copying launch arrays to the device")
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.make_current()?;
        cust::memory::mem_get_info().during("reading free device memory")
    }

    /// Runs `launch` with scratch buffers of at least `partials` f32 (none when 0) and `counters`
    /// u32, holding the scratch lock until it has queued its kernels, so an address cannot be
    /// outgrown by another thread between being read and being used.
    ///
    /// An outgrown buffer is freed once the stream has finished with it (a synchronize), or kept
    /// until the context drops once a launch was captured into a graph (which addresses it on
    /// every replay; a capture cannot synchronize either).
    pub(crate) fn with_scratch<R>(
        &self,
        partials: usize,
        counters: usize,
        launch: impl FnOnce(ScratchPtrs) -> Result<R>,
    ) -> Result<R> {
        self.make_current()?;
        let mut scratch = self
            .scratch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        scratch.captured |= self.capturing()?;
        let grow_partials =
            partials > 0 && scratch.partials.as_ref().is_none_or(|b| b.len() < partials);
        let grow_counters = scratch.counters.as_ref().is_none_or(|b| b.len() < counters);
        if (grow_partials || grow_counters) && !scratch.captured {
            self.synchronize()?; // launches queued with the old buffers finish first
        }
        if grow_partials {
            // SAFETY: f32 is Pod; kernels write every partial they later read.
            let buf = unsafe { DeviceBuffer::uninitialized(partials) }
                .during("allocating split-KV partials")?;
            if let Some(old) = scratch.partials.replace(buf)
                && scratch.captured
            {
                scratch.retired.push(RetiredBuffer::Partials(old));
            }
        }
        if grow_counters {
            let len = counters.max(1);
            // SAFETY: u32 is Pod; zeroed on the stream below before any launch reads it.
            let buf = unsafe { DeviceBuffer::<u32>::uninitialized(len) }
                .during("allocating launch counters")?;
            // On the stream, not the legacy default stream, which a non-blocking stream does not
            // wait for (and a capture records it too).
            // SAFETY: `len` u32 of a live allocation, on the context's valid stream.
            unsafe {
                cust::sys::cuMemsetD32Async(buf.as_device_ptr().as_raw(), 0, len, self.raw_stream())
            }
            .during_raw("zeroing launch counters")?;
            if let Some(old) = scratch.counters.replace(buf)
                && scratch.captured
            {
                scratch.retired.push(RetiredBuffer::Counters(old));
            }
        }
        let ptrs = ScratchPtrs {
            partials: match (&scratch.partials, partials > 0) {
                (Some(b), true) => b.as_device_ptr().as_raw(),
                _ => 0,
            },
            counters: scratch
                .counters
                .as_ref()
                .map_or(0, |b| b.as_device_ptr().as_raw()),
        };
        launch(ptrs)
    }

    /// Looks up `entry`, raising its dynamic shared memory limit to `shared_bytes` if needed.
    fn function(&self, entry: &str, shared_bytes: u32) -> Result<cust::function::Function<'_>> {
        let function = self
            .shared
            .module
            .get_function(entry)
            .during("looking up a kernel")?;
        if shared_bytes > 48 * 1024 {
            // Above 48 KiB a kernel must opt in to dynamic shared memory (a cheap driver call).
            // SAFETY: a valid function handle of this context and a documented attribute.
            unsafe {
                cust::sys::cuFuncSetAttribute(
                    function.to_raw(),
                    cust::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
            }
            .during_raw("raising a kernel's dynamic shared memory limit")?;
        }
        Ok(function)
    }

    /// The split count of a prefill launch that may split, on `slots` resident blocks
    /// (`SplitChoices`: remembered per launch shape).
    pub(crate) fn kv_splits(&self, split: &SplitKv, slots: usize) -> usize {
        self.shared
            .split_choices
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .choose(split, slots)
    }

    /// Blocks of `entry` that fit on one SM at once with this block size and shared memory.
    pub(crate) fn resident_blocks_per_sm(
        &self,
        entry: &str,
        block: u32,
        shared_bytes: u32,
    ) -> Result<u32> {
        self.make_current()?;
        let mut cache = self
            .shared
            .occupancy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(&n) = cache.get(entry) {
            return Ok(n);
        }
        let function = self.function(entry, shared_bytes)?;
        let n = function
            .max_active_blocks_per_multiprocessor(BlockSize::x(block), shared_bytes as usize)
            .during("querying occupancy")?
            .max(1);
        cache.insert(entry.to_string(), n);
        Ok(n)
    }

    /// Clusters of `cluster` blocks of `entry` that the GPU holds at once with this block size
    /// and shared memory (cached per entry and cluster size). A size the driver refuses (a
    /// device without clusters, or without non-portable sizes), or one above Hopper's 16, holds
    /// none: callers then launch without clusters rather than fail.
    pub(crate) fn resident_clusters(
        &self,
        entry: &str,
        block: u32,
        shared_bytes: u32,
        cluster: u32,
    ) -> Result<u32> {
        if cluster > MAX_CLUSTER {
            return Ok(0);
        }
        self.make_current()?;
        let mut cache = self
            .shared
            .cluster_occupancy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = cache.get(entry).and_then(|sizes| sizes[cluster as usize]) {
            return Ok(n);
        }
        let function = self.function(entry, shared_bytes)?;
        let ok = |status: cust::sys::CUresult| status == cust::sys::CUresult::CUDA_SUCCESS;
        // Clusters above the portable size need the function's opt-in (Hopper holds 16); it
        // stays set for the launches that follow.
        // SAFETY: a valid function handle of this context and a documented attribute.
        let allowed = cluster <= PORTABLE_CLUSTER
            || ok(unsafe {
                cu_func_set_attribute(
                    function.to_raw(),
                    CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                    1,
                )
            });
        let mut attributes = launch_attributes(false, cluster);
        let config = LaunchConfig {
            grid: [cluster, 1, 1],
            block: [block, 1, 1],
            shared_bytes,
            stream: std::ptr::null_mut(),
            attributes: attributes.list.as_mut_ptr(),
            attribute_count: attributes.count as u32,
        };
        let mut clusters = 0i32;
        // SAFETY: a valid function handle of this context; `config` and its attributes live
        // through the call, which only reads them.
        let queried = allowed
            && ok(unsafe {
                cuOccupancyMaxActiveClusters(&mut clusters, function.to_raw(), &config)
            });
        let n = if queried { clusters.max(0) as u32 } else { 0 };
        cache.entry(entry.to_string()).or_default()[cluster as usize] = Some(n);
        Ok(n)
    }

    /// Launches `entry` with `shared_bytes` of dynamic shared memory and one by-value `#[repr(C)]`
    /// parameter struct.
    pub(crate) fn launch<P: Copy>(
        &self,
        entry: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared_bytes: u32,
        params: &P,
    ) -> Result<()> {
        self.launch_in_clusters(entry, grid, block, shared_bytes, params, 1)
    }

    /// [`Context::launch`] in clusters of `cluster` consecutive blocks along x (1: no clusters;
    /// the grid's x extent must be a multiple of it).
    pub(crate) fn launch_in_clusters<P: Copy>(
        &self,
        entry: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared_bytes: u32,
        params: &P,
        cluster: u32,
    ) -> Result<()> {
        self.make_current()?;
        let function = self.function(entry, shared_bytes)?;
        let mut params = *params;
        let mut args = [&mut params as *mut P as *mut c_void];
        let mut attributes = launch_attributes(self.dependent_launch, cluster);
        let config = LaunchConfig {
            grid: [grid.0, grid.1, grid.2],
            block: [block, 1, 1],
            shared_bytes,
            stream: self.raw_stream(),
            attributes: attributes.list.as_mut_ptr(),
            attribute_count: attributes.count as u32,
        };
        // SAFETY: `P` is the `#[repr(C)]` struct the entry takes by value (shared ABI crate), and the
        // caller validated every pointer and extent in it; the stream is valid (owned, or vouched
        // for by `on_stream`'s caller); `config` and `attribute` live through the call.
        unsafe {
            cuLaunchKernelEx(
                &config,
                function.to_raw(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .during_raw("launching a kernel")
    }
}

/// The cluster size every GPU with clusters holds; larger ones need the function's opt-in.
const PORTABLE_CLUSTER: u32 = 8;
/// The largest cluster Hopper holds (non-portable).
const MAX_CLUSTER: u32 = 16;
/// `CUfunction_attribute` that allows clusters above the portable size (cuda.h, CUDA 11.8 on).
const CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED: i32 = 14;

/// `CUlaunchAttributeID`s (cuda.h, CUDA 11.8 on): thread-block cluster dimensions, and
/// programmatic stream serialization.
const CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION: u32 = 4;
const CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: u32 = 6;

/// A launch's attributes, in place (no allocation on the launch path), and how many of them are
/// set: programmatic stream serialization when `dependent`, and clusters of `cluster` blocks
/// along x when above 1.
struct LaunchAttributes {
    list: [LaunchAttribute; 2],
    count: usize,
}

impl LaunchAttributes {
    fn push(&mut self, attribute: LaunchAttribute) {
        self.list[self.count] = attribute;
        self.count += 1;
    }
}

fn launch_attributes(dependent: bool, cluster: u32) -> LaunchAttributes {
    let empty = || LaunchAttribute {
        id: 0,
        pad: [0; 4],
        value: [0; 64],
    };
    let mut attributes = LaunchAttributes {
        list: [empty(), empty()],
        count: 0,
    };
    if dependent {
        // `programmaticStreamSerializationAllowed`, an int.
        let mut value = [0u8; 64];
        value[..4].copy_from_slice(&1i32.to_ne_bytes());
        attributes.push(LaunchAttribute {
            id: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        });
    }
    if cluster > 1 {
        // `clusterDim`: three unsigned ints x, y, z.
        let mut value = [0u8; 64];
        for (i, extent) in [cluster, 1, 1].into_iter().enumerate() {
            value[4 * i..4 * i + 4].copy_from_slice(&extent.to_ne_bytes());
        }
        attributes.push(LaunchAttribute {
            id: CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
            pad: [0; 4],
            value,
        });
    }
    attributes
}

/// `CUlaunchAttribute`: an id, padding to 8 bytes, then the 64-byte `CUlaunchAttributeValue`
/// union (whose `programmaticStreamSerializationAllowed` is an `int` at offset 0).
#[repr(C)]
struct LaunchAttribute {
    id: u32,
    pad: [u8; 4],
    value: [u8; 64],
}

/// `CUlaunchConfig` (cuda.h).
#[repr(C)]
struct LaunchConfig {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    stream: cust::sys::CUstream,
    attributes: *mut LaunchAttribute,
    attribute_count: u32,
}

// cust 0.3 predates `cuLaunchKernelEx`, `cuOccupancyMaxActiveClusters` and the cluster function
// attributes (CUDA 11.8), so they are declared here; libcuda exports them.
unsafe extern "C" {
    /// `cuFuncSetAttribute` with the attribute as a plain int: cust's enum stops before the
    /// cluster attributes.
    #[link_name = "cuFuncSetAttribute"]
    fn cu_func_set_attribute(
        function: cust::sys::CUfunction,
        attribute: i32,
        value: i32,
    ) -> cust::sys::CUresult;
    fn cuOccupancyMaxActiveClusters(
        clusters: *mut i32,
        function: cust::sys::CUfunction,
        config: *const LaunchConfig,
    ) -> cust::sys::CUresult;
    fn cuLaunchKernelEx(
        config: *const LaunchConfig,
        function: cust::sys::CUfunction,
        params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> cust::sys::CUresult;
}

#[cfg(test)]
mod launch_abi {
    use super::*;

    /// The layouts cuda.h gives `CUlaunchAttribute` and `CUlaunchConfig` on 64-bit hosts.
    #[test]
    fn launch_structs_match_cuda_h() {
        assert_eq!(std::mem::size_of::<LaunchAttribute>(), 72);
        assert_eq!(std::mem::offset_of!(LaunchAttribute, value), 8);
        assert_eq!(std::mem::offset_of!(LaunchConfig, shared_bytes), 24);
        assert_eq!(std::mem::offset_of!(LaunchConfig, stream), 32);
        assert_eq!(std::mem::offset_of!(LaunchConfig, attributes), 40);
        assert_eq!(std::mem::offset_of!(LaunchConfig, attribute_count), 48);
        assert_eq!(std::mem::size_of::<LaunchConfig>(), 56);
    }

    /// Dependent launch and clusters each add their attribute, with cuda.h's value layout.
    #[test]
    fn launch_attributes_hold_what_was_asked() {
        assert_eq!(launch_attributes(false, 1).count, 0);
        let a = launch_attributes(true, 1);
        assert_eq!((a.count, a.list[0].id), (1, 6));
        assert_eq!(a.list[0].value[..4], 1i32.to_ne_bytes());
        let c = launch_attributes(true, 9);
        assert_eq!((c.count, c.list[1].id), (2, 4));
        let dims: Vec<u8> = [9u32, 1, 1].iter().flat_map(|x| x.to_ne_bytes()).collect();
        assert_eq!(c.list[1].value[..12], dims[..]);
        assert_eq!(launch_attributes(false, 16).list[0].id, 4);
    }
}
