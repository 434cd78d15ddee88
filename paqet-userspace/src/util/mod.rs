//! Small helpers shared by tests, tools and the daemon.
pub mod lazycopy;
pub mod pcapfile;
