//! Datagram services, served the same way by every engine.
//!
//! A datagram has no connection, so there is no session and no buffering:
//! each one that arrives is counted, screened and handed to the service,
//! whose replies are sent at once. The loop engines call [`serve`] for
//! each datagram a readable socket yields; the thread engine gives each
//! datagram socket a thread that waits in poll(2) and calls the same
//! function.
//!
//! # Reflection
//!
//! UDP has no handshake, so the source address of a datagram is whatever
//! the sender wrote into it. A datagram forged "from" another server that
//! answers anything (or from one of our own sockets) makes the two answer
//! each other for ever, one datagram in flight, as fast as the network
//! allows. Three defences, in the order they apply:
//!
//! 1. A datagram from one of this server's own bound addresses, or from a
//!    classic reflector port ([`REFLECTOR_PORTS`]), is never answered.
//! 2. Each socket answers one source at most [`ReplyBudget`] times: a
//!    burst, then a steady rate (a token bucket per source address). A
//!    ping-pong has one datagram in flight, so the first reply the budget
//!    refuses ends it.
//! 3. All sockets together answer at most
//!    [`Config::reply_budget_total`](crate::Config::reply_budget_total)
//!    datagrams a second, whatever the sources claim to be.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{contain, LogEvery};
use crate::config::{ReplyBudget, MAX_DATAGRAM, REFLECTOR_PORTS};
use crate::net::{DgramSocket, Endpoint};
use crate::service::{DatagramContext, DatagramDriver, DatagramService, PeerAddr};
use crate::stats::Stats;

/// Sources one socket keeps a bucket for. Past it, buckets that have
/// refilled (as good as new) are forgotten; if none has, a new source is
/// not answered until one does, so a spray of forged sources costs memory
/// no larger than this.
const MAX_SOURCES: usize = 4096;

/// A refused reply is logged at most this often (and always counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A token bucket: `tokens` replies may go now, refilled at the budget's
/// rate up to its burst.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(budget: ReplyBudget, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(budget.burst),
            at: now,
        }
    }

    fn refill(&mut self, budget: ReplyBudget, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * f64::from(budget.per_second)).min(f64::from(budget.burst));
        self.at = now;
    }

    /// Takes one token if there is one.
    fn take(&mut self, budget: ReplyBudget, now: Instant) -> bool {
        self.refill(budget, now);
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }
}

/// What every datagram socket of one server shares: the addresses the
/// server is bound to, the budget over all sources, and the warning's
/// rate limit.
#[derive(Debug)]
pub(crate) struct Guard {
    /// Every address a listener or datagram socket of this server is
    /// bound to.
    own: Vec<SocketAddr>,
    total: Option<(ReplyBudget, Bucket)>,
    warned: LogEvery,
}

impl Guard {
    /// `total` replies a second over all sources (0: no cap).
    pub(crate) fn new(total: u32) -> Guard {
        let budget = ReplyBudget {
            burst: total,
            per_second: total,
        };
        Guard {
            own: Vec::new(),
            total: (total > 0).then(|| (budget, Bucket::full(budget, Instant::now()))),
            warned: LogEvery::default(),
        }
    }

    /// Remembers an address this server is bound to.
    pub(crate) fn bound(&mut self, endpoint: &Endpoint) {
        if let Some(addr) = endpoint.socket_addr() {
            self.own.push(addr);
        }
    }

    /// Whether `peer` is one of this server's own addresses. A socket bound
    /// to the unspecified address (0.0.0.0, ::) owns its port on every
    /// local address, so any source with that port counts as ours.
    fn is_own(&self, peer: &PeerAddr) -> bool {
        let PeerAddr::Inet(from) = peer else {
            return false;
        };
        self.own.iter().any(|a| {
            a.port() == from.port()
                && (a.ip() == from.ip()
                    || (a.ip().is_unspecified() && a.is_ipv4() == from.is_ipv4()))
        })
    }

    fn warn(&mut self, now: Instant, to: &PeerAddr, why: &str) {
        if self.warned.due(now, WARN_EVERY) {
            log::warn!(
                "not answering {to}: {why} (a reflection loop or a flood?); \
                 counted in reply_budget_drops, logged once per {WARN_EVERY:?}"
            );
        }
    }
}

/// One socket's budget per source.
#[derive(Debug)]
pub(crate) struct Replies {
    budget: ReplyBudget,
    buckets: HashMap<SocketAddr, Bucket>,
}

impl Replies {
    /// `budget` per source; a rate of 0 turns the budget off.
    pub(crate) fn new(budget: ReplyBudget) -> Replies {
        Replies {
            budget,
            buckets: HashMap::new(),
        }
    }

    /// Whether a reply to `to` is within its budget (and takes it).
    fn allow(&mut self, to: &SocketAddr, now: Instant) -> bool {
        let budget = self.budget;
        if budget.per_second == 0 {
            return true;
        }
        if !self.buckets.contains_key(to) && self.buckets.len() >= MAX_SOURCES {
            // Forget the sources that have refilled: a new bucket would be
            // the same.
            self.buckets.retain(|_, b| {
                b.refill(budget, now);
                b.tokens < f64::from(budget.burst)
            });
            if self.buckets.len() >= MAX_SOURCES {
                return false;
            }
        }
        self.buckets
            .entry(*to)
            .or_insert_with(|| Bucket::full(budget, now))
            .take(budget, now)
    }
}

/// What a datagram service can do during one callback: reply (sent at
/// once, within the budgets) and ask the server to stop.
struct DgramIo<'a> {
    socket: &'a DgramSocket,
    replies: &'a mut Replies,
    guard: &'a mut Guard,
    stats: &'a mut Stats,
    now: Instant,
    stop: &'a mut bool,
}

impl DgramIo<'_> {
    /// Whether a datagram may go to `to` now; counts and warns if not.
    fn permitted(&mut self, to: &PeerAddr) -> bool {
        if self.guard.is_own(to) {
            self.stats.reflection_drops += 1;
            return false;
        }
        let PeerAddr::Inet(addr) = to else {
            // A Unix datagram peer is a local process with a path: it can
            // not forge another's.
            return true;
        };
        let now = self.now;
        if !self.replies.allow(addr, now) {
            self.stats.reply_budget_drops += 1;
            let b = self.replies.budget;
            let why = format!(
                "more than {} replies, then {}/s, to one source",
                b.burst, b.per_second
            );
            self.guard.warn(now, to, &why);
            return false;
        }
        if let Some((budget, bucket)) = &mut self.guard.total {
            let budget = *budget;
            if !bucket.take(budget, now) {
                self.stats.reply_budget_drops += 1;
                let why = format!("more than {}/s replies in all", budget.per_second);
                self.guard.warn(now, to, &why);
                return false;
            }
        }
        true
    }
}

impl DatagramDriver for DgramIo<'_> {
    fn now(&self) -> Instant {
        self.now
    }

    fn send_to(&mut self, to: &PeerAddr, bytes: &[u8]) -> bool {
        if !self.permitted(to) {
            return false;
        }
        loop {
            match self.socket.send_to(bytes, to) {
                Ok(n) => {
                    self.stats.datagrams_out += 1;
                    self.stats.bytes_out += n as u64;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock: the socket buffer is full. Datagrams may be
                // lost anywhere; this one is lost here.
                Err(e) => {
                    log::debug!("reply to {to}: {e}");
                    return false;
                }
            }
        }
    }

    fn stop(&mut self) {
        *self.stop = true;
    }
}

/// Where a datagram arrived and what it may cost: the socket, its budget
/// per source, the server-wide guard.
pub(crate) struct Endpoints<'a> {
    pub socket: &'a DgramSocket,
    pub replies: &'a mut Replies,
    pub guard: &'a mut Guard,
}

/// Serves one datagram that arrived at `at` from `from`.
///
/// `data` is what `recv_from` returned into a buffer one byte longer than
/// [`MAX_DATAGRAM`], so a datagram that did not fit shows up as too long
/// and is dropped (never answered in part). A datagram from a reflector
/// port or from this server itself is dropped too. Counters go to `stats`;
/// a service asking the server to stop sets `stop`. Returns the panic
/// message if the callback panicked.
pub(crate) fn serve(
    handler: &mut dyn DatagramService,
    at: Endpoints<'_>,
    stats: &mut Stats,
    now: Instant,
    stop: &mut bool,
    from: &PeerAddr,
    data: &[u8],
) -> Result<(), String> {
    stats.datagrams_in += 1;
    stats.bytes_in += data.len() as u64;
    if data.len() > MAX_DATAGRAM {
        stats.oversize_datagrams += 1;
        return Ok(());
    }
    if from.port().is_some_and(|p| REFLECTOR_PORTS.contains(&p)) || at.guard.is_own(from) {
        stats.reflection_drops += 1;
        return Ok(());
    }
    let mut io = DgramIo {
        socket: at.socket,
        replies: at.replies,
        guard: at.guard,
        stats,
        now,
        stop,
    };
    contain(|| handler.on_datagram(&mut DatagramContext::new(&mut io, from), from, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let budget = ReplyBudget {
            burst: 3,
            per_second: 10,
        };
        let mut replies = Replies::new(budget);
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let t0 = Instant::now();
        let allowed = (0..10).filter(|_| replies.allow(&to, t0)).count();
        assert_eq!(allowed, 3);
        // 10 a second: one more after 100 ms, not before.
        assert!(!replies.allow(&to, t0 + Duration::from_millis(50)));
        assert!(replies.allow(&to, t0 + Duration::from_millis(150)));
        // Another source has its own bucket.
        let other: SocketAddr = "127.0.0.1:10".parse().unwrap();
        assert!(replies.allow(&other, t0));
    }

    #[test]
    fn a_rate_of_zero_is_no_budget() {
        let mut replies = Replies::new(ReplyBudget {
            burst: 0,
            per_second: 0,
        });
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!((0..1000).all(|_| replies.allow(&to, Instant::now())));
    }

    #[test]
    fn the_source_table_is_bounded() {
        let budget = ReplyBudget {
            burst: 1,
            per_second: 1,
        };
        let mut replies = Replies::new(budget);
        let now = Instant::now();
        for port in 0..MAX_SOURCES as u16 {
            let to = SocketAddr::from(([127, 0, 0, 1], port + 1));
            assert!(replies.allow(&to, now));
        }
        let late = SocketAddr::from(([127, 0, 0, 2], 1));
        assert!(!replies.allow(&late, now), "every bucket is in use");
        assert!(replies.buckets.len() <= MAX_SOURCES);
        // Two seconds later every bucket has refilled and may go.
        assert!(replies.allow(&late, now + Duration::from_secs(2)));
        assert!(replies.buckets.len() <= MAX_SOURCES);
    }

    #[test]
    fn own_addresses_include_every_local_address_of_a_wildcard_bind() {
        let mut guard = Guard::new(0);
        guard.bound(&Endpoint::Udp("127.0.0.1:7007".parse().unwrap()));
        guard.bound(&Endpoint::Tcp("0.0.0.0:6667".parse().unwrap()));
        let own = |a: &str| guard.is_own(&PeerAddr::Inet(a.parse().unwrap()));
        assert!(own("127.0.0.1:7007"));
        assert!(!own("127.0.0.2:7007"));
        assert!(own("127.0.0.9:6667"));
        assert!(!own("[::1]:6667"));
        assert!(!own("127.0.0.1:7008"));
    }
}
