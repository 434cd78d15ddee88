//! `paqet-dp doctor`: checks the host against the production runbook (`docs/runbook.md`).
//!
//! [`run`] probes fd limits, `net.core` sysctls, the NIC (medium, driver, rings, channels, offloads, IRQ
//! spread, XDP support), the CPU frequency governor, the kernel (version, BTF) and the pcap buffer,
//! and returns a [`Report`] of [`Finding`]s. Each finding carries the current value, the recommended
//! one, a [`Status`] and the command that changes it.
//!
//! Network-namespace aware: sysctls under `net.` and the NIC queries are made by the calling
//! thread, so a thread that entered a namespace (`setns(2)`; the tests use `paqet_testkit::netns`) checks
//! that namespace.

pub mod ethtool;
pub mod host;

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use crate::io::route;
use crate::wire::envelope::Medium;
use ethtool::{Ethtool, EthtoolError};

/// Minimum recommended `RLIMIT_NOFILE` soft limit.
pub const MIN_NOFILE: u64 = 65_536;
/// Minimum recommended `net.core.{r,w}mem_max` (32 MiB).
pub const MIN_MEM_MAX: u64 = 32 << 20;
/// Minimum recommended `net.core.{r,w}mem_default` (1 MiB).
pub const MIN_MEM_DEFAULT: u64 = 1 << 20;
/// Minimum recommended `net.core.netdev_max_backlog`.
pub const MIN_BACKLOG: u64 = 16_384;
/// Minimum recommended `net.core.somaxconn` (accept backlog of the SOCKS5/HTTP/forward listeners).
pub const MIN_SOMAXCONN: u64 = 4_096;
/// Default pcap buffer when no config is given (the server default of `network.pcap.sockbuf`).
pub const DEFAULT_PCAP_SOCKBUF: u64 = 8 << 20;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Matches the recommendation.
    Ok,
    /// Informational only (not applicable, not visible here, a trade-off).
    Info,
    /// Works, but below the recommendation.
    Warn,
    /// Will not work or is badly wrong.
    Fail,
}

impl Status {
    /// Lower-case label used in text and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Info => "info",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One checked setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable identifier, e.g. `sysctl.net.core.rmem_max`, `nic.gro`.
    pub name: String,
    /// What the host has now.
    pub current: String,
    /// What the runbook recommends.
    pub recommended: String,
    /// Verdict.
    pub status: Status,
    /// Command that changes the setting (absent when nothing needs doing or nothing can be done).
    pub fix: Option<String>,
    /// Short explanation.
    pub note: Option<String>,
}

impl Finding {
    fn new(
        name: impl Into<String>,
        current: impl Into<String>,
        recommended: impl Into<String>,
        status: Status,
    ) -> Self {
        Self {
            name: name.into(),
            current: current.into(),
            recommended: recommended.into(),
            status,
            fix: None,
            note: None,
        }
    }
    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
    fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// Interface to check; `None` = the default route's interface (if any).
    pub iface: Option<String>,
    /// `network.pcap.sockbuf` from the config; `None` = [`DEFAULT_PCAP_SOCKBUF`].
    pub pcap_sockbuf: Option<u64>,
}

/// The doctor's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Interface that was checked, if any.
    pub iface: Option<String>,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// All findings, in check order.
    pub findings: Vec<Finding>,
}

impl Report {
    /// The finding called `name`.
    pub fn get(&self, name: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.name == name)
    }

    /// The worst status of all findings (`Ok` for an empty report).
    pub fn worst(&self) -> Status {
        self.findings
            .iter()
            .map(|f| f.status)
            .max()
            .unwrap_or(Status::Ok)
    }

    /// Process exit code: 0 when nothing is off (only ok/info), 1 with warnings, 2 with failures.
    pub fn exit_code(&self) -> i32 {
        match self.worst() {
            Status::Ok | Status::Info => 0,
            Status::Warn => 1,
            Status::Fail => 2,
        }
    }

    /// Human-readable table with a fix line under every finding that needs one.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "paqet-dp doctor: kernel {}, interface {}",
            self.kernel,
            self.iface.as_deref().unwrap_or("(none)")
        );
        let w = self
            .findings
            .iter()
            .map(|f| f.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let wc = self
            .findings
            .iter()
            .map(|f| f.current.len())
            .max()
            .unwrap_or(7)
            .clamp(7, 40);
        let _ = writeln!(
            s,
            "{:<6} {:<w$} {:<wc$} RECOMMENDED",
            "STATUS", "NAME", "CURRENT"
        );
        for f in &self.findings {
            let _ = writeln!(
                s,
                "{:<6} {:<w$} {:<wc$} {}",
                f.status.as_str(),
                f.name,
                f.current,
                f.recommended
            );
            if let Some(n) = &f.note {
                let _ = writeln!(s, "{:<6} {:<w$} note: {n}", "", "");
            }
            if matches!(f.status, Status::Warn | Status::Fail) {
                if let Some(fix) = &f.fix {
                    let _ = writeln!(s, "{:<6} {:<w$} fix:  {fix}", "", "");
                }
            }
        }
        let count = |st| self.findings.iter().filter(|f| f.status == st).count();
        let _ = writeln!(
            s,
            "{} ok, {} info, {} warn, {} fail",
            count(Status::Ok),
            count(Status::Info),
            count(Status::Warn),
            count(Status::Fail)
        );
        s
    }

    /// Pretty JSON: `{"iface", "kernel", "findings": [{name, current, recommended, status, fix, note}]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Runs every check from the calling thread (and so in its network namespace).
pub fn run(opts: &DoctorOptions) -> Report {
    let kernel = host::kernel_release();
    let mut findings = Vec::new();
    limits(&mut findings);
    let rmem_max = sysctls(&mut findings);
    let iface = opts.iface.clone().or_else(host::default_route_iface);
    match &iface {
        Some(i) => nic(i, &mut findings),
        None => findings.push(
            Finding::new("nic", "no interface", "an interface", Status::Info)
                .note("no --iface given and no default IPv4 route: NIC checks skipped")
                .fix("paqet-dp doctor --iface IFACE"),
        ),
    }
    governor(&mut findings);
    kernel_checks(&kernel, &mut findings);
    pcap_buffer(
        opts.pcap_sockbuf.unwrap_or(DEFAULT_PCAP_SOCKBUF),
        rmem_max,
        &mut findings,
    );
    Report {
        iface,
        kernel,
        findings,
    }
}

fn limits(out: &mut Vec<Finding>) {
    match host::rlimit(libc::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let status = if soft >= MIN_NOFILE {
                Status::Ok
            } else {
                Status::Warn
            };
            out.push(
                Finding::new(
                    "limits.nofile",
                    format!("soft {} / hard {}", host::fmt_limit(soft), host::fmt_limit(hard)),
                    format!("soft >= {MIN_NOFILE}"),
                    status,
                )
                .fix("ulimit -n 1048576 (systemd: LimitNOFILE=1048576; Kubernetes: container runtime default)")
                .note("every proxied stream holds a client socket"),
            );
        }
        Err(e) => out.push(Finding::new(
            "limits.nofile",
            format!("unreadable: {e}"),
            format!(">= {MIN_NOFILE}"),
            Status::Warn,
        )),
    }
    if let Ok((soft, hard)) = host::rlimit(libc::RLIMIT_MEMLOCK) {
        out.push(
            Finding::new(
                "limits.memlock",
                format!(
                    "soft {} / hard {}",
                    host::fmt_limit(soft),
                    host::fmt_limit(hard)
                ),
                "unlimited on kernels < 5.11 (AF_XDP UMEM and BPF maps); memcg-accounted after",
                Status::Info,
            )
            .fix("ulimit -l unlimited (systemd: LimitMEMLOCK=infinity)"),
        );
    }
}

/// Checks a numeric `net.core` sysctl against a minimum. Returns the value if visible.
fn min_sysctl(out: &mut Vec<Finding>, key: &str, min: u64, note: &str) -> Option<u64> {
    let name = format!("sysctl.{key}");
    match host::sysctl_u64(key) {
        Some(v) => {
            let status = if v >= min { Status::Ok } else { Status::Warn };
            out.push(
                Finding::new(name, v.to_string(), format!(">= {min}"), status)
                    .fix(format!(
                        "sysctl -w {key}={min} (persist in /etc/sysctl.d/90-paqet-dp.conf)"
                    ))
                    .note(note),
            );
            Some(v)
        }
        None => {
            out.push(not_visible(name, key, format!(">= {min}")));
            None
        }
    }
}

fn not_visible(name: String, key: &str, recommended: String) -> Finding {
    Finding::new(name, "not visible", recommended, Status::Info)
        .note("host-global sysctl, not shown inside this network namespace: check from the host")
        .fix(format!("sysctl {key} (in the initial network namespace)"))
}

/// The `net.core` sysctls; returns `rmem_max` when visible.
fn sysctls(out: &mut Vec<Finding>) -> Option<u64> {
    let rmem_max = min_sysctl(
        out,
        "net.core.rmem_max",
        MIN_MEM_MAX,
        "caps SO_RCVBUF of the injection/front-end sockets",
    );
    min_sysctl(
        out,
        "net.core.wmem_max",
        MIN_MEM_MAX,
        "caps SO_SNDBUF of the injection/front-end sockets",
    );
    min_sysctl(
        out,
        "net.core.rmem_default",
        MIN_MEM_DEFAULT,
        "receive buffer of sockets that do not set one",
    );
    min_sysctl(
        out,
        "net.core.wmem_default",
        MIN_MEM_DEFAULT,
        "send buffer of sockets that do not set one",
    );
    min_sysctl(
        out,
        "net.core.netdev_max_backlog",
        MIN_BACKLOG,
        "per-CPU input queue; pcap mode drops here under bursts",
    );
    min_sysctl(
        out,
        "net.core.somaxconn",
        MIN_SOMAXCONN,
        "accept backlog of the SOCKS5/HTTP/forward listeners (per network namespace)",
    );
    for key in ["net.core.busy_poll", "net.core.busy_read"] {
        let name = format!("sysctl.{key}");
        match host::sysctl_u64(key) {
            Some(v) => out.push(
                Finding::new(
                    name,
                    v.to_string(),
                    "0 (off); 50 only for latency-critical hosts with spare CPU",
                    Status::Info,
                )
                .fix(format!("sysctl -w {key}=50"))
                .note("optional latency/CPU trade-off"),
            ),
            None => out.push(not_visible(name, key, "0 or 50".into())),
        }
    }
    rmem_max
}

fn nic(iface: &str, out: &mut Vec<Finding>) {
    if !host::iface_exists(iface) {
        out.push(
            Finding::new(
                "nic.interface",
                format!("{iface}: not found"),
                "an existing interface",
                Status::Fail,
            )
            .note("interface does not exist in this network namespace")
            .fix("ip -br link"),
        );
        return;
    }
    medium(iface, out);
    let et = match Ethtool::new(iface) {
        Ok(e) => e,
        Err(e) => {
            out.push(Finding::new(
                "nic.interface",
                e.to_string(),
                "ethtool access",
                Status::Warn,
            ));
            return;
        }
    };
    let driver = et.driver().ok();
    let drv_name = driver.as_ref().map(|d| d.name.clone()).unwrap_or_default();
    out.push(Finding::new(
        "nic.driver",
        if drv_name.is_empty() {
            "unknown".to_owned()
        } else {
            drv_name.clone()
        },
        "-",
        Status::Info,
    ));

    // XDP support.
    let (status, note) = if drv_name.is_empty() {
        (
            Status::Warn,
            "driver unknown: only generic (skb) XDP can be assumed",
        )
    } else if host::native_xdp(&drv_name) {
        (
            Status::Ok,
            "native XDP: io.backend = \"afxdp\" runs in driver mode",
        )
    } else {
        (
            Status::Warn,
            "no native XDP: AF_XDP falls back to generic (skb) mode, slower than native",
        )
    };
    out.push(
        Finding::new(
            "nic.xdp",
            if host::native_xdp(&drv_name) {
                "native"
            } else {
                "generic only"
            },
            "native",
            status,
        )
        .note(note)
        .fix("use a NIC with native XDP, or io.backend = \"pcap\""),
    );

    // Rings.
    match et.rings() {
        Ok(r) => {
            let status = if r.rx >= r.rx_max && r.tx >= r.tx_max {
                Status::Ok
            } else {
                Status::Warn
            };
            out.push(
                Finding::new(
                    "nic.rings",
                    format!("rx {} tx {}", r.rx, r.tx),
                    format!("rx {} tx {} (maximum)", r.rx_max, r.tx_max),
                    status,
                )
                .fix(format!(
                    "ethtool -G {iface} rx {} tx {}",
                    r.rx_max, r.tx_max
                )),
            );
        }
        Err(e) => out.push(ethtool_info("nic.rings", &e)),
    }

    // Channels / RSS queues.
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let rx_queues = match et.channels() {
        Ok(c) => {
            let want = c.max_rx_queues().min(cpus).max(1);
            let status = if c.rx_queues() >= want {
                Status::Ok
            } else {
                Status::Warn
            };
            let fix = if c.max_combined > 0 {
                format!("ethtool -L {iface} combined {want}")
            } else {
                format!(
                    "ethtool -L {iface} rx {want} tx {}",
                    c.max_tx.min(cpus).max(1)
                )
            };
            out.push(
                Finding::new(
                    "nic.channels",
                    format!("rx {} tx {} combined {}", c.rx, c.tx, c.combined),
                    format!(
                        "{want} receive queues (min of NIC maximum {} and {cpus} CPUs)",
                        c.max_rx_queues()
                    ),
                    status,
                )
                .fix(fix)
                .note("RSS spreads flows over receive queues; each queue can feed one worker"),
            );
            Some(c.rx_queues())
        }
        Err(e) => {
            out.push(ethtool_info("nic.channels", &e));
            None
        }
    };

    // Offloads.
    match et.offloads() {
        Ok(o) => {
            let onoff = |b: bool| if b { "on" } else { "off" };
            for (name, key, on) in [("nic.gro", "gro", o.gro), ("nic.lro", "lro", o.lro)] {
                out.push(
                    Finding::new(name, onoff(on), "off", if on { Status::Warn } else { Status::Ok })
                        .fix(format!("ethtool -K {iface} {key} off"))
                        .note("pcap mode captures after GRO/LRO: merged segments break datagram boundaries (XDP sees frames before)"),
                );
            }
            out.push(
                Finding::new("nic.tso", onoff(o.tso), "any", Status::Info)
                    .fix(format!("ethtool -K {iface} tso off"))
                    .note("paqet-dp injects MTU-sized frames; TSO only matters for other traffic"),
            );
        }
        Err(e) => {
            for n in ["nic.gro", "nic.lro", "nic.tso"] {
                out.push(ethtool_info(n, &e));
            }
        }
    }

    irq_spread(
        iface,
        driver.as_ref().map(|d| d.bus_info.as_str()).unwrap_or(""),
        rx_queues,
        out,
    );
}

/// `nic.medium`: what frames start with on `iface` (its ARPHRD type): Ethernet, or no link header (tun,
/// ppp, WireGuard: no `router_mac`, generic XDP), or a link type paqet cannot run on.
fn medium(iface: &str, out: &mut Vec<Finding>) {
    let recommended = "ethernet, or ip (no link header)";
    let f = match route::link_info(iface) {
        Err(e) => Finding::new("nic.medium", e.to_string(), recommended, Status::Warn),
        Ok(li) => {
            let current = format!(
                "{} (ARPHRD {} {})",
                li.medium().map_or("unsupported", |m| m.as_str()),
                li.arphrd,
                Medium::arphrd_name(li.arphrd)
            );
            match li.medium() {
                Ok(Medium::Ethernet) => Finding::new("nic.medium", current, recommended, Status::Ok),
                Ok(Medium::Ip) => Finding::new("nic.medium", current, recommended, Status::Ok).note(
                    "no link header: leave network.ipv4.router_mac / network.ipv6.router_mac unset; \
                     XDP runs in generic mode",
                ),
                Err(e) => Finding::new("nic.medium", current, recommended, Status::Fail)
                    .note(e.to_string()),
            }
        }
    };
    out.push(f);
}

fn ethtool_info(name: &str, e: &EthtoolError) -> Finding {
    let status = match e {
        EthtoolError::Unsupported { .. } => Status::Info,
        _ => Status::Warn,
    };
    Finding::new(name, "not available", "-", status).note(e.to_string())
}

fn irq_spread(iface: &str, bus_info: &str, rx_queues: Option<u32>, out: &mut Vec<Finding>) {
    let mut irqs = host::device_irqs(bus_info);
    if irqs.is_empty() {
        if let Ok(t) = std::fs::read_to_string("/proc/interrupts") {
            irqs = host::named_irqs(&t, iface);
        }
    }
    if irqs.is_empty() {
        out.push(
            Finding::new("nic.irq_affinity", "no device IRQs", "queue IRQs spread over CPUs", Status::Info)
                .note("virtual interface (or IRQs not attributable): nothing to pin; consider RPS for high PPS"),
        );
        return;
    }
    let mut union = BTreeSet::new();
    let mut firsts = BTreeSet::new();
    for &irq in &irqs {
        if let Some(set) = host::irq_cpus(irq) {
            if let Some(&first) = set.iter().next() {
                firsts.insert(first);
            }
            union.extend(set);
        }
    }
    let multi = irqs.len() > 1 && rx_queues.unwrap_or(2) > 1;
    let status = if multi && firsts.len() <= 1 {
        Status::Warn
    } else {
        Status::Ok
    };
    out.push(
        Finding::new(
            "nic.irq_affinity",
            format!("{} IRQs on CPUs {}", irqs.len(), fmt_set(&union)),
            "queue IRQs spread over distinct CPUs",
            status,
        )
        .fix(format!(
            "systemctl start irqbalance, or echo CPU > /proc/irq/N/smp_affinity_list for IRQs {}",
            irqs.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )),
    );
}

fn fmt_set(s: &BTreeSet<u32>) -> String {
    if s.is_empty() {
        return "unknown".into();
    }
    s.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn governor(out: &mut Vec<Finding>) {
    let g = host::cpu_governors();
    if g.is_empty() {
        out.push(
            Finding::new("cpu.governor", "not available", "performance", Status::Info)
                .note("no cpufreq (typical on VMs): frequency is managed by the hypervisor"),
        );
        return;
    }
    let distinct: BTreeSet<&str> = g.iter().map(|(_, s)| s.as_str()).collect();
    let ok = distinct.len() == 1 && distinct.contains("performance");
    out.push(
        Finding::new(
            "cpu.governor",
            distinct.into_iter().collect::<Vec<_>>().join(","),
            "performance",
            if ok { Status::Ok } else { Status::Warn },
        )
        .fix("cpupower frequency-set -g performance"),
    );
}

fn kernel_checks(release: &str, out: &mut Vec<Finding>) {
    let status = match host::parse_kernel_version(release) {
        Some(v) if v >= (5, 10) => Status::Ok,
        Some(v) if v >= (4, 18) => Status::Warn,
        Some(_) => Status::Fail,
        None => Status::Warn,
    };
    out.push(
        Finding::new(
            "kernel.version",
            release,
            ">= 5.10 (AF_XDP need_wakeup, BTF, bpf_link)",
            status,
        )
        .note("AF_XDP needs >= 4.18; pcap mode works on older kernels")
        .fix("upgrade the kernel, or io.backend = \"pcap\""),
    );
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    out.push(
        Finding::new(
            "kernel.btf",
            if btf { "present" } else { "missing" },
            "present",
            if btf { Status::Ok } else { Status::Warn },
        )
        .note("/sys/kernel/btf/vmlinux: needed to inspect the XDP program with bpftool")
        .fix("a kernel built with CONFIG_DEBUG_INFO_BTF=y"),
    );
}

fn pcap_buffer(sockbuf: u64, rmem_max: Option<u64>, out: &mut Vec<Finding>) {
    let (current, status) = match rmem_max {
        Some(r) if r >= sockbuf => (format!("sockbuf {sockbuf}, rmem_max {r}"), Status::Ok),
        Some(r) => (format!("sockbuf {sockbuf}, rmem_max {r}"), Status::Warn),
        None => (
            format!("sockbuf {sockbuf}, rmem_max not visible"),
            Status::Info,
        ),
    };
    out.push(
        Finding::new(
            "pcap.sockbuf",
            current,
            "net.core.rmem_max >= network.pcap.sockbuf",
            status,
        )
        .note("libpcap falls back to SO_RCVBUF (capped by rmem_max) when it cannot map its ring")
        .fix(format!(
            "sysctl -w net.core.rmem_max={}",
            sockbuf.max(MIN_MEM_MAX)
        )),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_runs_and_serialises() {
        let r = run(&DoctorOptions {
            iface: Some("lo".into()),
            pcap_sockbuf: Some(1 << 40),
        });
        assert_eq!(r.iface.as_deref(), Some("lo"));
        let m = r.get("nic.medium").unwrap();
        assert_eq!(m.current, "ethernet (ARPHRD 772 loopback)");
        assert_eq!(m.status, Status::Ok);
        for name in [
            "limits.nofile",
            "sysctl.net.core.rmem_max",
            "nic.gro",
            "cpu.governor",
            "kernel.version",
            "kernel.btf",
        ] {
            assert!(r.get(name).is_some(), "missing {name}: {}", r.to_text());
        }
        // A 1 TiB pcap buffer always exceeds rmem_max (when visible).
        let p = r.get("pcap.sockbuf").unwrap();
        assert!(matches!(p.status, Status::Warn | Status::Info), "{p:?}");
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["findings"].as_array().unwrap().len(), r.findings.len());
        assert!(r.to_text().contains("limits.nofile"));
    }

    #[test]
    fn missing_interface_fails() {
        let r = run(&DoctorOptions {
            iface: Some("pqnosuch1".into()),
            pcap_sockbuf: None,
        });
        assert_eq!(r.get("nic.interface").unwrap().status, Status::Fail);
        assert_eq!(r.exit_code(), 2);
    }

    #[test]
    fn exit_codes_follow_the_worst_status() {
        let mut r = Report {
            iface: None,
            kernel: String::new(),
            findings: vec![],
        };
        assert_eq!(r.exit_code(), 0);
        r.findings.push(Finding::new("a", "1", "1", Status::Info));
        assert_eq!(r.exit_code(), 0);
        r.findings
            .push(Finding::new("b", "1", "2", Status::Warn).fix("x"));
        assert_eq!(r.exit_code(), 1);
        assert!(r.to_text().contains("fix:  x"));
        r.findings.push(Finding::new("c", "1", "2", Status::Fail));
        assert_eq!(r.exit_code(), 2);
    }

    #[test]
    fn pcap_buffer_compares_with_rmem_max() {
        let mut v = Vec::new();
        pcap_buffer(8 << 20, Some(4 << 20), &mut v);
        pcap_buffer(8 << 20, Some(16 << 20), &mut v);
        pcap_buffer(8 << 20, None, &mut v);
        assert_eq!(
            v.iter().map(|f| f.status).collect::<Vec<_>>(),
            vec![Status::Warn, Status::Ok, Status::Info]
        );
    }
}
