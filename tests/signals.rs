//! SIGINT and SIGTERM through the loop's self-pipe. Alone in its process,
//! because it sends signals to itself.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use muxserve::services::Echo;
use muxserve::Server;

#[test]
fn a_signal_starts_a_graceful_shutdown_of_a_watching_server() {
    let mut server = Server::new().unwrap();
    let addr = local(&mut server, Echo);
    server.stop_on_signals().unwrap();
    let mut c = connect(addr);
    step_until(&mut server, Duration::from_secs(10), |s| {
        s.connections() == 1
    });
    // SAFETY: raise only sends a signal to this process; the handler that
    // runs is signal-hook's, which writes one byte to a socket.
    assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
    // The open connection keeps being served during the grace period...
    with_clients(&mut server, move || {
        echo_in_steps(&mut c, b"still served", 64);
        c
    });
    // ...and once it closes, the server is done.
    step_until(&mut server, Duration::from_secs(10), |s| s.is_finished());
}

/// signal-hook keeps its handler installed for good; without a fallback,
/// SIGTERM would be caught and ignored once the server is gone.
#[test]
fn once_the_server_is_dropped_sigterm_terminates_the_process_again() {
    const CHILD: &str = "MUXSERVE_SIGNALS_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let mut server = Server::new().unwrap();
        server.stop_on_signals().unwrap();
        drop(server);
        // SAFETY: raise only sends a signal to this (child) process.
        unsafe {
            libc::raise(libc::SIGTERM);
        }
        std::thread::sleep(Duration::from_secs(10));
        return; // not reached when the default action ran
    }
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "once_the_server_is_dropped_sigterm_terminates_the_process_again",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
}

// ---- The `muxserve serve` process, on every engine ----

const EXE: &str = env!("CARGO_BIN_EXE_muxserve");

/// A `serve` process with an echo listener on TCP and a discard listener on
/// a Unix socket file, a long grace period, and its stderr collected.
struct Served {
    process: muxserve::bench::ServerProcess,
    socket: std::path::PathBuf,
    log: std::thread::JoinHandle<Vec<String>>,
    _dir: tempfile::TempDir,
}

fn serve(engine: muxserve::Engine) -> Served {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("discard.sock");
    let unix = format!("discard@unix://{}", socket.display());
    let mut process = muxserve::bench::ServerProcess::spawn_with(
        std::path::Path::new(EXE),
        &[
            "--engine",
            engine.name(),
            "--grace",
            "30",
            "echo@127.0.0.1:0",
            &unix,
        ],
        |cmd| {
            cmd.env("RUST_LOG", "info")
                .stderr(std::process::Stdio::piped());
        },
    )
    .unwrap();
    let stderr = process.child().stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect()
    });
    assert!(socket.exists(), "no socket file at {}", socket.display());
    Served {
        process,
        socket,
        log,
        _dir: dir,
    }
}

impl Served {
    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill only sends a signal to our own child process.
        let sent = unsafe { libc::kill(self.process.pid() as libc::pid_t, signal) };
        assert_eq!(sent, 0);
    }

    /// Waits for the process to exit, failing after `limit`; returns its
    /// status and its log.
    fn exit(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let end = std::time::Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.process.child().try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < end,
                "the server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            !self.socket.exists(),
            "the socket file was left behind: {}",
            self.socket.display()
        );
        (status, self.log.join().unwrap().join("\n"))
    }
}

/// SIGHUP has nothing to reload: it stops the server the way SIGTERM does,
/// with cleanup, instead of killing it as its default action would.
fn sighup_stops_gracefully_and_removes_the_socket_file(engine: muxserve::Engine) {
    let served = serve(engine);
    served.signal(libc::SIGHUP);
    let (status, log) = served.exit(Duration::from_secs(10));
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("SIGHUP: nothing to reload"), "{log}");
    assert!(log.contains("report:"), "{log}");
}

/// SIGQUIT stops at once, without the grace period, but still cleanly: the
/// open connection sees an orderly close, the socket file goes, no core.
fn sigquit_stops_at_once_and_cleanly(engine: muxserve::Engine) {
    let served = serve(engine);
    let mut c = connect(served.process.addr);
    echo_in_steps(&mut c, b"served", 64);
    served.signal(libc::SIGQUIT);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_to_end(&mut c), b"", "bytes after SIGQUIT");
    let (status, log) = served.exit(Duration::from_secs(5));
    assert!(status.success(), "{status}\n{log}");
    assert_eq!(status.signal(), None, "{status}");
    assert!(log.contains("SIGQUIT: stopping now"), "{log}");
}

/// The first SIGTERM starts a graceful shutdown that keeps serving the open
/// connection; a SIGINT after it cuts the 30-second grace period short.
fn a_second_signal_forces_the_stop(engine: muxserve::Engine) {
    let served = serve(engine);
    let mut c = connect(served.process.addr);
    echo_in_steps(&mut c, b"before", 64);
    served.signal(libc::SIGTERM);
    // The listeners go once the signal is taken (the Unix socket file is
    // removed); the open connection is still served after that.
    assert!(
        wait_until(Duration::from_secs(10), || !served.socket.exists()),
        "the listeners were not closed by SIGTERM"
    );
    echo_in_steps(&mut c, b"during the grace period", 64);
    let forced = std::time::Instant::now();
    served.signal(libc::SIGINT);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_to_end(&mut c), b"");
    let (status, log) = served.exit(Duration::from_secs(5));
    assert!(status.success(), "{status}\n{log}");
    assert!(
        forced.elapsed() < Duration::from_secs(2),
        "took {:?} after the second signal",
        forced.elapsed()
    );
    assert!(log.contains("SIGTERM: shutting down gracefully"), "{log}");
    assert!(log.contains("SIGINT again: stopping now"), "{log}");
}

on_every_engine!(
    sighup_stops_gracefully_and_removes_the_socket_file,
    sigquit_stops_at_once_and_cleanly,
    a_second_signal_forces_the_stop,
);
