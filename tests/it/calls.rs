//! The checkout calls the tests share: requests built from a few values, and answers
//! unwrapped where a refusal would be the test's failure.

use std::time::{Duration, SystemTime};

use flashsale::grpc::pb::{
    self, CreateHoldRequest, CreateOrderRequest, GetHoldRequest, GetOrderRequest,
    GetProductRequest, HandlePaymentWebhookRequest, PaymentResult,
    handle_payment_webhook_request::Target,
};

use crate::support::Checkout;

/// Creates a hold of `qty` units; panics if the server refuses.
pub(crate) async fn hold(checkout: &mut Checkout, product_id: &str, qty: i64) -> pb::Hold {
    checkout
        .create_hold(CreateHoldRequest {
            product_id: product_id.into(),
            qty,
            client_request_id: String::new(),
        })
        .await
        .expect("create hold")
        .into_inner()
}

/// CreateOrder for a hold, as the server answered.
pub(crate) async fn try_order(
    checkout: &mut Checkout,
    hold_id: &str,
) -> Result<pb::Order, tonic::Status> {
    checkout
        .create_order(CreateOrderRequest {
            hold_id: hold_id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// CreateOrder for a hold; panics if the server refuses.
pub(crate) async fn order(checkout: &mut Checkout, hold_id: &str) -> pb::Order {
    try_order(checkout, hold_id).await.expect("create order")
}

/// GetHold.
pub(crate) async fn get_hold(checkout: &mut Checkout, hold_id: &str) -> pb::Hold {
    checkout
        .get_hold(GetHoldRequest {
            hold_id: hold_id.into(),
        })
        .await
        .expect("get hold")
        .into_inner()
}

/// GetOrder.
pub(crate) async fn get_order(checkout: &mut Checkout, order_id: &str) -> pb::Order {
    checkout
        .get_order(GetOrderRequest {
            order_id: order_id.into(),
        })
        .await
        .expect("get order")
        .into_inner()
}

/// GetProduct: the product as stored right now.
pub(crate) async fn get_product(checkout: &mut Checkout, product_id: &str) -> pb::Product {
    checkout
        .get_product(GetProductRequest {
            product_id: product_id.into(),
        })
        .await
        .expect("get product")
        .into_inner()
}

/// A product's counters as `(stock_total, reserved, sold, available)`.
pub(crate) fn counters(product: &pb::Product) -> (i64, i64, i64, i64) {
    (
        product.stock_total,
        product.reserved,
        product.sold,
        product.available,
    )
}

/// A webhook aimed at an order.
pub(crate) fn on_order(order_id: &str) -> Target {
    Target::OrderId(order_id.into())
}

/// A webhook aimed at a hold (payment started before the order existed).
pub(crate) fn on_hold(hold_id: &str) -> Target {
    Target::HoldId(hold_id.into())
}

/// A successful payment webhook that reports no amount.
pub(crate) fn success(key: &str, target: Target) -> HandlePaymentWebhookRequest {
    HandlePaymentWebhookRequest {
        idempotency_key: key.into(),
        target: Some(target),
        result: PaymentResult::Success.into(),
        failure_reason: String::new(),
        amount_cents: 0,
    }
}

/// A failed payment webhook that reports no amount.
pub(crate) fn failure(key: &str, target: Target, reason: &str) -> HandlePaymentWebhookRequest {
    HandlePaymentWebhookRequest {
        idempotency_key: key.into(),
        target: Some(target),
        result: PaymentResult::Failure.into(),
        failure_reason: reason.into(),
        amount_cents: 0,
    }
}

/// Delivers a webhook, as the server answered.
pub(crate) async fn try_deliver(
    checkout: &mut Checkout,
    webhook: HandlePaymentWebhookRequest,
) -> Result<pb::HandlePaymentWebhookResponse, tonic::Status> {
    checkout
        .handle_payment_webhook(webhook)
        .await
        .map(tonic::Response::into_inner)
}

/// Delivers a webhook; panics if the server refuses.
pub(crate) async fn deliver(
    checkout: &mut Checkout,
    webhook: HandlePaymentWebhookRequest,
) -> pb::HandlePaymentWebhookResponse {
    try_deliver(checkout, webhook).await.expect("webhook")
}

/// Sleeps until a moment (a hold's `expires_at`) has passed by this machine's clock, which
/// is the database's clock too (same host), plus a small margin.
pub(crate) async fn sleep_past(moment: Option<prost_types::Timestamp>) {
    let moment = moment.expect("timestamp set");
    let moment = SystemTime::try_from(moment).expect("valid timestamp");
    let left = moment.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
}
