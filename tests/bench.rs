//! `muxserve bench` and its parts: the load generator counts and checks
//! every echoed byte (and fails loudly when a server gets one wrong), the
//! churn, idle and fan-out drivers measure real servers, the bare echo peer
//! is a correct echo server, and the command runs every engine and writes
//! its files.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use muxserve::bench::load::{self, LoadSpec};
use muxserve::bench::ServerProcess;
use muxserve::services::{Builtin, Echo, Options};
use muxserve::{Context, Input, Service};

const EXE: &str = env!("CARGO_BIN_EXE_muxserve");

fn spec(target: std::net::SocketAddr) -> LoadSpec {
    LoadSpec {
        target,
        conns: 4,
        size: 100,
        depth: 3,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(300),
    }
}

#[test]
fn the_load_generator_counts_what_the_server_echoed() {
    let server = start_one(Echo);
    let result = load::run(&spec(server.addr()), |_| {}).expect("a clean run");
    let stats = server.shutdown().stats;
    assert!(result.requests > 0, "nothing was measured");
    assert_eq!(result.latency.len(), result.requests);
    assert_eq!(result.elapsed, Duration::from_millis(300));
    // Warm-up and requests still in flight at the end are echoed but not
    // counted; no counted request is one the server did not echo.
    assert!(
        result.requests * 100 < stats.bytes_out,
        "counted {} requests of 100 B, the server sent {} B",
        result.requests,
        stats.bytes_out
    );
}

/// Echoes, but changes the byte at `at` in each connection's stream, or
/// closes the connection when it reaches `at`.
struct Faulty {
    at: usize,
    close: bool,
}

impl Service for Faulty {
    type Session = usize;

    fn on_connect(&mut self, _cx: &mut Context<'_>) -> usize {
        0
    }

    fn on_data(&mut self, cx: &mut Context<'_>, offset: &mut usize, input: &mut Input<'_>) {
        let mut data = input.take().to_vec();
        let range = *offset..*offset + data.len();
        *offset = range.end;
        if range.contains(&self.at) {
            if self.close {
                return cx.close();
            }
            data[self.at - range.start] ^= 0x20;
        }
        cx.write(&data);
    }
}

/// A server that gets one byte wrong, or closes a connection, fails the
/// run with an error that says which.
#[test]
fn a_faulty_server_fails_the_run() {
    for (close, expected) in [
        (false, "echoed bytes differ"),
        (true, "server closed a connection"),
    ] {
        let server = start_one(Faulty { at: 1234, close });
        let err = load::run(&spec(server.addr()), |_| {}).expect_err(expected);
        assert_eq!(err.to_string(), expected);
    }
}

#[test]
fn churn_idle_and_fan_out_drive_real_servers() {
    let echo = start_builtin(Engine::Mio, Builtin::Echo, Options::default());
    let churned = load::churn(echo.addr(), Duration::from_millis(200)).expect("churn");
    assert!(churned > 0);
    let idle = load::idle_connections(echo.addr(), 20, 64).expect("idle connections");
    assert_eq!(idle.len(), 20);
    drop(idle);
    let stats = echo.shutdown().stats;
    assert_eq!(stats.accepted, churned + 20);
    assert_eq!(stats.bytes_in, 64 * (churned + 20));

    let chat = start_builtin(Engine::Mio, Builtin::Chat, Options::default());
    let fan = load::chat_fanout(chat.addr(), 4, 50).expect("fan-out");
    assert_eq!((fan.deliveries, fan.missing), (150, 0));
    assert!(fan.elapsed > Duration::ZERO);
}

fn peer(name: &str) -> ServerProcess {
    ServerProcess::spawn_with(
        Path::new(EXE),
        &["--engine", name, "echo@127.0.0.1:0"],
        |_| {},
    )
    .expect("start the peer")
}

/// The bare loop is the floor the engines are measured against, so it
/// must be a real echo server: byte-exact under backpressure, and it
/// finishes a connection whose FIN came with its last bytes.
#[test]
fn the_bare_peer_echoes_byte_exact_and_closes_after_the_peer() {
    let server = peer("bare");
    // A client that stops reading makes the peer hold echoed bytes and
    // stop reading; once the client reads again, everything comes back.
    let mut client = small_window_client(server.addr);
    let data = pattern(4 * 1024 * 1024, 3);
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    let feeder = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let back = read_to_end(&mut client);
    feeder.join().unwrap();
    assert!(back == data, "echoed bytes differ");

    // Data and FIN in one go: the echo, then the server's own FIN.
    let mut client = connect(server.addr);
    client.write_all(b"last words").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut client), b"last words");
}

/// The whole command, small: two runs of each engine in every part, then
/// the table on stdout and the files in `--out`.
#[test]
fn the_bench_command_runs_every_engine_and_writes_its_files() {
    let engines: &[&str] = if cfg!(feature = "tokio-peer") {
        &["mio", "bare", "tokio"]
    } else {
        &["mio", "bare"]
    };
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(EXE)
        .args(["bench", "--engines", &engines.join(",")])
        .args(["--conns", "2", "--sizes", "64", "--depth", "2"])
        .args(["--warmup", "0.1", "--duration", "0.3", "--runs", "2"])
        .args(["--idle", "50", "--churn", "0.2", "--chat", "3"])
        .args(["--reference", "bare"])
        .args(["--chat-messages", "20", "--out"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ratios (vs ref, runs, cpu vs) are to bare, run by run"));
    assert!(stdout.contains("load average (1, 5, 15 min): "), "{stdout}");
    let bare: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("bare "))
        .expect("a bare row")
        .split_whitespace()
        .collect();
    assert_eq!((bare[5], bare[6]), ("1.00x", "1.00-1.00"), "{stdout}");
    for engine in engines {
        let row = |prefix: &str| {
            stdout
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([prefix, *engine]))
        };
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{engine} "))),
            "no matrix row for {engine}:\n{stdout}"
        );
        assert!(row("idle") && row("churn"), "{engine}:\n{stdout}");
        // Only muxserve engines serve chat.
        assert_eq!(row("fan-out"), *engine == "mio", "{engine}:\n{stdout}");
    }

    let csv = std::fs::read_to_string(dir.path().join("samples.csv")).unwrap();
    let mut lines = csv.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("engine,conns,size,depth,run,req_per_s,"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), engines.len() * 2);
    for row in &rows {
        assert!(engines.contains(&row[0]), "{row:?}");
        assert_eq!(row[1..4], ["2", "64", "2"]);
        let rate: f64 = row[5].parse().unwrap();
        assert!(rate > 0.0, "{row:?}");
    }

    let json = std::fs::read_to_string(dir.path().join("results.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["cells"].as_array().unwrap().len(), engines.len());
    assert_eq!(json["idle"].as_array().unwrap().len(), engines.len());
    assert_eq!(json["reference"], "bare");
    // Load averages before and after, three each.
    let load = json["load"].as_array().unwrap();
    assert_eq!(load.len(), 2, "{load:?}");
    for at in load {
        assert_eq!(at.as_array().unwrap().len(), 3, "{at}");
    }
    for chart in ["rate_64B_depth2.svg", "latency_cdf.svg"] {
        let svg = std::fs::read_to_string(dir.path().join(chart)).unwrap();
        assert!(svg.starts_with("<svg"), "{chart}");
    }
}

/// A server whose bench is killed (no chance to run `Drop`) goes too,
/// instead of serving on as an orphan.
#[test]
fn the_servers_die_with_a_killed_bench() {
    let mut bench = Command::new(EXE)
        .args(["bench", "--engines", "bare", "--conns", "1"])
        .args(["--warmup", "0", "--duration", "30", "--runs", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = bench.id();
    let mut server = None;
    let started = wait_until(Duration::from_secs(10), || {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
        server = children
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse::<i32>().ok());
        server.is_some()
    });
    // Serving: a listener and at least one connection from the load.
    let serving = started && wait_until(Duration::from_secs(10), || sockets(server.unwrap()) >= 2);
    bench.kill().unwrap();
    bench.wait().unwrap();
    assert!(serving, "the bench started no server");
    let server = server.unwrap();
    // Gone, or a zombie waiting for a reaper that may never come.
    let dead = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{server}/stat")).map_or(true, |stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'))
        })
    });
    if !dead {
        // SAFETY: kill only sends a signal to the process we started.
        unsafe { libc::kill(server, libc::SIGKILL) };
    }
    assert!(dead, "the server outlived its bench");
}

/// How many sockets a process has open.
fn sockets(pid: i32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}
