//! Coalesced settlements: a payment commits without waiting for its product's row, its
//! counter movement is folded into the product together with the others that arrived
//! meanwhile, and it answers only once its counters show it. Movements nobody folded are
//! folded by the reaper; the audit and withdrawals count them while they wait.

use std::time::Duration;

use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::grpc::pb::{
    self as pb, AdjustStockRequest, HoldStatus, OrderStatus, WebhookOutcome,
};
use uuid::Uuid;

use crate::support::{
    Counters, TestServer, assert_counters, assert_counters_shown, decline, eventually, get_hold,
    get_order, get_product, hold, pay, pending_order, try_release,
};

/// Takes the product's row lock in a transaction of its own, as a long hold batch would;
/// the lock is held until the connection commits.
async fn lock_product_row(server: &TestServer, product_id: &str) -> AsyncPgConnection {
    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    diesel::sql_query("BEGIN").execute(&mut conn).await.unwrap();
    diesel::sql_query("SELECT 1 FROM products WHERE id = $1 FOR NO KEY UPDATE")
        .bind::<SqlUuid, _>(Uuid::parse_str(product_id).unwrap())
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

#[tokio::test]
async fn payments_settle_without_the_product_row_and_move_its_counters_in_one_fold() {
    let server = TestServer::start().await;
    let product = server.product("console", 500, 50).await;
    let mut checkout = server.checkout().await;
    let mut orders = Vec::new();
    for _ in 0..20 {
        orders.push(pending_order(&mut checkout, &product.id, 1).await);
    }
    let before = assert_counters(&server, &product, Counters::stock(50).reserved(20).sold(0)).await;

    let mut row_lock = lock_product_row(&server, &product.id).await;
    let mut deliveries = Vec::new();
    for (index, pending) in orders.iter().enumerate() {
        let mut checkout = server.checkout().await;
        let (pending, key) = (pending.clone(), format!("evt-{index}"));
        deliveries.push(tokio::spawn(async move {
            if index % 2 == 0 {
                pay(&mut checkout, &pending, &key).await
            } else {
                decline(&mut checkout, &pending, &key, "declined").await
            }
        }));
    }
    // Every order settles while the product's row stays locked...
    for pending in &orders {
        eventually("the order settles while its product is locked", || {
            let (mut checkout, id) = (checkout.clone(), pending.order_id.clone());
            async move { get_order(&mut checkout, &id).await.status != OrderStatus::Pending as i32 }
        })
        .await;
    }
    // ...the audit already counts the settled units, though the row has not moved...
    let audit = server.assert_consistent().await;
    let stored = audit.products[0].stored.expect("stored counters");
    assert_counters_shown(&stored, Counters::stock(50).reserved(0).sold(10));
    // ...and no payment answers before its product's counters show it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        deliveries.iter().all(|delivery| !delivery.is_finished()),
        "a payment answered before its units moved"
    );

    diesel::sql_query("COMMIT")
        .execute(&mut row_lock)
        .await
        .unwrap();
    for delivery in deliveries {
        let receipt = delivery.await.unwrap();
        assert_eq!(receipt.outcome, WebhookOutcome::Applied as i32);
    }
    let after = assert_counters(&server, &product, Counters::stock(50).reserved(0).sold(10)).await;
    assert_eq!(
        after.version,
        before.version + 1,
        "the 20 settlements moved the counters in one fold"
    );
    server.assert_consistent().await;
}

#[tokio::test]
async fn a_release_commits_without_the_product_row_and_answers_once_its_units_are_back() {
    let server = TestServer::start().await;
    let product = server.product("drone", 900, 5).await;
    let mut checkout = server.checkout().await;
    let held = hold(&mut checkout, &product.id, 3).await;

    let mut row_lock = lock_product_row(&server, &product.id).await;
    let release = {
        let mut checkout = checkout.clone();
        let hold_id = held.hold_id.clone();
        tokio::spawn(async move { try_release(&mut checkout, &hold_id).await })
    };
    eventually("the hold is released while its product is locked", || {
        let (mut checkout, id) = (checkout.clone(), held.hold_id.clone());
        async move { get_hold(&mut checkout, &id).await.status == HoldStatus::Released as i32 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !release.is_finished(),
        "the release answered before its units were back"
    );

    diesel::sql_query("COMMIT")
        .execute(&mut row_lock)
        .await
        .unwrap();
    let released = release.await.unwrap().expect("release");
    assert_eq!(released.status, HoldStatus::Released as i32);
    assert_counters(&server, &product, Counters::stock(5).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

/// Settles an order the way a server that died right after its settlement's commit leaves
/// it: order cancelled (payment failed), counter movement recorded, nothing folded.
async fn settle_without_folding(server: &TestServer, order: &pb::Order) {
    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    let (order_id, hold_id, product_id) = (
        Uuid::parse_str(&order.order_id).unwrap(),
        Uuid::parse_str(&order.hold_id).unwrap(),
        Uuid::parse_str(&order.product_id).unwrap(),
    );
    let qty = order.qty;
    conn.transaction(async |conn| {
        diesel::sql_query(
            "UPDATE orders SET status = 'cancelled', cancel_reason = 'payment_failed' WHERE id = $1",
        )
            .bind::<SqlUuid, _>(order_id)
            .execute(conn)
            .await?;
        diesel::sql_query(format!(
            "INSERT INTO stock_movements (product_id, hold_id, reserved_delta, sold_delta) \
             VALUES ($1, $2, {}, 0)",
            -qty
        ))
        .bind::<SqlUuid, _>(product_id)
        .bind::<SqlUuid, _>(hold_id)
        .execute(conn)
        .await?;
        diesel::QueryResult::Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_reaper_folds_movements_a_dead_server_left() {
    let server = TestServer::start().await;
    let product = server.product("lamp", 100, 10).await;
    let mut checkout = server.checkout().await;
    let pending = pending_order(&mut checkout, &product.id, 4).await;
    settle_without_folding(&server, &pending).await;
    server.assert_consistent().await;

    eventually("the reaper folds the stranded movement", || {
        let (mut checkout, id) = (checkout.clone(), product.id.clone());
        async move { get_product(&mut checkout, &id).await.reserved == 0 }
    })
    .await;
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test]
async fn a_withdrawal_counts_units_a_settlement_freed_but_nobody_folded_yet() {
    // No reaper sweep during the test: only the withdrawal can fold the movement.
    let server =
        TestServer::start_with(|config| config.reaper_interval = Duration::from_secs(3600)).await;
    let product = server.product("kettle", 100, 10).await;
    let mut checkout = server.checkout().await;
    let pending = pending_order(&mut checkout, &product.id, 10).await;
    settle_without_folding(&server, &pending).await;
    // Nobody folded the movement: the product still shows every unit reserved.
    assert_counters(&server, &product, Counters::stock(10).reserved(10).sold(0)).await;

    let withdrawn = server
        .admin()
        .await
        .adjust_stock(AdjustStockRequest {
            request_id: String::new(),
            product_id: product.id.clone(),
            delta: -10,
        })
        .await
        .expect("the freed units can be withdrawn")
        .into_inner();
    assert_counters_shown(&withdrawn, Counters::stock(0).reserved(0).sold(0));
    server.assert_consistent().await;
}

#[tokio::test]
async fn concurrent_folds_apply_each_movement_once() {
    // No reaper sweep: only the two folds below move the counters.
    let server =
        TestServer::start_with(|config| config.reaper_interval = Duration::from_secs(3600)).await;
    let product = server.product("speaker", 100, 12).await;
    let mut checkout = server.checkout().await;
    for _ in 0..3 {
        let pending = pending_order(&mut checkout, &product.id, 4).await;
        settle_without_folding(&server, &pending).await;
    }
    assert_counters(&server, &product, Counters::stock(12).reserved(12).sold(0)).await;

    // Both folds queue behind the row lock and then race for the same three movements.
    let mut row_lock = lock_product_row(&server, &product.id).await;
    let folds: Vec<_> = (0..2)
        .map(|_| {
            let (url, id) = (server.db.url.clone(), Uuid::parse_str(&product.id).unwrap());
            tokio::spawn(async move {
                #[derive(diesel::QueryableByName)]
                struct Folded {
                    #[diesel(sql_type = diesel::sql_types::BigInt)]
                    folded: i64,
                }
                let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
                diesel::sql_query("SELECT fold_stock_movements(ARRAY[$1]) AS folded")
                    .bind::<SqlUuid, _>(id)
                    .get_result::<Folded>(&mut conn)
                    .await
                    .unwrap()
                    .folded
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    diesel::sql_query("COMMIT")
        .execute(&mut row_lock)
        .await
        .unwrap();
    let mut folded = 0;
    for fold in folds {
        folded += fold.await.unwrap();
    }
    assert_eq!(folded, 3, "each movement folded by exactly one of the two");
    assert_counters(&server, &product, Counters::stock(12).reserved(0).sold(0)).await;
    server.assert_consistent().await;
}
