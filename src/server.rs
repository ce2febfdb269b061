//! Wiring: migrations, pool, background tasks (reaper, change feed, health monitor),
//! the gRPC services with health and reflection, and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;

use crate::auth::Authorizer;
use crate::config::{ServerConfig, TlsFiles, TransportConfig};
use crate::db::change_feed::run_change_feed;
use crate::db::io_thread::IoThread;
use crate::db::{self, DbPool};
use crate::domain::availability::AvailabilityHub;
use crate::domain::reaper::{ReaperSettings, run_reaper};
use crate::domain::{Checkout, CheckoutSettings};
use crate::grpc::admin::AdminApi;
use crate::grpc::checkout::CheckoutApi;
use crate::grpc::guard::{Guarded, admin_scope, checkout_scope};
use crate::grpc::pb::{
    self, checkout_service_server::CheckoutServiceServer,
    inventory_admin_service_server::InventoryAdminServiceServer,
};
use crate::transport::Incoming;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid database configuration: {0}")]
    Pool(#[from] diesel_async::pooled_connection::deadpool::BuildError),
    #[error("cannot start the database i/o thread: {0}")]
    IoThread(#[from] std::io::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("grpc transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tokens(#[from] crate::auth::TokensFileError),
    #[error("cannot serve metrics on --metrics-addr (FLASHSALE_METRICS_ADDR): {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot read the TLS file {path}: {source}")]
    TlsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve TLS with --tls-cert, --tls-key and --tls-client-ca: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("a background task (reaper, change feed, health monitor) ended; see the log")]
    BackgroundTaskFailed,
}

/// How long a client may take to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a connection may reset before the server accepted them, before it is closed
/// (h2's defence against rapid-reset floods).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server may reset on one connection for the client's protocol errors before
/// it is closed.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Serves the API on `listener` until `shutdown` resolves, then drains: health goes
/// NOT_SERVING, streams end, in-flight calls finish, background tasks stop.
///
/// The server accepts calls at once; health reports SERVING only after migrations ran and
/// while the database answers.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    App::new(config)?.serve(listener, shutdown).await
}

/// A server assembled from its settings, not yet serving: what [`run`] runs. Tests build
/// one to look inside (e.g. count open streams) before serving it.
pub struct App {
    /// Settings for the background tasks.
    config: ServerConfig,
    /// Shared by the domain and the health monitor.
    pool: DbPool,
    /// The operations behind both services, the reaper and the stream fan-out.
    checkout: Arc<Checkout>,
    /// Who may call what; re-read on SIGHUP.
    authorizer: Arc<Authorizer>,
}

impl App {
    /// Builds the pool (no connection is opened yet; they will be driven by a database i/o
    /// thread of its own), the domain and the hub.
    pub fn new(mut config: ServerConfig) -> Result<App, ServerError> {
        // Every connection the server opens (pool, change feed, migrations) notices a silent
        // database within the database timeout.
        config.database = config.database.with_liveness(config.db_timeout);
        let io = IoThread::start("flashsale-db-io")?;
        let pool = db::build_pool(
            &config
                .database
                .with_timeouts(config.db_statement_timeout, config.db_lock_timeout),
            config.pool_size,
            config.db_timeout,
            io.clone(),
        )?;
        let settings = CheckoutSettings {
            hold_ttl: config.hold_ttl,
            payment_ttl: config.payment_ttl,
            hold_max_lifetime: config.hold_max_lifetime,
            max_qty_per_hold: config.max_qty_per_hold,
            max_watched_products: config.max_watched_products,
            hold_batch_lanes: config.hold_batch_lanes,
        };
        let checkout = Arc::new(Checkout::new(pool.clone(), settings, io));
        let authorizer = Arc::new(match &config.tokens_file {
            Some(path) => Authorizer::from_file(path)?,
            None => Authorizer::open(),
        });
        Ok(App {
            config,
            pool,
            checkout,
            authorizer,
        })
    }

    /// The fan-out this server's streams share, to look inside (open streams).
    pub fn availability(&self) -> Arc<AvailabilityHub> {
        self.checkout.availability().clone()
    }

    /// Serves until `shutdown` resolves (see [`run`]).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let App {
            config,
            pool,
            checkout,
            authorizer,
        } = self;
        let mut server = server_builder(&config.transport)?;
        if let Some(addr) = config.metrics_addr {
            crate::metrics::install(addr)?;
            tracing::info!(%addr, "serving metrics at /metrics");
        }
        let local_addr = listener.local_addr().ok();
        let tls = config.transport.tls.is_some();
        let incoming = Incoming::new(
            listener,
            config.transport.max_connections,
            config.transport.silence_limit(),
        );
        let max_message = config.transport.max_message_bytes;
        let in_flight = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1)));
        let db_timeout = config.db_timeout;
        let migrated = Arc::new(AtomicBool::new(false));
        let stopping = CancellationToken::new();
        let failed = CancellationToken::new();
        let (health, health_service) = tonic_health::server::health_reporter();
        set_serving(&health, false).await;
        let mut tasks = JoinSet::new();
        if config.tokens_file.is_some() {
            tasks.spawn(reload_tokens_on_sighup(
                authorizer.clone(),
                stopping.clone(),
            ));
        }
        tasks.spawn(start_when_migrated(
            config,
            checkout.clone(),
            pool,
            health.clone(),
            migrated.clone(),
            stopping.clone(),
            failed.clone(),
        ));

        // v1 for current grpcurl; v1alpha for older clients (grpcurl < 1.9, Python's grpcio-reflection).
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let (reflection_v1, reflection_v1alpha) =
            (reflection().build_v1()?, reflection().build_v1alpha()?);
        tracing::info!(addr = ?local_addr, tls, "serving grpc");
        let on_shutdown = {
            let (health, stopping, checkout) = (health.clone(), stopping.clone(), checkout.clone());
            let failed = failed.clone();
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = failed.cancelled() => {}
                }
                tracing::info!("shutting down: draining calls and streams");
                set_serving(&health, false).await;
                checkout.close_streams().await;
                stopping.cancel();
            }
        };
        let served = server
            .add_service(health_service.max_decoding_message_size(max_message))
            .add_service(reflection_v1.max_decoding_message_size(max_message))
            .add_service(reflection_v1alpha.max_decoding_message_size(max_message))
            .add_service(Guarded::new(
                CheckoutServiceServer::new(CheckoutApi::new(checkout.clone()))
                    .max_decoding_message_size(max_message),
                authorizer.clone(),
                checkout_scope,
                in_flight.clone(),
                db_timeout,
                migrated.clone(),
            ))
            .add_service(Guarded::new(
                InventoryAdminServiceServer::new(AdminApi::new(checkout))
                    .max_decoding_message_size(max_message),
                authorizer,
                admin_scope,
                in_flight,
                db_timeout,
                migrated,
            ))
            .serve_with_incoming_shutdown(incoming, on_shutdown)
            .await;
        stopping.cancel();
        while tasks.join_next().await.is_some() {}
        tracing::info!("server stopped");
        served?;
        match failed.is_cancelled() {
            true => Err(ServerError::BackgroundTaskFailed),
            false => Ok(()),
        }
    }
}

/// The HTTP/2 server with the transport's limits, and TLS if configured.
fn server_builder(transport: &TransportConfig) -> Result<Server, ServerError> {
    let server = Server::builder()
        .max_concurrent_streams(transport.max_concurrent_streams)
        .http2_keepalive_interval(Some(transport.keepalive_interval))
        .http2_keepalive_timeout(Some(transport.keepalive_timeout))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    match &transport.tls {
        None => Ok(server),
        Some(files) => server
            .tls_config(tls_config(files)?)
            .map_err(ServerError::Tls),
    }
}

/// The server's certificate and key, and the CA its clients' certificates must be signed
/// by, if mutual TLS is asked for.
fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig, ServerError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServerError::TlsFile {
            path: path.to_owned(),
            source,
        })
    };
    let identity = Identity::from_pem(read(&files.cert)?, read(&files.key)?);
    let mut config = ServerTlsConfig::new()
        .identity(identity)
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(client_ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(client_ca)?));
    }
    Ok(config)
}

/// Applies migrations (retrying while the database is unreachable), sets `migrated` (the
/// guard lets calls through from then on), then starts the background tasks and the health
/// monitor; returns when all of them stopped. One that ends before `stopping` cancels
/// `failed` (see [`supervise`]).
async fn start_when_migrated(
    config: ServerConfig,
    checkout: Arc<Checkout>,
    pool: DbPool,
    health: HealthReporter,
    migrated: Arc<AtomicBool>,
    stopping: CancellationToken,
    failed: CancellationToken,
) {
    if !migrate_with_retries(&config, &stopping).await {
        return;
    }
    migrated.store(true, Ordering::Release);
    let mut tasks = JoinSet::new();
    let reaper = ReaperSettings {
        interval: config.reaper_interval,
        batch_size: config.reaper_batch_size,
        webhook_key_retention: config.webhook_key_retention,
    };
    tasks.spawn(run_reaper(checkout.clone(), reaper, stopping.clone()));
    let releaser = checkout.clone();
    let releasing = stopping.clone();
    tasks.spawn(async move { releaser.release_orphaned_holds(releasing).await });
    tasks.spawn(monitor_health(
        pool,
        checkout.clone(),
        health,
        config.health_check_interval,
        config.db_timeout,
        stopping.clone(),
    ));
    tasks.spawn(run_change_feed(
        config.database.clone(),
        checkout.session(),
        stopping.clone(),
        move |event| checkout.on_feed_event(event),
    ));
    supervise(tasks, &stopping, &failed).await;
}

/// Waits for `tasks`, which run until `stopping`. One that ends before (it panicked: they
/// retry what fails) cancels `failed`: the server stops, rather than serve on without its
/// reaper or change feed, and exits non-zero for its supervisor to start it again.
async fn supervise(
    mut tasks: JoinSet<()>,
    stopping: &CancellationToken,
    failed: &CancellationToken,
) {
    while let Some(ended) = tasks.join_next().await {
        if !stopping.is_cancelled() {
            tracing::error!(?ended, "a background task ended before shutdown; stopping");
            failed.cancel();
        }
    }
}

/// Runs migrations until they succeed (retrying with backoff while the database is
/// unreachable); `false` if shutdown came first.
async fn migrate_with_retries(config: &ServerConfig, stopping: &CancellationToken) -> bool {
    let mut backoff = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .build();
    loop {
        match db::run_migrations(&config.database).await {
            Ok(()) => {
                tracing::info!("migrations applied");
                return true;
            }
            Err(error) => tracing::warn!(%error, "cannot migrate the database yet; retrying"),
        }
        let pause = backoff.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = stopping.cancelled() => return false,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Re-reads the tokens file on every SIGHUP until shutdown; a file that fails to parse
/// keeps the tokens in force, and the log says why.
async fn reload_tokens_on_sighup(authorizer: Arc<Authorizer>, stopping: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP: tokens are not re-read until a restart");
        return;
    };
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = hangups.recv() => {}
        }
        match authorizer.reload() {
            Ok(tokens) => tracing::info!(tokens, "tokens file re-read"),
            Err(error) => {
                tracing::error!(%error, "tokens file not re-read; the tokens in force stay")
            }
        }
    }
}

/// Keeps health in step with the database: SERVING while it answers, NOT_SERVING when not.
async fn monitor_health(
    pool: DbPool,
    checkout: Arc<Checkout>,
    health: HealthReporter,
    interval: Duration,
    ping_timeout: Duration,
    stopping: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    let mut serving = None;
    loop {
        tokio::select! {
            _ = stopping.cancelled() => break,
            _ = ticker.tick() => {}
        }
        // A hung database (or a dead socket nobody noticed) must not leave health SERVING.
        let check = async {
            match db::connection(&pool).await {
                Ok(mut conn) => db::ping(&mut conn).await.is_ok(),
                Err(_) => false,
            }
        };
        let answers = tokio::time::timeout(ping_timeout, check)
            .await
            .unwrap_or(false);
        let status = pool.status();
        crate::metrics::pool_connections(
            status.size.saturating_sub(status.available),
            status.available,
            status.waiting,
        );
        crate::metrics::watch_streams(checkout.availability().open_streams());
        if serving != Some(answers) && !stopping.is_cancelled() {
            tracing::info!(serving = answers, "health changed");
            set_serving(&health, answers).await;
            serving = Some(answers);
        }
    }
}

/// Sets the overall status ("") and each service's status.
async fn set_serving(health: &HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    use tonic::server::NamedService;
    for service in [
        "",
        <CheckoutServiceServer<CheckoutApi> as NamedService>::NAME,
        <InventoryAdminServiceServer<AdminApi> as NamedService>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_background_task_that_dies_stops_the_server() {
        let (stopping, failed) = (CancellationToken::new(), CancellationToken::new());
        let mut tasks = JoinSet::new();
        let running = stopping.clone();
        tasks.spawn(async move { running.cancelled().await });
        tasks.spawn(async { panic!("a bug") });
        let supervised = tokio::spawn({
            let (stopping, failed) = (stopping.clone(), failed.clone());
            async move { supervise(tasks, &stopping, &failed).await }
        });

        tokio::time::timeout(Duration::from_secs(10), failed.cancelled())
            .await
            .expect("the dead task is noticed");
        stopping.cancel();
        supervised.await.unwrap();
    }

    #[tokio::test]
    async fn tasks_ending_at_shutdown_are_no_failure() {
        let (stopping, failed) = (CancellationToken::new(), CancellationToken::new());
        let mut tasks = JoinSet::new();
        for _ in 0..3 {
            let running = stopping.clone();
            tasks.spawn(async move { running.cancelled().await });
        }
        stopping.cancel();
        supervise(tasks, &stopping, &failed).await;
        assert!(!failed.is_cancelled());
    }
}
