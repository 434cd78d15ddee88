//! `paqet-dp`: command-line entry point (spec §1 + issues 3 and 5).
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};

use paqet::config::{Config, ConfigError, IoBackend, LogLevel};
use paqet::ops::MetricsHub;
use paqet::worker::daemon::{self, DaemonOptions, DataPlane as Plane};
use paqet::worker::setup;
use paqet::worker::xdp::XdpWant;

/// The sampling heap profiler behind `/debug/pprof/heap` (forwards every call to the system allocator).
#[global_allocator]
static ALLOC: paqet::ops::TrackingAlloc = paqet::ops::TrackingAlloc;

const DEFAULT_CONFIG: &str = "/etc/paqet-dp/paqet.toml";

#[derive(Parser)]
#[command(
    name = "paqet-dp",
    about = "KCP transport over raw TCP packets (wire-compatible paqet)",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// `run --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DataPlane {
    /// `io.backend` from the config (`auto`: native XDP, then generic XDP, then pcap).
    Auto,
    /// XDP + AF_XDP, native mode when the driver supports it, else generic.
    Xdp,
    /// XDP + AF_XDP in driver (native) mode.
    XdpNative,
    /// XDP + AF_XDP in generic (skb) mode.
    XdpGeneric,
    /// libpcap capture and raw injection (upstream's data path).
    Pcap,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run as client or server (per `role`) until SIGINT/SIGTERM.
    Run {
        /// Configuration file (TOML, or an upstream paqet YAML file).
        #[arg(short = 'c', long = "config", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Override `network.interface`.
        #[arg(long)]
        iface: Option<String>,
        /// Packet data plane.
        #[arg(long, value_enum, default_value = "auto")]
        mode: DataPlane,
        /// Add the iptables rules the host needs in pcap mode (NOTRACK, drop before the IP stack, RST drop), and remove them on exit.
        #[arg(long)]
        manage_firewall: bool,
        /// File whose content (trimmed) replaces `transport.kcp.key`.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Print a new random key (64 lowercase hex characters; used as text, never hex-decoded).
    Secret,
    /// Create a static key pair for the noise wire (`transport.kcp.block = "noise"`): the private key goes
    /// to --out (created 0600) or stdout, the public key (for the peer's config) is printed.
    Keygen {
        /// Write the private key (or the PSK) to this new file, mode 0600 (an existing file is refused).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Create a pre-shared key (`transport.noise.psk`, the same on both ends) instead of a key pair.
        #[arg(long)]
        psk: bool,
    },
    /// A PING/PONG round trip through the tunnel (client config), printing the RTT.
    Ping {
        #[arg(short = 'c', long = "config", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        iface: Option<String>,
        /// Number of round trips.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// File whose content (trimmed) replaces `transport.kcp.key`.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Capture tunnel packets and decode them with the configured key (envelope, crypto, KCP, smux).
    Dump {
        #[arg(short = 'c', long = "config", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        iface: Option<String>,
        /// Stop after this many frames (default: until SIGINT).
        #[arg(long)]
        count: Option<usize>,
        /// File whose content (trimmed) replaces `transport.kcp.key`.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Check the host against the production runbook (exit 0: fine, 1: warnings, 2: failures).
    Doctor {
        /// Interface to check (default: the default route's).
        #[arg(long)]
        iface: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Configuration whose `network.interface` and `network.pcap.sockbuf` are checked.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Print version information.
    Version,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Print a shell completion script (packaging).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page, roff (packaging).
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a configuration file (all problems are listed; exit 1 on errors).
    Check { file: PathBuf },
    /// Convert an upstream paqet YAML file to paqet-dp TOML (printed on stdout).
    Import { file: PathBuf },
    /// Print every configuration key with its type, default, allowed values and meaning.
    Keys {
        /// Print the Markdown table of docs/configuration.md instead.
        #[arg(long)]
        markdown: bool,
    },
}

/// Installs the log subscriber at `level` (upstream's names); `PAQET_LOG` (an `EnvFilter`) overrides.
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

/// Reads a key file: its content without surrounding whitespace, which must not be empty.
fn read_key_file(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--key-file {}", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        bail!("--key-file {}: the file is empty", path.display());
    }
    paqet::config::check_secret_file(path, "the key (--key-file)")
        .map_err(|e| anyhow::anyhow!("--key-file {}: {e}", path.display()))?;
    Ok(key.to_owned())
}

/// A load error naming the file once (a read error already names it).
fn config_error(path: &Path, e: ConfigError) -> anyhow::Error {
    match e {
        ConfigError::Io { .. } => anyhow::anyhow!("{e}"),
        other => anyhow::anyhow!("config {}: {other}", path.display()),
    }
}

/// Loads `path` (TOML or upstream YAML), starts logging at its level, logs its warnings and applies
/// `--key-file`.
fn load(path: &Path, key_file: Option<&Path>) -> anyhow::Result<Config> {
    let loaded = Config::load(path).map_err(|e| config_error(path, e))?;
    init_logs(loaded.config.log_level);
    loaded.log_warnings();
    let mut cfg = loaded.config;
    if let Some(kf) = key_file {
        if cfg.is_noise() {
            bail!("--key-file replaces transport.kcp.key, which block = \"noise\" does not use: put the key file's path in transport.noise.private_key");
        }
        cfg.transport.kcp.key = read_key_file(kf)?;
        tracing::debug!(file = %kf.display(), "transport.kcp.key read from the key file");
    } else if cfg.holds_inline_secret() {
        // The config file itself carries the key: TOML refuses a readable file, imported YAML warns.
        if let Err(e) = paqet::config::check_secret_file(path, secret_key_name(&cfg)) {
            match loaded.format {
                paqet::config::Format::Toml => bail!("config {e}"),
                paqet::config::Format::Yaml => tracing::warn!("config {e} (refused for TOML)"),
            }
        }
    }
    Ok(cfg)
}

/// The config key naming the secret a config file holds (for the file-mode message).
fn secret_key_name(cfg: &Config) -> &'static str {
    if cfg.key().is_empty() {
        "transport.noise.private_key"
    } else {
        "transport.kcp.key"
    }
}

/// `keygen`: a noise static key pair (or, with `psk`, a pre-shared key). The secret goes to `out`
/// (created with mode 0600, never overwritten) or to stdout; the public key is printed.
fn keygen(out: Option<&Path>, psk: bool) -> anyhow::Result<()> {
    use paqet::proto::noise;
    let (secret, public) = if psk {
        (noise::Psk::generate().to_text(), None)
    } else {
        let (k, p) = noise::keygen();
        (k.to_text(), Some(p.to_text()))
    };
    match out {
        Some(path) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| {
                    format!(
                        "keygen --out {} (an existing file is never overwritten)",
                        path.display()
                    )
                })?;
            writeln!(f, "{secret}")
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            match public {
                Some(p) => println!("{p}"),
                None => eprintln!("pre-shared key written to {}", path.display()),
            }
        }
        None => match public {
            Some(p) => {
                println!("private_key: {secret}");
                println!("public_key: {p}");
            }
            None => println!("{secret}"),
        },
    }
    Ok(())
}

fn secret() -> anyhow::Result<()> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).context("reading random bytes")?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    println!("{hex}");
    Ok(())
}

fn version() {
    let b = &paqet::ops::metrics::BUILD;
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let env = if cfg!(target_env = "gnu") {
        "-gnu"
    } else if cfg!(target_env = "musl") {
        "-musl"
    } else {
        ""
    };
    let dirty = match b.dirty {
        "true" => " (dirty: uncommitted changes)",
        "false" => "",
        _ => " (dirty: unknown)",
    };
    let xdp = if b.xdp {
        "xdp, pcap"
    } else {
        "pcap (built without the XDP program)"
    };
    println!("paqet-dp {}", b.version);
    println!("Wire: paqet {}", b.wire);
    println!("Commit: {}{dirty}", b.commit);
    println!("Features: {xdp}");
    println!("Profile: {profile}");
    println!(
        "Target: {}-{}{env}",
        std::env::consts::ARCH,
        std::env::consts::OS
    );
}

/// The hidden packaging commands: a completion script for `shell`, or the man page (`shell` = `None`).
fn packaging(shell: Option<clap_complete::Shell>) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    match shell {
        Some(sh) => clap_complete::generate(sh, &mut cmd, "paqet-dp", &mut out),
        None => clap_mangen::Man::new(cmd)
            .render(&mut out)
            .context("writing the man page")?,
    }
    Ok(())
}

fn ping(cfg: &Config, iface: &str, count: u32) -> anyhow::Result<()> {
    if !cfg.is_client() {
        bail!("ping needs a client configuration (role = \"client\")");
    }
    let wcfg = setup::worker_config(cfg, iface)?;
    let factory = setup::pcap_factory(iface.to_owned(), cfg.network.pcap_sockbuf as usize);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let started = paqet::worker::start(wcfg, factory)?;
        let tunnel = started.tunnel.context("client worker without a tunnel")?;
        let server = cfg
            .server
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        for i in 0..count.max(1) {
            let rtt = tokio::time::timeout(std::time::Duration::from_secs(10), tunnel.ping())
                .await
                .context("no PONG within 10 s")??;
            println!(
                "pong {} from {server}: rtt {:.3} ms",
                i + 1,
                rtt.as_secs_f64() * 1e3
            );
        }
        Ok::<(), anyhow::Error>(())
    })
}

/// How long `dump` may take to notice the stop flag before the process exits anyway: libpcap's read
/// timeout does not fire in immediate mode on an idle link, so the capture can stay blocked.
const DUMP_STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Sets `flag` on the first SIGINT or SIGTERM (a helper thread with its own small runtime); if the main
/// thread has not finished [`DUMP_STOP_GRACE`] later, exits the process (every described frame has been
/// flushed already).
fn stop_on_signal(flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    // Install the handlers before returning so an early SIGINT is not lost.
    let (mut term, mut int) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("paqet-signal".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            flag.store(true, Ordering::Relaxed);
            std::thread::sleep(DUMP_STOP_GRACE);
            eprintln!("paqet-dp dump: stopped");
            std::process::exit(0);
        })?;
    Ok(())
}

fn dump(cfg: &Config, iface: &str, count: Option<usize>) -> anyhow::Result<()> {
    if cfg.is_noise() {
        bail!("dump decodes kcp-go's crypto framing; the noise wire (transport.kcp.block = \"noise\") has per-session keys that a capture cannot open");
    }
    let k = &cfg.transport.kcp;
    let mode = k
        .block
        .parse()
        .map_err(|e| anyhow::anyhow!("transport.kcp.block = {:?}: {e}", k.block))?;
    let crypto = paqet::wire::crypt::Crypto::new(mode, &k.key)
        .map_err(|e| anyhow::anyhow!("transport.kcp.key: {e}"))?;
    let fec = cfg.fec().map(|(d, p)| (d as usize, p as usize));
    // The tunnel port: the server's port on a client (its own is random), the listening port on a server.
    let port = match &cfg.server {
        Some(s) if cfg.is_client() => s.port,
        _ => cfg.local_port(),
    };
    let mut dumper = paqet::tools::dump::Dumper::new(Some(crypto), fec, port);
    if k.guard {
        let g = paqet::proto::guard::GuardConfig {
            format: k.guard_format,
            bind: k.guard_bind,
            magic: k.guard_magic,
            window_secs: u64::from(k.guard_window),
            skew: u64::from(k.guard_skew),
        };
        dumper.set_guard(Some(paqet::proto::guard::Guard::new(g, &k.key)));
    }
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone())?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let n = paqet::tools::dump::run_live(iface, port, &mut dumper, count, &stop, &mut out)?;
    eprintln!("{n} frame(s) captured on {iface}");
    Ok(())
}

fn doctor(iface: Option<String>, json: bool, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut opts = paqet::doctor::DoctorOptions {
        iface,
        ..Default::default()
    };
    if let Some(path) = config {
        let loaded = Config::load(&path).map_err(|e| config_error(&path, e))?;
        if opts.iface.is_none() && !loaded.config.network.interface.is_empty() {
            opts.iface = Some(loaded.config.network.interface.clone());
        }
        opts.pcap_sockbuf = Some(u64::from(loaded.config.network.pcap_sockbuf));
    }
    let report = paqet::doctor::run(&opts);
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::from(
        u8::try_from(report.exit_code()).unwrap_or(2),
    ))
}

/// `config check`: "ok" and the warnings, or every error; exit 1 on errors.
fn config_check(file: &Path) -> anyhow::Result<ExitCode> {
    match Config::load(file) {
        Ok(loaded) => {
            println!("ok: {} ({} role)", file.display(), loaded.config.role);
            for w in &loaded.warnings {
                println!("warning: {w}");
            }
            if loaded.config.holds_inline_secret() {
                if let Err(e) =
                    paqet::config::check_secret_file(file, secret_key_name(&loaded.config))
                {
                    println!(
                        "warning: {e} (`run` refuses a TOML config like this without --key-file)"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid { errors, warnings }) => {
            println!("{}: {} error(s)", file.display(), errors.len());
            for e in &errors {
                println!("error: {e}");
            }
            for w in &warnings {
                println!("warning: {w}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            // Read and syntax errors: the read error names the file; a syntax error needs it added.
            match e {
                ConfigError::Io { .. } => println!("error: {e}"),
                other => println!("error: {}: {other}", file.display()),
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `run`: loads the config and runs the daemon assembly with the chosen data plane until a signal.
fn run(
    config: &Path,
    iface: Option<String>,
    mode: DataPlane,
    manage_firewall: bool,
    key_file: Option<&Path>,
) -> anyhow::Result<()> {
    let cfg = load(config, key_file)?;
    match paqet::io::route::raise_nofile_limit() {
        // Every proxied connection holds a descriptor (the client's accepted socket, the server's socket
        // to the target): 1,000 streams need more than the usual soft limit of 1024.
        Ok((soft, hard)) => tracing::info!(
            soft,
            hard,
            "open-file limit (RLIMIT_NOFILE): soft limit set to the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let iface = iface.unwrap_or_else(|| cfg.network.interface.clone());
    if iface.is_empty() {
        bail!("no interface: set network.interface or pass --iface");
    }
    let plane = match mode {
        DataPlane::Pcap => Plane::Pcap,
        DataPlane::Xdp => Plane::Xdp(XdpWant::Auto),
        DataPlane::XdpNative => Plane::Xdp(XdpWant::Native),
        DataPlane::XdpGeneric => Plane::Xdp(XdpWant::Generic),
        DataPlane::Auto => match cfg.io.backend {
            IoBackend::Afxdp => Plane::Xdp(XdpWant::Auto),
            IoBackend::Auto => Plane::Auto,
            IoBackend::Pcap => Plane::Pcap,
        },
    };
    let hub = MetricsHub::new(setup::role_label(&cfg), plane.expected_mode(), 1);
    let opts = DaemonOptions::new(hub).with_manage_firewall(manage_firewall);
    daemon::run(&cfg, &iface, plane, opts).map(drop)
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Secret => secret().map(|()| ExitCode::SUCCESS),
        Cmd::Keygen { out, psk } => keygen(out.as_deref(), psk).map(|()| ExitCode::SUCCESS),
        Cmd::Completions { shell } => packaging(Some(shell)).map(|()| ExitCode::SUCCESS),
        Cmd::Man => packaging(None).map(|()| ExitCode::SUCCESS),
        Cmd::Version => {
            version();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => config_check(&file),
        Cmd::Config {
            cmd: ConfigCmd::Keys { markdown },
        } => {
            print!("{}", paqet::config::render_keys(markdown));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config {
            cmd: ConfigCmd::Import { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let loaded = Config::from_yaml_str(&text)
                .with_context(|| format!("config {}", file.display()))?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", loaded.config.to_toml_string());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Doctor {
            iface,
            json,
            config,
        } => doctor(iface, json, config),
        Cmd::Ping {
            config,
            iface,
            count,
            key_file,
        } => {
            let cfg = load(&config, key_file.as_deref())?;
            let iface = iface.unwrap_or_else(|| cfg.network.interface.clone());
            ping(&cfg, &iface, count).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Dump {
            config,
            iface,
            count,
            key_file,
        } => {
            let cfg = load(&config, key_file.as_deref())?;
            let iface = iface.unwrap_or_else(|| cfg.network.interface.clone());
            dump(&cfg, &iface, count).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Run {
            config,
            iface,
            mode,
            manage_firewall,
            key_file,
        } => run(&config, iface, mode, manage_firewall, key_file.as_deref())
            .map(|()| ExitCode::SUCCESS),
    }
}

/// Makes every permitted capability effective. The OCI image gives the binary its capabilities as
/// permitted-only file capabilities (`scripts/image.sh`), so a non-root container gets the ones the
/// runtime grants (the chart's list) without `exec` failing where it grants fewer; they take effect
/// here. A no-op for root and under systemd's ambient capabilities (already effective).
fn raise_effective_caps() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header read/write exactly two `Data` entries, which `data` holds.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut hdr as *mut Header, data.as_mut_ptr()) != 0 {
            return;
        }
        if data.iter().all(|d| d.effective == d.permitted) {
            return;
        }
        for d in &mut data {
            d.effective = d.permitted;
        }
        // Failure leaves the effective set as it was; the data path then reports what it cannot do.
        let _ = libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr());
    }
}

fn main() -> ExitCode {
    raise_effective_caps();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("paqet-dp: {e:#}");
            ExitCode::FAILURE
        }
    }
}
