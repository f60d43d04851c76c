//! Out of descriptors, the loop engines pause accepting and retry on a
//! timer, without spinning: a readiness nobody can act on (the listener,
//! with connections queued behind it) must not wake every wait.
//!
//! One test in its own binary, engines in turn: it fills this process's
//! descriptor table, which every other test in the same process would
//! feel.

mod common;

use std::fs::File;
use std::time::Duration;

use common::*;
use muxserve::services::Echo;
use muxserve::{Config, Server};

/// Opens descriptors until the process has none left.
fn exhaust_descriptors() -> Vec<File> {
    let null = File::open("/dev/null").unwrap();
    let mut held = Vec::new();
    for _ in 0..1_000_000 {
        match null.try_clone() {
            Ok(f) => held.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                held.push(null);
                return held;
            }
            Err(e) => panic!("dup: {e}"),
        }
    }
    panic!("the descriptor limit was not reached");
}

fn waits_for_descriptors_without_spinning(engine: Engine) {
    let mut config = Config::default();
    config.fd_reserve = 0;
    let mut server = Server::with_engine(engine, config).unwrap();
    let addr = local(&mut server, Echo);
    // Queued in the backlog, not accepted yet.
    let mut clients: Vec<_> = (0..3).map(|_| connect(addr)).collect();
    let held = exhaust_descriptors();
    let turns = turns_in(&mut server, Duration::from_secs(2));
    let stats = server.stats();
    assert!(stats.accept_no_fds >= 1, "{engine}: {stats}");
    assert_eq!(stats.accepted, 0, "{engine}: {stats}");
    // Retrying every 100 ms is 20 turns in 2 s.
    assert!(
        turns <= 25,
        "{engine}: {turns} turns in 2 s out of descriptors"
    );
    drop(held);
    // With descriptors back, the queued clients are served on the next
    // retry, with no new arrival to wake the listener.
    with_clients(&mut server, move || {
        for c in &mut clients {
            echo_in_steps(c, b"back", 4);
        }
    });
}

#[test]
fn out_of_descriptors_the_loop_engines_wait_without_spinning() {
    for engine in [Engine::Mio, Engine::Poll, Engine::Select] {
        waits_for_descriptors_without_spinning(engine);
    }
}
