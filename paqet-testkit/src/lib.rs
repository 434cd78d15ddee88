//! Test-only helpers of paqet-dp, kept out of the shipped `paqet` library and the `paqet-dp` binary.
//!
//! - [`netns`]: network namespaces, threads inside them (`setns(2)`) and veth pairs for root-only tests and
//!   the benchmarks.
//! - [`impair`]: a three-namespace link with delay, jitter, reordering, loss and duplication for fault tests;
//!   its NFQUEUE relay runs on a thread inside the middle namespace ([`impair::ImpairedLink::new`]) or as the
//!   `paqet-impair` binary of this crate (manual use, `cargo xtask bench wan`); `cargo xtask bench soak` switches a link to a lossy phase and back.
//! - [`probe`]: the active prober's frames and scans (`tests/probe_scan.rs`, `cargo xtask probe`).
//!
//! `paqet-userspace` uses this crate as a dev-dependency only; `xtask` uses it for its namespaces.
pub mod impair;
pub mod netns;
pub mod probe;
