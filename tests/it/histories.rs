//! Random histories (proptest): rounds of concurrent CreateHold (with and without keys and
//! buyers), ReleaseHold, ExtendHold, CreateOrder, CancelOrder, payment webhooks (aimed at
//! the order or at the hold, successes and failures, keys reused with another payload,
//! wrong amounts, late ones), waitlist joins that wait a while and leave (or are served, and
//! go on like any buyer), stock adjustments and pauses past the TTLs, against a real
//! server. After each history, once every TTL has run out and the reaper has ended what
//! nobody finished, the books must agree with every answer the server gave. A failure
//! shrinks to a minimal history.
//!
//! `cargo test --test it histories` runs 12 histories; `PROPTEST_CASES=500 cargo test
//! --release --test it histories` runs more.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use flashsale::grpc::pb::handle_payment_webhook_request::Target;
use flashsale::grpc::pb::{
    self, AdjustStockRequest, AuditInventoryRequest, CancelOrderRequest, CreateHoldRequest,
    CreateOrderRequest, ExtendHoldRequest, HoldStatus, JoinWaitlistRequest, OrderStatus,
    ReleaseHoldRequest, WebhookOutcome, waitlist_update::Update,
};
use proptest::prelude::*;
use tonic::Code;

use crate::support::{
    Checkout, TestServer, count, eventually, failure, get_hold, get_order, get_product, success,
    test_config,
};

/// Units the product starts with: few, so holds run out and adjustments matter.
const STOCK: i64 = 3;
/// The product's price.
const PRICE: i64 = 100;
/// Hold TTL and payment deadline: short, so a pause outlives them.
const TTL: Duration = Duration::from_millis(800);

/// One call of a history. Holds and orders are named by their index among those the
/// server has granted so far (modulo their number); with none yet, an unknown id.
#[derive(Debug, Clone)]
enum Step {
    Hold {
        qty: i64,
        key: Option<u8>,
        buyer: Option<u8>,
    },
    Release(usize),
    Extend(usize),
    Order(usize),
    Cancel(usize),
    Pay {
        on_hold: bool,
        target: usize,
        success: bool,
        key: u8,
        right_amount: bool,
    },
    Adjust(i64),
    /// A JoinWaitlist that waits up to `stay` ms for its turn, then leaves.
    Join {
        qty: i64,
        buyer: Option<u8>,
        stay: u64,
    },
    /// A pause before the call that follows in its task: lets TTLs run out mid-history.
    Pause(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1..=3i64, proptest::option::of(0..4u8), proptest::option::of(0..3u8))
            .prop_map(|(qty, key, buyer)| Step::Hold { qty, key, buyer }),
        1 => any::<usize>().prop_map(Step::Release),
        1 => any::<usize>().prop_map(Step::Extend),
        3 => any::<usize>().prop_map(Step::Order),
        1 => any::<usize>().prop_map(Step::Cancel),
        3 => (any::<bool>(), any::<usize>(), any::<bool>(), 0..6u8, prop::bool::weighted(0.9))
            .prop_map(|(on_hold, target, success, key, right_amount)| Step::Pay {
                on_hold, target, success, key, right_amount,
            }),
        1 => (-3..=3i64).prop_map(Step::Adjust),
        3 => (1..=3i64, proptest::option::of(0..3u8), 0..1500u64)
            .prop_map(|(qty, buyer, stay)| Step::Join { qty, buyer, stay }),
        1 => (0..1200u64).prop_map(Step::Pause),
    ]
}

/// Rounds of steps; the steps of a round run at once.
fn history() -> impl Strategy<Value = Vec<Vec<Step>>> {
    prop::collection::vec(prop::collection::vec(step(), 1..6), 1..7)
}

/// Histories per run: `PROPTEST_CASES`, 12 by default.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(12)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_history_leaves_books_that_agree_with_every_answer(rounds in history()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(rounds));
    }
}

/// What the server answered during a history.
#[derive(Default)]
struct Answers {
    /// Holds granted, with their units.
    holds: Vec<(String, i64)>,
    /// Holds the waitlist served, as the waiters received them.
    served: Vec<String>,
    /// Orders created, with their hold.
    orders: Vec<(String, String)>,
    /// Every order id CreateOrder answered for a hold.
    orders_of_hold: HashMap<String, HashSet<String>>,
    /// Deliveries answered APPLIED (key, success), by the order they applied to.
    applied: HashMap<String, Vec<(String, bool)>>,
    /// Keys answered REFUND_REQUIRED.
    refunds: HashSet<String>,
    /// Units added or withdrawn by adjustments that succeeded.
    adjusted: i64,
}

/// One answer, as the history records it.
enum Outcome {
    Held(pb::Hold),
    Served(pb::Hold),
    Ordered(String, pb::Order),
    Delivered(String, bool, pb::HandlePaymentWebhookResponse),
    Adjusted(i64),
    Nothing,
}

async fn run(rounds: Vec<Vec<Step>>) {
    let db = crate::support::TestDb::new().await;
    let mut config = test_config(&db.url);
    config.hold_ttl = TTL;
    config.payment_ttl = TTL;
    config.reaper_interval = Duration::from_millis(50);
    let server = TestServer::spawn(config, db).await;
    server.wait_serving().await;
    let product = server.product("drop", PRICE, STOCK).await;
    let checkout = server.checkout().await;
    let mut admin = server.admin().await;
    let mut answers = Answers::default();

    for round in rounds {
        let calls = round.into_iter().map(|step| {
            let (checkout, admin) = (checkout.clone(), admin.clone());
            let (holds, orders) = (answers.holds.clone(), answers.orders.clone());
            let product_id = product.id.clone();
            async move { call(step, checkout, admin, &product_id, &holds, &orders).await }
        });
        for outcome in futures::future::join_all(calls).await {
            record(&mut answers, outcome);
        }
    }

    // Every TTL runs out; the reaper ends whatever nobody finished; the waiters have left.
    tokio::time::sleep(TTL).await;
    let mut reader = checkout.clone();
    eventually("every hold and order to end, and the line to empty", || {
        let (mut reader, answers_holds, answers_orders, product_id) = (
            reader.clone(),
            answers.holds.clone(),
            answers.orders.clone(),
            product.id.clone(),
        );
        async move {
            let shown = get_product(&mut reader, &product_id).await;
            if shown.reserved != 0 || shown.waiting != 0 {
                return false;
            }
            for (id, _) in &answers_holds {
                if get_hold(&mut reader, id).await.status() == HoldStatus::Active {
                    return false;
                }
            }
            for (id, _) in &answers_orders {
                if get_order(&mut reader, id).await.status() == OrderStatus::Pending {
                    return false;
                }
            }
            true
        }
    })
    .await;
    check(&server, &mut reader, &mut admin, &product.id, &answers).await;
}

/// Makes one step's call; panics on an answer no history may get.
async fn call(
    step: Step,
    mut checkout: Checkout,
    mut admin: crate::support::Admin,
    product_id: &str,
    holds: &[(String, i64)],
    orders: &[(String, String)],
) -> Outcome {
    let unknown = || uuid::Uuid::now_v7().to_string();
    let hold = |index: usize| match holds.len() {
        0 => (unknown(), 1),
        len => holds[index % len].clone(),
    };
    let order = |index: usize| match orders.len() {
        0 => (unknown(), 1),
        len => {
            let (order_id, hold_id) = &orders[index % len];
            let qty = holds
                .iter()
                .find(|(id, _)| id == hold_id)
                .map_or(1, |(_, qty)| *qty);
            (order_id.clone(), qty)
        }
    };
    let answer = match step {
        Step::Hold { qty, key, buyer } => checkout
            .create_hold(CreateHoldRequest {
                product_id: product_id.into(),
                qty,
                client_request_id: key.map(|k| format!("cart-{k}")).unwrap_or_default(),
                buyer_id: buyer.map(|b| format!("buyer-{b}")).unwrap_or_default(),
            })
            .await
            .map(|answer| Outcome::Held(answer.into_inner())),
        Step::Release(index) => checkout
            .release_hold(ReleaseHoldRequest {
                hold_id: hold(index).0,
            })
            .await
            .map(|_| Outcome::Nothing),
        Step::Extend(index) => checkout
            .extend_hold(ExtendHoldRequest {
                hold_id: hold(index).0,
            })
            .await
            .map(|_| Outcome::Nothing),
        Step::Order(index) => {
            let hold_id = hold(index).0;
            checkout
                .create_order(CreateOrderRequest {
                    hold_id: hold_id.clone(),
                })
                .await
                .map(|answer| Outcome::Ordered(hold_id, answer.into_inner()))
        }
        Step::Cancel(index) => checkout
            .cancel_order(CancelOrderRequest {
                order_id: order(index).0,
            })
            .await
            .map(|_| Outcome::Nothing),
        Step::Pay {
            on_hold,
            target,
            success: succeeded,
            key,
            right_amount,
        } => {
            let (target, qty) = if on_hold {
                let (hold_id, qty) = hold(target);
                (Target::HoldId(hold_id), qty)
            } else {
                let (order_id, qty) = order(target);
                (Target::OrderId(order_id), qty)
            };
            let amount = qty * PRICE + if right_amount { 0 } else { 1 };
            let key = format!("evt-{key}");
            let webhook = if succeeded {
                success(&key, target, amount)
            } else {
                failure(&key, target, "declined")
            };
            checkout
                .handle_payment_webhook(webhook)
                .await
                .map(|answer| Outcome::Delivered(key, succeeded, answer.into_inner()))
        }
        Step::Adjust(delta) => admin
            .adjust_stock(AdjustStockRequest {
                request_id: String::new(),
                product_id: product_id.into(),
                delta,
            })
            .await
            .map(|_| Outcome::Adjusted(delta)),
        Step::Join { qty, buyer, stay } => {
            let join = JoinWaitlistRequest {
                product_id: product_id.into(),
                qty,
                buyer_id: buyer.map(|b| format!("buyer-{b}")).unwrap_or_default(),
            };
            wait_in_line(checkout, join, Duration::from_millis(stay)).await
        }
        Step::Pause(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Outcome::Nothing)
        }
    };
    answer.unwrap_or_else(|status| {
        assert!(
            matches!(
                status.code(),
                Code::FailedPrecondition
                    | Code::NotFound
                    | Code::AlreadyExists
                    | Code::InvalidArgument
                    | Code::ResourceExhausted
            ),
            "a refusal no history may get: {status:?}"
        );
        Outcome::Nothing
    })
}

/// Waits in line until served or `stay` has passed, then leaves (drops the stream).
async fn wait_in_line(
    mut checkout: Checkout,
    join: JoinWaitlistRequest,
    stay: Duration,
) -> Result<Outcome, tonic::Status> {
    let mut line = checkout.join_waitlist(join).await?.into_inner();
    let served = async {
        loop {
            match line.message().await?.and_then(|update| update.update) {
                Some(Update::Hold(hold)) => return Ok(Outcome::Served(hold)),
                Some(Update::Position(_)) => continue,
                None => panic!("the line ended without a hold or a status"),
            }
        }
    };
    tokio::time::timeout(stay, served)
        .await
        .unwrap_or(Ok(Outcome::Nothing))
}

/// Adds one answer to the record.
fn record(answers: &mut Answers, outcome: Outcome) {
    match outcome {
        Outcome::Held(hold) => {
            if !answers.holds.iter().any(|(id, _)| *id == hold.hold_id) {
                answers.holds.push((hold.hold_id, hold.qty));
            }
        }
        Outcome::Served(hold) => {
            answers.served.push(hold.hold_id.clone());
            answers.holds.push((hold.hold_id, hold.qty));
        }
        Outcome::Ordered(hold_id, order) => {
            answers
                .orders_of_hold
                .entry(hold_id.clone())
                .or_default()
                .insert(order.order_id.clone());
            if !answers.orders.iter().any(|(id, _)| *id == order.order_id) {
                answers.orders.push((order.order_id, hold_id));
            }
        }
        Outcome::Delivered(key, succeeded, receipt) => match receipt.outcome() {
            WebhookOutcome::Applied => answers
                .applied
                .entry(receipt.order_id.clone())
                .or_default()
                .push((key, succeeded)),
            WebhookOutcome::RefundRequired => {
                answers.refunds.insert(key);
            }
            _ => {}
        },
        Outcome::Adjusted(delta) => answers.adjusted += delta,
        Outcome::Nothing => {}
    }
}

/// The books against the answers, once nothing is active or pending.
async fn check(
    server: &TestServer,
    reader: &mut Checkout,
    admin: &mut crate::support::Admin,
    product_id: &str,
    answers: &Answers,
) {
    // One hold, at most one order.
    for (hold_id, orders) in &answers.orders_of_hold {
        assert_eq!(orders.len(), 1, "hold {hold_id} got orders {orders:?}");
    }
    // A hold a waiter received was made for that one waiter.
    for hold_id in &answers.served {
        let waiters = format!(
            "SELECT count(*) AS count FROM waiters WHERE status = 'served' AND hold_id = '{hold_id}'"
        );
        assert_eq!(
            count(&server.db.url, &waiters).await,
            1,
            "waiters served {hold_id}"
        );
    }
    // One order, at most one payment applied.
    for (order_id, keys) in &answers.applied {
        assert_eq!(keys.len(), 1, "order {order_id} applied by {keys:?}");
    }
    // An order a delivery was told it settled ended as that delivery said; sold is exactly
    // the paid orders' units; nothing stays reserved.
    let mut sold = 0;
    for (order_id, _) in &answers.orders {
        let order = get_order(reader, order_id).await;
        if let Some([(key, succeeded)]) = answers.applied.get(order_id).map(Vec::as_slice) {
            let expected = if *succeeded {
                OrderStatus::Paid
            } else {
                OrderStatus::Cancelled
            };
            assert_eq!(order.status(), expected, "order {order_id} after {key}");
        }
        if order.status() == OrderStatus::Paid {
            sold += order.qty;
        }
    }
    let shown = get_product(reader, product_id).await;
    assert_eq!(shown.stock_total, STOCK + answers.adjusted, "stock total");
    assert_eq!(shown.reserved, 0, "units still reserved");
    assert_eq!(shown.sold, sold, "sold against the paid orders");
    assert!(shown.available >= 0);
    // Every success that bought nothing is a refund owed (some said so when answered).
    let audit = admin
        .audit_inventory(AuditInventoryRequest {
            product_ids: vec![],
        })
        .await
        .expect("audit")
        .into_inner();
    assert!(audit.consistent, "{audit:#?}");
    assert!(
        audit.refunds_owed >= answers.refunds.len() as i64,
        "{} refunds owed, {} answered",
        audit.refunds_owed,
        answers.refunds.len()
    );
    server.assert_consistent().await;
}
