//! Host probes: /proc, /sys and rlimits, plus the small parsers behind them.
//!
//! Everything under `/proc/sys/net` and `/proc/thread-self/net` is read by the calling thread, so a
//! thread that entered another network namespace sees that namespace's values.

use std::collections::BTreeSet;
use std::path::Path;

/// Reads a sysctl by dotted name (`net.core.rmem_max`); `None` when it is not visible here (for
/// example host-global `net.core` knobs inside a non-initial network namespace).
pub fn sysctl(name: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Reads a numeric sysctl.
pub fn sysctl_u64(name: &str) -> Option<u64> {
    sysctl(name).and_then(|s| s.parse().ok())
}

/// Soft and hard limit of an rlimit resource (`u64::MAX` = unlimited).
pub fn rlimit(resource: libc::__rlimit_resource_t) -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Formats a limit, spelling out "unlimited".
pub fn fmt_limit(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".to_owned()
    } else {
        v.to_string()
    }
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: zeroed utsname is a valid out-buffer for uname(2).
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `(major, minor)` from a release string such as `6.18.44-fc-v782`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Parses a CPU list (`0-3,8,10-11`) into a set; `None` on malformed input.
pub fn parse_cpu_list(s: &str) -> Option<BTreeSet<u32>> {
    let mut set = BTreeSet::new();
    let s = s.trim();
    if s.is_empty() {
        return Some(set);
    }
    for part in s.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if a > b || b - a > 65536 {
                    return None;
                }
                set.extend(a..=b);
            }
            None => {
                set.insert(part.parse().ok()?);
            }
        }
    }
    Some(set)
}

/// The interface of the default IPv4 route in the calling thread's namespace.
pub fn default_route_iface() -> Option<String> {
    let text = std::fs::read_to_string("/proc/thread-self/net/route").ok()?;
    parse_default_route(&text)
}

/// Finds the default route's interface in `/proc/net/route` text.
pub fn parse_default_route(text: &str) -> Option<String> {
    text.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let iface = f.next()?;
        let dest = f.next()?;
        let _gw = f.next()?;
        let _flags = f.next()?;
        let mask = f.nth(3)?;
        (dest == "00000000" && mask == "00000000").then(|| iface.to_owned())
    })
}

/// True when `iface` exists in the calling thread's network namespace.
pub fn iface_exists(iface: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(iface) else {
        return false;
    };
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// IRQ numbers of a PCI device (`/sys/bus/pci/devices/BUS/msi_irqs/*`), sorted.
pub fn device_irqs(bus_info: &str) -> Vec<u32> {
    if bus_info.is_empty() || bus_info.contains('/') {
        return Vec::new();
    }
    let dir = Path::new("/sys/bus/pci/devices")
        .join(bus_info)
        .join("msi_irqs");
    let mut irqs: Vec<u32> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    irqs.sort_unstable();
    irqs
}

/// CPUs an IRQ is delivered to (effective affinity when the kernel reports it).
pub fn irq_cpus(irq: u32) -> Option<BTreeSet<u32>> {
    for f in ["effective_affinity_list", "smp_affinity_list"] {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/irq/{irq}/{f}")) {
            if let Some(set) = parse_cpu_list(&s) {
                if !set.is_empty() {
                    return Some(set);
                }
            }
        }
    }
    None
}

/// IRQs named after the interface in `/proc/interrupts` (`eth0-TxRx-0`, ...), for drivers without
/// a PCI bus address.
pub fn named_irqs(interrupts: &str, iface: &str) -> Vec<u32> {
    interrupts
        .lines()
        .filter_map(|l| {
            let (num, rest) = l.trim_start().split_once(':')?;
            let irq: u32 = num.trim().parse().ok()?;
            let name = rest.split_whitespace().last()?;
            let matches = name == iface
                || name
                    .strip_prefix(iface)
                    .is_some_and(|s| s.starts_with('-') || s.starts_with('@'));
            matches.then_some(irq)
        })
        .collect()
}

/// `scaling_governor` of every CPU that has cpufreq, as (cpu, governor).
pub fn cpu_governors() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/devices/system/cpu") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("cpu"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(g) = std::fs::read_to_string(e.path().join("cpufreq/scaling_governor")) {
            out.push((n, g.trim().to_owned()));
        }
    }
    out.sort();
    out
}

/// Drivers with native (driver-mode) XDP support in mainline Linux.
pub const NATIVE_XDP_DRIVERS: &[&str] = &[
    "i40e",
    "ice",
    "ixgbe",
    "ixgbevf",
    "igb",
    "igc",
    "mlx4_en",
    "mlx5_core",
    "bnxt_en",
    "nfp",
    "qede",
    "virtio_net",
    "veth",
    "ena",
    "tun",
    "nicvf",
    "sfc",
    "netsec",
    "stmmac",
    "dpaa2-eth",
    "dpaa_eth",
    "mvneta",
    "mvpp2",
    "fec",
    "enetc",
    "hv_netvsc",
    "cpsw",
    "lan966x-switch",
    "gve",
    "bond",
    "atlantic",
    "idpf",
    "igbvf",
    "txgbe",
    "ngbe",
    "octeontx2-nicpf",
    "mana",
    "ionic",
    "fbnic",
    "xsc",
];

/// True when `driver` supports native XDP.
pub fn native_xdp(driver: &str) -> bool {
    NATIVE_XDP_DRIVERS.contains(&driver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-2,5\n")
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            vec![0, 1, 2, 5]
        );
        assert!(parse_cpu_list("").unwrap().is_empty());
        assert!(parse_cpu_list("3-1").is_none());
        assert!(parse_cpu_list("a").is_none());
        assert!(parse_cpu_list("0-99999999").is_none());
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!(parse_kernel_version(&kernel_release()).is_some());
    }

    #[test]
    fn default_route_parsing() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_route(t).as_deref(), Some("eth0"));
        assert_eq!(parse_default_route("Iface\n"), None);
    }

    #[test]
    fn interrupts_by_name() {
        let t = "           CPU0       CPU1\n\
                  24:        10         0   PCI-MSI 1-edge      eth0-TxRx-0\n\
                  25:         0        10   PCI-MSI 2-edge      eth0-TxRx-1\n\
                  26:         0        10   PCI-MSI 3-edge      eth01\n\
                 NMI:         0         0   Non-maskable interrupts\n";
        assert_eq!(named_irqs(t, "eth0"), vec![24, 25]);
        assert_eq!(named_irqs(t, "eth01"), vec![26]);
    }

    #[test]
    fn xdp_driver_list() {
        assert!(native_xdp("veth"));
        assert!(native_xdp("mlx5_core"));
        assert!(!native_xdp("r8169"));
    }
}
