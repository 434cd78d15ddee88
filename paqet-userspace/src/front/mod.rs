//! Client front ends: local listeners that carry their traffic through a [`crate::worker::Tunnel`].
//!
//! Every front end runs on the worker's `LocalSet` and only needs the generic `Tunnel` API:
//! [`Tunnel::open_tcp`](crate::worker::Tunnel::open_tcp) for a byte stream to `host:port` (resolved by the
//! server) and [`Tunnel::open_udp`](crate::worker::Tunnel::open_udp) for a datagram stream.
//! - [`forward`]: fixed TCP and UDP port forwards (spec §4).
pub mod dial;
pub mod forward;
pub mod http;
pub mod socks5;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

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
