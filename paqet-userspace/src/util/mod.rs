//! Small helpers shared by tests, tools and the daemon.
pub mod pcapfile;
