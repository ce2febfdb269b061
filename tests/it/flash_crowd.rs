//! The flash crowd: hundreds of buyers over many connections at once never oversell, every
//! loser gets INSUFFICIENT_STOCK and nothing else, and buyers who go on to order and pay (or
//! fail to) leave the books balanced.

use std::collections::HashSet;
use std::sync::Arc;

use flashsale::grpc::pb::{OrderStatus, WebhookOutcome};
use tokio::sync::Barrier;
use tonic::Code;

use crate::support::{
    Checkout, Counters, TestServer, assert_counters, failure, on_order, reason, success,
    try_deliver, try_hold, try_order, with_amount,
};

/// `count` checkout clients, each on its own HTTP/2 connection.
async fn connections(server: &TestServer, count: usize) -> Vec<Checkout> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(server.checkout().await);
    }
    clients
}

/// Whether a refused CreateHold is the expected "sold out" answer.
fn is_sold_out(status: &tonic::Status) -> bool {
    status.code() == Code::FailedPrecondition && reason(status) == "INSUFFICIENT_STOCK"
}

#[tokio::test(flavor = "multi_thread")]
async fn flash_crowd_of_500_buyers_on_10_connections_holds_exactly_the_stock() {
    const BUYERS: usize = 500;
    const CONNECTIONS: usize = 10;
    let server = TestServer::start().await;
    let product = server.product("limited sneaker", 19_900, 100).await;
    let clients = connections(&server, CONNECTIONS).await;
    let start = Arc::new(Barrier::new(BUYERS));

    let mut buyers = Vec::with_capacity(BUYERS);
    for i in 0..BUYERS {
        let mut client = clients[i % CONNECTIONS].clone();
        let (product_id, start) = (product.id.clone(), start.clone());
        buyers.push(tokio::spawn(async move {
            start.wait().await;
            try_hold(&mut client, &product_id, 1, None).await
        }));
    }
    let (mut holds, mut sold_out, mut unexpected) = (Vec::new(), 0, Vec::new());
    for buyer in buyers {
        match buyer.await.unwrap() {
            Ok(hold) => holds.push(hold),
            Err(status) if is_sold_out(&status) => sold_out += 1,
            Err(status) => unexpected.push(status),
        }
    }

    assert!(unexpected.is_empty(), "unexpected errors: {unexpected:#?}");
    assert_eq!((holds.len(), sold_out), (100, 400));
    let ids: HashSet<&str> = holds.iter().map(|h| h.hold_id.as_str()).collect();
    assert_eq!(ids.len(), 100, "every winner got a hold of its own");
    assert!(
        holds
            .iter()
            .all(|h| h.qty == 1 && h.product_id == product.id)
    );
    assert_counters(
        &server,
        &product,
        Counters::stock(100).reserved(100).sold(0),
    )
    .await;
    server.assert_consistent().await;
}

/// How one buyer of the second crowd ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Buyer {
    /// Held, ordered and paid.
    Paid,
    /// Held and ordered, then the payment failed.
    Declined,
    /// Sold out at the moment of asking.
    TurnedAway,
}

/// One buyer: hold one unit, order it, then the provider reports success (`pays`) or failure.
async fn buy(
    mut checkout: Checkout,
    product_id: String,
    key: String,
    pays: bool,
) -> Result<Buyer, String> {
    let hold = match try_hold(&mut checkout, &product_id, 1, None).await {
        Ok(hold) => hold,
        Err(status) if is_sold_out(&status) => return Ok(Buyer::TurnedAway),
        Err(status) => return Err(format!("CreateHold: {status:?}")),
    };
    let order = try_order(&mut checkout, &hold.hold_id)
        .await
        .map_err(|status| format!("CreateOrder: {status:?}"))?;
    let webhook = if pays {
        success(&key, on_order(&order.order_id), order.total_cents)
    } else {
        failure(&key, on_order(&order.order_id), "card declined")
    };
    let receipt = try_deliver(&mut checkout, with_amount(webhook, order.total_cents))
        .await
        .map_err(|status| format!("webhook: {status:?}"))?;
    let expected = if pays {
        OrderStatus::Paid
    } else {
        OrderStatus::Cancelled
    };
    if receipt.outcome() != WebhookOutcome::Applied || receipt.order_status() != expected {
        return Err(format!("webhook answered {receipt:?}"));
    }
    Ok(if pays { Buyer::Paid } else { Buyer::Declined })
}

#[tokio::test(flavor = "multi_thread")]
async fn flash_crowd_that_orders_and_pays_keeps_the_books_balanced() {
    const BUYERS: usize = 200;
    const CONNECTIONS: usize = 8;
    let server = TestServer::start().await;
    let product = server.product("limited hoodie", 7_500, 50).await;
    let clients = connections(&server, CONNECTIONS).await;

    let mut buyers = Vec::with_capacity(BUYERS);
    for i in 0..BUYERS {
        buyers.push(tokio::spawn(buy(
            clients[i % CONNECTIONS].clone(),
            product.id.clone(),
            format!("evt-{i}"),
            i % 2 == 0,
        )));
    }
    let mut outcomes = Vec::with_capacity(BUYERS);
    let mut unexpected = Vec::new();
    for buyer in buyers {
        match buyer.await.unwrap() {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => unexpected.push(error),
        }
    }

    assert!(unexpected.is_empty(), "unexpected errors: {unexpected:#?}");
    let count = |kind: Buyer| outcomes.iter().filter(|o| **o == kind).count() as i64;
    let (paid, declined) = (count(Buyer::Paid), count(Buyer::Declined));
    // Nobody is turned away before 50 units are held or sold.
    assert!(paid + declined >= 50, "{paid} paid, {declined} declined");
    // Every order settled, and sold is exactly the successful payments.
    assert_counters(
        &server,
        &product,
        Counters::stock(50).reserved(0).sold(paid),
    )
    .await;
    server.assert_consistent().await;
}
