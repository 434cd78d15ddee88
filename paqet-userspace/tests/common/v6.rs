//! IPv6 for the end-to-end tests: a dual-stack veth topology, configs that put either or both families
//! in `network`, services on the server namespace's `::1`, a SOCKS5 UDP ASSOCIATE round trip for any
//! target family, and a reader for the raw frames of a [`Tcpdump`] capture.
//!
//! - [`dual_net`]: [`Net::direct`] plus `fd00:216::1/64` and `fe80::216:1/64` (client),
//!   `fd00:216::2/64` and `fe80::216:2/64` (server), added with `nodad` after router advertisements and
//!   DAD are switched off, so the addresses are usable at once; neighbour discovery works across the
//!   veth like ARP does.
//! - [`Plan`]: which families each daemon configures, which one the client dials (or a host name with
//!   both addresses, from a per-namespace hosts file, [`NetnsHosts`]), whether either side leaves its
//!   IPv6 address and `router_mac` to the kernel (route and neighbour lookups), and the guard.
//! - [`start`]: a [`Tunnel`] on [`dual_net`] from a [`Plan`] (the daemons install their own
//!   iptables/ip6tables rules with `--manage-firewall` in pcap mode), with extra HTTP and UDP echo
//!   services on `[::1]` ([`Services6`]).
//! - [`Tcpdump::frames`]: a capture's TCP frames with their IP header bytes, flags and checksum
//!   validity.
//!
//! Every address lives only inside the test's namespaces; every wait is bounded.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};

use paqet::util::pcapfile::PcapFile;
use paqet::wire::envelope::{parse_frame, transport_checksum, ETHERTYPE_IPV4, ETHERTYPE_IPV6};

use super::*;

/// The client's IPv6 address on the veth.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x216, 0, 0, 0, 0, 0, 1);
/// The server's IPv6 address on the veth.
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x216, 0, 0, 0, 0, 0, 2);
/// A link-local address of the client's veth end (the server's IPv6 default gateway when
/// [`Plan::server_v6_from_kernel`] is set, as a router advertisement would install it).
pub const CLIENT_LL6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0x216, 1);
/// A link-local address of the server's veth end.
pub const SERVER_LL6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0x216, 2);

/// Which `network.*` tables a daemon's config carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
    /// Both `network.ipv4` and `network.ipv6` (same port).
    Dual,
}

impl Fam {
    pub fn v4(self) -> bool {
        self != Fam::V6
    }

    pub fn v6(self) -> bool {
        self != Fam::V4
    }
}

/// How a v6 tunnel is configured.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// The server's families.
    pub server: Fam,
    /// The client's families.
    pub client: Fam,
    /// The family of the client's `server.addr` (true: the server's IPv6 address).
    pub dial_v6: bool,
    /// The client's `[network.ipv6]` table is empty: its address and `router_mac` come from the kernel.
    pub client_v6_from_kernel: bool,
    /// The server's `[network.ipv6]` table has only the port (`addr = ":PORT"`): its address comes from
    /// the kernel, and its `router_mac` from its IPv6 default route, which goes via the client's
    /// link-local address [`CLIENT_LL6`].
    pub server_v6_from_kernel: bool,
    /// Dial the server by this host name instead of an IP literal: the client namespace's hosts file
    /// ([`NetnsHosts`]) gives it both the server's IPv4 and IPv6 address.
    pub dial_name: Option<&'static str>,
    /// `transport.kcp.guard` on both sides (off: the wire is exactly upstream's).
    pub guard: bool,
}

impl Plan {
    /// Both sides IPv6 only, everything explicit.
    pub const V6: Plan = Plan {
        server: Fam::V6,
        client: Fam::V6,
        dial_v6: true,
        client_v6_from_kernel: false,
        server_v6_from_kernel: false,
        dial_name: None,
        guard: true,
    };
}

/// Client and server namespaces joined by one veth with an IPv4 and an IPv6 address on each end (see the
/// module docs). `tag` (≤ 4 bytes) must be unique per test.
pub fn dual_net(tag: &str) -> Net {
    let net = Net::direct(tag);
    for (ns, dev, ip, ll) in [
        (net.client(), &net.client_if, CLIENT_IP6, CLIENT_LL6),
        (net.server(), &net.server_if, SERVER_IP6, SERVER_LL6),
    ] {
        for key in ["all", "default", dev.as_str()] {
            for (k, v) in [
                ("accept_ra", "0"),
                ("accept_dad", "0"),
                ("disable_ipv6", "0"),
            ] {
                ns.exec(&["sysctl", "-qw", &format!("net.ipv6.conf.{key}.{k}={v}")])
                    .unwrap_or_else(|e| panic!("sysctl net.ipv6.conf.{key}.{k}: {e}"));
            }
        }
        for cidr in [format!("{ip}/64"), format!("{ll}/64")] {
            ns.exec(&["ip", "-6", "addr", "add", &cidr, "dev", dev, "nodad"])
                .unwrap_or_else(|e| panic!("ip -6 addr add {cidr} dev {dev}: {e}"));
        }
    }
    net
}

/// The server's tunnel endpoint in the family `v6` picks.
pub fn server_endpoint(net: &Net, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::from((SERVER_IP6, TUNNEL_PORT))
    } else {
        net.server_addr()
    }
}

/// The `[network.ipv4]` / `[network.ipv6]` tables for `fam`: `ip4`/`ip6` with `port`, next hop `gw`.
/// `v6_from_kernel` leaves the IPv6 address and `router_mac` to the kernel (the table keeps a non-zero
/// port).
fn family_tables(
    fam: Fam,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    port: u16,
    gw: &str,
    v6_from_kernel: bool,
) -> String {
    let mut s = String::new();
    if fam.v4() {
        s += &format!("[network.ipv4]\naddr = \"{ip4}:{port}\"\nrouter_mac = \"{gw}\"\n");
    }
    if fam.v6() {
        if v6_from_kernel && port != 0 {
            s += &format!("[network.ipv6]\naddr = \":{port}\"\n");
        } else if v6_from_kernel {
            s += "[network.ipv6]\n";
        } else {
            s += &format!("[network.ipv6]\naddr = \"[{ip6}]:{port}\"\nrouter_mac = \"{gw}\"\n");
        }
    }
    s
}

/// The `[transport]` tables both sides share.
fn transport(o: &Opts, key: &str, conn: Option<u32>, guard: bool) -> String {
    let conn = conn.map(|c| format!("conn = {c}\n")).unwrap_or_default();
    format!(
        "[transport]\nprotocol = \"kcp\"\n{conn}[transport.kcp]\nmode = \"{mode}\"\nsndwnd = {wnd}\nrcvwnd = {wnd}\nblock = \"aes\"\nkey = \"{key}\"\nguard = {guard}\nsmuxkalive = {ka}\nsmuxktimeout = {kt}\n",
        mode = o.kcp_mode,
        wnd = o.wnd,
        ka = o.smuxkalive,
        kt = o.smuxktimeout,
    )
}

/// The server's TOML config for `plan` (its families, [`Plan::server_v6_from_kernel`], the guard).
pub fn server_config(net: &Net, o: &Opts, plan: Plan) -> String {
    format!(
        "role = \"server\"\n[log]\nlevel = \"info\"\n[listen]\naddr = \":{TUNNEL_PORT}\"\n[network]\ninterface = \"{sif}\"\n{tables}{transport}[metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n",
        sif = net.server_if,
        tables = family_tables(
            plan.server,
            net.server_ip,
            SERVER_IP6,
            TUNNEL_PORT,
            &net.server_gw_mac,
            plan.server_v6_from_kernel
        ),
        transport = transport(o, &o.server_key, None, plan.guard),
    )
}

/// A client's TOML config for `plan`: SOCKS5 on `127.0.0.1` and `[::1]`, port `ports.socks`, a TCP forward (`ports.fwd_http`) to
/// `http` (the readiness probe), a UDP forward (`ports.fwd_udp`) to `udp`, metrics on `ports.metrics`.
pub fn client_config(
    net: &Net,
    o: &Opts,
    plan: Plan,
    http: SocketAddr,
    udp: SocketAddr,
    ports: ClientPorts,
) -> String {
    format!(
        r#"role = "client"
[log]
level = "info"
[server]
addr = "{server}"
[[socks5]]
listen = "127.0.0.1:{socks}"
[[socks5]]
listen = "[::1]:{socks}"
[[forward]]
listen = "127.0.0.1:{fwd_http}"
target = "{http}"
protocol = "tcp"
[[forward]]
listen = "127.0.0.1:{fwd_udp}"
target = "{udp}"
protocol = "udp"
[network]
interface = "{cif}"
{tables}{transport}[metrics]
listen = "127.0.0.1:{metrics}"
"#,
        server = match plan.dial_name {
            Some(name) => format!("{name}:{TUNNEL_PORT}"),
            None => server_endpoint(net, plan.dial_v6).to_string(),
        },
        socks = ports.socks,
        fwd_http = ports.fwd_http,
        fwd_udp = ports.fwd_udp,
        metrics = ports.metrics,
        cif = net.client_if,
        tables = family_tables(
            plan.client,
            net.client_ip,
            CLIENT_IP6,
            0,
            &net.client_gw_mac,
            plan.client_v6_from_kernel
        ),
        transport = transport(o, &o.client_key, Some(o.conn), plan.guard),
    )
}

/// HTTP and UDP echo services on the server namespace's `[::1]` (targets given to the tunnel as IPv6
/// literals).
pub struct Services6 {
    pub http: HttpServer,
    pub udp: UdpEcho,
}

impl Services6 {
    pub fn start(ns: &Netns) -> Services6 {
        let gate = Arc::new(HoldGate::default());
        let g = gate.clone();
        let l = in_ns(ns, || {
            TcpListener::bind("[::1]:0").expect("bind HTTP server on [::1]")
        });
        let addr = l.local_addr().expect("HTTP [::1] address");
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let g = g.clone();
                std::thread::spawn(move || {
                    let _ = serve_http(c, &g);
                });
            }
        });
        let u = in_ns(ns, || {
            UdpSocket::bind("[::1]:0").expect("bind UDP echo on [::1]")
        });
        let uaddr = u.local_addr().expect("UDP echo [::1] address");
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        });
        Services6 {
            http: HttpServer { addr, gate },
            udp: UdpEcho { addr: uaddr },
        }
    }
}

/// `/etc/netns/NS/hosts` for namespace `NS`: `ip netns exec` bind-mounts it over `/etc/hosts` for the
/// programs it runs there (the daemons), so names resolve inside the test only. Removed on drop.
pub struct NetnsHosts {
    dir: PathBuf,
}

impl NetnsHosts {
    /// Gives `name` the addresses `ips` (in this order) inside `ns`.
    pub fn new(ns: &Netns, name: &str, ips: &[IpAddr]) -> NetnsHosts {
        let dir = Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for ip in ips {
            text += &format!("{ip} {name}\n");
        }
        let file = dir.join("hosts");
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        NetnsHosts { dir }
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // Only when no other namespace has files there.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

/// A [`Tunnel`] on a [`dual_net`] with the IPv6 services.
pub struct Tunnel6 {
    // Field order = drop order: the daemons before the hosts file they read.
    pub t: Tunnel,
    pub plan: Plan,
    pub v6: Services6,
    pub hosts: Option<NetnsHosts>,
}

/// Builds the dual-stack network, the services (`127.0.0.1` and `[::1]`) and both daemons from `opts`
/// and `plan`, then waits until a request goes through the tunnel. In pcap mode the daemons install
/// their own iptables/ip6tables rules (`--manage-firewall`).
pub fn start(tag: &str, opts: Opts, plan: Plan) -> Tunnel6 {
    assert!(opts.link.is_none(), "the IPv6 topology is a direct veth");
    let net = dual_net(tag);
    let dir = TempDir::new(tag);
    let http = HttpServer::start(net.server());
    let udp = UdpEcho::start(net.server());
    let v6 = Services6::start(net.server());
    let manage_firewall = opts.firewall;
    assert!(
        !manage_firewall || run_supports("--manage-firewall"),
        "paqet-dp run has no --manage-firewall"
    );
    if plan.server_v6_from_kernel {
        let via = CLIENT_LL6.to_string();
        net.server()
            .exec(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &via,
                "dev",
                &net.server_if,
            ])
            .unwrap_or_else(|e| panic!("IPv6 default route via {via}: {e}"));
    }
    let hosts = plan.dial_name.map(|name| {
        NetnsHosts::new(
            net.client(),
            name,
            &[SERVER_IP6.into(), net.server_ip.into()],
        )
    });
    let scfg = server_config(&net, &opts, plan);
    let ccfg = client_config(&net, &opts, plan, http.addr, udp.addr, ClientPorts::MAIN);
    let server = Daemon::spawn(
        net.server(),
        dir.path(),
        "server",
        &scfg,
        opts.server_mode,
        manage_firewall && opts.server_mode.needs_firewall(),
    );
    let client = Daemon::spawn(
        net.client(),
        dir.path(),
        "client",
        &ccfg,
        opts.client_mode,
        manage_firewall && opts.client_mode.needs_firewall(),
    );
    let mut t = Tunnel {
        client,
        server,
        extra: Vec::new(),
        http,
        udp,
        opts,
        net,
        dir,
        manage_firewall,
    };
    t.wait_ready(READY_WITHIN)
        .unwrap_or_else(|e| panic!("tunnel not ready within {READY_WITHIN:?}: {e}"));
    Tunnel6 { t, plan, v6, hosts }
}

impl Tunnel6 {
    /// Starts another client daemon in the client namespace for `plan` (its families and the family it
    /// dials), with `ports`, in `mode` (one XDP daemon per interface: see [`Mode::beside`]).
    pub fn spawn_client(&self, name: &str, plan: Plan, ports: ClientPorts, mode: Mode) -> Daemon {
        let t = &self.t;
        let cfg = client_config(&t.net, &t.opts, plan, t.http.addr, t.udp.addr, ports);
        Daemon::spawn(
            t.net.client(),
            t.dir.path(),
            name,
            &cfg,
            mode,
            t.manage_firewall && mode.needs_firewall(),
        )
    }

    /// `http://[::1]:PORT{path}` of the server-side HTTP service on `::1`.
    pub fn url6(&self, path: &str) -> String {
        format!("http://{}{path}", self.v6.http.addr)
    }
}

/// One request/response through a SOCKS5 UDP ASSOCIATE on `proxy` (a loopback address of either
/// family) in `ns` to `target` (IPv4 or IPv6: ATYP 1 or 4): returns the reply payload. Retries the
/// datagram for up to `within`.
pub fn socks5_udp_any(
    ns: &Netns,
    proxy: SocketAddr,
    target: SocketAddr,
    payload: &[u8],
    within: Duration,
) -> Result<Vec<u8>, String> {
    let payload = payload.to_vec();
    in_ns(ns, move || {
        let mut ctl = TcpStream::connect_timeout(&proxy, Duration::from_secs(2))
            .map_err(|e| format!("connect {proxy}: {e}"))?;
        ctl.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        ctl.write_all(&[5, 1, 0]).map_err(|e| e.to_string())?;
        let mut m = [0u8; 2];
        ctl.read_exact(&mut m)
            .map_err(|e| format!("method reply: {e}"))?;
        if m != [5, 0] {
            return Err(format!("method reply {m:?}"));
        }
        let udp = UdpSocket::bind(SocketAddr::new(proxy.ip(), 0)).map_err(|e| e.to_string())?;
        let local = udp.local_addr().map_err(|e| e.to_string())?;
        let mut req = vec![5, 3, 0];
        push_addr(&mut req, local);
        ctl.write_all(&req).map_err(|e| e.to_string())?;
        let mut head = [0u8; 4];
        ctl.read_exact(&mut head)
            .map_err(|e| format!("UDP ASSOCIATE reply: {e}"))?;
        let alen = match head {
            [5, 0, 0, 1] => 4,
            [5, 0, 0, 4] => 16,
            _ => return Err(format!("UDP ASSOCIATE reply {head:?}")),
        };
        let mut rest = vec![0u8; alen + 2];
        ctl.read_exact(&mut rest)
            .map_err(|e| format!("UDP ASSOCIATE reply address: {e}"))?;
        let port = u16::from_be_bytes([rest[alen], rest[alen + 1]]);
        let ip: IpAddr = match alen {
            4 => <[u8; 4]>::try_from(&rest[..4]).expect("4 bytes").into(),
            _ => <[u8; 16]>::try_from(&rest[..16]).expect("16 bytes").into(),
        };
        let relay = SocketAddr::new(ip, port);
        if ip != proxy.ip() {
            return Err(format!(
                "relay {relay} is not on the proxy's address {proxy}"
            ));
        }
        let mut dgram = vec![0, 0, 0];
        push_addr(&mut dgram, target);
        let hdr = dgram.len();
        dgram.extend_from_slice(&payload);
        udp.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 65536];
        loop {
            udp.send_to(&dgram, relay)
                .map_err(|e| format!("send to relay {relay}: {e}"))?;
            match udp.recv_from(&mut buf) {
                Ok((n, from)) if from == relay && n >= hdr => {
                    if buf[..hdr] != dgram[..hdr] {
                        return Err(format!(
                            "reply header {:?}, want {:?}",
                            &buf[..hdr],
                            &dgram[..hdr]
                        ));
                    }
                    drop(ctl);
                    return Ok(buf[hdr..n].to_vec());
                }
                Ok((n, from)) => return Err(format!("unexpected {n}-byte datagram from {from}")),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("no reply through the relay {relay}: {e}"))
                }
                Err(_) => {}
            }
        }
    })
}

/// Appends SOCKS5 `ATYP ADDR PORT` for `a` (ATYP 1 or 4).
fn push_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// One tunnel frame of a capture: where it went and its IP header's bytes.
#[derive(Clone, Debug)]
pub struct WireFrame {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The EtherType (after any VLAN tags are skipped: the tests use none).
    pub ethertype: u16,
    /// The first 8 bytes of the IP header.
    pub ip_head: [u8; 8],
    /// TCP flags byte (13th byte of the TCP header).
    pub tcp_flags: u8,
    /// TCP payload length.
    pub payload_len: usize,
    /// The TCP checksum (with the IPv4 or IPv6 pseudo-header) is correct.
    pub checksum_ok: bool,
}

impl Tcpdump {
    /// Stops the capture (SIGINT) and returns every TCP frame in it (parse errors skipped, empty payloads
    /// kept: RSTs matter).
    pub fn frames(mut self) -> Vec<WireFrame> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let raw = std::fs::read(&self.file).expect("read capture");
        let cap = PcapFile::parse(&raw).expect("parse capture");
        cap.records
            .iter()
            .filter_map(|r| frame_of(r.data))
            .collect()
    }
}

/// Decodes one untagged Ethernet frame carrying TCP (IPv4 or IPv6) into a [`WireFrame`].
fn frame_of(f: &[u8]) -> Option<WireFrame> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip_head: [u8; 8] = f.get(14..22)?.try_into().ok()?;
    let (src, dst, tcp, payload_len) = match parse_frame(f, None) {
        Ok(p) => {
            let ip_len = match ethertype {
                ETHERTYPE_IPV4 => usize::from(f[14] & 0x0f) * 4,
                _ => 40,
            };
            (p.src_addr(), p.dst_addr(), 14 + ip_len, p.payload.len())
        }
        // A pure ACK / RST (the kernel's answers) has no payload: decode its addresses by hand.
        Err(_) => {
            let (ip_len, s, d): (usize, IpAddr, IpAddr) = match ethertype {
                ETHERTYPE_IPV4 if f.get(23) == Some(&6) => {
                    let ihl = usize::from(f.get(14)? & 0x0f) * 4;
                    let s: [u8; 4] = f.get(26..30)?.try_into().ok()?;
                    let d: [u8; 4] = f.get(30..34)?.try_into().ok()?;
                    (ihl, s.into(), d.into())
                }
                ETHERTYPE_IPV6 if f.get(20) == Some(&6) => {
                    let s: [u8; 16] = f.get(22..38)?.try_into().ok()?;
                    let d: [u8; 16] = f.get(38..54)?.try_into().ok()?;
                    (40, s.into(), d.into())
                }
                _ => return None,
            };
            let t = 14 + ip_len;
            let sp = u16::from_be_bytes([*f.get(t)?, *f.get(t + 1)?]);
            let dp = u16::from_be_bytes([*f.get(t + 2)?, *f.get(t + 3)?]);
            (SocketAddr::new(s, sp), SocketAddr::new(d, dp), t, 0)
        }
    };
    // The segment ends where the IP header says (Ethernet padding excluded).
    let seg_end = match ethertype {
        ETHERTYPE_IPV4 => 14 + usize::from(u16::from_be_bytes([ip_head[2], ip_head[3]])),
        _ => 14 + 40 + usize::from(u16::from_be_bytes([ip_head[4], ip_head[5]])),
    };
    let segment = f.get(tcp..seg_end)?;
    Some(WireFrame {
        src,
        dst,
        ethertype,
        ip_head,
        tcp_flags: *segment.get(13)?,
        payload_len,
        checksum_ok: transport_checksum(src.ip(), dst.ip(), 6, segment) == 0,
    })
}
