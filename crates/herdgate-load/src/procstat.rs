//! Server-side cost, read from /proc for `--server-pid`.
//!
//! Memory is the resident set (`VmRSS` in /proc/PID/status); CPU is user + system time
//! (fields 14 and 15 of /proc/PID/stat, in clock ticks of `sysconf(_SC_CLK_TCK)`), so the
//! controller can report RSS growth per open socket and server CPU-seconds per phase.

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&status)
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) consumed so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|t| t as f64 / crate::sys::clock_ticks_per_sec())
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in /proc/net/netstat). Host-wide, but on a loopback run the
/// server's listener is on this host, so a rise during a storm means its accept backlog overflowed
/// and those clients waited for a SYN retransmit (1 s, then 3 s, …).
pub fn listen_overflows() -> Option<u64> {
    parse_netstat(
        &std::fs::read_to_string("/proc/net/netstat").ok()?,
        "TcpExt:",
        "ListenOverflows",
    )
}

fn parse_netstat(text: &str, prefix: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(i) = names.split_whitespace().position(|n| n == field) {
            return values.split_whitespace().nth(i)?.parse().ok();
        }
    }
    None
}

/// One sample of the server.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub rss_kib: Option<u64>,
    pub cpu_secs: Option<f64>,
    pub listen_overflows: Option<u64>,
}

/// The processes `pids` together (none: no server figures).
pub fn sample(pids: &[u32]) -> Sample {
    let listen_overflows = listen_overflows();
    if pids.is_empty() {
        return Sample {
            listen_overflows,
            ..Sample::default()
        };
    }
    Sample {
        rss_kib: pids.iter().map(|&p| rss_kib(p)).sum(),
        cpu_secs: pids.iter().map(|&p| cpu_secs(p)).sum(),
        listen_overflows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        assert_eq!(
            parse_vmrss("Name:\tx\nVmPeak:\t 9 kB\nVmRSS:\t   12345 kB\n"),
            Some(12345)
        );
        let stat = "42 (odd) name)) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 1 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 18\nIpExt: A\nIpExt: 1\n";
        assert_eq!(
            parse_netstat(netstat, "TcpExt:", "ListenOverflows"),
            Some(17)
        );
        assert_eq!(parse_netstat(netstat, "TcpExt:", "Nope"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_secs(me).unwrap() >= 0.0);
        assert!(rss_kib(u32::MAX).is_none());
    }
}
