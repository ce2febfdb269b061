//! Sale mechanics: holds extended up to their lifetime (also racing the reaper), per-buyer
//! limits under concurrency and across processes, sale windows, and UpdateProduct reaching
//! watchers.

use std::time::{Duration, SystemTime};

use flashsale::grpc::pb::{
    self, CreateHoldRequest, CreateProductRequest, ExtendHoldRequest, HoldStatus,
    UpdateProductRequest, WatchAvailabilityRequest,
};
use prost_types::{FieldMask, Timestamp};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{
    Checkout, Counters, TestServer, assert_counters, assert_invalid, assert_status, get_hold, hold,
    order, pay, reason, release, seconds_between, sleep_past,
};

/// ExtendHold, as the server answered.
async fn try_extend(checkout: &mut Checkout, hold_id: &str) -> Result<pb::Hold, tonic::Status> {
    checkout
        .extend_hold(ExtendHoldRequest {
            hold_id: hold_id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// CreateHold of `qty` for `buyer`, as the server answered.
async fn try_buyer_hold(
    checkout: &mut Checkout,
    product_id: &str,
    qty: i64,
    buyer: &str,
) -> Result<pb::Hold, tonic::Status> {
    checkout
        .create_hold(CreateHoldRequest {
            product_id: product_id.into(),
            qty,
            buyer_id: buyer.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A timestamp `offset` from now, in whole microseconds (what PostgreSQL keeps).
fn from_now(offset: Duration) -> Timestamp {
    let mut at = Timestamp::from(SystemTime::now() + offset);
    at.nanos -= at.nanos % 1000;
    at
}

/// A product with sale terms, through the admin API.
async fn product_with(server: &TestServer, stock: i64, terms: CreateProductRequest) -> pb::Product {
    server
        .admin()
        .await
        .create_product(CreateProductRequest {
            name: "limited drop".into(),
            price_cents: 1_000,
            stock_total: stock,
            ..terms
        })
        .await
        .expect("create product")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn extending_a_hold_moves_its_expiry_until_its_lifetime_is_used_up() {
    let server = TestServer::start_with(|config| {
        config.hold_ttl = Duration::from_secs(2);
        config.hold_max_lifetime = Duration::from_secs(3);
    })
    .await;
    let product = server.product("ticket", 100, 10).await;
    let mut checkout = server.checkout().await;
    let held = hold(&mut checkout, &product.id, 1).await;
    assert!((1.9..2.1).contains(&seconds_between(held.created_at, held.expires_at)));

    tokio::time::sleep(Duration::from_millis(600)).await;
    let extended = try_extend(&mut checkout, &held.hold_id).await.unwrap();
    let lifetime = seconds_between(held.created_at, extended.expires_at);
    assert!(
        (2.5..3.0).contains(&lifetime),
        "expires {lifetime} s after creation"
    );

    tokio::time::sleep(Duration::from_millis(600)).await;
    let capped = try_extend(&mut checkout, &held.hold_id).await.unwrap();
    assert_eq!(
        seconds_between(held.created_at, capped.expires_at),
        3.0,
        "capped at the lifetime"
    );
    let status = assert_status(
        try_extend(&mut checkout, &held.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_LIFETIME_EXCEEDED",
    );
    assert!(status.message().contains(&held.hold_id), "{status:?}");

    sleep_past(capped.expires_at).await;
    assert_status(
        try_extend(&mut checkout, &held.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_EXPIRED",
    );
    // Released and converted holds say so too.
    let released = hold(&mut checkout, &product.id, 1).await;
    release(&mut checkout, &released.hold_id).await;
    assert_status(
        try_extend(&mut checkout, &released.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_RELEASED",
    );
    let converted = hold(&mut checkout, &product.id, 1).await;
    order(&mut checkout, &converted.hold_id).await;
    assert_status(
        try_extend(&mut checkout, &converted.hold_id).await,
        Code::FailedPrecondition,
        "HOLD_CONVERTED",
    );
    assert_counters(&server, &product, Counters::stock(10).reserved(1).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hold_extended_just_before_the_reaper_sweeps_stays_active() {
    let server = TestServer::start_with(|config| {
        config.hold_ttl = Duration::from_secs(1);
        config.hold_max_lifetime = Duration::from_secs(60);
        config.reaper_interval = Duration::from_millis(10);
    })
    .await;
    let product = server.product("ticket", 100, 10).await;
    let mut checkout = server.checkout().await;
    let mut extended = 0;
    for _ in 0..5 {
        let held = hold(&mut checkout, &product.id, 1).await;
        let expires = SystemTime::try_from(held.expires_at.unwrap()).unwrap();
        let just_before = expires - Duration::from_millis(30);
        tokio::time::sleep(
            just_before
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
        .await;
        match try_extend(&mut checkout, &held.hold_id).await {
            Ok(_) => {
                extended += 1;
                sleep_past(held.expires_at).await;
                let now = get_hold(&mut checkout, &held.hold_id).await;
                assert_eq!(
                    now.status(),
                    HoldStatus::Active,
                    "expired after its extension"
                );
            }
            // The reaper got there first: expired, and the extension says so.
            Err(status) => assert_eq!(reason(&status), "HOLD_EXPIRED", "{status:?}"),
        }
        release(&mut checkout, &held.hold_id).await;
    }
    assert!(extended > 0, "no extension beat the reaper");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_parallel_holds_of_one_buyer_never_pass_the_cap_across_two_processes() {
    let server = TestServer::start().await;
    let sibling = server.start_sibling().await;
    let product = product_with(
        &server,
        100,
        CreateProductRequest {
            max_per_buyer: 2,
            ..Default::default()
        },
    )
    .await;

    let mut calls = Vec::new();
    for i in 0..50 {
        let mut client = if i % 2 == 0 {
            server.checkout().await
        } else {
            sibling.checkout().await
        };
        let product_id = product.id.clone();
        calls.push(tokio::spawn(async move {
            try_buyer_hold(&mut client, &product_id, 1, "alice").await
        }));
    }
    let mut granted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => granted += 1,
            Err(status) => {
                assert_eq!(reason(&status), "BUYER_LIMIT_EXCEEDED", "{status:?}");
                let info = status.get_details_error_info().expect("error info");
                assert_eq!(
                    info.metadata.get("remaining").map(String::as_str),
                    Some("0")
                );
            }
        }
    }
    assert_eq!(granted, 2);

    // Another buyer has a cap of their own; a held unit still counts once it is ordered,
    // and a released one no longer does.
    let mut checkout = server.checkout().await;
    let bob = try_buyer_hold(&mut checkout, &product.id, 1, "bob")
        .await
        .unwrap();
    order(&mut checkout, &bob.hold_id).await;
    let status = assert_status(
        try_buyer_hold(&mut checkout, &product.id, 2, "bob").await,
        Code::FailedPrecondition,
        "BUYER_LIMIT_EXCEEDED",
    );
    let info = status.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata.get("remaining").map(String::as_str),
        Some("1")
    );
    let second = try_buyer_hold(&mut checkout, &product.id, 1, "bob")
        .await
        .unwrap();
    release(&mut checkout, &second.hold_id).await;
    try_buyer_hold(&mut checkout, &product.id, 1, "bob")
        .await
        .unwrap();
    assert_counters(&server, &product, Counters::stock(100).reserved(4).sold(0)).await;
    server.assert_consistent().await;
    drop(sibling);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_limited_product_needs_a_buyer_id() {
    let server = TestServer::start().await;
    let product = product_with(
        &server,
        10,
        CreateProductRequest {
            max_per_buyer: 1,
            ..Default::default()
        },
    )
    .await;
    let mut checkout = server.checkout().await;

    assert_invalid(
        try_buyer_hold(&mut checkout, &product.id, 1, "").await,
        "buyer_id",
    );
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn holds_are_granted_only_inside_the_sale_window_and_finish_after_it() {
    let server = TestServer::start().await;
    let product = product_with(
        &server,
        10,
        CreateProductRequest {
            sale_starts_at: Some(from_now(Duration::from_millis(1500))),
            sale_ends_at: Some(from_now(Duration::from_millis(3000))),
            ..Default::default()
        },
    )
    .await;
    let mut checkout = server.checkout().await;
    let mut watcher = server.checkout().await;
    let first = watcher
        .watch_availability(WatchAvailabilityRequest {
            product_ids: vec![product.id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("the current state");
    assert_eq!(
        first.sale_starts_at, product.sale_starts_at,
        "a countdown page sees the start"
    );
    assert_eq!(first.sale_ends_at, product.sale_ends_at);

    assert_status(
        try_buyer_hold(&mut checkout, &product.id, 1, "").await,
        Code::FailedPrecondition,
        "SALE_NOT_STARTED",
    );
    sleep_past(product.sale_starts_at).await;
    let inside = try_buyer_hold(&mut checkout, &product.id, 2, "")
        .await
        .unwrap();
    let pending = order(&mut checkout, &inside.hold_id).await;
    sleep_past(product.sale_ends_at).await;
    assert_status(
        try_buyer_hold(&mut checkout, &product.id, 1, "").await,
        Code::FailedPrecondition,
        "SALE_ENDED",
    );

    // What was bought inside the window finishes after it.
    pay(&mut checkout, &pending, "evt-1").await;
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn update_product_changes_the_named_terms_and_watchers_see_them() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 100, 10).await;
    let mut admin = server.admin().await;
    let mut stream = server
        .checkout()
        .await
        .watch_availability(WatchAvailabilityRequest {
            product_ids: vec![product.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let initial = stream.message().await.unwrap().unwrap();
    let ends = from_now(Duration::from_secs(3600));
    let update = |paths: &[&str], product: pb::Product| UpdateProductRequest {
        product: Some(product),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|path| path.to_string()).collect(),
        }),
    };
    let changes = pb::Product {
        id: product.id.clone(),
        max_per_buyer: 3,
        sale_ends_at: Some(ends),
        // Not named in the mask: left alone.
        price_cents: 1,
        ..Default::default()
    };

    let updated = admin
        .update_product(update(&["max_per_buyer", "sale_ends_at"], changes.clone()))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(updated.max_per_buyer, 3);
    assert_eq!(updated.sale_ends_at, Some(ends));
    assert_eq!(updated.price_cents, 100);
    assert_eq!(updated.version, product.version + 1);
    let seen = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an update")
        .unwrap()
        .unwrap();
    assert_eq!((seen.max_per_buyer, seen.sale_ends_at), (3, Some(ends)));
    assert!(seen.version > initial.version);

    // A bound named but unset is cleared; bad masks and windows are refused.
    let cleared = admin
        .update_product(update(
            &["sale_ends_at"],
            pb::Product {
                id: product.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.sale_ends_at, None);
    assert_invalid(
        admin
            .update_product(update(&["name"], changes.clone()))
            .await,
        "update_mask",
    );
    assert_invalid(
        admin.update_product(update(&[], changes.clone())).await,
        "update_mask",
    );
    let backwards = pb::Product {
        sale_starts_at: Some(from_now(Duration::from_secs(7200))),
        ..changes
    };
    assert_invalid(
        admin
            .update_product(update(&["sale_starts_at", "sale_ends_at"], backwards))
            .await,
        "sale_ends_at",
    );
}
