//! Network-namespace helpers for root-only tests and the benchmarks (`xtask`).
//!
//! - [`Netns`]: a named namespace (`ip netns add`), deleted on drop.
//! - [`NetnsGuard`]: moves the *current thread* into a namespace with `setns(2)` and moves it back
//!   on drop. Sockets opened while inside stay in that namespace.
//! - [`Netns::spawn`]: runs a closure on a fresh thread inside the namespace.
//! - [`VethPair`]: a veth pair created directly inside two namespaces (never visible in the host
//!   namespace), deleted on drop.
//!
//! Names include the process id so parallel test binaries do not collide; keep tags short because
//! interface names are limited to 15 bytes.

use std::ffi::CString;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::thread::JoinHandle;

/// True when running with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `program args...`; returns stdout, or an error carrying the command line and stderr.
pub fn run(program: &str, args: &[&str]) -> std::io::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `pq<pid><tag>` with its loopback up. A stale namespace of the same name
    /// (left by a killed run with the same pid) is replaced.
    pub fn new(tag: &str) -> std::io::Result<Self> {
        Self::with_prefix("pq", tag)
    }

    /// Like [`Netns::new`] with another prefix: `<prefix><pid><tag>` (the benchmarks use `pqb`, so the test
    /// script's cleanup of stale `pq<digits>` namespaces leaves a running benchmark alone).
    pub fn with_prefix(prefix: &str, tag: &str) -> std::io::Result<Self> {
        let name = format!("{prefix}{}{tag}", std::process::id());
        let _ = run("ip", &["netns", "del", &name]);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `cmd` inside the namespace (`ip netns exec`); returns stdout.
    pub fn exec(&self, cmd: &[&str]) -> std::io::Result<String> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }

    /// A [`Command`] that runs `program` inside the namespace; add arguments and spawn it.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Moves the current thread into this namespace until the guard is dropped.
    pub fn enter(&self) -> std::io::Result<NetnsGuard> {
        NetnsGuard::enter_path(&format!("/run/netns/{}", self.name))
    }

    /// Runs `f` on a new thread that lives inside this namespace.
    pub fn spawn<F, T>(&self, f: F) -> JoinHandle<std::io::Result<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let _guard = NetnsGuard::enter_path(&path)?;
            Ok(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "cannot delete network namespace");
        }
    }
}

fn open_ro(path: &str) -> std::io::Result<OwnedFd> {
    let c = CString::new(path)
        .map_err(|_| std::io::Error::other(format!("path {path:?} contains NUL")))?;
    // SAFETY: valid C string; the returned fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("cannot open {path}: {e}"),
        ));
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setns(fd: &OwnedFd, what: &str) -> std::io::Result<()> {
    // SAFETY: valid namespace fd; CLONE_NEWNET only affects the calling thread.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("setns({what}) failed: {e}"),
        ));
    }
    Ok(())
}

/// While alive, the creating thread is inside another network namespace. Not `Send`: it must be
/// dropped on the thread that created it.
pub struct NetnsGuard {
    orig: OwnedFd,
    _thread_bound: PhantomData<*const ()>,
}

impl NetnsGuard {
    /// Enters the namespace at `path` (e.g. `/run/netns/NAME` or `/proc/PID/ns/net`).
    pub fn enter_path(path: &str) -> std::io::Result<Self> {
        let orig = open_ro("/proc/thread-self/ns/net")?;
        let target = open_ro(path)?;
        setns(&target, path)?;
        Ok(Self {
            orig,
            _thread_bound: PhantomData,
        })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.orig, "original namespace") {
            tracing::error!(error = %e, "cannot return to the original network namespace");
        }
    }
}

/// A veth pair whose ends live in two namespaces.
#[derive(Debug)]
pub struct VethPair {
    /// End inside namespace A.
    pub a: String,
    /// End inside namespace B.
    pub b: String,
    ns_a: String,
}

impl VethPair {
    /// Creates `a` inside `ns_a` and `b` inside `ns_b` (both ≤ 15 bytes) and sets them up.
    pub fn new(a: &str, b: &str, ns_a: &Netns, ns_b: &Netns) -> std::io::Result<Self> {
        for n in [a, b] {
            if n.is_empty() || n.len() > 15 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("interface name {n:?} must be 1..=15 bytes"),
                ));
            }
        }
        run(
            "ip",
            &[
                "link",
                "add",
                a,
                "netns",
                ns_a.name(),
                "type",
                "veth",
                "peer",
                "name",
                b,
                "netns",
                ns_b.name(),
            ],
        )?;
        let pair = Self {
            a: a.to_owned(),
            b: b.to_owned(),
            ns_a: ns_a.name().to_owned(),
        };
        ns_a.exec(&["ip", "link", "set", a, "up"])?;
        ns_b.exec(&["ip", "link", "set", b, "up"])?;
        Ok(pair)
    }

    /// Adds `cidr_a` to end A and `cidr_b` to end B (IPv6 addresses get `nodad`), and optionally
    /// turns TX checksum offload (and with it TSO/GSO) off on both ends with ethtool, so frames
    /// carry full checksums and are never GSO super-frames.
    pub fn configure(
        &self,
        ns_a: &Netns,
        ns_b: &Netns,
        cidr_a: &str,
        cidr_b: &str,
        tx_offload_off: bool,
    ) -> std::io::Result<()> {
        for (ns, dev, cidr) in [(ns_a, &self.a, cidr_a), (ns_b, &self.b, cidr_b)] {
            let mut cmd = vec!["ip", "addr", "add", cidr, "dev", dev.as_str()];
            if cidr.contains(':') {
                cmd.push("nodad");
            }
            ns.exec(&cmd)?;
            if tx_offload_off {
                ns.exec(&["ethtool", "-K", dev, "tx", "off"])?;
            }
        }
        Ok(())
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end deletes both; if the namespace is already gone, so is the pair.
        let _ = run(
            "ip",
            &["netns", "exec", &self.ns_a, "ip", "link", "del", &self.a],
        );
    }
}
