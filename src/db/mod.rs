//! PostgreSQL access: the connection pool, embedded migrations, one module of query
//! functions per table, and the change feed. Query functions take `&mut AsyncPgConnection`
//! and return `QueryResult`; the domain decides what runs in which transaction. The schema
//! they run against, with what each function and trigger guarantees:
//! `migrations/schema.sql`.

pub mod audit;
pub mod cached_sql;
pub mod change_feed;
pub mod holds;
pub mod io_thread;
pub mod models;
pub mod movements;
pub mod orders;
pub mod payments;
pub mod products;
pub mod schema;
pub mod waitlist;

use std::sync::Arc;
use std::time::Duration;

use diesel::{ConnectionError, ConnectionResult};
use diesel_async::pooled_connection::deadpool::{BuildError, Object, Pool, PoolError};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolableConnection, RecyclingMethod,
};
use diesel_async::{AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::config::DatabaseConfig;
use io_thread::IoThread;

/// The pool every request borrows its connection from.
pub type DbPool = Pool<AsyncPgConnection>;

/// `application_name` of the pool's connections.
pub const POOL_APPLICATION_NAME: &str = "flashsale";
/// `application_name` of the change feed's connection.
pub const LISTENER_APPLICATION_NAME: &str = "flashsale-listener";

/// The schema, compiled into the binary and applied at start.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Opens one connection; its socket is driven by a task on the current runtime.
pub async fn connect(config: &DatabaseConfig) -> ConnectionResult<AsyncPgConnection> {
    let (client, connection) = config
        .postgres()
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|error| ConnectionError::BadConnection(error.to_string()))?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

/// Builds the connection pool; `timeout` bounds waiting for, opening and recycling a
/// connection, so a database outage surfaces as an error instead of a hang. Connections are
/// opened on `io`, so their socket tasks run there.
pub fn build_pool(
    database: &DatabaseConfig,
    max_size: usize,
    timeout: Duration,
    io: Arc<IoThread>,
) -> Result<DbPool, BuildError> {
    let mut manager_config = ManagerConfig::default();
    // A broken connection is still detected (and dropped) on return to the pool; skipping the
    // test query saves a round trip per call.
    manager_config.recycling_method = RecyclingMethod::Fast;
    let database = database.with_application_name(POOL_APPLICATION_NAME);
    manager_config.custom_setup = Box::new(move |_unused_url| {
        let database = database.clone();
        let opened = io.handle().spawn(async move { connect(&database).await });
        Box::pin(async move {
            opened.await.map_err(|error| {
                ConnectionError::BadConnection(format!("database i/o thread stopped: {error}"))
            })?
        })
    });
    // The manager only hands its URL to `custom_setup`, which connects from the parsed
    // settings instead.
    let manager = AsyncDieselConnectionManager::new_with_config(String::new(), manager_config);
    Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
}

/// Borrows a connection from `pool`, waiting at most the pool's timeout.
pub async fn connection(pool: &DbPool) -> Result<PooledConnection, PoolError> {
    Ok(PooledConnection(Some(pool.get().await?)))
}

/// A pooled connection that, dropped in the middle of a transaction (its call gave up on a
/// database that stopped answering), is closed instead of going back to the pool: closing
/// its socket makes PostgreSQL roll the transaction back and free its row locks at once,
/// instead of whenever the pool next looks at the connection.
pub struct PooledConnection(Option<Object<AsyncPgConnection>>);

impl std::ops::Deref for PooledConnection {
    type Target = AsyncPgConnection;

    fn deref(&self) -> &AsyncPgConnection {
        self.0.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
        self.0.as_mut().expect("present until dropped")
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        if let Some(mut conn) = self.0.take()
            && conn.is_broken()
        {
            drop(Object::take(conn));
        }
    }
}

/// Applies pending migrations over a dedicated connection.
pub async fn run_migrations(
    database: &DatabaseConfig,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let connection = connect(database).await?;
    tokio::task::spawn_blocking(move || {
        let mut harness = AsyncMigrationHarness::new(connection);
        harness.run_pending_migrations(MIGRATIONS).map(|_| ())
    })
    .await??;
    Ok(())
}

/// Round-trips a trivial query: is the database answering?
pub async fn ping(conn: &mut AsyncPgConnection) -> diesel::QueryResult<()> {
    diesel::sql_query("SELECT 1")
        .execute(conn)
        .await
        .map(|_| ())
}

/// Creates database `name` on the server of `server` unless it exists (connecting to the
/// server's `postgres` database). `name` must be a plain identifier (letters, digits,
/// underscores).
pub async fn create_database_if_missing(
    server: &DatabaseConfig,
    name: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(
            format!("database name {name:?} must be letters, digits and underscores").into(),
        );
    }
    let mut conn = connect(&server.with_database("postgres")).await?;
    let exists = diesel::select(
        diesel::dsl::sql::<diesel::sql_types::Bool>(
            "EXISTS (SELECT 1 FROM pg_database WHERE datname = ",
        )
        .bind::<diesel::sql_types::Text, _>(name)
        .sql(")"),
    )
    .get_result::<bool>(&mut conn)
    .await?;
    if !exists {
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}
