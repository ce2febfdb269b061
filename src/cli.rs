//! The `flashsale` command line: `serve` runs the server, `seed` adds demo products. Every
//! flag can also come from the environment variable named in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::auth::Scope;
use crate::config::{DatabaseConfig, ServerConfig, TlsFiles, TransportConfig};
use crate::db;
use crate::grpc::pb::CreateProductRequest;
use crate::grpc::pb::inventory_admin_service_client::InventoryAdminServiceClient;
use crate::local_pg::{LocalPostgres, LocalPostgresOptions};

/// Any failure of a command, reported as `error: ...`.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// Database the server creates in its private PostgreSQL.
const LOCAL_DATABASE: &str = "flashsale";

#[derive(Debug, Parser)]
#[command(
    name = "flashsale",
    version,
    about = "gRPC inventory and checkout server for flash sales"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Add demo products through a running server's admin API and print them.
    Seed(SeedArgs),
    /// Print a new random token on the first line and its [[token]] entry for the tokens
    /// file after it.
    Token(TokenArgs),
}

/// Where the data lives.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL. Unset: start a private PostgreSQL from the machine's binaries in
    /// --pg-data-dir (kept across restarts) and stop it on exit.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Data directory of the private PostgreSQL used when DATABASE_URL is unset.
    #[arg(long, env = "FLASHSALE_PG_DATA_DIR", default_value = ".flashsale/pg")]
    pub pg_data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    /// The server to seed.
    #[arg(
        long,
        env = "FLASHSALE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// A token with the admin scope, for a server with a tokens file.
    #[arg(long, env = "FLASHSALE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The token's name, shown in logs instead of the token.
    #[arg(long, value_parser = crate::auth::parse_token_name)]
    pub name: String,
    /// What the token may do: checkout, payments or admin (repeat for several).
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Address the gRPC server listens on.
    #[arg(long, env = "FLASHSALE_LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    pub listen_addr: SocketAddr,
    /// How long a hold reserves its units (e.g. 90s, 2m).
    #[arg(long, env = "FLASHSALE_HOLD_TTL", default_value = "2m", value_parser = humantime::parse_duration)]
    pub hold_ttl: Duration,
    /// The longest ExtendHold may keep a hold, counted from its creation (at least the hold TTL).
    #[arg(long, env = "FLASHSALE_HOLD_MAX_LIFETIME", default_value = "10m", value_parser = humantime::parse_duration)]
    pub hold_max_lifetime: Duration,
    /// How long an order waits for its payment before it is cancelled (e.g. 15m).
    #[arg(long, env = "FLASHSALE_PAYMENT_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub payment_ttl: Duration,
    /// How long webhook idempotency keys are kept (payment providers retry for days).
    #[arg(long, env = "FLASHSALE_WEBHOOK_KEY_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub webhook_key_retention: Duration,
    /// Pause between reaper sweeps for expired holds.
    #[arg(long, env = "FLASHSALE_REAPER_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reaper_interval: Duration,
    /// Holds the reaper expires per transaction.
    #[arg(long, env = "FLASHSALE_REAPER_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub reaper_batch_size: i64,
    /// Largest qty one hold may take.
    #[arg(long, env = "FLASHSALE_MAX_QTY_PER_HOLD", default_value_t = 10, value_parser = clap::value_parser!(i64).range(1..=crate::domain::MAX_QTY_PER_HOLD))]
    pub max_qty_per_hold: i64,
    /// Most product ids one WatchAvailability call may name.
    #[arg(long, env = "FLASHSALE_MAX_WATCHED_PRODUCTS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_watched_products: u32,
    /// Independent queues of coalesced CreateHold calls (each runs one transaction at a time).
    #[arg(long, env = "FLASHSALE_HOLD_BATCH_LANES", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub hold_batch_lanes: u16,
    /// Database connections in the pool.
    #[arg(long, env = "FLASHSALE_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub pool_size: u16,
    /// The tokens callers must present (TOML, hashes only; re-read on SIGHUP). Unset: every
    /// caller may call everything, allowed on loopback addresses only.
    #[arg(long, env = "FLASHSALE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Serve without a tokens file on a non-loopback address.
    #[arg(long, env = "FLASHSALE_ALLOW_UNAUTHENTICATED", default_value_t = false)]
    pub allow_unauthenticated: bool,
    /// Longest a call waits on the database (a connection, then its answers) before it
    /// fails UNAVAILABLE; also bounds the health check's ping and a silent database socket.
    #[arg(long, env = "FLASHSALE_DB_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_timeout: Duration,
    /// Longest a statement may run on the server's database connections.
    #[arg(long, env = "FLASHSALE_DB_STATEMENT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub db_statement_timeout: Duration,
    /// Longest a statement may wait for a row lock (then the call fails ABORTED, to retry);
    /// keep it below --db-timeout, which bounds the whole call.
    #[arg(long, env = "FLASHSALE_DB_LOCK_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub db_lock_timeout: Duration,
    /// The server's TLS certificate chain (PEM); with --tls-key, serves TLS only.
    #[arg(long, env = "FLASHSALE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "FLASHSALE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A CA (PEM): clients must present a certificate it signed (mutual TLS).
    #[arg(long, env = "FLASHSALE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Where Prometheus scrapes /metrics; empty turns metrics off.
    #[arg(long, env = "FLASHSALE_METRICS_ADDR", default_value = "127.0.0.1:9464", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// Most unary calls running at once; more are refused with RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "FLASHSALE_MAX_IN_FLIGHT", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight: u32,
    /// Most connections open at once; more wait in the kernel's backlog.
    #[arg(long, env = "FLASHSALE_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Most concurrent calls (HTTP/2 streams) on one connection.
    #[arg(long, env = "FLASHSALE_MAX_CONCURRENT_STREAMS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_streams: u32,
    /// Largest request message, in bytes; larger ones are refused with OUT_OF_RANGE.
    #[arg(long, env = "FLASHSALE_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u32).range(4096..=64 * 1024 * 1024))]
    pub max_message_bytes: u32,
    /// Idle time after which the server pings a connection to see that its peer is alive.
    #[arg(long, env = "FLASHSALE_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// How long such a ping may go unanswered before the connection is closed. A connection
    /// that sends nothing for the interval plus this (one that never starts HTTP/2) is
    /// closed too.
    #[arg(long, env = "FLASHSALE_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,
}

impl ServeArgs {
    /// The server settings for a resolved database.
    fn server_config(&self, database: DatabaseConfig) -> ServerConfig {
        ServerConfig {
            hold_ttl: self.hold_ttl,
            payment_ttl: self.payment_ttl,
            hold_max_lifetime: self.hold_max_lifetime,
            webhook_key_retention: self.webhook_key_retention,
            reaper_interval: self.reaper_interval,
            reaper_batch_size: self.reaper_batch_size,
            max_qty_per_hold: self.max_qty_per_hold,
            max_watched_products: self.max_watched_products as usize,
            tokens_file: self.tokens_file.clone(),
            hold_batch_lanes: self.hold_batch_lanes.into(),
            pool_size: self.pool_size.into(),
            db_timeout: self.db_timeout,
            db_statement_timeout: self.db_statement_timeout,
            db_lock_timeout: self.db_lock_timeout,
            transport: self.transport_config(),
            max_in_flight: self.max_in_flight as usize,
            metrics_addr: self.metrics_addr.0,
            ..ServerConfig::new(database)
        }
    }

    /// TLS and the connection limits.
    fn transport_config(&self) -> TransportConfig {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        };
        TransportConfig {
            tls,
            max_connections: self.max_connections as usize,
            max_concurrent_streams: self.max_concurrent_streams,
            max_message_bytes: self.max_message_bytes as usize,
            keepalive_interval: self.http2_keepalive_interval,
            keepalive_timeout: self.http2_keepalive_timeout,
        }
    }
}

/// Parses the command line, runs the command, and turns failure into exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run_command("info", async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Seed(args) => seed(args).await,
            Command::Token(args) => token(args),
        }
    })
}

/// Where the metrics are served, if anywhere (`--metrics-addr`; empty: nowhere).
#[derive(Debug, Clone, Copy)]
pub struct MetricsAddr(Option<SocketAddr>);

/// An address for the metrics endpoint; empty means none.
fn parse_metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    match text.trim() {
        "" => Ok(MetricsAddr(None)),
        addr => addr
            .parse()
            .map(|addr| MetricsAddr(Some(addr)))
            .map_err(|error| format!("not an address (host:port): {error}")),
    }
}

/// Environment variable choosing the log format: `text` (the default) or `json` (one JSON
/// object per line).
const LOG_FORMAT_ENV: &str = "FLASHSALE_LOG_FORMAT";

/// What a command line does once parsed (this binary's and `flashsale-tools`'): logs to
/// stderr filtered by `RUST_LOG` (else `default_log`), runs `command` on a multi-threaded
/// runtime, and reports failure as `error: ...` with exit code 1.
pub fn run_command(
    default_log: &str,
    command: impl Future<Output = Result<(), CliError>>,
) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_log.into());
    match std::env::var(LOG_FORMAT_ENV).as_deref() {
        Ok("json") => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        Ok("text") | Err(std::env::VarError::NotPresent) => {
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_ansi(std::io::stdout().is_terminal())
                .with_env_filter(filter)
                .init()
        }
        Ok(_) | Err(_) => {
            eprintln!("error: {LOG_FORMAT_ENV} must be json or text");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `flashsale token`.
fn token(args: TokenArgs) -> Result<(), CliError> {
    let (token, entry) = crate::auth::new_token(&args.name, &args.scopes)?;
    println!("{token}");
    print!("{entry}");
    Ok(())
}

/// Without a tokens file the server is open to every caller: allowed on loopback, refused
/// elsewhere unless the operator says so.
fn check_open_server(args: &ServeArgs) -> Result<(), CliError> {
    if args.tokens_file.is_some() {
        return Ok(());
    }
    let addr = args.listen_addr;
    if !addr.ip().is_loopback() && !args.allow_unauthenticated {
        return Err(format!(
            "refusing to serve {addr} without --tokens-file (FLASHSALE_TOKENS_FILE): every \
             caller could call everything; set FLASHSALE_ALLOW_UNAUTHENTICATED=true to allow it"
        )
        .into());
    }
    tracing::warn!(%addr, "no tokens file: every caller may call everything");
    Ok(())
}

/// Bytes one product id takes in a WatchAvailability request (a UUID and its framing).
const WATCHED_ID_BYTES: u64 = 40;

/// Settings that only make sense together: a WatchAvailability naming as many products as
/// allowed must fit in a message; plaintext off loopback is said out loud.
fn check_transport(args: &ServeArgs) -> Result<(), CliError> {
    let largest_watch = u64::from(args.max_watched_products) * WATCHED_ID_BYTES;
    if largest_watch > u64::from(args.max_message_bytes) {
        return Err(format!(
            "--max-watched-products {} needs requests of up to {largest_watch} bytes, more than \
             --max-message-bytes (FLASHSALE_MAX_MESSAGE_BYTES) {}: raise it",
            args.max_watched_products, args.max_message_bytes
        )
        .into());
    }
    if args.hold_max_lifetime < args.hold_ttl {
        return Err(
            "--hold-max-lifetime (FLASHSALE_HOLD_MAX_LIFETIME) must be at least --hold-ttl".into(),
        );
    }
    if args.tls_cert.is_none() && !args.listen_addr.ip().is_loopback() {
        tracing::warn!(addr = %args.listen_addr, "serving plaintext off loopback: tokens and data cross the network unencrypted (set FLASHSALE_TLS_CERT and FLASHSALE_TLS_KEY)");
    }
    Ok(())
}

/// Raises this process's open-file limit to the most it may have (as Go's runtime does),
/// so `--max-connections` is not cut short by a small default; says what it got.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::debug!(open_files = limit.rlim_cur, "open-file limit raised");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
    }
}

/// `flashsale serve`.
async fn serve(args: ServeArgs) -> Result<(), CliError> {
    check_open_server(&args)?;
    check_transport(&args)?;
    raise_open_file_limit();
    let (database, mut local) = open_database(&args.database).await?;
    let listener = TcpListener::bind(args.listen_addr)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", args.listen_addr))?;
    // A private PostgreSQL that dies stops the server too: it would only answer UNAVAILABLE.
    let mut lost = None;
    let shutdown = async {
        tokio::select! {
            () = shutdown_signal() => {}
            exit = private_postgres_exit(local.as_mut()) => {
                let exit = match exit {
                    Ok(status) => status.to_string(),
                    Err(error) => error.to_string(),
                };
                tracing::error!(%exit, "the private postgresql exited; stopping");
                lost = Some(exit);
            }
        }
    };
    let served = crate::server::run(listener, args.server_config(database), shutdown).await;
    if let (Some(exit), Some(local)) = (lost, &local) {
        let log = local.log_path().display();
        return Err(format!(
            "the private postgresql exited ({exit}; its log: {log}); the server stopped"
        )
        .into());
    }
    if let Some(local) = local {
        local.stop().await?;
    }
    Ok(served?)
}

/// Resolves when the private PostgreSQL exits on its own; never without one.
async fn private_postgres_exit(
    local: Option<&mut LocalPostgres>,
) -> Result<std::process::ExitStatus, crate::local_pg::LocalPgError> {
    match local {
        Some(local) => local.exited().await,
        None => std::future::pending().await,
    }
}

/// `flashsale seed`: creates a few demo products through the admin API.
async fn seed(args: SeedArgs) -> Result<(), CliError> {
    let channel = tonic::transport::Endpoint::from_shared(args.server.clone())
        .map_err(|error| format!("invalid --server {:?}: {error}", args.server))?
        .connect()
        .await
        .map_err(|error| {
            format!(
                "cannot reach {}: {error} (is `flashsale serve` running?)",
                args.server
            )
        })?;
    let authorization = match &args.token {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse::<tonic::metadata::MetadataValue<_>>()
                .map_err(|_| "--token (FLASHSALE_TOKEN) is not a valid header value")?,
        ),
        None => None,
    };
    let mut admin = InventoryAdminServiceClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            if let Some(value) = &authorization {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        },
    );
    let demo = [
        ("Limited sneaker drop", 12_900, 100),
        ("Concert ticket, front row", 8_500, 500),
        ("Console bundle", 49_900, 25),
    ];
    for (name, price_cents, stock_total) in demo {
        let request = CreateProductRequest {
            name: name.into(),
            price_cents,
            stock_total,
            request_id: String::new(),
            ..CreateProductRequest::default()
        };
        let product = admin.create_product(request).await?.into_inner();
        println!(
            "{}  {name}  price_cents={price_cents}  stock_total={stock_total}",
            product.id
        );
    }
    Ok(())
}

/// The database to use, starting the private PostgreSQL when none is configured. A
/// configured connection string is parsed here, once: a mistyped one would otherwise only
/// show as connection attempts failing forever.
async fn open_database(
    args: &DatabaseArgs,
) -> Result<(DatabaseConfig, Option<LocalPostgres>), CliError> {
    if let Some(url) = &args.database_url {
        return Ok((url.parse()?, None));
    }
    let local = LocalPostgres::start(LocalPostgresOptions {
        data_dir: args.pg_data_dir.clone(),
        durable: true,
        max_connections: 100,
    })
    .await?;
    let server: DatabaseConfig = local.url("postgres").parse()?;
    db::create_database_if_missing(&server, LOCAL_DATABASE).await?;
    tracing::info!(
        data_dir = %local.data_dir().display(),
        socket_dir = %local.socket_dir().display(),
        "DATABASE_URL is unset: using a private postgresql (stopped on exit; data kept)"
    );
    Ok((server.with_database(LOCAL_DATABASE), Some(local)))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("received sigint"),
        _ = terminate.recv() => tracing::info!("received sigterm"),
    }
}
