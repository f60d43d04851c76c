//! Datagrams, Unix sockets, IPv6, and many bindings on one loop.

mod common;

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use common::*;
use muxserve::services::{Builtin, Daytime, Echo, Options, Stamp, Time, Zone};
use muxserve::{Endpoint, Server};

const UTC: Options = Options { zone: Zone::Utc };

fn unix(kind: &str, path: &Path) -> String {
    format!("{kind}://{}", path.display())
}

fn recv_timeout(socket: &std::net::UdpSocket, wait: Duration) -> io::Result<Vec<u8>> {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0; 70_000];
    let n = socket.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

#[test]
fn udp_echo_is_byte_exact_from_empty_to_the_largest_datagram() {
    let server = start_bindings(
        Engine::Mio,
        vec![(Builtin::Echo, "udp://127.0.0.1:0".into())],
        UTC,
    );
    let client = udp_client();
    client.connect(server.udp()).unwrap();
    for size in [0, 1, 1472, 65_507] {
        let data = pattern(size, size as u64 + 1);
        client.send(&data).unwrap();
        let back = recv_timeout(&client, IO_TIMEOUT).unwrap();
        assert_eq!(back.len(), size);
        assert!(back == data, "{size}-byte datagram differs");
    }
    let report = server.shutdown();
    assert_eq!(report.stats.datagrams_in, 4);
    assert_eq!(report.stats.datagrams_out, 4);
}

#[test]
fn udp_time_and_daytime_answer_any_datagram() {
    let server = start_bindings(
        Engine::Mio,
        vec![
            (Builtin::Time, "udp://127.0.0.1:0".into()),
            (Builtin::Daytime, "udp://127.0.0.1:0".into()),
        ],
        UTC,
    );
    let [time, daytime] = [0, 1].map(|i| server.endpoints[i].socket_addr().unwrap());
    let client = udp_client();
    client.send_to(b"", time).unwrap();
    let got = recv_timeout(&client, IO_TIMEOUT).unwrap();
    assert_eq!(got.len(), 4);
    client.send_to(b"what time is it?", daytime).unwrap();
    let line = String::from_utf8(recv_timeout(&client, IO_TIMEOUT).unwrap()).unwrap();
    assert!(
        line.ends_with("\r\n") && line.matches('\n').count() == 1,
        "{line:?}"
    );
    assert_eq!(line.len(), "Sat Nov 21 20:23:00 2026\r\n".len(), "{line:?}");
}

#[test]
fn udp_stamp_prefixes_the_datagram() {
    let server = start_bindings(
        Engine::Mio,
        vec![(Builtin::Stamp, "udp://127.0.0.1:0".into())],
        UTC,
    );
    let client = udp_client();
    client.send_to(b"hello\n", server.udp()).unwrap();
    let got = String::from_utf8(recv_timeout(&client, IO_TIMEOUT).unwrap()).unwrap();
    assert!(
        got.starts_with('[') && got.ends_with("] hello\n"),
        "{got:?}"
    );
}

fn the_reflection_guard_ignores_datagrams_from_port_7(engine: Engine) {
    let server = start_bindings(
        engine,
        vec![(Builtin::Echo, "udp://127.0.0.1:0".into())],
        UTC,
    );
    // Pretend to be another host's echo service (port 7 needs root, which
    // CI and this machine have; 127.0.0.7 keeps it clear of a real one).
    let reflector = std::net::UdpSocket::bind("127.0.0.7:7").expect("bind port 7 (needs root)");
    reflector.send_to(b"ping", server.udp()).unwrap();
    let err = recv_timeout(&reflector, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ));
    // An ordinary client is still answered.
    let client = udp_client();
    client.send_to(b"pong", server.udp()).unwrap();
    assert_eq!(recv_timeout(&client, IO_TIMEOUT).unwrap(), b"pong");
    let report = server.shutdown();
    assert_eq!(report.stats.reflection_drops, 1);
}

fn a_unix_datagram_larger_than_the_buffer_is_dropped_and_counted(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.dgram");
    let server = start_bindings(
        engine,
        vec![(Builtin::Echo, unix("unix-dgram", &path))],
        UTC,
    );
    let client = UnixDatagram::bind(dir.path().join("client")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    client.send_to(&pattern(70_000, 5), &path).unwrap();
    let mut buf = vec![0; 80_000];
    let err = client.recv(&mut buf).unwrap_err();
    assert!(matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ));
    // The next datagram, which fits, is echoed whole.
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let small = pattern(65_536, 6);
    client.send_to(&small, &path).unwrap();
    let n = client.recv(&mut buf).unwrap();
    assert!(buf[..n] == small[..], "{n} bytes back");
    let report = server.shutdown();
    assert_eq!(report.stats.oversize_datagrams, 1);
    assert_eq!(report.stats.datagrams_out, 1);
}

fn a_panicking_datagram_callback_costs_only_that_datagram(engine: Engine) {
    let server = start_host(engine, |host| {
        vec![host.bind_dgram_fn(|data| {
            assert!(data != b"boom", "the service fails on this one");
            data.to_ascii_uppercase()
        })]
    });
    let client = udp_client();
    client.send_to(b"boom", server.udp()).unwrap();
    client.send_to(b"still here", server.udp()).unwrap();
    assert_eq!(recv_timeout(&client, IO_TIMEOUT).unwrap(), b"STILL HERE");
    let report = server.shutdown();
    assert_eq!(report.stats.panics, 1);
    assert_eq!(
        (report.stats.datagrams_in, report.stats.datagrams_out),
        (2, 1)
    );
}

// The datagram path is shared code; these run it on both kinds of engine
// (a loop, and the thread engine's blocking thread per socket).
on_engines!([mio_dgram => Mio, threads_dgram => Threads] (
    the_reflection_guard_ignores_datagrams_from_port_7,
    a_unix_datagram_larger_than_the_buffer_is_dropped_and_counted,
    a_panicking_datagram_callback_costs_only_that_datagram,
));

#[test]
fn unix_stream_echo_with_half_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let _server = start_bindings(Engine::Mio, vec![(Builtin::Echo, unix("unix", &path))], UTC);
    let mut client = UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let data = pattern(1024 * 1024, 7);
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    let feeder = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    io::Read::read_to_end(&mut client, &mut back).unwrap();
    feeder.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
}

#[test]
fn unix_datagram_echo() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.dgram");
    let _server = start_bindings(
        Engine::Mio,
        vec![(Builtin::Echo, unix("unix-dgram", &path))],
        UTC,
    );
    let client = UnixDatagram::bind(dir.path().join("client")).unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    client.send_to(b"over a unix datagram", &path).unwrap();
    let mut buf = [0; 100];
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"over a unix datagram");
}

#[test]
fn ipv6_echo_on_loopback() {
    let server = start(|| {
        let mut server = Server::new().unwrap();
        let bound = server.bind("[::1]:0", Echo).unwrap();
        (server, vec![bound])
    });
    let addr = server.addr();
    assert!(addr.is_ipv6());
    let mut c = connect(addr);
    echo_in_steps(&mut c, &pattern(100_000, 8), 4096);
}

#[test]
fn one_loop_serves_six_bindings_of_four_services() {
    let dir = tempfile::tempdir().unwrap();
    let (stamp_path, echo_dgram_path) =
        (dir.path().join("stamp.sock"), dir.path().join("echo.dgram"));
    let (p1, p2) = (stamp_path.clone(), echo_dgram_path.clone());
    let server = start(move || {
        let mut server = Server::new().unwrap();
        let zone = Zone::Utc;
        let bound = vec![
            server.bind(LOOPBACK, Echo).unwrap(),
            server.bind_datagram("udp://127.0.0.1:0", Echo).unwrap(),
            server
                .bind_datagram(Endpoint::UnixDatagram(p2), Echo)
                .unwrap(),
            server.bind(LOOPBACK, Time).unwrap(),
            server
                .bind_datagram("udp://127.0.0.1:0", Daytime { zone })
                .unwrap(),
            server
                .bind(Endpoint::Unix(p1), Stamp::service(zone))
                .unwrap(),
        ];
        (server, bound)
    });
    let e = &server.endpoints;
    // TCP echo.
    let mut c = connect(e[0].socket_addr().unwrap());
    echo_in_steps(&mut c, b"tcp echo", 8);
    // UDP echo.
    let udp = udp_client();
    udp.send_to(b"udp echo", e[1].socket_addr().unwrap())
        .unwrap();
    assert_eq!(recv_timeout(&udp, IO_TIMEOUT).unwrap(), b"udp echo");
    // Unix datagram echo.
    let ud = UnixDatagram::bind(dir.path().join("client")).unwrap();
    ud.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    ud.send_to(b"unix echo", &echo_dgram_path).unwrap();
    let mut buf = [0; 64];
    let n = ud.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"unix echo");
    // TCP time.
    let mut t = connect(e[3].socket_addr().unwrap());
    assert_eq!(read_to_end(&mut t).len(), 4);
    // UDP daytime.
    udp.send_to(b"", e[4].socket_addr().unwrap()).unwrap();
    assert!(recv_timeout(&udp, IO_TIMEOUT).unwrap().ends_with(b"\r\n"));
    // Unix stream stamp.
    let mut s = UnixStream::connect(&stamp_path).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"unix stamp\n").unwrap();
    let mut line = String::new();
    io::BufRead::read_line(&mut io::BufReader::new(s), &mut line).unwrap();
    assert!(line.ends_with("] unix stamp\r\n"), "{line:?}");
}

#[test]
fn socket_files_are_private_replaced_when_stale_and_removed_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    // A stale socket file: bound once, nobody listening now.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = start_bindings(Engine::Mio, vec![(Builtin::Echo, unix("unix", &path))], UTC);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "mode {mode:o}");
    // A second server must not take over a live socket.
    let mut other = Server::new().unwrap();
    let err = other.bind(Endpoint::Unix(path.clone()), Echo).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    drop(other);
    assert!(path.exists(), "the failed bind removed the live socket");
    // A regular file is never removed.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let mut third = Server::new().unwrap();
    assert!(third.bind(Endpoint::Unix(file.clone()), Echo).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    server.shutdown();
    assert!(!path.exists(), "socket file left after shutdown");
}
