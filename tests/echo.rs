//! Echo and discard on the mio engine: byte-exactness at every chunk size,
//! many clients, half-close, backpressure, stale connection ids, and a long
//! reply followed by a close.

mod common;

use std::cell::RefCell;
use std::io::Write;
use std::net::Shutdown;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use muxserve::services::{Discard, Echo, Stamp, Zone};
use muxserve::{ConnId, Context, Input, Server, Service};
use rand::{Rng, SeedableRng};

const MIB: usize = 1024 * 1024;

#[test]
fn one_mib_in_random_chunks_comes_back_byte_exact() {
    let server = start_one(Echo);
    let mut client = connect(server.addr());
    let data = pattern(MIB, 1);
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    let feeder = thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut rest = &sent[..];
        while !rest.is_empty() {
            let n = rng.gen_range(1..=8192).min(rest.len());
            writer.write_all(&rest[..n]).unwrap();
            rest = &rest[n..];
        }
    });
    let back = read_exact(&mut client, MIB);
    feeder.join().unwrap();
    assert!(back == data, "echoed bytes differ");
    assert_silent(&mut client, Duration::from_millis(50));
}

#[test]
fn a_thousand_concurrent_clients_each_echo_64_kib() {
    const CLIENTS: usize = 1000;
    let server = start_one(Echo);
    let addr = server.addr();
    let barrier = Arc::new(Gate::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let mut client = connect(addr);
                    // Everyone is connected before anyone echoes.
                    barrier.wait();
                    echo_in_steps(&mut client, &pattern(64 * 1024, i as u64 + 1), 8192);
                })
                .unwrap()
        })
        .collect();
    for c in clients {
        c.join().expect("client failed");
    }
    let report = server.shutdown();
    assert_eq!(report.stats.accepted, CLIENTS as u64);
    assert_eq!(report.stats.bytes_out, (CLIENTS * 64 * 1024) as u64);
}

#[test]
fn half_close_gets_every_byte_then_eof() {
    let server = start_one(Echo);
    let mut client = connect(server.addr());
    let data = pattern(MIB, 2);
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    let feeder = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let back = read_to_end(&mut client);
    feeder.join().unwrap();
    assert_eq!(back.len(), MIB);
    assert!(back == data, "echoed bytes differ");
}

#[test]
fn discard_reads_everything_and_answers_nothing() {
    let server = start_one(Discard);
    let mut client = connect(server.addr());
    client.write_all(&pattern(256 * 1024, 3)).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut client), b"");
    let report = server.shutdown();
    assert_eq!(report.stats.bytes_in, 256 * 1024);
    assert_eq!(report.stats.bytes_out, 0);
}

/// A client that writes 16 MiB and never reads must not make the server
/// buffer more than the high-water mark plus one read chunk, and must not
/// slow 50 others down. The test steps the loop itself so it can look at
/// the server's buffers after every turn.
#[test]
fn a_client_that_never_reads_is_held_back_while_others_are_served() {
    const OTHERS: usize = 50;
    let mut server = Server::new().unwrap();
    let addr = local(&mut server, Echo);

    let mut hog = connect(addr);
    hog.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let hog_thread = thread::spawn(move || {
        let chunk = pattern(64 * 1024, 9);
        let mut written = 0;
        while written < 16 * MIB {
            match hog.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break, // blocked for 2 s: the server stopped reading
            }
        }
        (written, hog)
    });

    let done = Arc::new(AtomicUsize::new(0));
    let others: Vec<_> = (0..OTHERS)
        .map(|i| {
            let done = Arc::clone(&done);
            thread::spawn(move || {
                let mut c = connect(addr);
                echo_in_steps(&mut c, &pattern(64 * 1024, 100 + i as u64), 4096);
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();

    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(hog_thread.is_finished() && done.load(Ordering::SeqCst) == OTHERS) {
        assert!(Instant::now() < deadline, "clients did not finish");
        server.run_once(Some(Duration::from_millis(10))).unwrap();
        let b = server.buffered();
        most = most.max(b.input + b.output);
    }
    for o in others {
        o.join().expect("a well-behaved client failed");
    }
    let (written, _hog) = hog_thread.join().unwrap();
    assert!(
        written < 16 * MIB,
        "the server kept reading: {written} bytes taken"
    );
    let limit = 64 * 1024 + 64 * 1024 + 4096;
    assert!(most <= limit, "server buffered {most} bytes for one client");
    assert!(most > 16 * 1024, "the hog never pushed back ({most} bytes)");
}

/// Records the ids it hands out and, on any input, tries to write to the
/// first connection it ever saw.
struct Spy {
    ids: Rc<RefCell<Vec<ConnId>>>,
}

impl Service for Spy {
    type Session = ();

    fn on_connect(&mut self, cx: &mut Context<'_>) {
        self.ids.borrow_mut().push(cx.id());
    }

    fn on_data(&mut self, cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
        input.take();
        let first = self.ids.borrow()[0];
        let delivered = cx.send(first, b"LEAK");
        cx.write(format!("ok:{delivered}\n").as_bytes());
    }
}

#[test]
fn a_stale_conn_id_reaches_nothing_in_a_reused_slot() {
    let ids = Rc::new(RefCell::new(Vec::new()));
    let mut server = Server::new().unwrap();
    let addr = local(
        &mut server,
        Spy {
            ids: Rc::clone(&ids),
        },
    );
    let step_until = |server: &mut Server, what: &dyn Fn(&Server) -> bool| {
        for _ in 0..500 {
            if what(server) {
                return;
            }
            server.run_once(Some(Duration::from_millis(10))).unwrap();
        }
        panic!("server never got there");
    };

    let first = connect(addr);
    step_until(&mut server, &|s| s.connections() == 1);
    drop(first);
    step_until(&mut server, &|s| s.connections() == 0);

    let mut second = connect(addr);
    step_until(&mut server, &|s| s.connections() == 1);
    second.write_all(b"x").unwrap();
    step_until(&mut server, &|s| s.stats().bytes_out > 0);

    let ids = ids.borrow().clone();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    assert_eq!(
        format!("{:?}", ids[0]).split('.').next(),
        format!("{:?}", ids[1]).split('.').next(),
        "slot was not reused"
    );
    assert_eq!(read_exact(&mut second, 9), b"ok:false\n");
    assert_silent(&mut second, Duration::from_millis(50));
}

#[test]
fn idle_connections_hold_no_buffers_after_echoing() {
    let mut server = Server::new().unwrap();
    let addr = local(&mut server, Echo);
    let clients = thread::spawn(move || {
        (0..100u8)
            .map(|i| {
                let mut c = connect(addr);
                // An odd size, and one that leaves no partial anything.
                let data = pattern(1000 + i as usize, i as u64 + 1);
                c.write_all(&data).unwrap();
                assert_eq!(read_exact(&mut c, data.len()), data);
                c
            })
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !clients.is_finished() {
        assert!(Instant::now() < deadline, "clients did not finish");
        server.run_once(Some(Duration::from_millis(10))).unwrap();
    }
    let clients = clients.join().unwrap();
    assert_eq!(server.connections(), 100);
    assert_eq!(server.buffered().capacity, 0, "{:?}", server.buffered());
    drop(clients);
}

#[test]
fn held_input_and_output_are_freed_once_they_drain() {
    let mut server = Server::new().unwrap();
    let echo = local(&mut server, Echo);
    let stamp = local(&mut server, Stamp::service(Zone::Utc));
    let wait = Duration::from_secs(20);

    // Input: half a line waits in the connection until its end arrives.
    let mut liner = connect(stamp);
    liner.write_all(b"half a li").unwrap();
    step_until(&mut server, wait, |s| s.buffered().input == 9);
    liner.write_all(b"ne\n").unwrap();
    // The reply is sent in the turn that takes the line.
    step_until(&mut server, wait, |s| s.buffered().input == 0);
    let mut reply = Vec::new();
    while !reply.ends_with(b"\n") {
        let mut byte = [0];
        std::io::Read::read_exact(&mut liner, &mut byte).unwrap();
        reply.push(byte[0]);
    }
    assert!(reply.ends_with(b"] half a line\r\n"), "{reply:?}");
    assert_eq!(server.buffered(), Default::default());

    // Output: a client that does not read leaves replies queued (its small
    // receive window keeps the kernel from absorbing them all).
    let mut silent = small_window_client(echo);
    silent.set_nonblocking(true).unwrap();
    let data = pattern(8 * MIB, 3);
    let mut sent = 0;
    step_until(&mut server, wait, |s| {
        if let Ok(n) = silent.write(&data[sent..]) {
            sent += n;
        }
        s.buffered().output > 0
    });
    // Now it reads everything; the queues and what holds them go.
    let mut back = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    step_until(&mut server, wait, |s| {
        if sent < data.len() {
            if let Ok(n) = silent.write(&data[sent..]) {
                sent += n;
            }
        }
        while let Ok(n) = std::io::Read::read(&mut silent, &mut buf) {
            back.extend_from_slice(&buf[..n]);
        }
        back.len() == data.len() && s.buffered() == Default::default()
    });
    assert!(back == data, "echoed bytes differ");
}

/// On any input, replies with a long body, then a short trailer, then
/// closes.
struct Speech(Vec<u8>);

impl Service for Speech {
    type Session = ();

    fn on_connect(&mut self, _cx: &mut Context<'_>) {}

    fn on_data(&mut self, cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
        input.take();
        cx.write(&self.0);
        cx.write(b"END\n");
        cx.close();
    }
}

/// A long reply is sent straight from the service's slice when nothing is
/// queued before it (up to the write budget), or staged and queued when
/// longer; either way the trailer follows it in order, and the close waits
/// for both and ends in a FIN, not a reset. (A close behind output that
/// had passed the high-water mark used to wait for the 2 s close deadline
/// and then reset.)
#[test]
fn a_long_reply_then_close_arrives_whole_and_in_order() {
    for len in [200 * 1024, 600 * 1024] {
        let body = pattern(len, 5);
        let speech = Speech(body.clone());
        let server = start(move || {
            let mut config = muxserve::Config::default();
            // Small socket buffers, so the kernel cannot take a whole
            // reply while the peer is not reading.
            config.limits.send_buffer = Some(16 * 1024);
            let mut server = Server::with_config(config).unwrap();
            let addr = local(&mut server, speech);
            (server, vec![addr.into()])
        });
        let mut expected = body;
        expected.extend_from_slice(b"END\n");
        // A fast reader, and one whose small window makes the kernel take
        // only part of the body, so the rest and the trailer queue.
        for mut client in [connect(server.addr()), small_window_client(server.addr())] {
            client.write_all(b"go\n").unwrap();
            // A reset instead of the FIN fails here.
            let back = read_to_end(&mut client);
            assert!(back == expected, "{len} B: the reply came back changed");
        }
        let stats = server.shutdown().stats;
        assert_eq!(stats.bytes_out, 2 * expected.len() as u64);
    }
}
