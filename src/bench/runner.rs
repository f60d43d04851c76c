//! Runs the measurements `muxserve bench` reports: the echo matrix (runs
//! interleaved across engines, so a noisy moment hurts all of them alike),
//! memory per idle connection, connection churn and chat fan-out.

use std::io;
use std::time::Duration;

use indicatif::ProgressBar;
use serde::Serialize;

use super::load::{self, LoadSpec};
use super::{idle_bytes_per_conn, measure, median, pin, Sample, ServerProcess};

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Servers: `mio`, `poll`, `select`, `threads`, and the echo peers
    /// `tokio` and `bare`.
    pub engines: Vec<String>,
    /// Connection counts.
    pub conns: Vec<usize>,
    /// Request sizes in bytes.
    pub sizes: Vec<usize>,
    /// Pipeline depths.
    pub depths: Vec<usize>,
    /// Warm-up before each measured run.
    pub warmup: Duration,
    /// Each measured run.
    pub duration: Duration,
    /// Runs per cell and engine.
    pub runs: usize,
}

/// One cell of the matrix for one engine: every run.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    /// Which server.
    pub engine: String,
    /// Connections.
    pub conns: usize,
    /// Request size.
    pub size: usize,
    /// Pipeline depth.
    pub depth: usize,
    /// One sample per run.
    pub samples: Vec<Sample>,
}

impl Cell {
    /// The median of `f` over the runs.
    pub fn median(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        median(&mut self.samples.iter().map(f).collect::<Vec<_>>())
    }

    /// `f` of each run divided by `f` of the same run of `base`. Runs are
    /// interleaved, so run i of two engines happened moments apart: the
    /// ratio of a pair cancels out most of what the machine was doing then,
    /// which the ratio of two medians does not.
    pub fn ratios(&self, base: &Cell, f: impl Fn(&Sample) -> f64) -> Vec<f64> {
        self.samples
            .iter()
            .zip(&base.samples)
            .map(|(a, b)| f(a) / f(b))
            .collect()
    }

    /// The largest `f` of any run (for the worst latency seen).
    pub fn worst(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        self.samples.iter().map(f).fold(f64::NAN, f64::max)
    }

    /// The run whose rate is the median one (for its latency curve).
    pub fn median_sample(&self) -> Option<&Sample> {
        let mut by_rate: Vec<&Sample> = self.samples.iter().collect();
        by_rate.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        by_rate.get(by_rate.len() / 2).copied()
    }
}

/// How many cores there are; with two or more, client and server are pinned
/// apart. Counted once, before any pinning narrows what this process sees.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The system's load averages over 1, 5 and 15 minutes (`/proc/loadavg`),
/// if it can be read.
pub fn load_average() -> Option<[f64; 3]> {
    parse_load_average(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

/// The first three fields of a `/proc/loadavg` line.
fn parse_load_average(line: &str) -> Option<[f64; 3]> {
    let mut fields = line.split_whitespace().map(|f| f.parse().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Starts `engine` serving `service` on a free loopback port, pinned to
/// core 1 when there is one.
pub fn start(engine: &str, service: &str) -> io::Result<ServerProcess> {
    let server = ServerProcess::spawn(&["--engine", engine, &format!("{service}@127.0.0.1:0")])?;
    if cores() >= 2 {
        let _ = pin(server.pid(), 1);
    }
    Ok(server)
}

/// Pins the load generator (this process) to core 0 when there are two.
/// Servers started afterwards inherit that, so [`start`] moves each to core
/// 1 explicitly.
pub fn pin_self() {
    if cores() >= 2 {
        let _ = pin(0, 0);
    }
}

/// Runs the echo matrix.
pub fn matrix(plan: &Plan, bar: &ProgressBar) -> io::Result<Vec<Cell>> {
    let mut cells = Vec::new();
    for &conns in &plan.conns {
        for &size in &plan.sizes {
            for &depth in &plan.depths {
                for engine in &plan.engines {
                    cells.push(Cell {
                        engine: engine.clone(),
                        conns,
                        size,
                        depth,
                        samples: Vec::new(),
                    });
                }
            }
        }
    }
    bar.set_length((cells.len() * plan.runs) as u64);
    for run in 0..plan.runs {
        for cell in &mut cells {
            bar.set_message(format!(
                "run {}/{}: {} {}x{}B depth {}",
                run + 1,
                plan.runs,
                cell.engine,
                cell.conns,
                cell.size,
                cell.depth
            ));
            let server = start(&cell.engine, "echo")?;
            let spec = LoadSpec {
                target: server.addr,
                conns: cell.conns,
                size: cell.size,
                depth: cell.depth,
                warmup: plan.warmup,
                duration: plan.duration,
            };
            let sample = measure(&cell.engine, &server, &spec, |_| {})
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cell.engine)))?;
            cell.samples.push(sample);
            bar.inc(1);
        }
    }
    Ok(cells)
}

/// Memory per idle connection.
#[derive(Clone, Debug, Serialize)]
pub struct Idle {
    /// Which server.
    pub engine: String,
    /// Connections held open.
    pub conns: usize,
    /// Server RSS growth per connection, bytes.
    pub bytes_per_conn: f64,
}

/// Measures server RSS per idle connection for each engine: `count`
/// connections, each having echoed `size` bytes once.
pub fn idle(
    engines: &[String],
    count: usize,
    size: usize,
    bar: &ProgressBar,
) -> io::Result<Vec<Idle>> {
    engines
        .iter()
        .map(|engine| {
            bar.set_message(format!("idle: {engine} with {count} connections"));
            let server = start(engine, "echo")?;
            let per = idle_bytes_per_conn(&server, count, size)?;
            bar.inc(1);
            Ok(Idle {
                engine: engine.clone(),
                conns: count,
                bytes_per_conn: per,
            })
        })
        .collect()
}

/// Connections per second under churn, and server CPU per connection.
#[derive(Clone, Debug, Serialize)]
pub struct Churn {
    /// Which server.
    pub engine: String,
    /// Connections served per second (median of the runs).
    pub per_second: f64,
    /// Server CPU per connection, microseconds (median).
    pub cpu_us: f64,
}

/// Runs churn (connect, echo 64 B, reset) for `duration`, `runs` times per
/// engine, interleaved.
pub fn churn(
    engines: &[String],
    duration: Duration,
    runs: usize,
    bar: &ProgressBar,
) -> io::Result<Vec<Churn>> {
    let mut rates = vec![Vec::new(); engines.len()];
    let mut cpus = vec![Vec::new(); engines.len()];
    for _ in 0..runs {
        for (i, engine) in engines.iter().enumerate() {
            bar.set_message(format!("churn: {engine}"));
            let server = start(engine, "echo")?;
            let (u0, s0) = server.cpu()?;
            let n = load::churn(server.addr, duration)?;
            let (u1, s1) = server.cpu()?;
            rates[i].push(n as f64 / duration.as_secs_f64());
            cpus[i].push(((u1 - u0) + (s1 - s0)).as_secs_f64() * 1e6 / n.max(1) as f64);
            bar.inc(1);
        }
    }
    Ok(engines
        .iter()
        .enumerate()
        .map(|(i, engine)| Churn {
            engine: engine.clone(),
            per_second: median(&mut rates[i]),
            cpu_us: median(&mut cpus[i]),
        })
        .collect())
}

/// Chat fan-out: deliveries per second with `members` members.
#[derive(Clone, Debug, Serialize)]
pub struct Fanout {
    /// Which server.
    pub engine: String,
    /// Members in the room.
    pub members: usize,
    /// Messages sent by one member.
    pub messages: usize,
    /// Messages received by the others, per second.
    pub per_second: f64,
    /// Deliveries that never arrived.
    pub missing: u64,
}

/// Whether `engine` serves chat: the muxserve engines do, the echo peers
/// (tokio, bare) do not.
pub fn serves_chat(engine: &str) -> bool {
    engine.parse::<crate::Engine>().is_ok()
}

/// Runs chat fan-out on each engine that serves chat.
pub fn fanout(
    engines: &[String],
    members: &[usize],
    messages: usize,
    bar: &ProgressBar,
) -> io::Result<Vec<Fanout>> {
    let mut out = Vec::new();
    for &m in members {
        for engine in engines.iter().filter(|e| serves_chat(e)) {
            bar.set_message(format!("fan-out: {engine} with {m} members"));
            let server = start(engine, "chat")?;
            let f = load::chat_fanout(server.addr, m, messages)?;
            out.push(Fanout {
                engine: engine.clone(),
                members: m,
                messages,
                per_second: f.deliveries as f64 / f.elapsed.as_secs_f64().max(1e-9),
                missing: f.missing,
            });
            bar.inc(1);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(engine: &str, rates: &[f64]) -> Cell {
        Cell {
            engine: engine.to_string(),
            conns: 1,
            size: 64,
            depth: 1,
            samples: rates
                .iter()
                .map(|&rate| Sample {
                    engine: engine.to_string(),
                    rate,
                    latency_us: [0.0; 4],
                    cpu_us: (0.0, 0.0),
                    rss: 0,
                    cdf: Vec::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn load_averages_are_the_first_three_fields() {
        let line = "0.70 15.06 9.71 3/412 86017\n";
        assert_eq!(parse_load_average(line), Some([0.70, 15.06, 9.71]));
        assert_eq!(parse_load_average("0.70 15.06"), None);
        assert_eq!(parse_load_average("0.70 x 9.71"), None);
    }

    #[test]
    fn ratios_pair_runs_in_order() {
        let a = cell("a", &[100.0, 300.0, 50.0]);
        let b = cell("b", &[50.0, 100.0, 100.0]);
        assert_eq!(a.ratios(&b, |s| s.rate), [2.0, 3.0, 0.5]);
        // The median of the pairs, not the ratio of the medians (1.0).
        assert_eq!(median(&mut a.ratios(&b, |s| s.rate)), 2.0);
        assert_eq!(a.median_sample().map(|s| s.rate), Some(100.0));
        assert_eq!(a.worst(|s| s.rate), 300.0);
    }

    #[test]
    fn only_muxserve_engines_serve_chat() {
        assert!(serves_chat("mio") && serves_chat("threads"));
        assert!(!serves_chat("tokio") && !serves_chat("bare"));
    }
}
