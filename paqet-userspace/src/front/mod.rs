//! Client front ends: local listeners that carry their traffic through a [`crate::worker::Tunnel`].
//!
//! Every front end runs on the worker's `LocalSet` and only needs the generic `Tunnel` API:
//! [`Tunnel::open_tcp`](crate::worker::Tunnel::open_tcp) for a byte stream to `host:port` (resolved by the
//! server) and [`Tunnel::open_udp`](crate::worker::Tunnel::open_udp) for a datagram stream.
//! - [`forward`]: fixed TCP and UDP port forwards (spec §4).
//! - [`socks5`], [`http`]: the SOCKS5 and HTTP proxies.
//!
//! [`start`] binds and spawns every front end a configuration lists: the daemon assembly
//! ([`crate::worker::daemon`]) calls it on each worker that runs client sessions, in every data-path mode.
pub mod dial;
pub mod forward;
pub mod http;
pub mod socks5;

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::{Config, ForwardProtocol, HostPort};
use crate::worker::Tunnel;

/// Where a worker's front ends listen when a daemon runs several workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Several workers listen on the same TCP addresses (`SO_REUSEPORT`: the kernel spreads new
    /// connections over them). Off with one worker, so an address already in use is an error.
    pub shared: bool,
    /// This worker serves the UDP forwards (exactly one worker does: a UDP source's state, its stream,
    /// must stay in one worker).
    pub udp: bool,
}

impl Placement {
    /// The placement of worker `index` of `workers`.
    pub fn of(index: usize, workers: usize) -> Self {
        Placement {
            shared: workers > 1,
            udp: index == 0,
        }
    }
}

/// Backlog asked for by the front ends' listeners: the kernel caps it at `net.core.somaxconn`, which is
/// what Go's listeners (upstream paqet) get too, so a burst of connections (a browser opening hundreds at
/// once) is not cut by a smaller queue than upstream's.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// A TCP listener on `addr` (backlog [`LISTEN_BACKLOG`], `SO_REUSEADDR`); with `shared` also
/// `SO_REUSEPORT`.
pub fn bind_tcp(addr: SocketAddr, shared: bool) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    if shared {
        s.set_reuseport(true)?;
    }
    s.bind(addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
    s.listen(LISTEN_BACKLOG)
}

/// Binds and spawns (on the current `LocalSet`) the client front ends `cfg` lists: TCP/UDP forwards,
/// SOCKS5 and HTTP proxy listeners, all dialling through `tunnel`, placed as `at` says. A listener that
/// cannot bind is an error naming its key.
pub async fn start(cfg: &Config, tunnel: Tunnel, at: Placement) -> anyhow::Result<()> {
    for (i, f) in cfg.forward.iter().enumerate() {
        let key = format!("forward[{i}].listen");
        let (host, port) = (f.target.host.clone(), f.target.port);
        match f.protocol {
            ForwardProtocol::Tcp => {
                let l = listen_on(&key, &f.listen, at.shared)?;
                let fw = forward::TcpForward::new(l, host, port);
                tokio::task::spawn_local(fw.run(tunnel.clone()));
            }
            ForwardProtocol::Udp if !at.udp => {}
            ForwardProtocol::Udp => {
                let listen = resolve(&key, &f.listen)?;
                let fw = forward::UdpForward::bind(listen, host, port)
                    .await
                    .with_context(|| format!("{key} {listen}"))?;
                tokio::task::spawn_local(fw.run(tunnel.clone()));
            }
        }
    }
    let dialer = Rc::new(tunnel);
    for (i, s) in cfg.socks5.iter().enumerate() {
        let l = listen_on(&format!("socks5[{i}].listen"), &s.listen, at.shared)?;
        let sc = socks5::Socks5Config {
            username: s.username.clone(),
            password: s.password.clone(),
        };
        tokio::task::spawn_local(socks5::serve(l, sc, dialer.clone()));
    }
    for (i, h) in cfg.http.iter().enumerate() {
        let l = listen_on(&format!("http[{i}].listen"), &h.listen, at.shared)?;
        let hc = http::HttpConfig {
            username: h.username.clone().unwrap_or_default(),
            password: h.password.clone().unwrap_or_default(),
        };
        tokio::task::spawn_local(http::serve(l, hc, dialer.clone()));
    }
    Ok(())
}

/// `hp` resolved, an error naming the config `key` otherwise.
fn resolve(key: &str, hp: &HostPort) -> anyhow::Result<SocketAddr> {
    hp.resolve().with_context(|| format!("{key} {hp}"))
}

/// A TCP listener on the configured `hp` ([`bind_tcp`]), errors naming the config `key`.
fn listen_on(key: &str, hp: &HostPort, shared: bool) -> anyhow::Result<TcpListener> {
    let addr = resolve(key, hp)?;
    bind_tcp(addr, shared).with_context(|| format!("{key} {addr}"))
}

/// Accepts connections on `listener` until the task is dropped: sets `TCP_NODELAY` on each and runs
/// `serve(conn, from)` on a local task of its own. Accept errors (e.g. out of descriptors) are logged under
/// `what` and retried after 50 ms, so one bad moment never ends the listener.
pub(crate) async fn accept_loop<F, Fut>(listener: &TcpListener, what: &'static str, mut serve: F)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    loop {
        match listener.accept().await {
            Ok((conn, from)) => {
                let _ = conn.set_nodelay(true);
                tokio::task::spawn_local(serve(conn, from));
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Splits `host:port` (`[v6]:port` accepted) into the host string carried in the paqet header (IPv6 without
/// brackets, spec §3.7) and the port.
pub fn split_target(target: &str) -> Result<(String, u16), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("target {target:?}: expected host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("target {target:?}: port must be 1..=65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return Err(format!("target {target:?}: host must be 1..=253 bytes"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::split_target;

    #[test]
    fn targets_split_like_upstream() {
        assert_eq!(
            split_target("10.0.0.5:80").unwrap(),
            ("10.0.0.5".into(), 80)
        );
        assert_eq!(
            split_target("example.com:443").unwrap(),
            ("example.com".into(), 443)
        );
        assert_eq!(
            split_target("[2001:db8::1]:53").unwrap(),
            ("2001:db8::1".into(), 53)
        );
        assert!(split_target("example.com").is_err());
        assert!(split_target("example.com:0").is_err());
        assert!(split_target(":80").is_err());
    }
}
