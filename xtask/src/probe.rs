//! `cargo xtask probe` (root): the active prober of `paqet-userspace/tests/probe_scan.rs` against any
//! IPv4 target: sends every scan of [`paqet_testkit::probe::scans`] to the target port and to a port that is
//! closed on the same host, and prints, per scan, whether the two answers are the same bytes but the ports
//! and the TCP checksum (what a paqet-dp XDP server with `io.probe_response = "closed"` should show).
//! Raw IP sockets (the kernel routes and resolves the next hop); optionally inside a named network
//! namespace. Only send it to hosts you run.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use paqet_testkit::netns::NetnsGuard;
use paqet_testkit::probe::{build4, differing_bytes4, parse4, scans, Probe};

pub const USAGE: &str =
    "usage: cargo xtask probe --target IPv4:PORT [--closed PORT] [--netns NAME] [--wait-ms N]";

struct Opts {
    target: SocketAddrV4,
    closed: u16,
    netns: Option<String>,
    wait: Duration,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut target = None;
    let mut closed = None;
    let mut netns = None;
    let mut wait = Duration::from_millis(800);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |f: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{f} needs a value"))
        };
        match a.as_str() {
            "--target" => {
                let v = val("--target")?;
                target = Some(
                    v.parse::<SocketAddrV4>()
                        .with_context(|| format!("--target {v:?}: an IPv4 address and port"))?,
                );
            }
            "--closed" => closed = Some(val("--closed")?.parse::<u16>().context("--closed")?),
            "--netns" => netns = Some(val("--netns")?),
            "--wait-ms" => {
                wait = Duration::from_millis(val("--wait-ms")?.parse().context("--wait-ms")?)
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let Some(target) = target else {
        bail!("--target is required\n{USAGE}")
    };
    let closed = closed.unwrap_or(if target.port() > 1 {
        target.port() - 9
    } else {
        9
    });
    if closed == target.port() {
        bail!("--closed must differ from the target port");
    }
    Ok(Opts {
        target,
        closed,
        netns,
        wait,
    })
}

/// A raw socket, closed on drop.
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn raw_socket(proto: i32) -> Result<Fd> {
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, proto) };
    if fd < 0 {
        bail!(
            "raw socket: {} (run as root)",
            std::io::Error::last_os_error()
        );
    }
    Ok(Fd(fd))
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
    sa
}

pub fn main(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let _ns = match &o.netns {
        Some(n) => Some(
            NetnsGuard::enter_path(&format!("/run/netns/{n}"))
                .with_context(|| format!("entering network namespace {n}"))?,
        ),
        None => None,
    };
    // The source address the kernel picks for the target.
    let u = UdpSocket::bind("0.0.0.0:0").context("UDP socket")?;
    u.connect(SocketAddr::V4(o.target))
        .with_context(|| format!("no route to {}", o.target))?;
    let SocketAddr::V4(src) = u.local_addr()? else {
        bail!("not an IPv4 source")
    };
    let src = *src.ip();
    let tx = raw_socket(libc::IPPROTO_RAW)?;
    let rx = raw_socket(libc::IPPROTO_TCP)?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: setsockopt with a timeval of the right size.
    unsafe {
        libc::setsockopt(
            rx.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let base = 40000 + (std::process::id() % 10000) as u16 * 2;
    let all = scans();
    let dst = sockaddr(*o.target.ip());
    for (i, sc) in all.iter().enumerate() {
        for (j, port) in [o.target.port(), o.closed].into_iter().enumerate() {
            let frame = build4(&Probe {
                src_mac: [0; 6],
                dst_mac: [0; 6],
                src: SocketAddr::from((src, base + 2 * i as u16 + j as u16)),
                dst: SocketAddr::from((*o.target.ip(), port)),
                seq: 0x1000_0000 + 7919 * i as u32,
                ack: 0x2000_0000 + 104_729 * i as u32,
                flags: sc.flags,
                tos: 0,
                options: sc.options.clone(),
                payload: sc.payload.clone(),
            });
            let ip = &frame[14..];
            // SAFETY: the buffer and the address outlive the call.
            let n = unsafe {
                libc::sendto(
                    tx.0,
                    ip.as_ptr().cast(),
                    ip.len(),
                    0,
                    (&dst as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if n != ip.len() as isize {
                bail!("sendto: {}", std::io::Error::last_os_error());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Answers: TCP from the target to our probe ports, as Ethernet-framed copies for the parser.
    let mut answers: Vec<Vec<u8>> = Vec::new();
    let end = Instant::now() + o.wait;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < end {
        // SAFETY: the buffer outlives the call.
        let n = unsafe { libc::recv(rx.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&buf[..n as usize]);
        if parse4(&f).is_some_and(|p| {
            p.src.ip() == std::net::IpAddr::V4(*o.target.ip())
                && p.dst.port() >= base
                && p.dst.port() < base + 2 * all.len() as u16
        }) {
            answers.push(f);
        }
    }
    let from = |port: u16| {
        answers
            .iter()
            .find(|f| parse4(f).is_some_and(|p| p.dst.port() == port))
    };
    let show = |f: Option<&Vec<u8>>| match f.and_then(|f| parse4(f)) {
        None => "-".to_string(),
        Some(p) => format!("flags {:#04x} seq {} ack {}", p.flags, p.seq, p.ack),
    };
    println!(
        "probe {} (closed-port reference {}:{}) from {src}",
        o.target,
        o.target.ip(),
        o.closed
    );
    println!("| scan | target port | closed port | same answer |");
    println!("|---|---|---|---|");
    let mut bad = 0;
    for (i, sc) in all.iter().enumerate() {
        let p = base + 2 * i as u16;
        let (a, k) = (from(p), from(p + 1));
        let same = match (a, k) {
            (None, None) => "yes (none)".to_string(),
            (Some(a), Some(k)) => match differing_bytes4(a, k) {
                Ok(d) if d.is_empty() => "yes".to_string(),
                Ok(d) => format!(
                    "NO: bytes {:?} differ",
                    d.iter().map(|i| i - 14).collect::<Vec<_>>()
                ),
                Err((x, y)) => format!("NO: lengths {} and {}", x - 14, y - 14),
            },
            _ => "NO".to_string(),
        };
        if !same.starts_with("yes") {
            bad += 1;
        }
        println!(
            "| {} | {} | {} | {same} |",
            sc.name.replace('|', "\\|"),
            show(a),
            show(k)
        );
    }
    if bad > 0 {
        bail!(
            "{bad} of {} scans were answered differently from the closed port",
            all.len()
        );
    }
    println!("every scan was answered like the closed port");
    Ok(())
}
