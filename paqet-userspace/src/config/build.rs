//! Defaults per role and value validation: [`RawConfig`] → [`Config`], collecting every problem; and the
//! reverse mapping used by `Config::to_toml_string`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::raw::*;
use super::schema::{info, Issues, Mode};
use super::types::{CpuPin, BLOCK_MODES, TCP_FLAG_LETTERS};
use super::{
    CcAlgorithm, Config, FamilyConfig, ForwardProtocol, ForwardRule, HostPort, HttpListener,
    IoBackend, IoConfig, KcpConfig, KcpMode, Limit, LogLevel, MacAddr, NetworkConfig, Role,
    Socks5Listener, TransportConfig, MAX_WND,
};
use crate::proto::cc::parse_bandwidth;

const MIB: i64 = 1024 * 1024;
/// Default `transport.kcp.window_mem`.
const WINDOW_MEM_DEFAULT: i64 = 32 * MIB;

/// Quotes a string value for messages the way TOML writes it.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The "must be …" message for a key, from the schema's range text.
fn must(path: &str) -> String {
    format!("must be {}", info(path).range)
}

/// An integer key with a default and an inclusive range; out-of-range → error and the default.
fn int(is: &mut Issues, path: &str, v: Option<i64>, default: i64, lo: i64, hi: i64) -> i64 {
    match v {
        None => default,
        Some(x) if (lo..=hi).contains(&x) => x,
        Some(x) => {
            is.error(path, Some(x.to_string()), must(path));
            default
        }
    }
}

/// A limit key: -1 = unlimited, else 1..=hi.
fn limit(is: &mut Issues, path: &str, v: Option<i64>, default: u32, hi: i64) -> Limit {
    match v {
        None => Some(default),
        Some(-1) => None,
        Some(x) if (1..=hi).contains(&x) => Some(x as u32),
        Some(x) => {
            is.error(path, Some(x.to_string()), must(path));
            Some(default)
        }
    }
}

/// A KCP window key: an integer 1..=32768 is a fixed window, `"auto"` an auto-tuned one starting at
/// `default`; unset = `default`, auto-tuned when `unset_auto` (TOML) and fixed otherwise (imported YAML
/// keeps upstream's window). Returns `(window, auto)`.
fn window(
    is: &mut Issues,
    path: &str,
    v: Option<&IntOrString>,
    default: u32,
    unset_auto: bool,
) -> (u32, bool) {
    match v {
        None => (default, unset_auto),
        Some(IntOrString::Int(x)) if (1..=i64::from(MAX_WND)).contains(x) => (*x as u32, false),
        Some(IntOrString::Str(s)) if s == "auto" => (default, true),
        Some(other) => {
            is.error(path, Some(other.to_string()), must(path));
            (default, unset_auto)
        }
    }
}

fn window_raw(wnd: u32, auto: bool) -> Option<IntOrString> {
    Some(if auto {
        IntOrString::Str("auto".to_string())
    } else {
        IntOrString::Int(i64::from(wnd))
    })
}

/// A string enum key with an optional default.
fn enumv<T: FromStr<Err = String>>(
    is: &mut Issues,
    path: &str,
    v: Option<&String>,
    default: Option<T>,
) -> Option<T> {
    match v {
        None => default,
        Some(s) => match s.parse() {
            Ok(t) => Some(t),
            Err(e) => {
                is.error(path, Some(q(s)), e);
                default
            }
        },
    }
}

/// A `host:port` with port 1..=65535; `disp` is the displayed path (array index included).
fn endpoint(is: &mut Issues, disp: &str, v: Option<&String>, required: bool) -> Option<HostPort> {
    let Some(s) = v else {
        if required {
            is.error(disp, None, "required (host:port)");
        }
        return None;
    };
    match HostPort::parse(s) {
        Ok(hp) if hp.port != 0 => Some(hp),
        Ok(_) => {
            is.error(disp, Some(q(s)), "port must be 1..=65535");
            None
        }
        Err(e) => {
            is.error(
                disp,
                Some(q(s)),
                format!("{e}; expected host:port with port 1..=65535"),
            );
            None
        }
    }
}

/// Reports a key set for the wrong role: error in TOML, ignored with a warning in imported YAML.
fn wrong_role(is: &mut Issues, mode: Mode, path: &str, role: Role, only: Role) {
    let msg = match mode {
        Mode::Strict => format!("only valid for role {only} (this config is role {role})"),
        Mode::Lenient => format!("ignored: only used by role {only} (this config is role {role})"),
    };
    is.strict(mode, path, None, msg);
}

fn flags(is: &mut Issues, path: &str, v: Option<&Vec<String>>) -> Vec<String> {
    let default = vec!["PA".to_string()];
    let Some(list) = v else { return default };
    if list.is_empty() {
        return default;
    }
    if list.len() > 64 {
        is.error(path, Some(format!("[…{} entries]", list.len())), must(path));
        return default;
    }
    let mut ok = true;
    for (i, entry) in list.iter().enumerate() {
        let disp = format!("{path}[{i}]");
        if entry.is_empty() {
            is.error(
                disp,
                Some(q(entry)),
                "empty flag string; use letters F S R P A U E C N",
            );
            ok = false;
        } else if let Some(bad) = entry.chars().find(|c| !TCP_FLAG_LETTERS.contains(*c)) {
            is.error(
                disp,
                Some(q(entry)),
                format!("{bad:?} is not a TCP flag letter; allowed F S R P A U E C N"),
            );
            ok = false;
        }
    }
    if ok {
        list.clone()
    } else {
        default
    }
}

/// Parses one `network.ipv4`/`ipv6` table.
fn family<A: Copy>(
    is: &mut Issues,
    fam: &str,
    raw: &RawFamily,
    role: Option<Role>,
    pick: impl Fn(IpAddr) -> Option<A>,
) -> FamilyConfig<A> {
    let path = format!("network.{fam}.addr");
    let mut out = FamilyConfig {
        ip: None,
        port: 0,
        router_mac: None,
    };
    match &raw.addr {
        None => {
            if role == Some(Role::Server) {
                is.error(
                    &path,
                    None,
                    "required for a server: its port is the port the server listens on",
                );
            }
        }
        Some(s) => match HostPort::parse(s) {
            Err(e) => is.error(
                &path,
                Some(q(s)),
                format!("{e}; expected {}", info(&path).range),
            ),
            Ok(hp) => {
                out.port = hp.port;
                if role == Some(Role::Server) && hp.port == 0 {
                    is.error(&path, Some(q(s)), "a server needs a fixed port 1..=65535");
                }
                if !hp.host.is_empty() {
                    match hp.ip() {
                        Some(ip) if ip.is_unspecified() => {}
                        Some(ip) => match pick(ip) {
                            Some(a) => out.ip = Some(a),
                            None => is.error(
                                &path,
                                Some(q(s)),
                                format!("must be an {fam} address; {}", info(&path).range),
                            ),
                        },
                        None => is.error(
                            &path,
                            Some(q(s)),
                            format!("host must be an IP literal; {}", info(&path).range),
                        ),
                    }
                }
            }
        },
    }
    if let Some(m) = &raw.router_mac {
        match m.parse::<MacAddr>() {
            Ok(mac) => out.router_mac = Some(mac),
            Err(e) => is.error(format!("network.{fam}.router_mac"), Some(q(m)), e),
        }
    }
    out
}

/// Builds the validated configuration; `None` when the role is unusable. Errors go to `is`.
pub(crate) fn build(raw: &RawConfig, mode: Mode, is: &mut Issues) -> Option<Config> {
    let role = match &raw.role {
        None => {
            is.error("role", None, "required: must be one of client, server");
            None
        }
        Some(_) => enumv::<Role>(is, "role", raw.role.as_ref(), None),
    };
    let client = role == Some(Role::Client);
    let server = role == Some(Role::Server);
    let r = role.unwrap_or(Role::Client);

    let log_level = enumv(
        is,
        "log.level",
        raw.log.as_ref().and_then(|l| l.level.as_ref()),
        Some(LogLevel::None),
    )
    .unwrap_or(LogLevel::None);

    // listen.addr (server) / server.addr (client).
    let listen_raw = raw.listen.as_ref().and_then(|l| l.addr.as_ref());
    let listen = if server {
        endpoint(is, "listen.addr", listen_raw, true)
    } else {
        if listen_raw.is_some() && client {
            wrong_role(is, mode, "listen.addr", r, Role::Server);
        }
        None
    };
    let server_raw = raw.server.as_ref().and_then(|s| s.addr.as_ref());
    let server_addr = if client {
        endpoint(is, "server.addr", server_raw, true)
    } else {
        if server_raw.is_some() && server {
            wrong_role(is, mode, "server.addr", r, Role::Client);
        }
        None
    };

    // Front ends (client only).
    let mut socks5 = Vec::new();
    let mut forward = Vec::new();
    let mut http = Vec::new();
    if server {
        for (name, n) in [
            ("socks5", raw.socks5.len()),
            ("forward", raw.forward.len()),
            ("http", raw.http.len()),
        ] {
            if n > 0 {
                wrong_role(is, mode, name, r, Role::Client);
            }
        }
    } else {
        for (i, s) in raw.socks5.iter().enumerate() {
            let listen = endpoint(is, &format!("socks5[{i}].listen"), s.listen.as_ref(), true);
            if let Some(listen) = listen {
                socks5.push(Socks5Listener {
                    listen,
                    username: s.username.clone().unwrap_or_default(),
                    password: s.password.clone().unwrap_or_default(),
                });
            }
        }
        for (i, f) in raw.forward.iter().enumerate() {
            let listen = endpoint(is, &format!("forward[{i}].listen"), f.listen.as_ref(), true);
            let target = endpoint(is, &format!("forward[{i}].target"), f.target.as_ref(), true);
            let ppath = format!("forward[{i}].protocol");
            let protocol = match &f.protocol {
                None => {
                    is.error(&ppath, None, "required: must be one of tcp, udp");
                    None
                }
                Some(_) => enumv::<ForwardProtocol>(is, &ppath, f.protocol.as_ref(), None),
            };
            if let (Some(listen), Some(target), Some(protocol)) = (listen, target, protocol) {
                forward.push(ForwardRule {
                    listen,
                    target,
                    protocol,
                });
            }
        }
        for (i, h) in raw.http.iter().enumerate() {
            let listen = endpoint(is, &format!("http[{i}].listen"), h.listen.as_ref(), true);
            if h.username.is_some() != h.password.is_some() {
                let missing = if h.username.is_none() {
                    "username"
                } else {
                    "password"
                };
                is.error(
                    format!("http[{i}].{missing}"),
                    None,
                    "required when the other of username/password is set",
                );
            }
            if let Some(listen) = listen {
                http.push(HttpListener {
                    listen,
                    username: h.username.clone(),
                    password: h.password.clone(),
                });
            }
        }
        if client
            && socks5.is_empty()
            && forward.is_empty()
            && http.is_empty()
            && raw.socks5.is_empty()
            && raw.forward.is_empty()
            && raw.http.is_empty()
        {
            is.warn(
                "socks5",
                None,
                "client has no socks5, forward or http listener: nothing will use the tunnel",
            );
        }
    }

    // network.*
    let net = raw.network.clone().unwrap_or_default();
    let interface = match &net.interface {
        None => {
            is.error(
                "network.interface",
                None,
                "required: the interface name (1..=15 characters)",
            );
            String::new()
        }
        Some(s) if s.is_empty() || s.len() > 15 => {
            is.error("network.interface", Some(q(s)), must("network.interface"));
            String::new()
        }
        Some(s) => s.clone(),
    };
    if net.guid.is_some() {
        is.warn(
            "network.guid",
            None,
            "ignored: only used by upstream on Windows (Npcap)",
        );
    }
    let ipv4 = net.ipv4.as_ref().map(|f| {
        family(is, "ipv4", f, role, |ip| match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
    });
    let ipv6 = net.ipv6.as_ref().map(|f| {
        family(is, "ipv6", f, role, |ip| match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        })
    });
    if ipv4.is_none() && ipv6.is_none() {
        is.error(
            "network.ipv4",
            None,
            "at least one of network.ipv4 / network.ipv6 must be configured",
        );
    }
    if let (Some(a), Some(b), Some(_), Some(_)) = (
        &ipv4,
        &ipv6,
        net.ipv4.as_ref().and_then(|f| f.addr.as_ref()),
        net.ipv6.as_ref().and_then(|f| f.addr.as_ref()),
    ) {
        if a.port != b.port {
            is.error(
                "network.ipv6.addr",
                net.ipv6.as_ref().and_then(|f| f.addr.as_deref()).map(q),
                format!(
                    "port {} must equal network.ipv4.addr's port {}",
                    b.port, a.port
                ),
            );
        }
    }
    let tcp = net.tcp.clone().unwrap_or_default();
    let local_flag = flags(is, "network.tcp.local_flag", tcp.local_flag.as_ref());
    let remote_flag = flags(is, "network.tcp.remote_flag", tcp.remote_flag.as_ref());
    let sockbuf_default = if server { 8 * MIB } else { 4 * MIB };
    let sockbuf = int(
        is,
        "network.pcap.sockbuf",
        net.pcap.as_ref().and_then(|p| p.sockbuf),
        sockbuf_default,
        1024,
        100 * MIB,
    );
    if !(sockbuf as u64).is_power_of_two() {
        is.warn(
            "network.pcap.sockbuf",
            Some(sockbuf.to_string()),
            "not a power of two",
        );
    }

    // transport.*
    let transport = raw.transport.clone().unwrap_or_default();
    match &transport.protocol {
        None => is.error("transport.protocol", None, "required: must be \"kcp\""),
        Some(p) if p != "kcp" => is.error("transport.protocol", Some(q(p)), "must be \"kcp\""),
        Some(_) => {}
    }
    let conn = int(is, "transport.conn", transport.conn, 1, 1, 256);
    let kcp_present = transport.kcp.is_some();
    if !kcp_present {
        is.error(
            "transport.kcp",
            None,
            "transport.kcp configuration is required",
        );
    }
    let k = transport.kcp.clone().unwrap_or_default();
    let kp = |name: &str| format!("transport.kcp.{name}");
    let mode_v = enumv(
        is,
        "transport.kcp.mode",
        k.mode.as_ref(),
        Some(KcpMode::Fast),
    )
    .unwrap_or(KcpMode::Fast);
    let nodelay = int(is, "transport.kcp.nodelay", k.nodelay, 0, 0, 2);
    let interval = int(is, "transport.kcp.interval", k.interval, 0, 0, 5000);
    let resend = int(is, "transport.kcp.resend", k.resend, 0, 0, 65535);
    let nocongestion = int(is, "transport.kcp.nocongestion", k.nocongestion, 0, 0, 1);
    if mode_v != KcpMode::Manual {
        let manual_set = [
            ("nodelay", k.nodelay.is_some_and(|v| v != 0)),
            ("interval", k.interval.is_some_and(|v| v != 0)),
            ("resend", k.resend.is_some_and(|v| v != 0)),
            ("nocongestion", k.nocongestion.is_some_and(|v| v != 0)),
            ("wdelay", k.wdelay == Some(true)),
            ("acknodelay", k.acknodelay == Some(true)),
        ];
        for (name, set) in manual_set {
            if set {
                is.warn(kp(name), None, format!("ignored: only used when transport.kcp.mode = \"manual\" (mode is {mode_v})"));
            }
        }
    }
    let mtu = int(is, "transport.kcp.mtu", k.mtu, 1350, 50, 1500);
    // Unset windows: auto-tuned in TOML; upstream's fixed windows in imported YAML (unless `auto`).
    let unset_auto = mode == Mode::Strict;
    let (rcvwnd, rcvwnd_auto) = window(
        is,
        "transport.kcp.rcvwnd",
        k.rcvwnd.as_ref(),
        if server { 1024 } else { 512 },
        unset_auto,
    );
    let (sndwnd, sndwnd_auto) = window(
        is,
        "transport.kcp.sndwnd",
        k.sndwnd.as_ref(),
        if server { 1024 } else { 128 },
        unset_auto,
    );
    let dshard = int(is, "transport.kcp.dshard", k.dshard, 0, 0, 255);
    let pshard = int(is, "transport.kcp.pshard", k.pshard, 0, 0, 255);
    if dshard + pshard > 256 {
        is.error(
            "transport.kcp.pshard",
            Some(pshard.to_string()),
            format!("dshard + pshard = {} exceeds 256", dshard + pshard),
        );
    }
    if (dshard > 0) != (pshard > 0) {
        is.warn(
            "transport.kcp.dshard",
            Some(dshard.to_string()),
            format!("FEC stays off unless both dshard and pshard are > 0 (pshard = {pshard})"),
        );
    }
    let block = match &k.block {
        None => "aes".to_string(),
        Some(b) if BLOCK_MODES.contains(&b.as_str()) => b.clone(),
        Some(b) => {
            is.error(
                "transport.kcp.block",
                Some(q(b)),
                format!("must be one of {}", BLOCK_MODES.join(", ")),
            );
            "aes".to_string()
        }
    };
    let guard = k.guard.unwrap_or(mode == Mode::Strict);
    let key = k.key.clone().unwrap_or_default();
    if key.is_empty() && kcp_present {
        let keyless_block = block == "none" || block == "null";
        if !keyless_block {
            is.error(
                "transport.kcp.key",
                None,
                format!(
                    "required for block = {} (generate one with `paqet-dp secret`)",
                    q(&block)
                ),
            );
        } else if guard {
            is.error("transport.kcp.key", None, format!("required: the guard needs a key even with block = {} (or set transport.kcp.guard = false)", q(&block)));
        }
    }
    let smuxbuf = int(
        is,
        "transport.kcp.smuxbuf",
        k.smuxbuf,
        4_194_304,
        1024,
        i32::MAX as i64,
    );
    let streambuf = match k.streambuf {
        None => 2_097_152,
        Some(x) if (1024..=smuxbuf).contains(&x) => x,
        Some(x) => {
            is.error(
                "transport.kcp.streambuf",
                Some(x.to_string()),
                format!("must be 1024..=smuxbuf ({smuxbuf})"),
            );
            2_097_152.min(smuxbuf)
        }
    };
    if k.streambuf.is_none() && streambuf > smuxbuf {
        is.error(
            "transport.kcp.smuxbuf",
            Some(smuxbuf.to_string()),
            format!("must be >= streambuf ({streambuf})"),
        );
    }
    let smuxkalive = int(is, "transport.kcp.smuxkalive", k.smuxkalive, 2, 1, 3600);
    let smuxktimeout = match k.smuxktimeout {
        None if smuxkalive <= 8 => 8,
        None => {
            is.error(
                "transport.kcp.smuxktimeout",
                None,
                format!(
                    "default 8 is below smuxkalive ({smuxkalive}); set smuxktimeout >= smuxkalive"
                ),
            );
            smuxkalive
        }
        Some(x) if (smuxkalive..=86400).contains(&x) => x,
        Some(x) => {
            is.error(
                "transport.kcp.smuxktimeout",
                Some(x.to_string()),
                format!("must be smuxkalive ({smuxkalive})..=86400"),
            );
            8.max(smuxkalive)
        }
    };
    // Congestion control (sender side only: the wire is unchanged).
    let cc_path = "transport.kcp.cc";
    let (cc, cc_ok) = match &k.cc {
        None => (CcAlgorithm::Bbr, true),
        Some(c) => match c.parse::<CcAlgorithm>() {
            Ok(a) => (a, true),
            Err(_) => {
                is.error(
                    cc_path,
                    Some(q(c)),
                    format!("must be one of {}", info(cc_path).range),
                );
                (CcAlgorithm::Bbr, false)
            }
        },
    };
    let bw_path = "transport.kcp.bandwidth";
    let bandwidth = k.bandwidth.as_ref().and_then(|b| {
        let text = match b {
            IntOrString::Int(i) => i.to_string(),
            IntOrString::Str(s) => s.clone(),
        };
        match parse_bandwidth(&text) {
            Ok(rate) => Some(rate),
            Err(_) => {
                is.error(bw_path, Some(b.to_string()), must(bw_path));
                None
            }
        }
    });
    let bandwidth = match cc {
        CcAlgorithm::Fixed => {
            if k.bandwidth.is_none() {
                is.error(
                    bw_path,
                    None,
                    "required for cc = \"fixed\": the pacing rate, e.g. \"100mbit\"",
                );
            }
            bandwidth
        }
        other => {
            if let (Some(b), Some(_), true) = (&k.bandwidth, bandwidth, cc_ok) {
                is.warn(
                    bw_path,
                    Some(b.to_string()),
                    format!("ignored: only used when transport.kcp.cc = \"fixed\" (cc is {other})"),
                );
            }
            None
        }
    };
    let window_mem = int(
        is,
        "transport.kcp.window_mem",
        k.window_mem,
        WINDOW_MEM_DEFAULT,
        MIB,
        1024 * MIB,
    );
    if !sndwnd_auto && !rcvwnd_auto && k.window_mem.is_some_and(|v| v != WINDOW_MEM_DEFAULT) {
        is.warn(
            "transport.kcp.window_mem",
            Some(window_mem.to_string()),
            "ignored: only caps an auto-tuned window (sndwnd and rcvwnd are both fixed)",
        );
    }
    let guard_magic = match &k.guard_magic {
        None => *b"PQT1",
        Some(m) => match <[u8; 4]>::try_from(m.as_bytes()) {
            Ok(b) => b,
            Err(_) => {
                is.error(
                    "transport.kcp.guard_magic",
                    Some(q(m)),
                    format!("must be exactly 4 bytes (is {} bytes)", m.len()),
                );
                *b"PQT1"
            }
        },
    };
    let guard_window = int(
        is,
        "transport.kcp.guard_window",
        k.guard_window,
        30,
        1,
        3600,
    );
    let guard_skew = int(is, "transport.kcp.guard_skew", k.guard_skew, 1, 0, 10);
    let max_sessions = limit(
        is,
        "transport.kcp.max_sessions",
        k.max_sessions,
        512,
        1_000_000,
    );
    let max_streams_total = limit(
        is,
        "transport.kcp.max_streams_total",
        k.max_streams_total,
        16384,
        10_000_000,
    );
    let mut max_streams_per_session = limit(
        is,
        "transport.kcp.max_streams_per_session",
        k.max_streams_per_session,
        256,
        1_000_000,
    );
    if let (Some(per), Some(total)) = (max_streams_per_session, max_streams_total) {
        if per > total {
            if k.max_streams_per_session.is_some() {
                is.warn(
                    "transport.kcp.max_streams_per_session",
                    Some(per.to_string()),
                    format!("clamped to max_streams_total ({total})"),
                );
            }
            max_streams_per_session = Some(total);
        }
    }
    let header_timeout = int(
        is,
        "transport.kcp.header_timeout",
        k.header_timeout,
        10,
        1,
        3600,
    );

    // Cross-key rules.
    let local_port = ipv4
        .as_ref()
        .map(|f| f.port)
        .or(ipv6.as_ref().map(|f| f.port))
        .unwrap_or(0);
    if client && local_port != 0 && conn > 1 {
        is.error(
            "transport.conn",
            Some(conn.to_string()),
            format!("only one connection is allowed when a client port is explicitly set (network port {local_port})"),
        );
    }
    if let Some(ip) = server_addr.as_ref().and_then(HostPort::ip) {
        let (fam, configured) = match ip {
            IpAddr::V4(_) => ("IPv4", ipv4.is_some()),
            IpAddr::V6(_) => ("IPv6", ipv6.is_some()),
        };
        if !configured {
            is.error(
                "server.addr",
                server_raw.map(|s| q(s)),
                format!("server address is {fam}, but the {fam} interface is not configured (network.{})", fam.to_ascii_lowercase()),
            );
        }
    }
    if let Some(l) = &listen {
        if local_port != 0 && l.port != local_port {
            is.warn("listen.addr", Some(q(&l.to_string())), format!("port differs from the network address port {local_port}, which is the port actually served"));
        }
    }

    // metrics / debug / io.
    let metrics_listen = endpoint(
        is,
        "metrics.listen",
        raw.metrics.as_ref().and_then(|m| m.listen.as_ref()),
        false,
    );
    let pprof_raw = raw.debug.as_ref().and_then(|d| d.pprof.as_ref());
    let debug_pprof = endpoint(is, "debug.pprof", pprof_raw, false).filter(|hp| {
        let ok = hp.is_loopback();
        if !ok {
            is.error(
                "debug.pprof",
                pprof_raw.map(|s| q(s)),
                "must be a loopback address (127.0.0.1, ::1 or localhost)",
            );
        }
        ok
    });
    let io = raw.io.clone().unwrap_or_default();
    let backend = enumv(is, "io.backend", io.backend.as_ref(), Some(IoBackend::Auto))
        .unwrap_or(IoBackend::Auto);
    let workers = int(is, "io.workers", io.workers, 0, 0, 256);
    let cpus = enumv(is, "io.cpus", io.cpus.as_ref(), Some(CpuPin::Auto)).unwrap_or_default();

    let role = role?;
    Some(Config {
        role,
        log_level,
        listen,
        server: server_addr,
        socks5,
        forward,
        http,
        network: NetworkConfig {
            interface,
            guid: net.guid.clone(),
            ipv4,
            ipv6,
            local_flag,
            remote_flag,
            pcap_sockbuf: sockbuf as u32,
        },
        transport: TransportConfig {
            conn: conn as u32,
            kcp: KcpConfig {
                mode: mode_v,
                nodelay: nodelay as i32,
                interval: interval as i32,
                resend: resend as i32,
                nocongestion: nocongestion as i32,
                wdelay: k.wdelay.unwrap_or(false),
                acknodelay: k.acknodelay.unwrap_or(false),
                mtu: mtu as u32,
                rcvwnd,
                rcvwnd_auto,
                sndwnd,
                sndwnd_auto,
                window_mem: window_mem as u32,
                dshard: dshard as u32,
                pshard: pshard as u32,
                block,
                key,
                smuxbuf: smuxbuf as u32,
                streambuf: streambuf as u32,
                smuxkalive: smuxkalive as u32,
                smuxktimeout: smuxktimeout as u32,
                cc,
                bandwidth,
                guard,
                guard_magic,
                guard_window: guard_window as u32,
                guard_skew: guard_skew as u32,
                max_sessions,
                max_streams_total,
                max_streams_per_session,
                header_timeout: header_timeout as u32,
            },
        },
        metrics_listen,
        debug_pprof,
        io: IoConfig {
            backend,
            workers: workers as u32,
            cpus,
        },
    })
}

fn family_raw<A>(f: &FamilyConfig<A>, unspecified: A, fmt_ip: impl Fn(A) -> String) -> RawFamily
where
    A: Copy,
{
    let ip = fmt_ip(f.ip.unwrap_or(unspecified));
    RawFamily {
        addr: Some(format!("{ip}:{}", f.port)),
        router_mac: f.router_mac.map(|m| m.to_string()),
    }
}

fn limit_raw(l: Limit) -> Option<i64> {
    Some(l.map_or(-1, i64::from))
}

/// The configuration as serde structs with every value explicit (for `to_toml_string`).
pub(crate) fn to_raw(c: &Config) -> RawConfig {
    let k = &c.transport.kcp;
    let n = &c.network;
    RawConfig {
        role: Some(c.role.to_string()),
        log: Some(RawLog {
            level: Some(c.log_level.to_string()),
        }),
        listen: c.listen.as_ref().map(|l| RawAddr {
            addr: Some(l.to_string()),
        }),
        server: c.server.as_ref().map(|s| RawAddr {
            addr: Some(s.to_string()),
        }),
        network: Some(RawNetwork {
            interface: Some(n.interface.clone()),
            guid: n.guid.clone(),
            ipv4: n
                .ipv4
                .as_ref()
                .map(|f| family_raw(f, Ipv4Addr::UNSPECIFIED, |a| a.to_string())),
            ipv6: n
                .ipv6
                .as_ref()
                .map(|f| family_raw(f, Ipv6Addr::UNSPECIFIED, |a| format!("[{a}]"))),
            tcp: Some(RawTcp {
                local_flag: Some(n.local_flag.clone()),
                remote_flag: Some(n.remote_flag.clone()),
            }),
            pcap: Some(RawPcap {
                sockbuf: Some(i64::from(n.pcap_sockbuf)),
            }),
        }),
        transport: Some(RawTransport {
            protocol: Some("kcp".to_string()),
            conn: Some(i64::from(c.transport.conn)),
            kcp: Some(RawKcp {
                mode: Some(k.mode.to_string()),
                nodelay: Some(i64::from(k.nodelay)),
                interval: Some(i64::from(k.interval)),
                resend: Some(i64::from(k.resend)),
                nocongestion: Some(i64::from(k.nocongestion)),
                wdelay: Some(k.wdelay),
                acknodelay: Some(k.acknodelay),
                mtu: Some(i64::from(k.mtu)),
                rcvwnd: window_raw(k.rcvwnd, k.rcvwnd_auto),
                sndwnd: window_raw(k.sndwnd, k.sndwnd_auto),
                dshard: Some(i64::from(k.dshard)),
                pshard: Some(i64::from(k.pshard)),
                block: Some(k.block.clone()),
                key: (!k.key.is_empty()).then(|| k.key.clone()),
                smuxbuf: Some(i64::from(k.smuxbuf)),
                streambuf: Some(i64::from(k.streambuf)),
                smuxkalive: Some(i64::from(k.smuxkalive)),
                smuxktimeout: Some(i64::from(k.smuxktimeout)),
                cc: Some(k.cc.to_string()),
                bandwidth: k
                    .bandwidth
                    .and_then(|b| i64::try_from(b).ok())
                    .map(IntOrString::Int),
                window_mem: Some(i64::from(k.window_mem)),
                guard: Some(k.guard),
                guard_magic: Some(String::from_utf8_lossy(&k.guard_magic).into_owned()),
                guard_window: Some(i64::from(k.guard_window)),
                guard_skew: Some(i64::from(k.guard_skew)),
                max_sessions: limit_raw(k.max_sessions),
                max_streams_total: limit_raw(k.max_streams_total),
                max_streams_per_session: limit_raw(k.max_streams_per_session),
                header_timeout: Some(i64::from(k.header_timeout)),
            }),
        }),
        metrics: c.metrics_listen.as_ref().map(|m| RawMetrics {
            listen: Some(m.to_string()),
        }),
        debug: c.debug_pprof.as_ref().map(|d| RawDebug {
            pprof: Some(d.to_string()),
        }),
        io: Some(RawIo {
            backend: Some(c.io.backend.to_string()),
            workers: Some(i64::from(c.io.workers)),
            cpus: Some(c.io.cpus.to_string()),
        }),
        socks5: c
            .socks5
            .iter()
            .map(|s| RawSocks5 {
                listen: Some(s.listen.to_string()),
                username: Some(s.username.clone()),
                password: Some(s.password.clone()),
            })
            .collect(),
        forward: c
            .forward
            .iter()
            .map(|f| RawForward {
                listen: Some(f.listen.to_string()),
                target: Some(f.target.to_string()),
                protocol: Some(f.protocol.to_string()),
            })
            .collect(),
        http: c
            .http
            .iter()
            .map(|h| RawHttp {
                listen: Some(h.listen.to_string()),
                username: h.username.clone(),
                password: h.password.clone(),
            })
            .collect(),
    }
}
