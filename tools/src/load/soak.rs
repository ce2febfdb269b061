//! `soak`: a flash sale that goes on. Flash-crowd waves on fresh products, one after another,
//! for `--duration`; every `--report-every` a line with the buyers served per second, the
//! worst p99 of any call, the server's memory and open file descriptors (`--server-pid`) and
//! its database connections (`--metrics`, the server's metrics endpoint). At the end: the
//! books of every wave, and whether the server's descriptors, less its pool's connections,
//! stayed flat.

use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::checks::{Checks, read_products};
use super::conn::{Server, connect};
use super::flash_crowd::{self, Abandon, FlashCrowdArgs, worst_p99};
use super::stats::{Progress, Recorder, per_second};
use super::{Crowd, LoadError, positive, procfs};

/// Descriptors besides its pool's connections the server may gain over a run (a metrics
/// scrape's connection open at the moment, say) before they count as growing.
const FD_SLACK: u64 = 4;

/// Options of `flashsale-tools load soak`.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Clients and connections of every wave.
    #[command(flatten)]
    pub crowd: Crowd,
    /// How long to run (waves start until then).
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Buyers per wave, for three quarters as many units (10% of payments fail, 10% of
    /// buyers release their hold).
    #[arg(long, default_value_t = 4000, value_parser = positive)]
    pub wave_buyers: usize,
    /// Time between report lines.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub report_every: Duration,
    /// The server's process id: report its memory and open file descriptors, and check that
    /// the descriptors stay flat.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server's metrics endpoint (e.g. 127.0.0.1:9464): report its database connections.
    #[arg(long)]
    pub metrics: Option<String>,
}

/// What the server process looked like at one report.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Resident memory, KiB.
    rss_kib: u64,
    /// Open file descriptors.
    fds: u64,
    /// Its pool's database connections (in use and idle), when its metrics were read: a
    /// pool that grows is no leak.
    pool: Option<u64>,
}

impl Sample {
    /// Descriptors that are not the pool's connections (all of them without metrics).
    fn fds_besides_pool(&self) -> u64 {
        self.fds.saturating_sub(self.pool.unwrap_or(0))
    }
}

/// How long a server just started gets to report SERVING.
const STARTUP: Duration = Duration::from_secs(60);

/// `flashsale-tools load soak`.
pub async fn run(server: &Server, args: SoakArgs) -> Result<(), LoadError> {
    server.wait_serving(STARTUP).await?;
    let connections = connect(server, args.crowd.connections).await?;
    let wave = FlashCrowdArgs {
        crowd: args.crowd.clone(),
        buyers: args.wave_buyers,
        stock: args.wave_buyers as i64 * 3 / 4,
        fail_ratio: 0.1,
        abandon_ratio: 0.1,
        abandon: Abandon::Release,
    };
    println!(
        "soak: waves of {} buyers for {}, {} clients over {} connections",
        args.wave_buyers,
        humantime::format_duration(args.duration),
        args.crowd.clients,
        args.crowd.connections
    );
    let started = Instant::now();
    let mut period = Period::start();
    let (mut products, mut unaccounted) = (Vec::new(), Vec::new());
    let mut first: Option<Sample> = None;
    let mut last: Option<Sample> = None;
    while started.elapsed() < args.duration {
        let done = flash_crowd::wave(&connections, &wave).await?;
        let product = read_products(&connections[0], std::slice::from_ref(&done.product_id))
            .await?
            .remove(0);
        for claim in done.outcome.unaccounted_units(wave.stock, &product) {
            unaccounted.push(format!("product {}: {claim}", product.id));
        }
        products.push(done.product_id);
        period.add(args.wave_buyers as u64, done.outcome.recorder);
        if period.since.elapsed() >= args.report_every {
            let pool = match &args.metrics {
                Some(endpoint) => Some(pool_connections(endpoint).await),
                None => None,
            };
            last = sample(args.server_pid, pool.as_ref());
            first = first.or(last);
            period.report(started.elapsed(), products.len(), last, pool.as_ref());
            period = Period::start();
        }
    }

    let mut checks = Checks::default();
    checks.books(&connections[0], &products).await?;
    for claim in &unaccounted {
        println!("  {claim}");
    }
    checks.expect(
        unaccounted.is_empty(),
        format!("every unit of {} waves accounted for", products.len()),
    );
    if let (Some(first), Some(last)) = (first, last) {
        println!(
            "server: rss {} KiB at the first report, {} KiB at the last; fds {} and {}",
            first.rss_kib, last.rss_kib, first.fds, last.fds
        );
        let (before, after) = (first.fds_besides_pool(), last.fds_besides_pool());
        checks.expect(
            after <= before + FD_SLACK,
            format!("open file descriptors besides the pool's flat ({before} -> {after})"),
        );
    }
    checks.finish()
}

/// The calls of the waves since the last report.
struct Period {
    /// When it began.
    since: Instant,
    /// Buyers served.
    buyers: u64,
    /// Their calls' latencies and statuses.
    recorder: Recorder,
}

impl Period {
    /// A period beginning now.
    fn start() -> Period {
        Period {
            since: Instant::now(),
            buyers: 0,
            recorder: Recorder::new(std::sync::Arc::new(Progress::default())),
        }
    }

    /// Adds a finished wave.
    fn add(&mut self, buyers: u64, recorder: Recorder) {
        self.buyers += buyers;
        self.recorder.merge(recorder);
    }

    /// Prints the period's line.
    fn report(
        &self,
        elapsed: Duration,
        waves: usize,
        server: Option<Sample>,
        pool: Option<&PoolConnections>,
    ) {
        let (p99, call) = worst_p99(&self.recorder);
        let server = server.map_or(String::new(), |sample| {
            format!(", server rss {} KiB, fds {}", sample.rss_kib, sample.fds)
        });
        let database = pool.map_or(String::new(), |pool| format!(", db connections {pool}"));
        println!(
            "soak: {:.0} s, {waves} waves, {:.0} buyers/s, worst p99 {:.1} ms ({call}){server}{database}",
            elapsed.as_secs_f64(),
            per_second(self.buyers, self.since.elapsed()),
            p99.as_secs_f64() * 1000.0,
        );
    }
}

/// The server process now, if its pid was given and it can be read.
fn sample(pid: Option<u32>, pool: Option<&PoolConnections>) -> Option<Sample> {
    let pid = pid?;
    Some(Sample {
        rss_kib: procfs::rss_kib(pid).ok()?,
        fds: procfs::open_fds(pid).ok()?,
        pool: pool.and_then(PoolConnections::open),
    })
}

/// The server's database connections by state (`flashsale_db_pool_connections`), as its
/// metrics endpoint told them; empty when it could not be read.
struct PoolConnections(Vec<(String, u64)>);

impl PoolConnections {
    /// The `flashsale_db_pool_connections` series of a Prometheus text page.
    fn parse(page: &str) -> PoolConnections {
        let states = page
            .lines()
            .filter_map(|line| line.strip_prefix("flashsale_db_pool_connections{state=\""))
            .filter_map(|rest| rest.split_once("\"} "))
            .filter_map(|(state, value)| {
                let value: f64 = value.trim().parse().ok()?;
                Some((state.to_owned(), value as u64))
            })
            .collect();
        PoolConnections(states)
    }

    /// Connections open: in use and idle.
    fn open(&self) -> Option<u64> {
        let count = |state: &str| {
            self.0
                .iter()
                .find(|(name, _)| name == state)
                .map(|(_, value)| *value)
        };
        Some(count("in_use")? + count("idle")?)
    }
}

impl std::fmt::Display for PoolConnections {
    /// `in_use 3 idle 5 waiting 0`, or `unknown`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("unknown (metrics unreachable)");
        }
        let states: Vec<String> = self
            .0
            .iter()
            .map(|(state, value)| format!("{state} {value}"))
            .collect();
        f.write_str(&states.join(" "))
    }
}

/// Scrapes the server's metrics endpoint for its pool's connections.
async fn pool_connections(endpoint: &str) -> PoolConnections {
    let scraped = async {
        let mut stream = tokio::net::TcpStream::connect(endpoint).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: flashsale\r\n\r\n")
            .await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    match scraped.await {
        Ok(body) => PoolConnections::parse(&body),
        Err(_) => PoolConnections(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_read_from_the_metrics_page() {
        let page = "# TYPE flashsale_db_pool_connections gauge\n\
                    flashsale_db_pool_connections{state=\"in_use\"} 3\n\
                    flashsale_db_pool_connections{state=\"idle\"} 4\n\
                    flashsale_db_pool_connections{state=\"waiting\"} 0\n\
                    flashsale_watch_streams 12\n";
        let pool = PoolConnections::parse(page);
        assert_eq!(pool.open(), Some(7));
        assert_eq!(pool.to_string(), "in_use 3 idle 4 waiting 0");
        let sample = Sample {
            rss_kib: 1,
            fds: 40,
            pool: pool.open(),
        };
        assert_eq!(sample.fds_besides_pool(), 33);
    }

    #[test]
    fn without_metrics_every_descriptor_counts() {
        let pool = PoolConnections::parse("");
        assert_eq!(pool.open(), None);
        assert_eq!(pool.to_string(), "unknown (metrics unreachable)");
    }
}
