//! The server's settings, independent of where they came from (flags, environment, tests).

use std::time::Duration;

/// Everything [`crate::server::run`] needs besides its listener and shutdown signal.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// PostgreSQL the server keeps all state in.
    pub database_url: String,
    /// How long a hold reserves its units.
    pub hold_ttl: Duration,
    /// Pause between reaper sweeps.
    pub reaper_interval: Duration,
    /// Holds the reaper expires per transaction.
    pub reaper_batch_size: i64,
    /// Largest qty of one hold.
    pub max_qty_per_hold: i64,
    /// Queues of coalesced CreateHold calls; each runs one transaction at a time.
    pub hold_batch_lanes: usize,
    /// Connections in the pool (the listener's dedicated connection comes on top).
    pub pool_size: usize,
    /// Longest wait for a pooled connection (or a new one) before a call fails UNAVAILABLE.
    pub db_timeout: Duration,
    /// How often health re-checks that the database answers.
    pub health_check_interval: Duration,
}

impl ServerConfig {
    /// The defaults for a database; callers override what they need.
    pub fn new(database_url: impl Into<String>) -> Self {
        ServerConfig {
            database_url: database_url.into(),
            hold_ttl: Duration::from_secs(120),
            reaper_interval: Duration::from_secs(1),
            reaper_batch_size: 500,
            max_qty_per_hold: 10,
            hold_batch_lanes: 1,
            pool_size: 16,
            db_timeout: Duration::from_secs(5),
            health_check_interval: Duration::from_secs(5),
        }
    }
}
