//! What the generator reads from /proc: a process's CPU time and resident memory, the
//! kernel's slab memory, and its own CPU use.

/// Clock ticks per second of /proc/PID/stat (USER_HZ, 100 on Linux x86_64).
const TICKS: f64 = 100.0;

/// User + system CPU seconds consumed by `pid` ("self" for this process), summed over a
/// comma-separated list of pids (the nodes of a cluster).
pub fn cpu_seconds(pid: &str) -> f64 {
    if pid.contains(',') {
        return pid.split(',').map(cpu_seconds).sum();
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS
}

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: &str) -> u64 {
    kib_field(&format!("/proc/{pid}/status"), "VmRSS:") * 1024
}

/// The kernel's slab memory in bytes (sockets, TCP state, dentries...), machine-wide.
pub fn slab_bytes() -> u64 {
    kib_field("/proc/meminfo", "Slab:") * 1024
}

fn kib_field(path: &str, name: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A CPU and wall-clock reading of the server and of this generator.
#[derive(Clone, Copy)]
pub struct Snapshot {
    pub at: std::time::Instant,
    pub server_cpu: f64,
    pub own_cpu: f64,
}

impl Snapshot {
    pub fn take(server_pid: Option<&str>) -> Snapshot {
        Snapshot::with_generator(server_pid, "self")
    }

    /// With the generator's processes given as pids ("self" and its shards, comma-separated).
    pub fn with_generator(server_pid: Option<&str>, generator: &str) -> Snapshot {
        Snapshot {
            at: std::time::Instant::now(),
            server_cpu: server_pid.map(cpu_seconds).unwrap_or(0.0),
            own_cpu: cpu_seconds(generator),
        }
    }

    /// (wall seconds, server CPU seconds, generator CPU seconds) since `earlier`.
    pub fn since(&self, earlier: &Snapshot) -> (f64, f64, f64) {
        (
            (self.at - earlier.at).as_secs_f64(),
            self.server_cpu - earlier.server_cpu,
            self.own_cpu - earlier.own_cpu,
        )
    }
}
