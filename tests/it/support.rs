//! The test harness: a fresh database per test (on `DATABASE_URL`'s server, or on a private
//! PostgreSQL cluster started once per test process from the machine's binaries), the real
//! server on `127.0.0.1:0`, and real tonic clients over the network; then the calls the tests
//! share (hold, order, pay...) and the assertions on their answers.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use diesel_async::RunQueryDsl;
use flashsale::config::{DatabaseConfig, ServerConfig};
use flashsale::db;
use flashsale::domain::availability::AvailabilityHub;
use flashsale::grpc::pb::checkout_service_client::CheckoutServiceClient;
use flashsale::grpc::pb::handle_payment_webhook_request::Target;
use flashsale::grpc::pb::inventory_admin_service_client::InventoryAdminServiceClient;
use flashsale::grpc::pb::{
    self, AuditInventoryRequest, CreateHoldRequest, CreateOrderRequest, CreateProductRequest,
    GetHoldRequest, GetOrderRequest, GetProductRequest, HandlePaymentWebhookRequest, PaymentResult,
    ReleaseHoldRequest,
};
use flashsale::local_pg::{LocalPostgres, LocalPostgresOptions};
use tokio::process::{Child, Command};
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

    /// A database on a cluster the test owns, which goes with the cluster: nothing to drop.
    pub fn on_own_cluster(url: String) -> TestDb {
        TestDb {
            server: url.parse().expect("a PostgreSQL URL"),
            url,
            name: String::new(),
        }
    }

    /// Its connection settings.
    pub fn config(&self) -> DatabaseConfig {
        self.server.with_database(&self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
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

    /// Its URL, `http://` and its address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new HTTP/2 connection to the server.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
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
                request_id: String::new(),
                name: name.into(),
                price_cents,
                stock_total,
                ..Default::default()
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

// ---------------------------------------------------------------------------------------
// The calls tests share: requests built from a few values, and answers unwrapped where a
// refusal would be the test's failure (the `try_` forms return what the server answered).
// ---------------------------------------------------------------------------------------

/// CreateHold of `qty` units without a client request id; panics if the server refuses.
pub async fn hold(checkout: &mut Checkout, product_id: &str, qty: i64) -> pb::Hold {
    try_hold(checkout, product_id, qty, None)
        .await
        .expect("create hold")
}

/// CreateHold of `qty` units, with a client request id or none, as the server answered.
pub async fn try_hold(
    checkout: &mut Checkout,
    product_id: &str,
    qty: i64,
    client_request_id: Option<&str>,
) -> Result<pb::Hold, tonic::Status> {
    checkout
        .create_hold(CreateHoldRequest {
            product_id: product_id.into(),
            qty,
            client_request_id: client_request_id.unwrap_or_default().into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A pending order of `qty` units: a new hold on the product, turned into an order.
pub async fn pending_order(checkout: &mut Checkout, product_id: &str, qty: i64) -> pb::Order {
    let hold = hold(checkout, product_id, qty).await;
    order(checkout, &hold.hold_id).await
}

/// CreateOrder for a hold, as the server answered.
pub async fn try_order(checkout: &mut Checkout, hold_id: &str) -> Result<pb::Order, tonic::Status> {
    checkout
        .create_order(CreateOrderRequest {
            hold_id: hold_id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// CreateOrder for a hold; panics if the server refuses.
pub async fn order(checkout: &mut Checkout, hold_id: &str) -> pb::Order {
    try_order(checkout, hold_id).await.expect("create order")
}

/// ReleaseHold, as the server answered.
pub async fn try_release(
    checkout: &mut Checkout,
    hold_id: &str,
) -> Result<pb::Hold, tonic::Status> {
    checkout
        .release_hold(ReleaseHoldRequest {
            hold_id: hold_id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// ReleaseHold; panics if the server refuses.
pub async fn release(checkout: &mut Checkout, hold_id: &str) -> pb::Hold {
    try_release(checkout, hold_id).await.expect("release hold")
}

/// GetHold; panics if the server refuses.
pub async fn get_hold(checkout: &mut Checkout, hold_id: &str) -> pb::Hold {
    checkout
        .get_hold(GetHoldRequest {
            hold_id: hold_id.into(),
        })
        .await
        .expect("get hold")
        .into_inner()
}

/// GetOrder; panics if the server refuses.
pub async fn get_order(checkout: &mut Checkout, order_id: &str) -> pb::Order {
    checkout
        .get_order(GetOrderRequest {
            order_id: order_id.into(),
        })
        .await
        .expect("get order")
        .into_inner()
}

/// GetProduct: the product as stored right now; panics if the server refuses.
pub async fn get_product(checkout: &mut Checkout, product_id: &str) -> pb::Product {
    checkout
        .get_product(GetProductRequest {
            product_id: product_id.into(),
        })
        .await
        .expect("get product")
        .into_inner()
}

/// A webhook aimed at an order.
pub fn on_order(order_id: &str) -> Target {
    Target::OrderId(order_id.into())
}

/// A webhook aimed at a hold (payment started before the order existed).
pub fn on_hold(hold_id: &str) -> Target {
    Target::HoldId(hold_id.into())
}

/// A successful payment webhook reporting the amount charged.
pub fn success(key: &str, target: Target, amount_cents: i64) -> HandlePaymentWebhookRequest {
    HandlePaymentWebhookRequest {
        idempotency_key: key.into(),
        target: Some(target),
        result: PaymentResult::Success.into(),
        failure_reason: String::new(),
        amount_cents,
    }
}

/// A failed payment webhook that reports no amount.
pub fn failure(key: &str, target: Target, reason: &str) -> HandlePaymentWebhookRequest {
    HandlePaymentWebhookRequest {
        idempotency_key: key.into(),
        target: Some(target),
        result: PaymentResult::Failure.into(),
        failure_reason: reason.into(),
        amount_cents: 0,
    }
}

/// The same webhook reporting `amount_cents`.
pub fn with_amount(
    webhook: HandlePaymentWebhookRequest,
    amount_cents: i64,
) -> HandlePaymentWebhookRequest {
    HandlePaymentWebhookRequest {
        amount_cents,
        ..webhook
    }
}

/// Delivers a webhook, as the server answered.
pub async fn try_deliver(
    checkout: &mut Checkout,
    webhook: HandlePaymentWebhookRequest,
) -> Result<pb::HandlePaymentWebhookResponse, tonic::Status> {
    checkout
        .handle_payment_webhook(webhook)
        .await
        .map(tonic::Response::into_inner)
}

/// Delivers a webhook; panics if the server refuses.
pub async fn deliver(
    checkout: &mut Checkout,
    webhook: HandlePaymentWebhookRequest,
) -> pb::HandlePaymentWebhookResponse {
    try_deliver(checkout, webhook).await.expect("webhook")
}

/// Pays an order: a successful payment webhook under `key`; panics if the server refuses.
pub async fn pay(
    checkout: &mut Checkout,
    order: &pb::Order,
    key: &str,
) -> pb::HandlePaymentWebhookResponse {
    deliver(
        checkout,
        success(key, on_order(&order.order_id), order.total_cents),
    )
    .await
}

/// Declines an order's payment: a failed payment webhook under `key`; panics if the server
/// refuses.
pub async fn decline(
    checkout: &mut Checkout,
    order: &pb::Order,
    key: &str,
    reason: &str,
) -> pb::HandlePaymentWebhookResponse {
    deliver(checkout, failure(key, on_order(&order.order_id), reason)).await
}

/// Sleeps until a moment (a hold's `expires_at`) has passed by this machine's clock, which
/// is the database's clock too (same host), plus a small margin.
pub async fn sleep_past(moment: Option<prost_types::Timestamp>) {
    let moment = moment.expect("timestamp set");
    let moment = SystemTime::try_from(moment).expect("valid timestamp");
    let left = moment.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
}

// ---------------------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------------------

/// A product's stock counters, written as they read:
/// `Counters::stock(10).reserved(3).sold(2)`. The units available are what the three leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    stock_total: i64,
    reserved: i64,
    sold: i64,
}

impl Counters {
    /// `stock_total` units, none reserved or sold (until said otherwise).
    pub fn stock(stock_total: i64) -> Counters {
        Counters {
            stock_total,
            reserved: 0,
            sold: 0,
        }
    }

    /// These counters with `reserved` units reserved.
    pub fn reserved(self, reserved: i64) -> Counters {
        Counters { reserved, ..self }
    }

    /// These counters with `sold` units sold.
    pub fn sold(self, sold: i64) -> Counters {
        Counters { sold, ..self }
    }

    /// The units these counters leave available.
    fn available(&self) -> i64 {
        self.stock_total - self.reserved - self.sold
    }
}

/// Anything that shows a product's counters: the product, an availability update, an audit.
pub trait ShowsCounters: std::fmt::Debug {
    /// The counters shown, and the units shown available beside them.
    fn shown(&self) -> (Counters, i64);
}

/// Implements [`ShowsCounters`] for messages with the four counter fields.
macro_rules! shows_counters {
    ($($message:ty),*) => {$(
        impl ShowsCounters for $message {
            fn shown(&self) -> (Counters, i64) {
                let counters = Counters::stock(self.stock_total)
                    .reserved(self.reserved)
                    .sold(self.sold);
                (counters, self.available)
            }
        }
    )*};
}

shows_counters!(pb::Product, pb::AvailabilityUpdate, pb::StockCounters);

/// A product, named by itself or by its id.
pub trait ProductRef {
    fn product_id(&self) -> &str;
}

impl ProductRef for pb::Product {
    fn product_id(&self) -> &str {
        &self.id
    }
}

impl ProductRef for String {
    fn product_id(&self) -> &str {
        self
    }
}

/// How the counters `shown` differ from `expected` (and the units they leave available), if
/// they do.
fn counters_mismatch(shown: &impl ShowsCounters, expected: Counters) -> Option<String> {
    let (counters, available) = shown.shown();
    let wanted = expected.available();
    ((counters, available) != (expected, wanted)).then(|| {
        format!(
            "expected {expected:?}, available {wanted}\n   found {counters:?}, available \
             {available}\n      in {shown:?}"
        )
    })
}

/// Reads the product fresh (GetProduct on a new connection to `server`) and asserts it shows
/// exactly these counters and the units they leave available; prints both on a mismatch, with
/// the line that asserted. Returns the product as read.
#[track_caller]
pub fn assert_counters(
    server: &TestServer,
    product: &(impl ProductRef + ?Sized),
    expected: Counters,
) -> impl Future<Output = pb::Product> {
    let caller = std::panic::Location::caller();
    let product_id = product.product_id().to_owned();
    async move {
        let product = get_product(&mut server.checkout().await, &product_id).await;
        if let Some(mismatch) = counters_mismatch(&product, expected) {
            panic!("counters of product {product_id} differ (asserted at {caller}):\n{mismatch}");
        }
        product
    }
}

/// Asserts `shown` (a product, an update or an audit's counters, as received) shows exactly
/// these counters and the units they leave available; prints both on a mismatch.
#[track_caller]
pub fn assert_counters_shown(shown: &impl ShowsCounters, expected: Counters) {
    if let Some(mismatch) = counters_mismatch(shown, expected) {
        panic!("counters differ:\n{mismatch}");
    }
}

// ---------------------------------------------------------------------------------------
// Assertions.
// ---------------------------------------------------------------------------------------

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

/// Whether a call failed with INVALID_ARGUMENT naming `field`, alone, in its
/// `google.rpc.BadRequest` detail and in its message; what is wrong if not.
pub fn check_invalid<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    field: &str,
) -> Result<(), String> {
    let status = match result {
        Ok(answer) => return Err(format!("accepted: {answer:?}")),
        Err(status) => status,
    };
    if status.code() != tonic::Code::InvalidArgument || reason(&status) != "INVALID_ARGUMENT" {
        return Err(format!("unexpected status: {status:?}"));
    }
    let named = bad_fields(&status);
    if named != [field] {
        return Err(format!("field violations name {named:?}: {status:?}"));
    }
    if !status.message().contains(field) {
        return Err(format!("message should name {field}: {status:?}"));
    }
    Ok(())
}

/// Asserts a call failed with INVALID_ARGUMENT naming `field` (see [`check_invalid`]).
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    if let Err(problem) = check_invalid(result, field) {
        panic!("{problem}");
    }
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

/// A `flashsale serve` process of its own, killed when dropped.
pub struct ServerProcess {
    /// The running binary.
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl ServerProcess {
    /// Starts the real binary on `database_url` with a short hold TTL and a quick reaper, and
    /// waits until its health says SERVING.
    pub async fn start(database_url: &str) -> ServerProcess {
        Self::start_with(database_url, &[]).await
    }

    /// [`ServerProcess::start`] with more environment variables.
    pub async fn start_with(database_url: &str, env: &[(&str, &str)]) -> ServerProcess {
        Self::start_limited(database_url, env, None).await
    }

    /// [`ServerProcess::start_with`], allowed at most `open_files` file descriptors (soft
    /// and hard limit) if given.
    pub async fn start_limited(
        database_url: &str,
        env: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> ServerProcess {
        Self::launch(Some(database_url), env, open_files, None).await
    }

    /// [`ServerProcess::start_with`], its standard output (the log) written to `log`.
    pub async fn start_logging(
        database_url: &str,
        env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> ServerProcess {
        Self::launch(Some(database_url), env, None, Some(log)).await
    }

    /// The binary with no `DATABASE_URL`, on the private PostgreSQL it starts in
    /// `pg_data_dir`, its log written to `log`.
    pub async fn start_private(
        pg_data_dir: &std::path::Path,
        log: &std::path::Path,
    ) -> ServerProcess {
        let data_dir = pg_data_dir.to_str().expect("a UTF-8 path");
        Self::launch(
            None,
            &[("FLASHSALE_PG_DATA_DIR", data_dir)],
            None,
            Some(log),
        )
        .await
    }

    /// Starts the binary (see the constructors above) and waits until it is healthy.
    async fn launch(
        database_url: Option<&str>,
        env: &[(&str, &str)],
        open_files: Option<u64>,
        log: Option<&std::path::Path>,
    ) -> ServerProcess {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_flashsale"));
        if let Some(open_files) = open_files {
            let limit = libc::rlimit {
                rlim_cur: open_files,
                rlim_max: open_files,
            };
            // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                });
            }
        }
        match database_url {
            Some(url) => command.env("DATABASE_URL", url),
            None => command.env_remove("DATABASE_URL"),
        };
        let child = command
            .args(["serve", "--listen-addr", &format!("127.0.0.1:{port}")])
            .env("FLASHSALE_HOLD_TTL", "1s")
            .env("FLASHSALE_REAPER_INTERVAL", "50ms")
            .env("FLASHSALE_REAPER_BATCH_SIZE", "7")
            .env("RUST_LOG", "warn")
            // No metrics endpoint unless a test asks: parallel servers would share its port.
            .env("FLASHSALE_METRICS_ADDR", "")
            .envs(env.iter().copied())
            .stdout(match log {
                Some(path) => {
                    Stdio::from(std::fs::File::create(path).expect("create the log file"))
                }
                None => Stdio::null(),
            })
            .kill_on_drop(true)
            .spawn()
            .expect("spawn flashsale serve");
        let process = ServerProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        process.wait_serving().await;
        process
    }

    /// Polls health until SERVING (30 s at most).
    pub async fn wait_serving(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = Channel::from_shared(self.url.clone())
                .unwrap()
                .connect()
                .await
            {
                let mut health = HealthClient::new(channel);
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                if let Ok(response) = health.check(request).await
                    && response.into_inner().status() == ServingStatus::Serving
                {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server process never became healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A checkout client of this process.
    pub async fn checkout(&self) -> Checkout {
        CheckoutServiceClient::connect(self.url.clone())
            .await
            .expect("connect")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id().expect("running") as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(pid, signal) };
    }

    /// How the process exited, if it did within `patience`.
    pub async fn exited_within(&mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(patience, self.child.wait())
            .await
            .ok()
            .map(|status| status.expect("wait"))
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("server exits within 30 s after SIGTERM")
            .expect("wait");
        assert!(status.success(), "server exited with {status}");
    }
}

/// Seconds from one timestamp to another (both must be set).
pub fn seconds_between(
    from: Option<prost_types::Timestamp>,
    to: Option<prost_types::Timestamp>,
) -> f64 {
    let at = |t: Option<prost_types::Timestamp>| {
        let t = t.expect("timestamp set");
        t.seconds as f64 + f64::from(t.nanos) / 1e9
    };
    at(to) - at(from)
}

/// Whether some session of this database waits for a lock.
pub async fn waiting_on_locks(database_url: &str) -> bool {
    count(
        database_url,
        "SELECT count(*) AS count FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .await
        > 0
}

/// The one int8 column `count` of the one row `query` returns, read on a connection of
/// its own to the test's database.
pub async fn count(database_url: &str, query: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    let mut conn =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(database_url)
            .await
            .unwrap();
    let row: Count = diesel::sql_query(query)
        .get_result(&mut conn)
        .await
        .unwrap_or_else(|error| panic!("{query}: {error}"));
    row.count
}

/// A transaction holding the row locks of `ids` in `table`, as a long transaction would.
pub async fn lock_rows(
    server: &TestServer,
    table: &str,
    ids: &[String],
) -> diesel_async::AsyncPgConnection {
    let mut conn = <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
        &server.db.url,
    )
    .await
    .unwrap();
    diesel::sql_query("BEGIN").execute(&mut conn).await.unwrap();
    for id in ids {
        diesel::sql_query(format!("SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE"))
            .bind::<diesel::sql_types::Uuid, _>(uuid::Uuid::parse_str(id).unwrap())
            .execute(&mut conn)
            .await
            .unwrap();
    }
    conn
}

/// Ends the transaction of [`lock_rows`].
pub async fn commit(conn: &mut diesel_async::AsyncPgConnection) {
    diesel::sql_query("COMMIT").execute(conn).await.unwrap();
}

/// The postmaster of a cluster a test started and its children (PostgreSQL's children leave
/// the postmaster's process group, so a signal must go to each).
pub fn cluster_processes(cluster: &flashsale::local_pg::LocalPostgres) -> Vec<u32> {
    let postmaster = cluster.pid().expect("running");
    let mut pids = vec![postmaster];
    pids.extend(children_of(postmaster));
    pids
}

/// The processes whose parent is `parent`, from /proc.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The field after the command name (in parentheses) is the state, then the ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

/// Sends `signal` to each of `pids`.
pub fn signal_all(pids: &[u32], signal: libc::c_int) {
    for &pid in pids {
        // SAFETY: kill(2) on processes of the cluster this test started.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
}
