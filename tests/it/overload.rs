//! Past its limits the server answers instead of queueing: unary calls beyond the in-flight
//! limit are refused at once, and a hold granted to a caller that is no longer there (its
//! deadline passed, it cancelled) is released at once, leaving no orphan reservation.

use std::time::Duration;

use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::grpc::pb::{CreateHoldRequest, GetProductRequest, WatchAvailabilityRequest};
use tonic::Code;

use crate::support::{
    Counters, TestServer, assert_counters, assert_status, eventually, waiting_on_locks,
};

/// A connection holding the product's row lock, as a long transaction elsewhere would.
async fn lock_product(server: &TestServer, product_id: &str) -> AsyncPgConnection {
    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    diesel::sql_query("BEGIN").execute(&mut conn).await.unwrap();
    diesel::sql_query("SELECT 1 FROM products WHERE id = $1 FOR UPDATE")
        .bind::<SqlUuid, _>(uuid::Uuid::parse_str(product_id).unwrap())
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// A CreateHold of one unit with a deadline.
fn hold_within(product_id: &str, deadline: Duration) -> tonic::Request<CreateHoldRequest> {
    let mut request = tonic::Request::new(CreateHoldRequest {
        product_id: product_id.into(),
        qty: 1,
        ..Default::default()
    });
    request.set_timeout(deadline);
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_past_the_in_flight_limit_are_refused_at_once() {
    let server = TestServer::start_with(|config| config.max_in_flight = 4).await;
    let product = server.product("ticket", 100, 10).await;
    let mut lock = lock_product(&server, &product.id).await;
    let mut stuck = Vec::new();
    for _ in 0..4 {
        let mut client = server.checkout().await;
        let request = hold_within(&product.id, Duration::from_secs(30));
        stuck.push(tokio::spawn(
            async move { client.create_hold(request).await },
        ));
    }
    eventually("the holds to wait for the row", || {
        waiting_on_locks(&server.db.url)
    })
    .await;

    let mut checkout = server.checkout().await;
    let started = std::time::Instant::now();
    let refused = checkout
        .get_product(GetProductRequest {
            product_id: product.id.clone(),
        })
        .await;
    let status = assert_status(refused, Code::ResourceExhausted, "OVERLOADED");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused only after {:?}",
        started.elapsed()
    );
    assert!(status.message().contains("limit"), "{status:?}");
    // Streams are not unary calls: they still open.
    checkout
        .watch_availability(WatchAvailabilityRequest {
            product_ids: vec![product.id.clone()],
        })
        .await
        .expect("a stream opens at the limit");

    diesel::sql_query("COMMIT")
        .execute(&mut lock)
        .await
        .unwrap();
    for call in stuck {
        call.await.unwrap().expect("the waiting holds are served");
    }
    checkout
        .get_product(GetProductRequest {
            product_id: product.id.clone(),
        })
        .await
        .expect("served again once the slots are free");
    assert_counters(&server, &product, Counters::stock(10).reserved(4).sold(0)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn holds_whose_callers_are_gone_are_released_leaving_no_orphan_reservation() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 100, 100).await;
    let mut lock = lock_product(&server, &product.id).await;
    let deadline = Duration::from_millis(300);
    let mut calls = Vec::new();
    // The first wave's batch waits for the row; the second queues behind it.
    for wave in 0..2 {
        for _ in 0..20 {
            let mut client = server.checkout().await;
            let request = hold_within(&product.id, deadline);
            calls.push(tokio::spawn(
                async move { client.create_hold(request).await },
            ));
        }
        if wave == 0 {
            eventually("the batch to wait for the row", || {
                waiting_on_locks(&server.db.url)
            })
            .await;
        }
    }
    tokio::time::sleep(deadline * 2).await;
    diesel::sql_query("COMMIT")
        .execute(&mut lock)
        .await
        .unwrap();

    let mut granted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(hold) => granted += hold.into_inner().qty,
            Err(status) => assert!(
                matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                "{status:?}"
            ),
        }
    }
    // Only the units of answered holds stay reserved.
    eventually("orphaned holds to be released", || {
        let (checkout, id) = (server.checkout(), product.id.clone());
        async move {
            let product = checkout
                .await
                .get_product(GetProductRequest { product_id: id })
                .await
                .unwrap()
                .into_inner();
            product.reserved == granted
        }
    })
    .await;
    server.assert_consistent().await;
}
