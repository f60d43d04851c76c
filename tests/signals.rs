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
