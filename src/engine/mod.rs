//! Engines: what runs a [`Service`].
//!
//! # What every engine must do
//!
//! Whatever its I/O model, an engine owes a service the same contract:
//!
//! 1. `on_connect` once per accepted connection, before any other callback;
//!    `on_close` exactly once, last; nothing for a connection after it.
//! 2. `on_data` with every byte the peer sent, in order, with unconsumed
//!    bytes shown again before newer ones; `on_eof` once when the peer
//!    shuts down its sending side.
//! 3. Writes leave in the order they were made, and [`Context::close`]
//!    sends everything queued before closing. A `ConnId` of a closed
//!    connection reaches nothing.
//! 4. Callbacks never block: a slow peer is handled by the engine
//!    (backpressure, output caps, timeouts), never by stalling the service.
//! 5. One failing connection closes only itself.
//!
//! Datagram services are simpler and served by one shared function
//! (`dgram.rs`): each datagram is counted, dropped if it was cut short or
//! comes from a reflector port, and otherwise handed to the service, whose
//! replies leave at once; a panic costs only that datagram.
//!
//! # The loop engines
//!
//! [`Server`] is one event loop that keeps a slab of connections and does
//! all the bookkeeping (buffers, timers, limits, deferred closes). Where it
//! waits for readiness is a small seam, the `Poller`: its required functions
//! are `register`, `reregister`, `deregister` (by file descriptor and
//! token), `poll` (fill a list of ready tokens, with a timeout) and a waker
//! that interrupts `poll` from another thread; `closing` (by default a
//! `deregister`) lets epoll skip a system call for a descriptor about to
//! be closed.
//!
//! A loop engine keeps its process single-threaded where it can: signals
//! arrive through a self-pipe the loop polls (`signals.rs`), not a watcher
//! thread, because a second thread makes every socket call in the C
//! library pay for cancellation bookkeeping.
//!
//! - [`mio`]: mio's edge-triggered epoll/kqueue; the default and the fast one.
//! - [`select`]: the [`select`](crate::select) facade's select(2) or poll(2),
//!   level-triggered and O(n) per wait; same loop, same behaviour.
//!
//! # The thread engine
//!
//! [`ThreadedServer`] runs the same services with one OS thread per
//! connection: the baseline the loops are measured against. Each thread
//! alone writes its socket; other threads queue output for it and wake it,
//! so the output limits mean what they mean on the loops. Each datagram
//! socket gets a thread too.
//!
//! [`Context::close`]: crate::Context::close

/// The log target of the loop trace: what each turn of a loop engine saw
/// and did, a line per step (the wait, each event, each read, what the
/// service consumed, what was sent or queued, accepts, timers, closes).
/// It is for learning how an event loop works, and for debugging one.
///
/// Turn it on with `muxserve serve --trace`, or in a program with
/// `RUST_LOG=muxserve::trace=trace` and env_logger. When it is off, a trace
/// point costs the `log` crate's level check. The thread engine has no
/// turns and no trace.
pub const TRACE_TARGET: &str = "muxserve::trace";

/// Accept errors (and connections the poller would not take) are logged at
/// most once per this period, on every engine: under EMFILE they repeat on
/// every retry, and a flood of them must not become a flood of log lines.
pub(crate) const ACCEPT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A warning that repeats under attack or overload, let through at most
/// once per period.
#[derive(Debug, Default)]
pub(crate) struct LogEvery {
    last: Option<std::time::Instant>,
}

impl LogEvery {
    /// Whether to log now, at most once per `every`.
    pub(crate) fn due(&mut self, now: std::time::Instant, every: std::time::Duration) -> bool {
        let due = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= every);
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// One line of the loop trace, if `$on` (the loop's `Core::tracing`, read
/// from the logger once a turn, so that a trace point on the hot path
/// costs a test of one byte when the trace is off).
macro_rules! trace {
    ($on:expr, $($arg:tt)+) => {
        if $on {
            $crate::engine::trace_line(format_args!($($arg)+))
        }
    };
}

/// Writes one line of the loop trace. Out of line and cold, so that the
/// trace points leave the hot path's code as it was.
#[cold]
#[inline(never)]
pub(crate) fn trace_line(line: std::fmt::Arguments<'_>) {
    log::trace!(target: TRACE_TARGET, "{line}");
}

pub mod mio;
pub mod select;
mod threads;

mod admit;
mod core;
mod dgram;
mod server;
mod signals;

pub use self::server::{Buffered, Handle, Report, Server};
pub use self::threads::{ThreadConfig, ThreadedServer};

/// Which engine runs the services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The mio event loop (edge-triggered epoll/kqueue). The default.
    Mio,
    /// The same loop on poll(2), through the select facade.
    Poll,
    /// The same loop on select(2), through the select facade; descriptors
    /// must stay below `FD_SETSIZE`, so it serves fewer connections.
    Select,
    /// One OS thread per connection ([`ThreadedServer`]).
    Threads,
}

impl Engine {
    /// Every engine.
    pub const ALL: [Engine; 4] = [Engine::Mio, Engine::Poll, Engine::Select, Engine::Threads];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Mio => "mio",
            Engine::Poll => "poll",
            Engine::Select => "select",
            Engine::Threads => "threads",
        }
    }
}

/// What every engine offers for binding services and running: lets code
/// (the CLI, the built-in service table, tests) work with any engine.
pub trait Host {
    /// The configuration the server runs with.
    fn config(&self) -> &crate::Config;

    /// Lets only peers `admit` accepts connect (see
    /// [`Server::set_admission`]).
    fn set_admission(&mut self, admit: impl Fn(&crate::PeerAddr) -> bool + Send + Sync + 'static);

    /// Serves a stream endpoint with `service`.
    fn bind_stream<S>(
        &mut self,
        endpoint: crate::Endpoint,
        service: S,
        limits: crate::Limits,
    ) -> io::Result<crate::Endpoint>
    where
        S: Service + Send + 'static,
        S::Session: Send;

    /// Serves a datagram endpoint with `service`.
    fn bind_dgram<S>(
        &mut self,
        endpoint: crate::Endpoint,
        service: S,
    ) -> io::Result<crate::Endpoint>
    where
        S: crate::service::DatagramService + Send + 'static;

    /// A handle that stops the server from another thread.
    fn handle(&self) -> Handle;

    /// Makes SIGINT and SIGTERM stop the server: the first gracefully, a
    /// second at once.
    fn stop_on_signals(&mut self) -> io::Result<()>;

    /// Serves until shut down.
    fn run(&mut self) -> io::Result<Report>;
}

impl Host for Server {
    fn config(&self) -> &crate::Config {
        Server::config(self)
    }

    fn set_admission(&mut self, admit: impl Fn(&crate::PeerAddr) -> bool + Send + Sync + 'static) {
        Server::set_admission(self, admit)
    }

    fn bind_stream<S>(
        &mut self,
        endpoint: crate::Endpoint,
        service: S,
        limits: crate::Limits,
    ) -> io::Result<crate::Endpoint>
    where
        S: Service + Send + 'static,
        S::Session: Send,
    {
        self.bind_with(endpoint, service, limits)
    }

    fn bind_dgram<S>(
        &mut self,
        endpoint: crate::Endpoint,
        service: S,
    ) -> io::Result<crate::Endpoint>
    where
        S: crate::service::DatagramService + Send + 'static,
    {
        self.bind_datagram(endpoint, service)
    }

    fn handle(&self) -> Handle {
        Server::handle(self)
    }

    fn stop_on_signals(&mut self) -> io::Result<()> {
        Server::stop_on_signals(self)
    }

    fn run(&mut self) -> io::Result<Report> {
        Server::run(self)
    }
}

impl Host for ThreadedServer {
    fn config(&self) -> &crate::Config {
        ThreadedServer::config(self)
    }

    fn set_admission(&mut self, admit: impl Fn(&crate::PeerAddr) -> bool + Send + Sync + 'static) {
        ThreadedServer::set_admission(self, admit)
    }

    fn bind_stream<S>(
        &mut self,
        endpoint: crate::Endpoint,
        service: S,
        limits: crate::Limits,
    ) -> io::Result<crate::Endpoint>
    where
        S: Service + Send + 'static,
        S::Session: Send,
    {
        self.bind_with(endpoint, service, limits)
    }

    fn bind_dgram<S>(
        &mut self,
        endpoint: crate::Endpoint,
        service: S,
    ) -> io::Result<crate::Endpoint>
    where
        S: crate::service::DatagramService + Send + 'static,
    {
        self.bind_datagram(endpoint, service)
    }

    fn handle(&self) -> Handle {
        ThreadedServer::handle(self)
    }

    fn stop_on_signals(&mut self) -> io::Result<()> {
        ThreadedServer::stop_on_signals(self)
    }

    fn run(&mut self) -> io::Result<Report> {
        ThreadedServer::run(self)
    }
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Engine, String> {
        Engine::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| format!("unknown engine {s:?} (mio, poll, select or threads)"))
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::buffer::Input;
use crate::service::{CloseReason, Context, Service};
use crate::timer::TimerId;

/// What a source should be watched for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interest {
    Read,
    ReadWrite,
    /// Writable only: a connection whose reading is paused, on a
    /// level-triggered poller.
    Write,
    /// Nothing (errors and hang-ups may still be reported): a paused
    /// connection with nothing to send, on a level-triggered poller.
    None,
}

impl Interest {
    pub(crate) fn new(read: bool, write: bool) -> Interest {
        match (read, write) {
            (true, false) => Interest::Read,
            (true, true) => Interest::ReadWrite,
            (false, true) => Interest::Write,
            (false, false) => Interest::None,
        }
    }
}

/// One readiness report from a poller. Errors and hang-ups are reported as
/// both readable and writable: the next read or write tells what happened.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Event {
    pub token: usize,
    pub readable: bool,
    pub writable: bool,
    /// The peer shut down its side (EPOLLRDHUP). With edge triggering this
    /// event is the only notice of a FIN that arrived with the data.
    pub read_closed: bool,
}

/// Interrupts a blocked `poll` from any thread.
pub(crate) type Waker = Arc<dyn Fn() -> io::Result<()> + Send + Sync>;

/// The seam between the loop and a readiness API. See the module docs.
pub(crate) trait Poller {
    fn register(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()>;
    fn reregister(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()>;
    fn deregister(&mut self, fd: RawFd) -> io::Result<()>;
    /// `fd` is about to be closed. Pollers whose kernel object forgets a
    /// descriptor when it closes (epoll) need not make a system call.
    fn closing(&mut self, fd: RawFd) -> io::Result<()> {
        self.deregister(fd)
    }
    /// Waits until something is ready or `timeout` passes, and appends what
    /// is ready to `events`. May return spurious events and `Interrupted`.
    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()>;
    fn waker(&self) -> Waker;
    /// Whether a source that stays ready is reported on every wait
    /// (select, poll) rather than once when it becomes ready (epoll's
    /// edge-triggered mode). On a level-triggered poller the loop must not
    /// keep interest in a readiness it will not act on, or every wait
    /// returns at once and the loop spins.
    fn level_triggered(&self) -> bool {
        true
    }
}

// Tokens: a connection's token is its slot index in the low 32 bits and its
// generation in bits 32..61, so an event for a connection that closed can
// never be taken for the one that reuses its slot. Stream listeners set bit
// 63, datagram sockets bit 62; the waker is all ones.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("muxserve packs connection generations into mio tokens and needs a 64-bit target");

pub(crate) const LISTENER_BIT: usize = 1 << 63;
pub(crate) const DGRAM_BIT: usize = 1 << 62;
pub(crate) const WAKE_TOKEN: usize = usize::MAX;
/// The self-pipe of [`Server::stop_on_signals`]; matched before the
/// listener bit, which it also has.
pub(crate) const SIGNAL_TOKEN: usize = usize::MAX - 1;
/// Generations wrap at 2^30 so that they never reach the socket bits.
pub(crate) const GEN_MASK: u32 = (1 << 30) - 1;

/// An admission hook: `true` serves the peer, `false` closes it at once.
pub type Admission = Arc<dyn Fn(&crate::PeerAddr) -> bool + Send + Sync>;

/// Runs a service callback and contains a panic in it, returning the panic
/// message. A panicking callback must cost one connection, not the server.
pub(crate) fn contain(f: impl FnOnce()) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_message(&*p))
}

/// The message a panic was raised with.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// A [`Service`] with its sessions, behind an object-safe interface so that
/// one loop can host services of different types. Sessions live in a slab
/// indexed by a key stored in the connection: one index per event, no hash.
pub(crate) trait Handler {
    fn connect(&mut self, cx: &mut Context<'_>) -> usize;
    fn data(&mut self, cx: &mut Context<'_>, key: usize, input: &mut Input<'_>);
    fn eof(&mut self, cx: &mut Context<'_>, key: usize);
    fn timer(&mut self, cx: &mut Context<'_>, key: usize, timer: TimerId);
    fn service_timer(&mut self, cx: &mut Context<'_>, timer: TimerId);
    fn close(&mut self, cx: &mut Context<'_>, key: usize, why: CloseReason);
    fn shutdown(&mut self, cx: &mut Context<'_>);
}

pub(crate) struct Hosted<S: Service> {
    service: S,
    sessions: slab::Slab<S::Session>,
}

impl<S: Service> Hosted<S> {
    pub(crate) fn new(service: S) -> Hosted<S> {
        Hosted {
            service,
            sessions: slab::Slab::new(),
        }
    }
}

impl<S: Service> Handler for Hosted<S> {
    fn connect(&mut self, cx: &mut Context<'_>) -> usize {
        let session = self.service.on_connect(cx);
        self.sessions.insert(session)
    }

    fn data(&mut self, cx: &mut Context<'_>, key: usize, input: &mut Input<'_>) {
        self.service.on_data(cx, &mut self.sessions[key], input);
    }

    fn eof(&mut self, cx: &mut Context<'_>, key: usize) {
        self.service.on_eof(cx, &mut self.sessions[key]);
    }

    fn timer(&mut self, cx: &mut Context<'_>, key: usize, timer: TimerId) {
        self.service.on_timer(cx, &mut self.sessions[key], timer);
    }

    fn service_timer(&mut self, cx: &mut Context<'_>, timer: TimerId) {
        self.service.on_service_timer(cx, timer);
    }

    fn close(&mut self, cx: &mut Context<'_>, key: usize, why: CloseReason) {
        let session = self.sessions.remove(key);
        self.service.on_close(cx, session, why);
    }

    fn shutdown(&mut self, cx: &mut Context<'_>) {
        self.service.on_shutdown(cx);
    }
}
