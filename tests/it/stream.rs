//! WatchAvailability: the current state first, then every committed change (holds, reaper
//! expiry, payments, products created later), versions strictly increasing, slow readers ending on the
//! latest state, ids checked before anything streams, changes heard across servers, and
//! statements that change many products at once.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::grpc::pb::{self, AvailabilityUpdate, WatchAvailabilityRequest};
use tonic::{Code, Streaming};

use crate::support::{
    Checkout, Counters, ShowsCounters, TestServer, assert_counters, assert_counters_shown,
    assert_invalid, assert_status, get_product, hold, order, pay,
};

/// Opens a WatchAvailability stream on these products (all of them when empty).
async fn watch(checkout: &mut Checkout, product_ids: &[&str]) -> Streaming<AvailabilityUpdate> {
    checkout
        .watch_availability(WatchAvailabilityRequest {
            product_ids: product_ids.iter().map(|id| id.to_string()).collect(),
        })
        .await
        .expect("watch availability")
        .into_inner()
}

/// The next update; fails the test if none comes within 30 s or the stream ends.
async fn next(stream: &mut Streaming<AvailabilityUpdate>) -> AvailabilityUpdate {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("an update within 30 s")
        .expect("the stream stays healthy")
        .expect("the stream stays open")
}

/// Microseconds since the epoch: PostgreSQL's precision.
fn unix_micros(time: SystemTime) -> u128 {
    time.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_micros()
}

/// Asserts an update shows exactly this product state.
#[track_caller]
fn assert_shows(update: &AvailabilityUpdate, product: &pb::Product) {
    assert_eq!(update.product_id, product.id);
    assert_eq!(update.shown(), product.shown(), "{update:?}");
    assert_eq!(update.version, product.version, "{update:?}");
    assert!(update.changed_at.is_some(), "{update:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_starts_with_the_current_state_then_follows_a_hold_and_its_expiry() {
    // Long enough that the hold's own update is read before its expiry replaces it.
    let server = TestServer::start_with(|config| config.hold_ttl = Duration::from_secs(3)).await;
    let product = server.product("console", 49_900, 10).await;
    let mut checkout = server.checkout().await;
    let mut watcher = server.checkout().await;
    let mut stream = watch(&mut watcher, &[&product.id]).await;

    let initial = next(&mut stream).await;
    assert_shows(&initial, &get_product(&mut checkout, &product.id).await);

    let before_hold = unix_micros(SystemTime::now());
    hold(&mut checkout, &product.id, 3).await;
    let after_hold = unix_micros(SystemTime::now());
    let held = next(&mut stream).await;
    assert_counters_shown(&held, Counters::stock(10).reserved(3).sold(0));
    assert!(held.version > initial.version, "{initial:?} then {held:?}");
    let changed_at = held.changed_at.expect("changed_at");
    let changed_at = unix_micros(SystemTime::try_from(changed_at).expect("a valid time"));
    assert!(
        (before_hold..=after_hold).contains(&changed_at),
        "the hold's change time {changed_at} lies within its call ({before_hold}..={after_hold})"
    );

    // Nobody converts the hold: the reaper's expiry is announced too.
    let expired = next(&mut stream).await;
    assert_counters_shown(&expired, Counters::stock(10).reserved(0).sold(0));
    assert!(expired.version > held.version, "{held:?} then {expired:?}");
    assert_shows(&expired, &get_product(&mut checkout, &product.id).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_moving_units_to_sold_reaches_watchers() {
    let server = TestServer::start().await;
    let product = server.product("console", 49_900, 10).await;
    let mut checkout = server.checkout().await;
    let mut watcher = server.checkout().await;
    let mut stream = watch(&mut watcher, &[&product.id]).await;
    assert_counters_shown(
        &next(&mut stream).await,
        Counters::stock(10).reserved(0).sold(0),
    );

    let held = hold(&mut checkout, &product.id, 2).await;
    assert_counters_shown(
        &next(&mut stream).await,
        Counters::stock(10).reserved(2).sold(0),
    );
    let pending = order(&mut checkout, &held.hold_id).await;
    pay(&mut checkout, &pending, "evt-paid").await;

    // The settlement's units are folded into the product after its commit, and announced.
    let paid = next(&mut stream).await;
    assert_counters_shown(&paid, Counters::stock(10).reserved(0).sold(2));
    assert_shows(&paid, &get_product(&mut checkout, &product.id).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn watching_two_products_starts_with_the_current_state_of_each() {
    let server = TestServer::start().await;
    let first = server.product("console", 49_900, 10).await;
    let second = server.product("controller", 5_900, 20).await;
    let mut checkout = server.checkout().await;
    hold(&mut checkout, &second.id, 4).await;
    let mut watcher = server.checkout().await;
    let mut stream = watch(&mut watcher, &[&first.id, &second.id]).await;

    let mut initial = BTreeMap::new();
    for _ in 0..2 {
        let update = next(&mut stream).await;
        initial.insert(update.product_id.clone(), update);
    }
    for product in [&first, &second] {
        let update = initial
            .get(&product.id)
            .expect("an initial state per product");
        assert_shows(update, &get_product(&mut checkout, &product.id).await);
    }
    assert_counters_shown(
        &initial[&second.id],
        Counters::stock(20).reserved(4).sold(0),
    );

    hold(&mut checkout, &first.id, 1).await;
    let update = next(&mut stream).await;
    assert_shows(&update, &get_product(&mut checkout, &first.id).await);
    assert_counters_shown(&update, Counters::stock(10).reserved(1).sold(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn watching_all_products_includes_products_created_after_the_stream_opened() {
    let server = TestServer::start().await;
    let first = server.product("console", 49_900, 10).await;
    let second = server.product("controller", 5_900, 20).await;
    let mut checkout = server.checkout().await;
    let mut watcher = server.checkout().await;
    let mut stream = watch(&mut watcher, &[]).await;

    let mut initial = BTreeMap::new();
    for _ in 0..2 {
        let update = next(&mut stream).await;
        initial.insert(update.product_id.clone(), update);
    }
    assert_shows(&initial[&first.id], &first);
    assert_shows(&initial[&second.id], &second);

    let later = server.product("headset", 9_900, 7).await;
    let created = next(&mut stream).await;
    assert_shows(&created, &later);
    assert_counters_shown(&created, Counters::stock(7).reserved(0).sold(0));

    hold(&mut checkout, &later.id, 2).await;
    let held = next(&mut stream).await;
    assert_eq!(held.product_id, later.id);
    assert_counters_shown(&held, Counters::stock(7).reserved(2).sold(0));
    assert!(held.version > created.version);
}

#[tokio::test(flavor = "multi_thread")]
async fn watching_an_unknown_product_fails_not_found_before_streaming() {
    let server = TestServer::start().await;
    let known = server.product("console", 49_900, 10).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let mut checkout = server.checkout().await;

    for product_ids in [
        vec![unknown.clone()],
        vec![known.id.clone(), unknown.clone()],
    ] {
        let status = assert_status(
            checkout
                .watch_availability(WatchAvailabilityRequest { product_ids })
                .await,
            Code::NotFound,
            "NOT_FOUND",
        );
        assert!(status.message().contains(&unknown), "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watching_a_malformed_product_id_is_invalid_argument() {
    let server = TestServer::start().await;
    let known = server.product("console", 49_900, 10).await;
    let mut checkout = server.checkout().await;

    assert_invalid(
        checkout
            .watch_availability(WatchAvailabilityRequest {
                product_ids: vec![known.id.clone(), "not-a-uuid".into()],
            })
            .await,
        "product_ids",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_watcher_ends_on_the_latest_state() {
    let server = TestServer::start().await;
    let product = server.product("console", 49_900, 100).await;
    let mut checkout = server.checkout().await;
    let mut watcher = server.checkout().await;
    let mut stream = watch(&mut watcher, &[&product.id]).await;
    let mut last = next(&mut stream).await;

    // 50 changes while the watcher reads nothing.
    for _ in 0..50 {
        hold(&mut checkout, &product.id, 1).await;
    }
    let latest =
        assert_counters(&server, &product, Counters::stock(100).reserved(50).sold(0)).await;

    while last.version < latest.version {
        let update = next(&mut stream).await;
        assert!(
            update.version > last.version,
            "versions strictly increase: {last:?} then {update:?}"
        );
        last = update;
    }
    assert_shows(&last, &latest);

    // Caught up, the stream still follows live changes.
    hold(&mut checkout, &product.id, 1).await;
    let live = next(&mut stream).await;
    assert_counters_shown(&live, Counters::stock(100).reserved(51).sold(0));
    assert!(live.version > last.version);
}

#[tokio::test(flavor = "multi_thread")]
async fn watcher_on_another_server_sees_changes_made_through_the_first() {
    let first = TestServer::start().await;
    let second = first.start_sibling().await;
    let product = first.product("console", 49_900, 10).await;
    let mut watcher = second.checkout().await;
    let mut stream = watch(&mut watcher, &[&product.id]).await;
    let initial = next(&mut stream).await;
    assert_counters_shown(&initial, Counters::stock(10).reserved(0).sold(0));

    let mut on_first = first.checkout().await;
    hold(&mut on_first, &product.id, 6).await;

    let update = next(&mut stream).await;
    assert_shows(&update, &get_product(&mut on_first, &product.id).await);
    assert_counters_shown(&update, Counters::stock(10).reserved(6).sold(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_watcher_of_all_products_ends_on_the_latest_state_of_each() {
    let server = TestServer::start().await;
    let mut products = Vec::new();
    for name in ["console", "controller", "headset", "cable"] {
        products.push(server.product(name, 1_000, 500).await);
    }
    let mut watcher = server.checkout().await;
    let mut stream = watch(&mut watcher, &[]).await;
    let mut versions = BTreeMap::new();
    for _ in 0..products.len() {
        let update = next(&mut stream).await;
        versions.insert(update.product_id.clone(), update.version);
    }

    // 200 concurrent changes, each on its own connection, while the watcher reads nothing.
    let mut changes = Vec::new();
    for i in 0..200 {
        let mut client = server.checkout().await;
        let product_id = products[i % products.len()].id.clone();
        changes.push(tokio::spawn(async move {
            hold(&mut client, &product_id, 1).await;
        }));
    }
    for change in changes {
        change.await.unwrap();
    }
    let mut checkout = server.checkout().await;
    let mut latest = BTreeMap::new();
    for product in &products {
        latest.insert(
            product.id.clone(),
            get_product(&mut checkout, &product.id).await,
        );
    }

    let mut shown = BTreeMap::new();
    while latest
        .values()
        .any(|product| versions[&product.id] < product.version)
    {
        let update = next(&mut stream).await;
        let previous = versions[&update.product_id];
        assert!(
            update.version > previous,
            "versions of one product strictly increase: {previous} then {update:?}"
        );
        versions.insert(update.product_id.clone(), update.version);
        shown.insert(update.product_id.clone(), update);
    }
    for product in latest.values() {
        assert_counters_shown(product, Counters::stock(500).reserved(50).sold(0));
        assert_shows(&shown[&product.id], product);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_statement_changing_more_products_than_one_notification_holds_reaches_each_watcher() {
    let server = TestServer::start().await;
    // The database announces the changes of one statement 24 products per notification.
    let mut products = Vec::new();
    for index in 0..30 {
        products.push(server.product(&format!("item {index}"), 100, 10).await);
    }
    let mut watcher = server.checkout().await;
    let mut stream = watch(&mut watcher, &[]).await;
    let mut before = BTreeMap::new();
    for _ in 0..products.len() {
        let update = next(&mut stream).await;
        before.insert(update.product_id.clone(), update);
    }

    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    let restocked = diesel::sql_query("UPDATE products SET stock_total = stock_total + 5")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(restocked, products.len());

    let mut after = BTreeMap::new();
    while after.len() < products.len() {
        let update = next(&mut stream).await;
        after.insert(update.product_id.clone(), update);
    }
    for product in &products {
        let (old, new) = (&before[&product.id], &after[&product.id]);
        assert_counters_shown(new, Counters::stock(15).reserved(0).sold(0));
        assert!(new.version > old.version, "{old:?} then {new:?}");
    }
}
