//! Connections and fixtures: N HTTP/2 connections to the server (one TCP connection each)
//! and the products a scenario works on, created through the admin API.

use std::io;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use clap::Args;
use futures::future::try_join_all;
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::body::Body;
use tonic::codegen::http::{HeaderValue, Request, Response, Uri, header, uri};

use super::LoadError;
use flashsale::grpc::pb::{self, inventory_admin_service_client::InventoryAdminServiceClient};
use flashsale::transport::coalescing_connect;

/// Longest wait for one TCP connection and HTTP/2 handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive window of each connection: generous, so many streams never wait for updates.
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Receive window of each stream: far above any message of the API.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// Price of the products the scenarios create.
pub const PRICE_CENTS: i64 = 1_000;

/// The server a run drives, and who the run calls as.
#[derive(Debug, Clone, Args)]
pub struct Server {
    /// The server to drive.
    #[arg(
        long = "server",
        global = true,
        env = "FLASHSALE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub url: String,
    /// The token every call presents (`authorization: Bearer`), for a server with a tokens
    /// file: it needs the scopes the scenario calls (checkout; payments for flash-crowd;
    /// admin to create its products).
    #[arg(long, global = true, env = "FLASHSALE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Server {
    /// An open server at `url`, called without a token.
    pub fn open(url: impl Into<String>) -> Server {
        Server {
            url: url.into(),
            token: None,
        }
    }

    /// Polls its health (every 100 ms) until it reports SERVING; an error after `patience`.
    pub async fn wait_serving(&self, patience: Duration) -> Result<(), LoadError> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let deadline = tokio::time::Instant::now() + patience;
        while tokio::time::Instant::now() < deadline {
            let endpoint = tonic::transport::Endpoint::from_shared(self.url.clone())?;
            if let Ok(channel) = endpoint.connect().await {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await;
                if status.is_ok_and(|answer| answer.into_inner().status() == ServingStatus::Serving)
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("{} did not report SERVING within {patience:?}", self.url).into())
    }
}

/// One HTTP/2 connection to the server, which the generated stubs call directly. tonic's
/// `Channel` queues every call through a buffer task (and keeps reconnection machinery),
/// which costs the load generator CPU that the server then cannot use on a shared machine.
#[derive(Clone)]
pub struct Connection {
    /// Sends requests over the connection.
    sender: SendRequest<Body>,
    /// `http` or `https` and host:port, set on every request's URI.
    scheme: uri::Scheme,
    authority: uri::Authority,
    /// `Bearer <token>`, set on every request when the run has a token.
    authorization: Option<HeaderValue>,
}

/// Opens `count` separate HTTP/2 connections to `server`.
///
/// Writes are coalesced (`transport::CoalescingStream`, Nagle off): the calls a crowd of
/// clients starts in one scheduler turn leave in one write instead of one each. The
/// flow-control windows are fixed and large instead of adaptive: the messages are tiny, so
/// BDP probing would only add pings.
pub async fn connect(server: &Server, count: usize) -> Result<Vec<Connection>, LoadError> {
    let authorization = match &server.token {
        Some(token) => Some(
            HeaderValue::try_from(format!("Bearer {token}"))
                .map_err(|_| "--token (FLASHSALE_TOKEN) is not a valid header value")?,
        ),
        None => None,
    };
    let server = server.url.as_str();
    let target: Uri = server
        .parse()
        .map_err(|error| format!("invalid server address {server:?}: {error}"))?;
    let (Some(scheme), Some(authority)) = (target.scheme().cloned(), target.authority().cloned())
    else {
        return Err(format!("invalid server address {server:?}: needs a scheme and a host").into());
    };
    let open = |_| Connection::open(&scheme, &authority, authorization.clone());
    let connections = try_join_all((0..count).map(open)).await.map_err(|error| {
        let error = with_causes(error.as_ref());
        format!("cannot reach {server}: {error} (is `flashsale serve` running?)")
    })?;
    Ok(connections)
}

impl Connection {
    /// One TCP connection and HTTP/2 handshake; the connection's task runs on the runtime.
    async fn open(
        scheme: &uri::Scheme,
        authority: &uri::Authority,
        authorization: Option<HeaderValue>,
    ) -> Result<Connection, Box<dyn std::error::Error + Send + Sync>> {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, coalescing_connect((host, port)))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .adaptive_window(false)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .initial_stream_window_size(STREAM_WINDOW)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "load connection ended");
            }
        });
        Ok(Connection {
            sender,
            scheme: scheme.clone(),
            authority: authority.clone(),
            authorization,
        })
    }
}

impl tower::Service<Request<Body>> for Connection {
    type Response = Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.sender.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        if let Some(authorization) = &self.authorization {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, authorization.clone());
        }
        Box::pin(self.sender.send_request(request))
    }
}

/// An error and its causes, `outer: inner: innermost`.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Creates `count` products with `stock` units each, named after the scenario and run.
pub async fn create_products(
    connection: &Connection,
    label: &str,
    count: usize,
    stock: i64,
) -> Result<Vec<pb::Product>, LoadError> {
    let mut admin = InventoryAdminServiceClient::new(connection.clone());
    let mut products = Vec::with_capacity(count);
    for index in 0..count {
        let request = pb::CreateProductRequest {
            name: format!("load {label} #{index}"),
            price_cents: PRICE_CENTS,
            stock_total: stock,
            ..pb::CreateProductRequest::default()
        };
        let product = admin
            .create_product(request)
            .await
            .map_err(|status| format!("cannot create a product: {}", status.message()))?;
        products.push(product.into_inner());
    }
    Ok(products)
}

/// The length of a hold's reservation, from its timestamps.
pub fn hold_ttl(hold: &pb::Hold) -> Option<Duration> {
    let (created, expires) = (hold.created_at?, hold.expires_at?);
    let nanos = i128::from(expires.seconds - created.seconds) * 1_000_000_000
        + i128::from(expires.nanos - created.nanos);
    u64::try_from(nanos).ok().map(Duration::from_nanos)
}

/// A hold's expiry as wall-clock time.
pub fn expires_at(hold: &pb::Hold) -> Option<std::time::SystemTime> {
    let at = hold.expires_at?;
    let since_epoch = Duration::new(u64::try_from(at.seconds).ok()?, at.nanos.try_into().ok()?);
    Some(std::time::UNIX_EPOCH + since_epoch)
}
