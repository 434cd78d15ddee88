//! `paqet-dp`: command-line entry point (spec §1 + issue 3).
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};

use paqet::config::{Config, LogLevel};
use paqet::worker::setup;

#[derive(Parser)]
#[command(name = "paqet-dp", about = "KCP transport over raw TCP packets (wire-compatible paqet)", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DataPlane {
    /// pcap for now (the XDP data plane is not built yet).
    Auto,
    Xdp,
    Pcap,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run as client or server (per `role`) until SIGINT/SIGTERM.
    Run {
        /// Configuration file (TOML, or an upstream paqet YAML file).
        #[arg(short = 'c', long = "config", default_value = "/etc/paqet-dp/paqet.toml")]
        config: PathBuf,
        /// Override `network.interface`.
        #[arg(long)]
        iface: Option<String>,
        /// Packet data plane.
        #[arg(long, value_enum, default_value = "auto")]
        mode: DataPlane,
    },
    /// Print a new random key (64 lowercase hex characters; used as text, never hex-decoded).
    Secret,
    /// A PING/PONG round trip through the tunnel (client config), printing the RTT.
    Ping {
        #[arg(short = 'c', long = "config", default_value = "/etc/paqet-dp/paqet.toml")]
        config: PathBuf,
        #[arg(long)]
        iface: Option<String>,
        /// Number of round trips.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Print version information.
    Version,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a configuration file (all problems are listed).
    Check { file: PathBuf },
    /// Convert an upstream paqet YAML file to paqet-dp TOML (printed on stdout).
    Import { file: PathBuf },
}

fn init_logs(level: LogLevel) {
    let filter = match level {
        LogLevel::None => "off",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error | LogLevel::Fatal => "error",
    };
    let filter = std::env::var("PAQET_LOG").unwrap_or_else(|_| filter.to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

fn load(path: &PathBuf) -> anyhow::Result<Config> {
    let loaded = Config::load(path).with_context(|| format!("config {}", path.display()))?;
    init_logs(loaded.config.log_level);
    loaded.log_warnings();
    Ok(loaded.config)
}

fn secret() -> anyhow::Result<()> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).context("reading random bytes")?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    println!("{hex}");
    Ok(())
}

fn ping(cfg: &Config, iface: &str, count: u32) -> anyhow::Result<()> {
    if !cfg.is_client() {
        bail!("ping needs a client configuration (role = \"client\")");
    }
    let wcfg = setup::worker_config(cfg, iface)?;
    let factory = setup::pcap_factory(iface.to_owned(), cfg.network.pcap_sockbuf as usize);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let started = paqet::worker::start(wcfg, factory)?;
        let tunnel = started.tunnel.context("client worker without a tunnel")?;
        for i in 0..count.max(1) {
            let rtt = tokio::time::timeout(std::time::Duration::from_secs(10), tunnel.ping())
                .await
                .context("no PONG within 10 s")??;
            println!("pong {} from {}: rtt {:.3} ms", i + 1, cfg.server.as_ref().map(|s| s.to_string()).unwrap_or_default(), rtt.as_secs_f64() * 1e3);
        }
        Ok::<(), anyhow::Error>(())
    })
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Secret => secret(),
        Cmd::Version => {
            println!("Version: {}", env!("CARGO_PKG_VERSION"));
            println!("Wire: paqet v1.0.0-alpha.21");
            println!("Platform: {}/{}", std::env::consts::OS, std::env::consts::ARCH);
            Ok(())
        }
        Cmd::Config { cmd: ConfigCmd::Check { file } } => {
            let loaded = Config::load(&file).with_context(|| format!("config {}", file.display()))?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}: OK ({} role)", file.display(), loaded.config.role);
            Ok(())
        }
        Cmd::Config { cmd: ConfigCmd::Import { file } } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let loaded = Config::from_yaml_str(&text).with_context(|| format!("config {}", file.display()))?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", loaded.config.to_toml_string());
            Ok(())
        }
        Cmd::Ping { config, iface, count } => {
            let cfg = load(&config)?;
            let iface = iface.unwrap_or_else(|| cfg.network.interface.clone());
            ping(&cfg, &iface, count)
        }
        Cmd::Run { config, iface, mode } => {
            if mode == DataPlane::Xdp {
                bail!("XDP data plane not built yet (use --mode pcap or auto)");
            }
            let cfg = load(&config)?;
            match paqet::io::route::raise_nofile_limit() {
                Ok((soft, hard)) => tracing::debug!(soft, hard, "RLIMIT_NOFILE raised"),
                Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
            }
            let iface = iface.unwrap_or_else(|| cfg.network.interface.clone());
            setup::run_daemon(&cfg, &iface)
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("paqet-dp: {e:#}");
            ExitCode::FAILURE
        }
    }
}
