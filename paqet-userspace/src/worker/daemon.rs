//! The daemon assembly: the one place where a validated [`Config`] becomes a running daemon, for every
//! data-path mode. pcap is the one-worker case of the code that runs N XDP workers:
//!
//! 1. resolve the configuration ([`worker_config`]) and start the ops HTTP servers ([`OpsServers`]);
//! 2. bring the data plane up: pcap (the host's iptables rules printed, and applied with
//!    `--manage-firewall`) gives one worker opening libpcap links; XDP ([`XdpPlane::bring_up`]: program
//!    attached disarmed, one AF_XDP socket per RX queue, guard cookies and client session ports, armed)
//!    gives one worker per RX queue. [`DataPlane::Auto`] falls back to pcap when XDP does not come up;
//! 3. start the workers through one code path (`run_worker`): a thread each (pinned per `io.cpus` in XDP
//!    mode) with a current-thread tokio runtime and `LocalSet`, its links, on a client its sessions and
//!    the front ends ([`crate::front::start`], `SO_REUSEPORT` when several workers listen), and its metrics
//!    publisher;
//! 4. the calling thread becomes the control thread: the plane's periodic work (XDP counters and log
//!    records, guard cookie rotation) and SIGINT/SIGTERM ([`Stop::with_signals`]);
//! 5. shutdown in one order: workers stop and are joined, the final counters are published, then the plane
//!    is torn down (XDP program detached, iptables rules removed), then the ops servers stop.
//!
//! A server's replay filter ([`crate::proto::replay`]) is one per daemon, shared by its workers: loaded
//! from `transport.kcp.replay_filter` at start ([`ReplayStore`]), saved by the control thread every
//! [`REPLAY_SAVE_INTERVAL`] when it changed and once more after the workers are joined.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::setup::{
    firewall_roles, pcap_factory, publish_metrics_until, worker_config, OpsServers,
};
use super::xdp::{XdpLinks, XdpPlane, XdpWant};
use super::{Tunnel, WorkerConfig};
use crate::config::{Config, CpuPin};
use crate::front::{self, Placement};
use crate::io::steer::{XdpAttach, COUNTERS};
use crate::ops::hub::{MetricsHub, PUBLISH_INTERVAL_MS};
use crate::ops::metrics::{DataPathMode, WorkerSnapshot};
use crate::proto::replay::{BloomParams, ReplayFilter, SharedReplayFilter};
use crate::proto::session::Role;
use crate::tools::firewall::{self, FirewallGuard};

/// Which data plane a daemon runs (`run --mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPlane {
    /// libpcap capture and AF_PACKET injection, one worker (upstream's data path).
    Pcap,
    /// The XDP program and AF_XDP sockets, one worker per RX queue, in the wanted attach mode.
    Xdp(XdpWant),
    /// XDP (native, else generic) when it comes up, else pcap.
    Auto,
}

impl DataPlane {
    /// The mode the daemon reports before its data plane is up (the metrics hub's initial mode).
    pub fn expected_mode(self) -> DataPathMode {
        match self {
            DataPlane::Pcap => DataPathMode::Pcap,
            DataPlane::Xdp(XdpWant::Generic) => DataPathMode::XdpGeneric,
            DataPlane::Xdp(_) | DataPlane::Auto => DataPathMode::XdpNative,
        }
    }
}

/// Stops a running [`run`] from another thread (or, with [`Stop::with_signals`], on SIGINT/SIGTERM as
/// well). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Stop {
    tx: Arc<watch::Sender<bool>>,
    signals: bool,
}

impl Stop {
    /// A stop handle that only [`Stop::stop`] triggers (tests running daemons in-process).
    pub fn new() -> Self {
        Stop {
            tx: Arc::new(watch::channel(false).0),
            signals: false,
        }
    }

    /// A stop handle that SIGINT and SIGTERM trigger too (what the binary uses).
    pub fn with_signals() -> Self {
        Stop {
            signals: true,
            ..Self::new()
        }
    }

    /// Asks the daemon to stop: the workers end, then the data plane is torn down.
    pub fn stop(&self) {
        self.tx.send_replace(true);
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

impl Default for Stop {
    fn default() -> Self {
        Self::new()
    }
}

/// What a daemon run needs besides the configuration and the data plane.
#[derive(Clone)]
pub struct DaemonOptions {
    /// The process-wide metrics hub: worker `i` publishes into slot `i`, the control thread sets the mode,
    /// the attached flag and the XDP counters; the ops servers read it.
    pub hub: Arc<MetricsHub>,
    /// pcap mode: apply the iptables rules the host needs at start and remove them on shutdown.
    pub manage_firewall: bool,
    /// Serve the client front ends the configuration lists (forwards, SOCKS5, HTTP proxy).
    pub front: bool,
    /// XDP mode: pin the workers per `io.cpus` (off for tests running several daemons in one process).
    pub pin: bool,
    /// When to stop.
    pub stop: Stop,
}

impl DaemonOptions {
    /// What the binary runs: front ends on, pinning on, stopping on SIGINT/SIGTERM, firewall left alone.
    pub fn new(hub: Arc<MetricsHub>) -> Self {
        DaemonOptions {
            hub,
            manage_firewall: false,
            front: true,
            pin: true,
            stop: Stop::with_signals(),
        }
    }

    /// Sets [`DaemonOptions::manage_firewall`].
    pub fn with_manage_firewall(mut self, on: bool) -> Self {
        self.manage_firewall = on;
        self
    }

    /// Sets [`DaemonOptions::pin`].
    pub fn with_pin(mut self, on: bool) -> Self {
        self.pin = on;
        self
    }

    /// Sets [`DaemonOptions::stop`].
    pub fn with_stop(mut self, stop: Stop) -> Self {
        self.stop = stop;
        self
    }
}

/// What a finished [`run`] reports.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The data path that ran.
    pub mode: DataPathMode,
    /// Number of workers (pcap: 1; XDP: the RX queues).
    pub workers: usize,
    /// XDP mode: the program's final counters, indexed by [`paqet_common::XdpCounter`].
    pub xdp: Option<[u64; COUNTERS]>,
    /// Each worker's last snapshot.
    pub snapshots: Vec<WorkerSnapshot>,
}

/// The data plane once up: what the control thread keeps while the workers run.
enum Plane {
    Pcap { firewall: Option<FirewallGuard> },
    Xdp(Box<XdpPlane>),
}

/// One worker's share of the data plane.
enum Links {
    /// Opens a libpcap link per session port (`network.pcap.sockbuf` bytes of buffer).
    Pcap { iface: String, sockbuf: usize },
    /// Its RX queue's AF_XDP socket and the cross-worker router.
    Xdp(Box<XdpLinks>),
}

impl Links {
    /// Whether this worker runs client sessions (and so serves front ends).
    fn runs_sessions(&self) -> bool {
        match self {
            Links::Pcap { .. } => true,
            Links::Xdp(x) => x.slots > 0,
        }
    }
}

impl Plane {
    fn mode(&self) -> DataPathMode {
        match self {
            Plane::Pcap { .. } => DataPathMode::Pcap,
            Plane::Xdp(x) => match x.attached() {
                XdpAttach::Native => DataPathMode::XdpNative,
                XdpAttach::Generic => DataPathMode::XdpGeneric,
            },
        }
    }

    /// The control thread's periodic work.
    fn tick(&mut self, hub: &MetricsHub) -> anyhow::Result<()> {
        match self {
            Plane::Pcap { .. } => Ok(()),
            Plane::Xdp(x) => x.tick(hub),
        }
    }

    /// Tears the plane down after the workers stopped; the XDP program's final counters.
    fn finish(self, hub: &MetricsHub) -> Option<[u64; COUNTERS]> {
        match self {
            Plane::Pcap { firewall } => {
                if let Some(mut g) = firewall {
                    if let Err(e) = g.remove() {
                        warn!(error = %e, "--manage-firewall: removing the iptables rules");
                    }
                }
                None
            }
            Plane::Xdp(mut x) => {
                let counters = x.counters();
                hub.set_xdp(counters);
                drop(x); // detaches the program, after every socket is closed
                Some(counters)
            }
        }
    }
}

/// pcap: prints (and with `manage_firewall` applies) the host's iptables rules; one worker.
fn pcap_plane(
    cfg: &Config,
    iface: &str,
    wcfg: &WorkerConfig,
    manage_firewall: bool,
) -> anyhow::Result<(Plane, Vec<Links>)> {
    let rules: Vec<_> = firewall_roles(wcfg)
        .iter()
        .flat_map(firewall::rules)
        .collect();
    for r in &rules {
        info!("host firewall rule needed: {r}");
    }
    let firewall = if manage_firewall {
        Some(firewall::apply(&rules).context("--manage-firewall: applying the iptables rules")?)
    } else {
        None
    };
    let links = Links::Pcap {
        iface: iface.to_owned(),
        sockbuf: cfg.network.pcap_sockbuf as usize,
    };
    Ok((Plane::Pcap { firewall }, vec![links]))
}

/// XDP: attach, sockets, arm; one worker per RX queue.
fn xdp_plane(
    iface: &str,
    want: XdpWant,
    wcfg: &mut WorkerConfig,
    manage_firewall: bool,
) -> anyhow::Result<(Plane, Vec<Links>)> {
    let (plane, links) = XdpPlane::bring_up(iface, want, wcfg)?;
    if manage_firewall {
        info!("XDP mode: tunnel packets never reach the kernel's stack, so no iptables rules are needed");
    }
    Ok((
        Plane::Xdp(Box::new(plane)),
        links.into_iter().map(|l| Links::Xdp(Box::new(l))).collect(),
    ))
}

/// Runs the daemon for `cfg` on `iface` with `plane` until `opts.stop` fires (with
/// [`Stop::with_signals`], also SIGINT/SIGTERM). Blocks the calling thread, which becomes the control
/// thread; see the module docs for the order of start and shutdown. Errors: the configuration does not
/// resolve, an ops server or the data plane cannot start (with the reason), or a worker fails to start
/// (e.g. a front end cannot bind); everything started is stopped in every case.
pub fn run(
    cfg: &Config,
    iface: &str,
    plane: DataPlane,
    opts: DaemonOptions,
) -> anyhow::Result<Outcome> {
    let DaemonOptions {
        hub,
        manage_firewall,
        front,
        pin,
        stop,
    } = opts;
    let mut wcfg = worker_config(cfg, iface)?;
    let mut ops = OpsServers::start(cfg, &hub)?;
    let (mut plane, links) = match plane {
        DataPlane::Pcap => pcap_plane(cfg, iface, &wcfg, manage_firewall)?,
        DataPlane::Xdp(want) => xdp_plane(iface, want, &mut wcfg, manage_firewall)?,
        // Native XDP, then generic XDP, then pcap: fall back only when the XDP data path never came up
        // (attach or AF_XDP socket failed); a failure after that is an error.
        DataPlane::Auto => match xdp_plane(iface, XdpWant::Auto, &mut wcfg, manage_firewall) {
            Ok(p) => p,
            Err(e) => {
                warn!("XDP data plane unavailable on {iface}: {e:#}; falling back to pcap");
                wcfg = worker_config(cfg, iface)?;
                pcap_plane(cfg, iface, &wcfg, manage_firewall)?
            }
        },
    };
    let mut replay = (wcfg.role == Role::Server).then(|| ReplayStore::open(cfg));
    if let Some(r) = &replay {
        let gate: Arc<dyn crate::proto::replay::ReplayGate> = r.filter.clone();
        wcfg.replay = Some(gate);
    }
    let mode = plane.mode();
    hub.set_mode(mode);
    let workers = links.len();
    let cpus = match (&plane, pin) {
        (Plane::Xdp(_), true) => worker_cpus(&cfg.io.cpus, &allowed_cpus())?,
        _ => Vec::new(),
    };
    if !cpus.is_empty() && workers > cpus.len() {
        warn!(
            workers,
            cpus = cpus.len(),
            "more RX queues than CPUs: workers share cores (consider ethtool -L or io.cpus)"
        );
    }
    let tag = match plane {
        Plane::Pcap { .. } => "pcap",
        Plane::Xdp(_) => "xdp",
    };

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, anyhow::Result<()>)>();
    let cfg_arc = Arc::new(cfg.clone());
    let mut handles = Vec::with_capacity(workers);
    let mut result = Ok(());
    for (index, links) in links.into_iter().enumerate() {
        let w = Worker {
            index,
            cpu: (!cpus.is_empty()).then(|| cpus[index % cpus.len()]),
            wcfg: super::reverse::for_worker(&wcfg, index),
            front: (front && links.runs_sessions()).then(|| Placement::of(index, workers)),
            links,
            hub: hub.clone(),
            cfg: cfg_arc.clone(),
            stop: stop.subscribe(),
            ready: ready_tx.clone(),
        };
        match std::thread::Builder::new()
            .name(format!("paqet-{tag}-{index}"))
            .spawn(move || run_worker(w))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                result = Err(anyhow!(e).context("spawning a worker thread"));
                break;
            }
        }
    }
    drop(ready_tx);
    if result.is_ok() {
        result = wait_ready(&ready_rx, handles.len());
    }
    if result.is_ok() {
        hub.set_attached(true);
        info!(role = %wcfg.role, iface, mode = ?mode, workers, "paqet-dp running");
        result = control_loop(&mut plane, &hub, &stop, replay.as_mut());
    }
    stop.stop();
    for h in handles {
        if h.join().is_err() {
            warn!("a worker thread panicked");
        }
    }
    if let Some(r) = replay.as_mut() {
        r.save();
    }
    let xdp = plane.finish(&hub);
    hub.set_attached(false);
    let snapshots = hub.snapshot().workers;
    ops.shutdown();
    result?;
    info!(mode = ?mode, workers, "paqet-dp stopped");
    Ok(Outcome {
        mode,
        workers,
        xdp,
        snapshots,
    })
}

/// Waits until `n` workers reported their start; the first failure.
fn wait_ready(
    rx: &std::sync::mpsc::Receiver<(usize, anyhow::Result<()>)>,
    n: usize,
) -> anyhow::Result<()> {
    let mut err = None;
    for _ in 0..n {
        match rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((i, Err(e))) => {
                err.get_or_insert(e.context(format!("worker {i}")));
            }
            Err(_) => {
                err.get_or_insert(anyhow!("a worker thread ended before starting"));
                break;
            }
        }
    }
    err.map_or(Ok(()), Err)
}

/// The control thread: the plane's periodic work every [`PUBLISH_INTERVAL_MS`] until stopped (or a
/// signal, with [`Stop::with_signals`]).
fn control_loop(
    plane: &mut Plane,
    hub: &MetricsHub,
    stop: &Stop,
    mut replay: Option<&mut ReplayStore>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let mut rx = stop.subscribe();
    let signals = stop.signals;
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(PUBLISH_INTERVAL_MS));
        let sig = async {
            if signals {
                wait_for_signal().await
            } else {
                std::future::pending().await
            }
        };
        tokio::pin!(sig);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    plane.tick(hub)?;
                    if let Some(r) = replay.as_deref_mut() {
                        r.save_if_due();
                    }
                }
                r = rx.wait_for(|s| *s) => { let _ = r; return Ok(()); }
                r = &mut sig => { r?; info!("shutting down"); return Ok(()); }
            }
        }
    })
}

/// Waits for SIGINT or SIGTERM.
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Everything one worker thread needs.
struct Worker {
    index: usize,
    cpu: Option<usize>,
    wcfg: WorkerConfig,
    links: Links,
    /// Where the front ends listen; `None`: no front ends on this worker.
    front: Option<Placement>,
    hub: Arc<MetricsHub>,
    cfg: Arc<Config>,
    stop: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<(usize, anyhow::Result<()>)>,
}

/// A worker thread: reports a start failure to the control thread (and logs any failure).
fn run_worker(w: Worker) {
    let index = w.index;
    let ready = w.ready.clone();
    if let Err(e) = worker_main(w) {
        warn!(worker = index, error = %format!("{e:#}"), "worker stopped");
        let _ = ready.send((index, Err(e)));
    }
}

fn worker_main(w: Worker) -> anyhow::Result<()> {
    let Worker {
        index,
        cpu,
        wcfg,
        links,
        front,
        hub,
        cfg,
        mut stop,
        ready,
    } = w;
    if let Some(Err(e)) = cpu.map(pin_current_thread) {
        warn!(worker = index, error = %e, "worker not pinned");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (shared, tunnel): (super::Shared, Option<Tunnel>) = match links {
            Links::Pcap { iface, sockbuf } => {
                let started = super::start(wcfg, pcap_factory(iface, sockbuf))?;
                (started.shared, started.tunnel)
            }
            Links::Xdp(x) => super::xdp::start_worker(wcfg, *x)?,
        };
        if let (Some(tunnel), Some(at)) = (tunnel, front) {
            front::start(&cfg, tunnel, at).await?;
            debug!(worker = index, "front ends started");
        }
        // Publishes every PUBLISH_INTERVAL_MS and, once the worker is told to stop (after a moment for the
        // driver to push out FINs of dropped streams), the final counters.
        let mut stop_publisher = stop.clone();
        let publisher =
            tokio::task::spawn_local(publish_metrics_until(shared, hub, index, async move {
                let _ = stop_publisher.wait_for(|s| *s).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }));
        info!(worker = index, cpu = ?cpu, "worker running");
        let _ = ready.send((index, Ok(())));
        let _ = stop.wait_for(|s| *s).await;
        let _ = publisher.await;
        Ok::<(), anyhow::Error>(())
    })
    // Dropping the LocalSet and runtime ends every task and closes every socket.
}

/// The CPUs this process may run on (sched_getaffinity), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most size_of::<cpu_set_t>() bytes.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        let v: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect();
        if v.is_empty() {
            vec![0]
        } else {
            v
        }
    }
}

/// The CPUs the workers pin to, worker *i* on entry `i % len` (`io.cpus`); empty = no pinning. A listed
/// CPU outside the process's affinity mask is an error naming the key (pinning there would fail).
pub fn worker_cpus(pin: &CpuPin, allowed: &[usize]) -> anyhow::Result<Vec<usize>> {
    match pin {
        CpuPin::Auto => Ok(allowed.to_vec()),
        CpuPin::None => Ok(Vec::new()),
        CpuPin::Cpus(list) => {
            let list: Vec<usize> = list.iter().map(|&c| c as usize).collect();
            if let Some(c) = list.iter().find(|c| !allowed.contains(c)) {
                anyhow::bail!(
                    "io.cpus = \"{pin}\": CPU {c} is not available to this process (its CPU affinity allows {allowed:?})"
                );
            }
            Ok(list)
        }
    }
}

/// How often the control thread saves a changed replay filter.
pub const REPLAY_SAVE_INTERVAL: Duration = Duration::from_secs(60);

/// Seconds since the Unix epoch.
fn unix_secs() -> u64 {
    super::core::unix_now().as_secs()
}

/// A server's replay filter and where it is persisted (`transport.kcp.replay_filter`; `None` = in memory).
pub struct ReplayStore {
    pub filter: SharedReplayFilter,
    path: Option<PathBuf>,
    last_save: Instant,
    /// The "not persisted" warning was logged.
    warned: bool,
}

impl ReplayStore {
    /// Loads the configured file, or starts empty: a missing file silently, an unreadable, corrupt or
    /// foreign one with a warning (it is replaced at the next save). Never fails.
    pub fn open(cfg: &Config) -> Self {
        let k = &cfg.transport.kcp;
        let horizon = u64::from(k.replay_horizon) * 24 * 3600;
        let path = (!k.replay_filter.is_empty()).then(|| PathBuf::from(&k.replay_filter));
        let now = unix_secs();
        let filter = match &path {
            None => {
                info!("replay filter in memory only (transport.kcp.replay_filter is empty)");
                ReplayFilter::new(horizon, now)
            }
            Some(p) => load_replay_filter(p, horizon, now),
        };
        ReplayStore {
            filter: Arc::new(Mutex::new(filter)),
            path,
            last_save: Instant::now(),
            warned: false,
        }
    }

    /// Saves when the filter changed and [`REPLAY_SAVE_INTERVAL`] passed since the last save.
    pub fn save_if_due(&mut self) {
        if self.last_save.elapsed() >= REPLAY_SAVE_INTERVAL {
            self.save();
        }
    }

    /// Saves the filter if it changed (atomically: a temporary file in the same directory, renamed).
    pub fn save(&mut self) {
        self.last_save = Instant::now();
        let Some(path) = self.path.clone() else {
            return;
        };
        let bytes = {
            let mut f = self.filter.lock().unwrap_or_else(|p| p.into_inner());
            if !f.take_dirty() {
                return;
            }
            f.encode()
        };
        if let Err(e) = write_atomically(&path, &bytes) {
            // Keep the changes for the next attempt.
            let mut f = self.filter.lock().unwrap_or_else(|p| p.into_inner());
            f.mark_dirty();
            if !self.warned {
                self.warned = true;
                warn!(
                    file = %path.display(),
                    error = %e,
                    "transport.kcp.replay_filter: not persisted (the filter works in memory; a restart forgets it)"
                );
            }
        } else if std::mem::take(&mut self.warned) {
            info!(file = %path.display(), "replay filter persisted again");
        }
    }
}

/// Reads a persisted replay filter; a missing, unreadable, corrupt or foreign file gives an empty one.
pub fn load_replay_filter(path: &Path, horizon_secs: u64, unix_secs: u64) -> ReplayFilter {
    match std::fs::read(path) {
        Ok(bytes) => {
            match ReplayFilter::decode(&bytes, BloomParams::DEFAULT, horizon_secs, unix_secs) {
                Ok(f) => {
                    let (cur, prev) = f.counts();
                    info!(file = %path.display(), convs = cur + prev, "replay filter loaded");
                    f
                }
                Err(e) => {
                    warn!(
                        file = %path.display(),
                        error = %e,
                        "transport.kcp.replay_filter: file unusable, starting with an empty replay filter (the file is replaced at the next save)"
                    );
                    ReplayFilter::new(horizon_secs, unix_secs)
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!(file = %path.display(), "no replay filter file yet: starting empty");
            ReplayFilter::new(horizon_secs, unix_secs)
        }
        Err(e) => {
            warn!(
                file = %path.display(),
                error = %e,
                "transport.kcp.replay_filter: cannot read the file, starting with an empty replay filter"
            );
            ReplayFilter::new(horizon_secs, unix_secs)
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory (synced, then renamed over
/// `path`): a crash leaves the old file or the new one, never a mix. The directory must exist (it is not
/// created: packaging provides it, e.g. systemd `StateDirectory=paqet-dp`).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        ));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "replay".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t and pid 0 means the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("pinning a worker to CPU {cpu}: {e}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("paqet-replay-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("temp dir");
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_replay_filter_persists_atomically_and_survives_bad_files() {
        let dir = TempDir::new("persist");
        let path = dir.0.join("replay.bin");
        let now = unix_secs();
        // Missing file: empty.
        let mut f = load_replay_filter(&path, 3600, now);
        assert_eq!(f.counts(), (0, 0));
        assert!(f.insert(0xfeed, now));
        write_atomically(&path, &f.encode()).expect("saved");
        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["replay.bin"], "no temporary file left");
        let mut g = load_replay_filter(&path, 3600, now + 1);
        assert!(g.contains(0xfeed, now + 1), "loaded after a restart");
        // Corrupt or foreign files: an empty filter, no panic.
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(load_replay_filter(&path, 3600, now).counts(), (0, 0));
        std::fs::write(&path, b"key = \"not a filter\"\n").unwrap();
        assert_eq!(load_replay_filter(&path, 3600, now).counts(), (0, 0));
        // A missing directory is an error of the save (the daemon warns and keeps the filter in memory).
        let err = write_atomically(&dir.0.join("no/such/replay.bin"), b"x").unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn worker_cpus_follow_io_cpus() {
        let allowed = [0usize, 1, 2, 3];
        assert_eq!(
            worker_cpus(&CpuPin::Auto, &allowed).unwrap(),
            vec![0, 1, 2, 3]
        );
        assert!(worker_cpus(&CpuPin::None, &allowed).unwrap().is_empty());
        assert_eq!(
            worker_cpus(&CpuPin::Cpus(vec![3, 1]), &allowed).unwrap(),
            vec![3, 1]
        );
        let e = worker_cpus(&CpuPin::Cpus(vec![1, 7]), &allowed)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "io.cpus = \"1,7\": CPU 7 is not available to this process (its CPU affinity allows [0, 1, 2, 3])");
    }

    #[test]
    fn front_ends_bind_once_per_worker_and_udp_on_one() {
        assert_eq!(
            Placement::of(0, 1),
            Placement {
                shared: false,
                udp: true
            }
        );
        assert_eq!(
            Placement::of(1, 2),
            Placement {
                shared: true,
                udp: false
            }
        );
    }

    #[test]
    fn the_expected_mode_follows_the_plane() {
        assert_eq!(DataPlane::Pcap.expected_mode(), DataPathMode::Pcap);
        assert_eq!(
            DataPlane::Xdp(XdpWant::Generic).expected_mode(),
            DataPathMode::XdpGeneric
        );
        assert_eq!(DataPlane::Auto.expected_mode(), DataPathMode::XdpNative);
    }
}
