//! The service around the API: health, reflection, database outages and graceful shutdown.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::grpc::pb::{
    AuditInventoryRequest, CreateProductRequest, GetProductRequest, WatchAvailabilityRequest,
};
use prost::Message;
use tokio::time::{Instant, timeout};
use tonic::Code;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

use crate::support::{
    Counters, TestDb, TestServer, assert_counters, assert_counters_shown, assert_status, hold,
    reason, test_config, try_hold,
};

/// The services the server announces, by their full names.
const CHECKOUT: &str = "flashsale.v1.CheckoutService";
const ADMIN: &str = "flashsale.v1.InventoryAdminService";
const HEALTH: &str = "grpc.health.v1.Health";

/// Bound on any one wait in these tests: reaching it means a hang, not slowness.
const PATIENCE: Duration = Duration::from_secs(30);

/// The health status of `service`, or the call's error.
async fn health_of(server: &TestServer, service: &str) -> Result<ServingStatus, tonic::Status> {
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|response| response.into_inner().status())
}

/// Polls the overall health until it is `wanted`; panics after [`PATIENCE`].
async fn wait_health(server: &TestServer, wanted: ServingStatus) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = server.health().await;
        if status == wanted {
            return;
        }
        assert!(Instant::now() < deadline, "health stuck at {status:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends `requests` on one reflection stream and returns the answers in order.
async fn reflect(server: &TestServer, requests: Vec<MessageRequest>) -> Vec<MessageResponse> {
    let count = requests.len();
    let requests = requests
        .into_iter()
        .map(|message_request| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message_request),
        });
    let mut answers = ServerReflectionClient::new(server.channel().await)
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection call")
        .into_inner();
    let mut responses = Vec::new();
    while responses.len() < count {
        let answer: ServerReflectionResponse = timeout(PATIENCE, answers.message())
            .await
            .expect("reflection answers")
            .expect("reflection stream")
            .expect("one answer per request");
        responses.push(answer.message_response.expect("a response"));
    }
    responses
}

/// The file descriptors of a reflection answer.
fn files(response: &MessageResponse) -> Vec<prost_types::FileDescriptorProto> {
    let MessageResponse::FileDescriptorResponse(files) = response else {
        panic!("expected file descriptors, got {response:?}");
    };
    files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .collect()
}

/// `url`'s database name, and the same URL pointing at the `postgres` database instead.
fn split_database(url: &str) -> (String, String) {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (server, name) = base.rsplit_once('/').expect("a database in the url");
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    (name.to_string(), format!("{server}/postgres{query}"))
}

/// Runs one statement over a connection of our own.
async fn execute(conn: &mut AsyncPgConnection, statement: &str) {
    diesel::sql_query(statement)
        .execute(conn)
        .await
        .unwrap_or_else(|error| panic!("{statement}: {error}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_before_the_migrations_finish_are_unavailable_not_internal() {
    // A database of its own with no schema yet, and the migrations held back: the table
    // diesel records them in is being created by an open transaction of the test.
    let migrated = TestDb::new().await;
    let (migrated_name, maintenance_url) = split_database(&migrated.url);
    let name = format!("flashsale_unmigrated_{}", uuid::Uuid::now_v7().simple());
    let url = migrated.url.replacen(&migrated_name, &name, 1);
    let mut dba = AsyncPgConnection::establish(&maintenance_url)
        .await
        .unwrap();
    execute(&mut dba, &format!("CREATE DATABASE \"{name}\"")).await;
    let mut blocker = AsyncPgConnection::establish(&url).await.unwrap();
    execute(&mut blocker, "BEGIN").await;
    execute(
        &mut blocker,
        "CREATE TABLE __diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY)",
    )
    .await;
    let server = TestServer::spawn(test_config(&url), TestDb::on_own_cluster(url.clone())).await;

    let mut admin = server.admin().await;
    let early = admin.create_product(CreateProductRequest {
        name: "early".into(),
        price_cents: 100,
        stock_total: 1,
        ..Default::default()
    });
    assert_status(early.await, Code::Unavailable, "DATABASE_UNAVAILABLE");
    assert_eq!(server.health().await, ServingStatus::NotServing);

    execute(&mut blocker, "ROLLBACK").await;
    wait_health(&server, ServingStatus::Serving).await;
    server.product("on time", 100, 1).await;
    server.stop().await.unwrap();
    execute(&mut dba, &format!("DROP DATABASE \"{name}\" WITH (FORCE)")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_serving_for_the_server_and_each_service() {
    let server = TestServer::start().await;
    for service in ["", CHECKOUT, ADMIN] {
        assert_eq!(
            health_of(&server, service).await.unwrap(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
    let unknown = health_of(&server, "flashsale.v1.NoSuchService").await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services() {
    let server = TestServer::start().await;
    let answers = reflect(&server, vec![MessageRequest::ListServices(String::new())]).await;
    let MessageResponse::ListServicesResponse(list) = &answers[0] else {
        panic!("expected a service list, got {:?}", answers[0]);
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for wanted in [CHECKOUT, ADMIN, HEALTH] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_returns_the_file_declaring_a_symbol() {
    let server = TestServer::start().await;
    let answers = reflect(
        &server,
        vec![
            MessageRequest::FileContainingSymbol(CHECKOUT.into()),
            MessageRequest::FileContainingSymbol("flashsale.v1.Product".into()),
        ],
    )
    .await;

    let checkout_files = files(&answers[0]);
    let checkout = checkout_files
        .iter()
        .find(|file| file.name() == "flashsale/v1/checkout.proto")
        .unwrap_or_else(|| panic!("no checkout.proto in {checkout_files:#?}"));
    assert_eq!(checkout.package(), "flashsale.v1");
    let service = checkout
        .service
        .iter()
        .find(|service| service.name() == "CheckoutService")
        .expect("CheckoutService declared");
    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    for wanted in ["CreateHold", "ReleaseHold", "WatchAvailability"] {
        assert!(
            methods.contains(&wanted),
            "{wanted} missing from {methods:?}"
        );
    }
    let watch = service
        .method
        .iter()
        .find(|m| m.name() == "WatchAvailability")
        .unwrap();
    assert!(watch.server_streaming(), "{watch:?}");

    let types = files(&answers[1]);
    let types = types
        .iter()
        .find(|file| file.name() == "flashsale/v1/types.proto")
        .expect("types.proto");
    assert!(types.message_type.iter().any(|m| m.name() == "Product"));
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_database_gives_unavailable_not_a_hang() {
    let mut config = test_config("postgres://postgres@127.0.0.1:1/flashsale_nowhere");
    config.db_timeout = Duration::from_millis(500);
    let server = TestServer::spawn(config, TestDb::new().await).await;
    assert_eq!(server.health().await, ServingStatus::NotServing);

    let mut checkout = server.checkout().await;
    let product_id = uuid::Uuid::now_v7().to_string();
    let read = timeout(
        PATIENCE,
        checkout.get_product(GetProductRequest {
            product_id: product_id.clone(),
        }),
    )
    .await
    .expect("GetProduct answers");
    assert_status(read, Code::Unavailable, "DATABASE_UNAVAILABLE");

    let write = timeout(
        PATIENCE,
        try_hold(&mut checkout, &product_id, 1, Some("req-outage")),
    )
    .await
    .expect("CreateHold answers");
    assert_status(write, Code::Unavailable, "DATABASE_UNAVAILABLE");

    let mut admin = server.admin().await;
    let create = timeout(
        PATIENCE,
        admin.create_product(CreateProductRequest {
            request_id: String::new(),
            name: "nowhere".into(),
            price_cents: 1,
            stock_total: 1,
            ..Default::default()
        }),
    )
    .await
    .expect("CreateProduct answers");
    assert_status(create, Code::Unavailable, "DATABASE_UNAVAILABLE");

    assert_eq!(server.health().await, ServingStatus::NotServing);
    for service in [CHECKOUT, ADMIN] {
        assert_eq!(
            health_of(&server, service).await.unwrap(),
            ServingStatus::NotServing
        );
    }
    server
        .stop()
        .await
        .expect("stops cleanly without ever reaching the database");
}

#[tokio::test(flavor = "multi_thread")]
async fn database_outage_gives_unavailable_then_the_server_recovers() {
    let server = TestServer::start_with(|config| config.db_timeout = Duration::from_secs(1)).await;
    let product = server.product("lamp", 2_000, 10).await;
    let mut checkout = server.checkout().await;
    hold(&mut checkout, &product.id, 2).await;

    // Outage: refuse new connections to the database and cut the server's open ones.
    let (name, maintenance_url) = split_database(&server.db.url);
    let mut dba = AsyncPgConnection::establish(&maintenance_url)
        .await
        .unwrap();
    execute(
        &mut dba,
        &format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"),
    )
    .await;
    execute(
        &mut dba,
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    )
    .await;

    for _ in 0..3 {
        let read = timeout(
            PATIENCE,
            checkout.get_product(GetProductRequest {
                product_id: product.id.clone(),
            }),
        )
        .await
        .expect("GetProduct answers during the outage");
        assert_status(read, Code::Unavailable, "DATABASE_UNAVAILABLE");
    }
    let write = timeout(PATIENCE, try_hold(&mut checkout, &product.id, 1, None))
        .await
        .expect("CreateHold answers during the outage");
    assert_status(write, Code::Unavailable, "DATABASE_UNAVAILABLE");
    wait_health(&server, ServingStatus::NotServing).await;

    // The database comes back: so do health and the API, with nothing lost.
    execute(
        &mut dba,
        &format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"),
    )
    .await;
    wait_health(&server, ServingStatus::Serving).await;
    let deadline = Instant::now() + PATIENCE;
    let mut admin = server.admin().await;
    loop {
        let audit = admin
            .audit_inventory(AuditInventoryRequest {
                product_ids: vec![],
            })
            .await;
        match audit {
            Ok(_) => break,
            Err(status) => assert!(
                status.code() == Code::Unavailable && Instant::now() < deadline,
                "the API did not come back: {status:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_counters(&server, &product, Counters::stock(10).reserved(2).sold(0)).await;
    // Holds work again.
    hold(&mut checkout, &product.id, 1).await;
    assert_counters(&server, &product, Counters::stock(10).reserved(3).sold(0)).await;
    server.assert_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_server_refuses_new_connections() {
    let server = TestServer::start().await;
    let product = server.product("lamp", 2_000, 10).await;
    let addr = server.addr;
    let mut connected = server.checkout().await;

    server.stop().await.expect("graceful shutdown");

    let reconnect = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    assert!(reconnect.is_err(), "a stopped server accepted a connection");
    let call = timeout(
        PATIENCE,
        connected.get_product(GetProductRequest {
            product_id: product.id,
        }),
    )
    .await
    .expect("a call on the old connection fails, it does not hang");
    assert_eq!(call.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread")]
async fn open_watch_streams_end_unavailable_on_shutdown() {
    let server = TestServer::start().await;
    let product = server.product("lamp", 2_000, 10).await;
    let mut checkout = server.checkout().await;
    let mut streams = Vec::new();
    for product_ids in [vec![product.id.clone()], vec![]] {
        let mut stream = checkout
            .watch_availability(WatchAvailabilityRequest { product_ids })
            .await
            .expect("watch")
            .into_inner();
        let first = timeout(PATIENCE, stream.message())
            .await
            .expect("initial update arrives")
            .expect("initial update")
            .expect("stream open");
        assert_eq!(first.product_id, product.id);
        assert_counters_shown(&first, Counters::stock(10).reserved(0).sold(0));
        streams.push(stream);
    }

    let stopping = tokio::spawn(server.stop());

    for mut stream in streams {
        let end = timeout(PATIENCE, async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        })
        .await
        .expect("the stream ends when the server shuts down");
        let status = end.expect("the stream ends with a status, not silently");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason(&status), "SHUTTING_DOWN", "{status:?}");
    }
    timeout(PATIENCE, stopping)
        .await
        .expect("server stops")
        .unwrap()
        .expect("graceful shutdown");
}

/// Scrapes `http://{addr}/metrics`: the samples, by their name and labels as written.
async fn scrape(addr: &str) -> std::collections::HashMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint");
    tcp.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let (_, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_a_known_sequence_of_calls_did() {
    use flashsale::grpc::pb::{CreateHoldRequest, GetProductRequest};

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let db = TestDb::new().await;
    let server =
        crate::support::ServerProcess::start_with(&db.url, &[("FLASHSALE_METRICS_ADDR", &addr)])
            .await;
    let mut checkout = server.checkout().await;
    let product =
        flashsale::grpc::pb::inventory_admin_service_client::InventoryAdminServiceClient::connect(
            server.url.clone(),
        )
        .await
        .unwrap()
        .create_product(flashsale::grpc::pb::CreateProductRequest {
            name: "ticket".into(),
            price_cents: 100,
            stock_total: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(crate::support::hold(&mut checkout, &product.id, 1).await);
    }
    let refused = checkout
        .create_hold(CreateHoldRequest {
            product_id: product.id.clone(),
            qty: 1,
            ..Default::default()
        })
        .await;
    assert!(refused.is_err());
    crate::support::release(&mut checkout, &held[0].hold_id).await;
    let order = crate::support::order(&mut checkout, &held[1].hold_id).await;
    crate::support::pay(&mut checkout, &order, "evt-1").await;
    let unknown = checkout
        .get_product(GetProductRequest {
            product_id: uuid::Uuid::now_v7().to_string(),
        })
        .await;
    assert!(unknown.is_err());

    let samples = scrape(&addr).await;
    let sample = |series: &str| {
        samples
            .get(series)
            .copied()
            .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
    };
    assert_eq!(sample("flashsale_holds_created_total"), 3.0);
    assert_eq!(
        sample(r#"flashsale_holds_rejected_total{reason="INSUFFICIENT_STOCK"}"#),
        1.0
    );
    assert_eq!(sample("flashsale_holds_released_total"), 1.0);
    assert_eq!(sample(r#"flashsale_orders_total{status="paid"}"#), 1.0);
    assert_eq!(
        sample(r#"flashsale_webhooks_total{outcome="applied"}"#),
        1.0
    );
    let calls = |method: &str, code: &str| {
        sample(&format!(
            r#"grpc_server_handled_total{{grpc_service="flashsale.v1.CheckoutService",grpc_method="{method}",grpc_code="{code}"}}"#
        ))
    };
    assert_eq!(calls("CreateHold", "OK"), 3.0);
    assert_eq!(calls("CreateHold", "FailedPrecondition"), 1.0);
    assert_eq!(calls("GetProduct", "NotFound"), 1.0);
    assert_eq!(
        sample(
            r#"grpc_server_started_total{grpc_service="flashsale.v1.CheckoutService",grpc_method="CreateHold"}"#
        ),
        4.0
    );
    assert!(
        samples
            .keys()
            .any(|series| series.starts_with("grpc_server_handling_seconds_bucket"))
    );
    // One call at a time: every batch is a batch of one, the hold batches' buckets included.
    assert_eq!(sample("flashsale_hold_batch_size_count"), 4.0);
    assert_eq!(sample(r#"flashsale_hold_batch_size_bucket{le="1"}"#), 4.0);
    assert_eq!(sample("flashsale_release_batch_size_count"), 1.0);
    assert_eq!(sample("flashsale_order_batch_size_count"), 1.0);
    assert_eq!(sample("flashsale_payment_batch_size_sum"), 1.0);
    server.stop().await;
}
