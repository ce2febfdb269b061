//! Orders are paid by their deadline or cancelled: by the reaper (payment_timeout, exactly
//! once, also with two server processes), on the spot when a payment arrives late, or by
//! the buyer (CancelOrder, buyer_cancelled); a success racing either ends paid or as a
//! refund owed, never both and never neither.

use std::time::{Duration, SystemTime};

use flashsale::grpc::pb::{
    self, CancelOrderRequest, OrderStatus, WatchAvailabilityRequest, WebhookOutcome,
};
use tonic::Code;

use crate::support::{
    Checkout, Counters, TestServer, assert_counters, assert_counters_shown, assert_status, commit,
    eventually, get_order, lock_rows, on_order, pay, pending_order, seconds_between, sleep_past,
    success, try_deliver, waiting_on_locks,
};

/// CancelOrder, as the server answered.
async fn try_cancel(checkout: &mut Checkout, order_id: &str) -> Result<pb::Order, tonic::Status> {
    checkout
        .cancel_order(CancelOrderRequest {
            order_id: order_id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Waits until the order's status is no longer pending; returns it.
async fn wait_settled(checkout: &Checkout, order_id: &str) -> pb::Order {
    eventually("the order to leave PENDING", || {
        let (mut checkout, order_id) = (checkout.clone(), order_id.to_owned());
        async move { get_order(&mut checkout, &order_id).await.status() != OrderStatus::Pending }
    })
    .await;
    get_order(&mut checkout.clone(), order_id).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_unpaid_at_its_deadline_is_cancelled_and_its_units_come_back_once() {
    let server = TestServer::start_with(|config| config.payment_ttl = Duration::from_secs(1)).await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 3).await;
    let due_in = seconds_between(order.created_at, order.payment_due_at);
    assert!(
        (0.9..1.5).contains(&due_in),
        "due {due_in} s after creation"
    );
    let mut stream = server
        .checkout()
        .await
        .watch_availability(WatchAvailabilityRequest {
            product_ids: vec![product.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();

    let cancelled = wait_settled(&checkout, &order.order_id).await;

    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
    assert_eq!(cancelled.cancel_reason, "payment_timeout");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    // Watchers see the units come back.
    loop {
        let update = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an update")
            .unwrap()
            .expect("the stream stays open");
        if update.reserved == 0 {
            assert_counters_shown(&update, Counters::stock(10).reserved(0).sold(0));
            break;
        }
    }
    // Too late to pay: the payment is a refund owed, and the units stay on sale.
    let late = try_deliver(
        &mut checkout,
        success("evt-late", on_order(&order.order_id), order.total_cents),
    )
    .await;
    assert_eq!(late.unwrap().outcome(), WebhookOutcome::RefundRequired);
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_server_processes_cancel_each_overdue_order_once() {
    let server = TestServer::start_with(|config| {
        config.payment_ttl = Duration::from_secs(1);
        config.reaper_batch_size = 3;
    })
    .await;
    let sibling = server.start_sibling().await;
    let product = server.product("ticket", 100, 40).await;
    let mut checkout = server.checkout().await;
    let mut orders = Vec::new();
    for _ in 0..30 {
        orders.push(pending_order(&mut checkout, &product.id, 1).await);
    }

    for order in &orders {
        let cancelled = wait_settled(&checkout, &order.order_id).await;
        assert_eq!(cancelled.cancel_reason, "payment_timeout");
    }

    assert_counters(&server, &product, Counters::stock(40).reserved(0).sold(0)).await;
    let audit = server.assert_consistent().await;
    assert_eq!(audit.overdue_orders, 0);
    drop(sibling);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_success_a_moment_after_the_deadline_is_a_refund_owed_before_the_reaper_comes() {
    let server = TestServer::start_with(|config| {
        config.payment_ttl = Duration::from_secs(1);
        config.reaper_interval = Duration::from_secs(3600);
    })
    .await;
    let product = server.product("sneaker", 500, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 2).await;
    sleep_past(order.payment_due_at).await;
    let audit = server.assert_consistent().await;
    assert_eq!(audit.overdue_orders, 1, "{audit:?}");

    let late = pay(&mut checkout, &order, "evt-late").await;

    assert_eq!(late.outcome(), WebhookOutcome::RefundRequired);
    assert_eq!(late.order_status(), OrderStatus::Cancelled);
    let after = get_order(&mut checkout, &order.order_id).await;
    assert_eq!(after.cancel_reason, "payment_timeout");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    let again = pay(&mut checkout, &order, "evt-late").await;
    assert_eq!(again.outcome(), WebhookOutcome::RefundRequired);
    let audit = server.assert_consistent().await;
    assert_eq!(
        (audit.overdue_orders, audit.refunds_owed),
        (0, 1),
        "{audit:?}"
    );

    // Listed for the operators, with what to refund, until marked refunded.
    let mut admin = server.admin().await;
    let owed = admin
        .list_refunds_required(pb::ListRefundsRequiredRequest::default())
        .await
        .unwrap()
        .into_inner()
        .refunds;
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].idempotency_key, "evt-late");
    assert_eq!(owed[0].amount_cents, order.total_cents);
    assert_eq!(
        owed[0].target,
        Some(pb::refund::Target::OrderId(order.order_id.clone()))
    );
    let marked = admin
        .mark_refunded(pb::MarkRefundedRequest {
            idempotency_key: "evt-late".into(),
            caller: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(marked.refunded_at.is_some());
    assert_eq!(server.assert_consistent().await.refunds_owed, 0);
}

/// A server whose orders are due two seconds after creation and whose reaper looks every
/// 20 ms, with `count` pending orders of one unit each of a product of 20.
async fn orders_due_soon(count: usize) -> (TestServer, pb::Product, Checkout, Vec<pb::Order>) {
    let server = TestServer::start_with(|config| {
        config.payment_ttl = Duration::from_secs(2);
        config.reaper_interval = Duration::from_millis(20);
    })
    .await;
    let product = server.product("ticket", 100, 20).await;
    let mut checkout = server.checkout().await;
    let mut orders = Vec::new();
    for _ in 0..count {
        orders.push(pending_order(&mut checkout, &product.id, 1).await);
    }
    (server, product, checkout, orders)
}

/// Asserts how a success delivered around its order's deadline ended: applied, and the
/// order paid before its deadline (`true`), or a refund owed, the order cancelled for
/// the deadline (`false`).
async fn paid_in_time_or_refund_owed(
    checkout: &Checkout,
    order_id: &str,
    receipt: &pb::HandlePaymentWebhookResponse,
) -> bool {
    let stored = wait_settled(checkout, order_id).await;
    match receipt.outcome() {
        WebhookOutcome::Applied => {
            assert_eq!(stored.status(), OrderStatus::Paid);
            assert!(
                SystemTime::try_from(stored.updated_at.unwrap()).unwrap()
                    <= SystemTime::try_from(stored.payment_due_at.unwrap()).unwrap(),
                "order {order_id} was paid after its deadline"
            );
            true
        }
        WebhookOutcome::RefundRequired => {
            assert_eq!(stored.status(), OrderStatus::Cancelled);
            assert_eq!(stored.cancel_reason, "payment_timeout");
            false
        }
        other => panic!("order {order_id}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_success_at_the_deadline_ends_paid_or_as_a_refund_owed_never_both() {
    let (server, product, checkout, orders) = orders_due_soon(20).await;
    // Aim every payment at the deadline itself, give or take a few milliseconds.
    let due = SystemTime::try_from(orders[10].payment_due_at.unwrap()).unwrap();
    tokio::time::sleep(due.duration_since(SystemTime::now()).unwrap_or_default()).await;

    let mut payments = Vec::new();
    for (i, order) in orders.iter().enumerate() {
        let (mut client, order) = (checkout.clone(), order.clone());
        payments.push(tokio::spawn(async move {
            let webhook = success(
                &format!("evt-{i}"),
                on_order(&order.order_id),
                order.total_cents,
            );
            try_deliver(&mut client, webhook).await
        }));
    }
    let mut paid = 0;
    for (order, payment) in orders.iter().zip(payments) {
        let receipt = payment.await.unwrap().expect("every payment is answered");
        if paid_in_time_or_refund_owed(&checkout, &order.order_id, &receipt).await {
            paid += 1;
        }
    }

    assert_counters(
        &server,
        &product,
        Counters::stock(20).reserved(0).sold(paid),
    )
    .await;
    let audit = server.assert_consistent().await;
    assert_eq!(audit.refunds_owed, 20 - paid);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_batch_racing_the_reaper_at_the_deadline_pays_only_orders_still_due() {
    let (server, product, checkout, mut orders) = orders_due_soon(13).await;
    let blocker = orders.remove(0);

    // The blocker's delivery waits for its order's row; the other twelve queue behind its
    // batch and go in the next one, together, once the row is free: at the middle order's
    // deadline, while the reaper cancels whatever it finds overdue.
    let mut lock = lock_rows(&server, "orders", std::slice::from_ref(&blocker.order_id)).await;
    let deliver = |key: String, order: pb::Order| {
        let mut client = checkout.clone();
        tokio::spawn(async move {
            let webhook = success(&key, on_order(&order.order_id), order.total_cents);
            let receipt = try_deliver(&mut client, webhook).await;
            (order, receipt.expect("every payment is answered"))
        })
    };
    let mut payments = vec![deliver("evt-blocker".into(), blocker.clone())];
    eventually("the first batch to wait for its order", || {
        waiting_on_locks(&server.db.url)
    })
    .await;
    for (i, order) in orders.iter().enumerate() {
        payments.push(deliver(format!("evt-{i}"), order.clone()));
    }
    let due = SystemTime::try_from(orders[6].payment_due_at.unwrap()).unwrap();
    tokio::time::sleep(due.duration_since(SystemTime::now()).unwrap_or_default()).await;
    commit(&mut lock).await;

    let (mut paid, mut refunds) = (0, 0);
    for payment in payments {
        let (order, receipt) = payment.await.unwrap();
        if paid_in_time_or_refund_owed(&checkout, &order.order_id, &receipt).await {
            paid += 1;
        } else {
            refunds += 1;
        }
    }

    assert_eq!(paid + refunds, 13);
    assert_counters(
        &server,
        &product,
        Counters::stock(20).reserved(0).sold(paid),
    )
    .await;
    let audit = server.assert_consistent().await;
    assert_eq!(audit.refunds_owed, refunds);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_order_gives_the_units_back_once_and_refuses_a_paid_order() {
    let server = TestServer::start().await;
    let product = server.product("mug", 900, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 4).await;

    let cancelled = try_cancel(&mut checkout, &order.order_id).await.unwrap();

    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
    assert_eq!(cancelled.cancel_reason, "buyer_cancelled");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    let again = try_cancel(&mut checkout, &order.order_id).await.unwrap();
    assert_eq!(again, cancelled, "cancelling again changes nothing");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;

    let paid = pending_order(&mut checkout, &product.id, 1).await;
    pay(&mut checkout, &paid, "evt-paid").await;
    assert_status(
        try_cancel(&mut checkout, &paid.order_id).await,
        Code::FailedPrecondition,
        "ORDER_PAID",
    );
    assert_status(
        try_cancel(&mut checkout, &uuid::Uuid::now_v7().to_string()).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(1)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_order_racing_a_success_ends_paid_or_as_a_refund_owed() {
    let server = TestServer::start().await;
    let product = server.product("lamp", 300, 20).await;
    let mut checkout = server.checkout().await;
    let mut paid = 0;
    for round in 0..10 {
        let order = pending_order(&mut checkout, &product.id, 1).await;
        let (mut buyer, mut adapter) = (checkout.clone(), checkout.clone());
        let cancel = try_cancel(&mut buyer, &order.order_id);
        let webhook = success(
            &format!("evt-{round}"),
            on_order(&order.order_id),
            order.total_cents,
        );
        let payment = try_deliver(&mut adapter, webhook);
        let (cancel, payment) = tokio::join!(cancel, payment);
        let outcome = payment.expect("the payment is answered").outcome();
        match outcome {
            WebhookOutcome::Applied => {
                assert_eq!(cancel.map_err(|s| s.code()), Err(Code::FailedPrecondition));
                paid += 1;
            }
            WebhookOutcome::RefundRequired => {
                assert_eq!(cancel.expect("cancelled").cancel_reason, "buyer_cancelled");
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    assert_counters(
        &server,
        &product,
        Counters::stock(20).reserved(0).sold(paid),
    )
    .await;
    let audit = server.assert_consistent().await;
    assert_eq!(audit.refunds_owed, 10 - paid);
}
