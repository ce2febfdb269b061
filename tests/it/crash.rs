//! A server process killed outright (SIGKILL) in the middle of a flash crowd, while another
//! process serves the same database, and started again: every hold, order and payment any
//! call was told about is there, each buyer's units are sold once, holds and orders whose
//! deadline passed while it was down end, the dead process's waiter is skipped, and the
//! books balance.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flashsale::grpc::pb::checkout_service_client::CheckoutServiceClient;
use flashsale::grpc::pb::{
    self, CreateHoldRequest, CreateOrderRequest, HoldStatus, JoinWaitlistRequest, OrderStatus,
    WebhookOutcome,
};
use tonic::Code;

use crate::support::{
    Checkout, Counters, ServerProcess, TestServer, assert_counters, eventually, get_hold,
    get_order, hold, on_order, pending_order, release, success,
};

/// Buyers in the crowd, each buying one unit.
const BUYERS: usize = 300;
/// Units on sale: enough for every buyer, the abandoned holds and the unpaid orders.
const STOCK: i64 = 400;
/// Payments acknowledged before the first process is killed.
const PAID_BEFORE_THE_KILL: usize = 100;
/// Between one buyer's arrival and the next: the crowd arrives over a few seconds, so the
/// kill and the restart fall in the middle of it.
const ARRIVALS: Duration = Duration::from_millis(5);

/// The server addresses buyers may call; a killed process's is replaced by its restart's.
pub(crate) type Fleet = Arc<Mutex<Vec<String>>>;

impl Acknowledged {
    /// Asserts each acknowledged hold was converted and each acknowledged order paid: the
    /// buyers were told of them, so they must be there, and finished.
    pub(crate) async fn assert_bought(&self, checkout: &mut Checkout) {
        for id in &self.holds {
            let hold = get_hold(checkout, id).await;
            assert_eq!(hold.status(), HoldStatus::Converted, "hold {id}");
        }
        for id in self.orders.iter().chain(&self.paid) {
            let order = get_order(checkout, id).await;
            assert_eq!(order.status(), OrderStatus::Paid, "order {id}");
        }
    }
}

/// Buyers arriving one after another, each buying one unit (see [`buy`]).
pub(crate) struct Crowd {
    /// Where they call; replace an address to send the retries elsewhere.
    pub(crate) fleet: Fleet,
    /// What they were told so far.
    pub(crate) acknowledged: Arc<Mutex<Acknowledged>>,
    /// One task per buyer.
    buyers: Vec<tokio::task::JoinHandle<()>>,
}

impl Crowd {
    /// `count` buyers of `product_id`, one every `arrivals`, calling `urls`, retrying what
    /// failed as `retry_on` allows.
    pub(crate) fn arrive(
        count: usize,
        arrivals: Duration,
        urls: Vec<String>,
        product_id: &str,
        retry_on: fn(&tonic::Status) -> bool,
    ) -> Crowd {
        let fleet: Fleet = Arc::new(Mutex::new(urls));
        let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
        let buyers = (0..count)
            .map(|buyer| {
                let (fleet, acknowledged) = (fleet.clone(), acknowledged.clone());
                let product_id = product_id.to_owned();
                tokio::spawn(async move {
                    tokio::time::sleep(arrivals * buyer as u32).await;
                    buy(buyer, &fleet, &acknowledged, &product_id, retry_on).await
                })
            })
            .collect();
        Crowd {
            fleet,
            acknowledged,
            buyers,
        }
    }

    /// Waits until `count` payments were acknowledged.
    pub(crate) async fn paid(&self, count: usize) {
        eventually("payments to be acknowledged", || {
            let acknowledged = self.acknowledged.clone();
            async move { acknowledged.lock().unwrap().paid.len() >= count }
        })
        .await;
    }

    /// Waits for every buyer; what they were told.
    pub(crate) async fn finish(self) -> Acknowledged {
        for buyer in self.buyers {
            buyer.await.unwrap();
        }
        std::mem::take(&mut *self.acknowledged.lock().unwrap())
    }
}

/// What the servers acknowledged, as the buyers heard it.
#[derive(Default)]
pub(crate) struct Acknowledged {
    /// Holds granted.
    pub(crate) holds: Vec<String>,
    /// Orders created.
    pub(crate) orders: Vec<String>,
    /// Orders whose payment was answered APPLIED or DUPLICATE.
    pub(crate) paid: Vec<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_killed_mid_crowd_loses_nothing_it_acknowledged() {
    let survivor = TestServer::start().await;
    let env = [
        ("FLASHSALE_HOLD_TTL", "3s"),
        ("FLASHSALE_PAYMENT_TTL", "3s"),
    ];
    let doomed = ServerProcess::start_with(&survivor.db.url, &env).await;
    let product = survivor.product("drop", 100, STOCK).await;

    // Holds nobody finishes and orders nobody pays, taken through the process about to
    // die: their deadlines pass while it is down.
    let mut abandoned = Vec::new();
    let mut unpaid = Vec::new();
    for _ in 0..4 {
        abandoned.push(hold(&mut doomed.checkout().await, &product.id, 1).await);
        unpaid.push(pending_order(&mut doomed.checkout().await, &product.id, 1).await);
    }
    // A waiter of the doomed process first in line for a sold-out product, one of the
    // survivor's behind it.
    let sold_out = survivor.product("sold out", 100, 1).await;
    let taken = hold(&mut survivor.checkout().await, &sold_out.id, 1).await;
    let dead_waiter = join(doomed.checkout().await, &sold_out.id).await;
    let mut live_waiter = join(survivor.checkout().await, &sold_out.id).await;

    let urls = vec![doomed.url.clone(), survivor.url()];
    let crowd = Crowd::arrive(BUYERS, ARRIVALS, urls, &product.id, cut_off);

    // Mid-crowd, the doomed process dies without a word, then a new one takes its place.
    crowd.paid(PAID_BEFORE_THE_KILL).await;
    let mut doomed = doomed;
    doomed.signal(libc::SIGKILL);
    doomed
        .exited_within(Duration::from_secs(10))
        .await
        .expect("killed");
    drop(dead_waiter);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = ServerProcess::start_with(&survivor.db.url, &env).await;
    crowd.fleet.lock().unwrap()[0] = restarted.url.clone();
    let acknowledged = crowd.finish().await;
    assert_eq!(
        acknowledged.paid.len(),
        BUYERS,
        "every buyer paid in the end"
    );
    let mut checkout = survivor.checkout().await;
    acknowledged.assert_bought(&mut checkout).await;
    for held in &abandoned {
        eventually("an abandoned hold to expire", || {
            let (mut checkout, id) = (checkout.clone(), held.hold_id.clone());
            async move { get_hold(&mut checkout, &id).await.status() == HoldStatus::Expired }
        })
        .await;
    }
    for order in &unpaid {
        eventually("an unpaid order to be cancelled at its deadline", || {
            let (mut checkout, id) = (checkout.clone(), order.order_id.clone());
            async move {
                let order = get_order(&mut checkout, &id).await;
                order.status() == OrderStatus::Cancelled && order.cancel_reason == "payment_timeout"
            }
        })
        .await;
    }
    assert_counters(
        &survivor,
        &product,
        Counters::stock(STOCK).reserved(0).sold(BUYERS as i64),
    )
    .await;

    // The dead process's waiter cannot take its turn: the unit goes to the next in line.
    release(&mut checkout, &taken.hold_id).await;
    let served = tokio::time::timeout(Duration::from_secs(10), live_waiter.message())
        .await
        .expect("the live waiter is served")
        .expect("a healthy stream")
        .expect("an update");
    assert!(
        matches!(served.update, Some(pb::waitlist_update::Update::Hold(_))),
        "{served:?}"
    );
    survivor.assert_consistent().await;
    restarted.stop().await;
}

/// One buyer: hold, order, pay, each retried (with the same keys, on the next process of
/// the fleet) when it failed as `retry_on` allows; records what was acknowledged.
async fn buy(
    buyer: usize,
    fleet: &Fleet,
    acknowledged: &Mutex<Acknowledged>,
    product_id: &str,
    retry_on: fn(&tonic::Status) -> bool,
) {
    let request = CreateHoldRequest {
        product_id: product_id.into(),
        qty: 1,
        client_request_id: format!("buyer-{buyer}"),
        ..Default::default()
    };
    let held = retried(fleet, buyer, retry_on, |mut checkout| {
        let request = request.clone();
        async move { checkout.create_hold(request).await }
    })
    .await;
    acknowledged
        .lock()
        .unwrap()
        .holds
        .push(held.hold_id.clone());
    let order = retried(fleet, buyer, retry_on, |mut checkout| {
        let hold_id = held.hold_id.clone();
        async move { checkout.create_order(CreateOrderRequest { hold_id }).await }
    })
    .await;
    acknowledged
        .lock()
        .unwrap()
        .orders
        .push(order.order_id.clone());
    let webhook = success(
        &format!("pay-{buyer}"),
        on_order(&order.order_id),
        order.total_cents,
    );
    let receipt = retried(fleet, buyer, retry_on, |mut checkout| {
        let webhook = webhook.clone();
        async move { checkout.handle_payment_webhook(webhook).await }
    })
    .await;
    assert!(
        matches!(
            receipt.outcome(),
            WebhookOutcome::Applied | WebhookOutcome::Duplicate
        ),
        "buyer {buyer}: {receipt:?}"
    );
    acknowledged.lock().unwrap().paid.push(order.order_id);
}

/// Calls `call` on the buyer's process, and on the next one whenever the call could not
/// reach a server or failed as `retry_on` allows; panics on any other refusal.
async fn retried<T, F, Fut>(
    fleet: &Fleet,
    buyer: usize,
    retry_on: fn(&tonic::Status) -> bool,
    mut call: F,
) -> T
where
    F: FnMut(Checkout) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    for attempt in 0..400 {
        let url = {
            let urls = fleet.lock().unwrap();
            urls[(buyer + attempt) % urls.len()].clone()
        };
        if let Ok(checkout) = CheckoutServiceClient::connect(url).await {
            match call(checkout).await {
                Ok(answer) => return answer.into_inner(),
                Err(status) if retry_on(&status) => {}
                Err(status) => panic!("buyer {buyer}: {status:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("buyer {buyer}: no server answered");
}

/// Whether a call failed because its server went away (or was not there yet).
fn cut_off(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    )
}

/// Joins the waitlist of `product_id` for one unit; the stream, its first update read.
async fn join(
    mut checkout: Checkout,
    product_id: &str,
) -> tonic::codec::Streaming<pb::WaitlistUpdate> {
    let mut stream = checkout
        .join_waitlist(JoinWaitlistRequest {
            product_id: product_id.into(),
            qty: 1,
            buyer_id: String::new(),
        })
        .await
        .expect("join")
        .into_inner();
    stream.message().await.expect("a place").expect("a place");
    stream
}
