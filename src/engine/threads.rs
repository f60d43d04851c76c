//! The thread engine: one OS thread per connection, the same [`Service`]
//! values. Python's `ThreadingMixIn`, in Rust.
//!
//! It is the baseline the event loops are measured against, and it keeps
//! the engine contract (see [`super`]) with the listener's [`Limits`]
//! meaning what they mean on the loops:
//!
//! - One service value serves all connections, so it sits behind one
//!   mutex, held only while a callback runs.
//! - A connection's own thread is the only one that touches its socket,
//!   which is non-blocking. Callbacks of other connections (a chat
//!   broadcast) append to its output [`Queue`] under a small lock and wake
//!   it; it waits in poll(2) on its socket (readable only while it wants
//!   input, writable only while bytes wait) and on its wake-up descriptor.
//!   A peer that never reads costs its own thread and queue, nobody else.
//! - Above `output_high_water` a connection neither reads nor processes
//!   the input it already holds, until its queue is down to
//!   `output_low_water`; past `max_output` it is closed; output that makes
//!   no progress for `write_timeout` closes it. These caps, and chat's
//!   (through `output_len` of another connection), count only bytes the
//!   owner already tried to send: output queued a moment ago by someone
//!   else is not "behind" yet.
//! - A sender whose writes left more than a peer's high-water mark of
//!   untried bytes in that peer's queue pauses (no reading, no processing)
//!   until the peer's thread has tried to send them: a burst to the whole
//!   room is cut into rounds the readers can keep up with, and a peer that
//!   does not read still only pays for itself (its thread tries, fails,
//!   and its bytes count against its own caps).
//! - Timers, the idle timeout, the write stall and the close deadline are
//!   the poll timeout; with none of them armed a thread sleeps until woken.
//!   Service timers run on one extra thread.
//! - Shutdown stops accepting, lets connections finish within the grace
//!   period, then wakes each one still open to be cut off (one last flush,
//!   then `on_close(Shutdown)`) and joins them.
//!
//! Datagram services get one thread per socket, waiting in poll(2) on the
//! socket and on a descriptor that becomes readable when shutdown begins.
//!
//! Reading order: [`Queue`] and [`PeerIo`] (what other threads may touch
//! of a connection), [`ThreadDriver`] (the `Context` of a callback),
//! [`ThreadedServer::run`] and `accept` (the acceptor), [`serve`] and
//! [`Conn`] (one connection's life), then shutdown, datagrams and service
//! timers.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::mem;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::SockRef;

use super::admit::{Refusal, Sources, REFUSED_LINGERING};
use super::select::SelfPipe;
use super::server::{SHUTDOWN, STOP};
use super::{
    contain, dgram, Admission, Handle, Handler, Hosted, LogEvery, Report, Waker, ACCEPT_LOG_EVERY,
};
use crate::buffer::{Input, OutBuf};
use crate::config::{Config, Limits, PanicPolicy, MAX_DATAGRAM};
use crate::net::{self, DgramSocket, Endpoint, StdListener, ToEndpoint, SEND_FLAGS};
use crate::select::{Backend, Interest, Ready, Selector};
use crate::service::{
    CloseMode, CloseReason, ConnId, Context, Counter, DatagramService, Driver, PeerAddr, Service,
};
use crate::stats::Stats;
use crate::timer::{TimerId, Timers};

/// Settings only the thread engine has.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ThreadConfig {
    /// Stack of each connection thread. Default 256 KiB: the services here
    /// need little, and 10,000 threads at the usual 2-8 MiB would reserve
    /// tens of gigabytes of address space.
    pub stack_size: usize,
    /// Bytes one `read` asks for; each thread owns a buffer this big, and
    /// it is also the most input one round hands the service on top of
    /// what it left unconsumed. Default 16 KiB, the usual size for
    /// thread-per-connection servers.
    pub read_chunk: usize,
}

impl Default for ThreadConfig {
    fn default() -> ThreadConfig {
        ThreadConfig {
            stack_size: 256 * 1024,
            read_chunk: 16 * 1024,
        }
    }
}

/// After accepting failed for lack of descriptors, memory or threads, the
/// acceptor stops accepting for this long, or until a connection closes
/// (the loop engines' `ACCEPT_RETRY`). Queued clients wait in the backlog.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A deadline `after` from `now`, saturating far in the future instead of
/// overflowing (a limit of `Duration::MAX` means "never").
fn later(now: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(after.min(FAR))
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking callback poisons the service's mutex; the state it guards
    // is the service's own, so carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- the wake-up descriptor -------------------------------------------

/// What makes a connection thread's poll return: other threads make it
/// readable after queueing output for it or asking it to close. An eventfd
/// on Linux (one descriptor more per connection), a socket pair elsewhere.
struct Wake {
    #[cfg(target_os = "linux")]
    fd: std::fs::File,
    #[cfg(not(target_os = "linux"))]
    pipe: SelfPipe,
    #[cfg(not(target_os = "linux"))]
    waker: Waker,
}

impl Wake {
    #[cfg(target_os = "linux")]
    fn new() -> io::Result<Wake> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; it returns a new descriptor
        // or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { std::fs::File::from_raw_fd(fd) };
        Ok(Wake { fd })
    }

    #[cfg(not(target_os = "linux"))]
    fn new() -> io::Result<Wake> {
        let pipe = SelfPipe::new()?;
        let waker = pipe.waker();
        Ok(Wake { pipe, waker })
    }

    fn fd(&self) -> RawFd {
        #[cfg(target_os = "linux")]
        return self.fd.as_raw_fd();
        #[cfg(not(target_os = "linux"))]
        return self.pipe.fd();
    }

    fn wake(&self) {
        #[cfg(target_os = "linux")]
        {
            use std::io::Write;
            // Adds 1 to the counter; EAGAIN (a counter near overflow)
            // means it is readable already.
            let _ = (&self.fd).write(&1u64.to_ne_bytes());
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (self.waker)();
    }

    /// Makes it unreadable again (poll reports it until then).
    fn drain(&self) {
        #[cfg(target_os = "linux")]
        {
            let mut counter = [0u8; 8];
            let _ = (&self.fd).read(&mut counter);
        }
        #[cfg(not(target_os = "linux"))]
        self.pipe.drain();
    }
}

// ---- what other threads may touch of a connection ----------------------

/// A stream socket, non-blocking, used only by its connection's thread
/// (and by the acceptor before that thread starts).
#[derive(Debug)]
enum StdStream {
    Tcp(std::net::TcpStream),
    Unix(UnixStream),
}

impl StdStream {
    fn sock(&self) -> SockRef<'_> {
        match self {
            StdStream::Tcp(s) => SockRef::from(s),
            StdStream::Unix(s) => SockRef::from(s),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            StdStream::Tcp(s) => s.as_raw_fd(),
            StdStream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StdStream::Tcp(s) => (&*s).read(buf),
            StdStream::Unix(s) => (&*s).read(buf),
        }
    }

    /// One non-blocking send; `WouldBlock` when the kernel is full.
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.sock().send_with_flags(buf, SEND_FLAGS)
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = self.sock().shutdown(how);
    }
}

/// A connection's output and close requests, as every thread sees them
/// (under [`PeerIo::queue`]). Only the owner sends from it.
#[derive(Default)]
struct Queue {
    out: OutBuf,
    /// Where each queued write ends, counted in bytes ever queued, oldest
    /// first: eviction keeps the write in flight whole and drops the rest.
    ends: VecDeque<u64>,
    /// Bytes ever queued, and ever sent.
    queued: u64,
    sent: u64,
    /// Where the last write sent whole ended (`sent` is past it while one
    /// is in flight).
    boundary: u64,
    /// Bytes queued since the owner last tried to send: not counted by any
    /// cap, since no one has tried to send them yet.
    fresh: usize,
    /// `on_connect` returned: broadcasts include it from now on.
    connected: bool,
    /// A close requested by its own callbacks or by another connection's.
    close: Option<(CloseMode, CloseReason)>,
    /// `on_close` has run: nothing more goes in.
    done: bool,
    /// Shutdown's grace is over: the owner closes at once.
    cut_off: bool,
    /// Senders paused until this queue's fresh bytes have been tried
    /// (weak: a waiter that closes must not keep its socket open).
    waiters: Vec<Weak<PeerIo>>,
}

impl Queue {
    /// Whether writes are still taken.
    fn open(&self) -> bool {
        self.close.is_none() && !self.done
    }

    fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.out.extend(bytes);
        self.queued += bytes.len() as u64;
        self.ends.push_back(self.queued);
        self.fresh += bytes.len();
    }

    /// Bytes the owner tried to send and the kernel has not taken: what
    /// `output_len` reports and the caps count.
    fn tried(&self) -> usize {
        self.out.len() - self.fresh.min(self.out.len())
    }

    /// The kernel took `n` bytes.
    fn advance(&mut self, n: usize) {
        self.out.advance(n);
        self.sent += n as u64;
        while self.ends.front().is_some_and(|&end| end <= self.sent) {
            self.boundary = self.ends.pop_front().unwrap_or(self.sent);
        }
    }

    /// Drops every queued byte.
    fn discard(&mut self) {
        self.out.clear();
        self.ends.clear();
        self.queued = self.sent;
        self.boundary = self.sent;
        self.fresh = 0;
    }

    /// Replaces what is queued by `notice`, except the rest of a write
    /// that started to leave: the peer gets whole lines, then the notice.
    fn evict(&mut self, notice: &[u8]) {
        let in_flight = self.sent > self.boundary;
        let keep = match self.ends.front() {
            Some(&end) if in_flight => (end - self.sent) as usize,
            _ => 0,
        };
        let kept = self.out.as_slice()[..keep].to_vec();
        self.discard();
        self.push(&kept);
        self.push(notice);
    }

    /// Records a close request. The first one wins, except that an abort
    /// overrides a close that was waiting for output (as on the loops).
    fn request_close(&mut self, mode: CloseMode, reason: CloseReason) {
        if self.done {
            return;
        }
        if self.close.is_none() || mode == CloseMode::Abort {
            self.close = Some((mode, reason));
        }
        if mode == CloseMode::Abort {
            self.discard();
        }
    }
}

/// What every thread may touch of a connection.
struct PeerIo {
    stream: StdStream,
    wake: Wake,
    queue: Mutex<Queue>,
    /// Its listener's high-water mark, for other threads' fan-out checks.
    high_water: usize,
    /// Reading paused by its service (others see it through `state`).
    paused: AtomicBool,
}

impl PeerIo {
    /// Queues bytes from another connection's thread and wakes the owner
    /// if they are the first it has not tried yet. `None` if it no longer
    /// takes writes, else whether its untried bytes are over its
    /// high-water mark (the writer should pause).
    fn push_from_other(&self, bytes: &[u8]) -> Option<bool> {
        let mut q = lock(&self.queue);
        if !q.open() || !q.connected {
            return None;
        }
        let first = q.fresh == 0;
        q.push(bytes);
        let over = q.fresh > self.high_water;
        drop(q);
        if first {
            self.wake.wake();
        }
        Some(over)
    }

    fn request_close(&self, mode: CloseMode, reason: CloseReason) {
        lock(&self.queue).request_close(mode, reason);
        self.wake.wake();
    }
}

struct Peer {
    gen: u32,
    service: usize,
    io: Arc<PeerIo>,
    /// Counted in `Shared::sources` until the connection is gone.
    addr: PeerAddr,
}

/// State every thread shares.
struct Shared {
    handlers: Vec<Mutex<Box<dyn Handler + Send>>>,
    limits: Vec<Limits>,
    conns: Mutex<Slab<Peer>>,
    stats: Mutex<Stats>,
    /// What shutdown cut off, filled in by the connections it cut.
    report: Mutex<Report>,
    /// Generations for connection ids and timer ids alike.
    gens: AtomicU32,
    service_timers: Mutex<Timers<usize>>,
    timer_wake: Condvar,
    finished: AtomicBool,
    handle: Handle,
    /// Wakes the acceptor (its self-pipe, the handle's waker).
    acceptor: Waker,
    /// Accepting is paused for lack of descriptors: the next close wakes
    /// the acceptor to try again.
    accept_paused: AtomicBool,
    linger: Duration,
    linger_bytes: usize,
    /// Connections open per source address (the per-source cap).
    sources: Mutex<Sources>,
    /// Refused clients lingering now, each on a thread of its own (at
    /// most [`REFUSED_LINGERING`]).
    refused: AtomicUsize,
    read_chunk: usize,
    on_panic: PanicPolicy,
    /// Times any engine thread returned from a wait (see
    /// [`ThreadedServer::wakeups`]).
    wakeups: Arc<AtomicU64>,
    dgram_guard: Mutex<dgram::Guard>,
}

impl Shared {
    fn next_gen(&self) -> u32 {
        self.gens.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
    }

    fn peer(&self, id: ConnId) -> Option<Arc<PeerIo>> {
        let conns = lock(&self.conns);
        let p = conns.get(id.index()).filter(|p| p.gen == id.gen())?;
        Some(Arc::clone(&p.io))
    }

    fn woke(&self) {
        self.wakeups.fetch_add(1, Ordering::Relaxed);
    }
}

// ---- the Context of a callback ------------------------------------------

/// Whom a callback is about: a connection, or (`me` NONE) a service.
#[derive(Clone, Copy)]
struct Origin<'a> {
    shared: &'a Shared,
    me: ConnId,
    service: usize,
    peer: Option<&'a PeerAddr>,
    /// The current connection (None for service callbacks).
    io: Option<&'a Arc<PeerIo>>,
}

impl<'a> Origin<'a> {
    /// A callback about service `service` as a whole (a service timer,
    /// shutdown), not about a connection.
    fn service(shared: &'a Shared, service: usize) -> Origin<'a> {
        Origin {
            shared,
            me: ConnId::NONE,
            service,
            peer: None,
            io: None,
        }
    }
}

/// What a connection's callbacks may change of its thread's state.
struct ConnState {
    /// Reading paused by the service.
    paused: bool,
    /// Above high water (and not yet back to low water): no reading, no
    /// processing of held input.
    backpressured: bool,
    idle: Option<Duration>,
    timers: Timers<()>,
    /// Peers this connection's writes left over their high-water mark of
    /// untried bytes: it pauses until their threads have tried them.
    fanout: Vec<Arc<PeerIo>>,
}

impl ConnState {
    /// No reading and no processing of held input.
    fn held_back(&self) -> bool {
        self.paused || self.backpressured || !self.fanout.is_empty()
    }

    fn note_fanout(&mut self, peer: &Arc<PeerIo>) {
        if !self.fanout.iter().any(|p| Arc::ptr_eq(p, peer)) {
            self.fanout.push(Arc::clone(peer));
        }
    }
}

/// One callback's view of the engine, lent to `Context`.
struct ThreadDriver<'a> {
    at: Origin<'a>,
    now: Instant,
    conn: Option<&'a mut ConnState>,
}

impl ThreadDriver<'_> {
    /// The queue of `id` if it is the current connection.
    fn mine(&self, id: ConnId) -> Option<&Arc<PeerIo>> {
        self.at
            .io
            .filter(|_| id == self.at.me && id != ConnId::NONE)
    }

    fn with_queue<T>(&self, id: ConnId, f: impl FnOnce(&PeerIo, &mut Queue) -> T) -> Option<T> {
        match self.mine(id) {
            Some(io) => Some(f(io, &mut lock(&io.queue))),
            None => {
                let io = self.at.shared.peer(id)?;
                let mut q = lock(&io.queue);
                Some(f(&io, &mut q))
            }
        }
    }

    fn note_fanout(&mut self, peer: &Arc<PeerIo>) {
        if let Some(c) = self.conn.as_deref_mut() {
            c.note_fanout(peer);
        }
    }
}

impl Driver for ThreadDriver<'_> {
    fn now(&self) -> Instant {
        self.now
    }

    fn write(&mut self, to: ConnId, bytes: &[u8]) -> bool {
        if let Some(io) = self.mine(to) {
            // Our own thread sends it right after this callback.
            let mut q = lock(&io.queue);
            if !q.open() {
                return false;
            }
            q.push(bytes);
            return true;
        }
        let Some(peer) = self.at.shared.peer(to) else {
            return false;
        };
        match peer.push_from_other(bytes) {
            None => false,
            Some(over) => {
                if over {
                    self.note_fanout(&peer);
                }
                true
            }
        }
    }

    fn broadcast(&mut self, service: usize, bytes: &[u8], except: Option<ConnId>) -> usize {
        let mut sent = 0;
        let mut over = Vec::new();
        {
            let conns = lock(&self.at.shared.conns);
            for (index, p) in conns.iter() {
                let id = ConnId::new(index, p.gen);
                if p.service != service || Some(id) == except {
                    continue;
                }
                if id == self.at.me {
                    let mut q = lock(&p.io.queue);
                    if q.open() && q.connected {
                        q.push(bytes);
                        sent += 1;
                    }
                    continue;
                }
                match p.io.push_from_other(bytes) {
                    Some(true) => {
                        over.push(Arc::clone(&p.io));
                        sent += 1;
                    }
                    Some(false) => sent += 1,
                    None => {}
                }
            }
        }
        for peer in &over {
            self.note_fanout(peer);
        }
        sent
    }

    fn close(&mut self, id: ConnId, mode: CloseMode, reason: CloseReason) {
        match self.mine(id) {
            // Our own thread looks at it right after this callback.
            Some(io) => lock(&io.queue).request_close(mode, reason),
            None => {
                if let Some(peer) = self.at.shared.peer(id) {
                    peer.request_close(mode, reason);
                }
            }
        }
    }

    fn evict(&mut self, id: ConnId, notice: &[u8]) {
        let other = self.mine(id).is_none();
        let evicted = self.with_queue(id, |io, q| {
            if !q.open() {
                return false;
            }
            q.evict(notice);
            q.request_close(CloseMode::Flush, CloseReason::OutputLimit);
            if other {
                io.wake.wake();
            }
            true
        });
        if evicted == Some(true) {
            log::debug!("{id} evicted: its output passed its service's cap");
        }
    }

    fn state(&self, id: ConnId) -> Option<(bool, bool)> {
        if let Some(io) = self.mine(id) {
            let q = lock(&io.queue);
            let over = q.out.len() > io.high_water;
            let held = self.conn.as_deref().is_some_and(ConnState::held_back);
            return Some((!q.open(), held || over));
        }
        self.with_queue(id, |io, q| {
            let over = q.out.len() > io.high_water;
            (!q.open(), over || io.paused.load(Ordering::Relaxed))
        })
    }

    fn count(&mut self, counter: Counter) {
        *counter.field(&mut lock(&self.at.shared.stats)) += 1;
    }

    fn frame_timeout(&self, id: ConnId) -> Option<Duration> {
        self.mine(id)
            .and_then(|_| self.at.shared.limits[self.at.service].frame_timeout)
    }

    fn output_len(&self, id: ConnId) -> Option<usize> {
        // Our own: everything queued, this callback's writes included (as
        // on the loops). Another connection's: what its thread tried to
        // send and the kernel did not take; bytes queued since its last
        // try are not behind yet, so no cap counts them.
        if let Some(io) = self.mine(id) {
            return Some(lock(&io.queue).out.len());
        }
        self.with_queue(id, |_, q| q.tried())
    }

    fn peer(&self, id: ConnId) -> Option<&PeerAddr> {
        // Only the current connection's address is at hand.
        self.at.peer.filter(|_| id == self.at.me)
    }

    fn set_reading(&mut self, id: ConnId, on: bool) {
        let Some(io) = self.mine(id).map(Arc::clone) else {
            return;
        };
        if let Some(c) = self.conn.as_deref_mut() {
            c.paused = !on;
            io.paused.store(!on, Ordering::Relaxed);
        }
    }

    fn set_idle_timeout(&mut self, id: ConnId, timeout: Option<Duration>) {
        if let (true, Some(c)) = (self.mine(id).is_some(), self.conn.as_deref_mut()) {
            c.idle = timeout;
        }
    }

    fn set_timer(
        &mut self,
        service: usize,
        conn: ConnId,
        after: Duration,
        period: Option<Duration>,
    ) -> TimerId {
        let gen = self.at.shared.next_gen();
        let at = later(self.now, after);
        let mine = conn == self.at.me && conn != ConnId::NONE;
        match (self.conn.as_deref_mut(), mine) {
            (Some(c), true) => c.timers.insert_with_gen(at, period, (), gen),
            _ => {
                let id =
                    lock(&self.at.shared.service_timers).insert_with_gen(at, period, service, gen);
                self.at.shared.timer_wake.notify_all();
                id
            }
        }
    }

    fn cancel_timer(&mut self, timer: TimerId) -> bool {
        if let Some(c) = self.conn.as_deref_mut() {
            if c.timers.cancel(timer).is_some() {
                return true;
            }
        }
        lock(&self.at.shared.service_timers).cancel(timer).is_some()
    }

    fn stop(&mut self) {
        self.at.shared.handle.shutdown();
    }
}

/// Runs one callback under the service lock. False if it panicked: the
/// panic is counted and logged, and the connection aborted.
fn run_callback(
    at: &Origin<'_>,
    conn: Option<&mut ConnState>,
    now: Instant,
    f: impl FnOnce(&mut dyn Handler, &mut Context<'_>),
) -> bool {
    let Origin {
        shared,
        me,
        service,
        io,
        ..
    } = *at;
    let mut driver = ThreadDriver { at: *at, now, conn };
    let outcome = {
        let mut handler = lock(&shared.handlers[service]);
        contain(|| f(&mut **handler, &mut Context::new(&mut driver, me, service)))
    };
    let Err(message) = outcome else {
        return true;
    };
    log::error!("a service callback for {me} panicked: {message}");
    lock(&shared.stats).panics += 1;
    if let Some(io) = io {
        // Drops what the failed callback wrote, with everything else.
        lock(&io.queue).request_close(CloseMode::Abort, CloseReason::Panic);
    }
    if shared.on_panic == PanicPolicy::Shutdown {
        shared.handle.shutdown();
    }
    false
}

// ---- the acceptor ---------------------------------------------------------

/// A server that runs each connection on its own thread.
pub struct ThreadedServer {
    config: Config,
    threads: ThreadConfig,
    listeners: Vec<(StdListener, usize, Endpoint)>,
    handlers: Vec<Mutex<Box<dyn Handler + Send>>>,
    dgrams: Vec<DgramBound>,
    limits: Vec<Limits>,
    handle: Handle,
    wake: SelfPipe,
    /// Set by [`ThreadedServer::stop_on_signals`]; dropped when `run` ends.
    signals: Option<super::signals::ThreadWatch>,
    stats: Option<Arc<Shared>>,
    admission: Option<Admission>,
    wakeups: Arc<AtomicU64>,
    /// Whom the datagram sockets must not answer, and how often the rest.
    guard: dgram::Guard,
}

impl std::fmt::Debug for ThreadedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadedServer")
            .field("listeners", &self.listeners.len())
            .field("datagram_sockets", &self.dgrams.len())
            .field("threads", &self.threads)
            .finish()
    }
}

/// Accepts one connection on a non-blocking std listener.
fn accept(listener: &StdListener) -> io::Result<(StdStream, PeerAddr)> {
    match listener {
        StdListener::Tcp(l) => {
            let (s, a) = l.accept()?;
            Ok((StdStream::Tcp(s), PeerAddr::Inet(a)))
        }
        StdListener::Unix(l) => {
            let (s, a) = l.accept()?;
            Ok((StdStream::Unix(s), PeerAddr::from_unix(&a)))
        }
    }
}

/// The soft `RLIMIT_NOFILE`, if finite.
fn fd_limit() -> Option<usize> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `rl` is.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0;
    (ok && rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur as usize)
}

/// What the acceptor keeps between waits.
struct Acceptor {
    max_conns: usize,
    /// Accepting paused until then (out of descriptors, memory, threads).
    paused_until: Option<Instant>,
    log: LogEvery,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadedServer {
    /// A thread-per-connection server.
    pub fn new(config: Config, threads: ThreadConfig) -> io::Result<ThreadedServer> {
        let wake = SelfPipe::new()?;
        let guard = dgram::Guard::new(config.reply_budget_total);
        Ok(ThreadedServer {
            config,
            threads,
            listeners: Vec::new(),
            handlers: Vec::new(),
            dgrams: Vec::new(),
            limits: Vec::new(),
            handle: Handle::new(wake.waker()),
            wake,
            signals: None,
            stats: None,
            admission: None,
            wakeups: Arc::new(AtomicU64::new(0)),
            guard,
        })
    }

    /// The configuration this server runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Decides, for each accepted connection, whether to serve it; see
    /// [`Server::set_admission`](super::Server::set_admission).
    pub fn set_admission(&mut self, admit: impl Fn(&PeerAddr) -> bool + Send + Sync + 'static) {
        self.admission = Some(Arc::new(admit));
    }

    /// Listens on a stream endpoint (e.g. `127.0.0.1:7007`) and serves it
    /// with `service`, with the default limits.
    pub fn bind<S>(&mut self, endpoint: impl ToEndpoint, service: S) -> io::Result<Endpoint>
    where
        S: Service + Send + 'static,
        S::Session: Send,
    {
        let limits = self.config.limits.clone();
        self.bind_with(endpoint.to_endpoint()?, service, limits)
    }

    /// Like [`bind`](ThreadedServer::bind), with limits of its own.
    pub fn bind_with<S>(
        &mut self,
        endpoint: Endpoint,
        service: S,
        limits: Limits,
    ) -> io::Result<Endpoint>
    where
        S: Service + Send + 'static,
        S::Session: Send,
    {
        let (listener, bound) =
            net::stream_listener(&endpoint, self.config.backlog, limits.send_buffer)?;
        log::info!("threads engine listening on {bound}");
        self.guard.bound(&bound);
        let index = self.handlers.len();
        self.listeners.push((listener, index, bound.clone()));
        self.handlers
            .push(Mutex::new(Box::new(Hosted::new(service))));
        self.limits.push(limits);
        Ok(bound)
    }

    /// Serves datagrams arriving on `endpoint` (`udp://HOST:PORT` or
    /// `unix-dgram:///PATH`) with `service`, on a thread of its own.
    pub fn bind_datagram<S>(
        &mut self,
        endpoint: impl ToEndpoint,
        service: S,
    ) -> io::Result<Endpoint>
    where
        S: DatagramService + Send + 'static,
    {
        // The socket stays non-blocking: its thread waits in poll(2).
        let (socket, bound) = net::dgram_socket(&endpoint.to_endpoint()?)?;
        log::info!("threads engine serving datagrams on {bound}");
        self.guard.bound(&bound);
        self.dgrams.push(DgramBound {
            socket,
            replies: dgram::Replies::new(service.reply_budget(self.config.reply_budget)),
            handler: Box::new(service),
            endpoint: bound.clone(),
        });
        Ok(bound)
    }

    /// A handle that stops this server from another thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Makes SIGINT, SIGTERM, SIGHUP and SIGQUIT stop this server, as
    /// [`Server::stop_on_signals`](super::Server::stop_on_signals) does,
    /// through a thread that waits for them. Once `run` returns (or the
    /// server is dropped) the thread ends and the signals get their default
    /// actions back.
    pub fn stop_on_signals(&mut self) -> io::Result<()> {
        if self.signals.is_none() {
            self.signals = Some(super::signals::ThreadWatch::new(self.handle())?);
        }
        Ok(())
    }

    /// Counters so far (zero before `run`).
    pub fn stats(&self) -> Stats {
        self.stats
            .as_ref()
            .map(|s| lock(&s.stats).clone())
            .unwrap_or_default()
    }

    /// How many times any of this server's threads (the acceptor,
    /// connections, datagram sockets, service timers) returned from a
    /// wait, so far: a test that an idle server sleeps. Not a stable API.
    #[doc(hidden)]
    pub fn wakeups(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.wakeups)
    }

    /// Most connections served at once. Each costs two descriptors here
    /// (its socket and its wake-up), so the loop engines' clamp to the
    /// descriptor limit is halved.
    fn max_connections(&self) -> usize {
        let by_fds = fd_limit().map_or(usize::MAX, |limit| {
            limit.saturating_sub(self.config.fd_reserve) / 2
        });
        self.config.max_connections.min(by_fds).max(1)
    }

    /// Accepts and serves until shut down, then returns what happened.
    pub fn run(&mut self) -> io::Result<Report> {
        let shared = Arc::new(Shared {
            handlers: mem::take(&mut self.handlers),
            limits: mem::take(&mut self.limits),
            conns: Mutex::new(Slab::new()),
            stats: Mutex::new(Stats::default()),
            report: Mutex::new(Report::default()),
            gens: AtomicU32::new(0),
            service_timers: Mutex::new(Timers::new()),
            timer_wake: Condvar::new(),
            finished: AtomicBool::new(false),
            handle: self.handle.clone(),
            acceptor: self.wake.waker(),
            accept_paused: AtomicBool::new(false),
            linger: self.config.linger,
            linger_bytes: self.config.linger_bytes,
            sources: Mutex::new(Sources::new(self.config.max_per_source)),
            refused: AtomicUsize::new(0),
            read_chunk: self.threads.read_chunk.max(1),
            on_panic: self.config.on_panic,
            wakeups: Arc::clone(&self.wakeups),
            dgram_guard: Mutex::new(mem::replace(&mut self.guard, dgram::Guard::new(0))),
        });
        self.stats = Some(Arc::clone(&shared));
        let mut acceptor = Acceptor {
            max_conns: self.max_connections(),
            paused_until: None,
            log: LogEvery::default(),
            workers: Vec::new(),
        };
        log::info!("threads engine: at most {} connections", acceptor.max_conns);

        let mut selector = Selector::new(Backend::Poll)?;
        selector.register(self.wake.fd(), Interest::READ, usize::MAX)?;
        for (i, (l, _, _)) in self.listeners.iter().enumerate() {
            selector.register(l.fd(), Interest::READ, i)?;
        }
        // Shutdown closes `stop_tx`, which makes `stop_rx` readable for
        // every datagram thread at once.
        let (stop_rx, stop_tx) = UnixStream::pair()?;
        let stop_rx = Arc::new(stop_rx);
        let started = self
            .start_datagram_threads(&shared, &stop_rx, &mut acceptor.workers)
            .and_then(|()| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name("service-timers".into())
                    .spawn(move || service_timers(&shared))
            });
        let timer_thread = match started {
            Ok(thread) => thread,
            Err(e) => {
                drop(stop_tx);
                for w in acceptor.workers.drain(..) {
                    let _ = w.join();
                }
                return Err(e);
            }
        };
        let mut next_stats = self.config.stats_interval.map(|d| later(Instant::now(), d));
        let mut ready: Vec<Ready> = Vec::new();
        let mut listening = true;
        while self.handle.requested() < SHUTDOWN {
            // Nothing periodic unless asked for: with no stats interval and
            // accepting not paused, the acceptor sleeps until a client or a
            // wake-up comes.
            let now = Instant::now();
            if let (Some(at), Some(every)) = (next_stats, self.config.stats_interval) {
                if now >= at {
                    log::info!("stats: {}", lock(&shared.stats));
                    next_stats = Some(later(now, every));
                }
            }
            let retry = acceptor.paused_until.is_some_and(|at| now >= at)
                || !shared.accept_paused.load(Ordering::SeqCst);
            if acceptor.paused_until.is_some() && retry {
                // The retry time came, or a connection closed: try again.
                acceptor.paused_until = None;
                shared.accept_paused.store(false, Ordering::SeqCst);
                if !listening {
                    for (i, (l, _, _)) in self.listeners.iter().enumerate() {
                        selector.register(l.fd(), Interest::READ, i)?;
                    }
                    listening = true;
                }
            }
            let wake_at = match (next_stats, acceptor.paused_until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            ready.clear();
            selector.select_into(
                wake_at.map(|t| t.saturating_duration_since(now)),
                &mut ready,
            )?;
            shared.woke();
            for r in &ready {
                if r.key == usize::MAX {
                    self.wake.drain();
                } else if acceptor.paused_until.is_none() {
                    self.accept(r.key, &shared, &mut acceptor);
                }
            }
            if acceptor.paused_until.is_some() && listening {
                // Level-triggered: a listener we cannot accept on would
                // report readable at once, for ever. Out of the poll set
                // until the retry.
                for (l, _, _) in &self.listeners {
                    let _ = selector.unregister(l.fd());
                }
                listening = false;
            }
            acceptor.workers.retain(|w| !w.is_finished());
        }
        let report = self.shut_down(&shared, &mut selector, acceptor.workers, stop_tx);
        {
            // Under the timers' lock, so the timer thread cannot miss it
            // between its look at `finished` and its wait.
            let _timers = lock(&shared.service_timers);
            shared.finished.store(true, Ordering::SeqCst);
            shared.timer_wake.notify_all();
        }
        let _ = timer_thread.join();
        // Done: stop watching signals, so they act as they do by default.
        self.signals = None;
        Ok(report)
    }

    /// Gives each datagram socket its thread.
    fn start_datagram_threads(
        &mut self,
        shared: &Arc<Shared>,
        stop: &Arc<UnixStream>,
        workers: &mut Vec<JoinHandle<()>>,
    ) -> io::Result<()> {
        for (i, bound) in mem::take(&mut self.dgrams).into_iter().enumerate() {
            let shared = Arc::clone(shared);
            let stop = Arc::clone(stop);
            workers.push(
                thread::Builder::new()
                    .name(format!("dgram-{i}"))
                    .stack_size(self.threads.stack_size)
                    .spawn(move || serve_datagrams(&shared, bound, &stop))?,
            );
        }
        Ok(())
    }

    /// Accepts on listener `index` until it is drained or the budget
    /// (`accepts_per_wakeup`) is spent; the listener is level-triggered, so
    /// what is left is reported on the next wait.
    fn accept(&self, index: usize, shared: &Arc<Shared>, acceptor: &mut Acceptor) {
        let (listener, service, endpoint) = &self.listeners[index];
        for _ in 0..self.config.accepts_per_wakeup.max(1) {
            let (stream, peer) = match accept(listener) {
                Ok(pair) => pair,
                // The queue is empty for now.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    if self.accept_failed(endpoint, shared, acceptor, &e) {
                        continue;
                    }
                    return;
                }
            };
            let open = lock(&shared.stats).active as usize;
            let admitted = lock(&shared.sources).admit(
                open,
                acceptor.max_conns,
                self.admission.as_ref(),
                &peer,
            );
            if let Err(why) = admitted {
                refuse(shared, stream, why, self.threads.stack_size);
                continue;
            }
            if let Err(e) = self.start_connection(*service, stream, peer, shared, acceptor) {
                // No descriptor for its wake-up, or no thread: the client
                // is dropped, and accepting pauses as for EMFILE.
                if !self.accept_failed(endpoint, shared, acceptor, &e) {
                    return;
                }
            }
        }
    }

    /// Counts and logs a failed accept (or a connection that could not be
    /// given its thread) like the loop engines; returns whether to accept
    /// again at once. Out of descriptors, memory or threads, accepting
    /// pauses for [`ACCEPT_RETRY`] or until a connection closes.
    fn accept_failed(
        &self,
        endpoint: &Endpoint,
        shared: &Shared,
        acceptor: &mut Acceptor,
        e: &io::Error,
    ) -> bool {
        if e.kind() == io::ErrorKind::Interrupted {
            return true;
        }
        let now = Instant::now();
        if acceptor.log.due(now, ACCEPT_LOG_EVERY) {
            log::warn!("accept on {endpoint}: {e}");
        }
        let mut stats = lock(&shared.stats);
        stats.accept_errors += 1;
        match e.raw_os_error() {
            // That one connection died in the queue (or a firewall refused
            // it); the ones behind it are fine.
            Some(libc::ECONNABORTED | libc::EPERM | libc::EPROTO) => {
                stats.accept_aborted += 1;
                true
            }
            kind => {
                match kind {
                    Some(libc::EMFILE | libc::ENFILE) => stats.accept_no_fds += 1,
                    // EAGAIN is what pthread_create says when it has no
                    // memory or thread left for a new thread.
                    Some(libc::ENOBUFS | libc::ENOMEM | libc::EAGAIN) => {
                        stats.accept_no_memory += 1
                    }
                    _ => {}
                }
                stats.accept_pauses += 1;
                acceptor.paused_until = Some(later(now, ACCEPT_RETRY));
                shared.accept_paused.store(true, Ordering::SeqCst);
                false
            }
        }
    }

    /// Registers an accepted connection and gives it its thread.
    fn start_connection(
        &self,
        service: usize,
        stream: StdStream,
        peer: PeerAddr,
        shared: &Arc<Shared>,
        acceptor: &mut Acceptor,
    ) -> io::Result<()> {
        let limits = &shared.limits[service];
        stream.sock().set_nonblocking(true)?;
        if let (StdStream::Tcp(_), true) = (&stream, self.config.nodelay) {
            // Best effort: a failure only costs latency.
            let _ = stream.sock().set_nodelay(true);
        }
        #[cfg(any(target_os = "macos", target_os = "ios"))]
        let _ = stream.sock().set_nosigpipe(true);
        let io = Arc::new(PeerIo {
            stream,
            wake: Wake::new()?,
            queue: Mutex::new(Queue::default()),
            high_water: limits.output_high_water,
            paused: AtomicBool::new(false),
        });
        let gen = shared.next_gen();
        let index = lock(&shared.conns).insert(Peer {
            gen,
            service,
            io: Arc::clone(&io),
            addr: peer.clone(),
        });
        let id = ConnId::new(index, gen);
        {
            let mut stats = lock(&shared.stats);
            stats.accepted += 1;
            stats.active += 1;
            stats.peak = stats.peak.max(stats.active);
        }
        let worker = {
            let shared = Arc::clone(shared);
            let io = Arc::clone(&io);
            thread::Builder::new()
                .name(format!("conn-{index}"))
                .stack_size(self.threads.stack_size)
                .spawn(move || serve(&shared, id, service, io, peer))
        };
        match worker {
            Ok(w) => {
                acceptor.workers.push(w);
                Ok(())
            }
            Err(e) => {
                // No thread, no connection: undo, as if never accepted.
                let gone = lock(&shared.conns).remove(index);
                lock(&shared.sources).release(&gone.addr);
                let mut stats = lock(&shared.stats);
                stats.active -= 1;
                stats.accepted -= 1;
                Err(e)
            }
        }
    }

    /// Stop accepting; let connections finish within the grace period;
    /// then cut off those that are left and join every thread.
    fn shut_down(
        &mut self,
        shared: &Shared,
        selector: &mut Selector,
        workers: Vec<JoinHandle<()>>,
        stop_datagrams: UnixStream,
    ) -> Report {
        for (l, _, _) in self.listeners.drain(..) {
            // Dropping the listener removes its socket file, if any.
            let _ = selector.unregister(l.fd());
        }
        // Datagrams have nothing to finish: their threads stop now.
        drop(stop_datagrams);
        let now = Instant::now();
        log::info!(
            "shutting down: no new connections; {} open get {:?} to finish",
            lock(&shared.conns).len(),
            self.config.grace
        );
        for s in 0..shared.handlers.len() {
            run_callback(&Origin::service(shared, s), None, now, |h, cx| {
                h.shutdown(cx)
            });
        }
        let deadline = later(now, self.config.grace);
        // Each connection that finishes wakes us (see `finish`).
        shared.accept_paused.store(true, Ordering::SeqCst);
        while !lock(&shared.conns).is_empty() && self.handle.requested() < STOP {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = selector.select(Some(left));
            shared.woke();
            self.wake.drain();
            shared.accept_paused.store(true, Ordering::SeqCst);
        }
        for (_, p) in lock(&shared.conns).iter() {
            lock(&p.io.queue).cut_off = true;
            p.io.wake.wake();
        }
        for w in workers {
            let _ = w.join();
        }
        let mut report = lock(&shared.report).clone();
        if report.cut_off > 0 {
            log::info!(
                "shutdown cut off {} connections ({} with {} unsent bytes)",
                report.cut_off,
                report.dropped,
                report.dropped_bytes
            );
        }
        report.stats = lock(&shared.stats).clone();
        log::info!("stopped: {}", report.stats);
        report
    }
}

// ---- one connection's life ------------------------------------------------

/// How a connection's service part ended.
enum Ending {
    /// Closed as asked (output sent, or dropped for an abort).
    Close(CloseMode, CloseReason),
    /// Shutdown's grace ended first.
    CutOff,
}

/// A connection thread's state outside callbacks.
struct Conn<'a> {
    at: Origin<'a>,
    io: &'a Arc<PeerIo>,
    limits: &'a Limits,
    key: usize,
    st: ConnState,
    waiter: Selector,
    /// The interest the socket is registered with, if it is.
    registered: Option<Interest>,
    ready: Vec<Ready>,
    buf: Vec<u8>,
    /// Input the service left unconsumed.
    input: Vec<u8>,
    /// The service returned while held back: `input` may hold whole
    /// messages it has not seen, to hand it again once it may go on.
    undelivered: bool,
    eof: bool,
    last_read: Instant,
    /// When the kernel last took output, or output began to wait: the
    /// write stall is measured from here, and it counts as activity.
    last_write: Instant,
    pending: usize,
    /// A close waiting for output gives up (aborts) at this time.
    close_by: Option<Instant>,
}

/// Key of the wake-up descriptor and of the socket in a connection's poll.
const WAKE_KEY: usize = 0;
const SOCKET_KEY: usize = 1;

/// The life of one connection, on its own thread.
fn serve(shared: &Shared, me: ConnId, service: usize, io: Arc<PeerIo>, peer: PeerAddr) {
    let at = Origin {
        shared,
        me,
        service,
        peer: Some(&peer),
        io: Some(&io),
    };
    let limits = &shared.limits[service];
    let waiter = Selector::new(Backend::Poll).and_then(|mut s| {
        s.register(io.wake.fd(), Interest::READ, WAKE_KEY)?;
        Ok(s)
    });
    let now = Instant::now();
    let mut c = Conn {
        at,
        io: &io,
        limits,
        key: 0,
        st: ConnState {
            paused: false,
            backpressured: false,
            idle: limits.idle_timeout,
            timers: Timers::new(),
            fanout: Vec::new(),
        },
        waiter: match waiter {
            Ok(w) => w,
            Err(e) => {
                // No poll set: nothing can be served; no session was made.
                log::warn!("{me}: {e}");
                lock(&io.queue).request_close(CloseMode::Abort, CloseReason::Error(e.kind()));
                return finish(
                    shared,
                    me,
                    &io,
                    CloseMode::Abort,
                    CloseReason::Error(e.kind()),
                    true,
                );
            }
        },
        registered: None,
        ready: Vec::new(),
        buf: vec![0u8; shared.read_chunk],
        input: Vec::new(),
        undelivered: false,
        eof: false,
        last_read: now,
        last_write: now,
        pending: 0,
        close_by: None,
    };
    let mut key = 0;
    let connected = run_callback(&at, Some(&mut c.st), now, |h, cx| key = h.connect(cx));
    c.key = key;
    lock(&io.queue).connected = connected;
    let ending = c.run();
    let (mode, why) = match ending {
        Ending::Close(mode, why) => (mode, why),
        Ending::CutOff => c.cut_off(),
    };
    {
        let mut q = lock(&io.queue);
        q.request_close(mode, why);
        q.done = true;
    }
    // No session was made if `on_connect` panicked: nothing to close.
    if connected {
        let key = c.key;
        run_callback(&at, Some(&mut c.st), Instant::now(), |h, cx| {
            h.close(cx, key, why)
        });
    }
    let plain = matches!(ending, Ending::CutOff) || c.eof;
    if mode == CloseMode::Flush && !plain {
        c.linger();
    }
    finish(shared, me, &io, mode, why, plain);
}

impl Conn<'_> {
    /// Serves until the connection is to close.
    fn run(&mut self) -> Ending {
        loop {
            let now = Instant::now();
            self.flush(now);
            let (close, cut_off) = {
                let q = lock(&self.io.queue);
                (q.close, q.cut_off)
            };
            if cut_off {
                return Ending::CutOff;
            }
            match close {
                Some((CloseMode::Abort, why)) => return Ending::Close(CloseMode::Abort, why),
                Some((CloseMode::Flush, why)) if self.pending == 0 => {
                    return Ending::Close(CloseMode::Flush, why)
                }
                Some((CloseMode::Flush, why)) => {
                    // The peer must take the rest within the linger time,
                    // or it is dropped (the loops' close deadline).
                    let by = *self
                        .close_by
                        .get_or_insert(later(now, self.at.shared.linger));
                    if now >= by {
                        self.close(CloseMode::Abort, why);
                        continue;
                    }
                }
                None => {}
            }
            if self.stalled(now) {
                log::debug!("{}: no write progress for the write timeout", self.at.me);
                self.close(CloseMode::Abort, CloseReason::WriteTimeout);
                continue;
            }
            if close.is_none() && self.step(now) {
                continue;
            }
            self.wait(now, close.is_none());
        }
    }

    /// One piece of work that needs no waiting, if there is one: a timer,
    /// the idle timeout, input held back earlier. True if it did some.
    fn step(&mut self, now: Instant) -> bool {
        if let Some((timer, ())) = self.st.timers.pop_expired(now) {
            let key = self.key;
            run_callback(&self.at, Some(&mut self.st), now, |h, cx| {
                h.timer(cx, key, timer)
            });
            return true;
        }
        if self.idle_at().is_some_and(|at| at <= now) {
            self.close(CloseMode::Flush, CloseReason::IdleTimeout);
            return true;
        }
        if !self.st.fanout.is_empty() {
            self.recheck_fanout();
        }
        if self.undelivered && !self.st.held_back() {
            // Back under the marks: go on where the service stopped.
            self.deliver(now, &[]);
            return true;
        }
        false
    }

    fn close(&self, mode: CloseMode, reason: CloseReason) {
        lock(&self.io.queue).request_close(mode, reason);
    }

    /// Idle means no bytes in either direction: time spent waiting for a
    /// slow reader to take output is not idle.
    fn idle_at(&self) -> Option<Instant> {
        let idle = self.st.idle?;
        Some(later(self.last_read.max(self.last_write), idle))
    }

    fn stalled(&self, now: Instant) -> bool {
        match self.limits.write_timeout {
            Some(after) => self.pending > 0 && now >= later(self.last_write, after),
            None => false,
        }
    }

    /// Sends what the kernel takes of the queue, then applies the output
    /// limits to what is left. Wakes senders that waited for it to try.
    fn flush(&mut self, now: Instant) {
        let (sent, short, waiters) = {
            let mut q = lock(&self.io.queue);
            let mut sent = 0;
            let mut failed = None;
            let mut short = false;
            while !q.out.is_empty() {
                match self.io.stream.send(q.out.as_slice()) {
                    Ok(n) => {
                        sent += n;
                        short = n < q.out.len();
                        q.advance(n);
                        if short {
                            // The kernel is full; POLLOUT says when to go on.
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // A signal came before anything was sent: again.
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // Everything left has been tried now.
            q.fresh = 0;
            if let Some(e) = &failed {
                log::debug!("{}: {e}", self.at.me);
                q.request_close(CloseMode::Abort, CloseReason::Error(e.kind()));
            }
            let before = self.pending;
            self.pending = q.out.len();
            if sent > 0 || (before == 0 && self.pending > 0) {
                self.last_write = now;
            }
            if self.pending > self.limits.max_output {
                q.request_close(CloseMode::Abort, CloseReason::OutputLimit);
                self.pending = 0;
            }
            (sent, short, mem::take(&mut q.waiters))
        };
        if sent > 0 {
            let mut stats = lock(&self.at.shared.stats);
            stats.bytes_out += sent as u64;
            if short {
                stats.short_writes += 1;
            }
        }
        wake_all(waiters);
        if self.pending > self.limits.output_high_water {
            self.st.backpressured = true;
        } else if self.pending <= self.limits.output_low_water {
            self.st.backpressured = false;
        }
    }

    /// Drops the peers whose threads have tried their bytes (or that
    /// closed) from the fan-out wait; waits on the others again.
    fn recheck_fanout(&mut self) {
        let me = self.io;
        self.st.fanout.retain(|peer| {
            let mut q = lock(&peer.queue);
            let still = q.open() && q.fresh > peer.high_water;
            if still && !q.waiters.iter().any(|w| w.as_ptr() == Arc::as_ptr(me)) {
                q.waiters.push(Arc::downgrade(me));
            }
            still
        });
    }

    /// Hands the service the input it holds plus `fresh`.
    fn deliver(&mut self, now: Instant, fresh: &[u8]) {
        self.input.extend_from_slice(fresh);
        let mut view = Input::new(&self.input);
        let key = self.key;
        run_callback(&self.at, Some(&mut self.st), now, |h, cx| {
            h.data(cx, key, &mut view)
        });
        let consumed = view.consumed();
        self.input.drain(..consumed);
        // Caught up here, so register for the fan-out peers at once.
        if !self.st.fanout.is_empty() {
            self.recheck_fanout();
        }
        let over = lock(&self.io.queue).out.len() > self.limits.output_high_water;
        self.undelivered = !self.input.is_empty() && (self.st.held_back() || over);
        if self.input.len() > self.limits.max_input {
            self.close(CloseMode::Abort, CloseReason::InputLimit);
        }
    }

    /// Waits in poll(2) for the socket (readable if `open` and input is
    /// wanted, writable while output waits), a wake-up, or the next
    /// deadline; then reads once if it can.
    fn wait(&mut self, now: Instant, open: bool) {
        let want_read = open && !self.eof && !self.st.held_back();
        let want_write = self.pending > 0;
        let interest = match (want_read, want_write) {
            (true, true) => Some(Interest::BOTH),
            (true, false) => Some(Interest::READ),
            (false, true) => Some(Interest::WRITE),
            // Not registered at all: a hang-up would otherwise be reported
            // for ever, whatever the interest.
            (false, false) => None,
        };
        if interest != self.registered {
            let fd = self.io.stream.fd();
            let done = match (self.registered, interest) {
                (None, Some(i)) => self.waiter.register(fd, i, SOCKET_KEY),
                (Some(_), Some(i)) => self.waiter.modify(fd, i, SOCKET_KEY),
                (Some(_), None) => self.waiter.unregister(fd),
                (None, None) => Ok(()),
            };
            if let Err(e) = done {
                return self.close(CloseMode::Abort, CloseReason::Error(e.kind()));
            }
            self.registered = interest;
        }
        let mut deadline = self.st.timers.next_deadline();
        let mut soonest = |t: Option<Instant>| {
            deadline = match (deadline, t) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        if open {
            soonest(self.idle_at());
        }
        if let (true, Some(after)) = (want_write, self.limits.write_timeout) {
            soonest(Some(later(self.last_write, after)));
        }
        soonest(self.close_by);
        self.ready.clear();
        let timeout = deadline.map(|t| t.saturating_duration_since(now));
        if let Err(e) = self.waiter.select_into(timeout, &mut self.ready) {
            return self.close(CloseMode::Abort, CloseReason::Error(e.kind()));
        }
        self.at.shared.woke();
        let mut readable = false;
        for r in &self.ready {
            match r.key {
                WAKE_KEY => self.io.wake.drain(),
                _ => readable |= r.readable,
            }
        }
        if readable && want_read {
            self.read();
        }
    }

    /// One read, and the service's callback for it.
    fn read(&mut self) {
        let mut buf = mem::take(&mut self.buf);
        match self.io.stream.read(&mut buf) {
            // The peer shut down its sending side.
            Ok(0) => {
                self.eof = true;
                let key = self.key;
                run_callback(&self.at, Some(&mut self.st), Instant::now(), |h, cx| {
                    h.eof(cx, key)
                });
            }
            Ok(n) => {
                self.last_read = Instant::now();
                lock(&self.at.shared.stats).bytes_in += n as u64;
                self.deliver(self.last_read, &buf[..n]);
            }
            // A spurious wake-up: nothing there after all.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // A signal came before any data: poll again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("{}: {e}", self.at.me);
                self.close(CloseMode::Abort, CloseReason::Error(e.kind()));
            }
        }
        self.buf = buf;
    }

    /// Shutdown's grace is over: one last try to send, then close; what
    /// the kernel would not take is reported as dropped.
    fn cut_off(&mut self) -> (CloseMode, CloseReason) {
        self.flush(Instant::now());
        let left = lock(&self.io.queue).out.len();
        let mut report = lock(&self.at.shared.report);
        report.cut_off += 1;
        if left > 0 {
            report.dropped += 1;
            report.dropped_bytes += left as u64;
            return (CloseMode::Abort, CloseReason::Shutdown);
        }
        (CloseMode::Flush, CloseReason::Shutdown)
    }

    /// Our FIN, then read and drop input until the peer's FIN (bounded in
    /// time and bytes), so unread input does not turn the close into a
    /// reset that could destroy the last reply. A cut-off ends it early.
    fn linger(&mut self) {
        self.io.stream.shutdown(Shutdown::Write);
        let end = later(Instant::now(), self.at.shared.linger);
        let fd = self.io.stream.fd();
        let registered = match self.registered {
            Some(_) => self.waiter.modify(fd, Interest::READ, SOCKET_KEY),
            None => self.waiter.register(fd, Interest::READ, SOCKET_KEY),
        };
        if registered.is_err() {
            return;
        }
        let mut discarded = 0;
        loop {
            let now = Instant::now();
            if discarded > self.at.shared.linger_bytes {
                lock(&self.at.shared.stats).linger_resets += 1;
                return;
            }
            if now >= end || lock(&self.io.queue).cut_off {
                return;
            }
            self.ready.clear();
            if self
                .waiter
                .select_into(Some(end - now), &mut self.ready)
                .is_err()
            {
                return;
            }
            self.at.shared.woke();
            if self.ready.iter().any(|r| r.key == WAKE_KEY) {
                self.io.wake.drain();
            }
            if !self.ready.iter().any(|r| r.key == SOCKET_KEY) {
                continue;
            }
            match self.io.stream.read(&mut self.buf) {
                Ok(0) => return,
                Ok(n) => {
                    discarded += n;
                    lock(&self.at.shared.stats).linger_discarded += n as u64;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return,
            }
        }
    }
}

/// Tells a refused client why and sends our FIN; then a thread of its own
/// reads and drops what the client sends until it closes too, within the
/// linger budget, so the close is a FIN and the notice is not destroyed by
/// a reset (see [`super::admit`]). Past [`REFUSED_LINGERING`] such threads,
/// or without a thread, it reads what is there now and closes.
fn refuse(shared: &Arc<Shared>, stream: StdStream, why: Refusal, stack_size: usize) {
    why.count(&mut lock(&shared.stats));
    // Best effort: the socket is fresh, so this fits its buffer.
    let _ = stream.send(why.notice());
    stream.shutdown(Shutdown::Write);
    let mut buf = [0; 4096];
    let drain_now = |stream: &StdStream, buf: &mut [u8]| {
        let _ = stream.sock().set_nonblocking(true);
        if let Ok(n) = stream.read(buf) {
            lock(&shared.stats).linger_discarded += n as u64;
        }
    };
    if shared.refused.fetch_add(1, Ordering::SeqCst) >= REFUSED_LINGERING {
        shared.refused.fetch_sub(1, Ordering::SeqCst);
        return drain_now(&stream, &mut buf);
    }
    let lingering = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("refused".into())
        .stack_size(stack_size)
        .spawn(move || {
            let shared = &*lingering;
            let end = later(Instant::now(), shared.linger);
            let mut buf = [0; 4096];
            let mut discarded = 0;
            loop {
                let now = Instant::now();
                if now >= end || discarded > shared.linger_bytes {
                    if discarded > shared.linger_bytes {
                        lock(&shared.stats).linger_resets += 1;
                    }
                    break;
                }
                // Blocking, with the time left as its timeout.
                if stream.sock().set_read_timeout(Some(end - now)).is_err() {
                    break;
                }
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        discarded += n;
                        lock(&shared.stats).linger_discarded += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            shared.refused.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        // The closure, and the stream in it, is gone: nothing more to do.
        shared.refused.fetch_sub(1, Ordering::SeqCst);
        log::debug!("no thread to linger for a refused client: {e}");
    }
}

fn wake_all(waiters: Vec<Weak<PeerIo>>) {
    for w in waiters.iter().filter_map(Weak::upgrade) {
        w.wake.wake();
    }
}

/// Closes the socket (with a reset for an abort) and forgets the
/// connection; counts the close and wakes whoever waited on it.
fn finish(
    shared: &Shared,
    me: ConnId,
    io: &PeerIo,
    mode: CloseMode,
    why: CloseReason,
    plain: bool,
) {
    let waiters = {
        let mut q = lock(&io.queue);
        q.done = true;
        q.discard();
        mem::take(&mut q.waiters)
    };
    wake_all(waiters);
    let reset_by_peer = matches!(
        why,
        CloseReason::Error(
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        )
    );
    if mode == CloseMode::Abort && !reset_by_peer {
        let _ = io.stream.sock().set_linger(Some(Duration::ZERO));
    } else if plain {
        // Nothing to linger for; the FIN goes with the close.
        io.stream.shutdown(Shutdown::Write);
    }
    {
        let mut conns = lock(&shared.conns);
        if conns.get(me.index()).is_some_and(|p| p.gen == me.gen()) {
            let gone = conns.remove(me.index());
            lock(&shared.sources).release(&gone.addr);
        }
    }
    lock(&shared.stats).record_close(why);
    if shared.accept_paused.swap(false, Ordering::SeqCst) {
        // A descriptor came free: try accepting now rather than at the
        // retry (and let a shutdown waiting for the last one see it).
        let _ = (shared.acceptor)();
    }
}

// ---- datagrams --------------------------------------------------------

/// A datagram socket and the service behind it, until `run` gives them a
/// thread.
struct DgramBound {
    socket: DgramSocket,
    handler: Box<dyn DatagramService + Send>,
    endpoint: Endpoint,
    replies: dgram::Replies,
}

/// A datagram socket's thread: serves what arrives until shutdown begins
/// (datagrams have nothing to finish, so it stops at once). It waits in
/// poll(2) on the socket and on `stop`, which shutdown makes readable.
fn serve_datagrams(shared: &Shared, mut bound: DgramBound, stop: &UnixStream) {
    const SOCKET: usize = 0;
    const STOP_KEY: usize = 1;
    let mut waiter = match Selector::new(Backend::Poll).and_then(|mut s| {
        s.register(bound.socket.fd(), Interest::READ, SOCKET)?;
        s.register(stop.as_raw_fd(), Interest::READ, STOP_KEY)?;
        Ok(s)
    }) {
        Ok(w) => w,
        Err(e) => {
            log::error!("{}: cannot wait for datagrams: {e}", bound.endpoint);
            return;
        }
    };
    let mut buf = vec![0; MAX_DATAGRAM + 1];
    let mut ready = Vec::new();
    'serve: while shared.handle.requested() < SHUTDOWN {
        ready.clear();
        if let Err(e) = waiter.select_into(None, &mut ready) {
            log::error!("{}: {e}", bound.endpoint);
            break;
        }
        shared.woke();
        if ready.iter().any(|r| r.key == STOP_KEY) {
            break;
        }
        // Level-triggered: what is left after the budget is reported on the
        // next wait.
        for _ in 0..crate::config::DATAGRAMS_PER_WAKEUP {
            let (n, from) = match bound.socket.recv_from(&mut buf) {
                Ok(got) => got,
                // Drained for now.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error for an earlier reply (ECONNREFUSED and the
                // like), reported on this read. It is used up now; go on.
                Err(e) => {
                    log::debug!("{}: {e}", bound.endpoint);
                    continue;
                }
            };
            let mut counted = Stats::default();
            let mut stop_asked = false;
            // Held across the callback: datagram threads are few, their
            // callbacks short, and the budget over all sources is one.
            let mut guard = lock(&shared.dgram_guard);
            let at = dgram::Endpoints {
                socket: &bound.socket,
                replies: &mut bound.replies,
                guard: &mut guard,
            };
            let served = dgram::serve(
                &mut *bound.handler,
                at,
                &mut counted,
                Instant::now(),
                &mut stop_asked,
                &from,
                &buf[..n],
            );
            drop(guard);
            if let Err(message) = served {
                log::error!(
                    "a datagram callback on {} panicked: {message}",
                    bound.endpoint
                );
                counted.panics += 1;
                stop_asked |= shared.on_panic == PanicPolicy::Shutdown;
            }
            lock(&shared.stats).absorb(&counted);
            if stop_asked {
                shared.handle.shutdown();
                break 'serve;
            }
        }
    }
    // Dropping `bound` removes its socket file, if any.
}

// ---- service timers ---------------------------------------------------

/// The thread that fires service timers; it sleeps until the next one is
/// due, or until one is set or the server finishes.
fn service_timers(shared: &Shared) {
    let mut timers = lock(&shared.service_timers);
    while !shared.finished.load(Ordering::SeqCst) {
        let now = Instant::now();
        if let Some((timer, service)) = timers.pop_expired(now) {
            drop(timers);
            run_callback(&Origin::service(shared, service), None, now, |h, cx| {
                h.service_timer(cx, timer)
            });
            timers = lock(&shared.service_timers);
            continue;
        }
        timers = match timers.next_deadline() {
            Some(t) => {
                let wait = t.saturating_duration_since(now);
                shared
                    .timer_wake
                    .wait_timeout(timers, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => shared
                .timer_wake
                .wait(timers)
                .unwrap_or_else(|e| e.into_inner()),
        };
        shared.woke();
    }
}
