//! Database outages the server lives through without a restart of its own: PostgreSQL
//! stopped, or killed outright, in the middle of a run and started again. Meanwhile calls
//! fail fast with UNAVAILABLE and health says NOT_SERVING; afterwards the pool, the change
//! feed, the reaper and the batch lanes recover by themselves, and open streams converge on
//! the true state. A crowd's purchases acknowledged before the database was killed are
//! there after it recovers. Connections killed in the middle of their transactions leave
//! each all or nothing.

use std::path::Path;
use std::time::Duration;

use flashsale::config::ServerConfig;
use flashsale::grpc::pb::{
    AvailabilityUpdate, GetProductRequest, HoldStatus, WatchAvailabilityRequest,
};
use flashsale::local_pg::{LocalPostgres, LocalPostgresOptions};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::codec::Streaming;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::crash::Crowd;
use crate::support::{
    Counters, ServerProcess, TestDb, TestServer, assert_counters, assert_status, cluster_processes,
    count, eventually, get_hold, hold, signal_all, test_config, try_hold,
};

/// How the database goes away.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// A fast shutdown: PostgreSQL closes every connection and stops.
    Stop,
    /// Every process of the cluster killed (SIGKILL): the next start recovers from its WAL.
    Crash,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_stopped_mid_run_and_started_again_is_served_again_by_itself() {
    survives(Outage::Stop).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_killed_mid_run_and_started_again_is_served_again_by_itself() {
    survives(Outage::Crash).await;
}

/// Runs the server on a cluster of the test's own, takes the cluster away with `outage`
/// while a hold is active and a stream is open, then brings it back.
async fn survives(outage: Outage) {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, server) = serve_on_own_cluster(dir.path(), |config| {
        config.hold_ttl = Duration::from_secs(2);
    })
    .await;
    let product = server.product("ticket", 100, 10).await;
    let mut checkout = server.checkout().await;
    let mut stream = checkout
        .watch_availability(WatchAvailabilityRequest {
            product_ids: vec![product.id.clone()],
        })
        .await
        .expect("watch")
        .into_inner();
    // Expires while the database is away: only the reaper after the outage can end it.
    let stranded = hold(&mut checkout, &product.id, 2).await;
    until_shown(&mut stream, 8).await;

    match outage {
        Outage::Stop => cluster.stop().await.expect("stop the cluster"),
        Outage::Crash => {
            signal_all(&cluster_processes(&cluster), libc::SIGKILL);
            drop(cluster);
        }
    }
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        checkout.get_product(GetProductRequest {
            product_id: product.id.clone(),
        }),
    )
    .await
    .expect("a read answers while the database is away");
    assert_status(read, Code::Unavailable, "DATABASE_UNAVAILABLE");
    let write = tokio::time::timeout(
        Duration::from_secs(10),
        try_hold(&mut checkout, &product.id, 1, None),
    )
    .await
    .expect("a hold answers while the database is away");
    assert_status(write, Code::Unavailable, "DATABASE_UNAVAILABLE");
    eventually("NOT_SERVING while the database is away", || async {
        server.health().await == ServingStatus::NotServing
    })
    .await;
    crate::support::sleep_past(stranded.expires_at).await;

    let cluster = LocalPostgres::start(own_cluster(dir.path()))
        .await
        .expect("the cluster starts again");
    eventually("SERVING again", || async {
        server.health().await == ServingStatus::Serving
    })
    .await;
    // The batch lanes serve again (a first call may still meet a connection from before;
    // the retries share a key, so they make one hold at most).
    eventually("holds served again", || {
        let (mut checkout, id) = (checkout.clone(), product.id.clone());
        async move {
            try_hold(&mut checkout, &id, 1, Some("after-the-outage"))
                .await
                .is_ok()
        }
    })
    .await;
    // The reaper ends the hold that expired while the database was away...
    eventually("the stranded hold expires", || {
        let (mut checkout, id) = (checkout.clone(), stranded.hold_id.clone());
        async move { get_hold(&mut checkout, &id).await.status() == HoldStatus::Expired }
    })
    .await;
    // ...and the stream opened before the outage hears the true state after it: 10 units,
    // the one held after the outage.
    until_shown(&mut stream, 9).await;
    server.assert_consistent().await;
    server.stop().await.unwrap();
    cluster.stop().await.unwrap();
}

/// A durable cluster (what a commit acknowledged must survive a crash) in `dir`.
fn own_cluster(dir: &Path) -> LocalPostgresOptions {
    LocalPostgresOptions {
        durable: true,
        ..LocalPostgresOptions::throwaway(dir.join("pg"))
    }
}

/// The server (`adjust`ed) on a cluster of the test's own in `dir`, serving; calls fail
/// within a second of the database going away.
async fn serve_on_own_cluster(
    dir: &Path,
    adjust: impl FnOnce(&mut ServerConfig),
) -> (LocalPostgres, TestServer) {
    let cluster = LocalPostgres::start(own_cluster(dir))
        .await
        .expect("the test's own cluster");
    let db = TestDb::on_own_cluster(cluster.url("postgres"));
    let mut config = test_config(&db.url);
    config.db_timeout = Duration::from_secs(1);
    adjust(&mut config);
    let server = TestServer::spawn(config, db).await;
    server.wait_serving().await;
    (cluster, server)
}

/// Reads `stream` until it shows `available` units.
async fn until_shown(stream: &mut Streaming<AvailabilityUpdate>, available: i64) {
    let shown = async {
        loop {
            let update = stream
                .message()
                .await
                .expect("the stream stays healthy")
                .expect("the stream stays open");
            if update.available == available {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), shown)
        .await
        .unwrap_or_else(|_| panic!("the stream never showed {available} available"));
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_stops_and_says_so_when_its_private_database_dies() {
    let dir = tempfile::tempdir().unwrap();
    let (pg_data_dir, log) = (dir.path().join("pg"), dir.path().join("serve.log"));
    let mut server = ServerProcess::start_private(&pg_data_dir, &log).await;

    let postmaster: libc::pid_t = std::fs::read_to_string(pg_data_dir.join("postmaster.pid"))
        .expect("the private postgresql runs")
        .lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .expect("postmaster.pid starts with the pid");
    // SAFETY: kill(2) on the postmaster the server started for this test.
    unsafe { libc::kill(postmaster, libc::SIGKILL) };

    let status = server
        .exited_within(Duration::from_secs(30))
        .await
        .expect("the server stops instead of serving on");
    assert!(
        !status.success(),
        "exited with {status}, as if all were well"
    );
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("the private postgresql exited"),
        "the log does not say why it stopped:\n{said}"
    );
}

/// Buyers in the crowd whose connections are killed under them.
const CUT_OFF_BUYERS: usize = 60;

#[tokio::test(flavor = "multi_thread")]
async fn connections_killed_mid_transaction_leave_all_or_nothing() {
    let server = TestServer::start().await;
    let product = server.product("drop", 100, CUT_OFF_BUYERS as i64).await;

    // While the crowd buys, every statement or transaction in progress is killed.
    let stop = CancellationToken::new();
    let killer = tokio::spawn(kill_busy_backends(server.db.url.clone(), stop.clone()));
    let arrivals = Duration::from_millis(20);
    let crowd = Crowd::arrive(
        CUT_OFF_BUYERS,
        arrivals,
        vec![server.url()],
        &product.id,
        unavailable,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let killed = killer.await.unwrap();
    assert!(killed > 0, "no transaction was cut off");

    // Retried with the same keys, each buyer bought once; nothing half-applied remains.
    assert_eq!(crowd.finish().await.paid.len(), CUT_OFF_BUYERS);
    let stock = CUT_OFF_BUYERS as i64;
    assert_counters(
        &server,
        &product,
        Counters::stock(stock).reserved(0).sold(stock),
    )
    .await;
    let payments = "SELECT count(*) AS count FROM payment_events";
    assert_eq!(
        count(&server.db.url, payments).await,
        stock,
        "one payment per key"
    );
    server.assert_consistent().await;
}

/// Whether a call failed as a killed database connection should fail it.
fn unavailable(status: &tonic::Status) -> bool {
    status.code() == Code::Unavailable
}

/// Until `stop`, kills every backend of the database in the middle of a statement or a
/// transaction; returns how many it killed.
async fn kill_busy_backends(database_url: String, stop: CancellationToken) -> i64 {
    // OFFSET 0 keeps the filter from being applied after the kill.
    let kill = "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS count \
                FROM (SELECT pid FROM pg_stat_activity \
                      WHERE datname = current_database() AND pid <> pg_backend_pid() \
                      AND state IN ('active', 'idle in transaction') OFFSET 0) busy";
    let mut killed = 0;
    while !stop.is_cancelled() {
        killed += count(&database_url, kill).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killed
}

/// Buyers in the crowd whose database is killed under them.
const CRASHED_BUYERS: usize = 120;
/// Payments acknowledged before the database is killed.
const PAID_BEFORE_THE_CRASH: usize = 40;

#[tokio::test(flavor = "multi_thread")]
async fn a_database_killed_under_a_crowd_keeps_every_acknowledged_purchase() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, server) = serve_on_own_cluster(dir.path(), |_| {}).await;
    let product = server.product("drop", 100, CRASHED_BUYERS as i64).await;
    let arrivals = Duration::from_millis(10);
    let crowd = Crowd::arrive(
        CRASHED_BUYERS,
        arrivals,
        vec![server.url()],
        &product.id,
        unavailable,
    );

    // Mid-crowd, every process of the cluster dies at once; it recovers from its WAL.
    crowd.paid(PAID_BEFORE_THE_CRASH).await;
    let before = std::mem::take(&mut *crowd.acknowledged.lock().unwrap());
    signal_all(&cluster_processes(&cluster), libc::SIGKILL);
    drop(cluster);
    let cluster = LocalPostgres::start(own_cluster(dir.path()))
        .await
        .expect("the cluster starts again");
    let after = crowd.finish().await.paid.len();

    // What was acknowledged before the crash is there; every buyer bought once in the end.
    before.assert_bought(&mut server.checkout().await).await;
    assert_eq!(
        before.paid.len() + after,
        CRASHED_BUYERS,
        "every buyer paid in the end"
    );
    let stock = CRASHED_BUYERS as i64;
    assert_counters(
        &server,
        &product,
        Counters::stock(stock).reserved(0).sold(stock),
    )
    .await;
    server.assert_consistent().await;
    server.stop().await.unwrap();
    cluster.stop().await.unwrap();
}
