//! The event loop: one thread, one poller, a slab of connections.
//!
//! One turn ([`Server::run_once`]) is: wait for readiness (or a timer, or
//! zero time if something is still ready), handle each event (reads before
//! writes), serve the still-ready list, fire due timers, then flush output
//! others queued and carry out the closes requested during the turn.
//! [`Server::run`] repeats turns until the server has shut down.

use std::fmt;
use std::io;
use std::mem;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::admit::{Refusal, REFUSED_LINGERING};
use super::core::{
    conn_id, Core, TimerKind, ABORT, BACKPRESSURED, CLOSE_DEADLINE, CLOSING, CONNECTED, EOF,
    LINGER, PAUSED, READY, REDELIVER, REFUSED, STALL_ARMED, WRITE_AGAIN,
};
use super::dgram;
use super::mio::MioPoller;
use super::select::FacadePoller;
use super::signals::SignalPipe;
use super::Engine;
use super::{
    contain, panic_message, Admission, Event, Handler, Hosted, Interest, LogEvery, Poller, Waker,
    ACCEPT_LOG_EVERY, DGRAM_BIT, LISTENER_BIT, SIGNAL_TOKEN, WAKE_TOKEN,
};
use crate::buffer::Input;
use crate::config::{
    Config, Limits, DATAGRAMS_PER_WAKEUP, FD_RESERVE, MAX_DATAGRAM, READ_CHUNK, READ_CHUNK_ALONE,
};
use crate::net::{self, DgramSocket, Endpoint, Stream, StreamListener, ToEndpoint};
use crate::select::{Backend, FD_SETSIZE};
use crate::service::{CloseMode, CloseReason, ConnId, Context, DatagramService, PeerAddr, Service};
use crate::stats::Stats;

/// After descriptors or memory ran out, accepting is retried after this
/// long, or as soon as a connection closes, whichever comes first.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

// Values of `Shared::request`.
const RUNNING: u8 = 0;
pub(crate) const SHUTDOWN: u8 = 1;
pub(crate) const STOP: u8 = 2;

struct Shared {
    request: AtomicU8,
    waker: Waker,
}

/// Stops a [`Server`] from another thread. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("request", &self.shared.request.load(Ordering::Relaxed))
            .finish()
    }
}

impl Handle {
    pub(crate) fn new(waker: Waker) -> Handle {
        Handle {
            shared: Arc::new(Shared {
                request: AtomicU8::new(RUNNING),
                waker,
            }),
        }
    }

    /// 0 running, 1 shutdown requested, 2 stop requested.
    pub(crate) fn requested(&self) -> u8 {
        self.shared.request.load(Ordering::SeqCst)
    }

    /// Starts a graceful shutdown: stop accepting, let open connections
    /// finish within the grace period, then close what is left.
    pub fn shutdown(&self) {
        self.request(SHUTDOWN);
    }

    /// Stops now: every connection is closed on the next turn.
    pub fn stop(&self) {
        self.request(STOP);
    }

    fn request(&self, what: u8) {
        self.shared.request.fetch_max(what, Ordering::SeqCst);
        if let Err(e) = (self.shared.waker)() {
            log::error!("cannot wake the event loop: {e}");
        }
    }
}

/// What a finished server did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Counters and gauges at the end.
    pub stats: Stats,
    /// Connections still open when the grace period ended.
    pub cut_off: u64,
    /// Of those, connections closed with output the peer never got.
    pub dropped: u64,
    /// The bytes they did not get.
    pub dropped_bytes: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connections cut off at shutdown, {} with {} unsent bytes; {}",
            self.cut_off, self.dropped, self.dropped_bytes, self.stats
        )
    }
}

/// Bytes held in connection buffers (see [`Server::buffered`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffered {
    /// Unconsumed input held for services, all connections.
    pub input: usize,
    /// Output waiting for the kernel, all connections.
    pub output: usize,
    /// Heap bytes behind both, including what holds them (a connection
    /// with nothing held has nothing on the heap).
    pub capacity: usize,
}

/// One listener and the service behind it.
struct Bound {
    /// `None` once shutdown began.
    listener: Option<StreamListener>,
    handler: Box<dyn Handler>,
    /// The service's short name, for log lines and the trace.
    name: &'static str,
    endpoint: Endpoint,
    /// Accepting is paused for lack of descriptors or memory.
    paused: bool,
    /// On the still-ready list.
    ready: bool,
}

/// A datagram socket and the service behind it.
struct DgramBound {
    /// `None` once shutdown began.
    socket: Option<DgramSocket>,
    handler: Box<dyn DatagramService>,
    endpoint: Endpoint,
    /// How often each source may be answered.
    replies: dgram::Replies,
    ready: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    Draining { deadline: Instant },
    Done,
}

/// A single-threaded server: any number of listeners, each with its own
/// [`Service`], on one event loop.
///
/// ```no_run
/// use muxserve::{services::Echo, Server};
///
/// let mut server = Server::new()?;
/// let addr = server.bind("127.0.0.1:7007", Echo)?;
/// println!("try: {}", addr.how_to_connect());
/// server.run()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Server {
    poller: Box<dyn Poller>,
    events: Vec<Event>,
    services: Vec<Bound>,
    dgrams: Vec<DgramBound>,
    /// What every datagram socket checks before it answers.
    guard: dgram::Guard,
    core: Core,
    /// The loop-wide read buffer; connections keep only leftovers.
    scratch: Box<[u8]>,
    handle: Handle,
    config: Config,
    max_conns: usize,
    state: State,
    report: Report,
    accept_retry_armed: bool,
    accept_log: LogEvery,
    register_log: LogEvery,
    admission: Option<Admission>,
    /// Set by [`Server::stop_on_signals`].
    signals: Option<SignalPipe>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.services.len())
            .field("datagram_sockets", &self.dgrams.len())
            .field("connections", &self.core.conns.len())
            .field("state", &self.state)
            .finish()
    }
}

impl Server {
    /// A server on the mio engine with the default [`Config`].
    pub fn new() -> io::Result<Server> {
        Server::with_config(Config::default())
    }

    /// A server on the mio engine.
    pub fn with_config(config: Config) -> io::Result<Server> {
        Server::with_engine(Engine::Mio, config)
    }

    /// A server on a loop engine: `Mio`, `Poll` or `Select` (the `Threads`
    /// engine is [`ThreadedServer`](super::ThreadedServer)).
    pub fn with_engine(engine: Engine, config: Config) -> io::Result<Server> {
        let poller: Box<dyn Poller> = match engine {
            Engine::Mio => Box::new(MioPoller::new()?),
            Engine::Poll => Box::new(FacadePoller::new(Backend::Poll)?),
            Engine::Select => Box::new(FacadePoller::new(Backend::Select)?),
            Engine::Threads => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the threads engine is ThreadedServer, not Server",
                ))
            }
        };
        let mut max_conns = config.effective_max_connections();
        if engine == Engine::Select {
            // Every descriptor must stay below FD_SETSIZE: keep room for
            // listeners, the waker and refused clients that linger.
            max_conns =
                max_conns.min(FD_SETSIZE - config.fd_reserve.max(FD_RESERVE) - REFUSED_LINGERING);
        }
        Ok(Server::with_poller(poller, config, max_conns))
    }

    fn with_poller(poller: Box<dyn Poller>, config: Config, max_conns: usize) -> Server {
        let handle = Handle::new(poller.waker());
        let mut core = Core::new();
        core.sources = super::admit::Sources::new(config.max_per_source);
        core.on_panic = config.on_panic;
        core.level = poller.level_triggered();
        if let Some(every) = config.stats_interval {
            let at = crate::timer::deadline(core.now, every);
            core.timers.insert(at, Some(every), TimerKind::Stats);
        }
        Server {
            poller,
            events: Vec::with_capacity(1024),
            services: Vec::new(),
            dgrams: Vec::new(),
            guard: dgram::Guard::new(config.reply_budget_total),
            core,
            // One byte more than the largest datagram, to tell a datagram
            // that fits from one the kernel cut.
            scratch: vec![0; READ_CHUNK.max(MAX_DATAGRAM) + 1].into_boxed_slice(),
            handle,
            config,
            max_conns,
            state: State::Running,
            report: Report::default(),
            accept_retry_armed: false,
            accept_log: LogEvery::default(),
            register_log: LogEvery::default(),
            admission: None,
            signals: None,
        }
    }

    /// Makes SIGINT and SIGTERM stop this server: the first starts a
    /// graceful shutdown ([`Handle::shutdown`]), a second stops at once.
    /// SIGHUP stops gracefully too (there is nothing to reload), SIGQUIT
    /// stops at once; both with the same cleanup and report.
    ///
    /// The signals are watched by the loop itself, through a self-pipe, not
    /// by a thread: a second thread in the process would make every socket
    /// call in the C library slower (see `engine/signals.rs`). When the
    /// last server watching them is dropped, the two signals terminate the
    /// process again, as they do by default.
    pub fn stop_on_signals(&mut self) -> io::Result<()> {
        if self.signals.is_some() {
            return Ok(());
        }
        let pipe = SignalPipe::new()?;
        self.poller
            .register(pipe.fd(), SIGNAL_TOKEN, Interest::Read)?;
        self.signals = Some(pipe);
        Ok(())
    }

    /// Listens on a stream `endpoint` (see [`Endpoint`]'s syntax, e.g.
    /// `127.0.0.1:0`, `[::1]:7007` or `unix:///tmp/echo.sock`) and serves
    /// every connection with `service`. Returns where it really listens
    /// (the port the kernel chose for port 0).
    pub fn bind<S: Service + 'static>(
        &mut self,
        endpoint: impl ToEndpoint,
        service: S,
    ) -> io::Result<Endpoint> {
        let limits = self.config.limits.clone();
        self.bind_with(endpoint.to_endpoint()?, service, limits)
    }

    /// Serves datagrams arriving on `endpoint` (`udp://HOST:PORT` or
    /// `unix-dgram:///PATH`) with `service`.
    pub fn bind_datagram<S: DatagramService + 'static>(
        &mut self,
        endpoint: impl ToEndpoint,
        service: S,
    ) -> io::Result<Endpoint> {
        let endpoint = endpoint.to_endpoint()?;
        let (socket, bound) = net::dgram_socket(&endpoint)?;
        let index = self.dgrams.len();
        self.poller
            .register(socket.fd(), DGRAM_BIT | index, Interest::Read)?;
        log::info!("{} serving datagrams on {bound}", service_name::<S>());
        self.guard.bound(&bound);
        self.dgrams.push(DgramBound {
            socket: Some(socket),
            replies: dgram::Replies::new(service.reply_budget(self.config.reply_budget)),
            handler: Box::new(service),
            endpoint: bound.clone(),
            ready: false,
        });
        Ok(bound)
    }

    /// Like [`bind`](Server::bind), with limits of its own for this listener.
    pub fn bind_with<S: Service + 'static>(
        &mut self,
        endpoint: Endpoint,
        service: S,
        limits: Limits,
    ) -> io::Result<Endpoint> {
        let (listener, bound) =
            net::stream_listener(&endpoint, self.config.backlog, limits.send_buffer)?;
        let listener = listener.into_mio();
        let index = self.services.len();
        self.poller
            .register(listener.fd(), LISTENER_BIT | index, Interest::Read)?;
        log::info!("{} listening on {bound}", service_name::<S>());
        self.guard.bound(&bound);
        self.services.push(Bound {
            listener: Some(listener),
            handler: Box::new(Hosted::new(service)),
            name: service_name::<S>(),
            endpoint: bound.clone(),
            paused: false,
            ready: false,
        });
        self.core.limits.push(limits);
        Ok(bound)
    }

    /// Decides, for each accepted connection, whether to serve it (like
    /// Python's `socketserver.verify_request`). A refused peer is closed at
    /// once and counted in `rejected_admission`.
    pub fn set_admission(&mut self, admit: impl Fn(&PeerAddr) -> bool + Send + Sync + 'static) {
        self.admission = Some(Arc::new(admit));
    }

    /// The configuration this server runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A handle that stops this server from another thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Counters and gauges so far.
    pub fn stats(&self) -> Stats {
        self.core.stats.clone()
    }

    /// The connection limit in force (`max_connections` after clamping to
    /// the descriptor limit).
    pub fn max_connections(&self) -> usize {
        self.max_conns
    }

    /// Bytes held in connection buffers now: how much memory clients are
    /// making the server keep.
    pub fn buffered(&self) -> Buffered {
        let mut b = Buffered::default();
        for (_, c) in &self.core.conns {
            if let Some(h) = &c.held {
                b.input += h.input.len();
                b.output += h.output.len();
                b.capacity += mem::size_of_val(&**h) + h.input.capacity() + h.output.capacity();
            }
        }
        b
    }

    /// Open connections (including ones lingering after a close).
    pub fn connections(&self) -> usize {
        self.core.conns.len()
    }

    /// True once the server has shut down and [`run`](Server::run) would
    /// return.
    pub fn is_finished(&self) -> bool {
        self.state == State::Done
    }

    /// Runs turns until the server shuts down (through a [`Handle`] or
    /// [`Context::stop_server`]), then returns what happened.
    pub fn run(&mut self) -> io::Result<Report> {
        log::info!("at most {} connections", self.max_conns);
        while !self.is_finished() {
            self.run_once(None)?;
        }
        Ok(self.report())
    }

    /// The report so far (complete once [`is_finished`](Server::is_finished)).
    pub fn report(&self) -> Report {
        let mut report = self.report.clone();
        report.stats = self.stats();
        report
    }

    /// One turn of the loop, waiting at most `timeout` (`None`: until
    /// something happens) for readiness.
    ///
    /// Only a failure of the poller itself is an error; a failing
    /// connection closes only itself.
    pub fn run_once(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.check_requests();
        if self.state == State::Done {
            return Ok(());
        }
        let timeout = self.poll_timeout(timeout);
        self.events.clear();
        self.core.tracing = log::log_enabled!(target: super::TRACE_TARGET, log::Level::Trace);
        let waited_from = self.core.tracing.then(Instant::now);
        match self.poller.poll(&mut self.events, timeout) {
            Ok(()) => {}
            // A signal arrived while we waited; nothing was lost. Take the
            // turn without events (timers and requests still run).
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                trace!(self.core.tracing, "the wait was interrupted by a signal");
            }
            Err(e) => return Err(e),
        }
        self.core.set_now(Instant::now());
        self.core.stats.turns += 1;
        if let Some(from) = waited_from {
            trace!(
                true,
                "turn {}: {} ready after waiting {:.1?} ({})",
                self.core.stats.turns,
                self.events.len(),
                self.core.now.saturating_duration_since(from),
                match timeout {
                    Some(t) => format!("timeout {t:.1?}"),
                    None => "no timeout".to_string(),
                }
            );
        }
        self.each_contained(self.events.len(), |server, i| {
            let event = server.events[i];
            server.dispatch(event);
        });
        self.serve_ready();
        self.fire_timers();
        self.end_of_turn();
        self.check_requests();
        Ok(())
    }

    fn poll_timeout(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        if !self.core.ready.is_empty() {
            // Something may still be ready: look for news, but do not wait.
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut deadline = self.core.timers.next_deadline();
        if let State::Draining { deadline: d } = self.state {
            deadline = Some(deadline.map_or(d, |t| t.min(d)));
        }
        let until = deadline.map(|d| d.saturating_duration_since(now));
        match (timeout, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn dispatch(&mut self, event: Event) {
        match event.token {
            // The handle set a request; `check_requests` reads it.
            WAKE_TOKEN => trace!(self.core.tracing, "  waker: a request from a Handle"),
            SIGNAL_TOKEN => {
                trace!(self.core.tracing, "  signal pipe readable");
                if let Some(pipe) = &mut self.signals {
                    pipe.take(&self.handle);
                }
            }
            t if t & LISTENER_BIT != 0 => {
                let s = t & !LISTENER_BIT;
                trace!(
                    self.core.tracing,
                    "  {} listener on {} readable: connections to accept",
                    self.services[s].name,
                    self.services[s].endpoint
                );
                self.accept(s)
            }
            t if t & DGRAM_BIT != 0 => {
                let d = t & !DGRAM_BIT;
                trace!(
                    self.core.tracing,
                    "  datagram socket {} readable",
                    self.dgrams[d].endpoint
                );
                self.receive(d)
            }
            t => {
                let id = conn_id(t);
                trace!(
                    self.core.tracing,
                    "  {id} {}{}{}",
                    if event.readable { "readable" } else { "" },
                    if event.writable { " writable" } else { "" },
                    if event.read_closed {
                        " (peer closed or erred)"
                    } else {
                        ""
                    }
                );
                if event.readable {
                    self.read(id, event.read_closed);
                }
                if event.writable {
                    self.core.flush(id, &mut *self.poller);
                }
            }
        }
    }

    /// Serves the sources a budget or a resume left on the still-ready list.
    fn serve_ready(&mut self) {
        if self.core.ready.is_empty() {
            return;
        }
        let ready = mem::take(&mut self.core.ready);
        trace!(
            self.core.tracing,
            "  {} still ready from an earlier turn",
            ready.len()
        );
        self.each_contained(ready.len(), |server, i| server.serve_one(ready[i]));
    }

    /// Runs `step(self, i)` for `i` in `0..count`, containing panics in the
    /// service callbacks it makes without a guard of their own (the data
    /// callback on the read path; see [`Server::read`]).
    ///
    /// One `catch_unwind` per batch instead of one per request: the guard
    /// cost 47 of 420 instructions per echoed request (callgrind). A panic
    /// unwinds to here; the connection it was about is closed (as a
    /// per-callback guard would), and the batch goes on with the next step,
    /// so no event of it is lost.
    fn each_contained(&mut self, count: usize, mut step: impl FnMut(&mut Server, usize)) {
        let mut next = 0;
        while next < count {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while next < count {
                    let i = next;
                    next += 1;
                    step(self, i);
                }
            }));
            if let Err(payload) = outcome {
                let id = self.core.leave();
                if id == ConnId::NONE {
                    // Not a service callback: a bug in the engine itself.
                    // Hiding it would leave the loop in an unknown state.
                    std::panic::resume_unwind(payload);
                }
                self.core.panicked(id, &panic_message(&*payload));
            }
        }
    }

    /// Serves one entry of the still-ready list.
    fn serve_one(&mut self, t: usize) {
        if t & LISTENER_BIT != 0 {
            let s = t & !LISTENER_BIT;
            self.services[s].ready = false;
            self.accept(s);
        } else if t & DGRAM_BIT != 0 {
            let d = t & !DGRAM_BIT;
            self.dgrams[d].ready = false;
            self.receive(d);
        } else {
            let id = conn_id(t);
            if let Some(c) = self.core.get_mut(id) {
                let flags = c.flags;
                c.flags &= !(READY | WRITE_AGAIN);
                if flags & WRITE_AGAIN != 0 {
                    self.core.flush(id, &mut *self.poller);
                }
                if flags & READY != 0 {
                    // No fresh event vouches for a short read here
                    // (input or a FIN may have come while we were not
                    // reading): drain to WouldBlock.
                    self.read(id, true);
                }
            }
        }
    }

    fn listener_ready(&mut self, s: usize) {
        if !self.services[s].ready {
            self.services[s].ready = true;
            self.core.ready.push(LISTENER_BIT | s);
        }
    }

    // ---- accepting ----------------------------------------------------

    fn accept(&mut self, s: usize) {
        for _ in 0..self.config.accepts_per_wakeup {
            let bound = &self.services[s];
            let Some(listener) = &bound.listener else {
                return;
            };
            if bound.paused {
                return;
            }
            match listener.accept(self.config.nodelay) {
                Ok((stream, peer)) => self.admit(s, stream, peer),
                // The queue is empty; the next connection is a new edge.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    if !self.accept_failed(s, &e) {
                        return;
                    }
                }
            }
        }
        // Budget spent: other sources get a turn, then we come back.
        self.listener_ready(s);
    }

    /// Handles a failed accept; returns whether to accept again at once.
    fn accept_failed(&mut self, s: usize, e: &io::Error) -> bool {
        if e.kind() == io::ErrorKind::Interrupted {
            return true;
        }
        self.core.stats.accept_errors += 1;
        if self.accept_log.due(Instant::now(), ACCEPT_LOG_EVERY) {
            log::warn!("accept on {}: {e}", self.services[s].endpoint);
        }
        match e.raw_os_error() {
            // That one connection died in the queue (or a firewall refused
            // it); the ones behind it are fine.
            Some(libc::ECONNABORTED | libc::EPERM | libc::EPROTO) => {
                self.core.stats.accept_aborted += 1;
                true
            }
            // Out of descriptors or memory. Stop accepting rather than spin
            // on an edge that stays set; retry when a connection closes or
            // after ACCEPT_RETRY. Queued clients wait in the backlog.
            kind => {
                match kind {
                    Some(libc::EMFILE | libc::ENFILE) => self.core.stats.accept_no_fds += 1,
                    Some(libc::ENOBUFS | libc::ENOMEM) => self.core.stats.accept_no_memory += 1,
                    _ => {}
                }
                self.services[s].paused = true;
                self.core.stats.accept_pauses += 1;
                if let Some(listener) = &self.services[s].listener {
                    // A level-triggered poller would report the listener,
                    // still readable, on every wait until accepting resumes.
                    let _ = self.poller.deregister(listener.fd());
                }
                if !self.accept_retry_armed {
                    self.accept_retry_armed = true;
                    let at = self.core.now + ACCEPT_RETRY;
                    self.core.timers.insert(at, None, TimerKind::AcceptRetry);
                }
                false
            }
        }
    }

    fn resume_accepting(&mut self) {
        for s in 0..self.services.len() {
            if self.services[s].paused {
                self.services[s].paused = false;
                if let Some(listener) = &self.services[s].listener {
                    let fd = listener.fd();
                    if let Err(e) = self.poller.register(fd, LISTENER_BIT | s, Interest::Read) {
                        log::warn!("cannot watch {} again: {e}", self.services[s].endpoint);
                    }
                }
                self.listener_ready(s);
            }
        }
    }

    fn admit(&mut self, s: usize, stream: Stream, peer: PeerAddr) {
        let core = &mut self.core;
        let held = core.held();
        if let Err(why) = core
            .sources
            .admit(held, self.max_conns, self.admission.as_ref(), &peer)
        {
            return self.refuse(s, stream, peer, why);
        }
        let id = match core.insert(&mut *self.poller, stream, s, peer, 0) {
            Ok(id) => id,
            Err((stream, peer, e)) => {
                // The select engine past FD_SETSIZE, or the kernel out of
                // memory: as good as full.
                core.sources.release(&peer);
                self.register_failed(&peer, &e);
                return self.refuse(s, stream, peer, Refusal::Full);
            }
        };
        trace!(
            core.tracing,
            "    accepted {id} from {}",
            core.conns[id.index()].peer
        );
        let idle = core.limits[s].idle_timeout;
        core.set_idle(id, idle);
        core.stats.accepted += 1;
        core.stats.active += 1;
        core.stats.peak = core.stats.peak.max(core.stats.active);

        core.enter(id, true);
        let handler = &mut self.services[s].handler;
        let mut key = 0;
        let outcome = contain(|| key = handler.connect(&mut Context::new(core, id, s)));
        core.leave();
        match outcome {
            Ok(()) => {
                if let Some(c) = core.get_mut(id) {
                    c.session = key as u32;
                    c.flags |= CONNECTED;
                }
            }
            // No session was made, so `on_close` will not be called.
            Err(message) => core.panicked(id, &message),
        }
        core.commit(id, &mut *self.poller);
    }

    /// Tells a refused client why, sends our FIN, and keeps it (without a
    /// service) until it has closed too, reading what it sends within the
    /// linger budget; see [`super::admit`].
    fn refuse(&mut self, s: usize, stream: Stream, peer: PeerAddr, why: Refusal) {
        let core = &mut self.core;
        why.count(&mut core.stats);
        trace!(core.tracing, "    refused {peer}: {why:?}");
        // Best effort: the socket is fresh, so this fits its buffer.
        let _ = stream.send(why.notice());
        stream.shutdown_write();
        if core.refused >= REFUSED_LINGERING {
            // Too many lingering already: what it sent so far is read, so
            // only input still on its way can turn this into a reset.
            let (_, n) = linger_read(&stream, &mut self.scratch[..READ_CHUNK_ALONE]);
            core.stats.linger_discarded += n as u64;
            return;
        }
        let Ok(id) = core.insert(&mut *self.poller, stream, s, peer, LINGER | REFUSED) else {
            return;
        };
        core.refused += 1;
        let at = crate::timer::deadline(core.now, self.config.linger);
        core.timers.insert(at, None, TimerKind::Linger { conn: id });
        // What it sent before it was accepted is there already.
        core.mark_ready(id);
    }

    /// Logs a connection the poller would not take, at most once per
    /// [`ACCEPT_LOG_EVERY`]: the select engine fails every one past
    /// FD_SETSIZE, and a warning per client would flood the log.
    fn register_failed(&mut self, peer: &PeerAddr, e: &io::Error) {
        if self.register_log.due(Instant::now(), ACCEPT_LOG_EVERY) {
            log::warn!("cannot watch a connection from {peer}, refused it: {e}");
        }
    }

    // ---- reading ------------------------------------------------------

    /// Reads a connection until it is drained or its budget is spent.
    ///
    /// With `drain` false, a short read is taken as "drained for now";
    /// `drain` is true when that shortcut would be wrong (the peer's FIN came
    /// with the data, or no fresh event backs the read).
    fn read(&mut self, id: ConnId, drain: bool) {
        let Server {
            core,
            services,
            poller,
            scratch,
            config,
            events,
            ..
        } = self;
        let poller = &mut **poller;
        let tick = core.tick();
        let tracing = core.tracing;
        // One ready source this turn: read in smaller pieces, so replies
        // to the first requests of a burst go out while we read the rest
        // (see `READ_CHUNK_ALONE`).
        let want = if events.len() <= 1 {
            READ_CHUNK_ALONE
        } else {
            READ_CHUNK
        };
        for _ in 0..config.reads_per_wakeup {
            let Some(c) = core.get_mut(id) else {
                return;
            };
            if c.has(LINGER | REDELIVER) {
                if c.has(LINGER) {
                    return self.linger(id);
                }
                c.flags &= !REDELIVER;
                deliver(core, services, poller, id, &[]);
                if core.held_back.get() || core.fanout > 0 {
                    return hold_back(core, id);
                }
                continue;
            }
            if !c.wants_read() {
                return;
            }
            let n = match c.stream.read(&mut scratch[..want]) {
                // The peer shut down its sending side.
                Ok(0) => {
                    trace!(tracing, "    read 0 B: the peer shut down its sending side");
                    c.flags |= EOF;
                    call(core, services, poller, id, |h, cx, key| h.eof(cx, key));
                    // Level-triggered: the socket stays readable at EOF.
                    core.sync_interest(id, poller);
                    return;
                }
                Ok(n) => n,
                // Drained: the next byte to arrive is a new edge.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    trace!(tracing, "    read: would block (drained)");
                    return;
                }
                // A signal arrived before any data was copied: try again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return core.fail(id, &e),
            };
            c.last_read = tick;
            let (s, key, leftovers) = (
                c.service as usize,
                c.session as usize,
                !c.input().is_empty(),
            );
            core.stats.bytes_in += n as u64;
            if !leftovers {
                // The common case, inlined: nothing left over, so the
                // service reads straight from the loop's buffer, and only
                // a partial frame it leaves is copied.
                let mut input = Input::new(&scratch[..n]);
                // Not guarded here: a panic unwinds to `each_contained`,
                // which closes this connection.
                trace!(tracing, "    read {n} B");
                core.enter(id, true);
                let cx = &mut Context::new(core, id, s);
                services[s].handler.data(cx, key, &mut input);
                core.leave();
                let consumed = input.consumed();
                trace!(
                    tracing,
                    "    {} consumed {consumed} of {n} B",
                    services[s].name
                );
                core.commit(id, poller);
                if consumed < n {
                    keep_input(core, id, |held| {
                        held.extend_from_slice(&scratch[consumed..n])
                    });
                }
            } else {
                trace!(tracing, "    read {n} B, after input left over earlier");
                deliver(core, services, poller, id, &scratch[..n]);
            }
            if core.held_back.get() || core.fanout > 0 {
                return hold_back(core, id);
            }
            if n < want && !drain {
                // A short read emptied the socket's queue for now. Reading
                // again would only say WouldBlock, one system call per
                // request for nothing; new data brings a new edge.
                return;
            }
        }
        // Budget spent with data maybe left: let the others have a turn.
        core.mark_ready(id);
    }

    // ---- datagrams ----------------------------------------------------

    /// Reads datagrams until the socket is drained or the budget is spent.
    fn receive(&mut self, d: usize) {
        let Server {
            dgrams,
            core,
            scratch,
            guard,
            ..
        } = self;
        let bound = &mut dgrams[d];
        let Some(socket) = &bound.socket else {
            return;
        };
        for _ in 0..DATAGRAMS_PER_WAKEUP {
            let (n, from) = match socket.recv_from(scratch) {
                Ok(got) => got,
                // Drained: the next datagram is a new edge.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error for an earlier reply (ECONNREFUSED and the
                // like), reported on this read. It is used up now; go on.
                Err(e) => {
                    log::debug!("{}: {e}", bound.endpoint);
                    continue;
                }
            };
            let handler = &mut *bound.handler;
            let (stats, stop) = (&mut core.stats, &mut core.stop_requested);
            let data = &scratch[..n];
            let at = dgram::Endpoints {
                socket,
                replies: &mut bound.replies,
                guard,
            };
            if let Err(message) = dgram::serve(handler, at, stats, core.now, stop, &from, data) {
                core.panicked(ConnId::NONE, &message);
            }
        }
        // Budget spent: others get a turn, then we come back.
        if !bound.ready {
            bound.ready = true;
            core.ready.push(DGRAM_BIT | d);
        }
    }

    // ---- timers -------------------------------------------------------

    fn fire_timers(&mut self) {
        let now = self.core.now;
        while let Some((timer, kind)) = self.core.timers.pop_expired(now) {
            trace!(self.core.tracing, "  timer fired: {kind:?}");
            match kind {
                TimerKind::User { service, conn } if conn == ConnId::NONE => {
                    let core = &mut self.core;
                    let s = service as usize;
                    let handler = &mut self.services[s].handler;
                    let outcome = contain(|| {
                        handler.service_timer(&mut Context::new(core, ConnId::NONE, s), timer)
                    });
                    if let Err(message) = outcome {
                        core.panicked(ConnId::NONE, &message);
                    }
                }
                TimerKind::User { conn, .. } => {
                    let alive = self
                        .core
                        .get(conn)
                        .is_some_and(|c| c.has(CONNECTED) && !c.has(LINGER));
                    if alive {
                        let Server {
                            core,
                            services,
                            poller,
                            ..
                        } = self;
                        call(core, services, &mut **poller, conn, |h, cx, key| {
                            h.timer(cx, key, timer)
                        });
                    } else {
                        // A repeating timer of a closed connection.
                        self.core.timers.cancel(timer);
                    }
                }
                TimerKind::IdleSweep => self.core.sweep_idle(),
                TimerKind::WriteStall { conn, after } => {
                    let Some(c) = self.core.get(conn) else {
                        continue;
                    };
                    let (pending, flags, last_write) = (c.output_len() > 0, c.flags, c.last_write);
                    let stalled = self.core.since(last_write);
                    let Some(c) = self.core.get_mut(conn) else {
                        continue;
                    };
                    c.flags &= !STALL_ARMED;
                    if !pending || flags & (ABORT | LINGER) != 0 {
                        continue;
                    }
                    if stalled >= after {
                        self.core
                            .request_close(conn, CloseMode::Abort, CloseReason::WriteTimeout);
                    } else {
                        // Progress was made: check again `after` past it.
                        c.flags |= STALL_ARMED;
                        let at = now + (after - stalled);
                        self.core
                            .timers
                            .insert(at, None, TimerKind::WriteStall { conn, after });
                    }
                }
                TimerKind::Stats => log::info!("stats: {}", self.core.stats),
                TimerKind::Linger { conn } => match self.core.get(conn) {
                    Some(c) if c.has(LINGER) => self.remove(conn),
                    Some(c) if c.has(CLOSING) => {
                        // The peer would not take the rest: drop it.
                        self.core.request_close(conn, CloseMode::Abort, c.reason);
                    }
                    _ => {}
                },
                TimerKind::AcceptRetry => {
                    self.accept_retry_armed = false;
                    self.resume_accepting();
                    // Try now, in this turn: one turn per retry while
                    // descriptors are short, not one to resume and one
                    // to fail again.
                    self.serve_ready();
                }
            }
        }
    }

    // ---- closing ------------------------------------------------------

    fn end_of_turn(&mut self) {
        loop {
            // Output other callbacks queued this turn, one send each.
            self.core.sync_requested(&mut *self.poller);
            let dirty = mem::take(&mut self.core.dirty);
            for &id in &dirty {
                if let Some(c) = self.core.get_mut(id) {
                    c.flags &= !super::core::DIRTY;
                    self.core.flush(id, &mut *self.poller);
                }
            }
            let closing = mem::take(&mut self.core.closing);
            if closing.is_empty() && self.core.dirty.is_empty() {
                self.core.closing = closing;
                break;
            }
            for &id in &closing {
                self.finalize(id, true);
            }
        }
    }

    /// Carries out a requested close once the output is sent (or at once
    /// for an abort): the service's `on_close`, then the socket.
    fn finalize(&mut self, id: ConnId, linger: bool) {
        let Some(c) = self.core.get(id) else {
            return;
        };
        if c.has(LINGER) {
            return; // already done
        }
        if !c.has(ABORT) && c.output_len() > 0 {
            // Still flushing: `after_write` brings it back when done, and a
            // deadline makes sure a peer that never reads cannot stall it.
            if !c.has(CLOSE_DEADLINE) {
                let at = crate::timer::deadline(self.core.now, self.config.linger);
                if let Some(c) = self.core.get_mut(id) {
                    c.flags |= CLOSE_DEADLINE;
                }
                self.core
                    .timers
                    .insert(at, None, TimerKind::Linger { conn: id });
            }
            // Nothing more is read while the output drains.
            self.core.sync_interest(id, &mut *self.poller);
            return;
        }
        let (s, key, why) = (c.service as usize, c.session as usize, c.reason);
        if c.has(CONNECTED) {
            let core = &mut self.core;
            let handler = &mut self.services[s].handler;
            if let Err(message) =
                contain(|| handler.close(&mut Context::new(core, id, s), key, why))
            {
                // It is closing already; nothing more to undo.
                core.panicked(ConnId::NONE, &message);
            }
        }
        self.core.stats.record_close(why);
        let tracing = self.core.tracing;
        let Some(c) = self.core.get_mut(id) else {
            return;
        };
        if c.has(ABORT) || c.has(EOF) || !linger {
            // The peer has sent everything (or we reset): a plain close.
            trace!(tracing, "  {id} closed: {why}");
            self.remove(id);
        } else {
            trace!(
                tracing,
                "  {id} closing ({why}): FIN sent; reading until the peer's FIN"
            );
            // Our FIN goes now; we keep reading until the peer's FIN so that
            // unread input cannot turn our close into a reset.
            c.stream.shutdown_write();
            c.flags |= LINGER;
            drop(c.take_input());
            c.release();
            let at = crate::timer::deadline(self.core.now, self.config.linger);
            self.core
                .timers
                .insert(at, None, TimerKind::Linger { conn: id });
            self.core.sync_interest(id, &mut *self.poller);
            self.core.mark_ready(id);
        }
    }

    /// One turn's reading of a lingering connection: at most one
    /// [`READ_CHUNK_ALONE`], thrown away; past `linger_bytes` in all the
    /// connection is reset, so a peer flooding a connection we closed
    /// costs other clients one small read a turn, for a bounded time.
    fn linger(&mut self, id: ConnId) {
        let turn = self.core.stats.turns as u32;
        let Some(c) = self.core.get_mut(id) else {
            return;
        };
        // While lingering, `last_read` holds the turn of the last read: an
        // event and the still-ready list may both bring it up in one turn.
        if c.last_read == turn {
            return self.core.mark_ready(id);
        }
        c.last_read = turn;
        let (found, n) = linger_read(&c.stream, &mut self.scratch[..READ_CHUNK_ALONE]);
        c.lingered = c.lingered.saturating_add(n as u32);
        let flooded = c.lingered as usize > self.config.linger_bytes;
        self.core.stats.linger_discarded += n as u64;
        match found {
            Lingered::Closed => self.remove(id),
            _ if flooded => {
                self.core.stats.linger_resets += 1;
                trace!(self.core.tracing, "  {id} reset: flooded while lingering");
                // Unread input makes the close a reset by itself.
                self.remove(id);
            }
            Lingered::More => self.core.mark_ready(id),
            Lingered::Drained => {}
        }
    }

    fn remove(&mut self, id: ConnId) {
        self.core.remove(id, &mut *self.poller);
        // A descriptor came free: if accepting was paused for lack of them,
        // try now rather than waiting for the retry timer.
        self.resume_accepting();
    }

    // ---- shutting down ------------------------------------------------

    fn check_requests(&mut self) {
        let mut request = self.handle.requested();
        if self.core.stop_requested {
            request = request.max(SHUTDOWN);
        }
        if request >= SHUTDOWN && self.state == State::Running {
            self.begin_shutdown();
        }
        if let State::Draining { deadline } = self.state {
            if request == STOP || self.core.conns.is_empty() || Instant::now() >= deadline {
                self.cut_off_all();
                self.state = State::Done;
            }
        }
    }

    fn begin_shutdown(&mut self) {
        self.core.set_now(Instant::now());
        let open = self.core.conns.len();
        log::info!(
            "shutting down: no new connections; {open} open get {:?} to finish",
            self.config.grace
        );
        for s in 0..self.services.len() {
            if let Some(listener) = self.services[s].listener.take() {
                // Dropping the listener removes its socket file, if any.
                let _ = self.poller.deregister(listener.fd());
            }
            let core = &mut self.core;
            let handler = &mut self.services[s].handler;
            if let Err(message) =
                contain(|| handler.shutdown(&mut Context::new(core, ConnId::NONE, s)))
            {
                core.panicked(ConnId::NONE, &message);
            }
        }
        for bound in &mut self.dgrams {
            if let Some(socket) = bound.socket.take() {
                let _ = self.poller.deregister(socket.fd());
            }
        }
        self.end_of_turn();
        self.state = State::Draining {
            deadline: crate::timer::deadline(self.core.now, self.config.grace),
        };
    }

    /// Grace is over: one last flush, then close everything.
    fn cut_off_all(&mut self) {
        self.core.set_now(Instant::now());
        let ids: Vec<ConnId> = self
            .core
            .conns
            .iter()
            .map(|(i, c)| ConnId::new(i, c.gen))
            .collect();
        for id in ids {
            let Some(c) = self.core.get(id) else {
                continue;
            };
            if c.has(LINGER) {
                self.remove(id);
                continue;
            }
            self.report.cut_off += 1;
            self.core.flush(id, &mut *self.poller);
            let Some(c) = self.core.get_mut(id) else {
                continue;
            };
            if c.output_len() > 0 {
                self.report.dropped += 1;
                self.report.dropped_bytes += c.output_len() as u64;
                c.flags |= ABORT;
            }
            c.flags |= CLOSING;
            c.reason = CloseReason::Shutdown;
            self.finalize(id, false);
        }
        self.end_of_turn();
        // Whatever on_close callbacks queued for others cannot be sent now.
        let leftovers: Vec<ConnId> = self
            .core
            .conns
            .iter()
            .map(|(i, c)| ConnId::new(i, c.gen))
            .collect();
        for id in leftovers {
            self.core.remove(id, &mut *self.poller);
        }
        if self.report.cut_off > 0 {
            log::info!(
                "shutdown cut off {} connections ({} with {} unsent bytes)",
                self.report.cut_off,
                self.report.dropped,
                self.report.dropped_bytes
            );
        }
        log::info!("stopped: {}", self.core.stats);
    }
}

/// Runs one callback for connection `id`, contains a panic in it, and
/// sends what it wrote.
fn call(
    core: &mut Core,
    services: &mut [Bound],
    poller: &mut dyn Poller,
    id: ConnId,
    f: impl FnOnce(&mut dyn Handler, &mut Context<'_>, usize),
) {
    let Some(c) = core.get(id) else {
        return;
    };
    let (s, key, open) = (
        c.service as usize,
        c.session as usize,
        !c.has(CLOSING | LINGER),
    );
    core.enter(id, open);
    let handler = &mut *services[s].handler;
    let outcome = contain(|| f(handler, &mut Context::new(core, id, s), key));
    core.leave();
    if let Err(message) = outcome {
        core.panicked(id, &message);
    }
    core.commit(id, poller);
}

/// Keeps the input a service left unconsumed (a partial frame) for the
/// next read, as `store` puts it in the connection, and enforces the
/// listener's input limit on it. A closing connection will never be shown
/// its input again, so it keeps nothing.
fn keep_input(core: &mut Core, id: ConnId, store: impl FnOnce(&mut Vec<u8>)) {
    let Some(c) = core.get_mut(id) else {
        return;
    };
    if c.has(CLOSING) {
        c.release();
        return;
    }
    store(&mut c.held().input);
    let (held, s) = (c.input().len(), c.service as usize);
    if held > core.limits[s].max_input {
        core.request_close(id, CloseMode::Abort, CloseReason::InputLimit);
    }
}

/// Shows the service the input it left unconsumed earlier followed by
/// `data`, and keeps what it leaves. (Input with nothing held back is
/// delivered by [`Server::read`] itself, straight from the loop's buffer.)
fn deliver(
    core: &mut Core,
    services: &mut [Bound],
    poller: &mut dyn Poller,
    id: ConnId,
    data: &[u8],
) {
    let Some(c) = core.get_mut(id) else {
        return;
    };
    // The holder stays while the service reads: what it leaves usually
    // goes straight back, without freeing and allocating it again.
    let mut buf = c.take_input();
    buf.extend_from_slice(data);
    if !buf.is_empty() {
        let mut input = Input::new(&buf);
        call(core, services, poller, id, |h, cx, key| {
            h.data(cx, key, &mut input)
        });
        let consumed = input.consumed();
        buf.drain(..consumed);
    }
    if !buf.is_empty() {
        keep_input(core, id, |held| *held = buf);
    } else if let Some(c) = core.get_mut(id) {
        // Nothing left: `buf`'s memory goes back, and the holder with it
        // unless output is waiting.
        c.release();
    }
}

/// The service stopped processing input for output, or sent output to
/// other connections: read no more of this connection this turn.
///
/// What it sent others goes out at the end of the turn, before the sender
/// is read again, so one member's burst is fanned out a high-water mark at
/// a time, with flushes between, instead of being queued whole for every
/// reader in one turn. Input the service left because its output was full
/// is shown again next turn, or, if its own output is above the mark, once
/// that drains (see `Core::after_write_slow`).
#[cold]
fn hold_back(core: &mut Core, id: ConnId) {
    let held_back = core.held_back.replace(false);
    let Some(c) = core.get_mut(id) else {
        return;
    };
    if c.has(BACKPRESSURED | PAUSED) {
        // Reading resumes when the output drains, or when the service
        // resumes it; either shows the held input again.
        return;
    }
    if held_back && !c.input().is_empty() {
        c.flags |= REDELIVER;
    }
    {
        core.mark_ready(id);
    }
}

/// What one [`linger_read`] found.
#[derive(Debug, PartialEq, Eq)]
enum Lingered {
    /// The peer closed (or erred): the connection can go.
    Closed,
    /// Nothing more to read for now.
    Drained,
    /// The buffer filled: there may be more, for a later turn.
    More,
}

/// Reads and discards one buffer of the input of a connection we closed;
/// returns what it found and how many bytes it threw away.
fn linger_read(stream: &Stream, buf: &mut [u8]) -> (Lingered, usize) {
    loop {
        return match stream.read(buf) {
            Ok(0) => (Lingered::Closed, 0),
            Ok(n) if n == buf.len() => (Lingered::More, n),
            Ok(n) => (Lingered::Drained, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (Lingered::Drained, 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => (Lingered::Closed, 0),
        };
    }
}

/// A short name for log lines: `muxserve::services::echo::Echo` is `Echo`,
/// and an adapter like `Framed<Delimited, Chat>` is named by what it wraps,
/// `Chat`.
fn service_name<S>() -> &'static str {
    let full = std::any::type_name::<S>().trim_end_matches('>');
    let last = full.rsplit([',', '<']).next().unwrap_or(full).trim();
    last.rsplit("::").next().unwrap_or(last)
}
