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
//! it. After [`THROTTLE_AFTER`] failures from one IP address, that address
//! may try at most [`THROTTLE_RATE`] times a second; refused attempts get
//! the failure line at once, without a challenge.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
/// Failures from one address before it is throttled.
pub const THROTTLE_AFTER: u32 = 5;
/// Attempts a second a throttled address may make.
pub const THROTTLE_RATE: f64 = 2.0;
/// Addresses remembered for throttling; past this, the quietest are
/// forgotten, so a flood of addresses cannot grow the table without bound.
const THROTTLE_TABLE: usize = 10_000;
/// A throttled address is forgiven after this long without failures.
const THROTTLE_FORGET: Duration = Duration::from_secs(600);

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
    /// Attempts refused by per-address throttling.
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
            "auth succeeded={} failed={} timed_out={} throttled={}",
            self.succeeded.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.timed_out.load(Ordering::Relaxed),
            self.throttled.load(Ordering::Relaxed)
        )
    }
}

/// Failures and a token bucket for one address.
#[derive(Debug)]
struct Throttle {
    failures: u32,
    tokens: f64,
    last: Instant,
}

/// Any [`Service`], behind the handshake described in the module docs.
pub struct Authenticated<S> {
    inner: S,
    key: Key,
    timeout: Duration,
    throttle: HashMap<IpAddr, Throttle>,
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
            throttle: HashMap::new(),
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

    /// Whether `ip` may try now (spending a token if it is throttled).
    fn may_try(&mut self, ip: IpAddr, now: Instant) -> bool {
        let Some(t) = self.throttle.get_mut(&ip) else {
            return true;
        };
        if t.failures < THROTTLE_AFTER {
            return true;
        }
        let refill = now.duration_since(t.last).as_secs_f64() * THROTTLE_RATE;
        t.tokens = (t.tokens + refill).min(THROTTLE_RATE);
        t.last = now;
        if t.tokens >= 1.0 {
            t.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn record(&mut self, ip: Option<IpAddr>, ok: bool, now: Instant) {
        let Some(ip) = ip else {
            return;
        };
        if ok {
            self.throttle.remove(&ip);
            return;
        }
        if self.throttle.len() >= THROTTLE_TABLE && !self.throttle.contains_key(&ip) {
            self.throttle.retain(|_, t| {
                t.failures >= THROTTLE_AFTER && now.duration_since(t.last) < THROTTLE_FORGET
            });
            if self.throttle.len() >= THROTTLE_TABLE {
                self.throttle.clear();
            }
        }
        let t = self.throttle.entry(ip).or_insert(Throttle {
            failures: 0,
            tokens: 0.0,
            last: now,
        });
        if now.duration_since(t.last) >= THROTTLE_FORGET {
            t.failures = 0;
        }
        t.failures += 1;
        t.last = now;
    }

    fn fail(&mut self, cx: &mut Context<'_>, session: &mut AuthSession<impl Sized>) {
        let now = cx.now();
        let ip = peer_ip(cx.peer());
        self.record(ip, false, now);
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

/// Per-connection state: waiting for the answer, then the inner session.
#[derive(Debug)]
pub enum AuthSession<T> {
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
        let now = cx.now();
        if let Some(ip) = peer_ip(cx.peer()) {
            if !self.may_try(ip, now) {
                AuthCounters::bump(&self.counters.throttled);
                cx.write(FAILED);
                cx.close();
                return AuthSession::Failed;
            }
        }
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
                self.record(peer_ip(cx.peer()), true, cx.now());
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

    #[test]
    fn keys_are_not_printed_and_short_keys_are_refused() {
        assert_eq!(format!("{:?}", key(7)), "Key(redacted)");
        assert!(Key::new(vec![1; 15]).is_err());
    }
}
