//! Products: creation, fresh reads, versions, paging, stock adjustments and the inventory audit.

use std::collections::HashSet;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::grpc::pb::{
    AdjustStockRequest, AuditInventoryRequest, GetProductRequest, ListProductsRequest, Product,
    ProductAudit, StockCounters,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{
    Counters, TestServer, assert_counters, assert_counters_shown, assert_status, commit, decline,
    deliver, eventually, get_product, hold, lock_rows, on_order, order, pay, pending_order,
    release, success, try_hold, waiting_on_locks,
};

/// AdjustStock through the admin API.
async fn adjust(
    server: &TestServer,
    product_id: &str,
    delta: i64,
) -> Result<Product, tonic::Status> {
    server
        .admin()
        .await
        .adjust_stock(AdjustStockRequest {
            request_id: String::new(),
            product_id: product_id.into(),
            delta,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// AuditInventory of the given products (all when empty).
async fn audit(
    server: &TestServer,
    product_ids: &[&str],
) -> Result<flashsale::grpc::pb::AuditInventoryResponse, tonic::Status> {
    server
        .admin()
        .await
        .audit_inventory(AuditInventoryRequest {
            product_ids: product_ids.iter().map(|id| id.to_string()).collect(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// ListProducts, one page.
async fn list_page(
    server: &TestServer,
    page_size: i32,
    page_token: &str,
) -> flashsale::grpc::pb::ListProductsResponse {
    server
        .checkout()
        .await
        .list_products(ListProductsRequest {
            page_size,
            page_token: page_token.into(),
        })
        .await
        .expect("list products")
        .into_inner()
}

fn stock(stock_total: i64, reserved: i64, sold: i64) -> Option<StockCounters> {
    Some(StockCounters {
        stock_total,
        reserved,
        sold,
        available: stock_total - reserved - sold,
        ..StockCounters::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn create_product_returns_its_counters() {
    let server = TestServer::start().await;
    let product = server.product("desk lamp", 4_500, 7).await;

    assert!(
        uuid::Uuid::parse_str(&product.id).is_ok(),
        "id: {product:?}"
    );
    assert_eq!(product.name, "desk lamp");
    assert_eq!(product.price_cents, 4_500);
    assert_counters_shown(&product, Counters::stock(7).reserved(0).sold(0));
    assert!(product.version >= 1, "version: {product:?}");
    let mut checkout = server.checkout().await;
    assert_eq!(get_product(&mut checkout, &product.id).await, product);
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_product_is_fresh_after_holds() {
    let server = TestServer::start().await;
    let product = server.product("mug", 900, 10).await;
    let mut checkout = server.checkout().await;

    hold(&mut checkout, &product.id, 3).await;
    assert_counters(&server, &product, Counters::stock(10).reserved(3).sold(0)).await;
    hold(&mut checkout, &product.id, 2).await;
    assert_counters(&server, &product, Counters::stock(10).reserved(5).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_unknown_product_is_not_found() {
    let server = TestServer::start().await;
    let result = server
        .checkout()
        .await
        .get_product(GetProductRequest {
            product_id: uuid::Uuid::now_v7().to_string(),
        })
        .await;
    assert_status(result, Code::NotFound, "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread")]
async fn version_grows_on_every_stock_change_and_not_on_reads() {
    let server = TestServer::start().await;
    let product = server.product("kettle", 3_000, 10).await;
    let mut checkout = server.checkout().await;
    let mut version = product.version;

    // Reads leave the version alone.
    assert_eq!(
        get_product(&mut checkout, &product.id).await.version,
        version
    );
    list_page(&server, 0, "").await;
    audit(&server, &[]).await.unwrap();
    assert_eq!(
        get_product(&mut checkout, &product.id).await.version,
        version
    );

    let held = hold(&mut checkout, &product.id, 2).await;
    let after_hold = get_product(&mut checkout, &product.id).await.version;
    assert!(after_hold > version, "hold: {after_hold} <= {version}");
    version = after_hold;

    release(&mut checkout, &held.hold_id).await;
    let after_release = get_product(&mut checkout, &product.id).await.version;
    assert!(
        after_release > version,
        "release: {after_release} <= {version}"
    );
    version = after_release;

    let restocked = adjust(&server, &product.id, 5).await.unwrap();
    assert!(restocked.version > version, "restock: {restocked:?}");
    assert_eq!(
        get_product(&mut checkout, &product.id).await.version,
        restocked.version
    );
    version = restocked.version;

    let withdrawn = adjust(&server, &product.id, -3).await.unwrap();
    assert!(withdrawn.version > version, "withdraw: {withdrawn:?}");
    assert_eq!(
        get_product(&mut checkout, &product.id).await.version,
        withdrawn.version
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_products_pages_through_every_product_once() {
    let server = TestServer::start().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(server.product(&format!("item {i}"), 100 + i, 1).await.id);
    }

    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = list_page(&server, 2, &token).await;
        pages.push(
            page.products
                .iter()
                .map(|p| p.id.clone())
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages.len() < 10, "paging never ends: {pages:?}");
        token = page.next_page_token;
    }

    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![2, 2, 1], "pages: {pages:?}");
    let listed: Vec<String> = pages.concat();
    let unique: HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "duplicates: {listed:?}");
    assert_eq!(listed, created, "creation order");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_products_last_full_page_has_no_next_token() {
    let server = TestServer::start().await;
    for i in 0..4 {
        server.product(&format!("item {i}"), 100, 1).await;
    }
    let first = list_page(&server, 2, "").await;
    assert_eq!(first.products.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = list_page(&server, 2, &first.next_page_token).await;
    assert_eq!(second.products.len(), 2);
    assert_eq!(second.next_page_token, "", "no empty trailing page");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_products_of_an_empty_catalogue_is_one_empty_page() {
    let server = TestServer::start().await;
    let page = list_page(&server, 10, "").await;
    assert!(page.products.is_empty());
    assert_eq!(page.next_page_token, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_products_page_size_zero_means_one_hundred() {
    let server = TestServer::start().await;
    let admin = server.admin().await;
    let creates = (0..101).map(|i| {
        let mut admin = admin.clone();
        async move {
            admin
                .create_product(flashsale::grpc::pb::CreateProductRequest {
                    request_id: String::new(),
                    name: format!("bulk {i}"),
                    price_cents: 1,
                    stock_total: 1,
                    ..Default::default()
                })
                .await
                .expect("create product")
        }
    });
    futures::future::join_all(creates).await;

    let first = list_page(&server, 0, "").await;
    assert_eq!(first.products.len(), 100);
    assert!(!first.next_page_token.is_empty());
    let rest = list_page(&server, 0, &first.next_page_token).await;
    assert_eq!(rest.products.len(), 1);
    assert_eq!(rest.next_page_token, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn adjust_stock_restocks_and_withdraws() {
    let server = TestServer::start().await;
    let product = server.product("tent", 19_900, 10).await;

    let restocked = adjust(&server, &product.id, 5).await.unwrap();
    assert_counters_shown(&restocked, Counters::stock(15).reserved(0).sold(0));
    let withdrawn = adjust(&server, &product.id, -12).await.unwrap();
    assert_counters_shown(&withdrawn, Counters::stock(3).reserved(0).sold(0));
    let mut checkout = server.checkout().await;
    assert_eq!(get_product(&mut checkout, &product.id).await, withdrawn);

    let audit = server.assert_consistent().await;
    assert_eq!(audit.products[0].recomputed, stock(3, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn withdraw_below_reserved_plus_sold_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let product = server.product("headphones", 5_000, 10).await;
    let mut checkout = server.checkout().await;
    // 4 units reserved by a hold, 3 sold.
    hold(&mut checkout, &product.id, 4).await;
    let order = pending_order(&mut checkout, &product.id, 3).await;
    let payment = success("evt-withdraw", on_order(&order.order_id), order.total_cents);
    deliver(&mut checkout, payment).await;
    let before = assert_counters(&server, &product, Counters::stock(10).reserved(4).sold(3)).await;

    let status = assert_status(
        adjust(&server, &product.id, -4).await,
        Code::FailedPrecondition,
        "STOCK_BELOW_COMMITTED",
    );
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(
        info.metadata.get("committed").map(String::as_str),
        Some("7")
    );
    assert_eq!(
        get_product(&mut checkout, &product.id).await,
        before,
        "nothing changed"
    );
    server.assert_consistent().await;

    // Down to exactly reserved + sold is allowed.
    let withdrawn = adjust(&server, &product.id, -3).await.unwrap();
    assert_counters_shown(&withdrawn, Counters::stock(7).reserved(4).sold(3));
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_withdrawal_racing_a_crowd_of_holds_never_takes_units_the_crowd_holds() {
    let server = TestServer::start().await;
    let product = server.product("drop", 100, 20).await;

    // The product's row is taken, so the withdrawal and twenty holds queue for it together
    // and meet the moment it is free: the tightest interleaving there is.
    let mut lock = lock_rows(&server, "products", std::slice::from_ref(&product.id)).await;
    let withdrawal = {
        let (mut admin, id) = (server.admin().await, product.id.clone());
        tokio::spawn(async move {
            let withdraw = AdjustStockRequest {
                request_id: String::new(),
                product_id: id,
                delta: -15,
            };
            admin.adjust_stock(withdraw).await
        })
    };
    let checkout = server.checkout().await;
    let holds: Vec<_> = (0..20)
        .map(|_| {
            let (mut checkout, id) = (checkout.clone(), product.id.clone());
            tokio::spawn(async move { try_hold(&mut checkout, &id, 1, None).await })
        })
        .collect();
    eventually(
        "the withdrawal and the holds to wait for the product",
        || waiting_on_locks(&server.db.url),
    )
    .await;
    commit(&mut lock).await;

    let withdrawn = match withdrawal.await.unwrap() {
        Ok(_) => 15,
        Err(status) => {
            assert_status(
                Err::<(), _>(status),
                Code::FailedPrecondition,
                "STOCK_BELOW_COMMITTED",
            );
            0
        }
    };
    let (mut granted, mut refused) = (0, 0);
    for hold in holds {
        match hold.await.unwrap() {
            Ok(_) => granted += 1,
            Err(status) => {
                assert_status(
                    Err::<(), _>(status),
                    Code::FailedPrecondition,
                    "INSUFFICIENT_STOCK",
                );
                refused += 1;
            }
        }
    }
    assert_eq!(granted + refused, 20);
    assert!(
        granted + withdrawn <= 20,
        "{granted} units held and {withdrawn} withdrawn out of 20"
    );
    // A hold is refused only when nothing is left, and the withdrawal only when it would
    // take held units: whichever came first, the stock ends fully used.
    assert_eq!(granted + withdrawn, 20, "units left idle");
    assert_counters(
        &server,
        &product,
        Counters::stock(20 - withdrawn).reserved(granted).sold(0),
    )
    .await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn adjust_stock_of_unknown_product_is_not_found() {
    let server = TestServer::start().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_status(
        adjust(&server, &unknown, 5).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_status(
        adjust(&server, &unknown, -5).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let audit = server.assert_consistent().await;
    assert!(audit.products.is_empty(), "nothing was created: {audit:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_covers_all_products_or_the_listed_ones() {
    let server = TestServer::start().await;
    let a = server.product("a", 100, 1).await;
    let b = server.product("b", 100, 2).await;
    let c = server.product("c", 100, 3).await;

    let all = audit(&server, &[]).await.unwrap();
    assert!(all.consistent);
    let ids: HashSet<&str> = all.products.iter().map(|p| p.product_id.as_str()).collect();
    assert_eq!(
        ids,
        HashSet::from([a.id.as_str(), b.id.as_str(), c.id.as_str()])
    );

    let some = audit(&server, &[&a.id, &c.id]).await.unwrap();
    assert!(some.consistent);
    let ids: HashSet<&str> = some
        .products
        .iter()
        .map(|p| p.product_id.as_str())
        .collect();
    assert_eq!(ids, HashSet::from([a.id.as_str(), c.id.as_str()]));
    let audited_c = some.products.iter().find(|p| p.product_id == c.id).unwrap();
    assert_eq!(audited_c.stored, stock(3, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_of_an_unknown_product_is_not_found() {
    let server = TestServer::start().await;
    let known = server.product("known", 100, 1).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_status(
        audit(&server, &[&known.id, &unknown]).await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_recomputes_counters_from_holds_orders_payments_and_adjustments() {
    let server = TestServer::start().await;
    let product = server.product("jacket", 1_000, 20).await;
    let mut checkout = server.checkout().await;
    adjust(&server, &product.id, 5).await.unwrap();
    adjust(&server, &product.id, -3).await.unwrap();

    // Active hold: 2 reserved.
    hold(&mut checkout, &product.id, 2).await;
    // Pending order: 3 reserved.
    pending_order(&mut checkout, &product.id, 3).await;
    // Paid order: 4 sold.
    let paid = pending_order(&mut checkout, &product.id, 4).await;
    pay(&mut checkout, &paid, "evt-paid").await;
    // Cancelled order: nothing.
    let cancelled = pending_order(&mut checkout, &product.id, 5).await;
    decline(&mut checkout, &cancelled, "evt-failed", "").await;
    // Released hold: nothing.
    let released = hold(&mut checkout, &product.id, 1).await;
    release(&mut checkout, &released.hold_id).await;

    let report = audit(&server, &[&product.id]).await.unwrap();
    assert_eq!(
        report.products,
        vec![ProductAudit {
            product_id: product.id.clone(),
            stored: stock(22, 5, 4),
            recomputed: stock(22, 5, 4),
            consistent: true,
            overdue_orders: 0,
            refunds_owed: 0,
        }]
    );
    assert!(report.consistent);
    assert_counters(&server, &product, Counters::stock(22).reserved(5).sold(4)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_flags_stored_counters_that_drift_from_the_rows() {
    let server = TestServer::start().await;
    let healthy = server.product("healthy", 100, 10).await;
    let drifted = server.product("drifted", 100, 10).await;
    let mut checkout = server.checkout().await;
    hold(&mut checkout, &drifted.id, 2).await;

    // Corrupt the stored counters behind the server's back.
    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    diesel::sql_query(format!(
        "UPDATE products SET reserved = reserved + 1, sold = sold + 2 WHERE id = '{}'",
        drifted.id
    ))
    .execute(&mut conn)
    .await
    .unwrap();

    let report = audit(&server, &[]).await.unwrap();
    assert!(!report.consistent, "{report:#?}");
    let row = |id: &str| report.products.iter().find(|p| p.product_id == id).unwrap();
    assert!(row(&healthy.id).consistent);
    let bad = row(&drifted.id);
    assert!(!bad.consistent);
    assert_eq!(bad.stored, stock(10, 3, 2));
    assert_eq!(bad.recomputed, stock(10, 2, 0));

    let only_healthy = audit(&server, &[&healthy.id]).await.unwrap();
    assert!(only_healthy.consistent, "{only_healthy:#?}");
}

/// Runs `statement` and asserts the database refused it as a violation of `constraint`.
async fn assert_refused_as_foreign_key(
    conn: &mut AsyncPgConnection,
    statement: &str,
    constraint: &str,
) {
    let refused = diesel::sql_query(statement).execute(conn).await;
    let Err(diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::ForeignKeyViolation,
        info,
    )) = refused
    else {
        panic!("{statement}: {refused:?}");
    };
    assert_eq!(
        info.constraint_name(),
        Some(constraint),
        "{statement}: {}",
        info.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_keeps_every_hold_pointing_at_an_existing_product() {
    let server = TestServer::start().await;
    let product = server.product("held", 100, 10).await;
    let other = server.product("other", 100, 10).await;
    let mut checkout = server.checkout().await;
    let held = hold(&mut checkout, &product.id, 2).await;
    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    let insert_for = |product_id: &str| {
        format!(
            "INSERT INTO holds (id, product_id, qty, expires_at, caller)
             VALUES (gen_random_uuid(), '{product_id}', 1, now() + interval '1 minute', '')"
        )
    };

    // Written behind the server's back, each of these would leave a hold without its
    // product; the database refuses them as it would a foreign key.
    let missing = uuid::Uuid::now_v7().to_string();
    for statement in [
        insert_for(&missing),
        format!(
            "INSERT INTO holds (id, product_id, qty, expires_at, caller)
             SELECT gen_random_uuid(), named, 1, now(), '' FROM unnest(ARRAY['{}', '{missing}']::uuid[]) AS named",
            other.id
        ),
        format!("DELETE FROM products WHERE id = '{}'", product.id),
        format!("UPDATE products SET id = gen_random_uuid() WHERE id = '{}'", product.id),
        format!("UPDATE holds SET product_id = '{}' WHERE id = '{}'", other.id, held.hold_id),
    ] {
        assert_refused_as_foreign_key(&mut conn, &statement, "holds_product_id_fkey").await;
    }
    // A hold for an existing product is accepted.
    let accepted = diesel::sql_query(insert_for(&other.id))
        .execute(&mut conn)
        .await;
    assert_eq!(accepted.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_keeps_every_order_on_its_holds_product() {
    let server = TestServer::start().await;
    let product = server.product("ordered", 100, 10).await;
    let other = server.product("other", 100, 10).await;
    let mut checkout = server.checkout().await;
    let held = hold(&mut checkout, &product.id, 2).await;
    let second = hold(&mut checkout, &product.id, 1).await;
    let order = order(&mut checkout, &held.hold_id).await;
    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();

    // Written behind the server's back, each would leave an order on another product than
    // its hold's (or on none); the database refuses them as it would a foreign key.
    let missing = uuid::Uuid::now_v7().to_string();
    for product_id in [&other.id, &missing] {
        for statement in [
            format!(
                "INSERT INTO orders (id, hold_id, product_id, qty, total_cents, payment_due_at)
                 VALUES (gen_random_uuid(), '{}', '{product_id}', 1, 100, now())",
                second.hold_id
            ),
            format!(
                "UPDATE orders SET product_id = '{product_id}' WHERE id = '{}'",
                order.order_id
            ),
        ] {
            assert_refused_as_foreign_key(&mut conn, &statement, "orders_product_id_fkey").await;
        }
    }
    // The order of the second hold, on that hold's product, is accepted.
    let accepted = diesel::sql_query(format!(
        "INSERT INTO orders (id, hold_id, product_id, qty, total_cents, payment_due_at)
         VALUES (gen_random_uuid(), '{}', '{}', 1, 100, now())",
        second.hold_id, product.id
    ))
    .execute(&mut conn)
    .await;
    assert_eq!(accepted.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn retried_admin_writes_take_effect_once() {
    use flashsale::grpc::pb::CreateProductRequest;

    let server = TestServer::start().await;
    let create = CreateProductRequest {
        name: "drop".into(),
        price_cents: 4_200,
        stock_total: 10,
        request_id: "create-1".into(),
        ..Default::default()
    };
    // Concurrent retries of one CreateProduct (an operator's client timing out and
    // resending) make one product.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let (mut admin, create) = (server.admin().await, create.clone());
        calls.push(tokio::spawn(
            async move { admin.create_product(create).await },
        ));
    }
    let mut ids = HashSet::new();
    for call in calls {
        ids.insert(call.await.unwrap().expect("created").into_inner().id);
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let product_id = ids.into_iter().next().unwrap();
    let listed = server
        .checkout()
        .await
        .list_products(ListProductsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .products;
    assert_eq!(listed.len(), 1);

    let adjust_once = AdjustStockRequest {
        product_id: product_id.clone(),
        delta: 5,
        request_id: "restock-1".into(),
    };
    let mut admin = server.admin().await;
    for _ in 0..3 {
        let product = admin
            .adjust_stock(adjust_once.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(product.stock_total, 15, "a retried restock applies once");
    }

    // The same ids with another request are refused, and change nothing.
    let other_create = CreateProductRequest {
        stock_total: 11,
        ..create
    };
    assert_status(
        admin.create_product(other_create).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    let other_adjust = AdjustStockRequest {
        delta: 6,
        ..adjust_once
    };
    assert_status(
        admin.adjust_stock(other_adjust).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    let product = get_product(&mut server.checkout().await, &product_id).await;
    assert_eq!(product.stock_total, 15);
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_keeps_every_movement_on_its_holds_product() {
    let server = TestServer::start().await;
    let product = server.product("moved", 100, 10).await;
    let other = server.product("other", 100, 10).await;
    let mut checkout = server.checkout().await;
    let held = hold(&mut checkout, &product.id, 2).await;
    let mut conn = AsyncPgConnection::establish(&server.db.url).await.unwrap();
    let movement = |hold_id: &str, product_id: &str| {
        format!(
            "INSERT INTO stock_movements (product_id, hold_id, reserved_delta, sold_delta)
             VALUES ('{product_id}', '{hold_id}', -1, 0)"
        )
    };

    // Written behind the server's back, each would move units of no hold, or of a hold of
    // another product; the database refuses them as it would a foreign key.
    let missing = uuid::Uuid::now_v7().to_string();
    for statement in [
        movement(&missing, &product.id),
        movement(&held.hold_id, &other.id),
        format!(
            "UPDATE stock_movements SET product_id = '{}' WHERE hold_id = '{}'",
            other.id, held.hold_id
        ),
    ] {
        // The update has a row to refuse only once the accepted insert below is in.
        if statement.starts_with("UPDATE") {
            let accepted = diesel::sql_query(movement(&held.hold_id, &product.id))
                .execute(&mut conn)
                .await;
            assert_eq!(accepted.unwrap(), 1, "a movement of its hold's product");
        }
        assert_refused_as_foreign_key(&mut conn, &statement, "stock_movements_hold_id_fkey").await;
    }
}
