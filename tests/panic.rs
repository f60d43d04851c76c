//! Panic containment, alone in its process so that its count of open
//! descriptors sees no other test's sockets.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use muxserve::{Config, Engine, Server};

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
