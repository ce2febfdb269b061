//! `health-checks`: many clients call `grpc.health.v1.Health/Check`, which touches no
//! database: the ceiling of one gRPC call through this server and this load driver on this
//! machine, to hold the other scenarios' rates against.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::task::JoinSet;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::conn::{Connection, Server, connect};
use super::stats::{Progress, Recorder, Rpc, Ticker, per_second};
use super::{Crowd, DEFAULT_DURATION, LoadError};

/// Options of `flashsale-tools load health-checks`.
#[derive(Debug, Clone, Args)]
pub struct HealthChecksArgs {
    /// Clients and connections.
    #[command(flatten)]
    pub crowd: Crowd,
    /// How long to run.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

/// The headline figures of a health-check run, for `flashsale-tools bench`.
#[derive(Debug, Clone, Copy)]
pub struct HealthFigures {
    /// Calls answered.
    pub calls: u64,
    /// Calls answered per second.
    pub calls_per_second: f64,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// `flashsale-tools load health-checks`.
pub async fn run(server: &Server, args: HealthChecksArgs) -> Result<HealthFigures, LoadError> {
    let connections = connect(server, args.crowd.connections).await?;
    let duration = args.duration.unwrap_or(DEFAULT_DURATION);
    let progress = Arc::new(Progress::default());
    let _ticker = Ticker::start("health-checks", progress.clone());
    let started = Instant::now();
    let until = started + duration;
    let mut clients = JoinSet::new();
    for index in 0..args.crowd.clients {
        let connection = connections[index % connections.len()].clone();
        let recorder = Recorder::new(progress.clone());
        clients.spawn(check_until(connection, recorder, until));
    }
    let mut recorder = Recorder::new(progress);
    while let Some(joined) = clients.join_next().await {
        recorder.merge(joined.map_err(|error| format!("a client task failed: {error}"))?);
    }
    let elapsed = started.elapsed();
    let ok = recorder.ok(Rpc::HealthCheck);
    println!(
        "health-checks: {} clients over {} connections, {:.1} s",
        args.crowd.clients,
        args.crowd.connections,
        elapsed.as_secs_f64()
    );
    println!("throughput: {:.0} calls/s", per_second(ok, elapsed));
    recorder.print();
    if ok < recorder.total(Rpc::HealthCheck) {
        return Err("some health checks failed".into());
    }
    Ok(HealthFigures {
        calls: ok,
        calls_per_second: per_second(ok, elapsed),
        p99: recorder
            .latency_at(Rpc::HealthCheck, 0.99)
            .unwrap_or_default(),
    })
}

/// One client: Health/Check after Health/Check until `until`.
async fn check_until(connection: Connection, mut recorder: Recorder, until: Instant) -> Recorder {
    let mut health = HealthClient::new(connection);
    while Instant::now() < until {
        let started = Instant::now();
        let answer = health.check(HealthCheckRequest::default()).await;
        recorder.record(Rpc::HealthCheck, started, &answer);
    }
    recorder
}
