//! Results: records (ours and the peers'), the merged table, JSON and an SVG plot.
use crate::cases::{Case, Mode};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const OURS: &str = "duo-attn";

/// One measurement: which implementation ran which case, and its median time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub case: Case,
    #[serde(rename = "impl")]
    pub implementation: String,
    /// Median time.
    pub ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reps: Option<usize>,
    /// Mean SM clock while the timed reps ran (NVML samples; ours only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_mhz: Option<f64>,
    /// Why the clock sat below its maximum meanwhile, as NVML says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_limits: Option<String>,
}

/// What the peers script writes.
#[derive(Debug, Deserialize)]
pub struct PeersFile {
    pub device: String,
    #[serde(default)]
    pub torch: String,
    pub records: Vec<Record>,
}

#[derive(Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub device: String,
    pub peers_device: Option<String>,
    pub torch: Option<String>,
    pub records: Vec<Record>,
}

/// Peers in a fixed order, then any others the file has.
fn peer_names(records: &[Record]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in records {
        if r.implementation != OURS && !names.contains(&r.implementation) {
            names.push(r.implementation.clone());
        }
    }
    names
}

/// The merged table: one row per case, our median time, rate and fastest rep, each peer's time
/// and our speedup over it (peer ms / our ms: above 1 means we are faster).
///
/// The fastest rep is there because under the power cap the clock falls while the reps run:
/// two runs of one launch can differ in their medians by their clocks while their minima agree.
pub fn table(records: &[Record]) -> String {
    let peers = peer_names(records);
    let mut by_case: BTreeMap<Case, BTreeMap<&str, f64>> = BTreeMap::new();
    let mut clocks: BTreeMap<Case, f64> = BTreeMap::new();
    let mut minima: BTreeMap<Case, f64> = BTreeMap::new();
    for r in records {
        by_case
            .entry(r.case)
            .or_default()
            .insert(&r.implementation, r.ms);
        if r.implementation == OURS {
            if let Some(mhz) = r.sm_mhz {
                clocks.insert(r.case, mhz);
            }
            if let Some(min) = r.min_ms {
                minima.insert(r.case, min);
            }
        }
    }
    let mut s = format!(
        "{:<13} {:>3} {:>7} {:>7} {:>10} {:>12} {:>8} {:>7}",
        "mode", "B", "Sq", "Sk", "ours ms", "ours rate", "min ms", "SM MHz"
    );
    for p in &peers {
        s += &format!(" {:>22}", format!("{p} ms (x)"));
    }
    s.push('\n');
    for (case, times) in &by_case {
        let Some(&ours) = times.get(OURS) else {
            continue;
        };
        let (rate, unit) = case.rate(ours);
        s += &format!(
            "{:<13} {:>3} {:>7} {:>7} {:>10.3} {:>12}",
            case.mode.label(),
            case.batch,
            case.seqlen_q,
            case.seqlen_k,
            ours,
            if unit == "TB/s" {
                format!("{rate:.2} {unit}")
            } else {
                format!("{rate:.1} {unit}")
            }
        );
        match minima.get(case) {
            Some(min) => s += &format!(" {min:>8.3}"),
            None => s += &format!(" {:>8}", "-"),
        }
        match clocks.get(case) {
            Some(mhz) => s += &format!(" {mhz:>7.0}"),
            None => s += &format!(" {:>7}", "-"),
        }
        for p in &peers {
            match times.get(p.as_str()) {
                Some(&ms) => s += &format!(" {:>22}", format!("{ms:.3} ({:.2}x)", ms / ours)),
                None => s += &format!(" {:>22}", "-"),
            }
        }
        s.push('\n');
    }
    s
}

/// Time against context length, one panel per mode (decode at B=8, chunked prefill with 128-query
/// chunks), ours against each peer.
pub fn plot(
    records: &[Record],
    path: &std::path::Path,
    title: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1650, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let panels = root.split_evenly((2, 3));
    let modes = [
        (Mode::Full, 1, None),
        (Mode::Streaming, 1, None),
        (Mode::Mixed, 1, None),
        (Mode::Decode, 8, None),
        (Mode::DecodeMixed, 8, None),
        (Mode::Chunked, 1, Some(128)),
    ];
    let mut impls: Vec<String> = vec![OURS.to_string()];
    impls.extend(peer_names(records));
    for (panel, (mode, batch, chunk)) in panels.iter().zip(modes) {
        let pts: Vec<&Record> = records
            .iter()
            .filter(|r| r.case.mode == mode && r.case.batch == batch)
            .filter(|r| chunk.is_none_or(|sq| r.case.seqlen_q == sq))
            .collect();
        if pts.is_empty() {
            continue;
        }
        // x is log2(context length), so the labels fall on powers of two.
        let x_of = |r: &Record| (r.case.seqlen_k as f64).log2();
        let x_max = pts.iter().map(|r| x_of(r)).fold(f64::MIN, f64::max) + 0.3;
        let x_min = pts.iter().map(|r| x_of(r)).fold(f64::MAX, f64::min) - 0.3;
        let y_max = pts.iter().map(|r| r.ms).fold(0.0, f64::max) * 2.0;
        let y_min = pts.iter().map(|r| r.ms).fold(f64::MAX, f64::min) / 2.0;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                match chunk {
                    Some(sq) => format!("{} (B={batch}, Sq={sq})", mode.label()),
                    None => format!("{} (B={batch})", mode.label()),
                },
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(x_min..x_max, (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("context length")
            .y_desc("ms (log)")
            .x_labels(((x_max - x_min).ceil() as usize + 1).max(2))
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-6 {
                    format!("{}k", (2f64.powf(x.round()) / 1024.0) as u64)
                } else {
                    String::new()
                }
            })
            .draw()?;
        for (i, name) in impls.iter().enumerate() {
            let mut series: Vec<(f64, f64)> = pts
                .iter()
                .filter(|r| &r.implementation == name)
                .map(|r| (x_of(r), r.ms))
                .collect();
            if series.is_empty() {
                continue;
            }
            series.sort_by(|a, b| a.0.total_cmp(&b.0));
            let color = Palette99::pick(i).stroke_width(if name == OURS { 3 } else { 2 });
            chart
                .draw_series(LineSeries::new(series.clone(), color))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], Palette99::pick(i))
                });
            chart.draw_series(
                series
                    .iter()
                    .map(|&p| Circle::new(p, 3, Palette99::pick(i).filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Today's UTC date as YYYY-MM-DD (civil-from-days).
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0) as i64;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}")
}
