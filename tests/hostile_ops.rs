//! Operating a server against hostile settings and files, on every engine:
//! durations as large as `Duration::MAX`, and the command line refusing
//! absurd ones.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use muxserve::auth::{client_handshake, Key};
use muxserve::services::{Builtin, Echo, Options};
use muxserve::{Config, Endpoint};

const EXE: &str = env!("CARGO_BIN_EXE_muxserve");

/// Every duration of the configuration and of the default limits at
/// `Duration::MAX`.
fn config_of_forever() -> Config {
    let mut config = Config::default();
    config.grace = Duration::MAX;
    config.linger = Duration::MAX;
    config.stats_interval = Some(Duration::MAX);
    config.limits.idle_timeout = Some(Duration::MAX);
    config.limits.frame_timeout = Some(Duration::MAX);
    config.limits.write_timeout = Some(Duration::MAX);
    config
}

fn key() -> Key {
    Key::new(vec![7; 32]).unwrap()
}

fn tcp(endpoint: &Endpoint) -> SocketAddr {
    endpoint.socket_addr().expect("a TCP endpoint")
}

fn durations_of_duration_max_never_panic(engine: Engine) {
    let server = start_host_with(engine, config_of_forever(), |host| {
        let echo = host
            .bind_builtin(Builtin::Echo, LOOPBACK.parse().unwrap(), Options::default())
            .unwrap();
        let chat = host
            .bind_builtin(Builtin::Chat, LOOPBACK.parse().unwrap(), Options::default())
            .unwrap();
        // Authentication arms a timer of its timeout on every connection.
        let (auth, _) = host.bind_authenticated(
            muxserve::auth::Authenticated::new(Echo, key()).timeout(Duration::MAX),
        );
        vec![echo, chat, auth]
    });
    let (echo, chat, auth) = (
        tcp(&server.endpoints[0]),
        tcp(&server.endpoints[1]),
        tcp(&server.endpoints[2]),
    );

    // A client that sends and never reads: the server's output for it backs
    // up, which arms the write-stall timer (and pauses reading it).
    let mut hog = small_window_client(echo);
    hog.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let chunk = pattern(64 * 1024, 5);
    let mut sent = 0usize;
    while hog.write_all(&chunk).is_ok() {
        sent += chunk.len();
        assert!(sent < 256 * 1024 * 1024, "the server never pushed back");
    }

    // The server keeps serving: a plain echo client, a chat (whose lines
    // arm frame timers), and an authenticated client.
    let mut plain = connect(echo);
    echo_in_steps(&mut plain, b"still serving", 13);
    let mut alice = join(chat, "alice");
    let mut bob = join(chat, "bob");
    alice.expect("* bob joined");
    alice.send("hello");
    bob.expect("<alice> hello");
    let mut authed = connect(auth);
    client_handshake(&mut authed, &key()).unwrap();
    echo_in_steps(&mut authed, b"behind the key", 14);

    // The clients that would keep an endless grace period going leave;
    // the chat members are told goodbye and closed by the room itself.
    drop((hog, plain, authed));
    server.handle().shutdown();
    for member in [&mut alice, &mut bob] {
        member.expect("* the server is shutting down; goodbye");
        // The thread engine may still pass on the other member's leave
        // notice before the end.
        let rest = read_to_end_or_reset(&mut member.stream);
        let rest = String::from_utf8(rest).unwrap();
        assert!(
            rest.lines().all(|l| l.ends_with(" left")),
            "{engine}: {rest:?}"
        );
    }
    drop((alice, bob));
    let report = server.shutdown();
    assert_eq!(report.stats.panics, 0, "{engine}: {report}");
}

/// Runs the command line; returns its exit code and stderr. A command that
/// is still running after a few seconds (it took the arguments and is
/// serving) is killed and fails the test.
fn run_cli(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(EXE)
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} was accepted: the server ran");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code().unwrap_or(-1), stderr)
}

#[test]
fn the_cli_refuses_durations_beyond_a_year_and_nonsense_ones() {
    let flags = [
        "--write-timeout",
        "--grace",
        "--stats-interval",
        "--frame-timeout",
        "--idle-timeout",
    ];
    for flag in flags {
        for value in ["1e19", "31536001", "-1", "NaN", "inf"] {
            let arg = format!("{flag}={value}");
            let (code, stderr) = run_cli(&["serve", &arg, "echo@127.0.0.1:0"]);
            assert_eq!(code, 2, "{arg}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{arg}: {stderr}");
            assert!(
                stderr.starts_with("muxserve: ") && stderr.contains(flag),
                "{arg}: {stderr}"
            );
        }
    }
    let (code, stderr) = run_cli(&["serve", "--write-timeout", "1e19", "echo@127.0.0.1:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("'--write-timeout <SECS>'") && stderr.contains("more than a year"),
        "{stderr}"
    );
}

/// The largest accepted value still serves, and a non-reading client
/// cannot crash the process with it.
#[test]
fn the_cli_takes_a_year_and_keeps_serving_a_client_that_does_not_read() {
    let year = "31536000";
    let mut server = muxserve::bench::ServerProcess::spawn_with(
        std::path::Path::new(EXE),
        &[
            "echo@127.0.0.1:0",
            "--write-timeout",
            year,
            "--grace",
            year,
            "--idle-timeout",
            year,
            "--frame-timeout",
            year,
            "--stats-interval",
            year,
        ],
        |cmd| {
            cmd.env("RUST_LOG", "error");
        },
    )
    .unwrap();
    let mut hog = small_window_client(server.addr);
    hog.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let chunk = pattern(64 * 1024, 9);
    let mut sent = 0usize;
    while hog.write_all(&chunk).is_ok() {
        sent += chunk.len();
        assert!(sent < 256 * 1024 * 1024, "the server never pushed back");
    }
    let mut c = connect(server.addr);
    echo_in_steps(&mut c, b"alive", 5);
    let mut none = [0u8; 1];
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    assert!(c.read(&mut none).is_err(), "unexpected bytes");
    assert!(
        server.child().try_wait().unwrap().is_none(),
        "the server exited"
    );
    c.write_all(b"!").unwrap();
}

// Unix socket files: a server removes only the file it made, refuses a
// path a live server holds, and leaves nothing behind when it fails to
// start.

/// Echoes `data` over a Unix stream connection to `path`.
fn unix_echo(path: &std::path::Path, data: &[u8]) {
    let mut c = std::os::unix::net::UnixStream::connect(path).expect("connect");
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
}

/// Sends one datagram to `path` from a bound client and returns the reply.
fn unix_dgram_echo(dir: &std::path::Path, path: &std::path::Path, data: &[u8]) -> Vec<u8> {
    let me = dir.join(format!("client-{}.dgram", std::process::id()));
    let _ = std::fs::remove_file(&me);
    let c = std::os::unix::net::UnixDatagram::bind(&me).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.send_to(data, path).unwrap();
    let mut buf = [0u8; 256];
    let n = c.recv(&mut buf).unwrap();
    drop(c);
    std::fs::remove_file(&me).unwrap();
    buf[..n].to_vec()
}

fn echo_on(at: &[&std::path::Path]) -> Vec<(Builtin, String)> {
    vec![
        (Builtin::Echo, format!("unix://{}", at[0].display())),
        (Builtin::Echo, format!("unix-dgram://{}", at[1].display())),
    ]
}

fn shutdown_removes_only_our_own_socket_file(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let (stream, dgram) = (dir.path().join("echo.sock"), dir.path().join("echo.dgram"));
    let a = start_bindings(engine, echo_on(&[&stream, &dgram]), Options::default());
    unix_echo(&stream, b"from A");
    // The way a restart is often done: remove the file, start the new one.
    std::fs::remove_file(&stream).unwrap();
    std::fs::remove_file(&dgram).unwrap();
    let b = start_bindings(engine, echo_on(&[&stream, &dgram]), Options::default());
    a.shutdown();
    assert!(stream.exists(), "{engine}: A removed B's socket file");
    assert!(
        dgram.exists(),
        "{engine}: A removed B's datagram socket file"
    );
    unix_echo(&stream, b"from B");
    assert_eq!(unix_dgram_echo(dir.path(), &dgram, b"dgram B"), b"dgram B");
    b.shutdown();
    assert!(!stream.exists(), "{engine}: B left its socket file");
    assert!(!dgram.exists(), "{engine}: B left its datagram socket file");
}

fn a_live_socket_file_is_never_taken_over(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let (stream, dgram) = (dir.path().join("echo.sock"), dir.path().join("echo.dgram"));
    let a = start_bindings(engine, echo_on(&[&stream, &dgram]), Options::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (s, d) = (stream.clone(), dgram.clone());
    let b = start_host(engine, move |host| {
        for at in [
            format!("unix://{}", s.display()),
            format!("unix-dgram://{}", d.display()),
        ] {
            let got = host.bind_builtin(Builtin::Echo, at.parse().unwrap(), Options::default());
            tx.send(got.map_err(|e| (e.kind(), e.to_string()))).unwrap();
        }
        vec![]
    });
    for _ in 0..2 {
        match rx.recv().unwrap() {
            Err((kind, message)) => {
                assert_eq!(kind, std::io::ErrorKind::AddrInUse, "{engine}: {message}");
                assert!(message.contains("in use"), "{message}");
            }
            Ok(bound) => panic!("{engine}: took over {bound} from a live server"),
        }
    }
    drop(b);
    // The refused bind touched nothing of A's.
    unix_echo(&stream, b"A still here");
    assert_eq!(unix_dgram_echo(dir.path(), &dgram, b"A dgram"), b"A dgram");
    a.shutdown();
    assert!(!stream.exists() && !dgram.exists(), "{engine}");
}

/// Binds `first` (stream and datagram), then fails on a path in a
/// directory that does not exist, and drops the server without running it.
fn fail_to_start<H: muxserve::Host>(
    mut host: H,
    first: &[&std::path::Path],
    bad: &std::path::Path,
) {
    for (service, at) in echo_on(first) {
        service
            .bind(&mut host, at.parse().unwrap(), Options::default())
            .unwrap();
    }
    assert!(first.iter().all(|p| p.exists()));
    let at = format!("unix://{}", bad.display());
    assert!(Builtin::Echo
        .bind(&mut host, at.parse().unwrap(), Options::default())
        .is_err());
}

fn a_failed_start_leaves_no_socket_file(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let (stream, dgram) = (dir.path().join("echo.sock"), dir.path().join("echo.dgram"));
    let bad = dir.path().join("no-such-dir").join("x.sock");
    match engine {
        Engine::Threads => fail_to_start(
            muxserve::ThreadedServer::new(Config::default(), Default::default()).unwrap(),
            &[&stream, &dgram],
            &bad,
        ),
        loop_engine => fail_to_start(
            muxserve::Server::with_engine(loop_engine, Config::default()).unwrap(),
            &[&stream, &dgram],
            &bad,
        ),
    }
    assert!(!stream.exists(), "{engine}: the socket file stayed");
    assert!(!dgram.exists(), "{engine}: the datagram socket file stayed");

    // The command line: the second binding fails, exit 2, nothing left.
    let first = format!("echo@unix://{}", stream.display());
    let second = format!("echo@unix://{}", bad.display());
    let (code, stderr) = run_cli(&["serve", "--engine", engine.name(), &first, &second]);
    assert_eq!(code, 2, "{engine}: {stderr}");
    assert!(
        !stream.exists(),
        "{engine}: the command left its socket file"
    );
}

on_every_engine!(
    durations_of_duration_max_never_panic,
    shutdown_removes_only_our_own_socket_file,
    a_live_socket_file_is_never_taken_over,
    a_failed_start_leaves_no_socket_file,
);
