//! CreateHold calls coalesced into shared transactions: arrival-order grants that stop
//! exactly at the last units, keys and products mixed in one batch, commits actually shared.

use std::collections::HashMap;

use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::grpc::pb::{CreateHoldRequest, Hold};
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::support::{
    Checkout, Counters, TestServer, assert_counters, eventually, get_product, reason,
    waiting_on_locks,
};

/// Fires all `requests` at once over `connections` connections; answers in request order.
async fn crowd(
    server: &TestServer,
    connections: usize,
    requests: Vec<CreateHoldRequest>,
) -> Vec<Result<Hold, tonic::Status>> {
    let mut clients: Vec<Checkout> = Vec::new();
    for _ in 0..connections {
        clients.push(server.checkout().await);
    }
    let calls = requests.into_iter().enumerate().map(|(i, request)| {
        let mut client = clients[i % connections].clone();
        tokio::spawn(async move { client.create_hold(request).await.map(|r| r.into_inner()) })
    });
    let mut answers = Vec::new();
    for call in futures::future::join_all(calls).await {
        answers.push(call.expect("call task"));
    }
    answers
}

/// A CreateHold request without a key.
fn request(product_id: &str, qty: i64) -> CreateHoldRequest {
    CreateHoldRequest {
        product_id: product_id.into(),
        qty,
        client_request_id: String::new(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crowd_straddling_the_last_units_gets_exactly_the_stock() {
    let server = TestServer::start().await;
    let product = server.product("drop", 100, 23).await;
    let requests: Vec<_> = (0..120).map(|i| request(&product.id, 1 + i % 4)).collect();
    let quantities: Vec<i64> = requests.iter().map(|r| r.qty).collect();

    let answers = crowd(&server, 6, requests).await;

    let left = get_product(&mut server.checkout().await, &product.id)
        .await
        .available;
    let mut granted = 0;
    for (answer, qty) in answers.iter().zip(&quantities) {
        match answer {
            Ok(hold) => granted += hold.qty,
            Err(status) => {
                assert_eq!(
                    (status.code(), reason(status).as_str()),
                    (Code::FailedPrecondition, "INSUFFICIENT_STOCK")
                );
                // Refused only when it did not fit: nothing it could have had is left.
                assert!(
                    *qty > left,
                    "a request for {qty} was refused while {left} units remain"
                );
                let info = status.get_details_error_info().expect("error info");
                let reported: i64 = info.metadata["available"].parse().unwrap();
                assert!(
                    reported < *qty && reported >= left,
                    "reported available {reported}"
                );
            }
        }
    }
    assert_eq!(
        granted + left,
        23,
        "granted units plus what is left must be the stock"
    );
    assert!(
        left < 4,
        "stock left over ({left}) while requests for 1..=4 units were refused"
    );
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_batch_serves_many_products_each_within_its_own_stock() {
    let server = TestServer::start().await;
    let mut products = Vec::new();
    for n in 0..8 {
        products.push(server.product(&format!("p{n}"), 100, 5 + n).await);
    }
    let requests: Vec<_> = (0..240).map(|i| request(&products[i % 8].id, 1)).collect();
    let mut requests = requests;
    requests.push(request("01900000-0000-7000-8000-000000000000", 1));

    let answers = crowd(&server, 8, requests).await;

    let unknown = answers
        .last()
        .unwrap()
        .as_ref()
        .expect_err("unknown product");
    assert_eq!(unknown.code(), Code::NotFound);
    let mut granted: HashMap<String, i64> = HashMap::new();
    for hold in answers.iter().flatten() {
        *granted.entry(hold.product_id.clone()).or_default() += hold.qty;
    }
    for product in &products {
        assert_eq!(
            granted.get(&product.id),
            Some(&product.stock_total),
            "product {}",
            product.name
        );
        assert_counters(
            &server,
            product,
            Counters::stock(product.stock_total)
                .reserved(product.stock_total)
                .sold(0),
        )
        .await;
    }
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_client_request_ids_in_a_crowd_make_one_hold_each() {
    let server = TestServer::start().await;
    let product = server.product("ticket", 100, 1_000).await;
    let requests: Vec<_> = (0..100)
        .map(|i| CreateHoldRequest {
            product_id: product.id.clone(),
            qty: 2,
            client_request_id: format!("cart-{}", i % 10),
            ..Default::default()
        })
        .collect();
    let mut requests = requests;
    // The same key for another qty is refused, whichever of the two arrives first.
    requests.push(CreateHoldRequest {
        product_id: product.id.clone(),
        qty: 3,
        client_request_id: "cart-0".into(),
        ..Default::default()
    });

    let answers = crowd(&server, 8, requests).await;

    let mut hold_by_key: HashMap<String, String> = HashMap::new();
    let mut refused = 0;
    for answer in &answers {
        match answer {
            Ok(hold) => {
                let first = hold_by_key
                    .entry(hold.client_request_id.clone())
                    .or_insert(hold.hold_id.clone());
                assert_eq!(*first, hold.hold_id, "one key, one hold");
            }
            Err(status) => {
                assert_eq!(reason(status), "IDEMPOTENCY_KEY_REUSED", "{status:?}");
                refused += 1;
            }
        }
    }
    // Whichever request for cart-0 got there first decides: the odd one out is refused, or
    // (if it came first) the ten that differ from it.
    let odd_one_won = answers.last().unwrap().is_ok();
    assert_eq!(refused, if odd_one_won { 10 } else { 1 }, "refusals");
    assert_eq!(hold_by_key.len(), 10);
    let reserved = if odd_one_won { 9 * 2 + 3 } else { 10 * 2 };
    // Each key reserved once.
    assert_counters(
        &server,
        &product,
        Counters::stock(1_000).reserved(reserved).sold(0),
    )
    .await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crowd_shares_commits() {
    let server = TestServer::start().await;
    let product = server.product("hot", 100, 1_000_000).await;
    let before = commits(&server.db.url).await;

    let answers = crowd(
        &server,
        8,
        (0..500).map(|_| request(&product.id, 1)).collect(),
    )
    .await;

    let after = commits(&server.db.url).await;
    assert!(answers.iter().all(Result::is_ok));
    assert_counters(
        &server,
        &product,
        Counters::stock(1_000_000).reserved(500).sold(0),
    )
    .await;
    // One commit per hold would be 500; background work (reaper, health) adds a few dozen.
    assert!(
        after - before < 250,
        "{} commits for 500 concurrent holds",
        after - before
    );
}

/// Transactions committed in this database so far (as the statistics collector has them).
async fn commits(database_url: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Commits {
        #[diesel(sql_type = BigInt)]
        xact_commit: i64,
    }
    let mut conn = AsyncPgConnection::establish(database_url).await.unwrap();
    diesel::sql_query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut conn)
        .await
        .unwrap();
    let row: Commits = diesel::sql_query(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    row.xact_commit
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_another_process_takes_mid_batch_answers_with_that_hold() {
    let server = TestServer::start().await;
    let product = server.product("hot", 100, 10).await;
    let product_id = Uuid::parse_str(&product.id).unwrap();
    // Another server process's batch takes the key "race" and holds the product's row,
    // uncommitted.
    let mut other = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    diesel::sql_query("BEGIN")
        .execute(&mut other)
        .await
        .unwrap();
    let other_hold_id = Uuid::now_v7();
    diesel::sql_query(
        "SELECT * FROM reserve_holds(ARRAY[$1], ARRAY[$2], ARRAY[1], ARRAY[2::int8], ARRAY[''], \
         ARRAY['race'], ARRAY[NULL::text], '1 minute', false)",
    )
    .bind::<SqlUuid, _>(other_hold_id)
    .bind::<SqlUuid, _>(product_id)
    .execute(&mut other)
    .await
    .unwrap();

    // This server's batch looks the key up (nobody has it yet), then waits for the row.
    let mut checkout = server.checkout().await;
    let call = tokio::spawn(async move {
        let request = CreateHoldRequest {
            client_request_id: "race".into(),
            ..request(&product.id, 2)
        };
        checkout.create_hold(request).await
    });
    eventually("the batch waits for the product's row", || {
        waiting_on_locks(&server.db.url)
    })
    .await;
    diesel::sql_query("COMMIT")
        .execute(&mut other)
        .await
        .unwrap();

    let hold = call.await.unwrap().expect("the key's hold").into_inner();
    assert_eq!(hold.hold_id, other_hold_id.to_string());
    assert_counters(
        &server,
        &hold.product_id,
        Counters::stock(10).reserved(2).sold(0),
    )
    .await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_naming_a_missing_product_still_serves_the_others_in_arrival_order() {
    use flashsale::db::holds::{HoldRequestRow, Reservation, reserve_holds};

    let server = TestServer::start().await;
    let scarce = server.product("scarce", 100, 1).await;
    let ample = server.product("ample", 100, 5).await;
    let scarce = Uuid::parse_str(&scarce.id).unwrap();
    let ample = Uuid::parse_str(&ample.id).unwrap();
    // Sorts before both: the server's index of each product is one past its lock's.
    let missing = Uuid::from_u128(1);
    let row = |product_id, qty| HoldRequestRow {
        id: Uuid::now_v7(),
        product_id,
        qty,
        caller: "",
        client_request_id: None,
        buyer_id: None,
    };
    // One call, as one batch: the missing product makes the function look each request's
    // product up instead of going by the index the server passes.
    let requests = [
        row(ample, 2),
        row(scarce, 1),
        row(missing, 1),
        row(scarce, 1),
        row(ample, 3),
    ];
    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();

    let answers = reserve_holds(&mut conn, &requests, chrono::TimeDelta::minutes(1))
        .await
        .unwrap();

    let product_of = |answer: &Reservation| match answer {
        Reservation::Granted(hold) => Some((hold.product_id, hold.qty)),
        _ => None,
    };
    assert_eq!(product_of(&answers[0]), Some((ample, 2)), "{answers:?}");
    assert_eq!(product_of(&answers[1]), Some((scarce, 1)), "{answers:?}");
    assert_eq!(answers[2], Reservation::NoProduct);
    assert_eq!(answers[3], Reservation::Insufficient { units_left: 0 });
    assert_eq!(product_of(&answers[4]), Some((ample, 3)), "{answers:?}");
    assert_counters(
        &server,
        &scarce.to_string(),
        Counters::stock(1).reserved(1).sold(0),
    )
    .await;
    assert_counters(
        &server,
        &ample.to_string(),
        Counters::stock(5).reserved(5).sold(0),
    )
    .await;
    server.assert_consistent().await;
}

/// Defence in depth: should one request pass validation and still make the database refuse
/// its batch (here a constraint the test adds refuses the key "poison"), only that request
/// fails; the rest of its batch is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_refused_because_of_one_request_serves_the_others() {
    let server = TestServer::start().await;
    let product = server.product("hot", 100, 100).await;
    let mut other = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    diesel::sql_query(
        "ALTER TABLE holds ADD CONSTRAINT test_poison \
         CHECK (client_request_id IS DISTINCT FROM 'poison')",
    )
    .execute(&mut other)
    .await
    .unwrap();
    // Hold the product's row, so the first batch waits and the crowd queues up behind it
    // into one batch.
    diesel::sql_query("BEGIN")
        .execute(&mut other)
        .await
        .unwrap();
    diesel::sql_query("SELECT 1 FROM products WHERE id = $1 FOR UPDATE")
        .bind::<SqlUuid, _>(Uuid::parse_str(&product.id).unwrap())
        .execute(&mut other)
        .await
        .unwrap();
    let first = {
        let mut checkout = server.checkout().await;
        let product_id = product.id.clone();
        tokio::spawn(async move { checkout.create_hold(request(&product_id, 1)).await })
    };
    eventually("the first batch waits for the product's row", || {
        waiting_on_locks(&server.db.url)
    })
    .await;
    let mut crowd = Vec::new();
    for caller in 0..20 {
        let mut checkout = server.checkout().await;
        let key = if caller == 7 {
            "poison".to_string()
        } else {
            format!("honest-{caller}")
        };
        let request = CreateHoldRequest {
            client_request_id: key.clone(),
            ..request(&product.id, 1)
        };
        crowd.push(tokio::spawn(async move {
            (key, checkout.create_hold(request).await)
        }));
    }
    // Let the crowd's calls reach the lane's queue behind the waiting batch.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    diesel::sql_query("COMMIT")
        .execute(&mut other)
        .await
        .unwrap();

    first.await.unwrap().expect("the first hold");
    for call in crowd {
        let (key, answer) = call.await.unwrap();
        match (key.as_str(), answer) {
            ("poison", answer) => assert!(answer.is_err(), "the poisoned request was served"),
            (key, answer) => {
                answer.unwrap_or_else(|status| panic!("{key} refused: {status:?}"));
            }
        }
    }
    assert_counters(&server, &product, Counters::stock(100).reserved(20).sold(0)).await;
    server.assert_consistent().await;
}
