//! Operator and test tools built on the wire codecs and the I/O layer.
//!
//! - [`dump`]: decodes captured tunnel frames layer by layer (`paqet-dp dump`).
//! - [`firewall`]: the iptables NOTRACK / PREROUTING-drop / RST-drop rules pcap mode needs, printed or applied
//!   (`run --manage-firewall`), removed again on drop.
//! - [`impair`]: a three-namespace link with delay, jitter, reordering, loss and duplication for
//!   fault tests (the relay half runs as the `paqet-impair` binary).
pub mod dump;
pub mod firewall;
pub mod impair;
