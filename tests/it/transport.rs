//! How callers reach the server: TLS and mutual TLS, and the limits that keep one caller's
//! connections from hurting the others (connections, streams per connection, message size,
//! keepalive pings, stream-reset floods).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flashsale::config::{ServerConfig, TlsFiles};
use flashsale::grpc::pb::checkout_service_client::CheckoutServiceClient;
use flashsale::grpc::pb::{CreateHoldRequest, ListProductsRequest, WatchAvailabilityRequest};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SigningKey,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::support::{Counters, ServerProcess, TestDb, TestServer, assert_counters, test_config};

/// A certificate and its key, as PEM.
struct Pem {
    cert: String,
    key: String,
}

/// A throwaway PKI: a CA, a server certificate for 127.0.0.1 and localhost, and a client
/// certificate signed by the CA; the server's files written to a temporary directory.
struct Pki {
    /// The CA that signed the server's and the client's certificates.
    ca: String,
    /// The client's certificate, signed by `ca`.
    client: Pem,
    /// A certificate signed by a CA the server does not know.
    stranger: Pem,
    /// Holds the files below.
    _dir: tempfile::TempDir,
    /// The server's certificate, key and CA files.
    files: TlsFiles,
}

/// A CA able to sign certificates.
fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate for `names`, signed by `ca`.
fn signed(names: &[&str], ca: &CertifiedIssuer<'_, impl SigningKey>) -> Pem {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, ca)
        .unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

impl Pki {
    fn new() -> Pki {
        let ca = new_ca("flashsale test ca");
        let server = signed(&["localhost", "127.0.0.1"], &ca);
        let client = signed(&["storefront"], &ca);
        let stranger = signed(&["stranger"], &new_ca("someone else's ca"));
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let files = TlsFiles {
            cert: write("server.pem", &server.cert),
            key: write("server.key", &server.key),
            client_ca: Some(write("ca.pem", &ca.pem())),
        };
        Pki {
            ca: ca.pem(),
            client,
            stranger,
            _dir: dir,
            files,
        }
    }

    /// A TLS client trusting the test CA, presenting `identity` if given.
    fn client(&self, identity: Option<&Pem>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name("localhost");
        match identity {
            Some(pem) => config.identity(Identity::from_pem(&pem.cert, &pem.key)),
            None => config,
        }
    }
}

/// Starts a server whose settings `adjust` changes, without waiting for health (which may
/// need TLS to be asked).
async fn spawn(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let db = TestDb::new().await;
    let mut config = test_config(&db.url);
    adjust(&mut config);
    TestServer::spawn(config, db).await
}

/// The overall health over `tls` (plaintext when `None`), as the server answered.
async fn health_over(
    addr: SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<ServingStatus, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let answer = HealthClient::new(channel).check(request).await;
    answer
        .map(|answer| answer.into_inner().status())
        .map_err(|status| format!("{status:?}"))
}

/// Waits until the server answers SERVING over `tls` (30 s at most).
async fn wait_serving_over(addr: SocketAddr, tls: &ClientTlsConfig) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while health_over(addr, Some(tls.clone())).await != Ok(ServingStatus::Serving) {
        assert!(tokio::time::Instant::now() < deadline, "never served TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_callers_who_trust_its_certificate_and_no_plaintext() {
    let pki = Pki::new();
    let server = spawn(|config| {
        config.transport.tls = Some(TlsFiles {
            client_ca: None,
            ..pki.files.clone()
        })
    })
    .await;
    wait_serving_over(server.addr, &pki.client(None)).await;

    let plaintext = health_over(server.addr, None).await;
    assert!(plaintext.is_err(), "plaintext answered: {plaintext:?}");
    let untrusting = ClientTlsConfig::new().domain_name("localhost");
    let refused = health_over(server.addr, Some(untrusting)).await;
    assert!(
        refused.is_err(),
        "a client without the CA connected: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_serves_only_clients_with_a_certificate_from_its_ca() {
    let pki = Pki::new();
    let server = spawn(|config| config.transport.tls = Some(pki.files.clone())).await;
    wait_serving_over(server.addr, &pki.client(Some(&pki.client))).await;

    for (who, identity) in [("no", None), ("a stranger's", Some(&pki.stranger))] {
        let refused = health_over(server.addr, Some(pki.client(identity))).await;
        assert!(
            refused.is_err(),
            "{who} client certificate was served: {refused:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_wait_until_one_closes() {
    let server = TestServer::start_with(|config| config.transport.max_connections = 2).await;
    let url = server.url();
    let connect = || async {
        let channel = Channel::from_shared(url.clone()).unwrap().connect_lazy();
        CheckoutServiceClient::new(channel)
    };
    let list = |timeout: Duration| {
        let mut request = tonic::Request::new(ListProductsRequest::default());
        request.set_timeout(timeout);
        request
    };
    // Two connections in use (patiently: the health check's connection may still be
    // closing).
    let mut first = connect().await;
    let mut second = connect().await;
    first
        .list_products(list(Duration::from_secs(20)))
        .await
        .unwrap();
    second
        .list_products(list(Duration::from_secs(20)))
        .await
        .unwrap();

    let mut third = connect().await;
    let waiting = third.list_products(list(Duration::from_secs(20)));
    let waited = tokio::time::timeout(Duration::from_millis(500), waiting).await;
    assert!(waited.is_err(), "a third connection was served: {waited:?}");

    drop(first);
    third
        .list_products(list(Duration::from_secs(20)))
        .await
        .expect("served once a connection closed");
    second
        .list_products(list(Duration::from_secs(5)))
        .await
        .unwrap();
}

/// An HTTP/2 connection made with h2 directly, to see the server's settings and frames.
async fn h2_connect(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    (client, tokio::spawn(connection))
}

/// A gRPC health check as raw HTTP/2: the request's headers and its one empty message.
async fn h2_health_check(client: &mut h2::client::SendRequest<bytes::Bytes>) -> http::StatusCode {
    let request = health_request();
    let (response, mut body) = client.send_request(request, false).unwrap();
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    response.await.unwrap().status()
}

/// The headers of a gRPC call to Health/Check.
fn health_request() -> http::Request<()> {
    http::Request::post("http://localhost/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_connection_is_told_the_stream_limit() {
    let server = TestServer::start_with(|config| config.transport.max_concurrent_streams = 7).await;
    let (client, _connection) = h2_connect(server.addr).await;
    let mut client = client.ready().await.unwrap();

    // The answer comes after the server's settings took effect.
    assert_eq!(h2_health_check(&mut client).await, http::StatusCode::OK);

    assert_eq!(client.current_max_send_streams(), 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_stream_resets_closes_that_connection_only() {
    let server = TestServer::start().await;
    let (client, connection) = h2_connect(server.addr).await;

    // Open streams and reset each at once (the "rapid reset" attack), until the server
    // closes the connection.
    let mut sent = 0;
    let mut client = client;
    while sent < 10_000 {
        let Ok(ready) = client.ready().await else {
            break;
        };
        client = ready;
        let Ok((_, mut body)) = client.send_request(health_request(), false) else {
            break;
        };
        body.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the flooding connection stays open")
        .unwrap();
    // Told why (GOAWAY), or cut off while still writing.
    let error = closed.expect_err("the connection ends in an error");
    let calm_down = error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
    assert!(calm_down || error.is_io(), "{error:?}");
    assert!(sent < 10_000, "all {sent} resets were accepted");

    assert_eq!(server.health().await, ServingStatus::Serving);
}

/// Reads HTTP/2 frames as a peer that acknowledges the server's settings but never
/// answers its pings; returns when the server closes the connection.
async fn ignore_pings_until_closed(mut tcp: TcpStream) {
    let mut header = [0u8; 9];
    loop {
        if tcp.read_exact(&mut header).await.is_err() {
            return;
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; length];
        if tcp.read_exact(&mut payload).await.is_err() {
            return;
        }
        let (kind, flags) = (header[3], header[4]);
        const SETTINGS: u8 = 4;
        if kind == SETTINGS && flags & 1 == 0 {
            let ack = [0, 0, 0, SETTINGS, 1, 0, 0, 0, 0];
            if tcp.write_all(&ack).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_stops_answering_pings_is_disconnected() {
    let server = TestServer::start_with(|config| {
        config.transport.keepalive_interval = Duration::from_millis(300);
        config.transport.keepalive_timeout = Duration::from_millis(300);
    })
    .await;

    // A live peer (h2 answers pings by itself) keeps its connection.
    let (client, live) = h2_connect(server.addr).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !live.is_finished(),
        "a peer answering pings was disconnected"
    );
    drop(client);

    // A silent one is dropped.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), ignore_pings_until_closed(tcp))
        .await
        .expect("a peer ignoring pings stays connected");
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_peers_holding_every_connection_slot_are_closed_and_starve_nobody() {
    let server = TestServer::start_with(|config| {
        config.transport.max_connections = 1000;
        config.transport.keepalive_interval = Duration::from_millis(500);
        config.transport.keepalive_timeout = Duration::from_millis(500);
    })
    .await;

    // A thousand peers take every slot: half say nothing, half stop mid-preface.
    let mut silent = Vec::new();
    for peer in 0..1000 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        if peer % 2 == 1 {
            tcp.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        }
        silent.push(tcp);
    }

    // A caller arriving now waits in the backlog only until they are closed.
    let channel = Channel::from_shared(server.url()).unwrap().connect_lazy();
    let mut request = tonic::Request::new(ListProductsRequest::default());
    request.set_timeout(Duration::from_secs(20));
    CheckoutServiceClient::new(channel)
        .list_products(request)
        .await
        .expect("served once the silent peers are closed");
    // Each was closed (after the server's settings, the most it had to say).
    for (peer, tcp) in silent.iter_mut().enumerate() {
        let closed =
            tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut vec![])).await;
        assert!(closed.is_ok(), "silent peer {peer} still connected");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_over_the_size_limit_is_refused_and_changes_nothing() {
    let server =
        TestServer::start_with(|config| config.transport.max_message_bytes = 8 * 1024).await;
    let product = server.product("ticket", 100, 10).await;
    let mut checkout = server.checkout().await;

    let refused = checkout
        .create_hold(CreateHoldRequest {
            product_id: product.id.clone(),
            qty: 1,
            client_request_id: "k".repeat(16 * 1024),
            ..Default::default()
        })
        .await
        .expect_err("an oversized request is refused");

    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert_counters(&server, &product, Counters::stock(10).reserved(0).sold(0)).await;

    // A watch naming one product 100,000 times is never read, let alone held.
    let watch = WatchAvailabilityRequest {
        product_ids: vec![product.id.clone(); 100_000],
    };
    let refused = checkout
        .watch_availability(watch)
        .await
        .map(drop)
        .expect_err("an oversized watch is refused");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert_eq!(server.hub.open_streams(), 0);
}

/// CPU time (user and system) a process has used, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_file_descriptors_the_server_pauses_accepting_and_recovers() {
    let db = TestDb::new().await;
    let server = ServerProcess::start_limited(&db.url, &[], Some(96)).await;
    let addr: SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    let mut served = server.checkout().await;

    // Far more connections than descriptors left: the rest wait in the backlog, and every
    // accept the server tries fails with EMFILE.
    let mut crowd = Vec::new();
    for _ in 0..200 {
        crowd.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_time(server.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_time(server.pid()) - before;
    assert!(
        spent < Duration::from_millis(500),
        "spun on accept: {spent:?} of CPU in 2 s"
    );
    // A connection made before keeps being served.
    served
        .list_products(ListProductsRequest::default())
        .await
        .expect("an open connection is still served");

    drop(crowd);
    tokio::time::timeout(Duration::from_secs(10), server.wait_serving())
        .await
        .expect("accepting again once descriptors are free");
    server.stop().await;
}
