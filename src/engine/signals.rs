//! SIGINT and SIGTERM, turned into readiness on a socket the loop watches.
//!
//! The usual way to watch signals from Rust is a thread that blocks on
//! them. A loop engine must not do that: the moment a process has a second
//! thread, glibc's `recv` and `send` start paying for pthread cancellation
//! bookkeeping on every call. Measured with callgrind on the echo loop,
//! that was about 90 of 730 user-space instructions per request. So the
//! signal handler (installed by signal-hook) writes one byte to one end of
//! a socket pair, and the loop reads the other end like any other source.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::SigId;

use super::server::Handle;

/// The signals that stop a server.
pub(crate) const STOP_SIGNALS: [i32; 2] = [SIGINT, SIGTERM];

/// The read end of the self-pipe, and the handler registrations, which are
/// removed when this is dropped (a process may run many servers in turn).
pub(crate) struct SignalPipe {
    read: UnixStream,
    ids: Vec<SigId>,
    seen: u32,
}

/// Signal-hook never gives a signal back to the system: once its handler is
/// installed, removing our actions would leave SIGINT and SIGTERM caught and
/// ignored after the last server is gone. So a fallback action, registered
/// once per process, runs the default action (terminate) whenever no
/// server is watching; `WATCHING` counts the servers that are, and is held
/// while the fallback is switched so the two always agree.
static WATCHING: Mutex<usize> = Mutex::new(0);
static FALLBACK: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn fallback() -> io::Result<&'static Arc<AtomicBool>> {
    if let Some(flag) = FALLBACK.get() {
        return Ok(flag);
    }
    let flag = Arc::new(AtomicBool::new(false));
    for signal in STOP_SIGNALS {
        signal_hook::flag::register_conditional_default(signal, Arc::clone(&flag))?;
    }
    Ok(FALLBACK.get_or_init(|| flag))
}

impl SignalPipe {
    pub(crate) fn new() -> io::Result<SignalPipe> {
        let mut watching = WATCHING.lock().unwrap_or_else(|e| e.into_inner());
        let fallback = fallback()?;
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        // signal-hook writes with MSG_DONTWAIT: a full pipe drops the byte
        // rather than blocking a signal handler.
        let mut ids = Vec::with_capacity(STOP_SIGNALS.len());
        for signal in STOP_SIGNALS {
            let registered = write
                .try_clone()
                .and_then(|end| signal_hook::low_level::pipe::register(signal, end));
            match registered {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        signal_hook::low_level::unregister(id);
                    }
                    return Err(e);
                }
            }
        }
        *watching += 1;
        fallback.store(false, Ordering::SeqCst);
        Ok(SignalPipe { read, ids, seen: 0 })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Reads what the handler wrote and acts on each signal: the first
    /// starts a graceful shutdown, any later one stops at once.
    pub(crate) fn take(&mut self, handle: &Handle) {
        let mut buf = [0u8; 64];
        loop {
            match self.read.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    for _ in 0..n {
                        self.seen += 1;
                        stop_signal(handle, self.seen);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock: drained. Anything else cannot happen to a
                // socket pair we own both ends of; nothing to act on.
                Err(_) => return,
            }
        }
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        let mut watching = WATCHING.lock().unwrap_or_else(|e| e.into_inner());
        for &id in &self.ids {
            signal_hook::low_level::unregister(id);
        }
        *watching -= 1;
        if *watching == 0 {
            // The last watching server is gone: the signals terminate the
            // process again, as they did before any server was made.
            if let Some(flag) = FALLBACK.get() {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// What the `nth` stop signal does to the server behind `handle`.
pub(crate) fn stop_signal(handle: &Handle, nth: u32) {
    if nth == 1 {
        log::info!("stop signal: shutting down gracefully (again to stop now)");
        handle.shutdown();
    } else {
        log::info!("stop signal: stopping now");
        handle.stop();
    }
}

/// The thread engine's way: it has threads anyway, so one more blocks on
/// the signals and calls the handle.
pub(crate) fn watch_in_thread(handle: Handle) -> io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new(STOP_SIGNALS)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for (nth, _signal) in (1..).zip(signals.forever()) {
                stop_signal(&handle, nth);
            }
        })?;
    Ok(())
}
