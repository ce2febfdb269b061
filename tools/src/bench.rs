//! `flashsale-tools bench`: the throughput benchmark, side by side in one run. On one
//! fresh, durable PostgreSQL it measures PostgreSQL's own ceilings with pgbench, the shapes
//! of `shared/bench/pg_limit.sh` at each client count, keeping the best: `atomic` (one hold
//! per commit: a guarded UPDATE plus an INSERT) and `full` (the whole purchase, one commit
//! per step: hold; order; payment). Then it runs rounds of: the full gRPC server
//! (`flashsale serve` as a child process) under `flashsale-tools load hot-holds` and then
//! `health-checks` (the rate of a call with no database work, same server and crowd), then
//! under `many-products`, then pgbench `atomic` again; then the server under `flash-crowd`
//! and pgbench `full` again (each server run with a server and database of its own). A
//! round's ratio to a ceiling uses the mean of the pgbench readings on either side of its
//! run. It prints each round's figures and the median ratios: the shared machine's speed
//! drifts by tens of percent within minutes, so one round alone says little.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Args;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use tokio::process::{Child, Command};

use crate::load::flash_crowd::{self, Abandon, CrowdFigures, FlashCrowdArgs};
use crate::load::health_checks::{self, HealthChecksArgs, HealthFigures};
use crate::load::hot_holds::{HoldsFigures, HoldsPlan, UNLIMITED_STOCK, run_plan};
use crate::load::many_products::Pick;

use crate::load::{Budget, Crowd, Server, procfs};
use flashsale::db;
use flashsale::local_pg::{LocalPostgres, LocalPostgresOptions, find_postgres_bin};

/// Any failure of the benchmark.
type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// The baseline's schema: the one of `pg_limit.sh`, one product with ample stock.
const BASELINE_SCHEMA: &str = "
CREATE TABLE products (id bigint PRIMARY KEY, stock_total bigint NOT NULL,
    reserved bigint NOT NULL DEFAULT 0, sold bigint NOT NULL DEFAULT 0,
    CHECK (reserved >= 0 AND sold >= 0 AND reserved + sold <= stock_total));
CREATE TABLE holds (id bigserial PRIMARY KEY, product_id bigint NOT NULL REFERENCES products (id),
    qty int NOT NULL, status text NOT NULL DEFAULT 'active', expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON holds (expires_at) WHERE status = 'active';
CREATE TABLE orders (id bigserial PRIMARY KEY, hold_id bigint NOT NULL UNIQUE REFERENCES holds (id),
    status text NOT NULL DEFAULT 'pending', total bigint NOT NULL);
CREATE TABLE payment_events (key text PRIMARY KEY, order_id bigint REFERENCES orders (id),
    status text NOT NULL);
INSERT INTO products VALUES (1, 1000000000000, 0, 0);";

/// A pgbench script of `pg_limit.sh`, and what one of its transactions (scripts) is.
struct Shape {
    /// Its name in `pg_limit.sh`.
    name: &'static str,
    /// The script.
    script: &'static str,
    /// What one script run is: a hold, a buyer.
    unit: &'static str,
}

/// One hold per transaction: the ceiling of any server that commits each hold on its own.
const ATOMIC: Shape = Shape {
    name: "atomic",
    script: "BEGIN;
UPDATE products SET reserved = reserved + 1 WHERE id = 1 AND stock_total - reserved - sold >= 1;
INSERT INTO holds (product_id, qty, expires_at) VALUES (1, 1, now() + interval '2 minutes');
END;
",
    unit: "holds",
};

/// The whole purchase one commit per step (hold; order; payment): the ceiling of any server
/// that commits each step of each buyer on its own.
const FULL: Shape = Shape {
    name: "full",
    script: "BEGIN;
UPDATE products SET reserved = reserved + 1 WHERE id = 1 AND stock_total - reserved - sold >= 1;
INSERT INTO holds (product_id, qty, expires_at) VALUES (1, 1, now() + interval '2 minutes') RETURNING id \\gset h_
END;
BEGIN;
SELECT status FROM holds WHERE id = :h_id FOR UPDATE;
UPDATE holds SET status = 'converted' WHERE id = :h_id;
INSERT INTO orders (hold_id, total) VALUES (:h_id, 100) RETURNING id \\gset o_
END;
BEGIN;
INSERT INTO payment_events (key, order_id, status) VALUES ('evt-' || :o_id, :o_id, 'paid');
SELECT status FROM orders WHERE id = :o_id FOR UPDATE;
UPDATE orders SET status = 'paid' WHERE id = :o_id;
UPDATE products SET reserved = reserved - 1, sold = sold + 1 WHERE id = 1;
END;
",
    unit: "buyers",
};

/// Options of `flashsale-tools bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// How long each measurement runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// pgbench client counts tried for the baseline (its best counts).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub pgbench_clients: Vec<u32>,
    /// Concurrent CreateHold clients against the server.
    #[arg(long, default_value_t = 256)]
    pub clients: usize,
    /// HTTP/2 connections those clients share.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Products of the many-products run.
    #[arg(long, default_value_t = 64)]
    pub products: usize,
    /// Buyers of the flash-crowd run (for three quarters as many units).
    #[arg(long, default_value_t = 20_000)]
    pub crowd_buyers: usize,
    /// Rounds of hot-holds, many-products and pgbench; the medians of their ratios are
    /// the result.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Extra flags for `flashsale serve` (e.g. "--pool-size 32").
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub serve_flags: String,
    /// The server binary to measure; by default the `flashsale` next to this binary (both
    /// are built by `cargo build --release`).
    #[arg(long)]
    pub server_binary: Option<PathBuf>,
}

impl BenchArgs {
    /// The server binary to run.
    fn server_binary(&self) -> Result<PathBuf, BenchError> {
        if let Some(path) = &self.server_binary {
            return Ok(path.clone());
        }
        let here = std::env::current_exe()?;
        let sibling = here.with_file_name("flashsale");
        if !sibling.exists() {
            return Err(format!(
                "no server binary at {}: build it (cargo build --release) or pass --server-binary",
                sibling.display()
            )
            .into());
        }
        Ok(sibling)
    }
}

/// Runs the baseline and the server runs on one fresh PostgreSQL and prints the comparison.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let workdir = std::env::temp_dir().join(format!("flashsale-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir)?;
    let postgres = LocalPostgres::start(LocalPostgresOptions {
        data_dir: workdir.join("pg"),
        durable: true,
        max_connections: 300,
    })
    .await?;
    let outcome = measure(&args, &postgres, &workdir).await;
    postgres.stop().await?;
    let _ = std::fs::remove_dir_all(&workdir);
    print_comparison(&args, &outcome?);
    Ok(())
}

/// A pgbench shape's rate at its best client count, measured before a round and again
/// right after it: the shared machine's speed drifts by tens of percent within minutes, so
/// the round's ratio uses the mean and both readings are printed.
struct Baseline {
    /// The best of the client counts tried.
    clients: u32,
    /// Scripts (holds, buyers) per second before the round.
    before: f64,
    /// Scripts per second right after the round.
    after: f64,
}

impl Baseline {
    /// The mean of the two readings.
    fn per_second(&self) -> f64 {
        (self.before + self.after) / 2.0
    }
}

/// One round's figures.
struct Round {
    /// The one-hold-per-commit ceiling on either side of the holds runs.
    baseline: Baseline,
    /// `hot-holds`: one product.
    hot: HoldsFigures,
    /// `health-checks` on the hot-holds server: the ceiling of a call.
    health: HealthFigures,
    /// `many-products`.
    many: HoldsFigures,
    /// The whole-purchase ceiling on either side of the flash crowd.
    full: Baseline,
    /// `flash-crowd`.
    crowd: CrowdFigures,
}

impl Round {
    /// hot-holds over the one-hold-per-commit ceiling.
    fn hot_over_baseline(&self) -> f64 {
        self.hot.holds_per_second / self.baseline.per_second()
    }

    /// hot-holds over the health-check rate of the same server.
    fn hot_over_health(&self) -> f64 {
        self.hot.holds_per_second / self.health.calls_per_second
    }

    /// flash-crowd over the whole-purchase ceiling.
    fn crowd_over_full(&self) -> f64 {
        self.crowd.buyers_per_second / self.full.per_second()
    }

    /// many-products over hot-holds.
    fn many_over_hot(&self) -> f64 {
        self.many.holds_per_second / self.hot.holds_per_second
    }
}

/// The measurements: the baseline's best client count, then the rounds.
async fn measure(
    args: &BenchArgs,
    postgres: &LocalPostgres,
    workdir: &Path,
) -> Result<Vec<Round>, BenchError> {
    prepare_pgbench(postgres).await?;
    let (clients, mut before) = pgbench_best(args, postgres, workdir, &ATOMIC).await?;
    let (full_clients, mut full_before) = pgbench_best(args, postgres, workdir, &FULL).await?;
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        println!("\n== round {round} of {} ==", args.rounds);
        let (hot, health) = hot_run(args, postgres, round).await?;
        let many = server_run(args, postgres, "many-products", args.products, round).await?;
        let after = pgbench_again(args, postgres, workdir, &ATOMIC, clients).await?;
        let crowd = crowd_run(args, postgres, round).await?;
        let full_after = pgbench_again(args, postgres, workdir, &FULL, full_clients).await?;
        rounds.push(Round {
            baseline: Baseline {
                clients,
                before,
                after,
            },
            hot,
            health,
            many,
            full: Baseline {
                clients: full_clients,
                before: full_before,
                after: full_after,
            },
            crowd,
        });
        before = after;
        full_before = full_after;
    }
    Ok(rounds)
}

/// One holds scenario against `flashsale serve` on a fresh database of its own, started
/// after a CHECKPOINT: no run inherits another's rows, autovacuum work or checkpoint.
async fn server_run(
    args: &BenchArgs,
    postgres: &LocalPostgres,
    scenario: &'static str,
    products: usize,
    round: u32,
) -> Result<HoldsFigures, BenchError> {
    let (server, processes) = start_server(args, postgres, scenario, round).await?;
    let figures = holds_run(args, &server.url, scenario, products, &processes).await;
    server.stop().await?;
    figures
}

/// `hot-holds`, then `health-checks` on the same server with the same crowd: the rate of
/// a gRPC call that does no database work, through the same server and load driver.
async fn hot_run(
    args: &BenchArgs,
    postgres: &LocalPostgres,
    round: u32,
) -> Result<(HoldsFigures, HealthFigures), BenchError> {
    let (server, processes) = start_server(args, postgres, "hot-holds", round).await?;
    let holds = holds_run(args, &server.url, "hot-holds", 1, &processes).await;
    let health = match holds {
        Ok(_) => {
            println!();
            let meter = processes.meter();
            let checks = HealthChecksArgs {
                crowd: Crowd {
                    clients: args.clients,
                    connections: args.connections,
                },
                duration: Some(args.duration),
            };
            let figures = health_checks::run(&Server::open(&server.url), checks).await;
            if let Ok(figures) = &figures {
                meter.print_per("call", figures.calls);
            }
            figures
        }
        Err(_) => Err("hot-holds failed".into()),
    };
    server.stop().await?;
    Ok((holds?, health?))
}

/// A flash crowd of `--crowd-buyers` buyers for three quarters as many units (10% of
/// payments failing, 10% of buyers releasing their hold), against a server and database of
/// its own.
async fn crowd_run(
    args: &BenchArgs,
    postgres: &LocalPostgres,
    round: u32,
) -> Result<CrowdFigures, BenchError> {
    let (server, processes) = start_server(args, postgres, "flash-crowd", round).await?;
    let crowd = FlashCrowdArgs {
        crowd: Crowd {
            clients: args.clients,
            connections: args.connections,
        },
        buyers: args.crowd_buyers,
        stock: (args.crowd_buyers as i64) * 3 / 4,
        fail_ratio: 0.1,
        abandon_ratio: 0.1,
        abandon: Abandon::Release,
    };
    println!();
    let meter = processes.meter();
    let figures = flash_crowd::run(&Server::open(&server.url), crowd).await;
    if let Ok(figures) = &figures {
        meter.print_per("buyer", figures.buyers);
    }
    server.stop().await?;
    figures
}

/// `flashsale serve` on a fresh database of its own, started after a CHECKPOINT: no run
/// inherits another's rows, autovacuum work or checkpoint.
async fn start_server(
    args: &BenchArgs,
    postgres: &LocalPostgres,
    scenario: &str,
    round: u32,
) -> Result<(ServerProcess, Processes), BenchError> {
    let database = format!("flashsale_{}_{round}", scenario.replace('-', "_"));
    db::create_database_if_missing(&postgres.url("postgres").parse()?, &database).await?;
    let server = ServerProcess::start(
        &args.server_binary()?,
        &postgres.url(&database),
        &args.serve_flags,
    )
    .await?;
    AsyncPgConnection::establish(&postgres.url("postgres"))
        .await?
        .batch_execute("CHECKPOINT")
        .await?;
    let processes = Processes {
        server: server.child.id().unwrap_or_default(),
        postgres: postgres.pid().unwrap_or_default(),
    };
    Ok((server, processes))
}

/// The database the pgbench shapes run on (`pg_limit.sh`'s schema).
async fn prepare_pgbench(postgres: &LocalPostgres) -> Result<(), BenchError> {
    db::create_database_if_missing(&postgres.url("postgres").parse()?, "pgbench").await?;
    let mut conn = AsyncPgConnection::establish(&postgres.url("pgbench")).await?;
    conn.batch_execute(BASELINE_SCHEMA).await?;
    Ok(())
}

/// pgbench's best rate of `shape` over the client counts: `(clients, scripts per second)`.
async fn pgbench_best(
    args: &BenchArgs,
    postgres: &LocalPostgres,
    workdir: &Path,
    shape: &Shape,
) -> Result<(u32, f64), BenchError> {
    let mut best = (0, 0.0);
    for &clients in &args.pgbench_clients {
        let tps = run_shape(args, postgres, workdir, shape, clients).await?;
        println!(
            "baseline pgbench {}: {clients} clients: {tps:.0} {}/s",
            shape.name, shape.unit
        );
        if tps > best.1 {
            best = (clients, tps);
        }
    }
    Ok(best)
}

/// `shape` again at `clients`.
async fn pgbench_again(
    args: &BenchArgs,
    postgres: &LocalPostgres,
    workdir: &Path,
    shape: &Shape,
    clients: u32,
) -> Result<f64, BenchError> {
    let tps = run_shape(args, postgres, workdir, shape, clients).await?;
    println!(
        "baseline pgbench {} again: {clients} clients: {tps:.0} {}/s",
        shape.name, shape.unit
    );
    Ok(tps)
}

/// One pgbench run of `shape` at `clients`, its script written to `workdir`.
async fn run_shape(
    args: &BenchArgs,
    postgres: &LocalPostgres,
    workdir: &Path,
    shape: &Shape,
    clients: u32,
) -> Result<f64, BenchError> {
    let script = workdir.join(format!("{}.sql", shape.name));
    std::fs::write(&script, shape.script)?;
    let pgbench = find_postgres_bin()?.join("pgbench");
    run_pgbench(&pgbench, postgres, clients, args.duration, &script).await
}

/// One pgbench run over the private cluster's Unix socket; its scripts per second.
async fn run_pgbench(
    pgbench: &PathBuf,
    postgres: &LocalPostgres,
    clients: u32,
    duration: Duration,
    script: &Path,
) -> Result<f64, BenchError> {
    let output = Command::new(pgbench)
        .arg("-h")
        .arg(postgres.socket_dir())
        .args(["-p", &postgres.port().to_string()])
        .args(["-U", "postgres", "-n", "-M", "prepared"])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &duration.as_secs().max(1).to_string(),
        ])
        .arg("-f")
        .arg(script)
        .arg("pgbench")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .ok_or_else(|| {
            format!(
                "pgbench printed no tps: {}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into()
        })
}

/// The processes whose CPU time a run accounts for (besides this one, the load generator).
struct Processes {
    /// `flashsale serve`.
    server: u32,
    /// The postmaster; its backends are its children.
    postgres: u32,
}

impl Processes {
    /// CPU seconds used so far by the server, PostgreSQL and this load generator.
    fn cpu_seconds(&self) -> [f64; 3] {
        [
            procfs::cpu_seconds(self.server).unwrap_or(f64::NAN),
            procfs::family_cpu_seconds(self.postgres).unwrap_or(f64::NAN),
            procfs::cpu_seconds(procfs::own_pid()).unwrap_or(f64::NAN),
        ]
    }

    /// Starts counting the CPU time these processes spend from now on.
    fn meter(&self) -> CpuMeter<'_> {
        CpuMeter {
            processes: self,
            before: self.cpu_seconds(),
            started: std::time::Instant::now(),
        }
    }
}

/// The CPU time the server, PostgreSQL and the load generator spent since it was started.
struct CpuMeter<'a> {
    /// Whose time it counts.
    processes: &'a Processes,
    /// Their CPU seconds at the start.
    before: [f64; 3],
    /// When it started, for the share of the cores kept busy.
    started: std::time::Instant,
}

impl CpuMeter<'_> {
    /// Prints each process's CPU time per `unit` (`count` of them done since the start)
    /// and how many cores were busy on average.
    fn print_per(&self, unit: &str, count: u64) {
        let wall = self.started.elapsed().as_secs_f64();
        let after = self.processes.cpu_seconds();
        let used: Vec<f64> = after.iter().zip(self.before).map(|(a, b)| a - b).collect();
        let per = |seconds: f64| seconds / count as f64 * 1e6;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        println!(
            "cpu per {unit}: server {:.1} us, postgresql {:.1} us, load generator {:.1} us; \
             {:.2} of {cores} cores busy on average (setup and checks included)",
            per(used[0]),
            per(used[1]),
            per(used[2]),
            used.iter().sum::<f64>() / wall,
        );
    }
}

/// One `flashsale-tools load` holds race against the server, followed by the CPU time each
/// process spent per hold granted.
async fn holds_run(
    args: &BenchArgs,
    server: &str,
    scenario: &'static str,
    products: usize,
    processes: &Processes,
) -> Result<HoldsFigures, BenchError> {
    let plan = HoldsPlan {
        scenario,
        products,
        stock: UNLIMITED_STOCK,
        pick: Pick::RoundRobin,
        crowd: Crowd {
            clients: args.clients,
            connections: args.connections,
        },
        budget: Budget {
            duration: Some(args.duration),
            requests: None,
        },
        backoff: Duration::ZERO,
    };
    println!();
    let meter = processes.meter();
    let figures = run_plan(&Server::open(server), plan).await?;
    meter.print_per("hold", figures.holds);
    Ok(figures)
}

/// Prints each round's figures side by side, and the median ratios.
fn print_comparison(args: &BenchArgs, rounds: &[Round]) {
    let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
    let Some(first) = rounds.first() else {
        return;
    };
    println!();
    println!(
        "== hot product: one-hold-per-commit ceiling vs. the server ({} clients; \
         many-products: {} products) ==",
        args.clients, args.products
    );
    println!(
        "round  pgbench ({} clients; before / after)  hot-holds  p50 / p99 ms   ratio  \
         many-products  p50 / p99 ms   many/hot",
        first.baseline.clients
    );
    for (number, round) in rounds.iter().enumerate() {
        println!(
            "{:<5}  {:>7.0} ({:.0} / {:.0}){:>13}  {:>9.0}  {:>5.1} / {:<5.1}  {:>5.1}x  \
             {:>13.0}  {:>5.1} / {:<5.1}  {:>7.2}x",
            number + 1,
            round.baseline.per_second(),
            round.baseline.before,
            round.baseline.after,
            "",
            round.hot.holds_per_second,
            ms(round.hot.p50),
            ms(round.hot.p99),
            round.hot_over_baseline(),
            round.many.holds_per_second,
            ms(round.many.p50),
            ms(round.many.p99),
            round.many_over_hot(),
        );
    }
    let hot_ratios: Vec<f64> = rounds.iter().map(Round::hot_over_baseline).collect();
    let many_ratios: Vec<f64> = rounds.iter().map(Round::many_over_hot).collect();
    println!(
        "median of {} rounds: hot-holds / pgbench {:.1}x, many-products / hot-holds {:.2}x",
        rounds.len(),
        median(hot_ratios),
        median(many_ratios)
    );
    println!();
    println!(
        "== a call's ceiling: Health/Check (no database) vs. hot-holds, same server, {} clients ==",
        args.clients
    );
    println!("round  health-checks calls/s  p99 ms  hot-holds  hot/health");
    for (number, round) in rounds.iter().enumerate() {
        println!(
            "{:<5}  {:>21.0}  {:>6.1}  {:>9.0}  {:>9.0}%",
            number + 1,
            round.health.calls_per_second,
            ms(round.health.p99),
            round.hot.holds_per_second,
            round.hot_over_health() * 100.0,
        );
    }
    let health_ratios: Vec<f64> = rounds.iter().map(Round::hot_over_health).collect();
    println!(
        "median of {} rounds: hot-holds / health-checks {:.0}%",
        rounds.len(),
        median(health_ratios) * 100.0
    );
    println!();
    println!(
        "== the whole purchase: one-commit-per-step ceiling (pgbench full) vs. the server \
         (flash-crowd, {} buyers, {} clients) ==",
        args.crowd_buyers, args.clients
    );
    println!(
        "round  pgbench full ({} clients; before / after)  flash-crowd buyers/s  worst p99 ms   ratio",
        first.full.clients
    );
    for (number, round) in rounds.iter().enumerate() {
        let (p99, rpc) = round.crowd.worst_p99;
        println!(
            "{:<5}  {:>7.0} ({:.0} / {:.0}){:>18}  {:>20.0}  {:>6.1} {:<22}  {:>5.1}x",
            number + 1,
            round.full.per_second(),
            round.full.before,
            round.full.after,
            "",
            round.crowd.buyers_per_second,
            ms(p99),
            format!("({rpc})"),
            round.crowd_over_full(),
        );
    }
    let crowd_ratios: Vec<f64> = rounds.iter().map(Round::crowd_over_full).collect();
    println!(
        "median of {} rounds: flash-crowd / pgbench full {:.1}x",
        rounds.len(),
        median(crowd_ratios)
    );
}

/// The median (the mean of the middle two for an even count); NaN for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[middle],
        _ => (values[middle - 1] + values[middle]) / 2.0,
    }
}

/// `flashsale serve` as a child process on a database, killed if dropped.
struct ServerProcess {
    /// The running server.
    child: Child,
    /// `http://127.0.0.1:PORT`.
    url: String,
}

impl ServerProcess {
    /// Starts `binary serve` and waits for it to answer (30 s at most).
    async fn start(
        binary: &Path,
        database_url: &str,
        extra_flags: &str,
    ) -> Result<ServerProcess, BenchError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(binary)
            .args(["serve", "--listen-addr", &format!("127.0.0.1:{port}")])
            .args(extra_flags.split_whitespace())
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "warn")
            // Metrics on, as in production, on a port of its own.
            .env("FLASHSALE_METRICS_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let server = ServerProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        crate::load::Server::open(server.url.clone())
            .wait_serving(Duration::from_secs(30))
            .await?;
        Ok(server)
    }

    /// SIGTERM and wait.
    async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        self.child.wait().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
