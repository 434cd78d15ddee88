//! Sans-IO protocol state machines: fed bytes and `now` (milliseconds), emitting datagrams and events.
pub mod cc;
pub mod endpoint;
pub mod fec;
pub mod guard;
pub mod kcp;
pub mod limits;
pub mod noise;
pub mod replay;
pub mod session;
pub mod smux;
