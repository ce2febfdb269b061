//! The fair waitlist: buyers are served in join order as units come back (release, expiry,
//! failed payment, added stock), before any new CreateHold; a waiter who leaves gives the
//! place up; the line spans server processes; withdrawals and ended sales turn it away.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::grpc::pb::{
    self, AdjustStockRequest, AuditInventoryRequest, JoinWaitlistRequest, StockCounters,
    WaitlistUpdate, WatchAvailabilityRequest, waitlist_update::Update,
};
use tonic::Code;
use tonic::codec::Streaming;

use crate::support::{
    Checkout, Counters, TestServer, assert_counters, assert_status, commit, count, decline,
    eventually, get_product, hold, lock_rows, order, reason, release, try_hold, waiting_on_locks,
};

/// A waiter's stream.
type Waiter = Streaming<WaitlistUpdate>;

/// Joins the line for `qty` units; the stream, whose first message was read.
async fn join(checkout: &mut Checkout, product_id: &str, qty: i64) -> (Waiter, Update) {
    let mut stream = checkout
        .join_waitlist(JoinWaitlistRequest {
            product_id: product_id.into(),
            qty,
            buyer_id: String::new(),
        })
        .await
        .expect("join the waitlist")
        .into_inner();
    let first = next(&mut stream).await;
    (stream, first)
}

/// The stream's next update (10 s at most).
async fn next(stream: &mut Waiter) -> Update {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an update within 10 s")
        .expect("the stream stays healthy")
        .expect("the stream goes on")
        .update
        .expect("an update")
}

/// Reads updates until the hold comes; fails on anything else but places.
async fn served(stream: &mut Waiter) -> pb::Hold {
    loop {
        match next(stream).await {
            Update::Hold(hold) => return hold,
            Update::Position(_) => continue,
        }
    }
}

/// Reads updates until the place is `place`.
async fn moved_to(stream: &mut Waiter, place: i64) {
    loop {
        match next(stream).await {
            Update::Position(position) if position == place => return,
            Update::Position(_) => continue,
            Update::Hold(hold) => panic!("served early: {hold:?}"),
        }
    }
}

/// CreateHold from outside the line must find nothing.
async fn assert_outsiders_refused(checkout: &mut Checkout, product_id: &str) {
    assert_status(
        try_hold(checkout, product_id, 1, None).await,
        Code::FailedPrecondition,
        "INSUFFICIENT_STOCK",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn waiters_are_served_in_join_order_as_units_come_back() {
    let server = TestServer::start_with(|config| config.hold_ttl = Duration::from_secs(2)).await;
    let product = server.product("drop", 100, 1).await;
    let mut checkout = server.checkout().await;
    let first_buyer = hold(&mut checkout, &product.id, 1).await;
    let mut line = Vec::new();
    for expected in 1..=4 {
        let (stream, first) = join(&mut server.checkout().await, &product.id, 1).await;
        assert_eq!(first, Update::Position(expected));
        line.push(stream);
    }
    assert_outsiders_refused(&mut checkout, &product.id).await;
    let watched = server
        .checkout()
        .await
        .watch_availability(WatchAvailabilityRequest {
            product_ids: vec![product.id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(watched.waiting, 4, "watchers see how many wait");

    // A release serves the first in line; the others move up.
    release(&mut checkout, &first_buyer.hold_id).await;
    let a = served(&mut line[0]).await;
    assert_eq!(a.status(), pb::HoldStatus::Active);
    moved_to(&mut line[1], 1).await;
    assert_outsiders_refused(&mut checkout, &product.id).await;

    // An expiry serves the next.
    let b = served(&mut line[1]).await;
    assert_ne!(a.hold_id, b.hold_id);
    assert_outsiders_refused(&mut checkout, &product.id).await;

    // A failed payment serves the next.
    let b_order = order(&mut checkout, &b.hold_id).await;
    decline(&mut checkout, &b_order, "evt-b", "card declined").await;
    let c = served(&mut line[2]).await;
    assert_outsiders_refused(&mut checkout, &product.id).await;

    // Stock added serves the last.
    server
        .admin()
        .await
        .adjust_stock(AdjustStockRequest {
            product_id: product.id.clone(),
            delta: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let d = served(&mut line[3]).await;
    assert_eq!(d.qty, 1);
    assert_counters(&server, &product, Counters::stock(2).reserved(2).sold(0)).await;
    drop(c);
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiter_who_leaves_gives_the_place_up() {
    let server = TestServer::start().await;
    let product = server.product("drop", 100, 1).await;
    let mut checkout = server.checkout().await;
    let taken = hold(&mut checkout, &product.id, 1).await;
    let (leaving, _) = join(&mut server.checkout().await, &product.id, 1).await;
    let (mut staying, first) = join(&mut server.checkout().await, &product.id, 1).await;
    assert_eq!(first, Update::Position(2));

    drop(leaving);
    moved_to(&mut staying, 1).await;
    release(&mut checkout, &taken.hold_id).await;

    served(&mut staying).await;
    assert_counters(&server, &product, Counters::stock(1).reserved(1).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_arriving_as_the_waiter_leaves_goes_to_the_next_in_line() {
    let server = TestServer::start().await;
    let product = server.product("drop", 100, 1).await;
    let mut checkout = server.checkout().await;
    let taken = hold(&mut checkout, &product.id, 1).await;
    let (leaving, _) = join(&mut server.checkout().await, &product.id, 1).await;
    let (mut staying, first) = join(&mut server.checkout().await, &product.id, 1).await;
    assert_eq!(first, Update::Position(2));

    // The unit comes back while the product's row is taken: the fold that would serve the
    // first in line waits for it, and the first in line leaves meanwhile. Then both meet.
    let mut lock = lock_rows(&server, "products", std::slice::from_ref(&product.id)).await;
    let released = {
        let (mut checkout, id) = (checkout.clone(), taken.hold_id.clone());
        tokio::spawn(async move { release(&mut checkout, &id).await })
    };
    eventually("the fold to wait for the product", || {
        waiting_on_locks(&server.db.url)
    })
    .await;
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(200)).await;
    commit(&mut lock).await;
    released.await.unwrap();

    // Whether the unit reached the leaver first (and came back, unheard) or not, the next in
    // line gets it, and nothing else stays held or waiting.
    served(&mut staying).await;
    eventually("only the served waiter's hold to stay reserved", || {
        let (mut checkout, id) = (checkout.clone(), product.id.clone());
        async move {
            let shown = get_product(&mut checkout, &id).await;
            shown.reserved == 1 && shown.waiting == 0
        }
    })
    .await;
    assert_counters(&server, &product, Counters::stock(1).reserved(1).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_spread_over_two_processes_is_served_in_join_order() {
    let server = TestServer::start().await;
    let sibling = server.start_sibling().await;
    let product = server.product("drop", 100, 3).await;
    let mut checkout = server.checkout().await;
    let mut taken = Vec::new();
    for _ in 0..3 {
        taken.push(hold(&mut checkout, &product.id, 1).await);
    }
    let (mut a, _) = join(&mut server.checkout().await, &product.id, 1).await;
    let (mut b, first) = join(&mut sibling.checkout().await, &product.id, 1).await;
    assert_eq!(first, Update::Position(2));
    let (mut c, first) = join(&mut server.checkout().await, &product.id, 1).await;
    assert_eq!(first, Update::Position(3));

    release(&mut checkout, &taken[0].hold_id).await;
    served(&mut a).await;
    release(&mut sibling.checkout().await, &taken[1].hold_id).await;
    served(&mut b).await;
    release(&mut checkout, &taken[2].hold_id).await;
    served(&mut c).await;

    assert_counters(&server, &product, Counters::stock(3).reserved(3).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_stops_takes_its_waiters_out_of_line_before_it_goes() {
    let server = TestServer::start().await;
    let stopping = server.start_sibling().await;
    let product = server.product("drop", 100, 1).await;
    let mut checkout = server.checkout().await;
    let taken = hold(&mut checkout, &product.id, 1).await;
    let (mut gone, _) = join(&mut stopping.checkout().await, &product.id, 1).await;
    let (mut alive, first) = join(&mut server.checkout().await, &product.id, 1).await;
    assert_eq!(first, Update::Position(2));

    // Once stop returns, its waiter is told and out of line, though the database may not
    // yet have seen the process's session end: a unit that comes back at once goes to the
    // next waiter, not to a hold nobody receives.
    stopping.stop().await.unwrap();
    let told = gone.message().await.expect_err("told it is shutting down");
    assert_eq!(reason(&told), "SHUTTING_DOWN", "{told:?}");
    let waiting = "SELECT count(*) AS count FROM waiters WHERE status = 'waiting'";
    assert_eq!(count(&server.db.url, waiting).await, 1, "still in line");
    release(&mut checkout, &taken.hold_id).await;

    served(&mut alive).await;
    assert_counters(&server, &product, Counters::stock(1).reserved(1).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn withdrawn_stock_and_an_ended_sale_turn_the_line_away() {
    let server = TestServer::start().await;
    let product = server.product("drop", 100, 2).await;
    let mut checkout = server.checkout().await;
    hold(&mut checkout, &product.id, 1).await;
    hold(&mut checkout, &product.id, 1).await;
    let (mut waiter, _) = join(&mut server.checkout().await, &product.id, 1).await;

    server
        .admin()
        .await
        .adjust_stock(AdjustStockRequest {
            product_id: product.id.clone(),
            delta: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    served(&mut waiter).await;

    let (mut withdrawn, _) = join(&mut server.checkout().await, &product.id, 3).await;
    server
        .admin()
        .await
        .adjust_stock(AdjustStockRequest {
            product_id: product.id.clone(),
            delta: -1,
            ..Default::default()
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), withdrawn.message())
        .await
        .expect("an answer")
        .expect_err("turned away");
    assert_eq!(ended.code(), Code::FailedPrecondition);
    assert_eq!(reason(&ended), "STOCK_WITHDRAWN");

    // A sale that ends turns its line away too.
    let (mut late, _) = join(&mut server.checkout().await, &product.id, 2).await;
    let ends = prost_types::Timestamp::from(std::time::SystemTime::now() + Duration::from_secs(1));
    server
        .admin()
        .await
        .update_product(pb::UpdateProductRequest {
            product: Some(pb::Product {
                id: product.id.clone(),
                sale_ends_at: Some(ends),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["sale_ends_at".into()],
            }),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), late.message())
        .await
        .expect("an answer")
        .expect_err("turned away");
    assert_eq!(reason(&ended), "SALE_ENDED");
    eventually("nobody waits", || {
        let mut checkout = checkout.clone();
        let id = product.id.clone();
        async move {
            crate::support::get_product(&mut checkout, &id)
                .await
                .waiting
                == 0
        }
    })
    .await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_buyer_limit_applies_to_the_line_too() {
    let server = TestServer::start().await;
    let product = server
        .admin()
        .await
        .create_product(pb::CreateProductRequest {
            name: "limited".into(),
            price_cents: 100,
            stock_total: 1,
            max_per_buyer: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut checkout = server.checkout().await;
    checkout
        .create_hold(pb::CreateHoldRequest {
            product_id: product.id.clone(),
            qty: 1,
            buyer_id: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let join_as = |buyer: &str| JoinWaitlistRequest {
        product_id: product.id.clone(),
        qty: 1,
        buyer_id: buyer.into(),
    };

    let status = checkout
        .join_waitlist(join_as("alice"))
        .await
        .map(drop)
        .expect_err("alice is at her limit");
    assert_eq!(reason(&status), "BUYER_LIMIT_EXCEEDED");
    crate::support::assert_invalid(
        checkout.join_waitlist(join_as("")).await.map(drop),
        "buyer_id",
    );
    let (_bob, first) = {
        let mut stream = checkout
            .join_waitlist(join_as("bob"))
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut stream).await;
        (stream, first)
    };
    assert_eq!(first, Update::Position(1));
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiter_asking_more_than_the_whole_stock_is_refused_and_blocks_nobody() {
    let server = TestServer::start().await;
    let product = server.product("drop", 100, 2).await;
    let mut checkout = server.checkout().await;
    let taken = hold(&mut checkout, &product.id, 2).await;

    let refused = checkout
        .join_waitlist(JoinWaitlistRequest {
            product_id: product.id.clone(),
            qty: 3,
            buyer_id: String::new(),
        })
        .await
        .map(drop)
        .expect_err("3 of 2 can never be served");
    assert_eq!(reason(&refused), "INSUFFICIENT_STOCK");
    let (mut next_in_line, first) = join(&mut checkout, &product.id, 1).await;
    assert_eq!(first, Update::Position(1));
    release(&mut checkout, &taken.hold_id).await;
    served(&mut next_in_line).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_recounts_the_line_from_its_waiters() {
    let server = TestServer::start().await;
    let product = server.product("drop", 100, 3).await;
    let mut checkout = server.checkout().await;
    hold(&mut checkout, &product.id, 3).await;
    let (_first, _) = join(&mut server.checkout().await, &product.id, 2).await;
    let (_second, _) = join(&mut server.checkout().await, &product.id, 1).await;
    let line = |waiting, owed| StockCounters {
        stock_total: 3,
        reserved: 3,
        waiting,
        owed,
        ..StockCounters::default()
    };

    let audit = server.assert_consistent().await;
    assert_eq!(audit.products[0].recomputed, Some(line(2, 3)));

    // The stored line drifts behind the server's back: the audit says so.
    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    diesel::sql_query(format!(
        "UPDATE products SET owed = owed - 1 WHERE id = '{}'",
        product.id
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let audit = server
        .admin()
        .await
        .audit_inventory(AuditInventoryRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!audit.consistent, "{audit:#?}");
    assert_eq!(audit.products[0].stored, Some(line(2, 2)));
    assert_eq!(audit.products[0].recomputed, Some(line(2, 3)));
}
