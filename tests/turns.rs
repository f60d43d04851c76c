//! A loop with nothing to do must sleep: no interest in a readiness it
//! will not act on, no timer that fires for nobody. Counted with
//! `Stats::turns` over a couple of seconds of nothing happening.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use common::*;
use muxserve::services::Echo;
use muxserve::{Config, Limits, Server};

/// A client that sends without reading until the server stops reading it
/// (its output is above the high-water mark): the connection is paused,
/// and still readable. poll and select used to report it on every wait.
fn a_backpressured_client_lets_the_loop_sleep(engine: Engine) {
    let mut server = Server::with_engine(engine, Config::default()).unwrap();
    let mut limits = Limits::default();
    limits.send_buffer = Some(4096);
    let addr = server
        .bind_with(LOOPBACK.parse().unwrap(), Echo, limits)
        .unwrap()
        .socket_addr()
        .unwrap();
    let client = small_window_client(addr);
    let writer = {
        let client = client.try_clone().unwrap();
        thread::spawn(move || {
            client
                .set_write_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            // Blocks once every buffer on the way is full; the shutdown
            // below ends it.
            let _ = (&client).write_all(&vec![7u8; 8 << 20]);
        })
    };
    step_until(&mut server, Duration::from_secs(10), |s| {
        s.buffered().output > 64 * 1024
    });
    // Let the kernel's buffers fill up behind the paused connection.
    let _ = turns_in(&mut server, Duration::from_millis(200));
    let turns = turns_in(&mut server, Duration::from_secs(2));
    assert!(turns <= 10, "{turns} turns in 2 s with one paused client");
    client.shutdown(Shutdown::Both).unwrap();
    writer.join().unwrap();
}

/// After the last connection with an idle timeout has gone, the idle sweep
/// stops: an empty server does not wake up once a second for ever.
fn an_empty_server_sleeps(engine: Engine) {
    let mut server = Server::with_engine(engine, Config::default()).unwrap();
    let addr = local(&mut server, Echo);
    with_clients(&mut server, move || {
        let mut c = connect(addr);
        echo_in_steps(&mut c, b"hello", 5);
    });
    step_until(&mut server, Duration::from_secs(10), |s| {
        s.connections() == 0
    });
    // One sweep finds nobody and is the last; the other turn is the end
    // of the test's own wait. A sweep every second would make it 3 or more.
    let turns = turns_in(&mut server, Duration::from_millis(2500));
    assert!(turns <= 2, "{turns} turns in 2.5 s with no connection");
}

on_engines!([mio => Mio, poll => Poll, select => Select] (
    a_backpressured_client_lets_the_loop_sleep,
    an_empty_server_sleeps,
));
