//! The whole path once: product, hold, order, payment, audit.

use flashsale::grpc::pb::{HoldStatus, OrderStatus, WebhookOutcome};

use crate::support::{
    Counters, TestServer, assert_counters, deliver, hold, on_order, order, success,
};

#[tokio::test(flavor = "multi_thread")]
async fn hold_order_pay_sells_the_units() {
    let server = TestServer::start().await;
    let product = server.product("sneaker", 12_900, 10).await;
    let mut checkout = server.checkout().await;

    let hold = hold(&mut checkout, &product.id, 2).await;
    assert_eq!(hold.status(), HoldStatus::Active);

    let order = order(&mut checkout, &hold.hold_id).await;
    assert_eq!(order.status(), OrderStatus::Pending);
    assert_eq!(order.total_cents, 25_800);

    let payment = success("evt_1", on_order(&order.order_id), order.total_cents);
    let paid = deliver(&mut checkout, payment).await;
    assert_eq!(paid.outcome(), WebhookOutcome::Applied);
    assert_eq!(paid.order_status(), OrderStatus::Paid);

    let after = assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(2)).await;
    assert!(after.version > product.version);
    server.assert_consistent().await;
    server.stop().await.unwrap();
}
