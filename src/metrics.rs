//! Prometheus metrics, served on `FLASHSALE_METRICS_ADDR` at `/metrics`.
//!
//! The gRPC series use the go-grpc-prometheus names (`grpc_server_started_total`,
//! `grpc_server_handled_total`, `grpc_server_handling_seconds`); the rest are
//! `flashsale_*`. Counters count what committed, in this process; every process serves its
//! own. Without an address nothing is recorded (the `metrics` facade's calls do nothing).

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Seconds a call may take, as the handling histogram's buckets.
const HANDLING_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Requests per batch, as the batch-size histograms' buckets.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Starts recording and serving the metrics on `addr` (path `/metrics`).
pub fn install(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full("grpc_server_handling_seconds".into()),
            &HANDLING_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &BATCH_BUCKETS)?
        .install()
}

/// The gRPC series of one method's calls. Each is registered on its first use, then kept,
/// so a call only bumps atomics instead of looking its labels up in the registry.
pub struct CallSeries {
    /// The `grpc_service` label.
    service: &'static str,
    /// The `grpc_method` label.
    method: &'static str,
    /// `grpc_server_started_total`.
    started: OnceLock<Counter>,
    /// `grpc_server_handled_total`, one per status code.
    handled: [OnceLock<Counter>; CODE_NAMES.len()],
    /// `grpc_server_handling_seconds`.
    seconds: OnceLock<Histogram>,
}

impl CallSeries {
    /// The series of `method` of `service` (registered when first used).
    pub fn new(service: &'static str, method: &'static str) -> CallSeries {
        CallSeries {
            service,
            method,
            started: OnceLock::new(),
            handled: std::array::from_fn(|_| OnceLock::new()),
            seconds: OnceLock::new(),
        }
    }

    /// A call began.
    pub fn started(&self) {
        let (service, method) = (self.service, self.method);
        self.started
            .get_or_init(|| {
                counter!("grpc_server_started_total", "grpc_service" => service, "grpc_method" => method)
            })
            .increment(1);
        in_flight().increment(1.0);
    }

    /// A call ended with gRPC status `code` after `elapsed`.
    pub fn handled(&self, code: i32, elapsed: Duration) {
        let index = usize::try_from(code)
            .ok()
            .filter(|index| *index < CODE_NAMES.len())
            .unwrap_or(UNKNOWN_CODE);
        let (service, method) = (self.service, self.method);
        self.handled[index]
            .get_or_init(|| {
                counter!(
                    "grpc_server_handled_total",
                    "grpc_service" => service,
                    "grpc_method" => method,
                    "grpc_code" => CODE_NAMES[index]
                )
            })
            .increment(1);
        self.seconds
            .get_or_init(|| {
                histogram!("grpc_server_handling_seconds", "grpc_service" => service, "grpc_method" => method)
            })
            .record(elapsed.as_secs_f64());
        in_flight().decrement(1.0);
    }
}

/// `flashsale_in_flight_requests`: calls begun and not yet handled.
fn in_flight() -> &'static Gauge {
    static IN_FLIGHT: OnceLock<Gauge> = OnceLock::new();
    IN_FLIGHT.get_or_init(|| gauge!("flashsale_in_flight_requests"))
}

/// Holds a batch granted (committed).
pub fn holds_created(count: usize) {
    counter!("flashsale_holds_created_total").increment(count as u64);
}

/// A hold request refused, for `reason` (an ErrorInfo reason).
pub fn hold_rejected(reason: &'static str) {
    counter!("flashsale_holds_rejected_total", "reason" => reason).increment(1);
}

/// Holds the reaper expired (committed).
pub fn holds_expired(count: usize) {
    counter!("flashsale_holds_expired_total").increment(count as u64);
}

/// A hold released (committed).
pub fn hold_released() {
    counter!("flashsale_holds_released_total").increment(1);
}

/// Orders that reached a final status (`paid`, `cancelled`).
pub fn orders_final(status: &'static str, count: usize) {
    counter!("flashsale_orders_total", "status" => status).increment(count as u64);
}

/// A webhook delivery answered with `outcome`.
pub fn webhook(outcome: &'static str) {
    counter!("flashsale_webhooks_total", "outcome" => outcome).increment(1);
}

/// The size of a batch, in the histogram `metric` (one per kind of batch).
pub fn batch_size(metric: &'static str, size: usize) {
    histogram!(metric).record(size as f64);
}

/// Open WatchAvailability streams.
pub fn watch_streams(open: usize) {
    gauge!("flashsale_watch_streams").set(open as f64);
}

/// The age of the oldest hold past its expiry (0 when none).
pub fn reaper_lag(lag: Duration) {
    gauge!("flashsale_reaper_lag_seconds").set(lag.as_secs_f64());
}

/// The pool's connections by state.
pub fn pool_connections(in_use: usize, idle: usize, waiting: usize) {
    for (state, count) in [("in_use", in_use), ("idle", idle), ("waiting", waiting)] {
        gauge!("flashsale_db_pool_connections", "state" => state).set(count as f64);
    }
}

/// The gRPC status codes by their go-grpc-prometheus names, in code order.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The index of `Unknown` in [`CODE_NAMES`], for a code outside it.
const UNKNOWN_CODE: usize = 2;
