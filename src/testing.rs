//! Running a [`Service`] with no sockets: for unit tests and fuzzing.
//!
//! [`Harness`] plays the engine: it creates connections, feeds them bytes
//! (in whatever pieces you like, keeping unconsumed input as an engine
//! does), collects what the service writes, runs timers on a clock you move
//! by hand, and closes connections the way the engine contract says. Input
//! that arrives while a connection has paused reading is held, and shown to
//! the service when it resumes.
//!
//! ```
//! use muxserve::services::Echo;
//! use muxserve::testing::Harness;
//!
//! let mut h = Harness::new(Echo);
//! let a = h.connect();
//! h.send(a, b"hel");
//! h.send(a, b"lo");
//! assert_eq!(h.take_output(a), b"hello");
//! h.eof(a);
//! assert!(!h.is_open(a));
//! ```

use std::time::{Duration, Instant};

use slab::Slab;

use crate::buffer::Input;
use crate::service::{CloseMode, CloseReason, ConnId, Context, Counter, Driver, PeerAddr, Service};
use crate::stats::Stats;
use crate::timer::{TimerId, Timers};

/// One simulated connection.
#[derive(Debug)]
struct Conn {
    gen: u32,
    peer: PeerAddr,
    input: Vec<u8>,
    output: Vec<u8>,
    /// A close was requested (mode, reason) and not yet carried out.
    closing: Option<(CloseMode, CloseReason)>,
    /// Why it closed, once it has.
    closed: Option<CloseReason>,
    paused: bool,
}

/// An engine without sockets. See the [module docs](self).
pub struct Harness<S: Service> {
    service: S,
    sessions: Vec<Option<S::Session>>,
    state: State,
}

/// Everything but the service, so the service and its context can be
/// borrowed apart.
struct State {
    conns: Slab<Conn>,
    next_gen: u32,
    now: Instant,
    timers: Timers<(usize, ConnId)>,
    stats: Stats,
    stop_requested: bool,
    current: ConnId,
    /// Connections whose reading resumed with input held back: shown it
    /// again once the callback that resumed them returns.
    resumed: Vec<ConnId>,
}

impl<S: Service> std::fmt::Debug for Harness<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("connections", &self.state.conns.len())
            .field("stats", &self.state.stats)
            .finish()
    }
}

impl<S: Service> Harness<S> {
    /// A harness running `service`; its clock starts now.
    pub fn new(service: S) -> Harness<S> {
        Harness {
            service,
            sessions: Vec::new(),
            state: State {
                conns: Slab::new(),
                next_gen: 0,
                now: Instant::now(),
                timers: Timers::new(),
                stats: Stats::default(),
                stop_requested: false,
                current: ConnId::NONE,
                resumed: Vec::new(),
            },
        }
    }

    /// The service, to inspect its state.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// The counters services can raise (protocol errors, frames).
    pub fn stats(&self) -> &Stats {
        &self.state.stats
    }

    /// True once a service asked the server to stop.
    pub fn stop_requested(&self) -> bool {
        self.state.stop_requested
    }

    /// Opens a connection (from 127.0.0.1, port 40000 + its index) and
    /// runs `on_connect`.
    pub fn connect(&mut self) -> ConnId {
        self.state.next_gen += 1;
        let gen = self.state.next_gen;
        let index = self.state.conns.insert(Conn {
            gen,
            peer: PeerAddr::Inet(
                (
                    [127, 0, 0, 1],
                    40000u16.wrapping_add(self.state.conns.len() as u16),
                )
                    .into(),
            ),
            input: Vec::new(),
            output: Vec::new(),
            closing: None,
            closed: None,
            paused: false,
        });
        let id = ConnId::new(index, gen);
        if self.sessions.len() <= index {
            self.sessions.resize_with(index + 1, || None);
        }
        let session = {
            self.state.current = id;
            let mut cx = Context::new(&mut self.state, id, 0);
            self.service.on_connect(&mut cx)
        };
        self.sessions[index] = Some(session);
        self.settle();
        id
    }

    /// Delivers bytes, as one read; unconsumed bytes are shown again
    /// before the next ones. Ignored for a closed or closing connection.
    pub fn send(&mut self, id: ConnId, bytes: &[u8]) {
        let Some(c) = self.open_conn(id) else {
            return;
        };
        c.input.extend_from_slice(bytes);
        if !c.paused {
            self.deliver(id);
        }
        self.settle();
    }

    /// Shows the service the input held for `id`, keeping what it leaves.
    fn deliver(&mut self, id: ConnId) {
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        let buf = std::mem::take(&mut c.input);
        let mut input = Input::new(&buf);
        self.with_session(id, |service, cx, session| {
            service.on_data(cx, session, &mut input)
        });
        let consumed = input.consumed();
        if let Some(c) = self.conn_mut(id) {
            c.input = buf[consumed..].to_vec();
        }
    }

    /// The peer shuts down its sending side.
    pub fn eof(&mut self, id: ConnId) {
        if self.open_conn(id).is_some() {
            self.with_session(id, |service, cx, session| service.on_eof(cx, session));
            self.settle();
        }
    }

    /// The peer goes away abruptly (a reset).
    pub fn disconnect(&mut self, id: ConnId) {
        if let Some(c) = self.open_conn(id) {
            c.closing = Some((
                CloseMode::Abort,
                CloseReason::Error(std::io::ErrorKind::ConnectionReset),
            ));
            self.settle();
        }
    }

    /// Everything written to `id` since the last call.
    pub fn take_output(&mut self, id: ConnId) -> Vec<u8> {
        self.conn_mut(id)
            .map(|c| std::mem::take(&mut c.output))
            .unwrap_or_default()
    }

    /// True until the connection has closed.
    pub fn is_open(&self, id: ConnId) -> bool {
        self.conn(id).is_some_and(|c| c.closed.is_none())
    }

    /// Why a connection closed, once it has.
    pub fn close_reason(&self, id: ConnId) -> Option<CloseReason> {
        self.conn(id).and_then(|c| c.closed)
    }

    /// Moves the clock forward, firing due timers in order.
    pub fn advance(&mut self, by: Duration) {
        let end = crate::timer::deadline(self.state.now, by);
        while let Some(at) = self.state.timers.next_deadline().filter(|&at| at <= end) {
            self.state.now = self.state.now.max(at);
            while let Some((timer, (_, conn))) = self.state.timers.pop_expired(self.state.now) {
                if conn == ConnId::NONE {
                    self.state.current = ConnId::NONE;
                    let mut cx = Context::new(&mut self.state, ConnId::NONE, 0);
                    self.service.on_service_timer(&mut cx, timer);
                    self.settle();
                } else if self.is_open(conn) {
                    self.with_session(conn, |service, cx, session| {
                        service.on_timer(cx, session, timer)
                    });
                    self.settle();
                } else {
                    self.state.timers.cancel(timer);
                }
            }
        }
        self.state.now = end;
    }

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        live(&self.state.conns, id)
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        live_mut(&mut self.state.conns, id)
    }

    fn open_conn(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conn_mut(id)
            .filter(|c| c.closed.is_none() && c.closing.is_none())
    }

    fn with_session(
        &mut self,
        id: ConnId,
        f: impl FnOnce(&mut S, &mut Context<'_>, &mut S::Session),
    ) {
        let Some(mut session) = self.sessions.get_mut(id.index()).and_then(Option::take) else {
            return;
        };
        self.state.current = id;
        f(
            &mut self.service,
            &mut Context::new(&mut self.state, id, 0),
            &mut session,
        );
        self.state.current = ConnId::NONE;
        self.sessions[id.index()] = Some(session);
    }

    /// Carries out requested closes (of `id` and of any connection the
    /// callback closed), with `on_close` last, and shows connections whose
    /// reading resumed the input they were holding, as an engine would at
    /// the end of a turn.
    fn settle(&mut self) {
        loop {
            let next = self
                .state
                .conns
                .iter()
                .find(|(_, c)| c.closed.is_none() && c.closing.is_some())
                .map(|(i, c)| (ConnId::new(i, c.gen), c.closing.unwrap()));
            if let Some((id, (mode, reason))) = next {
                if let Some(c) = self.conn_mut(id) {
                    if mode == CloseMode::Abort {
                        c.output.clear();
                    }
                    c.closed = Some(reason);
                }
                if let Some(session) = self.sessions.get_mut(id.index()).and_then(Option::take) {
                    self.state.current = id;
                    let mut cx = Context::new(&mut self.state, id, 0);
                    self.service.on_close(&mut cx, session, reason);
                }
                continue;
            }
            let Some(id) = self.state.resumed.pop() else {
                return;
            };
            if self
                .open_conn(id)
                .is_some_and(|c| !c.paused && !c.input.is_empty())
            {
                self.deliver(id);
            }
        }
    }
}

/// The connection `id` names, if it is still the one in that slot.
fn live(conns: &Slab<Conn>, id: ConnId) -> Option<&Conn> {
    conns.get(id.index()).filter(|c| c.gen == id.gen())
}

fn live_mut(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut Conn> {
    conns.get_mut(id.index()).filter(|c| c.gen == id.gen())
}

impl Driver for State {
    fn now(&self) -> Instant {
        self.now
    }

    fn write(&mut self, to: ConnId, bytes: &[u8]) -> bool {
        match live_mut(&mut self.conns, to) {
            Some(c) if c.closing.is_none() && c.closed.is_none() => {
                c.output.extend_from_slice(bytes);
                true
            }
            _ => false,
        }
    }

    fn broadcast(&mut self, _service: usize, bytes: &[u8], except: Option<ConnId>) -> usize {
        let mut sent = 0;
        for (i, c) in self.conns.iter_mut() {
            let id = ConnId::new(i, c.gen);
            if Some(id) != except && c.closing.is_none() && c.closed.is_none() {
                c.output.extend_from_slice(bytes);
                sent += 1;
            }
        }
        sent
    }

    fn close(&mut self, id: ConnId, mode: CloseMode, reason: CloseReason) {
        if let Some(c) = live_mut(&mut self.conns, id) {
            if c.closed.is_none() {
                match (c.closing, mode) {
                    (None, _) | (Some((CloseMode::Flush, _)), CloseMode::Abort) => {
                        c.closing = Some((mode, reason))
                    }
                    _ => {}
                }
            }
        }
    }

    fn evict(&mut self, id: ConnId, notice: &[u8]) {
        if let Some(c) = live_mut(&mut self.conns, id) {
            if c.closed.is_none() && c.closing.is_none() {
                c.output.clear();
                c.output.extend_from_slice(notice);
                c.closing = Some((CloseMode::Flush, CloseReason::OutputLimit));
            }
        }
    }

    fn state(&self, id: ConnId) -> Option<(bool, bool)> {
        let c = live(&self.conns, id)?;
        Some((c.closing.is_some() || c.closed.is_some(), c.paused))
    }

    fn count(&mut self, counter: Counter) {
        *counter.field(&mut self.stats) += 1;
    }

    fn frame_timeout(&self, _id: ConnId) -> Option<Duration> {
        None
    }

    fn output_len(&self, id: ConnId) -> Option<usize> {
        // Nothing is ever sent: "pending" output is everything not taken.
        live(&self.conns, id).map(|c| c.output.len())
    }

    fn peer(&self, id: ConnId) -> Option<&PeerAddr> {
        live(&self.conns, id).map(|c| &c.peer)
    }

    fn set_reading(&mut self, id: ConnId, on: bool) {
        if let Some(c) = live_mut(&mut self.conns, id) {
            if on && c.paused && !c.input.is_empty() {
                self.resumed.push(id);
            }
            c.paused = !on;
        }
    }

    fn set_idle_timeout(&mut self, _id: ConnId, _timeout: Option<Duration>) {}

    fn set_timer(
        &mut self,
        service: usize,
        conn: ConnId,
        after: Duration,
        period: Option<Duration>,
    ) -> TimerId {
        self.timers.insert(
            crate::timer::deadline(self.now, after),
            period,
            (service, conn),
        )
    }

    fn cancel_timer(&mut self, timer: TimerId) -> bool {
        self.timers.cancel(timer).is_some()
    }

    fn stop(&mut self) {
        self.stop_requested = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::Chat;

    #[test]
    fn chat_runs_without_sockets() {
        let mut h = Harness::new(Chat::new().service());
        let (a, b) = (h.connect(), h.connect());
        h.send(a, b"ann\n");
        h.send(b, b"bo");
        h.send(b, b"b\nhi ");
        h.send(b, b"there\n");
        let out = String::from_utf8(h.take_output(a)).unwrap();
        assert!(
            out.ends_with("* bob joined\r\n<bob> hi there\r\n"),
            "{out:?}"
        );
        h.send(b, b"/quit\n");
        assert!(!h.is_open(b));
        let out = String::from_utf8(h.take_output(a)).unwrap();
        assert_eq!(out, "* bob left\r\n");
        assert_eq!(h.close_reason(b), Some(CloseReason::Closed));
        // Lines in: ann, bob, "hi there", /quit. Lines out to others:
        // the join, the message, the leave.
        assert_eq!((h.stats().frames_in, h.stats().frames_out), (4, 3));
    }

    /// Echoes, but stops reading for 1 s after each "wait", as a rate
    /// limiter would.
    struct Slow;

    impl Service for Slow {
        type Session = ();
        fn on_connect(&mut self, _cx: &mut Context<'_>) {}
        fn on_data(&mut self, cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
            let data = input.take();
            cx.write(data);
            if data.ends_with(b"wait") {
                cx.pause_reading();
                cx.set_timer(Duration::from_secs(1));
            }
        }
        fn on_timer(&mut self, cx: &mut Context<'_>, _: &mut (), _timer: TimerId) {
            cx.resume_reading();
        }
    }

    #[test]
    fn input_held_while_paused_is_delivered_when_reading_resumes() {
        let mut h = Harness::new(Slow);
        let c = h.connect();
        h.send(c, b"wait");
        h.send(c, b"held ");
        h.send(c, b"back");
        assert_eq!(h.take_output(c), b"wait");
        h.advance(Duration::from_millis(999));
        assert_eq!(h.take_output(c), b"");
        h.advance(Duration::from_millis(1));
        assert_eq!(h.take_output(c), b"held back");
    }
}
