//! Orders: a hold becomes exactly one order (retries and concurrent calls included), a hold
//! past its TTL never does, and payment moves an order PENDING -> PAID or CANCELLED once.

use std::time::Duration;

use flashsale::grpc::pb::{GetOrderRequest, HoldStatus, OrderStatus, WebhookOutcome};
use tonic::Code;

use crate::support::{
    Counters, TestServer, assert_counters, assert_status, commit, decline, deliver, eventually,
    get_hold, get_order, hold, lock_rows, on_hold, order, pay, pending_order, release, sleep_past,
    success, try_order, waiting_on_locks,
};

// ---------------------------------------------------------------------------------------
// Hold -> order.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn create_order_makes_a_pending_order_and_keeps_the_units_reserved() {
    let server = TestServer::start().await;
    let product = server.product("lamp", 1_250, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 3).await;
    let held = Counters::stock(10).reserved(3).sold(0);
    assert_counters(&server, &product, held).await;

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
    // The units stay reserved.
    assert_counters(&server, &product, held).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retried_create_order_returns_the_same_order_without_reserving_again() {
    let server = TestServer::start().await;
    let product = server.product("gadget", 500, 10).await;
    let mut checkout = server.checkout().await;
    let first = pending_order(&mut checkout, &product.id, 2).await;

    let again = order(&mut checkout, &first.hold_id).await;

    assert_eq!(again.order_id, first.order_id);
    assert_eq!(again.status(), OrderStatus::Pending);
    assert_counters(&server, &product, Counters::stock(10).reserved(2).sold(0)).await;
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
    assert_counters(&server, &product, Counters::stock(10).reserved(4).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_order_returns_the_order_as_created() {
    let server = TestServer::start().await;
    let product = server.product("gadget", 999, 5).await;
    let mut checkout = server.checkout().await;
    let created = pending_order(&mut checkout, &product.id, 1).await;

    let fetched = get_order(&mut checkout, &created.order_id).await;

    assert_eq!(fetched, created);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_hold_or_order_is_not_found() {
    let server = TestServer::start().await;
    let product = server.product("gadget", 100, 5).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 1).await;
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
    assert_counters(&server, &product, Counters::stock(5).reserved(2).sold(0)).await;

    assert_status(
        try_order(&mut checkout, &hold.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_EXPIRED",
    );
    assert_counters(&server, &product, Counters::stock(5).reserved(0).sold(0)).await;
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
    assert_counters(&server, &product, Counters::stock(5).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn released_hold_cannot_become_an_order() {
    let server = TestServer::start().await;
    let product = server.product("lamp", 100, 5).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;
    release(&mut checkout, &hold.hold_id).await;

    assert_status(
        try_order(&mut checkout, &hold.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_RELEASED",
    );
    assert_counters(&server, &product, Counters::stock(5).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

// ---------------------------------------------------------------------------------------
// The order state machine.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn successful_payment_marks_the_order_paid_and_sells_its_units() {
    let server = TestServer::start().await;
    let product = server.product("gadget", 300, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 3).await;

    let receipt = pay(&mut checkout, &order, "pay-1").await;

    assert_eq!(receipt.outcome(), WebhookOutcome::Applied);
    assert_eq!(receipt.order_status(), OrderStatus::Paid);
    assert_eq!(receipt.order_id, order.order_id);
    assert_eq!(
        get_order(&mut checkout, &order.order_id).await.status(),
        OrderStatus::Paid
    );
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(3)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failure_after_payment_is_ignored_and_the_order_stays_paid() {
    let server = TestServer::start().await;
    let product = server.product("gadget", 300, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 3).await;
    pay(&mut checkout, &order, "pay-1").await;
    let paid = Counters::stock(10).reserved(0).sold(3);
    assert_counters(&server, &product, paid).await;

    let receipt = decline(&mut checkout, &order, "pay-2", "late decline").await;

    assert_eq!(receipt.outcome(), WebhookOutcome::Ignored);
    assert_eq!(receipt.order_status(), OrderStatus::Paid);
    assert_eq!(receipt.order_id, order.order_id);
    let after = get_order(&mut checkout, &order.order_id).await;
    assert_eq!(after.status(), OrderStatus::Paid);
    assert!(after.failure_reason.is_empty());
    assert_counters(&server, &product, paid).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_payment_cancels_the_order_and_returns_its_units() {
    let server = TestServer::start().await;
    let product = server.product("gadget", 300, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 3).await;

    let receipt = decline(&mut checkout, &order, "pay-1", "card declined").await;

    assert_eq!(receipt.outcome(), WebhookOutcome::Applied);
    assert_eq!(receipt.order_status(), OrderStatus::Cancelled);
    let after = get_order(&mut checkout, &order.order_id).await;
    assert_eq!(after.status(), OrderStatus::Cancelled);
    assert_eq!(after.failure_reason, "card declined");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn success_after_a_failed_payment_is_a_refund_owed_and_the_order_stays_cancelled() {
    let server = TestServer::start().await;
    let product = server.product("gadget", 300, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 3).await;
    decline(&mut checkout, &order, "pay-1", "card declined").await;

    let receipt = pay(&mut checkout, &order, "pay-2").await;

    assert_eq!(receipt.outcome(), WebhookOutcome::RefundRequired);
    assert_eq!(receipt.order_status(), OrderStatus::Cancelled);
    let after = get_order(&mut checkout, &order.order_id).await;
    assert_eq!(after.status(), OrderStatus::Cancelled);
    assert_eq!(after.failure_reason, "card declined");
    assert_eq!(after.cancel_reason, "payment_failed");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_order_after_settlement_returns_the_settled_order_without_reserving_again() {
    let server = TestServer::start().await;
    let product = server.product("gadget", 300, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 3).await;
    decline(&mut checkout, &order, "pay-1", "card declined").await;

    let again = self::order(&mut checkout, &order.hold_id).await;

    assert_eq!(again.order_id, order.order_id);
    assert_eq!(again.status(), OrderStatus::Cancelled);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

// ---------------------------------------------------------------------------------------
// Batches: concurrent CreateOrder calls share a transaction; each gets its own answer.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_orders_answers_each_hold_for_what_it_is() {
    let server = TestServer::start_with(|config| {
        config.hold_ttl = Duration::from_secs(4);
        // Nothing expires the stale hold but the order path itself.
        config.reaper_interval = Duration::from_secs(600);
    })
    .await;
    let product = server.product("print", 300, 20).await;
    let mut checkout = server.checkout().await;
    let stale = hold(&mut checkout, &product.id, 1).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let first = hold(&mut checkout, &product.id, 1).await;
    let second = hold(&mut checkout, &product.id, 2).await;
    let released = hold(&mut checkout, &product.id, 1).await;
    release(&mut checkout, &released.hold_id).await;
    let ordered = pending_order(&mut checkout, &product.id, 1).await;
    let prepaid = hold(&mut checkout, &product.id, 3).await;
    let early = deliver(
        &mut checkout,
        success("evt-early", on_hold(&prepaid.hold_id), 900),
    )
    .await;
    assert_eq!(early.outcome(), WebhookOutcome::Deferred);
    let unknown = uuid::Uuid::now_v7().to_string();

    // One order waits for its hold's row; every other call queues behind its batch and
    // goes in the next one, together.
    let blocker = hold(&mut checkout, &product.id, 1).await;
    let mut lock = lock_rows(&server, "holds", std::slice::from_ref(&blocker.hold_id)).await;
    let blocked = {
        let mut checkout = server.checkout().await;
        let hold_id = blocker.hold_id.clone();
        tokio::spawn(async move { try_order(&mut checkout, &hold_id).await })
    };
    eventually("the first batch to wait for its hold", || {
        waiting_on_locks(&server.db.url)
    })
    .await;
    let targets = [
        &first.hold_id,
        &second.hold_id,
        &first.hold_id,
        &stale.hold_id,
        &released.hold_id,
        &ordered.hold_id,
        &prepaid.hold_id,
        &unknown,
    ];
    let calls: Vec<_> = targets
        .iter()
        .map(|hold_id| {
            let (server, hold_id) = (&server, hold_id.to_string());
            async move { try_order(&mut server.checkout().await, &hold_id).await }
        })
        .collect();
    let release_lock = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        commit(&mut lock).await;
    };
    let (answers, ()) = tokio::join!(futures::future::join_all(calls), release_lock);
    blocked.await.unwrap().expect("the blocked order is made");

    let [
        first_a,
        second_a,
        first_again,
        stale_a,
        released_a,
        ordered_a,
        prepaid_a,
        unknown_a,
    ] = <[_; 8]>::try_from(answers).unwrap();
    let first_order = first_a.expect("an active hold becomes an order");
    assert_eq!(first_order.status(), OrderStatus::Pending);
    assert_eq!(first_order.total_cents, 300);
    assert_eq!(
        first_again.expect("the same hold twice").order_id,
        first_order.order_id
    );
    let second_order = second_a.expect("an active hold becomes an order");
    assert_eq!((second_order.qty, second_order.total_cents), (2, 600));
    assert_status(stale_a, Code::FailedPrecondition, "HOLD_EXPIRED");
    assert_status(released_a, Code::FailedPrecondition, "HOLD_RELEASED");
    assert_eq!(
        ordered_a.expect("an order made before").order_id,
        ordered.order_id
    );
    let prepaid_order = prepaid_a.expect("a hold paid before its order");
    assert_eq!(prepaid_order.status(), OrderStatus::Paid);
    assert_status(unknown_a, Code::NotFound, "NOT_FOUND");

    // Reserved: first 1, second 2, ordered 1, blocker 1; sold: prepaid 3.
    assert_counters(&server, &product, Counters::stock(20).reserved(5).sold(3)).await;
    server.assert_consistent().await;
}
