//! Who may call what: scoped bearer tokens, checked before any handler runs, re-read on
//! SIGHUP; health and reflection stay open; without tokens only loopback is served.

use std::path::Path;
use std::time::Duration;

use flashsale::auth::{Scope, new_token};
use flashsale::grpc::pb::JoinWaitlistRequest;
use flashsale::grpc::pb::checkout_service_client::CheckoutServiceClient;
use flashsale::grpc::pb::inventory_admin_service_client::InventoryAdminServiceClient;
use flashsale::grpc::pb::{
    AdjustStockRequest, AuditInventoryRequest, CancelOrderRequest, CreateHoldRequest,
    CreateOrderRequest, CreateProductRequest, ExtendHoldRequest, GetHoldRequest, GetOrderRequest,
    GetProductRequest, HandlePaymentWebhookRequest, ListProductsRequest,
    ListRefundsRequiredRequest, MarkRefundedRequest, ReleaseHoldRequest, UpdateProductRequest,
    WatchAvailabilityRequest,
};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::support::{ServerProcess, TestDb, TestServer, reason};

/// Adds `authorization: Bearer <token>` to every call (nothing when `None`).
#[derive(Clone)]
struct Bearer(Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value = MetadataValue::try_from(format!("Bearer {token}")).expect("ascii");
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// Clients that present one token.
struct Caller {
    checkout: CheckoutServiceClient<InterceptedService<Channel, Bearer>>,
    admin: InventoryAdminServiceClient<InterceptedService<Channel, Bearer>>,
}

impl Caller {
    async fn new(url: &str, token: Option<&str>) -> Caller {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let bearer = Bearer(token.map(str::to_owned));
        Caller {
            checkout: CheckoutServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: InventoryAdminServiceClient::with_interceptor(channel, bearer),
        }
    }

    /// Calls one RPC (by name) with a request that does nothing; the status, if refused.
    async fn call(&mut self, rpc: &str) -> Option<Status> {
        let id = uuid::Uuid::now_v7().to_string();
        let (checkout, admin) = (&mut self.checkout, &mut self.admin);
        let outcome = match rpc {
            "GetProduct" => checkout
                .get_product(GetProductRequest { product_id: id })
                .await
                .map(drop),
            "ListProducts" => checkout
                .list_products(ListProductsRequest::default())
                .await
                .map(drop),
            "CreateHold" => checkout
                .create_hold(CreateHoldRequest {
                    product_id: id,
                    qty: 1,
                    client_request_id: String::new(),
                    ..Default::default()
                })
                .await
                .map(drop),
            "GetHold" => checkout
                .get_hold(GetHoldRequest { hold_id: id })
                .await
                .map(drop),
            "ReleaseHold" => checkout
                .release_hold(ReleaseHoldRequest { hold_id: id })
                .await
                .map(drop),
            "CreateOrder" => checkout
                .create_order(CreateOrderRequest { hold_id: id })
                .await
                .map(drop),
            "GetOrder" => checkout
                .get_order(GetOrderRequest { order_id: id })
                .await
                .map(drop),
            "JoinWaitlist" => checkout
                .join_waitlist(JoinWaitlistRequest {
                    product_id: id,
                    qty: 1,
                    buyer_id: String::new(),
                })
                .await
                .map(drop),
            "ExtendHold" => checkout
                .extend_hold(ExtendHoldRequest { hold_id: id })
                .await
                .map(drop),
            "UpdateProduct" => admin
                .update_product(UpdateProductRequest::default())
                .await
                .map(drop),
            "CancelOrder" => checkout
                .cancel_order(CancelOrderRequest { order_id: id })
                .await
                .map(drop),
            "HandlePaymentWebhook" => checkout
                .handle_payment_webhook(HandlePaymentWebhookRequest::default())
                .await
                .map(drop),
            "WatchAvailability" => checkout
                .watch_availability(WatchAvailabilityRequest {
                    product_ids: vec![id],
                })
                .await
                .map(drop),
            "CreateProduct" => admin
                .create_product(CreateProductRequest::default())
                .await
                .map(drop),
            "AdjustStock" => admin
                .adjust_stock(AdjustStockRequest {
                    request_id: String::new(),
                    product_id: id,
                    delta: 0,
                })
                .await
                .map(drop),
            "AuditInventory" => admin
                .audit_inventory(AuditInventoryRequest::default())
                .await
                .map(drop),
            "ListRefundsRequired" => admin
                .list_refunds_required(ListRefundsRequiredRequest::default())
                .await
                .map(drop),
            "MarkRefunded" => admin
                .mark_refunded(MarkRefundedRequest {
                    idempotency_key: id,
                    caller: String::new(),
                })
                .await
                .map(drop),
            other => panic!("no such rpc {other}"),
        };
        outcome.err()
    }
}

/// Every RPC and the scope it needs.
const RPCS: [(&str, Scope); 18] = [
    ("GetProduct", Scope::Checkout),
    ("ListProducts", Scope::Checkout),
    ("CreateHold", Scope::Checkout),
    ("GetHold", Scope::Checkout),
    ("ReleaseHold", Scope::Checkout),
    ("CreateOrder", Scope::Checkout),
    ("GetOrder", Scope::Checkout),
    ("CancelOrder", Scope::Checkout),
    ("ExtendHold", Scope::Checkout),
    ("JoinWaitlist", Scope::Checkout),
    ("HandlePaymentWebhook", Scope::Payments),
    ("WatchAvailability", Scope::Checkout),
    ("CreateProduct", Scope::Admin),
    ("AdjustStock", Scope::Admin),
    ("AuditInventory", Scope::Admin),
    ("ListRefundsRequired", Scope::Admin),
    ("MarkRefunded", Scope::Admin),
    ("UpdateProduct", Scope::Admin),
];

/// Writes a tokens file with one token per entry; returns the tokens.
fn write_tokens(path: &Path, entries: &[(&str, &[Scope])]) -> Vec<String> {
    let mut file = String::new();
    let mut tokens = Vec::new();
    for (name, scopes) in entries {
        let (token, entry) = new_token(name, scopes).unwrap();
        file.push_str(&entry);
        tokens.push(token);
    }
    std::fs::write(path, file).unwrap();
    tokens
}

/// Whether a refusal is about who called (as opposed to what was asked).
fn refused_for_auth(status: &Option<Status>) -> bool {
    status
        .as_ref()
        .is_some_and(|s| matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied))
}

#[tokio::test(flavor = "multi_thread")]
async fn each_rpc_needs_a_known_token_with_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let tokens = write_tokens(
        &path,
        &[
            ("shop", &[Scope::Checkout]),
            ("psp", &[Scope::Payments]),
            ("ops", &[Scope::Admin]),
        ],
    );
    let server = TestServer::start_with(|config| config.tokens_file = Some(path.clone())).await;
    let url = server.url();
    let scopes = [Scope::Checkout, Scope::Payments, Scope::Admin];

    let mut failures = Vec::new();
    for (rpc, needed) in RPCS {
        for token in [None, Some("not-a-known-token")] {
            let status = Caller::new(&url, token).await.call(rpc).await;
            if status.as_ref().map(Status::code) != Some(Code::Unauthenticated) {
                failures.push(format!("{rpc} with {token:?}: {status:?}"));
            }
        }
        for (token, scope) in tokens.iter().zip(scopes) {
            let status = Caller::new(&url, Some(token)).await.call(rpc).await;
            if scope == needed {
                if refused_for_auth(&status) {
                    failures.push(format!("{rpc} with a {scope} token refused: {status:?}"));
                }
            } else {
                let denied = status.as_ref().is_some_and(|s| {
                    s.code() == Code::PermissionDenied
                        && reason(s) == "MISSING_SCOPE"
                        && tonic_types::StatusExt::get_details_error_info(s).is_some_and(|info| {
                            info.metadata.get("scope") == Some(&needed.to_string())
                        })
                });
                if !denied {
                    failures.push(format!("{rpc} with a {scope} token: {status:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_reflection_stay_open() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    write_tokens(&path, &[("shop", &[Scope::Checkout])]);
    // start_with waits for SERVING through health, without a token.
    let server = TestServer::start_with(|config| config.tokens_file = Some(path.clone())).await;

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection answers without a token")
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    assert!(format!("{answer:?}").contains("flashsale.v1.CheckoutService"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rotates_tokens_and_a_broken_file_keeps_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let old = write_tokens(&path, &[("shop", &[Scope::Checkout])]).remove(0);
    let db = TestDb::new().await;
    let server = ServerProcess::start_with(
        &db.url,
        &[("FLASHSALE_TOKENS_FILE", path.to_str().unwrap())],
    )
    .await;
    let allowed = |status: Option<Status>| !refused_for_auth(&status);
    assert!(allowed(
        Caller::new(&server.url, Some(&old))
            .await
            .call("ListProducts")
            .await
    ));

    let new = write_tokens(&path, &[("shop-2", &[Scope::Checkout])]).remove(0);
    server.signal(libc::SIGHUP);
    crate::support::eventually("the old token to be refused", || {
        let (url, old) = (server.url.clone(), old.clone());
        async move {
            !allowed(
                Caller::new(&url, Some(&old))
                    .await
                    .call("ListProducts")
                    .await,
            )
        }
    })
    .await;
    assert!(allowed(
        Caller::new(&server.url, Some(&new))
            .await
            .call("ListProducts")
            .await
    ));

    std::fs::write(&path, "[[token]]\nname = \"broken\"\n").unwrap();
    server.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        allowed(
            Caller::new(&server.url, Some(&new))
                .await
                .call("ListProducts")
                .await
        ),
        "a file that fails to parse keeps the tokens in force"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_tokens_only_loopback_is_served_unless_allowed() {
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["serve", "--listen-addr", "0.0.0.0:0"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env_remove("FLASHSALE_TOKENS_FILE")
        .env_remove("FLASHSALE_ALLOW_UNAUTHENTICATED")
        .env("FLASHSALE_METRICS_ADDR", "")
        .output()
        .expect("run flashsale serve");
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("FLASHSALE_TOKENS_FILE"), "{said}");

    let db = TestDb::new().await;
    let mut allowed = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["serve", "--listen-addr", "0.0.0.0:0"])
        .env("DATABASE_URL", &db.url)
        .env("FLASHSALE_ALLOW_UNAUTHENTICATED", "true")
        .env("FLASHSALE_METRICS_ADDR", "")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        allowed.try_wait().unwrap().is_none(),
        "allowed to serve open, it keeps running"
    );
    allowed.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_belong_to_the_token_that_sent_them() {
    use flashsale::grpc::pb::{HandlePaymentWebhookResponse, Hold, WebhookOutcome};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let tokens = write_tokens(
        &path,
        &[
            ("shop-a", &[Scope::Checkout]),
            ("shop-b", &[Scope::Checkout]),
            ("psp-a", &[Scope::Payments]),
            ("psp-b", &[Scope::Payments]),
            ("ops", &[Scope::Admin]),
        ],
    );
    let server = TestServer::start_with(|config| config.tokens_file = Some(path.clone())).await;
    let url = server.url();
    let mut callers = Vec::new();
    for token in &tokens {
        callers.push(Caller::new(&url, Some(token)).await);
    }
    let [shop_a, shop_b, psp_a, psp_b, ops] = &mut callers[..] else {
        unreachable!()
    };
    let product_id = ops
        .admin
        .create_product(CreateProductRequest {
            request_id: String::new(),
            name: "ticket".into(),
            price_cents: 250,
            stock_total: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let hold = async |caller: &mut Caller, qty: i64| -> Hold {
        let request = CreateHoldRequest {
            product_id: product_id.clone(),
            qty,
            client_request_id: "cart-1".into(),
            ..Default::default()
        };
        caller
            .checkout
            .create_hold(request)
            .await
            .unwrap()
            .into_inner()
    };

    // The same client_request_id from two storefronts: two holds, neither sees the other's.
    let of_a = hold(shop_a, 1).await;
    let of_b = hold(shop_b, 2).await;
    assert_ne!(of_a.hold_id, of_b.hold_id);
    assert_eq!(of_b.qty, 2);
    assert_eq!(
        hold(shop_a, 1).await.hold_id,
        of_a.hold_id,
        "a retry finds its own"
    );

    // The same idempotency key from two payment adapters: two payments, each applied once.
    let mut orders = Vec::new();
    for (shop, of) in [(&mut *shop_a, &of_a), (&mut *shop_b, &of_b)] {
        let request = CreateOrderRequest {
            hold_id: of.hold_id.clone(),
        };
        orders.push(
            shop.checkout
                .create_order(request)
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let pay = async |psp: &mut Caller, order: &flashsale::grpc::pb::Order| {
        let webhook = crate::support::success(
            "evt-1",
            crate::support::on_order(&order.order_id),
            order.total_cents,
        );
        let answer: HandlePaymentWebhookResponse = psp
            .checkout
            .handle_payment_webhook(webhook)
            .await
            .unwrap()
            .into_inner();
        answer.outcome()
    };
    assert_eq!(pay(psp_a, &orders[0]).await, WebhookOutcome::Applied);
    assert_eq!(pay(psp_b, &orders[1]).await, WebhookOutcome::Applied);
    assert_eq!(pay(psp_a, &orders[0]).await, WebhookOutcome::Duplicate);
    let audit = ops
        .admin
        .audit_inventory(AuditInventoryRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(audit.consistent, "{audit:?}");
    let product = shop_a
        .checkout
        .get_product(GetProductRequest { product_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((product.reserved, product.sold), (0, 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_name_the_caller_and_carry_the_trace_of_each_call() {
    let dir = tempfile::tempdir().unwrap();
    let tokens_path = dir.path().join("tokens.toml");
    let tokens = write_tokens(
        &tokens_path,
        &[("shop", &[Scope::Checkout]), ("ops", &[Scope::Admin])],
    );
    let log_path = dir.path().join("server.log");
    let db = TestDb::new().await;
    let server = ServerProcess::start_logging(
        &db.url,
        &[
            ("FLASHSALE_TOKENS_FILE", tokens_path.to_str().unwrap()),
            ("FLASHSALE_LOG_FORMAT", "json"),
            ("RUST_LOG", "info"),
        ],
        &log_path,
    )
    .await;
    let mut shop = Caller::new(&server.url, Some(&tokens[0])).await;
    let mut ops = Caller::new(&server.url, Some(&tokens[1])).await;
    let product_id = ops
        .admin
        .create_product(CreateProductRequest {
            name: "ticket".into(),
            price_cents: 100,
            stock_total: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let held = shop
        .checkout
        .create_hold(CreateHoldRequest {
            product_id,
            qty: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut release = Request::new(ReleaseHoldRequest {
        hold_id: held.hold_id.clone(),
    });
    release.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    shop.checkout.release_hold(release).await.unwrap();
    server.stop().await;

    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let released = lines
        .iter()
        .find(|line| line["fields"]["message"] == "hold released")
        .unwrap_or_else(|| panic!("no release logged:\n{log}"));
    assert_eq!(released["fields"]["hold_id"], held.hold_id.as_str());
    assert_eq!(released["span"]["caller"], "shop");
    assert_eq!(released["span"]["rpc"], "ReleaseHold");
    assert_eq!(released["span"]["trace_id"], trace_id);
    assert_eq!(released["span"]["parent_span_id"], "00f067aa0ba902b7");
}
