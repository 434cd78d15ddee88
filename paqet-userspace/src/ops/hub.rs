//! The meeting point between the workers (which own plain counters on their own threads) and the ops
//! thread (which serves `/metrics` and `/readyz`): every worker publishes a [`WorkerSnapshot`] into its slot
//! a few times a second; a scrape builds a [`Snapshot`] from the slots. Publishing takes a mutex held for
//! a copy, a few times a second per worker: never per packet.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use paqet_common::XdpCounter;

use super::metrics::{DataPathMode, RoleLabel, Snapshot, WorkerSnapshot};

/// How often workers publish (milliseconds).
pub const PUBLISH_INTERVAL_MS: u64 = 500;

pub struct MetricsHub {
    role: RoleLabel,
    mode: Mutex<DataPathMode>,
    workers: Mutex<Vec<WorkerSnapshot>>,
    xdp: Mutex<Option<[u64; XdpCounter::COUNT as usize]>>,
    attached: AtomicBool,
}

impl MetricsHub {
    /// A hub for `workers` workers of a daemon in `role`, data path `mode`.
    pub fn new(role: RoleLabel, mode: DataPathMode, workers: usize) -> Arc<Self> {
        Arc::new(MetricsHub {
            role,
            mode: Mutex::new(mode),
            workers: Mutex::new(vec![WorkerSnapshot::default(); workers]),
            xdp: Mutex::new(None),
            attached: AtomicBool::new(false),
        })
    }

    pub fn role(&self) -> RoleLabel {
        self.role
    }

    /// The data path in use (set once it is attached).
    pub fn set_mode(&self, mode: DataPathMode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// Marks the data path attached (or detached, e.g. on shutdown): part of readiness.
    pub fn set_attached(&self, attached: bool) {
        self.attached.store(attached, Ordering::Release);
    }

    /// Whether the data path is attached.
    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Replaces worker `index`'s slot (grows the table if needed).
    pub fn publish(&self, index: usize, snap: WorkerSnapshot) {
        let mut w = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() <= index {
            w.resize(index + 1, WorkerSnapshot::default());
        }
        w[index] = snap;
    }

    /// Latest XDP program counters (summed over CPUs).
    pub fn set_xdp(&self, counters: [u64; XdpCounter::COUNT as usize]) {
        *self.xdp.lock().unwrap_or_else(|p| p.into_inner()) = Some(counters);
    }

    /// What a scrape encodes.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            role: self.role,
            mode: *self.mode.lock().unwrap_or_else(|p| p.into_inner()),
            workers: self
                .workers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            xdp: *self.xdp.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Readiness: data path attached and, on a client, at least one live session.
    pub fn readiness(&self) -> Result<(), String> {
        let live: u64 = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|w| w.live_sessions)
            .sum();
        super::http::readiness(self.attached.load(Ordering::Acquire), self.role, live)
    }

    /// An [`super::OpsState`] whose callbacks read this hub.
    pub fn ops_state(self: &Arc<Self>) -> super::OpsState {
        let a = self.clone();
        let b = self.clone();
        super::OpsState::new(
            Box::new(move || a.snapshot()),
            Box::new(move || b.readiness()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_snapshot_and_readiness() {
        let hub = MetricsHub::new(RoleLabel::Client, DataPathMode::Pcap, 2);
        assert!(hub.readiness().unwrap_err().contains("not attached"));
        hub.set_attached(true);
        assert!(hub.readiness().unwrap_err().contains("no live session"));
        hub.publish(
            0,
            WorkerSnapshot {
                sessions: 1,
                ..Default::default()
            },
        );
        assert!(
            hub.readiness().is_err(),
            "a session that heard nothing is not live"
        );
        hub.publish(
            1,
            WorkerSnapshot {
                sessions: 2,
                live_sessions: 1,
                rx_packets: 5,
                ..Default::default()
            },
        );
        assert!(hub.readiness().is_ok());
        let s = hub.snapshot();
        assert_eq!(s.workers.len(), 2);
        assert_eq!(s.workers[1].rx_packets, 5);
        hub.publish(3, WorkerSnapshot::default());
        assert_eq!(hub.snapshot().workers.len(), 4);
    }
}
