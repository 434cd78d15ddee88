//! The `paqet-dp` command line, through the real binary (no root needed): `secret`, `version`,
//! `config check`, `config import` of the spec's two example configurations, `doctor --json` and the error
//! of `run` with a missing configuration file.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KEY: &str = "0edb843fa5d512bbb688b437e6035b4965731b527bf229f2eed94185f23a3740";

/// Spec §2.3 (upstream's full client example), verbatim except the key placeholder.
const SPEC_CLIENT_YAML: &str = include_str!("data/spec_client.yaml");

/// Spec §2.4 (upstream's full server example), verbatim except the key placeholder.
const SPEC_SERVER_YAML: &str = include_str!("data/spec_server.yaml");

/// A scratch directory unique to this process and test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("paqet-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating the temp dir");
        TempDir(p)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("writing a test file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn paqet_dp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_paqet-dp"))
        .args(args)
        .env_remove("PAQET_LOG")
        .output()
        .expect("running paqet-dp")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn secret_prints_64_hex_chars_and_differs_each_time() {
    let a = paqet_dp(&["secret"]);
    assert!(a.status.success(), "secret failed: {}", stderr(&a));
    let a = stdout(&a);
    let line = a.trim_end_matches('\n');
    assert_eq!(line.len(), 64, "secret output {line:?}");
    assert!(
        line.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "not lowercase hex: {line:?}"
    );
    let b = stdout(&paqet_dp(&["secret"]));
    assert_ne!(line, b.trim_end(), "two secrets are equal");
}

/// `keygen`: a key pair on stdout, or the private key in a new 0600 file (never overwritten) and the public key
/// on stdout; `--psk` the same for a pre-shared key. A config naming the file (noise wire) is accepted by
/// `config check`, and the file's key is the one whose public key was printed.
#[test]
fn keygen_writes_private_keys_0600_and_prints_public_keys() {
    use std::os::unix::fs::PermissionsExt as _;
    let o = paqet_dp(&["keygen"]);
    assert!(o.status.success(), "keygen failed: {}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let private = lines[0]
        .strip_prefix("private_key: ")
        .expect("private_key line");
    let public = lines[1]
        .strip_prefix("public_key: ")
        .expect("public_key line");
    assert_eq!((private.len(), public.len()), (44, 44), "{out}");
    assert_eq!(
        paqet::proto::noise::PrivateKey::parse(private)
            .expect("private key parses")
            .public_key()
            .to_text(),
        public
    );

    let dir = TempDir::new("keygen");
    let file = dir.0.join("noise.key");
    let o = paqet_dp(&["keygen", "--out", path_str(&file)]);
    assert!(o.status.success(), "keygen --out failed: {}", stderr(&o));
    let printed = stdout(&o).trim().to_owned();
    let meta = std::fs::metadata(&file).expect("key file written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&file).expect("key file");
    let key = paqet::proto::noise::PrivateKey::parse(text.trim()).expect("file holds a key");
    assert_eq!(key.public_key().to_text(), printed);
    assert!(
        !stdout(&o).contains(text.trim()),
        "the private key is not printed with --out"
    );
    // never overwritten
    let again = paqet_dp(&["keygen", "--out", path_str(&file)]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("never overwritten"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);

    let psk = dir.0.join("noise.psk");
    let o = paqet_dp(&["keygen", "--psk", "--out", path_str(&psk)]);
    assert!(o.status.success(), "keygen --psk failed: {}", stderr(&o));
    assert_eq!(
        std::fs::metadata(&psk).unwrap().permissions().mode() & 0o777,
        0o600
    );
    paqet::proto::noise::Psk::parse(std::fs::read_to_string(&psk).unwrap().trim()).expect("psk");

    // a server config naming both files validates
    let cfg = dir.write(
        "server.toml",
        &format!(
            "role = \"server\"\n[listen]\naddr = \":9999\"\n[network]\ninterface = \"eth0\"\n[network.ipv4]\naddr = \"10.0.0.2:9999\"\nrouter_mac = \"02:00:00:00:00:01\"\n[transport]\nprotocol = \"kcp\"\n[transport.kcp]\nblock = \"noise\"\n[transport.noise]\nprivate_key = \"{}\"\nclient_public_keys = [\"{public}\"]\npsk = \"{}\"\n",
            path_str(&file),
            path_str(&psk)
        ),
    );
    let o = paqet_dp(&["config", "check", path_str(&cfg)]);
    assert!(
        o.status.success(),
        "config check: {}{}",
        stdout(&o),
        stderr(&o)
    );
}

#[test]
fn version_names_the_version_commit_profile_and_target() {
    let o = paqet_dp(&["version"]);
    assert!(o.status.success(), "version failed: {}", stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains(env!("CARGO_PKG_VERSION")),
        "no crate version in {s:?}"
    );
    for field in [
        "Wire: paqet v1.0.0-alpha.21",
        "Commit: ",
        "Profile: ",
        "Target: ",
    ] {
        assert!(s.contains(field), "no {field:?} in {s:?}");
    }
    assert!(
        s.contains(std::env::consts::ARCH),
        "no architecture in {s:?}"
    );
}

#[test]
fn config_check_accepts_a_good_toml() {
    let dir = TempDir::new("check-good");
    let f = dir.write(
        "server.toml",
        &format!(
            "role = \"server\"\n[listen]\naddr = \":9999\"\n[network]\ninterface = \"eth0\"\n\
             [network.ipv4]\naddr = \"10.0.0.2:9999\"\nrouter_mac = \"02:00:00:00:00:01\"\n\
             [transport]\nprotocol = \"kcp\"\n[transport.kcp]\nkey = \"{KEY}\"\n"
        ),
    );
    let o = paqet_dp(&["config", "check", path_str(&f)]);
    assert!(
        o.status.success(),
        "config check failed:\n{}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(stdout(&o).starts_with("ok"), "stdout {:?}", stdout(&o));
}

#[test]
fn config_check_lists_every_error_and_exits_1() {
    let dir = TempDir::new("check-bad");
    let f = dir.write(
        "bad.toml",
        "role = \"client\"\ncolour = \"blue\"\n[server]\naddr = \"10.0.0.2:9999\"\n[network]\ninterface = \"eth0\"\n\
         [network.ipv4]\naddr = \"10.0.0.1:0\"\n[transport]\nprotocol = \"quic\"\n[transport.kcp]\nkey = \"k\"\n\
         mtu = 40\nmode = \"turbo\"\n",
    );
    let o = paqet_dp(&["config", "check", path_str(&f)]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit status; output:\n{}{}",
        stdout(&o),
        stderr(&o)
    );
    let out = stdout(&o);
    for key in [
        "colour",
        "transport.protocol",
        "transport.kcp.mtu",
        "transport.kcp.mode",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("error: ") && l.contains(key)),
            "no error line naming {key}:\n{out}"
        );
    }
}

#[test]
fn config_import_of_the_spec_examples_passes_config_check() {
    let dir = TempDir::new("import");
    for (name, yaml, role) in [
        (
            "client",
            SPEC_CLIENT_YAML.replace("<output of paqet secret>", KEY),
            "client",
        ),
        (
            "server",
            SPEC_SERVER_YAML.replace("<same secret>", KEY),
            "server",
        ),
    ] {
        let y = dir.write(&format!("{name}.yaml"), &yaml);
        let o = paqet_dp(&["config", "import", path_str(&y)]);
        assert!(o.status.success(), "import {name} failed: {}", stderr(&o));
        let toml = stdout(&o);
        assert!(
            toml.contains(&format!("role = \"{role}\"")),
            "{name}: no role in\n{toml}"
        );
        assert!(toml.contains(KEY), "{name}: key lost in\n{toml}");
        let t = dir.write(&format!("{name}.toml"), &toml);
        let c = paqet_dp(&["config", "check", path_str(&t)]);
        assert!(
            c.status.success(),
            "{name}: imported TOML rejected:\n{}\n{toml}",
            stdout(&c)
        );
        assert!(
            stdout(&c).contains(&format!("({role} role)")),
            "{name}: {}",
            stdout(&c)
        );
        // The YAML itself is also accepted by `config check` (and so by `run -c`).
        let cy = paqet_dp(&["config", "check", path_str(&y)]);
        assert!(
            cy.status.success(),
            "{name}: YAML rejected:\n{}",
            stdout(&cy)
        );
    }
}

#[test]
fn doctor_json_on_loopback_is_valid_json() {
    let o = paqet_dp(&["doctor", "--json", "--iface", "lo"]);
    // Exit code 0/1/2 depending on the host; anything else is a crash.
    assert!(
        matches!(o.status.code(), Some(0..=2)),
        "doctor exit {:?}: {}",
        o.status,
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("doctor --json output is not JSON ({e}):\n{}", stdout(&o)));
    assert_eq!(v["iface"], "lo", "{v}");
    let findings = v["findings"].as_array().expect("findings array");
    assert!(!findings.is_empty(), "no findings: {v}");
    let worst = findings
        .iter()
        .filter_map(|f| f["status"].as_str())
        .fold(0, |w, s| {
            w.max(match s {
                "warn" => 1,
                "fail" => 2,
                _ => 0,
            })
        });
    assert_eq!(
        o.status.code(),
        Some(worst),
        "exit code does not match the worst finding"
    );
}

#[test]
fn run_with_a_missing_config_names_the_file() {
    let missing = std::env::temp_dir().join(format!(
        "paqet-cli-{}-does-not-exist.toml",
        std::process::id()
    ));
    let o = paqet_dp(&["run", "-c", path_str(&missing), "--mode", "pcap"]);
    assert!(!o.status.success(), "run succeeded without a config");
    let err = stderr(&o);
    assert!(
        err.contains(path_str(&missing)),
        "error does not name the file:\n{err}"
    );
}

#[test]
fn run_with_an_empty_key_file_is_refused() {
    let dir = TempDir::new("keyfile");
    let cfg = dir.write(
        "server.yaml",
        &SPEC_SERVER_YAML.replace("<same secret>", KEY),
    );
    let key = dir.write("key", " \n");
    let o = paqet_dp(&[
        "run",
        "-c",
        path_str(&cfg),
        "--key-file",
        path_str(&key),
        "--mode",
        "pcap",
    ]);
    assert!(!o.status.success(), "run accepted an empty key file");
    let err = stderr(&o);
    assert!(
        err.contains("--key-file") && err.contains(path_str(&key)),
        "error does not name the key file:\n{err}"
    );
}
