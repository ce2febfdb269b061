//! Statistics of a run: per-RPC latency histograms (microseconds) and status counts, kept
//! by each client task on its own and merged at the end, plus the once-a-second progress
//! line fed by shared relaxed counters.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinHandle;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Highest latency the histograms track, in microseconds; longer ones count as this.
const MAX_LATENCY_MICROS: u64 = 600_000_000;
/// Significant decimal digits the histograms keep (0.1% resolution).
const SIGNIFICANT_DIGITS: u8 = 3;
/// The outcome label of a successful call.
pub const OK: &str = "OK";

/// The kinds of call a scenario makes; each gets its own histogram and status counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rpc {
    CreateHold,
    ReleaseHold,
    CreateOrder,
    HandlePaymentWebhook,
    AdjustStock,
    WatchAvailability,
    HealthCheck,
}

impl Rpc {
    /// The method name as in the proto.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::CreateHold => "CreateHold",
            Rpc::ReleaseHold => "ReleaseHold",
            Rpc::CreateOrder => "CreateOrder",
            Rpc::HandlePaymentWebhook => "HandlePaymentWebhook",
            Rpc::AdjustStock => "AdjustStock",
            Rpc::WatchAvailability => "WatchAvailability",
            Rpc::HealthCheck => "Health/Check",
        }
    }
}

/// The command-line spelling of a value-enum option (`round-robin`).
pub fn option_name(value: &impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |possible| possible.get_name().to_owned())
}

/// An empty latency histogram in microseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Adds one latency to a histogram, clamped to its range.
pub fn record_latency(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros);
}

/// Prints `latency <what>: p50 .. p95 .. p99 .. max ..` in milliseconds.
pub fn print_latency(what: &str, histogram: &Histogram<u64>) {
    let ms = |micros: u64| micros as f64 / 1000.0;
    println!(
        "latency {what}: p50 {:.2} ms p95 {:.2} ms p99 {:.2} ms max {:.2} ms ({} samples)",
        ms(histogram.value_at_quantile(0.50)),
        ms(histogram.value_at_quantile(0.95)),
        ms(histogram.value_at_quantile(0.99)),
        ms(histogram.max()),
        histogram.len(),
    );
}

/// The label a failed call is counted under: the code, and the `ErrorInfo` reason when it
/// says more (`FAILED_PRECONDITION/INSUFFICIENT_STOCK`).
pub fn outcome_label(status: &Status) -> String {
    let code = code_name(status.code());
    match status.get_details_error_info() {
        Some(info) if !info.reason.is_empty() && info.reason != code => {
            format!("{code}/{}", info.reason)
        }
        _ => code.to_owned(),
    }
}

/// Whether a status carries `ErrorInfo` with this reason.
pub fn has_reason(status: &Status, reason: &str) -> bool {
    status
        .get_details_error_info()
        .is_some_and(|info| info.reason == reason)
}

/// A status code as gRPC spells it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One client's latency histograms and status counts; merged into one at the end.
pub struct Recorder {
    /// Latency of every call of each kind the server took on (failures included), in
    /// microseconds.
    latency: BTreeMap<Rpc, Histogram<u64>>,
    /// Latency of the calls refused at the door (RESOURCE_EXHAUSTED: the in-flight limit).
    refused: BTreeMap<Rpc, Histogram<u64>>,
    /// Calls of each kind by outcome label (`OK`, `FAILED_PRECONDITION/INSUFFICIENT_STOCK`).
    outcomes: BTreeMap<Rpc, BTreeMap<String, u64>>,
    /// The shared counters the progress line reads.
    progress: Arc<Progress>,
}

impl Recorder {
    /// An empty recorder feeding `progress`.
    pub fn new(progress: Arc<Progress>) -> Self {
        Recorder {
            latency: BTreeMap::new(),
            refused: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            progress,
        }
    }

    /// Records a call that started at `started` and just returned `result`.
    pub fn record<T>(&mut self, rpc: Rpc, started: Instant, result: &Result<T, Status>) {
        self.record_elapsed(rpc, started.elapsed(), result);
    }

    /// Records a call that took `elapsed` and returned `result`.
    pub fn record_elapsed<T>(&mut self, rpc: Rpc, elapsed: Duration, result: &Result<T, Status>) {
        let latencies = match result {
            Err(status) if status.code() == Code::ResourceExhausted => &mut self.refused,
            _ => &mut self.latency,
        };
        record_latency(latencies.entry(rpc).or_insert_with(histogram), elapsed);
        match result {
            Ok(_) => self.count(rpc, OK),
            Err(status) => self.count(rpc, &outcome_label(status)),
        }
        self.progress.add(result.is_ok());
    }

    /// Counts one call of `rpc` under `label`.
    fn count(&mut self, rpc: Rpc, label: &str) {
        let counts = self.outcomes.entry(rpc).or_default();
        match counts.get_mut(label) {
            Some(count) => *count += 1,
            None => {
                counts.insert(label.to_owned(), 1);
            }
        }
    }

    /// Adds another client's figures to these.
    pub fn merge(&mut self, other: Recorder) {
        merge_histograms(&mut self.latency, other.latency);
        merge_histograms(&mut self.refused, other.refused);
        for (rpc, counts) in other.outcomes {
            let mine = self.outcomes.entry(rpc).or_default();
            for (label, count) in counts {
                *mine.entry(label).or_default() += count;
            }
        }
    }

    /// Calls of `rpc` counted under `label`.
    pub fn calls(&self, rpc: Rpc, label: &str) -> u64 {
        self.outcomes
            .get(&rpc)
            .and_then(|counts| counts.get(label))
            .copied()
            .unwrap_or(0)
    }

    /// Successful calls of `rpc`.
    pub fn ok(&self, rpc: Rpc) -> u64 {
        self.calls(rpc, OK)
    }

    /// All calls of `rpc`, whatever their outcome.
    pub fn total(&self, rpc: Rpc) -> u64 {
        self.outcomes
            .get(&rpc)
            .map_or(0, |counts| counts.values().sum())
    }

    /// The latency of `rpc` at `quantile` (0.5, 0.99), if any call was recorded.
    pub fn latency_at(&self, rpc: Rpc, quantile: f64) -> Option<Duration> {
        let histogram = self.latency.get(&rpc)?;
        Some(Duration::from_micros(histogram.value_at_quantile(quantile)))
    }

    /// Prints one latency line and one status line per kind of call.
    pub fn print(&self) {
        for (rpc, histogram) in &self.latency {
            print_latency(rpc.name(), histogram);
        }
        for (rpc, histogram) in &self.refused {
            print_latency(
                &format!("{} refused (RESOURCE_EXHAUSTED)", rpc.name()),
                histogram,
            );
        }
        for (rpc, counts) in &self.outcomes {
            // OK first, then the failures in label order.
            let ok = counts.get_key_value(OK).into_iter();
            let failed = counts.iter().filter(|(label, _)| label.as_str() != OK);
            let listed: Vec<String> = ok
                .chain(failed)
                .map(|(label, count)| format!("{label}: {count}"))
                .collect();
            println!("status {}: {}", rpc.name(), listed.join("; "));
        }
    }
}

/// Adds the histograms of `theirs` to `mine`, kind by kind.
fn merge_histograms(
    mine: &mut BTreeMap<Rpc, Histogram<u64>>,
    theirs: BTreeMap<Rpc, Histogram<u64>>,
) {
    for (rpc, theirs) in theirs {
        let mine = mine.entry(rpc).or_insert_with(histogram);
        // Same bounds on both sides, so adding cannot fail; saturate if it ever did.
        if mine.add(&theirs).is_err() {
            for value in theirs.iter_recorded() {
                mine.saturating_record_n(value.value_iterated_to(), value.count_at_value());
            }
        }
    }
}

/// Counters every client bumps after each call; only the progress line reads them.
#[derive(Debug, Default)]
pub struct Progress {
    /// Successful calls (or received messages) so far.
    ok: AtomicU64,
    /// Failed calls so far.
    failed: AtomicU64,
}

impl Progress {
    /// Counts one call.
    pub fn add(&self, ok: bool) {
        let counter = if ok { &self.ok } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `count` successful calls (or received messages) at once.
    pub fn add_ok(&self, count: u64) {
        self.ok.fetch_add(count, Ordering::Relaxed);
    }

    /// (successful, failed) so far.
    fn read(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The once-a-second progress line on stderr; stops when dropped. Silent unless stderr
/// is a terminal, so piped output holds only the summary.
pub struct Ticker {
    /// The printing task, if stderr is a terminal.
    task: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts printing `<label>: <secs> s, <ok> ok (<rate>/s), <failed> failed`.
    pub fn start(label: &'static str, progress: Arc<Progress>) -> Ticker {
        if !std::io::stderr().is_terminal() {
            return Ticker { task: None };
        }
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            interval.tick().await;
            let mut last = 0;
            loop {
                interval.tick().await;
                let (ok, failed) = progress.read();
                eprintln!(
                    "{label}: {:.0} s, {ok} ok ({}/s), {failed} failed",
                    started.elapsed().as_secs_f64(),
                    ok - last,
                );
                last = ok;
            }
        });
        Ticker { task: Some(task) }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// `count` per second over `elapsed`.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorders_merge_counts_and_latencies() {
        let progress = Arc::new(Progress::default());
        let mut first = Recorder::new(progress.clone());
        let mut second = Recorder::new(progress.clone());
        let ok: Result<(), Status> = Ok(());
        let refused: Result<(), Status> = Err(Status::failed_precondition("no"));
        first.record_elapsed(Rpc::CreateHold, Duration::from_millis(1), &ok);
        second.record_elapsed(Rpc::CreateHold, Duration::from_millis(3), &ok);
        second.record_elapsed(Rpc::CreateHold, Duration::from_millis(2), &refused);
        first.merge(second);
        assert_eq!(first.ok(Rpc::CreateHold), 2);
        assert_eq!(first.calls(Rpc::CreateHold, "FAILED_PRECONDITION"), 1);
        assert_eq!(first.total(Rpc::CreateHold), 3);
        assert_eq!(first.latency[&Rpc::CreateHold].len(), 3);
        assert_eq!(progress.read(), (2, 1));
    }
}
