//! XDP steering: loads the `paqet-ebpf` program (built by `build.rs`) with aya, attaches it to an
//! interface through a bpf_link (detached when [`Steering`] is dropped or the process exits), and
//! drives its maps: the AF_XDP socket per RX queue, the steering config (with the guard tag's key,
//! binding and the probe-answer flag and TTLs), the deprecated cookie format's guard prefixes and
//! the per-CPU counters.
//!
//! What is steered is [`SteerConfig`]: on a server, frames to the tunnel port; on a client
//! (`FLAG_SRC_IPV4`/`FLAG_SRC_IPV6`), frames from the server's endpoint to one of the client's own
//! session ports, listed in the program's port bitmap ([`PortSet`]), so a client can run many
//! sessions on many local ports while frames from the same server to other clients on this host
//! (a second paqet client, an upstream client) still reach the kernel.
//!
//! Medium: on an interface without a link header (tun, WireGuard: generic XDP hands the program the
//! IP header first) every config written carries `SteerConfig::FLAG_MEDIUM_IP`, so the program parses
//! from offset 0; the interface's medium is read at attach. Native XDP cannot be attached to a tun
//! device in tun mode (`EOPNOTSUPP`, measured on 6.18), and WireGuard and ppp have no native XDP, so
//! [`Steering::attach_auto`] goes straight to generic mode there.
//!
//! Only one XDP program can be attached to an interface: one XDP daemon per interface (a second
//! daemon on the same interface must run in pcap mode; with the port bitmap both coexist).
//!
//! Order of operations (spike pitfall 9): [`Steering::attach`] leaves the program *disarmed*
//! (an all-zero config: it passes everything), then the caller binds its AF_XDP sockets and
//! [`Steering::register_socket`]s them, and only then [`Steering::arm`]s the config, so no tunnel
//! frame ever finds an empty XSKMAP slot.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use crate::io::route;
use crate::wire::envelope::Medium;
use aya::maps::{Array, MapData, MapError, PerCpuArray, XskMap};
use aya::programs::{ProgramError, Xdp};
use aya::{Ebpf, EbpfError};
use paqet_common::{
    port_bit, GuardEntry, GuardTable, SteerConfig, XdpCounter, GUARD_PREFIX_LEN, GUARD_SLOTS,
    MAP_CONFIG, MAP_COUNTERS, MAP_GUARD, MAP_PORTS, MAP_XSKS, MAX_QUEUES, PORT_WORDS, PROG_NAME,
};

/// Number of XDP counters, as an array length.
pub const COUNTERS: usize = XdpCounter::COUNT as usize;

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Driver (native) mode: runs in the NIC driver before any skb exists.
    Native,
    /// Generic (SKB) mode: runs in the stack after skb allocation; works on any interface.
    Generic,
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    /// Attached in driver (native) mode.
    Native,
    /// Attached in generic (SKB) mode.
    Generic,
}

impl XdpAttach {
    /// "native" or "generic", for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            XdpAttach::Native => "native",
            XdpAttach::Generic => "generic",
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}

impl std::fmt::Display for XdpAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<XdpMode> for XdpAttach {
    fn from(m: XdpMode) -> Self {
        match m {
            XdpMode::Native => XdpAttach::Native,
            XdpMode::Generic => XdpAttach::Generic,
        }
    }
}

/// Errors of the XDP steering layer.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// Built without bpf-linker (or with `PAQET_NO_EBPF=1`).
    #[error("this build has no XDP program: install bpf-linker (scripts/install-bpf-linker.sh) and rebuild")]
    NoProgram,
    /// The embedded object could not be parsed / its maps created.
    #[error("loading the XDP object failed: {0}")]
    Load(#[source] EbpfError),
    /// The object lacks the program or a map (build mismatch).
    #[error("the XDP object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// The kernel verifier (or BPF_PROG_LOAD) rejected the program.
    #[error("the kernel rejected the XDP program {PROG_NAME}: {0}")]
    Verify(#[source] ProgramError),
    /// Attaching in one mode failed.
    #[error("cannot attach XDP to interface {iface:?} in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    /// Auto mode: neither native nor generic attached.
    #[error(
        "cannot attach XDP to interface {iface:?}: native mode: {native}; generic mode: {generic}"
    )]
    AttachAuto {
        iface: String,
        native: String,
        generic: String,
    },
    /// A map operation failed.
    #[error("XDP map {map}: {op} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    /// RX queue index outside the XSKMAP.
    #[error("RX queue {queue} is out of range: the XSKMAP has {MAX_QUEUES} entries")]
    QueueOutOfRange { queue: u32 },
    /// Port 0 cannot be a session port.
    #[error("port 0 cannot be added to the XDP session port set")]
    PortZero,
    /// The shared port set's lock was poisoned (a thread panicked while holding it).
    #[error("the XDP session port set is unusable: a thread panicked while updating it")]
    PortsPoisoned,
    /// The interface's link type is neither Ethernet nor bare IP (or cannot be read).
    #[error("XDP on interface {iface:?}: {msg}")]
    LinkType { iface: String, msg: String },
    /// More guard prefixes than the program holds.
    #[error("{given} guard prefixes given, the XDP program holds at most {max}")]
    TooManyGuardPrefixes { given: usize, max: usize },
}

/// The XDP object, compiled for bpfel-unknown-none by aya-build in build.rs.
#[cfg(not(paqet_no_ebpf))]
fn ebpf_object() -> Result<&'static [u8], SteerError> {
    Ok(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/paqet-xdp"
    )))
}

#[cfg(paqet_no_ebpf)]
fn ebpf_object() -> Result<&'static [u8], SteerError> {
    Err(SteerError::NoProgram)
}

/// True when this build embeds the XDP program.
pub const fn has_xdp_program() -> bool {
    !cfg!(paqet_no_ebpf)
}

/// Map values must be `aya::Pod`; the shared types live in `paqet-common` (no aya there), so wrap them.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct PodConfig(SteerConfig);
// SAFETY: `SteerConfig` is `#[repr(C)]` plain data (integers and byte arrays) without padding.
unsafe impl aya::Pod for PodConfig {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct PodGuard(GuardTable);
// SAFETY: `GuardTable` is `#[repr(C)]` plain data (u32/u64 fields) without padding.
unsafe impl aya::Pod for PodGuard {}

/// The client's local session ports: the program's `PAQET_PORTS` bitmap plus a userspace copy, so
/// adding a port is one map update (no read back). Source-matched frames (client side) are steered
/// only to these destination ports. Shared with the workers as a [`SharedPorts`] handle, locked only
/// when a session is dialled on a port outside the set planned at start (never per packet).
pub struct PortSet {
    map: Array<MapData, u64>,
    words: Box<[u64]>,
    len: usize,
}

/// A [`PortSet`] shared between the control thread and the workers.
pub type SharedPorts = Arc<Mutex<PortSet>>;

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortSet")
            .field("ports", &self.ports())
            .finish()
    }
}

impl PortSet {
    fn open(ebpf: &mut Ebpf) -> Result<Self, SteerError> {
        let map = ebpf.take_map(MAP_PORTS).ok_or(SteerError::Missing {
            kind: "map",
            name: MAP_PORTS,
        })?;
        let map = Array::try_from(map).map_err(|source| SteerError::Map {
            map: MAP_PORTS,
            op: "open",
            source,
        })?;
        // The map was just created by this load (it is not pinned), and the kernel zero-fills new array
        // maps: an all-zero copy is exact without writing the 1024 words back.
        Ok(PortSet {
            map,
            words: vec![0u64; PORT_WORDS as usize].into_boxed_slice(),
            len: 0,
        })
    }

    fn write_word(&mut self, word: u32, value: u64) -> Result<(), SteerError> {
        self.map
            .set(word, value, 0)
            .map_err(|source| SteerError::Map {
                map: MAP_PORTS,
                op: "set",
                source,
            })
    }

    /// True when `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        let (w, m) = port_bit(port);
        self.words[w as usize] & m != 0
    }

    /// Adds `port` (port 0 is refused: no session uses it). Returns true if it was not there yet.
    pub fn insert(&mut self, port: u16) -> Result<bool, SteerError> {
        if port == 0 {
            return Err(SteerError::PortZero);
        }
        self.set_bit(port, true)
    }

    /// Removes `port`. Returns true if it was there.
    pub fn remove(&mut self, port: u16) -> Result<bool, SteerError> {
        self.set_bit(port, false)
    }

    /// Sets `port`'s bit to `on` in the map, then in the copy; true if that changed it.
    fn set_bit(&mut self, port: u16, on: bool) -> Result<bool, SteerError> {
        let (w, m) = port_bit(port);
        let old = self.words[w as usize];
        let new = if on { old | m } else { old & !m };
        if new == old {
            return Ok(false);
        }
        self.write_word(w, new)?;
        self.words[w as usize] = new;
        if on {
            self.len += 1;
        } else {
            self.len -= 1;
        }
        Ok(true)
    }

    /// Number of ports in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the set is empty (source-matched steering then steers nothing).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ports in the set, ascending.
    pub fn ports(&self) -> Vec<u16> {
        (0..=u16::MAX).filter(|&p| self.contains(p)).collect()
    }
}

/// A loaded and attached XDP program. Dropping it detaches the program (bpf_link).
pub struct Steering {
    ebpf: Ebpf,
    ports: SharedPorts,
    iface: String,
    attach: XdpAttach,
    config: SteerConfig,
    armed: bool,
    guard: GuardTable,
    /// Reads the program's `aya-log` records (never per packet: see `paqet-ebpf`) into `log`, which the
    /// binary forwards to `tracing`; `None` when the object has no log map.
    logs: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The interface's medium: [`Medium::Ip`] adds `FLAG_MEDIUM_IP` to every config written.
    medium: Medium,
}

/// The medium of `iface`, as a [`SteerError`].
fn iface_medium(iface: &str) -> Result<Medium, SteerError> {
    route::link_medium(iface).map_err(|e| SteerError::LinkType {
        iface: iface.to_owned(),
        msg: e.to_string(),
    })
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("iface", &self.iface)
            .field("attach", &self.attach)
            .field("config", &self.config)
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

fn load_program() -> Result<Ebpf, SteerError> {
    let mut ebpf = Ebpf::load(ebpf_object()?).map_err(SteerError::Load)?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_NAME)
        .ok_or(SteerError::Missing {
            kind: "program",
            name: PROG_NAME,
        })?
        .try_into()
        .map_err(SteerError::Verify)?;
    prog.load().map_err(SteerError::Verify)?;
    Ok(ebpf)
}

fn xdp_prog(ebpf: &mut Ebpf) -> Result<&mut Xdp, SteerError> {
    ebpf.program_mut(PROG_NAME)
        .ok_or(SteerError::Missing {
            kind: "program",
            name: PROG_NAME,
        })?
        .try_into()
        .map_err(SteerError::Verify)
}

fn attach_mode(ebpf: &mut Ebpf, iface: &str, mode: XdpMode) -> Result<(), SteerError> {
    let aya_mode = match mode {
        XdpMode::Native => aya::programs::XdpMode::Driver,
        XdpMode::Generic => aya::programs::XdpMode::Skb,
    };
    xdp_prog(ebpf)?
        .attach(iface, aya_mode)
        .map(|_| ())
        .map_err(|source| SteerError::Attach {
            iface: iface.to_owned(),
            mode,
            source,
        })
}

impl Steering {
    /// Loads the program and attaches it to `iface` in `mode`, disarmed. `cfg` is remembered and
    /// applied by [`Steering::arm`] once the AF_XDP sockets are registered.
    pub fn attach(iface: &str, mode: XdpMode, cfg: SteerConfig) -> Result<Self, SteerError> {
        let mut ebpf = load_program()?;
        attach_mode(&mut ebpf, iface, mode)?;
        Self::finish(ebpf, iface, mode.into(), cfg)
    }

    /// Like [`Steering::attach`], trying native mode first and generic mode second; reports which.
    pub fn attach_auto(iface: &str, cfg: SteerConfig) -> Result<(Self, XdpAttach), SteerError> {
        if iface_medium(iface)? == Medium::Ip {
            tracing::info!(iface, "no link header (tun, WireGuard, ppp): generic XDP");
            let s = Self::attach(iface, XdpMode::Generic, cfg)?;
            return Ok((s, XdpAttach::Generic));
        }
        let mut ebpf = load_program()?;
        let attach = match attach_mode(&mut ebpf, iface, XdpMode::Native) {
            Ok(()) => XdpAttach::Native,
            Err(native) => {
                tracing::info!(iface, error = %native, "native XDP attach failed; trying generic mode");
                match attach_mode(&mut ebpf, iface, XdpMode::Generic) {
                    Ok(()) => XdpAttach::Generic,
                    Err(generic) => {
                        return Err(SteerError::AttachAuto {
                            iface: iface.to_owned(),
                            native: error_chain(&native),
                            generic: error_chain(&generic),
                        })
                    }
                }
            }
        };
        let s = Self::finish(ebpf, iface, attach, cfg)?;
        Ok((s, attach))
    }

    fn finish(
        mut ebpf: Ebpf,
        iface: &str,
        attach: XdpAttach,
        cfg: SteerConfig,
    ) -> Result<Self, SteerError> {
        let ports = Arc::new(Mutex::new(PortSet::open(&mut ebpf)?));
        let logs = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!(error = %e, "the XDP program's log records are not read");
                None
            }
        };
        let medium = iface_medium(iface)?;
        let mut s = Steering {
            ebpf,
            ports,
            iface: iface.to_owned(),
            attach,
            config: cfg,
            armed: false,
            guard: GuardTable::default(),
            logs,
            medium,
        };
        // Explicitly disarmed (the map starts zeroed anyway) and an empty guard table.
        s.write_config(SteerConfig::default())?;
        s.write_guard()?;
        tracing::info!(iface, mode = %attach, %medium, "XDP program attached (disarmed)");
        Ok(s)
    }

    /// Forwards the log records the program wrote since the last call (call periodically, off the data
    /// path: the records wait in a 128 KiB ring buffer).
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logs.as_mut() {
            l.flush();
        }
    }

    /// The interface the program is attached to.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The interface's medium (what the program parses first).
    pub fn medium(&self) -> Medium {
        self.medium
    }

    /// The mode the program is attached in.
    pub fn attached(&self) -> XdpAttach {
        self.attach
    }

    /// The remembered steering config.
    pub fn config(&self) -> &SteerConfig {
        &self.config
    }

    /// A handle on the client's session port set (see [`PortSet`]); cheap to clone.
    pub fn port_set(&self) -> SharedPorts {
        self.ports.clone()
    }

    /// Adds `ports` to the session port set (call before [`Steering::arm`] on a client).
    pub fn add_ports(&self, ports: impl IntoIterator<Item = u16>) -> Result<(), SteerError> {
        let mut set = self.ports.lock().map_err(|_| SteerError::PortsPoisoned)?;
        for p in ports {
            set.insert(p)?;
        }
        Ok(())
    }

    /// True after [`Steering::arm`] (and before [`Steering::disarm`]).
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// The XSKMAP, for queue `queue` (checked against [`MAX_QUEUES`]).
    fn xsk_map(&mut self, queue: u32) -> Result<XskMap<&mut aya::maps::MapData>, SteerError> {
        if queue >= MAX_QUEUES {
            return Err(SteerError::QueueOutOfRange { queue });
        }
        let map = self.ebpf.map_mut(MAP_XSKS).ok_or(SteerError::Missing {
            kind: "map",
            name: MAP_XSKS,
        })?;
        XskMap::try_from(map).map_err(|source| SteerError::Map {
            map: MAP_XSKS,
            op: "open",
            source,
        })
    }

    /// Puts the AF_XDP socket `fd` bound to RX queue `queue` into the XSKMAP.
    pub fn register_socket(&mut self, queue: u32, fd: &impl AsRawFd) -> Result<(), SteerError> {
        self.xsk_map(queue)?
            .set(queue, fd.as_raw_fd(), 0)
            .map_err(|source| SteerError::Map {
                map: MAP_XSKS,
                op: "set",
                source,
            })
    }

    /// Removes the socket of RX queue `queue` from the XSKMAP (its frames then pass to the kernel).
    pub fn unregister_socket(&mut self, queue: u32) -> Result<(), SteerError> {
        self.xsk_map(queue)?
            .unset(queue)
            .map_err(|source| SteerError::Map {
                map: MAP_XSKS,
                op: "unset",
                source,
            })
    }

    /// Starts steering with the remembered config. Call after registering the sockets.
    pub fn arm(&mut self) -> Result<(), SteerError> {
        let cfg = self.config;
        self.write_config(cfg)?;
        self.armed = true;
        let session_ports = self.ports.lock().map(|p| p.len()).unwrap_or(0);
        tracing::info!(
            iface = %self.iface,
            port = cfg.port,
            src_port = cfg.src_port,
            flags = cfg.flags,
            session_ports,
            "XDP steering armed"
        );
        Ok(())
    }

    /// Replaces the config; applied at once when armed, else at the next [`Steering::arm`].
    pub fn set_config(&mut self, cfg: SteerConfig) -> Result<(), SteerError> {
        self.config = cfg;
        if self.armed {
            self.write_config(cfg)?;
        }
        Ok(())
    }

    /// Stops steering (everything passes to the kernel) without detaching.
    pub fn disarm(&mut self) -> Result<(), SteerError> {
        self.write_config(SteerConfig::default())?;
        self.armed = false;
        Ok(())
    }

    fn write_config(&mut self, mut cfg: SteerConfig) -> Result<(), SteerError> {
        if self.medium == Medium::Ip {
            cfg.flags |= SteerConfig::FLAG_MEDIUM_IP;
        }
        self.set_slot0(MAP_CONFIG, PodConfig(cfg))
    }

    /// Writes `value` into slot 0 of the one-entry array map `name`.
    fn set_slot0<T: aya::Pod>(&mut self, name: &'static str, value: T) -> Result<(), SteerError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(SteerError::Missing { kind: "map", name })?;
        let mut arr: Array<_, T> = Array::try_from(map).map_err(|source| SteerError::Map {
            map: name,
            op: "open",
            source,
        })?;
        arr.set(0, value, 0).map_err(|source| SteerError::Map {
            map: name,
            op: "set",
            source,
        })
    }

    /// Replaces the set of accepted guard prefixes (`magic[4] | cookie[8]`). Prefixes already in
    /// the table keep their slot, so a concurrent reader never misses a prefix that stays valid;
    /// new ones take free slots and dropped ones are cleared, all in one map update.
    pub fn set_guard_cookies(
        &mut self,
        prefixes: &[[u8; GUARD_PREFIX_LEN]],
    ) -> Result<(), SteerError> {
        let next = plan_guard_table(&self.guard, prefixes)?;
        if next != self.guard {
            let old = std::mem::replace(&mut self.guard, next);
            if let Err(e) = self.write_guard() {
                self.guard = old;
                return Err(e);
            }
        }
        Ok(())
    }

    /// The guard table as last written.
    pub fn guard_table(&self) -> &GuardTable {
        &self.guard
    }

    fn write_guard(&mut self) -> Result<(), SteerError> {
        let table = self.guard;
        self.set_slot0(MAP_GUARD, PodGuard(table))
    }

    /// The XDP counters summed over CPUs, indexed by [`XdpCounter`].
    pub fn counters(&self) -> Result<[u64; COUNTERS], SteerError> {
        let map = self.ebpf.map(MAP_COUNTERS).ok_or(SteerError::Missing {
            kind: "map",
            name: MAP_COUNTERS,
        })?;
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| SteerError::Map {
                map: MAP_COUNTERS,
                op: "open",
                source,
            })?;
        let mut out = [0u64; COUNTERS];
        for c in XdpCounter::ALL {
            let per_cpu = arr.get(&(c as u32), 0).map_err(|source| SteerError::Map {
                map: MAP_COUNTERS,
                op: "get",
                source,
            })?;
            out[c as usize] = per_cpu.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        // The bpf_link held by `ebpf` detaches the program when it is dropped right after this.
        tracing::info!(iface = %self.iface, mode = %self.attach, "detaching XDP program");
    }
}

/// Computes the next guard table: keeps slots whose prefix is still wanted, clears the others and
/// places new prefixes in free slots (lowest first). Duplicates in `prefixes` are ignored.
pub fn plan_guard_table(
    current: &GuardTable,
    prefixes: &[[u8; GUARD_PREFIX_LEN]],
) -> Result<GuardTable, SteerError> {
    let distinct = prefixes
        .iter()
        .enumerate()
        .filter(|(k, p)| !prefixes[..*k].contains(p))
        .count();
    if distinct > GUARD_SLOTS {
        return Err(SteerError::TooManyGuardPrefixes {
            given: distinct,
            max: GUARD_SLOTS,
        });
    }
    let mut next = GuardTable::default();
    // Keep existing slots that stay valid.
    for (i, e) in current.entries.iter().enumerate() {
        if e.valid != 0 && prefixes.iter().any(|p| GuardEntry::from_prefix(p) == *e) {
            next.entries[i] = *e;
        }
    }
    // New prefixes take the lowest free slots; `distinct <= GUARD_SLOTS` guarantees one exists.
    for p in prefixes {
        let entry = GuardEntry::from_prefix(p);
        if next.entries.contains(&entry) {
            continue;
        }
        if let Some(slot) = next.entries.iter().position(|e| e.valid == 0) {
            next.entries[slot] = entry;
        }
    }
    Ok(next)
}

/// Collects the guard prefixes the XDP program should accept at `unix_secs`: the windows
/// `now - skew ..= now + 1` (the next one too, so a peer whose clock runs slightly ahead or a
/// window change between rotations is not dropped). `prefix_at(t, out)` writes the prefix a sender
/// would use at unix time `t` (e.g. `worker::guard::Guard::write_prefix`).
pub fn guard_prefixes(
    unix_secs: u64,
    window_secs: u64,
    skew: u64,
    mut prefix_at: impl FnMut(u64, &mut [u8; GUARD_PREFIX_LEN]),
) -> Vec<[u8; GUARD_PREFIX_LEN]> {
    let window = window_secs.max(1);
    let now = unix_secs / window;
    let first = now.saturating_sub(skew);
    (first..=now + 1)
        .map(|win| {
            let mut p = [0u8; GUARD_PREFIX_LEN];
            prefix_at(win * window, &mut p);
            p
        })
        .collect()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(tag: u8) -> [u8; GUARD_PREFIX_LEN] {
        let mut x = *b"PQT1\0\0\0\0\0\0\0\0";
        x[4] = tag;
        x[11] = tag.wrapping_mul(7);
        x
    }

    #[test]
    fn guard_plan_keeps_slots_of_surviving_prefixes() {
        let t0 = plan_guard_table(&GuardTable::default(), &[p(1), p(2), p(3)]).unwrap();
        assert_eq!(t0.entries[0].prefix(), p(1));
        assert_eq!(t0.entries[2].prefix(), p(3));
        // Rotate: 1 expires, 4 arrives. 2 and 3 must stay where they were; 4 takes slot 0.
        let t1 = plan_guard_table(&t0, &[p(2), p(3), p(4)]).unwrap();
        assert_eq!(t1.entries[1], t0.entries[1]);
        assert_eq!(t1.entries[2], t0.entries[2]);
        assert_eq!(t1.entries[0].prefix(), p(4));
        let valid = t1.entries.iter().filter(|e| e.valid != 0).count();
        assert_eq!(valid, 3);
        let m = |x: [u8; 12]| {
            let e = GuardEntry::from_prefix(&x);
            (e.magic, e.cookie)
        };
        let (a, b) = m(p(1));
        assert!(!t1.accepts(a, b));
        let (a, b) = m(p(4));
        assert!(t1.accepts(a, b));
    }

    #[test]
    fn guard_plan_ignores_duplicates_and_rejects_overflow() {
        let t = plan_guard_table(&GuardTable::default(), &[p(1), p(1), p(1)]).unwrap();
        assert_eq!(t.entries.iter().filter(|e| e.valid != 0).count(), 1);
        let many: Vec<_> = (0..=GUARD_SLOTS as u8).map(p).collect();
        assert!(matches!(
            plan_guard_table(&GuardTable::default(), &many),
            Err(SteerError::TooManyGuardPrefixes {
                max: GUARD_SLOTS,
                ..
            })
        ));
        let empty = plan_guard_table(&t, &[]).unwrap();
        assert_eq!(empty, GuardTable::default());
    }

    #[test]
    fn guard_prefixes_cover_skew_and_next_window() {
        let mut seen = Vec::new();
        let v = guard_prefixes(1000, 30, 2, |t, out| {
            seen.push(t);
            out[..8].copy_from_slice(&t.to_be_bytes());
        });
        // now = 33 → windows 31, 32, 33, 34.
        assert_eq!(seen, vec![31 * 30, 32 * 30, 33 * 30, 34 * 30]);
        assert_eq!(v.len(), 4);
        assert_eq!(&v[3][..8], &(34u64 * 30).to_be_bytes());
    }

    #[test]
    fn no_program_error_text_is_actionable() {
        let t = SteerError::NoProgram.to_string();
        assert!(t.contains("bpf-linker") && t.contains("scripts/install-bpf-linker.sh"));
    }
}
