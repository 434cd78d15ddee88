//! paqet-dp: a wire-compatible, kernel-bypass implementation of paqet.
//!
//! Layers (see `docs/architecture.md`):
//! - [`wire`]: pure codecs over byte slices (envelope, crypto framing, FEC, KCP segment, smux frame,
//!   paqet header). They never panic on untrusted input.
//! - [`proto`]: sans-IO state machines (KCP ARQ, FEC coder, smux mux, the composed session).
//! - [`config`]: the configuration schema, upstream YAML import and validation.
//! - [`io`]: the packet-I/O trait and its backends.
//! - [`util`]: small helpers (pcap file reader for tests and `dump`).
pub mod config;
pub mod doctor;
pub mod front;
pub mod io;
pub mod ops;
pub mod proto;
pub mod tools;
pub mod util;
pub mod wire;
pub mod worker;
