//! The service API: the only part of muxserve that protocol code sees.
//!
//! A [`Service`] value serves every connection of the listeners it is bound
//! to, so state shared between connections (a chat room) is a plain field.
//! Per-connection state is the associated [`Service::Session`] type; the
//! engine keeps it beside the connection and hands it back on every callback.
//!
//! Callbacks never block and never touch sockets. They ask the [`Context`]
//! to write, close or set timers, and the engine does the I/O once the
//! callback returns. That is what lets one service run unchanged on every
//! engine (see [`crate::engine`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::buffer::Input;
use crate::codec::{Encoder, FrameError};
use crate::timer::TimerId;

/// Names one connection for as long as it lives, and never a later one.
///
/// An id is a slot index plus a generation. When a connection closes its slot
/// may be reused, but the new connection gets a new generation, so a `ConnId`
/// kept after its connection closed matches nothing: writes to it are dropped
/// and [`Context::send`] returns `false`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    index: u32,
    gen: u32,
}

impl ConnId {
    /// An id that never names a connection. Service timers see it as
    /// [`Context::id`], since they belong to no connection.
    pub const NONE: ConnId = ConnId {
        index: u32::MAX,
        gen: u32::MAX,
    };

    pub(crate) fn new(index: usize, gen: u32) -> ConnId {
        ConnId {
            index: index as u32,
            gen,
        }
    }

    pub(crate) fn index(self) -> usize {
        self.index as usize
    }

    pub(crate) fn gen(self) -> u32 {
        self.gen
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == ConnId::NONE {
            f.write_str("#none")
        } else {
            write!(f, "#{}.{}", self.index, self.gen)
        }
    }
}

/// Where a peer is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    /// An IPv4 or IPv6 peer.
    Inet(SocketAddr),
    /// A Unix domain socket peer, with its path if it bound one (most
    /// stream clients do not).
    Unix(Option<PathBuf>),
}

impl PeerAddr {
    pub(crate) fn from_unix(addr: &std::os::unix::net::SocketAddr) -> PeerAddr {
        PeerAddr::Unix(addr.as_pathname().map(PathBuf::from))
    }

    /// The port of an Internet peer.
    pub fn port(&self) -> Option<u16> {
        match self {
            PeerAddr::Inet(a) => Some(a.port()),
            PeerAddr::Unix(_) => None,
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Inet(a) => write!(f, "{a}"),
            PeerAddr::Unix(Some(p)) => write!(f, "unix:{}", p.display()),
            PeerAddr::Unix(None) => f.write_str("unix:(unnamed)"),
        }
    }
}

/// Why a connection closed, as told to [`Service::on_close`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The service called [`Context::close`] (the default reaction to EOF).
    Closed,
    /// The service called [`Context::abort`].
    Aborted,
    /// Reading or writing failed, e.g. the peer reset the connection.
    Error(io::ErrorKind),
    /// No traffic for the idle timeout.
    IdleTimeout,
    /// A frame was started and not finished within the frame timeout.
    FrameTimeout,
    /// Pending output made no progress within the write timeout.
    WriteTimeout,
    /// The peer sent more unconsumed input than the listener allows.
    InputLimit,
    /// Pending output passed the listener's output cap.
    OutputLimit,
    /// The server shut down.
    Shutdown,
    /// A callback of the service panicked.
    Panic,
    /// The peer broke the protocol: a frame the codec rejects (a line too
    /// long, a length header past the limit), a failed handshake.
    ProtocolError,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Closed => f.write_str("closed"),
            CloseReason::Aborted => f.write_str("aborted"),
            CloseReason::Error(kind) => write!(f, "I/O error: {kind}"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::FrameTimeout => f.write_str("frame timeout"),
            CloseReason::WriteTimeout => f.write_str("write timeout"),
            CloseReason::InputLimit => f.write_str("input limit"),
            CloseReason::OutputLimit => f.write_str("output limit"),
            CloseReason::Shutdown => f.write_str("server shutdown"),
            CloseReason::Panic => f.write_str("service panicked"),
            CloseReason::ProtocolError => f.write_str("protocol error"),
        }
    }
}

/// Protocol code for a stream listener (TCP or Unix stream).
///
/// Only [`on_connect`](Service::on_connect) and [`on_data`](Service::on_data)
/// are required. A minimal echo:
///
/// ```
/// use muxserve::{Context, Input, Service};
///
/// struct Echo;
///
/// impl Service for Echo {
///     type Session = ();
///     fn on_connect(&mut self, _cx: &mut Context<'_>) {}
///     fn on_data(&mut self, cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
///         cx.write(input.take());
///     }
/// }
/// ```
pub trait Service {
    /// State kept for each connection, created by `on_connect`.
    type Session;

    /// A connection was accepted. Whatever is written here is sent first.
    fn on_connect(&mut self, cx: &mut Context<'_>) -> Self::Session;

    /// Bytes arrived. `input` holds every byte not consumed so far: half a
    /// message, or several. Consume what you handled
    /// ([`Input::consume`], [`Input::take`]); the rest is kept for the next
    /// call, up to the listener's input limit.
    fn on_data(&mut self, cx: &mut Context<'_>, session: &mut Self::Session, input: &mut Input<'_>);

    /// The peer shut down its sending side. By default the connection closes
    /// once everything queued for it has been sent, which is the right
    /// half-close behaviour for request/response protocols.
    fn on_eof(&mut self, cx: &mut Context<'_>, session: &mut Self::Session) {
        let _ = session;
        cx.close();
    }

    /// A timer set with [`Context::set_timer`] or [`Context::set_interval`]
    /// on this connection fired.
    fn on_timer(&mut self, cx: &mut Context<'_>, session: &mut Self::Session, timer: TimerId) {
        let _ = (cx, session, timer);
    }

    /// A service timer (set with [`Context::set_service_timer`]) fired.
    /// [`Context::id`] is [`ConnId::NONE`] here.
    fn on_service_timer(&mut self, cx: &mut Context<'_>, timer: TimerId) {
        let _ = (cx, timer);
    }

    /// The connection is gone; this is the last callback for it. Writes to
    /// it are dropped, but the service may still write to others.
    fn on_close(&mut self, cx: &mut Context<'_>, session: Self::Session, why: CloseReason) {
        let _ = (cx, session, why);
    }

    /// The server started a graceful shutdown: it no longer accepts, and
    /// keeps serving open connections until they finish or the grace period
    /// ends. Say goodbye here. [`Context::id`] is [`ConnId::NONE`].
    fn on_shutdown(&mut self, cx: &mut Context<'_>) {
        let _ = cx;
    }
}

/// The counters a service (rather than the engine) raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Counter {
    ProtocolError,
    FrameIn,
    FrameOut,
}

impl Counter {
    /// The field of `Stats` this counter adds to.
    pub(crate) fn field(self, stats: &mut crate::Stats) -> &mut u64 {
        match self {
            Counter::ProtocolError => &mut stats.protocol_errors,
            Counter::FrameIn => &mut stats.frames_in,
            Counter::FrameOut => &mut stats.frames_out,
        }
    }
}

/// How a connection should end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseMode {
    /// Send everything queued, then close.
    Flush,
    /// Close now, dropping queued output.
    Abort,
}

/// What an engine offers to [`Context`]. Each engine implements it over its
/// own connection table; services only ever see `Context`.
pub(crate) trait Driver {
    /// The time of the current loop turn.
    fn now(&self) -> Instant;
    /// Queues bytes for a connection. False if it is gone or closing.
    fn write(&mut self, to: ConnId, bytes: &[u8]) -> bool;
    /// Queues bytes for every open connection of `service` but `except`.
    fn broadcast(&mut self, service: usize, bytes: &[u8], except: Option<ConnId>) -> usize;
    /// Requests a close, carried out at the end of the loop turn.
    fn close(&mut self, id: ConnId, mode: CloseMode, reason: CloseReason);
    /// Replaces a connection's pending output with `notice` and closes it
    /// once that is sent (or the close deadline passes).
    fn evict(&mut self, id: ConnId, notice: &[u8]);
    /// Whether a close was requested, and whether reading is paused.
    fn state(&self, id: ConnId) -> Option<(bool, bool)>;
    /// Adds one to a counter services can raise.
    fn count(&mut self, counter: Counter);
    /// The frame timeout of a connection's listener.
    fn frame_timeout(&self, id: ConnId) -> Option<Duration>;
    /// Bytes queued for a connection and not yet accepted by the kernel.
    fn output_len(&self, id: ConnId) -> Option<usize>;
    /// The peer of a connection.
    fn peer(&self, id: ConnId) -> Option<&PeerAddr>;
    /// Stops or restarts reading a connection.
    fn set_reading(&mut self, id: ConnId, on: bool);
    /// Replaces a connection's idle timeout.
    fn set_idle_timeout(&mut self, id: ConnId, timeout: Option<Duration>);
    /// Arms a timer for a connection (or for the service when `id` is NONE).
    fn set_timer(
        &mut self,
        service: usize,
        id: ConnId,
        after: Duration,
        period: Option<Duration>,
    ) -> TimerId;
    /// Disarms a timer. False if it already fired (one-shot) or is unknown.
    fn cancel_timer(&mut self, timer: TimerId) -> bool;
    /// Starts a graceful shutdown of the whole server.
    fn stop(&mut self);
}

thread_local! {
    /// Where `send_frame` encodes, reused so a frame costs no allocation.
    static FRAME_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `FRAME_BUF` is shrunk back to this after an unusually large frame.
const FRAME_BUF_KEEP: usize = 64 * 1024;

/// The service's window on the engine during one callback.
///
/// Everything here is non-blocking: writes are queued and sent after the
/// callback returns, closes happen at the end of the loop turn.
pub struct Context<'a> {
    driver: &'a mut dyn Driver,
    id: ConnId,
    service: usize,
}

impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id)
            .field("service", &self.service)
            .finish()
    }
}

impl<'a> Context<'a> {
    pub(crate) fn new(driver: &'a mut dyn Driver, id: ConnId, service: usize) -> Context<'a> {
        Context {
            driver,
            id,
            service,
        }
    }

    /// The connection this callback is about ([`ConnId::NONE`] in service
    /// timers and `on_shutdown`).
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The peer of the current connection.
    pub fn peer(&self) -> Option<&PeerAddr> {
        self.driver.peer(self.id)
    }

    /// The time this loop turn started. Cheaper than `Instant::now()` and the
    /// same for every callback of the turn.
    pub fn now(&self) -> Instant {
        self.driver.now()
    }

    /// Queues bytes for the current connection. They are sent right after
    /// the callback returns, in one system call with any other writes made
    /// during the callback.
    pub fn write(&mut self, bytes: &[u8]) {
        self.driver.write(self.id, bytes);
    }

    /// Encodes `frame` with `encoder` and queues it for the current
    /// connection, counting it in the `frames_out` statistic. An `Err` means
    /// the encoder refused the frame (too long, or containing its
    /// delimiter); nothing was written.
    pub fn write_frame<E: Encoder + ?Sized>(
        &mut self,
        encoder: &mut E,
        frame: &[u8],
    ) -> Result<(), FrameError> {
        let id = self.id;
        self.send_frame(id, encoder, frame).map(drop)
    }

    /// Like [`write_frame`](Context::write_frame), for any connection;
    /// `Ok(false)` if it is gone or closing.
    pub fn send_frame<E: Encoder + ?Sized>(
        &mut self,
        to: ConnId,
        encoder: &mut E,
        frame: &[u8],
    ) -> Result<bool, FrameError> {
        FRAME_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            encoder.encode(frame, &mut buf)?;
            let sent = self.driver.write(to, &buf);
            if sent {
                self.driver.count(Counter::FrameOut);
            }
            if buf.capacity() > FRAME_BUF_KEEP {
                buf.shrink_to(FRAME_BUF_KEEP);
            }
            Ok(sent)
        })
    }

    /// Queues bytes for another connection of any service. Returns `false`
    /// (and drops the bytes) if that connection is gone or closing.
    pub fn send(&mut self, to: ConnId, bytes: &[u8]) -> bool {
        self.driver.write(to, bytes)
    }

    /// Queues bytes for every open connection of this service except
    /// `except`; returns how many connections got them.
    pub fn broadcast(&mut self, bytes: &[u8], except: Option<ConnId>) -> usize {
        self.driver.broadcast(self.service, bytes, except)
    }

    /// Closes the current connection once its queued output has been sent.
    /// Later writes to it are dropped.
    pub fn close(&mut self) {
        self.driver
            .close(self.id, CloseMode::Flush, CloseReason::Closed);
    }

    /// Closes the current connection now, dropping any queued output.
    pub fn abort(&mut self) {
        self.driver
            .close(self.id, CloseMode::Abort, CloseReason::Aborted);
    }

    /// Closes another connection once its queued output has been sent.
    pub fn close_conn(&mut self, id: ConnId) {
        self.driver.close(id, CloseMode::Flush, CloseReason::Closed);
    }

    /// Closes the current connection after its output, telling `on_close`,
    /// the counters and the logs why (a protocol error, say), instead of
    /// the plain [`CloseReason::Closed`] of [`close`](Context::close).
    pub fn close_with(&mut self, reason: CloseReason) {
        self.driver.close(self.id, CloseMode::Flush, reason);
    }

    /// Evicts a connection that cannot keep up: its pending output is
    /// replaced by `notice` (a last word it may or may not get), and it is
    /// closed with [`CloseReason::OutputLimit`].
    pub fn evict(&mut self, id: ConnId, notice: &[u8]) {
        self.driver.evict(id, notice);
    }

    /// True once a close of the current connection was requested; later
    /// writes to it are dropped.
    pub fn is_closing(&self) -> bool {
        self.driver
            .state(self.id)
            .is_none_or(|(closing, _)| closing)
    }

    /// True while reading the current connection is paused.
    pub fn is_paused(&self) -> bool {
        self.driver.state(self.id).is_some_and(|(_, paused)| paused)
    }

    /// Counts a protocol error (bad frame, bad command) in the server's
    /// stats.
    pub fn protocol_error(&mut self) {
        self.driver.count(Counter::ProtocolError);
    }

    pub(crate) fn frame_in(&mut self) {
        self.driver.count(Counter::FrameIn);
    }

    /// The frame timeout of the current connection's listener.
    pub(crate) fn frame_timeout(&self) -> Option<Duration> {
        self.driver.frame_timeout(self.id)
    }

    /// Bytes queued for the current connection that the kernel has not taken
    /// yet (0 when everything went out).
    pub fn output_len(&self) -> usize {
        self.driver.output_len(self.id).unwrap_or(0)
    }

    /// Bytes queued for any connection, `None` if it is gone.
    pub fn output_len_of(&self, id: ConnId) -> Option<usize> {
        self.driver.output_len(id)
    }

    /// Stops reading the current connection until [`resume_reading`]
    /// (input stays in the kernel, which pushes back on the peer).
    ///
    /// [`resume_reading`]: Context::resume_reading
    pub fn pause_reading(&mut self) {
        self.driver.set_reading(self.id, false);
    }

    /// Resumes reading after [`pause_reading`](Context::pause_reading).
    pub fn resume_reading(&mut self) {
        self.driver.set_reading(self.id, true);
    }

    /// Replaces the idle timeout of the current connection (`None` turns it
    /// off). A chat member, for example, may stay silent for hours.
    pub fn set_idle_timeout(&mut self, timeout: Option<Duration>) {
        self.driver.set_idle_timeout(self.id, timeout);
    }

    /// Calls [`Service::on_timer`] for the current connection once, `after`
    /// from now. The timer dies with the connection.
    pub fn set_timer(&mut self, after: Duration) -> TimerId {
        self.driver.set_timer(self.service, self.id, after, None)
    }

    /// Calls [`Service::on_timer`] for the current connection every `period`
    /// until cancelled or the connection closes.
    pub fn set_interval(&mut self, period: Duration) -> TimerId {
        self.driver
            .set_timer(self.service, self.id, period, Some(period))
    }

    /// Calls [`Service::on_service_timer`] once after `after`, or every
    /// `after` if `repeat` is true. It belongs to no connection.
    pub fn set_service_timer(&mut self, after: Duration, repeat: bool) -> TimerId {
        let period = repeat.then_some(after);
        self.driver
            .set_timer(self.service, ConnId::NONE, after, period)
    }

    /// Disarms a timer. Returns false if it already fired (one-shot) or was
    /// cancelled before.
    pub fn cancel_timer(&mut self, timer: TimerId) -> bool {
        self.driver.cancel_timer(timer)
    }

    /// Starts a graceful shutdown of the whole server.
    pub fn stop_server(&mut self) {
        self.driver.stop();
    }
}

/// Protocol code for a datagram socket (UDP or Unix datagram): one callback
/// per datagram, with the sender's address.
///
/// ```
/// use muxserve::service::{DatagramContext, DatagramService};
/// use muxserve::PeerAddr;
///
/// /// Answers every datagram with its length.
/// struct Size;
///
/// impl DatagramService for Size {
///     fn on_datagram(&mut self, cx: &mut DatagramContext<'_>, _from: &PeerAddr, data: &[u8]) {
///         cx.reply(data.len().to_string().as_bytes());
///     }
/// }
/// ```
pub trait DatagramService {
    /// A datagram arrived, whole: datagrams that did not fit the receive
    /// buffer are dropped (and counted) before they get here.
    fn on_datagram(&mut self, cx: &mut DatagramContext<'_>, from: &PeerAddr, data: &[u8]);

    /// How often this service answers one source, given the server's
    /// [`Config::reply_budget`](crate::Config::reply_budget). The default
    /// keeps it. A service whose answer does not depend on the request
    /// (daytime, time) has nothing new to say more than once a second and
    /// may answer far less often.
    fn reply_budget(&self, server: crate::config::ReplyBudget) -> crate::config::ReplyBudget {
        server
    }
}

/// What an engine offers a [`DatagramContext`].
pub(crate) trait DatagramDriver {
    fn now(&self) -> Instant;
    fn send_to(&mut self, to: &PeerAddr, bytes: &[u8]) -> bool;
    fn stop(&mut self);
}

/// The datagram service's window on the engine during one callback.
///
/// Replies are sent at once (a datagram is sent whole or not at all); if
/// the kernel's buffer is full the reply is dropped, as UDP may drop it
/// anywhere on the way, and counted.
pub struct DatagramContext<'a> {
    driver: &'a mut dyn DatagramDriver,
    from: &'a PeerAddr,
}

impl fmt::Debug for DatagramContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramContext")
            .field("from", self.from)
            .finish()
    }
}

impl<'a> DatagramContext<'a> {
    pub(crate) fn new(
        driver: &'a mut dyn DatagramDriver,
        from: &'a PeerAddr,
    ) -> DatagramContext<'a> {
        DatagramContext { driver, from }
    }

    /// Sends `bytes` back to the sender. False if it could not be sent.
    pub fn reply(&mut self, bytes: &[u8]) -> bool {
        let from = self.from;
        self.driver.send_to(from, bytes)
    }

    /// Sends `bytes` to any address. False if it could not be sent.
    pub fn send_to(&mut self, to: &PeerAddr, bytes: &[u8]) -> bool {
        self.driver.send_to(to, bytes)
    }

    /// The time this loop turn started.
    pub fn now(&self) -> Instant {
        self.driver.now()
    }

    /// Starts a graceful shutdown of the whole server.
    pub fn stop_server(&mut self) {
        self.driver.stop();
    }
}
