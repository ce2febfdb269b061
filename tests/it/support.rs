//! The test harness: a fresh database per test (on `DATABASE_URL`'s server, or on a private
//! PostgreSQL cluster started once per test process from the machine's binaries), the real
//! server on `127.0.0.1:0`, and real tonic clients over the network.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use diesel_async::RunQueryDsl;
use flashsale::config::{DatabaseConfig, ServerConfig};
use flashsale::db;
use flashsale::domain::availability::AvailabilityHub;
use flashsale::grpc::pb::checkout_service_client::CheckoutServiceClient;
use flashsale::grpc::pb::inventory_admin_service_client::InventoryAdminServiceClient;
use flashsale::grpc::pb::{self, AuditInventoryRequest, CreateProductRequest};
use flashsale::local_pg::{LocalPostgres, LocalPostgresOptions};
use tokio::sync::{OnceCell, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

pub type Checkout = CheckoutServiceClient<Channel>;
pub type Admin = InventoryAdminServiceClient<Channel>;

/// The private cluster of this test process, when `DATABASE_URL` is unset.
static CLUSTER: OnceCell<LocalPostgres> = OnceCell::const_new();

/// Name prefix of the private clusters' data directories (and logs) in the temp dir; the
/// test process's pid follows.
const CLUSTER_PREFIX: &str = "flashsale-test-pg-";

/// Removes the clusters (and logs) of earlier test processes that are gone: their
/// postmasters died with them, but the files stay.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(CLUSTER_PREFIX) else {
            continue;
        };
        let pid = rest.trim_end_matches(".log");
        let alive = std::path::Path::new("/proc").join(pid).exists();
        if !alive && pid.chars().all(|c| c.is_ascii_digit()) {
            let path = entry.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
}

/// The URL of the server's maintenance database, where test databases are created.
async fn admin_url() -> String {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return url;
    }
    let cluster = CLUSTER
        .get_or_init(|| async {
            remove_stale_clusters();
            let data_dir =
                std::env::temp_dir().join(format!("{CLUSTER_PREFIX}{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&data_dir);
            LocalPostgres::start(LocalPostgresOptions {
                data_dir,
                durable: false,
                max_connections: 300,
            })
            .await
            .expect("start a private postgresql for the tests (or set DATABASE_URL)")
        })
        .await;
    cluster.url("postgres")
}

/// The migrated database of this test process that every test database is copied from.
static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// Name prefix of the template databases; the test process's pid follows.
const TEMPLATE_PREFIX: &str = "flashsale_template_";

/// Migrates a template database once per test process (dropping those of test processes
/// that are gone) and returns its name.
async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let server = server().await;
            let mut conn = db::connect(&server)
                .await
                .expect("connect to the test server");
            let names: Vec<String> = diesel::dsl::sql::<diesel::sql_types::Text>(
                "SELECT datname FROM pg_database WHERE datname LIKE 'flashsale\\_template\\_%'",
            )
            .load(&mut conn)
            .await
            .expect("list template databases");
            for stale in names.iter().filter(|name| !process_alive(name)) {
                let _ =
                    diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{stale}\" WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
            }
            let name = format!("{TEMPLATE_PREFIX}{}", std::process::id());
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\""))
                .execute(&mut conn)
                .await;
            db::create_database_if_missing(&server, &name)
                .await
                .expect("create the template database");
            db::run_migrations(&server.with_database(&name))
                .await
                .expect("migrate the template database");
            name
        })
        .await
}

/// Whether the test process a template database is named after still runs.
fn process_alive(template: &str) -> bool {
    template
        .strip_prefix(TEMPLATE_PREFIX)
        .is_some_and(|pid| std::path::Path::new("/proc").join(pid).exists())
}

/// The test PostgreSQL server's maintenance database.
async fn server() -> DatabaseConfig {
    admin_url().await.parse().expect("a PostgreSQL URL")
}

/// A database of its own for one test, migrated; dropped when the value is.
pub struct TestDb {
    /// Where tests and server processes connect.
    pub url: String,
    /// The server's maintenance database, where the database is dropped from.
    server: DatabaseConfig,
    /// The database's name.
    name: String,
}

impl TestDb {
    /// A copy of the migrated template.
    pub async fn new() -> TestDb {
        let template = template().await;
        let server = server().await;
        let name = format!("flashsale_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = db::connect(&server)
            .await
            .expect("connect to the test server");
        diesel::sql_query(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
        ))
        .execute(&mut conn)
        .await
        .expect("copy the template database");
        let mut url = url::Url::parse(&admin_url().await)
            .expect("DATABASE_URL must be a postgres:// URL for the tests");
        url.set_path(&name);
        TestDb {
            url: url.into(),
            server,
            name,
        }
    }

    /// Its connection settings.
    pub fn config(&self) -> DatabaseConfig {
        self.server.with_database(&self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs outside any runtime we may block: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = db::connect(&server).await.ok()?;
                diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// The settings tests start from: a quick reaper, the default TTL.
pub fn test_config(database_url: &str) -> ServerConfig {
    ServerConfig {
        reaper_interval: Duration::from_millis(100),
        health_check_interval: Duration::from_millis(200),
        ..ServerConfig::new(database_url.parse().expect("a PostgreSQL URL"))
    }
}

/// A running server on its own database.
pub struct TestServer {
    /// Where the server listens.
    pub addr: SocketAddr,
    /// The settings it runs with.
    pub config: ServerConfig,
    /// The server's availability hub, to see inside (open streams).
    pub hub: Arc<AvailabilityHub>,
    /// Fires the server's graceful shutdown.
    shutdown: Option<oneshot::Sender<()>>,
    /// The server task; its result tells how `run` ended.
    task: Option<JoinHandle<Result<(), flashsale::server::ServerError>>>,
    /// Kept alive as long as any server on it.
    pub db: Arc<TestDb>,
}

impl TestServer {
    /// Starts a server with the test defaults and waits until health says SERVING.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server with adjusted settings and waits until health says SERVING.
    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let db = TestDb::new().await;
        let mut config = test_config(&db.url);
        adjust(&mut config);
        let server = Self::spawn(config, db).await;
        server.wait_serving().await;
        server
    }

    /// Starts a server without waiting for it to become healthy.
    pub async fn spawn(config: ServerConfig, db: impl Into<Arc<TestDb>>) -> TestServer {
        let db = db.into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let app = flashsale::server::App::new(config.clone()).expect("build the server");
        let hub = app.availability();
        let task = tokio::spawn(app.serve(listener, async {
            let _ = stop.await;
        }));
        TestServer {
            addr,
            config,
            hub,
            shutdown: Some(shutdown),
            task: Some(task),
            db,
        }
    }

    /// A second server process-alike on the same database (its own pool, reaper, listener),
    /// healthy when returned.
    pub async fn start_sibling(&self) -> TestServer {
        let server = Self::spawn(self.config.clone(), self.db.clone()).await;
        server.wait_serving().await;
        server
    }

    /// A new HTTP/2 connection to the server.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the test server")
    }

    /// A checkout client on a new connection.
    pub async fn checkout(&self) -> Checkout {
        CheckoutServiceClient::new(self.channel().await)
    }

    /// An admin client on a new connection.
    pub async fn admin(&self) -> Admin {
        InventoryAdminServiceClient::new(self.channel().await)
    }

    /// The overall health status.
    pub async fn health(&self) -> ServingStatus {
        let mut health = HealthClient::new(self.channel().await);
        let response = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check");
        response.into_inner().status()
    }

    /// Waits (up to 30 s) for health to report SERVING.
    pub async fn wait_serving(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.health().await != ServingStatus::Serving {
            assert!(
                tokio::time::Instant::now() < deadline,
                "server never became healthy"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Graceful shutdown; returns how `run` ended.
    pub async fn stop(mut self) -> Result<(), flashsale::server::ServerError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let task = self.task.take().expect("server task");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("server stops within 30 s")
            .expect("server task did not panic")
    }

    /// Creates a product through the admin API.
    pub async fn product(&self, name: &str, price_cents: i64, stock_total: i64) -> pb::Product {
        self.admin()
            .await
            .create_product(CreateProductRequest {
                name: name.into(),
                price_cents,
                stock_total,
            })
            .await
            .expect("create product")
            .into_inner()
    }

    /// Audits every product and asserts the books balance.
    pub async fn assert_consistent(&self) -> pb::AuditInventoryResponse {
        let audit = self
            .admin()
            .await
            .audit_inventory(AuditInventoryRequest {
                product_ids: vec![],
            })
            .await
            .expect("audit")
            .into_inner();
        assert!(
            audit.consistent,
            "inventory audit found inconsistent counters: {audit:#?}"
        );
        audit
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The `google.rpc.ErrorInfo` reason of a failed call.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// The fields a `google.rpc.BadRequest` detail names.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Asserts a call failed with `code` and ErrorInfo `reason`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    expected_reason: &str,
) -> tonic::Status {
    let status = result.expect_err("call should fail");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert_eq!(
        reason(&status),
        expected_reason,
        "unexpected reason: {status:?}"
    );
    status
}

/// Asserts a call failed with INVALID_ARGUMENT naming `field`.
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let status = assert_status(result, tonic::Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(
        bad_fields(&status),
        vec![field.to_string()],
        "field violations: {status:?}"
    );
    assert!(
        status.message().contains(field),
        "message should name {field}: {status:?}"
    );
}

/// Polls `done` every 20 ms until it holds; panics after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
