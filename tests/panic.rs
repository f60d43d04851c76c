//! Panic containment, alone in its process so that its count of open
//! descriptors sees no other test's sockets.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use muxserve::{Config, Context, Engine, Input, Server, Service};

/// Echoes, but panics on a line that says "boom".
struct Fragile;

impl Service for Fragile {
    type Session = ();
    fn on_connect(&mut self, _cx: &mut Context<'_>) {}
    fn on_data(&mut self, cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
        let data = input.take();
        assert!(!data.starts_with(b"boom"), "boom requested");
        cx.write(data);
    }
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn a_panicking_callback_costs_one_connection_on_every_loop_engine() {
    for engine in [Engine::Mio, Engine::Poll, Engine::Select] {
        let mut server = Server::with_engine(engine, Config::default()).unwrap();
        let addr = local(&mut server, Fragile);
        let baseline = open_descriptors();
        let clients = with_clients(&mut server, move || {
            let mut clients: Vec<TcpStream> = (0..50).map(|_| connect(addr)).collect();
            for (i, c) in clients.iter_mut().enumerate() {
                echo_in_steps(c, format!("hello {i}").as_bytes(), 64);
            }
            let mut victim = connect(addr);
            victim.write_all(b"boom").unwrap();
            assert!(read_to_end_or_reset(&mut victim).is_empty());
            for (i, c) in clients.iter_mut().enumerate() {
                echo_in_steps(c, format!("still here {i}").as_bytes(), 64);
            }
            clients
        });
        assert_eq!(server.stats().panics, 1, "{engine}");
        drop(clients);
        step_until(&mut server, Duration::from_secs(10), |s| {
            s.connections() == 0
        });
        assert_eq!(open_descriptors(), baseline, "{engine}: descriptors leaked");
        assert_eq!(server.buffered().capacity, 0);
    }
}

/// Reads to EOF; a reset also counts as the end.
fn read_to_end_or_reset(c: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    match c.read_to_end(&mut out) {
        Ok(_) => out,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => out,
        Err(e) => panic!("read: {e}"),
    }
}

fn with_clients<T: Send + 'static>(
    server: &mut Server,
    client: impl FnOnce() -> T + Send + 'static,
) -> T {
    let handle = thread::spawn(client);
    let end = Instant::now() + Duration::from_secs(60);
    while !handle.is_finished() {
        assert!(Instant::now() < end, "clients did not finish");
        server.run_once(Some(Duration::from_millis(5))).unwrap();
    }
    handle.join().expect("client thread failed")
}

fn step_until(server: &mut Server, limit: Duration, mut done: impl FnMut(&Server) -> bool) {
    let end = Instant::now() + limit;
    while !done(server) {
        assert!(Instant::now() < end, "timed out");
        server.run_once(Some(Duration::from_millis(5))).unwrap();
    }
}
