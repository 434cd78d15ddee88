//! `paqet-impair`: the userspace half of the impaired test link (see `paqet_testkit::impair`).
//!
//! Run inside the middle namespace, with an `iptables -A FORWARD -j NFQUEUE --queue-num N` rule: it
//! binds queue N and accepts each packet after `delay ± jitter` ms (out-of-order verdicts reorder), and
//! sends a copy of `dup-pct` % of IPv4 packets. Prints `ready` on stdout once the queue is bound (then, with
//! `--stats-ms`, a `stats …` line per interval); runs until killed (SIGINT/SIGTERM stop it cleanly).
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use paqet_testkit::impair::{run_relay, RelayConfig};

#[derive(Parser, Debug)]
#[command(
    name = "paqet-impair",
    about = "NFQUEUE delay/jitter/reorder/duplication relay for fault tests"
)]
struct Args {
    /// NFQUEUE number to bind.
    #[arg(long, default_value_t = 7)]
    queue: u16,
    /// One-way delay in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u32,
    /// Uniform jitter in milliseconds (delay ± jitter; reorders packets).
    #[arg(long, default_value_t = 0)]
    jitter_ms: u32,
    /// Percentage of IPv4 packets sent twice.
    #[arg(long, default_value_t = 0.0)]
    dup_pct: f64,
    /// Seed of the jitter and duplication draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Kernel queue length in packets.
    #[arg(long, default_value_t = 65536)]
    max_len: u32,
    /// Print `stats held=H verdicts=N late_mean_us=M late_max_us=X` on stdout every this many milliseconds
    /// (packets held, verdicts issued in the interval, how long after their due time); 0 = never.
    #[arg(long, default_value_t = 0)]
    stats_ms: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let a = Args::parse();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    let cfg = RelayConfig {
        queue: a.queue,
        delay_ms: a.delay_ms,
        jitter_ms: a.jitter_ms,
        dup_pct: a.dup_pct,
        seed: a.seed,
        max_len: a.max_len,
        stats_every: (a.stats_ms > 0).then(|| std::time::Duration::from_millis(a.stats_ms)),
    };
    let ready = || {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    };
    if let Err(e) = run_relay(cfg, ready, &STOP) {
        eprintln!("paqet-impair: {e}");
        std::process::exit(1);
    }
}
