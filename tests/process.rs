//! The `muxserve` command as a child process: descriptor exhaustion under a
//! low RLIMIT_NOFILE, graceful shutdown on SIGTERM, one-line errors, and
//! the loop trace.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use muxserve::bench::{proc_cpu, ServerProcess};

const EXE: &str = env!("CARGO_BIN_EXE_muxserve");

fn cpu(server: &ServerProcess) -> Duration {
    let (user, system) = proc_cpu(server.pid()).unwrap();
    user + system
}

/// Which clients have their 4-byte greeting echoed within `wait`.
fn echoed(clients: &mut [(TcpStream, bool)], wait: Duration) {
    let end = Instant::now() + wait;
    while Instant::now() < end && clients.iter().any(|c| !c.1) {
        for (c, done) in clients.iter_mut().filter(|c| !c.1) {
            let mut buf = [0u8; 4];
            match c.peek(&mut buf) {
                Ok(4) => *done = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("client: {e}"),
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn out_of_descriptors_the_server_waits_without_spinning_and_recovers_alone() {
    const LIMIT: libc::rlim_t = 128;
    let mut server = ServerProcess::spawn_with(
        Path::new(EXE),
        &[
            "echo@127.0.0.1:0",
            "--fd-reserve",
            "0",
            "--max-connections",
            "100000",
        ],
        |cmd| {
            cmd.env("RUST_LOG", "error");
            // SAFETY: setrlimit is async-signal-safe and touches only the
            // child's own limits; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    let rl = libc::rlimit {
                        rlim_cur: LIMIT,
                        rlim_max: LIMIT,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    )
    .unwrap();
    // More clients than the server has descriptors: the rest wait in the
    // listen backlog.
    let mut clients: Vec<(TcpStream, bool)> = (0..200u32)
        .map(|i| {
            let mut c = connect(server.addr);
            c.write_all(&i.to_be_bytes()).unwrap();
            c.set_nonblocking(true).unwrap();
            (c, false)
        })
        .collect();
    echoed(&mut clients, Duration::from_secs(3));
    let served = clients.iter().filter(|c| c.1).count();
    assert!(
        served > 50 && served < 128,
        "{served} clients served under a limit of {LIMIT}"
    );

    // Saturated: the server must neither exit nor spin.
    let before = cpu(&server);
    thread::sleep(Duration::from_secs(1));
    let used = cpu(&server) - before;
    assert!(
        server.child().try_wait().unwrap().is_none(),
        "the server exited"
    );
    assert!(
        used <= Duration::from_millis(100),
        "{used:?} of CPU in one second while saturated"
    );

    // Ten served clients leave; queued ones are served with no new arrival.
    let mut left = 0;
    clients.retain(|c| {
        let leave = c.1 && left < 10;
        left += usize::from(leave);
        !leave
    });
    let freed = Instant::now();
    let mut waiting: Vec<(TcpStream, bool)> = clients.into_iter().filter(|c| !c.1).collect();
    echoed(&mut waiting, Duration::from_millis(200));
    let took = freed.elapsed();
    let now_served = waiting.iter().filter(|c| c.1).count();
    assert!(
        now_served >= 1,
        "no queued client was served within {took:?}"
    );
    echoed(&mut waiting, Duration::from_secs(2));
    assert!(
        waiting.iter().filter(|c| c.1).count() >= 10,
        "fewer than 10 queued clients were served"
    );
}

#[test]
fn sigterm_lets_transfers_finish_drops_a_silent_reader_and_exits_zero() {
    const CLIENTS: usize = 20;
    const SIZE: usize = 4 * 1024 * 1024;
    let grace = Duration::from_secs(4);
    let mut server = ServerProcess::spawn_with(
        Path::new(EXE),
        &["echo@127.0.0.1:0", "--grace", "4"],
        |cmd| {
            cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
        },
    )
    .unwrap();
    let log = stderr_lines(&mut server);
    let addr = server.addr;

    let progress = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let progress = Arc::clone(&progress);
            thread::spawn(move || {
                let mut c = connect(addr);
                let data = pattern(SIZE, i as u64 + 1);
                let mut w = c.try_clone().unwrap();
                let sent = data.clone();
                let writer = thread::spawn(move || {
                    for piece in sent.chunks(64 * 1024) {
                        w.write_all(piece).unwrap();
                        thread::sleep(Duration::from_millis(2));
                    }
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::with_capacity(SIZE);
                let mut buf = vec![0u8; 64 * 1024];
                let mut counted = false;
                loop {
                    let n = c.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    back.extend_from_slice(&buf[..n]);
                    if !counted && back.len() >= SIZE / 8 {
                        counted = true;
                        progress.fetch_add(1, Ordering::SeqCst);
                    }
                }
                writer.join().unwrap();
                assert!(
                    back == data,
                    "client {i} got {} of {SIZE} bytes back",
                    back.len()
                );
            })
        })
        .collect();
    // One client sends until the server pushes back, and never reads: the
    // server is left holding output for it.
    let silent = thread::spawn(move || {
        let mut c = connect(addr);
        c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let chunk = pattern(64 * 1024, 99);
        let start = Instant::now();
        while c.write_all(&chunk).is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the server never pushed back"
            );
        }
        c
    });

    assert!(
        wait_until(Duration::from_secs(30), || progress.load(Ordering::SeqCst)
            == CLIENTS),
        "transfers did not get going"
    );
    let silent = silent.join().unwrap();
    let signalled = Instant::now();
    // SAFETY: kill only sends a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
    for c in clients {
        c.join().expect("a client lost bytes");
    }
    let status = wait_exit(&mut server, grace + Duration::from_secs(5));
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= grace,
        "exited after {took:?}, before the grace period ended"
    );
    let log = log.join().unwrap().join("\n");
    assert!(
        log.contains("shutdown cut off 1 connections (1 with"),
        "{log}"
    );
    assert!(!log.contains("muxserve::trace"), "traced without --trace");
    drop(silent);
}

/// Collects the server's stderr, line by line, until it closes.
fn stderr_lines(server: &mut ServerProcess) -> thread::JoinHandle<Vec<String>> {
    let stderr = server.child().stderr.take().expect("stderr piped");
    thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect()
    })
}

/// Waits for the server to exit, failing the test after `limit`.
fn wait_exit(server: &mut ServerProcess, limit: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = server.child().try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < end, "the server did not exit");
        thread::sleep(Duration::from_millis(20));
    }
}

fn run_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(EXE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn bad_input_gets_one_line_and_exit_code_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let in_use = format!("echo@{}", taken.local_addr().unwrap());
    let cases: [(&[&str], &str); 11] = [
        (&["serve", "--bogus"], "unexpected argument '--bogus'"),
        (
            &["serve", "nosuch@127.0.0.1:1"],
            "unknown service \"nosuch\"",
        ),
        (&["serve", "echo@999.0.0.1:1"], "bad address"),
        (&["serve", &in_use], "in use"),
        (&["serve", "--engine", "fibers"], "unknown engine"),
        (
            &["serve", "--engine", "bare", "daytime@127.0.0.1:0"],
            "the bare peer serves exactly one echo@HOST:PORT binding",
        ),
        (&["bench", "--conns", "many"], "invalid value 'many'"),
        (
            &["bench", "--engines", "mio,fibers"],
            "unknown engine \"fibers\"",
        ),
        (
            &["bench", "--sizes", "64,0"],
            "'0' for '--sizes <SIZES>': must be at least 1",
        ),
        (&["bench", "--duration", "0"], "must be more than 0 seconds"),
        (
            &["bench", "--engines", "mio,poll", "--reference", "tokio"],
            "--reference tokio is not one of the --engines",
        ),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run_cli(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("muxserve: ") && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
    }
    let (code, stdout_help) = {
        let out = Command::new(EXE).arg("--help").output().unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap())
    };
    assert_eq!(code, Some(0));
    assert!(stdout_help.contains("serve"));
}

/// `serve --trace` prints what each loop turn saw and did, in order.
#[test]
fn trace_mode_narrates_a_connection() {
    let mut server =
        ServerProcess::spawn_with(Path::new(EXE), &["--trace", "echo@127.0.0.1:0"], |cmd| {
            cmd.env_remove("RUST_LOG").stderr(Stdio::piped());
        })
        .unwrap();
    let log = stderr_lines(&mut server);
    let mut c = connect(server.addr);
    c.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        c.read(&mut [0u8; 16]).unwrap(),
        0,
        "the server did not close"
    );
    // SAFETY: kill only sends a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
    wait_exit(&mut server, Duration::from_secs(10));
    let log = log.join().unwrap();
    let steps = [
        "readable: connections to accept",
        "accepted #",
        " readable",
        "read 5 B",
        "Echo consumed 5 of 5 B",
        "sent 5 B",
        "read 0 B: the peer shut down its sending side",
        "closed: closed",
    ];
    let mut from = 0;
    for step in steps {
        let Some(at) = log[from..]
            .iter()
            .position(|l| l.contains("muxserve::trace") && l.contains(step))
        else {
            panic!(
                "no trace line with {step:?} after line {from}:\n{}",
                log.join("\n")
            );
        };
        from += at + 1;
    }
    assert!(
        log.iter().any(|l| l.contains("] turn 1: ")),
        "{}",
        log.join("\n")
    );
}
