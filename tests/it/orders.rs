//! Orders: a hold becomes exactly one order (retries and concurrent calls included), a hold
//! past its TTL never does, and payment moves an order PENDING -> PAID or CANCELLED once.

use std::time::Duration;

use flashsale::grpc::pb::{
    self, GetOrderRequest, HoldStatus, OrderStatus, ReleaseHoldRequest, WebhookOutcome,
};
use tonic::Code;

use crate::calls::{
    counters, deliver, failure, get_hold, get_order, get_product, hold, on_order, order,
    sleep_past, success, try_order,
};
use crate::support::{Checkout, TestServer, assert_status};

/// A server with a product on sale, a hold of `qty` on it and the order it became.
async fn pending_order(
    server: &TestServer,
    stock: i64,
    price: i64,
    qty: i64,
) -> (Checkout, pb::Product, pb::Order) {
    let product = server.product("gadget", price, stock).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, qty).await;
    let order = order(&mut checkout, &hold.hold_id).await;
    (checkout, product, order)
}

// ---------------------------------------------------------------------------------------
// Hold -> order.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn create_order_makes_a_pending_order_and_keeps_the_units_reserved() {
    let server = TestServer::start().await;
    let product = server.product("lamp", 1_250, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 3).await;
    let held = get_product(&mut checkout, &product.id).await;

    let order = order(&mut checkout, &hold.hold_id).await;

    assert_eq!(order.status(), OrderStatus::Pending);
    assert_eq!(order.total_cents, 3 * 1_250);
    assert_eq!(
        (order.qty, &order.hold_id, &order.product_id),
        (3, &hold.hold_id, &product.id)
    );
    assert!(order.failure_reason.is_empty());
    assert_eq!(
        get_hold(&mut checkout, &hold.hold_id).await.status(),
        HoldStatus::Converted
    );
    let after = get_product(&mut checkout, &product.id).await;
    assert_eq!(counters(&after), counters(&held));
    assert_eq!(counters(&after), (10, 3, 0, 7));
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retried_create_order_returns_the_same_order_without_reserving_again() {
    let server = TestServer::start().await;
    let (mut checkout, product, first) = pending_order(&server, 10, 500, 2).await;

    let again = order(&mut checkout, &first.hold_id).await;

    assert_eq!(again.order_id, first.order_id);
    assert_eq!(again.status(), OrderStatus::Pending);
    let after = get_product(&mut checkout, &product.id).await;
    assert_eq!(counters(&after), (10, 2, 0, 8));
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_create_orders_on_one_hold_all_get_the_same_order() {
    let server = TestServer::start().await;
    let product = server.product("lamp", 700, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 4).await;

    let mut calls = Vec::new();
    for _ in 0..10 {
        let mut client = server.checkout().await;
        let hold_id = hold.hold_id.clone();
        calls.push(tokio::spawn(async move {
            try_order(&mut client, &hold_id).await
        }));
    }
    let mut order_ids = Vec::new();
    for call in calls {
        let order = call.await.unwrap().expect("every CreateOrder succeeds");
        assert_eq!(order.status(), OrderStatus::Pending);
        order_ids.push(order.order_id);
    }

    order_ids.dedup();
    assert_eq!(order_ids.len(), 1, "one hold, one order: {order_ids:?}");
    let after = get_product(&mut checkout, &product.id).await;
    assert_eq!(counters(&after), (10, 4, 0, 6));
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_order_returns_the_order_as_created() {
    let server = TestServer::start().await;
    let (mut checkout, _, created) = pending_order(&server, 5, 999, 1).await;

    let fetched = get_order(&mut checkout, &created.order_id).await;

    assert_eq!(fetched, created);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_hold_or_order_is_not_found() {
    let server = TestServer::start().await;
    let (mut checkout, _, order) = pending_order(&server, 5, 100, 1).await;
    let unknown = uuid::Uuid::now_v7().to_string();

    assert_status(
        try_order(&mut checkout, &unknown).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_status(
        checkout
            .get_order(GetOrderRequest {
                order_id: unknown.clone(),
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    // A hold id is not an order id.
    assert_status(
        checkout
            .get_order(GetOrderRequest {
                order_id: order.hold_id.clone(),
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_past_its_ttl_never_becomes_an_order_even_before_the_reaper_runs() {
    let server = TestServer::start_with(|config| {
        config.hold_ttl = Duration::from_secs(1);
        config.reaper_interval = Duration::from_secs(3600);
    })
    .await;
    let product = server.product("lamp", 100, 5).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;

    sleep_past(hold.expires_at).await;
    // The reaper has not run: the units are still held.
    assert_eq!(get_product(&mut checkout, &product.id).await.reserved, 2);

    assert_status(
        try_order(&mut checkout, &hold.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_EXPIRED",
    );
    assert_eq!(
        counters(&get_product(&mut checkout, &product.id).await),
        (5, 0, 0, 5)
    );
    assert_eq!(
        get_hold(&mut checkout, &hold.hold_id).await.status(),
        HoldStatus::Expired
    );
    // Asking again changes nothing: the units came back once.
    assert_status(
        try_order(&mut checkout, &hold.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_EXPIRED",
    );
    assert_eq!(
        counters(&get_product(&mut checkout, &product.id).await),
        (5, 0, 0, 5)
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn released_hold_cannot_become_an_order() {
    let server = TestServer::start().await;
    let product = server.product("lamp", 100, 5).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;
    checkout
        .release_hold(ReleaseHoldRequest {
            hold_id: hold.hold_id.clone(),
        })
        .await
        .unwrap();

    assert_status(
        try_order(&mut checkout, &hold.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_RELEASED",
    );
    assert_eq!(
        counters(&get_product(&mut checkout, &product.id).await),
        (5, 0, 0, 5)
    );
    server.assert_consistent().await;
}

// ---------------------------------------------------------------------------------------
// The order state machine.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn successful_payment_marks_the_order_paid_and_sells_its_units() {
    let server = TestServer::start().await;
    let (mut checkout, product, order) = pending_order(&server, 10, 300, 3).await;

    let receipt = deliver(&mut checkout, success("pay-1", on_order(&order.order_id))).await;

    assert_eq!(receipt.outcome(), WebhookOutcome::Applied);
    assert_eq!(receipt.order_status(), OrderStatus::Paid);
    assert_eq!(receipt.order_id, order.order_id);
    assert_eq!(
        get_order(&mut checkout, &order.order_id).await.status(),
        OrderStatus::Paid
    );
    assert_eq!(
        counters(&get_product(&mut checkout, &product.id).await),
        (10, 0, 3, 7)
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failure_after_payment_is_ignored_and_the_order_stays_paid() {
    let server = TestServer::start().await;
    let (mut checkout, product, order) = pending_order(&server, 10, 300, 3).await;
    deliver(&mut checkout, success("pay-1", on_order(&order.order_id))).await;
    let paid = get_product(&mut checkout, &product.id).await;

    let receipt = deliver(
        &mut checkout,
        failure("pay-2", on_order(&order.order_id), "late decline"),
    )
    .await;

    assert_eq!(receipt.outcome(), WebhookOutcome::Ignored);
    assert_eq!(receipt.order_status(), OrderStatus::Paid);
    assert_eq!(receipt.order_id, order.order_id);
    let after = get_order(&mut checkout, &order.order_id).await;
    assert_eq!(after.status(), OrderStatus::Paid);
    assert!(after.failure_reason.is_empty());
    let now = get_product(&mut checkout, &product.id).await;
    assert_eq!(counters(&now), counters(&paid));
    assert_eq!(counters(&now), (10, 0, 3, 7));
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_payment_cancels_the_order_and_returns_its_units() {
    let server = TestServer::start().await;
    let (mut checkout, product, order) = pending_order(&server, 10, 300, 3).await;

    let receipt = deliver(
        &mut checkout,
        failure("pay-1", on_order(&order.order_id), "card declined"),
    )
    .await;

    assert_eq!(receipt.outcome(), WebhookOutcome::Applied);
    assert_eq!(receipt.order_status(), OrderStatus::Cancelled);
    let after = get_order(&mut checkout, &order.order_id).await;
    assert_eq!(after.status(), OrderStatus::Cancelled);
    assert_eq!(after.failure_reason, "card declined");
    assert_eq!(
        counters(&get_product(&mut checkout, &product.id).await),
        (10, 0, 0, 10)
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn success_after_cancellation_is_ignored_and_the_order_stays_cancelled() {
    let server = TestServer::start().await;
    let (mut checkout, product, order) = pending_order(&server, 10, 300, 3).await;
    deliver(
        &mut checkout,
        failure("pay-1", on_order(&order.order_id), "card declined"),
    )
    .await;

    let receipt = deliver(&mut checkout, success("pay-2", on_order(&order.order_id))).await;

    assert_eq!(receipt.outcome(), WebhookOutcome::Ignored);
    assert_eq!(receipt.order_status(), OrderStatus::Cancelled);
    let after = get_order(&mut checkout, &order.order_id).await;
    assert_eq!(after.status(), OrderStatus::Cancelled);
    assert_eq!(after.failure_reason, "card declined");
    assert_eq!(
        counters(&get_product(&mut checkout, &product.id).await),
        (10, 0, 0, 10)
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_order_after_settlement_returns_the_settled_order_without_reserving_again() {
    let server = TestServer::start().await;
    let (mut checkout, product, order) = pending_order(&server, 10, 300, 3).await;
    deliver(
        &mut checkout,
        failure("pay-1", on_order(&order.order_id), "card declined"),
    )
    .await;

    let again = self::order(&mut checkout, &order.hold_id).await;

    assert_eq!(again.order_id, order.order_id);
    assert_eq!(again.status(), OrderStatus::Cancelled);
    assert_eq!(
        counters(&get_product(&mut checkout, &product.id).await),
        (10, 0, 0, 10)
    );
    server.assert_consistent().await;
}
