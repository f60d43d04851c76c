//! A server exposed to strangers: connection limits, admission, slow-loris
//! clients, stalled readers, and panicking services.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use muxserve::config::PanicPolicy;
use muxserve::services::{Echo, Stamp, Zone};
use muxserve::{Config, Server};

#[test]
fn over_max_connections_clients_get_an_error_line_then_eof() {
    let mut config = Config::default();
    config.max_connections = 100;
    let mut server = Server::with_config(config).unwrap();
    let addr = local(&mut server, Echo);
    let mut served = with_clients(&mut server, move || {
        (0..100)
            .map(|i| {
                let mut c = connect(addr);
                echo_in_steps(&mut c, &[i as u8; 10], 10);
                c
            })
            .collect::<Vec<_>>()
    });
    with_clients(&mut server, move || {
        for _ in 0..20 {
            let mut c = connect(addr);
            assert_eq!(
                read_to_end(&mut c),
                b"error: server full, try again later\r\n"
            );
        }
    });
    assert_eq!(server.stats().rejected_limit, 20);
    // Ten leave; ten newcomers are served.
    served.truncate(90);
    step_until(&mut server, Duration::from_secs(10), |s| {
        s.stats().active == 90
    });
    let newcomers = with_clients(&mut server, move || {
        (0..10)
            .map(|i| {
                let mut c = connect(addr);
                echo_in_steps(&mut c, &[i as u8; 10], 10);
                c
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(server.stats().rejected_limit, 20);
    assert_eq!(server.stats().active, 100);
    drop((served, newcomers));
}

#[test]
fn the_admission_hook_refuses_peers() {
    let seen = Arc::new(AtomicUsize::new(0));
    let mut server = Server::new().unwrap();
    let counter = Arc::clone(&seen);
    // Refuse every second connection.
    server.set_admission(move |_peer| counter.fetch_add(1, Ordering::SeqCst) % 2 == 0);
    let addr = local(&mut server, Echo);
    with_clients(&mut server, move || {
        let mut first = connect(addr);
        echo_in_steps(&mut first, b"welcome", 7);
        let mut second = connect(addr);
        assert_eq!(read_to_end(&mut second), b"");
        let mut third = connect(addr);
        echo_in_steps(&mut third, b"welcome too", 11);
    });
    assert_eq!(server.stats().rejected_admission, 1);
    assert_eq!(seen.load(Ordering::SeqCst), 3);
}

/// 200 clients start a line and then send one byte a second: each is
/// closed between the frame timeout and 1.5 s after it, while 20 normal
/// clients are served without a hitch.
#[test]
fn slow_loris_clients_are_closed_by_the_frame_timeout() {
    const LORIS: usize = 200;
    let timeout = Duration::from_secs(1);
    let server = start(move || {
        let mut config = Config::default();
        config.limits.frame_timeout = Some(timeout);
        let mut server = Server::with_config(config).unwrap();
        let addr = local(&mut server, Stamp::service(Zone::Utc));
        (server, vec![addr.into()])
    });
    let addr = server.addr();
    let normal: Vec<_> = (0..20)
        .map(|i| {
            thread::spawn(move || {
                let mut c = LineClient::connect(addr);
                for n in 0..30 {
                    c.send(&format!("client {i} line {n}"));
                    let line = c.line();
                    assert!(
                        line.ends_with(&format!("] client {i} line {n}\r\n")),
                        "{line:?}"
                    );
                    thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    // Each loris: a partial line, then a byte a second until closed.
    let mut loris: Vec<(TcpStream, Instant, Option<Duration>)> = (0..LORIS)
        .map(|_| {
            let mut c = connect(addr);
            c.write_all(b"GET / HTTP/1.1 slow").unwrap();
            c.set_nonblocking(true).unwrap();
            (c, Instant::now(), None)
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(10);
    let mut next_byte = Instant::now() + Duration::from_secs(1);
    while loris.iter().any(|l| l.2.is_none()) {
        assert!(Instant::now() < end, "some slow clients were never closed");
        let send = Instant::now() >= next_byte;
        if send {
            next_byte += Duration::from_secs(1);
        }
        for (c, started, closed) in loris.iter_mut().filter(|l| l.2.is_none()) {
            let mut buf = [0u8; 256];
            match c.read(&mut buf) {
                Ok(0) => *closed = Some(started.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if send {
                        let _ = c.write(b".");
                    }
                }
                Err(_) => *closed = Some(started.elapsed()),
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    for (_, _, closed) in &loris {
        let after = closed.unwrap();
        assert!(
            after >= timeout && after <= timeout + Duration::from_millis(1500),
            "closed after {after:?}"
        );
    }
    for n in normal {
        n.join().expect("a normal client saw an error");
    }
    let report = server.shutdown();
    assert_eq!(
        report.stats.frame_timeouts, LORIS as u64,
        "{}",
        report.stats
    );
}

#[test]
fn a_peer_whose_output_stalls_is_dropped_after_the_write_timeout() {
    let timeout = Duration::from_secs(1);
    let server = start(move || {
        let mut config = Config::default();
        config.limits.write_timeout = Some(timeout);
        config.limits.send_buffer = Some(64 * 1024);
        let mut server = Server::with_config(config).unwrap();
        let addr = local(&mut server, Echo);
        (server, vec![addr.into()])
    });
    let mut hog = connect(server.addr());
    hog.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // Write until the server stops reading, never read.
    let chunk = pattern(64 * 1024, 4);
    let start = Instant::now();
    while hog.write_all(&chunk).is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the server never pushed back"
        );
    }
    let report = server.shutdown();
    assert_eq!(report.stats.write_timeouts, 1, "{}", report.stats);
}

#[test]
fn the_shutdown_policy_stops_the_server_after_a_panic() {
    let mut config = Config::default();
    config.on_panic = PanicPolicy::Shutdown;
    config.grace = Duration::from_millis(200);
    let mut server = Server::with_config(config).unwrap();
    let addr = local(&mut server, Fragile);
    let client = thread::spawn(move || {
        let mut c = connect(addr);
        c.write_all(b"boom").unwrap();
        read_to_end_or_reset(&mut c)
    });
    step_until(&mut server, Duration::from_secs(10), |s| s.is_finished());
    assert_eq!(server.report().stats.panics, 1);
    client.join().unwrap();
}

/// The data callback on the read path is guarded once per batch of events,
/// not once per call: a panic must still cost only its own connection, and
/// the events after it in the same batch must still be served.
#[test]
fn a_panic_in_the_middle_of_a_batch_loses_no_other_event() {
    for engine in [muxserve::Engine::Mio, muxserve::Engine::Poll] {
        let mut server = Server::with_engine(engine, Config::default()).unwrap();
        let addr = local(&mut server, Fragile);
        let mut clients: Vec<TcpStream> = (0..20).map(|_| connect(addr)).collect();
        let mut victim = connect(addr);
        step_until(&mut server, Duration::from_secs(10), |s| {
            s.connections() == 21
        });
        // Everything is in the kernel before the server looks, so one wait
        // reports all 21 sockets, the victim among the others.
        for (i, c) in clients.iter_mut().enumerate() {
            c.write_all(format!("before {i}").as_bytes()).unwrap();
            if i == 9 {
                victim.write_all(b"boom").unwrap();
            }
        }
        server.run_once(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(server.stats().panics, 1, "{engine}");
        // No further turn: every echo must have gone out in that one.
        for (i, c) in clients.iter_mut().enumerate() {
            let want = format!("before {i}");
            let mut got = vec![0; want.len()];
            c.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("{engine}: client {i} got no echo: {e}"));
            assert_eq!(got, want.as_bytes(), "{engine}");
        }
        let gone = thread::spawn(move || read_to_end_or_reset(&mut victim));
        step_until(&mut server, Duration::from_secs(10), |_| gone.is_finished());
        assert!(gone.join().unwrap().is_empty(), "{engine}");
        with_clients(&mut server, move || {
            for (i, c) in clients.iter_mut().enumerate() {
                echo_in_steps(c, format!("after {i}").as_bytes(), 64);
            }
        });
    }
}
