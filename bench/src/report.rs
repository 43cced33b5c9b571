//! `refd-bench load --report DIR`: one self-contained `index.html` (CSS
//! and SVG charts inline, drawn with the `plotters` crate's SVG backend)
//! beside the run's `.hgrm` files and `report.json`:
//!
//! - latency by percentile, per request kind, on a log-percentile axis
//!   (the HdrHistogram plot: x = 1/(1-p), labelled 90%, 99%, 99.9%...);
//! - throughput and SUBMIT p99 second by second, commits marked;
//! - the run's parameters, the machine (CPU model, cores, memory,
//!   kernel, device) and the build.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::hist::{Kind, KINDS, NS_PER_MS};
use crate::load::LoadReport;

/// Chart size (px).
const CHART_WIDTH: u32 = 960;
/// Height of the percentile chart (px).
const CHART_HEIGHT: u32 = 440;
/// Height of each over-time chart (px).
const TIME_CHART_HEIGHT: u32 = 300;
/// Percentile ticks per half distance of the plotted distribution.
const TICKS_PER_HALF: u32 = 10;
/// Colour of each kind's series (submit, lookup, backrefs, commit).
const KIND_COLORS: [RGBColor; KINDS] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];
/// Colour of the commit marks.
const COMMIT_COLOR: RGBColor = RGBColor(148, 103, 189);

/// Writes DIR/index.html, DIR/report.json and the `.hgrm` files.
pub fn write(dir: &Path, r: &LoadReport, latency: &[Histogram<u64>; KINDS]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    let put = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    put("report.json", &json)?;
    crate::load::write_hgrms(dir, latency, None)?;
    put("index.html", &html(r, latency)?)
}

fn html(r: &LoadReport, latency: &[Histogram<u64>; KINDS]) -> Result<String, String> {
    let mut h = String::new();
    let title = format!(
        "refd-bench load: {} loop, {} clients, batch {}, {}",
        r.loop_kind,
        r.clients,
        r.batch,
        escape(&serde_json::to_string(&r.workload).unwrap_or_default())
    );
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title}</title><style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n<p class=\"lead\">{}</p>\n",
        escape(&headline(r))
    );
    h.push_str("<h2>Latency by percentile</h2>\n");
    h.push_str(&percentile_chart(r, latency)?);
    h.push_str(&kinds_table(r));
    h.push_str("<h2>Throughput and SUBMIT p99 over time</h2>\n");
    h.push_str(&time_charts(r)?);
    h.push_str("<h2>Run</h2>\n");
    h.push_str(&table(&run_rows(r)));
    h.push_str("<h2>Machine</h2>\n");
    h.push_str(&table(&machine_rows(r)));
    h.push_str("<h2>Build</h2>\n");
    h.push_str(&table(&build_rows()));
    h.push_str(
        "<p class=\"files\">Files: <a href=\"report.json\">report.json</a> \
         (the run's JSON summary), <code>KIND.hgrm</code> (HdrHistogram percentile \
         distributions, ms).</p>\n</body></html>\n",
    );
    Ok(h)
}

pub(crate) const STYLE: &str =
    "body{font-family:sans-serif;margin:24px auto;max-width:1000px;color:#222}\
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;\
text-align:left;font-size:14px}th{background:#f2f2f2}td.n{text-align:right;\
font-variant-numeric:tabular-nums}.lead{font-size:15px}svg{display:block;margin:8px 0}";

fn headline(r: &LoadReport) -> String {
    let which = if r.open_loop {
        format!(
            "open loop at {:.0} ops/s: latency from each request's scheduled start",
            r.rate
        )
    } else {
        "closed loop: latency from the send".to_string()
    };
    format!(
        "{which}. {:.0} durable ops/s over {:.1} s; SUBMIT p50 {:.3} ms, p99 {:.3} ms, \
         p99.9 {:.3} ms, max {:.1} ms; {} commits; {} errors; daemon RSS max {} MiB.",
        r.ops_per_sec,
        r.duration_s,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.max_ms,
        r.commits,
        r.errors,
        r.daemon_rss_max_bytes >> 20
    )
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub(crate) fn table(rows: &[(String, String)]) -> String {
    let mut t = String::from("<table>\n");
    for (k, v) in rows {
        let _ = writeln!(t, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    t.push_str("</table>\n");
    t
}

fn kinds_table(r: &LoadReport) -> String {
    let mut t = String::from(
        "<table>\n<tr><th>kind</th><th>requests</th><th>requests/s</th><th>p50 ms</th>\
         <th>p99 ms</th><th>p99.9 ms</th><th>max ms</th></tr>\n",
    );
    let rows = r.kinds.iter().map(|(k, s)| (k.to_string(), s)).chain(
        r.open_loop
            .then(|| ("submit, from the send".to_string(), &r.submit_uncorrected)),
    );
    for (name, s) in rows {
        let _ = writeln!(
            t,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{:.0}</td>\
             <td class=\"n\">{:.3}</td><td class=\"n\">{:.3}</td><td class=\"n\">{:.3}</td>\
             <td class=\"n\">{:.3}</td></tr>",
            escape(&name),
            s.requests,
            s.requests_per_sec,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms
        );
    }
    t.push_str("</table>\n");
    t
}

/// `1/(1-p)` as the percentile it stands for (1 → 0%, 100 → 99%).
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    if x < 1.5 {
        "0%".into()
    } else if (p - p.round()).abs() < 1e-9 {
        format!("{p:.0}%")
    } else {
        let digits = (x.log10().round() as usize).saturating_sub(2);
        format!("{p:.digits$}%")
    }
}

pub(crate) fn draw_err(e: impl std::fmt::Display) -> String {
    format!("chart: {e}")
}

/// The HdrHistogram percentile plot: one line per kind with requests.
fn percentile_chart(r: &LoadReport, latency: &[Histogram<u64>; KINDS]) -> Result<String, String> {
    let series: Vec<(Kind, Vec<(f64, f64)>)> = Kind::ALL
        .iter()
        .filter(|k| !latency[k.index()].is_empty())
        .map(|&k| {
            let points = latency[k.index()]
                .iter_quantiles(TICKS_PER_HALF)
                .filter(|v| v.quantile_iterated_to() < 1.0)
                .map(|v| {
                    let x = 1.0 / (1.0 - v.quantile_iterated_to());
                    (x, (v.value_iterated_to() as f64 / NS_PER_MS).max(1e-3))
                })
                .collect();
            (k, points)
        })
        .collect();
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(100.0f64, f64::max)
        .max(1e3);
    let y_max = r.kinds.values().map(|s| s.max_ms).fold(1.0, f64::max) * 1.5;
    let y_min = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(y_max, f64::min)
        .max(1e-3)
        / 1.5;
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (CHART_WIDTH, CHART_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d((1f64..x_max).log_scale(), (y_min..y_max).log_scale())
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&|x| percentile_label(*x))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()
            .map_err(draw_err)?;
        for (kind, points) in series {
            let color = KIND_COLORS[kind.index()];
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(draw_err)?
                .label(kind.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// Ops/s and SUBMIT p99 per second, a grey line at each second with
/// commits.
fn time_charts(r: &LoadReport) -> Result<String, String> {
    if r.seconds.is_empty() {
        return Ok(
            "<p>No per-second figures (btrfs-trace replays are not timed by the second).</p>\n"
                .into(),
        );
    }
    let t_max = r.seconds.last().map_or(1.0, |s| s.t_s).max(1.0);
    let ops: Vec<(f64, f64)> = r.seconds.iter().map(|s| (s.t_s, s.ops_per_sec)).collect();
    let p99: Vec<(f64, f64)> = r.seconds.iter().map(|s| (s.t_s, s.p99_ms)).collect();
    let commits: Vec<f64> = r
        .seconds
        .iter()
        .filter(|s| s.commits.unwrap_or(0) > 0)
        .map(|s| s.t_s)
        .collect();
    let mut out = time_chart("durable ops/s", &ops, &commits, t_max, KIND_COLORS[0])?;
    out.push_str(&time_chart(
        "SUBMIT p99 (ms)",
        &p99,
        &commits,
        t_max,
        KIND_COLORS[3],
    )?);
    Ok(out)
}

fn time_chart(
    what: &str,
    points: &[(f64, f64)],
    commits: &[f64],
    t_max: f64,
    color: RGBColor,
) -> Result<String, String> {
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.15;
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (CHART_WIDTH, TIME_CHART_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(what)
            .y_label_formatter(&|y| {
                if y_max >= 100.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.1}")
                }
            })
            .draw()
            .map_err(draw_err)?;
        chart
            .draw_series(commits.iter().map(|&t| {
                PathElement::new(
                    vec![(t, 0.0), (t, y_max)],
                    COMMIT_COLOR.mix(0.6).stroke_width(3),
                )
            }))
            .map_err(draw_err)?
            .label("commit(s) in the second ending here")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], COMMIT_COLOR.stroke_width(3))
            });
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label(what)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(draw_err)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn run_rows(r: &LoadReport) -> Vec<(String, String)> {
    let mut rows = vec![
        ("loop".into(), r.loop_kind.to_string()),
        ("requested rate (ops/s)".into(), format!("{:.0}", r.rate)),
        ("clients".into(), r.clients.to_string()),
        ("batch (ops per SUBMIT)".into(), r.batch.to_string()),
        (
            "in flight per client (closed loop)".into(),
            r.pipeline.to_string(),
        ),
        ("mix".into(), r.mix.clone()),
        (
            "workload".into(),
            serde_json::to_string(&r.workload).unwrap_or_default(),
        ),
        ("extents".into(), r.extents.to_string()),
        ("measured (s)".into(), format!("{:.1}", r.duration_s)),
        ("store".into(), r.store.clone()),
        ("dry run".into(), r.dry_run.to_string()),
        ("errors".into(), r.errors.to_string()),
        ("commits".into(), r.commits.to_string()),
        (
            "back-pressure waits".into(),
            r.backpressure_waits.to_string(),
        ),
        (
            "daemon RSS max".into(),
            format!("{} MiB", r.daemon_rss_max_bytes >> 20),
        ),
        ("daemon exit".into(), format!("{:?}", r.daemon_exit)),
    ];
    if let Some(m) = r.mismatches {
        rows.push(("btrfs-trace mismatches".into(), m.to_string()));
    }
    if let Some(mb) = r.device_write_mb_per_sec {
        rows.push(("device writes".into(), format!("{mb:.0} MB/s")));
    }
    rows
}

fn machine_rows(r: &LoadReport) -> Vec<(String, String)> {
    machine(&r.device)
}

/// The machine: CPU model, cores, memory, kernel, `device`.
pub(crate) fn machine(device: &str) -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_string(), |(_, v)| v.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .map_or("unknown".to_string(), |l| {
            l.trim_start_matches("MemTotal:").trim().to_string()
        });
    vec![
        ("CPU".into(), cpu),
        ("cores".into(), cores.to_string()),
        ("memory".into(), mem),
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_string(),
        ),
        ("device".into(), device.to_string()),
    ]
}

pub(crate) fn build_rows() -> Vec<(String, String)> {
    vec![
        ("refd-bench".into(), env!("CARGO_PKG_VERSION").to_string()),
        (
            "commit".into(),
            option_env!("REFD_BUILD_COMMIT")
                .unwrap_or("unknown")
                .to_string(),
        ),
        (
            "profile".into(),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_string(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(10000.0), "99.99%");
    }

    #[test]
    fn escape_html() {
        assert_eq!(
            escape("<a href=\"x\">&</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }
}
