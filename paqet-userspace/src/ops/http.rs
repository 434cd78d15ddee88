//! A tiny HTTP/1.1 server for the ops endpoints: one request per connection, answered, then closed.
//!
//! Routes: `GET /metrics`, `GET /healthz`, `GET /readyz`, and when profiling is enabled
//! `GET /debug/pprof/profile?seconds=N` and `GET /debug/pprof/heap`. Anything else is 404 (405 for a method
//! other than GET/HEAD). It runs on its own thread with a current-thread runtime ([`spawn_ops_thread`]) so
//! a slow scrape or a profile never delays a data-path worker; profiles run on a short-lived thread of
//! their own so the server keeps answering meanwhile.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use super::metrics::{Metrics, RoleLabel, Snapshot, CONTENT_TYPE};
use super::pprof::{self, ProfileError};

/// Produces the daemon's counters on scrape.
pub type SnapshotFn = Box<dyn Fn() -> Snapshot + Send + Sync>;
/// Says whether the daemon is ready (`Err` carries the reason, sent in the 503 body).
pub type ReadyFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Longest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Duration of a CPU profile when the request gives none (Go's default).
const DEFAULT_PROFILE_SECONDS: u64 = 30;

/// What the ops server serves. Shared by every connection (and by several servers if the daemon runs one
/// on `metrics.listen` and one on `debug.pprof`).
pub struct OpsState {
    /// The metric families (encoded from a fresh [`Snapshot`] on each scrape).
    pub metrics: Metrics,
    snapshot: SnapshotFn,
    ready: ReadyFn,
    pprof: bool,
    shutdown: watch::Sender<bool>,
}

impl OpsState {
    /// State serving `/metrics` from `snapshot` and `/readyz` from `ready`; profiling off.
    pub fn new(snapshot: SnapshotFn, ready: ReadyFn) -> Self {
        OpsState {
            metrics: Metrics::new(),
            snapshot,
            ready,
            pprof: false,
            shutdown: watch::Sender::new(false),
        }
    }

    /// Enables (or not) the `/debug/pprof/*` endpoints.
    pub fn with_pprof(mut self, enabled: bool) -> Self {
        self.pprof = enabled;
        self
    }

    /// Whether the `/debug/pprof/*` endpoints are served.
    pub fn pprof_enabled(&self) -> bool {
        self.pprof
    }

    /// Makes every [`serve`] loop on this state return (connections in progress finish).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

/// The readiness rule: the data path is attached and, on a client, at least one session is live.
pub fn readiness(attached: bool, role: RoleLabel, live_sessions: u64) -> Result<(), String> {
    if !attached {
        return Err("data path not attached".to_string());
    }
    if role == RoleLabel::Client && live_sessions == 0 {
        return Err("no live session to the server".to_string());
    }
    Ok(())
}

/// Accepts connections on `listener` until [`OpsState::shutdown`]. Must run inside a tokio runtime.
pub async fn serve(listener: TcpListener, state: Arc<OpsState>) {
    let mut stop = state.shutdown.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    let st = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(sock, &st).await {
                            debug!(%peer, error = %e, "ops connection failed");
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "ops server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}

/// Binds `addr` and runs [`serve`] on a new thread ("paqet-ops") with its own current-thread runtime.
/// Returns the bound address (useful with port 0) and the thread's handle.
pub fn spawn_ops_thread(
    addr: SocketAddr,
    state: Arc<OpsState>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("ops server: binding {addr}: {e}")))?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let handle =
        std::thread::Builder::new()
            .name("paqet-ops".into())
            .spawn(move || {
                rt.block_on(async move {
            match TcpListener::from_std(std_listener) {
                Ok(l) => {
                    info!(addr = %local, pprof = state.pprof, "ops server listening");
                    serve(l, state).await;
                }
                Err(e) => error!(addr = %local, error = %e, "ops server: registering the listener"),
            }
        });
            })?;
    Ok((local, handle))
}

/// A response ready to write.
struct Response {
    status: u16,
    content_type: &'static str,
    extra: Option<&'static str>,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra: None,
            body: body.into().into_bytes(),
        }
    }

    fn profile(body: Vec<u8>, filename: &'static str) -> Self {
        Response {
            status: 200,
            content_type: "application/octet-stream",
            extra: Some(filename),
            body,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Reads the request head (until the blank line), bounded in size and time.
async fn read_head(sock: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the request head ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

async fn handle(mut sock: TcpStream, state: &OpsState) -> io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut sock)).await {
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received in time",
            ))
        }
        Ok(r) => r?,
    };
    let (resp, head_only) = match head {
        None => (Response::text(413, "request head too large\n"), false),
        Some(h) => {
            let line = h.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.trim_end().split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(m @ ("GET" | "HEAD")), Some(target), Some(v)) if v.starts_with("HTTP/1.") => {
                    (route(state, target).await, m == "HEAD")
                }
                (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => (
                    Response::text(405, "only GET and HEAD are supported\n"),
                    false,
                ),
                _ => (Response::text(400, "malformed request line\n"), false),
            }
        }
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    if resp.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    if let Some(f) = resp.extra {
        out.push_str(&format!(
            "Content-Disposition: attachment; filename=\"{f}\"\r\n"
        ));
    }
    out.push_str("\r\n");
    sock.write_all(out.as_bytes()).await?;
    if !head_only {
        sock.write_all(&resp.body).await?;
    }
    sock.shutdown().await
}

/// Runs `f` on a short-lived thread and awaits its result without blocking the runtime.
async fn off_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| io::Error::other(format!("{name} thread ended without a result")))
}

fn profile_error(e: ProfileError) -> Response {
    match e {
        ProfileError::BadSeconds(_) => Response::text(400, format!("{e}\n")),
        ProfileError::Busy => Response::text(409, format!("{e}\n")),
        _ => Response::text(500, format!("{e}\n")),
    }
}

/// The `seconds` query parameter (default 30); `Err` names the bad value.
fn seconds_param(query: &str) -> Result<u64, String> {
    for kv in query.split('&') {
        if let Some(v) = kv.strip_prefix("seconds=") {
            return v.parse::<u64>().map_err(|_| {
                format!(
                    "bad seconds={v}: expected an integer 1..={}",
                    pprof::MAX_CPU_SECONDS
                )
            });
        }
    }
    Ok(DEFAULT_PROFILE_SECONDS)
}

async fn route(state: &OpsState, target: &str) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/metrics" => {
            let body = state.metrics.encode(&(state.snapshot)()).into_bytes();
            Response {
                status: 200,
                content_type: CONTENT_TYPE,
                extra: None,
                body,
            }
        }
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => match (state.ready)() {
            Ok(()) => Response::text(200, "ready\n"),
            Err(r) => Response::text(503, format!("not ready: {r}\n")),
        },
        "/debug/pprof/" | "/debug/pprof" if state.pprof => Response::text(
            200,
            "profiles:\n/debug/pprof/profile?seconds=N  CPU (1..=60 s)\n/debug/pprof/heap  heap\n",
        ),
        "/debug/pprof/profile" if state.pprof => match seconds_param(query) {
            Err(m) => Response::text(400, format!("{m}\n")),
            Ok(secs) => match off_thread("paqet-pprof-cpu", move || pprof::cpu_profile(secs)).await
            {
                Ok(Ok(body)) => Response::profile(body, "profile"),
                Ok(Err(e)) => profile_error(e),
                Err(e) => Response::text(500, format!("{e}\n")),
            },
        },
        "/debug/pprof/heap" if state.pprof => {
            match off_thread("paqet-pprof-heap", pprof::heap_profile).await {
                Ok(Ok(body)) => Response::profile(body, "heap"),
                Ok(Err(e)) => profile_error(e),
                Err(e) => Response::text(500, format!("{e}\n")),
            }
        }
        _ => Response::text(404, format!("not found: {path}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_rule() {
        assert!(readiness(true, RoleLabel::Server, 0).is_ok());
        assert!(readiness(true, RoleLabel::Client, 1).is_ok());
        assert_eq!(
            readiness(true, RoleLabel::Client, 0).unwrap_err(),
            "no live session to the server"
        );
        assert_eq!(
            readiness(false, RoleLabel::Server, 3).unwrap_err(),
            "data path not attached"
        );
    }

    #[test]
    fn seconds_parameter() {
        assert_eq!(seconds_param(""), Ok(30));
        assert_eq!(seconds_param("debug=1&seconds=5"), Ok(5));
        assert!(seconds_param("seconds=abc")
            .unwrap_err()
            .contains("seconds=abc"));
    }
}
