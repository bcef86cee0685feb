#![warn(missing_docs)]
//! # duo-attn
//!
//! DuoAttention on NVIDIA Hopper from Rust. Each layer's KV heads are either **retrieval** heads
//! (full or causal attention over the whole context) or **streaming** heads (the first `sink`
//! tokens plus the last `window`); one kernel launch serves both kinds, and streaming heads skip
//! every KV block outside their sink and window.
//!
//! ```no_run
//! use duo_attn::{AttentionConfig, Context, HeadKind};
//! use half::bf16;
//! # fn main() -> Result<(), duo_attn::Error> {
//! let ctx = Context::new(0)?;
//! let (b, sq, sk, hq, hkv, d) = (1, 128, 128, 8, 2, 128);
//! let host = vec![bf16::from_f32(0.5); b * sq * hq * d];
//! let q = ctx.upload(&host, [b, sq, hq, d])?;
//! let k = ctx.upload(&host[..b * sk * hkv * d], [b, sk, hkv, d])?;
//! let v = ctx.upload(&host[..b * sk * hkv * d], [b, sk, hkv, d])?;
//! let mut out = ctx.alloc::<bf16, 4>([b, sq, hq, d])?;
//! let mut lse = ctx.alloc::<f32, 3>([b, hq, sq])?;
//! let cfg = AttentionConfig::new(vec![HeadKind::Retrieval, HeadKind::Streaming]).sink(4).window(64);
//! ctx.attention(&q.view(), &k.view(), &v.view(), &mut out.view_mut(), &mut lse.view_mut(), &cfg)?;
//! let o: Vec<bf16> = out.to_host()?;
//! # Ok(()) }
//! ```

pub mod alibi;
pub mod attention;
pub mod cache;
pub mod context;
pub mod decode;
pub mod element;
pub mod error;
mod foreign;
pub mod kernels;
pub mod kv_append;
pub mod kvcache;
pub mod pattern;
pub mod reference;
pub mod rotary;
pub mod split_kv;
pub mod tensor;
pub mod tma;

pub use alibi::AlibiSlopes;
pub use attention::{
    AttentionConfig, HeadKind, PrefillKernel, PrefillPlan, plan_prefill, plan_prefill_varlen,
};
pub use cache::{
    CacheConfig, CacheMemory, CachePaging, CacheSlots, DuoCache, cache_memory, ring_slots,
};
pub use context::{Context, DeviceInfo};
pub use decode::{DecodePlan, MAX_DECODE_QUERIES};
pub use element::{AttnElement, DType, DeviceScalar};
pub use error::{Error, Result};
pub use kv_append::{NewKv, SeqlensUpdate};
pub use kvcache::{KvCacheDesc, plan_prefill_kvcache};
pub use pattern::{Binarize, HeadPattern};
pub use rotary::{RotaryPositions, RotaryTable};
pub use split_kv::{PartialRows, SplitKv, SplitShape, SplitWork, choose_kv_splits};
pub use tensor::{DeviceTensor, TensorDesc, View, ViewMut};

// A service shares one context across threads and moves caches and tensors between them
// (`one_context_many_threads` runs it): a change that loses `Send` or `Sync` fails to build here.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Context>();
    shareable::<DuoCache<half::bf16>>();
    shareable::<DeviceTensor<half::f16, 4>>();
};
