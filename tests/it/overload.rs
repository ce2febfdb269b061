//! Past its limits the server answers instead of queueing: unary calls beyond the in-flight
//! limit are refused at once, and a hold granted to a caller that is no longer there (its
//! deadline passed, it cancelled) is released at once, leaving no orphan reservation.

use std::time::Duration;

use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::grpc::pb::{
    CreateHoldRequest, ExtendHoldRequest, GetProductRequest, HoldStatus, WatchAvailabilityRequest,
};
use tonic::Code;

use crate::support::{
    Counters, TestDb, TestServer, assert_counters, assert_status, cluster_processes, commit,
    eventually, hold, lock_rows, signal_all, test_config, try_release, waiting_on_locks,
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

#[tokio::test(flavor = "multi_thread")]
async fn a_row_held_too_long_fails_the_call_instead_of_hanging() {
    let server = TestServer::start_with(|config| {
        config.db_lock_timeout = Duration::from_millis(300);
    })
    .await;
    let product = server.product("ticket", 100, 10).await;
    let mut lock = lock_product(&server, &product.id).await;

    // The row stays locked for the whole call: it must come back anyway, to be retried.
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        server
            .checkout()
            .await
            .create_hold(hold_within(&product.id, Duration::from_secs(60))),
    )
    .await
    .expect("the call comes back while the row is still locked");
    assert_status(answer, Code::Aborted, "TRANSACTION_CONFLICT");

    diesel::sql_query("COMMIT")
        .execute(&mut lock)
        .await
        .unwrap();
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_given_up_mid_transaction_leaves_nothing_held() {
    let server = TestServer::start_with(|config| {
        config.db_timeout = Duration::from_millis(500);
        config.db_lock_timeout = Duration::from_secs(20);
        // Nothing in the background borrows (and so recycles) connections meanwhile.
        config.reaper_interval = Duration::from_secs(600);
        config.health_check_interval = Duration::from_secs(600);
    })
    .await;
    let product = server.product("ticket", 100, 10).await;
    let mut checkout = server.checkout().await;
    let held = hold(&mut checkout, &product.id, 2).await;

    // Several idle connections in the pool, so the next call is not handed the one the
    // given-up call used.
    let others: Vec<String> = futures::future::join_all((0..6).map(|_| {
        let server = &server;
        let product_id = product.id.clone();
        async move {
            hold(&mut server.checkout().await, &product_id, 1)
                .await
                .hold_id
        }
    }))
    .await;
    let mut lock = lock_rows(&server, "holds", &others).await;
    let releases = others.iter().map(|hold_id| {
        let (server, hold_id) = (&server, hold_id.clone());
        async move { try_release(&mut server.checkout().await, &hold_id).await }
    });
    let unlock = async {
        eventually(
            "the releases to wait for their rows, one connection each",
            || waiting_on_locks(&server.db.url),
        )
        .await;
        commit(&mut lock).await;
    };
    let (released, ()) = tokio::join!(futures::future::join_all(releases), unlock);
    assert!(released.iter().all(Result::is_ok), "{released:?}");

    // ExtendHold's transaction waits for the hold's row past the call's budget.
    let mut lock = lock_rows(&server, "holds", std::slice::from_ref(&held.hold_id)).await;
    let abandoned = checkout
        .extend_hold(ExtendHoldRequest {
            hold_id: held.hold_id.clone(),
        })
        .await;
    assert_status(abandoned, Code::Unavailable, "DATABASE_UNAVAILABLE");
    commit(&mut lock).await;

    // The given-up transaction ended with its connection: it holds no lock, changed nothing.
    let released = tokio::time::timeout(
        Duration::from_secs(10),
        try_release(&mut checkout, &held.hold_id),
    )
    .await
    .expect("the hold's row is free again");
    let released = released.expect("released");
    assert_eq!(released.status(), HoldStatus::Released);
    assert_eq!(
        released.expires_at, held.expires_at,
        "the extension was rolled back"
    );
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_database_fails_calls_quickly_and_turns_health_not_serving_until_it_thaws() {
    use flashsale::local_pg::{LocalPostgres, LocalPostgresOptions};
    use tonic_health::pb::health_check_response::ServingStatus;

    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalPostgres::start(LocalPostgresOptions::throwaway(dir.path().join("pg")))
        .await
        .expect("a cluster of this test's own");
    let db = TestDb::on_own_cluster(cluster.url("postgres"));
    let mut config = test_config(&db.url);
    config.db_timeout = Duration::from_secs(1);
    let server = TestServer::spawn(config, db).await;
    server.wait_serving().await;
    let product = server.product("ticket", 100, 10).await;
    let mut checkout = server.checkout().await;

    // Every process of the cluster stops answering (its sockets stay open). PostgreSQL's
    // children leave the postmaster's process group: signal each.
    let cluster_processes = cluster_processes(&cluster);
    signal_all(&cluster_processes, libc::SIGSTOP);

    // Calls come back UNAVAILABLE once their database budget is spent, not when (if ever)
    // the database answers.
    let read = checkout.get_product(GetProductRequest {
        product_id: product.id.clone(),
    });
    let answer = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a read comes back while the database is frozen");
    assert_status(answer, Code::Unavailable, "DATABASE_UNAVAILABLE");
    let hold = checkout.create_hold(hold_within(&product.id, Duration::from_secs(60)));
    let answer = tokio::time::timeout(Duration::from_secs(10), hold)
        .await
        .expect("a hold comes back while the database is frozen");
    assert_status(answer, Code::Unavailable, "DATABASE_UNAVAILABLE");
    eventually("NOT_SERVING while frozen", || async {
        server.health().await == ServingStatus::NotServing
    })
    .await;

    signal_all(&cluster_processes, libc::SIGCONT);
    eventually("SERVING again once thawed", || async {
        server.health().await == ServingStatus::Serving
    })
    .await;
    // Served again without a restart; the hold nobody was told about (if its batch
    // committed after the thaw) is given back.
    checkout
        .create_hold(hold_within(&product.id, Duration::from_secs(10)))
        .await
        .expect("holds are served again");
    eventually("only the answered hold to stay reserved", || {
        let (checkout, id) = (server.checkout(), product.id.clone());
        async move {
            let shown = checkout
                .await
                .get_product(GetProductRequest { product_id: id })
                .await;
            shown.is_ok_and(|product| product.into_inner().reserved == 1)
        }
    })
    .await;
    server.assert_consistent().await;
    server.stop().await.unwrap();
    cluster.stop().await.unwrap();
}
