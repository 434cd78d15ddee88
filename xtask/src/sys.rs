//! Small Linux helpers for the benches: network namespaces and veth pairs (those of `paqet-testkit`, named
//! `pqb<pid>…`) with bench extras (CPU pinning, closures run inside a namespace, MAC addresses), `/proc`
//! readers (CPU ticks, VmRSS), RLIMIT_NOFILE, and a daemon child that is stopped (SIGTERM, then SIGKILL)
//! when dropped.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
pub use paqet_testkit::netns::{is_root, Netns, VethPair};

/// A bench namespace `pqb<pid><tag>` with loopback up (deleted on drop).
pub fn netns(tag: &str) -> Result<Netns> {
    Netns::with_prefix("pqb", tag)
        .with_context(|| format!("creating network namespace for {tag:?}"))
}

/// What the benches add to [`Netns`].
pub trait NetnsExt {
    /// `program` inside this namespace, restricted to CPU `cpu` (through `taskset`) when given.
    fn command_on(&self, cpu: Option<usize>, program: &str) -> Command;
    /// Runs `f` on a new thread inside the namespace and waits for its result.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T>;
}

impl NetnsExt for Netns {
    fn command_on(&self, cpu: Option<usize>, program: &str) -> Command {
        match cpu {
            Some(c) => {
                let mut cmd = self.command("taskset");
                cmd.args(["-c", &c.to_string(), program]);
                cmd
            }
            None => self.command(program),
        }
    }

    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        match self.spawn(f).join() {
            Ok(r) => r.with_context(|| format!("entering netns {}", self.name()))?,
            Err(_) => bail!("thread inside netns {} panicked", self.name()),
        }
    }
}

/// A veth pair `a` (in `ns_a`) — `b` (in `ns_b`) with the given MACs and addresses, up; deleted on drop.
#[allow(clippy::too_many_arguments)]
pub fn veth(
    a: &str,
    b: &str,
    ns_a: &Netns,
    ns_b: &Netns,
    mac_a: &str,
    mac_b: &str,
    cidr_a: &str,
    cidr_b: &str,
) -> Result<VethPair> {
    let v = VethPair::new(a, b, ns_a, ns_b).with_context(|| format!("veth {a}—{b}"))?;
    for (ns, dev, mac) in [(ns_a, a, mac_a), (ns_b, b, mac_b)] {
        ns.exec(&["ip", "link", "set", dev, "address", mac])?;
    }
    v.configure(ns_a, ns_b, cidr_a, cidr_b, false)
        .with_context(|| format!("addresses of veth {a}—{b}"))?;
    Ok(v)
}

/// Raises RLIMIT_NOFILE (soft and hard) to at least `want` (root may raise the hard limit); children inherit it.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    let target = want.max(r.rlim_cur);
    let n = libc::rlimit {
        rlim_cur: target as libc::rlim_t,
        rlim_max: (target as libc::rlim_t).max(r.rlim_max),
    };
    // SAFETY: valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &n) } == 0 {
        return Ok(target);
    }
    // Without CAP_SYS_RESOURCE (containers) the hard limit is a ceiling: go as high as it allows.
    let n = libc::rlimit {
        rlim_cur: r.rlim_max,
        rlim_max: r.rlim_max,
    };
    // SAFETY: valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &n) } != 0 {
        bail!(
            "setrlimit(RLIMIT_NOFILE, {}): {}",
            r.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok(r.rlim_max)
}

/// Clock ticks per second of `/proc/*/stat` times.
pub fn clk_tck() -> f64 {
    // SAFETY: no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime in seconds of a process (`/proc/PID/stat`) or a thread (`/proc/PID/task/TID/stat`).
pub fn cpu_secs(stat_path: &str) -> Result<f64> {
    let s = std::fs::read_to_string(stat_path).with_context(|| format!("reading {stat_path}"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{stat_path}: no ')'"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let ut: f64 = f
        .get(11)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{stat_path}: utime"))?;
    let st: f64 = f
        .get(12)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{stat_path}: stime"))?;
    Ok((ut + st) / clk_tck())
}

/// CPU seconds of process `pid`.
pub fn proc_cpu(pid: u32) -> Result<f64> {
    cpu_secs(&format!("/proc/{pid}/stat"))
}

/// CPU seconds of thread `tid` of this process.
pub fn thread_cpu(tid: i32) -> Result<f64> {
    cpu_secs(&format!("/proc/{}/task/{tid}/stat", std::process::id()))
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let p = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{p}: no VmRSS line"))
}

/// A `paqet-dp run` child, stopped when dropped.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Daemon {
    /// Starts `bin run -c CONFIG --mode MODE` inside `ns` (on CPU `cpu` only, through `taskset`, when
    /// given), logging to `dir/NAME.log`.
    pub fn spawn(
        ns: &Netns,
        bin: &str,
        dir: &std::path::Path,
        name: &str,
        config: &str,
        mode: &str,
        cpu: Option<usize>,
    ) -> Result<Self> {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, config).with_context(|| format!("writing {}", cfg.display()))?;
        // The daemon refuses a config that holds the key and others can read.
        std::fs::set_permissions(
            &cfg,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .with_context(|| format!("chmod 600 {}", cfg.display()))?;
        let log = dir.join(format!("{name}.log"));
        let logf =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = ns
            .command_on(cpu, bin)
            .args([
                "run",
                "-c",
                cfg.to_str().context("config path")?,
                "--mode",
                mode,
            ])
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("spawning {bin}"))?;
        Ok(Self {
            child,
            log,
            name: name.into(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Error (with the log tail) when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "{} exited ({st}); log tail:\n{}",
                self.name,
                self.log_tail(15)
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("paqet-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The CPUs this process may run on (its affinity mask), ascending.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most size_of::<cpu_set_t>() bytes.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}
