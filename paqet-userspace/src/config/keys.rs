//! The key table: one [`KeyInfo`] per leaf key, with its type, typed default, typed allowed range and a
//! one-line meaning. It is the single source of every default and range in `config/`: the tree walk
//! (`schema.rs`) takes the types from it, validation (`build.rs`) takes the defaults, the bounds and the
//! "must be …" texts from it, `paqet-dp config keys` prints it, and `tests/config_docs.rs` checks it against
//! the key table of `docs/configuration.md`.
//!
//! Imported upstream YAML uses the same key paths as the TOML (the loader maps no names), so one path per
//! key is enough.

use std::fmt;

use super::targets::TARGET_RULE_SYNTAX;
use super::types::{Role, BLOCK_MODES, MAX_CPU, TCP_FLAG_LETTERS};
use super::{ForwardProtocol, IoBackend, KcpMode, LogLevel, MAX_WND};

/// Default of `transport.kcp.replay_filter` in TOML.
pub const DEFAULT_REPLAY_FILTER: &str = "/var/lib/paqet-dp/replay.bin";

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
    /// A string or an array of strings (`server.addr`: one server or several).
    StrOrList,
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
            KeyType::StrOrList => "a string or an array of strings",
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

/// A key's default value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Def {
    /// No default (required, or off/absent); the note says what happens when the key is absent.
    Absent(Option<&'static str>),
    /// An integer.
    Int(i64),
    /// An integer depending on `role`.
    ByRole {
        /// Default of a server.
        server: i64,
        /// Default of a client.
        client: i64,
    },
    /// A boolean.
    Bool(bool),
    /// A string (an enum value, a name…).
    Str(&'static str),
    /// An array of strings.
    List(&'static [&'static str]),
    /// A default that differs between paqet-dp TOML and imported upstream YAML.
    PerFormat {
        /// Default in TOML.
        toml: &'static Def,
        /// Default in imported YAML.
        yaml: &'static Def,
    },
}

impl Def {
    /// The default in effect for a source format (`yaml` = imported upstream YAML).
    pub fn for_format(&self, yaml: bool) -> &Def {
        match self {
            Def::PerFormat { toml, yaml: y } => {
                if yaml {
                    y
                } else {
                    toml
                }
            }
            other => other,
        }
    }

    /// The integer default for a role (client defaults when the role is unknown).
    pub fn int(&self, role: Option<Role>) -> Option<i64> {
        match *self {
            Def::Int(i) => Some(i),
            Def::ByRole { server, client } => Some(if role == Some(Role::Server) {
                server
            } else {
                client
            }),
            _ => None,
        }
    }
}

impl fmt::Display for Def {
    /// As the documentation shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Def::Absent(None) => f.write_str("—"),
            Def::Absent(Some(note)) => write!(f, "— ({note})"),
            Def::Int(i) => write!(f, "{i}"),
            Def::ByRole { server, client } => write!(f, "server {server}, client {client}"),
            Def::Bool(b) => write!(f, "{b}"),
            Def::Str("") => f.write_str("\"\""),
            Def::Str(s) => f.write_str(s),
            Def::List(items) => {
                let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
                write!(f, "[{}]", quoted.join(", "))
            }
            Def::PerFormat { toml, yaml } => write!(f, "{toml} (TOML), {yaml} (imported YAML)"),
        }
    }
}

/// The values a key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// An inclusive integer range; `note` (may be empty) adds a rule or a meaning.
    Int {
        /// Smallest value.
        lo: i64,
        /// Largest value.
        hi: i64,
        /// Appended after ", " when non-empty.
        note: &'static str,
    },
    /// `-1` (unlimited) or `1..=hi`.
    Limit(i64),
    /// A KCP window: `1..=hi` packets (a fixed window) or `auto`.
    Window(i64),
    /// From `lo` up to the value of another key of the same table.
    UpToKey {
        /// Smallest value.
        lo: i64,
        /// Name of the key (in the same table) that bounds it from above.
        key: &'static str,
    },
    /// From the value of another key of the same table up to `hi`.
    FromKey {
        /// Name of the key (in the same table) that bounds it from below.
        key: &'static str,
        /// Largest value.
        hi: i64,
    },
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// A string of `lo..=hi` bytes.
    Len {
        /// Shortest.
        lo: usize,
        /// Longest.
        hi: usize,
    },
    /// FEC parity shards: `0..=hi`, and `dshard + pshard <= sum`.
    FecShards {
        /// Largest value.
        hi: i64,
        /// Largest `dshard + pshard`.
        sum: i64,
    },
    /// A string of exactly this many bytes.
    Bytes(usize),
    /// `1..=max` strings of TCP flag letters.
    Flags {
        /// Most entries.
        max: usize,
    },
    /// `host:port` with port 1..=65535.
    Endpoint,
    /// A loopback `host:port` with port 1..=65535.
    LoopbackEndpoint,
    /// `auto`, `none` or a CPU list.
    Cpus,
    /// Described in prose (checked by a dedicated parser).
    Text(&'static str),
}

/// The TCP flag letters, space separated, for messages.
pub(crate) fn flag_letters() -> String {
    let letters: Vec<String> = TCP_FLAG_LETTERS.chars().map(String::from).collect();
    letters.join(" ")
}

impl Allowed {
    /// The range text with the current value of the bounding key (`1024..=smuxbuf (4194304)`,
    /// `smuxkalive (10)..=86400`); other ranges are shown as they are.
    pub fn with_bound(&self, bound: i64) -> String {
        match *self {
            Allowed::UpToKey { lo, key } => format!("{lo}..={key} ({bound})"),
            Allowed::FromKey { key, hi } => format!("{key} ({bound})..={hi}"),
            other => other.to_string(),
        }
    }
}

/// Port range of a listening or target endpoint.
pub const PORT_RANGE: &str = "1..=65535";

impl fmt::Display for Allowed {
    /// As the documentation and the "must be …" messages show it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Allowed::Int { lo, hi, note: "" } => write!(f, "{lo}..={hi}"),
            Allowed::Int { lo, hi, note } => write!(f, "{lo}..={hi}, {note}"),
            Allowed::Limit(hi) => write!(f, "-1 (unlimited) or 1..={hi}"),
            Allowed::Window(hi) => write!(f, "1..={hi}, or auto"),
            Allowed::UpToKey { lo, key } => write!(f, "{lo}..={key}"),
            Allowed::FromKey { key, hi } => write!(f, "{key}..={hi}"),
            Allowed::OneOf(words) => f.write_str(&words.join(", ")),
            Allowed::Len { lo, hi } => write!(f, "{lo}..={hi} bytes"),
            Allowed::FecShards { hi, sum } => write!(f, "0..={hi}, dshard + pshard <= {sum}"),
            Allowed::Bytes(n) => write!(f, "exactly {n} bytes"),
            Allowed::Flags { max } => write!(f, "1..={max} strings of letters {}", flag_letters()),
            Allowed::Endpoint => write!(f, "host:port, port {PORT_RANGE}"),
            Allowed::LoopbackEndpoint => write!(
                f,
                "loopback host (127.0.0.1, ::1, localhost), port {PORT_RANGE}"
            ),
            Allowed::Cpus => write!(
                f,
                "auto, none, or a CPU list such as \"0-3,6\" (CPUs 0..={MAX_CPU})"
            ),
            Allowed::Text(t) => f.write_str(t),
        }
    }
}

/// Description of one leaf key. Array-of-table members are written `socks5[].listen`.
#[derive(Debug, Clone, Copy)]
pub struct KeyInfo {
    /// Full dotted key path (the same in TOML and imported YAML).
    pub path: &'static str,
    /// Value type checked by the tree walk.
    pub kind: KeyType,
    /// Type as shown in the documentation (`host:port`, `integer (bytes)`, …).
    pub type_text: &'static str,
    /// Default value.
    pub def: Def,
    /// Allowed values.
    pub allowed: Allowed,
    /// Role the key applies to.
    pub scope: Scope,
    /// Whether upstream paqet alpha.21 knows the key (else it is a paqet-dp addition).
    pub upstream: bool,
    /// Upstream treats the Go zero value (0 / "") as unset; applied to imported YAML only.
    pub zero_is_unset: bool,
    /// One-line meaning.
    pub doc: &'static str,
}

impl KeyInfo {
    /// The default as the documentation shows it (`—` = no default).
    pub fn default_text(&self) -> String {
        self.def.to_string()
    }

    /// The allowed values as the documentation and the error messages show them.
    pub fn range_text(&self) -> String {
        self.allowed.to_string()
    }
}

#[allow(clippy::too_many_arguments)]
const fn k(
    path: &'static str,
    kind: KeyType,
    type_text: &'static str,
    def: Def,
    allowed: Allowed,
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
        def,
        allowed,
        scope,
        upstream,
        zero_is_unset,
        doc,
    }
}

/// An inclusive integer range without a note.
const fn int(lo: i64, hi: i64) -> Allowed {
    Allowed::Int { lo, hi, note: "" }
}

use Allowed::{Endpoint, OneOf};
use Def::{Absent, Bool as DBool, Int as DInt, Str as DStr};
use KeyType::{Bool, Int, IntOrStr, Str, StrList, StrOrList};
use Scope::{Any, Client, Server};

const MIB: i64 = 1024 * 1024;
const BOOLS: Allowed = OneOf(&["true", "false"]);
/// Allowed values of `transport.kcp.bandwidth` (what `proto::cc::parse_bandwidth` accepts).
const BW_RANGE: &str = "a number with a unit: kbit, mbit, gbit (bits/s) or kb, mb, gb, kib, mib, gib (bytes/s), e.g. \"100mbit\", \"12.5mb\"; or an integer of bytes/s; 1..=1000000000000 bytes/s";
/// Type text of `sndwnd`/`rcvwnd`.
const WND_TYPE: &str = "integer (packets) or auto";
/// Address of the fake TCP flow: resolved from the interface when absent.
const FAMILY_ADDR_DEF: Def = Absent(Some("interface address, port 0"));
/// Next hop: resolved from the kernel when absent.
const MAC_DEF: Def = Absent(Some("kernel neighbour table"));
const MAC_RANGE: Allowed = Allowed::Text("aa:bb:cc:dd:ee:ff");
/// Upstream's fixed windows, where an auto-tuned window starts.
const RCVWND_DEF: Def = Def::ByRole {
    server: 1024,
    client: 512,
};
const SNDWND_DEF: Def = Def::ByRole {
    server: 1024,
    client: 128,
};

static SCHEMA: &[KeyInfo] = &[
    k("role", Str, "string", Absent(None), OneOf(Role::ALL), Any, true, "Which end this process is (required)."),
    k("log.level", Str, "string", DStr("none"), OneOf(LogLevel::ALL), Any, true,
      "Log verbosity; `none` silences everything (upstream default)."),
    k("listen.addr", Str, "host:port", Absent(None), Endpoint, Server, true,
      "Server only, required. Cosmetic upstream (logs, `dump`); should carry the port of `network.*.addr`."),
    k("server.addr", StrOrList, "host:port or array", Absent(None), Endpoint, Client, true,
      "Client only, required (unless `[[server.servers]]`). The server's address; IP literal or host name; its family needs `network.ipv4`/`ipv6`. An array of 1..=32 addresses (paqet-dp, also in YAML) spreads `transport.conn` sessions over several servers (weight 1 each)."),
    k("server.servers[].addr", Str, "host:port", Absent(None), Endpoint, Client, false,
      "Several servers (paqet-dp, TOML `[[server.servers]]`, instead of `server.addr`): one server's address. Up to 32 tables."),
    k("server.servers[].weight", Int, "integer", DInt(1), int(1, 100), Client, false,
      "That server's share of `transport.conn` sessions relative to the others (smooth weighted round robin over the healthy servers)."),
    // Hardening: server dial targets (targets.rs, docs/security.md).
    k("server.allow", StrList, "array of strings", Absent(Some("off: every target")), Allowed::Text(TARGET_RULE_SYNTAX), Server, false,
      "Server: dial targets (after DNS) allowed; when set, others are refused. With allow or deny set, loopback/link-local need an entry inside their range."),
    k("server.deny", StrList, "array of strings", Absent(Some("off")), Allowed::Text(TARGET_RULE_SYNTAX), Server, false,
      "Server: dial targets (after DNS) refused; wins over server.allow."),
    k("server.reverse_allow", StrList, "array of strings", Absent(Some("off: reverse forwards refused")),
      Allowed::Text("IP:port listen addresses, port 1..=65535, e.g. \"0.0.0.0:8022\", \"[::1]:5353\""), Server, false,
      "Server: the addresses a client's `[[reverse]]` may make the server listen on (tcp and udp); a declared remote must equal an entry."),
    k("socks5[].listen", Str, "host:port", Absent(None), Endpoint, Client, true, "SOCKS5 listener address (client)."),
    k("socks5[].username", Str, "string", DStr(""), Allowed::Text("any"), Client, true,
      "RFC 1929 user; auth is required when username or password is non-empty."),
    k("socks5[].password", Str, "string", DStr(""), Allowed::Text("any"), Client, true, "RFC 1929 password."),
    k("socks5[].allow_open_proxy", Bool, "boolean", DBool(false), BOOLS, Client, false,
      "Start a SOCKS5 listener on a non-loopback address without username/password (TOML refuses otherwise; imported YAML warns)."),
    k("forward[].listen", Str, "host:port", Absent(None), Endpoint, Client, true, "Local listener of a port forward (client)."),
    k("forward[].target", Str, "host:port", Absent(None), Endpoint, Client, true,
      "Destination of the forward; the host is resolved on the server."),
    k("forward[].protocol", Str, "string", Absent(None), OneOf(ForwardProtocol::ALL), Client, true, "Forwarded protocol."),
    k("reverse[].name", Str, "string", Absent(Some("protocol/remote")), Allowed::Text("1..=64 of A-Z a-z 0-9 . _ -, unique"), Client, false,
      "Label of a reverse forward in logs and metrics."),
    k("reverse[].remote", Str, "ip:port", Absent(None), Allowed::Text("IP literal:port, port 1..=65535, unique per protocol"), Client, false,
      "Address the SERVER listens on for this reverse forward; must be in the server's server.reverse_allow."),
    k("reverse[].target", Str, "host:port", Absent(None), Endpoint, Client, false,
      "Where the client carries each connection to; the host is resolved on the client."),
    k("reverse[].protocol", Str, "string", Absent(None), OneOf(ForwardProtocol::ALL), Client, false, "Reverse-forwarded protocol."),
    k("http[].listen", Str, "host:port", Absent(None), Endpoint, Client, false, "HTTP proxy listener (CONNECT and plain GET; client)."),
    k("http[].username", Str, "string", Absent(Some("no auth")), Allowed::Text("set together with password"), Client, false,
      "Basic proxy-auth user."),
    k("http[].password", Str, "string", Absent(Some("no auth")), Allowed::Text("set together with username"), Client, false,
      "Basic proxy-auth password."),
    k("http[].allow_open_proxy", Bool, "boolean", DBool(false), BOOLS, Client, false,
      "Start an HTTP proxy listener on a non-loopback address without username/password (refused otherwise)."),
    k("network.interface", Str, "string", Absent(None), Allowed::Len { lo: 1, hi: 15 }, Any, true,
      "Interface to capture on and inject into (required; existence is checked at run time)."),
    k("network.guid", Str, "string", Absent(None), Allowed::Text("any (ignored on Linux)"), Any, true,
      "Windows Npcap device GUID; accepted for compatibility and ignored."),
    k("network.ipv4.addr", Str, "ip:port", FAMILY_ADDR_DEF,
      Allowed::Text("IPv4 literal or empty host, port 0..=65535 (server: 1..=65535)"), Any, true,
      "Local IPv4 address and port of the fake TCP flow; empty/0.0.0.0 host = taken from the interface; port 0 = random per connection."),
    k("network.ipv4.router_mac", Str, "MAC", MAC_DEF, MAC_RANGE, Any, true,
      "Ethernet destination (next hop) for IPv4; resolved from the kernel when omitted."),
    k("network.ipv6.addr", Str, "ip:port", FAMILY_ADDR_DEF,
      Allowed::Text("IPv6 literal in brackets or empty host, port 0..=65535 (server: 1..=65535); same port as ipv4"), Any, true,
      "Local IPv6 address and port; same rules as `network.ipv4.addr`."),
    k("network.ipv6.router_mac", Str, "MAC", MAC_DEF, MAC_RANGE, Any, true,
      "Ethernet destination (next hop) for IPv6; resolved from the kernel when omitted."),
    k("network.tcp.local_flag", StrList, "array of strings", Def::List(&["PA"]), Allowed::Flags { max: 64 }, Any, true,
      "TCP flag combinations this side puts on the packets it sends, cycled round-robin."),
    k("network.tcp.remote_flag", StrList, "array of strings", Def::List(&["PA"]), Allowed::Flags { max: 64 }, Any, true,
      "Flags the client asks the server to use towards it (sent in PTCPF); ignored on a server."),
    k("network.pcap.sockbuf", Int, "integer (bytes)", Def::ByRole { server: 8 * MIB, client: 4 * MIB },
      int(1024, 100 * MIB), Any, true, "Capture buffer size (warning when not a power of two)."),
    k("transport.protocol", Str, "string", Absent(None), OneOf(&["kcp"]), Any, true, "Transport; must be `kcp` (required)."),
    k("transport.conn", Int, "integer", DInt(1), int(1, 256), Any, true,
      "Client: number of parallel KCP sessions, each with its own source port. Ignored by a server."),
    // Client session rotation (paqet-dp; each session is an ordinary upstream session).
    k("transport.rotate.after", Int, "integer (s)", DInt(0),
      Allowed::Int { lo: 0, hi: 604_800, note: "0 = off" }, Any, false,
      "Client: replace each session after about this long (±20 % jitter): a fresh session from a new source port takes the new streams, the old one drains. Ignored by a server."),
    k("transport.rotate.bytes", Int, "integer (bytes)", DInt(0),
      Allowed::Int { lo: 0, hi: 1 << 50, note: "0 = off" }, Any, false,
      "Client: replace each session once it has carried this many bytes (both directions, on the wire). Ignored by a server."),
    k("transport.rotate.drain", Int, "integer (s)", DInt(300), int(1, 86_400), Any, false,
      "Client: how long a replaced session keeps carrying its open streams; it closes when they have all ended or this has passed."),
    k("transport.kcp.mode", Str, "string", DStr("fast"), OneOf(KcpMode::ALL), Any, true,
      "KCP preset (nodelay/interval/resend/nocongestion/wdelay/acknodelay); `manual` uses the keys below."),
    k("transport.kcp.nodelay", Int, "integer", DInt(0), int(0, 2), Any, true, "KCP nodelay (manual mode only)."),
    k("transport.kcp.interval", Int, "integer (ms)", DInt(0), int(0, 5000), Any, true,
      "KCP update interval (manual mode only; values below 10 act as 10)."),
    k("transport.kcp.resend", Int, "integer", DInt(0), int(0, 65535), Any, true, "KCP fast-resend threshold (manual mode only)."),
    k("transport.kcp.nocongestion", Int, "integer", DInt(0), int(0, 1), Any, true,
      "1 disables KCP congestion control (manual mode only)."),
    k("transport.kcp.wdelay", Bool, "bool", DBool(false), BOOLS, Any, true,
      "Delay writes to batch them (manual mode only)."),
    k("transport.kcp.acknodelay", Bool, "bool", DBool(false), BOOLS, Any, true,
      "Send ACKs immediately (manual mode only)."),
    k("transport.kcp.mtu", Int, "integer (bytes)", DInt(1350), int(50, 1500), Any, true,
      "Largest TCP payload, including crypto/FEC headers."),
    k("transport.kcp.rcvwnd", IntOrStr, WND_TYPE, Def::PerFormat { toml: &DStr("auto"), yaml: &RCVWND_DEF },
      Allowed::Window(MAX_WND as i64), Any, true,
      "KCP receive window. `auto` starts at server 1024, client 512 and grows up to `window_mem`; an integer is a fixed window (upstream)."),
    k("transport.kcp.sndwnd", IntOrStr, WND_TYPE, Def::PerFormat { toml: &DStr("auto"), yaml: &SNDWND_DEF },
      Allowed::Window(MAX_WND as i64), Any, true,
      "KCP send window. `auto` starts at server 1024, client 128 and grows up to `window_mem`; an integer is a fixed window (upstream)."),
    k("transport.kcp.dshard", Int, "integer", DInt(0), int(0, 255), Any, true,
      "FEC data shards; FEC is on only when dshard and pshard are both > 0 (must match the peer)."),
    k("transport.kcp.pshard", Int, "integer", DInt(0),
      Allowed::FecShards { hi: 255, sum: 256 }, Any, true,
      "FEC parity shards (must match the peer)."),
    k("transport.kcp.block", Str, "string", DStr("aes"), OneOf(BLOCK_MODES), Any, true,
      "Packet cipher (kcp-go block crypt); `noise` = paqet-dp's authenticated wire instead (both ends paqet-dp, keys in `[transport.noise]`)."),
    k("transport.kcp.key", Str, "string", Absent(None), Allowed::Text("non-empty string"), Any, true,
      "Shared secret (`paqet-dp secret`); required unless block is none/null and guard is off; refused with block = noise."),
    k("transport.kcp.smuxbuf", Int, "integer (bytes)", DInt(4 * MIB), int(1024, i32::MAX as i64), Any, true,
      "smux MaxReceiveBuffer (per session)."),
    k("transport.kcp.streambuf", Int, "integer (bytes)", DInt(2 * MIB), Allowed::UpToKey { lo: 1024, key: "smuxbuf" }, Any, true,
      "smux MaxStreamBuffer (per stream)."),
    k("transport.kcp.smuxkalive", Int, "integer (s)", DInt(2), int(1, 3600), Any, true, "smux keep-alive interval."),
    k("transport.kcp.smuxktimeout", Int, "integer (s)", DInt(8), Allowed::FromKey { key: "smuxkalive", hi: 86400 }, Any, true,
      "smux keep-alive timeout (session closed when nothing is received for this long)."),
    k("transport.kcp.cc", Str, "string", DStr("bbr"), OneOf(&["bbr", "fixed", "off"]), Any, false,
      "Sender congestion control and pacing: `bbr` estimates the path, `fixed` paces at `bandwidth`, `off` is upstream's unpaced window bursts. The wire is unchanged."),
    k("transport.kcp.bandwidth", IntOrStr, "rate or integer (bytes/s)", Absent(Some("required for cc = fixed")),
      Allowed::Text(BW_RANGE), Any, false,
      "Pacing rate of `cc = \"fixed\"` (ignored with a warning for other cc)."),
    k("transport.kcp.window_mem", Int, "integer (bytes)", DInt(32 * MIB), int(MIB, 1024 * MIB), Any, false,
      "Memory cap of an auto-tuned window: it grows to at most min(32768, window_mem / mtu) packets (never below its start)."),
    k("transport.kcp.guard", Bool, "bool", Def::PerFormat { toml: &DBool(true), yaml: &DBool(false) }, BOOLS, Any, false,
      "Prefix every datagram with a keyed guard (`guard_format`); packets without a valid one are dropped before decryption (in the XDP program in XDP mode). Not upstream-compatible."),
    k("transport.kcp.guard_format", Str, "string", DStr("tag"), OneOf(&["tag", "cookie"]), Any, false,
      "`tag`: an 8-byte per-packet SipHash-2-4 tag over the datagram's nonce and `guard_bind`, no constant bytes. `cookie` (deprecated): the fork's `guard_magic` + per-window HMAC cookie, a fingerprint and replayable."),
    k("transport.kcp.guard_bind", Str, "string", DStr("port"), OneOf(&["port", "4tuple", "none"]), Any, false,
      "What the tag binds besides the datagram: `port` the server's tunnel port (works through NAT), `4tuple` source and destination addresses and ports (only on paths without NAT: a rewritten address or port fails the guard), `none` nothing. Both ends must agree."),
    k("transport.kcp.guard_magic", Str, "string", DStr("PQT1"), Allowed::Bytes(4), Any, false, "Guard magic prefix (cookie format only)."),
    k("transport.kcp.guard_window", Int, "integer (s)", DInt(30), int(1, 3600), Any, false, "Guard cookie rotation period (cookie format only)."),
    k("transport.kcp.guard_skew", Int, "integer", DInt(1), int(0, 10), Any, false,
      "Number of previous guard windows still accepted (cookie format only)."),
    // Server limits upstream does not have: imported YAML gets none (or, for header_timeout, its ceiling),
    // so an upstream config used as is meets no cap upstream would not (docs/configuration.md, "Limits (server)").
    k("transport.kcp.max_sessions", Int, "integer", Def::PerFormat { toml: &DInt(512), yaml: &DInt(-1) },
      Allowed::Limit(1_000_000), Any, false,
      "Server: maximum concurrent KCP sessions; new sessions over the limit are closed."),
    k("transport.kcp.max_streams_total", Int, "integer", Def::PerFormat { toml: &DInt(16384), yaml: &DInt(-1) },
      Allowed::Limit(10_000_000), Any, false,
      "Server: maximum concurrent proxied streams (PTCP/PUDP) over all sessions; control streams (PTCPF, ping) are not counted."),
    k("transport.kcp.max_streams_per_session", Int, "integer", Def::PerFormat { toml: &DInt(256), yaml: &DInt(-1) },
      Allowed::Limit(1_000_000), Any, false,
      "Server: maximum concurrent proxied streams (PTCP/PUDP) per session (clamped to max_streams_total)."),
    k("transport.kcp.header_timeout", Int, "integer (s)", Def::PerFormat { toml: &DInt(10), yaml: &DInt(3600) },
      int(1, 3600), Any, false,
      "Server: time allowed to receive a new stream's paqet header."),
    // Replay filter (server): keep these rows together.
    k("transport.kcp.replay_filter", Str, "path", Def::PerFormat { toml: &DStr(DEFAULT_REPLAY_FILTER), yaml: &DStr("") },
      Allowed::Text("a file path, or empty = in memory only"), Any, false,
      "Server: file persisting the convs of sessions seen (replays of them never open or replace a session); saved every minute and at shutdown; not persisted while its directory is missing. Empty: in memory only (forgotten on restart)."),
    k("transport.kcp.replay_horizon", Int, "integer (days)", DInt(7), int(1, 365), Any, false,
      "Server: how long the replay filter remembers a conv (at least this, at most twice it)."),
    // The authenticated wire (block = "noise"): keep these rows together.
    k("transport.noise.private_key", Str, "key or path", Absent(Some("required with block = noise")),
      Allowed::Text("44 base64 characters, or the path (containing '/') of a file not readable by group/others"), Any, false,
      "This end's static private key, inline or in a file written by `paqet-dp keygen --out FILE`."),
    k("transport.noise.server_public_key", Str, "key", Absent(Some("required on a client with block = noise")),
      Allowed::Text("44 base64 characters"), Client, false,
      "Client: the server's static public key (printed by `paqet-dp keygen` on the server)."),
    k("transport.noise.client_public_keys", StrList, "array of keys", Absent(Some("required on a server with block = noise")),
      Allowed::Text("at least one key of 44 base64 characters"), Server, false,
      "Server: public keys of the clients allowed to connect; initiations from any other key get no answer."),
    k("transport.noise.psk", Str, "key or path", Absent(Some("off")),
      Allowed::Text("44 base64 characters, or the path (containing '/') of a file not readable by group/others"), Any, false,
      "Optional pre-shared key (`paqet-dp keygen --psk`), the same on both ends: the handshake becomes IKpsk2."),
    k("metrics.listen", Str, "host:port", Absent(Some("off")), Endpoint, Any, false,
      "Serve Prometheus metrics and /healthz over HTTP on this address."),
    k("debug.pprof", Str, "host:port", Absent(Some("off")), Allowed::LoopbackEndpoint, Any, false,
      "Debug/profiling HTTP endpoint; must be loopback."),
    k("io.backend", Str, "string", DStr("auto"), OneOf(IoBackend::ALL), Any, false,
      "Packet I/O backend; `auto` prefers AF_XDP and falls back to pcap."),
    k("io.workers", Int, "integer", DInt(0),
      Allowed::Int { lo: 0, hi: 256, note: "0 = one per RX queue (capped by CPU cores)" }, Any, false,
      "Number of packet worker threads."),
    k("io.cpus", Str, "string", DStr("auto"), Allowed::Cpus, Any, false,
      "CPUs the XDP workers pin to: worker i on the i-th CPU (wrapping). auto = the process's CPU affinity mask (taskset, systemd CPUAffinity=, a cpuset); none = no pinning."),
    k("io.probe_response", Str, "string", DStr("closed"), OneOf(&["closed", "silent"]), Any, false,
      "XDP mode: frames to the tunnel port that carry no tunnel datagram (SYN, bare ACK, FIN; a payload failing the guard) get `closed`: the RST a closed port of this host sends, built in the XDP program; `silent`: nothing. Valid tunnel traffic is never answered. pcap mode: the kernel and the firewall rules decide (docs/runbook.md)."),
];

/// Every leaf key the configuration knows, in documentation order.
pub fn schema() -> &'static [KeyInfo] {
    SCHEMA
}

/// Looks up a leaf key by its schema path (`socks5[].listen`).
pub fn key_info(path: &str) -> Option<&'static KeyInfo> {
    SCHEMA.iter().find(|k| k.path == path)
}

/// Looks up a leaf key, panicking on a typo in our own code (paths are compile-time constants; the unit
/// tests load configurations that reach every lookup).
pub(crate) fn info(path: &str) -> &'static KeyInfo {
    match key_info(path) {
        Some(k) => k,
        None => panic!("config schema has no key {path}"),
    }
}

/// The key table as text: one block per key (`markdown = false`, for `paqet-dp config keys`) or the rows
/// of the Markdown table in `docs/configuration.md` (`markdown = true`).
pub fn render_keys(markdown: bool) -> String {
    let mut out = String::new();
    if markdown {
        out.push_str("| key | type | default | allowed values | meaning |\n");
        out.push_str("|---|---|---|---|---|\n");
    }
    for key in SCHEMA {
        let origin = if key.upstream { "" } else { " *paqet-dp*" };
        if markdown {
            out.push_str(&format!(
                "| `{}` | {} | `{}` | {} | {}{origin} |\n",
                key.path,
                key.type_text,
                key.default_text(),
                key.range_text(),
                key.doc
            ));
        } else {
            let scope = match key.scope {
                Scope::Any => "",
                Scope::Client => ", client only",
                Scope::Server => ", server only",
            };
            let origin = if key.upstream { "" } else { ", paqet-dp" };
            out.push_str(&format!(
                "{}  ({}{scope}{origin})\n    default: {}\n    allowed: {}\n    {}\n",
                key.path,
                key.type_text,
                key.default_text(),
                key.range_text(),
                key.doc
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_their_type_and_range() {
        for key in SCHEMA {
            for yaml in [false, true] {
                let def = key.def.for_format(yaml);
                match (key.kind, def) {
                    (_, Def::Absent(_)) => {}
                    (KeyType::Int, Def::Int(_) | Def::ByRole { .. }) => {
                        for role in [Role::Client, Role::Server] {
                            let v = def.int(Some(role)).unwrap_or(i64::MIN);
                            let ok = match key.allowed {
                                Allowed::Int { lo, hi, .. } => (lo..=hi).contains(&v),
                                Allowed::FecShards { hi, .. } => (0..=hi).contains(&v),
                                Allowed::Limit(hi) => v == -1 || (1..=hi).contains(&v),
                                Allowed::UpToKey { lo, .. } => v >= lo,
                                Allowed::FromKey { hi, .. } => v <= hi,
                                _ => false,
                            };
                            assert!(ok, "{}: default {v} outside {}", key.path, key.allowed);
                        }
                    }
                    (KeyType::Bool, Def::Bool(_)) | (KeyType::StrList, Def::List(_)) => {}
                    (KeyType::IntOrStr, Def::Str("auto") | Def::ByRole { .. }) => {
                        assert!(matches!(key.allowed, Allowed::Window(_)), "{}", key.path);
                    }
                    (KeyType::Str, Def::Str(s)) => {
                        if let Allowed::OneOf(words) = key.allowed {
                            assert!(words.contains(s), "{}: default {s} not allowed", key.path);
                        }
                        if let Allowed::Bytes(n) = key.allowed {
                            assert_eq!(s.len(), n, "{}", key.path);
                        }
                    }
                    (kind, def) => panic!("{}: default {def:?} does not fit {kind:?}", key.path),
                }
            }
        }
    }

    #[test]
    fn related_keys_exist() {
        for key in SCHEMA {
            if let Allowed::UpToKey { key: other, .. } | Allowed::FromKey { key: other, .. } =
                key.allowed
            {
                let table = key.path.rsplit_once('.').map_or("", |(t, _)| t);
                assert!(
                    key_info(&format!("{table}.{other}")).is_some_and(|o| o.kind == KeyType::Int),
                    "{}: bound {other} is not an integer key of {table}",
                    key.path
                );
            }
        }
    }

    #[test]
    fn texts_render_as_documented() {
        let text = |p: &str| (info(p).default_text(), info(p).range_text());
        assert_eq!(
            text("transport.kcp.rcvwnd"),
            (
                "auto (TOML), server 1024, client 512 (imported YAML)".into(),
                "1..=32768, or auto".into()
            )
        );
        assert_eq!(
            text("network.tcp.local_flag"),
            (
                "[\"PA\"]".into(),
                "1..=64 strings of letters F S R P A U E C N".into()
            )
        );
        assert_eq!(text("socks5[].username"), ("\"\"".into(), "any".into()));
        assert_eq!(
            text("transport.kcp.max_sessions"),
            (
                "512 (TOML), -1 (imported YAML)".into(),
                "-1 (unlimited) or 1..=1000000".into()
            )
        );
        assert_eq!(
            text("metrics.listen"),
            ("— (off)".into(), "host:port, port 1..=65535".into())
        );
        let md = render_keys(true);
        assert_eq!(md.lines().count(), SCHEMA.len() + 2);
        assert!(md.contains(
            "| `transport.kcp.mtu` | integer (bytes) | `1350` | 50..=1500 | Largest TCP payload, including crypto/FEC headers. |"
        ));
        let plain = render_keys(false);
        assert!(plain.contains("transport.kcp.guard  (bool, paqet-dp)\n    default: true (TOML), false (imported YAML)\n"));
    }
}
