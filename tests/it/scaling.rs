//! Several server processes on one database, and live availability that survives a lost
//! listener connection and frees what a departed watcher held.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::grpc::pb::checkout_service_client::CheckoutServiceClient;
use flashsale::grpc::pb::{
    AdjustStockRequest, AvailabilityUpdate, HoldStatus, WatchAvailabilityRequest,
};
use futures::StreamExt;
use tonic::Streaming;

use crate::support::{
    Checkout, Counters, ServerProcess, TestDb, TestServer, assert_counters, assert_counters_shown,
    get_hold, get_product, hold,
};

/// Opens a WatchAvailability stream on one product.
async fn watch(checkout: &mut Checkout, product_id: &str) -> Streaming<AvailabilityUpdate> {
    let request = WatchAvailabilityRequest {
        product_ids: vec![product_id.to_owned()],
    };
    checkout
        .watch_availability(request)
        .await
        .expect("watch")
        .into_inner()
}

/// Reads updates until one satisfies `done` (10 s at most); returns it.
async fn read_until(
    stream: &mut Streaming<AvailabilityUpdate>,
    done: impl Fn(&AvailabilityUpdate) -> bool,
) -> AvailabilityUpdate {
    let reading = async {
        let mut last_version = 0;
        while let Some(update) = stream.next().await {
            let update = update.expect("stream item");
            assert!(
                update.version > last_version,
                "versions must grow: {update:?}"
            );
            last_version = update.version;
            if done(&update) {
                return update;
            }
        }
        panic!("stream ended early");
    };
    tokio::time::timeout(Duration::from_secs(10), reading)
        .await
        .expect("the awaited state arrived within 10 s")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hold_made_through_one_process_reaches_a_watcher_on_another() {
    let db = TestDb::new().await;
    let (first, second) = (
        ServerProcess::start(&db.url).await,
        ServerProcess::start(&db.url).await,
    );
    let server = TestServer::spawn(crate::support::test_config(&db.url), db).await;
    server.wait_serving().await;
    let product = server.product("ticket", 1_000, 50).await;

    let mut watcher = watch(&mut second.checkout().await, &product.id).await;
    read_until(&mut watcher, |update| update.available == 50).await;

    // A hold through the first process.
    let hold = hold(&mut first.checkout().await, &product.id, 3).await;
    let seen = read_until(&mut watcher, |update| update.reserved == 3).await;
    assert_counters_shown(&seen, Counters::stock(50).reserved(3).sold(0));

    // The hold expires (1 s TTL) by one of the reapers; the watcher sees the units come back.
    let back = read_until(&mut watcher, |update| update.reserved == 0).await;
    assert_counters_shown(&back, Counters::stock(50).reserved(0).sold(0));
    let expired = get_hold(&mut second.checkout().await, &hold.hold_id).await;
    assert_eq!(expired.status(), HoldStatus::Expired);
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_reapers_expire_every_hold_exactly_once() {
    let db = TestDb::new().await;
    let processes = [
        ServerProcess::start(&db.url).await,
        ServerProcess::start(&db.url).await,
    ];
    let server = TestServer::spawn(crate::support::test_config(&db.url), db).await;
    server.wait_serving().await;
    let products = [
        server.product("a", 100, 1_000).await,
        server.product("b", 100, 1_000).await,
    ];

    let mut hold_ids = Vec::new();
    for (i, process) in processes.iter().enumerate() {
        let mut checkout = process.checkout().await;
        for n in 0..60 {
            let product_id = &products[(i + n) % 2].id;
            let held = hold(&mut checkout, product_id, 1 + (n as i64 % 3)).await;
            hold_ids.push(held.hold_id);
        }
    }

    let mut checkout = server.checkout().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for hold_id in &hold_ids {
        loop {
            if get_hold(&mut checkout, hold_id).await.status() == HoldStatus::Expired {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "hold {hold_id} never expired"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for product in &products {
        // Expired twice would have taken reserved below zero (refused by the database) or
        // left the audit unbalanced; skipped once would leave units reserved.
        assert_counters(&server, product, Counters::stock(1_000).reserved(0).sold(0)).await;
    }
    server.assert_consistent().await;
    for process in processes {
        process.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_converges_after_its_listener_connection_is_killed() {
    let server = TestServer::start().await;
    let product = server.product("console", 50_000, 100).await;
    let mut admin = server.admin().await;
    let mut watcher = watch(&mut server.checkout().await, &product.id).await;
    read_until(&mut watcher, |update| update.stock_total == 100).await;

    let killed = terminate_listener(&server.db.url).await;
    assert_eq!(
        killed, 1,
        "exactly one listener connection per server process"
    );
    // Changes made while the listener is down are caught up by its re-read after reconnecting.
    let mut last = product.clone();
    for delta in [5, -2, 7] {
        let request = AdjustStockRequest {
            request_id: String::new(),
            product_id: product.id.clone(),
            delta,
        };
        last = admin.adjust_stock(request).await.unwrap().into_inner();
    }
    let seen = read_until(&mut watcher, |update| update.version == last.version).await;
    assert_counters_shown(&seen, Counters::stock(110).reserved(0).sold(0));
}

/// Terminates the change listener's connection(s) on this database; returns how many.
async fn terminate_listener(database_url: &str) -> usize {
    let mut conn = AsyncPgConnection::establish(database_url)
        .await
        .expect("connect");
    let sql = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = '{}' AND datname = current_database()",
        flashsale::db::LISTENER_APPLICATION_NAME
    );
    diesel::sql_query(sql)
        .execute(&mut conn)
        .await
        .expect("terminate listener")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_stream_frees_its_resources() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 100, 10).await;
    let mut watcher = watch(&mut server.checkout().await, &product.id).await;
    read_until(&mut watcher, |_| true).await;
    assert_eq!(server.hub.open_streams(), 1);

    drop(watcher);
    wait_for("the stream to be freed", || server.hub.open_streams() == 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watchers_sharing_a_connection_are_woken_together_and_leave_nothing_behind() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 100, 10).await;
    let shared = server.channel().await;
    let mut first = watch(&mut CheckoutServiceClient::new(shared.clone()), &product.id).await;
    let mut second = watch(&mut CheckoutServiceClient::new(shared), &product.id).await;
    let mut alone = watch(&mut server.checkout().await, &product.id).await;
    for stream in [&mut first, &mut second, &mut alone] {
        read_until(stream, |_| true).await;
    }
    assert_eq!(server.hub.wake_groups(), 2, "one wake group per connection");

    let mut checkout = server.checkout().await;
    hold(&mut checkout, &product.id, 1).await;
    let held = get_product(&mut checkout, &product.id).await;
    for stream in [&mut first, &mut second, &mut alone] {
        read_until(stream, |update| update.version >= held.version).await;
    }

    drop((first, second));
    wait_for("the shared connection's group to go", || {
        server.hub.wake_groups() == 1 && server.hub.open_streams() == 1
    })
    .await;
    hold(&mut checkout, &product.id, 1).await;
    let held = get_product(&mut checkout, &product.id).await;
    let seen = read_until(&mut alone, |update| update.version >= held.version).await;
    assert_counters_shown(&seen, Counters::stock(10).reserved(2).sold(0));
}

/// Polls `done` every 20 ms until it holds; fails the test after 10 s.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 10 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
