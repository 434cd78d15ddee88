//! `[transport.noise]`: the keys of the opt-in authenticated wire (`transport.kcp.block = "noise"`,
//! `docs/protocol-extensions.md` §1): validation of the section, and reading the secrets it names.
//!
//! A secret (`private_key`, `psk`) is either written inline (the 44 base64 characters `paqet-dp keygen`
//! prints) or a path to a file holding them (any other value containing `/`; the file must not be
//! readable by group or others, as the config file that holds `transport.kcp.key`). Public keys are always inline.
//! Validation only parses the inline forms; [`NoiseConfig::keys`] reads the files when the daemon starts.

use std::fmt;
use std::path::{Path, PathBuf};

use super::raw::RawNoise;
use super::read::{q, Ctx};
use super::schema::Mode;
use super::Role;
use crate::proto::noise::{KeyError, PrivateKey, Psk, PublicKey, KEY_TEXT_LEN};
use crate::wire::noise::TRANSPORT_OVERHEAD;

/// Smallest `transport.kcp.mtu` with the noise wire: upstream's floor (50) plus the transport overhead.
pub const NOISE_MIN_MTU: i64 = 50 + TRANSPORT_OVERHEAD as i64;

/// Where a secret comes from. `Debug` never prints an inline secret.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The key text itself (44 base64 characters).
    Inline(String),
    /// A file holding the key text (written by `paqet-dp keygen --out`).
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            SecretSource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl SecretSource {
    /// The value as written in the config.
    pub fn as_config_value(&self) -> String {
        match self {
            SecretSource::Inline(s) => s.clone(),
            SecretSource::File(p) => p.display().to_string(),
        }
    }

    /// Whether the secret is in the config file itself.
    pub fn is_inline(&self) -> bool {
        matches!(self, SecretSource::Inline(_))
    }

    fn text(&self, key: &'static str) -> Result<String, NoiseKeyError> {
        match self {
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::File(p) => read_secret_file(p, key),
        }
    }
}

/// `[transport.noise]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoiseConfig {
    /// This end's static private key.
    pub private_key: SecretSource,
    /// Client: the server's static public key.
    pub server_public_key: Option<PublicKey>,
    /// Server: the client public keys allowed to connect.
    pub client_public_keys: Vec<PublicKey>,
    /// Optional pre-shared key (IKpsk2), the same on both ends.
    pub psk: Option<SecretSource>,
}

/// The keys, read and parsed.
#[derive(Debug, Clone)]
pub struct NoiseKeys {
    pub private: PrivateKey,
    pub psk: Option<Psk>,
}

/// A secret of `[transport.noise]` that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct NoiseKeyError {
    /// The config key (`transport.noise.private_key`, `transport.noise.psk`).
    pub key: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn read_secret_file(path: &Path, key: &'static str) -> Result<String, NoiseKeyError> {
    let err = |reason: String| NoiseKeyError { key, reason };
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read key file {}: {e}", path.display())))?;
    super::check_secret_file(path, key).map_err(|e| err(e.to_string()))?;
    Ok(text.trim().to_owned())
}

impl NoiseConfig {
    /// Reads (key files) and parses the private key and the PSK.
    pub fn keys(&self) -> Result<NoiseKeys, NoiseKeyError> {
        const PRIV: &str = "transport.noise.private_key";
        const PSK: &str = "transport.noise.psk";
        let private =
            PrivateKey::parse(&self.private_key.text(PRIV)?).map_err(|e| NoiseKeyError {
                key: PRIV,
                reason: e.to_string(),
            })?;
        let psk = match &self.psk {
            None => None,
            Some(s) => Some(Psk::parse(&s.text(PSK)?).map_err(|e| NoiseKeyError {
                key: PSK,
                reason: e.to_string(),
            })?),
        };
        Ok(NoiseKeys { private, psk })
    }

    /// Whether a secret is written in the config file itself.
    pub fn holds_inline_secret(&self) -> bool {
        self.private_key.is_inline() || self.psk.as_ref().is_some_and(SecretSource::is_inline)
    }
}

/// Splits a secret value: inline text when it parses as a key, else a path when it contains `/` (base64
/// keys may contain `/` too, so the key form is tried first).
fn secret_source(
    v: &str,
    parse: impl Fn(&str) -> Result<(), KeyError>,
) -> Result<SecretSource, String> {
    let t = v.trim();
    match parse(t) {
        Ok(()) => Ok(SecretSource::Inline(t.to_owned())),
        Err(_) if t.contains('/') => Ok(SecretSource::File(PathBuf::from(t))),
        Err(e) => Err(format!("{e}; or give the path of a key file written by `paqet-dp keygen --out FILE` (a value containing '/')")),
    }
}

impl Ctx<'_> {
    /// `[transport.noise]` with `block` (the validated `transport.kcp.block`), `kcp_key_set`
    /// (`transport.kcp.key` present) and the mtu.
    pub(super) fn noise(
        &mut self,
        raw: Option<&RawNoise>,
        block: &str,
        kcp_key_set: bool,
        mtu: i64,
    ) -> Option<NoiseConfig> {
        const BLOCK: &str = "transport.kcp.block";
        const PRIV: &str = "transport.noise.private_key";
        const SPK: &str = "transport.noise.server_public_key";
        const CPK: &str = "transport.noise.client_public_keys";
        const PSK: &str = "transport.noise.psk";
        if block != "noise" {
            if raw.is_some_and(|r| r != &RawNoise::default()) {
                self.is.strict(
                    self.mode,
                    "transport.noise",
                    None,
                    format!(
                        "only used with transport.kcp.block = \"noise\" (block is {})",
                        q(block)
                    ),
                );
            }
            return None;
        }
        if self.mode == Mode::Lenient {
            self.is.error(
                BLOCK,
                Some(q(block)),
                "the noise wire is paqet-dp's own and upstream paqet does not know it: it cannot be set in an imported upstream YAML file. Convert the file with `paqet-dp config import` and configure [transport.noise] in the TOML",
            );
            return None;
        }
        if kcp_key_set {
            self.is.error(
                "transport.kcp.key",
                None,
                "not used with block = \"noise\" (the noise wire authenticates with the [transport.noise] keys): remove it",
            );
        }
        if mtu < NOISE_MIN_MTU {
            self.is.error(
                "transport.kcp.mtu",
                Some(mtu.to_string()),
                format!("must be at least {NOISE_MIN_MTU} with block = \"noise\" (each datagram carries {TRANSPORT_OVERHEAD} bytes of noise header and tag)"),
            );
        }
        let r = raw.cloned().unwrap_or_default();
        let private_key = match r.private_key.as_deref() {
            None | Some("") => {
                self.is.error(PRIV, None, "required with block = \"noise\" (create one with `paqet-dp keygen --out FILE`)");
                None
            }
            Some(v) => match secret_source(v, |t| PrivateKey::parse(t).map(|_| ())) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.is.error(PRIV, Some("<redacted>".into()), e);
                    None
                }
            },
        };
        let psk = match r.psk.as_deref() {
            None => None,
            Some(v) => match secret_source(v, |t| Psk::parse(t).map(|_| ())) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.is.error(PSK, Some("<redacted>".into()), e);
                    None
                }
            },
        };
        let mut server_public_key = None;
        let mut client_public_keys = Vec::new();
        if self.client() {
            if r.client_public_keys.is_some() {
                self.wrong_role(CPK, Role::Server);
            }
            match r.server_public_key.as_deref() {
                None | Some("") => self.is.error(
                    SPK,
                    None,
                    "required on a client with block = \"noise\" (the public key `paqet-dp keygen` printed for the server)",
                ),
                Some(v) => match PublicKey::parse(v) {
                    Ok(k) => server_public_key = Some(k),
                    Err(e) => self.is.error(SPK, Some(q(v)), e.to_string()),
                },
            }
        } else if self.server() {
            if r.server_public_key.is_some() {
                self.wrong_role(SPK, Role::Client);
            }
            let list = r.client_public_keys.unwrap_or_default();
            if list.is_empty() {
                self.is.error(
                    CPK,
                    None,
                    "required on a server with block = \"noise\": the public keys of the clients allowed to connect (at least one)",
                );
            }
            for v in &list {
                match PublicKey::parse(v) {
                    Ok(k) if client_public_keys.contains(&k) => {
                        self.is.warn(CPK, Some(q(v)), "listed twice")
                    }
                    Ok(k) => client_public_keys.push(k),
                    Err(e) => self.is.error(CPK, Some(q(v)), e.to_string()),
                }
            }
        }
        debug_assert_eq!(KEY_TEXT_LEN, 44);
        Some(NoiseConfig {
            private_key: private_key?,
            server_public_key,
            client_public_keys,
            psk,
        })
    }
}

/// The section as serde structs (for `Config::to_toml_string`).
pub(super) fn to_raw(n: &NoiseConfig) -> RawNoise {
    RawNoise {
        private_key: Some(n.private_key.as_config_value()),
        server_public_key: n.server_public_key.map(|k| k.to_text()),
        client_public_keys: (!n.client_public_keys.is_empty()).then(|| {
            n.client_public_keys
                .iter()
                .map(PublicKey::to_text)
                .collect()
        }),
        psk: n.psk.as_ref().map(SecretSource::as_config_value),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use super::*;
    use crate::proto::noise::keygen;

    fn client(noise: &str, kcp: &str) -> String {
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
block = "noise"
{kcp}
[transport.noise]
{noise}
"#
        )
    }

    fn server(noise: &str, kcp: &str) -> String {
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
block = "noise"
{kcp}
[transport.noise]
{noise}
"#
        )
    }

    fn errors(text: &str) -> Vec<String> {
        match Config::from_toml_str(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(ConfigError::Invalid { errors, .. }) => {
                errors.iter().map(|e| e.to_string()).collect()
            }
            Err(other) => panic!("expected Invalid, got {other}"),
        }
    }

    fn has(errors: &[String], needle: &str) {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "no error contains {needle:?}:\n{}",
            errors.join("\n")
        );
    }

    #[test]
    fn client_and_server_configs_validate_and_round_trip() {
        let (ck, cp) = keygen();
        let (sk, sp) = keygen();
        let c = client(
            &format!(
                "private_key = \"{}\"\nserver_public_key = \"{sp}\"",
                ck.to_text()
            ),
            "",
        );
        let loaded = Config::from_toml_str(&c).expect("client");
        let cfg = loaded.config;
        assert!(cfg.is_noise() && cfg.holds_inline_secret());
        let n = cfg.transport.noise.as_ref().unwrap();
        assert_eq!(n.server_public_key, Some(sp));
        assert_eq!(n.keys().unwrap().private.public_key(), cp);
        let back = Config::from_toml_str(&cfg.to_toml_string()).expect("round trip");
        assert_eq!(back.config, cfg);
        // the Debug form never shows the private key
        assert!(!format!("{cfg:?}").contains(&ck.to_text()));

        let s = server(
            &format!(
                "private_key = \"/etc/paqet-dp/noise.key\"\nclient_public_keys = [\"{cp}\"]\npsk = \"/etc/paqet-dp/noise.psk\""
            ),
            "",
        );
        let cfg = Config::from_toml_str(&s).expect("server").config;
        let n = cfg.transport.noise.as_ref().unwrap();
        assert_eq!(n.client_public_keys, vec![cp]);
        assert_eq!(
            n.private_key,
            SecretSource::File("/etc/paqet-dp/noise.key".into())
        );
        assert!(
            !cfg.holds_inline_secret(),
            "secrets in files: the config may be readable"
        );
        let back = Config::from_toml_str(&cfg.to_toml_string()).expect("round trip");
        assert_eq!(back.config, cfg);
        drop(sk);
    }

    #[test]
    fn errors_name_the_key() {
        let (ck, cp) = keygen();
        let (_, sp) = keygen();
        let priv_line = format!("private_key = \"{}\"", ck.to_text());
        // kcp-go's key is refused
        let e = errors(&client(
            &format!("{priv_line}\nserver_public_key = \"{sp}\""),
            "key = \"secret\"",
        ));
        has(&e, "transport.kcp.key");
        has(&e, "not used with block = \"noise\"");
        // required keys
        has(
            &errors(&client(&format!("server_public_key = \"{sp}\""), "")),
            "transport.noise.private_key",
        );
        has(
            &errors(&client(&priv_line, "")),
            "transport.noise.server_public_key",
        );
        has(
            &errors(&server(&priv_line, "")),
            "transport.noise.client_public_keys",
        );
        // a bad key text: the message names the key and the expected form, and never echoes a secret
        let e = errors(&client(
            &format!("private_key = \"abc\"\nserver_public_key = \"{sp}\""),
            "",
        ));
        has(&e, "transport.noise.private_key");
        has(&e, "44 base64 characters");
        assert!(!e.iter().any(|m| m.contains("\"abc\"")));
        has(
            &errors(&client(
                &format!("{priv_line}\nserver_public_key = \"not-a-key\""),
                "",
            )),
            "transport.noise.server_public_key",
        );
        has(
            &errors(&server(
                &format!("{priv_line}\nclient_public_keys = [\"{cp}\", \"x\"]"),
                "",
            )),
            "transport.noise.client_public_keys",
        );
        // role keys
        has(
            &errors(&server(
                &format!(
                    "{priv_line}\nclient_public_keys = [\"{cp}\"]\nserver_public_key = \"{sp}\""
                ),
                "",
            )),
            "only valid for role client",
        );
        // the mtu must leave room for the 29-byte noise overhead
        let e = errors(&client(
            &format!("{priv_line}\nserver_public_key = \"{sp}\""),
            "mtu = 60",
        ));
        has(&e, "transport.kcp.mtu");
        // a noise section without block = "noise"
        let text = client(&format!("{priv_line}\nserver_public_key = \"{sp}\""), "")
            .replace("block = \"noise\"", "block = \"aes\"\nkey = \"k\"");
        has(
            &errors(&text),
            "only used with transport.kcp.block = \"noise\"",
        );
    }

    #[test]
    fn imported_yaml_refuses_noise() {
        let yaml = r#"role: "client"
server:
  addr: "10.0.0.2:9999"
socks5:
  - listen: "127.0.0.1:1080"
network:
  interface: "eth0"
  ipv4:
    addr: "10.0.0.1:0"
transport:
  protocol: "kcp"
  kcp:
    block: "noise"
"#;
        match Config::from_yaml_str(yaml) {
            Err(ConfigError::Invalid { errors, .. }) => {
                let e: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                has(&e, "transport.kcp.block");
                has(&e, "imported upstream YAML");
            }
            other => panic!(
                "expected the YAML to be refused, got {:?}",
                other.map(|l| l.config)
            ),
        }
    }

    #[test]
    fn key_files_must_not_be_readable_by_others() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("paqet-noise-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (k, p) = keygen();
        let path = dir.join("noise.key");
        std::fs::write(&path, format!("{}\n", k.to_text())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let n = NoiseConfig {
            private_key: SecretSource::File(path.clone()),
            server_public_key: None,
            client_public_keys: vec![],
            psk: Some(SecretSource::Inline(
                crate::proto::noise::Psk::generate().to_text(),
            )),
        };
        let e = n.keys().unwrap_err();
        assert_eq!(e.key, "transport.noise.private_key");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let keys = n.keys().unwrap();
        assert_eq!(keys.private.public_key(), p);
        assert!(keys.psk.is_some());
        let missing = NoiseConfig {
            private_key: SecretSource::File(dir.join("absent.key")),
            ..n
        };
        let e = missing.keys().unwrap_err();
        assert!(e.to_string().contains("cannot read key file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
