//! Hostile bytes on the wire (proptest over raw bytes): every unary method gets arbitrary
//! bytes as its protobuf message, correctly framed or not, over HTTP/2 directly. Each call
//! gets a gRPC status (never a dropped connection, never UNKNOWN or UNAVAILABLE: the server
//! did not panic or hang), and afterwards the server still serves and its books balance.
//!
//! `cargo test --test it wire` sends 256 messages; `PROPTEST_CASES=100000 cargo test
//! --release --test it wire` sends more.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::net::TcpStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::TestServer;

/// Every unary method of the API, as its HTTP/2 path.
const METHODS: &[&str] = &[
    "/flashsale.v1.CheckoutService/GetProduct",
    "/flashsale.v1.CheckoutService/ListProducts",
    "/flashsale.v1.CheckoutService/CreateHold",
    "/flashsale.v1.CheckoutService/GetHold",
    "/flashsale.v1.CheckoutService/ExtendHold",
    "/flashsale.v1.CheckoutService/ReleaseHold",
    "/flashsale.v1.CheckoutService/CreateOrder",
    "/flashsale.v1.CheckoutService/GetOrder",
    "/flashsale.v1.CheckoutService/CancelOrder",
    "/flashsale.v1.CheckoutService/HandlePaymentWebhook",
    "/flashsale.v1.InventoryAdminService/CreateProduct",
    "/flashsale.v1.InventoryAdminService/UpdateProduct",
    "/flashsale.v1.InventoryAdminService/AdjustStock",
    "/flashsale.v1.InventoryAdminService/AuditInventory",
    "/flashsale.v1.InventoryAdminService/ListRefundsRequired",
    "/flashsale.v1.InventoryAdminService/MarkRefunded",
];

/// What goes on the wire: a method, bytes, and whether they are framed as one gRPC
/// message (else they are the request body as they are).
fn hostile_call() -> impl Strategy<Value = (usize, Vec<u8>, bool)> {
    (
        0..METHODS.len(),
        prop::collection::vec(any::<u8>(), 0..600),
        prop::bool::weighted(0.8),
    )
}

/// Histories per run: `PROPTEST_CASES`, 256 by default.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(256)
}

#[tokio::test(flavor = "multi_thread")]
async fn arbitrary_bytes_to_any_method_get_a_status_and_break_nothing() {
    let server = TestServer::start().await;
    server.product("bystander", 100, 10).await;
    let addr = server.addr;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let runtime = tokio::runtime::Handle::current();

    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let outcome = runner.run(&hostile_call(), |(method, bytes, framed)| {
        let body = if framed {
            frame(&bytes)
        } else {
            Bytes::from(bytes)
        };
        let code = tokio::task::block_in_place(|| {
            runtime.block_on(raw_call(client.clone(), METHODS[method], body))
        });
        prop_assert!(
            code.is_some_and(|code| !matches!(code, Code::Unknown | Code::Unavailable)),
            "{}: {code:?}",
            METHODS[method]
        );
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    assert_eq!(server.health().await, ServingStatus::Serving);
    server.assert_consistent().await;
}

/// `message` as one uncompressed gRPC message frame.
fn frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// Posts `body` to `path`; the call's gRPC status, `None` when none came.
async fn raw_call(client: h2::client::SendRequest<Bytes>, path: &str, body: Bytes) -> Option<Code> {
    let request = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut client = client.ready().await.ok()?;
    let (response, mut sending) = client.send_request(request, false).ok()?;
    sending.send_data(body, true).ok()?;
    let response = response.await.ok()?;
    if let Some(status) = response.headers().get("grpc-status") {
        return grpc_code(status);
    }
    let mut answer = response.into_body();
    while let Some(chunk) = answer.data().await {
        let chunk = chunk.ok()?;
        let _ = answer.flow_control().release_capacity(chunk.len());
    }
    grpc_code(answer.trailers().await.ok()??.get("grpc-status")?)
}

/// A `grpc-status` header's code.
fn grpc_code(value: &http::HeaderValue) -> Option<Code> {
    Some(Code::from_i32(value.to_str().ok()?.parse().ok()?))
}
