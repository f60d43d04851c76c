//! HMAC challenge-response in front of echo, on every engine: the right key
//! gets in, and every way of getting it wrong gets the same line and EOF.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use muxserve::auth::{
    self, client_handshake, AuthCounters, Key, ThrottlePolicy, CHALLENGE_LEN, FAILED, RESPONSE_LEN,
    TAG,
};
use muxserve::services::Echo;

fn key(byte: u8) -> Key {
    Key::new(vec![byte; 32]).unwrap()
}

fn start_auth(engine: Engine, timeout: Duration) -> (TestServer, Arc<AuthCounters>) {
    let (tx, rx) = mpsc::channel();
    let server = start_host(engine, move |host| {
        let (bound, counters) =
            host.bind_authenticated(auth::Authenticated::new(Echo, key(1)).timeout(timeout));
        tx.send(counters).unwrap();
        vec![bound]
    });
    (server, rx.recv().unwrap())
}

/// Sends `response` to a fresh connection's challenge; returns everything
/// the server says until it closes.
fn answer_with(addr: std::net::SocketAddr, response: impl FnOnce(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let mut c = connect(addr);
    let challenge = read_exact(&mut c, CHALLENGE_LEN);
    c.write_all(&response(&challenge)).unwrap();
    read_to_end(&mut c)
}

fn every_failure_looks_the_same(engine: Engine) {
    let (server, counters) = start_auth(engine, Duration::from_millis(500));
    let addr = server.addr();

    // The right key: a proof, then an echo service.
    let mut good = connect(addr);
    client_handshake(&mut good, &key(1)).unwrap();
    echo_in_steps(&mut good, b"authenticated echo", 18);

    // A wrong key.
    let mut wrong = connect(addr);
    let err = client_handshake(&mut wrong, &key(2)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");

    // Garbage, a wrong tag, the challenge reflected back, a replay of an
    // answer recorded on another connection, and silence: one answer.
    let garbage = answer_with(addr, |_| vec![0x55; RESPONSE_LEN]);
    let bad_tag = answer_with(addr, |_| {
        let mut r = b"MUXAUTH2".to_vec();
        r.resize(RESPONSE_LEN, 1);
        r
    });
    let reflected = answer_with(addr, |challenge| {
        let mut r = challenge.to_vec();
        r.extend_from_slice(&challenge[TAG.len()..]);
        r
    });
    let recorded = {
        let mut tap = Recorder::new(connect(addr));
        client_handshake(&mut tap, &key(1)).unwrap();
        tap.sent
    };
    let replayed = answer_with(addr, |_| recorded.clone());
    let mut silent = connect(addr);
    let _ = read_exact(&mut silent, CHALLENGE_LEN);
    let silence = read_to_end(&mut silent);
    for (what, got) in [
        ("garbage", garbage),
        ("bad tag", bad_tag),
        ("reflected", reflected),
        ("replayed", replayed),
        ("silence", silence),
    ] {
        assert_eq!(got, FAILED, "{engine}: {what}");
    }
    assert_eq!(
        counters.succeeded.load(Ordering::SeqCst),
        2,
        "{engine}: {counters}"
    );
    assert_eq!(
        counters.failed.load(Ordering::SeqCst),
        5,
        "{engine}: {counters}"
    );
    assert_eq!(
        counters.timed_out.load(Ordering::SeqCst),
        1,
        "{engine}: {counters}"
    );
}

/// Records what a client sends, so it can be replayed.
struct Recorder {
    stream: TcpStream,
    sent: Vec<u8>,
}

impl Recorder {
    fn new(stream: TcpStream) -> Recorder {
        Recorder {
            stream,
            sent: Vec::new(),
        }
    }
}

impl Read for Recorder {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.stream.write(buf)?;
        self.sent.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

#[test]
fn a_client_that_never_answers_is_closed_in_time() {
    let timeout = Duration::from_secs(1);
    let (server, _) = start_auth(Engine::Mio, timeout);
    let mut c = connect(server.addr());
    let start = Instant::now();
    let _ = read_exact(&mut c, CHALLENGE_LEN);
    assert_eq!(read_to_end(&mut c), FAILED);
    let took = start.elapsed();
    assert!(
        took >= timeout && took <= timeout + Duration::from_secs(1),
        "{took:?}"
    );
}

#[test]
fn a_megabyte_before_authenticating_is_refused_after_the_response_size() {
    let mut server = muxserve::Server::new().unwrap();
    let auth = muxserve::auth::Authenticated::new(Echo, key(1));
    let addr = local(&mut server, auth);
    let client = std::thread::spawn(move || {
        let mut c = connect(addr);
        let mut w = c.try_clone().unwrap();
        let flood = std::thread::spawn(move || {
            // Fails once the server closes: that is expected.
            let _ = w.write_all(&vec![b'x'; 1024 * 1024]);
        });
        let _ = read_exact(&mut c, CHALLENGE_LEN);
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        flood.join().unwrap();
        rest
    });
    let mut most = 0;
    let end = Instant::now() + Duration::from_secs(20);
    while !client.is_finished() {
        assert!(Instant::now() < end, "the flooding client was not closed");
        server.run_once(Some(Duration::from_millis(5))).unwrap();
        most = most.max(server.buffered().input);
    }
    assert!(client.join().unwrap().starts_with(FAILED));
    assert!(
        most <= auth::PRE_AUTH_LIMIT,
        "held {most} bytes before authentication"
    );
}

/// A throttle fast enough for tests: two attempts at once, then 50, 100,
/// then 200 ms between attempts.
fn quick_guard() -> auth::Guard {
    auth::Guard::with_policy(
        key(1),
        ThrottlePolicy {
            free: 2,
            base: Duration::from_millis(50),
            cap: Duration::from_millis(200),
            max_wait: Duration::from_secs(10),
            forget: Duration::from_secs(600),
        },
    )
}

/// Binds `listeners` authenticated echo listeners sharing `guard`.
fn start_guarded(
    engine: Engine,
    guard: auth::Guard,
    listeners: usize,
) -> (TestServer, Vec<Arc<AuthCounters>>) {
    let (tx, rx) = mpsc::channel();
    let server = start_host(engine, move |host| {
        let (bound, counters): (Vec<_>, Vec<_>) = (0..listeners)
            .map(|_| host.bind_authenticated(guard.wrap(Echo)))
            .unzip();
        tx.send(counters).unwrap();
        bound
    });
    (server, rx.recv().unwrap())
}

/// Eight guesses from one address, sent in parallel and spread over two
/// listeners, are counted when they start and on one throttle: their
/// challenges come out one turn after another (0, 0, 50, 150, 350, 550,
/// 750, 950 ms), not all at once.
fn parallel_guesses_across_listeners_are_spaced_out(engine: Engine) {
    const GUESSES: usize = 8;
    let (server, counters) = start_guarded(engine, quick_guard(), 2);
    let addrs: Vec<_> = server
        .endpoints
        .iter()
        .map(|e| e.socket_addr().unwrap())
        .collect();
    let start = Instant::now();
    let guessers: Vec<_> = (0..GUESSES)
        .map(|i| {
            let mut c = connect_from("127.0.0.2", addrs[i % 2]);
            std::thread::spawn(move || {
                let _ = read_exact(&mut c, CHALLENGE_LEN);
                let challenged = start.elapsed();
                c.write_all(&[0x55; RESPONSE_LEN]).unwrap();
                assert_eq!(read_to_end(&mut c), FAILED);
                challenged
            })
        })
        .collect();
    let mut times: Vec<Duration> = guessers.into_iter().map(|g| g.join().unwrap()).collect();
    times.sort();
    assert!(
        times[GUESSES - 1] >= Duration::from_millis(900),
        "{engine}: challenges at {times:?}"
    );
    let at_once = times
        .iter()
        .filter(|t| **t < Duration::from_millis(45))
        .count();
    assert!(at_once <= 2, "{engine}: challenges at {times:?}");
    let delayed: u64 = counters
        .iter()
        .map(|c| c.delayed.load(Ordering::SeqCst))
        .sum();
    // Exactly six, unless a slow machine connected some after their turn.
    assert!(
        (GUESSES as u64 - 4..=GUESSES as u64 - 2).contains(&delayed),
        "{engine}: {delayed} delayed"
    );
}

/// A client with the key behind an address that has been guessing (the
/// same NAT) is slowed like its address, never locked out; another address
/// is not slowed at all.
fn the_right_key_behind_a_guessing_address_still_gets_in(engine: Engine) {
    let (server, counters) = start_guarded(engine, quick_guard(), 1);
    let (addr, counters) = (server.addr(), &counters[0]);
    for _ in 0..10 {
        let mut c = connect_from("127.0.0.2", addr);
        let err = client_handshake(&mut c, &key(9)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    }
    let mut neighbour = connect_from("127.0.0.2", addr);
    client_handshake(&mut neighbour, &key(1)).unwrap();
    echo_in_steps(&mut neighbour, b"in, only later", 14);

    let delayed = counters.delayed.load(Ordering::SeqCst);
    let mut other = connect_from("127.0.0.3", addr);
    client_handshake(&mut other, &key(1)).unwrap();
    echo_in_steps(&mut other, b"not slowed", 10);
    assert_eq!(counters.delayed.load(Ordering::SeqCst), delayed, "{engine}");
    assert_eq!(counters.throttled.load(Ordering::SeqCst), 0, "{engine}");
    assert_eq!(counters.failed.load(Ordering::SeqCst), 10, "{engine}");
}

/// A guesser that talks before its challenge fails at once: the failure
/// line comes without a challenge before it.
fn talking_before_the_challenge_fails(engine: Engine) {
    let slow = auth::Guard::with_policy(
        key(1),
        ThrottlePolicy {
            free: 2,
            base: Duration::from_secs(5),
            ..ThrottlePolicy::default()
        },
    );
    let (server, counters) = start_guarded(engine, slow, 1);
    let addr = server.addr();
    // Two free attempts used up, so the third is held back for 5 s...
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.2", addr);
        let _ = client_handshake(&mut c, &key(9));
    }
    let mut eager = connect_from("127.0.0.2", addr);
    // ...and answers before it was asked.
    let asked = Instant::now();
    eager.write_all(&[0x55; RESPONSE_LEN]).unwrap();
    assert_eq!(read_to_end(&mut eager), FAILED, "{engine}");
    assert!(asked.elapsed() < Duration::from_secs(4), "{engine}");
    assert_eq!(counters[0].failed.load(Ordering::SeqCst), 3, "{engine}");
}

on_every_engine!(
    every_failure_looks_the_same,
    parallel_guesses_across_listeners_are_spaced_out,
    the_right_key_behind_a_guessing_address_still_gets_in,
    talking_before_the_challenge_fails,
);

#[test]
fn a_million_nonces_are_all_distinct() {
    let mut seen = HashSet::with_capacity(1_000_000);
    for _ in 0..1_000_000 {
        assert!(seen.insert(auth::nonce().unwrap()), "a nonce repeated");
    }
}

#[test]
fn the_line_client_talks_through_authentication() {
    let (server, _) = start_auth(Engine::Mio, Duration::from_secs(5));
    let stream = muxserve::client::connect(&server.addr().to_string(), Some(&key(1))).unwrap();
    let mut out = Vec::new();
    muxserve::client::interact(
        stream,
        std::io::Cursor::new(b"one\ntwo\n".to_vec()),
        &mut out,
    )
    .unwrap();
    assert_eq!(out, b"one\ntwo\n");
    let err = muxserve::client::connect(&server.addr().to_string(), Some(&key(3))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
}
