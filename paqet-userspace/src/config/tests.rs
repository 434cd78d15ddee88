//! Unit tests for the configuration module.

use super::*;

const KEY: &str = "0edb843fa5d512bbb688b437e6035b4965731b527bf229f2eed94185f23a3740";

/// Spec §2.3, verbatim except the key placeholder.
fn spec_client_yaml() -> String {
    include_str!("../../tests/data/spec_client.yaml").replace("<output of paqet secret>", KEY)
}

/// Spec §2.4, verbatim except the key placeholder.
fn spec_server_yaml() -> String {
    include_str!("../../tests/data/spec_server.yaml").replace("<same secret>", KEY)
}

fn toml_ok(text: &str) -> Loaded {
    match Config::from_toml_str(text) {
        Ok(l) => l,
        Err(e) => panic!("expected a valid config, got: {e}\n--- input ---\n{text}"),
    }
}

fn toml_errors(text: &str) -> Vec<String> {
    match Config::from_toml_str(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(ConfigError::Invalid { errors, .. }) => errors.iter().map(|e| e.to_string()).collect(),
        Err(other) => panic!("expected Invalid, got {other}"),
    }
}

fn assert_has(errors: &[String], needle: &str) {
    assert!(
        errors.iter().any(|e| e.contains(needle)),
        "no error contains {needle:?}; errors:\n{}",
        errors.join("\n")
    );
}

/// A minimal valid TOML client (guard on by default, so it has a key).
fn client_toml(extra_kcp: &str) -> String {
    format!(
        r#"role = "client"
[server]
addr = "10.0.0.2:9999"
[[socks5]]
listen = "127.0.0.1:1080"
[network]
interface = "eth0"
[network.ipv4]
addr = "10.0.0.1:0"
[transport]
protocol = "kcp"
[transport.kcp]
key = "{KEY}"
{extra_kcp}
"#
    )
}

fn server_toml(extra_kcp: &str) -> String {
    format!(
        r#"role = "server"
[listen]
addr = ":9999"
[network]
interface = "eth0"
[network.ipv4]
addr = "10.0.0.2:9999"
router_mac = "02:00:00:00:00:01"
[transport]
protocol = "kcp"
[transport.kcp]
key = "{KEY}"
{extra_kcp}
"#
    )
}

#[test]
fn spec_client_example_imports_and_round_trips() {
    let loaded = Config::from_yaml_str(&spec_client_yaml()).expect("spec §2.3 client imports");
    assert_eq!(loaded.format, Format::Yaml);
    let c = &loaded.config;
    assert_eq!(c.role, Role::Client);
    assert_eq!(c.log_level, LogLevel::Info);
    assert_eq!(c.server.as_ref().unwrap().to_string(), "203.0.113.10:9999");
    assert_eq!(
        c.server_socket_addr(),
        Some("203.0.113.10:9999".parse().unwrap())
    );
    assert_eq!(c.socks5.len(), 1);
    assert!(!c.socks5[0].auth_required());
    assert_eq!(c.forward.len(), 2);
    assert_eq!(c.forward[1].protocol, ForwardProtocol::Udp);
    assert_eq!(
        c.forward[1].target,
        HostPort {
            host: "1.1.1.1".into(),
            port: 53
        }
    );
    let v4 = c.network.ipv4.as_ref().unwrap();
    assert_eq!(v4.ip, Some(Ipv4Addr::new(192, 168, 1, 100)));
    assert_eq!(v4.port, 0);
    assert_eq!(
        v4.router_mac,
        Some(MacAddr([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]))
    );
    assert_eq!(c.local_flags(), ["PA".to_string()]);
    assert_eq!(c.key(), KEY);
    assert_eq!(c.block(), "aes");
    assert!(
        !c.transport.kcp.guard,
        "imported YAML keeps the upstream wire (guard off)"
    );
    assert_eq!(c.fec(), None);

    let toml_text = c.to_toml_string();
    let back = toml_ok(&toml_text);
    assert_eq!(back.format, Format::Toml);
    assert_eq!(
        &back.config, c,
        "TOML round trip changed the config:\n{toml_text}"
    );
    assert!(back.warnings.is_empty(), "{:?}", back.warnings);
}

#[test]
fn spec_server_example_imports_and_round_trips() {
    let loaded = Config::from_yaml_str(&spec_server_yaml()).expect("spec §2.4 server imports");
    let c = &loaded.config;
    assert_eq!(c.role, Role::Server);
    assert_eq!(
        c.listen,
        Some(HostPort {
            host: String::new(),
            port: 9999
        })
    );
    assert_eq!(c.local_port(), 9999);
    assert_eq!(c.network.remote_flag, vec!["PA".to_string()]);
    assert_eq!(c.transport.kcp.rcvwnd, 1024);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let toml_text = c.to_toml_string();
    assert_eq!(&toml_ok(&toml_text).config, c, "round trip:\n{toml_text}");
}

/// Drop-in: an upstream YAML config gets no limit upstream lacks (the stream/session limits unlimited, the
/// header timeout at its ceiling), with upstream's own smux/KCP values; TOML keeps the protective defaults;
/// a limit written in the YAML is honoured; `config import` writes the YAML defaults out explicitly.
#[test]
fn yaml_import_adds_no_limit_upstream_lacks() {
    let y = Config::from_yaml_str(&spec_server_yaml()).unwrap().config;
    let k = &y.transport.kcp;
    assert_eq!(
        (
            k.max_sessions,
            k.max_streams_total,
            k.max_streams_per_session,
            k.header_timeout
        ),
        (None, None, None, 3600)
    );
    assert_eq!(
        (k.smuxbuf, k.streambuf, k.smuxkalive, k.smuxktimeout),
        (4_194_304, 2_097_152, 2, 8)
    );
    assert_eq!((k.rcvwnd, k.sndwnd), (1024, 1024));
    assert!(!k.rcvwnd_auto && !k.sndwnd_auto && !k.guard);
    let toml_text = y.to_toml_string();
    for line in [
        "max_sessions = -1",
        "max_streams_total = -1",
        "max_streams_per_session = -1",
        "header_timeout = 3600",
    ] {
        assert!(toml_text.contains(line), "{line} missing in:\n{toml_text}");
    }
    assert_eq!(&toml_ok(&toml_text).config, &y);

    // The same server in TOML: the protective defaults.
    let t = toml_ok(&server_toml("")).config;
    let k = &t.transport.kcp;
    assert_eq!(
        (
            k.max_sessions,
            k.max_streams_total,
            k.max_streams_per_session,
            k.header_timeout
        ),
        (Some(512), Some(16384), Some(256), 10)
    );

    // A limit the YAML sets is honoured; one it leaves out stays unlimited (no clamp to it).
    let set = spec_server_yaml().replace(
        "smuxbuf: 4194304,",
        "max_streams_per_session: 10, header_timeout: 20, smuxbuf: 4194304,",
    );
    assert!(set.contains("max_streams_per_session: 10"), "{set}");
    let k = Config::from_yaml_str(&set).unwrap().config.transport.kcp;
    assert_eq!(
        (
            k.max_streams_per_session,
            k.max_streams_total,
            k.header_timeout
        ),
        (Some(10), None, 20)
    );

    // Every limit key paqet-dp adds is unlimited in imported YAML, so a new one cannot slip in with a cap.
    for key in schema() {
        if let Allowed::Limit(_) = key.allowed {
            assert!(!key.upstream, "{}", key.path);
            assert_eq!(*key.def.for_format(true), Def::Int(-1), "{}", key.path);
            assert_ne!(*key.def.for_format(false), Def::Int(-1), "{}", key.path);
        }
    }
}

/// `transport.rotate`: off by default, read with its ranges, refused with a fixed client port (a new
/// session needs a new source port), written by `to_toml_string`.
#[test]
fn rotate_keys() {
    let off = toml_ok(&client_toml("")).config.transport.rotate;
    assert!(!off.enabled());
    assert_eq!(off.drain_secs, 300);
    let text = client_toml("").replace(
        "[transport.kcp]",
        "[transport.rotate]\nafter = 30\nbytes = 1000000\ndrain = 5\n[transport.kcp]",
    );
    let c = toml_ok(&text).config;
    let r = c.transport.rotate;
    assert!(r.enabled());
    assert_eq!((r.after_secs, r.bytes, r.drain_secs), (30, 1_000_000, 5));
    assert_eq!(&toml_ok(&c.to_toml_string()).config, &c);
    assert_has(
        &toml_errors(&text.replace("drain = 5", "drain = 0")),
        "transport.rotate.drain = 0: must be 1..=86400",
    );
    assert_has(
        &toml_errors(&text.replace("10.0.0.1:0", "10.0.0.1:4000")),
        "transport.rotate: session rotation needs a new source port per session",
    );
}

fn testdata_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("PAQET_TESTDATA") {
        return dir.into();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/upstream-alpha21")
}

#[test]
fn upstream_capture_configs_load() {
    let dir = testdata_dir();
    let mut n = 0;
    for role in ["client", "server"] {
        for variant in ["fast", "fec", "gcm", "none", "null", "salsa"] {
            let path = dir.join(format!("{role}.{variant}.yaml"));
            let loaded = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let c = &loaded.config;
            assert_eq!(c.role.as_str(), role);
            assert_eq!(loaded.format, Format::Yaml);
            assert!(!c.transport.kcp.guard);
            assert_eq!(c.key(), KEY);
            let expected_block = match variant {
                "gcm" => "aes-128-gcm",
                "salsa" => "salsa20",
                "none" => "none",
                "null" => "null",
                _ => "aes",
            };
            assert_eq!(c.block(), expected_block, "{}", path.display());
            assert_eq!(
                c.fec(),
                (variant == "fec").then_some((10, 3)),
                "{}",
                path.display()
            );
            let back = toml_ok(&c.to_toml_string());
            assert_eq!(&back.config, c);
            n += 1;
        }
    }
    assert_eq!(n, 12);
}

#[test]
fn all_problems_reported_at_once() {
    let text = r#"role = "client"
colour = "blue"
[server]
addr = "10.0.0.2:0"
[[socks5]]
listen = "127.0.0.1:1080"
[network]
interface = "an-interface-name-too-long"
[network.ipv4]
addr = "10.0.0.1:0"
router_mac = "zz:bb:cc:dd:ee:ff"
[network.tcp]
local_flag = ["PA", "PX"]
[transport]
protocol = "quic"
conn = 0
[transport.kcp]
key = "k"
mtu = 40
mode = "turbo"
rcvwnd = 40000
guard_magic = "PQT"
guard_skew = 11
max_sessions = 0
smuxbuf = "big"
mtuu = 3
"#;
    let errors = toml_errors(text);
    let expect = [
        "colour = \"blue\": unknown key",
        "transport.kcp.mtuu = 3: unknown key; did you mean `transport.kcp.mtu`?",
        "server.addr = \"10.0.0.2:0\": port must be 1..=65535",
        "network.interface = \"an-interface-name-too-long\": must be 1..=15 bytes",
        "network.ipv4.router_mac = \"zz:bb:cc:dd:ee:ff\"",
        "network.tcp.local_flag[1] = \"PX\": 'X' is not a TCP flag letter",
        "transport.protocol = \"quic\": must be \"kcp\"",
        "transport.conn = 0: must be 1..=256",
        "transport.kcp.mtu = 40: must be 50..=1500",
        "transport.kcp.mode = \"turbo\": must be one of normal, fast, fast2, fast3, manual",
        "transport.kcp.rcvwnd = 40000: must be 1..=32768",
        "transport.kcp.guard_magic = \"PQT\": must be exactly 4 bytes",
        "transport.kcp.guard_skew = 11: must be 0..=10",
        "transport.kcp.max_sessions = 0: must be -1 (unlimited) or 1..=1000000",
        "transport.kcp.smuxbuf = \"big\": must be an integer",
    ];
    for e in expect {
        assert_has(&errors, e);
    }
    assert_eq!(
        errors.len(),
        expect.len(),
        "unexpected extra errors:\n{}",
        errors.join("\n")
    );
    // The rendered error lists every problem on its own line.
    let rendered = Config::from_toml_str(text).unwrap_err().to_string();
    assert!(
        rendered.starts_with(&format!(
            "invalid configuration ({} problem(s)):",
            expect.len()
        )),
        "{rendered}"
    );
    assert_eq!(
        rendered.lines().filter(|l| l.starts_with("  - ")).count(),
        expect.len()
    );
}

#[test]
fn defaults_per_role_are_upstreams() {
    let c = toml_ok(&client_toml("")).config;
    let k = &c.transport.kcp;
    assert_eq!(c.log_level, LogLevel::None);
    assert_eq!(
        (k.mode, k.mtu, k.rcvwnd, k.sndwnd),
        (KcpMode::Fast, 1350, 512, 128)
    );
    assert_eq!(c.network.pcap_sockbuf, 4 * 1024 * 1024);
    assert_eq!((c.transport.conn, k.dshard, k.pshard), (1, 0, 0));
    assert_eq!(
        (k.smuxbuf, k.streambuf, k.smuxkalive, k.smuxktimeout),
        (4_194_304, 2_097_152, 2, 8)
    );
    assert_eq!(k.block, "aes");
    assert_eq!(c.network.local_flag, ["PA"]);
    assert_eq!(c.network.remote_flag, ["PA"]);
    // paqet-dp additions.
    assert!(k.guard);
    assert_eq!(&k.guard_magic, b"PQT1");
    assert_eq!(
        (k.guard_window, k.guard_skew, k.header_timeout),
        (30, 1, 10)
    );
    assert_eq!(
        (
            k.max_sessions,
            k.max_streams_total,
            k.max_streams_per_session
        ),
        (Some(512), Some(16384), Some(256))
    );
    assert_eq!(
        c.io,
        IoConfig {
            backend: IoBackend::Auto,
            workers: 0,
            cpus: CpuPin::Auto,
            probe_response: ProbeResponse::Closed,
        }
    );
    assert_eq!(c.metrics_listen, None);
    assert_eq!(c.debug_pprof, None);
    assert_eq!(
        c.network.ipv4.as_ref().unwrap().router_mac,
        None,
        "router_mac may be omitted"
    );

    let s = toml_ok(&server_toml("")).config;
    let k = &s.transport.kcp;
    assert_eq!((k.rcvwnd, k.sndwnd), (1024, 1024));
    assert_eq!(s.network.pcap_sockbuf, 8 * 1024 * 1024);
    assert_eq!(s.local_port(), 9999);
}

#[test]
fn kcp_mode_presets() {
    let tuning = |mode: &str| {
        toml_ok(&client_toml(&format!("mode = \"{mode}\"")))
            .config
            .kcp_mode()
    };
    let t = |nodelay, interval, wdelay, acknodelay| KcpTuning {
        nodelay,
        interval,
        resend: 2,
        nocongestion: 1,
        wdelay,
        acknodelay,
    };
    assert_eq!(tuning("normal"), t(0, 40, true, false));
    assert_eq!(tuning("fast"), t(0, 30, true, false));
    assert_eq!(tuning("fast2"), t(1, 20, false, true));
    assert_eq!(tuning("fast3"), t(1, 10, false, true));
    let manual = toml_ok(&client_toml(
        "mode = \"manual\"\nnodelay = 1\ninterval = 15\nresend = 3\nnocongestion = 0\nwdelay = true\nacknodelay = true",
    ));
    assert_eq!(
        manual.config.kcp_mode(),
        KcpTuning {
            nodelay: 1,
            interval: 15,
            resend: 3,
            nocongestion: 0,
            wdelay: true,
            acknodelay: true
        }
    );
    // Manual knobs outside manual mode are warned about, not silently taken.
    let ignored = toml_ok(&client_toml("interval = 15"));
    assert_eq!(ignored.config.kcp_mode().interval, 30);
    assert!(
        ignored
            .warnings
            .iter()
            .any(|w| w.key == "transport.kcp.interval"),
        "{:?}",
        ignored.warnings
    );
}

#[test]
fn explicit_client_port_allows_one_connection() {
    let text = client_toml("")
        .replace("10.0.0.1:0", "10.0.0.1:40000")
        .replace("protocol = \"kcp\"", "protocol = \"kcp\"\nconn = 4");
    let errors = toml_errors(&text);
    assert_has(
        &errors,
        "transport.conn = 4: only one connection is allowed when a client port is explicitly set",
    );
    let ok = client_toml("").replace("protocol = \"kcp\"", "protocol = \"kcp\"\nconn = 4");
    assert_eq!(toml_ok(&ok).config.transport.conn, 4);
}

#[test]
fn family_rules() {
    // Ports of both families must match.
    let text = server_toml("").replace(
        "[transport]",
        "[network.ipv6]\naddr = \"[2001:db8::10]:9998\"\n[transport]",
    );
    assert_has(&toml_errors(&text), "network.ipv6.addr = \"[2001:db8::10]:9998\": port 9998 must equal network.ipv4.addr's port 9999");
    let ok = server_toml("").replace(
        "[transport]",
        "[network.ipv6]\naddr = \"[2001:db8::10]:9999\"\n[transport]",
    );
    let c = toml_ok(&ok).config;
    assert_eq!(
        c.network.ipv6.as_ref().unwrap().ip,
        Some("2001:db8::10".parse().unwrap())
    );
    // The server address family needs its network family.
    let v6_server = client_toml("").replace("10.0.0.2:9999", "[2001:db8::2]:9999");
    assert_has(
        &toml_errors(&v6_server),
        "server address is IPv6, but the IPv6 interface is not configured",
    );
    // Wrong family literal; server needs a fixed port.
    let wrong = server_toml("").replace("10.0.0.2:9999", "[::1]:9999");
    assert_has(
        &toml_errors(&wrong),
        "network.ipv4.addr = \"[::1]:9999\": must be an ipv4 address",
    );
    let port0 = server_toml("").replace("10.0.0.2:9999", "10.0.0.2:0");
    assert_has(&toml_errors(&port0), "a server needs a fixed port");
    // Interface address may be omitted (resolved at run time).
    let no_ip = client_toml("").replace("10.0.0.1:0", ":0");
    assert_eq!(
        toml_ok(&no_ip).config.network.ipv4.as_ref().unwrap().ip,
        None
    );
    let none = client_toml("").replace("[network.ipv4]\naddr = \"10.0.0.1:0\"\n", "");
    assert_has(
        &toml_errors(&none),
        "at least one of network.ipv4 / network.ipv6 must be configured",
    );
}

#[test]
fn key_rules_and_guard() {
    let no_key = client_toml("").replace(&format!("key = \"{KEY}\""), "");
    assert_has(
        &toml_errors(&no_key),
        "transport.kcp.key: required for block = \"aes\"",
    );
    let none_guard = format!("{no_key}block = \"none\"\n");
    assert_has(
        &toml_errors(&none_guard),
        "the guard needs a key even with block = \"none\"",
    );
    let none_no_guard = format!("{no_key}block = \"none\"\nguard = false\n");
    let c = toml_ok(&none_no_guard).config;
    assert_eq!(
        (c.block(), c.key(), c.transport.kcp.guard),
        ("none", "", false)
    );
    assert_eq!(&toml_ok(&c.to_toml_string()).config, &c);
    // YAML import: guard off, so none/null needs no key.
    let yaml = spec_server_yaml()
        .replace("block: \"aes\",", "block: \"null\",")
        .replace(&format!("key: \"{KEY}\","), "");
    assert_eq!(Config::from_yaml_str(&yaml).unwrap().config.key(), "");
}

#[test]
fn guard_format_bind_and_probe_response() {
    let c = toml_ok(&client_toml("")).config;
    let k = &c.transport.kcp;
    assert_eq!(
        (k.guard, k.guard_format, k.guard_bind),
        (true, GuardFormat::Tag, GuardBind::Port)
    );
    assert_eq!(c.io.probe_response, ProbeResponse::Closed);
    let l = toml_ok(&format!(
        "{}[io]\nprobe_response = \"silent\"\n",
        client_toml("guard_format = \"cookie\"\nguard_bind = \"4tuple\"")
    ));
    let k = &l.config.transport.kcp;
    assert_eq!(
        (k.guard_format, k.guard_bind),
        (GuardFormat::Cookie, GuardBind::FourTuple)
    );
    assert_eq!(l.config.io.probe_response, ProbeResponse::Silent);
    assert!(
        l.warnings.iter().any(|w| w
            .to_string()
            .contains("transport.kcp.guard_format = \"cookie\": deprecated")),
        "{:?}",
        l.warnings
    );
    assert_eq!(&toml_ok(&l.config.to_toml_string()).config, &l.config);
    // The cookie with the guard off warns about nothing.
    let off = toml_ok(&client_toml("guard = false\nguard_format = \"cookie\""));
    assert!(off.warnings.is_empty(), "{:?}", off.warnings);
    assert_has(
        &toml_errors(&client_toml("guard_format = \"hmac\"")),
        "transport.kcp.guard_format = \"hmac\": must be one of",
    );
    assert_has(
        &toml_errors(&client_toml("guard_bind = \"ip\"")),
        "transport.kcp.guard_bind = \"ip\": must be one of",
    );
    assert_has(
        &toml_errors(&format!(
            "{}[io]\nprobe_response = \"rst\"\n",
            client_toml("")
        )),
        "io.probe_response = \"rst\": must be one of",
    );
}

#[test]
fn buffer_and_limit_rules() {
    assert_has(
        &toml_errors(&client_toml("streambuf = 8388608")),
        "transport.kcp.streambuf = 8388608: must be 1024..=smuxbuf (4194304)",
    );
    assert_has(
        &toml_errors(&client_toml("smuxbuf = 1048576")),
        "transport.kcp.smuxbuf = 1048576: must be >= streambuf (2097152)",
    );
    assert_has(
        &toml_errors(&client_toml("smuxkalive = 10\nsmuxktimeout = 5")),
        "transport.kcp.smuxktimeout = 5: must be smuxkalive (10)..=86400",
    );
    assert_has(
        &toml_errors(&client_toml("dshard = 200\npshard = 100")),
        "dshard + pshard = 300 exceeds 256",
    );
    let clamped = toml_ok(&server_toml(
        "max_streams_total = 100\nmax_streams_per_session = 500",
    ));
    assert_eq!(
        clamped.config.transport.kcp.max_streams_per_session,
        Some(100)
    );
    assert!(clamped
        .warnings
        .iter()
        .any(|w| w.message.contains("clamped")));
    let unlimited = toml_ok(&server_toml(
        "max_sessions = -1\nmax_streams_total = -1\nmax_streams_per_session = -1",
    ))
    .config;
    let k = &unlimited.transport.kcp;
    assert_eq!(
        (
            k.max_sessions,
            k.max_streams_total,
            k.max_streams_per_session
        ),
        (None, None, None)
    );
    assert_eq!(&toml_ok(&unlimited.to_toml_string()).config, &unlimited);
    assert_has(
        &toml_errors(&server_toml("header_timeout = 0")),
        "transport.kcp.header_timeout = 0: must be 1..=3600",
    );
    let odd = toml_ok(&server_toml("").replace(
        "[transport]",
        "[network.pcap]\nsockbuf = 3000000\n[transport]",
    ));
    assert!(odd.warnings.iter().any(|w| w.key == "network.pcap.sockbuf"));
}

#[test]
fn replay_filter_keys_default_per_format_and_check_their_range() {
    let c = toml_ok(&server_toml("")).config;
    let k = &c.transport.kcp;
    assert_eq!(
        (k.replay_filter.as_str(), k.replay_horizon),
        ("/var/lib/paqet-dp/replay.bin", 7)
    );
    let set = toml_ok(&server_toml("replay_filter = \"\"\nreplay_horizon = 30")).config;
    assert_eq!(
        (
            set.transport.kcp.replay_filter.as_str(),
            set.transport.kcp.replay_horizon
        ),
        ("", 30)
    );
    assert_eq!(&toml_ok(&set.to_toml_string()).config, &set);
    for bad in ["replay_horizon = 0", "replay_horizon = 366"] {
        let v = bad.rsplit(' ').next().unwrap();
        assert_has(
            &toml_errors(&server_toml(bad)),
            &format!("transport.kcp.replay_horizon = {v}: must be 1..=365"),
        );
    }
    // Imported upstream YAML: in memory only (no new file on disk).
    let y = Config::from_yaml_str(&spec_server_yaml()).unwrap().config;
    assert_eq!(y.transport.kcp.replay_filter, "");
    assert_eq!(y.transport.kcp.replay_horizon, 7);
}

#[test]
fn role_placement() {
    // TOML: client-only keys on a server are errors; YAML: ignored with a warning.
    let text = format!(
        "{}\n[[forward]]\nlisten = \"127.0.0.1:80\"\ntarget = \"1.2.3.4:80\"\nprotocol = \"tcp\"\n",
        server_toml("")
    );
    assert_has(&toml_errors(&text), "forward: only valid for role client");
    let yaml = format!("{}\nforward:\n  - {{ listen: \"127.0.0.1:80\", target: \"1.2.3.4:80\", protocol: \"tcp\" }}\n", spec_server_yaml());
    let loaded = Config::from_yaml_str(&yaml).unwrap();
    assert!(loaded.config.forward.is_empty());
    assert!(loaded.warnings.iter().any(|w| w.key == "forward"));
    // Client with no front end: warning only.
    let bare = client_toml("").replace("[[socks5]]\nlisten = \"127.0.0.1:1080\"\n", "");
    assert!(toml_ok(&bare)
        .warnings
        .iter()
        .any(|w| w.message.contains("nothing will use the tunnel")));
    // Forward protocol and missing required fields.
    let bad_fwd = format!(
        "{}\n[[forward]]\nlisten = \"127.0.0.1:80\"\nprotocol = \"sctp\"\n",
        client_toml("")
    );
    let errors = toml_errors(&bad_fwd);
    assert_has(&errors, "forward[0].target: required");
    assert_has(
        &errors,
        "forward[0].protocol = \"sctp\": must be one of tcp, udp",
    );
    // HTTP listener auth must be complete.
    let http = format!(
        "{}\n[[http]]\nlisten = \"127.0.0.1:8080\"\nusername = \"u\"\n",
        client_toml("")
    );
    assert_has(&toml_errors(&http), "http[0].password: required when");
    let http_ok = format!(
        "{}\n[[http]]\nlisten = \"127.0.0.1:8080\"\nusername = \"u\"\npassword = \"p\"\n",
        client_toml("")
    );
    let c = toml_ok(&http_ok).config;
    assert_eq!(c.http[0].auth(), Some(("u", "p")));
    assert_eq!(&toml_ok(&c.to_toml_string()).config, &c);
    // Missing role.
    assert_has(&toml_errors("[log]\nlevel = \"info\""), "role: required");
}

#[test]
fn yaml_import_is_lenient_like_upstream() {
    let yaml = format!(
        "{}\nunknown_top: 1\nnetwork_extra: {{ a: 1 }}\n",
        spec_client_yaml()
            .replace("conn: 1", "conn: 0\n  tcpbuf: 8192")
            .replace("mtu: 1350", "mtu: 0")
    );
    let loaded = Config::from_yaml_str(&yaml).unwrap();
    // Go zero values mean "unset".
    assert_eq!(loaded.config.transport.conn, 1);
    assert_eq!(loaded.config.transport.kcp.mtu, 1350);
    let keys: Vec<&str> = loaded.warnings.iter().map(|w| w.key.as_str()).collect();
    for k in ["unknown_top", "network_extra", "transport.tcpbuf"] {
        assert!(keys.contains(&k), "no warning for {k}: {keys:?}");
    }
    // The same unknown key in TOML is an error.
    assert_has(
        &toml_errors(&format!("unknown_top = 1\n{}", client_toml(""))),
        "unknown_top = 1: unknown key",
    );
    // Unquoted numeric key is taken as a string, as Go does.
    let numeric = spec_server_yaml().replace(&format!("\"{KEY}\""), "123456");
    assert_eq!(
        Config::from_yaml_str(&numeric).unwrap().config.key(),
        "123456"
    );
    assert!(matches!(
        Config::from_yaml_str("- a\n- b\n"),
        Err(ConfigError::YamlSyntax(_))
    ));
    assert!(matches!(
        Config::from_yaml_str("role: [unclosed"),
        Err(ConfigError::YamlSyntax(_))
    ));
    assert!(matches!(
        Config::from_toml_str("role = "),
        Err(ConfigError::TomlSyntax(_))
    ));
}

#[test]
fn debug_and_metrics_addresses() {
    let with = |extra: &str| format!("{}\n{extra}", server_toml(""));
    let c = toml_ok(&with("[debug]\npprof = \"127.0.0.1:6060\"\n[metrics]\nlisten = \"0.0.0.0:9100\"\n[io]\nbackend = \"pcap\"\nworkers = 2")).config;
    assert_eq!(
        c.debug_pprof.as_ref().unwrap().to_string(),
        "127.0.0.1:6060"
    );
    assert_eq!(c.metrics_listen.as_ref().unwrap().port, 9100);
    assert_eq!(
        c.io,
        IoConfig {
            backend: IoBackend::Pcap,
            workers: 2,
            cpus: CpuPin::Auto,
            probe_response: ProbeResponse::Closed,
        }
    );
    assert_eq!(&toml_ok(&c.to_toml_string()).config, &c);
    assert_has(
        &toml_errors(&with("[debug]\npprof = \"0.0.0.0:6060\"")),
        "debug.pprof = \"0.0.0.0:6060\": must be a loopback address",
    );
    assert_has(
        &toml_errors(&with("[metrics]\nlisten = \"9100\"")),
        "metrics.listen = \"9100\": missing port",
    );
}

#[test]
fn load_picks_format_by_extension_and_content() {
    let dir = std::env::temp_dir().join(format!("paqet-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let yml = dir.join("a.yml");
    std::fs::write(&yml, spec_server_yaml()).unwrap();
    assert_eq!(Config::load(&yml).unwrap().format, Format::Yaml);
    let toml_path = dir.join("a.toml");
    std::fs::write(&toml_path, server_toml("")).unwrap();
    assert_eq!(Config::load(&toml_path).unwrap().format, Format::Toml);
    let sniff_yaml = dir.join("paqet.conf");
    std::fs::write(&sniff_yaml, spec_server_yaml()).unwrap();
    assert_eq!(Config::load(&sniff_yaml).unwrap().format, Format::Yaml);
    let sniff_toml = dir.join("paqet.cfg");
    std::fs::write(&sniff_toml, server_toml("")).unwrap();
    assert_eq!(Config::load(&sniff_toml).unwrap().format, Format::Toml);
    let missing = dir.join("missing.toml");
    let err = Config::load(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.toml"), "{err}");
}

/// The windows and congestion control of a loaded configuration:
/// `(cc, bandwidth, (sndwnd, auto), (rcvwnd, auto))`.
fn cc_windows(c: &Config) -> (CcAlgorithm, Option<u64>, (u32, bool), (u32, bool)) {
    let k = &c.transport.kcp;
    (
        k.cc,
        k.bandwidth,
        (k.sndwnd, k.sndwnd_auto),
        (k.rcvwnd, k.rcvwnd_auto),
    )
}

/// `to_toml_string` reads back to the same configuration, without warnings.
fn assert_round_trips(c: &Config) -> toml::Table {
    let text = c.to_toml_string();
    let back = toml_ok(&text);
    assert_eq!(
        &back.config, c,
        "TOML round trip changed the config:\n{text}"
    );
    assert!(back.warnings.is_empty(), "{:?}\n{text}", back.warnings);
    text.parse().expect("own TOML parses")
}

fn kcp_value<'a>(t: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    t.get("transport")?.get("kcp")?.get(key)
}

#[test]
fn toml_defaults_are_bbr_and_auto_windows() {
    let c = toml_ok(&client_toml("")).config;
    assert_eq!(
        cc_windows(&c),
        (CcAlgorithm::Bbr, None, (128, true), (512, true))
    );
    let k = &c.transport.kcp;
    assert_eq!(k.window_mem, 32 * 1024 * 1024);
    // min(32768, 32 MiB / 1350) packets.
    assert_eq!(k.max_wnd(), 33_554_432 / 1350);
    let explicit = assert_round_trips(&c);
    assert_eq!(
        kcp_value(&explicit, "cc").and_then(|v| v.as_str()),
        Some("bbr")
    );
    assert_eq!(
        kcp_value(&explicit, "sndwnd").and_then(|v| v.as_str()),
        Some("auto")
    );
    assert_eq!(
        kcp_value(&explicit, "rcvwnd").and_then(|v| v.as_str()),
        Some("auto")
    );
    assert_eq!(
        kcp_value(&explicit, "window_mem").and_then(|v| v.as_integer()),
        Some(33_554_432)
    );
    assert_eq!(kcp_value(&explicit, "bandwidth"), None);

    let s = toml_ok(&server_toml("")).config;
    assert_eq!(
        cc_windows(&s),
        (CcAlgorithm::Bbr, None, (1024, true), (1024, true))
    );
    assert_round_trips(&s);

    // An integer is a fixed window; "auto" written out is the default.
    let fixed = toml_ok(&client_toml("sndwnd = 256\nrcvwnd = \"auto\"")).config;
    assert_eq!(cc_windows(&fixed).2, (256, false));
    assert_eq!(cc_windows(&fixed).3, (512, true));
    let explicit = assert_round_trips(&fixed);
    assert_eq!(
        kcp_value(&explicit, "sndwnd").and_then(|v| v.as_integer()),
        Some(256)
    );
}

#[test]
fn yaml_import_keeps_upstream_windows_unless_auto() {
    // Spec client: windows written (512/128), cc unset → bbr, windows fixed.
    let c = Config::from_yaml_str(&spec_client_yaml()).unwrap().config;
    assert_eq!(
        cc_windows(&c),
        (CcAlgorithm::Bbr, None, (128, false), (512, false))
    );
    let explicit = assert_round_trips(&c);
    assert_eq!(
        kcp_value(&explicit, "sndwnd").and_then(|v| v.as_integer()),
        Some(128)
    );
    assert_eq!(
        kcp_value(&explicit, "cc").and_then(|v| v.as_str()),
        Some("bbr")
    );

    // Windows left out (or Go's zero value): upstream's fixed values, no auto-tuning.
    let unset = spec_client_yaml()
        .replace("    rcvwnd: 512\n", "")
        .replace("sndwnd: 128", "sndwnd: 0");
    let c = Config::from_yaml_str(&unset).unwrap().config;
    assert_eq!(
        cc_windows(&c),
        (CcAlgorithm::Bbr, None, (128, false), (512, false))
    );
    let s = Config::from_yaml_str(&spec_server_yaml()).unwrap().config;
    assert_eq!(cc_windows(&s).2, (1024, false));
    assert_eq!(cc_windows(&s).3, (1024, false));

    // `auto` written in the YAML: that window is auto-tuned from the role's default; the other stays fixed.
    let auto = spec_client_yaml().replace("sndwnd: 128", "sndwnd: auto");
    let loaded = Config::from_yaml_str(&auto).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(
        cc_windows(&loaded.config),
        (CcAlgorithm::Bbr, None, (128, true), (512, false))
    );
    // `config import` output keeps it.
    let explicit = assert_round_trips(&loaded.config);
    assert_eq!(
        kcp_value(&explicit, "sndwnd").and_then(|v| v.as_str()),
        Some("auto")
    );
    assert_eq!(
        kcp_value(&explicit, "rcvwnd").and_then(|v| v.as_integer()),
        Some(512)
    );

    // The paqet-dp keys are read from YAML too (a float rate is taken as written, as a string would be).
    let fixed = auto.replace(
        "    smuxbuf:",
        "    cc: fixed\n    bandwidth: 100mbit\n    window_mem: 8388608\n    smuxbuf:",
    );
    let c = Config::from_yaml_str(&fixed).unwrap().config;
    assert_eq!(
        cc_windows(&c),
        (
            CcAlgorithm::Fixed,
            Some(12_500_000),
            (128, true),
            (512, false)
        )
    );
    assert_eq!(c.transport.kcp.window_mem, 8_388_608);
    let explicit = assert_round_trips(&c);
    assert_eq!(
        kcp_value(&explicit, "bandwidth").and_then(|v| v.as_integer()),
        Some(12_500_000)
    );
    let float = fixed.replace("bandwidth: 100mbit", "bandwidth: 1.5e6");
    assert_eq!(
        Config::from_yaml_str(&float)
            .unwrap()
            .config
            .transport
            .kcp
            .bandwidth,
        Some(1_500_000)
    );
}

#[test]
fn cc_and_window_errors_name_key_value_and_range() {
    let errors = toml_errors(&client_toml(
        "cc = \"cubic\"\nbandwidth = \"fast\"\nwindow_mem = 1024\nsndwnd = \"autox\"\nrcvwnd = 0",
    ));
    let expect = [
        "transport.kcp.cc = \"cubic\": must be one of bbr, fixed, off",
        "transport.kcp.bandwidth = \"fast\": must be a number with a unit: kbit, mbit, gbit (bits/s) or kb, mb, gb, kib, mib, gib (bytes/s)",
        "transport.kcp.window_mem = 1024: must be 1048576..=1073741824",
        "transport.kcp.sndwnd = \"autox\": must be 1..=32768, or auto",
        "transport.kcp.rcvwnd = 0: must be 1..=32768, or auto",
    ];
    for e in expect {
        assert_has(&errors, e);
    }
    assert_eq!(errors.len(), expect.len(), "{}", errors.join("\n"));

    // cc = "fixed" needs a rate.
    let errors = toml_errors(&client_toml("cc = \"fixed\""));
    assert_eq!(
        errors,
        ["transport.kcp.bandwidth: required for cc = \"fixed\": the pacing rate, e.g. \"100mbit\""]
    );
    // Bad rates: zero, negative, no number, unknown unit, too large; a bad rate is an error whatever cc is.
    for (written, shown) in [
        ("0", "0"),
        ("-5", "-5"),
        ("\"0kbit\"", "\"0kbit\""),
        ("\"mbit\"", "\"mbit\""),
        ("\"100 furlongs\"", "\"100 furlongs\""),
        ("\"2000gb\"", "\"2000gb\""),
    ] {
        for cc in ["fixed", "bbr"] {
            let errors = toml_errors(&client_toml(&format!(
                "cc = \"{cc}\"\nbandwidth = {written}"
            )));
            assert_has(
                &errors,
                &format!("transport.kcp.bandwidth = {shown}: must be"),
            );
            assert_eq!(errors.len(), 1, "{}", errors.join("\n"));
        }
    }
    // Wrong types and out-of-range windows.
    assert_has(
        &toml_errors(&client_toml("sndwnd = true")),
        "transport.kcp.sndwnd = true: must be an integer or a string (1..=32768, or auto)",
    );
    assert_has(
        &toml_errors(&client_toml("rcvwnd = 32769")),
        "transport.kcp.rcvwnd = 32769: must be 1..=32768, or auto",
    );
    assert_has(
        &toml_errors(&client_toml("sndwnd = \"AUTO\"")),
        "transport.kcp.sndwnd = \"AUTO\": must be 1..=32768, or auto",
    );
    assert_has(
        &toml_errors(&client_toml("window_mem = 1073741825")),
        "transport.kcp.window_mem = 1073741825: must be 1048576..=1073741824",
    );
    assert_has(
        &toml_errors(&client_toml("cc = 1")),
        "transport.kcp.cc = 1: must be a string (bbr, fixed, off)",
    );
    // Imported YAML reports the same problems.
    let yaml = spec_client_yaml().replace("sndwnd: 128", "sndwnd: autox\n    cc: reno");
    match Config::from_yaml_str(&yaml) {
        Err(ConfigError::Invalid { errors, .. }) => {
            let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            assert_has(
                &errors,
                "transport.kcp.sndwnd = \"autox\": must be 1..=32768, or auto",
            );
            assert_has(
                &errors,
                "transport.kcp.cc = \"reno\": must be one of bbr, fixed, off",
            );
            assert_eq!(errors.len(), 2, "{}", errors.join("\n"));
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn bandwidth_units() {
    let rate = |written: &str| {
        let loaded = toml_ok(&client_toml(&format!(
            "cc = \"fixed\"\nbandwidth = {written}"
        )));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_round_trips(&loaded.config);
        loaded.config.transport.kcp.bandwidth
    };
    for (written, bytes_per_sec) in [
        ("\"100mbit\"", 12_500_000),
        ("\"1.5gbit\"", 187_500_000),
        ("\"800kbit\"", 100_000),
        ("\"100Mbps\"", 12_500_000),
        ("\"12.5mb\"", 12_500_000),
        ("\"500kb\"", 500_000),
        ("\"1gb\"", 1_000_000_000),
        ("\"2mib\"", 2 * 1024 * 1024),
        ("\"4000000\"", 4_000_000),
        ("4000000", 4_000_000),
        ("1", 1),
        ("1000000000000", 1_000_000_000_000),
    ] {
        assert_eq!(rate(written), Some(bytes_per_sec), "bandwidth = {written}");
    }
}

#[test]
fn bandwidth_without_fixed_is_ignored_with_a_warning() {
    for cc in ["bbr", "off"] {
        let loaded = toml_ok(&client_toml(&format!(
            "cc = \"{cc}\"\nbandwidth = \"100mbit\""
        )));
        assert_eq!(loaded.config.transport.kcp.bandwidth, None);
        assert_eq!(loaded.config.transport.kcp.cc.to_string(), cc);
        let w: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            w,
            [format!("transport.kcp.bandwidth = \"100mbit\": ignored: only used when transport.kcp.cc = \"fixed\" (cc is {cc})")]
        );
        // The ignored rate is not exported, so the import output loads without the warning.
        assert_round_trips(&loaded.config);
    }
    // cc = "off" alone: upstream's behaviour, nothing else changes.
    let off = toml_ok(&client_toml("cc = \"off\"")).config;
    assert_eq!(
        cc_windows(&off),
        (CcAlgorithm::Off, None, (128, true), (512, true))
    );
}

#[test]
fn window_mem_caps_auto_windows() {
    let max_wnd = |extra: &str, server: bool| {
        let text = if server {
            server_toml(extra)
        } else {
            client_toml(extra)
        };
        toml_ok(&text).config.transport.kcp.max_wnd()
    };
    // 1 MiB / 1350 = 776 packets.
    assert_eq!(max_wnd("window_mem = 1048576", false), 776);
    // Never below the starting window (server starts at 1024).
    assert_eq!(max_wnd("window_mem = 1048576", true), 1024);
    // Never above 32768 packets.
    assert_eq!(max_wnd("window_mem = 1073741824", false), 32768);
    // The mtu counts: 1 MiB / 500 = 2097.
    assert_eq!(max_wnd("window_mem = 1048576\nmtu = 500", false), 2097);
    // Only the auto windows' starts raise it: a fixed 4096 sndwnd does not.
    assert_eq!(max_wnd("window_mem = 1048576\nsndwnd = 4096", false), 776);
    assert_eq!(
        max_wnd(
            "window_mem = 1048576\nsndwnd = 4096\nrcvwnd = \"auto\"",
            true
        ),
        1024
    );

    // A non-default window_mem with both windows fixed has no effect: warned about.
    let loaded = toml_ok(&client_toml(
        "window_mem = 1048576\nsndwnd = 128\nrcvwnd = 512",
    ));
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.key == "transport.kcp.window_mem" && w.message.contains("ignored")),
        "{:?}",
        loaded.warnings
    );
    // The explicit default (as `config import` writes it) is not.
    let loaded = toml_ok(&client_toml(
        "window_mem = 33554432\nsndwnd = 128\nrcvwnd = 512",
    ));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn session_config_carries_cc_and_autotune() {
    use crate::proto::cc::CcConfig;
    use crate::proto::kcp::Autotune;
    use crate::worker::setup::session_config;
    let kcp = |text: &str| match session_config(&toml_ok(text).config) {
        Ok(s) => s.kcp,
        Err(e) => panic!("session_config: {e}"),
    };
    let k = kcp(&client_toml(""));
    assert_eq!(k.cc, CcConfig::BBR);
    assert_eq!(
        (k.sndwnd, k.rcvwnd, k.autotune),
        (
            128,
            512,
            Autotune {
                sndwnd: true,
                rcvwnd: true,
                max_wnd: 33_554_432 / 1350
            }
        )
    );
    let k = kcp(&server_toml(
        "cc = \"fixed\"\nbandwidth = \"80mbit\"\nsndwnd = 2048",
    ));
    assert_eq!(k.cc, CcConfig::fixed(10_000_000));
    assert_eq!(
        (k.sndwnd, k.rcvwnd, k.autotune),
        (
            2048,
            1024,
            Autotune {
                sndwnd: false,
                rcvwnd: true,
                max_wnd: 33_554_432 / 1350
            }
        )
    );
    let k = kcp(&client_toml("cc = \"off\"\nsndwnd = 128\nrcvwnd = 512"));
    assert_eq!(k.cc, CcConfig::OFF);
    assert!(!k.autotune.sndwnd && !k.autotune.rcvwnd);
    // Imported YAML: upstream's fixed windows, bbr.
    let yaml = Config::from_yaml_str(&spec_client_yaml()).unwrap().config;
    let k = session_config(&yaml).unwrap().kcp;
    assert_eq!((k.cc, k.sndwnd, k.rcvwnd), (CcConfig::BBR, 128, 512));
    assert!(!k.autotune.sndwnd && !k.autotune.rcvwnd);
}

/// A minimal client in dotted keys only, plus `extra` (`path = value` lines); a key that `extra` sets
/// replaces the base's line for it.
fn dotted_client(extra: &str) -> String {
    let base = format!(
        "role = \"client\"\nserver.addr = \"10.0.0.2:9999\"\nsocks5 = [{{ listen = \"127.0.0.1:1080\" }}]\n\
         network.interface = \"eth0\"\nnetwork.ipv4.addr = \"10.0.0.1:0\"\ntransport.protocol = \"kcp\"\n\
         transport.kcp.key = \"{KEY}\"\n"
    );
    let key_of = |l: &str| l.split(" = ").next().unwrap_or_default().to_string();
    let set: Vec<String> = extra.lines().map(key_of).collect();
    let mut out: String = base
        .lines()
        .filter(|l| !set.contains(&key_of(l)))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(extra);
    out.push('\n');
    out
}

#[test]
fn every_integer_range_in_the_table_is_enforced_with_its_text() {
    // Just outside each end of every table range: an error naming the key, the value and the table's
    // allowed values; the bounds themselves load.
    let mut checked = 0;
    // Keys inside arrays of tables (`server.servers[].weight`) cannot be written dotted: their own tests
    // cover them (`server_list_errors_name_the_key`).
    for key in schema().iter().filter(|k| !k.path.contains("[]")) {
        let (lo, hi) = match key.allowed {
            Allowed::Int { lo, hi, .. } => (lo, hi),
            Allowed::FecShards { hi, .. } => (0, hi),
            Allowed::Limit(hi) => (0, hi),
            Allowed::Window(hi) => (1, hi),
            _ => continue,
        };
        let range = key.range_text();
        for bad in [lo - 1, hi + 1] {
            if key.allowed == Allowed::Limit(hi) && bad == -1 {
                continue;
            }
            let errors = toml_errors(&dotted_client(&format!("{} = {bad}", key.path)));
            assert_has(&errors, &format!("{} = {bad}: must be {range}", key.path));
        }
        let lowest = if matches!(key.allowed, Allowed::Limit(_)) {
            1
        } else {
            lo
        };
        for good in [lowest, hi] {
            // The bounds pass the key's own check (a rule with another key, such as smuxbuf >= streambuf,
            // may still object).
            let text = dotted_client(&format!("{} = {good}", key.path));
            if let Err(ConfigError::Invalid { errors, .. }) = Config::from_toml_str(&text) {
                let own = format!("{} = {good}: must be {range}", key.path);
                assert!(
                    errors.iter().all(|e| e.to_string() != own),
                    "{} = {good} rejected: {errors:?}",
                    key.path
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} integer keys");
}

#[test]
fn every_word_list_in_the_table_is_what_validation_accepts() {
    for key in schema() {
        let Allowed::OneOf(words) = key.allowed else {
            continue;
        };
        if key.kind != KeyType::Str || key.path.contains("[]") || key.path == "role" {
            continue;
        }
        for w in words {
            let mut line = format!("{} = {}", key.path, toml::Value::String(w.to_string()));
            if key.path == "transport.kcp.cc" && *w == "fixed" {
                line.push_str("\ntransport.kcp.bandwidth = \"10mbit\"");
            }
            if key.path == "transport.kcp.block" && *w == "noise" {
                // The noise wire needs its own keys (config/noise.rs tests it); the word itself is accepted.
                let errors = toml_errors(&dotted_client(&line));
                assert!(
                    !errors.iter().any(|e| e.starts_with("transport.kcp.block")),
                    "{errors:?}"
                );
                continue;
            }
            if let Err(e) = Config::from_toml_str(&dotted_client(&line)) {
                panic!("{line} rejected: {e}");
            }
        }
        let errors = toml_errors(&dotted_client(&format!("{} = \"zzz\"", key.path)));
        let list = if words.len() == 1 {
            format!("must be \"{}\"", words[0])
        } else {
            format!("must be one of {}", words.join(", "))
        };
        assert_has(&errors, &format!("{} = \"zzz\": {list}", key.path));
    }
}

#[test]
fn yaml_defaults_of_the_table_apply_to_imported_yaml() {
    // Keys whose default differs in imported YAML: the table's YAML default is what the import yields.
    let yaml = "role: client\nserver:\n  addr: 10.0.0.2:9999\nsocks5:\n  - listen: 127.0.0.1:1080\n\
                network:\n  interface: eth0\n  ipv4:\n    addr: 10.0.0.1:0\ntransport:\n  protocol: kcp\n  \
                kcp:\n    key: k\n";
    let c = Config::from_yaml_str(yaml).unwrap().config;
    let k = &c.transport.kcp;
    let yaml_def = |p: &str| *key_info(p).unwrap().def.for_format(true);
    assert_eq!(yaml_def("transport.kcp.guard"), Def::Bool(k.guard));
    assert_eq!(
        yaml_def("transport.kcp.rcvwnd").int(Some(Role::Client)),
        Some(i64::from(k.rcvwnd))
    );
    assert_eq!(
        yaml_def("transport.kcp.sndwnd").int(Some(Role::Client)),
        Some(i64::from(k.sndwnd))
    );
    assert!(!k.rcvwnd_auto && !k.sndwnd_auto);
}

/// Hardening: a proxy listener on a non-loopback address without authentication is refused in TOML
/// (naming the listener's key, its address and `allow_open_proxy`), accepted with auth, on loopback or with
/// `allow_open_proxy = true`, and only warned about in imported YAML (which keeps it through `config import`).
#[test]
fn open_proxy_listeners() {
    let open = client_toml("").replace("127.0.0.1:1080", "0.0.0.0:1080");
    let e = toml_errors(&open);
    assert_has(&e, "socks5[0].listen = \"0.0.0.0:1080\": an open proxy");
    assert_has(&e, "socks5[0].allow_open_proxy = true");
    for fix in [
        "username = \"u\"\npassword = \"p\"",
        "allow_open_proxy = true",
    ] {
        let text = open.replace(
            "listen = \"0.0.0.0:1080\"",
            &format!("listen = \"0.0.0.0:1080\"\n{fix}"),
        );
        toml_ok(&text);
    }
    let http = format!("{}\n[[http]]\nlisten = \":8080\"\n", client_toml(""));
    let e = toml_errors(&http);
    assert_has(&e, "http[0].listen = \":8080\": an open proxy");
    assert_has(&e, "http[0].allow_open_proxy = true");
    toml_ok(&http.replace(":8080\"", "[::1]:8080\""));
    toml_ok(&format!("{http}allow_open_proxy = true\n"));
    let c = toml_ok(&format!("{http}username = \"u\"\npassword = \"p\"\n")).config;
    assert!(!c.http[0].allow_open_proxy);
    assert_round_trips(&c);

    // Upstream YAML: starts, with a loud warning, and the import keeps it starting.
    let yaml = spec_client_yaml().replace("\"127.0.0.1:1080\"", "\"0.0.0.0:1080\"");
    let l = Config::from_yaml_str(&yaml).expect("open SOCKS5 in YAML still loads");
    assert!(l.config.socks5[0].allow_open_proxy);
    assert!(
        l.warnings
            .iter()
            .any(|w| w.key == "socks5[0].listen" && w.message.contains("OPEN PROXY")),
        "{:?}",
        l.warnings
    );
    let t = assert_round_trips(&l.config);
    assert_eq!(
        t["socks5"][0]["allow_open_proxy"],
        toml::Value::Boolean(true)
    );
}

/// `server.allow` / `server.deny`: server only, entries parsed (errors name the entry), round trip.
#[test]
fn server_target_lists() {
    let text = format!(
        "{}\n[server]\nallow = [\"10.0.0.0/8\", \"[::]/0:80-443\"]\ndeny = [\"10.9.0.0/16:22\"]\n",
        server_toml("")
    );
    let c = toml_ok(&text).config;
    assert!(c.targets.is_active());
    assert_eq!(c.targets.allow.len(), 2);
    assert_eq!(c.targets.deny[0].to_string(), "10.9.0.0/16:22");
    let t = assert_round_trips(&c);
    assert_eq!(t["server"]["allow"][1].as_str(), Some("[::]/0:80-443"));
    assert!(t["server"].get("addr").is_none());
    // Default: off, and absent from the TOML.
    let plain = toml_ok(&server_toml("")).config;
    assert!(!plain.targets.is_active());
    assert!(!plain.to_toml_string().contains("allow"));

    let bad = text.replace("\"10.0.0.0/8\"", "\"10.0.0.0/33\"");
    assert_has(
        &toml_errors(&bad),
        "server.allow[0] = \"10.0.0.0/33\": \"10.0.0.0/33\": prefix length must be 0..=32",
    );
    let bad = text.replace("\"10.9.0.0/16:22\"", "\"example.com\"");
    assert_has(&toml_errors(&bad), "server.deny[0] = \"example.com\"");
    // A client's [server] table takes addr only.
    let client = client_toml("").replace(
        "addr = \"10.0.0.2:9999\"",
        "addr = \"10.0.0.2:9999\"\ndeny = [\"10.0.0.0/8\"]",
    );
    assert_has(&toml_errors(&client), "server.deny");
}

/// Secrets never show: not in `{:?}` of the config, not in an error about the key's own value, not in an
/// error about a value next to it.
#[test]
fn secrets_are_redacted() {
    const SECRET: &str = "distinctive-secret-9f8e7d6c5b4a";
    let text = client_toml("mtu = 40").replace(KEY, SECRET).replace(
        "listen = \"127.0.0.1:1080\"",
        &format!("listen = \"127.0.0.1:1080\"\nusername = \"u\"\npassword = \"{SECRET}-pw\""),
    );
    let e = Config::from_toml_str(&text).expect_err("mtu = 40 is invalid");
    let msg = e.to_string();
    assert!(msg.contains("transport.kcp.mtu = 40"), "{msg}");
    assert!(!msg.contains(SECRET), "{msg}");
    assert!(!format!("{e:?}").contains(SECRET));

    let ok = toml_ok(&text.replace("mtu = 40", ""));
    let dbg = format!("{:?} {:#?}", ok, ok.config);
    assert!(!dbg.contains(SECRET), "{dbg}");
    assert!(dbg.contains("key: <redacted>"), "{dbg}");

    // A key of the wrong type: the error names the key, never the value.
    let wrong = text.replace(
        &format!("key = \"{SECRET}\""),
        &format!("key = [\"{SECRET}\"]"),
    );
    let msg = Config::from_toml_str(&wrong)
        .expect_err("array key")
        .to_string();
    assert!(msg.contains("transport.kcp.key"), "{msg}");
    assert!(!msg.contains(SECRET), "{msg}");
}

/// Hardening: a non-loopback `metrics.listen` is a warning naming the key.
#[test]
fn metrics_on_a_public_address_warns() {
    let l = toml_ok(&format!(
        "{}\n[metrics]\nlisten = \"0.0.0.0:9100\"\n",
        server_toml("")
    ));
    assert!(
        l.warnings
            .iter()
            .any(|w| w.key == "metrics.listen" && w.message.contains("not a loopback")),
        "{:?}",
        l.warnings
    );
    let l = toml_ok(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:9100\"\n",
        server_toml("")
    ));
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}

// ---- several servers (`server.addr` array, `[[server.servers]]`) ----

fn with_server(server_section: &str) -> String {
    client_toml("").replace("[server]\naddr = \"10.0.0.2:9999\"\n", server_section)
}

#[test]
fn server_addr_string_is_one_server_of_weight_one() {
    let c = toml_ok(&client_toml("")).config;
    assert_eq!(c.servers.len(), 1);
    assert_eq!(c.servers[0].weight, 1);
    assert_eq!(c.server, Some(c.servers[0].addr.clone()));
}

#[test]
fn server_addr_array_and_servers_tables_parse_and_round_trip() {
    let c = toml_ok(&with_server(
        "[server]\naddr = [\"10.0.0.2:9999\", \"10.0.0.3:9999\", \"10.0.0.4:443\"]\n",
    ))
    .config;
    let addrs: Vec<String> = c.servers.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, ["10.0.0.2:9999", "10.0.0.3:9999", "10.0.0.4:443"]);
    assert!(c.servers.iter().all(|e| e.weight == 1));
    assert_eq!(c.server.as_ref().unwrap().to_string(), "10.0.0.2:9999");
    let again = toml_ok(&c.to_toml_string()).config;
    assert_eq!(again.servers, c.servers);

    let t = toml_ok(&with_server(
        "[[server.servers]]\naddr = \"10.0.0.2:9999\"\nweight = 3\n\
         [[server.servers]]\naddr = \"10.0.0.3:9999\"\n",
    ))
    .config;
    assert_eq!(
        t.servers.iter().map(|e| e.weight).collect::<Vec<_>>(),
        [3, 1]
    );
    let again = toml_ok(&t.to_toml_string()).config;
    assert_eq!(again.servers, t.servers);
}

#[test]
fn server_list_errors_name_the_key() {
    let e = toml_errors(&with_server("[server]\naddr = []\n"));
    assert_has(&e, "server.addr");
    let e = toml_errors(&with_server(
        "[server]\naddr = [\"10.0.0.2:9999\", \"10.0.0.2:0\"]\n",
    ));
    assert_has(&e, "server.addr[1]");
    let e = toml_errors(&with_server(
        "[server]\naddr = [\"10.0.0.2:9999\", \"10.0.0.2:9999\"]\n",
    ));
    assert_has(&e, "listed twice");
    let e = toml_errors(&with_server(
        "[server]\naddr = \"10.0.0.2:9999\"\n[[server.servers]]\naddr = \"10.0.0.3:9999\"\n",
    ));
    assert_has(&e, "not both");
    for bad in [0, 101] {
        let e = toml_errors(&with_server(&format!(
            "[[server.servers]]\naddr = \"10.0.0.3:9999\"\nweight = {bad}\n"
        )));
        assert_has(
            &e,
            &format!("server.servers[0].weight = {bad}: must be 1..=100"),
        );
    }
    let e = toml_errors(&with_server("[[server.servers]]\nweight = 2\n"));
    assert_has(&e, "server.servers[0].addr");
    let e = toml_errors(&with_server("[server]\naddr = [1, 2]\n"));
    assert_has(&e, "server.addr");
    let e = toml_errors(&with_server(
        "[server]\naddr = [\"10.0.0.2:9999\", \"[fd00::2]:9999\"]\n",
    ));
    assert_has(&e, "IPv6 interface is not configured");
}

#[test]
fn yaml_server_addr_may_be_a_list() {
    let yaml = spec_client_yaml();
    let one = Config::from_yaml_str(&yaml).unwrap().config;
    assert_eq!(one.servers.len(), 1);
    let first = one.servers[0].addr.to_string();
    let list = yaml.replacen(
        &format!("addr: \"{first}\""),
        &format!("addr: [\"{first}\", \"10.0.0.200:9999\"]"),
        1,
    );
    assert_ne!(list, yaml, "the spec YAML carries server.addr as {first:?}");
    let two = Config::from_yaml_str(&list).unwrap().config;
    assert_eq!(two.servers.len(), 2);
    assert_eq!(two.server, one.server);
}

#[test]
fn reverse_forwards() {
    let rev = |name: &str, remote: &str, target: &str, proto: &str| {
        format!("[[reverse]]\nname = \"{name}\"\nremote = \"{remote}\"\ntarget = \"{target}\"\nprotocol = \"{proto}\"\n")
    };
    // Valid: names default to protocol/remote; the TOML round trip keeps them.
    let text = format!(
        "{}\n{}[[reverse]]\nremote = \"[::1]:5353\"\ntarget = \"localhost:53\"\nprotocol = \"udp\"\n",
        client_toml(""),
        rev("ssh", "0.0.0.0:8022", "127.0.0.1:22", "tcp")
    );
    let c = toml_ok(&text).config;
    assert_eq!(c.reverse.len(), 2);
    assert_eq!(c.reverse[0].name, "ssh");
    assert_eq!(c.reverse[0].remote, "0.0.0.0:8022".parse().unwrap());
    assert_eq!(c.reverse[1].name, "udp/[::1]:5353");
    assert_eq!(c.reverse[1].target.host, "localhost");
    let again = toml_ok(&c.to_toml_string()).config;
    assert_eq!(again.reverse, c.reverse);
    // A client with only reverse forwards has something to serve (no "nothing will use the tunnel").
    let only = client_toml("").replace("[[socks5]]\nlisten = \"127.0.0.1:1080\"\n", "")
        + &rev("ssh", "0.0.0.0:8022", "127.0.0.1:22", "tcp");
    assert!(toml_ok(&only).warnings.is_empty());

    // Errors name the entry and say what is allowed.
    let bad = format!(
        "{}\n{}{}{}{}{}",
        client_toml(""),
        rev("a", "example.com:80", "127.0.0.1:1", "tcp"),
        rev("b c", "127.0.0.1:81", "127.0.0.1:1", "tcp"),
        rev("d", "127.0.0.1:0", "127.0.0.1:1", "tcp"),
        rev("e", "127.0.0.1:82", "127.0.0.1:1", "sctp"),
        rev("e", "127.0.0.1:83", "127.0.0.1:1", "tcp")
            + &rev("f", "127.0.0.1:83", "127.0.0.1:2", "tcp")
    );
    let errors = toml_errors(&bad);
    assert_has(
        &errors,
        "reverse[0].remote = \"example.com:80\": must be an IP literal:port",
    );
    assert_has(&errors, "reverse[1].name = \"b c\": must be 1..=64 of");
    assert_has(&errors, "reverse[2].remote = \"127.0.0.1:0\": port must be");
    assert_has(
        &errors,
        "reverse[3].protocol = \"sctp\": must be one of tcp, udp",
    );
    assert_has(
        &errors,
        "reverse[5].remote = \"127.0.0.1:83\": declared twice",
    );
    let dup = format!(
        "{}\n{}{}",
        client_toml(""),
        rev("x", "127.0.0.1:1", "127.0.0.1:1", "tcp"),
        rev("x", "127.0.0.1:2", "127.0.0.1:1", "tcp")
    );
    assert_has(
        &toml_errors(&dup),
        "reverse[1].name = \"x\": must be unique",
    );
    let many: String = (0..17)
        .map(|i| {
            rev(
                &format!("r{i}"),
                &format!("127.0.0.1:{}", 100 + i),
                "127.0.0.1:1",
                "tcp",
            )
        })
        .collect();
    assert_has(
        &toml_errors(&format!("{}\n{many}", client_toml(""))),
        "at most 16 [[reverse]] entries",
    );

    // Roles: [[reverse]] is a client key, server.reverse_allow a server key.
    let on_server = format!(
        "{}\n{}",
        server_toml(""),
        rev("a", "127.0.0.1:1", "127.0.0.1:1", "tcp")
    );
    assert_has(
        &toml_errors(&on_server),
        "reverse: only valid for role client",
    );
    let allow_on_client = format!("{}\n[server.x]\n", client_toml("")).replace(
        "[server]\naddr = \"10.0.0.2:9999\"\n",
        "[server]\naddr = \"10.0.0.2:9999\"\nreverse_allow = [\"127.0.0.1:1\"]\n",
    );
    assert_has(
        &toml_errors(&allow_on_client),
        "server.reverse_allow: only valid for role server",
    );

    // server.reverse_allow entries: IP literal and a port.
    let s = toml_ok(&format!(
        "{}\n[server]\nreverse_allow = [\"0.0.0.0:8022\", \"[::1]:5353\"]\n",
        server_toml("")
    ))
    .config;
    assert_eq!(
        s.reverse_allow,
        vec![
            "0.0.0.0:8022".parse().unwrap(),
            "[::1]:5353".parse().unwrap()
        ]
    );
    assert_eq!(
        toml_ok(&s.to_toml_string()).config.reverse_allow,
        s.reverse_allow
    );
    let errors = toml_errors(&format!(
        "{}\n[server]\nreverse_allow = [\"host:1\", \"127.0.0.1:0\", \"8022\"]\n",
        server_toml("")
    ));
    for i in 0..3 {
        assert_has(&errors, &format!("server.reverse_allow[{i}]"));
    }
    assert_has(&errors, "must be an IP literal:port with port 1..=65535");
}
