//! `refd-bench merge`: the background work an op costs after its append
//! (the hand-off's run build and the compactor's merge passes), timed
//! single-threaded on synthetic runs of the uniform walk, with and
//! without prefetching ahead, alternating in one run
//! (`refd_core::delayed::merge_bench`).

use serde::Serialize;

/// Arguments of `merge`.
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// Extents the synthetic ops pick among (the ingest benchmark's
    /// default walk).
    #[arg(long, default_value_t = 1_000_000)]
    pub extents: u64,
    /// Timed passes of each shape each way (alternating).
    #[arg(long, default_value_t = 7)]
    pub rounds: usize,
    /// MiB of heap faulted in first (`refd_alloc::prefault`, as
    /// `ingest --prefault-mib`), so that the timed passes do not pay the
    /// VM's first-touch page faults for their output; 0: none.
    #[arg(long, default_value_t = 1024)]
    pub prefault_mib: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// One shape's result.
#[derive(Debug, Serialize)]
pub struct ShapeResult {
    pub shape: String,
    pub heads_per_pass: usize,
    /// Median over the rounds, ns per head put out (a build: per op).
    pub prefetch_ns_median: f64,
    pub plain_ns_median: f64,
    /// plain / prefetch, medians.
    pub speedup: f64,
    pub prefetch_ns: Vec<f64>,
    pub plain_ns: Vec<f64>,
}

/// The whole result.
#[derive(Debug, Serialize)]
pub struct MergeResult {
    pub extents: u64,
    pub rounds: usize,
    pub shapes: Vec<ShapeResult>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run(a: &MergeArgs) -> Result<MergeResult, String> {
    if a.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    let quiet = a.json;
    if a.prefault_mib > 0 {
        let mib = refd_alloc::prefault_mib_capped(a.prefault_mib);
        let took = refd_alloc::prefault(mib << 20);
        if !quiet {
            eprintln!(
                "prefaulted {mib} MiB of heap in {:.1} s",
                took.as_secs_f64()
            );
        }
    }
    let timings = refd_core::delayed::merge_bench::measure(a.extents, a.rounds, |shape| {
        if !quiet {
            eprintln!("merge: {shape} ...");
        }
    });
    if let Some(t) = timings.iter().find(|t| !t.heads_agree) {
        return Err(format!(
            "{}: passes put out different head counts with and without prefetching (a bug)",
            t.shape
        ));
    }
    let shapes = timings
        .into_iter()
        .map(|t| {
            let (p, q) = (median(&t.prefetch_ns), median(&t.plain_ns));
            ShapeResult {
                shape: t.shape.to_string(),
                heads_per_pass: t.heads,
                prefetch_ns_median: p,
                plain_ns_median: q,
                speedup: q / p,
                prefetch_ns: t.prefetch_ns,
                plain_ns: t.plain_ns,
            }
        })
        .collect();
    Ok(MergeResult {
        extents: a.extents,
        rounds: a.rounds,
        shapes,
    })
}

pub fn print(r: &MergeResult) {
    println!(
        "merge: {} extents, {} rounds each way, alternating; ns per head put out (a build: per op), medians",
        r.extents, r.rounds
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>8}",
        "shape", "heads", "prefetch", "plain", "plain/pf"
    );
    for s in &r.shapes {
        println!(
            "{:<44} {:>10} {:>10.1} {:>10.1} {:>7.2}x",
            s.shape, s.heads_per_pass, s.prefetch_ns_median, s.plain_ns_median, s.speedup
        );
    }
}
