//! The SM clock, sampled through NVML while a case's timed reps run. The H100s here run anywhere
//! between 1.6 and 1.98 GHz under load (power and load decide), and a change to a kernel that
//! moves its cycle count by 2% is lost in that spread unless the clock sits beside the time.
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::Clock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const PERIOD: Duration = Duration::from_millis(5);

/// What the samples saw while one case ran.
pub struct ClockStats {
    pub mean_mhz: f64,
    pub samples: usize,
    /// Why the clock sat below its maximum, as NVML says (empty: it did not).
    pub limits: String,
}

/// NVML and the PCI bus id of the CUDA device being timed; `None` inside when NVML cannot be
/// loaded (the times are then posted without clocks).
pub struct ClockSampler {
    nvml: Option<(Nvml, String)>,
}

impl ClockSampler {
    pub fn new(ordinal: u32) -> Self {
        let nvml = Nvml::init()
            .map_err(|e| e.to_string())
            .and_then(|nvml| pci_bus_id(ordinal).map(|id| (nvml, id)));
        match nvml {
            Ok(n) => ClockSampler { nvml: Some(n) },
            Err(e) => {
                eprintln!("note: no SM clock column (NVML: {e})");
                ClockSampler { nvml: None }
            }
        }
    }

    /// Runs `f`, sampling the SM clock every few milliseconds on another thread meanwhile (at
    /// least once).
    pub fn sample_while<T>(&self, f: impl FnOnce() -> T) -> (T, Option<ClockStats>) {
        let Some((nvml, bus_id)) = &self.nvml else {
            return (f(), None);
        };
        let Ok(device) = nvml.device_by_pci_bus_id(bus_id.as_str()) else {
            return (f(), None);
        };
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let sampler = scope.spawn(|| {
                let (mut mhz, mut limits) = (Vec::new(), ThrottleReasons::empty());
                loop {
                    if let Ok(clock) = device.clock_info(Clock::SM) {
                        mhz.push(clock as f64);
                    }
                    if let Ok(reasons) = device.current_throttle_reasons() {
                        limits |= reasons;
                    }
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(PERIOD);
                }
                (mhz, limits)
            });
            let out = f();
            done.store(true, Ordering::Relaxed);
            let (mhz, limits) = sampler
                .join()
                .unwrap_or_else(|_| (Vec::new(), ThrottleReasons::empty()));
            let stats = (!mhz.is_empty()).then(|| ClockStats {
                mean_mhz: mhz.iter().sum::<f64>() / mhz.len() as f64,
                samples: mhz.len(),
                limits: limit_names(limits),
            });
            (out, stats)
        })
    }
}

/// NVML's spelling of the CUDA device's PCI address (`domain:bus:device.0`).
fn pci_bus_id(ordinal: u32) -> Result<String, String> {
    use cust::device::{Device, DeviceAttribute};
    let device = Device::get_device(ordinal).map_err(|e| e.to_string())?;
    let attr = |a| device.get_attribute(a).map_err(|e| e.to_string());
    Ok(format!(
        "{:08x}:{:02x}:{:02x}.0",
        attr(DeviceAttribute::PciDomainId)?,
        attr(DeviceAttribute::PciBusId)?,
        attr(DeviceAttribute::PciDeviceId)?
    ))
}

fn limit_names(r: ThrottleReasons) -> String {
    let names = [
        (ThrottleReasons::SW_POWER_CAP, "power cap"),
        (ThrottleReasons::HW_SLOWDOWN, "hw slowdown"),
        (ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN, "power brake"),
        (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw thermal"),
        (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw thermal"),
        (ThrottleReasons::APPLICATIONS_CLOCKS_SETTING, "app clocks"),
        (ThrottleReasons::SYNC_BOOST, "sync boost"),
        (ThrottleReasons::GPU_IDLE, "idle"),
    ];
    names
        .iter()
        .filter(|(bit, _)| r.contains(*bit))
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}
