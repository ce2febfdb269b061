//! Hostile bytes on the wire (proptest): every method gets, over HTTP/2 directly,
//! messages built from its request type's descriptor with hostile values in any of its
//! fields (empty, huge, negative, `i64::MIN`/`MAX`, unknown enum values, control
//! characters, ids of rows that exist and of none, the wrong wire type), or arbitrary
//! bytes, framed as one gRPC message or not. The first reach validation and the handlers,
//! the others the decoder. Each call gets a gRPC status (never a dropped connection, never
//! UNKNOWN or UNAVAILABLE: the server did not panic or hang), and afterwards the server
//! still serves and its books balance.
//!
//! `cargo test --test it wire` sends 1,000 messages; `PROPTEST_CASES=100000 cargo test
//! --release --test it wire` sends more.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use flashsale::grpc::pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use tokio::net::TcpStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{TestServer, hold, pending_order};

/// Every method of the API, as its HTTP/2 path.
const METHODS: &[&str] = &[
    "/flashsale.v1.CheckoutService/WatchAvailability",
    "/flashsale.v1.CheckoutService/JoinWaitlist",
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

/// What goes on the wire to one method.
#[derive(Debug, Clone)]
enum Body {
    /// A message of the method's request type: one field set per choice.
    Message(Vec<Choice>),
    /// Arbitrary bytes, framed as one gRPC message or not.
    Bytes(Vec<u8>, bool),
}

/// One field of a message and its value, as picks the descriptor interprets (so a failure
/// shrinks to fewer fields and plainer values).
#[derive(Debug, Clone)]
struct Choice {
    /// Which field (modulo the number of fields).
    field: usize,
    /// Which kind of hostile value for the field's type.
    kind: u8,
    /// A number to make the value from.
    number: u64,
}

fn hostile_call() -> impl Strategy<Value = (usize, Body)> {
    let choice =
        (any::<usize>(), any::<u8>(), any::<u64>()).prop_map(|(field, kind, number)| Choice {
            field,
            kind,
            number,
        });
    let body = prop_oneof![
        3 => prop::collection::vec(choice, 0..6).prop_map(Body::Message),
        1 => (prop::collection::vec(any::<u8>(), 0..600), prop::bool::weighted(0.8))
            .prop_map(|(bytes, framed)| Body::Bytes(bytes, framed)),
    ];
    (0..METHODS.len(), body)
}

/// The request messages of the API, by full name, from its descriptors.
struct Schema {
    messages: HashMap<String, DescriptorProto>,
    /// Each method's request type.
    inputs: HashMap<String, String>,
}

impl Schema {
    fn load() -> Schema {
        let set = FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut schema = Schema {
            messages: HashMap::new(),
            inputs: HashMap::new(),
        };
        for file in set.file {
            let package = file.package().to_owned();
            for message in file.message_type {
                let name = format!(".{package}.{}", message.name());
                schema.messages.insert(name, message);
            }
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{package}.{}/{}", service.name(), method.name());
                    schema.inputs.insert(path, method.input_type().to_owned());
                }
            }
        }
        schema
    }

    /// A message of type `name` with one field set per choice; `ids` are ids of real rows.
    fn encode(&self, name: &str, choices: &[Choice], ids: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        // Well-known types (timestamps, ...) are not in the API's descriptors: raw fields.
        let Some(message) = self.messages.get(name) else {
            for choice in choices {
                encode_key(1 + choice.field as u32 % 2, WireType::Varint, &mut out);
                encode_varint(choice.number, &mut out);
            }
            return out;
        };
        for choice in choices {
            let field = &message.field[choice.field % message.field.len()];
            self.encode_field(field, choice, ids, &mut out);
        }
        out
    }

    /// One hostile value of `field`, with its key.
    fn encode_field(
        &self,
        field: &FieldDescriptorProto,
        choice: &Choice,
        ids: &[String],
        out: &mut Vec<u8>,
    ) {
        let tag = field.number() as u32;
        let number = choice.number;
        if choice.kind.is_multiple_of(16) {
            // The wrong wire type for the field.
            encode_key(tag, WireType::ThirtyTwoBit, out);
            out.extend_from_slice(&(number as u32).to_le_bytes());
            return;
        }
        let varint = |value: u64, out: &mut Vec<u8>| {
            encode_key(tag, WireType::Varint, out);
            encode_varint(value, out);
        };
        let bytes = |value: &[u8], out: &mut Vec<u8>| {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(value.len() as u64, out);
            out.extend_from_slice(value);
        };
        match field.r#type() {
            Type::String | Type::Bytes => {
                let value = match choice.kind % 7 {
                    0 => String::new(),
                    1 | 2 => ids[number as usize % ids.len()].clone(),
                    3 => uuid::Uuid::from_u64_pair(number, number).to_string(),
                    4 => "k".repeat(number as usize % 300_000),
                    5 => format!("key\0{number}\u{1}\u{7f}"),
                    _ => number.to_string(),
                };
                bytes(value.as_bytes(), out);
            }
            Type::Message => {
                let nested = [choice.clone()];
                bytes(&self.encode(field.type_name(), &nested, ids), out);
            }
            _ => {
                let value = match choice.kind % 6 {
                    0 => 0,
                    1 => -1i64 as u64,
                    2 => i64::MIN as u64,
                    3 => i64::MAX as u64,
                    4 => number % 8,
                    _ => number,
                };
                varint(value, out);
            }
        }
    }
}

/// Messages per run: `PROPTEST_CASES`, 1,000 by default.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(1000)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_messages_and_bytes_to_any_method_get_a_status_and_break_nothing() {
    let server = TestServer::start().await;
    let product = server.product("bystander", 100, 10).await;
    let mut checkout = server.checkout().await;
    let held = hold(&mut checkout, &product.id, 1).await;
    let ordered = pending_order(&mut checkout, &product.id, 1).await;
    let ids = [
        product.id,
        held.hold_id,
        ordered.order_id.clone(),
        ordered.hold_id,
    ];
    let schema = Schema::load();
    let addr = server.addr;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let runtime = tokio::runtime::Handle::current();

    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let outcome = runner.run(&hostile_call(), |(method, body)| {
        let body = match body {
            Body::Message(choices) => {
                frame(&schema.encode(&schema.inputs[METHODS[method]], &choices, &ids))
            }
            Body::Bytes(bytes, true) => frame(&bytes),
            Body::Bytes(bytes, false) => Bytes::from(bytes),
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

/// Posts `body` to `path`; the call's gRPC status (`OK` once a stream sent its first
/// message: the call is then dropped), `None` when none came within 10 s.
async fn raw_call(client: h2::client::SendRequest<Bytes>, path: &str, body: Bytes) -> Option<Code> {
    tokio::time::timeout(Duration::from_secs(10), answer(client, path, body))
        .await
        .ok()?
}

/// See [`raw_call`].
async fn answer(client: h2::client::SendRequest<Bytes>, path: &str, body: Bytes) -> Option<Code> {
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
    if let Some(chunk) = answer.data().await {
        chunk.ok()?;
        return Some(Code::Ok);
    }
    grpc_code(answer.trailers().await.ok()??.get("grpc-status")?)
}

/// A `grpc-status` header's code.
fn grpc_code(value: &http::HeaderValue) -> Option<Code> {
    Some(Code::from_i32(value.to_str().ok()?.parse().ok()?))
}
