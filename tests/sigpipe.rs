//! A peer that resets in the middle of a transfer, with SIGPIPE at its
//! default disposition (terminate), as in a host program that never
//! ignored it. Alone in its process because it changes that disposition.
//! If any engine wrote without MSG_NOSIGNAL, this process would die.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use common::*;
use muxserve::services::{Builtin, Echo, Options};
use muxserve::{Endpoint, Server};

/// Sends a lot from another thread, reads a little, then resets: the
/// server is busy writing to us when the connection goes.
fn reset_mid_transfer<S: Read + Write + Send + 'static>(
    mut c: S,
    mut writer: S,
    reset: impl FnOnce(),
) {
    let feeder = thread::spawn(move || {
        // Fails once the connection is reset; that is the point.
        let _ = writer.write_all(&pattern(4 * 1024 * 1024, 1));
    });
    let mut back = [0u8; 64 * 1024];
    c.read_exact(&mut back).unwrap();
    reset();
    drop(c);
    feeder.join().unwrap();
}

#[test]
fn resets_mid_transfer_with_sigpipe_at_default_leave_the_server_serving() {
    // SAFETY: restoring the default disposition of one signal; no handler
    // code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    for engine in [Engine::Mio, Engine::Threads] {
        let server = start_host(engine, |host| {
            vec![host
                .bind_builtin(Builtin::Echo, LOOPBACK.parse().unwrap(), Options::default())
                .unwrap()]
        });
        for _ in 0..3 {
            let c = connect(server.addr());
            let (reader, writer) = (c.try_clone().unwrap(), c.try_clone().unwrap());
            reset_mid_transfer(reader, writer, || {
                // SO_LINGER 0, then close: a reset, not a FIN.
                socket2::SockRef::from(&c)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                c.shutdown(std::net::Shutdown::Both).unwrap();
            });
            thread::sleep(Duration::from_millis(50)); // let the server hit the reset
        }
        let mut next = connect(server.addr());
        echo_in_steps(&mut next, b"still serving", 13);
        drop(server);
    }
    // And over a Unix stream socket on the loop engine.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let p = path.clone();
    let _server = start(move || {
        let mut server = Server::new().unwrap();
        let bound = server.bind(Endpoint::Unix(p), Echo).unwrap();
        (server, vec![bound])
    });
    for _ in 0..3 {
        let c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let (reader, writer) = (c.try_clone().unwrap(), c.try_clone().unwrap());
        // Closing with unread data resets a Unix stream too.
        reset_mid_transfer(reader, writer, || {
            c.shutdown(std::net::Shutdown::Both).unwrap()
        });
        thread::sleep(Duration::from_millis(50));
    }
    let mut c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.write_all(b"ok?").unwrap();
    let mut back = [0u8; 3];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ok?");
}
