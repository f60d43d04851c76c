//! Output one client makes the server queue: a burst fanned out to a
//! room, and small inputs that ask for large answers. Limits must hold
//! within one message of their setting, and nobody but the client that
//! does not read may pay for it.

mod common;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use muxserve::services::{Builtin, Chat, Options, Stamp, Zone};
use muxserve::{Config, Limits, Server};

/// The high-water mark of these tests' listeners (the default).
const MARK: usize = 64 * 1024;

/// Steps `server` while `client` runs on a thread (and for at least
/// `at_least`), and returns the most output it held at the end of any turn.
fn most_output_held(
    server: &mut Server,
    at_least: Duration,
    client: impl FnOnce() + Send + 'static,
) -> usize {
    let client = thread::spawn(client);
    let start = Instant::now();
    let mut most = 0;
    while !(client.is_finished() && start.elapsed() >= at_least) {
        assert!(start.elapsed() < Duration::from_secs(60), "client hung");
        server.run_once(Some(Duration::from_millis(5))).unwrap();
        most = most.max(server.buffered().output);
    }
    client.join().expect("client failed");
    most
}

/// A connection with small kernel buffers on both sides, so what the
/// server queues shows up in its own buffers at once.
fn tight_limits() -> Limits {
    let mut limits = Limits::default();
    limits.send_buffer = Some(4096);
    limits
}

/// Writes `data` from a client that never reads, for as long as the
/// kernel takes it (at most `for_at_most`), then leaves the socket open
/// for the caller to close.
fn flood(stream: &TcpStream, data: &[u8], for_at_most: Duration) {
    stream.set_write_timeout(Some(for_at_most)).unwrap();
    // A write that times out has done its job: the server stopped reading.
    let _ = (&*stream).write_all(data);
}

/// A stamp client sending 1-byte lines and never reading: each line asks
/// for about 30 bytes back. The engine must stop *processing* the lines it
/// has read once the output is over the mark, not only stop reading.
fn stamp_output_stays_within_a_line_of_the_mark(engine: Engine) {
    let mut server = Server::with_engine(engine, Config::default()).unwrap();
    let addr = server
        .bind_with(
            LOOPBACK.parse().unwrap(),
            Stamp::service(Zone::Utc),
            tight_limits(),
        )
        .unwrap()
        .socket_addr()
        .unwrap();
    let lines = b"x\n".repeat(200_000);
    let most = most_output_held(&mut server, Duration::from_millis(500), move || {
        let client = small_window_client(addr);
        flood(&client, &lines, Duration::from_secs(1));
        let _ = client.shutdown(Shutdown::Both);
    });
    let line = "[Sat Nov 21 20:23:00 2026] x\r\n".len();
    assert!(most <= MARK + line, "{most} bytes of output held");
    assert!(
        most >= MARK / 2,
        "the test did not fill the output ({most})"
    );
}

/// `/who` in a room of 60 members with long nicknames, a thousand times in
/// one packet, by a member who never reads.
fn repeated_who_stays_within_one_answer_of_the_mark(engine: Engine) {
    let mut server = Server::with_engine(engine, Config::default()).unwrap();
    let addr = server
        .bind_with(
            LOOPBACK.parse().unwrap(),
            Chat::new().service(),
            tight_limits(),
        )
        .unwrap()
        .socket_addr()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let finished = Arc::clone(&done);
    let most = most_output_held(&mut server, Duration::from_millis(300), move || {
        let mut members: Vec<LineClient> = (0..60)
            .map(|i| {
                let mut m = LineClient::connect(addr);
                m.expect("* welcome to muxserve chat");
                m.expect("nickname?");
                m.send(&format!("member-{i:02}-{}", "x".repeat(20)));
                assert!(m.line().starts_with("* welcome, member-"));
                m
            })
            .collect();
        let attacker = small_window_client(addr);
        (&attacker).write_all(b"attacker\n").unwrap();
        // Everyone has seen the attacker join: the room is complete.
        for m in &mut members {
            loop {
                if m.line().starts_with("* attacker joined") {
                    break;
                }
            }
        }
        flood(&attacker, &b"/who\n".repeat(20_000), Duration::from_secs(1));
        finished.store(true, Ordering::SeqCst);
        // Stay connected while the server works through what it read: a
        // close now would reset the connection (its answers are unread)
        // and end the test early.
        thread::sleep(Duration::from_millis(500));
        let _ = attacker.shutdown(Shutdown::Both);
        drop(members);
    });
    assert!(done.load(Ordering::SeqCst));
    let answer = 61 * 31 + 20;
    assert!(most <= MARK + answer, "{most} bytes of output held");
}

/// Fifty members reading normally; one sends 256 KiB of 10-byte lines in
/// one write (a test of finding 2's fairness and of the caps counting
/// only what is left after a flush). Nobody is evicted, and every member gets every line, whole
/// and in order.
fn a_burst_to_the_room_evicts_nobody_and_loses_no_line(engine: Engine) {
    const READERS: usize = 50;
    const LINES: usize = 256 * 1024 / 10;
    // The kernel keeps 32 KiB for each member, so what the readers have not
    // read yet is in the server's queues, where the caps see it.
    let mut config = Config::default();
    config.limits.send_buffer = Some(32 * 1024);
    let server = start_host_with(engine, config, |host| {
        let at = LOOPBACK.parse().unwrap();
        vec![host
            .bind_builtin(Builtin::Chat, at, Options { zone: Zone::Utc })
            .unwrap()]
    });
    let addr = server.addr();
    // The longest nickname: each 10-byte line is 46 bytes for each of 50
    // readers, 1.2 MB each in all, past the hard cap of 1 MiB if it were
    // all queued at once.
    let nick = "s".repeat(32);
    let gate = Arc::new(Gate::new(READERS + 1));
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let gate = Arc::clone(&gate);
            let nick = nick.clone();
            thread::spawn(move || {
                let mut m = LineClient::connect(addr);
                m.expect("* welcome to muxserve chat");
                m.expect("nickname?");
                m.send(&format!("reader{i}"));
                assert!(m.line().starts_with("* welcome, reader"));
                gate.wait();
                let mut next = 0;
                while next < LINES {
                    let line = m.line();
                    if line.starts_with("* ") {
                        // Join notices of the others.
                        assert!(line.ends_with(" joined\r\n"), "{line:?}");
                        continue;
                    }
                    assert_eq!(line, format!("<{nick}> {next:09}\r\n"), "reader {i}");
                    next += 1;
                }
                m
            })
        })
        .collect();
    gate.wait();
    let mut sender = LineClient::connect(addr);
    sender.expect("* welcome to muxserve chat");
    sender.expect("nickname?");
    sender.send(&nick);
    let welcome = sender.line();
    assert!(welcome.contains("; 50 others here"), "{welcome:?}");
    let burst: Vec<u8> = (0..LINES)
        .flat_map(|n| format!("{n:09}\n").into_bytes())
        .collect();
    assert_eq!(burst.len(), LINES * 10);
    sender.stream.write_all(&burst).unwrap();
    let readers: Vec<LineClient> = readers
        .into_iter()
        .map(|r| r.join().expect("a reader missed lines"))
        .collect();
    // The sender is still a member, and was never told it was evicted.
    sender.send("/who");
    let who = sender.line();
    assert!(who.starts_with("* 51 members: "), "{who:?}");
    drop(readers);
    let report = server.shutdown();
    assert_eq!(report.stats.output_limit_closes, 0, "{}", report.stats);
}

on_every_engine!(a_burst_to_the_room_evicts_nobody_and_loses_no_line);

// The thread engine's side of these (its per-connection output queue) is
// in tests/threads_engine.rs.

/// A member that stops reading is still evicted by its cap, and its last
/// notice starts on a line of its own, after whole lines.
fn an_evicted_member_gets_whole_lines_then_the_notice(engine: Engine) {
    let server = start_builtin(engine, Builtin::Chat, Options { zone: Zone::Utc });
    let addr = server.addr();
    let slow = small_window_client(addr);
    slow.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    (&slow).write_all(b"slow\n").unwrap();
    let mut talker = LineClient::connect(addr);
    talker.expect("* welcome to muxserve chat");
    talker.expect("nickname?");
    talker.send("talker");
    talker.line();
    // More than the hard cap (1 MiB) for a member that reads nothing.
    let line = format!("{}\n", "y".repeat(1000));
    for _ in 0..3000 {
        if talker.stream.write_all(line.as_bytes()).is_err() {
            break;
        }
        if server_evicted(&mut talker) {
            break;
        }
    }
    let mut got = Vec::new();
    // The close may end in a reset if the member never catches up.
    let _ = std::io::Read::read_to_end(&mut &slow, &mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("<talker> "), "nothing arrived");
    for l in text.split_inclusive("\r\n") {
        let whole = l.starts_with("* ")
            || l == "nickname?\r\n"
            || l == format!("<talker> {}\r\n", "y".repeat(1000));
        assert!(whole || !l.ends_with("\r\n"), "a cut line: {l:?}");
        assert!(
            !l.contains("you are not reading") || l.starts_with("* "),
            "{l:?}"
        );
    }
    drop(server);
}

/// Whether the talker has been told that "slow" left (non-blocking peek).
fn server_evicted(talker: &mut LineClient) -> bool {
    talker.stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let seen = match talker.stream.peek(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).contains("slow left"),
        Err(_) => false,
    };
    talker.stream.set_nonblocking(false).unwrap();
    seen
}

on_engines!([loop_mio => Mio, loop_poll => Poll, loop_select => Select] (
    stamp_output_stays_within_a_line_of_the_mark,
    repeated_who_stays_within_one_answer_of_the_mark,
    an_evicted_member_gets_whole_lines_then_the_notice,
));
