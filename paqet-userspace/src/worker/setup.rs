//! What the daemon assembly ([`super::daemon`]) is built from: the [`WorkerConfig`] resolved from a
//! validated [`Config`] (interface MAC and address, `router_mac` through [`crate::io::route`] when the
//! config leaves them out), the pcap backend's link factory, the host's iptables rules, the ops HTTP
//! servers ([`OpsServers`]) and each worker's metrics publisher ([`publish_metrics_until`]).
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tracing::{info, warn};

use super::core::{Core, Shared};
use super::{FamilyConfig, GuardConfig, IoFactory, Limits, ServerTarget, WorkerConfig};
use crate::config::{Config, HostPort, Role as CfgRole};
use crate::io::pcap::{PcapConfig, PcapIo};
use crate::io::{route, PacketIo};
use crate::ops::hub::PUBLISH_INTERVAL_MS;
use crate::ops::{spawn_ops_thread, KcpRetrans, MetricsHub, OpsState, RoleLabel, WorkerSnapshot};
use crate::proto::cc::CcConfig;
use crate::proto::kcp::Autotune;
use crate::proto::kcp::KcpConfig;
use crate::proto::session::{Role, SessionConfig};
use crate::proto::smux::SmuxConfig;
use crate::tools::firewall::FirewallRole;
use crate::wire::crypt::{BlockMode, Crypto};
use crate::wire::envelope::TcpFlags;

fn flags(list: &[String], key: &str) -> anyhow::Result<Vec<TcpFlags>> {
    list.iter()
        .map(|s| TcpFlags::from_letters(s).map_err(|e| anyhow!("{key}: {s:?}: {e}")))
        .collect()
}

/// The session settings (crypto, FEC, KCP preset, congestion control, window auto-tuning, smux) of `cfg`.
pub fn session_config(cfg: &Config) -> anyhow::Result<SessionConfig> {
    let k = &cfg.transport.kcp;
    // The noise wire replaces kcp-go's crypto: the session emits and takes bare FEC/KCP bodies (`null`),
    // and every datagram is one noise transport message of body + 29 bytes.
    let (mode, mtu): (BlockMode, usize) = if cfg.is_noise() {
        (
            BlockMode::Null,
            (k.mtu as usize).min(crate::proto::session::MAX_DATAGRAM)
                - crate::wire::noise::TRANSPORT_OVERHEAD,
        )
    } else {
        let mode = k
            .block
            .parse()
            .map_err(|e| anyhow!("transport.kcp.block = {:?}: {e}", k.block))?;
        (mode, k.mtu as usize)
    };
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
        cc: CcConfig {
            algorithm: k.cc,
            // Validation guarantees a rate with `fixed` and none otherwise.
            bandwidth: k.bandwidth.unwrap_or(0),
        },
        autotune: Autotune {
            sndwnd: k.sndwnd_auto,
            rcvwnd: k.rcvwnd_auto,
            max_wnd: k.max_wnd(),
        },
    };
    let smux = SmuxConfig {
        version: 2,
        keepalive_interval_ms: k.smuxkalive.saturating_mul(1000),
        keepalive_timeout_ms: k.smuxktimeout.saturating_mul(1000),
        max_frame_size: 65535,
        max_receive_buffer: k.smuxbuf as usize,
        max_stream_buffer: k.streambuf as usize,
    };
    Ok(SessionConfig {
        crypto,
        dshard: k.dshard as usize,
        pshard: k.pshard as usize,
        kcp,
        smux,
        mtu,
    })
}

/// `server.addr` as a socket address: an IP literal as is; of a host name's addresses the first IPv4 one
/// when `network.ipv4` is configured (upstream resolves names preferring IPv4), else the first IPv6 one
/// when `network.ipv6` is, else the first (whose family then fails the family check with a clear error).
fn resolve_server(hp: &HostPort, v4: bool, v6: bool) -> std::io::Result<SocketAddr> {
    if let Some(sa) = hp.socket_addr() {
        return Ok(sa);
    }
    let all: Vec<SocketAddr> = (hp.host.as_str(), hp.port).to_socket_addrs()?.collect();
    all.iter()
        .find(|a| v4 && a.is_ipv4())
        .or_else(|| all.iter().find(|a| v6 && a.is_ipv6()))
        .or(all.first())
        .copied()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("host {:?} resolved to no address", hp.host),
            )
        })
}

/// Builds the worker configuration, resolving interface MAC/addresses and `router_mac` from the kernel when
/// the config leaves them out. `iface` overrides `network.interface`.
pub fn worker_config(cfg: &Config, iface: &str) -> anyhow::Result<WorkerConfig> {
    let role = match cfg.role {
        CfgRole::Client => Role::Client,
        CfgRole::Server => Role::Server,
    };
    // Ethernet, or no link header (tun, ppp, WireGuard): no MACs to resolve, and none may be configured.
    let medium =
        route::link_medium(iface).with_context(|| format!("network.interface {iface:?}"))?;
    let local_mac = route::local_mac_for(iface, medium)
        .with_context(|| format!("network.interface {iface:?}"))?;
    let server_addr = match role {
        Role::Client => {
            let hp = cfg
                .server
                .as_ref()
                .ok_or_else(|| anyhow!("server.addr is required for a client"))?;
            let (v4, v6) = (cfg.network.ipv4.is_some(), cfg.network.ipv6.is_some());
            Some(resolve_server(hp, v4, v6).with_context(|| format!("server.addr {hp}"))?)
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
    // A client sends and receives only in server.addr's family: the other family's table (configs for
    // dual-stack hosts carry both) is unused, so none of it is looked up in the kernel.
    let used = |fam_v4: bool| server_addr.is_none_or(|s| s.is_ipv4() == fam_v4);
    let ipv4 = match &cfg.network.ipv4 {
        Some(f) if used(true) => {
            let ip = match f.ip {
                Some(ip) => ip,
                None => route::ipv4_addr(iface).context("network.ipv4.addr omitted")?,
            };
            let router_mac = route::router_mac_for(
                iface,
                medium,
                "ipv4",
                f.router_mac.map(|m| m.0),
                probe_dst(true),
            )
            .context("network.ipv4.router_mac")?;
            Some(FamilyConfig {
                addr: SocketAddr::new(IpAddr::V4(ip), f.port),
                router_mac,
            })
        }
        _ => None,
    };
    let ipv6 = match &cfg.network.ipv6 {
        Some(f) if used(false) => {
            let ip = match f.ip {
                Some(ip) => ip,
                None => route::ipv6_addr(iface).context("network.ipv6.addr omitted")?,
            };
            let router_mac = route::router_mac_for(
                iface,
                medium,
                "ipv6",
                f.router_mac.map(|m| m.0),
                probe_dst(false),
            )
            .context("network.ipv6.router_mac")?;
            Some(FamilyConfig {
                addr: SocketAddr::new(IpAddr::V6(ip), f.port),
                router_mac,
            })
        }
        _ => None,
    };
    // Every server (several: `server.addr` array / `[[server.servers]]`), in the family of the first,
    // each with the next hop towards it.
    let mut servers = Vec::new();
    if let (Some(first), true) = (server_addr, cfg.servers.len() > 1) {
        let (v4, v6) = (cfg.network.ipv4.is_some(), cfg.network.ipv6.is_some());
        for (i, e) in cfg.servers.iter().enumerate() {
            let addr = resolve_server(&e.addr, v4, v6)
                .with_context(|| format!("server.addr[{i}] {}", e.addr))?;
            if addr.is_ipv4() != first.is_ipv4() {
                bail!("server.addr[{i}] {addr}: every server must be in the address family of the first ({first})");
            }
            let (name, configured_mac) = if addr.is_ipv4() {
                ("ipv4", cfg.network.ipv4.as_ref().and_then(|f| f.router_mac))
            } else {
                ("ipv6", cfg.network.ipv6.as_ref().and_then(|f| f.router_mac))
            };
            let router_mac =
                route::router_mac_for(iface, medium, name, configured_mac.map(|m| m.0), addr.ip())
                    .with_context(|| format!("network.{name}.router_mac (server {addr})"))?;
            servers.push(ServerTarget {
                addr,
                weight: e.weight,
                router_mac,
            });
        }
    }
    if let Some(s) = server_addr.filter(|_| ipv4.is_none() && ipv6.is_none()) {
        let fam = if s.is_ipv4() { "ipv4" } else { "ipv6" };
        bail!("server.addr {s} needs network.{fam}, which is not configured");
    }
    if ipv4.is_none() && ipv6.is_none() {
        bail!("network: neither ipv4 nor ipv6 is configured");
    }
    let k = &cfg.transport.kcp;
    let guard = k.guard.then(|| {
        (
            GuardConfig {
                format: k.guard_format,
                bind: k.guard_bind,
                magic: k.guard_magic,
                window_secs: u64::from(k.guard_window),
                skew: u64::from(k.guard_skew),
            },
            match guard_noise_key(cfg) {
                Some(text) => text,
                None => k.key.clone(),
            },
        )
    });
    let noise = noise_wire_config(cfg)?;
    let lim = |l: Option<u32>| l.map(|v| v as usize);
    Ok(WorkerConfig {
        role,
        session: session_config(cfg)?,
        local_mac,
        ipv4,
        ipv6,
        server_addr,
        servers,
        conn: cfg.transport.conn.max(1) as usize,
        local_flags: flags(&cfg.network.local_flag, "network.tcp.local_flag")?,
        remote_flags: flags(&cfg.network.remote_flag, "network.tcp.remote_flag")?,
        guard,
        probe_response: cfg.io.probe_response,
        limits: Limits {
            max_sessions: lim(k.max_sessions),
            max_streams_total: lim(k.max_streams_total),
            max_streams_per_session: lim(k.max_streams_per_session),
        },
        header_timeout: cfg.header_timeout(),
        rotate: cfg.transport.rotate,
        reverse: std::sync::Arc::new(super::reverse::ReverseConfig::registered(
            cfg.reverse.clone(),
            cfg.reverse_allow.clone(),
        )),
        targets: std::sync::Arc::new(cfg.targets.clone()),
        replay: None,
        noise,
    })
}

/// With the noise wire, the guard prefix is keyed by the server's static public key (both ends know it;
/// there is no `transport.kcp.key`). `None` without the noise wire.
fn guard_noise_key(cfg: &Config) -> Option<String> {
    let n = cfg.transport.noise.as_ref()?;
    match cfg.role {
        CfgRole::Client => n.server_public_key.map(|k| k.to_text()),
        CfgRole::Server => n.keys().ok().map(|k| k.private.public_key().to_text()),
    }
}

/// The noise wire's handshake settings (the key files are read here), `None` without it.
fn noise_wire_config(cfg: &Config) -> anyhow::Result<Option<super::noise::NoiseWireConfig>> {
    use crate::proto::noise::{InitiatorConfig, RateLimits, ResponderConfig, Timers};
    let Some(n) = cfg.transport.noise.as_ref() else {
        return Ok(None);
    };
    let keys = n.keys()?;
    Ok(Some(match cfg.role {
        CfgRole::Client => super::noise::NoiseWireConfig::Client(InitiatorConfig {
            private: keys.private,
            server: n
                .server_public_key
                .context("transport.noise.server_public_key is required on a client")?,
            psk: keys.psk,
            timers: Timers::default(),
        }),
        CfgRole::Server => super::noise::NoiseWireConfig::Server(ResponderConfig {
            private: keys.private,
            allowed: n.client_public_keys.clone(),
            psk: keys.psk,
            timers: Timers::default(),
            rate: RateLimits::default(),
        }),
    }))
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

/// The metrics role label of `cfg`.
pub fn role_label(cfg: &Config) -> RoleLabel {
    match cfg.role {
        CfgRole::Client => RoleLabel::Client,
        CfgRole::Server => RoleLabel::Server,
    }
}

/// The ops HTTP servers of a daemon (`metrics.listen`; `debug.pprof` with the profile endpoints). Each
/// runs on its own thread; [`OpsServers::shutdown`] (or dropping) stops and joins them.
pub struct OpsServers {
    servers: Vec<(SocketAddr, Arc<OpsState>, Option<JoinHandle<()>>)>,
}

impl OpsServers {
    /// Starts the servers `cfg` asks for, reading `hub`. `debug.pprof` must be a loopback address.
    pub fn start(cfg: &Config, hub: &Arc<MetricsHub>) -> anyhow::Result<Self> {
        let mut me = OpsServers {
            servers: Vec::new(),
        };
        if let Some(hp) = &cfg.metrics_listen {
            let addr = hp
                .resolve()
                .with_context(|| format!("metrics.listen {hp}"))?;
            let state = Arc::new(hub.ops_state());
            let (bound, h) = spawn_ops_thread(addr, state.clone())
                .with_context(|| format!("metrics.listen {hp}"))?;
            info!(addr = %bound, "metrics, /healthz and /readyz served");
            me.servers.push((bound, state, Some(h)));
        }
        if let Some(hp) = &cfg.debug_pprof {
            let addr = hp.resolve().with_context(|| format!("debug.pprof {hp}"))?;
            if !addr.ip().is_loopback() {
                bail!("debug.pprof {hp}: profiles are only served on a loopback address");
            }
            let state = Arc::new(hub.ops_state().with_pprof(true));
            let (bound, h) = spawn_ops_thread(addr, state.clone())
                .with_context(|| format!("debug.pprof {hp}"))?;
            info!(addr = %bound, "CPU and heap profiles served under /debug/pprof/");
            me.servers.push((bound, state, Some(h)));
        }
        Ok(me)
    }

    /// The bound addresses (metrics first, then pprof, as configured).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.0).collect()
    }

    /// Stops every server and waits for its thread.
    pub fn shutdown(&mut self) {
        for (_, state, _) in &self.servers {
            state.shutdown();
        }
        for (addr, _, h) in &mut self.servers {
            if let Some(h) = h.take() {
                if h.join().is_err() {
                    warn!(%addr, "ops server thread panicked");
                }
            }
        }
    }
}

impl Drop for OpsServers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The iptables rules the host of `wcfg` needs so its kernel neither tracks nor resets tunnel packets
/// (spec §2.4). A client with a fixed local port gets rules for that port; with a random port (0) the
/// rules match any local port towards `server.addr`, so that sessions re-dialled on new ports stay covered.
pub fn firewall_role(wcfg: &WorkerConfig) -> Option<FirewallRole> {
    match wcfg.role {
        Role::Server => Some(FirewallRole::Server {
            port: wcfg.local_port(),
            ipv4: wcfg.ipv4.is_some(),
            ipv6: wcfg.ipv6.is_some(),
        }),
        Role::Client => {
            let server = wcfg.server_addr?;
            let port = wcfg.local_port();
            let local_ports = if port == 0 { Vec::new() } else { vec![port] };
            Some(FirewallRole::Client {
                server,
                local_ports,
            })
        }
    }
}

/// [`firewall_role`], plus the client rules towards every further server (several servers).
pub fn firewall_roles(wcfg: &WorkerConfig) -> Vec<FirewallRole> {
    let mut out: Vec<FirewallRole> = firewall_role(wcfg).into_iter().collect();
    if let (Role::Client, Some(first)) = (wcfg.role, wcfg.server_addr) {
        let port = wcfg.local_port();
        for t in wcfg.servers.iter().filter(|t| t.addr != first) {
            out.push(FirewallRole::Client {
                server: t.addr,
                local_ports: if port == 0 { Vec::new() } else { vec![port] },
            });
        }
    }
    out
}

/// Watches a rejection counter (crypto failures, or guard drops: the guard is keyed by the same key) for
/// the symptoms of a wrong `transport.kcp.key` / `block`: rejections rising while nothing ever
/// authenticated (client) or while no session exists and none opened (server). Core keeps no per-peer
/// counters, so this works on the worker's totals. Says when to warn, at most once per
/// [`CryptoWatch::EVERY`].
#[derive(Debug, Default)]
pub struct CryptoWatch {
    last_failures: u64,
    last_opens: u64,
    authenticated: bool,
    last_warn: Option<Instant>,
}

impl CryptoWatch {
    /// Shortest time between two warnings.
    pub const EVERY: Duration = Duration::from_secs(5);

    /// Feeds one observation; returns the failure total to report when a warning is due.
    /// `authenticated` = some datagram passed the crypto check since the worker started (client);
    /// `live_sessions` / `sessions_opened` are the server's figures.
    pub fn observe(
        &mut self,
        role: Role,
        failures: u64,
        authenticated: bool,
        live_sessions: usize,
        sessions_opened: u64,
        now: Instant,
    ) -> Option<u64> {
        self.authenticated |= authenticated;
        let rising = failures > self.last_failures;
        let opened = sessions_opened > self.last_opens;
        self.last_failures = failures;
        self.last_opens = sessions_opened;
        let suspicious = match role {
            Role::Client => rising && !self.authenticated,
            Role::Server => rising && live_sessions == 0 && !opened,
        };
        if !suspicious {
            return None;
        }
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            return None;
        }
        self.last_warn = Some(now);
        Some(failures)
    }
}

/// Builds this worker's [`WorkerSnapshot`]s: the core's counters plus per-session figures. KCP
/// retransmission counters live in the sessions, so the totals of sessions that are gone are kept here
/// (as last seen) to keep the exported counters monotonic.
struct Publisher {
    role: Role,
    server: Option<SocketAddr>,
    /// Last seen retransmission counters of every live session, by session id.
    seen: HashMap<u64, KcpRetrans>,
    /// Sum over sessions that are gone.
    retired: KcpRetrans,
    /// Wrong-key symptoms: crypto failures, and guard drops (the guard is keyed by the same key).
    watch: CryptoWatch,
    guard_watch: CryptoWatch,
    /// Bad-source counts at the last warning (server: which sources keep failing).
    bad_seen: HashMap<SocketAddr, u64>,
    last_bad_warn: Option<Instant>,
    /// Client: since when no session has been live (for the "nothing heard from the server" warning).
    silent_since: Option<Instant>,
    last_silent_warn: Option<Instant>,
}

fn add_retrans(a: &mut KcpRetrans, b: &KcpRetrans) {
    a.timeout += b.timeout;
    a.fast += b.fast;
    a.early += b.early;
}

impl Publisher {
    fn new(role: Role, server: Option<SocketAddr>) -> Self {
        Publisher {
            role,
            server,
            seen: HashMap::new(),
            retired: KcpRetrans::default(),
            watch: CryptoWatch::default(),
            guard_watch: CryptoWatch::default(),
            bad_seen: HashMap::new(),
            last_bad_warn: None,
            silent_since: None,
            last_silent_warn: None,
        }
    }

    fn snapshot(&mut self, c: &Core) -> WorkerSnapshot {
        // Once per publish: for AF_XDP links this reads the sockets' kernel statistics (a syscall each).
        let io = c.io_stats();
        let mut snap = WorkerSnapshot::from_daemon(&c.stats(), &io);
        snap.sessions = c.session_count() as u64;
        snap.live_sessions = c.live_sessions(c.config().session.smux.keepalive_timeout_ms) as u64;
        snap.streams = c.stream_count() as u64;
        if c.config().role == Role::Client {
            snap.servers = c.client.server_stats();
        }
        if c.uses_shared_links() {
            snap.afxdp = Some(crate::ops::AfXdpStats {
                rx_dropped: io.xsk_rx_dropped,
                rx_ring_full: io.xsk_rx_ring_full,
                fill_ring_empty: io.xsk_fill_ring_empty,
                tx_invalid_descs: io.xsk_tx_invalid_descs,
            });
        }
        let mut live = KcpRetrans::default();
        let mut authenticated = false;
        let mut srtt = Vec::with_capacity(c.sessions().len());
        for (&id, e) in c.sessions() {
            let k = e.session.kcp().stats();
            let r = KcpRetrans {
                timeout: k.lost_segs,
                fast: k.fast_retrans_segs,
                early: k.early_retrans_segs,
            };
            add_retrans(&mut live, &r);
            self.seen.insert(id, r);
            srtt.push(f64::from(e.session.kcp().srtt()) / 1000.0);
            authenticated |= e.session.stats().datagrams_in > 0;
        }
        let retired = &mut self.retired;
        self.seen.retain(|id, r| {
            let keep = c.sessions().contains_key(id);
            if !keep {
                add_retrans(retired, r);
            }
            keep
        });
        add_retrans(&mut live, &self.retired);
        snap.kcp_retrans = live;
        snap.srtt_seconds = srtt;
        let now = Instant::now();
        let (live_sessions, opened) = (c.session_count(), c.stats().sessions_opened);
        let who = || match self.server {
            Some(s) => s.to_string(),
            None => "new clients".to_string(),
        };
        let crypto = c.stats().rx_crypto_failures;
        if let Some(n) =
            self.watch
                .observe(self.role, crypto, authenticated, live_sessions, opened, now)
        {
            warn!("datagrams from {} failed the crypto check ({n} so far): wrong transport.kcp.key or block?", who());
        }
        let guard = c.stats().rx_guard_drops;
        if let Some(n) =
            self.guard_watch
                .observe(self.role, guard, authenticated, live_sessions, opened, now)
        {
            let key = if c.config().noise.is_some() {
                // With the noise wire the guard is keyed by the server's static public key.
                "another server key (transport.noise.server_public_key / private_key)"
            } else {
                "wrong transport.kcp.key"
            };
            warn!(
                "datagrams from {} failed the guard check ({n} so far): {key}, \
                 transport.kcp.guard on at one end only, another guard_format or guard_bind, or \
                 guard_bind = \"4tuple\" through a NAT?",
                who()
            );
        }
        self.warn_bad_sources(c, now);
        self.warn_silence(c, snap.live_sessions, now);
        snap
    }

    /// Server (or any role with the guard on): sources whose datagrams keep failing the guard or crypto
    /// check while they have no session: the signature of a peer with another key or guard setting.
    fn warn_bad_sources(&mut self, c: &Core, now: Instant) {
        let rising: Vec<(SocketAddr, u64)> = c
            .bad_sources()
            .iter()
            .filter(|(a, n)| self.bad_seen.get(*a).is_none_or(|seen| **n > *seen))
            .filter(|(a, _)| !c.sessions().values().any(|e| e.peer() == **a))
            .map(|(a, n)| (*a, *n))
            .collect();
        if rising.is_empty()
            || self
                .last_bad_warn
                .is_some_and(|t| now.duration_since(t) < CryptoWatch::EVERY)
        {
            return;
        }
        self.last_bad_warn = Some(now);
        let mut list: Vec<String> = rising
            .iter()
            .take(4)
            .map(|(a, n)| format!("{a} ({n})"))
            .collect();
        if rising.len() > 4 {
            list.push(format!("and {} more", rising.len() - 4));
        }
        warn!(
            "datagrams from {} failed the guard/crypto check with no session: a peer using another \
             transport.kcp.key, block or guard setting?",
            list.join(", ")
        );
        for (a, n) in rising {
            self.bad_seen.insert(a, n);
        }
    }

    /// Client: no session has authenticated a datagram for a while.
    fn warn_silence(&mut self, c: &Core, live: u64, now: Instant) {
        const AFTER: Duration = Duration::from_secs(10);
        const EVERY: Duration = Duration::from_secs(30);
        // Sessions that time out are re-dialled, so the count may briefly be 0: what matters is that none
        // has been live for a while.
        if self.role != Role::Client || live > 0 {
            self.silent_since = None;
            return;
        }
        let since = *self.silent_since.get_or_insert(now);
        if now.duration_since(since) < AFTER
            || self
                .last_silent_warn
                .is_some_and(|t| now.duration_since(t) < EVERY)
        {
            return;
        }
        self.last_silent_warn = Some(now);
        let server = self
            .server
            .map(|s| s.to_string())
            .unwrap_or_else(|| "the server".into());
        warn!(
            "no datagram from {server} has passed the guard/crypto check for {} s ({} sent): server down or \
             unreachable, or it uses another transport.kcp.key, block or guard setting",
            now.duration_since(since).as_secs(),
            c.stats().tx_datagrams
        );
    }
}

/// Publishes the worker's snapshot into `hub` slot `index` every [`PUBLISH_INTERVAL_MS`] (a local task).
pub async fn publish_metrics(shared: Shared, hub: Arc<MetricsHub>, index: usize) {
    publish_metrics_until(shared, hub, index, std::future::pending()).await
}

/// Like [`publish_metrics`], until `stop` completes; then publishes the final snapshot (same publisher,
/// so the exported counters stay monotonic) and returns.
pub async fn publish_metrics_until(
    shared: Shared,
    hub: Arc<MetricsHub>,
    index: usize,
    stop: impl std::future::Future<Output = ()>,
) {
    let (role, server) = {
        let c = shared.borrow();
        (c.config().role, c.config().server_addr)
    };
    let mut p = Publisher::new(role, server);
    let mut tick = tokio::time::interval(Duration::from_millis(PUBLISH_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => {
                hub.publish(index, p.snapshot(&shared.borrow()));
                return;
            }
        }
        let snap = p.snapshot(&shared.borrow());
        hub.publish(index, snap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::firewall;

    fn cfg(text: &str) -> Config {
        Config::from_toml_str(text).expect("test config").config
    }

    const KEY: &str = "setup-test-key";

    fn server_cfg() -> Config {
        cfg(&format!(
            "role = \"server\"\n[listen]\naddr = \":9999\"\n[network]\ninterface = \"lo\"\n\
             [network.ipv4]\naddr = \"127.0.0.1:9999\"\nrouter_mac = \"02:00:00:00:00:01\"\n\
             [transport]\nprotocol = \"kcp\"\n[transport.kcp]\nkey = \"{KEY}\"\n"
        ))
    }

    fn client_cfg(port: u16) -> Config {
        cfg(&format!(
            "role = \"client\"\n[server]\naddr = \"127.0.0.2:9999\"\n[[socks5]]\nlisten = \"127.0.0.1:1080\"\n\
             [network]\ninterface = \"lo\"\n[network.ipv4]\naddr = \"127.0.0.1:{port}\"\n\
             router_mac = \"02:00:00:00:00:01\"\n[transport]\nprotocol = \"kcp\"\n[transport.kcp]\nkey = \"{KEY}\"\n"
        ))
    }

    #[test]
    fn firewall_rules_follow_the_role_and_ports() {
        let s = worker_config(&server_cfg(), "lo").expect("server worker config");
        assert_eq!(
            firewall_role(&s),
            Some(FirewallRole::Server {
                port: 9999,
                ipv4: true,
                ipv6: false
            })
        );
        let rules: Vec<String> = firewall::rules(&firewall_role(&s).unwrap())
            .iter()
            .map(|r| r.to_shell())
            .collect();
        assert_eq!(rules.len(), 4);
        assert!(rules.iter().all(|r| r.contains("9999")), "{rules:?}");

        let server: SocketAddr = "127.0.0.2:9999".parse().unwrap();
        let c = worker_config(&client_cfg(0), "lo").expect("client worker config");
        assert_eq!(
            firewall_role(&c),
            Some(FirewallRole::Client {
                server,
                local_ports: vec![]
            })
        );
        let c = worker_config(&client_cfg(40000), "lo").expect("client worker config");
        assert_eq!(
            firewall_role(&c),
            Some(FirewallRole::Client {
                server,
                local_ports: vec![40000]
            })
        );
    }

    #[test]
    fn a_dual_stack_client_uses_only_the_server_family() {
        // The IPv6 table asks for kernel lookups that cannot succeed on lo (no global IPv6 address, no
        // route to a public one): a client dialing IPv4 must not need them.
        let text = format!(
            "role = \"client\"\n[server]\naddr = \"127.0.0.2:9999\"\n[[socks5]]\nlisten = \"127.0.0.1:1080\"\n\
             [network]\ninterface = \"lo\"\n[network.ipv4]\naddr = \"127.0.0.1:0\"\n\
             router_mac = \"02:00:00:00:00:01\"\n[network.ipv6]\n\
             [transport]\nprotocol = \"kcp\"\n[transport.kcp]\nkey = \"{KEY}\"\n"
        );
        let c = worker_config(&cfg(&text), "lo").expect("dual-stack client worker config");
        assert_eq!(c.ipv4.map(|f| f.addr), Some("127.0.0.1:0".parse().unwrap()));
        assert!(c.ipv6.is_none(), "the unused family is left out");
        // A server keeps both families.
        let text = format!(
            "role = \"server\"\n[listen]\naddr = \":9999\"\n[network]\ninterface = \"lo\"\n\
             [network.ipv4]\naddr = \"127.0.0.1:9999\"\nrouter_mac = \"02:00:00:00:00:01\"\n\
             [network.ipv6]\naddr = \"[::1]:9999\"\nrouter_mac = \"02:00:00:00:00:01\"\n\
             [transport]\nprotocol = \"kcp\"\n[transport.kcp]\nkey = \"{KEY}\"\n"
        );
        let s = worker_config(&cfg(&text), "lo").expect("dual-stack server worker config");
        assert!(s.ipv4.is_some() && s.ipv6.is_some());
    }

    #[test]
    fn crypto_watch_client_warns_until_something_authenticates() {
        let t0 = Instant::now();
        let mut w = CryptoWatch::default();
        assert_eq!(
            w.observe(Role::Client, 0, false, 1, 1, t0),
            None,
            "no failures yet"
        );
        assert_eq!(w.observe(Role::Client, 3, false, 1, 1, t0), Some(3));
        // Rising again within the rate-limit window: silent; after it: warns with the new total.
        assert_eq!(
            w.observe(Role::Client, 7, false, 1, 1, t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            w.observe(Role::Client, 9, false, 1, 1, t0 + CryptoWatch::EVERY),
            Some(9)
        );
        // Not rising: silent even after the window.
        assert_eq!(
            w.observe(Role::Client, 9, false, 1, 1, t0 + 3 * CryptoWatch::EVERY),
            None
        );
        // Once a datagram authenticated, later failures (e.g. junk) are not blamed on the key.
        assert_eq!(
            w.observe(Role::Client, 9, true, 1, 1, t0 + 4 * CryptoWatch::EVERY),
            None
        );
        assert_eq!(
            w.observe(Role::Client, 20, false, 1, 1, t0 + 6 * CryptoWatch::EVERY),
            None
        );
    }

    #[test]
    fn crypto_watch_server_warns_only_without_sessions() {
        let t0 = Instant::now();
        let mut w = CryptoWatch::default();
        assert_eq!(w.observe(Role::Server, 4, false, 0, 0, t0), Some(4));
        let t1 = t0 + CryptoWatch::EVERY;
        // A session opened in this interval: the failures may be someone else's junk, not the key.
        assert_eq!(w.observe(Role::Server, 6, false, 0, 1, t1), None);
        // Live sessions: silent.
        assert_eq!(
            w.observe(Role::Server, 8, false, 1, 1, t1 + CryptoWatch::EVERY),
            None
        );
        // Back to no session, failures rising, nothing opened: warns.
        assert_eq!(
            w.observe(Role::Server, 10, false, 0, 1, t1 + 2 * CryptoWatch::EVERY),
            Some(10)
        );
    }
}
