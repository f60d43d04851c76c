//! Chat beyond the basics: negotiation, commands, bad input, and a member
//! that stops reading while a hundred others keep up.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use muxserve::services::chat::{Caps, Chat};
use muxserve::{Config, Server};

#[test]
fn nicknames_are_negotiated() {
    let server = start_one(Chat::new().service());
    let _alice = join(server.addr(), "alice");
    let mut c = LineClient::connect(server.addr());
    c.expect("* welcome to muxserve chat");
    c.expect("nickname?");
    for bad in ["", "has space", "émile", &"x".repeat(33)] {
        c.send(bad);
        c.expect("error: a nickname is 1-32 letters, digits, '_' or '-'");
        c.expect("nickname?");
    }
    c.send("alice");
    c.expect("error: nickname alice is taken");
    c.expect("nickname?");
    c.send(&"b".repeat(32));
    assert!(c
        .line()
        .starts_with(&format!("* welcome, {};", "b".repeat(32))));
}

#[test]
fn commands_and_notices_reach_the_right_members() {
    let server = start_one(Chat::new().service());
    let addr = server.addr();
    let mut a = join(addr, "a");
    let mut b = join(addr, "b");
    a.expect("* b joined");
    let mut c = join(addr, "c");
    a.expect("* c joined");
    b.expect("* c joined");

    b.send("/nick bee");
    b.expect("* you are now bee");
    a.expect("* b is now known as bee");
    c.expect("* b is now known as bee");
    a.send("/me waves");
    b.expect("* a waves");
    c.expect("* a waves");
    a.send("/msg bee only for you");
    b.expect("*a* only for you");
    a.send("/msg nobody hello");
    a.expect("error: no such nickname nobody");
    c.send("//not a command");
    a.expect("<c> /not a command");
    b.expect("<c> /not a command");
    c.send("/dance");
    c.expect("error: unknown command /dance; /help lists commands");
    c.send("/who");
    c.expect("* 3 members: a, bee, c");
    // c's own lines never came back to c, and a/bee saw nothing private.
    drop(c);
    a.expect("* c left");
    b.expect("* c left");
    a.send("/who");
    a.expect("* 2 members: a, bee");
}

#[test]
fn bad_lines_get_an_error_and_the_sender_stays() {
    let server = start_one(Chat::new().service());
    let addr = server.addr();
    let mut a = join(addr, "a");
    let mut b = join(addr, "b");
    a.expect("* b joined");
    b.stream.write_all(b"caf\xe9\n").unwrap();
    b.expect("error: that line is not UTF-8; not sent");
    let long = "y".repeat(20 * 1024);
    b.send(&long);
    b.expect("error: message longer than 16384 bytes; not sent");
    b.send("still here");
    a.expect("<b> still here");
    a.send("/who");
    a.expect("* 2 members: a, b");
}

/// A member with a tiny receive window that never reads is evicted once
/// its output passes the hard cap, while 100 members get every message of
/// two busy senders, in order, exactly once.
///
/// The senders stay at most `WINDOW` messages ahead of the slowest reader,
/// as people in a chat would: the readers here are test threads sharing two
/// cores with the server, and without pacing the honest ones could fall
/// behind by more than the cap too.
#[test]
fn a_member_that_never_reads_is_evicted_and_slows_no_one() {
    const MEMBERS: usize = 100;
    const PER_SENDER: usize = 800;
    const WINDOW: usize = 40;
    let caps = Caps {
        hard: 64 * 1024,
        soft: 32 * 1024,
        soft_for: Duration::from_secs(10),
    };
    let server = start(move || {
        let mut config = Config::default();
        // Keep the kernel from absorbing megabytes for the hog.
        config.limits.send_buffer = Some(64 * 1024);
        let mut server = Server::with_config(config).unwrap();
        let addr = local(&mut server, Chat::with_caps(caps).service());
        (server, vec![addr.into()])
    });
    let addr = server.addr();

    let hog = join_hog(addr);

    let received: Arc<Vec<AtomicUsize>> =
        Arc::new((0..MEMBERS).map(|_| AtomicUsize::new(0)).collect());
    let sent: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let ready = Arc::new(Gate::new(MEMBERS + 1));
    let members: Vec<_> = (0..MEMBERS)
        .map(|i| {
            let (ready, received, sent) =
                (Arc::clone(&ready), Arc::clone(&received), Arc::clone(&sent));
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let nick = format!("m{i}");
                    let mut c = join(addr, &nick);
                    ready.wait();
                    let senders: &[usize] = match i {
                        0 => &[1],
                        1 => &[0],
                        _ => &[0, 1],
                    };
                    let mut sender = (i < 2).then(|| {
                        let mut w = c.stream.try_clone().unwrap();
                        let (received, sent) = (Arc::clone(&received), Arc::clone(&sent));
                        thread::spawn(move || {
                            let pad = "x".repeat(500);
                            for seq in 0..PER_SENDER {
                                pace(&received, &sent, WINDOW);
                                w.write_all(format!("{seq} {pad}\n").as_bytes()).unwrap();
                                sent[i].fetch_add(1, Ordering::SeqCst);
                            }
                        })
                    });
                    // Every message of every other sender, in order, once.
                    let mut next: HashMap<usize, usize> = senders.iter().map(|&s| (s, 0)).collect();
                    let mut left = senders.len() * PER_SENDER;
                    while left > 0 {
                        let line = c.line();
                        let Some(rest) = line.strip_prefix("<m") else {
                            continue; // join and leave notices
                        };
                        let (from, text) = rest.split_once("> ").unwrap();
                        let from: usize = from.parse().unwrap();
                        let seq: usize = text.split(' ').next().unwrap().parse().unwrap();
                        let expected = next.get_mut(&from).expect("a message from a non-sender");
                        assert_eq!(seq, *expected, "{nick}: from m{from}");
                        *expected += 1;
                        left -= 1;
                        received[i].fetch_add(1, Ordering::SeqCst);
                    }
                    if let Some(s) = sender.take() {
                        s.join().unwrap();
                    }
                    c
                })
                .unwrap()
        })
        .collect();
    ready.wait();
    let clients: Vec<LineClient> = members
        .into_iter()
        .map(|m| m.join().expect("a member missed messages"))
        .collect();
    let report = server.shutdown();
    assert_eq!(report.stats.output_limit_closes, 1, "{}", report.stats);
    drop((hog, clients));
}

/// Waits until every member has read all but `window` of the messages
/// meant for it so far (bounded: a stuck reader fails the test instead).
fn pace(received: &[AtomicUsize], sent: &[AtomicUsize; 2], window: usize) {
    let sent = [
        sent[0].load(Ordering::SeqCst),
        sent[1].load(Ordering::SeqCst),
    ];
    let behind = |m: usize| {
        let meant = if m < 2 {
            sent[1 - m]
        } else {
            sent[0] + sent[1]
        };
        meant > received[m].load(Ordering::SeqCst) + window
    };
    assert!(
        wait_until(Duration::from_secs(20), || !(0..received.len()).any(behind)),
        "readers stopped reading"
    );
}

/// On the thread engine each member's own thread writes its queue, so a
/// member that stops reading blocks only that thread: it is dropped at its
/// write timeout, and the others get every message, in order, meanwhile.
#[test]
fn on_threads_a_member_that_never_reads_is_dropped_at_its_write_timeout() {
    const MEMBERS: usize = 5;
    const MESSAGES: usize = 400;
    let write_timeout = Duration::from_secs(1);
    let mut config = Config::default();
    config.limits.write_timeout = Some(write_timeout);
    config.limits.send_buffer = Some(64 * 1024);
    let server = start_host_with(Engine::Threads, config, |host| {
        let opts = muxserve::services::Options::default();
        vec![host
            .bind_builtin(
                muxserve::services::Builtin::Chat,
                LOOPBACK.parse().unwrap(),
                opts,
            )
            .unwrap()]
    });
    let addr = server.addr();
    let hog = join_hog(addr);

    let ready = Arc::new(Gate::new(MEMBERS + 1));
    let members: Vec<_> = (0..MEMBERS)
        .map(|i| {
            let ready = Arc::clone(&ready);
            thread::spawn(move || {
                let mut c = join(addr, &format!("t{i}"));
                ready.wait();
                if i == 0 {
                    let pad = "z".repeat(500);
                    let mut w = c.stream.try_clone().unwrap();
                    for seq in 0..MESSAGES {
                        w.write_all(format!("{seq} {pad}\n").as_bytes()).unwrap();
                    }
                    return (c, Duration::ZERO);
                }
                let (mut next, mut last, mut worst) =
                    (0, std::time::Instant::now(), Duration::ZERO);
                while next < MESSAGES {
                    let line = c.line();
                    if let Some(rest) = line.strip_prefix("<t0> ") {
                        let seq: usize = rest.split(' ').next().unwrap().parse().unwrap();
                        assert_eq!(seq, next, "t{i}");
                        next += 1;
                        worst = worst.max(last.elapsed());
                        last = std::time::Instant::now();
                    }
                }
                (c, worst)
            })
        })
        .collect();
    ready.wait();
    // Keep every client open until all are done: closing one with unread
    // input would reset it and destroy what the server had not read yet.
    let results: Vec<_> = members
        .into_iter()
        .map(|m| m.join().expect("a member missed messages"))
        .collect();
    for (_, worst) in &results {
        assert!(
            *worst < write_timeout * 3,
            "a member waited {worst:?} between messages"
        );
    }
    // The others may be done before the hog's writer has been stalled for
    // a whole write timeout; the room tells them when it is dropped.
    let mut results = results;
    let watcher = &mut results[1].0;
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.starts_with("* hog left")) {
        assert!(seen.len() < 10, "no departure notice for the hog: {seen:?}");
        seen.push(watcher.line());
    }
    let report = server.shutdown();
    assert_eq!(report.stats.write_timeouts, 1, "{}", report.stats);
    drop((hog, results));
}
