//! What `/proc` says about the broker, the load generator and the machine: resident memory and
//! CPU time. Linux only, as the benchmark is.

use std::time::Instant;

/// Resident set size now (`VmRSS`) and its peak since start (`VmHWM`), in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_status(&text))
}

/// Whether the process still runs: its `/proc` entry exists and it is not a zombie waiting to
/// be reaped.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|text| {
        let state = text.lines().find_map(|l| l.strip_prefix("State:")).unwrap_or("").trim();
        !(state.starts_with('Z') || state.starts_with('X'))
    })
}

fn parse_status(text: &str) -> Memory {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:") }
}

/// The kernel's unit for `/proc/*/stat` times. `USER_HZ` is 100 on every mainstream Linux
/// architecture; `getconf` confirms it where available.
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// User + system CPU time of a process, in clock ticks (`utime` + `stime` of `/proc/PID/stat`).
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or ')': fields are
    // counted from the last ')'. After it come field 3 (`state`) onwards; utime and stime are
    // fields 14 and 15.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy ticks of the whole machine (all CPUs), from the first line of `/proc/stat`: everything
/// but `idle` and `iowait`. Guest time is already inside `user`/`nice`.
pub fn machine_busy_ticks() -> Option<u64> {
    parse_machine(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let busy =
        v.first()? + v.get(1)? + v.get(2)? + v.get(5).unwrap_or(&0) + v.get(6).unwrap_or(&0) + v.get(7).unwrap_or(&0);
    Some(busy)
}

/// CPU counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    pub at: Instant,
    pub server: u64,
    pub loadgen: u64,
    pub machine: u64,
}

impl CpuSnapshot {
    pub fn take(server_pid: u32) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            server: cpu_ticks(&server_pid.to_string()).unwrap_or(0),
            loadgen: cpu_ticks("self").unwrap_or(0),
            machine: machine_busy_ticks().unwrap_or(0),
        }
    }
}

/// Cores used between two snapshots: CPU seconds divided by wall seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoresUsed {
    pub server: f64,
    pub loadgen: f64,
    /// Everything else on the machine in the same window (other users of the cores).
    pub others: f64,
}

pub fn cores_used(from: &CpuSnapshot, to: &CpuSnapshot, ticks_per_second: f64) -> CoresUsed {
    let wall = to.at.duration_since(from.at).as_secs_f64();
    if wall <= 0.0 {
        return CoresUsed::default();
    }
    let cores = |a: u64, b: u64| b.saturating_sub(a) as f64 / ticks_per_second / wall;
    let server = cores(from.server, to.server);
    let loadgen = cores(from.loadgen, to.loadgen);
    let machine = cores(from.machine, to.machine);
    CoresUsed { server, loadgen, others: (machine - server - loadgen).max(0.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_memory_fields() {
        let text = "Name:\tlatchkey\nVmPeak:\t  900000 kB\nVmHWM:\t   51234 kB\nVmRSS:\t   48000 kB\n";
        let m = parse_status(text);
        assert_eq!((m.rss_kib, m.hwm_kib), (48000, 51234));
    }

    #[test]
    fn stat_times_survive_odd_command_names() {
        let text = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(text), Some(325));
    }

    #[test]
    fn own_stat_is_readable() {
        assert!(alive(std::process::id()));
        assert!(cpu_ticks("self").is_some());
        assert!(machine_busy_ticks().is_some());
        assert!(memory(std::process::id()).is_some_and(|m| m.rss_kib > 0 && m.hwm_kib >= m.rss_kib));
    }

    #[test]
    fn machine_busy_excludes_idle_and_iowait() {
        let text = "cpu  100 5 50 1000 40 3 2 1 0 0\ncpu0 50 2 25 500 20 1 1 0 0 0\n";
        assert_eq!(parse_machine(text), Some(161));
    }
}
