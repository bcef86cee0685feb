//! A device, its loaded kernel module and a stream: what every operation runs through.
use crate::element::DeviceScalar;
use crate::error::{CudaContext, Error, RawCudaStatus, Result};
use crate::kernels;
use crate::split_kv::{SplitChoices, SplitKv};
use crate::tensor::DeviceTensor;
use cust::context::{Context as CudaContext_, CurrentContext};
use cust::device::{Device, DeviceAttribute};
use cust::function::{BlockSize, GridSize};
use cust::memory::DeviceBuffer;
use cust::module::Module;
use cust::stream::{Stream, StreamFlags};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// What the context's device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: u32,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: u32,
    pub l2_cache_bytes: usize,
    pub total_memory: usize,
}

/// Scratch memory of launches, grown on demand and reused: every user is queued on the context's
/// stream, so reuse is ordered.
#[derive(Default)]
struct Scratch {
    /// Split-KV partial rows and their LSE (prefill and decode).
    partials: Option<DeviceBuffer<f32>>,
    /// The persistent prefill scheduler's tile counter and decode's split counters: zero between
    /// launches (each launch resets the ones it used), zeroed when (re)allocated.
    counters: Option<DeviceBuffer<u32>>,
}

/// Device addresses of the scratch buffers for one launch (0: not asked for).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScratchPtrs {
    pub partials: u64,
    pub counters: u64,
}

/// One GPU with duo-attn's kernels loaded. Operations are queued on the context's stream, a
/// blocking stream, so synchronous copies such as [`DeviceTensor::to_host`] see their results.
pub struct Context {
    // Field order is drop order: module and stream go before the CUDA context.
    module: Module,
    stream: Stream,
    cuda: CudaContext_,
    info: DeviceInfo,
    /// Split-KV partials and launch counters (`with_scratch`).
    scratch: Mutex<Scratch>,
    /// Resident blocks per SM, by kernel entry (occupancy queries are cached).
    occupancy: Mutex<HashMap<String, u32>>,
    /// Recent split-KV choices of prefill launches (each replays the scheduler on the host).
    split_choices: Mutex<SplitChoices>,
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
        let stream = Stream::new(StreamFlags::DEFAULT, None).during("creating a stream")?;
        Ok(Context {
            module,
            stream,
            cuda,
            info,
            scratch: Mutex::new(Scratch::default()),
            occupancy: Mutex::new(HashMap::new()),
            split_choices: Mutex::new(SplitChoices::default()),
        })
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

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn ordinal(&self) -> u32 {
        self.info.ordinal
    }

    /// The stream operations are queued on (for events, graphs or interop).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The CUDA context (the device's primary context).
    pub(crate) fn raw_context(&self) -> cust::sys::CUcontext {
        self.cuda.as_raw()
    }

    /// Makes this context current on the calling thread (each public operation does this).
    pub(crate) fn make_current(&self) -> Result<()> {
        CurrentContext::set_current(&self.cuda).during("making the context current")
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

    /// Waits for all queued work; reports errors of kernels that ran.
    pub fn synchronize(&self) -> Result<()> {
        self.make_current()?;
        self.stream.synchronize().during("synchronizing the stream")
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.make_current()?;
        cust::memory::mem_get_info().during("reading free device memory")
    }

    /// Runs `launch` with scratch buffers of at least `partials` f32 (none when 0) and `counters`
    /// u32, holding the scratch lock until it has queued its kernels. A buffer grows by freeing
    /// the old one (a synchronising cuMemFree: launches queued with it finish first), so an
    /// address must not escape the lock before its launch is queued: another thread could free it
    /// in between.
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
        if partials > 0 && scratch.partials.as_ref().is_none_or(|b| b.len() < partials) {
            scratch.partials = None; // free the old buffer first
            // SAFETY: f32 is Pod; kernels write every partial they later read.
            let buf = unsafe { DeviceBuffer::uninitialized(partials) }
                .during("allocating split-KV partials")?;
            scratch.partials = Some(buf);
        }
        if scratch.counters.as_ref().is_none_or(|b| b.len() < counters) {
            scratch.counters = None;
            let buf = DeviceBuffer::zeroed(counters.max(1)).during("allocating launch counters")?;
            scratch.counters = Some(buf);
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
        self.split_choices
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
        self.make_current()?;
        let function = self.function(entry, shared_bytes)?;
        let mut params = *params;
        let args = [&mut params as *mut P as *mut c_void];
        // SAFETY: `P` is the `#[repr(C)]` struct the entry takes by value (shared ABI crate), and the
        // caller validated every pointer and extent in it.
        unsafe {
            self.stream.launch(
                &function,
                GridSize::xyz(grid.0, grid.1, grid.2),
                BlockSize::x(block),
                shared_bytes,
                &args,
            )
        }
        .during("launching a kernel")
    }
}
