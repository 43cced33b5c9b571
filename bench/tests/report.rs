//! `refd-bench load --report DIR` renders in a real browser: headless
//! Chromium takes a screenshot of index.html, which must not be blank
//! (a share of it inked, and the charts' submit series drawn). Skipped
//! with a message where Chromium is missing (`.ci/run` installs it).

mod common;

use std::path::Path;
use std::process::Command;

use refd_ioring::test_support::Scratch;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// The submit series' colour in the charts.
const SUBMIT_BLUE: [u8; 3] = [31, 119, 180];

/// Share of non-white pixels, and pixels of the submit series' blue, of
/// a PNG.
fn ink(png_path: &Path) -> (f64, u64) {
    let decoder = png::Decoder::new(std::fs::File::open(png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels = buf[..info.buffer_size()].chunks(channels);
    assert!(channels >= 3, "{:?}", info.color_type);
    let (mut inked, mut total, mut blue) = (0u64, 0u64, 0u64);
    for p in pixels {
        total += 1;
        if p[..3].iter().any(|&c| c < 240) {
            inked += 1;
        }
        if p[..3]
            .iter()
            .zip(SUBMIT_BLUE)
            .all(|(&c, b)| c.abs_diff(b) < 24)
        {
            blue += 1;
        }
    }
    (inked as f64 / total as f64, blue)
}

#[test]
fn report_renders_in_headless_chromium() {
    let Some(browser) = chromium() else {
        eprintln!(
            "SKIP report_renders_in_headless_chromium: no chromium (apt-get install chromium)"
        );
        return;
    };
    let Some(scratch) = Scratch::new("load-report") else {
        return;
    };
    let report = scratch.path().join("report");
    let (v, ok) = common::run_json(
        &[
            "load",
            "--device-gib",
            "1",
            "--daemon-prefault-mib",
            "0",
            "--rate",
            "50000",
            "--batch",
            "256",
            "--clients",
            "2",
            "--extents",
            "10000",
            "--mix",
            "submit=90,lookup=8,backrefs=2",
            "--duration-s",
            "3",
            "--warmup-s",
            "0.5",
            "--report",
            report.to_str().unwrap(),
        ],
        &scratch.path().join("refd.img"),
    );
    assert!(ok, "{v}");
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 3, "three charts");
    for needle in [
        "Latency by percentile",
        "99.9%",
        "Machine",
        "CPU",
        "kernel",
        "Build",
    ] {
        assert!(html.contains(needle), "no {needle:?} in the report");
    }
    let shot = scratch.path().join("shot.png");
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args(["--window-size=1100,2400"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", report.join("index.html").display()))
        .output()
        .expect("run chromium");
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (share, blue) = ink(&shot);
    assert!(share > 0.03, "the page is blank: {share:.4} of it inked");
    assert!(
        blue > 500,
        "{blue} pixels of the submit series: no chart drawn"
    );
}
