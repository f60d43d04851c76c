//! Shutdown on every engine: requests in flight finish, idle connections
//! are cut off at the end of the grace period and reported, and the server
//! returns.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use muxserve::services::{Builtin, Options};
use muxserve::Config;

/// Requests in flight finish; idle connections are cut off when the grace
/// period ends and reported; the listener is gone.
fn graceful_shutdown(engine: Engine) {
    let grace = Duration::from_millis(500);
    let mut config = Config::default();
    config.grace = grace;
    let server = start_host_with(engine, config, |host| {
        vec![host
            .bind_builtin(Builtin::Echo, LOOPBACK.parse().unwrap(), Options::default())
            .unwrap()]
    });
    let addr = server.addr();
    let mut idle = connect(addr);
    let mut busy = connect(server.addr());
    echo_in_steps(&mut busy, b"before", 6);
    let start = Instant::now();
    let handle = server.handle();
    handle.shutdown();
    // Still served during the grace period.
    busy.write_all(b"during").unwrap();
    assert_eq!(read_exact(&mut busy, 6), b"during");
    let report = server.shutdown();
    let took = start.elapsed();
    assert!(
        took >= grace && took < grace + Duration::from_secs(2),
        "{engine}: {took:?}"
    );
    assert_eq!(report.cut_off, 2, "{engine}: {report}");
    assert_eq!(read_to_end(&mut idle), b"", "{engine}");
    // The listener is gone: nobody accepts on its port any more.
    let err = std::net::TcpStream::connect(addr).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{engine}"
    );
}

on_every_engine!(graceful_shutdown);
