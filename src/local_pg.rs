//! A private PostgreSQL cluster started from the machine's own server binaries.
//!
//! Used by `serve` when `DATABASE_URL` is unset (persistent data directory, durable
//! settings), by the integration-test harness (throwaway directory, fsync and friends off)
//! and by `flashsale-tools bench`.
//!
//! Private means that only the user the server runs as (and root) can connect. The
//! postmaster listens on no TCP address (`listen_addresses` is empty), only on a Unix
//! socket inside the data directory, which PostgreSQL keeps at mode 0700 (0750 at most);
//! the socket itself is 0700 too, and a new cluster's `pg_hba.conf` has only `local` lines.
//! Authentication is `trust`: whoever can open the socket may connect as any role, and only
//! the data directory's owner and root can open it.
//!
//! A socket's path holds at most [`MAX_SOCKET_PATH`] bytes. When
//! `<data_dir>/.s.PGSQL.5432` is longer, the socket goes into a fresh directory of the
//! server's user in the temp dir instead (mode 0700, named `flashsale-pgsock-<pid>-<n>`),
//! removed when the cluster stops (and, if this process was killed first, by the next
//! start that needs one). [`LocalPostgres::url`] names the socket directory as the URL's
//! host, percent-encoded (`postgres://postgres@%2Fsrv%2Fpg:5432/db`), a form libpq,
//! tokio-postgres and the `url` crate all read the same way.
//!
//! The postmaster runs as a child process that writes its output to `<data_dir>.log`, and
//! never outlives the process that started it: it is spawned from one long-lived keeper
//! thread with `PR_SET_PDEATHSIG` set to SIGINT. When running as root, initdb and postgres
//! run as the `postgres` system user.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection};
use tokio::sync::oneshot;

/// Default data directory of `serve`'s private cluster, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = ".flashsale/pg";
/// Environment variable naming the directory that holds initdb and postgres.
pub const PG_BIN_ENV: &str = "FLASHSALE_PG_BIN";
/// The port number of every private cluster. Nothing listens on TCP, so it only names the
/// socket file, `.s.PGSQL.5432`, in a directory of the cluster's own: PostgreSQL's default
/// serves every cluster, and `psql -h <socket dir>` needs no `-p`.
pub const SOCKET_PORT: u16 = 5432;
/// The longest Unix socket path PostgreSQL and the kernel accept: `sun_path`'s 108 bytes
/// less the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// How long a start may take before we give up on the server.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one connection attempt during startup may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a fast shutdown (SIGINT) may take before we escalate.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long SIGQUIT and SIGKILL each get before we report failure.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How many launches we try when an earlier server in the same data directory was still stopping.
const START_ATTEMPTS: u32 = 5;
/// How many server log lines go into startup errors.
const LOG_TAIL_LINES: usize = 20;
/// Pause between readiness or exit checks.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often the keeper thread reaps children handed over by `Drop`.
const REAP_INTERVAL: Duration = Duration::from_millis(500);
/// Name prefix of the fallback socket directories in the temp dir; `<pid>-<n>` follows.
const SOCKET_DIR_PREFIX: &str = "flashsale-pgsock-";
/// How many names we try for a fallback socket directory before giving up.
const SOCKET_DIR_ATTEMPTS: u32 = 100;
/// The `pg_hba.conf` of a new cluster: Unix-socket connections only, no `host` lines.
const PG_HBA: &str = "\
# Written by flashsale. The private cluster takes connections only on its Unix socket,
# which only the data directory's owner (and root) can reach; it listens on no TCP address.
local all all trust
local replication all trust
";

/// Errors of the private PostgreSQL cluster.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    /// No directory with both initdb and postgres was found anywhere.
    #[error(
        "no PostgreSQL server binaries (initdb, postgres) found in FLASHSALE_PG_BIN, pg_config --bindir, \
         /usr/lib/postgresql/*/bin, /usr/local/pgsql/bin or PATH: install them (Debian/Ubuntu: \
         `apt-get install postgresql`), point FLASHSALE_PG_BIN at their directory, or set DATABASE_URL \
         to a running server"
    )]
    BinariesNotFound,
    /// FLASHSALE_PG_BIN is set but does not hold the server binaries.
    #[error(
        "no PostgreSQL server binaries (initdb, postgres) in FLASHSALE_PG_BIN={}: point it at the directory \
         that holds them (e.g. /usr/lib/postgresql/15/bin), unset it to search the usual places, or set \
         DATABASE_URL to a running server",
        dir.display()
    )]
    PgBinInvalid {
        /// the directory FLASHSALE_PG_BIN names
        dir: PathBuf,
    },
    /// We are root, so we need the postgres user, and it does not exist.
    #[error(
        "running as root, but there is no `postgres` system user to run postgresql as (initdb and postgres \
         refuse to run as root): create it (`useradd --system --home-dir /var/lib/postgresql postgres`, or \
         `apt-get install postgresql`), run as a non-root user, or set DATABASE_URL to a running server"
    )]
    NoPostgresUser,
    /// getpwnam_r itself failed.
    #[error("could not look up the `postgres` system user: {error}")]
    UserLookup {
        /// what the lookup reported
        error: io::Error,
    },
    /// A parent of the data directory cannot be entered by the postgres user.
    #[error(
        "the postgres user (uid {uid}) cannot enter {}, a parent of the data directory: make it traversable \
         (`chmod o+x {}`) or put the data directory elsewhere (e.g. under /tmp)",
        path.display(),
        path.display()
    )]
    NotTraversable {
        /// the directory lacking search permission
        path: PathBuf,
        /// the uid that needs to enter it
        uid: u32,
    },
    /// An existing cluster belongs to another user than the one postgres would run as.
    #[error(
        "data directory {} belongs to uid {owner}, but postgresql would run as uid {runner}: \
         `chown -R` it to that user or use another data directory",
        path.display()
    )]
    WrongOwner {
        /// the data directory
        path: PathBuf,
        /// its owner
        owner: u32,
        /// the uid postgres would run as
        runner: u32,
    },
    /// The data directory has content but no cluster in it.
    #[error(
        "data directory {} is not empty but holds no postgresql cluster (no PG_VERSION): remove it or \
         choose another data directory",
        path.display()
    )]
    NotACluster {
        /// the data directory
        path: PathBuf,
    },
    /// A file system operation failed.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// what we were doing, e.g. "could not create directory"
        action: &'static str,
        /// the file or directory concerned
        path: PathBuf,
        /// what the operating system reported
        error: io::Error,
    },
    /// A program could not be started at all.
    #[error("could not run {}: {error}", program.display())]
    Spawn {
        /// the program
        program: PathBuf,
        /// what the operating system reported
        error: io::Error,
    },
    /// The data directory's path is too long for a socket inside it, and so is the temp dir's.
    #[error(
        "the postgresql socket path {} would be longer than {MAX_SOCKET_PATH} bytes, the limit \
         of a Unix socket address, and so would one in the temp dir ({}): use a data directory \
         with a shorter path, or set TMPDIR to a directory with a shorter one",
        socket_path(data_dir).display(),
        socket_path(fallback).display()
    )]
    SocketPathTooLong {
        /// the data directory, where the socket would go
        data_dir: PathBuf,
        /// the fallback socket directory in the temp dir that is too long as well
        fallback: PathBuf,
    },
    /// initdb exited unsuccessfully.
    #[error("initdb of {} failed ({status}); last lines of {}:\n{tail}", path.display(), log.display())]
    InitdbFailed {
        /// the directory being initialized
        path: PathBuf,
        /// initdb's exit status
        status: ExitStatus,
        /// the log file holding initdb's output
        log: PathBuf,
        /// the last lines initdb wrote
        tail: String,
    },
    /// The postmaster exited before accepting connections.
    #[error("postgresql exited during startup ({status}); last lines of {}:\n{tail}", log.display())]
    ExitedDuringStartup {
        /// the postmaster's exit status
        status: ExitStatus,
        /// the server log file
        log: PathBuf,
        /// the last lines the server wrote in this attempt
        tail: String,
    },
    /// The postmaster did not accept connections in time.
    #[error(
        "postgresql did not accept connections within {} s; last lines of {}:\n{tail}",
        START_TIMEOUT.as_secs(),
        log.display()
    )]
    StartTimeout {
        /// the server log file
        log: PathBuf,
        /// the last lines the server wrote in this attempt
        tail: String,
    },
    /// The postmaster survived SIGINT, SIGQUIT and SIGKILL.
    #[error("postgresql (pid {pid}) did not exit after sigint, sigquit and sigkill")]
    StopFailed {
        /// the postmaster's pid
        pid: u32,
    },
    /// Waiting on the postmaster failed.
    #[error("could not wait for postgresql (pid {pid}): {error}")]
    Wait {
        /// the postmaster's pid
        pid: u32,
        /// what the operating system reported
        error: io::Error,
    },
    /// The keeper thread that spawns postmasters could not be started or is gone.
    #[error("the postgresql keeper thread is unavailable: {error}")]
    Keeper {
        /// why
        error: io::Error,
    },
}

/// How to start a private cluster.
#[derive(Debug, Clone)]
pub struct LocalPostgresOptions {
    /// where the cluster lives; created and initdb'ed if it has no PG_VERSION file, reused otherwise
    pub data_dir: PathBuf,
    /// true: PostgreSQL's default durability; false: fsync/synchronous_commit/full_page_writes off (tests)
    pub durable: bool,
    /// max_connections for the cluster (e.g. 200 for tests, 100 default)
    pub max_connections: u32,
}

impl LocalPostgresOptions {
    /// Options for `serve`: a durable cluster in `data_dir` with 100 connections.
    pub fn persistent(data_dir: impl Into<PathBuf>) -> Self {
        LocalPostgresOptions {
            data_dir: data_dir.into(),
            durable: true,
            max_connections: 100,
        }
    }

    /// Options for tests: a non-durable cluster in `data_dir` with 200 connections.
    pub fn throwaway(data_dir: impl Into<PathBuf>) -> Self {
        LocalPostgresOptions {
            data_dir: data_dir.into(),
            durable: false,
            max_connections: 200,
        }
    }
}

/// A running private PostgreSQL cluster; stop it with [`LocalPostgres::stop`].
#[derive(Debug)]
pub struct LocalPostgres {
    /// absolute data directory, reported to callers and used to read postmaster.pid
    data_dir: PathBuf,
    /// the server log file, quoted in errors and logs
    log_path: PathBuf,
    /// where the server's only socket is, used to build URLs; shared with the keeper thread
    /// when it reaps a dropped postmaster, so a fallback directory goes only once that has exited
    socket_dir: Arc<SocketDir>,
    /// the postmaster; None once it has been stopped or handed to the keeper for reaping
    child: Option<Child>,
}

impl LocalPostgres {
    /// Starts (initdb first if needed) and waits until it accepts connections (timeout ~60 s).
    pub async fn start(options: LocalPostgresOptions) -> Result<LocalPostgres, LocalPgError> {
        let bin = find_postgres_bin()?;
        let run_as = RunAs::detect()?;
        let data_dir = absolute_dir(&options.data_dir)?;
        let log_path = with_suffix(&data_dir, ".log");
        prepare_parent(&data_dir, run_as)?;
        ensure_cluster(&bin, &data_dir, &log_path, run_as, options.durable).await?;
        let socket_dir = Arc::new(SocketDir::choose(&data_dir, run_as)?);
        let mut attempt = 1;
        loop {
            wait_for_stopping_predecessor(&data_dir).await;
            let launched = Self::launch(&bin, &data_dir, &log_path, &socket_dir, &options, run_as);
            match launched.await {
                Err(error)
                    if attempt < START_ATTEMPTS && stopping_postmaster(&data_dir).is_some() =>
                {
                    tracing::warn!(attempt, %error, "postgresql did not start, retrying");
                    attempt += 1;
                }
                result => return result.inspect(LocalPostgres::log_started),
            }
        }
    }

    /// `postgres://postgres@<socket dir, percent-encoded>:5432/<database>`, e.g.
    /// `postgres://postgres@%2Ftmp%2Fpg:5432/postgres`: the socket directory is the host,
    /// as libpq (psql, pgbench), tokio-postgres and diesel-async read it.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@{}:{SOCKET_PORT}/{}",
            percent_encode(self.socket_dir.path.as_os_str().as_bytes()),
            percent_encode(database.as_bytes())
        )
    }

    /// The directory holding the server's Unix socket (`-h` of psql and pgbench): the data
    /// directory, or a private directory in the temp dir when that path is too long.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir.path
    }

    /// The port number in the socket's name (`-p` of psql and pgbench), [`SOCKET_PORT`];
    /// nothing listens on it over TCP.
    pub fn port(&self) -> u16 {
        SOCKET_PORT
    }

    /// The absolute data directory of the cluster.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file, `<data_dir>.log`.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The postmaster's pid while it is running under our control.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resolves once the postmaster has exited on its own (a crash, a kill, an operator's
    /// `pg_ctl stop`), with its exit status; pending while it runs, and forever once stopped.
    pub async fn exited(&mut self) -> Result<ExitStatus, LocalPgError> {
        loop {
            if let Some(status) = self.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Fast shutdown (SIGINT to the postmaster) and wait for it to exit (with a timeout, then SIGQUIT/kill).
    pub async fn stop(mut self) -> Result<(), LocalPgError> {
        let result = self.shutdown().await;
        if result.is_ok() {
            tracing::info!(data_dir = %self.data_dir.display(), "stopped private postgresql");
        }
        result
    }

    /// Spawns a postmaster and waits until it is ready, shutting it down on failure.
    async fn launch(
        bin: &Path,
        data_dir: &Path,
        log_path: &Path,
        socket_dir: &Arc<SocketDir>,
        options: &LocalPostgresOptions,
        run_as: RunAs,
    ) -> Result<LocalPostgres, LocalPgError> {
        let log_offset = file_len(log_path);
        let command = postgres_command(bin, data_dir, log_path, &socket_dir.path, options, run_as)?;
        let child = spawn_kept(command).await?;
        let mut server = LocalPostgres {
            data_dir: data_dir.to_owned(),
            log_path: log_path.to_owned(),
            socket_dir: Arc::clone(socket_dir),
            child: Some(child),
        };
        match server.wait_ready(log_offset).await {
            Ok(()) => Ok(server),
            Err(error) => {
                let _ = server.shutdown().await;
                Err(error)
            }
        }
    }

    /// Polls until our postmaster reports ready and a real connection succeeds.
    async fn wait_ready(&mut self, log_offset: u64) -> Result<(), LocalPgError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = self.url("postgres");
        loop {
            if let Some(status) = self.try_wait()? {
                let tail = log_tail(&self.log_path, log_offset);
                return Err(LocalPgError::ExitedDuringStartup {
                    status,
                    log: self.log_path.clone(),
                    tail,
                });
            }
            if self.pid_file_says_ready() && connects(&url).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = log_tail(&self.log_path, log_offset);
                return Err(LocalPgError::StartTimeout {
                    log: self.log_path.clone(),
                    tail,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Whether postmaster.pid names our child and says "ready" (not an earlier server's leftover file).
    fn pid_file_says_ready(&self) -> bool {
        let ours = self.pid();
        matches!(postmaster_status(&self.data_dir), Some((pid, status)) if Some(pid) == ours && status == "ready")
    }

    /// Non-blocking check whether the postmaster has exited.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>, LocalPgError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        child.try_wait().map_err(|error| LocalPgError::Wait {
            pid: child.id(),
            error,
        })
    }

    /// Escalates SIGINT, SIGQUIT, SIGKILL until the postmaster exits; no-op if already stopped.
    async fn shutdown(&mut self) -> Result<(), LocalPgError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let steps = [
            (libc::SIGINT, STOP_TIMEOUT),
            (libc::SIGQUIT, KILL_TIMEOUT),
            (libc::SIGKILL, KILL_TIMEOUT),
        ];
        for (signal, timeout) in steps {
            signal_child(&child, signal);
            match wait_exit(&mut child, timeout).await {
                Ok(true) => return Ok(()),
                Ok(false) => tracing::warn!(
                    pid = child.id(),
                    signal,
                    "postgresql has not exited yet, escalating"
                ),
                Err(error) => {
                    hand_to_keeper(child, Some(Arc::clone(&self.socket_dir)));
                    return Err(error);
                }
            }
        }
        let pid = child.id();
        hand_to_keeper(child, Some(Arc::clone(&self.socket_dir)));
        Err(LocalPgError::StopFailed { pid })
    }

    /// Logs a successful start.
    fn log_started(&self) {
        tracing::info!(
            data_dir = %self.data_dir.display(),
            socket_dir = %self.socket_dir.path.display(),
            log = %self.log_path.display(),
            "started private postgresql"
        );
    }
}

impl Drop for LocalPostgres {
    /// Best effort: SIGINT a still-running postmaster and let the keeper thread reap it (and
    /// then remove a fallback socket directory), without blocking.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            tracing::info!(
                pid = child.id(),
                "private postgresql dropped without stop, sending sigint"
            );
            signal_child(&child, libc::SIGINT);
            hand_to_keeper(child, Some(Arc::clone(&self.socket_dir)));
        }
    }
}

/// Finds the directory holding initdb and postgres: env FLASHSALE_PG_BIN, then `pg_config --bindir`, then the highest version under /usr/lib/postgresql/*/bin, then /usr/local/pgsql/bin, then PATH.
pub fn find_postgres_bin() -> Result<PathBuf, LocalPgError> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|value| !value.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_server_binaries(&dir) {
            Ok(dir)
        } else {
            Err(LocalPgError::PgBinInvalid { dir })
        };
    }
    pg_config_bindir()
        .into_iter()
        .chain(versioned_bin_dirs())
        .chain([PathBuf::from("/usr/local/pgsql/bin")])
        .chain(path_dirs())
        .find(|dir| has_server_binaries(dir))
        .ok_or(LocalPgError::BinariesNotFound)
}

/// Whether `dir` holds executable initdb and postgres files.
fn has_server_binaries(dir: &Path) -> bool {
    let executable = |name: &str| {
        fs::metadata(dir.join(name))
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    executable("initdb") && executable("postgres")
}

/// The bin directory `pg_config --bindir` reports, if pg_config is on PATH.
fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| PathBuf::from(text.trim()))
}

/// /usr/lib/postgresql/<version>/bin directories, highest version first.
fn versioned_bin_dirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// The directories on PATH.
fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default()
}

/// The account that owns the data directory and runs initdb and postgres.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    /// uid the server runs as: the postgres user when we are root, else ourselves
    uid: u32,
    /// primary gid of that user, set together with the uid when switching
    gid: u32,
    /// whether we are root and must switch to that user (and chown to it)
    switch: bool,
}

impl RunAs {
    /// Ourselves when not root; the `postgres` system user when root.
    fn detect() -> Result<RunAs, LocalPgError> {
        // SAFETY: geteuid and getegid have no preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if euid != 0 {
            return Ok(RunAs {
                uid: euid,
                gid: egid,
                switch: false,
            });
        }
        let (uid, gid) = lookup_postgres_user()?.ok_or(LocalPgError::NoPostgresUser)?;
        Ok(RunAs {
            uid,
            gid,
            switch: true,
        })
    }

    /// Whether the directory described by `meta` lets this user search (enter) it.
    fn can_enter(&self, meta: &fs::Metadata) -> bool {
        let mode = meta.mode();
        if meta.uid() == self.uid {
            mode & 0o100 != 0
        } else if meta.gid() == self.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        }
    }
}

/// Looks up the uid and gid of the `postgres` system user with getpwnam_r.
fn lookup_postgres_user() -> Result<Option<(u32, u32)>, LocalPgError> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; an all-zero value is valid and getpwnam_r overwrites it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf.len() is the buffer's real size.
    let rc = unsafe {
        libc::getpwnam_r(
            c"postgres".as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(LocalPgError::UserLookup {
            error: io::Error::from_raw_os_error(rc),
        });
    }
    Ok((!found.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)))
}

/// Makes `dir` absolute and drops `.` components and trailing slashes.
fn absolute_dir(dir: &Path) -> Result<PathBuf, LocalPgError> {
    let absolute =
        std::path::absolute(dir).map_err(|error| io_error("could not resolve", dir, error))?;
    Ok(absolute.components().collect())
}

/// `path` with `suffix` appended to its last component, e.g. `.flashsale/pg` -> `.flashsale/pg.log`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Shorthand for [`LocalPgError::Io`].
fn io_error(action: &'static str, path: &Path, error: io::Error) -> LocalPgError {
    LocalPgError::Io {
        action,
        path: path.to_owned(),
        error,
    }
}

/// Creates the data directory's parent and checks the server's user can reach the data directory.
fn prepare_parent(data_dir: &Path, run_as: RunAs) -> Result<(), LocalPgError> {
    let Some(parent) = data_dir.parent() else {
        return Ok(());
    };
    fs::create_dir_all(parent)
        .map_err(|error| io_error("could not create directory", parent, error))?;
    check_traversable(parent, run_as)
}

/// Fails unless the server's user can enter `dir` and each of its parents (only checked
/// when we are root and the server runs as another user; otherwise we just entered them).
fn check_traversable(dir: &Path, run_as: RunAs) -> Result<(), LocalPgError> {
    if !run_as.switch {
        return Ok(());
    }
    for dir in dir.ancestors() {
        let meta = fs::metadata(dir).map_err(|error| io_error("could not inspect", dir, error))?;
        if !run_as.can_enter(&meta) {
            return Err(LocalPgError::NotTraversable {
                path: dir.to_owned(),
                uid: run_as.uid,
            });
        }
    }
    Ok(())
}

/// Makes sure `data_dir` holds a cluster owned by the server's user, running initdb if it has no PG_VERSION.
async fn ensure_cluster(
    bin: &Path,
    data_dir: &Path,
    log_path: &Path,
    run_as: RunAs,
    durable: bool,
) -> Result<(), LocalPgError> {
    let version_file = data_dir.join("PG_VERSION");
    match fs::symlink_metadata(&version_file) {
        Ok(_) => return check_owner(data_dir, run_as),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error("could not inspect", &version_file, error)),
    }
    if fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(LocalPgError::NotACluster {
            path: data_dir.to_owned(),
        });
    }
    // initdb into a sibling and rename it into place, so a PG_VERSION always means a complete cluster
    let staging = with_suffix(data_dir, ".initdb");
    remove_leftover(&staging)?;
    create_private_dir(&staging, run_as)?;
    tracing::info!(data_dir = %data_dir.display(), "initializing private postgresql cluster");
    run_initdb(bin, &staging, log_path, run_as, durable).await?;
    let hba = staging.join("pg_hba.conf");
    fs::write(&hba, PG_HBA).map_err(|error| io_error("could not write", &hba, error))?;
    fs::rename(&staging, data_dir).map_err(|error| match error.kind() {
        io::ErrorKind::DirectoryNotEmpty => LocalPgError::NotACluster {
            path: data_dir.to_owned(),
        },
        _ => io_error("could not move the new cluster into", data_dir, error),
    })
}

/// Fails unless the existing data directory belongs to the user postgres will run as.
fn check_owner(data_dir: &Path, run_as: RunAs) -> Result<(), LocalPgError> {
    let meta =
        fs::metadata(data_dir).map_err(|error| io_error("could not inspect", data_dir, error))?;
    if meta.uid() != run_as.uid {
        return Err(LocalPgError::WrongOwner {
            path: data_dir.to_owned(),
            owner: meta.uid(),
            runner: run_as.uid,
        });
    }
    Ok(())
}

/// Removes a half-initialized staging directory left by an interrupted earlier initdb.
fn remove_leftover(dir: &Path) -> Result<(), LocalPgError> {
    match fs::remove_dir_all(dir) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(io_error("could not remove", dir, error))
        }
        _ => Ok(()),
    }
}

/// Creates `dir` with mode 0700, owned by the server's user; fails if it exists.
fn create_private_dir(dir: &Path, run_as: RunAs) -> Result<(), LocalPgError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|error| io_error("could not create directory", dir, error))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|error| io_error("could not set permissions of", dir, error))?;
    if run_as.switch {
        std::os::unix::fs::chown(dir, Some(run_as.uid), Some(run_as.gid))
            .map_err(|error| io_error("could not give the postgres user", dir, error))?;
    }
    Ok(())
}

/// Runs initdb (trust auth, UTF8, C locale, superuser `postgres`) on `dir`, output to the log.
async fn run_initdb(
    bin: &Path,
    dir: &Path,
    log_path: &Path,
    run_as: RunAs,
    durable: bool,
) -> Result<(), LocalPgError> {
    let program = bin.join("initdb");
    let log_offset = file_len(log_path);
    let (stdout, stderr) = log_stdio(log_path)?;
    let mut command = tokio::process::Command::new(&program);
    command
        .arg("-D")
        .arg(dir)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"]);
    if !durable {
        command.arg("--no-sync");
    }
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    if run_as.switch {
        command.uid(run_as.uid).gid(run_as.gid);
    }
    let status = command
        .status()
        .await
        .map_err(|error| LocalPgError::Spawn { program, error })?;
    if status.success() {
        return Ok(());
    }
    let tail = log_tail(log_path, log_offset);
    Err(LocalPgError::InitdbFailed {
        path: dir.to_owned(),
        status,
        log: log_path.to_owned(),
        tail,
    })
}

/// Opens (creating) the log file for appending, once for stdout and once for stderr.
fn log_stdio(log_path: &Path) -> Result<(Stdio, Stdio), LocalPgError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|error| io_error("could not open log file", log_path, error))?;
    let copy = file
        .try_clone()
        .map_err(|error| io_error("could not open log file", log_path, error))?;
    Ok((Stdio::from(file), Stdio::from(copy)))
}

/// Current size of `path`, or 0 if it does not exist yet.
fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|meta| meta.len()).unwrap_or(0)
}

/// The last [`LOG_TAIL_LINES`] lines written to `log_path` after `offset`.
fn log_tail(log_path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    let read = File::open(log_path).and_then(|mut file| {
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_to_end(&mut bytes))
    });
    if let Err(error) = read {
        return format!("(could not read {}: {error})", log_path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Builds the postmaster command: no TCP, one Unix socket (mode 0700) in `socket_dir`, own
/// process group, dies with its parent.
fn postgres_command(
    bin: &Path,
    data_dir: &Path,
    log_path: &Path,
    socket_dir: &Path,
    options: &LocalPostgresOptions,
    run_as: RunAs,
) -> Result<Command, LocalPgError> {
    let (stdout, stderr) = log_stdio(log_path)?;
    let mut command = Command::new(bin.join("postgres"));
    command
        .arg("-D")
        .arg(data_dir)
        .arg("-p")
        .arg(SOCKET_PORT.to_string());
    // given on the command line, these override postgresql.conf and ALTER SYSTEM
    command.args([
        "-c",
        "listen_addresses=",
        "-c",
        "unix_socket_permissions=0700",
    ]);
    command
        .arg("-c")
        .arg(socket_directories_setting(socket_dir));
    command
        .arg("-c")
        .arg(format!("max_connections={}", options.max_connections));
    if !options.durable {
        command.args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]);
    }
    // own process group: a terminal's ctrl-c reaches only us, and we decide when the server stops
    command
        .current_dir(data_dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    if run_as.switch {
        command.uid(run_as.uid).gid(run_as.gid);
    }
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only makes async-signal-safe calls and does not allocate.
    unsafe { command.pre_exec(move || die_with_parent(parent)) };
    Ok(command)
}

/// Runs in the forked child after the uid switch: SIGINT when the spawning thread dies, and bail if the parent already has.
fn die_with_parent(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on the calling process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// The pid and status ("starting", "ready", "stopping", ...) recorded in `data_dir`/postmaster.pid.
fn postmaster_status(data_dir: &Path) -> Option<(u32, String)> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let pid = lines.first()?.parse().ok()?;
    Some((pid, lines.get(7)?.to_string()))
}

/// The pid of a live earlier postmaster that postmaster.pid says is shutting down.
fn stopping_postmaster(data_dir: &Path) -> Option<u32> {
    let (pid, status) = postmaster_status(data_dir)?;
    (status == "stopping" && process_exists(pid)).then_some(pid)
}

/// Whether a process with `pid` exists (possibly owned by another user).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Waits up to [`STOP_TIMEOUT`] for an earlier postmaster in `data_dir` that is still shutting down
/// (e.g. one whose parent was just killed), so a quick restart does not trip over its lock file.
async fn wait_for_stopping_predecessor(data_dir: &Path) {
    let deadline = Instant::now() + STOP_TIMEOUT;
    let Some(pid) = stopping_postmaster(data_dir) else {
        return;
    };
    tracing::info!(pid, data_dir = %data_dir.display(), "waiting for the previous postgresql to finish stopping");
    while stopping_postmaster(data_dir).is_some() && Instant::now() < deadline {
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether a connection to `url` can be established within [`CONNECT_TIMEOUT`].
async fn connects(url: &str) -> bool {
    matches!(
        tokio::time::timeout(CONNECT_TIMEOUT, AsyncPgConnection::establish(url)).await,
        Ok(Ok(_))
    )
}

/// Sends `signal` to `child` unless its pid cannot be expressed (never happens on Linux).
fn signal_child(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: the child has not been reaped (std only reaps in wait/try_wait), so the pid is still ours.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Polls until `child` exits (true) or `timeout` passes (false).
async fn wait_exit(child: &mut Child, timeout: Duration) -> Result<bool, LocalPgError> {
    let deadline = Instant::now() + timeout;
    loop {
        let exited = child.try_wait().map_err(|error| LocalPgError::Wait {
            pid: child.id(),
            error,
        })?;
        if exited.is_some() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Work for the keeper thread.
enum KeeperJob {
    /// spawn this command from the keeper thread (so PDEATHSIG follows the process) and send back the child
    Spawn(Box<Command>, oneshot::Sender<io::Result<Child>>),
    /// an already-signalled child to wait for in the background so it does not linger as a zombie
    Reap(Orphan),
}

/// A signalled postmaster the keeper thread waits for.
struct Orphan {
    /// the postmaster, reaped once it exits
    child: Child,
    /// its socket directory, only held until then: a fallback one is removed when its last
    /// holder drops it, so not while this postmaster may still be using it
    _socket_dir: Option<Arc<SocketDir>>,
}

/// The channel to this process's keeper thread, started on first use and never stopped.
static KEEPER: Mutex<Option<mpsc::Sender<KeeperJob>>> = Mutex::new(None);

/// The keeper's channel, starting the keeper thread if needed.
fn keeper() -> Result<mpsc::Sender<KeeperJob>, LocalPgError> {
    let mut keeper = KEEPER.lock().expect("local postgres keeper lock poisoned");
    if let Some(jobs) = keeper.as_ref() {
        return Ok(jobs.clone());
    }
    let (jobs, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name("local-pg-keeper".into())
        .spawn(move || keeper_loop(receiver))
        .map_err(|error| LocalPgError::Keeper { error })?;
    *keeper = Some(jobs.clone());
    Ok(jobs)
}

/// The keeper thread: spawns postmasters and reaps dropped ones; it must never return.
fn keeper_loop(jobs: mpsc::Receiver<KeeperJob>) {
    let mut orphans: Vec<Orphan> = Vec::new();
    loop {
        let wait = if orphans.is_empty() {
            Duration::from_secs(3600)
        } else {
            REAP_INTERVAL
        };
        match jobs.recv_timeout(wait) {
            Ok(KeeperJob::Spawn(mut command, reply)) => {
                if let Err(Ok(child)) = reply.send(command.spawn()) {
                    // the starter gave up waiting: don't leave an unowned server behind
                    signal_child(&child, libc::SIGQUIT);
                    orphans.push(Orphan {
                        child,
                        _socket_dir: None,
                    });
                }
            }
            Ok(KeeperJob::Reap(orphan)) => orphans.push(orphan),
            Err(RecvTimeoutError::Timeout) => {}
            // cannot happen (KEEPER keeps a sender), but returning would fire PDEATHSIG on every server
            Err(RecvTimeoutError::Disconnected) => loop {
                std::thread::park();
            },
        }
        orphans.retain_mut(|orphan| matches!(orphan.child.try_wait(), Ok(None)));
    }
}

/// Spawns `command` from the keeper thread and returns the child.
async fn spawn_kept(command: Command) -> Result<Child, LocalPgError> {
    let program = PathBuf::from(command.get_program());
    let (reply, answer) = oneshot::channel();
    let gone = || LocalPgError::Keeper {
        error: io::Error::other("keeper thread stopped"),
    };
    keeper()?
        .send(KeeperJob::Spawn(Box::new(command), reply))
        .map_err(|_| gone())?;
    answer
        .await
        .map_err(|_| gone())?
        .map_err(|error| LocalPgError::Spawn { program, error })
}

/// Gives a child (and its socket directory, to drop once it has exited) to the keeper thread
/// to reap; if that fails it stays a zombie until we exit.
fn hand_to_keeper(child: Child, socket_dir: Option<Arc<SocketDir>>) {
    if let Ok(jobs) = keeper() {
        let _ = jobs.send(KeeperJob::Reap(Orphan {
            child,
            _socket_dir: socket_dir,
        }));
    }
}

/// Numbers the fallback socket directories of this process.
static NEXT_SOCKET_DIR: AtomicU32 = AtomicU32::new(0);

/// The directory of the server's Unix socket.
#[derive(Debug)]
struct SocketDir {
    /// the absolute directory: the data directory, or a fallback in the temp dir when the
    /// data directory's socket path would be too long
    path: PathBuf,
    /// whether `path` is a fallback of ours, removed with its content when this value drops
    /// (after the postmaster has exited: its holders are the server and the keeper's orphan)
    temporary: bool,
}

impl SocketDir {
    /// The data directory if its socket path fits in [`MAX_SOCKET_PATH`], else a fresh
    /// private directory (0700, the server's user's) in the temp dir.
    fn choose(data_dir: &Path, run_as: RunAs) -> Result<SocketDir, LocalPgError> {
        if socket_path_fits(data_dir) {
            return Ok(SocketDir {
                path: data_dir.to_owned(),
                temporary: false,
            });
        }
        let temp = absolute_dir(&std::env::temp_dir())?;
        check_traversable(&temp, run_as)?;
        remove_stale_socket_dirs(&temp, run_as);
        let mut last_error = None;
        for _ in 0..SOCKET_DIR_ATTEMPTS {
            let n = NEXT_SOCKET_DIR.fetch_add(1, Ordering::Relaxed);
            let path = temp.join(format!("{SOCKET_DIR_PREFIX}{}-{n}", std::process::id()));
            if !socket_path_fits(&path) {
                return Err(LocalPgError::SocketPathTooLong {
                    data_dir: data_dir.to_owned(),
                    fallback: path,
                });
            }
            match create_private_dir(&path, run_as) {
                Ok(()) => {
                    tracing::info!(
                        data_dir = %data_dir.display(),
                        socket_dir = %path.display(),
                        "the data directory's path is too long for a unix socket: using a private directory in the temp dir"
                    );
                    return Ok(SocketDir {
                        path,
                        temporary: true,
                    });
                }
                // a name left by a dead process of another user, or taken meanwhile: try the next
                Err(LocalPgError::Io { error, .. })
                    if error.kind() == io::ErrorKind::AlreadyExists =>
                {
                    last_error = Some(error);
                }
                Err(error) => {
                    // a half-made directory (e.g. chown failed) must not stay behind
                    let _ = fs::remove_dir(&path);
                    return Err(error);
                }
            }
        }
        Err(io_error(
            "could not create a socket directory in",
            &temp,
            last_error.unwrap_or_else(|| io::Error::other("every name was taken")),
        ))
    }
}

impl Drop for SocketDir {
    /// Removes a fallback directory (and a socket a killed postmaster left in it).
    fn drop(&mut self) {
        if self.temporary {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The socket file PostgreSQL creates in `dir`: `<dir>/.s.PGSQL.5432`.
fn socket_path(dir: &Path) -> PathBuf {
    dir.join(format!(".s.PGSQL.{SOCKET_PORT}"))
}

/// Whether a socket in `dir` has a path PostgreSQL and the kernel accept.
fn socket_path_fits(dir: &Path) -> bool {
    socket_path(dir).as_os_str().len() <= MAX_SOCKET_PATH
}

/// Removes the fallback socket directories of the server's user whose process is gone
/// (killed before it could remove its own).
fn remove_stale_socket_dirs(temp: &Path, run_as: RunAs) {
    let Ok(entries) = fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|name| name.strip_prefix(SOCKET_DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(pid) = pid else {
            continue;
        };
        let path = entry.path();
        let ours =
            fs::symlink_metadata(&path).is_ok_and(|meta| meta.is_dir() && meta.uid() == run_as.uid);
        if ours && !process_exists(pid) {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// `unix_socket_directories=<dir>`, the directory double-quoted (PostgreSQL splits the
/// setting at commas and trims blanks outside quotes; `"` doubles inside them).
fn socket_directories_setting(dir: &Path) -> OsString {
    let mut setting = b"unix_socket_directories=\"".to_vec();
    for &byte in dir.as_os_str().as_bytes() {
        if byte == b'"' {
            setting.push(b'"');
        }
        setting.push(byte);
    }
    setting.push(b'"');
    OsString::from_vec(setting)
}

/// Percent-encodes every byte but ASCII letters, digits and `-._~`, for a URL's host or path.
fn percent_encode(bytes: &[u8]) -> String {
    let mut encoded = String::with_capacity(bytes.len() * 3);
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_goes_on_the_last_component() {
        assert_eq!(
            with_suffix(Path::new("/x/.flashsale/pg"), ".log"),
            PathBuf::from("/x/.flashsale/pg.log")
        );
        let dir = absolute_dir(Path::new("./.flashsale/pg/")).expect("absolute");
        assert!(
            dir.is_absolute() && dir.ends_with(".flashsale/pg"),
            "{}",
            dir.display()
        );
        assert!(!dir.to_string_lossy().contains("/./"), "{}", dir.display());
    }

    #[test]
    fn socket_paths_up_to_107_bytes_fit() {
        // "/.s.PGSQL.5432" is 14 bytes: a 93-byte directory gives exactly 107
        let dir = |len: usize| PathBuf::from(format!("/{}", "d".repeat(len - 1)));
        assert_eq!(socket_path(&dir(93)).as_os_str().len(), MAX_SOCKET_PATH);
        assert!(socket_path_fits(&dir(93)));
        assert!(!socket_path_fits(&dir(94)));
    }

    #[test]
    fn urls_name_the_socket_directory_as_tokio_postgres_reads_it() {
        use tokio_postgres::config::Host;
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(
            b"/tmp/odd dir,with@:%?#/\"quotes\"/caf\xc3\xa9/\xff",
        ));
        let server = LocalPostgres {
            data_dir: dir.clone(),
            log_path: with_suffix(&dir, ".log"),
            socket_dir: Arc::new(SocketDir {
                path: dir.clone(),
                temporary: false,
            }),
            child: None,
        };
        let url = server.url("flash sale");
        assert!(
            url.starts_with("postgres://postgres@%2Ftmp%2Fodd%20dir"),
            "{url}"
        );
        let config: tokio_postgres::Config = url.parse().expect("tokio-postgres parses the url");
        assert_eq!(config.get_hosts(), [Host::Unix(dir)]);
        assert_eq!(config.get_ports(), [SOCKET_PORT]);
        assert_eq!(config.get_dbname(), Some("flash sale"));
        assert_eq!(config.get_user(), Some("postgres"));
    }

    #[test]
    fn socket_directories_setting_quotes_the_directory() {
        assert_eq!(
            socket_directories_setting(Path::new("/srv/a,b \"c\"")),
            OsString::from("unix_socket_directories=\"/srv/a,b \"\"c\"\"\"")
        );
    }

    #[test]
    fn log_tail_keeps_the_last_lines_after_the_offset() {
        let path = std::env::temp_dir().join(format!("local-pg-tail-{}.log", std::process::id()));
        let old = "old line\n";
        let new: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, format!("{old}{new}")).expect("write log");
        let tail = log_tail(&path, old.len() as u64);
        let _ = fs::remove_file(&path);
        assert_eq!(tail.lines().count(), LOG_TAIL_LINES);
        assert!(
            tail.starts_with("line 11\n") && tail.ends_with("line 30"),
            "{tail}"
        );
    }
}
