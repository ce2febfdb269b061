//! The server's settings, parsed once into types, independent of where they came from
//! (flags, environment, tests).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Where the server keeps its state: a PostgreSQL connection string (a `postgres://` URL or
/// `key=value` pairs), parsed once at startup. Its `Debug` leaves the password out.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// The parsed connection settings; edited through the methods below, never as text.
    inner: tokio_postgres::Config,
}

/// Why a connection string was refused. The message names the setting, never the value
/// (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseConfigError {
    #[error("--database-url (DATABASE_URL) is empty: unset it to use a private PostgreSQL")]
    Empty,
    #[error("--database-url (DATABASE_URL) is not a PostgreSQL connection string: {0}")]
    Malformed(String),
}

impl FromStr for DatabaseConfig {
    type Err = DatabaseConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().is_empty() {
            return Err(DatabaseConfigError::Empty);
        }
        let inner = text
            .parse::<tokio_postgres::Config>()
            .map_err(|error| DatabaseConfigError::Malformed(error.to_string()))?;
        Ok(DatabaseConfig { inner })
    }
}

impl DatabaseConfig {
    /// The same server, another database (e.g. `postgres` to create databases from).
    pub fn with_database(&self, name: &str) -> DatabaseConfig {
        let mut inner = self.inner.clone();
        inner.dbname(name);
        DatabaseConfig { inner }
    }

    /// With an `application_name`, so `pg_stat_activity` tells the server's connections
    /// apart (pool vs. change feed); a name set by the operator is kept.
    pub fn with_application_name(&self, name: &str) -> DatabaseConfig {
        let mut inner = self.inner.clone();
        if inner.get_application_name().is_none() {
            inner.application_name(name);
        }
        DatabaseConfig { inner }
    }

    /// With server-side limits on every statement and every lock wait of the connection
    /// (added to the operator's `options`), so a slow query or a long lock holder turns
    /// into an error instead of a call that hangs.
    pub fn with_timeouts(&self, statement: Duration, lock: Duration) -> DatabaseConfig {
        let mut inner = self.inner.clone();
        let limits = format!(
            "-c statement_timeout={} -c lock_timeout={}",
            statement.as_millis(),
            lock.as_millis()
        );
        let options = match inner.get_options() {
            Some(own) if !own.trim().is_empty() => format!("{own} {limits}"),
            _ => limits,
        };
        inner.options(&options);
        DatabaseConfig { inner }
    }

    /// With the database's silence noticed on every TCP connection: connecting, an
    /// unacknowledged write and an idle socket's keepalive probes each give up after about
    /// `timeout`, so a dead host or a dropped network breaks the connection (and the call
    /// fails UNAVAILABLE) instead of hanging until the kernel's own, much later, limits.
    /// What the connection string set itself is kept.
    pub fn with_liveness(&self, timeout: Duration) -> DatabaseConfig {
        /// tokio-postgres's idle time before the first probe when none is given.
        const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
        let mut inner = self.inner.clone();
        if inner.get_connect_timeout().is_none() {
            inner.connect_timeout(timeout);
        }
        if inner.get_tcp_user_timeout().is_none() {
            inner.tcp_user_timeout(timeout);
        }
        if inner.get_keepalives() && inner.get_keepalives_idle() == DEFAULT_KEEPALIVES_IDLE {
            let probe_every = (timeout / 3).max(Duration::from_secs(1));
            inner.keepalives_idle(probe_every);
            inner.keepalives_interval(probe_every);
            inner.keepalives_retries(3);
        }
        DatabaseConfig { inner }
    }

    /// The database's name, if the connection string gave one.
    pub fn database(&self) -> Option<&str> {
        self.inner.get_dbname()
    }

    /// The parsed settings, to connect with.
    pub fn postgres(&self) -> &tokio_postgres::Config {
        &self.inner
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio_postgres redacts the password.
        self.inner.fmt(f)
    }
}

/// Everything [`crate::server::run`] needs besides its listener and shutdown signal.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// PostgreSQL the server keeps all state in.
    pub database: DatabaseConfig,
    /// How long a hold reserves its units.
    pub hold_ttl: Duration,
    /// How long an order waits for its payment before the reaper cancels it.
    pub payment_ttl: Duration,
    /// The longest ExtendHold may keep a hold, counted from its creation.
    pub hold_max_lifetime: Duration,
    /// How long webhook idempotency keys are kept before the reaper may delete them.
    pub webhook_key_retention: Duration,
    /// Pause between reaper sweeps.
    pub reaper_interval: Duration,
    /// Holds the reaper expires per transaction.
    pub reaper_batch_size: i64,
    /// Largest qty of one hold.
    pub max_qty_per_hold: i64,
    /// Most product ids one WatchAvailability call may name.
    pub max_watched_products: usize,
    /// Queues of coalesced CreateHold calls; each runs one transaction at a time.
    pub hold_batch_lanes: usize,
    /// Connections in the pool (the listener's dedicated connection comes on top).
    pub pool_size: usize,
    /// Longest a call waits on the database (for a connection, then for its answers) before
    /// it fails UNAVAILABLE; also how long health waits for the database's answer, and how
    /// long a silent database socket lives (see [`DatabaseConfig::with_liveness`]).
    pub db_timeout: Duration,
    /// Longest a statement may run on the server's connections.
    pub db_statement_timeout: Duration,
    /// Longest a statement may wait for a lock.
    pub db_lock_timeout: Duration,
    /// How often health re-checks that the database answers.
    pub health_check_interval: Duration,
    /// The tokens callers must present (see [`crate::auth`]); `None`: every caller may
    /// call everything.
    pub tokens_file: Option<PathBuf>,
    /// TLS and the limits every connection lives within.
    pub transport: TransportConfig,
    /// Most unary calls running at once; more are refused RESOURCE_EXHAUSTED at once.
    pub max_in_flight: usize,
    /// Where Prometheus scrapes `/metrics`; `None`: no metrics.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// How callers reach the server: TLS, and the limits that keep one caller's connections
/// from exhausting what the others need.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Certificate and key to serve TLS with; `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// Most connections open at once; past it, new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Most concurrent calls (streams) on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Largest request message accepted, in bytes (larger: `OUT_OF_RANGE`).
    pub max_message_bytes: usize,
    /// Idle time after which the server pings a connection.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

impl TransportConfig {
    /// How long a connection may send nothing before it is closed: a live peer answers the
    /// ping sent after `keepalive_interval` within `keepalive_timeout`.
    pub fn silence_limit(&self) -> Duration {
        self.keepalive_interval
            .saturating_add(self.keepalive_timeout)
    }
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            tls: None,
            max_connections: 10_000,
            max_concurrent_streams: 1024,
            max_message_bytes: 256 * 1024,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// PEM files that turn TLS on.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The certificate's private key.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerConfig {
    /// The defaults for a database; callers override what they need.
    pub fn new(database: DatabaseConfig) -> Self {
        ServerConfig {
            database,
            hold_ttl: Duration::from_secs(120),
            payment_ttl: Duration::from_secs(15 * 60),
            hold_max_lifetime: Duration::from_secs(10 * 60),
            webhook_key_retention: Duration::from_secs(30 * 24 * 3600),
            reaper_interval: Duration::from_secs(1),
            reaper_batch_size: 500,
            max_qty_per_hold: 10,
            max_watched_products: 1000,
            hold_batch_lanes: 1,
            pool_size: 16,
            db_timeout: Duration::from_secs(5),
            db_statement_timeout: Duration::from_secs(30),
            db_lock_timeout: Duration::from_secs(3),
            health_check_interval: Duration::from_secs(5),
            tokens_file: None,
            transport: TransportConfig::default(),
            max_in_flight: 2048,
            metrics_addr: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_or_empty_connection_string_is_refused_naming_the_setting_not_the_value() {
        for url in [
            "",
            "  ",
            "postgres://app:s3cret@db.internal:notaport/flashsale",
        ] {
            let error = url.parse::<DatabaseConfig>().expect_err(url).to_string();
            assert!(
                error.contains("--database-url (DATABASE_URL)"),
                "{url:?}: {error}"
            );
            assert!(!error.contains("s3cret"), "{error}");
        }
        for good in [
            "postgres://postgres@127.0.0.1:5432/flashsale",
            "host=127.0.0.1 user=postgres",
        ] {
            assert!(good.parse::<DatabaseConfig>().is_ok(), "{good}");
        }
    }

    #[test]
    fn edits_keep_the_rest_of_the_settings_and_an_operator_application_name() {
        let config: DatabaseConfig = "postgres://app:s3cret@db:6432/shop?application_name=ops"
            .parse()
            .unwrap();
        let other = config
            .with_database("postgres")
            .with_application_name("flashsale");
        assert_eq!(other.database(), Some("postgres"));
        assert_eq!(other.postgres().get_application_name(), Some("ops"));
        assert_eq!(other.postgres().get_ports(), &[6432]);
        assert_eq!(other.postgres().get_password(), Some(&b"s3cret"[..]));
        assert!(!format!("{other:?}").contains("s3cret"));
        let named = "host=db user=app".parse::<DatabaseConfig>().unwrap();
        let named = named.with_application_name("flashsale");
        assert_eq!(named.postgres().get_application_name(), Some("flashsale"));
    }
}
