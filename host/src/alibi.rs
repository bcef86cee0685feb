//! ALiBi slopes (FlashAttention's `alibi_slopes`): one f32 per query head, or one per (batch
//! entry, query head), kept on the device for the kernels and on the host for checks and the
//! reference.
use crate::context::Context;
use crate::error::{Error, Result};
use crate::tensor::DeviceTensor;
use std::sync::Arc;

/// ALiBi slopes for [`AttentionConfig::alibi`](crate::AttentionConfig::alibi): query position
/// `p` and key `k` of query head `h` get `-slope[h] * |p - k|` added to their scaled score
/// (FlashAttention's bias, bottom-right aligned positions). Cheap to clone: an uploaded device
/// copy is shared, and lives as long as any clone.
#[derive(Clone)]
pub struct AlibiSlopes {
    host: Arc<[f32]>,
    device: Storage,
    /// Rows (1 or the batch entries) and slopes per row.
    shape: [usize; 2],
    /// Rows of the device copy before this set's first (`row`: a view of one row).
    first_row: usize,
}

/// Where the device copy lives.
#[derive(Clone)]
enum Storage {
    /// Uploaded by `new` / `per_batch`, freed with the last clone.
    Owned(Arc<DeviceTensor<f32, 2>>),
    /// A caller's device memory (`from_device_ptr`).
    Foreign { ptr: u64, device: u32 },
}

impl AlibiSlopes {
    /// One slope per query head (`slopes.len()` is the layer's query head count), copied to
    /// `ctx`'s device. Slopes must be finite and >= 0 ([`Error::InvalidAlibi`]).
    pub fn new(ctx: &Context, slopes: &[f32]) -> Result<Self> {
        Self::per_batch(ctx, slopes, 1)
    }

    /// One slope per (batch entry or varlen sequence, query head): `slopes` is `[batch, Hq]`
    /// row-major.
    pub fn per_batch(ctx: &Context, slopes: &[f32], batch: usize) -> Result<Self> {
        check_slopes(slopes, batch)?;
        let shape = [batch, slopes.len() / batch];
        let device = ctx.upload(slopes, shape)?;
        Ok(AlibiSlopes {
            host: slopes.into(),
            device: Storage::Owned(Arc::new(device)),
            shape,
            first_row: 0,
        })
    }

    /// Slopes already in device memory: `ptr` holds `slopes` (`[batch, Hq]` f32, row-major) on
    /// device `device`. The host copy serves the checks and the reference; the kernels read
    /// `ptr`.
    ///
    /// # Safety
    /// The memory at `ptr` must hold those values, 4-byte aligned, on that device, and stay
    /// allocated and unchanged while any attention call that takes these slopes runs.
    pub unsafe fn from_device_ptr(
        ptr: u64,
        device: u32,
        slopes: &[f32],
        batch: usize,
    ) -> Result<Self> {
        check_slopes(slopes, batch)?;
        if ptr == 0 || !ptr.is_multiple_of(4) {
            return Err(Error::InvalidAlibi {
                why: format!("device address {ptr:#x} is null or not 4-byte aligned"),
            });
        }
        Ok(AlibiSlopes {
            host: slopes.into(),
            device: Storage::Foreign { ptr, device },
            shape: [batch, slopes.len() / batch],
            first_row: 0,
        })
    }

    /// FlashAttention's and BLOOM's standard slopes for `heads` query heads: `2^(-8 i / n)` for
    /// `i = 1..=n` with `n` the power of two at or below `heads`, then for the heads past it
    /// every other slope of `2n` heads (ALiBi's reference code).
    pub fn standard(heads: usize) -> Vec<f32> {
        let pow2 = |n: usize| -> Vec<f32> {
            (1..=n)
                .map(|i| 2f64.powf(-8.0 * i as f64 / n as f64) as f32)
                .collect()
        };
        if heads == 0 {
            return Vec::new();
        }
        let n = 1usize << (usize::BITS - 1 - heads.leading_zeros());
        let mut slopes = pow2(n);
        slopes.extend(pow2(2 * n).into_iter().step_by(2).take(heads - n));
        slopes
    }

    /// Rows of slopes: 1 (per head) or the batch entries.
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Slopes per row: the query heads.
    pub fn heads(&self) -> usize {
        self.shape[1]
    }

    /// The slopes, `[rows, heads]` row-major, as given.
    pub fn host(&self) -> &[f32] {
        &self.host
    }

    /// The slope of query head `head` in batch entry `batch` (rows of one apply to every entry).
    pub fn slope(&self, batch: usize, head: usize) -> f32 {
        let row = if self.rows() == 1 { 0 } else { batch };
        self.host[row * self.heads() + head]
    }

    /// Device ordinal of the device copy.
    pub fn device(&self) -> u32 {
        match &self.device {
            Storage::Owned(t) => t.device(),
            Storage::Foreign { device, .. } => *device,
        }
    }

    /// Batch entry `batch`'s slopes as a set of one row, sharing the device copy (for a call
    /// that serves that entry alone); `None` past the rows. A set of one row gives itself.
    pub fn row(&self, batch: usize) -> Option<AlibiSlopes> {
        if self.rows() == 1 {
            return Some(self.clone());
        }
        let heads = self.heads();
        let host = self.host.get(batch * heads..(batch + 1) * heads)?;
        Some(AlibiSlopes {
            host: host.into(),
            device: self.device.clone(),
            shape: [1, heads],
            first_row: self.first_row + batch,
        })
    }

    /// The kernels' ALiBi parameters for `cfg` with `heads_q` query heads at head dim
    /// `head_dim`: the slopes' address (0: no ALiBi), the row stride (0 for one row for every
    /// batch entry, else the query heads) and `-1 / softmax_scale`.
    pub(crate) fn kernel_args(
        cfg: &crate::AttentionConfig,
        heads_q: usize,
        head_dim: usize,
    ) -> (u64, i32, f32) {
        let (ptr, stride) = match &cfg.alibi {
            None => (0, 0),
            Some(a) => (
                a.device_ptr(),
                if a.rows() > 1 { heads_q as i32 } else { 0 },
            ),
        };
        (ptr, stride, -1.0 / cfg.scale_for(head_dim))
    }

    /// Device address of the slopes.
    pub(crate) fn device_ptr(&self) -> u64 {
        let base = match &self.device {
            Storage::Owned(t) => t.view().desc().ptr,
            Storage::Foreign { ptr, .. } => *ptr,
        };
        base + (self.first_row * self.heads() * std::mem::size_of::<f32>()) as u64
    }
}

/// `[batch, heads]` finite slopes.
fn check_slopes(slopes: &[f32], batch: usize) -> Result<()> {
    if batch == 0 || slopes.is_empty() || !slopes.len().is_multiple_of(batch) {
        return Err(Error::InvalidAlibi {
            why: format!(
                "{} slopes do not make {batch} equal rows of one per query head",
                slopes.len()
            ),
        });
    }
    // The kernels fold `-slope * |d|` into one subtraction of `|slope * d|`, which holds for
    // slopes >= 0 (ALiBi's are all positive).
    if let Some(i) = slopes.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
        return Err(Error::InvalidAlibi {
            why: format!("slope {i} is {}; slopes are finite and >= 0", slopes[i]),
        });
    }
    Ok(())
}

impl PartialEq for AlibiSlopes {
    /// The same device memory and host values.
    fn eq(&self, other: &Self) -> bool {
        self.device_ptr() == other.device_ptr()
            && self.device() == other.device()
            && self.shape == other.shape
            && self.host == other.host
    }
}

impl std::fmt::Debug for AlibiSlopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlibiSlopes")
            .field("rows", &self.rows())
            .field("heads", &self.heads())
            .field("device", &self.device())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ALiBi's reference `get_slopes`: a geometric run of ratio `2^(-8/n)` for a power of two,
    /// and every other slope of the next power of two for the heads past it.
    #[test]
    fn standard_slopes_follow_alibis_reference() {
        let eight = AlibiSlopes::standard(8);
        let want: Vec<f32> = (1..=8).map(|i| 0.5f32.powi(i)).collect();
        assert_eq!(eight, want);
        let twelve = AlibiSlopes::standard(12);
        assert_eq!(&twelve[..8], &want[..]);
        for (k, &s) in twelve[8..].iter().enumerate() {
            let e = -((2 * k + 1) as f64) / 2.0;
            approx::assert_relative_eq!(s as f64, 2f64.powf(e), max_relative = 1e-6);
        }
        assert_eq!(AlibiSlopes::standard(1), [2f32.powi(-8)]);
        assert!(AlibiSlopes::standard(0).is_empty());
    }

    /// Foreign slopes are checked for shape, values and address.
    #[test]
    fn foreign_slopes_are_checked() {
        let ok = unsafe { AlibiSlopes::from_device_ptr(0x1000, 0, &[0.5, 0.25, 0.5, 0.25], 2) };
        let ok = ok.unwrap();
        assert_eq!((ok.rows(), ok.heads(), ok.slope(1, 1)), (2, 2, 0.25));
        for (ptr, slopes, batch) in [
            (0x1000, &[0.5f32, 0.25, 0.125][..], 2),
            (0x1000, &[f32::NAN][..], 1),
            (0x1000, &[-0.5][..], 1),
            (0x1002, &[0.5][..], 1),
            (0, &[0.5][..], 1),
            (0x1000, &[][..], 1),
        ] {
            let err = unsafe { AlibiSlopes::from_device_ptr(ptr, 0, slopes, batch) }.unwrap_err();
            assert!(matches!(err, Error::InvalidAlibi { .. }), "{err}");
        }
    }

    /// A row view reads its own row of the host copy and the device copy.
    #[test]
    fn a_row_is_a_view_of_its_entry() {
        let slopes = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625];
        let all = unsafe { AlibiSlopes::from_device_ptr(0x1000, 0, &slopes, 3) }.unwrap();
        let second = all.row(1).unwrap();
        assert_eq!((second.rows(), second.heads()), (1, 2));
        assert_eq!(second.host(), &slopes[2..4]);
        assert_eq!(second.slope(7, 1), 0.0625);
        assert_eq!(second.device_ptr(), 0x1000 + 2 * 4);
        assert_eq!(second.row(0).unwrap().device_ptr(), 0x1008);
        assert!(all.row(3).is_none());
    }
}
