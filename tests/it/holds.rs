//! Holds: reserving units, client request id retries, GetHold, and releasing exactly once.

use std::time::Duration;

use flashsale::grpc::pb::{GetHoldRequest, HoldStatus, OrderStatus, WebhookOutcome};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{
    Counters, TestServer, assert_counters, assert_status, commit, deliver, eventually, get_hold,
    get_order, get_product, hold, lock_rows, on_hold, order, release, success, try_hold, try_order,
    try_release, waiting_on_locks,
};

/// A protobuf timestamp as a chrono instant.
fn instant(at: Option<prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    let at = at.expect("timestamp set");
    chrono::DateTime::from_timestamp(at.seconds, at.nanos as u32).expect("valid timestamp")
}

#[tokio::test(flavor = "multi_thread")]
async fn create_hold_reserves_units() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;

    let held = hold(&mut checkout, &product.id, 3).await;
    assert!(uuid::Uuid::parse_str(&held.hold_id).is_ok(), "{held:?}");
    assert_eq!(held.product_id, product.id);
    assert_eq!(held.qty, 3);
    assert_eq!(held.status(), HoldStatus::Active);
    assert_eq!(held.client_request_id, "");
    assert_counters(&server, &product, Counters::stock(10).reserved(3).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_expires_one_ttl_after_creation() {
    let server = TestServer::start_with(|config| config.hold_ttl = Duration::from_secs(90)).await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;

    let held = hold(&mut checkout, &product.id, 1).await;
    let lifetime = instant(held.expires_at) - instant(held.created_at);
    let off = (lifetime - chrono::Duration::seconds(90)).abs();
    assert!(
        off <= chrono::Duration::seconds(1),
        "expires_at - created_at = {lifetime}, expected 90 s: {held:?}"
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_larger_than_available_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 5).await;
    let mut checkout = server.checkout().await;
    hold(&mut checkout, &product.id, 3).await;
    let before = get_product(&mut checkout, &product.id).await;

    let status = assert_status(
        try_hold(&mut checkout, &product.id, 3, None).await,
        Code::FailedPrecondition,
        "INSUFFICIENT_STOCK",
    );
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(
        info.metadata.get("available").map(String::as_str),
        Some("2")
    );
    assert_eq!(
        get_product(&mut checkout, &product.id).await,
        before,
        "nothing changed"
    );
    server.assert_consistent().await;

    // Exactly what is left is fine.
    hold(&mut checkout, &product.id, 2).await;
    assert_counters(&server, &product, Counters::stock(5).reserved(5).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_on_unknown_product_is_not_found() {
    let server = TestServer::start().await;
    let mut checkout = server.checkout().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_status(
        try_hold(&mut checkout, &unknown, 1, None).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_status(
        try_hold(&mut checkout, &unknown, 1, Some("req-unknown")).await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_with_same_client_request_id_returns_the_same_hold() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;

    let first = try_hold(&mut checkout, &product.id, 2, Some("req-1"))
        .await
        .unwrap();
    assert_eq!(first.client_request_id, "req-1");
    let after_first =
        assert_counters(&server, &product, Counters::stock(10).reserved(2).sold(0)).await;
    let retry = try_hold(&mut checkout, &product.id, 2, Some("req-1"))
        .await
        .unwrap();
    assert_eq!(retry, first);
    assert_eq!(
        get_product(&mut checkout, &product.id).await,
        after_first,
        "reserved once"
    );

    // Another id is another hold.
    let other = try_hold(&mut checkout, &product.id, 2, Some("req-2"))
        .await
        .unwrap();
    assert_ne!(other.hold_id, first.hold_id);
    assert_counters(&server, &product, Counters::stock(10).reserved(4).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_retries_with_same_client_request_id_reserve_once() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 100).await;
    let checkout = server.checkout().await;

    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mut checkout = checkout.clone();
            let product_id = product.id.clone();
            tokio::spawn(
                async move { try_hold(&mut checkout, &product_id, 3, Some("req-burst")).await },
            )
        })
        .collect();
    let mut hold_ids = std::collections::HashSet::new();
    for call in calls {
        let held = call.await.unwrap().expect("every retry succeeds");
        assert_eq!(held.qty, 3);
        hold_ids.insert(held.hold_id);
    }
    assert_eq!(hold_ids.len(), 1, "one hold: {hold_ids:?}");
    assert_counters(&server, &product, Counters::stock(100).reserved(3).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn same_client_request_id_for_another_request_is_refused() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 10).await;
    let other = server.product("sandal", 4_900, 10).await;
    let mut checkout = server.checkout().await;
    try_hold(&mut checkout, &product.id, 2, Some("req-1"))
        .await
        .unwrap();
    let (before, other_before) = (
        get_product(&mut checkout, &product.id).await,
        get_product(&mut checkout, &other.id).await,
    );

    assert_status(
        try_hold(&mut checkout, &product.id, 3, Some("req-1")).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    assert_status(
        try_hold(&mut checkout, &other.id, 2, Some("req-1")).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    assert_eq!(get_product(&mut checkout, &product.id).await, before);
    assert_eq!(get_product(&mut checkout, &other.id).await, other_before);
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_hold_returns_the_hold_as_created() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;
    let held = try_hold(&mut checkout, &product.id, 4, Some("req-get"))
        .await
        .unwrap();

    assert_eq!(get_hold(&mut checkout, &held.hold_id).await, held);
    release(&mut checkout, &held.hold_id).await;
    let released = get_hold(&mut checkout, &held.hold_id).await;
    assert_eq!(released.status(), HoldStatus::Released);
    assert_eq!(released.qty, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_hold_is_not_found() {
    let server = TestServer::start().await;
    let mut checkout = server.checkout().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_status(
        checkout
            .get_hold(GetHoldRequest {
                hold_id: unknown.clone(),
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_status(
        try_release(&mut checkout, &unknown).await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn release_gives_units_back_once() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;
    hold(&mut checkout, &product.id, 1).await;
    let held = hold(&mut checkout, &product.id, 4).await;

    let released = release(&mut checkout, &held.hold_id).await;
    assert_eq!(released.status(), HoldStatus::Released);
    assert_eq!(released.hold_id, held.hold_id);
    let after = assert_counters(&server, &product, Counters::stock(10).reserved(1).sold(0)).await;

    let again = release(&mut checkout, &held.hold_id).await;
    assert_eq!(again.status(), HoldStatus::Released);
    assert_eq!(
        get_product(&mut checkout, &product.id).await,
        after,
        "units not returned twice"
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn released_hold_cannot_become_an_order() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;
    let held = hold(&mut checkout, &product.id, 2).await;
    release(&mut checkout, &held.hold_id).await;
    let before = get_product(&mut checkout, &product.id).await;

    assert_status(
        try_order(&mut checkout, &held.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_RELEASED",
    );
    assert_eq!(get_product(&mut checkout, &product.id).await, before);
    assert_eq!(
        get_hold(&mut checkout, &held.hold_id).await.status(),
        HoldStatus::Released
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn releasing_a_converted_hold_is_refused() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;
    let held = hold(&mut checkout, &product.id, 2).await;
    let order = order(&mut checkout, &held.hold_id).await;
    let before = assert_counters(&server, &product, Counters::stock(10).reserved(2).sold(0)).await;

    assert_status(
        try_release(&mut checkout, &held.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_CONVERTED",
    );
    assert_eq!(
        get_product(&mut checkout, &product.id).await,
        before,
        "units stay reserved"
    );
    assert_eq!(
        get_hold(&mut checkout, &held.hold_id).await.status(),
        HoldStatus::Converted
    );
    assert_eq!(
        get_order(&mut checkout, &order.order_id).await.status(),
        OrderStatus::Pending
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_releases_return_units_exactly_once() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 100).await;
    let mut checkout = server.checkout().await;
    // Other holds keep `reserved` high enough that a double return would show, not fail.
    for _ in 0..5 {
        hold(&mut checkout, &product.id, 10).await;
    }
    let held = hold(&mut checkout, &product.id, 7).await;

    let calls: Vec<_> = (0..10)
        .map(|_| {
            let mut checkout = checkout.clone();
            let hold_id = held.hold_id.clone();
            tokio::spawn(async move { try_release(&mut checkout, &hold_id).await })
        })
        .collect();
    for call in calls {
        let released = call.await.unwrap().expect("every release succeeds");
        assert_eq!(released.status(), HoldStatus::Released);
    }
    assert_counters(&server, &product, Counters::stock(100).reserved(50).sold(0)).await;
    server.assert_consistent().await;
}

// ---------------------------------------------------------------------------------------
// Batches: concurrent ReleaseHold calls share a transaction; each gets its own answer.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_releases_answers_each_hold_for_what_it_is() {
    let server = TestServer::start().await;
    let product = server.product("mug", 100, 20).await;
    let mut checkout = server.checkout().await;
    let first = hold(&mut checkout, &product.id, 1).await;
    let second = hold(&mut checkout, &product.id, 2).await;
    let gone = hold(&mut checkout, &product.id, 1).await;
    release(&mut checkout, &gone.hold_id).await;
    let ordered = hold(&mut checkout, &product.id, 1).await;
    order(&mut checkout, &ordered.hold_id).await;
    let prepaid = hold(&mut checkout, &product.id, 3).await;
    let early = success("evt-early", on_hold(&prepaid.hold_id), 300);
    assert_eq!(
        deliver(&mut checkout, early.clone()).await.outcome(),
        WebhookOutcome::Deferred
    );
    let unknown = uuid::Uuid::now_v7().to_string();

    // One release waits for its hold's row; every other call queues behind its batch and
    // goes in the next one, together.
    let blocker = hold(&mut checkout, &product.id, 1).await;
    let mut lock = lock_rows(&server, "holds", std::slice::from_ref(&blocker.hold_id)).await;
    let blocked = {
        let mut checkout = server.checkout().await;
        let hold_id = blocker.hold_id.clone();
        tokio::spawn(async move { try_release(&mut checkout, &hold_id).await })
    };
    eventually("the first batch to wait for its hold", || {
        waiting_on_locks(&server.db.url)
    })
    .await;
    let targets = [
        &first.hold_id,
        &second.hold_id,
        &first.hold_id,
        &gone.hold_id,
        &ordered.hold_id,
        &prepaid.hold_id,
        &unknown,
    ];
    let calls: Vec<_> = targets
        .iter()
        .map(|hold_id| {
            let (server, hold_id) = (&server, hold_id.to_string());
            async move { try_release(&mut server.checkout().await, &hold_id).await }
        })
        .collect();
    let unlock = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        commit(&mut lock).await;
    };
    let (answers, ()) = tokio::join!(futures::future::join_all(calls), unlock);
    blocked.await.unwrap().expect("the blocked release is made");

    let [
        first_a,
        second_a,
        first_again,
        gone_a,
        ordered_a,
        prepaid_a,
        unknown_a,
    ] = <[_; 7]>::try_from(answers).unwrap();
    for (answer, hold) in [
        (first_a, &first),
        (first_again, &first),
        (second_a, &second),
    ] {
        let released = answer.expect("an active hold is released");
        assert_eq!(
            (released.hold_id.as_str(), released.status()),
            (hold.hold_id.as_str(), HoldStatus::Released)
        );
    }
    assert_eq!(
        gone_a.expect("released before").status(),
        HoldStatus::Released
    );
    assert_status(ordered_a, Code::FailedPrecondition, "HOLD_CONVERTED");
    assert_eq!(
        prepaid_a.expect("a hold paid before its order").status(),
        HoldStatus::Released
    );
    // Its payment bought nothing: a refund is owed, and said on every redelivery.
    assert_eq!(
        deliver(&mut checkout, early).await.outcome(),
        WebhookOutcome::RefundRequired
    );
    assert_status(unknown_a, Code::NotFound, "NOT_FOUND");

    // Still held: the ordered unit only.
    assert_counters(&server, &product, Counters::stock(20).reserved(1).sold(0)).await;
    server.assert_consistent().await;
}
