//! Link impairment for fault tests: delay, jitter (and with it reordering), loss and duplication
//! between two namespaces, without netem (this kernel has none).
//!
//! # Design
//!
//! ```text
//!   ns A                    ns M (router)                         ns B
//!  [a] 10.210.1.1/24 ──veth── 10.210.1.254 [ma]   [mb] 10.210.2.254 ──veth── 10.210.2.1/24 [b]
//!                      FORWARD: statistic DROP (loss) → NFQUEUE (paqet-impair relay)
//! ```
//!
//! M routes between A and B (`ip_forward=1`; A and B have a default route via M). In M's FORWARD
//! chain, `-m statistic --mode random --probability p -j DROP` drops `loss_pct` % of the packets of
//! each direction, and every surviving packet goes to an NFQUEUE. The relay ([`run_relay`]) binds that
//! queue over raw netlink and issues each packet's ACCEPT verdict `delay ± jitter` ms after it arrived;
//! verdicts are issued in due-time order, not arrival order, so jitter larger than the packet spacing
//! reorders packets (without jitter and duplication packets fall due in the kernel's id order, and one
//! batch verdict per wake-up accepts all that are due). Duplication: NFQUEUE cannot reinject a packet,
//! so the relay sends a copy of a `dup_pct` % share of IPv4 packets through a raw
//! `IPPROTO_RAW` socket in M at its own due time; the kernel routes it out towards its destination
//! (the copy traverses M's OUTPUT path, not FORWARD, so it is not queued again and its TTL is not
//! decremented). The queue is not fail-open: if the relay dies, forwarded traffic stops (a loud
//! failure rather than a silently unimpaired link).
//!
//! The relay runs on a thread of the calling process that entered M ([`ImpairedLink::new`], stopped and
//! joined on drop), or as the `paqet-impair` binary of this crate spawned inside M
//! ([`ImpairedLink::with_relay_bin`], killed on drop). Both run the same [`run_relay`] with the same settings.
//!
//! [`ImpairedLink::set_spec`] changes the impairment while traffic flows (M's rules are replaced and the relay
//! restarted); [`ImpairedLink::with_prefix`] names the namespaces for the benchmarks (`pqb…`, which the test
//! script's cleanup of stale `pq<digits>…` namespaces leaves alone).
//!
//! Delay applies per direction, so a round trip takes at least `2 × delay_ms`. The iptables loss is
//! drawn from the kernel's PRNG; `seed` drives the relay's jitter and duplication draws. All names
//! include the process id; veth TX checksum offload is off on every end.
use std::cell::Cell;
use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thiserror::Error;

use crate::netns::{Netns, VethPair};

/// Errors of the impaired link and of the relay.
#[derive(Debug, Error)]
pub enum ImpairError {
    #[error("invalid link spec: {0}")]
    Spec(String),
    #[error("setting up the impaired link failed at {step}: {source}")]
    Setup {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("relay binary {path} cannot be started: {source}")]
    RelaySpawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("relay thread: {0}")]
    RelayThread(String),
    #[error("relay did not report ready: {0}")]
    RelayNotReady(String),
    #[error("nfqueue {op} failed: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn setup(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImpairError {
    let step = step.into();
    move |source| ImpairError::Setup { step, source }
}

/// What the link does to each packet (per direction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    /// Base one-way delay in milliseconds.
    pub delay_ms: u32,
    /// Uniform jitter: each packet is held `delay_ms ± jitter_ms` (never below 0).
    pub jitter_ms: u32,
    /// Share of packets dropped, in percent (0..=100).
    pub loss_pct: f64,
    /// Share of IPv4 packets delivered twice, in percent (0..=100).
    pub dup_pct: f64,
    /// Seed of the relay's jitter and duplication draws.
    pub seed: u64,
}

impl LinkSpec {
    fn validate(&self) -> Result<(), ImpairError> {
        for (name, v) in [("loss_pct", self.loss_pct), ("dup_pct", self.dup_pct)] {
            if !(0.0..=100.0).contains(&v) {
                return Err(ImpairError::Spec(format!(
                    "{name} = {v} is outside 0..=100"
                )));
            }
        }
        Ok(())
    }
}

/// NFQUEUE number used in M (queues are per network namespace).
const QUEUE_NUM: u16 = 7;

/// Kernel queue length of the relay (the `paqet-impair` default).
const QUEUE_MAX_LEN: u32 = 65536;

/// How long building the link waits for the relay thread to bind its queue.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long dropping the link waits for the relay thread to notice its stop flag (it checks every 200 ms).
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The relay of a running link.
enum RelayRunner {
    /// [`run_relay`] on a thread inside M; set `stop` and join it to end it.
    Thread {
        stop: Arc<AtomicBool>,
        handle: JoinHandle<std::io::Result<Result<(), ImpairError>>>,
    },
    /// A `paqet-impair` process inside M (`ip netns exec` execs in place: the pid is the relay's).
    Process(Child),
}

/// Three namespaces A — M — B with an impaired, routed path between A and B (see the module docs).
/// Dropping it stops the relay and deletes the veths and namespaces.
pub struct ImpairedLink {
    relay: Option<RelayRunner>,
    /// The `paqet-impair` binary the relay runs as (`None`: a thread of this process).
    relay_bin: Option<PathBuf>,
    /// What the link does now ([`ImpairedLink::set_spec`] changes it).
    spec: LinkSpec,
    // Field order = drop order: the veths go before their namespaces.
    _am: VethPair,
    _mb: VethPair,
    /// Endpoint namespace A.
    pub a: Netns,
    /// The middle (router) namespace.
    pub m: Netns,
    /// Endpoint namespace B.
    pub b: Netns,
    /// A's interface (towards M) and address.
    pub a_if: String,
    pub a_ip: Ipv4Addr,
    /// B's interface (towards M) and address.
    pub b_if: String,
    pub b_ip: Ipv4Addr,
    /// M's addresses on the A side and on the B side (A's and B's gateways).
    pub m_a_ip: Ipv4Addr,
    pub m_b_ip: Ipv4Addr,
    /// M's interfaces on the A side and on the B side.
    pub m_a_if: String,
    pub m_b_if: String,
}

impl ImpairedLink {
    /// Builds the link with the relay on a thread of this process inside M (no binary needed). `tag`
    /// (≤ 6 bytes) keeps namespaces and interfaces of parallel links apart.
    pub fn new(tag: &str, spec: LinkSpec) -> Result<Self, ImpairError> {
        Self::build("pq", tag, spec, None)
    }

    /// Like [`ImpairedLink::new`] or [`ImpairedLink::with_relay_bin`] (`relay_bin` given) with namespaces
    /// named `<prefix><pid><tag>A|M|B` (see [`Netns::with_prefix`]; the benchmarks use `pqb`).
    pub fn with_prefix(
        prefix: &str,
        tag: &str,
        spec: LinkSpec,
        relay_bin: Option<&Path>,
    ) -> Result<Self, ImpairError> {
        Self::build(prefix, tag, spec, relay_bin)
    }

    /// Builds the link with the relay running as the `paqet-impair` binary at `relay_bin`, spawned inside M.
    pub fn with_relay_bin(
        tag: &str,
        spec: LinkSpec,
        relay_bin: &Path,
    ) -> Result<Self, ImpairError> {
        Self::build("pq", tag, spec, Some(relay_bin))
    }

    fn build(
        prefix: &str,
        tag: &str,
        spec: LinkSpec,
        relay_bin: Option<&Path>,
    ) -> Result<Self, ImpairError> {
        spec.validate()?;
        let pid = std::process::id();
        let ifname = |end: &str| format!("{tag}{pid}{end}");
        if ifname("am").len() > 15 {
            return Err(ImpairError::Spec(format!(
                "tag {tag:?} too long for 15-byte interface names"
            )));
        }
        let a =
            Netns::with_prefix(prefix, &format!("{tag}A")).map_err(setup("create namespace A"))?;
        let m =
            Netns::with_prefix(prefix, &format!("{tag}M")).map_err(setup("create namespace M"))?;
        let b =
            Netns::with_prefix(prefix, &format!("{tag}B")).map_err(setup("create namespace B"))?;
        let (a_if, ma_if, mb_if, b_if) = (ifname("a"), ifname("ma"), ifname("mb"), ifname("b"));
        let am = VethPair::new(&a_if, &ma_if, &a, &m).map_err(setup("veth A—M"))?;
        let mb = VethPair::new(&mb_if, &b_if, &m, &b).map_err(setup("veth M—B"))?;
        let (a_ip, m_a_ip) = (Ipv4Addr::new(10, 210, 1, 1), Ipv4Addr::new(10, 210, 1, 254));
        let (b_ip, m_b_ip) = (Ipv4Addr::new(10, 210, 2, 1), Ipv4Addr::new(10, 210, 2, 254));
        am.configure(&a, &m, &format!("{a_ip}/24"), &format!("{m_a_ip}/24"), true)
            .map_err(setup("addresses A—M"))?;
        mb.configure(&m, &b, &format!("{m_b_ip}/24"), &format!("{b_ip}/24"), true)
            .map_err(setup("addresses M—B"))?;
        a.exec(&["ip", "route", "add", "default", "via", &m_a_ip.to_string()])
            .map_err(setup("default route in A"))?;
        b.exec(&["ip", "route", "add", "default", "via", &m_b_ip.to_string()])
            .map_err(setup("default route in B"))?;
        m.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .map_err(setup("ip_forward in M"))?;
        let mut link = ImpairedLink {
            relay: None,
            relay_bin: relay_bin.map(Path::to_path_buf),
            spec,
            _am: am,
            _mb: mb,
            a,
            m,
            b,
            a_if,
            a_ip,
            b_if,
            b_ip,
            m_a_ip,
            m_b_ip,
            m_a_if: ma_if,
            m_b_if: mb_if,
        };
        link.apply(spec)?;
        tracing::info!(
            ns_a = link.a.name(),
            ns_m = link.m.name(),
            ns_b = link.b.name(),
            ?spec,
            "impaired link up"
        );
        Ok(link)
    }

    /// What the link does now.
    pub fn spec(&self) -> LinkSpec {
        self.spec
    }

    /// Changes what the link does while it carries traffic: M's FORWARD rules are replaced and the relay
    /// restarted with the new settings (packets it held are dropped: a short burst of loss).
    pub fn set_spec(&mut self, spec: LinkSpec) -> Result<(), ImpairError> {
        spec.validate()?;
        self.m
            .exec(&["iptables", "-w", "-F", "FORWARD"])
            .map_err(setup("flush M's FORWARD chain"))?;
        self.stop_relay();
        self.apply(spec)?;
        tracing::info!(ns_m = self.m.name(), ?spec, "impaired link changed");
        Ok(())
    }

    /// Adds M's loss rule and starts the relay (with its NFQUEUE rule) for `spec`; the chain must be empty
    /// and no relay running.
    fn apply(&mut self, spec: LinkSpec) -> Result<(), ImpairError> {
        self.spec = spec;
        if spec.loss_pct > 0.0 {
            let p = format!("{:.6}", spec.loss_pct / 100.0);
            self.m
                .exec(&[
                    "iptables",
                    "-w",
                    "-A",
                    "FORWARD",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ])
                .map_err(setup("iptables statistic loss rule in M"))?;
        }
        let needs_relay = spec.delay_ms > 0 || spec.jitter_ms > 0 || spec.dup_pct > 0.0;
        if needs_relay {
            match self.relay_bin.clone() {
                Some(bin) => self.start_relay_process(spec, &bin)?,
                None => self.start_relay_thread(spec)?,
            }
            let q = QUEUE_NUM.to_string();
            self.m
                .exec(&[
                    "iptables",
                    "-w",
                    "-A",
                    "FORWARD",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &q,
                ])
                .map_err(setup("iptables NFQUEUE rule in M"))?;
        }
        Ok(())
    }

    /// Runs [`run_relay`] on a thread inside M and waits until it has bound the queue.
    fn start_relay_thread(&mut self, spec: LinkSpec) -> Result<(), ImpairError> {
        let cfg = RelayConfig {
            queue: QUEUE_NUM,
            delay_ms: spec.delay_ms,
            jitter_ms: spec.jitter_ms,
            dup_pct: spec.dup_pct,
            seed: spec.seed,
            max_len: QUEUE_MAX_LEN,
            stats_every: None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (tx, rx) = mpsc::channel();
        let handle = self.m.spawn(move || {
            let bound = Cell::new(false);
            let r = run_relay(
                cfg,
                || {
                    bound.set(true);
                    let _ = tx.send(());
                },
                &flag,
            );
            if let Err(e) = &r {
                if bound.get() {
                    // Forwarded traffic stops with the relay (the queue is not fail-open): say why now.
                    eprintln!("impaired link: relay stopped: {e}");
                }
            }
            r
        });
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(()) => {
                self.relay = Some(RelayRunner::Thread { stop, handle });
                Ok(())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Drop sets the flag and waits (bounded) for the thread.
                self.relay = Some(RelayRunner::Thread { stop, handle });
                Err(ImpairError::RelayNotReady(format!(
                    "the queue was not bound within {READY_TIMEOUT:?}"
                )))
            }
            // The thread ended before binding the queue: its result says why.
            Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
                Ok(Ok(Err(e))) => Err(e),
                Ok(Err(e)) => Err(ImpairError::Setup {
                    step: "enter namespace M for the relay thread".into(),
                    source: e,
                }),
                Ok(Ok(Ok(()))) => Err(ImpairError::RelayNotReady(
                    "the relay returned before binding the queue".into(),
                )),
                Err(_) => Err(ImpairError::RelayThread("panicked".into())),
            },
        }
    }

    /// Spawns the `paqet-impair` binary inside M and waits for its `ready` line.
    fn start_relay_process(&mut self, spec: LinkSpec, bin: &Path) -> Result<(), ImpairError> {
        let mut cmd = self.m.command(&bin.to_string_lossy());
        cmd.args([
            "--queue".to_string(),
            QUEUE_NUM.to_string(),
            "--delay-ms".into(),
            spec.delay_ms.to_string(),
            "--jitter-ms".into(),
            spec.jitter_ms.to_string(),
            "--dup-pct".into(),
            spec.dup_pct.to_string(),
            "--seed".into(),
            spec.seed.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|source| ImpairError::RelaySpawn {
            path: bin.to_owned(),
            source,
        })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        self.relay = Some(RelayRunner::Process(child));
        match read {
            Ok(_) if line.trim() == "ready" => Ok(()),
            Ok(_) => Err(ImpairError::RelayNotReady(format!(
                "first output line was {:?}",
                line.trim()
            ))),
            Err(e) => Err(ImpairError::RelayNotReady(e.to_string())),
        }
    }
}

impl Drop for ImpairedLink {
    fn drop(&mut self) {
        self.stop_relay();
    }
}

impl ImpairedLink {
    /// Stops the relay, if one runs.
    fn stop_relay(&mut self) {
        match self.relay.take() {
            None => {}
            Some(RelayRunner::Process(mut c)) => {
                // `ip netns exec` execs the relay in place, so this pid is the relay itself.
                let _ = c.kill();
                let _ = c.wait();
            }
            Some(RelayRunner::Thread { stop, handle }) => {
                stop.store(true, Ordering::Relaxed);
                let deadline = Instant::now() + STOP_TIMEOUT;
                while !handle.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if !handle.is_finished() {
                    eprintln!(
                        "impaired link: the relay thread did not stop within {STOP_TIMEOUT:?}; left detached"
                    );
                    return;
                }
                // A relay error after binding was already reported by the thread.
                if handle.join().is_err() {
                    eprintln!("impaired link: the relay thread panicked");
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// The relay: NFQUEUE over raw netlink
// ------------------------------------------------------------------------------------------------------------

/// Relay settings (the `paqet-impair` command line).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayConfig {
    pub queue: u16,
    pub delay_ms: u32,
    pub jitter_ms: u32,
    pub dup_pct: f64,
    pub seed: u64,
    /// Kernel queue length (packets held at once).
    pub max_len: u32,
    /// Print a `stats …` line on stdout this often (packets held, verdicts issued, how late they were);
    /// `None` = never.
    pub stats_every: Option<Duration>,
}

const NETLINK_NETFILTER: i32 = 12;
const SOL_NETLINK: i32 = 270;
const NETLINK_NO_ENOBUFS: i32 = 5;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDR: usize = 16;
const NFGEN_HDR: usize = 4;

fn nl_err(op: &'static str) -> impl FnOnce(std::io::Error) -> ImpairError {
    move |source| ImpairError::Netlink { op, source }
}

/// Appends one netfilter netlink message (`nlmsghdr | nfgenmsg | attrs`) to `out`.
fn push_msg(
    out: &mut Vec<u8>,
    msg_type: u16,
    flags: u16,
    seq: u32,
    queue: u16,
    attrs: &[(u16, &[u8])],
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]); // length, patched below
    out.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg_type).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    out.extend_from_slice(&queue.to_be_bytes());
    for (ty, val) in attrs {
        out.extend_from_slice(&((4 + val.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(val);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// What a due heap entry does.
enum Action {
    Accept(u32),
    SendCopy(Vec<u8>),
}

struct Due {
    at: Instant,
    order: u64,
    action: Action,
}

impl PartialEq for Due {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.order == o.order
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest entry must come first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.order).cmp(&(self.at, self.order))
    }
}

/// The id and (if copied) the IP packet of one queued-packet message; `None` for other messages.
fn parse_packet(msg: &[u8]) -> Option<(u32, &[u8])> {
    let ty = u16::from_ne_bytes([*msg.get(4)?, *msg.get(5)?]);
    if ty != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
        return None;
    }
    let mut attrs = msg.get(NLMSG_HDR + NFGEN_HDR..)?;
    let (mut id, mut payload) = (None, &[][..]);
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let aty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let val = &attrs[4..len];
        match aty {
            NFQA_PACKET_HDR if val.len() >= 4 => {
                id = Some(u32::from_be_bytes([val[0], val[1], val[2], val[3]]))
            }
            NFQA_PAYLOAD => payload = val,
            _ => {}
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    id.map(|id| (id, payload))
}

/// Lateness of the verdicts issued since the last `stats` line.
#[derive(Default)]
struct Lateness {
    n: u64,
    sum_us: u64,
    max_us: u64,
}

/// The relay's state: netlink socket, raw socket for copies, the heap of due actions.
struct Relay {
    cfg: RelayConfig,
    /// Packets become due in the order the kernel numbered them (no jitter, no copies): one batch verdict
    /// ("accept every id up to N") per flush instead of one message per packet.
    in_order: bool,
    late: Lateness,
    nl: OwnedFd,
    raw: Option<OwnedFd>,
    rng: SmallRng,
    heap: BinaryHeap<Due>,
    order: u64,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Relay {
    fn open(cfg: RelayConfig) -> Result<Self, ImpairError> {
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        })
        .map_err(nl_err("socket(AF_NETLINK, NETLINK_NETFILTER)"))?;
        // SAFETY: fresh descriptor.
        let nl = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_nl is valid (pid 0 = kernel assigns).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid fd and address of the right size.
        cvt(unsafe {
            libc::bind(
                fd,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        })
        .map_err(nl_err("bind"))?;
        let setopt = |level, name, val: libc::c_int| {
            // SAFETY: valid fd, pointer to a c_int of the given size.
            cvt(unsafe {
                libc::setsockopt(fd, level, name, &val as *const _ as *const libc::c_void, 4)
            })
        };
        setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20)
            .or_else(|_| setopt(libc::SOL_SOCKET, libc::SO_RCVBUF, 16 << 20))
            .map_err(nl_err("setsockopt(SO_RCVBUF)"))?;
        setopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            .map_err(nl_err("setsockopt(NETLINK_NO_ENOBUFS)"))?;
        let raw = if cfg.dup_pct > 0.0 {
            // SAFETY: plain socket(2); IPPROTO_RAW implies IP_HDRINCL.
            let r = cvt(unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_RAW,
                )
            })
            .map_err(nl_err(
                "socket(AF_INET, SOCK_RAW, IPPROTO_RAW) for duplicates",
            ))?;
            // SAFETY: fresh descriptor.
            Some(unsafe { OwnedFd::from_raw_fd(r) })
        } else {
            None
        };
        let mut relay = Relay {
            cfg,
            in_order: cfg.jitter_ms == 0 && cfg.dup_pct == 0.0,
            late: Lateness::default(),
            nl,
            raw,
            rng: SmallRng::seed_from_u64(cfg.seed),
            heap: BinaryHeap::new(),
            order: 0,
            rx: vec![0u8; 1 << 17],
            tx: Vec::with_capacity(64 * 1024),
        };
        relay.configure()?;
        Ok(relay)
    }

    /// Sends one config request and waits for its ACK.
    fn request(
        &mut self,
        what: &'static str,
        seq: u32,
        attrs: &[(u16, &[u8])],
    ) -> Result<(), ImpairError> {
        let mut msg = Vec::new();
        push_msg(
            &mut msg,
            NFQNL_MSG_CONFIG,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            self.cfg.queue,
            attrs,
        );
        self.send(&msg).map_err(nl_err(what))?;
        loop {
            // SAFETY: valid fd and buffer.
            let n = cvt(unsafe {
                libc::recv(
                    self.nl.as_raw_fd(),
                    self.rx.as_mut_ptr().cast(),
                    self.rx.len(),
                    0,
                )
            } as i32)
            .map_err(nl_err(what))? as usize;
            let buf = &self.rx[..n];
            if n >= NLMSG_HDR + 4 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
                let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                if errno == 0 {
                    return Ok(());
                }
                return Err(ImpairError::Netlink {
                    op: what,
                    source: std::io::Error::from_raw_os_error(-errno),
                });
            }
        }
    }

    fn configure(&mut self) -> Result<(), ImpairError> {
        let mut cmd = [0u8; 4];
        cmd[0] = NFQNL_CFG_CMD_BIND;
        cmd[2..4].copy_from_slice(&(libc::AF_INET as u16).to_be_bytes());
        self.request(
            "bind queue (is another process bound to it?)",
            1,
            &[(NFQA_CFG_CMD, &cmd)],
        )?;
        let (mode, range) = if self.raw.is_some() {
            (NFQNL_COPY_PACKET, 0xffffu32)
        } else {
            (NFQNL_COPY_META, 0)
        };
        let mut params = [0u8; 5];
        params[..4].copy_from_slice(&range.to_be_bytes());
        params[4] = mode;
        self.request("set copy mode", 2, &[(NFQA_CFG_PARAMS, &params)])?;
        self.request(
            "set queue length",
            3,
            &[(NFQA_CFG_QUEUE_MAXLEN, &self.cfg.max_len.to_be_bytes())],
        )?;
        Ok(())
    }

    fn send(&self, buf: &[u8]) -> std::io::Result<()> {
        // SAFETY: zeroed sockaddr_nl = the kernel (pid 0).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid fd, buffer and address.
        cvt(unsafe {
            libc::sendto(
                self.nl.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        } as i32)
        .map(|_| ())
    }

    fn hold_for(&mut self) -> Duration {
        let base = i64::from(self.cfg.delay_ms) * 1000;
        let j = i64::from(self.cfg.jitter_ms) * 1000;
        let us = if j > 0 {
            base + self.rng.gen_range(-j..=j)
        } else {
            base
        };
        Duration::from_micros(us.max(0) as u64)
    }

    fn schedule(&mut self, at: Instant, action: Action) {
        self.order += 1;
        self.heap.push(Due {
            at,
            order: self.order,
            action,
        });
    }

    /// Reads every queued-packet message available now and schedules it.
    fn drain(&mut self) -> Result<(), ImpairError> {
        loop {
            // SAFETY: valid fd and buffer.
            let n = unsafe {
                libc::recv(
                    self.nl.as_raw_fd(),
                    self.rx.as_mut_ptr().cast(),
                    self.rx.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok(()),
                    std::io::ErrorKind::Interrupted => continue,
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                    _ => Err(ImpairError::Netlink {
                        op: "recv",
                        source: e,
                    }),
                };
            }
            let now = Instant::now();
            let mut off = 0usize;
            let n = n as usize;
            while off + NLMSG_HDR <= n {
                let len = u32::from_ne_bytes(self.rx[off..off + 4].try_into().unwrap()) as usize;
                if len < NLMSG_HDR || off + len > n {
                    break;
                }
                if let Some((id, pkt)) = parse_packet(&self.rx[off..off + len]) {
                    let copy = (self.raw.is_some()
                        && self.rng.gen_bool(self.cfg.dup_pct / 100.0)
                        && pkt.len() >= 20
                        && pkt[0] >> 4 == 4)
                        .then(|| pkt.to_vec());
                    let hold = self.hold_for();
                    self.schedule(now + hold, Action::Accept(id));
                    if let Some(c) = copy {
                        let hold = self.hold_for();
                        self.schedule(now + hold, Action::SendCopy(c));
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// Issues every verdict and copy that is due, verdicts batched into one send (one batch verdict when
    /// packets are due in id order).
    fn flush_due(&mut self) -> Result<(), ImpairError> {
        let now = Instant::now();
        self.tx.clear();
        let mut last_id = None;
        while self.heap.peek().is_some_and(|d| d.at <= now) {
            let d = self.heap.pop().expect("peeked");
            let late = now.saturating_duration_since(d.at).as_micros() as u64;
            self.late.n += 1;
            self.late.sum_us += late;
            self.late.max_us = self.late.max_us.max(late);
            match d.action {
                Action::Accept(id) if self.in_order => last_id = Some(id),
                Action::Accept(id) => {
                    let mut v = [0u8; 8];
                    v[..4].copy_from_slice(&NF_ACCEPT.to_be_bytes());
                    v[4..].copy_from_slice(&id.to_be_bytes());
                    push_msg(
                        &mut self.tx,
                        NFQNL_MSG_VERDICT,
                        NLM_F_REQUEST,
                        0,
                        self.cfg.queue,
                        &[(NFQA_VERDICT_HDR, &v)],
                    );
                    if self.tx.len() > 60 * 1024 {
                        self.send(&self.tx).map_err(nl_err("send verdicts"))?;
                        self.tx.clear();
                    }
                }
                Action::SendCopy(pkt) => self.send_copy(&pkt),
            }
        }
        if let Some(id) = last_id {
            let mut v = [0u8; 8];
            v[..4].copy_from_slice(&NF_ACCEPT.to_be_bytes());
            v[4..].copy_from_slice(&id.to_be_bytes());
            push_msg(
                &mut self.tx,
                NFQNL_MSG_VERDICT_BATCH,
                NLM_F_REQUEST,
                0,
                self.cfg.queue,
                &[(NFQA_VERDICT_HDR, &v)],
            );
        }
        if !self.tx.is_empty() {
            self.send(&self.tx).map_err(nl_err("send verdicts"))?;
        }
        Ok(())
    }

    fn send_copy(&self, pkt: &[u8]) {
        let Some(raw) = &self.raw else { return };
        // SAFETY: zeroed sockaddr_in is valid; fields set below.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_addr.s_addr = u32::from_ne_bytes([pkt[16], pkt[17], pkt[18], pkt[19]]);
        // SAFETY: valid fd, buffer and address.
        let r = unsafe {
            libc::sendto(
                raw.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if r < 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "duplicate not sent");
        }
    }

    /// Prints `stats held=H verdicts=N late_mean_us=M late_max_us=X` (lateness: how long after its due time
    /// each action of the interval was issued) and starts a new interval.
    fn print_stats(&mut self) {
        use std::io::Write;
        let l = std::mem::take(&mut self.late);
        let mean = l.sum_us.checked_div(l.n).unwrap_or(0);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "stats held={} verdicts={} late_mean_us={mean} late_max_us={}",
            self.heap.len(),
            l.n,
            l.max_us
        );
        let _ = out.flush();
    }

    fn run(&mut self, stop: &std::sync::atomic::AtomicBool) -> Result<(), ImpairError> {
        let mut next_stats = self.cfg.stats_every.map(|d| Instant::now() + d);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut wait = self
                .heap
                .peek()
                .map(|d| d.at.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(200))
                .min(Duration::from_millis(200));
            if let (Some(at), Some(every)) = (next_stats, self.cfg.stats_every) {
                let now = Instant::now();
                if now >= at {
                    self.print_stats();
                    next_stats = Some(now.checked_sub(every).map_or(at, |t| at.max(t)) + every);
                }
                wait = wait.min(next_stats.expect("set").saturating_duration_since(now));
            }
            let ts = libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            };
            let mut pfd = libc::pollfd {
                fd: self.nl.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, valid timespec, no signal mask.
            let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(ImpairError::Netlink {
                        op: "ppoll",
                        source: e,
                    });
                }
            }
            if r > 0 {
                self.drain()?;
            }
            self.flush_due()?;
        }
        Ok(())
    }
}

/// Binds NFQUEUE `cfg.queue` in the current network namespace, calls `ready` once bound, then
/// delays/reorders/duplicates packets until `stop` is set (checked at least every 200 ms).
pub fn run_relay(
    cfg: RelayConfig,
    ready: impl FnOnce(),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), ImpairError> {
    if !(0.0..=100.0).contains(&cfg.dup_pct) {
        return Err(ImpairError::Spec(format!(
            "dup_pct = {} is outside 0..=100",
            cfg.dup_pct
        )));
    }
    let mut relay = Relay::open(cfg)?;
    ready();
    relay.run(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_message_layout() {
        let mut out = Vec::new();
        let v = [0, 0, 0, 1, 0, 0, 0, 42];
        push_msg(
            &mut out,
            NFQNL_MSG_VERDICT,
            NLM_F_REQUEST,
            0,
            7,
            &[(NFQA_VERDICT_HDR, &v)],
        );
        assert_eq!(out.len(), 32);
        assert_eq!(u32::from_ne_bytes(out[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes([out[4], out[5]]), 0x0301);
        assert_eq!(&out[18..20], &[0, 7], "queue number big-endian in res_id");
        assert_eq!(
            u16::from_ne_bytes([out[20], out[21]]),
            12,
            "attribute length"
        );
        assert_eq!(&out[24..32], &v);
    }

    #[test]
    fn batch_verdict_message_type() {
        let mut out = Vec::new();
        push_msg(
            &mut out,
            NFQNL_MSG_VERDICT_BATCH,
            NLM_F_REQUEST,
            0,
            7,
            &[(NFQA_VERDICT_HDR, &[0, 0, 0, 1, 0, 0, 0, 9])],
        );
        assert_eq!(u16::from_ne_bytes([out[4], out[5]]), 0x0303);
    }

    #[test]
    fn packet_message_parses_and_garbage_does_not() {
        let mut msg = Vec::new();
        let hdr = [0, 0, 1, 0, 0x08, 0x00, 2];
        let payload = [0x45u8, 0, 0, 20];
        push_msg(
            &mut msg,
            NFQNL_MSG_PACKET,
            0,
            0,
            7,
            &[(NFQA_PACKET_HDR, &hdr), (NFQA_PAYLOAD, &payload)],
        );
        assert_eq!(parse_packet(&msg), Some((256, &payload[..])));
        let mut bad = msg.clone();
        bad[20] = 0xff; // attribute length past the end
        assert_eq!(parse_packet(&bad), None);
        msg[4] = 1; // verdict type, not a packet
        assert_eq!(parse_packet(&msg), None);
    }

    #[test]
    fn heap_pops_earliest_first() {
        let t = Instant::now();
        let mut h = BinaryHeap::new();
        for (i, ms) in [30u64, 10, 20].iter().enumerate() {
            h.push(Due {
                at: t + Duration::from_millis(*ms),
                order: i as u64,
                action: Action::Accept(i as u32),
            });
        }
        let ids: Vec<u32> = std::iter::from_fn(|| h.pop())
            .map(|d| match d.action {
                Action::Accept(id) => id,
                Action::SendCopy(_) => u32::MAX,
            })
            .collect();
        assert_eq!(ids, [1, 2, 0]);
    }

    #[test]
    fn spec_rejects_bad_percentages() {
        let s = LinkSpec {
            delay_ms: 0,
            jitter_ms: 0,
            loss_pct: 101.0,
            dup_pct: 0.0,
            seed: 0,
        };
        assert!(matches!(s.validate(), Err(ImpairError::Spec(m)) if m.contains("loss_pct")));
    }
}
