//! Bad input: every field of every RPC is checked, named in INVALID_ARGUMENT, and changes nothing.

use flashsale::grpc::pb::{
    AdjustStockRequest, AuditInventoryRequest, AuditInventoryResponse, CreateOrderRequest,
    CreateProductRequest, GetHoldRequest, GetOrderRequest, GetProductRequest,
    HandlePaymentWebhookRequest, Hold, ListProductsRequest, Order, OrderStatus, PaymentResult,
    Product, ReleaseHoldRequest, WatchAvailabilityRequest, WebhookOutcome,
    handle_payment_webhook_request::Target,
};

use crate::support::{Admin, Checkout, TestServer, assert_invalid, try_hold};

/// The per-hold maximum the fixture's server runs with.
const MAX_QTY: i64 = 5;

/// Ids that are not ids: empty, not a UUID, a UUID one digit short, a UUID with junk after it.
const MALFORMED_IDS: [&str; 4] = [
    "",
    "not-a-uuid",
    "0198c3a4-7b1e-7c2d-9f00-12345678901",
    "0198c3a4-7b1e-7c2d-9f00-123456789012x",
];

/// Everything a rejected call could have touched.
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
        let held = try_hold(&mut checkout, &product.id, 2, Some("req-fixture"))
            .await
            .unwrap();
        let converted = try_hold(&mut checkout, &product.id, 3, None).await.unwrap();
        let order = checkout
            .create_order(CreateOrderRequest {
                hold_id: converted.hold_id,
            })
            .await
            .unwrap()
            .into_inner();
        let mut fixture = Fixture {
            server,
            checkout,
            admin,
            product,
            hold: held,
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
        let hold = self
            .checkout
            .get_hold(GetHoldRequest {
                hold_id: self.hold.hold_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let order = self
            .checkout
            .get_order(GetOrderRequest {
                order_id: self.order.order_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        State {
            products,
            audit,
            hold,
            order,
        }
    }

    /// Asserts the rejected calls changed nothing, and the books still balance.
    async fn assert_unchanged(&mut self) {
        let now = self.state().await;
        assert_eq!(now, self.before, "a rejected call changed something");
        self.server.assert_consistent().await;
    }

    /// A webhook that would be accepted: success for the fixture's pending order.
    fn webhook(&self) -> HandlePaymentWebhookRequest {
        HandlePaymentWebhookRequest {
            idempotency_key: "evt-valid".into(),
            target: Some(Target::OrderId(self.order.order_id.clone())),
            result: PaymentResult::Success.into(),
            failure_reason: String::new(),
            amount_cents: 0,
        }
    }

    async fn send_webhook(
        &mut self,
        request: HandlePaymentWebhookRequest,
    ) -> Result<flashsale::grpc::pb::HandlePaymentWebhookResponse, tonic::Status> {
        self.checkout
            .handle_payment_webhook(request)
            .await
            .map(tonic::Response::into_inner)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn get_product_rejects_malformed_product_id() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        let result = fx
            .checkout
            .get_product(GetProductRequest {
                product_id: id.into(),
            })
            .await;
        assert_invalid(result, "product_id");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_products_rejects_malformed_page_token() {
    let mut fx = Fixture::new().await;
    for token in &MALFORMED_IDS[1..] {
        let result = fx
            .checkout
            .list_products(ListProductsRequest {
                page_size: 10,
                page_token: token.to_string(),
            })
            .await;
        assert_invalid(result, "page_token");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_products_rejects_page_size_outside_zero_to_one_thousand() {
    let mut fx = Fixture::new().await;
    for page_size in [-1, i32::MIN, 1001, i32::MAX] {
        let result = fx
            .checkout
            .list_products(ListProductsRequest {
                page_size,
                page_token: String::new(),
            })
            .await;
        assert_invalid(result, "page_size");
    }
    let largest = fx
        .checkout
        .list_products(ListProductsRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("1000 is allowed")
        .into_inner();
    assert_eq!(largest.products.len(), 1);
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_hold_rejects_malformed_product_id() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        assert_invalid(try_hold(&mut fx.checkout, id, 1, None).await, "product_id");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_hold_rejects_qty_outside_one_to_the_configured_max() {
    let mut fx = Fixture::new().await;
    let product_id = fx.product.id.clone();
    for qty in [0, -1, i64::MIN, MAX_QTY + 1, i64::MAX] {
        assert_invalid(
            try_hold(&mut fx.checkout, &product_id, qty, None).await,
            "qty",
        );
    }
    // A rejected call with a client request id does not claim the id.
    assert_invalid(
        try_hold(
            &mut fx.checkout,
            &product_id,
            MAX_QTY + 1,
            Some("req-too-many"),
        )
        .await,
        "qty",
    );
    fx.assert_unchanged().await;

    let largest = try_hold(&mut fx.checkout, &product_id, MAX_QTY, Some("req-too-many"))
        .await
        .expect("the maximum itself is allowed");
    assert_eq!(largest.qty, MAX_QTY);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_hold_rejects_client_request_id_over_255_bytes() {
    let mut fx = Fixture::new().await;
    let product_id = fx.product.id.clone();
    // 256 ASCII bytes, and 256 bytes in only 128 characters.
    for key in ["k".repeat(256), "é".repeat(128)] {
        assert_invalid(
            try_hold(&mut fx.checkout, &product_id, 1, Some(&key)).await,
            "client_request_id",
        );
    }
    fx.assert_unchanged().await;

    let longest = try_hold(&mut fx.checkout, &product_id, 1, Some(&"k".repeat(255)))
        .await
        .expect("255 bytes are allowed");
    assert_eq!(longest.client_request_id.len(), 255);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_hold_rejects_malformed_hold_id() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        let result = fx
            .checkout
            .get_hold(GetHoldRequest { hold_id: id.into() })
            .await;
        assert_invalid(result, "hold_id");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn release_hold_rejects_malformed_hold_id() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        let result = fx
            .checkout
            .release_hold(ReleaseHoldRequest { hold_id: id.into() })
            .await;
        assert_invalid(result, "hold_id");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_order_rejects_malformed_hold_id() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        let result = fx
            .checkout
            .create_order(CreateOrderRequest { hold_id: id.into() })
            .await;
        assert_invalid(result, "hold_id");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_order_rejects_malformed_order_id() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        let result = fx
            .checkout
            .get_order(GetOrderRequest {
                order_id: id.into(),
            })
            .await;
        assert_invalid(result, "order_id");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_rejects_empty_or_overlong_idempotency_key() {
    let mut fx = Fixture::new().await;
    for key in [String::new(), "e".repeat(256), "é".repeat(128)] {
        let request = HandlePaymentWebhookRequest {
            idempotency_key: key,
            ..fx.webhook()
        };
        assert_invalid(fx.send_webhook(request).await, "idempotency_key");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_rejects_missing_target() {
    let mut fx = Fixture::new().await;
    let request = HandlePaymentWebhookRequest {
        target: None,
        ..fx.webhook()
    };
    assert_invalid(fx.send_webhook(request).await, "target");
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_rejects_malformed_target_ids() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        let request = HandlePaymentWebhookRequest {
            target: Some(Target::OrderId(id.into())),
            ..fx.webhook()
        };
        assert_invalid(fx.send_webhook(request).await, "order_id");
        let request = HandlePaymentWebhookRequest {
            target: Some(Target::HoldId(id.into())),
            ..fx.webhook()
        };
        assert_invalid(fx.send_webhook(request).await, "hold_id");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_rejects_unspecified_or_unknown_result() {
    let mut fx = Fixture::new().await;
    for result in [PaymentResult::Unspecified as i32, 3, -1] {
        let request = HandlePaymentWebhookRequest {
            result,
            ..fx.webhook()
        };
        assert_invalid(fx.send_webhook(request).await, "result");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_rejects_negative_amount() {
    let mut fx = Fixture::new().await;
    for amount_cents in [-1, i64::MIN] {
        let request = HandlePaymentWebhookRequest {
            amount_cents,
            ..fx.webhook()
        };
        assert_invalid(fx.send_webhook(request).await, "amount_cents");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_rejects_failure_reason_over_1000_bytes() {
    let mut fx = Fixture::new().await;
    for failure_reason in ["r".repeat(1001), "é".repeat(501)] {
        let request = HandlePaymentWebhookRequest {
            result: PaymentResult::Failure.into(),
            failure_reason,
            ..fx.webhook()
        };
        assert_invalid(fx.send_webhook(request).await, "failure_reason");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_webhook_does_not_use_up_its_idempotency_key() {
    let mut fx = Fixture::new().await;
    let bad = HandlePaymentWebhookRequest {
        amount_cents: -5,
        ..fx.webhook()
    };
    assert_invalid(fx.send_webhook(bad).await, "amount_cents");
    fx.assert_unchanged().await;

    let good = fx.send_webhook(fx.webhook()).await.unwrap();
    assert_eq!(good.outcome(), WebhookOutcome::Applied);
    assert_eq!(good.order_status(), OrderStatus::Paid);
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_availability_rejects_malformed_product_ids() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        let result = fx
            .checkout
            .watch_availability(WatchAvailabilityRequest {
                product_ids: vec![fx.product.id.clone(), id.into()],
            })
            .await
            .map(|_| ());
        assert_invalid(result, "product_ids");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_inventory_rejects_malformed_product_ids() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        let result = fx
            .admin
            .audit_inventory(AuditInventoryRequest {
                product_ids: vec![id.into(), fx.product.id.clone()],
            })
            .await;
        assert_invalid(result, "product_ids");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_product_rejects_empty_or_overlong_name() {
    let mut fx = Fixture::new().await;
    for name in [
        String::new(),
        "   ".into(),
        "n".repeat(201),
        "é".repeat(101),
    ] {
        let result = fx
            .admin
            .create_product(CreateProductRequest {
                name,
                price_cents: 100,
                stock_total: 1,
            })
            .await;
        assert_invalid(result, "name");
    }
    fx.assert_unchanged().await;

    let longest = fx
        .admin
        .create_product(CreateProductRequest {
            name: "n".repeat(200),
            price_cents: 100,
            stock_total: 1,
        })
        .await
        .expect("200 bytes are allowed")
        .into_inner();
    assert_eq!(longest.name.len(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_product_rejects_negative_price_or_stock() {
    let mut fx = Fixture::new().await;
    for price_cents in [-1, i64::MIN] {
        let result = fx
            .admin
            .create_product(CreateProductRequest {
                name: "bad price".into(),
                price_cents,
                stock_total: 1,
            })
            .await;
        assert_invalid(result, "price_cents");
    }
    for stock_total in [-1, i64::MIN] {
        let result = fx
            .admin
            .create_product(CreateProductRequest {
                name: "bad stock".into(),
                price_cents: 100,
                stock_total,
            })
            .await;
        assert_invalid(result, "stock_total");
    }
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn adjust_stock_rejects_zero_delta() {
    let mut fx = Fixture::new().await;
    let result = fx
        .admin
        .adjust_stock(AdjustStockRequest {
            product_id: fx.product.id.clone(),
            delta: 0,
        })
        .await;
    assert_invalid(result, "delta");
    fx.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn adjust_stock_rejects_malformed_product_id() {
    let mut fx = Fixture::new().await;
    for id in MALFORMED_IDS {
        let result = fx
            .admin
            .adjust_stock(AdjustStockRequest {
                product_id: id.into(),
                delta: 5,
            })
            .await;
        assert_invalid(result, "product_id");
    }
    fx.assert_unchanged().await;
}
