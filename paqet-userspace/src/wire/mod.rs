//! Wire codecs: checked views and `parse`/`emit` over byte slices. Nothing here allocates per packet on the
//! hot path, reads a clock or touches a socket; every decoder returns an error instead of panicking.
pub mod crypt;
pub mod envelope;
pub mod fec;
pub mod header;
pub mod kcp;
pub mod noise;
pub mod smux;
