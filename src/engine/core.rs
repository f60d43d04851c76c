//! Connection bookkeeping shared by the loop engines: the slab, output
//! flushing, backpressure, timers and deferred closes. It knows nothing
//! about how readiness is learned; the loop in `server.rs` tells it.

use std::io;
use std::mem;
use std::time::{Duration, Instant};

use slab::Slab;

use super::admit::Sources;
use super::{Interest, Poller, GEN_MASK};
use crate::buffer::OutBuf;
use crate::config::{Limits, PanicPolicy};
use crate::net::Stream;
use crate::service::{CloseMode, CloseReason, ConnId, Counter, Driver, PeerAddr};
use crate::stats::Stats;
use crate::timer::{TimerId, Timers};

// Connection flags.
/// The service paused reading.
pub(super) const PAUSED: u16 = 1 << 0;
/// Pending output is above the high-water mark; reading waits for it.
pub(super) const BACKPRESSURED: u16 = 1 << 1;
/// WRITABLE is registered (only while output is pending).
pub(super) const WRITE_INTEREST: u16 = 1 << 2;
/// The peer shut down its sending side.
pub(super) const EOF: u16 = 1 << 3;
/// A close was requested; carried out at the end of the turn.
pub(super) const CLOSING: u16 = 1 << 4;
/// The close drops pending output.
pub(super) const ABORT: u16 = 1 << 5;
/// The service is done with it; input is read and discarded until the
/// peer closes, so our close is a FIN and not a reset.
pub(super) const LINGER: u16 = 1 << 6;
/// On the dirty list (others queued output for it this turn).
pub(super) const DIRTY: u16 = 1 << 7;
/// On the still-ready list.
pub(super) const READY: u16 = 1 << 8;
/// `on_connect` ran, so the session exists.
pub(super) const CONNECTED: u16 = 1 << 9;
/// Leftover input must be shown to the service again (reading resumed).
pub(super) const REDELIVER: u16 = 1 << 10;
/// A close is waiting for output to drain, and its deadline is armed.
pub(super) const CLOSE_DEADLINE: u16 = 1 << 11;
/// The write budget stopped a flush with the socket maybe still writable:
/// on the still-ready list to go on next turn.
pub(super) const WRITE_AGAIN: u16 = 1 << 12;
/// The write-stall timer is armed.
pub(super) const STALL_ARMED: u16 = 1 << 13;
/// READABLE is not registered: a level-triggered poller would report a
/// readiness the loop will not act on (see [`Core::sync_interest`]).
pub(super) const READ_OFF: u16 = 1 << 14;
/// A refused client, lingering only so that its notice is not destroyed
/// by a reset (see [`super::admit`]): no service, not counted as open.
pub(super) const REFUSED: u16 = 1 << 15;

/// Flags that need [`Core::after_write`]'s attention even when all output
/// went out.
const AFTER_WRITE_FLAGS: u16 = ABORT | WRITE_INTEREST | BACKPRESSURED | CLOSING;

/// One connection. Kept small: an idle connection is this struct, one
/// session and nothing on the heap.
pub(super) struct Conn {
    pub stream: Stream,
    pub gen: u32,
    pub service: u32,
    pub session: u32,
    pub flags: u16,
    pub reason: CloseReason,
    /// Input and output waiting between turns; `None` while both are empty.
    pub held: Option<Box<Held>>,
    pub peer: PeerAddr,
    /// When bytes last came in / went out, in [`Core::tick`]s: 4 bytes each
    /// instead of a 16-byte `Instant`.
    pub last_read: u32,
    pub last_write: u32,
    /// The idle timeout in milliseconds, 0 for none. Checked by the idle
    /// sweep, not by a timer of its own.
    pub idle_ms: u32,
    /// Input read and thrown away while lingering (see `Config::linger_bytes`).
    pub lingered: u32,
}

/// What a connection holds between turns: input the service left
/// unconsumed (a partial frame) and output the kernel has not taken yet.
/// Most connections hold neither most of the time, so the two queues live
/// behind one pointer that is `None` while both are empty: an idle
/// connection pays 8 bytes for them instead of 56.
#[derive(Debug, Default)]
pub(super) struct Held {
    pub input: Vec<u8>,
    pub output: OutBuf,
}

impl Conn {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The input held back from earlier reads.
    pub fn input(&self) -> &[u8] {
        self.held.as_deref().map_or(&[], |h| &h.input)
    }

    /// Bytes of output waiting for the kernel.
    pub fn output_len(&self) -> usize {
        self.held.as_deref().map_or(0, |h| h.output.len())
    }

    /// The queues, allocated on first use.
    pub fn held(&mut self) -> &mut Held {
        self.held.get_or_insert_with(Box::default)
    }

    /// Takes the held input, leaving none. The holder stays (the caller
    /// may put input back at once); [`Conn::release`] frees it.
    pub fn take_input(&mut self) -> Vec<u8> {
        self.held
            .as_deref_mut()
            .map(|h| mem::take(&mut h.input))
            .unwrap_or_default()
    }

    /// Frees the queues once both are empty (the queues free their own
    /// buffers when they empty).
    pub fn release(&mut self) {
        if self
            .held
            .as_deref()
            .is_some_and(|h| h.input.is_empty() && h.output.is_empty())
        {
            self.held = None;
        }
    }

    /// Reading makes sense: not paused, not closing, peer still sending.
    pub fn wants_read(&self) -> bool {
        self.flags & (PAUSED | BACKPRESSURED | EOF | CLOSING | LINGER) == 0
    }
}

/// What a timer is for.
#[derive(Clone, Copy, Debug)]
pub(super) enum TimerKind {
    /// A service's own timer; `conn` is `NONE` for service timers.
    User {
        service: u32,
        conn: ConnId,
    },
    /// Close connections that have been idle too long (one timer for all).
    IdleSweep,
    WriteStall {
        conn: ConnId,
        after: Duration,
    },
    Linger {
        conn: ConnId,
    },
    AcceptRetry,
    /// Log the counters.
    Stats,
}

pub(super) fn token(id: ConnId) -> usize {
    (id.gen() as usize) << 32 | id.index()
}

pub(super) fn conn_id(token: usize) -> ConnId {
    ConnId::new(token & 0xffff_ffff, (token >> 32) as u32)
}

pub(super) struct Core {
    pub conns: Slab<Conn>,
    next_gen: u32,
    pub timers: Timers<TimerKind>,
    /// Output of the current callback for the current connection; written
    /// straight to its socket when the callback returns.
    staging: Vec<u8>,
    /// The current callback sent a long reply itself (see
    /// `Core::write_through`), so `commit` has bookkeeping to do even
    /// with nothing staged.
    wrote_through: bool,
    pub current: ConnId,
    /// `current` may still be written to (it is not closing): checked by
    /// every write of a callback, without a slab lookup.
    current_open: bool,
    /// Bytes the current callback queued for other connections.
    pub fanout: usize,
    /// The current callback was told to stop processing its input (see
    /// [`Core::output_full`]); its input waits until the output drains.
    pub held_back: std::cell::Cell<bool>,
    /// Connections others wrote to this turn; flushed at its end.
    pub dirty: Vec<ConnId>,
    /// Connections whose close was requested this turn.
    pub closing: Vec<ConnId>,
    /// Tokens of sources that may still be ready (edge-triggered pollers
    /// will not report them again).
    pub ready: Vec<usize>,
    pub stats: Stats,
    pub now: Instant,
    pub stop_requested: bool,
    /// The loop trace is on for this turn (see [`super::TRACE_TARGET`]).
    pub tracing: bool,
    /// Limits per service index.
    pub limits: Vec<Limits>,
    pub on_panic: PanicPolicy,
    /// The poller is level-triggered (see [`Poller::level_triggered`]).
    pub level: bool,
    /// Connections whose interest must be brought up to date at the end of
    /// the turn (see [`Core::sync_requested`]).
    pub resync: Vec<ConnId>,
    /// Bytes one connection may write per turn (see [`WRITE_BUDGET`]).
    pub write_budget: usize,
    /// The zero of `tick`.
    epoch: Instant,
    now_tick: u32,
    /// How often the idle sweep runs, once some connection has a timeout.
    sweep_every: Option<Duration>,
    sweep_timer: Option<TimerId>,
    /// Connections open per source address (the per-source cap).
    pub sources: Sources,
    /// Refused clients lingering now (at most
    /// [`REFUSED_LINGERING`](super::admit::REFUSED_LINGERING)).
    pub refused: usize,
}

/// Bytes written to one connection per turn before the others get theirs:
/// a peer that reads as fast as loopback allows cannot make the loop spend
/// a whole turn copying megabytes for it alone.
pub(super) const WRITE_BUDGET: usize = 256 * 1024;

/// A reply at least this long, written by a callback that has staged
/// nothing before it, is sent straight from the service's slice (see
/// `Core::write_through`); shorter replies are staged, so that several
/// small writes of one callback leave in one `send`.
const WRITE_THROUGH: usize = 2048;

/// The staging buffer is loop-wide; after a huge write it is shrunk back
/// so one burst does not pin memory for ever.
const STAGING_KEEP: usize = 64 * 1024;

impl Core {
    pub fn new() -> Core {
        Core {
            conns: Slab::new(),
            next_gen: 0,
            timers: Timers::new(),
            staging: Vec::new(),
            wrote_through: false,
            current: ConnId::NONE,
            current_open: false,
            fanout: 0,
            held_back: std::cell::Cell::new(false),
            dirty: Vec::new(),
            closing: Vec::new(),
            ready: Vec::new(),
            stats: Stats::default(),
            now: Instant::now(),
            stop_requested: false,
            tracing: false,
            limits: Vec::new(),
            on_panic: PanicPolicy::default(),
            level: true,
            resync: Vec::new(),
            write_budget: WRITE_BUDGET,
            epoch: Instant::now(),
            now_tick: 0,
            sweep_every: None,
            sweep_timer: None,
            sources: Sources::default(),
            refused: 0,
        }
    }

    /// Connections that count against `max_connections`: every one the
    /// engine holds, lingering ones included, but refused clients.
    pub fn held(&self) -> usize {
        self.conns.len() - self.refused
    }

    pub fn next_gen(&mut self) -> u32 {
        self.next_gen = (self.next_gen + 1) & GEN_MASK;
        self.next_gen
    }

    pub fn get(&self, id: ConnId) -> Option<&Conn> {
        self.conns.get(id.index()).filter(|c| c.gen == id.gen())
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        lookup(&mut self.conns, id)
    }

    /// Sets the time of this turn, and its tick.
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
        // Milliseconds since the server started, wrapping after 49 days.
        // Computed once a turn: clock arithmetic per read and write showed
        // up as a tenth of the loop's instructions.
        self.now_tick = now.saturating_duration_since(self.epoch).as_millis() as u32;
    }

    /// This turn's time in milliseconds since start (see `set_now`).
    pub fn tick(&self) -> u32 {
        self.now_tick
    }

    /// How long ago `tick` was, as of this turn.
    pub fn since(&self, tick: u32) -> Duration {
        Duration::from_millis(u64::from(self.now_tick.wrapping_sub(tick)))
    }

    /// Puts a connection on the still-ready list to read (`READY`) or to
    /// go on writing (`WRITE_AGAIN`) next turn.
    pub fn mark(&mut self, id: ConnId, flag: u16) {
        if let Some(c) = lookup(&mut self.conns, id) {
            let queued = c.has(READY | WRITE_AGAIN);
            c.flags |= flag;
            if !queued {
                self.ready.push(token(id));
            }
        }
    }

    pub fn mark_ready(&mut self, id: ConnId) {
        self.mark(id, READY);
    }

    /// Starts a callback about `id`; `open` says it is not closing. Its
    /// writes are staged until [`Core::commit`].
    #[inline]
    pub fn enter(&mut self, id: ConnId, open: bool) {
        self.current = id;
        self.current_open = open;
        self.fanout = 0;
        self.held_back.set(false);
    }

    /// Whether the current callback has produced enough output that it
    /// should stop processing input: its own pending output (queued and
    /// staged) is above the high-water mark, or it queued that much for
    /// other connections (a chat line fanned out to the room), which the
    /// engine flushes at the end of the turn. A service that asks
    /// ([`Context::is_paused`](crate::Context::is_paused), which `Framed`
    /// asks before each message) leaves the rest of its input where it is;
    /// the engine shows it again once the output has gone out. So one
    /// small input (`/who` a thousand times in one packet) cannot queue
    /// more than about one mark of output, whatever it asks for.
    fn output_full(&self, c: &Conn) -> bool {
        let mark = self.limits[c.service as usize].output_high_water;
        let full = c.output_len() + self.staging.len() > mark || self.fanout > mark;
        if full {
            self.held_back.set(true);
        }
        full
    }

    /// Ends the callback started by [`Core::enter`], returning whom it was
    /// about.
    #[inline]
    pub fn leave(&mut self) -> ConnId {
        self.current_open = false;
        mem::replace(&mut self.current, ConnId::NONE)
    }

    /// Asks for a close at the end of the turn. An abort overrides an
    /// earlier flush-close (a write error while flushing, say).
    pub fn request_close(&mut self, id: ConnId, mode: CloseMode, reason: CloseReason) {
        let Some(c) = lookup(&mut self.conns, id) else {
            return;
        };
        if c.has(LINGER) {
            return;
        }
        if id == self.current {
            self.current_open = false;
        }
        let first = !c.has(CLOSING);
        if first || mode == CloseMode::Abort {
            c.flags |= CLOSING;
            c.reason = reason;
            if mode == CloseMode::Abort {
                c.flags |= ABORT;
            }
            self.closing.push(id);
        }
    }

    /// A callback about `id` (or about no connection, `NONE`) panicked:
    /// count and log it, drop what it wrote, and close that connection.
    pub fn panicked(&mut self, id: ConnId, message: &str) {
        self.stats.panics += 1;
        self.staging.clear();
        self.wrote_through = false;
        log::error!("a service callback for {id} panicked: {message}");
        if id != ConnId::NONE {
            self.request_close(id, CloseMode::Abort, CloseReason::Panic);
        }
        if self.on_panic == PanicPolicy::Shutdown {
            self.stop_requested = true;
        }
    }

    pub fn fail(&mut self, id: ConnId, err: &io::Error) {
        log::debug!("{id}: {err}");
        self.request_close(id, CloseMode::Abort, CloseReason::Error(err.kind()));
    }

    /// Called after every callback for `id`: sends what it wrote.
    ///
    /// If nothing was queued before, the staged bytes go straight to the
    /// socket and only what the kernel refused is copied into the
    /// connection; a request/response turn costs one `send` and no
    /// per-connection allocation.
    pub fn commit(&mut self, id: ConnId, poller: &mut dyn Poller) {
        if self.staging.is_empty() {
            if mem::take(&mut self.wrote_through) {
                self.after_write(id, poller);
            }
            return;
        }
        self.wrote_through = false;
        let Some(c) = lookup(&mut self.conns, id) else {
            self.staging.clear();
            return;
        };
        if c.output_len() == 0 && self.staging.len() <= self.write_budget {
            // The request/response case: one `send`, and if the kernel took
            // everything and nothing was waiting on output, we are done.
            let sent = write_some(&c.stream, &self.staging, &mut self.stats);
            if let Ok(n) = sent {
                if n == self.staging.len() {
                    trace!(self.tracing, "    sent {n} B");
                    c.last_write = self.now_tick;
                    self.staging.clear();
                    if c.has(AFTER_WRITE_FLAGS) {
                        self.after_write_slow(id, poller);
                    }
                    return;
                }
            }
            self.commit_rest(id, Some(sent), poller);
        } else {
            self.commit_rest(id, None, poller);
        }
    }

    /// The rest of [`Core::commit`]: `sent` is what writing the staged bytes
    /// returned, if they were written; queue the remainder and apply
    /// backpressure.
    #[cold]
    #[inline(never)]
    fn commit_rest(
        &mut self,
        id: ConnId,
        sent: Option<io::Result<usize>>,
        poller: &mut dyn Poller,
    ) {
        let now = self.now_tick;
        let staged = &self.staging;
        let mut failed = None;
        let mut more = false;
        if let Some(c) = lookup(&mut self.conns, id) {
            if c.output_len() == 0 {
                let chunk = &staged[..staged.len().min(self.write_budget)];
                // Nothing was written yet if the staged bytes were over budget.
                let sent = sent.unwrap_or_else(|| write_some(&c.stream, chunk, &mut self.stats));
                match sent {
                    Ok(n) => {
                        if n < staged.len() {
                            trace!(
                                self.tracing,
                                "    sent {n} of {} B; the rest waits for WRITABLE",
                                staged.len()
                            );
                            queue_rest(c.held(), &staged[n..], n);
                        }
                        c.last_write = now;
                        more = n == chunk.len() && n < staged.len();
                    }
                    Err(e) => failed = Some(e),
                }
            } else {
                // Earlier output is still waiting for WRITABLE: queue behind it.
                trace!(
                    self.tracing,
                    "    queued {} B behind {} B unsent",
                    staged.len(),
                    c.output_len()
                );
                c.held().output.extend(staged);
            }
        }
        self.staging.clear();
        if self.staging.capacity() > STAGING_KEEP {
            self.staging.shrink_to(STAGING_KEEP);
        }
        if let Some(e) = failed {
            self.fail(id, &e);
        }
        self.after_write(id, poller);
        if more {
            self.mark(id, WRITE_AGAIN);
        }
    }

    /// Sends a long reply straight from the service's slice, sparing the
    /// copy into `staging`. What the kernel does not take is queued for
    /// WRITABLE at once (the socket is full; trying again at commit would
    /// only fail), and `commit` does the bookkeeping. If output is queued
    /// already, or the send fails, the reply is staged as usual: `commit`
    /// then meets the error again and closes the connection, the one way
    /// it always does.
    #[inline(never)]
    fn write_through(&mut self, id: ConnId, bytes: &[u8]) {
        if let Some(c) = lookup(&mut self.conns, id) {
            if c.output_len() == 0 && bytes.len() <= self.write_budget {
                if let Ok(n) = write_some(&c.stream, bytes, &mut self.stats) {
                    trace!(self.tracing, "    sent {n} of {} B straight", bytes.len());
                    if n > 0 {
                        c.last_write = self.now_tick;
                    }
                    if n < bytes.len() {
                        queue_rest(c.held(), &bytes[n..], n);
                    }
                    self.wrote_through = true;
                    return;
                }
            }
        }
        self.staging.extend_from_slice(bytes);
    }

    /// Writes pending output until it is gone or the kernel is full.
    pub fn flush(&mut self, id: ConnId, poller: &mut dyn Poller) {
        let now = self.now_tick;
        let Some(c) = lookup(&mut self.conns, id) else {
            return;
        };
        if c.has(ABORT | LINGER) {
            return;
        }
        let Some(held) = c.held.as_deref_mut().filter(|h| !h.output.is_empty()) else {
            return;
        };
        let pending = held.output.as_slice();
        let chunk = &pending[..pending.len().min(self.write_budget)];
        let more = match write_some(&c.stream, chunk, &mut self.stats) {
            Ok(n) => {
                trace!(
                    self.tracing,
                    "    flushed {n} of {} B pending",
                    pending.len()
                );
                let more = n == chunk.len() && n < pending.len();
                if n > 0 {
                    c.last_write = now;
                }
                held.output.advance(n);
                c.release();
                more
            }
            Err(e) => return self.fail(id, &e),
        };
        self.after_write(id, poller);
        if more {
            // The budget, not the kernel, stopped us: the socket may still
            // be writable, and no new edge will say so.
            self.mark(id, WRITE_AGAIN);
        }
    }

    /// Brings interest, backpressure and pending closes in line with how
    /// much output is left.
    #[inline]
    fn after_write(&mut self, id: ConnId, poller: &mut dyn Poller) {
        let Some(c) = lookup(&mut self.conns, id) else {
            return;
        };
        // The common case: everything went out and nothing was waiting on
        // that (no WRITABLE interest to drop, no paused read, no close).
        if c.output_len() == 0 && !c.has(AFTER_WRITE_FLAGS) {
            return;
        }
        self.after_write_slow(id, poller);
    }

    #[cold]
    #[inline(never)]
    fn after_write_slow(&mut self, id: ConnId, poller: &mut dyn Poller) {
        let Some(c) = lookup(&mut self.conns, id) else {
            return;
        };
        if c.has(ABORT) {
            return;
        }
        let limits = &self.limits[c.service as usize];
        let pending = c.output_len();
        if pending > limits.max_output {
            return self.request_close(id, CloseMode::Abort, CloseReason::OutputLimit);
        }
        if let (true, false, Some(after)) = (pending > 0, c.has(STALL_ARMED), limits.write_timeout)
        {
            // Output is waiting: it must make progress within `after`.
            c.flags |= STALL_ARMED;
            let at = crate::timer::deadline(self.now, after);
            self.timers
                .insert(at, None, TimerKind::WriteStall { conn: id, after });
        }
        let mut resumed = false;
        if pending > limits.output_high_water {
            c.flags |= BACKPRESSURED;
        } else if c.has(BACKPRESSURED) && pending <= limits.output_low_water {
            c.flags &= !BACKPRESSURED;
            if !c.input().is_empty() && !c.has(PAUSED) {
                // Input the service stopped processing for this output
                // waits in the connection: show it again, even if the
                // peer sends nothing more.
                c.flags |= REDELIVER;
            }
            resumed = true;
        }
        if c.has(CLOSING) {
            // A close that waited for the output to drain goes on now.
            if pending == 0 {
                self.closing.push(id);
            }
        } else if resumed {
            // Edge-triggered: input that arrived while we were not reading
            // produced its one event already. Look again ourselves.
            self.mark_ready(id);
        }
        self.sync_interest(id, poller);
    }

    /// Registers exactly the readiness the loop will act on: WRITABLE only
    /// while output is pending (an always-writable socket would wake every
    /// wait), and, on a level-triggered poller, READABLE only while the
    /// connection is read (a paused, backpressured, closing or half-closed
    /// connection with unread input is readable for ever, and select or
    /// poll would report it on every wait: a loop at 100 % CPU doing
    /// nothing). An edge-triggered poller reports a readiness once, so
    /// there READABLE stays and pausing costs no system call.
    pub fn sync_interest(&mut self, id: ConnId, poller: &mut dyn Poller) {
        let level = self.level;
        let Some(c) = lookup(&mut self.conns, id) else {
            return;
        };
        let read = !level || c.wants_read() || c.has(LINGER);
        let write = c.output_len() > 0 && !c.has(ABORT | LINGER);
        if read != c.has(READ_OFF) && write == c.has(WRITE_INTEREST) {
            return;
        }
        trace!(
            self.tracing,
            "    {id}: waiting for {}",
            match (read, write) {
                (true, true) => "READABLE and WRITABLE",
                (true, false) => "READABLE",
                (false, true) => "WRITABLE only",
                (false, false) => "nothing (paused)",
            }
        );
        if let Err(e) = poller.reregister(c.stream.fd(), token(id), Interest::new(read, write)) {
            return self.fail(id, &e);
        }
        c.flags &= !(READ_OFF | WRITE_INTEREST);
        if !read {
            c.flags |= READ_OFF;
        }
        if write {
            c.flags |= WRITE_INTEREST;
        }
    }

    /// Interest changes requested during callbacks (which have no poller),
    /// carried out at the end of the turn.
    pub fn sync_requested(&mut self, poller: &mut dyn Poller) {
        if self.resync.is_empty() {
            return;
        }
        for id in mem::take(&mut self.resync) {
            self.sync_interest(id, poller);
        }
    }

    /// Watches `stream` for reading and gives it a slot, as a connection of
    /// service `service` with `flags`. If the poller will not take it, the
    /// stream comes back with the error.
    pub fn insert(
        &mut self,
        poller: &mut dyn Poller,
        stream: Stream,
        service: usize,
        peer: PeerAddr,
        flags: u16,
    ) -> Result<ConnId, (Stream, PeerAddr, io::Error)> {
        let gen = self.next_gen();
        let tick = self.tick();
        let entry = self.conns.vacant_entry();
        let id = ConnId::new(entry.key(), gen);
        if let Err(e) = poller.register(stream.fd(), token(id), Interest::Read) {
            return Err((stream, peer, e));
        }
        entry.insert(Conn {
            stream,
            gen,
            service: service as u32,
            session: 0,
            flags,
            reason: CloseReason::Closed,
            held: None,
            peer,
            last_read: tick,
            last_write: tick,
            idle_ms: 0,
            lingered: 0,
        });
        Ok(id)
    }

    /// Removes a connection for good.
    pub fn remove(&mut self, id: ConnId, poller: &mut dyn Poller) {
        if lookup(&mut self.conns, id).is_none() {
            return;
        }
        let c = self.conns.remove(id.index());
        let _ = poller.closing(c.stream.fd());
        if c.has(REFUSED) {
            self.refused -= 1;
        } else {
            self.sources.release(&c.peer);
        }
        // A connection the peer reset is gone already; only our own aborts
        // need SO_LINGER 0 to turn the close into a reset.
        let reset_by_peer = matches!(
            c.reason,
            CloseReason::Error(
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            )
        );
        if c.has(ABORT) && !reset_by_peer {
            c.stream.set_reset_on_close();
        }
    }

    /// Sets a connection's idle timeout, and makes sure the sweep runs
    /// often enough for it.
    pub fn set_idle(&mut self, id: ConnId, after: Option<Duration>) {
        let Some(c) = lookup(&mut self.conns, id) else {
            return;
        };
        // At least 1 ms (0 means off), at most 49 days.
        // A timeout too long for 32 bits of milliseconds (49 days) is never
        // reached by the wrapping tick arithmetic of the sweep: it means off.
        c.idle_ms = after.map_or(0, |d| {
            u32::try_from(d.as_millis()).map_or(0, |ms| ms.max(1))
        });
        if let Some(after) = after {
            let every = (after / 4).clamp(MIN_SWEEP, MAX_SWEEP);
            if self.sweep_every.is_none_or(|current| every < current) {
                if let Some(old) = self.sweep_timer.take() {
                    self.timers.cancel(old);
                }
                self.sweep_every = Some(every);
                let at = crate::timer::deadline(self.now, every);
                self.sweep_timer = Some(self.timers.insert(at, Some(every), TimerKind::IdleSweep));
            }
        }
    }

    /// Requests a close of every connection quiet for longer than its idle
    /// timeout. O(connections), a few times a second at most: a few
    /// microseconds for 10,000 connections, and no timer per connection.
    pub fn sweep_idle(&mut self) {
        let now = self.now_tick;
        let mut idle = Vec::new();
        let mut timed = 0;
        for (index, c) in self.conns.iter() {
            if c.idle_ms == 0 || c.has(CLOSING | LINGER) {
                continue;
            }
            timed += 1;
            let quiet = now
                .wrapping_sub(c.last_read)
                .min(now.wrapping_sub(c.last_write));
            if quiet >= c.idle_ms {
                idle.push(ConnId::new(index, c.gen));
            }
        }
        for id in idle {
            self.request_close(id, CloseMode::Flush, CloseReason::IdleTimeout);
        }
        if timed == 0 {
            // Nobody has an idle timeout: stop waking up for them. The
            // next `set_idle` with a timeout arms the sweep again.
            if let Some(timer) = self.sweep_timer.take() {
                self.timers.cancel(timer);
            }
            self.sweep_every = None;
        }
    }
}

/// The idle sweep runs every quarter of the shortest idle timeout, but not
/// more often than this...
const MIN_SWEEP: Duration = Duration::from_millis(10);
/// ...nor less often than this, so every idle close lands within a second
/// of its deadline.
const MAX_SWEEP: Duration = Duration::from_secs(1);

/// Queues what the kernel did not take of a write, into an empty queue:
/// if it took `sent > 0` bytes, the peer has the start of that write.
fn queue_rest(held: &mut Held, rest: &[u8], sent: usize) {
    if sent > 0 {
        held.output.extend_rest(rest);
    } else {
        held.output.extend(rest);
    }
}

fn lookup(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut Conn> {
    conns.get_mut(id.index()).filter(|c| c.gen == id.gen())
}

/// Sends as much of `buf` as the kernel takes now: one `send` (again only
/// if a signal interrupted it), counted in the statistics.
///
/// Stops at the first short write: the socket buffer is full, and trying
/// again would only return `WouldBlock` at the cost of a system call.
#[inline]
fn write_some(stream: &Stream, buf: &[u8], stats: &mut Stats) -> io::Result<usize> {
    loop {
        match stream.send(buf) {
            Ok(n) => {
                stats.bytes_out += n as u64;
                if n < buf.len() {
                    stats.short_writes += 1;
                }
                return Ok(n);
            }
            // The kernel is full: WRITABLE will tell us when to go on.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            // A signal arrived before anything was sent: just try again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

impl Driver for Core {
    fn now(&self) -> Instant {
        self.now
    }

    fn write(&mut self, to: ConnId, bytes: &[u8]) -> bool {
        if to == self.current {
            // The reply case, without a lookup.
            if self.current_open {
                if bytes.len() >= WRITE_THROUGH && self.staging.is_empty() {
                    self.write_through(to, bytes);
                } else {
                    self.staging.extend_from_slice(bytes);
                }
            }
            return self.current_open;
        }
        let Some(c) = lookup(&mut self.conns, to) else {
            return false;
        };
        if c.has(CLOSING | LINGER) {
            return false;
        }
        c.held().output.extend(bytes);
        self.fanout += bytes.len();
        if !c.has(DIRTY) {
            c.flags |= DIRTY;
            self.dirty.push(to);
        }
        true
    }

    fn broadcast(&mut self, service: usize, bytes: &[u8], except: Option<ConnId>) -> usize {
        let mut sent = 0;
        for (index, c) in self.conns.iter_mut() {
            let id = ConnId::new(index, c.gen);
            if c.service as usize != service
                || Some(id) == except
                || !c.has(CONNECTED)
                || c.has(CLOSING | LINGER)
            {
                continue;
            }
            if id == self.current {
                self.staging.extend_from_slice(bytes);
            } else {
                c.held().output.extend(bytes);
                self.fanout += bytes.len();
                if !c.has(DIRTY) {
                    c.flags |= DIRTY;
                    self.dirty.push(id);
                }
            }
            sent += 1;
        }
        sent
    }

    fn close(&mut self, id: ConnId, mode: CloseMode, reason: CloseReason) {
        self.request_close(id, mode, reason);
    }

    fn evict(&mut self, id: ConnId, notice: &[u8]) {
        let Some(c) = lookup(&mut self.conns, id) else {
            return;
        };
        if c.has(CLOSING | LINGER) {
            return;
        }
        let output = &mut c.held().output;
        if output.started() {
            // The kernel has part of the first queued message: dropping its
            // rest would glue the notice into the middle of it. Keep the
            // queue; the notice follows it (the close deadline ends the
            // wait if the peer never reads).
        } else {
            output.clear();
        }
        output.extend(notice);
        if id == self.current {
            self.staging.clear();
        } else if !c.has(DIRTY) {
            c.flags |= DIRTY;
            self.dirty.push(id);
        }
        self.request_close(id, CloseMode::Flush, CloseReason::OutputLimit);
    }

    fn state(&self, id: ConnId) -> Option<(bool, bool)> {
        let c = self.get(id)?;
        let paused = c.has(PAUSED | BACKPRESSURED) || (id == self.current && self.output_full(c));
        Some((c.has(CLOSING | LINGER), paused))
    }

    fn count(&mut self, counter: Counter) {
        *counter.field(&mut self.stats) += 1;
    }

    fn frame_timeout(&self, id: ConnId) -> Option<Duration> {
        let c = self.get(id)?;
        self.limits[c.service as usize].frame_timeout
    }

    fn output_len(&self, id: ConnId) -> Option<usize> {
        let c = self.get(id)?;
        let staged = if id == self.current {
            self.staging.len()
        } else {
            0
        };
        Some(c.output_len() + staged)
    }

    fn peer(&self, id: ConnId) -> Option<&PeerAddr> {
        self.get(id).map(|c| &c.peer)
    }

    fn set_reading(&mut self, id: ConnId, on: bool) {
        let Some(c) = lookup(&mut self.conns, id) else {
            return;
        };
        if on {
            if c.has(PAUSED) {
                c.flags &= !PAUSED;
                if !c.input().is_empty() {
                    c.flags |= REDELIVER;
                }
                self.mark_ready(id);
            }
        } else {
            c.flags |= PAUSED;
        }
        if self.level {
            self.resync.push(id);
        }
    }

    fn set_idle_timeout(&mut self, id: ConnId, timeout: Option<Duration>) {
        self.set_idle(id, timeout);
    }

    fn set_timer(
        &mut self,
        service: usize,
        conn: ConnId,
        after: Duration,
        period: Option<Duration>,
    ) -> TimerId {
        let kind = TimerKind::User {
            service: service as u32,
            conn,
        };
        self.timers
            .insert(crate::timer::deadline(self.now, after), period, kind)
    }

    fn cancel_timer(&mut self, timer: TimerId) -> bool {
        self.timers.cancel(timer).is_some()
    }

    fn stop(&mut self) {
        self.stop_requested = true;
    }
}

#[cfg(test)]
mod size {
    use super::Conn;
    use crate::net::Stream;
    use std::mem::size_of;

    /// Every open connection costs one of these, idle or not: the idle
    /// memory target (256 bytes a connection, server-wide) starts here.
    /// 80 bytes in a release build; mio's stream carries a registry id in
    /// debug builds, so the stream is counted as the descriptor it is.
    #[test]
    fn a_connection_fits_in_80_bytes() {
        let fd = size_of::<std::os::fd::RawFd>().next_multiple_of(8);
        let size = size_of::<Conn>() - size_of::<Stream>() + fd;
        assert!(size <= 80, "{size}");
    }
}
