//! Signals that stop a server, turned into readiness on a socket the loop
//! watches (loop engines) or into calls from a watcher thread (the thread
//! engine).
//!
//! # What each signal does
//!
//! | signal | effect |
//! |---|---|
//! | SIGINT, SIGTERM | graceful shutdown: no new connections, open ones get the grace period ([`Config::grace`](crate::Config::grace)), then the rest are flushed and closed |
//! | SIGHUP | the same graceful shutdown. By convention SIGHUP asks a daemon to reload its configuration; muxserve has nothing to reload yet, and a hang-up must never kill the server without cleanup, so it stops the way SIGTERM does (and says so in the log) |
//! | SIGQUIT | stop at once: [`Handle::stop`], so open connections get one last flush and are closed without a grace period. Unlike the default action of SIGQUIT (a core dump) the shutdown is still clean: socket files are removed and the report is logged |
//! | a second SIGINT, SIGTERM or SIGHUP | stop at once, as SIGQUIT does: the operator who presses Ctrl-C twice does not want to wait out the grace period |
//!
//! While no server watches them (before the first, after the last is
//! dropped or, for the thread engine, has finished running), the four
//! signals have their default actions again.
//!
//! # Why a self-pipe
//!
//! The usual way to watch signals from Rust is a thread that blocks on
//! them. A loop engine must not do that: the moment a process has a second
//! thread, glibc's `recv` and `send` start paying for pthread cancellation
//! bookkeeping on every call. Measured with callgrind on the echo loop,
//! that was about 90 of 730 user-space instructions per request. So the
//! signal handler (installed through signal-hook) writes one byte, the
//! signal's number, to one end of a socket pair, and the loop reads the
//! other end like any other source.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::SigId;

use super::server::Handle;

/// The signals a watching server acts on (see the module docs).
pub(crate) const STOP_SIGNALS: [i32; 4] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT];

/// Signal-hook never gives a signal back to the system: once its handler is
/// installed, removing our actions would leave the signals caught and
/// ignored after the last server is gone. So a fallback action, registered
/// once per process, runs the default action (terminate, or for SIGQUIT
/// terminate with a core dump) whenever no server is watching; `WATCHING`
/// counts the servers that are, and is held while the fallback is switched
/// so the two always agree.
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

/// One server watching the signals, counted in `WATCHING` for as long as
/// this lives. Dropped after the server's own handlers are unregistered
/// (it is the last field of its owner), so there is never a moment in
/// which neither the server nor the default action gets a signal.
struct Watching(());

impl Watching {
    fn new() -> io::Result<Watching> {
        let mut watching = WATCHING.lock().unwrap_or_else(|e| e.into_inner());
        let fallback = fallback()?;
        *watching += 1;
        fallback.store(false, Ordering::SeqCst);
        Ok(Watching(()))
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut watching = WATCHING.lock().unwrap_or_else(|e| e.into_inner());
        *watching -= 1;
        if *watching == 0 {
            // The last watching server is gone: the signals act as they
            // did before any server was made.
            if let Some(flag) = FALLBACK.get() {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// The read end of the self-pipe, and the handler registrations, which are
/// removed when this is dropped (a process may run many servers in turn).
pub(crate) struct SignalPipe {
    read: UnixStream,
    ids: Vec<SigId>,
    stops: u32,
    // Last: counted out only after the handlers above are gone.
    _watching: Watching,
}

/// Registers a handler that sends the signal's number, as one byte, to
/// `to` (which the handler owns, and which is closed when it is
/// unregistered).
fn register_byte(signal: i32, to: UnixStream) -> io::Result<SigId> {
    let byte = u8::try_from(signal).expect("the stop signals are below 256");
    let action = move || {
        // SAFETY: send(2) is async-signal-safe, the buffer is one byte on
        // the stack, and the descriptor is owned by this closure. With
        // MSG_DONTWAIT a full pipe drops the byte instead of blocking the
        // handler; the loop still wakes for the bytes already there.
        unsafe {
            libc::send(
                to.as_raw_fd(),
                (&byte as *const u8).cast(),
                1,
                libc::MSG_DONTWAIT,
            );
        }
    };
    // SAFETY: the action only calls send(2), which may run in a signal
    // handler, and allocates nothing.
    unsafe { signal_hook::low_level::register(signal, action) }
}

impl SignalPipe {
    pub(crate) fn new() -> io::Result<SignalPipe> {
        let watching = Watching::new()?;
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        let mut ids = Vec::with_capacity(STOP_SIGNALS.len());
        for signal in STOP_SIGNALS {
            match write.try_clone().and_then(|end| register_byte(signal, end)) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        signal_hook::low_level::unregister(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(SignalPipe {
            read,
            ids,
            stops: 0,
            _watching: watching,
        })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Reads what the handlers wrote and acts on each signal in turn.
    pub(crate) fn take(&mut self, handle: &Handle) {
        let mut buf = [0u8; 64];
        loop {
            match self.read.read(&mut buf) {
                // Cannot happen while we hold a write end; nothing to do.
                Ok(0) => return,
                Ok(n) => {
                    for &signal in &buf[..n] {
                        act(handle, i32::from(signal), &mut self.stops);
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
        for &id in &self.ids {
            signal_hook::low_level::unregister(id);
        }
        // `_watching` is dropped after this, handing the signals back.
    }
}

/// What `signal` does to the server behind `handle`; `stops` counts the
/// stop signals seen so far (see the module docs).
pub(crate) fn act(handle: &Handle, signal: i32, stops: &mut u32) {
    let name = match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        SIGQUIT => "SIGQUIT",
        _ => return, // not one of ours
    };
    if signal == SIGQUIT {
        log::info!("{name}: stopping now");
        return handle.stop();
    }
    *stops += 1;
    if *stops > 1 {
        log::info!("{name} again: stopping now");
        return handle.stop();
    }
    if signal == SIGHUP {
        log::info!("{name}: nothing to reload; shutting down gracefully (again to stop now)");
    } else {
        log::info!("{name}: shutting down gracefully (again to stop now)");
    }
    handle.shutdown();
}

/// The thread engine's way: it has threads anyway, so one more blocks on
/// the signals and calls the handle. Dropping this stops that thread,
/// unregisters the handlers and gives the signals their default actions
/// back (once no other server watches them).
pub(crate) struct ThreadWatch {
    close: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
    // Last: counted out only after the thread and its handlers are gone.
    _watching: Watching,
}

impl std::fmt::Debug for ThreadWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadWatch")
    }
}

impl ThreadWatch {
    pub(crate) fn new(handle: Handle) -> io::Result<ThreadWatch> {
        let watching = Watching::new()?;
        let mut signals = signal_hook::iterator::Signals::new(STOP_SIGNALS)?;
        let close = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut stops = 0;
                // Ends once `close` is called; dropping `signals` then
                // unregisters its handlers.
                for signal in signals.forever() {
                    act(&handle, signal, &mut stops);
                }
            })?;
        Ok(ThreadWatch {
            close,
            thread: Some(thread),
            _watching: watching,
        })
    }
}

impl Drop for ThreadWatch {
    fn drop(&mut self) {
        self.close.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
