//! `bench micro`: the criterion benchmarks of `paqet-userspace` and a markdown table built from
//! `target/criterion/**/new/{estimates,benchmark}.json`. Criterion runs each benchmark on one thread, so
//! every throughput is bytes per second per core.
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

/// Per-core target for the aes session pipeline and aes seal+open (issue 3/4: ≥ 400 MB/s per core).
const AES_TARGET_MBPS: f64 = 400.0;

/// Runs `cargo bench -p paqet-userspace --bench NAME… -- ARGS` (criterion arguments: filters, `--measurement-time`…).
pub fn run(root: &Path, criterion_args: &[String]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args(["bench", "-p", "paqet-userspace"]);
    // Only the criterion targets (`--benches` would also run the lib's libtest harness, which rejects
    // criterion's flags).
    let mut names: Vec<String> = std::fs::read_dir(root.join("paqet-userspace/benches"))
        .context("listing paqet-userspace/benches")?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".rs")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    for n in &names {
        cmd.args(["--bench", n]);
    }
    cmd.arg("--");
    if criterion_args.is_empty() {
        // Short but stable enough on this machine; pass your own criterion flags to override.
        cmd.args(["--warm-up-time", "1", "--measurement-time", "3"]);
    } else {
        cmd.args(criterion_args);
    }
    let st = cmd.status().context("running cargo bench")?;
    if !st.success() {
        bail!("cargo bench failed: {st}");
    }
    Ok(())
}

/// One criterion result.
struct Row {
    name: String,
    ns: f64,
    bytes: Option<u64>,
    written: SystemTime,
}

impl Row {
    fn mbps(&self) -> Option<f64> {
        match self.bytes {
            Some(b) if self.ns > 0.0 => Some(b as f64 / self.ns * 1e9 / 1e6),
            _ => None,
        }
    }
}

/// The markdown table of every criterion result under `target/criterion`, plus the aes target check.
/// With `since`, only results written after it (this run's) are listed; stale results of benchmarks
/// that no longer exist stay out of the table.
pub fn table(root: &Path, since: Option<SystemTime>) -> Result<String> {
    let mut rows = Vec::new();
    collect(&root.join("target/criterion"), &mut rows)?;
    if let Some(t) = since {
        rows.retain(|r| r.written >= t);
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str(
            "(no criterion results under target/criterion: run `cargo xtask bench micro`)\n",
        );
        return Ok(out);
    }
    out.push_str("| benchmark | time per iteration | throughput (one core) |\n|---|---|---|\n");
    for r in &rows {
        let tp = r
            .mbps()
            .map(|m| format!("{m:.1} MB/s"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!("| {} | {} | {tp} |\n", r.name, fmt_ns(r.ns)));
    }
    for name in ["session_pipeline/aes", "crypt_seal_open/aes"] {
        if let Some(m) = rows.iter().find(|r| r.name == name).and_then(Row::mbps) {
            let ok = if m >= AES_TARGET_MBPS {
                "met"
            } else {
                "NOT met"
            };
            out.push_str(&format!(
                "\nTarget ≥ {AES_TARGET_MBPS:.0} MB/s per core for `{name}`: {m:.1} MB/s, {ok}.\n"
            ));
        }
    }
    Ok(out)
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

fn collect(dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd {
        let p = e?.path();
        if !p.is_dir() {
            continue;
        }
        let file_name = p.file_name().and_then(|n| n.to_str());
        if file_name == Some("new") {
            let read = |f: &str| -> Result<serde_json::Value> {
                let path = p.join(f);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
            };
            let est = read("estimates.json")?;
            let bm = read("benchmark.json")?;
            let written = p
                .join("estimates.json")
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            rows.push(Row {
                written,
                name: bm["full_id"].as_str().unwrap_or("?").to_string(),
                ns: est["mean"]["point_estimate"].as_f64().unwrap_or(0.0),
                bytes: bm["throughput"]["Bytes"]
                    .as_u64()
                    .or_else(|| bm["throughput"]["BytesDecimal"].as_u64()),
            });
        } else if file_name != Some("report") {
            collect(&p, rows)?;
        }
    }
    Ok(())
}
