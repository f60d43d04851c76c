//! HMAC challenge–response authentication in front of any [`Service`].
//!
//! [`Authenticated`] runs a handshake before the wrapped service sees the
//! connection; [`client_handshake`] is the other side, for a std
//! `TcpStream`. Both sides hold the same secret key; it never crosses the
//! wire.
//!
//! # Wire format
//!
//! ```text
//! server -> client   challenge   40 bytes
//!     0..8    "MUXAUTH1"            protocol tag and version
//!     8..40   Ns                    server nonce, 32 bytes from the OS RNG
//!
//! client -> server   response    72 bytes
//!     0..8    "MUXAUTH1"
//!     8..40   Nc                    client nonce, 32 bytes from the OS RNG
//!     40..72  HMAC-SHA256(key, "MUXAUTH1" || Ns || Nc || "client->server")
//!
//! server -> client   on success  32 bytes, then the service's own bytes
//!     0..32   HMAC-SHA256(key, "MUXAUTH1" || Nc || Ns || "server->client")
//!
//! server -> client   on failure  one line, then the server closes
//!     "error: authentication failed\r\n"
//! ```
//!
//! Why each piece is there:
//!
//! - A fresh server nonce per connection: an answer recorded on one
//!   connection is worthless on the next (replay).
//! - Direction labels and nonce order differ per direction, so the
//!   server's proof can never be used as a client answer, and the server's
//!   own challenge sent back to it (reflection) fails; a client nonce equal
//!   to the server's is refused outright.
//! - The client nonce lets the client check the server too (mutual
//!   authentication): only a holder of the key can compute the server's
//!   proof for a nonce the client chose.
//! - The comparison is constant-time (`hmac`'s `verify_slice`), and every
//!   failure, whatever its cause, gets the same line, so a client learns
//!   nothing about why.
//! - Bytes after the 72-byte response are the service's: a client may send
//!   its first request right behind its answer.
//!
//! # Limits
//!
//! Before authentication a client can make the server hold at most the
//! 72-byte response ([`PRE_AUTH_LIMIT`]); it has [`AUTH_TIMEOUT`] to send
//! it (from the moment the challenge goes out). A client that sends
//! anything before its challenge has failed.
//!
//! # Throttling guesses
//!
//! An [`AuthThrottle`] slows key guessing per source IP address (Unix
//! peers have none and are not throttled). Its policy, [`ThrottlePolicy`],
//! in short, with the defaults:
//!
//! - An attempt is counted when it *starts* (when the connection
//!   arrives), not when it fails, so parallel attempts are counted as
//!   surely as sequential ones; an attempt that succeeds is refunded.
//! - The first [`free`](ThrottlePolicy::free) (3) counted attempts of an
//!   address go at once. After that, consecutive attempts from the address
//!   are spaced out: the challenge of the next one is held back by
//!   [`base`](ThrottlePolicy::base) (100 ms), doubling with each counted
//!   attempt up to [`cap`](ThrottlePolicy::cap) (5 s). Ten failures in, an
//!   address gets one guess every 5 s: 720 an hour, however many
//!   connections it opens.
//! - Nobody is locked out. A client with the right key behind the same
//!   address (a NAT, a shared proxy) is not refused: it gets the next free
//!   turn of its address, like everyone there, and gets in, only later. An
//!   attempt whose turn would be more than
//!   [`max_wait`](ThrottlePolicy::max_wait) (30 s) away is refused at once
//!   with the failure line instead of being held (counted as
//!   [`throttled`](AuthCounters::throttled)); it may try again.
//! - An address is forgotten [`forget`](ThrottlePolicy::forget) (10 min)
//!   after its last attempt.
//!
//! Every [`Authenticated`] service has a throttle of its own; give the
//! services of one server the same one ([`Authenticated::throttle`]), as
//! `muxserve serve` does, so an address guessing on several listeners is
//! counted once.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::buffer::Input;
use crate::service::{CloseReason, Context, PeerAddr, Service};
use crate::timer::TimerId;

/// Protocol tag and version, first on the wire in both directions.
pub const TAG: &[u8; 8] = b"MUXAUTH1";
/// Size of a nonce.
pub const NONCE_LEN: usize = 32;
/// Size of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Size of the server's challenge.
pub const CHALLENGE_LEN: usize = TAG.len() + NONCE_LEN;
/// Size of the client's response, and so the most a client can make the
/// server hold before it has authenticated.
pub const RESPONSE_LEN: usize = TAG.len() + NONCE_LEN + MAC_LEN;
/// See [`RESPONSE_LEN`].
pub const PRE_AUTH_LIMIT: usize = RESPONSE_LEN;
/// The one answer to every failed handshake.
pub const FAILED: &[u8] = b"error: authentication failed\r\n";
/// How long a client has to answer the challenge. Default 5 s.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses remembered for throttling. When the table is full, addresses
/// not seen within [`ThrottlePolicy::forget`] are dropped (at most once a
/// second); if it is still full, new addresses go untracked, so a flood of
/// addresses can neither grow the table without bound nor wash out the
/// addresses already being slowed.
const THROTTLE_TABLE: usize = 10_000;

const CLIENT_LABEL: &[u8] = b"client->server";
const SERVER_LABEL: &[u8] = b"server->client";
/// Shortest key accepted: 16 bytes, 128 bits.
pub const MIN_KEY_LEN: usize = 16;

/// A shared secret. Wiped from memory when dropped, and never printed.
#[derive(Clone)]
pub struct Key(Zeroizing<Vec<u8>>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(redacted)")
    }
}

impl Key {
    /// A key from bytes; at least [`MIN_KEY_LEN`] of them.
    pub fn new(bytes: Vec<u8>) -> io::Result<Key> {
        let bytes = Zeroizing::new(bytes);
        if bytes.len() < MIN_KEY_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an authentication key needs at least {MIN_KEY_LEN} bytes"),
            ));
        }
        Ok(Key(bytes))
    }

    /// Reads a key from a file; one trailing newline is not part of it.
    pub fn from_file(path: &Path) -> io::Result<Key> {
        let mut bytes = std::fs::read(path)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Key::new(bytes)
    }

    /// Reads a key from an environment variable.
    pub fn from_env(var: &str) -> io::Result<Key> {
        let value = std::env::var_os(var).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("environment variable {var} is not set"),
            )
        })?;
        Key::new(std::os::unix::ffi::OsStringExt::into_vec(value))
    }

    fn mac(&self, first: &[u8], second: &[u8], label: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(TAG);
        mac.update(first);
        mac.update(second);
        mac.update(label);
        mac
    }
}

/// A fresh nonce from the operating system's random source.
pub fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(io::Error::other)?;
    Ok(n)
}

/// Counters of an [`Authenticated`] service, readable from any thread.
#[derive(Debug, Default)]
pub struct AuthCounters {
    /// Handshakes that succeeded.
    pub succeeded: AtomicU64,
    /// Handshakes that failed (bad answer, wrong key, bad tag).
    pub failed: AtomicU64,
    /// Clients that did not answer in time.
    pub timed_out: AtomicU64,
    /// Attempts whose challenge was held back by the throttle.
    pub delayed: AtomicU64,
    /// Attempts refused by the throttle (their turn was too far away).
    pub throttled: AtomicU64,
}

impl AuthCounters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Display for AuthCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "auth succeeded={} failed={} timed_out={} delayed={} throttled={}",
            self.succeeded.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.timed_out.load(Ordering::Relaxed),
            self.delayed.load(Ordering::Relaxed),
            self.throttled.load(Ordering::Relaxed)
        )
    }
}

/// How an [`AuthThrottle`] spaces out attempts from one address (see the
/// module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottlePolicy {
    /// Counted attempts an address may make at once. Default 3.
    pub free: u32,
    /// The spacing after the free attempts, doubled with each further
    /// counted attempt. Default 100 ms.
    pub base: Duration,
    /// The largest spacing. Default 5 s.
    pub cap: Duration,
    /// The longest an attempt is held for its turn; later turns are
    /// refused at once. Default 30 s.
    pub max_wait: Duration,
    /// An address is forgotten this long after its last attempt.
    /// Default 10 minutes.
    pub forget: Duration,
}

impl Default for ThrottlePolicy {
    fn default() -> ThrottlePolicy {
        ThrottlePolicy {
            free: 3,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            max_wait: Duration::from_secs(30),
            forget: Duration::from_secs(600),
        }
    }
}

impl ThrottlePolicy {
    /// The spacing after an address's `counted`-th attempt.
    fn spacing(&self, counted: u32) -> Duration {
        match counted.checked_sub(self.free) {
            None => Duration::ZERO,
            // 2^31 times anything exceeds any sensible cap.
            Some(doublings) => self
                .base
                .saturating_mul(1 << doublings.min(31))
                .min(self.cap),
        }
    }
}

/// What the throttle knows of one address.
#[derive(Debug)]
struct Attempts {
    /// Attempts started and not refunded by a success.
    counted: u32,
    /// When the address's next attempt may get its challenge.
    next: Instant,
    /// When its last attempt started.
    last: Instant,
}

/// Slows key guessing per source address, shared by every listener of a
/// server that gets it (see the module docs for the policy).
#[derive(Debug)]
pub struct AuthThrottle {
    policy: ThrottlePolicy,
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    addresses: HashMap<IpAddr, Attempts>,
    swept: Option<Instant>,
}

/// What the throttle says to an attempt that starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turn {
    /// Challenge it after this long (zero: at once).
    After(Duration),
    /// Refuse it: its turn is too far away.
    Refused,
}

impl AuthThrottle {
    /// A throttle with `policy`, to share between services.
    pub fn new(policy: ThrottlePolicy) -> Arc<AuthThrottle> {
        Arc::new(AuthThrottle {
            policy,
            table: Mutex::new(Table {
                addresses: HashMap::new(),
                swept: None,
            }),
        })
    }

    /// The policy.
    pub fn policy(&self) -> ThrottlePolicy {
        self.policy
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an attempt from `ip` starting at `now`, and gives it its turn.
    fn start(&self, ip: IpAddr, now: Instant) -> Turn {
        let policy = self.policy;
        let mut table = self.table();
        if table.addresses.len() >= THROTTLE_TABLE && !table.addresses.contains_key(&ip) {
            let due = table
                .swept
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
            if due {
                table.swept = Some(now);
                table
                    .addresses
                    .retain(|_, a| now.duration_since(a.last) < policy.forget);
            }
            if table.addresses.len() >= THROTTLE_TABLE {
                return Turn::After(Duration::ZERO);
            }
        }
        let a = table.addresses.entry(ip).or_insert(Attempts {
            counted: 0,
            next: now,
            last: now,
        });
        if now.duration_since(a.last) >= policy.forget {
            a.counted = 0;
            a.next = now;
        }
        let at = a.next.max(now);
        let wait = at - now;
        if wait > policy.max_wait {
            return Turn::Refused;
        }
        a.counted = a.counted.saturating_add(1);
        a.next = at + policy.spacing(a.counted);
        a.last = now;
        Turn::After(wait)
    }

    /// Refunds the attempt of `ip` that just succeeded.
    fn succeeded(&self, ip: IpAddr) {
        if let Some(a) = self.table().addresses.get_mut(&ip) {
            a.counted = a.counted.saturating_sub(1);
        }
    }
}

/// What every authenticated listener of one server shares: the key and
/// one throttle, so an address is counted once however many listeners it
/// tries.
#[derive(Clone, Debug)]
pub struct Guard {
    key: Key,
    throttle: Arc<AuthThrottle>,
}

impl Guard {
    /// A guard with `key` and the default [`ThrottlePolicy`].
    pub fn new(key: Key) -> Guard {
        Guard::with_policy(key, ThrottlePolicy::default())
    }

    /// A guard with `key` and its own throttling policy.
    pub fn with_policy(key: Key, policy: ThrottlePolicy) -> Guard {
        Guard {
            key,
            throttle: AuthThrottle::new(policy),
        }
    }

    /// `service` behind the handshake, counted by this guard's throttle.
    pub fn wrap<S>(&self, service: S) -> Authenticated<S> {
        Authenticated::new(service, self.key.clone()).throttle(Arc::clone(&self.throttle))
    }
}

/// Any [`Service`], behind the handshake described in the module docs.
pub struct Authenticated<S> {
    inner: S,
    key: Key,
    timeout: Duration,
    throttle: Arc<AuthThrottle>,
    counters: Arc<AuthCounters>,
}

impl<S> fmt::Debug for Authenticated<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticated")
            .field("timeout", &self.timeout)
            .field("counters", &self.counters)
            .finish()
    }
}

impl<S> Authenticated<S> {
    /// Puts `inner` behind a handshake with `key`.
    pub fn new(inner: S, key: Key) -> Authenticated<S> {
        Authenticated {
            inner,
            key,
            timeout: AUTH_TIMEOUT,
            throttle: AuthThrottle::new(ThrottlePolicy::default()),
            counters: Arc::default(),
        }
    }

    /// How long a client has to answer (default [`AUTH_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Authenticated<S> {
        self.timeout = timeout;
        self
    }

    /// The counters, shared: keep a clone to read them while serving.
    pub fn counters(&self) -> Arc<AuthCounters> {
        Arc::clone(&self.counters)
    }

    /// Counts attempts with `throttle` (shared with other services, or
    /// with its own policy) instead of a throttle of its own.
    pub fn throttle(mut self, throttle: Arc<AuthThrottle>) -> Authenticated<S> {
        self.throttle = throttle;
        self
    }

    /// Sends the challenge and starts the answer deadline.
    fn challenge(&self, cx: &mut Context<'_>) -> AuthSession<S::Session>
    where
        S: Service,
    {
        let nonce = match nonce() {
            Ok(n) => n,
            Err(e) => {
                log::error!("no random nonce: {e}");
                cx.write(FAILED);
                cx.close();
                return AuthSession::Failed;
            }
        };
        cx.write(TAG);
        cx.write(&nonce);
        let timer = cx.set_timer(self.timeout);
        AuthSession::Pending { nonce, timer }
    }

    /// The attempt failed (it was counted when it started).
    fn fail(&mut self, cx: &mut Context<'_>, session: &mut AuthSession<impl Sized>) {
        cx.protocol_error();
        cx.write(FAILED);
        cx.close();
        *session = AuthSession::Failed;
    }
}

fn peer_ip(peer: Option<&PeerAddr>) -> Option<IpAddr> {
    match peer {
        Some(PeerAddr::Inet(a)) => Some(a.ip()),
        _ => None,
    }
}

/// Per-connection state: waiting for a turn, then for the answer, then the
/// inner session.
#[derive(Debug)]
pub enum AuthSession<T> {
    /// Held back by the throttle; the challenge goes out when this fires.
    Waiting {
        /// The end of the wait.
        timer: TimerId,
    },
    /// The challenge is out.
    Pending {
        /// The nonce sent.
        nonce: [u8; NONCE_LEN],
        /// The answer deadline.
        timer: TimerId,
    },
    /// Authenticated: the wrapped service's session.
    Ready(T),
    /// Failed; closing.
    Failed,
}

impl<S: Service> Service for Authenticated<S> {
    type Session = AuthSession<S::Session>;

    fn on_connect(&mut self, cx: &mut Context<'_>) -> Self::Session {
        let turn = match peer_ip(cx.peer()) {
            Some(ip) => self.throttle.start(ip, cx.now()),
            None => Turn::After(Duration::ZERO),
        };
        match turn {
            Turn::After(Duration::ZERO) => self.challenge(cx),
            Turn::After(wait) => {
                AuthCounters::bump(&self.counters.delayed);
                AuthSession::Waiting {
                    timer: cx.set_timer(wait),
                }
            }
            Turn::Refused => {
                AuthCounters::bump(&self.counters.throttled);
                cx.write(FAILED);
                cx.close();
                AuthSession::Failed
            }
        }
    }

    fn on_data(
        &mut self,
        cx: &mut Context<'_>,
        session: &mut Self::Session,
        input: &mut Input<'_>,
    ) {
        match session {
            AuthSession::Ready(inner) => self.inner.on_data(cx, inner, input),
            AuthSession::Failed => {
                input.take();
            }
            // Talking before the challenge: no answer can be right.
            AuthSession::Waiting { timer } => {
                let timer = *timer;
                cx.cancel_timer(timer);
                AuthCounters::bump(&self.counters.failed);
                input.take();
                self.fail(cx, session);
            }
            // Not all of the answer yet: wait (it is at most 72 bytes).
            AuthSession::Pending { .. } if input.len() < RESPONSE_LEN => {}
            AuthSession::Pending { nonce, timer } => {
                let (nonce, timer) = (*nonce, *timer);
                let response = &input.bytes()[..RESPONSE_LEN];
                input.consume(RESPONSE_LEN);
                let (tag, rest) = response.split_at(TAG.len());
                let (client_nonce, answer) = rest.split_at(NONCE_LEN);
                let ok = tag == TAG
                    && client_nonce != nonce
                    && self
                        .key
                        .mac(&nonce, client_nonce, CLIENT_LABEL)
                        .verify_slice(answer)
                        .is_ok();
                cx.cancel_timer(timer);
                if !ok {
                    AuthCounters::bump(&self.counters.failed);
                    input.take();
                    self.fail(cx, session);
                    return;
                }
                AuthCounters::bump(&self.counters.succeeded);
                if let Some(ip) = peer_ip(cx.peer()) {
                    self.throttle.succeeded(ip);
                }
                let proof = self
                    .key
                    .mac(client_nonce, &nonce, SERVER_LABEL)
                    .finalize()
                    .into_bytes();
                cx.write(&proof);
                let mut inner = self.inner.on_connect(cx);
                if !input.is_empty() {
                    // The client's first request, right behind its answer.
                    self.inner.on_data(cx, &mut inner, input);
                }
                *session = AuthSession::Ready(inner);
            }
        }
    }

    fn on_eof(&mut self, cx: &mut Context<'_>, session: &mut Self::Session) {
        match session {
            AuthSession::Ready(inner) => self.inner.on_eof(cx, inner),
            _ => cx.close(),
        }
    }

    fn on_timer(&mut self, cx: &mut Context<'_>, session: &mut Self::Session, timer: TimerId) {
        match session {
            AuthSession::Ready(inner) => self.inner.on_timer(cx, inner, timer),
            AuthSession::Waiting { timer: t } if *t == timer => *session = self.challenge(cx),
            AuthSession::Pending { timer: t, .. } if *t == timer => {
                AuthCounters::bump(&self.counters.timed_out);
                self.fail(cx, session);
            }
            _ => {}
        }
    }

    fn on_service_timer(&mut self, cx: &mut Context<'_>, timer: TimerId) {
        self.inner.on_service_timer(cx, timer);
    }

    fn on_close(&mut self, cx: &mut Context<'_>, session: Self::Session, why: CloseReason) {
        if let AuthSession::Ready(inner) = session {
            self.inner.on_close(cx, inner, why);
        }
    }

    fn on_shutdown(&mut self, cx: &mut Context<'_>) {
        log::info!("{}", self.counters);
        self.inner.on_shutdown(cx);
    }
}

/// Why a client handshake failed.
fn refused(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, what.to_string())
}

/// Performs the client side of the handshake on a connected stream: answers
/// the challenge and checks the server's proof. After `Ok`, the stream
/// carries the service's bytes.
pub fn client_handshake<S: Read + Write>(stream: &mut S, key: &Key) -> io::Result<()> {
    let mut challenge = [0u8; CHALLENGE_LEN];
    read_or_refused(stream, &mut challenge)?;
    let (tag, server_nonce) = challenge.split_at(TAG.len());
    if tag != TAG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the server does not speak muxserve authentication (MUXAUTH1)",
        ));
    }
    let client_nonce = nonce()?;
    let answer = key
        .mac(server_nonce, &client_nonce, CLIENT_LABEL)
        .finalize()
        .into_bytes();
    let mut response = Vec::with_capacity(RESPONSE_LEN);
    response.extend_from_slice(TAG);
    response.extend_from_slice(&client_nonce);
    response.extend_from_slice(&answer);
    stream.write_all(&response)?;
    let mut proof = [0u8; MAC_LEN];
    read_or_refused(stream, &mut proof)?;
    key.mac(&client_nonce, server_nonce, SERVER_LABEL)
        .verify_slice(&proof)
        .map_err(|_| refused("the server could not prove it knows the key"))
}

/// `read_exact`, telling the server's refusal from a broken stream.
fn read_or_refused<S: Read>(stream: &mut S, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(
                    if buf[..got].starts_with(&FAILED[..got.min(FAILED.len())]) && got > 0 {
                        refused("authentication failed")
                    } else {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed during the handshake",
                        )
                    },
                )
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::Echo;
    use crate::testing::Harness;

    fn key(b: u8) -> Key {
        Key::new(vec![b; 32]).unwrap()
    }

    /// Answers a challenge the way `client_handshake` does.
    fn answer(key: &Key, challenge: &[u8]) -> ([u8; NONCE_LEN], Vec<u8>) {
        let nc = nonce().unwrap();
        let mac = key
            .mac(&challenge[TAG.len()..], &nc, CLIENT_LABEL)
            .finalize()
            .into_bytes();
        let mut r = TAG.to_vec();
        r.extend_from_slice(&nc);
        r.extend_from_slice(&mac);
        (nc, r)
    }

    #[test]
    fn the_right_key_opens_the_service_and_the_server_proves_itself() {
        let mut h = Harness::new(Authenticated::new(Echo, key(1)));
        let c = h.connect();
        let challenge = h.take_output(c);
        assert_eq!(challenge.len(), CHALLENGE_LEN);
        assert_eq!(&challenge[..8], TAG);
        let (nc, mut response) = answer(&key(1), &challenge);
        response.extend_from_slice(b"first request");
        h.send(c, &response);
        let out = h.take_output(c);
        let proof = &out[..MAC_LEN];
        key(1)
            .mac(&nc, &challenge[TAG.len()..], SERVER_LABEL)
            .verify_slice(proof)
            .unwrap();
        assert_eq!(&out[MAC_LEN..], b"first request");
    }

    #[test]
    fn a_wrong_key_gets_the_failure_line_and_a_close() {
        let mut h = Harness::new(Authenticated::new(Echo, key(1)));
        let c = h.connect();
        let challenge = h.take_output(c);
        let (_, response) = answer(&key(2), &challenge);
        h.send(c, &response);
        assert_eq!(h.take_output(c), FAILED);
        assert!(!h.is_open(c));
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn the_throttle_spaces_attempts_doubling_to_the_cap_and_refunds_successes() {
        let throttle = AuthThrottle::new(ThrottlePolicy::default());
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Ten attempts at the same instant: three at once, then spaced by
        // 100, 200, 400, 800, 1600, 3200 ms and then the 5 s cap.
        let turns: Vec<Turn> = (0..10).map(|_| throttle.start(ip(2), t0)).collect();
        let expected = [0, 0, 0, 100, 300, 700, 1500, 3100, 6300, 11_300];
        assert_eq!(
            turns,
            expected.map(|w| Turn::After(ms(w))).to_vec(),
            "{turns:?}"
        );
        // Another address is untouched.
        assert_eq!(throttle.start(ip(3), t0), Turn::After(Duration::ZERO));
        // A success refunds its attempt: the next one is spaced as if the
        // success had not been counted (doubling from where it was).
        throttle.succeeded(ip(3));
        for _ in 0..3 {
            assert_eq!(throttle.start(ip(3), t0), Turn::After(Duration::ZERO));
        }
    }

    #[test]
    fn a_turn_beyond_the_longest_wait_is_refused_and_not_counted() {
        let policy = ThrottlePolicy {
            max_wait: Duration::from_secs(6),
            ..ThrottlePolicy::default()
        };
        let throttle = AuthThrottle::new(policy);
        let t0 = Instant::now();
        let turns: Vec<Turn> = (0..8).map(|_| throttle.start(ip(2), t0)).collect();
        assert_eq!(turns[7], Turn::After(Duration::from_millis(3100)));
        // The next turn is at 6.3 s: refused, and it takes no turn.
        assert_eq!(throttle.start(ip(2), t0), Turn::Refused);
        assert_eq!(throttle.start(ip(2), t0), Turn::Refused);
        // Later, the address gets its 6.3 s turn after all.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            throttle.start(ip(2), later),
            Turn::After(Duration::from_millis(5300))
        );
    }

    #[test]
    fn an_address_is_forgotten_after_a_quiet_while() {
        let throttle = AuthThrottle::new(ThrottlePolicy::default());
        let t0 = Instant::now();
        for _ in 0..6 {
            throttle.start(ip(2), t0);
        }
        let much_later = t0 + ThrottlePolicy::default().forget;
        assert_eq!(
            throttle.start(ip(2), much_later),
            Turn::After(Duration::ZERO)
        );
        assert_eq!(
            throttle.start(ip(2), much_later),
            Turn::After(Duration::ZERO)
        );
    }

    #[test]
    fn keys_are_not_printed_and_short_keys_are_refused() {
        assert_eq!(format!("{:?}", key(7)), "Key(redacted)");
        assert!(Key::new(vec![1; 15]).is_err());
    }
}
