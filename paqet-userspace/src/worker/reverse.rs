//! Reverse forwards (paqet-dp extension, `docs/protocol-extensions.md` §3), like `ssh -R`: the server
//! listens on a TCP/UDP address a client declared and carries each connection back through that client's
//! session to a target on the client's side.
//!
//! - Client (`[[reverse]]` set): right after slot 0's session is dialled it opens one control stream with
//!   PREVD (the declared entries) and keeps it open; the server answers PREVA (a status per entry) on it.
//!   No answer (the stream closed, or nothing within [`ANSWER_TIMEOUT`]) = the server does not support
//!   reverse forwards: logged once as an error, the rest of the tunnel keeps working. Streams the server
//!   opens (PREVC `index`) are dialled to the entry's target and relayed like a PTCP/PUDP stream.
//! - Server: PREVD with `server.reverse_allow` empty is closed without an answer, exactly upstream's reaction
//!   to an unknown header type. Otherwise each entry listed in `server.reverse_allow` gets a listener (bind
//!   failure, e.g. another session holds it: refused); the listeners live as long as the control stream,
//!   which ends with the session. Each TCP connection / UDP source becomes a server-opened stream with
//!   PREVC, relayed by the same loops as the client's forwards (`front::forward`).
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{lookup_host, UdpSocket};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::client::{header_bytes, stream_with, TunnelError};
use super::core::Shared;
use super::server::{read_header, relay_tcp, relay_udp, StreamError};
use super::stream::TunnelStream;
use super::DIAL_TIMEOUT;
use crate::config::{ForwardProtocol, ReverseRule};
use crate::front::forward::{StreamOpener, TcpForward, UdpForward};
use crate::wire::header::{Header, ReverseEntry, ReverseProto, ReverseStatus};

/// How long the client waits for the server's PREVA before deciding it does not support reverse forwards.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a client declares again while the server answers `unavailable` for an entry.
pub const RETRY: Duration = Duration::from_secs(3);

/// Both ends' reverse-forward settings (shared by a daemon's workers).
#[derive(Debug, Clone, Default)]
pub struct ReverseConfig {
    /// Client: `[[reverse]]`, in declaration order (PREVC `index` refers to it).
    pub rules: Vec<ReverseRule>,
    /// Server: `server.reverse_allow` (empty: off).
    pub allow: Vec<SocketAddr>,
}

/// Worker `index`'s copy of `wcfg`: a client's `[[reverse]]` entries are declared by worker 0 only (its
/// slot 0 session; worker 0 always runs a session), so several workers do not compete for the same
/// listeners. The server's allow list is shared by every worker.
pub(crate) fn for_worker(wcfg: &super::WorkerConfig, index: usize) -> super::WorkerConfig {
    let mut w = wcfg.clone();
    if index > 0 && !w.reverse.rules.is_empty() {
        w.reverse = std::sync::Arc::new(ReverseConfig {
            rules: Vec::new(),
            allow: w.reverse.allow.clone(),
        });
    }
    w
}

impl ReverseConfig {
    /// The settings, with their forwards registered in `paqet_reverse_connections_total` (0 until used).
    pub fn registered(rules: Vec<ReverseRule>, allow: Vec<SocketAddr>) -> Self {
        register_names(rules.iter().map(|r| r.name.clone()));
        register_names(
            allow
                .iter()
                .flat_map(|a| [format!("tcp/{a}"), format!("udp/{a}")]),
        );
        ReverseConfig { rules, allow }
    }
}

// ------------------------------------------------------------------------------------------------
// Counters (process-wide; published as paqet_reverse_connections_total{name} and
// paqet_reverse_refusals_total{reason}).
// ------------------------------------------------------------------------------------------------

static CONNECTIONS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
static REFUSALS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Every refusal reason, always exported (0 until it happens).
pub const REFUSAL_REASONS: [&str; 6] = [
    "disabled",
    "not_allowed",
    "unavailable",
    "invalid",
    "unsupported",
    "other",
];

/// Exports `names` in `paqet_reverse_connections_total` with 0 until their first connection (the daemon
/// registers its configured forwards: the client's names, the server's `tcp/…` and `udp/…` allow entries).
pub fn register_names(names: impl IntoIterator<Item = String>) {
    if let Ok(mut m) = CONNECTIONS.lock() {
        for n in names {
            m.entry(n).or_default();
        }
    }
}

pub(crate) fn count_connection(name: &str) {
    if let Ok(mut m) = CONNECTIONS.lock() {
        *m.entry(name.to_owned()).or_default() += 1;
    }
}

fn count_refusal(reason: &'static str) {
    if let Ok(mut m) = REFUSALS.lock() {
        *m.entry(reason).or_default() += 1;
    }
}

/// Connections carried per reverse forward: the client's `reverse[].name`, the server's `tcp/IP:port`
/// (server names come from its own `server.reverse_allow`, so the label set is bounded).
pub fn connections() -> Vec<(String, u64)> {
    CONNECTIONS
        .lock()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
        .unwrap_or_default()
}

/// Reverse forwards refused, by reason (`disabled`, `not_allowed`, `unavailable`, `invalid`; on the
/// client `unsupported` = the server did not answer).
pub fn refusals() -> Vec<(&'static str, u64)> {
    REFUSALS
        .lock()
        .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
        .unwrap_or_default()
}

fn reason(st: ReverseStatus) -> &'static str {
    match st {
        ReverseStatus::Accepted => "accepted",
        ReverseStatus::NotAllowed => "not_allowed",
        ReverseStatus::Unavailable => "unavailable",
        ReverseStatus::Invalid => "invalid",
        ReverseStatus::Other(_) => "other",
    }
}

// ------------------------------------------------------------------------------------------------
// Client
// ------------------------------------------------------------------------------------------------

/// The PREVD entries for `rules`.
pub fn declaration(rules: &[ReverseRule]) -> Header {
    Header::ReverseDeclare(
        rules
            .iter()
            .map(|r| ReverseEntry {
                proto: match r.protocol {
                    ForwardProtocol::Tcp => ReverseProto::Tcp,
                    ForwardProtocol::Udp => ReverseProto::Udp,
                },
                host: r.remote.ip().to_string(),
                port: r.remote.port(),
            })
            .collect(),
    )
}

/// Client: opens a control stream on session `id` with PREVD.
fn declare(shared: &Shared, id: u64) -> Result<TunnelStream, TunnelError> {
    let mut c = shared.borrow_mut();
    let bytes = header_bytes(&declaration(&c.cfg.reverse.rules))?;
    let sid = stream_with(&mut c, id, &bytes, false)?;
    c.register_stream(id, sid);
    drop(c);
    Ok(TunnelStream::attach(shared.clone(), id, sid))
}

/// Client: the session of slot `slot` was just dialled. With `[[reverse]]` entries and slot 0, declares
/// them on a control stream, logs the answer and holds the stream (the server keeps the listeners while
/// it is open). Entries the server could not listen on (`unavailable`: e.g. the session of this client's
/// previous run still holds them until it times out) are declared again every [`RETRY`] on a fresh
/// control stream, as long as the session lives.
pub(super) fn spawn_control(shared: &Shared, id: u64, slot: usize) {
    let rules = shared.borrow().cfg.reverse.rules.clone();
    if slot != 0 || rules.is_empty() {
        return;
    }
    let shared = shared.clone();
    tokio::task::spawn_local(async move {
        let mut quiet = false;
        loop {
            let mut s = match declare(&shared, id) {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "[[reverse]]: session gone before the declaration");
                    return;
                }
            };
            let st = match tokio::time::timeout(ANSWER_TIMEOUT, read_header(&mut s)).await {
                Ok(Ok(Header::ReverseAnswer(st))) => st,
                Ok(Ok(other)) => {
                    count_refusal("unsupported");
                    error!(answer = ?other, "[[reverse]]: server does not support reverse forwards (unexpected answer to the declaration)");
                    return;
                }
                Ok(Err(e)) => {
                    if shared
                        .borrow()
                        .endpoint
                        .get(id)
                        .is_none_or(|e| e.session.is_dead())
                    {
                        return; // the session ended, not the server's answer
                    }
                    count_refusal("unsupported");
                    error!(error = %e, "[[reverse]]: server does not support reverse forwards (it closed the declaration without an answer: an upstream paqet server, or its server.reverse_allow is empty); the other streams keep working");
                    return;
                }
                Err(_) => {
                    count_refusal("unsupported");
                    error!(
                        "[[reverse]]: server does not support reverse forwards (no answer within {}s); the other streams keep working",
                        ANSWER_TIMEOUT.as_secs()
                    );
                    return;
                }
            };
            let retry = st.contains(&ReverseStatus::Unavailable);
            if !quiet || !retry {
                log_answer(&rules, &st);
            }
            if retry {
                // Declare again later (closing this stream releases what it got).
                quiet = true;
                drop(s);
                tokio::time::sleep(RETRY).await;
                continue;
            }
            if quiet {
                info!("[[reverse]]: every entry the server accepts is listening now");
            }
            // Hold the stream until the session ends (or the server closes it).
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            debug!("[[reverse]]: control stream ended");
            return;
        }
    });
}

fn log_answer(rules: &[ReverseRule], st: &[ReverseStatus]) {
    for (i, r) in rules.iter().enumerate() {
        match st.get(i) {
            Some(ReverseStatus::Accepted) => {
                info!(name = %r.name, remote = %r.remote, target = %r.target, protocol = %r.protocol, "reverse forward listening on the server")
            }
            Some(&s) => {
                count_refusal(reason(s));
                warn!(name = %r.name, remote = %r.remote, reason = %s, "[[reverse]] entry {:?} ({} {}) refused by the server: {s}", r.name, r.protocol, r.remote)
            }
            None => {
                count_refusal("other");
                warn!(name = %r.name, remote = %r.remote, "[[reverse]] entry {:?} got no status from the server", r.name)
            }
        }
    }
}

/// Client: accepts the streams the server opens (only with `[[reverse]]` entries; otherwise the endpoint
/// refuses server-opened streams as before).
pub(super) fn start_client(shared: &Shared) {
    let rx = {
        let mut c = shared.borrow_mut();
        if c.cfg.reverse.rules.is_empty() {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        c.set_accept_channel(tx);
        rx
    };
    let shared = shared.clone();
    tokio::task::spawn_local(async move {
        let mut rx = rx;
        while let Some((id, sid)) = rx.recv().await {
            let s = TunnelStream::attach(shared.clone(), id, sid);
            let sh = shared.clone();
            tokio::task::spawn_local(async move {
                if let Err(e) = serve_connection(&sh, s).await {
                    debug!(sid, error = %e, "reverse stream ended");
                }
            });
        }
    });
}

/// Client: one server-opened stream: PREVC, then the entry's target is dialled and relayed.
async fn serve_connection(shared: &Shared, mut s: TunnelStream) -> Result<(), StreamError> {
    let (timeout, rules) = {
        let c = shared.borrow();
        (c.cfg.header_timeout, c.cfg.reverse.clone())
    };
    let header = match tokio::time::timeout(timeout, read_header(&mut s)).await {
        Ok(r) => r?,
        Err(_) => return Err(StreamError::HeaderTimeout(timeout)),
    };
    let Header::ReverseConnect { index } = header else {
        return Err(StreamError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("server-opened stream with {header:?} (expected PREVC)"),
        )));
    };
    let Some(rule) = rules.rules.get(index as usize) else {
        return Err(StreamError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("PREVC index {index} names no [[reverse]] entry"),
        )));
    };
    count_connection(&rule.name);
    let (host, port) = (rule.target.host.as_str(), rule.target.port);
    let target = rule.target.to_string();
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(DIAL_TIMEOUT, lookup_host((host, port))).await {
            Ok(Ok(it)) => it.collect(),
            Ok(Err(source)) => return Err(StreamError::Resolve { target, source }),
            Err(_) => return Err(StreamError::DialTimeout { target }),
        };
    let Some(&first) = addrs.first() else {
        return Err(StreamError::Resolve {
            target,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        });
    };
    debug!(name = %rule.name, %target, "reverse connection");
    match rule.protocol {
        ForwardProtocol::Tcp => relay_tcp(s, host, port, &addrs).await,
        ForwardProtocol::Udp => relay_udp(s, host, port, first).await,
    }
}

// ------------------------------------------------------------------------------------------------
// Server
// ------------------------------------------------------------------------------------------------

/// What a server listens on for one accepted entry.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Udp(UdpSocket),
}

/// Checks one entry against `allow` and binds it.
async fn bind_entry(allow: &[SocketAddr], e: &ReverseEntry) -> Result<Listener, ReverseStatus> {
    let Ok(ip) = e.host.parse::<IpAddr>() else {
        return Err(ReverseStatus::Invalid);
    };
    let addr = SocketAddr::new(ip, e.port);
    if e.port == 0 || !allow.contains(&addr) {
        return Err(ReverseStatus::NotAllowed);
    }
    let r = match e.proto {
        ReverseProto::Tcp => crate::front::bind_tcp(addr, false).map(Listener::Tcp),
        ReverseProto::Udp => UdpSocket::bind(addr).await.map(Listener::Udp),
    };
    r.map_err(|err| {
        debug!(%addr, error = %err, "reverse listener bind failed");
        ReverseStatus::Unavailable
    })
}

fn proto_name(p: ReverseProto) -> &'static str {
    match p {
        ReverseProto::Tcp => "tcp",
        ReverseProto::Udp => "udp",
    }
}

/// Server: a PREVD control stream. Answers PREVA, runs the accepted listeners while the stream lives.
pub(super) async fn serve_declaration(
    shared: &Shared,
    mut s: TunnelStream,
    entries: Vec<ReverseEntry>,
) -> Result<(), StreamError> {
    let allow = shared.borrow().cfg.reverse.allow.clone();
    let peer = s.peer();
    if allow.is_empty() {
        // Upstream's reaction to a header type it does not know: close the stream without an answer.
        count_refusal("disabled");
        debug!(
            ?peer,
            "reverse forwards declared but server.reverse_allow is empty: stream closed"
        );
        return Ok(());
    }
    let session = s.session_id();
    let mut statuses = Vec::with_capacity(entries.len());
    let mut tasks = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let label = format!("{}/{}", proto_name(e.proto), target_label(e));
        match bind_entry(&allow, e).await {
            Ok(l) => {
                info!(?peer, listen = %label, "reverse forward listening");
                let open = opener(shared, session, i as u8, label.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    match l {
                        Listener::Tcp(l) => {
                            TcpForward::new(l, String::new(), 0)
                                .run_with("reverse tcp", open)
                                .await
                        }
                        Listener::Udp(u) => {
                            UdpForward::from_socket(u, String::new(), 0)
                                .run_with("reverse udp", open)
                                .await
                        }
                    }
                }));
                statuses.push(ReverseStatus::Accepted);
            }
            Err(st) => {
                count_refusal(reason(st));
                warn!(?peer, listen = %label, reason = %st, "reverse forward refused");
                statuses.push(st);
            }
        }
    }
    let mut answer = Vec::new();
    Header::ReverseAnswer(statuses).emit(&mut answer);
    let r = tokio::io::AsyncWriteExt::write_all(&mut s, &answer).await;
    if r.is_ok() {
        // The listeners live as long as the control stream (which ends with the session).
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }
    for t in &tasks {
        t.abort();
    }
    if !tasks.is_empty() {
        info!(?peer, listeners = tasks.len(), "reverse forwards closed");
    }
    r.map_err(StreamError::Io)
}

fn target_label(e: &ReverseEntry) -> String {
    match e.host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, e.port).to_string(),
        Err(_) => format!("{:?}:{}", e.host, e.port),
    }
}

/// Opens a server-initiated stream to the client on `session` with PREVC `index`.
fn opener(shared: &Shared, session: u64, index: u8, label: String) -> StreamOpener {
    let shared = shared.clone();
    let label = std::rc::Rc::new(label);
    std::rc::Rc::new(move || {
        let shared = shared.clone();
        let label = label.clone();
        Box::pin(async move {
            let bytes =
                header_bytes(&Header::ReverseConnect { index }).map_err(|e| e.to_string())?;
            let sid = {
                let mut c = shared.borrow_mut();
                let sid = stream_with(&mut c, session, &bytes, false).map_err(|e| e.to_string())?;
                c.register_stream(session, sid);
                sid
            };
            count_connection(&label);
            Ok(TunnelStream::attach(shared, session, sid))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostPort;

    #[test]
    fn declaration_lists_every_rule_in_order() {
        let rules = vec![
            ReverseRule {
                name: "ssh".into(),
                remote: "0.0.0.0:8022".parse().unwrap(),
                target: HostPort::parse("127.0.0.1:22").unwrap(),
                protocol: ForwardProtocol::Tcp,
            },
            ReverseRule {
                name: "dns".into(),
                remote: "[::1]:5353".parse().unwrap(),
                target: HostPort::parse("localhost:53").unwrap(),
                protocol: ForwardProtocol::Udp,
            },
        ];
        let h = declaration(&rules);
        let mut out = Vec::new();
        h.try_emit(&mut out).unwrap();
        let Some((Header::ReverseDeclare(e), _)) = Header::parse(&out).unwrap() else {
            panic!("not a declaration");
        };
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].proto, e[0].host.as_str(), e[0].port),
            (ReverseProto::Tcp, "0.0.0.0", 8022)
        );
        assert_eq!(
            (e[1].proto, e[1].host.as_str(), e[1].port),
            (ReverseProto::Udp, "::1", 5353)
        );
    }

    #[tokio::test]
    async fn entries_outside_the_allow_list_are_refused_before_binding() {
        let allow: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap()];
        let entry = |host: &str, port| ReverseEntry {
            proto: ReverseProto::Tcp,
            host: host.into(),
            port,
        };
        assert!(matches!(
            bind_entry(&allow, &entry("127.0.0.1", 2)).await,
            Err(ReverseStatus::NotAllowed)
        ));
        assert!(matches!(
            bind_entry(&allow, &entry("0.0.0.0", 1)).await,
            Err(ReverseStatus::NotAllowed)
        ));
        assert!(matches!(
            bind_entry(&allow, &entry("localhost", 1)).await,
            Err(ReverseStatus::Invalid)
        ));
        // Allowed and free: bound; a second bind of the same address is refused as unavailable.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = l.local_addr().unwrap();
        let allow = vec![taken];
        assert!(matches!(
            bind_entry(&allow, &entry("127.0.0.1", taken.port())).await,
            Err(ReverseStatus::Unavailable)
        ));
        drop(l);
        assert!(matches!(
            bind_entry(&allow, &entry("127.0.0.1", taken.port())).await,
            Ok(Listener::Tcp(_))
        ));
    }
}
