//! From a validated [`Config`] to a running daemon: resolve what the config may omit (interface MAC and
//! address, `router_mac`) through [`crate::io::route`], build the [`WorkerConfig`], open the pcap backend,
//! start the worker and the front ends, and run until SIGINT/SIGTERM.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tracing::{info, warn};

use super::{FamilyConfig, GuardConfig, IoFactory, Limits, WorkerConfig};
use crate::config::{Config, ForwardProtocol, Role as CfgRole};
use crate::front::forward::{TcpForward, UdpForward};
use crate::io::pcap::{PcapConfig, PcapIo};
use crate::io::{route, PacketIo};
use crate::proto::kcp::KcpConfig;
use crate::proto::session::{Role, SessionConfig};
use crate::proto::smux::SmuxConfig;
use crate::wire::crypt::{BlockMode, Crypto};
use crate::wire::envelope::TcpFlags;

fn flags(list: &[String], key: &str) -> anyhow::Result<Vec<TcpFlags>> {
    list.iter()
        .map(|s| TcpFlags::from_letters(s).map_err(|e| anyhow!("{key}: {s:?}: {e}")))
        .collect()
}

/// The session settings (crypto, FEC, KCP preset, smux) of `cfg`.
pub fn session_config(cfg: &Config) -> anyhow::Result<SessionConfig> {
    let k = &cfg.transport.kcp;
    let mode: BlockMode = k.block.parse().map_err(|e| anyhow!("transport.kcp.block = {:?}: {e}", k.block))?;
    let crypto = Crypto::new(mode, &k.key).map_err(|e| anyhow!("transport.kcp.key: {e}"))?;
    let t = cfg.kcp_mode();
    let kcp = KcpConfig {
        nodelay: t.nodelay != 0,
        interval: t.interval.max(0) as u32,
        resend: t.resend.max(0) as u32,
        nocwnd: t.nocongestion != 0,
        write_delay: t.wdelay,
        ack_nodelay: t.acknodelay,
        sndwnd: k.sndwnd,
        rcvwnd: k.rcvwnd,
        mtu: k.mtu as usize, // the session replaces it with the KCP share
        stream: true,
    };
    let smux = SmuxConfig {
        version: 2,
        keepalive_interval_ms: k.smuxkalive.saturating_mul(1000),
        keepalive_timeout_ms: k.smuxktimeout.saturating_mul(1000),
        max_frame_size: 65535,
        max_receive_buffer: k.smuxbuf as usize,
        max_stream_buffer: k.streambuf as usize,
    };
    Ok(SessionConfig { crypto, dshard: k.dshard as usize, pshard: k.pshard as usize, kcp, smux, mtu: k.mtu as usize })
}

/// Builds the worker configuration, resolving interface MAC/addresses and `router_mac` from the kernel when
/// the config leaves them out. `iface` overrides `network.interface`.
pub fn worker_config(cfg: &Config, iface: &str) -> anyhow::Result<WorkerConfig> {
    let role = match cfg.role {
        CfgRole::Client => Role::Client,
        CfgRole::Server => Role::Server,
    };
    let local_mac = route::mac(iface).with_context(|| format!("network.interface {iface:?}"))?;
    let server_addr = match role {
        Role::Client => {
            let hp = cfg.server.as_ref().ok_or_else(|| anyhow!("server.addr is required for a client"))?;
            Some(hp.resolve().with_context(|| format!("server.addr {hp}"))?)
        }
        Role::Server => None,
    };
    // Where router_mac lookups aim: the server on a client; the default route on a server.
    let probe_dst = |fam_v4: bool| -> IpAddr {
        match server_addr {
            Some(s) if s.is_ipv4() == fam_v4 => s.ip(),
            _ if fam_v4 => IpAddr::from([1, 1, 1, 1]),
            _ => IpAddr::from([0x2606, 0x4700, 0, 0, 0, 0, 0, 0x1111]),
        }
    };
    let ipv4 = match &cfg.network.ipv4 {
        Some(f) => {
            let ip = match f.ip {
                Some(ip) => ip,
                None => route::ipv4_addr(iface).context("network.ipv4.addr omitted")?,
            };
            let router_mac = match f.router_mac {
                Some(m) => m.0,
                None => route::resolve_router_mac(iface, probe_dst(true))
                    .context("network.ipv4.router_mac omitted")?,
            };
            Some(FamilyConfig { addr: SocketAddr::new(IpAddr::V4(ip), f.port), router_mac })
        }
        None => None,
    };
    let ipv6 = match &cfg.network.ipv6 {
        Some(f) => {
            let ip = match f.ip {
                Some(ip) => ip,
                None => route::ipv6_addr(iface).context("network.ipv6.addr omitted")?,
            };
            let router_mac = match f.router_mac {
                Some(m) => m.0,
                None => route::resolve_router_mac(iface, probe_dst(false))
                    .context("network.ipv6.router_mac omitted")?,
            };
            Some(FamilyConfig { addr: SocketAddr::new(IpAddr::V6(ip), f.port), router_mac })
        }
        None => None,
    };
    if ipv4.is_none() && ipv6.is_none() {
        bail!("network: neither ipv4 nor ipv6 is configured");
    }
    let k = &cfg.transport.kcp;
    let guard = k.guard.then(|| {
        (GuardConfig { magic: k.guard_magic, window_secs: u64::from(k.guard_window), skew: u64::from(k.guard_skew) }, k.key.clone())
    });
    let lim = |l: Option<u32>| l.map(|v| v as usize);
    Ok(WorkerConfig {
        role,
        session: session_config(cfg)?,
        local_mac,
        ipv4,
        ipv6,
        server_addr,
        conn: cfg.transport.conn.max(1) as usize,
        local_flags: flags(&cfg.network.local_flag, "network.tcp.local_flag")?,
        remote_flags: flags(&cfg.network.remote_flag, "network.tcp.remote_flag")?,
        guard,
        limits: Limits {
            max_sessions: lim(k.max_sessions),
            max_streams_total: lim(k.max_streams_total),
            max_streams_per_session: lim(k.max_streams_per_session),
        },
        header_timeout: cfg.header_timeout(),
    })
}

/// A factory opening the pcap backend on `iface` for a given local port.
pub fn pcap_factory(iface: String, sockbuf: usize) -> IoFactory {
    Box::new(move |port: u16| -> std::io::Result<Box<dyn PacketIo>> {
        let mut pc = PcapConfig::new(iface.clone(), port);
        pc.sockbuf = sockbuf;
        // The worker flushes after every session transmit pass, so frames may be batched (sendmmsg).
        pc.tx_batch = crate::io::pcap::MAX_TX_BATCH;
        let io = PcapIo::open(pc).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Box::new(io))
    })
}

/// The iptables rules a host needs so its kernel neither tracks nor resets tunnel packets (spec §2.4).
pub fn firewall_rules(role: Role, port: u16, server: Option<SocketAddr>) -> Vec<String> {
    match (role, server) {
        (Role::Client, Some(s)) => {
            let ipt = if s.is_ipv4() { "iptables" } else { "ip6tables" };
            let (ip, p) = (s.ip(), s.port());
            vec![
                format!("{ipt} -t raw -A PREROUTING -p tcp -s {ip} --sport {p} -j NOTRACK"),
                format!("{ipt} -t raw -A OUTPUT -p tcp -d {ip} --dport {p} -j NOTRACK"),
                format!("{ipt} -t mangle -A OUTPUT -p tcp -d {ip} --dport {p} --tcp-flags RST RST -j DROP"),
            ]
        }
        _ => vec![
            format!("iptables -t raw -A PREROUTING -p tcp --dport {port} -j NOTRACK"),
            format!("iptables -t raw -A OUTPUT -p tcp --sport {port} -j NOTRACK"),
            format!("iptables -t mangle -A OUTPUT -p tcp --sport {port} --tcp-flags RST RST -j DROP"),
        ],
    }
}

/// Runs the daemon for `cfg` on the current thread (pcap backend) until SIGINT/SIGTERM.
pub fn run_daemon(cfg: &Config, iface: &str) -> anyhow::Result<()> {
    let wcfg = worker_config(cfg, iface)?;
    let role = wcfg.role;
    for r in firewall_rules(role, wcfg.local_port(), wcfg.server_addr) {
        info!("host firewall rule needed: {r}");
    }
    let factory = pcap_factory(iface.to_owned(), cfg.network.pcap_sockbuf as usize);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let started = super::start(wcfg, factory)?;
        if let Some(tunnel) = started.tunnel.clone() {
            start_front_ends(cfg, tunnel).await?;
        }
        info!(role = %role, "paqet-dp running");
        wait_for_signal().await?;
        info!("shutting down");
        Ok::<(), anyhow::Error>(())
    })?;
    // Dropping the LocalSet and runtime ends every task and closes every socket.
    Ok(())
}

/// Binds and spawns the client front ends the config lists (forwards; SOCKS5/HTTP when built).
pub async fn start_front_ends(cfg: &Config, tunnel: super::Tunnel) -> anyhow::Result<()> {
    for (i, f) in cfg.forward.iter().enumerate() {
        let listen = f.listen.resolve().with_context(|| format!("forward[{i}].listen {}", f.listen))?;
        let (host, port) = (f.target.host.clone(), f.target.port);
        match f.protocol {
            ForwardProtocol::Tcp => {
                let fw = TcpForward::bind(listen, host, port).await?;
                tokio::task::spawn_local(fw.run(tunnel.clone()));
            }
            ForwardProtocol::Udp => {
                let fw = UdpForward::bind(listen, host, port).await?;
                tokio::task::spawn_local(fw.run(tunnel.clone()));
            }
        }
    }
    if !cfg.socks5.is_empty() {
        warn!("socks5 listeners are configured but this build has no SOCKS5 front end yet; they are not served");
    }
    if !cfg.http.is_empty() {
        warn!("http listeners are configured but this build has no HTTP proxy front end yet; they are not served");
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // Give the driver one tick to push out FINs queued by dropped streams.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(())
}
