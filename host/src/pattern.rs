//! DuoAttention head patterns: which KV heads of each layer are retrieval heads.
//!
//! The published format (DuoAttention's `attn_patterns/<model>/<run>/`) is a directory with
//! `full_attention_heads.tsv`, one row per layer and one tab-separated gate value in [0, 1] per
//! KV head, and `config.json` with `sink_size` and `recent_size`. Gates are binarised either by
//! a sparsity quantile over all layers together (the fraction of heads made streaming, as
//! DuoAttention's `sparsify_attention_heads`) or by a threshold; a head whose gate is at or above
//! the cut is a retrieval head. Published files hold many gates clipped to exactly 0; upstream
//! breaks those ties with random noise, we break them deterministically: under `Sparsity(s)` the
//! `ceil(s * (N - 1))` lowest gates (what numpy's quantile cut gives on distinct values) become
//! streaming, ties ordered by layer then head. Published files hold trained gates with tiny excursions past the
//! range (e.g. -9.3e-5); like upstream we clip those, within [`CLIP_TOLERANCE`], and reject
//! anything further out.
use crate::attention::HeadKind;
use crate::error::{Error, Result};
use std::path::Path;

/// The gate file inside a pattern directory: one row per layer, one gate per KV head.
pub const GATES_FILE: &str = "full_attention_heads.tsv";
/// The pattern directory's config: its sink and recent sizes.
pub const CONFIG_FILE: &str = "config.json";

/// Gates this far outside [0, 1] are clipped into it; further out is an error.
pub const CLIP_TOLERANCE: f64 = 1e-2;

/// Per-layer, per-KV-head gate values, plus the streaming sizes they were trained with.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadPattern {
    /// `gates[layer][kv_head]` in [0, 1]: how much the head needs full attention.
    pub gates: Vec<Vec<f64>>,
    /// Attention-sink tokens of streaming heads (`sink_size`), if a config was read.
    pub sink: Option<u32>,
    /// Recent tokens of streaming heads (`recent_size`), if a config was read.
    pub recent: Option<u32>,
}

#[derive(serde::Deserialize)]
struct PatternConfig {
    sink_size: u32,
    recent_size: u32,
}

/// How gates become head kinds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Binarize {
    /// This fraction of all heads (over all layers) becomes streaming: the cut is the gates'
    /// `sparsity` quantile (linear interpolation, as numpy's default). 0 = all retrieval,
    /// 1 = all streaming.
    Sparsity(f64),
    /// Heads with a gate `>= threshold` are retrieval heads.
    Threshold(f64),
}

impl HeadPattern {
    /// Parses the TSV text: one row per layer, tab-separated gates, blank lines ignored.
    pub fn parse_tsv(text: &str) -> Result<Self> {
        let mut gates = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let row = line
                .split('\t')
                .enumerate()
                .map(|(j, field)| {
                    let value: f64 = field.trim().parse().map_err(|_| {
                        Error::Pattern(format!(
                            "line {}, column {}: `{field}` is not a number",
                            i + 1,
                            j + 1
                        ))
                    })?;
                    if !(-CLIP_TOLERANCE..=1.0 + CLIP_TOLERANCE).contains(&value) {
                        return Err(Error::Pattern(format!(
                            "line {}, column {}: gate {value} is outside [0, 1]",
                            i + 1,
                            j + 1
                        )));
                    }
                    Ok(value.clamp(0.0, 1.0))
                })
                .collect::<Result<Vec<f64>>>()?;
            if let Some(first) = gates.first().map(Vec::len)
                && row.len() != first
            {
                return Err(Error::Pattern(format!(
                    "line {}: {} heads, but the first layer has {first} (ragged rows)",
                    i + 1,
                    row.len()
                )));
            }
            gates.push(row);
        }
        if gates.is_empty() {
            return Err(Error::Pattern("no layers: the gate file is empty".into()));
        }
        Ok(HeadPattern {
            gates,
            sink: None,
            recent: None,
        })
    }

    /// Reads a pattern directory (`full_attention_heads.tsv` + `config.json`) or a bare TSV file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| Error::PatternIo {
                path: p.display().to_string(),
                source,
            })
        };
        if !path.is_dir() {
            return Self::parse_tsv(&read(path)?);
        }
        let mut pattern = Self::parse_tsv(&read(&path.join(GATES_FILE))?)?;
        let config: PatternConfig = serde_json::from_str(&read(&path.join(CONFIG_FILE))?)
            .map_err(|e| Error::Pattern(format!("{CONFIG_FILE}: {e}")))?;
        pattern.sink = Some(config.sink_size);
        pattern.recent = Some(config.recent_size);
        Ok(pattern)
    }

    /// Layers the pattern has gates for.
    pub fn layers(&self) -> usize {
        self.gates.len()
    }

    /// KV heads per layer.
    pub fn heads(&self) -> usize {
        self.gates.first().map_or(0, Vec::len)
    }

    /// Checks the pattern against a model's layer and KV-head counts.
    pub fn check_model(&self, layers: usize, heads_kv: usize) -> Result<()> {
        if self.layers() != layers || self.heads() != heads_kv {
            return Err(Error::Pattern(format!(
                "the pattern has {} layers x {} KV heads but the model has {layers} x {heads_kv}",
                self.layers(),
                self.heads()
            )));
        }
        Ok(())
    }

    /// The gates' shape and values, for a pattern built by hand (`gates` is public): at least
    /// one layer, every layer with the same nonzero number of heads, every gate in [0, 1].
    pub fn check_gates(&self) -> Result<()> {
        let heads = self.heads();
        if heads == 0 {
            return Err(Error::Pattern("no heads: the pattern has no gates".into()));
        }
        for (layer, row) in self.gates.iter().enumerate() {
            if row.len() != heads {
                return Err(Error::Pattern(format!(
                    "layer {layer}: {} heads, but the first layer has {heads} (ragged rows)",
                    row.len()
                )));
            }
            if let Some((head, g)) = row
                .iter()
                .enumerate()
                .find(|(_, g)| !(0.0..=1.0).contains(*g))
            {
                return Err(Error::Pattern(format!(
                    "layer {layer}, head {head}: gate {g} is outside [0, 1]"
                )));
            }
        }
        Ok(())
    }

    /// The gate value at or above which a head is a retrieval head.
    pub fn threshold(&self, how: Binarize) -> Result<f64> {
        self.check_gates()?;
        match how {
            Binarize::Threshold(t) if t.is_finite() => Ok(t),
            Binarize::Threshold(t) => Err(Error::Pattern(format!("threshold {t} is not finite"))),
            Binarize::Sparsity(s) if !(0.0..=1.0).contains(&s) => {
                Err(Error::Pattern(format!("sparsity {s} is outside [0, 1]")))
            }
            Binarize::Sparsity(s) if s <= 0.0 => Ok(f64::NEG_INFINITY),
            Binarize::Sparsity(s) if s >= 1.0 => Ok(f64::INFINITY),
            Binarize::Sparsity(s) => {
                let mut all: Vec<f64> = self.gates.iter().flatten().copied().collect();
                all.sort_by(f64::total_cmp);
                let pos = s * (all.len() - 1) as f64;
                let (lo, frac) = (pos.floor() as usize, pos.fract());
                let hi = (lo + 1).min(all.len() - 1);
                Ok(all[lo] + (all[hi] - all[lo]) * frac)
            }
        }
    }

    /// Head kinds of every layer.
    pub fn head_kinds(&self, how: Binarize) -> Result<Vec<Vec<HeadKind>>> {
        let cut = self.threshold(how)?;
        let mut kinds: Vec<Vec<HeadKind>> = self
            .gates
            .iter()
            .map(|row| {
                row.iter()
                    .map(|&g| {
                        if g >= cut {
                            HeadKind::Retrieval
                        } else {
                            HeadKind::Streaming
                        }
                    })
                    .collect()
            })
            .collect();
        if let Binarize::Sparsity(s) = how
            && s > 0.0
            && s < 1.0
        {
            // Rank-based, so ties (many gates are exactly 0) still give the asked-for sparsity.
            let mut order: Vec<(f64, usize, usize)> = self
                .gates
                .iter()
                .enumerate()
                .flat_map(|(l, row)| row.iter().enumerate().map(move |(h, &g)| (g, l, h)))
                .collect();
            order.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
            let streaming = (s * (order.len() - 1) as f64).ceil() as usize;
            for (i, &(_, l, h)) in order.iter().enumerate() {
                kinds[l][h] = if i < streaming {
                    HeadKind::Streaming
                } else {
                    HeadKind::Retrieval
                };
            }
        }
        Ok(kinds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pattern built by hand is checked before it is binarised: no gates, ragged rows and
    /// gates outside [0, 1] (NaN included) are typed errors.
    #[test]
    fn hand_built_gates_are_checked() {
        let built = |gates: Vec<Vec<f64>>| HeadPattern {
            gates,
            sink: None,
            recent: None,
        };
        for (gates, says) in [
            (vec![], "no heads"),
            (vec![vec![]], "no heads"),
            (vec![vec![0.5, 0.2], vec![0.1]], "ragged"),
            (vec![vec![0.5, f64::NAN]], "outside [0, 1]"),
            (vec![vec![0.5], vec![1.5]], "outside [0, 1]"),
        ] {
            let err = built(gates)
                .head_kinds(Binarize::Sparsity(0.5))
                .unwrap_err();
            assert!(
                matches!(&err, Error::Pattern(m) if m.contains(says)),
                "{err}"
            );
        }
        assert!(built(vec![vec![0.5, 0.2]]).check_gates().is_ok());
    }

    #[test]
    fn quantile_matches_numpy_linear() {
        // numpy.quantile([0.1, 0.2, 0.3, 0.4], 0.5) == 0.25
        let p = HeadPattern::parse_tsv("0.1\t0.4\n0.3\t0.2\n").unwrap();
        assert!((p.threshold(Binarize::Sparsity(0.5)).unwrap() - 0.25).abs() < 1e-12);
        let kinds = p.head_kinds(Binarize::Sparsity(0.5)).unwrap();
        use HeadKind::*;
        assert_eq!(
            kinds,
            vec![vec![Streaming, Retrieval], vec![Retrieval, Streaming]]
        );
    }
}
