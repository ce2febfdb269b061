//! Refunds owed are said out loud and kept: listed (paged) until an operator marks them
//! refunded; webhook keys are kept for their retention and then swept, but never a refund
//! still owed.

use std::time::Duration;

use flashsale::grpc::pb::{
    self, ListRefundsRequiredRequest, MarkRefundedRequest, WebhookOutcome, refund::Target,
};
use tonic::Code;

use crate::support::{
    Admin, TestServer, assert_invalid, assert_status, decline, deliver, eventually, failure, hold,
    on_hold, on_order, pay, pending_order, release, success, try_deliver, with_amount,
};

/// Every refund still owed, page by page (`page_size` each).
async fn refunds_owed(admin: &mut Admin, page_size: i32) -> Vec<pb::Refund> {
    let mut refunds = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_refunds_required(ListRefundsRequiredRequest {
                page_size,
                page_token,
            })
            .await
            .expect("list refunds")
            .into_inner();
        refunds.extend(page.refunds);
        if page.next_page_token.is_empty() {
            return refunds;
        }
        page_token = page.next_page_token;
    }
}

/// MarkRefunded on an open server (caller "").
async fn mark_refunded(admin: &mut Admin, key: &str) -> Result<pb::Refund, tonic::Status> {
    admin
        .mark_refunded(MarkRefundedRequest {
            idempotency_key: key.into(),
            caller: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn refunds_owed_are_listed_in_arrival_order_until_marked_refunded() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let mut admin = server.admin().await;
    // Three successes that bought nothing: after a failure, for a hold released before its
    // order, and after CancelOrder.
    let declined = pending_order(&mut checkout, &product.id, 2).await;
    decline(&mut checkout, &declined, "evt-declined", "card declined").await;
    assert_eq!(
        pay(&mut checkout, &declined, "evt-1").await.outcome(),
        WebhookOutcome::RefundRequired
    );
    let released = hold(&mut checkout, &product.id, 1).await;
    let early = success("evt-2", on_hold(&released.hold_id), 250);
    assert_eq!(
        deliver(&mut checkout, early.clone()).await.outcome(),
        WebhookOutcome::Deferred
    );
    release(&mut checkout, &released.hold_id).await;
    let given_up = pending_order(&mut checkout, &product.id, 1).await;
    checkout
        .cancel_order(pb::CancelOrderRequest {
            order_id: given_up.order_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        pay(&mut checkout, &given_up, "evt-3").await.outcome(),
        WebhookOutcome::RefundRequired
    );
    // A failure on a dead hold took no money: nothing owed.
    let dead = hold(&mut checkout, &product.id, 1).await;
    release(&mut checkout, &dead.hold_id).await;
    let failed = failure("evt-4", on_hold(&dead.hold_id), "declined");
    assert_eq!(
        deliver(&mut checkout, failed).await.outcome(),
        WebhookOutcome::Ignored
    );

    let owed = refunds_owed(&mut admin, 2).await;

    let keys: Vec<&str> = owed.iter().map(|r| r.idempotency_key.as_str()).collect();
    assert_eq!(keys, ["evt-1", "evt-2", "evt-3"]);
    assert_eq!(
        owed[0].target,
        Some(Target::OrderId(declined.order_id.clone()))
    );
    assert_eq!(
        owed[1].target,
        Some(Target::HoldId(released.hold_id.clone()))
    );
    assert_eq!(
        owed.iter().map(|r| r.amount_cents).collect::<Vec<_>>(),
        [500, 250, 250]
    );
    assert!(
        owed.iter()
            .all(|r| r.received_at.is_some() && r.refunded_at.is_none())
    );
    assert_eq!(server.assert_consistent().await.refunds_owed, 3);

    let marked = mark_refunded(&mut admin, "evt-2").await.unwrap();
    assert!(marked.refunded_at.is_some());
    let again = mark_refunded(&mut admin, "evt-2").await.unwrap();
    assert_eq!(again, marked, "marking again changes nothing");
    let keys: Vec<String> = refunds_owed(&mut admin, 100)
        .await
        .into_iter()
        .map(|r| r.idempotency_key)
        .collect();
    assert_eq!(keys, ["evt-1", "evt-3"]);
    // The payment side still hears what it must do.
    assert_eq!(
        deliver(&mut checkout, early).await.outcome(),
        WebhookOutcome::RefundRequired
    );
    assert_eq!(server.assert_consistent().await.refunds_owed, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn mark_refunded_refuses_unknown_keys_and_payments_that_owe_nothing() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 250, 10).await;
    let mut checkout = server.checkout().await;
    let mut admin = server.admin().await;
    let order = pending_order(&mut checkout, &product.id, 1).await;
    pay(&mut checkout, &order, "evt-paid").await;

    assert_status(
        mark_refunded(&mut admin, "evt-paid").await,
        Code::FailedPrecondition,
        "NO_REFUND_OWED",
    );
    assert_status(
        mark_refunded(&mut admin, "evt-unknown").await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_invalid(mark_refunded(&mut admin, "").await, "idempotency_key");
    let bad_page = admin
        .list_refunds_required(ListRefundsRequiredRequest {
            page_size: 10,
            page_token: "not a token".into(),
        })
        .await;
    assert_invalid(bad_page, "page_token");
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_keys_are_kept_for_their_retention_then_swept_but_not_refunds_owed() {
    let server = TestServer::start_with(|config| {
        config.webhook_key_retention = Duration::from_secs(2);
        config.reaper_interval = Duration::from_millis(50);
    })
    .await;
    let product = server.product("ticket", 100, 10).await;
    let mut checkout = server.checkout().await;
    let order = pending_order(&mut checkout, &product.id, 1).await;
    let payment = success("evt-1", on_order(&order.order_id), 100);
    assert_eq!(
        deliver(&mut checkout, payment.clone()).await.outcome(),
        WebhookOutcome::Applied
    );
    let cancelled = pending_order(&mut checkout, &product.id, 1).await;
    checkout
        .cancel_order(pb::CancelOrderRequest {
            order_id: cancelled.order_id.clone(),
        })
        .await
        .unwrap();
    let owed = success("evt-2", on_order(&cancelled.order_id), 100);
    assert_eq!(
        deliver(&mut checkout, owed.clone()).await.outcome(),
        WebhookOutcome::RefundRequired
    );

    // Within the retention, the key is known: another payload under it is refused.
    let reused = with_amount(payment.clone(), 99);
    assert_status(
        try_deliver(&mut checkout, reused.clone()).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );

    // After it, the key is forgotten (a redelivery would find the order paid and change
    // nothing), while the refund owed stays.
    eventually("the key to be swept", || {
        let (mut checkout, failed) = (
            checkout.clone(),
            failure("evt-1", on_order(&order.order_id), "late"),
        );
        async move { try_deliver(&mut checkout, failed).await.is_ok() }
    })
    .await;
    assert_eq!(
        deliver(&mut checkout, owed).await.outcome(),
        WebhookOutcome::RefundRequired
    );
    let mut admin = server.admin().await;
    assert_eq!(refunds_owed(&mut admin, 10).await.len(), 1);
    assert_eq!(
        crate::support::get_order(&mut checkout, &order.order_id)
            .await
            .status(),
        pb::OrderStatus::Paid
    );
    server.assert_consistent().await;
}
