//! Packet I/O: one trait, several backends (pcap, in-memory; AF_XDP later).
