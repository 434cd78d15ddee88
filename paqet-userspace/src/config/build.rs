//! Defaults per role and value validation: [`RawConfig`] → [`Config`], collecting every problem; and the
//! reverse mapping used by `Config::to_toml_string`.
//!
//! Every default, bound and "must be …" text comes from the key table ([`super::keys`]) through the
//! per-key readers of `read.rs`; [`build`] is a sequence of one small function per section, each reporting
//! in the order the keys are documented.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::keys::{info, Allowed, PORT_RANGE};
use super::raw::*;
use super::read::{must, q, Ctx};
use super::schema::{Issues, Mode};
use super::targets::{TargetPolicy, TargetRule, TARGET_RULE_SYNTAX};
use super::{
    CcAlgorithm, Config, FamilyConfig, ForwardProtocol, ForwardRule, GuardFormat, HostPort,
    HttpListener, IoConfig, KcpConfig, KcpMode, Limit, MacAddr, NetworkConfig, ReverseRule, Role,
    RotateConfig, ServerEntry, Socks5Listener, TransportConfig, MAX_REVERSE, MAX_SERVERS,
    MAX_WEIGHT,
};
use crate::proto::cc::parse_bandwidth;

impl Ctx<'_> {
    /// `role` (required).
    fn role(&mut self, raw: &RawConfig) {
        self.role = self.required_choice("role", "role", raw.role.as_ref());
    }

    /// `listen.addr` (server) / `server.addr` or `[[server.servers]]` (client): the listen address,
    /// the first server and every server with its weight.
    fn addresses(
        &mut self,
        raw: &RawConfig,
    ) -> (Option<HostPort>, Option<HostPort>, Vec<ServerEntry>) {
        let listen_addr = raw.listen.as_ref().and_then(|l| l.addr.as_ref());
        let listen = if self.server() {
            match listen_addr {
                Some(OneOrMany::Many(_)) => {
                    self.is.error(
                        "listen.addr",
                        None,
                        "must be a string (host:port), not an array",
                    );
                    None
                }
                _ => self.endpoint("listen.addr", listen_addr.and_then(OneOrMany::one), true),
            }
        } else {
            if listen_addr.is_some() && self.client() {
                self.wrong_role("listen.addr", Role::Server);
            }
            None
        };
        let server_addr = raw.server.as_ref().and_then(|s| s.addr.as_ref());
        let table = raw
            .server
            .as_ref()
            .map(|s| s.servers.as_slice())
            .unwrap_or_default();
        if !self.client() {
            if server_addr.is_some() && self.server() {
                self.wrong_role("server.addr", Role::Client);
            }
            if !table.is_empty() && self.server() {
                self.wrong_role("server.servers", Role::Client);
            }
            return (listen, None, Vec::new());
        }
        let mut servers = Vec::new();
        match (server_addr, table.is_empty()) {
            (Some(_), false) => {
                self.is.error(
                    "server.servers",
                    None,
                    "set either server.addr or [[server.servers]], not both",
                );
            }
            (Some(OneOrMany::Many(list)), true) => {
                if list.is_empty() || list.len() > MAX_SERVERS {
                    self.is.error(
                        "server.addr",
                        Some(format!("[{} entries]", list.len())),
                        format!("an array of server addresses needs 1..={MAX_SERVERS} entries"),
                    );
                }
                for (i, a) in list.iter().enumerate() {
                    if let Some(hp) = self.endpoint(&format!("server.addr[{i}]"), Some(a), true) {
                        servers.push(ServerEntry {
                            addr: hp,
                            weight: 1,
                        });
                    }
                }
            }
            (one, true) => {
                if let Some(hp) = self.endpoint("server.addr", one.and_then(OneOrMany::one), true) {
                    servers.push(ServerEntry {
                        addr: hp,
                        weight: 1,
                    });
                }
            }
            (None, false) => {
                if table.len() > MAX_SERVERS {
                    self.is.error(
                        "server.servers",
                        Some(format!("[{} entries]", table.len())),
                        format!("1..={MAX_SERVERS} servers"),
                    );
                }
                for (i, t) in table.iter().enumerate() {
                    let hp =
                        self.endpoint(&format!("server.servers[{i}].addr"), t.addr.as_ref(), true);
                    let weight = match t.weight {
                        None => 1,
                        Some(w) if (1..=i64::from(MAX_WEIGHT)).contains(&w) => w as u32,
                        Some(w) => {
                            self.is.error(
                                format!("server.servers[{i}].weight"),
                                Some(w.to_string()),
                                format!("must be 1..={MAX_WEIGHT}"),
                            );
                            1
                        }
                    };
                    if let Some(hp) = hp {
                        servers.push(ServerEntry { addr: hp, weight });
                    }
                }
            }
        }
        for (i, e) in servers.iter().enumerate() {
            if servers[..i].iter().any(|o| o.addr == e.addr) {
                self.is.error(
                    "server.addr",
                    Some(q(&e.addr.to_string())),
                    "the same server is listed twice",
                );
            }
        }
        let first = servers.first().map(|e| e.addr.clone());
        (listen, first, servers)
    }

    /// Client front ends: `socks5[]`, `forward[]`, `http[]`.
    fn front_ends(
        &mut self,
        raw: &RawConfig,
    ) -> (Vec<Socks5Listener>, Vec<ForwardRule>, Vec<HttpListener>) {
        if self.server() {
            for (name, n) in [
                ("socks5", raw.socks5.len()),
                ("forward", raw.forward.len()),
                ("http", raw.http.len()),
                ("reverse", raw.reverse.len()),
            ] {
                if n > 0 {
                    self.wrong_role(name, Role::Client);
                }
            }
            return (Vec::new(), Vec::new(), Vec::new());
        }
        let socks5 = self.socks5(&raw.socks5);
        let forward = self.forward(&raw.forward);
        let http = self.http(&raw.http);
        if self.client()
            && socks5.is_empty()
            && forward.is_empty()
            && http.is_empty()
            && raw.socks5.is_empty()
            && raw.forward.is_empty()
            && raw.http.is_empty()
            && raw.reverse.is_empty()
        {
            self.is.warn(
                "socks5",
                None,
                "client has no socks5, forward or http listener: nothing will use the tunnel",
            );
        }
        (socks5, forward, http)
    }

    fn socks5(&mut self, raw: &[RawSocks5]) -> Vec<Socks5Listener> {
        let mut out = Vec::new();
        for (i, s) in raw.iter().enumerate() {
            let listen = self.endpoint(&format!("socks5[{i}].listen"), s.listen.as_ref(), true);
            let text = |v: &Option<String>, path: &str| {
                v.clone().unwrap_or_else(|| self.def_str(path).to_string())
            };
            let username = text(&s.username, "socks5[].username");
            let password = text(&s.password, "socks5[].password");
            if let Some(listen) = listen {
                let auth = !username.is_empty() || !password.is_empty();
                let allow_open_proxy =
                    self.open_proxy("socks5", i, &listen, auth, s.allow_open_proxy);
                out.push(Socks5Listener {
                    listen,
                    username,
                    password,
                    allow_open_proxy,
                });
            }
        }
        out
    }

    /// The open-proxy guard of `socks5[i]` / `http[i]`: a listener on a non-loopback address without
    /// authentication is an error in TOML unless `allow_open_proxy = true`; imported YAML (upstream has no
    /// such check) gets a warning and the listener starts. Returns the effective `allow_open_proxy`.
    fn open_proxy(
        &mut self,
        section: &str,
        i: usize,
        listen: &HostPort,
        auth: bool,
        allow: Option<bool>,
    ) -> bool {
        let allow =
            allow.unwrap_or_else(|| self.def_bool(&format!("{section}[].allow_open_proxy")));
        if auth || allow || listen.is_loopback() {
            return allow;
        }
        let key = format!("{section}[{i}].listen");
        let value = Some(q(&listen.to_string()));
        match self.mode {
            Mode::Strict => {
                self.is.error(
                    key,
                    value,
                    format!("an open proxy: a non-loopback address without username/password lets anyone who reaches it use the tunnel; listen on 127.0.0.1, set {section}[{i}].username and password, or set {section}[{i}].allow_open_proxy = true"),
                );
                false
            }
            Mode::Lenient => {
                self.is.warn(
                    key,
                    value,
                    format!("OPEN PROXY: a non-loopback address without username/password lets anyone who reaches it use the tunnel (started anyway for upstream compatibility; paqet-dp TOML refuses this without {section}[{i}].allow_open_proxy = true)"),
                );
                true
            }
        }
    }

    /// `server.allow` / `server.deny` (server only): each entry parsed, errors name the entry.
    fn targets(&mut self, raw: &RawConfig) -> TargetPolicy {
        let mut policy = TargetPolicy::default();
        let Some(server) = raw.server.as_ref() else {
            return policy;
        };
        for (name, list, out) in [
            ("allow", &server.allow, &mut policy.allow),
            ("deny", &server.deny, &mut policy.deny),
        ] {
            let Some(list) = list else { continue };
            let path = format!("server.{name}");
            if !self.server() {
                if self.client() {
                    self.wrong_role(&path, Role::Server);
                }
                continue;
            }
            for (i, entry) in list.iter().enumerate() {
                match entry.parse::<TargetRule>() {
                    Ok(r) => out.push(r),
                    Err(e) => self.is.error(
                        format!("{path}[{i}]"),
                        Some(q(entry)),
                        format!("{e}; must be {TARGET_RULE_SYNTAX}"),
                    ),
                }
            }
        }
        policy
    }

    fn forward(&mut self, raw: &[RawForward]) -> Vec<ForwardRule> {
        let mut out = Vec::new();
        for (i, f) in raw.iter().enumerate() {
            let listen = self.endpoint(&format!("forward[{i}].listen"), f.listen.as_ref(), true);
            let target = self.endpoint(&format!("forward[{i}].target"), f.target.as_ref(), true);
            let protocol = self.required_choice::<ForwardProtocol>(
                &format!("forward[{i}].protocol"),
                "forward[].protocol",
                f.protocol.as_ref(),
            );
            if let (Some(listen), Some(target), Some(protocol)) = (listen, target, protocol) {
                out.push(ForwardRule {
                    listen,
                    target,
                    protocol,
                });
            }
        }
        out
    }

    /// `[[reverse]]` (client): each remote an IP literal with a port, names and (protocol, remote) unique.
    fn reverse(&mut self, raw: &[RawReverse]) -> Vec<ReverseRule> {
        if raw.is_empty() {
            return Vec::new();
        }
        if self.server() {
            self.wrong_role("reverse", Role::Client);
            return Vec::new();
        }
        if raw.len() > MAX_REVERSE {
            self.is.error(
                "reverse",
                Some(format!("[…{} entries]", raw.len())),
                format!("at most {MAX_REVERSE} [[reverse]] entries"),
            );
            return Vec::new();
        }
        let mut out: Vec<ReverseRule> = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let remote = self
                .endpoint(&format!("reverse[{i}].remote"), r.remote.as_ref(), true)
                .and_then(|hp| match hp.ip() {
                    Some(ip) => Some(std::net::SocketAddr::new(ip, hp.port)),
                    None => {
                        self.is.error(
                            format!("reverse[{i}].remote"),
                            r.remote.as_deref().map(q),
                            "must be an IP literal:port (the server listens on it; no names)",
                        );
                        None
                    }
                });
            let target = self.endpoint(&format!("reverse[{i}].target"), r.target.as_ref(), true);
            let protocol = self.required_choice::<ForwardProtocol>(
                &format!("reverse[{i}].protocol"),
                "reverse[].protocol",
                r.protocol.as_ref(),
            );
            let (Some(remote), Some(target), Some(protocol)) = (remote, target, protocol) else {
                continue;
            };
            let name = match &r.name {
                Some(n) => {
                    let ok = (1..=64).contains(&n.len())
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                    if !ok {
                        self.is.error(
                            format!("reverse[{i}].name"),
                            Some(q(n)),
                            "must be 1..=64 of A-Z a-z 0-9 . _ -",
                        );
                        continue;
                    }
                    n.clone()
                }
                None => format!("{protocol}/{remote}"),
            };
            if out.iter().any(|o| o.name == name) {
                self.is.error(
                    format!("reverse[{i}].name"),
                    Some(q(&name)),
                    "must be unique among [[reverse]] entries",
                );
                continue;
            }
            if out
                .iter()
                .any(|o| o.remote == remote && o.protocol == protocol)
            {
                self.is.error(
                    format!("reverse[{i}].remote"),
                    Some(q(&remote.to_string())),
                    "declared twice for the same protocol",
                );
                continue;
            }
            out.push(ReverseRule {
                name,
                remote,
                target,
                protocol,
            });
        }
        out
    }

    /// `server.reverse_allow` (server): IP-literal listen addresses with a port.
    fn reverse_allow(&mut self, raw: &RawConfig) -> Vec<std::net::SocketAddr> {
        let Some(list) = raw.server.as_ref().and_then(|s| s.reverse_allow.as_ref()) else {
            return Vec::new();
        };
        if !self.server() {
            if self.client() {
                self.wrong_role("server.reverse_allow", Role::Server);
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        for (i, entry) in list.iter().enumerate() {
            let addr = HostPort::parse(entry)
                .ok()
                .and_then(|h| Some(std::net::SocketAddr::new(h.ip()?, h.port)))
                .filter(|a| a.port() != 0);
            match addr {
                Some(a) => out.push(a),
                None => self.is.error(
                    format!("server.reverse_allow[{i}]"),
                    Some(q(entry)),
                    "must be an IP literal:port with port 1..=65535 (e.g. \"0.0.0.0:8022\", \"[::1]:5353\")",
                ),
            }
        }
        out
    }

    fn http(&mut self, raw: &[RawHttp]) -> Vec<HttpListener> {
        let mut out = Vec::new();
        for (i, h) in raw.iter().enumerate() {
            let listen = self.endpoint(&format!("http[{i}].listen"), h.listen.as_ref(), true);
            if h.username.is_some() != h.password.is_some() {
                let missing = if h.username.is_none() {
                    "username"
                } else {
                    "password"
                };
                self.is.error(
                    format!("http[{i}].{missing}"),
                    None,
                    "required when the other of username/password is set",
                );
            }
            if let Some(listen) = listen {
                let auth = h.username.is_some() && h.password.is_some();
                let allow_open_proxy =
                    self.open_proxy("http", i, &listen, auth, h.allow_open_proxy);
                out.push(HttpListener {
                    listen,
                    username: h.username.clone(),
                    password: h.password.clone(),
                    allow_open_proxy,
                });
            }
        }
        out
    }

    /// `network.*`.
    fn network(&mut self, net: &RawNetwork) -> NetworkConfig {
        let interface = self.interface(net.interface.as_ref());
        if net.guid.is_some() {
            self.is.warn(
                "network.guid",
                None,
                "ignored: only used by upstream on Windows (Npcap)",
            );
        }
        let ipv4 = net.ipv4.as_ref().map(|f| {
            self.family("ipv4", f, |ip| match ip {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
        });
        let ipv6 = net.ipv6.as_ref().map(|f| {
            self.family("ipv6", f, |ip| match ip {
                IpAddr::V6(a) => Some(a),
                IpAddr::V4(_) => None,
            })
        });
        if ipv4.is_none() && ipv6.is_none() {
            self.is.error(
                "network.ipv4",
                None,
                "at least one of network.ipv4 / network.ipv6 must be configured",
            );
        }
        let v4_addr = net.ipv4.as_ref().and_then(|f| f.addr.as_ref());
        let v6_addr = net.ipv6.as_ref().and_then(|f| f.addr.as_ref());
        if let (Some(a), Some(b), Some(_), Some(v6)) = (&ipv4, &ipv6, v4_addr, v6_addr) {
            if a.port != b.port {
                self.is.error(
                    "network.ipv6.addr",
                    Some(q(v6)),
                    format!(
                        "port {} must equal network.ipv4.addr's port {}",
                        b.port, a.port
                    ),
                );
            }
        }
        let tcp = net.tcp.clone().unwrap_or_default();
        let local_flag = self.flags("network.tcp.local_flag", tcp.local_flag.as_ref());
        let remote_flag = self.flags("network.tcp.remote_flag", tcp.remote_flag.as_ref());
        let sockbuf = self.int(
            "network.pcap.sockbuf",
            net.pcap.as_ref().and_then(|p| p.sockbuf),
        );
        if !(sockbuf as u64).is_power_of_two() {
            self.is.warn(
                "network.pcap.sockbuf",
                Some(sockbuf.to_string()),
                "not a power of two",
            );
        }
        NetworkConfig {
            interface,
            guid: net.guid.clone(),
            ipv4,
            ipv6,
            local_flag,
            remote_flag,
            pcap_sockbuf: sockbuf as u32,
        }
    }

    /// `network.interface` (required; its length in bytes within the table's range).
    fn interface(&mut self, v: Option<&String>) -> String {
        const PATH: &str = "network.interface";
        let Allowed::Len { lo, hi } = info(PATH).allowed else {
            panic!("config key {PATH} has no length range");
        };
        match v {
            None => {
                self.is.error(
                    PATH,
                    None,
                    format!("required: the interface name ({})", info(PATH).allowed),
                );
                String::new()
            }
            Some(s) if !(lo..=hi).contains(&s.len()) => {
                self.is.error(PATH, Some(q(s)), must(PATH));
                String::new()
            }
            Some(s) => s.clone(),
        }
    }

    /// One `network.ipv4`/`ipv6` table.
    fn family<A: Copy>(
        &mut self,
        fam: &str,
        raw: &RawFamily,
        pick: impl Fn(IpAddr) -> Option<A>,
    ) -> FamilyConfig<A> {
        let path = format!("network.{fam}.addr");
        let range = info(&path).allowed;
        let server = self.server();
        let mut out = FamilyConfig {
            ip: None,
            port: 0,
            router_mac: None,
        };
        match &raw.addr {
            None => {
                if server {
                    self.is.error(
                        &path,
                        None,
                        "required for a server: its port is the port the server listens on",
                    );
                }
            }
            Some(s) => match HostPort::parse(s) {
                Err(e) => self
                    .is
                    .error(&path, Some(q(s)), format!("{e}; expected {range}")),
                Ok(hp) => {
                    out.port = hp.port;
                    if server && hp.port == 0 {
                        self.is.error(
                            &path,
                            Some(q(s)),
                            format!("a server needs a fixed port {PORT_RANGE}"),
                        );
                    }
                    if !hp.host.is_empty() {
                        match hp.ip() {
                            Some(ip) if ip.is_unspecified() => {}
                            Some(ip) => match pick(ip) {
                                Some(a) => out.ip = Some(a),
                                None => self.is.error(
                                    &path,
                                    Some(q(s)),
                                    format!("must be an {fam} address; {range}"),
                                ),
                            },
                            None => self.is.error(
                                &path,
                                Some(q(s)),
                                format!("host must be an IP literal; {range}"),
                            ),
                        }
                    }
                }
            },
        }
        if let Some(m) = &raw.router_mac {
            match m.parse::<MacAddr>() {
                Ok(mac) => out.router_mac = Some(mac),
                Err(e) => self
                    .is
                    .error(format!("network.{fam}.router_mac"), Some(q(m)), e),
            }
        }
        out
    }

    /// `transport.*`.
    fn transport(&mut self, transport: &RawTransport) -> TransportConfig {
        const PROTOCOL: &str = "transport.protocol";
        if transport.protocol.is_none() {
            self.is
                .error(PROTOCOL, None, format!("required: {}", must(PROTOCOL)));
        } else {
            self.word(PROTOCOL, transport.protocol.as_ref());
        }
        let conn = self.int("transport.conn", transport.conn);
        if transport.kcp.is_none() {
            self.is.error(
                "transport.kcp",
                None,
                "transport.kcp configuration is required",
            );
        }
        let r = transport.rotate.clone().unwrap_or_default();
        let rotate = RotateConfig {
            after_secs: self.int("transport.rotate.after", r.after) as u32,
            bytes: self.int("transport.rotate.bytes", r.bytes) as u64,
            drain_secs: self.int("transport.rotate.drain", r.drain) as u32,
        };
        let k = transport.kcp.clone().unwrap_or_default();
        let kcp = self.kcp(&k, transport.kcp.is_some());
        let noise = self.noise(
            transport.noise.as_ref(),
            &kcp.block,
            k.key.as_ref().is_some_and(|s| !s.is_empty()),
            i64::from(kcp.mtu),
        );
        TransportConfig {
            conn: conn as u32,
            rotate,
            kcp,
            noise,
        }
    }

    /// `transport.kcp.*`.
    fn kcp(&mut self, k: &RawKcp, present: bool) -> KcpConfig {
        let tuning = self.kcp_tuning(k);
        let mtu = self.int("transport.kcp.mtu", k.mtu);
        let (rcvwnd, rcvwnd_auto) = self.window("transport.kcp.rcvwnd", k.rcvwnd.as_ref());
        let (sndwnd, sndwnd_auto) = self.window("transport.kcp.sndwnd", k.sndwnd.as_ref());
        let (dshard, pshard) = self.kcp_fec(k);
        let (block, guard, key) = self.kcp_crypto(k, present);
        let smux = self.kcp_smux(k);
        let (cc, bandwidth) = self.kcp_cc(k);
        let window_mem = self.window_mem(k, sndwnd_auto || rcvwnd_auto);
        let (guard_magic, guard_window, guard_skew) = self.kcp_guard(k);
        let guard_format: GuardFormat =
            self.choice_or_default("transport.kcp.guard_format", k.guard_format.as_ref());
        if guard && guard_format == GuardFormat::Cookie {
            self.is.warn(
                "transport.kcp.guard_format",
                Some(q("cookie")),
                "deprecated: a constant magic and one cookie per window for every client fingerprint the \
                 tunnel and can be replayed; use \"tag\" on both ends",
            );
        }
        let limits = self.kcp_limits(k);
        let (replay_filter, replay_horizon) = self.kcp_replay(k);
        KcpConfig {
            mode: tuning.mode,
            nodelay: tuning.nodelay,
            interval: tuning.interval,
            resend: tuning.resend,
            nocongestion: tuning.nocongestion,
            wdelay: tuning.wdelay,
            acknodelay: tuning.acknodelay,
            mtu: mtu as u32,
            rcvwnd,
            rcvwnd_auto,
            sndwnd,
            sndwnd_auto,
            window_mem,
            dshard,
            pshard,
            block,
            key,
            smuxbuf: smux.smuxbuf,
            streambuf: smux.streambuf,
            smuxkalive: smux.smuxkalive,
            smuxktimeout: smux.smuxktimeout,
            cc,
            bandwidth,
            guard,
            guard_format,
            guard_bind: self.choice_or_default("transport.kcp.guard_bind", k.guard_bind.as_ref()),
            guard_magic,
            guard_window,
            guard_skew,
            max_sessions: limits.sessions,
            max_streams_total: limits.streams_total,
            max_streams_per_session: limits.streams_per_session,
            header_timeout: limits.header_timeout,
            replay_filter,
            replay_horizon,
        }
    }

    /// `mode` and the manual-mode knobs (warned about when set away from their default outside manual).
    fn kcp_tuning(&mut self, k: &RawKcp) -> Tuning {
        let mode: KcpMode = self.choice_or_default("transport.kcp.mode", k.mode.as_ref());
        let nodelay = self.int("transport.kcp.nodelay", k.nodelay);
        let interval = self.int("transport.kcp.interval", k.interval);
        let resend = self.int("transport.kcp.resend", k.resend);
        let nocongestion = self.int("transport.kcp.nocongestion", k.nocongestion);
        let wdelay = k
            .wdelay
            .unwrap_or_else(|| self.def_bool("transport.kcp.wdelay"));
        let acknodelay = k
            .acknodelay
            .unwrap_or_else(|| self.def_bool("transport.kcp.acknodelay"));
        if mode != KcpMode::Manual {
            let int_set = |v: Option<i64>, name: &str| {
                v.is_some_and(|v| v != self.def_int(&format!("transport.kcp.{name}")))
            };
            let bool_set = |v: Option<bool>, name: &str| {
                v.is_some_and(|v| v != self.def_bool(&format!("transport.kcp.{name}")))
            };
            let manual_set = [
                ("nodelay", int_set(k.nodelay, "nodelay")),
                ("interval", int_set(k.interval, "interval")),
                ("resend", int_set(k.resend, "resend")),
                ("nocongestion", int_set(k.nocongestion, "nocongestion")),
                ("wdelay", bool_set(k.wdelay, "wdelay")),
                ("acknodelay", bool_set(k.acknodelay, "acknodelay")),
            ];
            for (name, set) in manual_set {
                if set {
                    self.is.warn(
                        format!("transport.kcp.{name}"),
                        None,
                        format!("ignored: only used when transport.kcp.mode = \"manual\" (mode is {mode})"),
                    );
                }
            }
        }
        Tuning {
            mode,
            nodelay: nodelay as i32,
            interval: interval as i32,
            resend: resend as i32,
            nocongestion: nocongestion as i32,
            wdelay,
            acknodelay,
        }
    }

    /// `dshard` / `pshard`.
    fn kcp_fec(&mut self, k: &RawKcp) -> (u32, u32) {
        const PSHARD: &str = "transport.kcp.pshard";
        let dshard = self.int("transport.kcp.dshard", k.dshard);
        let pshard = self.int(PSHARD, k.pshard);
        if let Allowed::FecShards { sum, .. } = info(PSHARD).allowed {
            if dshard + pshard > sum {
                self.is.error(
                    PSHARD,
                    Some(pshard.to_string()),
                    format!("dshard + pshard = {} exceeds {sum}", dshard + pshard),
                );
            }
        }
        if (dshard > 0) != (pshard > 0) {
            self.is.warn(
                "transport.kcp.dshard",
                Some(dshard.to_string()),
                format!("FEC stays off unless both dshard and pshard are > 0 (pshard = {pshard})"),
            );
        }
        (dshard as u32, pshard as u32)
    }

    /// `block`, `guard` and `key` (the key is required unless nothing uses it).
    fn kcp_crypto(&mut self, k: &RawKcp, present: bool) -> (String, bool, String) {
        const BLOCK: &str = "transport.kcp.block";
        let block = match self.word(BLOCK, k.block.as_ref()) {
            Some(b) => b,
            None => self.def_str(BLOCK).to_string(),
        };
        let guard = k
            .guard
            .unwrap_or_else(|| self.def_bool("transport.kcp.guard"));
        let key = k.key.clone().unwrap_or_default();
        if key.is_empty() && present {
            let keyless_block = block == "none" || block == "null";
            if block == "noise" {
                // The [transport.noise] keys authenticate; the guard is keyed by the server's public key.
            } else if !keyless_block {
                self.is.error(
                    "transport.kcp.key",
                    None,
                    format!(
                        "required for block = {} (generate one with `paqet-dp secret`)",
                        q(&block)
                    ),
                );
            } else if guard {
                self.is.error("transport.kcp.key", None, format!("required: the guard needs a key even with block = {} (or set transport.kcp.guard = false)", q(&block)));
            }
        }
        (block, guard, key)
    }

    /// `smuxbuf`, `streambuf` (≤ smuxbuf), `smuxkalive`, `smuxktimeout` (≥ smuxkalive).
    fn kcp_smux(&mut self, k: &RawKcp) -> Smux {
        const SMUXBUF: &str = "transport.kcp.smuxbuf";
        const STREAMBUF: &str = "transport.kcp.streambuf";
        const KTIMEOUT: &str = "transport.kcp.smuxktimeout";
        let smuxbuf = self.int(SMUXBUF, k.smuxbuf);
        let streambuf_def = self.def_int(STREAMBUF);
        let streambuf = match (k.streambuf, info(STREAMBUF).allowed) {
            (None, _) => streambuf_def,
            (Some(x), Allowed::UpToKey { lo, .. }) if (lo..=smuxbuf).contains(&x) => x,
            (Some(x), allowed) => {
                self.is.error(
                    STREAMBUF,
                    Some(x.to_string()),
                    format!("must be {}", allowed.with_bound(smuxbuf)),
                );
                streambuf_def.min(smuxbuf)
            }
        };
        if k.streambuf.is_none() && streambuf > smuxbuf {
            self.is.error(
                SMUXBUF,
                Some(smuxbuf.to_string()),
                format!("must be >= streambuf ({streambuf})"),
            );
        }
        let smuxkalive = self.int("transport.kcp.smuxkalive", k.smuxkalive);
        let ktimeout_def = self.def_int(KTIMEOUT);
        let smuxktimeout = match (k.smuxktimeout, info(KTIMEOUT).allowed) {
            (None, _) if smuxkalive <= ktimeout_def => ktimeout_def,
            (None, _) => {
                self.is.error(
                    KTIMEOUT,
                    None,
                    format!(
                        "default {ktimeout_def} is below smuxkalive ({smuxkalive}); set smuxktimeout >= smuxkalive"
                    ),
                );
                smuxkalive
            }
            (Some(x), Allowed::FromKey { hi, .. }) if (smuxkalive..=hi).contains(&x) => x,
            (Some(x), allowed) => {
                self.is.error(
                    KTIMEOUT,
                    Some(x.to_string()),
                    format!("must be {}", allowed.with_bound(smuxkalive)),
                );
                ktimeout_def.max(smuxkalive)
            }
        };
        Smux {
            smuxbuf: smuxbuf as u32,
            streambuf: streambuf as u32,
            smuxkalive: smuxkalive as u32,
            smuxktimeout: smuxktimeout as u32,
        }
    }

    /// `cc` and `bandwidth` (required with `cc = "fixed"`, ignored otherwise).
    fn kcp_cc(&mut self, k: &RawKcp) -> (CcAlgorithm, Option<u64>) {
        const CC: &str = "transport.kcp.cc";
        const BW: &str = "transport.kcp.bandwidth";
        let parsed = self.choice::<CcAlgorithm>(CC, CC, k.cc.as_ref());
        let cc_ok = k.cc.is_none() || parsed.is_some();
        let cc = parsed.unwrap_or_else(|| self.def_choice(CC));
        let bandwidth = k.bandwidth.as_ref().and_then(|b| {
            let text = match b {
                IntOrString::Int(i) => i.to_string(),
                IntOrString::Str(s) => s.clone(),
            };
            match parse_bandwidth(&text) {
                Ok(rate) => Some(rate),
                Err(_) => {
                    self.is.error(BW, Some(b.to_string()), must(BW));
                    None
                }
            }
        });
        let bandwidth = match cc {
            CcAlgorithm::Fixed => {
                if k.bandwidth.is_none() {
                    self.is.error(
                        BW,
                        None,
                        "required for cc = \"fixed\": the pacing rate, e.g. \"100mbit\"",
                    );
                }
                bandwidth
            }
            other => {
                if let (Some(b), Some(_), true) = (&k.bandwidth, bandwidth, cc_ok) {
                    self.is.warn(
                        BW,
                        Some(b.to_string()),
                        format!(
                            "ignored: only used when transport.kcp.cc = \"fixed\" (cc is {other})"
                        ),
                    );
                }
                None
            }
        };
        (cc, bandwidth)
    }

    /// `window_mem` (warned about when set away from its default while no window is auto-tuned).
    fn window_mem(&mut self, k: &RawKcp, any_auto: bool) -> u32 {
        const PATH: &str = "transport.kcp.window_mem";
        let window_mem = self.int(PATH, k.window_mem);
        if !any_auto && k.window_mem.is_some_and(|v| v != self.def_int(PATH)) {
            self.is.warn(
                PATH,
                Some(window_mem.to_string()),
                "ignored: only caps an auto-tuned window (sndwnd and rcvwnd are both fixed)",
            );
        }
        window_mem as u32
    }

    /// `guard_magic`, `guard_window`, `guard_skew`.
    fn kcp_guard(&mut self, k: &RawKcp) -> ([u8; 4], u32, u32) {
        const MAGIC: &str = "transport.kcp.guard_magic";
        let default = || {
            <[u8; 4]>::try_from(self.def_str(MAGIC).as_bytes())
                .unwrap_or_else(|_| panic!("config key {MAGIC}: default is not 4 bytes"))
        };
        let magic = match &k.guard_magic {
            None => default(),
            Some(m) => match <[u8; 4]>::try_from(m.as_bytes()) {
                Ok(b) => b,
                Err(_) => {
                    let d = default();
                    self.is.error(
                        MAGIC,
                        Some(q(m)),
                        format!("must be {} (is {} bytes)", info(MAGIC).allowed, m.len()),
                    );
                    d
                }
            },
        };
        let window = self.int("transport.kcp.guard_window", k.guard_window);
        let skew = self.int("transport.kcp.guard_skew", k.guard_skew);
        (magic, window as u32, skew as u32)
    }

    /// Server replay filter: `replay_filter` (a path or empty), `replay_horizon` (days).
    fn kcp_replay(&mut self, k: &RawKcp) -> (String, u32) {
        const FILE: &str = "transport.kcp.replay_filter";
        let file = match &k.replay_filter {
            None => self.def_str(FILE).to_string(),
            Some(p) if p.contains('\0') => {
                self.is.error(FILE, Some(q(p)), must(FILE));
                String::new()
            }
            Some(p) => p.clone(),
        };
        let horizon = self.int("transport.kcp.replay_horizon", k.replay_horizon);
        (file, horizon as u32)
    }

    /// Server limits: `max_sessions`, `max_streams_*` (per session clamped to total), `header_timeout`.
    fn kcp_limits(&mut self, k: &RawKcp) -> Limits {
        const PER: &str = "transport.kcp.max_streams_per_session";
        let sessions = self.limit("transport.kcp.max_sessions", k.max_sessions);
        let streams_total = self.limit("transport.kcp.max_streams_total", k.max_streams_total);
        let mut streams_per_session = self.limit(PER, k.max_streams_per_session);
        if let (Some(per), Some(total)) = (streams_per_session, streams_total) {
            if per > total {
                if k.max_streams_per_session.is_some() {
                    self.is.warn(
                        PER,
                        Some(per.to_string()),
                        format!("clamped to max_streams_total ({total})"),
                    );
                }
                streams_per_session = Some(total);
            }
        }
        let header_timeout = self.int("transport.kcp.header_timeout", k.header_timeout);
        Limits {
            sessions,
            streams_total,
            streams_per_session,
            header_timeout: header_timeout as u32,
        }
    }

    /// Rules across sections: one connection with a fixed client port, the server address family, the
    /// cosmetic listen port.
    fn cross_checks(
        &mut self,
        _raw: &RawConfig,
        net: &NetworkConfig,
        conn: u32,
        rotate: RotateConfig,
        listen: Option<&HostPort>,
        servers: &[ServerEntry],
    ) {
        let local_port = net
            .ipv4
            .as_ref()
            .map(|f| f.port)
            .or(net.ipv6.as_ref().map(|f| f.port))
            .unwrap_or(0);
        if self.client() && local_port != 0 && rotate.enabled() {
            self.is.error(
                "transport.rotate",
                None,
                format!("session rotation needs a new source port per session: set the network port to 0 (it is {local_port})"),
            );
        }
        if self.client() && local_port != 0 && conn > 1 {
            self.is.error(
                "transport.conn",
                Some(conn.to_string()),
                format!("only one connection is allowed when a client port is explicitly set (network port {local_port})"),
            );
        }
        for e in servers {
            let Some(ip) = e.addr.ip() else { continue };
            let (fam, configured) = match ip {
                IpAddr::V4(_) => ("IPv4", net.ipv4.is_some()),
                IpAddr::V6(_) => ("IPv6", net.ipv6.is_some()),
            };
            if !configured {
                self.is.error(
                    "server.addr",
                    Some(q(&e.addr.to_string())),
                    format!("server address is {fam}, but the {fam} interface is not configured (network.{})", fam.to_ascii_lowercase()),
                );
            }
        }
        if let Some(l) = listen {
            if local_port != 0 && l.port != local_port {
                self.is.warn("listen.addr", Some(q(&l.to_string())), format!("port differs from the network address port {local_port}, which is the port actually served"));
            }
        }
    }

    /// `metrics.listen` and `debug.pprof` (loopback only).
    fn ops(&mut self, raw: &RawConfig) -> (Option<HostPort>, Option<HostPort>) {
        let metrics = self.endpoint(
            "metrics.listen",
            raw.metrics.as_ref().and_then(|m| m.listen.as_ref()),
            false,
        );
        if let Some(m) = metrics.as_ref().filter(|m| !m.is_loopback()) {
            self.is.warn(
                "metrics.listen",
                Some(q(&m.to_string())),
                "not a loopback address: /metrics, /healthz and /readyz are reachable from the network without authentication; bind 127.0.0.1 or firewall the port",
            );
        }
        let pprof_raw = raw.debug.as_ref().and_then(|d| d.pprof.as_ref());
        let pprof = self.endpoint("debug.pprof", pprof_raw, false).filter(|hp| {
            let ok = hp.is_loopback();
            if !ok {
                self.is.error(
                    "debug.pprof",
                    pprof_raw.map(|s| q(s)),
                    "must be a loopback address (127.0.0.1, ::1 or localhost)",
                );
            }
            ok
        });
        (metrics, pprof)
    }

    /// `io.*`.
    fn io(&mut self, io: &RawIo) -> IoConfig {
        IoConfig {
            backend: self.choice_or_default("io.backend", io.backend.as_ref()),
            workers: self.int("io.workers", io.workers) as u32,
            cpus: self.choice_or_default("io.cpus", io.cpus.as_ref()),
            probe_response: self.choice_or_default("io.probe_response", io.probe_response.as_ref()),
        }
    }
}

/// The KCP preset and manual knobs.
struct Tuning {
    mode: KcpMode,
    nodelay: i32,
    interval: i32,
    resend: i32,
    nocongestion: i32,
    wdelay: bool,
    acknodelay: bool,
}

/// smux buffers and keep-alive.
struct Smux {
    smuxbuf: u32,
    streambuf: u32,
    smuxkalive: u32,
    smuxktimeout: u32,
}

/// Server limits.
struct Limits {
    sessions: Limit,
    streams_total: Limit,
    streams_per_session: Limit,
    header_timeout: u32,
}

/// Builds the validated configuration; `None` when the role is unusable. Errors go to `is`.
pub(crate) fn build(raw: &RawConfig, mode: Mode, is: &mut Issues) -> Option<Config> {
    let mut cx = Ctx {
        is,
        mode,
        role: None,
    };
    cx.role(raw);
    let log_level =
        cx.choice_or_default("log.level", raw.log.as_ref().and_then(|l| l.level.as_ref()));
    let (listen, server, servers) = cx.addresses(raw);
    let targets = cx.targets(raw);
    let (socks5, forward, http) = cx.front_ends(raw);
    let reverse = cx.reverse(&raw.reverse);
    let reverse_allow = cx.reverse_allow(raw);
    let network = cx.network(&raw.network.clone().unwrap_or_default());
    let transport = cx.transport(&raw.transport.clone().unwrap_or_default());
    cx.cross_checks(
        raw,
        &network,
        transport.conn,
        transport.rotate,
        listen.as_ref(),
        &servers,
    );
    let (metrics_listen, debug_pprof) = cx.ops(raw);
    let io = cx.io(&raw.io.clone().unwrap_or_default());
    Some(Config {
        role: cx.role?,
        log_level,
        listen,
        server,
        servers,
        targets,
        socks5,
        forward,
        http,
        reverse,
        reverse_allow,
        network,
        transport,
        metrics_listen,
        debug_pprof,
        io,
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

fn window_raw(wnd: u32, auto: bool) -> Option<IntOrString> {
    Some(if auto {
        IntOrString::Str("auto".to_string())
    } else {
        IntOrString::Int(i64::from(wnd))
    })
}

fn limit_raw(l: Limit) -> Option<i64> {
    Some(l.map_or(-1, i64::from))
}

/// The configuration as serde structs with every value explicit (for `to_toml_string`).
/// `[server]`: the client's `addr`, the server's `allow`/`deny` (absent when empty).
fn server_raw(c: &Config) -> Option<RawAddr> {
    let list = |rules: &[TargetRule]| {
        (!rules.is_empty()).then(|| rules.iter().map(ToString::to_string).collect())
    };
    let (addr, servers) = match c.servers.as_slice() {
        [] => (None, Vec::new()),
        [one] if one.weight == 1 => (Some(OneOrMany::One(one.addr.to_string())), Vec::new()),
        many if many.iter().all(|e| e.weight == 1) => (
            Some(OneOrMany::Many(
                many.iter().map(|e| e.addr.to_string()).collect(),
            )),
            Vec::new(),
        ),
        many => (
            None,
            many.iter()
                .map(|e| RawServer {
                    addr: Some(e.addr.to_string()),
                    weight: Some(i64::from(e.weight)),
                })
                .collect(),
        ),
    };
    let raw = RawAddr {
        addr,
        servers,
        allow: list(&c.targets.allow),
        deny: list(&c.targets.deny),
        reverse_allow: (!c.reverse_allow.is_empty())
            .then(|| c.reverse_allow.iter().map(ToString::to_string).collect()),
    };
    (raw != RawAddr::default()).then_some(raw)
}

pub(crate) fn to_raw(c: &Config) -> RawConfig {
    let k = &c.transport.kcp;
    let n = &c.network;
    RawConfig {
        role: Some(c.role.to_string()),
        log: Some(RawLog {
            level: Some(c.log_level.to_string()),
        }),
        listen: c.listen.as_ref().map(|l| RawAddr {
            addr: Some(OneOrMany::One(l.to_string())),
            ..RawAddr::default()
        }),
        server: server_raw(c),
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
            rotate: Some(RawRotate {
                after: Some(i64::from(c.transport.rotate.after_secs)),
                bytes: Some(c.transport.rotate.bytes as i64),
                drain: Some(i64::from(c.transport.rotate.drain_secs)),
            }),
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
                guard_format: Some(k.guard_format.to_string()),
                guard_bind: Some(k.guard_bind.to_string()),
                guard_magic: Some(String::from_utf8_lossy(&k.guard_magic).into_owned()),
                guard_window: Some(i64::from(k.guard_window)),
                guard_skew: Some(i64::from(k.guard_skew)),
                max_sessions: limit_raw(k.max_sessions),
                max_streams_total: limit_raw(k.max_streams_total),
                max_streams_per_session: limit_raw(k.max_streams_per_session),
                header_timeout: Some(i64::from(k.header_timeout)),
                replay_filter: Some(k.replay_filter.clone()),
                replay_horizon: Some(i64::from(k.replay_horizon)),
            }),
            noise: c.transport.noise.as_ref().map(super::noise::to_raw),
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
            probe_response: Some(c.io.probe_response.to_string()),
        }),
        socks5: c
            .socks5
            .iter()
            .map(|s| RawSocks5 {
                listen: Some(s.listen.to_string()),
                username: Some(s.username.clone()),
                password: Some(s.password.clone()),
                allow_open_proxy: s.allow_open_proxy.then_some(true),
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
        reverse: c
            .reverse
            .iter()
            .map(|r| RawReverse {
                // The default name (protocol/remote) is not a valid explicit one: leave it implicit.
                name: (r.name != format!("{}/{}", r.protocol, r.remote)).then(|| r.name.clone()),
                remote: Some(r.remote.to_string()),
                target: Some(r.target.to_string()),
                protocol: Some(r.protocol.to_string()),
            })
            .collect(),
        http: c
            .http
            .iter()
            .map(|h| RawHttp {
                listen: Some(h.listen.to_string()),
                username: h.username.clone(),
                password: h.password.clone(),
                allow_open_proxy: h.allow_open_proxy.then_some(true),
            })
            .collect(),
    }
}
