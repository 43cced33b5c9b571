//! Latency recording of `refd-bench load`: the request kinds, the
//! `--mix` of them, and HdrHistogram output in the formats HdrHistogram's
//! own tools read: the percentile distribution text (`.hgrm`, what
//! `HistogramLogProcessor` and the online plotter take; the layout of the
//! Java `outputPercentileDistribution`) and the interval log (`.hlog`,
//! written with the hdrhistogram crate's `IntervalLogWriter`).
//!
//! Latencies are recorded in nanoseconds; both outputs are scaled to
//! milliseconds (the `.hgrm` values, and the `.hlog` `MaxValueDivisor`).

use std::io::Write;

use hdrhistogram::Histogram;

/// Largest latency recorded (ns): 10 minutes; longer is clamped to it.
pub const LATENCY_NS_MAX: u64 = 600_000_000_000;
/// Significant digits of every histogram.
pub const SIGFIG: u8 = 3;
/// Nanoseconds per output unit (milliseconds).
pub const NS_PER_MS: f64 = 1e6;
/// Percentile ticks per half distance of the `.hgrm` (HdrHistogram's
/// default).
const HGRM_TICKS_PER_HALF: u32 = 5;

/// An empty latency histogram (ns, 1 ns ..= [`LATENCY_NS_MAX`]).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, SIGFIG).expect("histogram bounds")
}

/// Records `ns`, clamped to the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.clamp(1, LATENCY_NS_MAX));
}

/// The latency at quantile `q`, in ms.
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / NS_PER_MS
}

/// A request kind the load measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// SUBMIT of a batch of ops (latency: until durable).
    Submit,
    /// LOOKUP of one bytenr.
    Lookup,
    /// BACKREFS: the first page of one extent's backrefs.
    Backrefs,
    /// COMMIT: a commit of everything acknowledged before it.
    Commit,
}

/// How many kinds there are.
pub const KINDS: usize = 4;

impl Kind {
    /// Every kind, in index order.
    pub const ALL: [Kind; KINDS] = [Kind::Submit, Kind::Lookup, Kind::Backrefs, Kind::Commit];

    /// Its index in per-kind arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name (in `--mix`, file names, JSON and `.hlog` tags).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Submit => "submit",
            Kind::Lookup => "lookup",
            Kind::Backrefs => "backrefs",
            Kind::Commit => "commit",
        }
    }
}

/// The share of each kind among the requests (`--mix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    /// Weight per kind ([`Kind::index`]).
    pub weights: [u32; KINDS],
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            weights: [1, 0, 0, 0],
        }
    }
}

impl std::str::FromStr for Mix {
    type Err = String;

    /// `submit=90,lookup=8,backrefs=2` (kinds not named weigh 0).
    fn from_str(s: &str) -> Result<Mix, String> {
        let mut weights = [0u32; KINDS];
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, w) = part
                .split_once('=')
                .ok_or_else(|| format!("--mix: `{part}` is not KIND=WEIGHT"))?;
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| {
                    format!("--mix: unknown kind `{name}` (submit, lookup, backrefs, commit)")
                })?;
            weights[kind.index()] = w
                .trim()
                .parse()
                .map_err(|e| format!("--mix: weight of {name}: {e}"))?;
        }
        if weights.iter().all(|&w| w == 0) {
            return Err("--mix: every weight is 0".into());
        }
        if weights.iter().map(|&w| u64::from(w)).sum::<u64>() > u64::from(u32::MAX) {
            return Err("--mix: the weights add up to more than 2^32".into());
        }
        Ok(Mix { weights })
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = Kind::ALL
            .iter()
            .filter(|k| self.weights[k.index()] > 0)
            .map(|k| format!("{}={}", k.name(), self.weights[k.index()]))
            .collect();
        write!(f, "{}", parts.join(","))
    }
}

impl Mix {
    /// The share of SUBMITs among the requests (0 ..= 1).
    pub fn submit_share(&self) -> f64 {
        let total: u64 = self.weights.iter().map(|&w| u64::from(w)).sum();
        f64::from(self.weights[0]) / total as f64
    }

    /// The kinds in a deterministic order with the mix's shares in every
    /// window (smooth weighted round robin), so that an open loop's SUBMIT
    /// rate is exact rather than a random draw.
    pub fn cursor(&self) -> MixCursor {
        MixCursor {
            weights: self.weights,
            current: [0; KINDS],
        }
    }
}

/// The endless sequence of kinds of a [`Mix`].
#[derive(Debug, Clone)]
pub struct MixCursor {
    weights: [u32; KINDS],
    current: [i64; KINDS],
}

impl Iterator for MixCursor {
    type Item = Kind;

    fn next(&mut self) -> Option<Kind> {
        let total: i64 = self.weights.iter().map(|&w| i64::from(w)).sum();
        let mut best = 0;
        for i in 0..KINDS {
            self.current[i] += i64::from(self.weights[i]);
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= total;
        Some(Kind::ALL[best])
    }
}

/// One kind's latency summary (ms) over the measured time.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KindSummary {
    /// Requests answered.
    pub requests: u64,
    /// Requests answered per second.
    pub requests_per_sec: f64,
    /// Ops acknowledged per second (SUBMIT; 0 for the others).
    pub ops_per_sec: f64,
    /// Latency.
    pub p50_ms: f64,
    /// Latency.
    pub p99_ms: f64,
    /// Latency.
    pub p999_ms: f64,
    /// Latency.
    pub max_ms: f64,
}

impl KindSummary {
    /// From a kind's histogram and its acknowledged ops.
    pub fn of(h: &Histogram<u64>, ops: u64, seconds: f64) -> KindSummary {
        KindSummary {
            requests: h.len(),
            requests_per_sec: h.len() as f64 / seconds,
            ops_per_sec: ops as f64 / seconds,
            p50_ms: ms(h, 0.5),
            p99_ms: ms(h, 0.99),
            p999_ms: ms(h, 0.999),
            max_ms: h.max() as f64 / NS_PER_MS,
        }
    }
}

/// Writes `h` as an HdrHistogram percentile distribution (`.hgrm`), values
/// in ms, in the layout of the Java `outputPercentileDistribution` (5
/// ticks per half distance, `SIGFIG` decimals).
pub fn write_hgrm(h: &Histogram<u64>, out: &mut impl Write) -> std::io::Result<()> {
    let d = usize::from(SIGFIG);
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(HGRM_TICKS_PER_HALF) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / NS_PER_MS;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                writeln!(
                    out,
                    "{value:12.d$} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                )?;
            } else {
                writeln!(out, "{value:12.d$} {q:2.12} {total:10}")?;
            }
        }
    }
    writeln!(
        out,
        "#[Mean    = {:12.d$}, StdDeviation   = {:12.d$}]",
        h.mean() / NS_PER_MS,
        h.stdev() / NS_PER_MS
    )?;
    writeln!(
        out,
        "#[Max     = {:12.d$}, Total count    = {:12}]",
        h.max() as f64 / NS_PER_MS,
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        1u64 << (2.0 * 10f64.powi(i32::from(h.sigfig()))).log2().ceil() as u32
    )
}

/// The `.hlog` interval log file: one histogram per kind with requests
/// per interval, tagged with the kind's name. [`HlogFile::begin`] writes
/// the header and gives the writer the intervals go through.
pub struct HlogFile {
    file: std::io::BufWriter<std::fs::File>,
    path: std::path::PathBuf,
    serializer: hdrhistogram::serialization::V2DeflateSerializer,
}

/// The writer of an [`HlogFile`].
pub type HlogWriter<'a> = hdrhistogram::serialization::interval_log::IntervalLogWriter<
    'a,
    'a,
    std::io::BufWriter<std::fs::File>,
    hdrhistogram::serialization::V2DeflateSerializer,
>;

impl HlogFile {
    /// Creates `path`.
    pub fn create(path: &std::path::Path) -> Result<HlogFile, String> {
        let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(HlogFile {
            file: std::io::BufWriter::new(file),
            path: path.to_path_buf(),
            serializer: hdrhistogram::serialization::V2DeflateSerializer::new(),
        })
    }

    /// Writes the header: intervals are timed from `start` (the log's
    /// StartTime and BaseTime), maximums in ms.
    pub fn begin(&mut self, start: std::time::SystemTime) -> Result<HlogWriter<'_>, String> {
        hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder::new()
            .add_comment("refd-bench load: latency per request kind (tag), values in ns")
            .with_start_time(start)
            .with_base_time(start)
            .with_max_value_divisor(NS_PER_MS)
            .begin_log_with(&mut self.file, &mut self.serializer)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// Flushes the file (after the writer is dropped).
    pub fn finish(mut self) -> Result<(), String> {
        self.file
            .flush()
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// Appends one interval to an `.hlog`: every kind's histogram that has
/// values, from `offset` after the start, `length` long.
pub fn hlog_interval(
    w: &mut HlogWriter<'_>,
    hists: &[Histogram<u64>; KINDS],
    offset: std::time::Duration,
    length: std::time::Duration,
) -> Result<(), String> {
    use hdrhistogram::serialization::interval_log::Tag;
    for kind in Kind::ALL {
        let h = &hists[kind.index()];
        if h.is_empty() {
            continue;
        }
        w.write_histogram(h, offset, length, Tag::new(kind.name()))
            .map_err(|e| format!("hlog: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_keeps_its_shares() {
        let m: Mix = "submit=90,lookup=8,backrefs=2".parse().unwrap();
        assert_eq!(m.weights, [90, 8, 2, 0]);
        assert_eq!(m.to_string(), "submit=90,lookup=8,backrefs=2");
        let mut n = [0u32; KINDS];
        for k in m.cursor().take(1000) {
            n[k.index()] += 1;
        }
        assert_eq!(n, [900, 80, 20, 0]);
        // Every window of 100 has its share (no bursts of one kind).
        let first: Vec<Kind> = m.cursor().take(100).collect();
        assert_eq!(first.iter().filter(|k| **k == Kind::Submit).count(), 90);
        assert!("submit=1,write=2".parse::<Mix>().is_err());
        assert!("submit=0".parse::<Mix>().is_err());
        assert!("submit".parse::<Mix>().is_err());
        assert!("lookup=x".parse::<Mix>().is_err());
    }

    #[test]
    fn hgrm_has_the_standard_layout() {
        let mut h = histogram();
        for v in 1..=1000u64 {
            record(&mut h, v * 1000);
        }
        let mut out = Vec::new();
        write_hgrm(&h, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines[1], "");
        let last_row = lines[lines.len() - 4];
        let f: Vec<&str> = last_row.split_whitespace().collect();
        assert_eq!(f.len(), 3, "{last_row}");
        assert_eq!(f[1], "1.000000000000");
        assert_eq!(f[2], "1000");
        assert!(lines[lines.len() - 2].contains("Total count    =         1000"));
        assert!(lines[lines.len() - 1].starts_with("#[Buckets = "));
        assert!(lines[lines.len() - 1].ends_with("SubBuckets     =         2048]"));
    }
}
