//! Payment webhooks: one idempotency key, one effect (duplicates, concurrent deliveries,
//! reused keys), payments that arrive before their order (deferred, then applied or closed),
//! amount checks, and unknown targets that store nothing.

use std::time::Duration;

use flashsale::grpc::pb::{
    HandlePaymentWebhookRequest, HandlePaymentWebhookResponse, OrderStatus, WebhookOutcome,
};
use tonic::Code;

use crate::support::{
    Counters, TestServer, assert_counters, assert_invalid, assert_status, commit, decline, deliver,
    eventually, failure, get_order, get_product, hold, lock_rows, on_hold, on_order, order, pay,
    pending_order, release, sleep_past, success, try_deliver, try_order, waiting_on_locks,
    with_amount,
};

// ---------------------------------------------------------------------------------------
// One key, one effect.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_delivery_answers_like_the_first_and_changes_nothing() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 2).await;
    let webhook = success("evt-1", on_order(&order.order_id), 500);
    let first = deliver(&mut checkout, webhook.clone()).await;
    assert_eq!(first.outcome(), WebhookOutcome::Applied);
    let settled = assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;

    let again = deliver(&mut checkout, webhook).await;

    assert_eq!(again.outcome(), WebhookOutcome::Duplicate);
    assert_eq!(again.idempotency_key, "evt-1");
    assert_eq!(again.order_id, first.order_id);
    assert_eq!(again.order_status(), OrderStatus::Paid);
    assert_eq!(get_product(&mut checkout, &product.id).await, settled);
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_deliveries_of_one_key_apply_exactly_once() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 3).await;

    let mut calls = Vec::new();
    for _ in 0..10 {
        let mut client = server.checkout().await;
        let webhook = success("evt-race", on_order(&order.order_id), order.total_cents);
        calls.push(tokio::spawn(async move {
            try_deliver(&mut client, webhook).await
        }));
    }
    let mut outcomes = Vec::new();
    for call in calls {
        let receipt = call.await.unwrap().expect("every delivery is answered");
        assert_eq!(receipt.order_id, order.order_id);
        assert_eq!(receipt.order_status(), OrderStatus::Paid);
        outcomes.push(receipt.outcome());
    }

    let applied = tally(&outcomes, WebhookOutcome::Applied);
    let duplicates = tally(&outcomes, WebhookOutcome::Duplicate);
    assert_eq!((applied, duplicates), (1, 9), "outcomes: {outcomes:?}");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(3)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failure_returns_the_stock_exactly_once_across_different_keys() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 4).await;

    let first = decline(&mut checkout, &order, "evt-a", "declined").await;
    let second = decline(&mut checkout, &order, "evt-b", "declined again").await;

    assert_eq!(first.outcome(), WebhookOutcome::Applied);
    assert_eq!(second.outcome(), WebhookOutcome::Ignored);
    assert_eq!(second.order_status(), OrderStatus::Cancelled);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    assert_eq!(
        get_order(&mut checkout, &order.order_id)
            .await
            .failure_reason,
        "declined"
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_failures_with_different_keys_return_the_stock_once() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 4).await;

    let mut calls = Vec::new();
    for i in 0..8 {
        let mut client = server.checkout().await;
        let webhook = failure(&format!("evt-{i}"), on_order(&order.order_id), "declined");
        calls.push(tokio::spawn(async move {
            try_deliver(&mut client, webhook).await
        }));
    }
    let mut outcomes = Vec::new();
    for call in calls {
        let receipt = call.await.unwrap().expect("every delivery is answered");
        assert_eq!(receipt.order_status(), OrderStatus::Cancelled);
        outcomes.push(receipt.outcome());
    }

    let applied = tally(&outcomes, WebhookOutcome::Applied);
    let ignored = tally(&outcomes, WebhookOutcome::Ignored);
    assert_eq!((applied, ignored), (1, 7), "outcomes: {outcomes:?}");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reused_key_with_another_payload_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let first_order = pending_order(&mut checkout, &product.id, 2).await;
    let other_order = pending_order(&mut checkout, &product.id, 1).await;
    let original = success(
        "evt-1",
        on_order(&first_order.order_id),
        first_order.total_cents,
    );
    deliver(&mut checkout, original.clone()).await;
    let before = get_product(&mut checkout, &product.id).await;

    let reuses = [
        // another result
        failure("evt-1", on_order(&first_order.order_id), ""),
        // another amount
        with_amount(original.clone(), first_order.total_cents + 1),
        // another order
        success(
            "evt-1",
            on_order(&other_order.order_id),
            other_order.total_cents,
        ),
        // the same order, but named through its hold
        success(
            "evt-1",
            on_hold(&first_order.hold_id),
            first_order.total_cents,
        ),
        // another failure reason on an otherwise equal payload
        HandlePaymentWebhookRequest {
            failure_reason: "extra".into(),
            ..original.clone()
        },
    ];
    for reuse in reuses {
        let status = assert_status(
            try_deliver(&mut checkout, reuse.clone()).await,
            Code::AlreadyExists,
            "IDEMPOTENCY_KEY_REUSED",
        );
        assert!(status.message().contains("evt-1"), "{reuse:?}: {status:?}");
    }

    assert_eq!(get_product(&mut checkout, &product.id).await, before);
    assert_eq!(
        get_order(&mut checkout, &other_order.order_id)
            .await
            .status(),
        OrderStatus::Pending
    );
    assert_eq!(
        get_order(&mut checkout, &first_order.order_id)
            .await
            .status(),
        OrderStatus::Paid
    );
    // The original payload still gets its duplicate answer.
    assert_eq!(
        deliver(&mut checkout, original).await.outcome(),
        WebhookOutcome::Duplicate
    );
    server.assert_consistent().await;
}

// ---------------------------------------------------------------------------------------
// Amounts and unknown targets.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn amount_other_than_the_order_total_is_refused_and_not_stored() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 2).await;
    assert_eq!(order.total_cents, 500);
    let before = get_product(&mut checkout, &product.id).await;

    let status = assert_status(
        try_deliver(
            &mut checkout,
            success("evt-1", on_order(&order.order_id), 499),
        )
        .await,
        Code::FailedPrecondition,
        "AMOUNT_MISMATCH",
    );
    assert!(status.message().contains("500"), "{status:?}");
    assert_eq!(get_product(&mut checkout, &product.id).await, before);
    assert_eq!(
        get_order(&mut checkout, &order.order_id).await.status(),
        OrderStatus::Pending
    );

    // Nothing was stored under the key: the corrected delivery applies.
    let retry = deliver(
        &mut checkout,
        success("evt-1", on_order(&order.order_id), 500),
    )
    .await;
    assert_eq!(retry.outcome(), WebhookOutcome::Applied);
    assert_eq!(retry.order_status(), OrderStatus::Paid);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amount_mismatch_on_a_hold_payment_is_refused_before_it_is_deferred() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;

    assert_status(
        try_deliver(&mut checkout, success("evt-1", on_hold(&hold.hold_id), 250)).await,
        Code::FailedPrecondition,
        "AMOUNT_MISMATCH",
    );

    // Nothing waits on the hold: the order is created pending.
    let order = order(&mut checkout, &hold.hold_id).await;
    assert_eq!(order.status(), OrderStatus::Pending);
    let retry = deliver(
        &mut checkout,
        success("evt-1", on_order(&order.order_id), 500),
    )
    .await;
    assert_eq!(retry.outcome(), WebhookOutcome::Applied);
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_success_without_the_amount_is_refused_naming_it_and_stores_nothing() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 2).await;
    let before = get_product(&mut checkout, &product.id).await;

    // A forged "paid" with no money behind it, aimed at the order or at its hold.
    for target in [on_order(&order.order_id), on_hold(&order.hold_id)] {
        assert_invalid(
            try_deliver(&mut checkout, success("evt-1", target, 0)).await,
            "amount_cents",
        );
    }

    assert_eq!(
        get_order(&mut checkout, &order.order_id).await.status(),
        OrderStatus::Pending
    );
    assert_eq!(get_product(&mut checkout, &product.id).await, before);
    // Nothing was stored under the key: the real payment applies.
    let real = pay(&mut checkout, &order, "evt-1").await;
    assert_eq!(real.outcome(), WebhookOutcome::Applied);
    // A declined payment took no money and needs no amount.
    let other = pending_order(&mut checkout, &product.id, 1).await;
    let declined = decline(&mut checkout, &other, "evt-2", "card declined").await;
    assert_eq!(declined.order_status(), OrderStatus::Cancelled);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_order_or_hold_is_not_found_and_the_key_stays_unused() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 2).await;
    let unknown = uuid::Uuid::now_v7().to_string();

    assert_status(
        try_deliver(&mut checkout, success("evt-1", on_order(&unknown), 500)).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    // Had the first delivery been stored, this other payload would be ALREADY_EXISTS.
    assert_status(
        try_deliver(&mut checkout, success("evt-1", on_hold(&unknown), 500)).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    // An order id is not a hold id.
    assert_status(
        try_deliver(
            &mut checkout,
            success("evt-1", on_hold(&order.order_id), 500),
        )
        .await,
        Code::NotFound,
        "NOT_FOUND",
    );

    let real = pay(&mut checkout, &order, "evt-1").await;
    assert_eq!(real.outcome(), WebhookOutcome::Applied);
    assert_eq!(real.order_status(), OrderStatus::Paid);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;
    server.assert_consistent().await;
}

// ---------------------------------------------------------------------------------------
// Payments that arrive before the order.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn payment_before_the_order_is_deferred_then_pays_the_order_on_creation() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;
    let webhook = success("evt-early", on_hold(&hold.hold_id), 500);

    let deferred = deliver(&mut checkout, webhook.clone()).await;
    assert_eq!(deferred.outcome(), WebhookOutcome::Deferred);
    assert!(deferred.order_id.is_empty(), "{deferred:?}");
    assert_counters(&server, &product, Counters::stock(10).reserved(2).sold(0)).await;
    // While it waits, a redelivery says it is still waiting.
    let waiting = deliver(&mut checkout, webhook.clone()).await;
    assert_eq!(waiting.outcome(), WebhookOutcome::Deferred);
    assert!(waiting.order_id.is_empty(), "{waiting:?}");

    let order = order(&mut checkout, &hold.hold_id).await;
    assert_eq!(order.status(), OrderStatus::Paid);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;

    let later = deliver(&mut checkout, webhook).await;
    assert_eq!(later.outcome(), WebhookOutcome::Duplicate);
    assert_eq!(later.order_id, order.order_id);
    assert_eq!(later.order_status(), OrderStatus::Paid);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_payment_before_the_order_cancels_the_order_on_creation() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 3).await;
    let webhook = failure("evt-early", on_hold(&hold.hold_id), "insufficient funds");

    let deferred = deliver(&mut checkout, webhook.clone()).await;
    assert_eq!(deferred.outcome(), WebhookOutcome::Deferred);
    assert!(deferred.order_id.is_empty(), "{deferred:?}");

    let order = order(&mut checkout, &hold.hold_id).await;
    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert_eq!(order.failure_reason, "insufficient funds");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    let later = deliver(&mut checkout, webhook).await;
    assert_eq!(later.outcome(), WebhookOutcome::Duplicate);
    assert_eq!(later.order_id, order.order_id);
    assert_eq!(later.order_status(), OrderStatus::Cancelled);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_deferred_payments_settle_the_order_once_in_arrival_order() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;
    let declined = failure("evt-1", on_hold(&hold.hold_id), "declined");
    let paid = success("evt-2", on_hold(&hold.hold_id), 500);
    assert_eq!(
        deliver(&mut checkout, declined.clone()).await.outcome(),
        WebhookOutcome::Deferred
    );
    assert_eq!(
        deliver(&mut checkout, paid.clone()).await.outcome(),
        WebhookOutcome::Deferred
    );

    let order = order(&mut checkout, &hold.hold_id).await;

    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    let first = deliver(&mut checkout, declined).await;
    assert_eq!(
        (first.outcome(), first.order_status()),
        (WebhookOutcome::Duplicate, OrderStatus::Cancelled)
    );
    assert_eq!(first.order_id, order.order_id);
    // The success came after the failure had cancelled the order: a refund is owed.
    let second = deliver(&mut checkout, paid).await;
    assert_eq!(
        (second.outcome(), second.order_status()),
        (WebhookOutcome::RefundRequired, OrderStatus::Cancelled)
    );
    assert_eq!(second.order_id, order.order_id);
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deferred_success_on_a_released_hold_is_a_refund_owed_and_stock_comes_back_once() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;
    let webhook = success("evt-early", on_hold(&hold.hold_id), 500);
    assert_eq!(
        deliver(&mut checkout, webhook.clone()).await.outcome(),
        WebhookOutcome::Deferred
    );

    release(&mut checkout, &hold.hold_id).await;

    assert_status(
        try_order(&mut checkout, &hold.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_RELEASED",
    );
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    // The money it reported bought nothing: every redelivery says a refund is owed.
    let later = deliver(&mut checkout, webhook).await;
    assert_eq!(later.outcome(), WebhookOutcome::RefundRequired);
    assert!(later.order_id.is_empty(), "{later:?}");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deferred_success_on_a_hold_that_expires_is_a_refund_owed_and_stock_comes_back_once() {
    let server = TestServer::start_with(|config| {
        config.hold_ttl = Duration::from_secs(2);
        config.reaper_interval = Duration::from_secs(3600);
    })
    .await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;
    let webhook = success("evt-early", on_hold(&hold.hold_id), 500);
    assert_eq!(
        deliver(&mut checkout, webhook.clone()).await.outcome(),
        WebhookOutcome::Deferred
    );

    sleep_past(hold.expires_at).await;

    assert_status(
        try_order(&mut checkout, &hold.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_EXPIRED",
    );
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    // The money it reported bought nothing: every redelivery says a refund is owed.
    let later = deliver(&mut checkout, webhook).await;
    assert_eq!(later.outcome(), WebhookOutcome::RefundRequired);
    assert!(later.order_id.is_empty(), "{later:?}");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn payment_aimed_at_a_converted_hold_applies_to_its_order() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 2).await;

    let receipt = deliver(
        &mut checkout,
        success("evt-1", on_hold(&order.hold_id), 500),
    )
    .await;

    assert_eq!(receipt.outcome(), WebhookOutcome::Applied);
    assert_eq!(receipt.order_id, order.order_id);
    assert_eq!(receipt.order_status(), OrderStatus::Paid);
    assert_eq!(
        get_order(&mut checkout, &order.order_id).await.status(),
        OrderStatus::Paid
    );
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_deliveries_of_one_key_on_a_hold_defer_it_once() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;

    let mut calls = Vec::new();
    for _ in 0..10 {
        let mut client = server.checkout().await;
        let webhook = success("evt-early", on_hold(&hold.hold_id), 500);
        calls.push(tokio::spawn(async move {
            try_deliver(&mut client, webhook).await
        }));
    }
    let mut outcomes = Vec::new();
    for call in calls {
        let receipt = call.await.unwrap().expect("every delivery is answered");
        assert!(receipt.order_id.is_empty(), "{receipt:?}");
        outcomes.push(receipt.outcome());
    }
    // One stored, and every redelivery says it is waiting too.
    let deferred = tally(&outcomes, WebhookOutcome::Deferred);
    assert_eq!(deferred, 10, "outcomes: {outcomes:?}");

    let order = order(&mut checkout, &hold.hold_id).await;
    assert_eq!(order.status(), OrderStatus::Paid);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn payment_racing_create_order_on_the_same_hold_pays_the_order_exactly_once() {
    const BUYERS: usize = 20;
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, BUYERS as i64).await;
    let mut checkout = server.checkout().await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(2 * BUYERS));

    let mut races = Vec::new();
    for i in 0..BUYERS {
        let hold = hold(&mut checkout, &product.id, 1).await;
        let (mut orders, mut payments) = (server.checkout().await, server.checkout().await);
        let webhook = success(&format!("evt-{i}"), on_hold(&hold.hold_id), 250);
        let (order_start, payment_start) = (start.clone(), start.clone());
        let hold_id = hold.hold_id.clone();
        let ordering = tokio::spawn(async move {
            order_start.wait().await;
            try_order(&mut orders, &hold_id).await
        });
        let paying = tokio::spawn(async move {
            payment_start.wait().await;
            try_deliver(&mut payments, webhook).await
        });
        races.push((i, ordering, paying));
    }

    for (i, ordering, paying) in races {
        let order = ordering.await.unwrap().expect("CreateOrder succeeds");
        let receipt = paying.await.unwrap().expect("the webhook is answered");
        match receipt.outcome() {
            // The payment came first and waited: the order was born paid.
            WebhookOutcome::Deferred => assert_eq!(order.status(), OrderStatus::Paid),
            // The order came first: the payment paid it.
            WebhookOutcome::Applied => {
                assert_eq!(receipt.order_id, order.order_id);
                assert_eq!(receipt.order_status(), OrderStatus::Paid);
            }
            other => panic!("buyer {i}: unexpected outcome {other:?}"),
        }
        assert_eq!(
            get_order(&mut checkout, &order.order_id).await.status(),
            OrderStatus::Paid
        );
        let again = deliver(
            &mut checkout,
            success(&format!("evt-{i}"), on_hold(&order.hold_id), 250),
        )
        .await;
        assert_eq!(again.outcome(), WebhookOutcome::Duplicate);
        assert_eq!(again.order_id, order.order_id);
        assert_eq!(again.order_status(), OrderStatus::Paid);
    }
    assert_counters(
        &server,
        &product,
        Counters::stock(BUYERS as i64)
            .reserved(0)
            .sold(BUYERS as i64),
    )
    .await;
    server.assert_consistent().await;
}

/// How many of `outcomes` are `outcome`.
fn tally(outcomes: &[WebhookOutcome], outcome: WebhookOutcome) -> usize {
    outcomes.iter().filter(|seen| **seen == outcome).count()
}

// ---------------------------------------------------------------------------------------
// Batches: concurrent deliveries share a transaction; each gets its own answer.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_deliveries_answers_each_for_what_it_is() {
    let server = TestServer::start().await;
    let product = server.product("pass", 100, 50).await;
    let mut checkout = server.checkout().await;
    let mut orders = Vec::new();
    for _ in 0..8 {
        orders.push(pending_order(&mut checkout, &product.id, 1).await);
    }
    let [
        plain,
        contested,
        mispriced,
        twice,
        reused,
        reused_too,
        settled,
        blocker,
    ] = <[_; 8]>::try_from(orders).unwrap();
    pay(&mut checkout, &settled, "evt-settled").await;
    let unknown = uuid::Uuid::now_v7().to_string();

    // The blocker's delivery waits for its order's row; every other delivery queues behind
    // its batch and goes in the next one, together.
    let mut lock = lock_rows(&server, "orders", std::slice::from_ref(&blocker.order_id)).await;
    let blocked = {
        let mut checkout = server.checkout().await;
        let webhook = success("evt-blocker", on_order(&blocker.order_id), 100);
        tokio::spawn(async move { try_deliver(&mut checkout, webhook).await })
    };
    eventually("the first batch to wait for its order", || {
        waiting_on_locks(&server.db.url)
    })
    .await;
    let webhooks = [
        success("evt-plain", on_order(&plain.order_id), 100),
        success("evt-win", on_order(&contested.order_id), 100),
        failure("evt-lose", on_order(&contested.order_id), "declined"),
        success("evt-mispriced", on_order(&mispriced.order_id), 99),
        success("evt-twice", on_order(&twice.order_id), 100),
        success("evt-twice", on_order(&twice.order_id), 100),
        success("evt-reused", on_order(&reused.order_id), 100),
        success("evt-reused", on_order(&reused_too.order_id), 100),
        success("evt-late", on_order(&settled.order_id), 100),
        success("evt-unknown", on_order(&unknown), 100),
    ];
    let calls: Vec<_> = webhooks
        .into_iter()
        .map(|webhook| {
            let server = &server;
            async move { try_deliver(&mut server.checkout().await, webhook).await }
        })
        .collect();
    let unlock = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        commit(&mut lock).await;
    };
    let (answers, ()) = tokio::join!(futures::future::join_all(calls), unlock);
    blocked
        .await
        .unwrap()
        .expect("the blocked delivery is applied");
    let [
        plain_a,
        win,
        lose,
        mispriced_a,
        twice_1,
        twice_2,
        reused_1,
        reused_2,
        late,
        unknown_a,
    ] = <[_; 10]>::try_from(answers).unwrap();

    let outcome = |answer: &Result<HandlePaymentWebhookResponse, tonic::Status>| {
        answer
            .as_ref()
            .map(|answer| answer.outcome())
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
    };
    // The contested order: exactly one delivery decides it; the other finds it final.
    let contested_now = get_order(&mut checkout, &contested.order_id).await;
    match contested_now.status() {
        OrderStatus::Paid => {
            assert_eq!(outcome(&win), Ok(WebhookOutcome::Applied));
            assert_eq!(outcome(&lose), Ok(WebhookOutcome::Ignored));
        }
        OrderStatus::Cancelled => {
            assert_eq!(outcome(&lose), Ok(WebhookOutcome::Applied));
            assert_eq!(outcome(&win), Ok(WebhookOutcome::RefundRequired));
        }
        status => panic!("the contested order stayed {status:?}"),
    }
    assert_status(mispriced_a, Code::FailedPrecondition, "AMOUNT_MISMATCH");
    assert_eq!(
        get_order(&mut checkout, &mispriced.order_id).await.status(),
        OrderStatus::Pending
    );
    let mut twice_outcomes = [outcome(&twice_1), outcome(&twice_2)];
    twice_outcomes.sort_by_key(|outcome| format!("{outcome:?}"));
    assert_eq!(
        twice_outcomes,
        [Ok(WebhookOutcome::Applied), Ok(WebhookOutcome::Duplicate)]
    );
    // One key for two orders: whichever came first applied; the other is refused.
    let (applied, refused, untouched) = match outcome(&reused_1) {
        Ok(WebhookOutcome::Applied) => (&reused, reused_2, &reused_too),
        _ => (&reused_too, reused_1, &reused),
    };
    assert_status(refused, Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(
        get_order(&mut checkout, &applied.order_id).await.status(),
        OrderStatus::Paid
    );
    assert_eq!(
        get_order(&mut checkout, &untouched.order_id).await.status(),
        OrderStatus::Pending
    );
    assert_eq!(outcome(&plain_a), Ok(WebhookOutcome::Applied));
    assert_eq!(outcome(&late), Ok(WebhookOutcome::Ignored));
    assert_status(unknown_a, Code::NotFound, "NOT_FOUND");

    // Every order settled once: the audit recomputes the counters from the rows.
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn payments_aimed_at_the_order_and_at_its_hold_at_once_settle_it_once() {
    let server = TestServer::start().await;
    let product = server.product("pass", 100, 5).await;
    let mut checkout = server.checkout().await;
    let pending = pending_order(&mut checkout, &product.id, 1).await;

    // The tightest interleaving: the delivery aimed at the hold takes the hold's lock and
    // then wants the order's; the one aimed at the order holds the order's lock when it
    // records its units' movement. Each is made to arrive while the other is mid-way.
    let mut lock = lock_rows(&server, "holds", std::slice::from_ref(&pending.hold_id)).await;
    let deliver = |webhook| {
        let mut checkout = checkout.clone();
        tokio::spawn(async move { try_deliver(&mut checkout, webhook).await })
    };
    let on_the_hold = deliver(success("evt-hold", on_hold(&pending.hold_id), 100));
    eventually("the delivery aimed at the hold to wait for it", || {
        waiting_on_locks(&server.db.url)
    })
    .await;
    let on_the_order = deliver(success("evt-order", on_order(&pending.order_id), 100));
    tokio::time::sleep(Duration::from_millis(200)).await;
    commit(&mut lock).await;

    let on_the_order = on_the_order.await.unwrap().expect("answered");
    let on_the_hold = on_the_hold.await.unwrap().expect("answered");
    let mut outcomes = [on_the_order.outcome(), on_the_hold.outcome()];
    outcomes.sort_by_key(|outcome| *outcome as i32);
    assert_eq!(
        outcomes,
        [WebhookOutcome::Applied, WebhookOutcome::Ignored],
        "one pays the order, the other finds it paid"
    );
    assert_eq!(
        get_order(&mut checkout, &pending.order_id).await.status(),
        OrderStatus::Paid
    );
    assert_eq!(deadlocks(&server).await, 0, "the two deliveries deadlocked");
    assert_counters(&server, &product, Counters::stock(5).reserved(0).sold(1)).await;
    server.assert_consistent().await;
}

/// Deadlocks PostgreSQL has broken in the test's database, as far as its statistics tell
/// yet (a backend reports them when it goes idle).
async fn deadlocks(server: &TestServer) -> i64 {
    crate::support::count(
        &server.db.url,
        "SELECT deadlocks AS count FROM pg_stat_database WHERE datname = current_database()",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_success_and_a_failure_at_once_settle_the_order_as_the_first_to_commit_says() {
    let server = TestServer::start().await;
    let product = server.product("pass", 100, 5).await;
    let mut checkout = server.checkout().await;
    let paid = pending_order(&mut checkout, &product.id, 1).await;
    let cancelled = pending_order(&mut checkout, &product.id, 1).await;
    let deliver = |webhook| {
        let mut checkout = checkout.clone();
        tokio::spawn(async move { try_deliver(&mut checkout, webhook).await })
    };

    // Each order gets both; the first waits for the order's lock when the second arrives.
    for (order, first_succeeds) in [(&paid, true), (&cancelled, false)] {
        let target = || on_order(&order.order_id);
        let (success, failure) = (
            success(&format!("ok-{}", order.order_id), target(), 100),
            failure(&format!("ko-{}", order.order_id), target(), "declined"),
        );
        let (first, second) = match first_succeeds {
            true => (success, failure),
            false => (failure, success),
        };
        let mut lock = lock_rows(&server, "orders", std::slice::from_ref(&order.order_id)).await;
        let first = deliver(first);
        eventually("the first delivery to wait for the lock", || {
            waiting_on_locks(&server.db.url)
        })
        .await;
        let second = deliver(second);
        tokio::time::sleep(Duration::from_millis(200)).await;
        commit(&mut lock).await;

        let first = first.await.unwrap().expect("answered").outcome();
        let second = second.await.unwrap().expect("answered").outcome();
        let late = match first_succeeds {
            // A failure after the payment changes nothing.
            true => WebhookOutcome::Ignored,
            // Money taken for a cancelled order: owed back.
            false => WebhookOutcome::RefundRequired,
        };
        assert_eq!((first, second), (WebhookOutcome::Applied, late));
    }

    let paid = get_order(&mut checkout, &paid.order_id).await;
    assert_eq!(paid.status(), OrderStatus::Paid);
    let cancelled = get_order(&mut checkout, &cancelled.order_id).await;
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
    assert_counters(&server, &product, Counters::stock(5).reserved(0).sold(1)).await;
    assert_eq!(server.assert_consistent().await.refunds_owed, 1);
}
