//! `muxserve bench`: drives echo servers with a load generator and measures
//! them from the outside.
//!
//! Each server runs in its own process (a child `muxserve serve`), so the
//! load generator and the server share neither a descriptor limit nor CPU
//! accounting; server CPU and memory are read from `/proc/PID`. With two or
//! more cores, the generator and the server are pinned to different cores.

pub mod load;
pub mod peer;
pub mod report;
pub mod runner;

use std::fmt;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A server under test, running as a child process.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `muxserve serve` (this same executable) with `args`, and waits
    /// for it to say where it listens.
    pub fn spawn(args: &[&str]) -> io::Result<ServerProcess> {
        let exe = std::env::current_exe()?;
        ServerProcess::spawn_with(&exe, args, |cmd| {
            cmd.env("RUST_LOG", "warn");
        })
    }

    /// Starts `EXE serve ARGS...`, letting `configure` adjust the command
    /// (environment, stderr, limits) first, and waits for the first TCP
    /// address it prints.
    pub fn spawn_with(
        exe: &std::path::Path,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> io::Result<ServerProcess> {
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // The server dies with us, even if we are killed before `Drop`
        // runs (a SIGTERM to `muxserve bench`, a test harness timeout).
        // SAFETY: prctl only sets an attribute of the child it runs in,
        // and is async-signal-safe, as code between fork and exec must be.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        configure(&mut cmd);
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut addr = None;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(a) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("tcp://"))
                .and_then(|a| a.parse().ok())
            {
                addr = Some(a);
                break;
            }
        }
        match addr {
            Some(addr) => Ok(ServerProcess { child, addr }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(io::Error::other(
                    "the server process did not say where it listens",
                ))
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child process itself (to signal it, wait for it, or read its
    /// stderr).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// CPU time the server has used so far (user, system).
    pub fn cpu(&self) -> io::Result<(Duration, Duration)> {
        proc_cpu(self.pid())
    }

    /// Resident memory now, in bytes.
    pub fn rss(&self) -> io::Result<u64> {
        proc_rss(self.pid())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User and system CPU time of a process, from `/proc/PID/stat`.
pub fn proc_cpu(pid: u32) -> io::Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after it don't.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("odd /proc stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("odd /proc stat"))
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let to_time = |t: u64| Duration::from_nanos(t * 1_000_000_000 / hz);
    Ok((to_time(ticks(14)?), to_time(ticks(15)?)))
}

/// Resident set size of a process in bytes, from `/proc/PID/statm`.
pub fn proc_rss(pid: u32) -> io::Result<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::other("odd /proc statm"))?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Ok(pages * page)
}

/// Pins a process (0 = this one) to one CPU; best effort.
pub fn pin(pid: u32, cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write only into it,
    // and sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid as libc::pid_t, std::mem::size_of_val(&set), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One measured run of one server.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    /// Which server.
    pub engine: String,
    /// Requests per second.
    pub rate: f64,
    /// Latency percentiles in microseconds: p50, p99, p99.9, max.
    pub latency_us: [f64; 4],
    /// Server CPU per request, user and system, in microseconds (which is
    /// also seconds per million requests).
    pub cpu_us: (f64, f64),
    /// Server resident memory at the end of the run, bytes.
    pub rss: u64,
    /// The latency distribution: (fraction of requests, microseconds).
    pub cdf: Vec<(f64, f64)>,
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<8} {:>10.0} req/s  p50 {:>7.1} µs  p99 {:>8.1} µs  p99.9 {:>8.1} µs  max {:>9.1} µs  cpu/req {:.3} µs user + {:.3} µs sys",
            self.engine,
            self.rate,
            self.latency_us[0],
            self.latency_us[1],
            self.latency_us[2],
            self.latency_us[3],
            self.cpu_us.0,
            self.cpu_us.1
        )
    }
}

/// Drives `server` with `spec` (whose target is replaced by the server's
/// address) and measures its CPU over the measured window.
pub fn measure(
    engine: &str,
    server: &ServerProcess,
    spec: &load::LoadSpec,
    tick: impl FnMut(f64),
) -> io::Result<Sample> {
    let spec = load::LoadSpec {
        target: server.addr,
        ..spec.clone()
    };
    // CPU is sampled around the whole run and scaled to the measured
    // window's requests; warm-up requests are counted in proportion.
    let before = server.cpu()?;
    let result = load::run(&spec, tick)?;
    let after = server.cpu()?;
    let rss = server.rss()?;
    let total = spec.warmup + spec.duration;
    let served = result.requests as f64 * total.as_secs_f64() / spec.duration.as_secs_f64();
    let per = |a: Duration, b: Duration| (a - b).as_secs_f64() * 1e6 / served.max(1.0);
    let h = &result.latency;
    let us = |v: u64| v as f64 / 1000.0;
    Ok(Sample {
        engine: engine.to_string(),
        rate: result.rate(),
        latency_us: [
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.99)),
            us(h.value_at_quantile(0.999)),
            us(h.max()),
        ],
        cpu_us: (per(after.0, before.0), per(after.1, before.1)),
        rss,
        cdf: CDF_POINTS
            .iter()
            .map(|&q| (q, us(h.value_at_quantile(q))))
            .collect(),
    })
}

/// Where the latency CDF is sampled.
const CDF_POINTS: &[f64] = &[
    0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0,
];

/// Server memory per idle connection: RSS growth after `count` connections
/// have each echoed `size` bytes once, divided by `count`.
pub fn idle_bytes_per_conn(server: &ServerProcess, count: usize, size: usize) -> io::Result<f64> {
    let before = server.rss()?;
    let conns = load::idle_connections(server.addr, count, size)?;
    let after = server.rss()?;
    drop(conns);
    Ok((after as f64 - before as f64) / count as f64)
}

/// The median of some numbers (the mean of the middle two for an even
/// count). Sorts `values` in place.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_the_middle_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.0]), 7.0);
        assert!(median(&mut []).is_nan());
    }
}
