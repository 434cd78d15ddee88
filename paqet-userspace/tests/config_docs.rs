//! `docs/configuration.md` against the code: the doc's key table lists exactly the keys of the code's key
//! table (`config/keys.rs`, which drives validation) with their types, defaults, ranges and meanings, in the
//! same order; and every TOML example in the doc is a valid configuration.

use std::collections::BTreeSet;

use paqet::config::{key_info, render_keys, schema, CcAlgorithm, Config, Role};

fn doc() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// One row of the key table: (key, type, default, range).
fn rows(doc: &str) -> Vec<(String, String, String, String)> {
    full_rows(doc)
        .into_iter()
        .map(|(key, ty, default, range, _)| (key, ty, default, range))
        .collect()
}

/// One row of the key table: (key, type, default, range, meaning).
fn full_rows(doc: &str) -> Vec<(String, String, String, String, String)> {
    doc.lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            assert!(cells.len() >= 5, "malformed key table row: {l}");
            let unquote = |s: &str| {
                s.strip_prefix('`')
                    .and_then(|s| s.strip_suffix('`'))
                    .unwrap_or(s)
                    .to_string()
            };
            (
                unquote(cells[0]),
                cells[1].to_string(),
                unquote(cells[2]),
                cells[3].to_string(),
                cells[4..].join("|"),
            )
        })
        .collect()
}

#[test]
fn key_table_matches_schema() {
    let doc = doc();
    let rows = rows(&doc);
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (key, ty, default, range) in &rows {
        if !seen.insert(key.clone()) {
            problems.push(format!("{key}: listed twice"));
        }
        let Some(info) = key_info(key) else {
            problems.push(format!("{key}: documented but the schema does not know it"));
            continue;
        };
        if ty != info.type_text {
            problems.push(format!("{key}: doc type {ty:?}, code {:?}", info.type_text));
        }
        if *default != info.default_text() {
            problems.push(format!(
                "{key}: doc default {default:?}, code {:?}",
                info.default_text()
            ));
        }
        if *range != info.range_text() {
            problems.push(format!(
                "{key}: doc range {range:?}, code {:?}",
                info.range_text()
            ));
        }
    }
    for info in schema() {
        if !seen.contains(info.path) {
            problems.push(format!(
                "{}: known to the schema but missing from the doc",
                info.path
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md is out of date:\n{}",
        problems.join("\n")
    );
    assert_eq!(rows.len(), schema().len());
}

#[test]
fn key_table_is_the_rendered_code_table_in_order() {
    // The whole table, header included, is what `paqet-dp config keys --markdown` prints.
    let doc = doc();
    let start = doc
        .find("| key | type | default |")
        .expect("the key table header");
    let table: String = doc[start..]
        .lines()
        .take_while(|l| l.starts_with('|'))
        .map(|l| format!("{l}\n"))
        .collect();
    let rendered = render_keys(true);
    if table != rendered {
        let first = table
            .lines()
            .zip(rendered.lines())
            .find(|(d, c)| d != c)
            .map(|(d, c)| format!("first difference:\n  doc:  {d}\n  code: {c}"))
            .unwrap_or_else(|| "the tables differ in length".to_string());
        panic!("docs/configuration.md key table is not `paqet-dp config keys --markdown`; {first}");
    }
}

#[test]
fn key_meanings_match_schema_and_mark_paqet_dp_keys() {
    let doc = doc();
    let mut problems = Vec::new();
    for (key, _, _, _, meaning) in full_rows(&doc) {
        let Some(info) = key_info(&key) else { continue };
        let expected = if info.upstream {
            info.doc.to_string()
        } else {
            format!("{} *paqet-dp*", info.doc)
        };
        if meaning != expected {
            problems.push(format!("{key}: doc meaning {meaning:?}, code {expected:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md meanings are out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn doc_has_the_congestion_control_section() {
    let doc = doc();
    let start = doc
        .find("### Congestion control and windows")
        .expect("a \"Congestion control and windows\" section");
    let section = &doc[start..];
    let section = &section[..section[4..].find("\n## ").map_or(section.len(), |i| i + 4)];
    for needle in [
        "`cc = \"bbr\"`",
        "`cc = \"fixed\"`",
        "`cc = \"off\"`",
        "the wire is unchanged",
        "`auto`",
        "window_mem",
        "Imported YAML",
        "`sndwnd: auto`",
    ] {
        assert!(section.contains(needle), "section lacks {needle:?}");
    }
}

#[test]
fn doc_examples_are_valid_toml_configs() {
    let doc = doc();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap_or_default()),
            (Some(text), l) => {
                text.push_str(l);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    assert_eq!(blocks.len(), 2, "expected the client and server examples");
    let mut roles = Vec::new();
    for block in &blocks {
        match Config::from_toml_str(block) {
            Ok(loaded) => {
                assert!(
                    loaded.warnings.is_empty(),
                    "example has warnings {:?}:\n{block}",
                    loaded.warnings
                );
                // The examples write the defaults explicitly; they must equal the defaults for their role.
                let c = &loaded.config;
                assert_eq!(c.transport.kcp.mtu, 1350);
                assert_eq!(c.transport.kcp.cc, CcAlgorithm::Bbr);
                assert_eq!(c.transport.kcp.bandwidth, None);
                assert!(c.transport.kcp.sndwnd_auto && c.transport.kcp.rcvwnd_auto);
                let (rcv, snd, sockbuf) = if c.role == Role::Server {
                    (1024, 1024, 8 << 20)
                } else {
                    (512, 128, 4 << 20)
                };
                assert_eq!(
                    (
                        c.transport.kcp.rcvwnd,
                        c.transport.kcp.sndwnd,
                        c.network.pcap_sockbuf
                    ),
                    (rcv, snd, sockbuf)
                );
                roles.push(c.role);
            }
            Err(e) => panic!("doc example is invalid: {e}\n{block}"),
        }
    }
    assert_eq!(roles, [Role::Client, Role::Server]);
}

#[test]
fn doc_error_sample_matches_real_messages() {
    // The sample in "Errors and warnings" must be what the code prints for those mistakes.
    let doc = doc();
    let sample: Vec<&str> = doc.lines().filter(|l| l.starts_with("  - ")).collect();
    assert_eq!(sample.len(), 3, "expected three sample error lines");
    let text = r#"role = "client"
colour = "blue"
[server]
addr = "10.0.0.2:9999"
[[socks5]]
listen = "127.0.0.1:1080"
[network]
interface = "eth0"
[network.ipv4]
addr = "10.0.0.1:40000"
[transport]
protocol = "kcp"
conn = 4
[transport.kcp]
key = "k"
mtu = 40
"#;
    let rendered = Config::from_toml_str(text)
        .expect_err("sample config is invalid")
        .to_string();
    for line in sample {
        assert!(
            rendered.lines().any(|l| l == line),
            "doc line {line:?} not produced; got:\n{rendered}"
        );
    }
}

/// Follows a dotted path in a TOML table.
fn lookup<'a>(t: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut cur = t.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_table()?.get(p)?;
    }
    Some(cur)
}

#[test]
fn schema_default_texts_are_the_code_defaults() {
    // Minimal configs that set no defaulted key; their fully explicit TOML shows the defaults in effect.
    let client = r#"role = "client"
server.addr = "10.0.0.2:9999"
socks5 = [{ listen = "127.0.0.1:1080" }]
network.interface = "eth0"
network.ipv4.addr = "10.0.0.1:0"
transport.protocol = "kcp"
transport.kcp.key = "k"
"#;
    let server = r#"role = "server"
listen.addr = ":9999"
network.interface = "eth0"
network.ipv4.addr = "10.0.0.2:9999"
transport.protocol = "kcp"
transport.kcp.key = "k"
"#;
    let mut checked = 0;
    for (role, text) in [("client", client), ("server", server)] {
        let loaded = Config::from_toml_str(text).unwrap_or_else(|e| panic!("{role}: {e}"));
        let explicit: toml::Table = loaded
            .config
            .to_toml_string()
            .parse()
            .expect("own TOML parses");
        for info in schema() {
            let default = info.default_text();
            if info.path.contains("[]") || default.starts_with('—') {
                continue;
            }
            let mut expected = default;
            // "X (TOML), Y (imported YAML)": these configs are TOML.
            if let Some((toml_default, _)) = expected.split_once(" (TOML)") {
                expected = toml_default.to_string();
            }
            if let Some(rest) = expected.strip_prefix("server ") {
                let (s, c) = rest.split_once(", client ").expect("per-role default text");
                expected = if role == "server" { s } else { c }.to_string();
            }
            let value = lookup(&explicit, info.path)
                .unwrap_or_else(|| panic!("{role}: {} not in output", info.path));
            let shown = match value {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(
                shown,
                expected,
                "{role}: default of {} (schema text {:?})",
                info.path,
                info.default_text()
            );
            checked += 1;
        }
    }
    assert!(checked >= 60, "only {checked} defaults checked");
}

#[test]
fn config_keys_command_prints_the_table() {
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_paqet-dp"))
            .args(args)
            .env_remove("PAQET_LOG")
            .output()
            .expect("running paqet-dp");
        assert!(
            o.status.success(),
            "paqet-dp {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).expect("utf-8 output")
    };
    let markdown = run(&["config", "keys", "--markdown"]);
    assert_eq!(markdown, render_keys(true));
    assert!(doc().contains(&markdown), "doc lacks the printed table");
    let plain = run(&["config", "keys"]);
    for info in schema() {
        let head = plain
            .lines()
            .find(|l| l.split("  (").next() == Some(info.path))
            .unwrap_or_else(|| panic!("{} not printed", info.path));
        assert!(head.contains(info.type_text), "{head}");
    }
    assert!(plain.contains(
        "transport.kcp.mtu  (integer (bytes))\n    default: 1350\n    allowed: 50..=1500\n"
    ));
}
