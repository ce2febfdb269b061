//! Connections and fixtures: N HTTP/2 channels to the server (one TCP connection each) and
//! the products a scenario works on, created through the admin API.

use std::io;
use std::time::Duration;

use futures::future::try_join_all;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use super::LoadError;
use crate::grpc::pb::{self, inventory_admin_service_client::InventoryAdminServiceClient};
use crate::transport::coalescing_connect;

/// Longest wait for one TCP connection and HTTP/2 handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive window of each connection: generous, so many streams never wait for updates.
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Receive window of each stream: far above any message of the API.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// Price of the products the scenarios create.
pub const PRICE_CENTS: i64 = 1_000;

/// Opens `count` separate HTTP/2 connections to `server`.
///
/// Writes are coalesced (`transport::CoalescingStream`, Nagle off): the calls a crowd of
/// clients starts in one scheduler turn leave in one write instead of one each. The
/// flow-control windows are fixed and large instead of adaptive: the messages are tiny, so
/// BDP probing would only add pings.
pub async fn connect(server: &str, count: usize) -> Result<Vec<Channel>, LoadError> {
    let endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|error| format!("invalid server address {server:?}: {error}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_adaptive_window(false)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_stream_window_size(STREAM_WINDOW);
    let connector = service_fn(|uri: Uri| async move {
        let host = uri
            .host()
            .ok_or_else(|| io::Error::other("server address has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        Ok::<_, io::Error>(TokioIo::new(coalescing_connect((host, port)).await?))
    });
    let channels = try_join_all((0..count).map(|_| endpoint.connect_with_connector(connector)))
        .await
        .map_err(|error| {
            let error = with_causes(&error);
            format!("cannot reach {server}: {error} (is `flashsale serve` running?)")
        })?;
    Ok(channels)
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
    channel: &Channel,
    label: &str,
    count: usize,
    stock: i64,
) -> Result<Vec<pb::Product>, LoadError> {
    let mut admin = InventoryAdminServiceClient::new(channel.clone());
    let mut products = Vec::with_capacity(count);
    for index in 0..count {
        let request = pb::CreateProductRequest {
            name: format!("load {label} #{index}"),
            price_cents: PRICE_CENTS,
            stock_total: stock,
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
