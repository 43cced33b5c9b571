//! `refd-bench compare --short`: one run of every row this machine can
//! run (the others skipped with their reason), the table in markdown and
//! JSON, ratios to refd lock-free in every measured row.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn compare_short_reports_every_row() {
    let dir = std::env::temp_dir().join(format!("refd-compare-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let markdown = dir.join("compare.md");
    let anchor = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/capture/anchor.sh");
    let out = Command::new(env!("CARGO_BIN_EXE_refd-bench"))
        .args(["compare", "--short", "--json", "--anchor"])
        .arg(&anchor)
        .arg("--markdown")
        .arg(&markdown)
        .arg("--report")
        .arg(dir.join("report"))
        .output()
        .expect("run refd-bench compare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let rows = v["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "refd-lockfree",
            "refd-mutex",
            "in-process",
            "rocksdb",
            "device",
            "anchor"
        ]
    );
    assert!(rows[0]["skipped"].is_null(), "{v}");
    assert!(rows[0]["ops_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(rows[0]["ratio_to_refd"].as_f64().unwrap(), 1.0, "{v}");
    for row in rows {
        let how = row["how"].as_str().unwrap();
        assert!(!how.is_empty(), "{row}");
        match row["skipped"].as_str() {
            Some(why) => {
                assert!(!why.is_empty(), "{row}");
                eprintln!("skipped {}: {why}", row["name"]);
            }
            None if row["name"] == "device" => {
                assert!(row["mb_per_sec"].as_f64().unwrap() > 0.0, "{row}");
            }
            None => {
                assert!(row["ops_per_sec"].as_f64().unwrap() > 0.0, "{row}");
                assert!(row["ratio_to_refd"].as_f64().unwrap() > 0.0, "{row}");
            }
        }
    }
    let table = std::fs::read_to_string(&markdown).unwrap();
    assert_eq!(
        table.lines().filter(|l| l.starts_with("| ")).count(),
        7,
        "{table}"
    );
    assert!(table.contains("refd lock-free / refd mutex"), "{table}");
    let html = std::fs::read_to_string(dir.join("report/index.html")).unwrap();
    assert!(
        html.contains("<svg") && html.contains("refd-lockfree"),
        "{html}"
    );
    assert_eq!(
        html.matches("<tr>").count(),
        7 + 5 + 3,
        "table, machine, build rows"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report/compare.json")).unwrap())
            .unwrap();
    assert_eq!(json["rows"], v["rows"]);
    let _ = std::fs::remove_dir_all(&dir);
}
