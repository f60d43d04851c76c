//! Limits and defaults for a server exposed to strangers.
//!
//! Every number here says why it is what it is and what happens past it.
//! [`Config`] is server-wide; [`Limits`] can differ per listener.
//!
//! Every duration here (and every one a service passes to a timer) may be
//! as large as `Duration::MAX`: deadlines are computed with
//! [`timer::deadline`](crate::timer::deadline), which saturates about 100
//! years ahead, so a huge timeout means "never" instead of an overflow
//! panic. The command line is stricter and refuses anything above
//! one year (see `muxserve serve --help`).

use std::time::Duration;

/// Per-listener limits: what one connection may cost.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Close a connection after this long with no bytes in either direction.
    /// Default 300 s (nginx's keepalive order of magnitude); `None` is off.
    /// Services can change it per connection (chat members turn it off).
    /// On the loop engines a timeout over `u32::MAX` milliseconds (about 49
    /// days) counts as off.
    pub idle_timeout: Option<Duration>,
    /// Close a connection whose message (line, frame) was started and not
    /// finished this long after its first byte: the defence against the
    /// slow-loris client that sends a byte a second, which an idle timeout
    /// never sees. Applies to services behind [`Framed`](crate::framed::Framed).
    /// Default 10 s (nginx's `client_header_timeout` is 60 s; messages here
    /// are small); `None` is off.
    pub frame_timeout: Option<Duration>,
    /// Stop reading a connection whose pending output passes this, so a peer
    /// that sends without reading cannot make the server buffer without
    /// bound. Default 64 KiB (Twisted's and asyncio's high-water mark).
    pub output_high_water: usize,
    /// Resume reading once pending output falls to this. Default 16 KiB.
    pub output_low_water: usize,
    /// Close (with [`CloseReason::OutputLimit`](crate::CloseReason)) a
    /// connection whose pending output passes this anyway, e.g. because
    /// other connections keep sending to it. Default 16 MiB; services that
    /// fan out (chat) set tighter caps of their own.
    pub max_output: usize,
    /// Close (with [`CloseReason::InputLimit`](crate::CloseReason)) a
    /// connection that has more unconsumed input than this: the service is
    /// waiting for a frame larger than any it accepts. Default 1 MiB plus
    /// one read chunk, just above the largest default frame.
    pub max_input: usize,
    /// The kernel send buffer (`SO_SNDBUF`) of each connection, set on the
    /// listener so accepted sockets inherit it at no cost per accept.
    /// `None` (the default) leaves it to the kernel, which on Linux grows it
    /// up to about 4 MiB: that much output can sit in the kernel for a peer
    /// that never reads before the server's own buffer (and its caps) see
    /// anything. Set it lower where memory per connection matters more than
    /// bulk throughput.
    pub send_buffer: Option<usize>,
    /// Give up on a peer whose pending output makes no progress for this
    /// long. Default 30 s (HAProxy's `timeout client` order); `None` is
    /// off. Every engine, the thread engine included, measures it from the
    /// last byte the kernel took.
    pub write_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle_timeout: Some(Duration::from_secs(300)),
            frame_timeout: Some(Duration::from_secs(10)),
            output_high_water: 64 * 1024,
            output_low_water: 16 * 1024,
            max_output: 16 * 1024 * 1024,
            max_input: 1024 * 1024 + READ_CHUNK,
            send_buffer: None,
            write_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// How many bytes one `read` asks for. One buffer of this size serves the
/// whole loop, so its size costs nothing per connection: 64 KiB matches the
/// largest loopback segment and the largest UDP datagram.
pub const READ_CHUNK: usize = 64 * 1024;

/// How many bytes one `read` asks for in a turn that woke for one source
/// only. With a single busy peer there is no other connection to overlap
/// with: reading a 64 KiB burst whole and answering it whole makes the
/// peer and the server take turns, one core idle at a time. A quarter of
/// that sends the first replies back while the rest is still being read.
/// Measured (1 connection, 4 KiB requests, 16 in flight): 0.53x of tokio's
/// requests/s with 64 KiB reads, 0.85-1.12x with this; with 10 connections
/// the larger reads stay (1.7x tokio's, where 16 KiB reads gave 0.96x).
pub const READ_CHUNK_ALONE: usize = 16 * 1024;

/// The largest datagram served. The loop reads datagrams into a buffer one
/// byte larger, so a longer one shows up as too long instead of being
/// silently cut; it is dropped and counted, never answered in part. UDP over
/// IPv4 carries at most 65,507 bytes, so only Unix datagrams can be larger.
pub const MAX_DATAGRAM: usize = 65_536;

/// Datagrams read per socket per wakeup before others get a turn.
pub const DATAGRAMS_PER_WAKEUP: usize = 64;

/// Source ports of the classic UDP services that answer anything (echo,
/// daytime, chargen, time). A datagram "from" one of them is most likely
/// forged to make two servers bounce replies at each other for ever, so it
/// is dropped and counted instead of answered.
pub const REFLECTOR_PORTS: [u16; 4] = [7, 13, 19, 37];

/// How often one datagram socket answers one source address: a token
/// bucket that holds `burst` replies and refills at `per_second`.
///
/// It exists to end reflection loops: a datagram forged "from" another
/// server that answers anything makes the two answer each other with one
/// datagram in flight, every round trip (tens of microseconds on
/// loopback). The first reply the bucket refuses ends such a chain, so it
/// dies within about `burst` exchanges. It also caps one legitimate source
/// at `per_second` replies once its burst is spent: a client that needs
/// more from one address should use a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyBudget {
    /// Replies one source may get at once, with no wait. Default 64.
    pub burst: u32,
    /// Replies a second after that. Default 1,000; 0 turns the budget off.
    pub per_second: u32,
}

impl ReplyBudget {
    /// The default: a burst of 64, then 1,000 replies a second per source.
    pub const DEFAULT: ReplyBudget = ReplyBudget {
        burst: 64,
        per_second: 1000,
    };

    /// No budget: every datagram may be answered.
    pub const OFF: ReplyBudget = ReplyBudget {
        burst: 0,
        per_second: 0,
    };

    /// Whether this budget limits anything.
    pub fn is_off(&self) -> bool {
        self.per_second == 0
    }

    /// This budget, tightened to at most `burst` and `per_second`; a
    /// budget that is off stays off (the operator turned it off).
    pub fn at_most(self, burst: u32, per_second: u32) -> ReplyBudget {
        if self.is_off() {
            return self;
        }
        ReplyBudget {
            burst: self.burst.min(burst),
            per_second: self.per_second.min(per_second).max(1),
        }
    }
}

impl Default for ReplyBudget {
    fn default() -> ReplyBudget {
        ReplyBudget::DEFAULT
    }
}

/// What a panic in a service callback does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PanicPolicy {
    /// Close the connection the callback was about (a service or shutdown
    /// callback has none), count and log it, keep serving. The default: a
    /// bug triggered by one client costs that client only.
    #[default]
    CloseConnection,
    /// Also start a graceful shutdown, for services whose shared state
    /// cannot be trusted after a panic.
    Shutdown,
}

/// Server-wide settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Most connections open at once; past it a new connection gets one
    /// error line and is closed. Default 10,000 (Redis's `maxclients`),
    /// clamped at start to `RLIMIT_NOFILE` minus [`FD_RESERVE`].
    pub max_connections: usize,
    /// The listen backlog. Default 1024: mio's own listeners use 128, which
    /// overflows under a burst of connects and costs clients 1 s SYN
    /// retransmits.
    pub backlog: i32,
    /// Accepts per listener per wakeup before other sources get a turn
    /// (the listener stays on the still-ready list). Default 64.
    pub accepts_per_wakeup: usize,
    /// Reads (of [`READ_CHUNK`], or [`READ_CHUNK_ALONE`] in a turn with a
    /// single ready source) per connection per wakeup before others get a
    /// turn. Default 4 (256 KiB, or 64 KiB when nothing else is waiting).
    pub reads_per_wakeup: usize,
    /// After a graceful shutdown starts, how long open connections may
    /// finish on their own before they are flushed and closed. Default 5 s.
    pub grace: Duration,
    /// After the server closes a connection the peer has not finished
    /// sending on, how long to read and discard its input so the close is a
    /// FIN and not a reset that could destroy the last reply. Default 2 s.
    /// Refused clients (see `max_connections`, `max_per_source`) linger
    /// the same way, so one that talked first still reads its notice.
    pub linger: Duration,
    /// The most input a closing connection may send while it lingers;
    /// past it, the connection is reset. Default 256 KiB: a request or two
    /// already in flight fits many times over, while a peer that keeps
    /// sending to a connection we closed is flooding it, and reading its
    /// flood for the whole linger time would cost every other client. The
    /// loop engines also read a lingering connection at most
    /// [`READ_CHUNK_ALONE`] a turn, so it never delays a turn by more
    /// than one read.
    pub linger_bytes: usize,
    /// Most connections one source address may hold at once (nginx's
    /// `limit_conn`, HAProxy's `src_conn_cur`); past it a new connection
    /// from that address gets one error line and is closed, like one past
    /// `max_connections`, and is counted in `rejected_per_source`. A
    /// source is a whole IPv4 or IPv6 address; Unix-socket peers are not
    /// counted. Default 0, no cap: clients behind one NAT, or a benchmark
    /// on loopback, share one address, so only the operator knows a safe
    /// figure.
    pub max_per_source: usize,
    /// Set `TCP_NODELAY` on accepted TCP connections, so small replies leave
    /// at once instead of waiting for an ACK. Default true.
    pub nodelay: bool,
    /// What a panicking service callback does. Default: close that
    /// connection only.
    pub on_panic: PanicPolicy,
    /// Descriptors kept free when `max_connections` is clamped to
    /// `RLIMIT_NOFILE`, for listeners, logs and the poller. Default
    /// [`FD_RESERVE`].
    pub fd_reserve: usize,
    /// Log the counters this often (`None`: only at shutdown).
    pub stats_interval: Option<Duration>,
    /// Limits for listeners that do not bring their own.
    pub limits: Limits,
    /// How often each datagram socket answers one source address (see
    /// [`ReplyBudget`]). Services whose answer ignores the request
    /// (daytime, time) tighten it for themselves
    /// ([`DatagramService::reply_budget`](crate::service::DatagramService::reply_budget)).
    pub reply_budget: ReplyBudget,
    /// Datagrams a second all datagram sockets together may send, whatever
    /// the sources; 0 is no cap. Default 100,000: far above what a
    /// legitimate UDP service here sees, far below what a reflection flood
    /// of many forged sources would make the server send.
    pub reply_budget_total: u32,
}

/// Default descriptors kept free for listeners, log files and the poller
/// when `max_connections` is clamped to `RLIMIT_NOFILE` (Redis keeps 32).
pub const FD_RESERVE: usize = 32;

impl Default for Config {
    fn default() -> Config {
        Config {
            max_connections: 10_000,
            backlog: 1024,
            accepts_per_wakeup: 64,
            reads_per_wakeup: 4,
            grace: Duration::from_secs(5),
            linger: Duration::from_secs(2),
            linger_bytes: 256 * 1024,
            max_per_source: 0,
            nodelay: true,
            on_panic: PanicPolicy::default(),
            fd_reserve: FD_RESERVE,
            stats_interval: None,
            limits: Limits::default(),
            reply_budget: ReplyBudget::DEFAULT,
            reply_budget_total: 100_000,
        }
    }
}

impl Config {
    /// `max_connections` clamped to what the descriptor limit allows.
    pub fn effective_max_connections(&self) -> usize {
        match fd_limit() {
            Some(limit) => self
                .max_connections
                .min(limit.saturating_sub(self.fd_reserve)),
            None => self.max_connections,
        }
    }
}

/// The soft `RLIMIT_NOFILE`, if it is finite.
fn fd_limit() -> Option<usize> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    (rc == 0 && rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur as usize)
}
