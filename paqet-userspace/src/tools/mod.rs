//! Operator tools built on the wire codecs and the I/O layer.
//!
//! - [`dump`]: decodes captured tunnel frames layer by layer (`paqet-dp dump`).
//! - [`firewall`]: the iptables NOTRACK / PREROUTING-drop / RST-drop rules pcap mode needs, printed or applied
//!   (`run --manage-firewall`), removed again on drop.
//!
//! Test-only tools (namespaces, the impaired link and its `paqet-impair` relay) live in the dev-only
//! `paqet-testkit` crate, outside the shipped library.
pub mod dump;
pub mod firewall;
