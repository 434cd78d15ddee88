//! The server limits paqet-dp adds to upstream (none of them exists in upstream paqet): which configuration
//! key each one is, so a refusal can name the key in the log and be counted per key in `/metrics`
//! (`paqet_limit_refusals_total{key=...}`).
//!
//! In TOML they default to protective values; in imported upstream YAML to "unlimited" (the header timeout
//! to its ceiling), so an upstream config used as is meets no cap upstream does not have
//! (docs/configuration.md, "Limits (server)").

/// A configuration key that can refuse a session or a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// `transport.kcp.max_sessions`: a new session over it is not opened.
    MaxSessions,
    /// `transport.kcp.max_streams_total`: a proxied stream over it (all sessions) is closed.
    MaxStreamsTotal,
    /// `transport.kcp.max_streams_per_session`: a proxied stream over it (its session) is closed.
    MaxStreamsPerSession,
    /// `transport.kcp.header_timeout`: a stream whose paqet header does not come in time is closed.
    HeaderTimeout,
}

/// Refusals counted per [`LimitKey`], indexed by [`LimitKey::index`].
pub type LimitCounts = [u64; LimitKey::COUNT];

impl LimitKey {
    /// How many keys there are.
    pub const COUNT: usize = 4;

    /// Every key, in [`LimitKey::index`] order.
    pub const ALL: [LimitKey; LimitKey::COUNT] = [
        LimitKey::MaxSessions,
        LimitKey::MaxStreamsTotal,
        LimitKey::MaxStreamsPerSession,
        LimitKey::HeaderTimeout,
    ];

    /// The full configuration key path (the `key` label of `paqet_limit_refusals_total`).
    pub fn key(self) -> &'static str {
        match self {
            LimitKey::MaxSessions => "transport.kcp.max_sessions",
            LimitKey::MaxStreamsTotal => "transport.kcp.max_streams_total",
            LimitKey::MaxStreamsPerSession => "transport.kcp.max_streams_per_session",
            LimitKey::HeaderTimeout => "transport.kcp.header_timeout",
        }
    }

    /// Position in [`LimitKey::ALL`] and in a [`LimitCounts`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `limit` label of the older `paqet_limit_rejections_total` family (both stream limits are
    /// `max_streams` there).
    pub fn legacy_label(self) -> &'static str {
        match self {
            LimitKey::MaxSessions => "max_sessions",
            LimitKey::MaxStreamsTotal | LimitKey::MaxStreamsPerSession => "max_streams",
            LimitKey::HeaderTimeout => "header_timeout",
        }
    }
}

impl std::fmt::Display for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_config_keys_in_index_order() {
        for (i, k) in LimitKey::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert!(
                crate::config::key_info(k.key()).is_some(),
                "{} is not a config key",
                k.key()
            );
        }
    }
}
