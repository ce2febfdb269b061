//! `watchers`: the streaming benchmark. Opens thousands of `WatchAvailability` streams on
//! one product, waits until each has its initial state, then drives stock changes at a
//! fixed rate (AdjustStock +1, -1, ...) and measures how long each change takes to reach
//! every watcher. The correctness check: every stream ends on the last change's version.
//!
//! A watcher "has" change `i` from the first update it receives whose version is at least
//! change `i`'s version: slow readers may skip states (counted as missed versions), but a
//! later state supersedes the skipped one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};

use super::checks::Checks;
use super::conn::{Connection, Server, connect, create_products};
use super::procfs;
use super::stats::{Progress, Recorder, Rpc, Ticker, histogram, per_second, record_latency};
use super::{LoadError, positive, run_id};
use flashsale::grpc::pb::{
    self, checkout_service_client::CheckoutServiceClient,
    inventory_admin_service_client::InventoryAdminServiceClient,
};

/// Opening attempts of one stream while the server answers UNAVAILABLE.
const OPEN_ATTEMPTS: u32 = 5;
/// Pause before retrying an UNAVAILABLE open.
const OPEN_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Updates a watcher receives before adding them to the shared progress counter.
const PROGRESS_BATCH: u64 = 64;
/// How often the coordinator looks at the watchers while waiting for them.
const POLL: Duration = Duration::from_millis(20);

/// Options of `flashsale-tools load watchers`.
#[derive(Debug, Clone, Args)]
pub struct WatchersArgs {
    /// Concurrent WatchAvailability streams on the product.
    #[arg(long, default_value_t = 10_000, value_parser = positive)]
    pub streams: usize,
    /// HTTP/2 connections the streams are spread over (raised to streams divided by
    /// --streams-per-connection, rounded up).
    #[arg(long, default_value_t = 100, value_parser = positive)]
    pub connections: usize,
    /// Most streams opened on one connection.
    #[arg(long, default_value_t = 100, value_parser = positive)]
    pub streams_per_connection: usize,
    /// Stock changes to drive (AdjustStock +1, -1, +1, ...).
    #[arg(long, default_value_t = 200, value_parser = positive)]
    pub changes: usize,
    /// Stock changes per second.
    #[arg(long, default_value_t = 20.0, value_parser = positive_rate)]
    pub rate: f64,
    /// Units the watched product starts with.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(i64).range(0..))]
    pub stock: i64,
    /// Streams being opened at once (each open reads the product from the database).
    #[arg(long, default_value_t = 500, value_parser = positive)]
    pub open_concurrency: usize,
    /// Longest wait for all streams to open, and again for all to reach the final version.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub settle_timeout: Duration,
    /// The server's process id: report its memory per stream and its CPU while driving.
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// Parses a rate: a positive, finite number.
fn positive_rate(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|error| format!("{error}"))?;
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err("must be a positive number".into())
    }
}

/// `flashsale-tools load watchers`.
pub async fn run(server: &Server, args: WatchersArgs) -> Result<(), LoadError> {
    let limit = procfs::raise_open_file_limit()
        .map_err(|error| format!("cannot raise the open-file limit: {error}"))?;
    let connections = args
        .connections
        .max(args.streams.div_ceil(args.streams_per_connection));
    println!(
        "watchers: {} streams over {connections} connections, {} changes at {}/s (open-file limit {limit})",
        args.streams, args.changes, args.rate
    );
    let control = connect(server, 1).await?.remove(0);
    let (run, _) = run_id();
    let product = create_products(&control, &format!("watchers {run}"), 1, args.stock)
        .await?
        .remove(0);
    let rss_before_connecting = server_rss(args.server_pid)?;
    let crowd_connections = connect(server, connections).await?;
    let rss_before = server_rss(args.server_pid)?;
    let crowd = open(&args, &crowd_connections, &product.id).await?;
    let rss_after = server_rss(args.server_pid)?;
    print_memory(&args, rss_before_connecting, rss_before, rss_after);
    let drive = drive(&args, &control, &product.id, &crowd).await?;
    let reports = settle(&args, crowd).await?;
    report(&args, &control, &product, &drive, &reports).await
}

/// The server's resident memory in KiB, if its pid was given.
fn server_rss(pid: Option<u32>) -> Result<Option<u64>, LoadError> {
    let Some(pid) = pid else { return Ok(None) };
    let rss = procfs::rss_kib(pid)
        .map_err(|error| format!("cannot read the memory of process {pid}: {error}"))?;
    Ok(Some(rss))
}

/// Prints the server's memory before and after the streams, and per stream.
fn print_memory(
    args: &WatchersArgs,
    connecting: Option<u64>,
    before: Option<u64>,
    after: Option<u64>,
) {
    let (Some(connecting), Some(before), Some(after)) = (connecting, before, after) else {
        return;
    };
    let per_stream = (after as f64 - before as f64) / args.streams as f64;
    println!(
        "server memory: rss {connecting} KiB before connecting, {before} KiB with the connections, {after} KiB with {} streams: {per_stream:.2} KiB per stream",
        args.streams
    );
    if after <= before {
        println!(
            "note: rss did not grow: the server's allocator reused memory freed earlier; measure on a fresh server"
        );
    }
}

/// What every watcher task shares with the coordinator.
struct Shared {
    /// Streams that received their initial state.
    initialized: AtomicUsize,
    /// Streams that could not open or died before their initial state.
    failed: AtomicUsize,
    /// Streams opened and updates received, for the progress line.
    progress: Arc<Progress>,
    /// The final version, once the driver knows it; watchers stop when they reach it.
    final_version: watch::Receiver<Option<i64>>,
    /// Stops the watchers that never reach the final version.
    cancel: CancellationToken,
}

/// The open streams and what the coordinator needs to drive and settle them.
struct WatcherCrowd {
    /// The watcher tasks; each returns its report.
    tasks: JoinSet<WatcherReport>,
    /// Shared with the tasks.
    shared: Arc<Shared>,
    /// Announces the final version to the watchers.
    final_version: watch::Sender<Option<i64>>,
    /// Latency and status of the opens (until the initial state).
    opens: Recorder,
}

/// What one watcher saw.
struct WatcherReport {
    /// How the open went: the time to the initial state, or why it failed.
    opened: Result<Duration, Status>,
    /// Every update after the initial one: its version and when it arrived.
    received: Vec<(i64, Instant)>,
    /// For each of those updates, how long after its commit (`changed_at`, by the
    /// database's clock on this machine) it arrived: the fan-out alone, without the write.
    after_commit: Vec<Duration>,
    /// Why the stream ended early, if it did.
    ended: Option<Status>,
}

/// Opens the streams and waits until each has its initial state (or failed).
async fn open(
    args: &WatchersArgs,
    connections: &[Connection],
    product_id: &str,
) -> Result<WatcherCrowd, LoadError> {
    let progress = Arc::new(Progress::default());
    let (final_version, final_receiver) = watch::channel(None);
    let shared = Arc::new(Shared {
        initialized: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        progress: progress.clone(),
        final_version: final_receiver,
        cancel: CancellationToken::new(),
    });
    let permits = Arc::new(Semaphore::new(args.open_concurrency));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for index in 0..args.streams {
        let checkout = CheckoutServiceClient::new(connections[index % connections.len()].clone());
        let watcher = Watcher {
            checkout,
            product_id: product_id.to_owned(),
            shared: shared.clone(),
            capacity: args.changes + 1,
        };
        tasks.spawn(watcher.run(permits.clone()));
    }
    wait_for_opens(args, &shared, started).await?;
    let opened = shared.initialized.load(Ordering::Relaxed);
    println!(
        "open: {opened} streams initialized in {:.2} s ({} failed); latency WatchAvailability below is open to initial state",
        started.elapsed().as_secs_f64(),
        shared.failed.load(Ordering::Relaxed)
    );
    Ok(WatcherCrowd {
        tasks,
        shared,
        final_version,
        opens: Recorder::new(progress),
    })
}

/// Waits until every stream is initialized or failed, printing progress on a terminal.
async fn wait_for_opens(
    args: &WatchersArgs,
    shared: &Shared,
    started: Instant,
) -> Result<(), LoadError> {
    let _ticker = Ticker::start("watchers opening", shared.progress.clone());
    loop {
        let done =
            shared.initialized.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        if done >= args.streams {
            return Ok(());
        }
        if started.elapsed() > args.settle_timeout {
            shared.cancel.cancel();
            return Err(format!(
                "only {done} of {} streams opened within {:?}",
                args.streams, args.settle_timeout
            )
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One watcher: opens its stream, then records every update until the final version.
struct Watcher {
    /// Its stub, on one of the shared connections.
    checkout: CheckoutServiceClient<Connection>,
    /// The watched product.
    product_id: String,
    /// Shared with the coordinator.
    shared: Arc<Shared>,
    /// Updates to expect, to size the record once.
    capacity: usize,
}

impl Watcher {
    /// Opens (holding one of `permits` until the initial state), then watches.
    async fn run(mut self, permits: Arc<Semaphore>) -> WatcherReport {
        let opened = match permits.acquire().await {
            Ok(_permit) => {
                let started = Instant::now();
                self.open().await.map(|opened| (opened, started.elapsed()))
            }
            Err(_) => Err(Status::cancelled("opening stopped")),
        };
        match opened {
            Ok(((stream, initial_version), elapsed)) => {
                self.shared.initialized.fetch_add(1, Ordering::Relaxed);
                self.shared.progress.add(true);
                let mut report = WatcherReport {
                    opened: Ok(elapsed),
                    received: Vec::with_capacity(self.capacity),
                    after_commit: Vec::with_capacity(self.capacity),
                    ended: None,
                };
                report.ended = self.watch(stream, initial_version, &mut report).await;
                report
            }
            Err(status) => {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                self.shared.progress.add(false);
                WatcherReport {
                    opened: Err(status),
                    received: Vec::new(),
                    after_commit: Vec::new(),
                    ended: None,
                }
            }
        }
    }

    /// Opens the stream and reads its initial state; retries while the server is
    /// UNAVAILABLE (e.g. its database pool is busy with other opens).
    async fn open(&mut self) -> Result<(Streaming<pb::AvailabilityUpdate>, i64), Status> {
        let mut attempt = 1;
        loop {
            match self.try_open().await {
                Err(status) if status.code() == Code::Unavailable && attempt < OPEN_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(OPEN_RETRY_PAUSE).await;
                }
                outcome => return outcome,
            }
        }
    }

    /// One attempt at opening the stream and reading its initial state.
    async fn try_open(&mut self) -> Result<(Streaming<pb::AvailabilityUpdate>, i64), Status> {
        let request = pb::WatchAvailabilityRequest {
            product_ids: vec![self.product_id.clone()],
        };
        let mut stream = self
            .checkout
            .watch_availability(request)
            .await?
            .into_inner();
        match stream.next().await {
            Some(Ok(initial)) => Ok((stream, initial.version)),
            Some(Err(status)) => Err(status),
            None => Err(Status::unavailable("stream ended before its initial state")),
        }
    }

    /// Records updates into `report` until the final version, cancellation or the
    /// stream's end; returns why the stream ended early, if it did. The futures it waits
    /// on besides the stream are built once, not per update: ten thousand watchers
    /// re-registering on shared wakers for every message would cost the (co-located)
    /// load generator more CPU than reading the messages.
    async fn watch(
        &self,
        mut stream: Streaming<pb::AvailabilityUpdate>,
        mut latest: i64,
        report: &mut WatcherReport,
    ) -> Option<Status> {
        let cancelled = self.shared.cancel.clone().cancelled_owned();
        let mut announcements = WatchStream::new(self.shared.final_version.clone());
        let mut final_version = None;
        let mut uncounted = 0;
        tokio::pin!(cancelled);
        let ended = loop {
            if final_version.is_some_and(|last| latest >= last) {
                break None;
            }
            tokio::select! {
                biased;
                next = stream.next() => match next {
                    Some(Ok(update)) => {
                        report.received.push((update.version, Instant::now()));
                        report.after_commit.push(since_commit(&update));
                        latest = latest.max(update.version);
                        uncounted += 1;
                        if uncounted == PROGRESS_BATCH {
                            self.shared.progress.add_ok(std::mem::take(&mut uncounted));
                        }
                    }
                    Some(Err(status)) => break Some(status),
                    None => break Some(Status::unavailable("stream ended")),
                },
                announced = announcements.next() => match announced {
                    Some(announced) => final_version = announced,
                    None => break None,
                },
                _ = &mut cancelled => break None,
            }
        };
        self.shared.progress.add_ok(uncounted);
        ended
    }
}

/// What the driver did: one entry per change the server applied.
struct Drive {
    /// Each applied change: the product's version after it and when its request was sent.
    changes: Vec<(i64, Instant)>,
    /// Latency and status counts of the AdjustStock calls.
    recorder: Recorder,
    /// Net units the changes added.
    net_delta: i64,
    /// When the first change was sent.
    started: Instant,
    /// The server's CPU seconds when the drive started, if its pid was given.
    server_cpu: Option<f64>,
    /// This process's CPU seconds when the drive started.
    own_cpu: Option<f64>,
}

/// Sends the stock changes at the configured rate and announces the final version.
async fn drive(
    args: &WatchersArgs,
    control: &Connection,
    product_id: &str,
    crowd: &WatcherCrowd,
) -> Result<Drive, LoadError> {
    let mut admin = InventoryAdminServiceClient::new(control.clone());
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drive = Drive {
        changes: Vec::with_capacity(args.changes),
        recorder: Recorder::new(crowd.shared.progress.clone()),
        net_delta: 0,
        started: Instant::now(),
        server_cpu: server_cpu(args.server_pid)?,
        own_cpu: procfs::cpu_seconds(procfs::own_pid()).ok(),
    };
    let _ticker = Ticker::start("watchers", crowd.shared.progress.clone());
    for index in 0..args.changes {
        ticks.tick().await;
        let delta = if index % 2 == 0 { 1 } else { -1 };
        let request = pb::AdjustStockRequest {
            product_id: product_id.to_owned(),
            delta,
            request_id: String::new(),
        };
        let sent = Instant::now();
        let result = admin.adjust_stock(request).await;
        drive.recorder.record(Rpc::AdjustStock, sent, &result);
        if let Ok(product) = result {
            drive.changes.push((product.get_ref().version, sent));
            drive.net_delta += delta;
        }
    }
    let Some(&(last, _)) = drive.changes.last() else {
        crowd.shared.cancel.cancel();
        return Err("no stock change was applied".into());
    };
    // Nobody listening any more is fine: every watcher already stopped.
    let _ = crowd.final_version.send(Some(last));
    Ok(drive)
}

/// The server's CPU seconds so far, if its pid was given.
fn server_cpu(pid: Option<u32>) -> Result<Option<f64>, LoadError> {
    let Some(pid) = pid else { return Ok(None) };
    let cpu = procfs::cpu_seconds(pid)
        .map_err(|error| format!("cannot read the cpu time of process {pid}: {error}"))?;
    Ok(Some(cpu))
}

/// The watchers' reports and the settling figures.
struct Settled {
    /// One report per stream.
    reports: Vec<WatcherReport>,
    /// Latency and status of the opens.
    opens: Recorder,
    /// Whether some watchers had to be stopped at the settle timeout.
    timed_out: bool,
    /// When the last watcher stopped.
    done: Instant,
    /// The server's CPU seconds at that moment, if its pid was given.
    server_cpu: Option<f64>,
    /// This process's CPU seconds at that moment.
    own_cpu: Option<f64>,
}

/// Waits until every watcher reached the final version (or the settle timeout), then
/// collects the reports.
async fn settle(args: &WatchersArgs, crowd: WatcherCrowd) -> Result<Settled, LoadError> {
    let WatcherCrowd {
        mut tasks,
        shared,
        final_version,
        mut opens,
    } = crowd;
    let deadline = tokio::time::sleep(args.settle_timeout);
    tokio::pin!(deadline);
    let mut reports = Vec::with_capacity(args.streams);
    let mut timed_out = false;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(report) => reports.push(report.map_err(|error| format!("a watcher task failed: {error}"))?),
                None => break,
            },
            _ = &mut deadline, if !timed_out => {
                timed_out = true;
                shared.cancel.cancel();
            }
        }
    }
    let done = Instant::now();
    let server_cpu = server_cpu(args.server_pid)?;
    let own_cpu = procfs::cpu_seconds(procfs::own_pid()).ok();
    drop(final_version);
    for report in &reports {
        opens.record_elapsed(
            Rpc::WatchAvailability,
            report.opened.as_ref().copied().unwrap_or_default(),
            &report.opened,
        );
    }
    Ok(Settled {
        reports,
        opens,
        timed_out,
        done,
        server_cpu,
        own_cpu,
    })
}

/// Delivery figures computed from the reports.
struct Delivery {
    /// Receive time minus send time, over all (watcher, change) pairs.
    per_watcher: Histogram<u64>,
    /// Per change, the time until the last watcher had it.
    to_last: Histogram<u64>,
    /// Receive time minus commit time, over all updates received.
    after_commit: Histogram<u64>,
    /// Pairs whose exact version the watcher never received (skipped).
    missed: u64,
    /// Pairs the watcher never got to (its stream ended or was stopped before).
    undelivered: u64,
    /// Streams whose last update carries the final version.
    on_final: usize,
    /// Updates received, all watchers together.
    received: u64,
}

/// How long ago (wall clock) the update's change committed; zero if the clock disagrees.
fn since_commit(update: &pb::AvailabilityUpdate) -> Duration {
    let committed = update
        .changed_at
        .and_then(|at| std::time::SystemTime::try_from(at).ok());
    committed
        .and_then(|at| at.elapsed().ok())
        .unwrap_or_default()
}

/// Matches each watcher's updates with the changes.
fn delivery(changes: &[(i64, Instant)], reports: &[WatcherReport]) -> Delivery {
    let mut last_arrival: Vec<Option<Instant>> = vec![None; changes.len()];
    let mut figures = Delivery {
        per_watcher: histogram(),
        to_last: histogram(),
        after_commit: histogram(),
        missed: 0,
        undelivered: 0,
        on_final: 0,
        received: 0,
    };
    let final_version = changes.last().map(|(version, _)| *version);
    for report in reports.iter().filter(|report| report.opened.is_ok()) {
        figures.received += report.received.len() as u64;
        for lag in &report.after_commit {
            record_latency(&mut figures.after_commit, *lag);
        }
        let mut next = 0;
        for &(version, arrived) in &report.received {
            while next < changes.len() && changes[next].0 <= version {
                let (wanted, sent) = changes[next];
                record_latency(
                    &mut figures.per_watcher,
                    arrived.saturating_duration_since(sent),
                );
                let last = &mut last_arrival[next];
                *last = Some(last.map_or(arrived, |seen| seen.max(arrived)));
                figures.missed += u64::from(wanted != version);
                next += 1;
            }
        }
        figures.undelivered += (changes.len() - next) as u64;
        let last_version = report.received.last().map(|(version, _)| *version);
        figures.on_final += usize::from(last_version.is_some() && last_version == final_version);
    }
    for (arrival, (_, sent)) in last_arrival.iter().zip(changes) {
        if let Some(arrival) = arrival {
            record_latency(
                &mut figures.to_last,
                arrival.saturating_duration_since(*sent),
            );
        }
    }
    figures
}

/// Prints the figures and runs the checks.
async fn report(
    args: &WatchersArgs,
    control: &Connection,
    product: &pb::Product,
    drive: &Drive,
    settled: &Settled,
) -> Result<(), LoadError> {
    let figures = delivery(&drive.changes, &settled.reports);
    let wall = settled.done.duration_since(drive.started);
    let last_sent = drive
        .changes
        .last()
        .map_or(drive.started, |(_, sent)| *sent);
    let span = last_sent.duration_since(drive.started);
    let intervals = drive.changes.len().saturating_sub(1) as u64;
    println!(
        "drive: {} changes applied, sent over {:.2} s ({:.1}/s); all watchers done {:.3} s after the last was sent",
        drive.changes.len(),
        span.as_secs_f64(),
        per_second(intervals, span),
        settled
            .done
            .saturating_duration_since(last_sent)
            .as_secs_f64(),
    );
    println!(
        "throughput: {:.0} updates/s delivered ({} updates)",
        per_second(figures.received, wall),
        figures.received
    );
    settled.opens.print();
    drive.recorder.print();
    super::stats::print_latency("delivery to each watcher", &figures.per_watcher);
    super::stats::print_latency("delivery to the last watcher", &figures.to_last);
    super::stats::print_latency(
        "delivery after commit (fan-out only)",
        &figures.after_commit,
    );
    let pairs = figures.per_watcher.len() + figures.undelivered;
    println!(
        "missed versions: {} of {pairs} (skipped by slow readers, superseded by a later one); undelivered: {}",
        figures.missed, figures.undelivered
    );
    print_cpu(drive, settled);
    check(args, control, product, drive, settled, &figures).await
}

/// Prints the server's (and this process's) CPU use over the drive, as % of one core.
fn print_cpu(drive: &Drive, settled: &Settled) {
    let wall = settled.done.duration_since(drive.started).as_secs_f64();
    let share = |before: Option<f64>, after: Option<f64>| Some(100.0 * (after? - before?) / wall);
    if let Some(server) = share(drive.server_cpu, settled.server_cpu) {
        println!("server cpu: {server:.1}% of one core over {wall:.2} s of driving");
    }
    if let Some(own) = share(drive.own_cpu, settled.own_cpu) {
        println!("load generator cpu: {own:.1}% of one core over the same time");
    }
}

/// Every stream opened and ended on the final version; stock as driven; books and audit.
async fn check(
    args: &WatchersArgs,
    control: &Connection,
    product: &pb::Product,
    drive: &Drive,
    settled: &Settled,
    figures: &Delivery,
) -> Result<(), LoadError> {
    let mut checks = Checks::default();
    let final_version = drive.changes.last().map_or(0, |(version, _)| *version);
    for report in settled
        .reports
        .iter()
        .filter_map(|report| report.ended.as_ref())
        .take(3)
    {
        println!(
            "  a stream ended early: {:?} {}",
            report.code(),
            report.message()
        );
    }
    if settled.timed_out {
        println!(
            "note: some watchers had not reached the final version after {:?}",
            args.settle_timeout
        );
    }
    checks.expect(
        figures.on_final == args.streams,
        format!(
            "{} of {} streams ended on the final version {final_version}",
            figures.on_final, args.streams
        ),
    );
    let products = checks
        .books(control, std::slice::from_ref(&product.id))
        .await?;
    let expected = product.stock_total + drive.net_delta;
    checks.expect(
        products[0].stock_total == expected,
        format!(
            "stock_total {} == {} + applied changes {}",
            products[0].stock_total, product.stock_total, drive.net_delta
        ),
    );
    checks.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(received: Vec<(i64, Instant)>) -> WatcherReport {
        WatcherReport {
            opened: Ok(Duration::ZERO),
            received,
            after_commit: Vec::new(),
            ended: None,
        }
    }

    #[test]
    fn a_skipped_version_counts_as_missed_and_is_delivered_by_the_next() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let changes = [(2, at(0)), (3, at(50)), (4, at(100))];
        let reports = [
            report(vec![(2, at(5)), (4, at(110))]),
            report(vec![(2, at(7)), (3, at(52)), (4, at(101))]),
            report(vec![(2, at(9))]),
        ];
        let figures = delivery(&changes, &reports);
        assert_eq!(figures.per_watcher.len(), 7);
        assert_eq!(figures.missed, 1);
        assert_eq!(figures.undelivered, 2);
        assert_eq!(figures.on_final, 2);
        assert_eq!(figures.received, 6);
        // The last watcher to have change 3 is the first one, 60 ms after it was sent.
        assert_eq!(figures.to_last.len(), 3);
        let slowest = figures.to_last.max();
        assert!((59_000..=61_000).contains(&slowest), "{slowest}");
    }
}
