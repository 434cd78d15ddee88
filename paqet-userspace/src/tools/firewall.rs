//! The iptables rules pcap mode needs, printable as shell commands and applied/removed by
//! [`apply`] / [`FirewallGuard`] (`paqet-dp run --manage-firewall`).
//!
//! paqet's packets bypass the kernel's TCP stack, but the kernel still sees them. Without these rules it
//! tracks them in conntrack and answers every tunnel packet with a RST. Per address family, each role
//! gets upstream's three rules (spec §2.4; the client rules are the mirror image, scoped to the server's
//! address) plus a fourth, paqet-dp's own:
//!
//! | table  | chain      | server                          | client                                             |
//! |--------|------------|---------------------------------|----------------------------------------------------|
//! | raw    | PREROUTING | `-p tcp --dport P -j NOTRACK`   | `-p tcp -s SIP --sport SP [--dport LP] -j NOTRACK` |
//! | raw    | PREROUTING | `-p tcp --dport P -j DROP`      | `-p tcp -s SIP --sport SP [--dport LP] -j DROP`    |
//! | raw    | OUTPUT     | `-p tcp --sport P -j NOTRACK`   | `-p tcp -d SIP --dport SP [--sport LP] -j NOTRACK` |
//! | mangle | OUTPUT     | `-p tcp --sport P --tcp-flags RST RST -j DROP` | `-p tcp -d SIP --dport SP [--sport LP] --tcp-flags RST RST -j DROP` |
//!
//! The raw PREROUTING DROP: libpcap's capture is a packet tap, which the kernel runs before netfilter, so
//! the daemon has its copy already; dropping the packet there keeps the kernel's IP and TCP stack from
//! processing it at all (routing, socket lookup, building the RST the mangle rule then discards). On the
//! bench's veth, where the receiver's stack runs in the sender's context, it raised pcap-mode throughput
//! about 1.5× at a third less CPU per MB. Our injected packets leave through an AF_PACKET socket and
//! never pass the OUTPUT hooks; the OUTPUT rules stay for upstream parity (and for any RST the kernel
//! might still build).
//!
//! Every rule carries `-m comment --comment paqet-dp`. [`apply`] checks each rule with `-C` first and
//! inserts only the missing ones (`-I`); the guard deletes exactly the rules it inserted.
use std::fmt;
use std::net::SocketAddr;
use std::process::Command;

use thiserror::Error;

/// Comment attached to every rule.
pub const COMMENT: &str = "paqet-dp";

/// IP family of a rule (selects `iptables` or `ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The program that manages this family's rules.
    pub fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// Which rules to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirewallRole {
    /// A server listening on `port`, for the families it has addresses for.
    Server { port: u16, ipv4: bool, ipv6: bool },
    /// A client talking to `server` from `local_ports` (one per session; empty = any local port).
    Client {
        server: SocketAddr,
        local_ports: Vec<u16>,
    },
}

/// One iptables rule: `<program> -t <table> <op> <chain> <spec...>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub family: Family,
    pub table: &'static str,
    pub chain: &'static str,
    /// Match and target arguments, comment included.
    pub spec: Vec<String>,
}

impl Rule {
    fn new(family: Family, table: &'static str, chain: &'static str, spec: &[String]) -> Self {
        let mut spec = spec.to_vec();
        // Put the comment before the target so `iptables -S` prints it back in the same order.
        let target_at = spec.iter().position(|s| s == "-j").unwrap_or(spec.len());
        spec.splice(
            target_at..target_at,
            ["-m", "comment", "--comment", COMMENT].map(String::from),
        );
        Rule {
            family,
            table,
            chain,
            spec,
        }
    }

    /// Arguments for `op` (`-A`, `-I`, `-C`, `-D`), with `-w` (wait for the xtables lock).
    pub fn args(&self, op: &str) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-w".into(),
            "-t".into(),
            self.table.into(),
            op.into(),
            self.chain.into(),
        ];
        a.extend(self.spec.iter().cloned());
        a
    }

    /// The shell command that appends this rule (what an operator would run by hand).
    pub fn to_shell(&self) -> String {
        format!(
            "{} -t {} -A {} {}",
            self.family.program(),
            self.table,
            self.chain,
            self.spec.join(" ")
        )
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_shell())
    }
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// The rules `role` needs, IPv4 first.
pub fn rules(role: &FirewallRole) -> Vec<Rule> {
    let mut out = Vec::new();
    match role {
        FirewallRole::Server { port, ipv4, ipv6 } => {
            let p = s(port);
            for (on, fam) in [(*ipv4, Family::V4), (*ipv6, Family::V6)] {
                if !on {
                    continue;
                }
                let tcp = ["-p", "tcp"].map(String::from);
                out.push(Rule::new(
                    fam,
                    "raw",
                    "PREROUTING",
                    &[&tcp[..], &[s("--dport"), p.clone(), s("-j"), s("NOTRACK")]].concat(),
                ));
                out.push(Rule::new(
                    fam,
                    "raw",
                    "PREROUTING",
                    &[&tcp[..], &[s("--dport"), p.clone(), s("-j"), s("DROP")]].concat(),
                ));
                out.push(Rule::new(
                    fam,
                    "raw",
                    "OUTPUT",
                    &[&tcp[..], &[s("--sport"), p.clone(), s("-j"), s("NOTRACK")]].concat(),
                ));
                out.push(Rule::new(
                    fam,
                    "mangle",
                    "OUTPUT",
                    &[
                        &tcp[..],
                        &[
                            s("--sport"),
                            p.clone(),
                            s("--tcp-flags"),
                            s("RST"),
                            s("RST"),
                            s("-j"),
                            s("DROP"),
                        ],
                    ]
                    .concat(),
                ));
            }
        }
        FirewallRole::Client {
            server,
            local_ports,
        } => {
            let fam = if server.is_ipv4() {
                Family::V4
            } else {
                Family::V6
            };
            let sip = s(server.ip());
            let sp = s(server.port());
            let locals: Vec<Option<u16>> = if local_ports.is_empty() {
                vec![None]
            } else {
                local_ports.iter().copied().map(Some).collect()
            };
            for lp in locals {
                let with_local = |flag: &str, mut v: Vec<String>| {
                    if let Some(lp) = lp {
                        v.push(s(flag));
                        v.push(s(lp));
                    }
                    v
                };
                let inbound = with_local(
                    "--dport",
                    vec![
                        s("-p"),
                        s("tcp"),
                        s("-s"),
                        sip.clone(),
                        s("--sport"),
                        sp.clone(),
                    ],
                );
                let outbound = with_local(
                    "--sport",
                    vec![
                        s("-p"),
                        s("tcp"),
                        s("-d"),
                        sip.clone(),
                        s("--dport"),
                        sp.clone(),
                    ],
                );
                let mut notrack_in = inbound.clone();
                notrack_in.extend([s("-j"), s("NOTRACK")]);
                let mut drop_in = inbound;
                drop_in.extend([s("-j"), s("DROP")]);
                let mut notrack_out = outbound.clone();
                notrack_out.extend([s("-j"), s("NOTRACK")]);
                let mut rst = outbound;
                rst.extend([s("--tcp-flags"), s("RST"), s("RST"), s("-j"), s("DROP")]);
                out.push(Rule::new(fam, "raw", "PREROUTING", &notrack_in));
                out.push(Rule::new(fam, "raw", "PREROUTING", &drop_in));
                out.push(Rule::new(fam, "raw", "OUTPUT", &notrack_out));
                out.push(Rule::new(fam, "mangle", "OUTPUT", &rst));
            }
        }
    }
    out
}

/// Errors managing the rules. Every variant names the command.
#[derive(Debug, Error)]
pub enum FirewallError {
    #[error("`{program}` not found: install iptables (and ip6tables for IPv6), or run without --manage-firewall and add the rules by hand")]
    Missing { program: &'static str },
    #[error(
        "`{command}` was refused: permission denied (run as root or with CAP_NET_ADMIN): {stderr}"
    )]
    Permission { command: String, stderr: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `<program> <args>`; `Ok(true)` on exit 0, `Ok(false)` on exit 1 when `one_is_false`.
fn run_rule(rule: &Rule, op: &str, one_is_false: bool) -> Result<bool, FirewallError> {
    let program = rule.family.program();
    let args = rule.args(op);
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program).args(&args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            FirewallError::Missing { program }
        } else {
            FirewallError::Spawn {
                command: command.clone(),
                source: e,
            }
        }
    })?;
    if out.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("permission denied")
        || lower.contains("you must be root")
        || lower.contains("not permitted")
    {
        return Err(FirewallError::Permission { command, stderr });
    }
    // `-C` exits 1 for "no such rule" (the message says "does a matching rule exist" / "Bad rule").
    if one_is_false && out.status.code() == Some(1) {
        return Ok(false);
    }
    Err(FirewallError::Failed {
        command,
        status: out.status.to_string(),
        stderr,
    })
}

/// True if `rule` is present (`-C`).
pub fn is_present(rule: &Rule) -> Result<bool, FirewallError> {
    run_rule(rule, "-C", true)
}

/// Inserts the missing rules (at the top of each chain) and returns a guard that removes them. On an
/// error the rules inserted so far are removed again before returning it.
pub fn apply(rules: &[Rule]) -> Result<FirewallGuard, FirewallError> {
    let mut guard = FirewallGuard { added: Vec::new() };
    for r in rules {
        if is_present(r)? {
            tracing::info!(rule = %r, "firewall rule already present, left alone");
            continue;
        }
        run_rule(r, "-I", false)?;
        tracing::info!(rule = %r, "firewall rule added");
        guard.added.push(r.clone());
    }
    Ok(guard)
}

/// Rules added by [`apply`]; removed by [`FirewallGuard::remove`] or on drop.
#[derive(Debug)]
pub struct FirewallGuard {
    added: Vec<Rule>,
}

impl FirewallGuard {
    /// The rules this guard inserted (and will delete).
    pub fn added(&self) -> &[Rule] {
        &self.added
    }

    /// Deletes the inserted rules (newest first). Tries all of them and returns the first error.
    pub fn remove(&mut self) -> Result<(), FirewallError> {
        let mut first = None;
        while let Some(r) = self.added.pop() {
            match run_rule(&r, "-D", false) {
                Ok(_) => tracing::info!(rule = %r, "firewall rule removed"),
                Err(e) => {
                    tracing::warn!(rule = %r, error = %e, "cannot remove firewall rule");
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for FirewallGuard {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_rules_match_upstream_readme() {
        let r = rules(&FirewallRole::Server {
            port: 9999,
            ipv4: true,
            ipv6: true,
        });
        let text: Vec<String> = r.iter().map(Rule::to_shell).collect();
        assert_eq!(
            text,
            [
                "iptables -t raw -A PREROUTING -p tcp --dport 9999 -m comment --comment paqet-dp -j NOTRACK",
                "iptables -t raw -A PREROUTING -p tcp --dport 9999 -m comment --comment paqet-dp -j DROP",
                "iptables -t raw -A OUTPUT -p tcp --sport 9999 -m comment --comment paqet-dp -j NOTRACK",
                "iptables -t mangle -A OUTPUT -p tcp --sport 9999 --tcp-flags RST RST -m comment --comment paqet-dp -j DROP",
                "ip6tables -t raw -A PREROUTING -p tcp --dport 9999 -m comment --comment paqet-dp -j NOTRACK",
                "ip6tables -t raw -A PREROUTING -p tcp --dport 9999 -m comment --comment paqet-dp -j DROP",
                "ip6tables -t raw -A OUTPUT -p tcp --sport 9999 -m comment --comment paqet-dp -j NOTRACK",
                "ip6tables -t mangle -A OUTPUT -p tcp --sport 9999 --tcp-flags RST RST -m comment --comment paqet-dp -j DROP",
            ]
        );
        assert_eq!(
            rules(&FirewallRole::Server {
                port: 1,
                ipv4: false,
                ipv6: true
            })
            .len(),
            4
        );
        assert!(rules(&FirewallRole::Server {
            port: 1,
            ipv4: false,
            ipv6: false
        })
        .is_empty());
    }

    #[test]
    fn client_rules_mirror_and_scope() {
        let r = rules(&FirewallRole::Client {
            server: "10.200.0.2:9999".parse().unwrap(),
            local_ports: vec![40000],
        });
        let text: Vec<String> = r.iter().map(Rule::to_shell).collect();
        assert_eq!(
            text,
            [
                "iptables -t raw -A PREROUTING -p tcp -s 10.200.0.2 --sport 9999 --dport 40000 -m comment --comment paqet-dp -j NOTRACK",
                "iptables -t raw -A PREROUTING -p tcp -s 10.200.0.2 --sport 9999 --dport 40000 -m comment --comment paqet-dp -j DROP",
                "iptables -t raw -A OUTPUT -p tcp -d 10.200.0.2 --dport 9999 --sport 40000 -m comment --comment paqet-dp -j NOTRACK",
                "iptables -t mangle -A OUTPUT -p tcp -d 10.200.0.2 --dport 9999 --sport 40000 --tcp-flags RST RST -m comment --comment paqet-dp -j DROP",
            ]
        );
        let v6 = rules(&FirewallRole::Client {
            server: "[2001:db8::2]:443".parse().unwrap(),
            local_ports: vec![],
        });
        assert_eq!(v6.len(), 4);
        assert!(v6.iter().all(|r| r.family == Family::V6
            && !r.spec.contains(&"--sport".to_string())
            || r.spec.contains(&"443".to_string())));
        assert_eq!(v6[0].to_shell(), "ip6tables -t raw -A PREROUTING -p tcp -s 2001:db8::2 --sport 443 -m comment --comment paqet-dp -j NOTRACK");
        let two = rules(&FirewallRole::Client {
            server: "10.0.0.1:1".parse().unwrap(),
            local_ports: vec![2, 3],
        });
        assert_eq!(two.len(), 8);
    }

    #[test]
    fn args_use_wait_and_table() {
        let r = &rules(&FirewallRole::Server {
            port: 7,
            ipv4: true,
            ipv6: false,
        })[3];
        assert_eq!(r.args("-C")[..5], ["-w", "-t", "mangle", "-C", "OUTPUT"]);
    }
}
