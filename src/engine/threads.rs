//! The thread engine: one OS thread per connection, blocking std sockets,
//! the same [`Service`] values. Python's `ThreadingMixIn`, in Rust.
//!
//! It is here as the baseline the event loops are measured against, and it
//! keeps the engine contract:
//!
//! - One service value serves all connections, so it sits behind one mutex,
//!   held only while a callback runs. Callbacks never do I/O; the thread
//!   that ran one writes what it produced after releasing the lock.
//! - Writes to the thread's own connection and to others (chat) are
//!   blocking writes with the write timeout as the socket's send timeout. A
//!   peer that makes no progress for that long is marked dead and shut
//!   down, so a member that stops reading stalls a sender at most one write
//!   timeout, and nobody after that.
//! - Timers and the idle timeout become the read timeout of the blocking
//!   read; service timers run on one extra thread.
//! - Shutdown stops accepting, lets connections finish within the grace
//!   period, then shuts their sockets down, which unblocks every thread,
//!   and joins them.
//!
//! Output queues in user space only between a callback and the flush that
//! follows it: backpressure is the kernel's socket buffer plus the blocking
//! write.
//!
//! Datagram services get one thread per socket, blocking in `recv_from`;
//! each owns its service, so they need no lock.

use std::io::{self, Read};
use std::mem;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::SockRef;

use super::select::SelfPipe;
use super::server::{SHUTDOWN, STOP};
use super::{contain, dgram, Admission, Handle, Handler, Hosted, Report};
use crate::buffer::Input;
use crate::config::{Config, Limits, PanicPolicy, MAX_DATAGRAM};
use crate::net::{self, DgramSocket, Endpoint, StdListener, ToEndpoint, SEND_FLAGS};
use crate::select::{Backend, Interest, Selector};
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
    /// Bytes one `read` asks for; each thread owns a buffer this big.
    /// Default 16 KiB, the usual size for thread-per-connection servers.
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

/// How long the accept loop waits between looks at shutdown requests when
/// nothing wakes it, and how long it backs off after running out of
/// descriptors.
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// A blocking stream socket.
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

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StdStream::Tcp(s) => (&*s).read(buf),
            StdStream::Unix(s) => (&*s).read(buf),
        }
    }

    /// Writes everything, or fails (a send timeout shows as `TimedOut`).
    fn send_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.sock().send_with_flags(buf, SEND_FLAGS) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out"))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock().set_read_timeout(t)
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = self.sock().shutdown(how);
    }
}

/// What every thread may touch of another connection.
///
/// Writes are queued while the writer holds the service lock, so the queue
/// holds them in the order the callbacks ran; they are sent after the lock
/// is released, by whichever thread gets to `flush` first. Sending straight
/// from each thread after the lock would let a later callback's line
/// overtake an earlier one.
struct PeerIo {
    stream: StdStream,
    /// Bytes written to it and not sent yet, oldest first.
    queued: Mutex<Vec<u8>>,
    /// Held while sending, so batches leave whole and in order.
    write_lock: Mutex<()>,
    /// A write to it timed out or failed: skip it from now on.
    dead: AtomicBool,
    /// A close asked for by another connection's callback.
    close_request: Mutex<Option<(CloseMode, CloseReason)>>,
}

impl PeerIo {
    fn new(stream: StdStream) -> PeerIo {
        PeerIo {
            stream,
            queued: Mutex::new(Vec::new()),
            write_lock: Mutex::new(()),
            dead: AtomicBool::new(false),
            close_request: Mutex::new(None),
        }
    }

    /// Queues bytes (called under the service lock). False if it is dead.
    fn queue(&self, bytes: &[u8]) -> bool {
        if self.dead.load(Ordering::SeqCst) {
            return false;
        }
        lock(&self.queued).extend_from_slice(bytes);
        true
    }

    /// Sends everything queued, in order; returns the bytes sent. A failure
    /// marks the connection dead and shuts its socket, which wakes its
    /// thread to close it.
    fn flush(&self) -> u64 {
        let _guard = lock(&self.write_lock);
        let mut sent = 0;
        loop {
            let batch = std::mem::take(&mut *lock(&self.queued));
            if batch.is_empty() || self.dead.load(Ordering::SeqCst) {
                return sent;
            }
            match self.stream.send_all(&batch) {
                Ok(()) => sent += batch.len() as u64,
                Err(e) => {
                    log::debug!("write failed, dropping the connection: {e}");
                    let why = match e.kind() {
                        io::ErrorKind::TimedOut => CloseReason::WriteTimeout,
                        kind => CloseReason::Error(kind),
                    };
                    lock(&self.close_request).get_or_insert((CloseMode::Abort, why));
                    self.dead.store(true, Ordering::SeqCst);
                    lock(&self.queued).clear();
                    self.stream.shutdown(Shutdown::Both);
                    return sent;
                }
            }
        }
    }

    fn request_close(&self, mode: CloseMode, reason: CloseReason) {
        lock(&self.close_request).get_or_insert((mode, reason));
        // Wake its thread from a blocking read.
        self.stream.shutdown(Shutdown::Read);
    }
}

struct Peer {
    gen: u32,
    service: usize,
    io: Arc<PeerIo>,
}

/// State every thread shares.
struct Shared {
    handlers: Vec<Mutex<Box<dyn Handler + Send>>>,
    limits: Vec<Limits>,
    conns: Mutex<Slab<Peer>>,
    stats: Mutex<Stats>,
    /// Generations for connection ids and timer ids alike.
    gens: AtomicU32,
    service_timers: Mutex<Timers<usize>>,
    timer_wake: Condvar,
    finished: AtomicBool,
    handle: Handle,
    linger: Duration,
    read_chunk: usize,
    on_panic: PanicPolicy,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking callback poisons the service's mutex; the state it guards
    // is the service's own, so carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
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
}

/// Other connections a callback queued bytes for: flushed after the
/// service lock is released.
type Outbox = Vec<Arc<PeerIo>>;

/// One connection's view, lent to `Context` during callbacks.
struct ThreadDriver<'a> {
    at: Origin<'a>,
    now: Instant,
    out: &'a mut Outbox,
    close: &'a mut Option<(CloseMode, CloseReason)>,
    paused: &'a mut bool,
    idle: &'a mut Option<Duration>,
    timers: Option<&'a mut Timers<()>>,
}

impl Driver for ThreadDriver<'_> {
    fn now(&self) -> Instant {
        self.now
    }

    fn write(&mut self, to: ConnId, bytes: &[u8]) -> bool {
        if to == self.at.me {
            return self.close.is_none() && self.at.io.is_some_and(|io| io.queue(bytes));
        }
        match self.at.shared.peer(to) {
            Some(io) if io.queue(bytes) => {
                self.out.push(io);
                true
            }
            _ => false,
        }
    }

    fn broadcast(&mut self, service: usize, bytes: &[u8], except: Option<ConnId>) -> usize {
        let mut sent = 0;
        let conns = lock(&self.at.shared.conns);
        for (index, p) in conns.iter() {
            let id = ConnId::new(index, p.gen);
            if p.service != service || Some(id) == except || p.io.dead.load(Ordering::SeqCst) {
                continue;
            }
            if id == self.at.me && self.close.is_some() {
                continue;
            }
            if p.io.queue(bytes) {
                if id != self.at.me {
                    self.out.push(Arc::clone(&p.io));
                }
                sent += 1;
            }
        }
        sent
    }

    fn close(&mut self, id: ConnId, mode: CloseMode, reason: CloseReason) {
        if id == self.at.me {
            self.close.get_or_insert((mode, reason));
        } else if let Some(io) = self.at.shared.peer(id) {
            io.request_close(mode, reason);
        }
    }

    fn evict(&mut self, id: ConnId, notice: &[u8]) {
        self.write(id, notice);
        self.close(id, CloseMode::Flush, CloseReason::OutputLimit);
    }

    fn state(&self, id: ConnId) -> Option<(bool, bool)> {
        if id == self.at.me {
            Some((self.close.is_some(), *self.paused))
        } else {
            self.at
                .shared
                .peer(id)
                .map(|io| (io.dead.load(Ordering::SeqCst), false))
        }
    }

    fn count(&mut self, counter: Counter) {
        *counter.field(&mut lock(&self.at.shared.stats)) += 1;
    }

    fn frame_timeout(&self, id: ConnId) -> Option<Duration> {
        (id == self.at.me)
            .then(|| self.at.shared.limits[self.at.service].frame_timeout)
            .flatten()
    }

    fn output_len(&self, id: ConnId) -> Option<usize> {
        // Bytes queued and not yet handed to the kernel; writes block, so
        // this is only ever what callbacks queued since the last flush.
        let queued = |io: &PeerIo| lock(&io.queued).len();
        match self.at.io.filter(|_| id == self.at.me) {
            Some(io) => Some(queued(io)),
            None => self.at.shared.peer(id).map(|io| queued(&io)),
        }
    }

    fn peer(&self, id: ConnId) -> Option<&PeerAddr> {
        // Only the current connection's address is at hand.
        self.at.peer.filter(|_| id == self.at.me)
    }

    fn set_reading(&mut self, id: ConnId, on: bool) {
        if id == self.at.me {
            *self.paused = !on;
        }
    }

    fn set_idle_timeout(&mut self, id: ConnId, timeout: Option<Duration>) {
        if id == self.at.me {
            *self.idle = timeout;
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
        let at = crate::timer::deadline(self.now, after);
        match (&mut self.timers, conn == self.at.me) {
            (Some(timers), true) => timers.insert_with_gen(at, period, (), gen),
            _ => {
                let id =
                    lock(&self.at.shared.service_timers).insert_with_gen(at, period, service, gen);
                self.at.shared.timer_wake.notify_all();
                id
            }
        }
    }

    fn cancel_timer(&mut self, timer: TimerId) -> bool {
        if let Some(timers) = &mut self.timers {
            if timers.cancel(timer).is_some() {
                return true;
            }
        }
        lock(&self.at.shared.service_timers).cancel(timer).is_some()
    }

    fn stop(&mut self) {
        self.at.shared.handle.shutdown();
    }
}

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
    stats: Option<Arc<Shared>>,
    admission: Option<Admission>,
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

/// Accepts one connection on a blocking-mode std listener.
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

impl ThreadedServer {
    /// A thread-per-connection server.
    pub fn new(config: Config, threads: ThreadConfig) -> io::Result<ThreadedServer> {
        let wake = SelfPipe::new()?;
        Ok(ThreadedServer {
            config,
            threads,
            listeners: Vec::new(),
            handlers: Vec::new(),
            dgrams: Vec::new(),
            limits: Vec::new(),
            handle: Handle::new(wake.waker()),
            wake,
            stats: None,
            admission: None,
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
        let (socket, bound) = net::dgram_socket(&endpoint.to_endpoint()?)?;
        socket.set_blocking(ACCEPT_TICK)?;
        log::info!("threads engine serving datagrams on {bound}");
        self.dgrams.push(DgramBound {
            socket,
            handler: Box::new(service),
            endpoint: bound.clone(),
        });
        Ok(bound)
    }

    /// A handle that stops this server from another thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Counters so far (zero before `run`).
    pub fn stats(&self) -> Stats {
        self.stats
            .as_ref()
            .map(|s| lock(&s.stats).clone())
            .unwrap_or_default()
    }

    /// Accepts and serves until shut down, then returns what happened.
    pub fn run(&mut self) -> io::Result<Report> {
        let shared = Arc::new(Shared {
            handlers: mem::take(&mut self.handlers),
            limits: mem::take(&mut self.limits),
            conns: Mutex::new(Slab::new()),
            stats: Mutex::new(Stats::default()),
            gens: AtomicU32::new(0),
            service_timers: Mutex::new(Timers::new()),
            timer_wake: Condvar::new(),
            finished: AtomicBool::new(false),
            handle: self.handle.clone(),
            linger: self.config.linger,
            read_chunk: self.threads.read_chunk.max(1),
            on_panic: self.config.on_panic,
        });
        self.stats = Some(Arc::clone(&shared));
        let max_conns = self.config.effective_max_connections();
        log::info!("threads engine: at most {max_conns} connections");

        let mut selector = Selector::new(Backend::Poll)?;
        selector.register(self.wake.fd(), Interest::READ, usize::MAX)?;
        for (i, (l, _, _)) in self.listeners.iter().enumerate() {
            selector.register(l.fd(), Interest::READ, i)?;
        }
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        let started = self
            .start_datagram_threads(&shared, &mut workers)
            .and_then(|()| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name("service-timers".into())
                    .spawn(move || service_timers(&shared))
            });
        let timer_thread = match started {
            Ok(thread) => thread,
            Err(e) => {
                // The datagram threads already running see this and end.
                self.handle.stop();
                return Err(e);
            }
        };
        let mut last_stats = Instant::now();
        while self.handle.requested() < SHUTDOWN {
            if let Some(every) = self.config.stats_interval {
                if last_stats.elapsed() >= every {
                    last_stats = Instant::now();
                    log::info!("stats: {}", lock(&shared.stats));
                }
            }
            for ready in selector.select(Some(ACCEPT_TICK))? {
                if ready.key == usize::MAX {
                    self.wake.drain();
                    continue;
                }
                if let Err(e) = self.accept(ready.key, &shared, max_conns, &mut workers) {
                    // Out of descriptors, memory or threads. The listener
                    // stays readable (level-triggered), so pause instead
                    // of spinning; queued clients wait in the backlog.
                    log::warn!("accept: {e}; pausing {ACCEPT_TICK:?}");
                    lock(&shared.stats).accept_pauses += 1;
                    thread::sleep(ACCEPT_TICK);
                }
            }
            workers.retain(|w| !w.is_finished());
        }
        let report = self.shut_down(&shared, &mut selector, workers);
        shared.finished.store(true, Ordering::SeqCst);
        shared.timer_wake.notify_all();
        let _ = timer_thread.join();
        Ok(report)
    }

    /// Gives each datagram socket its thread.
    fn start_datagram_threads(
        &mut self,
        shared: &Arc<Shared>,
        workers: &mut Vec<JoinHandle<()>>,
    ) -> io::Result<()> {
        for (i, bound) in mem::take(&mut self.dgrams).into_iter().enumerate() {
            let shared = Arc::clone(shared);
            workers.push(
                thread::Builder::new()
                    .name(format!("dgram-{i}"))
                    .stack_size(self.threads.stack_size)
                    .spawn(move || serve_datagrams(&shared, bound))?,
            );
        }
        Ok(())
    }

    fn accept(
        &self,
        index: usize,
        shared: &Arc<Shared>,
        max_conns: usize,
        workers: &mut Vec<JoinHandle<()>>,
    ) -> io::Result<()> {
        let (listener, service, _) = &self.listeners[index];
        loop {
            let (stream, peer) = match accept(listener) {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    lock(&shared.stats).accept_errors += 1;
                    return Err(e);
                }
            };
            if lock(&shared.stats).active as usize >= max_conns {
                lock(&shared.stats).rejected_limit += 1;
                let _ = stream.send_all(b"error: server full, try again later\r\n");
                continue;
            }
            if self.admission.as_ref().is_some_and(|admit| !admit(&peer)) {
                lock(&shared.stats).rejected_admission += 1;
                continue;
            }
            let limits = &shared.limits[*service];
            let sock = stream.sock();
            sock.set_nonblocking(false)?;
            sock.set_write_timeout(limits.write_timeout)?;
            if let (StdStream::Tcp(_), true) = (&stream, self.config.nodelay) {
                let _ = sock.set_nodelay(true);
            }
            let io = Arc::new(PeerIo::new(stream));
            let gen = shared.next_gen();
            let index = lock(&shared.conns).insert(Peer {
                gen,
                service: *service,
                io: Arc::clone(&io),
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
                let service = *service;
                thread::Builder::new()
                    .name(format!("conn-{index}"))
                    .stack_size(self.threads.stack_size)
                    .spawn(move || serve(&shared, id, service, &io, peer))
            };
            match worker {
                Ok(w) => workers.push(w),
                Err(e) => {
                    // No thread, no connection: undo and tell the caller.
                    lock(&shared.conns).remove(index);
                    let mut stats = lock(&shared.stats);
                    stats.active -= 1;
                    stats.accepted -= 1;
                    return Err(e);
                }
            }
        }
    }

    /// Stop accepting; let connections finish within the grace period;
    /// then shut down the sockets that are left and join every thread.
    fn shut_down(
        &mut self,
        shared: &Shared,
        selector: &mut Selector,
        workers: Vec<JoinHandle<()>>,
    ) -> Report {
        for (l, _, _) in self.listeners.drain(..) {
            // Dropping the listener removes its socket file, if any.
            let _ = selector.unregister(l.fd());
        }
        let now = Instant::now();
        log::info!(
            "shutting down: no new connections; open ones get {:?}",
            self.config.grace
        );
        for s in 0..shared.handlers.len() {
            run_callback(&Origin::service(shared, s), None, now, |h, cx| {
                h.shutdown(cx)
            });
        }
        let deadline = crate::timer::deadline(now, self.config.grace);
        let mut report = Report::default();
        while !lock(&shared.conns).is_empty() && self.handle.requested() < STOP {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = selector.select(Some(left.min(Duration::from_millis(20))));
            self.wake.drain();
        }
        for (_, p) in lock(&shared.conns).iter() {
            report.cut_off += 1;
            p.io.dead.store(true, Ordering::SeqCst);
            p.io.stream.shutdown(Shutdown::Both);
        }
        for w in workers {
            let _ = w.join();
        }
        report.stats = lock(&shared.stats).clone();
        log::info!("stopped: {}", report.stats);
        report
    }
}

/// A datagram socket and the service behind it, until `run` gives them a
/// thread.
struct DgramBound {
    socket: DgramSocket,
    handler: Box<dyn DatagramService + Send>,
    endpoint: Endpoint,
}

/// A datagram socket's thread: serves what arrives until shutdown begins
/// (datagrams have nothing to finish, so it stops at once). Reads time out
/// every [`ACCEPT_TICK`] to look for the shutdown.
fn serve_datagrams(shared: &Shared, mut bound: DgramBound) {
    let mut buf = vec![0; MAX_DATAGRAM + 1];
    while shared.handle.requested() < SHUTDOWN {
        let (n, from) = match bound.socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) => {
                // The read timed out (time to look for the shutdown) or a
                // signal came; or an ICMP error for an earlier reply
                // (ECONNREFUSED and the like) was reported on this read,
                // and is used up now. Either way, read again.
                use io::ErrorKind::{Interrupted, TimedOut, WouldBlock};
                if !matches!(e.kind(), WouldBlock | TimedOut | Interrupted) {
                    log::debug!("{}: {e}", bound.endpoint);
                }
                continue;
            }
        };
        let mut counted = Stats::default();
        let mut stop = false;
        let served = dgram::serve(
            &mut *bound.handler,
            &bound.socket,
            &mut counted,
            Instant::now(),
            &mut stop,
            &from,
            &buf[..n],
        );
        if let Err(message) = served {
            log::error!(
                "a datagram callback on {} panicked: {message}",
                bound.endpoint
            );
            counted.panics += 1;
            stop |= shared.on_panic == PanicPolicy::Shutdown;
        }
        lock(&shared.stats).absorb(&counted);
        if stop {
            shared.handle.shutdown();
        }
    }
    // Dropping `bound` removes its socket file, if any.
}

/// Whom a callback is about: a connection, or (`me` NONE) a service.
#[derive(Clone, Copy)]
struct Origin<'a> {
    shared: &'a Shared,
    me: ConnId,
    service: usize,
    peer: Option<&'a PeerAddr>,
    /// The current connection's queue (None for service callbacks).
    io: Option<&'a PeerIo>,
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

/// Runs one callback under the service lock, then sends what it produced.
fn run_callback(
    at: &Origin<'_>,
    conn: Option<&mut ConnState>,
    now: Instant,
    f: impl FnOnce(&mut dyn Handler, &mut Context<'_>),
) {
    let Origin {
        shared,
        me,
        service,
        io,
        ..
    } = *at;
    let mut out = Outbox::new();
    let (mut no_close, mut no_pause, mut no_idle) = (None, false, None);
    {
        let (close, paused, idle, timers) = match conn {
            Some(c) => (
                &mut c.close,
                &mut c.paused,
                &mut c.idle,
                Some(&mut c.timers),
            ),
            None => (&mut no_close, &mut no_pause, &mut no_idle, None),
        };
        let mut driver = ThreadDriver {
            at: *at,
            now,
            out: &mut out,
            close,
            paused,
            idle,
            timers,
        };
        let mut handler = lock(&shared.handlers[service]);
        let mark = io.map_or(0, |io| lock(&io.queued).len());
        if let Err(message) =
            contain(|| f(&mut **handler, &mut Context::new(&mut driver, me, service)))
        {
            log::error!("a service callback for {me} panicked: {message}");
            // Drop what the failed callback wrote to its own connection.
            if let Some(io) = io {
                lock(&io.queued).truncate(mark);
            }
            lock(&shared.stats).panics += 1;
            if me != ConnId::NONE {
                driver
                    .close
                    .get_or_insert((CloseMode::Abort, CloseReason::Panic));
            }
            if shared.on_panic == PanicPolicy::Shutdown {
                shared.handle.shutdown();
            }
        }
    }
    // The lock is released: now the I/O, in the order it was queued.
    let mut sent = io.map_or(0, PeerIo::flush);
    for other in &out {
        sent += other.flush();
    }
    if sent > 0 {
        lock(&shared.stats).bytes_out += sent;
    }
}

/// A connection thread's own state.
struct ConnState {
    close: Option<(CloseMode, CloseReason)>,
    paused: bool,
    idle: Option<Duration>,
    timers: Timers<()>,
}

/// Whether a read timeout already set to `set` may stand in for `wanted`:
/// the read then wakes at most 1 % (and at least 1 ms) early or late. Early
/// is harmless (the loop goes round); late by that much is within what a
/// timer promises.
fn close_enough(set: Option<Duration>, wanted: Option<Duration>) -> bool {
    match (set, wanted) {
        (None, None) => true,
        (Some(set), Some(wanted)) => {
            let slack = (wanted / 100).max(Duration::from_millis(1));
            set.abs_diff(wanted) <= slack
        }
        _ => false,
    }
}

/// The life of one connection, on its own thread.
fn serve(shared: &Shared, me: ConnId, service: usize, io: &PeerIo, peer: PeerAddr) {
    let at = Origin {
        shared,
        me,
        service,
        peer: Some(&peer),
        io: Some(io),
    };
    let mut st = ConnState {
        close: None,
        paused: false,
        idle: shared.limits[service].idle_timeout,
        timers: Timers::new(),
    };
    let mut key = 0;
    run_callback(&at, Some(&mut st), Instant::now(), |h, cx| {
        key = h.connect(cx)
    });
    let max_input = shared.limits[service].max_input;
    let mut buf = vec![0u8; shared.read_chunk];
    let mut input: Vec<u8> = Vec::new();
    let mut last_active = Instant::now();
    let mut eof = false;
    // What SO_RCVTIMEO is set to, once it has been: a request/response
    // peer moves its idle deadline forward by about the same amount each
    // round, so the system call is rarely needed.
    let mut read_timeout: Option<Option<Duration>> = None;
    while st.close.is_none() {
        if io.dead.load(Ordering::SeqCst) {
            let request = lock(&io.close_request).take();
            st.close = Some(request.unwrap_or((CloseMode::Abort, CloseReason::WriteTimeout)));
            break;
        }
        let now = Instant::now();
        if let Some((timer, ())) = st.timers.pop_expired(now) {
            run_callback(&at, Some(&mut st), now, |h, cx| h.timer(cx, key, timer));
            continue;
        }
        let idle_at = st.idle.map(|d| crate::timer::deadline(last_active, d));
        if idle_at.is_some_and(|at| at <= now) {
            st.close = Some((CloseMode::Flush, CloseReason::IdleTimeout));
            break;
        }
        let wake_at = match (idle_at, st.timers.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if st.paused || eof {
            // Nothing to read: wait for a timer (or a close from another
            // connection, checked on the next round).
            let nap = wake_at.map_or(ACCEPT_TICK, |t| t.saturating_duration_since(now));
            thread::sleep(nap.min(ACCEPT_TICK));
            if let Some(request) = lock(&io.close_request).take() {
                st.close = Some(request);
            }
            continue;
        }
        // The next deadline is the read's timeout (never zero: that would
        // mean "no timeout").
        let timeout = wake_at.map(|t| {
            t.saturating_duration_since(now)
                .max(Duration::from_millis(1))
        });
        if !read_timeout.is_some_and(|set| close_enough(set, timeout)) {
            if let Err(e) = io.stream.set_read_timeout(timeout) {
                st.close = Some((CloseMode::Abort, CloseReason::Error(e.kind())));
                break;
            }
            read_timeout = Some(timeout);
        }
        let n = match io.stream.read(&mut buf) {
            Ok(0) => {
                if let Some(request) = lock(&io.close_request).take() {
                    st.close = Some(request);
                    break;
                }
                eof = true;
                run_callback(&at, Some(&mut st), Instant::now(), |h, cx| h.eof(cx, key));
                continue;
            }
            Ok(n) => n,
            // The read timed out: a timer or the idle limit is due.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let request = lock(&io.close_request).take();
                st.close =
                    Some(request.unwrap_or((CloseMode::Abort, CloseReason::Error(e.kind()))));
                break;
            }
        };
        last_active = Instant::now();
        lock(&shared.stats).bytes_in += n as u64;
        // Same rule as the loop: unconsumed bytes are shown again first.
        input.extend_from_slice(&buf[..n]);
        let mut view = Input::new(&input);
        run_callback(&at, Some(&mut st), last_active, |h, cx| {
            h.data(cx, key, &mut view)
        });
        let consumed = view.consumed();
        input.drain(..consumed);
        if input.len() > max_input {
            st.close = Some((CloseMode::Abort, CloseReason::InputLimit));
        }
    }
    let (mode, why) = st
        .close
        .take()
        .unwrap_or((CloseMode::Flush, CloseReason::Closed));
    st.close = Some((mode, why));
    run_callback(&at, Some(&mut st), Instant::now(), |h, cx| {
        h.close(cx, key, why)
    });
    finish(shared, me, io, mode, why, eof);
}

/// Closes the socket (gracefully unless aborted) and forgets the
/// connection.
fn finish(shared: &Shared, me: ConnId, io: &PeerIo, mode: CloseMode, why: CloseReason, eof: bool) {
    io.dead.store(true, Ordering::SeqCst);
    if mode == CloseMode::Abort {
        let _ = io.stream.sock().set_linger(Some(Duration::ZERO));
    } else if !eof {
        // Our FIN, then read until theirs (bounded), so unread input does
        // not turn the close into a reset.
        io.stream.shutdown(Shutdown::Write);
        let end = crate::timer::deadline(Instant::now(), shared.linger);
        let mut sink = [0u8; 1024];
        while let Some(left) = end
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            if io.stream.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match io.stream.read(&mut sink) {
                Ok(n) if n > 0 => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
    }
    lock(&shared.conns).remove(me.index());
    let mut stats = lock(&shared.stats);
    stats.closed += 1;
    stats.active -= 1;
    match why {
        CloseReason::IdleTimeout => stats.idle_timeouts += 1,
        CloseReason::WriteTimeout => stats.write_timeouts += 1,
        CloseReason::InputLimit => stats.input_limit_closes += 1,
        CloseReason::OutputLimit => stats.output_limit_closes += 1,
        CloseReason::Error(_) => stats.io_errors += 1,
        _ => {}
    }
}

/// The thread that fires service timers.
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
        let wait = timers
            .next_deadline()
            .map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(now)
            });
        timers = shared
            .timer_wake
            .wait_timeout(timers, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
