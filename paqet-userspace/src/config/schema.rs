//! The key schema: one [`KeyInfo`] per leaf key. It drives the tree walk (unknown keys, types), the
//! validation messages (allowed ranges) and `docs/configuration.md` (checked by `tests/config_docs.rs`).

use super::Issue;

/// The TOML/YAML value type a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// A string (addresses, names, enums).
    Str,
    /// A signed integer.
    Int,
    /// `true` / `false`.
    Bool,
    /// An array of strings.
    StrList,
    /// An integer or a string (`sndwnd = "auto"`, `bandwidth = "100mbit"`); the value's meaning is checked
    /// by validation.
    IntOrStr,
}

impl KeyType {
    /// Human name used in type-error messages.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Str => "a string",
            KeyType::Int => "an integer",
            KeyType::Bool => "a boolean",
            KeyType::StrList => "an array of strings",
            KeyType::IntOrStr => "an integer or a string",
        }
    }
}

/// Which role a key applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Both roles.
    Any,
    /// Client only (an error in TOML on a server, ignored with a warning in imported YAML).
    Client,
    /// Server only (an error in TOML on a client, ignored with a warning in imported YAML).
    Server,
}

/// Description of one leaf key. Array-of-table members are written `socks5[].listen`.
#[derive(Debug, Clone, Copy)]
pub struct KeyInfo {
    /// Full dotted key path.
    pub path: &'static str,
    /// Value type checked by the tree walk.
    pub kind: KeyType,
    /// Type as shown in the documentation (`host:port`, `integer (bytes)`, …).
    pub type_text: &'static str,
    /// Default as shown in the documentation; `—` means no default.
    pub default: &'static str,
    /// Allowed values / range as shown in the documentation and in error messages.
    pub range: &'static str,
    /// Role the key applies to.
    pub scope: Scope,
    /// Whether upstream paqet alpha.21 knows the key (else it is a paqet-dp addition).
    pub upstream: bool,
    /// Upstream treats the Go zero value (0 / "") as unset; applied to imported YAML only.
    pub zero_is_unset: bool,
    /// One-line meaning.
    pub doc: &'static str,
}

#[allow(clippy::too_many_arguments)]
const fn k(
    path: &'static str,
    kind: KeyType,
    type_text: &'static str,
    default: &'static str,
    range: &'static str,
    scope: Scope,
    upstream: bool,
    doc: &'static str,
) -> KeyInfo {
    // Upstream keys of type int/string take Go zero values as "unset".
    let zero_is_unset = upstream && matches!(kind, KeyType::Int | KeyType::Str | KeyType::IntOrStr);
    KeyInfo {
        path,
        kind,
        type_text,
        default,
        range,
        scope,
        upstream,
        zero_is_unset,
        doc,
    }
}

use KeyType::{Bool, Int, IntOrStr, Str, StrList};
use Scope::{Any, Client, Server};

const R_PORT: &str = "host:port, port 1..=65535";
const FLAG_RANGE: &str = "1..=64 strings of letters F S R P A U E C N";
/// Allowed values of `transport.kcp.bandwidth` (what `proto::cc::parse_bandwidth` accepts).
const BW_RANGE: &str = "a number with a unit: kbit, mbit, gbit (bits/s) or kb, mb, gb, kib, mib, gib (bytes/s), e.g. \"100mbit\", \"12.5mb\"; or an integer of bytes/s; 1..=1000000000000 bytes/s";
/// Type text of `sndwnd`/`rcvwnd`.
const WND_TYPE: &str = "integer (packets) or auto";

static SCHEMA: &[KeyInfo] = &[
    k("role", Str, "string", "—", "client, server", Any, true, "Which end this process is (required)."),
    k("log.level", Str, "string", "none", "none, debug, info, warn, error, fatal", Any, true,
      "Log verbosity; `none` silences everything (upstream default)."),
    k("listen.addr", Str, "host:port", "—", R_PORT, Server, true,
      "Server only, required. Cosmetic upstream (logs, `dump`); should carry the port of `network.*.addr`."),
    k("server.addr", Str, "host:port", "—", R_PORT, Client, true,
      "Client only, required. The server's address; IP literal or host name; its family needs `network.ipv4`/`ipv6`."),
    k("socks5[].listen", Str, "host:port", "—", R_PORT, Client, true, "SOCKS5 listener address (client)."),
    k("socks5[].username", Str, "string", "\"\"", "any", Client, true,
      "RFC 1929 user; auth is required when username or password is non-empty."),
    k("socks5[].password", Str, "string", "\"\"", "any", Client, true, "RFC 1929 password."),
    k("forward[].listen", Str, "host:port", "—", R_PORT, Client, true, "Local listener of a port forward (client)."),
    k("forward[].target", Str, "host:port", "—", R_PORT, Client, true,
      "Destination of the forward; the host is resolved on the server."),
    k("forward[].protocol", Str, "string", "—", "tcp, udp", Client, true, "Forwarded protocol."),
    k("http[].listen", Str, "host:port", "—", R_PORT, Client, false, "HTTP proxy listener (CONNECT and plain GET; client)."),
    k("http[].username", Str, "string", "— (no auth)", "set together with password", Client, false,
      "Basic proxy-auth user."),
    k("http[].password", Str, "string", "— (no auth)", "set together with username", Client, false,
      "Basic proxy-auth password."),
    k("network.interface", Str, "string", "—", "1..=15 characters", Any, true,
      "Interface to capture on and inject into (required; existence is checked at run time)."),
    k("network.guid", Str, "string", "—", "any (ignored on Linux)", Any, true,
      "Windows Npcap device GUID; accepted for compatibility and ignored."),
    k("network.ipv4.addr", Str, "ip:port", "— (interface address, port 0)",
      "IPv4 literal or empty host, port 0..=65535 (server: 1..=65535)", Any, true,
      "Local IPv4 address and port of the fake TCP flow; empty/0.0.0.0 host = taken from the interface; port 0 = random per connection."),
    k("network.ipv4.router_mac", Str, "MAC", "— (kernel neighbour table)", "aa:bb:cc:dd:ee:ff", Any, true,
      "Ethernet destination (next hop) for IPv4; resolved from the kernel when omitted."),
    k("network.ipv6.addr", Str, "ip:port", "— (interface address, port 0)",
      "IPv6 literal in brackets or empty host, port 0..=65535 (server: 1..=65535); same port as ipv4", Any, true,
      "Local IPv6 address and port; same rules as `network.ipv4.addr`."),
    k("network.ipv6.router_mac", Str, "MAC", "— (kernel neighbour table)", "aa:bb:cc:dd:ee:ff", Any, true,
      "Ethernet destination (next hop) for IPv6; resolved from the kernel when omitted."),
    k("network.tcp.local_flag", StrList, "array of strings", "[\"PA\"]", FLAG_RANGE, Any, true,
      "TCP flag combinations this side puts on the packets it sends, cycled round-robin."),
    k("network.tcp.remote_flag", StrList, "array of strings", "[\"PA\"]", FLAG_RANGE, Any, true,
      "Flags the client asks the server to use towards it (sent in PTCPF); ignored on a server."),
    k("network.pcap.sockbuf", Int, "integer (bytes)", "server 8388608, client 4194304", "1024..=104857600", Any, true,
      "Capture buffer size (warning when not a power of two)."),
    k("transport.protocol", Str, "string", "—", "kcp", Any, true, "Transport; must be `kcp` (required)."),
    k("transport.conn", Int, "integer", "1", "1..=256", Any, true,
      "Client: number of parallel KCP sessions, each with its own source port. Ignored by a server."),
    k("transport.kcp.mode", Str, "string", "fast", "normal, fast, fast2, fast3, manual", Any, true,
      "KCP preset (nodelay/interval/resend/nocongestion/wdelay/acknodelay); `manual` uses the keys below."),
    k("transport.kcp.nodelay", Int, "integer", "0", "0..=2", Any, true, "KCP nodelay (manual mode only)."),
    k("transport.kcp.interval", Int, "integer (ms)", "0", "0..=5000", Any, true,
      "KCP update interval (manual mode only; values below 10 act as 10)."),
    k("transport.kcp.resend", Int, "integer", "0", "0..=65535", Any, true, "KCP fast-resend threshold (manual mode only)."),
    k("transport.kcp.nocongestion", Int, "integer", "0", "0..=1", Any, true,
      "1 disables KCP congestion control (manual mode only)."),
    k("transport.kcp.wdelay", Bool, "bool", "false", "true, false", Any, true,
      "Delay writes to batch them (manual mode only)."),
    k("transport.kcp.acknodelay", Bool, "bool", "false", "true, false", Any, true,
      "Send ACKs immediately (manual mode only)."),
    k("transport.kcp.mtu", Int, "integer (bytes)", "1350", "50..=1500", Any, true,
      "Largest TCP payload, including crypto/FEC headers."),
    k("transport.kcp.rcvwnd", IntOrStr, WND_TYPE, "auto (TOML), server 1024, client 512 (imported YAML)",
      "1..=32768, or auto", Any, true,
      "KCP receive window. `auto` starts at server 1024, client 512 and grows up to `window_mem`; an integer is a fixed window (upstream)."),
    k("transport.kcp.sndwnd", IntOrStr, WND_TYPE, "auto (TOML), server 1024, client 128 (imported YAML)",
      "1..=32768, or auto", Any, true,
      "KCP send window. `auto` starts at server 1024, client 128 and grows up to `window_mem`; an integer is a fixed window (upstream)."),
    k("transport.kcp.dshard", Int, "integer", "0", "0..=255", Any, true,
      "FEC data shards; FEC is on only when dshard and pshard are both > 0 (must match the peer)."),
    k("transport.kcp.pshard", Int, "integer", "0", "0..=255, dshard + pshard <= 256", Any, true,
      "FEC parity shards (must match the peer)."),
    k("transport.kcp.block", Str, "string", "aes",
      "aes, aes-128, aes-128-gcm, aes-192, salsa20, blowfish, twofish, cast5, 3des, tea, xtea, xor, sm4, none, null",
      Any, true, "Packet cipher (kcp-go block crypt)."),
    k("transport.kcp.key", Str, "string", "—", "non-empty string", Any, true,
      "Shared secret (`paqet-dp secret`); required unless block is none/null and guard is off."),
    k("transport.kcp.smuxbuf", Int, "integer (bytes)", "4194304", "1024..=2147483647", Any, true,
      "smux MaxReceiveBuffer (per session)."),
    k("transport.kcp.streambuf", Int, "integer (bytes)", "2097152", "1024..=smuxbuf", Any, true,
      "smux MaxStreamBuffer (per stream)."),
    k("transport.kcp.smuxkalive", Int, "integer (s)", "2", "1..=3600", Any, true, "smux keep-alive interval."),
    k("transport.kcp.smuxktimeout", Int, "integer (s)", "8", "smuxkalive..=86400", Any, true,
      "smux keep-alive timeout (session closed when nothing is received for this long)."),
    k("transport.kcp.cc", Str, "string", "bbr", "bbr, fixed, off", Any, false,
      "Sender congestion control and pacing: `bbr` estimates the path, `fixed` paces at `bandwidth`, `off` is upstream's unpaced window bursts. The wire is unchanged."),
    k("transport.kcp.bandwidth", IntOrStr, "rate or integer (bytes/s)", "— (required for cc = fixed)", BW_RANGE, Any, false,
      "Pacing rate of `cc = \"fixed\"` (ignored with a warning for other cc)."),
    k("transport.kcp.window_mem", Int, "integer (bytes)", "33554432", "1048576..=1073741824", Any, false,
      "Memory cap of an auto-tuned window: it grows to at most min(32768, window_mem / mtu) packets (never below its start)."),
    k("transport.kcp.guard", Bool, "bool", "true (TOML), false (imported YAML)", "true, false", Any, false,
      "Prefix every datagram with magic + rotating HMAC cookie; drops foreign packets before decryption. Not upstream-compatible."),
    k("transport.kcp.guard_magic", Str, "string", "PQT1", "exactly 4 bytes", Any, false, "Guard magic prefix."),
    k("transport.kcp.guard_window", Int, "integer (s)", "30", "1..=3600", Any, false, "Guard cookie rotation period."),
    k("transport.kcp.guard_skew", Int, "integer", "1", "0..=10", Any, false,
      "Number of previous guard windows still accepted."),
    k("transport.kcp.max_sessions", Int, "integer", "512", "-1 (unlimited) or 1..=1000000", Any, false,
      "Server: maximum concurrent KCP sessions; new sessions over the limit are closed."),
    k("transport.kcp.max_streams_total", Int, "integer", "16384", "-1 (unlimited) or 1..=10000000", Any, false,
      "Server: maximum concurrent proxied streams (PTCP/PUDP) over all sessions; control streams (PTCPF, ping) are not counted."),
    k("transport.kcp.max_streams_per_session", Int, "integer", "256", "-1 (unlimited) or 1..=1000000", Any, false,
      "Server: maximum concurrent proxied streams (PTCP/PUDP) per session (clamped to max_streams_total)."),
    k("transport.kcp.header_timeout", Int, "integer (s)", "10", "1..=3600", Any, false,
      "Server: time allowed to receive a new stream's paqet header."),
    k("metrics.listen", Str, "host:port", "— (off)", R_PORT, Any, false,
      "Serve Prometheus metrics and /healthz over HTTP on this address."),
    k("debug.pprof", Str, "host:port", "— (off)", "loopback host (127.0.0.1, ::1, localhost), port 1..=65535", Any, false,
      "Debug/profiling HTTP endpoint; must be loopback."),
    k("io.backend", Str, "string", "auto", "auto, afxdp, pcap", Any, false,
      "Packet I/O backend; `auto` prefers AF_XDP and falls back to pcap."),
    k("io.workers", Int, "integer", "0", "0 (one per RX queue, capped by CPU cores) or 1..=256", Any, false,
      "Number of packet worker threads."),
    k("io.cpus", Str, "string", "auto", "auto, none, or a CPU list such as \"0-3,6\" (CPUs 0..=1023)", Any, false,
      "CPUs the XDP workers pin to: worker i on the i-th CPU (wrapping). auto = the process's CPU affinity mask (taskset, systemd CPUAffinity=, a cpuset); none = no pinning."),
];

/// Every leaf key the configuration knows, in documentation order.
pub fn schema() -> &'static [KeyInfo] {
    SCHEMA
}

/// Looks up a leaf key by its schema path (`socks5[].listen`).
pub fn key_info(path: &str) -> Option<&'static KeyInfo> {
    SCHEMA.iter().find(|k| k.path == path)
}

/// Looks up a leaf key, panicking on a typo in our own code (paths are compile-time constants).
pub(crate) fn info(path: &str) -> &'static KeyInfo {
    match key_info(path) {
        Some(k) => k,
        None => panic!("config schema has no key {path}"),
    }
}

/// Whether the TOML/YAML source is our own (strict) or an imported upstream YAML (lenient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// TOML: unknown keys and misplaced role keys are errors.
    Strict,
    /// Upstream YAML: unknown keys are warnings, Go zero values mean "unset", scalars coerce to strings.
    Lenient,
}

/// Collected problems.
#[derive(Debug, Default)]
pub(crate) struct Issues {
    pub errors: Vec<Issue>,
    pub warnings: Vec<Issue>,
}

impl Issues {
    pub fn error(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(Issue {
            key: key.into(),
            value,
            message: message.into(),
        });
    }
    pub fn warn(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) {
        self.warnings.push(Issue {
            key: key.into(),
            value,
            message: message.into(),
        });
    }
    /// An error in strict mode, a warning in lenient mode.
    pub fn strict(
        &mut self,
        mode: Mode,
        key: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) {
        match mode {
            Mode::Strict => self.error(key, value, message),
            Mode::Lenient => self.warn(key, value, message),
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Whether some leaf lives under `prefix` followed by `sep` (`.` for a table, `[].` for an array of tables).
fn has_children(prefix: &str, sep: &str) -> bool {
    SCHEMA.iter().any(|k| {
        k.path.len() > prefix.len() + sep.len()
            && k.path.starts_with(prefix)
            && k.path[prefix.len()..].starts_with(sep)
    })
}

/// Direct child names known under a schema prefix (for "unknown key" hints).
fn children(prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in SCHEMA {
        let rest = if prefix.is_empty() {
            Some(k.path)
        } else {
            k.path
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('.'))
        };
        if let Some(rest) = rest {
            let name = rest.split(['.', '[']).next().unwrap_or(rest).to_string();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// Levenshtein distance, for "did you mean" hints on short key names.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn unknown_message(schema_prefix: &str, key: &str, full: &str) -> String {
    let known = children(schema_prefix);
    let mut msg = String::from("unknown key");
    match full {
        "transport.tcpbuf" | "transport.udpbuf" => {
            msg.push_str(" (removed upstream in alpha.21: the TCP copy buffer is fixed at 8 KiB and UDP datagrams at 4 KiB)");
        }
        "pprof" | "debug.diag" => msg.push_str(" (use debug.pprof / metrics.listen)"),
        _ => {}
    }
    if let Some(best) = known
        .iter()
        .filter(|c| distance(c, key) <= 2)
        .min_by_key(|c| distance(c, key))
    {
        msg.push_str(&format!(
            "; did you mean `{}`?",
            join(schema_prefix, best).replace("[]", "[…]")
        ));
    } else if !known.is_empty() {
        let place = if schema_prefix.is_empty() {
            "at top level".to_string()
        } else {
            format!("in {schema_prefix}")
        };
        msg.push_str(&format!("; known keys {place}: {}", known.join(", ")));
    }
    msg
}

/// Short rendering of a value for messages (strings quoted, tables/arrays abbreviated).
pub(crate) fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(_) => "{…}".to_string(),
        other => {
            let s = other.to_string();
            if s.chars().count() > 80 {
                let cut: String = s.chars().take(77).collect();
                format!("{cut}…")
            } else {
                s
            }
        }
    }
}

/// Checks one leaf value's type; returns the value to keep (after lenient coercion) or `None` when the
/// key is to be treated as absent.
fn check_leaf(
    info: &KeyInfo,
    v: &toml::Value,
    disp: &str,
    mode: Mode,
    issues: &mut Issues,
) -> Option<toml::Value> {
    use toml::Value as V;
    let coerced = match (info.kind, v) {
        (KeyType::Str, V::String(_))
        | (KeyType::Int, V::Integer(_))
        | (KeyType::Bool, V::Boolean(_)) => Some(v.clone()),
        (KeyType::StrList, V::Array(items)) if items.iter().all(|i| i.is_str()) => Some(v.clone()),
        (KeyType::IntOrStr, V::Integer(_) | V::String(_)) => Some(v.clone()),
        (KeyType::IntOrStr, V::Float(f)) if mode == Mode::Lenient => Some(V::String(f.to_string())),
        // Upstream YAML: Go unmarshals plain scalars into string fields.
        (KeyType::Str, V::Integer(i)) if mode == Mode::Lenient => Some(V::String(i.to_string())),
        (KeyType::Str, V::Float(f)) if mode == Mode::Lenient => Some(V::String(f.to_string())),
        (KeyType::Str, V::Boolean(b)) if mode == Mode::Lenient => Some(V::String(b.to_string())),
        _ => None,
    };
    let Some(value) = coerced else {
        issues.error(
            disp,
            Some(show(v)),
            format!("must be {} ({})", info.kind.name(), info.range),
        );
        return None;
    };
    if mode == Mode::Lenient && info.zero_is_unset {
        match &value {
            V::Integer(0) => return None,
            V::String(s) if s.is_empty() => return None,
            _ => {}
        }
    }
    Some(value)
}

/// Walks a parsed document against the schema. Unknown keys and wrongly typed values are reported (with
/// full key paths) and left out of the returned table, which then deserializes without error.
pub(crate) fn walk(root: &toml::Table, mode: Mode, issues: &mut Issues) -> toml::Table {
    walk_table(root, "", "", mode, issues)
}

fn walk_table(
    tbl: &toml::Table,
    sprefix: &str,
    dprefix: &str,
    mode: Mode,
    issues: &mut Issues,
) -> toml::Table {
    let mut out = toml::Table::new();
    for (key, v) in tbl {
        let spath = join(sprefix, key);
        let dpath = join(dprefix, key);
        if let Some(info) = key_info(&spath) {
            if let Some(kept) = check_leaf(info, v, &dpath, mode, issues) {
                out.insert(key.clone(), kept);
            }
        } else if has_children(&spath, "[].") {
            let array_spath = format!("{spath}[]");
            match v {
                toml::Value::Array(items) => {
                    let mut kept = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        let idisp = format!("{dpath}[{i}]");
                        match item {
                            toml::Value::Table(t) => kept.push(toml::Value::Table(walk_table(
                                t,
                                &array_spath,
                                &idisp,
                                mode,
                                issues,
                            ))),
                            other => issues.error(idisp, Some(show(other)), "must be a table"),
                        }
                    }
                    out.insert(key.clone(), toml::Value::Array(kept));
                }
                other => issues.error(dpath, Some(show(other)), "must be an array of tables"),
            }
        } else if has_children(&spath, ".") {
            match v {
                toml::Value::Table(t) => {
                    out.insert(
                        key.clone(),
                        toml::Value::Table(walk_table(t, &spath, &dpath, mode, issues)),
                    );
                }
                other => issues.error(dpath, Some(show(other)), "must be a table"),
            }
        } else {
            issues.strict(
                mode,
                dpath,
                Some(show(v)),
                unknown_message(sprefix, key, &spath),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_unique_and_tables_consistent() {
        for (i, a) in SCHEMA.iter().enumerate() {
            for b in &SCHEMA[i + 1..] {
                assert_ne!(a.path, b.path, "duplicate schema key");
                // A leaf may not also be a table prefix.
                assert!(
                    !b.path.starts_with(&format!("{}.", a.path)),
                    "{} is both leaf and table",
                    a.path
                );
            }
        }
        assert!(has_children("transport", "."));
        assert!(has_children("socks5", "[]."));
        assert!(!has_children("socks5", "."));
    }

    #[test]
    fn unknown_key_hints() {
        assert!(
            unknown_message("transport.kcp", "mtuu", "transport.kcp.mtuu")
                .contains("did you mean `transport.kcp.mtu`")
        );
        assert!(unknown_message("", "zzzzzzzz", "zzzzzzzz")
            .contains("known keys at top level: role, log"));
        assert!(unknown_message("transport", "tcpbuf", "transport.tcpbuf").contains("alpha.21"));
    }
}
