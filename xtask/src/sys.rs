//! Small Linux helpers for the tunnel bench: network namespaces and a veth pair (created and deleted with
//! `ip`), threads living inside a namespace, `/proc` readers (CPU ticks, VmRSS), RLIMIT_NOFILE, and a
//! daemon child that is stopped (SIGTERM, then SIGKILL) when dropped.
use std::ffi::CString;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// True when the effective uid is 0.
pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `program args…`; returns stdout or an error naming the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `pqb<pid><tag>` with loopback up, replacing a stale one of the same name.
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("pqb{}{}", std::process::id(), tag);
        let _ = run("ip", &["netns", "del", &name]);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace; returns stdout.
    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }

    /// A command running `program` inside the namespace (`ip netns exec` execs in place, so the child's
    /// pid is the program's pid).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `program` inside this namespace, restricted to CPU `cpu` (through `taskset`) when given.
    pub fn command_on(&self, cpu: Option<usize>, program: &str) -> Command {
        match cpu {
            Some(c) => {
                let mut cmd = self.command("taskset");
                cmd.args(["-c", &c.to_string(), program]);
                cmd
            }
            None => self.command(program),
        }
    }

    /// Runs `f` on a new thread that stays inside this namespace (threads it spawns inherit it).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path)?;
            f()
        })
    }

    /// Runs `f` inside the namespace and waits for its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match self.spawn(f).join() {
            Ok(r) => r,
            Err(_) => bail!("thread inside netns {} panicked", self.name),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: cannot delete netns {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread into the network namespace at `path` for the rest of its life.
fn enter(path: &str) -> Result<()> {
    let c = CString::new(path).context("netns path")?;
    // SAFETY: valid C string; the fd is closed below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("cannot open {path}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a namespace file; CLONE_NEWNET only affects this thread.
    let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if r < 0 {
        bail!("setns({path}): {err}");
    }
    Ok(())
}

/// A veth pair with one end in each namespace, deleted on drop.
pub struct Veth {
    pub a: String,
    pub b: String,
    ns_a: String,
}

impl Veth {
    /// Creates `a` in `ns_a` and `b` in `ns_b`, sets MACs and addresses, brings both up.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        a: &str,
        b: &str,
        ns_a: &Netns,
        ns_b: &Netns,
        mac_a: &str,
        mac_b: &str,
        cidr_a: &str,
        cidr_b: &str,
    ) -> Result<Self> {
        run(
            "ip",
            &[
                "link", "add", a, "netns", &ns_a.name, "type", "veth", "peer", "name", b, "netns",
                &ns_b.name,
            ],
        )?;
        let v = Self {
            a: a.into(),
            b: b.into(),
            ns_a: ns_a.name.clone(),
        };
        for (ns, dev, mac, cidr) in [(ns_a, a, mac_a, cidr_a), (ns_b, b, mac_b, cidr_b)] {
            ns.exec(&["ip", "link", "set", dev, "address", mac])?;
            ns.exec(&["ip", "addr", "add", cidr, "dev", dev])?;
            ns.exec(&["ip", "link", "set", dev, "up"])?;
        }
        Ok(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = run(
            "ip",
            &["netns", "exec", &self.ns_a, "ip", "link", "del", &self.a],
        );
    }
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
