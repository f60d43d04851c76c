//! UDP reflection: datagrams with forged source addresses must not make
//! servers answer each other for ever.
//!
//! Forging a source address takes a raw socket, so these tests need root
//! (CI runs as root; so does this machine). They are never skipped: a
//! test that cannot open the raw socket fails and says why.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use muxserve::services::{Builtin, Options};
use muxserve::ReplyBudget;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const EXE: &str = env!("CARGO_BIN_EXE_muxserve");

/// Sends one UDP datagram from `from` to `to`, whatever `from` is: the IP
/// and UDP headers are written here (IPPROTO_RAW implies IP_HDRINCL; the
/// kernel fills in the IP checksum, and a UDP checksum of 0 means none).
fn forge(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
    let raw = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .expect("a raw socket (forging a source address needs root)");
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut packet = Vec::with_capacity(total);
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    packet.extend_from_slice(&from.ip().octets());
    packet.extend_from_slice(&to.ip().octets());
    packet.extend_from_slice(&from.port().to_be_bytes());
    packet.extend_from_slice(&to.port().to_be_bytes());
    packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    let sent = raw
        .send_to(&packet, &SockAddr::from(SocketAddr::V4(to)))
        .expect("send the forged datagram");
    assert_eq!(sent, total);
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        other => panic!("not IPv4: {other}"),
    }
}

/// A datagram "from" the server's own echo socket to itself would have it
/// answer itself for ever; it must get no reply at all.
fn a_datagram_forged_from_the_servers_own_port_is_not_answered(engine: Engine) {
    let server = start_bindings(
        engine,
        vec![
            (Builtin::Echo, "udp://127.0.0.1:0".into()),
            (Builtin::Daytime, "udp://127.0.0.1:0".into()),
            (Builtin::Echo, LOOPBACK.into()),
        ],
        Options::default(),
    );
    let udp: Vec<SocketAddrV4> = server
        .endpoints
        .iter()
        .filter(|e| matches!(e, muxserve::Endpoint::Udp(_)))
        .map(|e| v4(e.socket_addr().unwrap()))
        .collect();
    let (echo, daytime, tcp) = (udp[0], udp[1], v4(server.addr()));
    // Echo to itself; daytime to echo; and one "from" the TCP listener.
    forge(echo, echo, b"loop");
    forge(daytime, echo, b"loop");
    forge(tcp, echo, b"loop");
    // A real client's datagram is served after the forged ones: once it is
    // answered, the forged ones have been handled too.
    let client = udp_client();
    client.send_to(b"real", SocketAddr::V4(echo)).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = client.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"real");
    let report = server.shutdown();
    assert_eq!(report.stats.reflection_drops, 3, "{}", report.stats);
    assert_eq!(report.stats.datagrams_out, 1, "{}", report.stats);
}

/// One source gets the budget's burst, then its rate; another source is
/// unaffected, and the refusals are counted.
fn one_source_is_answered_its_burst_and_then_its_rate(engine: Engine) {
    let mut config = muxserve::Config::default();
    config.reply_budget = ReplyBudget {
        burst: 5,
        per_second: 1,
    };
    let server = start_host_with(engine, config, |host| {
        vec![host
            .bind_builtin(
                Builtin::Echo,
                "udp://127.0.0.1:0".parse().unwrap(),
                Options::default(),
            )
            .unwrap()]
    });
    let greedy = udp_client();
    greedy
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut answered = 0;
    for i in 0..20u8 {
        greedy.send_to(&[i], server.udp()).unwrap();
        let mut buf = [0u8; 4];
        if greedy.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
        if answered < 5 {
            assert_eq!(buf[0], i);
        }
    }
    // Twenty sent within a few seconds at most: the burst of five, and at
    // most one a second after it.
    assert!((5..=8).contains(&answered), "{answered} answered");
    let polite = udp_client();
    polite.send_to(b"hi", server.udp()).unwrap();
    let mut buf = [0u8; 4];
    let (n, _) = polite.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hi");
    let report = server.shutdown();
    assert_eq!(
        report.stats.reply_budget_drops,
        20 - answered,
        "{}",
        report.stats
    );
}

on_every_engine!(
    a_datagram_forged_from_the_servers_own_port_is_not_answered,
    one_source_is_answered_its_burst_and_then_its_rate,
);

/// A `muxserve serve` process with UDP echo, daytime and time, logging its
/// counters every `--stats-interval`.
struct Instance {
    child: Child,
    udp: Vec<SocketAddrV4>,
    lines: mpsc::Receiver<String>,
}

impl Instance {
    fn start() -> Instance {
        let mut child = Command::new(EXE)
            .args([
                "serve",
                "echo@udp://127.0.0.1:0",
                "daytime@udp://127.0.0.1:0",
                "time@udp://127.0.0.1:0",
                "--stats-interval",
                "0.5",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start muxserve");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut udp = Vec::new();
        for line in stdout.lines() {
            let line = line.unwrap();
            if let Some(at) = line.split_whitespace().find(|w| w.starts_with("udp://")) {
                udp.push(at.trim_start_matches("udp://").parse().unwrap());
            }
            if udp.len() == 3 {
                break;
            }
        }
        assert_eq!(udp.len(), 3, "the server did not say where it listens");
        let (tx, lines) = mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Instance { child, udp, lines }
    }

    /// `datagrams_out` from the stats lines logged until `until`, in order.
    fn datagrams_out(&self, until: Instant) -> Vec<u64> {
        let mut seen = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let line = if left.is_zero() {
                // Past the deadline: only what is buffered already.
                self.lines.try_recv().ok()
            } else {
                self.lines.recv_timeout(left).ok()
            };
            let Some(line) = line else {
                if left.is_zero() {
                    break;
                }
                continue;
            };
            if line.contains("stats:") {
                let n = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("datagrams_out="))
                    .map_or(0, |v| v.parse().unwrap());
                seen.push(n);
            }
        }
        seen
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two servers, one datagram forged from one's echo port to the other's:
/// without a budget they answer each other for ever. With the default
/// budget (64, then 1,000/s per source) the exchange ends within its burst.
#[test]
fn two_servers_stop_answering_each_other_within_the_burst() {
    let a = Instance::start();
    let b = Instance::start();
    let loopback = Ipv4Addr::LOCALHOST;
    assert!(a.udp.iter().chain(&b.udp).all(|s| *s.ip() == loopback));
    let start = Instant::now();
    // echo <-> echo, and daytime -> echo (echo answers daytime's line,
    // daytime answers anything).
    forge(a.udp[0], b.udp[0], b"ping");
    forge(a.udp[1], b.udp[0], b"ping");
    let until = start + Duration::from_millis(2600);
    let (seen_a, seen_b) = (a.datagrams_out(until), b.datagrams_out(until));
    let burst = u64::from(ReplyBudget::DEFAULT.burst);
    // Per server: each chain costs at most a burst, plus what the rate
    // refills while it runs (well under a millisecond on loopback), plus
    // daytime's own small budget.
    let bound = 2 * burst + 8;
    for (name, seen) in [("a", &seen_a), ("b", &seen_b)] {
        eprintln!("server {name}: datagrams_out every 0.5 s: {seen:?}");
        assert!(seen.len() >= 4, "server {name} logged {seen:?}");
        let last = *seen.last().unwrap();
        assert!(
            last <= bound,
            "server {name} sent {last} datagrams: {seen:?}"
        );
        assert!(last > 0, "server {name} never answered: {seen:?}");
        // Ended: the last two seconds' figures do not move.
        let settled = &seen[seen.len() - 3..];
        assert!(
            settled.iter().all(|&n| n == last),
            "server {name} still sending: {seen:?}"
        );
    }
}
