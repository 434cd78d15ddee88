//! Observability: Prometheus metrics, health endpoints and CPU/heap profiles in pprof format.
//!
//! - [`metrics`]: the metric families and the [`Snapshot`] the daemon fills on scrape.
//! - [`http`]: the ops HTTP server (`/metrics`, `/healthz`, `/readyz`, `/debug/pprof/*`) on its own thread.
//! - [`pprof`]: CPU profiles (99 Hz) and the sampling heap profiler ([`pprof::TrackingAlloc`]).
pub mod http;
pub mod hub;
pub mod metrics;
pub mod pprof;

pub use http::{readiness, serve, spawn_ops_thread, OpsState, ReadyFn, SnapshotFn};
pub use hub::MetricsHub;
pub use metrics::{
    AfXdpStats, CcSnapshot, CcTopSession, DataPathMode, KcpRetrans, Metrics, RoleLabel,
    ServerSnapshot, Snapshot, WorkerSnapshot, CC_TOP_N, CONTENT_TYPE, METRIC_NAMES,
};
pub use pprof::TrackingAlloc;
