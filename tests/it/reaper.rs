//! The reaper: holds past their TTL expire and give their units back exactly once, also in
//! bulk, racing CreateOrder and ReleaseHold, with payments deferred on them, and with two
//! server processes reaping the same database.

use std::future::Future;
use std::time::{Duration, SystemTime};

use flashsale::grpc::pb::{HoldStatus, OrderStatus, WebhookOutcome};
use tokio::time::Instant;
use tonic::Code;

use crate::support::{
    Checkout, Counters, TestServer, assert_counters, assert_status, deliver, get_hold, get_order,
    get_product, hold, on_hold, pending_order, reason, success, try_order, try_release,
};

/// Polls `probe` until it yields a value; fails the test after 30 s.
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the reaper has expired a hold.
async fn wait_until_expired(checkout: &Checkout, hold_id: &str) {
    wait_for("the reaper to expire the hold", || {
        let (mut checkout, hold_id) = (checkout.clone(), hold_id.to_string());
        async move {
            let status = get_hold(&mut checkout, &hold_id).await.status();
            (status == HoldStatus::Expired).then_some(())
        }
    })
    .await
}

/// Waits until the product's reserved units dropped to `floor` (or below, which the caller's
/// assertions then catch).
async fn wait_until_reserved_at_most(checkout: &Checkout, product_id: &str, floor: i64) {
    wait_for("the reaper to give the units back", || {
        let (mut checkout, product_id) = (checkout.clone(), product_id.to_string());
        async move { (get_product(&mut checkout, &product_id).await.reserved <= floor).then_some(()) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn reaper_expires_a_hold_past_its_ttl_and_returns_its_units() {
    let server = TestServer::start_with(|config| config.hold_ttl = Duration::from_secs(1)).await;
    let product = server.product("mug", 100, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 3).await;
    assert_counters(&server, &product, Counters::stock(10).reserved(3).sold(0)).await;

    wait_until_expired(&checkout, &hold.hold_id).await;

    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    assert_status(
        try_order(&mut checkout, &hold.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_EXPIRED",
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reaper_expires_many_holds_across_products_each_exactly_once() {
    let server = TestServer::start_with(|config| {
        config.hold_ttl = Duration::from_secs(2);
        // Several batches per sweep.
        config.reaper_batch_size = 7;
    })
    .await;
    let mut checkout = server.checkout().await;
    let mut products = Vec::new();
    for name in ["red", "green", "blue"] {
        let product = server.product(name, 100, 100).await;
        // Units the reaper must never touch: a hold expired twice shows as reserved below 5.
        pending_order(&mut checkout, &product.id, 5).await;
        products.push(product);
    }
    let mut holds = Vec::new();
    for i in 0..50 {
        let product = &products[i % 3];
        holds.push(hold(&mut checkout, &product.id, 1 + (i as i64 % 3)).await);
    }

    for product in &products {
        wait_until_reserved_at_most(&checkout, &product.id, 5).await;
    }

    for product in &products {
        // Only the pending order stays reserved.
        assert_counters(&server, product, Counters::stock(100).reserved(5).sold(0)).await;
    }
    for hold in &holds {
        assert_eq!(
            get_hold(&mut checkout, &hold.hold_id).await.status(),
            HoldStatus::Expired
        );
    }
    server.assert_consistent().await;
}

/// Sleeps until `offset_ms` around a hold's expiry (negative: before it).
async fn sleep_until_around(expires_at: Option<prost_types::Timestamp>, offset_ms: i64) {
    let expiry = SystemTime::try_from(expires_at.expect("expires_at")).expect("timestamp");
    let offset = Duration::from_millis(offset_ms.unsigned_abs());
    let target = if offset_ms < 0 {
        expiry - offset
    } else {
        expiry + offset
    };
    let left = target.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_order_racing_the_reaper_at_expiry_either_converts_or_expires_never_both() {
    let server = TestServer::start_with(|config| config.hold_ttl = Duration::from_secs(1)).await;
    let product = server.product("mug", 100, 100).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(server.checkout().await);
    }
    let mut holds = Vec::new();
    for i in 0..40 {
        holds.push(hold(&mut clients[i % 8], &product.id, 1 + (i as i64 % 2)).await);
    }

    // Each CreateOrder lands between 200 ms before and 190 ms after its hold's expiry, while
    // the reaper sweeps every 100 ms.
    let mut calls = Vec::new();
    for (i, hold) in holds.iter().enumerate() {
        let mut client = clients[i % 8].clone();
        let hold = hold.clone();
        calls.push(tokio::spawn(async move {
            sleep_until_around(hold.expires_at, -200 + 10 * i as i64).await;
            let result = try_order(&mut client, &hold.hold_id).await;
            (hold, result)
        }));
    }

    let mut checkout = clients[0].clone();
    let (mut converted, mut expired, mut reserved) = (0, 0, 0);
    for call in calls {
        let (hold, result) = call.await.unwrap();
        let now = get_hold(&mut checkout, &hold.hold_id).await;
        let again = try_order(&mut checkout, &hold.hold_id).await;
        match result {
            Ok(order) => {
                converted += 1;
                reserved += order.qty;
                assert_eq!(order.status(), OrderStatus::Pending);
                assert_eq!(now.status(), HoldStatus::Converted, "{hold:?}");
                assert_eq!(get_order(&mut checkout, &order.order_id).await, order);
                assert_eq!(again.expect("converted hold").order_id, order.order_id);
            }
            Err(status) => {
                expired += 1;
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(reason(&status), "HOLD_EXPIRED");
                assert_eq!(now.status(), HoldStatus::Expired, "{hold:?}");
                assert_status(again, Code::FailedPrecondition, "HOLD_EXPIRED");
            }
        }
    }

    eprintln!("race outcome: {converted} converted, {expired} expired");
    // Reserved is exactly the pending orders' units.
    assert_counters(
        &server,
        &product,
        Counters::stock(100).reserved(reserved).sold(0),
    )
    .await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn release_racing_the_reaper_at_expiry_gives_the_units_back_once() {
    let server = TestServer::start_with(|config| config.hold_ttl = Duration::from_secs(1)).await;
    let product = server.product("mug", 100, 100).await;
    let mut checkout = server.checkout().await;
    // Units neither side may touch: a hold closed twice shows as reserved dropping below 4.
    pending_order(&mut checkout, &product.id, 4).await;
    let mut holds = Vec::new();
    for i in 0..40 {
        holds.push(hold(&mut checkout, &product.id, 1 + (i as i64 % 2)).await);
    }

    // Each ReleaseHold lands between 200 ms before and 190 ms after its hold's expiry, while
    // the reaper sweeps every 100 ms.
    let mut calls = Vec::new();
    for (i, hold) in holds.into_iter().enumerate() {
        let mut client = checkout.clone();
        calls.push(tokio::spawn(async move {
            sleep_until_around(hold.expires_at, -200 + 10 * i as i64).await;
            try_release(&mut client, &hold.hold_id).await
        }));
    }
    let (mut released, mut expired) = (0, 0);
    for call in calls {
        match call.await.unwrap().expect("release answers").status() {
            HoldStatus::Released => released += 1,
            HoldStatus::Expired => expired += 1,
            other => panic!("a raced hold ended {other:?}"),
        }
    }

    eprintln!("race outcome: {released} released, {expired} expired");
    assert_eq!(released + expired, 40);
    wait_until_reserved_at_most(&checkout, &product.id, 4).await;
    // Every unit back exactly once.
    assert_counters(&server, &product, Counters::stock(100).reserved(4).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reaper_closes_a_payment_deferred_on_the_hold_it_expires() {
    let server = TestServer::start_with(|config| config.hold_ttl = Duration::from_secs(2)).await;
    let product = server.product("mug", 400, 10).await;
    let mut checkout = server.checkout().await;
    let hold = hold(&mut checkout, &product.id, 2).await;
    let webhook = success("evt-early", on_hold(&hold.hold_id), 800);
    assert_eq!(
        deliver(&mut checkout, webhook.clone()).await.outcome(),
        WebhookOutcome::Deferred
    );

    wait_until_expired(&checkout, &hold.hold_id).await;

    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    assert_status(
        try_order(&mut checkout, &hold.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_EXPIRED",
    );
    // The money it reported was taken for a hold that never became an order.
    let later = deliver(&mut checkout, webhook).await;
    assert_eq!(later.outcome(), WebhookOutcome::RefundRequired);
    assert!(later.order_id.is_empty(), "{later:?}");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_on_one_database_expire_each_hold_exactly_once() {
    let first = TestServer::start_with(|config| {
        config.hold_ttl = Duration::from_secs(2);
        config.reaper_interval = Duration::from_millis(20);
    })
    .await;
    let second = first.start_sibling().await;
    let mut on_first = first.checkout().await;
    let mut on_second = second.checkout().await;
    let mut products = Vec::new();
    for name in ["left", "right"] {
        let product = first.product(name, 100, 100).await;
        // Units the reaper must never touch: a hold expired twice shows as reserved below 5.
        pending_order(&mut on_first, &product.id, 5).await;
        products.push(product);
    }
    let mut holds = Vec::new();
    for i in 0..60 {
        let checkout = if i % 2 == 0 {
            &mut on_first
        } else {
            &mut on_second
        };
        holds.push(hold(checkout, &products[(i / 2) % 2].id, 1 + (i as i64 % 3)).await);
    }

    for product in &products {
        wait_until_reserved_at_most(&on_second, &product.id, 5).await;
    }

    for product in &products {
        // Only the pending order stays reserved.
        assert_counters(&first, product, Counters::stock(100).reserved(5).sold(0)).await;
    }
    for hold in &holds {
        assert_eq!(
            get_hold(&mut on_second, &hold.hold_id).await.status(),
            HoldStatus::Expired
        );
    }
    first.assert_consistent().await;
    second.assert_consistent().await;
}
