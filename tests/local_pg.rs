//! Tests of the private PostgreSQL cluster against the machine's real server binaries.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use diesel::sql_types::{Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::config::DatabaseConfig;
use flashsale::db;
use flashsale::local_pg::{
    LocalPgError, LocalPostgres, LocalPostgresOptions, MAX_SOCKET_PATH, SOCKET_PORT,
    find_postgres_bin,
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Env var telling a re-executed test binary to run the child side of a test in this directory.
const CHILD_DIR_ENV: &str = "LOCALPG_TEST_CHILD_DIR";
/// Env var telling a re-executed test binary to report find_postgres_bin's result.
const CHILD_BIN_CHECK_ENV: &str = "LOCALPG_TEST_CHILD_BIN_CHECK";

/// A fresh, not yet existing directory path under /tmp, removed (with its siblings) on drop.
struct Scratch(PathBuf);

impl Scratch {
    /// A unique path under /tmp for test `name`.
    fn new(name: &str) -> Scratch {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let root = PathBuf::from(format!(
            "/tmp/localpg-test-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&root).expect("create scratch dir");
        Scratch(root)
    }

    /// The data directory inside the scratch root.
    fn data_dir(&self) -> PathBuf {
        self.0.join("pg")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Installs a tracing subscriber once so the module's logs show with --nocapture.
fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
}

/// Whether `pid` is a live (non-zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().as_bytes().first())
                != Some(Some(&b'Z'))
        }
        Err(_) => false,
    }
}

/// Polls until `pid` is gone or `timeout` passes; returns whether it is gone.
async fn gone_within(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// The postmaster pid recorded in `data_dir`/postmaster.pid.
fn postmaster_pid(data_dir: &Path) -> u32 {
    let text =
        std::fs::read_to_string(data_dir.join("postmaster.pid")).expect("read postmaster.pid");
    text.lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .expect("pid in postmaster.pid")
}

/// Runs `SELECT <value>` through diesel's typed sql and returns the integer.
async fn select_int(conn: &mut AsyncPgConnection, expression: &str) -> i32 {
    diesel::select(diesel::dsl::sql::<Integer>(expression))
        .get_result(conn)
        .await
        .expect("select")
}

/// Runs `SELECT <value>` through diesel's typed sql and returns the text.
async fn select_text(conn: &mut AsyncPgConnection, expression: &str) -> String {
    diesel::select(diesel::dsl::sql::<Text>(expression))
        .get_result(conn)
        .await
        .expect("select")
}

/// Whether this test process runs as root.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The uid the private cluster runs as: the `postgres` user's when root, else ours.
fn server_uid() -> u32 {
    if !is_root() {
        // SAFETY: geteuid has no preconditions.
        return unsafe { libc::geteuid() };
    }
    let output = std::process::Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .expect("run id -u postgres");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("uid of the postgres user")
}

/// The socket inodes among the open files of process `pid`.
fn socket_inodes_of(pid: u32) -> HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the postmaster's open files")
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?.to_owned();
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Column `column` (whitespace-separated, 0-based) of every entry of `/proc/<pid>/net/<table>`
/// together with its inode (column `inode_column`).
fn proc_net_column(
    pid: u32,
    table: &str,
    inode_column: usize,
    column: usize,
) -> Vec<(u64, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(inode_column)?.parse().ok()?;
            Some((inode, fields.get(column).copied().unwrap_or("").to_owned()))
        })
        .collect()
}

/// Whether a TCP connection to `host:port` reaches the cluster in `data_dir` (a server of
/// someone else's on that port does not count: it is not the private cluster).
async fn tcp_reaches(host: &str, port: u16, data_dir: &Path) -> bool {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    let Ok((client, connection)) = config.connect(tokio_postgres::NoTls).await else {
        return false;
    };
    tokio::spawn(connection);
    let Ok(row) = client.query_one("SHOW data_directory", &[]).await else {
        return false;
    };
    Path::new(&row.get::<_, String>(0)) == data_dir
}

/// Checks that only the cluster's own user (and root) can reach its socket: the socket
/// directory and the socket are the server user's, mode 0700; when we are root, psql run as
/// `nobody` is refused with "Permission denied" while psql run as the server's user connects.
async fn assert_socket_is_private(pg: &LocalPostgres) {
    let uid = server_uid();
    let dir = std::fs::metadata(pg.socket_dir()).expect("socket dir");
    assert_eq!(dir.uid(), uid, "socket dir owner");
    assert_eq!(
        dir.mode() & 0o777,
        0o700,
        "socket dir mode {:o}",
        dir.mode()
    );
    let socket_path = pg.socket_dir().join(format!(".s.PGSQL.{SOCKET_PORT}"));
    let socket = std::fs::metadata(&socket_path).expect("socket file");
    assert!(socket.file_type().is_socket(), "{}", socket_path.display());
    assert_eq!(socket.uid(), uid, "socket owner");
    assert_eq!(
        socket.mode() & 0o777,
        0o700,
        "socket mode {:o}",
        socket.mode()
    );
    if !is_root() {
        println!("not root: cannot try the socket as another user; checked modes and owners");
        return;
    }
    let psql = find_postgres_bin()
        .map(|bin| bin.join("psql"))
        .ok()
        .filter(|psql| psql.is_file());
    let nobody = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output();
    let (Some(psql), Ok(nobody)) = (psql, nobody) else {
        println!("no psql next to the server binaries or no id: skipped connecting as nobody");
        return;
    };
    if !nobody.status.success() || which("runuser").is_none() {
        println!("no `nobody` user or no runuser: skipped connecting as nobody");
        return;
    }
    let url = pg.url("postgres");
    let psql_as = |user: &str| {
        std::process::Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(&psql)
            .args(["-X", "-w", "-At", "-c", "SELECT 1", &url])
            .current_dir("/")
            .output()
            .expect("run psql through runuser")
    };
    let owner = psql_as("postgres");
    assert!(
        owner.status.success() && String::from_utf8_lossy(&owner.stdout).trim() == "1",
        "psql as postgres failed: {}",
        String::from_utf8_lossy(&owner.stderr)
    );
    let stranger = psql_as("nobody");
    let stderr = String::from_utf8_lossy(&stranger.stderr);
    assert!(
        !stranger.status.success(),
        "nobody connected to the private cluster: {}",
        String::from_utf8_lossy(&stranger.stdout)
    );
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

/// The first `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

#[tokio::test(flavor = "multi_thread")]
async fn start_query_stop() {
    init_tracing();
    let scratch = Scratch::new("basic");
    let pg = LocalPostgres::start(LocalPostgresOptions::throwaway(scratch.data_dir()))
        .await
        .expect("start");
    assert!(pg.data_dir().join("PG_VERSION").is_file());
    assert_eq!(pg.socket_dir(), pg.data_dir());
    let encoded = pg.data_dir().to_str().expect("utf-8").replace('/', "%2F");
    assert_eq!(
        pg.url("flashsale"),
        format!("postgres://postgres@{encoded}:{SOCKET_PORT}/flashsale")
    );
    // every consumer takes the URL: the url crate's edits (the it harness), DatabaseConfig
    // (serve), diesel-async
    let mut edited = url::Url::parse(&pg.url("flashsale")).expect("the url crate parses it");
    edited.set_path("postgres");
    let edited = String::from(edited);
    assert_eq!(edited, pg.url("postgres"));
    let config: DatabaseConfig = edited.parse().expect("a DatabaseConfig");
    db::connect(&config)
        .await
        .expect("connect with DatabaseConfig");
    let mut conn = AsyncPgConnection::establish(&pg.url("postgres"))
        .await
        .expect("connect");
    let rows = diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .expect("select 1");
    assert_eq!(rows, 1);
    assert_eq!(
        select_int(&mut conn, "current_setting('max_connections')::int").await,
        200
    );
    let fsync: i32 = select_int(&mut conn, "(current_setting('fsync') = 'on')::int").await;
    assert_eq!(fsync, 0, "throwaway clusters run with fsync=off");
    drop(conn);
    let pid = pg.pid().expect("running pid");
    assert!(alive(pid));
    let log = pg.log_path().to_owned();
    pg.stop().await.expect("stop");
    assert!(!alive(pid), "postmaster {pid} still running after stop");
    assert!(
        std::fs::read_to_string(log)
            .expect("log")
            .contains("database system is shut down")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_reuses_persistent_cluster() {
    init_tracing();
    let scratch = Scratch::new("restart");
    let options = LocalPostgresOptions::persistent(scratch.data_dir());
    let first = LocalPostgres::start(options.clone())
        .await
        .expect("first start");
    let version_stamp = std::fs::metadata(first.data_dir().join("PG_VERSION"))
        .and_then(|m| m.modified())
        .ok();
    let mut conn = AsyncPgConnection::establish(&first.url("postgres"))
        .await
        .expect("connect");
    diesel::sql_query("CREATE TABLE kept (x int)")
        .execute(&mut conn)
        .await
        .expect("create");
    diesel::sql_query("INSERT INTO kept VALUES (42)")
        .execute(&mut conn)
        .await
        .expect("insert");
    drop(conn);
    first.stop().await.expect("first stop");

    let second = LocalPostgres::start(options).await.expect("second start");
    let again = std::fs::metadata(second.data_dir().join("PG_VERSION"))
        .and_then(|m| m.modified())
        .ok();
    assert_eq!(
        version_stamp, again,
        "PG_VERSION was rewritten: initdb ran twice"
    );
    let log = std::fs::read_to_string(second.log_path()).expect("log");
    assert_eq!(
        log.matches("The files belonging to this database system")
            .count(),
        1,
        "initdb ran twice"
    );
    let mut conn = AsyncPgConnection::establish(&second.url("postgres"))
        .await
        .expect("reconnect");
    assert_eq!(select_int(&mut conn, "(SELECT x FROM kept)").await, 42);
    drop(conn);
    second.stop().await.expect("second stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn second_server_on_same_dir_reports_log() {
    init_tracing();
    let scratch = Scratch::new("locked");
    let options = LocalPostgresOptions::throwaway(scratch.data_dir());
    let first = LocalPostgres::start(options.clone())
        .await
        .expect("first start");
    let error = LocalPostgres::start(options)
        .await
        .expect_err("second start must fail");
    assert!(
        matches!(error, LocalPgError::ExitedDuringStartup { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("postmaster.pid"),
        "log lines missing: {error}"
    );
    first.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_server_is_signalled() {
    init_tracing();
    let scratch = Scratch::new("drop");
    let pg = LocalPostgres::start(LocalPostgresOptions::throwaway(scratch.data_dir()))
        .await
        .expect("start");
    let pid = pg.pid().expect("pid");
    drop(pg);
    assert!(
        gone_within(pid, Duration::from_secs(10)).await,
        "dropped postmaster {pid} still running"
    );
}

/// Re-executes this test binary to start a cluster in `data_dir`; returns once the child says it is ready.
async fn spawn_cluster_holder(data_dir: &Path) -> tokio::process::Child {
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_holds_cluster",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, data_dir)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn child test process");
    let mut lines = BufReader::new(child.stdout.take().expect("child stdout")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("LOCALPG CHILD READY") {
                return true;
            }
        }
        false
    });
    assert!(
        ready
            .await
            .expect("child did not start its cluster in time"),
        "child exited early"
    );
    child
}

#[tokio::test(flavor = "multi_thread")]
async fn postmaster_dies_with_parent_process() {
    init_tracing();
    let scratch = Scratch::new("orphan");
    let mut child = spawn_cluster_holder(&scratch.data_dir()).await;
    let pid = postmaster_pid(&scratch.data_dir());
    assert!(alive(pid), "postmaster {pid} not running");
    child.kill().await.expect("sigkill child");
    assert!(
        gone_within(pid, Duration::from_secs(10)).await,
        "postmaster {pid} outlived its parent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_right_after_parent_killed() {
    init_tracing();
    let scratch = Scratch::new("quick-restart");
    let mut child = spawn_cluster_holder(&scratch.data_dir()).await;
    let old_pid = postmaster_pid(&scratch.data_dir());
    child.kill().await.expect("sigkill child");
    let pg = LocalPostgres::start(LocalPostgresOptions::throwaway(scratch.data_dir()))
        .await
        .expect("restart");
    assert!(!alive(old_pid), "old postmaster {old_pid} still running");
    pg.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_after_postmaster_crash() {
    init_tracing();
    let scratch = Scratch::new("crash");
    let options = LocalPostgresOptions::persistent(scratch.data_dir());
    let pg = LocalPostgres::start(options.clone()).await.expect("start");
    let mut conn = AsyncPgConnection::establish(&pg.url("postgres"))
        .await
        .expect("connect");
    diesel::sql_query("CREATE TABLE survived (x int)")
        .execute(&mut conn)
        .await
        .expect("create");
    let pid = pg.pid().expect("pid");
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert!(gone_within(pid, Duration::from_secs(10)).await);
    drop(conn);
    drop(pg);
    let pg = LocalPostgres::start(options)
        .await
        .expect("start after crash");
    let mut conn = AsyncPgConnection::establish(&pg.url("postgres"))
        .await
        .expect("reconnect");
    assert_eq!(
        select_int(&mut conn, "(SELECT count(*)::int FROM survived)").await,
        0
    );
    drop(conn);
    pg.stop().await.expect("stop");
}

/// Child side of `postmaster_dies_with_parent_process`: start a cluster and wait to be killed.
#[tokio::test(flavor = "multi_thread")]
async fn child_holds_cluster() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    // start from a runtime thread that then exits, to show the keeper thread (not this one) owns the child
    let pg = tokio::spawn(LocalPostgres::start(LocalPostgresOptions::throwaway(dir)))
        .await
        .expect("join")
        .expect("start");
    println!("LOCALPG CHILD READY {}", pg.socket_dir().display());
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(pg);
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_reaches_the_cluster_over_tcp() {
    init_tracing();
    let scratch = Scratch::new("no-tcp");
    let pg = LocalPostgres::start(LocalPostgresOptions::throwaway(scratch.data_dir()))
        .await
        .expect("start");
    let mut conn = AsyncPgConnection::establish(&pg.url("postgres"))
        .await
        .expect("connect over the socket");
    assert_eq!(
        select_text(&mut conn, "current_setting('listen_addresses')").await,
        ""
    );
    assert_eq!(
        select_text(&mut conn, "current_setting('unix_socket_permissions')").await,
        "0700"
    );
    let host_rules = select_int(
        &mut conn,
        "(SELECT count(*)::int FROM pg_hba_file_rules WHERE type <> 'local')",
    )
    .await;
    assert_eq!(host_rules, 0, "pg_hba.conf has lines for TCP connections");
    drop(conn);

    // the postmaster's listening socket is the Unix one, and none of its sockets is TCP
    let pid = pg.pid().expect("pid");
    let sockets = socket_inodes_of(pid);
    let socket_path = pg.socket_dir().join(format!(".s.PGSQL.{SOCKET_PORT}"));
    let unix_paths: Vec<String> = proc_net_column(pid, "unix", 6, 7)
        .into_iter()
        .filter(|(inode, _)| sockets.contains(inode))
        .map(|(_, path)| path)
        .collect();
    assert!(
        unix_paths.contains(&socket_path.display().to_string()),
        "postmaster sockets {unix_paths:?}"
    );
    for table in ["tcp", "tcp6"] {
        let tcp: Vec<(u64, String)> = proc_net_column(pid, table, 9, 1)
            .into_iter()
            .filter(|(inode, _)| sockets.contains(inode))
            .collect();
        assert!(tcp.is_empty(), "postmaster has {table} sockets: {tcp:?}");
    }

    // and a TCP connection attempt on its port does not reach it
    for host in ["127.0.0.1", "::1", "localhost"] {
        assert!(
            !tcp_reaches(host, pg.port(), pg.data_dir()).await,
            "connected to the private cluster over TCP at {host}:{}",
            pg.port()
        );
    }
    pg.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_owner_and_root_reach_the_socket() {
    init_tracing();
    let scratch = Scratch::new("private-socket");
    let pg = LocalPostgres::start(LocalPostgresOptions::throwaway(scratch.data_dir()))
        .await
        .expect("start");
    assert_eq!(pg.socket_dir(), pg.data_dir());
    assert_socket_is_private(&pg).await;
    pg.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_data_dir_gets_a_private_socket_dir_of_its_own() {
    init_tracing();
    let scratch = Scratch::new("long");
    let data_dir = scratch
        .0
        .join("a-data-directory-whose-path-is-too-long-for-a-unix-socket");
    let socket_in_data_dir = data_dir.join(format!(".s.PGSQL.{SOCKET_PORT}"));
    assert!(socket_in_data_dir.as_os_str().len() > MAX_SOCKET_PATH);
    // a fallback directory left by a killed process is cleared on the way (i32::MAX is
    // above any pid_max, so no process has that pid)
    let stale = std::env::temp_dir().join(format!("flashsale-pgsock-{}-0", i32::MAX));
    std::fs::create_dir_all(&stale).expect("make a stale socket dir");
    std::os::unix::fs::chown(&stale, Some(server_uid()), None).expect("chown the stale dir");

    let options = LocalPostgresOptions::throwaway(&data_dir);
    let pg = LocalPostgres::start(options.clone()).await.expect("start");
    let socket_dir = pg.socket_dir().to_owned();
    assert_ne!(socket_dir, pg.data_dir());
    assert!(
        socket_dir.starts_with(std::env::temp_dir()),
        "{}",
        socket_dir.display()
    );
    assert!(!stale.exists(), "the stale socket dir was left");
    assert_socket_is_private(&pg).await;
    let mut conn = AsyncPgConnection::establish(&pg.url("postgres"))
        .await
        .expect("connect");
    assert_eq!(
        select_text(&mut conn, "current_setting('unix_socket_directories')").await,
        format!("\"{}\"", socket_dir.display())
    );
    assert_eq!(
        select_text(&mut conn, "current_setting('data_directory')").await,
        data_dir.display().to_string()
    );
    drop(conn);
    pg.stop().await.expect("stop");
    assert!(!socket_dir.exists(), "socket dir left after stop");

    // dropped without stop: removed once the keeper has reaped the postmaster
    let pg = LocalPostgres::start(options).await.expect("restart");
    let socket_dir = pg.socket_dir().to_owned();
    assert!(socket_dir.is_dir());
    drop(pg);
    let deadline = Instant::now() + Duration::from_secs(10);
    while socket_dir.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!socket_dir.exists(), "socket dir left after drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_bin_override_without_binaries_fails_clearly() {
    let scratch = Scratch::new("nobin");
    let output = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_reports_bin_error", "--nocapture"])
        .env(CHILD_BIN_CHECK_ENV, "1")
        .env("FLASHSALE_PG_BIN", &scratch.0)
        .output()
        .await
        .expect("run child test process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    assert!(
        stdout.contains("LOCALPG BIN ERROR: no PostgreSQL server binaries"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("FLASHSALE_PG_BIN={}", scratch.0.display())),
        "{stdout}"
    );
    assert!(stdout.contains("DATABASE_URL"), "{stdout}");
}

/// Child side of `pg_bin_override_without_binaries_fails_clearly`: print find_postgres_bin's error.
#[test]
fn child_reports_bin_error() {
    if std::env::var_os(CHILD_BIN_CHECK_ENV).is_none() {
        return;
    }
    let error = find_postgres_bin().expect_err("FLASHSALE_PG_BIN points at an empty dir");
    assert!(matches!(error, LocalPgError::PgBinInvalid { .. }));
    println!("LOCALPG BIN ERROR: {error}");
}

#[test]
fn finds_binaries_on_this_machine() {
    if std::env::var_os("FLASHSALE_PG_BIN").is_some() {
        return;
    }
    let bin = find_postgres_bin().expect("postgresql server binaries installed");
    assert!(bin.join("initdb").is_file() && bin.join("postgres").is_file());
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_content_is_not_initdbed() {
    let scratch = Scratch::new("foreign");
    std::fs::create_dir_all(scratch.data_dir()).expect("mkdir");
    std::fs::write(scratch.data_dir().join("notes.txt"), "mine").expect("write");
    let error = LocalPostgres::start(LocalPostgresOptions::throwaway(scratch.data_dir()))
        .await
        .expect_err("must refuse");
    assert!(matches!(error, LocalPgError::NotACluster { .. }), "{error}");
    assert!(scratch.data_dir().join("notes.txt").is_file());
}

#[tokio::test(flavor = "multi_thread")]
async fn root_reports_untraversable_parent() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let scratch = Scratch::new("private");
    let locked = scratch.0.join("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    let error = LocalPostgres::start(LocalPostgresOptions::throwaway(locked.join("pg")))
        .await
        .expect_err("must fail");
    assert!(
        matches!(&error, LocalPgError::NotTraversable { path, .. } if *path == locked),
        "{error}"
    );
    assert!(error.to_string().contains("chmod o+x"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn root_refuses_cluster_owned_by_someone_else() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let scratch = Scratch::new("owner");
    std::fs::create_dir_all(scratch.data_dir()).expect("mkdir");
    std::fs::write(scratch.data_dir().join("PG_VERSION"), "15\n").expect("write");
    let error = LocalPostgres::start(LocalPostgresOptions::throwaway(scratch.data_dir()))
        .await
        .expect_err("must fail");
    assert!(
        matches!(error, LocalPgError::WrongOwner { owner: 0, .. }),
        "{error}"
    );
}
