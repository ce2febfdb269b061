//! Bad input: every field of every RPC is checked, named in INVALID_ARGUMENT, and changes
//! nothing (one table of bad requests, one loop); a refused call does not use up the key it
//! carried, and the limits themselves are allowed.

use flashsale::grpc::pb::JoinWaitlistRequest;
use flashsale::grpc::pb::{
    AdjustStockRequest, AuditInventoryRequest, AuditInventoryResponse, CancelOrderRequest,
    CreateHoldRequest, CreateOrderRequest, CreateProductRequest, ExtendHoldRequest, GetHoldRequest,
    GetOrderRequest, GetProductRequest, HandlePaymentWebhookRequest, Hold, ListProductsRequest,
    ListRefundsRequiredRequest, MarkRefundedRequest, Order, OrderStatus, PaymentResult, Product,
    ReleaseHoldRequest, UpdateProductRequest, WatchAvailabilityRequest, WebhookOutcome,
    handle_payment_webhook_request::Target,
};

use crate::support::{
    Admin, Checkout, Counters, TestServer, assert_counters, check_invalid, deliver, get_hold,
    get_order, on_order, pending_order, success, try_hold,
};

/// The per-hold maximum the fixture's server runs with.
const MAX_QTY: i64 = 5;

/// Ids that are not ids: empty, not a UUID, a UUID one digit short, a UUID with junk after it.
const MALFORMED_IDS: [&str; 4] = [
    "",
    "not-a-uuid",
    "0198c3a4-7b1e-7c2d-9f00-12345678901",
    "0198c3a4-7b1e-7c2d-9f00-123456789012x",
];

/// One call of the API: the RPC and its request.
#[derive(Debug, Clone)]
enum Call {
    GetProduct(GetProductRequest),
    ListProducts(ListProductsRequest),
    CreateHold(CreateHoldRequest),
    GetHold(GetHoldRequest),
    ReleaseHold(ReleaseHoldRequest),
    CreateOrder(CreateOrderRequest),
    GetOrder(GetOrderRequest),
    HandlePaymentWebhook(HandlePaymentWebhookRequest),
    WatchAvailability(WatchAvailabilityRequest),
    CreateProduct(CreateProductRequest),
    AdjustStock(AdjustStockRequest),
    AuditInventory(AuditInventoryRequest),
    CancelOrder(CancelOrderRequest),
    ExtendHold(ExtendHoldRequest),
    JoinWaitlist(JoinWaitlistRequest),
    UpdateProduct(UpdateProductRequest),
    ListRefundsRequired(ListRefundsRequiredRequest),
    MarkRefunded(MarkRefundedRequest),
}

/// Keys too long or with characters no key may hold.
fn bad_keys() -> [String; 6] {
    [
        "k".repeat(256),
        "é".repeat(128),
        "key\0".into(),
        "key\u{1}42".into(),
        "key\n42".into(),
        "key\u{7f}".into(),
    ]
}

/// A CreateHold call.
fn create_hold(product_id: &str, qty: i64, client_request_id: &str) -> Call {
    Call::CreateHold(CreateHoldRequest {
        product_id: product_id.into(),
        qty,
        client_request_id: client_request_id.into(),
        ..Default::default()
    })
}

/// A CreateProduct call.
fn create_product(name: &str, price_cents: i64, stock_total: i64) -> Call {
    Call::CreateProduct(CreateProductRequest {
        request_id: String::new(),
        name: name.into(),
        price_cents,
        stock_total,
        ..Default::default()
    })
}

/// The calls `bad` makes of each value, each to be refused naming `field`.
fn rows<T>(
    field: &'static str,
    values: impl IntoIterator<Item = T>,
    bad: impl Fn(T) -> Call,
) -> Vec<(Call, &'static str)> {
    values
        .into_iter()
        .map(|value| (bad(value), field))
        .collect()
}

/// Everything a refused call could have touched.
#[derive(Debug, PartialEq)]
struct State {
    products: Vec<Product>,
    audit: AuditInventoryResponse,
    hold: Hold,
    order: Order,
}

/// A server (max qty per hold 5) with a product, an active hold and a pending order.
struct Fixture {
    server: TestServer,
    checkout: Checkout,
    admin: Admin,
    product: Product,
    hold: Hold,
    order: Order,
    before: State,
}

impl Fixture {
    async fn new() -> Fixture {
        let server = TestServer::start_with(|config| config.max_qty_per_hold = MAX_QTY).await;
        let product = server.product("sneaker", 1_000, 20).await;
        let mut checkout = server.checkout().await;
        let admin = server.admin().await;
        let hold = try_hold(&mut checkout, &product.id, 2, Some("req-fixture"))
            .await
            .expect("the fixture's hold");
        let order = pending_order(&mut checkout, &product.id, 3).await;
        let mut fixture = Fixture {
            server,
            checkout,
            admin,
            product,
            hold,
            order,
            before: State {
                products: vec![],
                audit: AuditInventoryResponse::default(),
                hold: Hold::default(),
                order: Order::default(),
            },
        };
        fixture.before = fixture.state().await;
        fixture
    }

    async fn state(&mut self) -> State {
        let products = self
            .checkout
            .list_products(ListProductsRequest {
                page_size: 1000,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .products;
        let audit = self
            .admin
            .audit_inventory(AuditInventoryRequest {
                product_ids: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        State {
            products,
            audit,
            hold: get_hold(&mut self.checkout, &self.hold.hold_id).await,
            order: get_order(&mut self.checkout, &self.order.order_id).await,
        }
    }

    /// A webhook that would be accepted: success for the fixture's pending order.
    fn webhook(&self) -> HandlePaymentWebhookRequest {
        success(
            "evt-valid",
            on_order(&self.order.order_id),
            self.order.total_cents,
        )
    }

    /// Every bad request the fixture can make, with the field its refusal must name.
    fn bad_requests(&self) -> Vec<(Call, &'static str)> {
        let product_id = self.product.id.as_str();
        let valid = self.webhook();
        let webhook = Call::HandlePaymentWebhook;
        [
            // CheckoutService.
            rows("product_id", MALFORMED_IDS, |id| {
                Call::GetProduct(GetProductRequest {
                    product_id: id.into(),
                })
            }),
            // (An empty page token asks for the first page.)
            rows("page_token", &MALFORMED_IDS[1..], |token| {
                Call::ListProducts(ListProductsRequest {
                    page_size: 10,
                    page_token: token.to_string(),
                })
            }),
            rows("page_size", [-1, i32::MIN, 1001, i32::MAX], |page_size| {
                Call::ListProducts(ListProductsRequest {
                    page_size,
                    page_token: String::new(),
                })
            }),
            rows("product_id", MALFORMED_IDS, |id| create_hold(id, 1, "")),
            rows("qty", [0, -1, i64::MIN, MAX_QTY + 1, i64::MAX], |qty| {
                create_hold(product_id, qty, "")
            }),
            rows("qty", ["req-too-many"], |key| {
                create_hold(product_id, MAX_QTY + 1, key)
            }),
            // 256 ASCII bytes, 256 bytes in only 128 characters, control characters.
            rows(
                "client_request_id",
                [
                    "k".repeat(256),
                    "é".repeat(128),
                    "cart\0".into(),
                    "cart\u{1}42".into(),
                    "cart\n42".into(),
                    "cart\u{7f}".into(),
                ],
                |key| create_hold(product_id, 1, &key),
            ),
            rows("hold_id", MALFORMED_IDS, |id| {
                Call::GetHold(GetHoldRequest { hold_id: id.into() })
            }),
            rows("hold_id", MALFORMED_IDS, |id| {
                Call::ExtendHold(ExtendHoldRequest { hold_id: id.into() })
            }),
            rows("product_id", MALFORMED_IDS, |id| {
                Call::JoinWaitlist(JoinWaitlistRequest {
                    product_id: id.into(),
                    qty: 1,
                    buyer_id: String::new(),
                })
            }),
            rows("qty", [0, -1, MAX_QTY + 1, i64::MIN], |qty| {
                Call::JoinWaitlist(JoinWaitlistRequest {
                    product_id: product_id.into(),
                    qty,
                    buyer_id: String::new(),
                })
            }),
            rows("buyer_id", bad_keys(), |buyer_id| {
                Call::JoinWaitlist(JoinWaitlistRequest {
                    product_id: product_id.into(),
                    qty: 1,
                    buyer_id,
                })
            }),
            rows("buyer_id", bad_keys(), |buyer_id| {
                Call::CreateHold(CreateHoldRequest {
                    product_id: product_id.into(),
                    qty: 1,
                    buyer_id,
                    ..Default::default()
                })
            }),
            rows(
                "max_per_buyer",
                [-1, i64::MIN, 1_000_000_000_001],
                |max_per_buyer| {
                    Call::CreateProduct(CreateProductRequest {
                        name: "limited".into(),
                        price_cents: 100,
                        stock_total: 1,
                        max_per_buyer,
                        ..Default::default()
                    })
                },
            ),
            rows("sale_ends_at", [0, 1], |earlier| {
                Call::CreateProduct(CreateProductRequest {
                    name: "window".into(),
                    price_cents: 100,
                    stock_total: 1,
                    sale_starts_at: Some(prost_types::Timestamp {
                        seconds: 2_000_000_000,
                        nanos: 0,
                    }),
                    sale_ends_at: Some(prost_types::Timestamp {
                        seconds: 2_000_000_000 - earlier,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
            }),
            rows("sale_starts_at", [-1, 1_000_000_000], |nanos| {
                Call::CreateProduct(CreateProductRequest {
                    name: "window".into(),
                    price_cents: 100,
                    stock_total: 1,
                    sale_starts_at: Some(prost_types::Timestamp {
                        seconds: 2_000_000_000,
                        nanos,
                    }),
                    ..Default::default()
                })
            }),
            rows("product", [()], |()| {
                Call::UpdateProduct(UpdateProductRequest::default())
            }),
            rows("product.id", MALFORMED_IDS, |id| {
                Call::UpdateProduct(UpdateProductRequest {
                    product: Some(Product {
                        id: id.into(),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["max_per_buyer".into()],
                    }),
                })
            }),
            rows("update_mask", [vec![], vec!["name".to_string()]], |paths| {
                Call::UpdateProduct(UpdateProductRequest {
                    product: Some(Product {
                        id: product_id.into(),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
            }),
            rows("order_id", MALFORMED_IDS, |id| {
                Call::CancelOrder(CancelOrderRequest {
                    order_id: id.into(),
                })
            }),
            rows("request_id", bad_keys(), |key| {
                Call::CreateProduct(CreateProductRequest {
                    request_id: key,
                    name: "retry".into(),
                    price_cents: 100,
                    stock_total: 1,
                    ..Default::default()
                })
            }),
            rows("request_id", bad_keys(), |key| {
                Call::AdjustStock(AdjustStockRequest {
                    request_id: key,
                    product_id: product_id.into(),
                    delta: 1,
                })
            }),
            rows("page_size", [-1, 1001], |page_size| {
                Call::ListRefundsRequired(ListRefundsRequiredRequest {
                    page_size,
                    page_token: String::new(),
                })
            }),
            rows(
                "page_token",
                ["x", "not base64!", "bm8gc2VwYXJhdG9y"],
                |token| {
                    Call::ListRefundsRequired(ListRefundsRequiredRequest {
                        page_size: 10,
                        page_token: token.into(),
                    })
                },
            ),
            rows(
                "idempotency_key",
                bad_keys().into_iter().chain([String::new()]),
                |key| {
                    Call::MarkRefunded(MarkRefundedRequest {
                        idempotency_key: key,
                        caller: String::new(),
                    })
                },
            ),
            rows("hold_id", MALFORMED_IDS, |id| {
                Call::ReleaseHold(ReleaseHoldRequest { hold_id: id.into() })
            }),
            rows("hold_id", MALFORMED_IDS, |id| {
                Call::CreateOrder(CreateOrderRequest { hold_id: id.into() })
            }),
            rows("order_id", MALFORMED_IDS, |id| {
                Call::GetOrder(GetOrderRequest {
                    order_id: id.into(),
                })
            }),
            rows(
                "idempotency_key",
                [
                    String::new(),
                    "e".repeat(256),
                    "é".repeat(128),
                    "evt\0".into(),
                    "evt\u{1b}[2J".into(),
                ],
                |idempotency_key| {
                    webhook(HandlePaymentWebhookRequest {
                        idempotency_key,
                        ..valid.clone()
                    })
                },
            ),
            rows("target", [None], |target| {
                webhook(HandlePaymentWebhookRequest {
                    target,
                    ..valid.clone()
                })
            }),
            rows("order_id", MALFORMED_IDS, |id| {
                webhook(HandlePaymentWebhookRequest {
                    target: Some(Target::OrderId(id.into())),
                    ..valid.clone()
                })
            }),
            rows("hold_id", MALFORMED_IDS, |id| {
                webhook(HandlePaymentWebhookRequest {
                    target: Some(Target::HoldId(id.into())),
                    ..valid.clone()
                })
            }),
            rows(
                "result",
                [PaymentResult::Unspecified as i32, 3, -1],
                |result| {
                    webhook(HandlePaymentWebhookRequest {
                        result,
                        ..valid.clone()
                    })
                },
            ),
            rows("amount_cents", [0, -1, -5, i64::MIN], |amount_cents| {
                webhook(HandlePaymentWebhookRequest {
                    amount_cents,
                    ..valid.clone()
                })
            }),
            rows(
                "failure_reason",
                ["r".repeat(1001), "é".repeat(501), "card\0declined".into()],
                |failure_reason| {
                    webhook(HandlePaymentWebhookRequest {
                        result: PaymentResult::Failure.into(),
                        failure_reason,
                        ..valid.clone()
                    })
                },
            ),
            rows("product_ids", MALFORMED_IDS, |id| {
                Call::WatchAvailability(WatchAvailabilityRequest {
                    product_ids: vec![product_id.into(), id.into()],
                })
            }),
            // More than the server's limit of watched products (1,000 by default), even of
            // one product named again and again (within the message size limit: more is
            // refused before it is read).
            rows("product_ids", [1_001, 6_000], |count| {
                Call::WatchAvailability(WatchAvailabilityRequest {
                    product_ids: vec![product_id.to_string(); count],
                })
            }),
            // InventoryAdminService.
            rows("product_ids", MALFORMED_IDS, |id| {
                Call::AuditInventory(AuditInventoryRequest {
                    product_ids: vec![id.into(), product_id.into()],
                })
            }),
            rows("product_ids", [1_001], |count| {
                Call::AuditInventory(AuditInventoryRequest {
                    product_ids: vec![product_id.to_string(); count],
                })
            }),
            rows(
                "name",
                [
                    String::new(),
                    "   ".into(),
                    "n".repeat(201),
                    "é".repeat(101),
                    "sneaker\0".into(),
                ],
                |name| create_product(&name, 100, 1),
            ),
            // Above the largest price (10^12 cents), whose total for the largest hold fits.
            rows(
                "price_cents",
                [-1, i64::MIN, 1 << 62, i64::MAX],
                |price_cents| create_product("bad price", price_cents, 1),
            ),
            rows("stock_total", [-1, i64::MIN], |stock_total| {
                create_product("bad stock", 100, stock_total)
            }),
            rows("delta", [0, i64::MIN, i64::MAX, i64::MIN + 1], |delta| {
                Call::AdjustStock(AdjustStockRequest {
                    request_id: String::new(),
                    product_id: product_id.into(),
                    delta,
                })
            }),
            rows("product_id", MALFORMED_IDS, |id| {
                Call::AdjustStock(AdjustStockRequest {
                    request_id: String::new(),
                    product_id: id.into(),
                    delta: 5,
                })
            }),
        ]
        .concat()
    }

    /// Makes the call, as the server answered.
    async fn call(&mut self, call: Call) -> Result<(), tonic::Status> {
        let (checkout, admin) = (&mut self.checkout, &mut self.admin);
        match call {
            Call::GetProduct(request) => checkout.get_product(request).await.map(drop),
            Call::ListProducts(request) => checkout.list_products(request).await.map(drop),
            Call::CreateHold(request) => checkout.create_hold(request).await.map(drop),
            Call::GetHold(request) => checkout.get_hold(request).await.map(drop),
            Call::ReleaseHold(request) => checkout.release_hold(request).await.map(drop),
            Call::CreateOrder(request) => checkout.create_order(request).await.map(drop),
            Call::GetOrder(request) => checkout.get_order(request).await.map(drop),
            Call::HandlePaymentWebhook(request) => {
                checkout.handle_payment_webhook(request).await.map(drop)
            }
            Call::WatchAvailability(request) => {
                checkout.watch_availability(request).await.map(drop)
            }
            Call::CreateProduct(request) => admin.create_product(request).await.map(drop),
            Call::AdjustStock(request) => admin.adjust_stock(request).await.map(drop),
            Call::AuditInventory(request) => admin.audit_inventory(request).await.map(drop),
            Call::CancelOrder(request) => checkout.cancel_order(request).await.map(drop),
            Call::ExtendHold(request) => checkout.extend_hold(request).await.map(drop),
            Call::JoinWaitlist(request) => checkout.join_waitlist(request).await.map(drop),
            Call::UpdateProduct(request) => admin.update_product(request).await.map(drop),
            Call::ListRefundsRequired(request) => {
                admin.list_refunds_required(request).await.map(drop)
            }
            Call::MarkRefunded(request) => admin.mark_refunded(request).await.map(drop),
        }
    }

    /// Makes a bad call; what went wrong unless the server refused it as INVALID_ARGUMENT
    /// naming `field` (in the BadRequest detail and the message) and nothing changed, the
    /// books still balancing.
    async fn refuse(&mut self, call: &Call, field: &str) -> Result<(), String> {
        let answer = self.call(call.clone()).await;
        let refused = check_invalid(answer, field);
        let now = self.state().await;
        let unchanged = if now == self.before {
            Ok(())
        } else {
            let change = format!("changed {:#?}\n  to {now:#?}", self.before);
            // Later calls are judged against what this one left.
            self.before = now;
            Err(change)
        };
        self.server.assert_consistent().await;
        match (refused, unchanged) {
            (Ok(()), Ok(())) => Ok(()),
            (refused, unchanged) => Err(format!(
                "{call:?} (should name {field}): {}",
                [refused.err(), unchanged.err()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
    }

    /// Makes a bad call and asserts it was refused naming `field` and changed nothing.
    async fn assert_refused(&mut self, call: Call, field: &str) {
        if let Err(failure) = self.refuse(&call, field).await {
            panic!("{failure}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_field_of_every_rpc_is_refused_naming_it_and_changes_nothing() {
    let mut fx = Fixture::new().await;
    let bad_requests = fx.bad_requests();
    let mut failures = Vec::new();
    for (call, field) in &bad_requests {
        if let Err(failure) = fx.refuse(call, field).await {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad requests were not refused as they should be:\n{}",
        failures.len(),
        bad_requests.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_call_does_not_use_up_its_key() {
    let mut fx = Fixture::new().await;
    let product_id = fx.product.id.clone();

    // A hold refused for its qty, and a webhook refused for its amount (each changing
    // nothing)...
    fx.assert_refused(create_hold(&product_id, MAX_QTY + 1, "req-too-many"), "qty")
        .await;
    let bad = HandlePaymentWebhookRequest {
        amount_cents: -5,
        ..fx.webhook()
    };
    fx.assert_refused(Call::HandlePaymentWebhook(bad), "amount_cents")
        .await;

    // ...leave the client request id and the idempotency key they carried unused.
    let largest = try_hold(&mut fx.checkout, &product_id, MAX_QTY, Some("req-too-many"))
        .await
        .expect("the maximum itself is allowed");
    assert_eq!(largest.qty, MAX_QTY);
    let good = fx.webhook();
    let good = deliver(&mut fx.checkout, good).await;
    assert_eq!(good.outcome(), WebhookOutcome::Applied);
    assert_eq!(good.order_status(), OrderStatus::Paid);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_limits_themselves_are_allowed() {
    let mut fx = Fixture::new().await;
    let product_id = fx.product.id.clone();

    let largest_page = fx
        .checkout
        .list_products(ListProductsRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("1000 is allowed")
        .into_inner();
    assert_eq!(largest_page.products.len(), 1);

    let largest = try_hold(&mut fx.checkout, &product_id, MAX_QTY, None)
        .await
        .expect("the maximum itself is allowed");
    assert_eq!(largest.qty, MAX_QTY);

    let longest = try_hold(&mut fx.checkout, &product_id, 1, Some(&"k".repeat(255)))
        .await
        .expect("255 bytes are allowed");
    assert_eq!(longest.client_request_id.len(), 255);

    let longest = fx
        .admin
        .create_product(CreateProductRequest {
            request_id: String::new(),
            name: "n".repeat(200),
            price_cents: 100,
            stock_total: 1,
            ..Default::default()
        })
        .await
        .expect("200 bytes are allowed")
        .into_inner();
    assert_eq!(longest.name.len(), 200);

    // The largest price: an order of the largest hold still has a total.
    let dearest = fx.server.product("dearest", 1_000_000_000_000, 10).await;
    let order = pending_order(&mut fx.checkout, &dearest.id, MAX_QTY).await;
    assert_eq!(order.total_cents, 5_000_000_000_000);

    // As many watched products as the limit allows, even one product named again and again.
    let watched = fx
        .checkout
        .watch_availability(WatchAvailabilityRequest {
            product_ids: vec![product_id.clone(); 1_000],
        })
        .await
        .expect("1,000 watched products are allowed")
        .into_inner()
        .message()
        .await
        .expect("a first update")
        .expect("the product's state");
    assert_eq!(watched.product_id, product_id);
}

/// A hostile value (here 100,000 control characters, about 600 KB once escaped) is not
/// echoed whole: the status quotes a short prefix.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_quotes_only_a_short_prefix_of_the_bad_value() {
    let mut fx = Fixture::new().await;
    let hostile = "\u{1}".repeat(100_000);

    let status = fx
        .checkout
        .get_hold(GetHoldRequest {
            hold_id: hostile.clone(),
        })
        .await
        .expect_err("not an id");

    assert_eq!(
        check_invalid(Err::<(), _>(status.clone()), "hold_id"),
        Ok(())
    );
    assert!(
        status.message().len() < 1024 && status.details().len() < 4096,
        "the status echoes {} bytes of message and {} of details",
        status.message().len(),
        status.details().len()
    );
}

/// One crafted request among a crowd of concurrent holds on one product (the same batch,
/// if they coalesce) is refused alone: every honest caller gets its hold.
#[tokio::test(flavor = "multi_thread")]
async fn a_nul_key_in_a_crowd_of_holds_fails_only_its_own_call() {
    let server = TestServer::start().await;
    let product = server.product("crowded", 100, 1_000).await;
    let mut calls = Vec::new();
    for caller in 0..64 {
        let mut checkout = server.checkout().await;
        let product_id = product.id.clone();
        let key = if caller == 31 {
            "crafted\0key".to_string()
        } else {
            format!("honest-{caller}")
        };
        calls.push(tokio::spawn(async move {
            (
                caller,
                try_hold(&mut checkout, &product_id, 1, Some(&key)).await,
            )
        }));
    }

    let mut held = 0;
    for call in calls {
        let (caller, answer) = call.await.unwrap();
        if caller == 31 {
            assert_eq!(check_invalid(answer, "client_request_id"), Ok(()));
        } else {
            answer.unwrap_or_else(|status| panic!("honest caller {caller} refused: {status:?}"));
            held += 1;
        }
    }

    assert_eq!(held, 63);
    assert_counters(
        &server,
        &product,
        Counters::stock(1_000).reserved(63).sold(0),
    )
    .await;
    server.assert_consistent().await;
}
