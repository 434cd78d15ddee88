//! The log line of a refusal by a server limit: a warning naming the configuration key and its value, at
//! most once per second per key (a client opening streams in a loop must not flood the log), saying how many
//! refusals by that key were not logged since its previous line. Counting is separate (the endpoint's and
//! the worker's counters, exported as `paqet_limit_refusals_total{key=...}`).
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

use super::WorkerConfig;
use crate::proto::limits::LimitKey;

/// Shortest time between two log lines of one key.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

/// One key's log rate limit.
#[derive(Clone, Copy, Debug, Default)]
struct Gate {
    last: Option<Instant>,
    /// Refusals not logged since the last line.
    suppressed: u64,
}

impl Gate {
    /// `Some(refusals not logged since the previous line)` when this refusal is to be logged.
    fn pass(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Process-wide (every worker of the daemon shares the rate limit of a key).
static GATES: Mutex<[Gate; LimitKey::COUNT]> = Mutex::new(
    [Gate {
        last: None,
        suppressed: 0,
    }; LimitKey::COUNT],
);

/// The configured value of `key`, as the log shows it.
fn value_text(key: LimitKey, cfg: &WorkerConfig) -> String {
    let limit = |l: Option<usize>| l.map_or_else(|| "-1".to_owned(), |v| v.to_string());
    match key {
        LimitKey::MaxSessions => limit(cfg.limits.max_sessions),
        LimitKey::MaxStreamsTotal => limit(cfg.limits.max_streams_total),
        LimitKey::MaxStreamsPerSession => limit(cfg.limits.max_streams_per_session),
        LimitKey::HeaderTimeout => format!("{} s", cfg.header_timeout.as_secs()),
    }
}

/// The log line of a refusal (without the rate-limit suffix).
fn message(key: LimitKey, value: &str, peer: Option<SocketAddr>) -> String {
    let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    match key {
        LimitKey::MaxSessions => format!("session refused: {key} = {value} reached (from {peer})"),
        LimitKey::MaxStreamsTotal | LimitKey::MaxStreamsPerSession => {
            format!("stream refused: {key} = {value} reached (session {peer})")
        }
        LimitKey::HeaderTimeout => {
            format!("stream closed: no paqet header within {key} = {value} (session {peer})")
        }
    }
}

/// Logs a refusal by `key` of a session or stream of `peer` (rate-limited per key).
pub(crate) fn log_refusal(key: LimitKey, cfg: &WorkerConfig, peer: Option<SocketAddr>) {
    let pass = GATES
        .lock()
        .map(|mut g| g[key.index()].pass(Instant::now()))
        .unwrap_or(None);
    if let Some(suppressed) = pass {
        let msg = message(key, &value_text(key, cfg), peer);
        warn!(
            key = key.key(),
            suppressed,
            "{msg}; further refusals by this key are logged at most once per second (counted in paqet_limit_refusals_total)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_with_the_count_of_the_rest() {
        let mut g = Gate::default();
        let t0 = Instant::now();
        assert_eq!(g.pass(t0), Some(0), "the first refusal is logged");
        assert_eq!(g.pass(t0 + Duration::from_millis(10)), None);
        assert_eq!(g.pass(t0 + Duration::from_millis(999)), None);
        assert_eq!(
            g.pass(t0 + LOG_EVERY),
            Some(2),
            "then with what was not logged"
        );
        assert_eq!(g.pass(t0 + LOG_EVERY * 3), Some(0));
    }

    #[test]
    fn lines_name_the_key_and_its_value() {
        let peer: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        assert_eq!(
            message(LimitKey::MaxStreamsPerSession, "256", Some(peer)),
            "stream refused: transport.kcp.max_streams_per_session = 256 reached (session 10.0.0.1:4000)"
        );
        assert_eq!(
            message(LimitKey::MaxSessions, "512", Some(peer)),
            "session refused: transport.kcp.max_sessions = 512 reached (from 10.0.0.1:4000)"
        );
        assert_eq!(
            message(LimitKey::HeaderTimeout, "10 s", None),
            "stream closed: no paqet header within transport.kcp.header_timeout = 10 s (session unknown)"
        );
    }
}
