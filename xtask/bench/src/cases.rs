//! What is measured: modes, shapes, and the work each does (FLOPs, bytes).
use duo_attn::reference::{Shape, attended_pairs};
use duo_attn::{AttentionConfig, HeadKind};
use serde::{Deserialize, Serialize};

/// Streaming setting of the prefill issue's benchmark.
pub const SINK: u32 = 128;
pub const WINDOW: u32 = 1024;

/// The streaming window the cases use: `WINDOW` unless a timing probe set another (`--window`).
static WINDOW_OVERRIDE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Sets the streaming window of every case (once, before any case is built).
pub fn set_window(window: u32) {
    let _ = WINDOW_OVERRIDE.set(window);
}

fn window() -> u32 {
    WINDOW_OVERRIDE.get().copied().unwrap_or(WINDOW)
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every head retrieval, causal.
    Full,
    /// Every head streaming (sink 128, window 1024).
    Streaming,
    /// Half the KV heads retrieval, half streaming, one launch.
    Mixed,
    /// One query token per sequence against the whole context, GQA, every head retrieval.
    Decode,
    /// Decode with half the KV heads streaming (they read only sink + window).
    #[serde(rename = "decode-mixed")]
    DecodeMixed,
    /// Chunked prefill: a chunk of `Sq` new queries at the end of an `Sk`-token context
    /// (bottom-right causal), GQA 32/8, every head retrieval.
    Chunked,
    /// Chunked prefill with half the KV heads streaming.
    #[serde(rename = "chunked-mixed")]
    ChunkedMixed,
    /// A varlen batch of chunks (a serving step): `B` sequences of `Sq` new queries each, at the
    /// end of contexts of `Sk (b + 1) / B` tokens (sequence `b`; the longest is `Sk`), GQA 32/8,
    /// every head retrieval.
    #[serde(rename = "chunked-varlen")]
    ChunkedVarlen,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Full => "full causal",
            Mode::Streaming => "streaming",
            Mode::Mixed => "mixed 50/50",
            Mode::Decode => "decode",
            Mode::DecodeMixed => "decode 50/50",
            Mode::Chunked => "chunked",
            Mode::ChunkedMixed => "chunked 50/50",
            Mode::ChunkedVarlen => "chunked varlen",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Case {
    pub mode: Mode,
    pub batch: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
}

impl Case {
    pub fn shape(&self) -> Shape {
        Shape {
            batch: self.batch,
            seqlen_q: self.seqlen_q,
            seqlen_k: self.seqlen_k,
            heads_q: self.heads_q,
            heads_kv: self.heads_kv,
            head_dim: self.head_dim,
        }
    }

    pub fn config(&self) -> AttentionConfig {
        let kinds = (0..self.heads_kv)
            .map(|h| match self.mode {
                Mode::Full | Mode::Decode | Mode::Chunked | Mode::ChunkedVarlen => {
                    HeadKind::Retrieval
                }
                Mode::Streaming => HeadKind::Streaming,
                Mode::Mixed | Mode::DecodeMixed | Mode::ChunkedMixed if h < self.heads_kv / 2 => {
                    HeadKind::Retrieval
                }
                Mode::Mixed | Mode::DecodeMixed | Mode::ChunkedMixed => HeadKind::Streaming,
            })
            .collect();
        AttentionConfig::new(kinds).sink(SINK).window(window())
    }

    /// A varlen case's sequences: (query rows, key rows) each.
    pub fn varlen_lens(&self) -> Option<Vec<(usize, usize)>> {
        (self.mode == Mode::ChunkedVarlen).then(|| {
            (0..self.batch)
                .map(|b| (self.seqlen_q, self.seqlen_k * (b + 1) / self.batch))
                .collect()
        })
    }

    /// `4 * D` per attended (query, key) pair.
    pub fn flops(&self) -> f64 {
        let cfg = self.config();
        let pairs = match self.varlen_lens() {
            None => attended_pairs(&self.shape(), &cfg),
            Some(lens) => lens
                .iter()
                .map(|&(seqlen_q, seqlen_k)| {
                    let one = Shape {
                        batch: 1,
                        seqlen_q,
                        seqlen_k,
                        ..self.shape()
                    };
                    attended_pairs(&one, &cfg)
                })
                .sum(),
        };
        4.0 * self.head_dim as f64 * pairs as f64
    }

    /// Fewest bytes moved (bf16): Q read and O written once, and the K/V rows some query needs,
    /// once: all of them for retrieval heads, sink + window for streaming heads.
    pub fn bytes(&self) -> f64 {
        let s = self.shape();
        let needed_rows: usize = self
            .config()
            .head_kinds
            .iter()
            .map(|k| match k {
                HeadKind::Retrieval => s.seqlen_k,
                HeadKind::Streaming => s.seqlen_k.min((SINK + window()) as usize + s.seqlen_q),
            })
            .sum();
        2.0 * (2 * s.q_len() + 2 * s.batch * needed_rows * s.head_dim) as f64
    }

    /// A chunk of queries at the end of its context (one sequence or a varlen batch).
    pub fn is_chunked(&self) -> bool {
        matches!(
            self.mode,
            Mode::Chunked | Mode::ChunkedMixed | Mode::ChunkedVarlen
        )
    }

    pub fn is_decode(&self) -> bool {
        matches!(self.mode, Mode::Decode | Mode::DecodeMixed)
    }

    /// Decode is memory-bound (TB/s), prefill compute-bound (TFLOP/s).
    pub fn rate(&self, ms: f64) -> (f64, &'static str) {
        if self.is_decode() {
            (self.bytes() / ms / 1e9, "TB/s")
        } else {
            (self.flops() / ms / 1e9, "TFLOP/s")
        }
    }
}

/// The prefill issue's shapes (B=1, Hq=Hkv=32) with head dim `prefill_head_dim` (the is
/// 128), and the decode shapes (GQA 32/8) with head dim `decode_head_dim` (usually 128).
pub fn all_cases(quick: bool, prefill_head_dim: usize, decode_head_dim: usize) -> Vec<Case> {
    let prefill_lens: &[usize] = if quick {
        &[4096, 8192]
    } else {
        &[4096, 8192, 16384, 32768]
    };
    let decode_batches: &[usize] = if quick { &[1, 8] } else { &[1, 8, 32] };
    let decode_lens: &[usize] = if quick {
        &[4096, 32768]
    } else {
        &[4096, 16384, 32768, 131072]
    };
    let mut cases = Vec::new();
    for mode in [Mode::Full, Mode::Streaming, Mode::Mixed] {
        for &s in prefill_lens {
            cases.push(Case {
                mode,
                batch: 1,
                seqlen_q: s,
                seqlen_k: s,
                heads_q: 32,
                heads_kv: 32,
                head_dim: prefill_head_dim,
            });
        }
    }
    for &batch in decode_batches {
        for &s in decode_lens {
            cases.push(Case {
                mode: Mode::Decode,
                batch,
                seqlen_q: 1,
                seqlen_k: s,
                heads_q: 32,
                heads_kv: 8,
                head_dim: decode_head_dim,
            });
        }
    }
    let mixed_lens: &[usize] = if quick {
        &[4096, 32768]
    } else {
        &[32768, 131072]
    };
    // B = 1 as well: the launch whose streaming heads once took most of the blocks.
    for (batch, &s) in [1, 8]
        .into_iter()
        .flat_map(|b| mixed_lens.iter().map(move |s| (b, s)))
    {
        cases.push(Case {
            mode: Mode::DecodeMixed,
            batch,
            seqlen_q: 1,
            seqlen_k: s,
            heads_q: 32,
            heads_kv: 8,
            head_dim: decode_head_dim,
        });
    }
    // Chunked prefill (DuoAttention's serving pattern): small chunks have too few query tiles
    // to fill the GPU without split-KV.
    let (chunks, contexts): (&[usize], &[usize]) = if quick {
        (&[128, 2048], &[32768])
    } else {
        (&[128, 512, 2048], &[32768, 131072])
    };
    for mode in [Mode::Chunked, Mode::ChunkedMixed] {
        for &sk in contexts {
            for &sq in chunks {
                cases.push(Case {
                    mode,
                    batch: 1,
                    seqlen_q: sq,
                    seqlen_k: sk,
                    heads_q: 32,
                    heads_kv: 8,
                    head_dim: prefill_head_dim,
                });
            }
        }
    }
    // A serving step's varlen batch of chunks against contexts of different lengths.
    let (batches, chunks): (&[usize], &[usize]) = if quick {
        (&[4], &[128])
    } else {
        (&[4, 8], &[128, 512])
    };
    for &sk in contexts {
        for &batch in batches {
            for &sq in chunks {
                cases.push(Case {
                    mode: Mode::ChunkedVarlen,
                    batch,
                    seqlen_q: sq,
                    seqlen_k: sk,
                    heads_q: 32,
                    heads_kv: 8,
                    head_dim: prefill_head_dim,
                });
            }
        }
    }
    cases
}
