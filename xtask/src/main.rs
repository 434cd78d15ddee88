//! `cargo xtask <command>`: developer tasks that are more than one cargo call.
//!
//! - `bench [FILTER…]`: runs the criterion benchmarks of `paqet-userspace` and prints a markdown table of
//!   throughput (bytes/s per core) from criterion's estimates, for `docs/benchmarks.md`.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("bench-report") => report(),
        _ => {
            eprintln!("usage: cargo xtask bench [criterion filter…] | bench-report");
            std::process::exit(2)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn bench(filters: &[String]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args(["bench", "-p", "paqet-userspace", "--"]);
    cmd.args(filters);
    let st = cmd.status().context("running cargo bench")?;
    if !st.success() {
        bail!("cargo bench failed: {st}");
    }
    report()
}

/// Walks target/criterion/**/new/{estimates,benchmark}.json and prints one row per benchmark.
fn report() -> Result<()> {
    let dir = root().join("target/criterion");
    let mut rows = Vec::new();
    collect(&dir, &mut rows)?;
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    println!("| benchmark | time per iteration | throughput |");
    println!("|---|---|---|");
    for (name, ns, bytes) in rows {
        let tp = match bytes {
            Some(b) if ns > 0.0 => format!("{:.1} MB/s", b as f64 / ns * 1e9 / 1e6),
            _ => "-".into(),
        };
        println!("| {name} | {} | {tp} |", fmt_ns(ns));
    }
    Ok(())
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn collect(dir: &Path, rows: &mut Vec<(String, f64, Option<u64>)>) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in rd {
        let p = e?.path();
        if !p.is_dir() {
            continue;
        }
        if p.file_name().and_then(|n| n.to_str()) == Some("new") {
            let est: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(p.join("estimates.json"))?)?;
            let bm: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(p.join("benchmark.json"))?)?;
            let ns = est["mean"]["point_estimate"].as_f64().unwrap_or(0.0);
            let bytes = bm["throughput"]["Bytes"].as_u64().or_else(|| bm["throughput"]["BytesDecimal"].as_u64());
            let name = bm["full_id"].as_str().unwrap_or("?").to_string();
            rows.push((name, ns, bytes));
        } else if p.file_name().and_then(|n| n.to_str()) != Some("report") {
            collect(&p, rows)?;
        }
    }
    Ok(())
}
