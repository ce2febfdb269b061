//! The whole path once: product, hold, order, payment, audit.

use flashsale::grpc::pb::{
    CreateHoldRequest, CreateOrderRequest, GetProductRequest, HandlePaymentWebhookRequest,
    HoldStatus, OrderStatus, PaymentResult, WebhookOutcome, handle_payment_webhook_request::Target,
};

use crate::support::TestServer;

#[tokio::test(flavor = "multi_thread")]
async fn hold_order_pay_sells_the_units() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;

    let hold = checkout
        .create_hold(CreateHoldRequest {
            product_id: product.id.clone(),
            qty: 2,
            client_request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hold.status(), HoldStatus::Active);

    let order = checkout
        .create_order(CreateOrderRequest {
            hold_id: hold.hold_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.status(), OrderStatus::Pending);
    assert_eq!(order.total_cents, 25_800);

    let paid = checkout
        .handle_payment_webhook(HandlePaymentWebhookRequest {
            idempotency_key: "evt_1".into(),
            target: Some(Target::OrderId(order.order_id.clone())),
            result: PaymentResult::Success.into(),
            failure_reason: String::new(),
            amount_cents: 25_800,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paid.outcome(), WebhookOutcome::Applied);
    assert_eq!(paid.order_status(), OrderStatus::Paid);

    let after = checkout
        .get_product(GetProductRequest {
            product_id: product.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            after.stock_total,
            after.reserved,
            after.sold,
            after.available
        ),
        (10, 0, 2, 8)
    );
    assert!(after.version > product.version);
    server.assert_consistent().await;
    server.stop().await.unwrap();
}
