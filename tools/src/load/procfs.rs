//! What `/proc` and the C library tell about a process: resident memory, CPU time, and
//! this process's open-file limit (Linux).

use std::io;

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_rss_kib(&status).ok_or_else(|| invalid(format!("no VmRSS in /proc/{pid}/status")))
}

/// Finds `VmRSS:   1234 kB` in a status file.
fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of process `pid` (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> io::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// CPU time process `pid` has used so far, user plus system, in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks =
        parse_cpu_ticks(&stat).ok_or_else(|| invalid(format!("unreadable /proc/{pid}/stat")))?;
    Ok(ticks as f64 / ticks_per_second()? as f64)
}

/// CPU time, in seconds, of process `pid` and its children (live ones and those it
/// reaped): a PostgreSQL postmaster and its backends, say.
pub fn family_cpu_seconds(pid: u32) -> io::Result<f64> {
    let mut ticks = family_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
        .ok_or_else(|| invalid(format!("unreadable /proc/{pid}/stat")))?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        // Processes come and go while we read; one that vanished has nothing to add.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if parent_pid(&stat) == Some(pid) {
            ticks += family_ticks(&stat).unwrap_or(0);
        }
    }
    Ok(ticks as f64 / ticks_per_second()? as f64)
}

/// The clock ticks per second `/proc/<pid>/stat` counts in.
fn ticks_per_second() -> io::Result<i64> {
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        return Err(invalid("sysconf(_SC_CLK_TCK) failed".into()));
    }
    Ok(per_second)
}

/// The fields after the command name of a stat line; the name (field 2) may hold spaces and
/// parentheses, so they start after its last `)`.
fn fields_after_name(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// utime + stime (fields 14 and 15) of a stat line.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = fields_after_name(stat)?.skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime + cutime + cstime (fields 14 to 17) of a stat line.
fn family_ticks(stat: &str) -> Option<u64> {
    let fields = fields_after_name(stat)?.skip(11).take(4);
    fields.map(|field| field.parse::<u64>().ok()).sum()
}

/// The parent's pid (field 4) of a stat line.
fn parent_pid(stat: &str) -> Option<u32> {
    fields_after_name(stat)?.nth(1)?.parse().ok()
}

/// This process's id.
pub fn own_pid() -> u32 {
    std::process::id()
}

/// Raises this process's soft limit of open files to the hard limit; returns the new soft
/// limit.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// An `InvalidData` error with this message.
fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\tflashsale\nVmPeak:\t  9000 kB\nVmRSS:\t  4321 kB\n";
        assert_eq!(parse_rss_kib(status), Some(4321));
        let stat = "42 (flash sale) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(family_ticks(stat), Some(300));
        assert_eq!(parent_pid(stat), Some(1));
        let reaped = "7 (postgres) S 3 7 7 0 -1 0 0 0 0 0 10 5 400 30 20 0 1";
        assert_eq!(family_ticks(reaped), Some(445));
    }

    #[test]
    fn reads_own_process() {
        assert!(rss_kib(own_pid()).is_ok_and(|kib| kib > 0));
        let own = cpu_seconds(own_pid()).expect("own cpu");
        let family = family_cpu_seconds(own_pid()).expect("own family");
        assert!(family >= own);
    }
}
