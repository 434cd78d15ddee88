//! `cargo xtask <command>`: developer tasks that are more than one cargo call.
//!
//! - `bench [micro|tunnel|all] [OPTIONS] [-- CRITERION ARGS]` (default `all`): benchmarks, reported as
//!   figures measured side by side in one run (ratios), printed as markdown and written to
//!   `target/bench-report.md`.
//!   - `micro`: the criterion benches of `paqet-userspace` and a table of bytes/s per core.
//!   - `tunnel` (root): plain TCP vs the tunnel (fast, fast3 with 2048-packet windows) on one veth pair in two
//!     namespaces: bulk throughput + CPU, request latency, RSS with idle streams, per data-path mode.
//! - `bench wan [OPTIONS]` (root): goodput, queueing delay, bytes sent per byte delivered and fairness of
//!   paqet-dp (cc bbr / fixed / off), kcptun and plain TCP (bbr, cubic) over emulated WAN paths (bottleneck
//!   rate × RTT × random loss, three namespaces); written to `target/bench-wan.md`. Not part of `all`.
//! - `bench soak --minutes N [--mode pcap|xdp-generic|xdp-native]` (root): a server and a client under
//!   continuous, varied load (short and long streams, UDP ASSOCIATE, client churn, a lossy minute, a server
//!   restart) for N minutes, sampled every minute (RSS, fds, sessions, streams, UDP channels, errors), with a
//!   verdict on growth and on what is left behind; written to `target/bench-soak.md`, exits non-zero when the
//!   verdict fails. Not part of `all`, not run in CI.
//! - `bench-report`: prints the criterion table from existing results only.
//! - `probe --target IPv4:PORT [--closed PORT] [--netns NAME]` (root): the active prober of
//!   `tests/probe_scan.rs` against a target: does its port answer scans like a closed port of the host?
mod flood;
mod micro;
mod probe;
mod soak;
mod sys;
mod tunnel;
mod wan;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask bench [micro|tunnel|all] [--modes pcap,pcap-upstream-rules,xdp-native,xdp-generic] [--secs N]
                        [--streams 1000,10000] [--requests N] [--flood-secs N] [--guard] [--share-cpus] [--cc bbr,off] [--crypto aes,noise] [--bin PATH]
                        [-- CRITERION ARGS]
       cargo xtask bench wan [--rates 20,100,500] [--rtts 20,100,200] [--losses 0,1,5]
                        [--rows bbr,bbr-noise,fixed,off,kcptun,tcp-bbr,tcp-cubic] [--secs N] [--parallel N]
                        [--mode xdp-native|xdp-generic|pcap] [--windows N] [--bin PATH]
       cargo xtask bench soak [--minutes N] [--mode pcap|xdp-generic|xdp-native] [--settle-secs N]
                        [--window-mem BYTES|default] [--bin PATH]
       cargo xtask bench-report
       cargo xtask probe --target IPv4:PORT [--closed PORT] [--netns NAME] [--wait-ms N]";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        // Internal: the idle-stream target the tunnel bench runs in its server namespace.
        Some("__idle-target") if args.len() == 2 => tunnel::idle_target_main(&args[1]),
        Some("probe") => probe::main(&args[1..]),
        Some("bench-report") => {
            print!("{}", micro::table(&root(), None)?);
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn parse_list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim()
                .parse::<T>()
                .map_err(|_| anyhow::anyhow!("{flag} {v:?}: cannot parse {s:?}"))
        })
        .collect()
}

fn bench(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("wan") {
        return bench_wan(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("soak") {
        return bench_soak(&args[1..]);
    }
    let mut what = "all".to_string();
    let mut opts = tunnel::Opts {
        bin: String::new(),
        modes: vec!["pcap".into()],
        secs: 10,
        streams: vec![1000, 10000],
        latency_n: 200,
        flood_secs: 5,
        guard: false,
        share_cpus: false,
        ccs: vec!["bbr".into()],
        cryptos: vec!["aes".into()],
    };
    let mut criterion = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "micro" | "tunnel" | "all" => what = a.clone(),
            "--modes" => {
                opts.modes = parse_list("--modes", &val("--modes")?)?;
                for m in &opts.modes {
                    if ![
                        "pcap",
                        "pcap-upstream-rules",
                        "xdp-native",
                        "xdp-generic",
                        "xdp",
                        "auto",
                    ]
                    .contains(&m.as_str())
                    {
                        bail!("--modes: unknown mode {m:?} (pcap, pcap-upstream-rules, xdp-native, xdp-generic, xdp, auto)");
                    }
                }
            }
            "--secs" => opts.secs = val("--secs")?.parse().context("--secs")?,
            "--streams" => opts.streams = parse_list("--streams", &val("--streams")?)?,
            "--requests" => opts.latency_n = val("--requests")?.parse().context("--requests")?,
            "--flood-secs" => {
                opts.flood_secs = val("--flood-secs")?.parse().context("--flood-secs")?
            }
            "--guard" => opts.guard = true,
            "--share-cpus" => opts.share_cpus = true,
            "--cc" => {
                opts.ccs = parse_list("--cc", &val("--cc")?)?;
                for c in &opts.ccs {
                    if !tunnel::CCS.contains(&c.as_str()) {
                        bail!("--cc: unknown congestion control {c:?} (bbr, off)");
                    }
                }
            }
            "--crypto" => {
                opts.cryptos = parse_list("--crypto", &val("--crypto")?)?;
                for c in &opts.cryptos {
                    if !tunnel::CRYPTOS.contains(&c.as_str()) {
                        bail!("--crypto: unknown packet protection {c:?} (aes, noise)");
                    }
                }
            }
            "--bin" => opts.bin = val("--bin")?,
            "--" => criterion.extend(it.by_ref().cloned()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if opts.modes.is_empty() || opts.secs == 0 || opts.latency_n == 0 {
        bail!("--modes, --secs and --requests must be non-empty / non-zero");
    }
    let root = root();
    let mut md = String::from("# paqet-dp benchmark report\n\n");
    md.push_str(&machine());
    if what == "micro" || what == "all" {
        let started = std::time::SystemTime::now();
        micro::run(&root, &criterion)?;
        md.push_str("## Micro benchmarks (criterion, one thread = one core)\n\n");
        md.push_str(&micro::table(&root, Some(started))?);
        md.push('\n');
    }
    if what == "tunnel" || what == "all" {
        if !sys::is_root() {
            bail!("`bench {what}`: the tunnel benches need root (network namespaces, veth, pcap/XDP, iptables). \
                   Run `sudo -E cargo xtask bench tunnel`, or `cargo xtask bench micro` without root.");
        }
        if opts.bin.is_empty() {
            build_release(&root, "paqet-userspace", &["--bin", "paqet-dp"])?;
            opts.bin = root
                .join("target/release/paqet-dp")
                .to_string_lossy()
                .into_owned();
        }
        md.push_str(&tunnel::run(&opts)?);
    }
    let out = root.join("target/bench-report.md");
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("{md}");
    eprintln!("report written to {}", out.display());
    Ok(())
}

/// The directory holding `bpf-linker` (needed for the XDP program), from `scripts/setup.sh`'s note in
/// `$TMPDIR/paqet-dp-bpf-linker-path` or the tool cache of `scripts/install-bpf-linker.sh`.
fn bpf_linker_dir() -> Option<PathBuf> {
    let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
    if let Ok(s) = std::fs::read_to_string(Path::new(&tmp).join("paqet-dp-bpf-linker-path")) {
        let d = PathBuf::from(s.trim());
        if d.join("bpf-linker").is_file() {
            return Some(d);
        }
    }
    let cache = std::env::var("PAQET_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/paqet-dp-tools")
        });
    std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("bpf-linker").is_file())
        .max_by_key(|d| d.metadata().and_then(|m| m.modified()).ok())
}

/// `bench wan`: parses its options, builds `paqet-dp` and the `paqet-impair` relay unless given, runs the
/// matrix and writes `target/bench-wan.md`.
fn bench_wan(args: &[String]) -> Result<()> {
    let mut opts = wan::Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--rates" => opts.rates = parse_list("--rates", &val("--rates")?)?,
            "--rtts" => opts.rtts = parse_list("--rtts", &val("--rtts")?)?,
            "--losses" => opts.losses = parse_list("--losses", &val("--losses")?)?,
            "--rows" => {
                opts.rows = val("--rows")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| wan::Row::parse(s.trim()))
                    .collect::<Result<_>>()?
            }
            "--secs" => opts.secs = val("--secs")?.parse().context("--secs")?,
            "--parallel" => opts.parallel = val("--parallel")?.parse().context("--parallel")?,
            "--mode" => {
                opts.mode = val("--mode")?;
                if !["xdp-native", "xdp-generic", "pcap"].contains(&opts.mode.as_str()) {
                    bail!(
                        "--mode: {:?} is not one of xdp-native, xdp-generic, pcap",
                        opts.mode
                    );
                }
            }
            "--windows" => opts.windows = Some(val("--windows")?.parse().context("--windows")?),
            "--bin" => opts.bin = val("--bin")?,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if opts.rates.is_empty()
        || opts.rtts.is_empty()
        || opts.losses.is_empty()
        || opts.rows.is_empty()
        || opts.secs == 0
    {
        bail!("--rates, --rtts, --losses, --rows and --secs must be non-empty / non-zero");
    }
    if opts.rates.contains(&0)
        || opts.losses.iter().any(|l| !(0.0..100.0).contains(l))
        || opts.windows == Some(0)
    {
        bail!("rates and windows must be > 0, losses in 0..100 %");
    }
    if !sys::is_root() {
        eprintln!("bench wan: skipped: it needs root (network namespaces, veth, tbf, iptables, NFQUEUE, XDP); run `sudo -E cargo xtask bench wan`");
        return Ok(());
    }
    let root = root();
    if opts.bin.is_empty() {
        build_release(&root, "paqet-userspace", &["--bin", "paqet-dp"])?;
        opts.bin = root
            .join("target/release/paqet-dp")
            .to_string_lossy()
            .into_owned();
    }
    opts.relay = match wan::relay_beside(&opts.bin) {
        Some(r) => r,
        None => {
            build_release(&root, "paqet-testkit", &["--bin", "paqet-impair"])?;
            root.join("target/release/paqet-impair")
                .to_string_lossy()
                .into_owned()
        }
    };
    let Some(report) = wan::run(&opts)? else {
        return Ok(());
    };
    let md = format!("# paqet-dp WAN benchmark report\n\n{}{report}", machine());
    let out = root.join("target/bench-wan.md");
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("{md}");
    eprintln!("report written to {}", out.display());
    Ok(())
}

/// `bench soak`: parses its options, builds `paqet-dp` unless given, runs the soak, writes
/// `target/bench-soak.md` and fails when the verdict does.
fn bench_soak(args: &[String]) -> Result<()> {
    let mut opts = soak::Opts {
        bin: String::new(),
        minutes: 15,
        mode: "pcap".into(),
        settle_secs: 90,
        window_mem: Some(soak::DEFAULT_WINDOW_MEM),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--minutes" => opts.minutes = val("--minutes")?.parse().context("--minutes")?,
            "--mode" => {
                opts.mode = val("--mode")?;
                if !["pcap", "xdp-generic", "xdp-native"].contains(&opts.mode.as_str()) {
                    bail!(
                        "--mode: {:?} is not one of pcap, xdp-generic, xdp-native",
                        opts.mode
                    );
                }
            }
            "--settle-secs" => {
                opts.settle_secs = val("--settle-secs")?.parse().context("--settle-secs")?
            }
            "--window-mem" => {
                let v = val("--window-mem")?;
                opts.window_mem = match v.as_str() {
                    "default" => None,
                    n => Some(n.parse().with_context(|| {
                        format!("--window-mem {n:?}: bytes (1048576..=1073741824) or default")
                    })?),
                };
                if opts
                    .window_mem
                    .is_some_and(|m| !(1 << 20..=1 << 30).contains(&m))
                {
                    bail!("--window-mem: must be 1048576..=1073741824 bytes, or default");
                }
            }
            "--bin" => opts.bin = val("--bin")?,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if opts.minutes < 3 {
        bail!("--minutes must be at least 3");
    }
    if !sys::is_root() {
        bail!("bench soak needs root (network namespaces, veth, pcap/XDP, iptables, NFQUEUE); run `sudo -E cargo xtask bench soak`");
    }
    let root = root();
    if opts.bin.is_empty() {
        build_release(&root, "paqet-userspace", &["--bin", "paqet-dp"])?;
        opts.bin = root
            .join("target/release/paqet-dp")
            .to_string_lossy()
            .into_owned();
    }
    let (report, passed) = soak::run(&opts)?;
    let md = format!("# paqet-dp soak report\n\n{}{report}", machine());
    let out = root.join("target/bench-soak.md");
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("{md}");
    eprintln!("report written to {}", out.display());
    if !passed {
        bail!("soak verdict: FAIL (see {})", out.display());
    }
    Ok(())
}

/// `cargo build --release -p PACKAGE ARGS` (e.g. `-p paqet-userspace --bin paqet-dp`, `-p paqet-testkit --bin
/// paqet-impair`) with bpf-linker on the PATH.
fn build_release(root: &Path, package: &str, what: &[&str]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    let path = std::env::var("PATH").unwrap_or_default();
    let on_path = std::env::split_paths(&path).any(|d| d.join("bpf-linker").is_file());
    if !on_path {
        match bpf_linker_dir() {
            Some(d) => {
                cmd.env("PATH", format!("{}:{path}", d.display()));
            }
            None => eprintln!("bench: bpf-linker not found (run scripts/setup.sh): paqet-dp is built without XDP, XDP modes will fail"),
        }
    }
    let st = cmd
        .current_dir(root)
        .args(["build", "--release", "-p", package])
        .args(what)
        .status()
        .context("running cargo build --release")?;
    if !st.success() {
        bail!(
            "cargo build --release -p {package} {} failed: {st}",
            what.join(" ")
        );
    }
    Ok(())
}

/// A short description of the machine the figures come from.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Machine: {cores} vCPU ({cpu}), Linux {}; shared and noisy, so compare figures of the same run (ratios).\n\n",
        kernel.trim()
    )
}
