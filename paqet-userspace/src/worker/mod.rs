//! The daemon core: one worker = one thread running a tokio current-thread runtime with a `LocalSet`.
//!
//! The worker owns its packet-I/O backends ([`crate::io::PacketIo`]), every paqet [`Session`] riding on them,
//! their timers and the stream tasks. Sessions are sans-IO ([`crate::proto::session`]); the worker feeds them
//! received TCP payloads, drains their datagrams into envelopes ([`crate::wire::envelope::EnvelopeBuilder`])
//! and turns their smux events into task wake-ups.
//!
//! - [`core`]: the shared state (`Rc<RefCell<Core>>`), RX/TX paths, timers; it feeds received payloads to
//!   the sans-IO [`Endpoint`] (session table, demultiplexing, conv learning, replacement, guard check,
//!   limits) and acts on its decisions.
//! - [`stream`]: [`TunnelStream`], an `AsyncRead + AsyncWrite` smux stream (plus datagram calls for UDP).
//! - [`server`]: per-stream handlers of the server role (PING, PTCPF, PTCP, PUDP).
//! - [`client`]: the client role's sessions and the [`Tunnel`] handle the front ends use.
//! - `limits`: the rate-limited log line of a refusal by a server limit (naming the key and its value).
//! - [`guard`]: the optional packet guard prefix (spec §5; now [`crate::proto::guard`]).
//! - [`daemon`]: the assembly: configuration → data plane (pcap: one worker; XDP: one per RX queue) →
//!   worker threads, front ends, ops servers, signals and shutdown, the same code for every mode.
//! - [`setup`]: configuration resolution ([`setup::worker_config`]), ops servers, metrics publisher.
//! - [`xdp`]: the XDP plane's bring-up, cross-worker routing and per-queue worker start.
//!
//! [`Session`]: crate::proto::session::Session
//! [`Endpoint`]: crate::proto::endpoint::Endpoint
pub mod client;
pub mod core;
pub mod daemon;
mod limits;
pub mod noise;
pub mod reverse;
pub mod server;
pub mod setup;
pub mod stream;
pub mod xdp;

use std::net::SocketAddr;
use std::time::Duration;

use crate::io::PacketIo;
use crate::proto::session::{Role, SessionConfig};
use crate::wire::envelope::TcpFlags;

pub use crate::proto::endpoint::Limits;
pub use crate::proto::guard;

pub use self::client::{Tunnel, TunnelError};
pub use self::core::{DaemonStats, Shared};
pub use self::guard::{Guard, GuardConfig};
pub use self::stream::TunnelStream;

/// Upstream's dial timeout for PTCP/PUDP targets (spec §3.8).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(8);
/// Largest UDP datagram carried in one smux frame (spec §3.8).
pub const MAX_UDP_DATAGRAM: usize = 4096;

/// One address family of the local interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyConfig {
    /// Local address; port 0 on a client = random port 32768..=65535 per session.
    pub addr: SocketAddr,
    /// Ethernet destination of every frame of this family (next hop MAC).
    pub router_mac: [u8; 6],
}

/// Client: one server, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerTarget {
    pub addr: SocketAddr,
    /// Relative share of `transport.conn` sessions.
    pub weight: u32,
    /// Next-hop MAC towards it.
    pub router_mac: [u8; 6],
}

impl WorkerConfig {
    /// Client: the servers sessions are placed on (at least `server_addr` when set).
    pub fn server_targets(&self) -> Vec<ServerTarget> {
        if !self.servers.is_empty() {
            return self.servers.clone();
        }
        self.server_addr
            .into_iter()
            .filter_map(|addr| {
                let fam = if addr.is_ipv4() { self.ipv4 } else { self.ipv6 }?;
                Some(ServerTarget {
                    addr,
                    weight: 1,
                    router_mac: fam.router_mac,
                })
            })
            .collect()
    }

    /// Client: whether `src` is one of the configured servers.
    pub fn is_server(&self, src: SocketAddr) -> bool {
        self.server_addr == Some(src) || self.servers.iter().any(|s| s.addr == src)
    }
}

/// Everything a worker needs, resolved from the configuration (addresses and MACs already known).
#[derive(Clone)]
pub struct WorkerConfig {
    pub role: Role,
    /// Session settings (crypto, FEC, KCP, smux, mtu).
    pub session: SessionConfig,
    /// MAC of the local interface (Ethernet source).
    pub local_mac: [u8; 6],
    pub ipv4: Option<FamilyConfig>,
    pub ipv6: Option<FamilyConfig>,
    /// Client only: the (first) server's tunnel address.
    pub server_addr: Option<SocketAddr>,
    /// Client only: every server (`server.addr` array / `[[server.servers]]`) with its weight and next-hop
    /// MAC; empty = just `server_addr` (weight 1, its family's `router_mac`).
    pub servers: Vec<ServerTarget>,
    /// Client only: number of parallel sessions (`transport.conn`).
    pub conn: usize,
    /// Flags this side puts on its packets (`network.tcp.local_flag`).
    pub local_flags: Vec<TcpFlags>,
    /// Client only: flags the server should use towards us (`network.tcp.remote_flag`, sent as PTCPF).
    pub remote_flags: Vec<TcpFlags>,
    /// Packet guard (None = off: wire exactly upstream's).
    pub guard: Option<(GuardConfig, String)>,
    /// XDP mode: the answer to frames to the tunnel without a tunnel datagram (`io.probe_response`).
    pub probe_response: crate::proto::guard::ProbeResponse,
    /// Server limits.
    pub limits: Limits,
    /// Server: deadline for reading the per-stream header.
    pub header_timeout: Duration,
    /// Client: session rotation (`transport.rotate.*`; off by default).
    pub rotate: crate::config::RotateConfig,
    /// Server: dial-target policy (`server.allow` / `server.deny`).
    pub targets: std::sync::Arc<crate::config::targets::TargetPolicy>,
    /// Server: the replay filter shared by the daemon's workers (`None`: each endpoint keeps its own, in
    /// memory).
    pub replay: Option<std::sync::Arc<dyn crate::proto::replay::ReplayGate>>,
    /// The authenticated noise wire (`transport.kcp.block = "noise"`); `None`: kcp-go's crypto, upstream's
    /// wire.
    pub noise: Option<noise::NoiseWireConfig>,
    /// Reverse forwards: the client's `[[reverse]]`, the server's `server.reverse_allow`.
    pub reverse: std::sync::Arc<reverse::ReverseConfig>,
}

impl WorkerConfig {
    /// The configured family entry for `ip`'s family.
    pub fn family_for(&self, ip: std::net::IpAddr) -> Option<&FamilyConfig> {
        if ip.is_ipv4() {
            self.ipv4.as_ref()
        } else {
            self.ipv6.as_ref()
        }
    }

    /// The local tunnel port (server: the listening port; client: the explicit port or 0).
    pub fn local_port(&self) -> u16 {
        self.ipv4.or(self.ipv6).map(|f| f.addr.port()).unwrap_or(0)
    }
}

/// Opens a packet-I/O backend that captures frames for local TCP port `port`.
pub type IoFactory = Box<dyn FnMut(u16) -> std::io::Result<Box<dyn PacketIo>>>;

pub use self::server::copy_until_either_ends;

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("session settings: {0}")]
    Config(#[from] crate::proto::session::SessionConfigError),
    #[error("client start: {0}")]
    Client(#[from] TunnelError),
    #[error("server start: {0}")]
    Server(#[from] std::io::Error),
}

/// A started worker: its state and, on a client, the tunnel handle for the front ends.
pub struct Started {
    pub shared: Shared,
    pub tunnel: Option<Tunnel>,
}

/// Starts a worker on the current tokio `LocalSet` (call inside `LocalSet::run_until` or a local task):
/// opens the link(s) through `factory`, spawns the RX, driver and (server) accept tasks, and on a client
/// dials all `transport.conn` sessions (a failure here is fatal, as upstream).
pub fn start(cfg: WorkerConfig, factory: IoFactory) -> Result<Started, StartError> {
    let role = cfg.role;
    let shared = self::core::Core::new(cfg)?;
    tokio::task::spawn_local(self::core::drive(shared.clone()));
    match role {
        Role::Server => {
            self::server::start(&shared, factory)?;
            Ok(Started {
                shared,
                tunnel: None,
            })
        }
        Role::Client => {
            self::client::start(&shared, factory)?;
            let tunnel = Tunnel::new(shared.clone());
            Ok(Started {
                shared,
                tunnel: Some(tunnel),
            })
        }
    }
}

#[cfg(test)]
mod tests;
