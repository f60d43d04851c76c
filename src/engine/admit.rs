//! Who gets in: the connection cap, the per-source cap and the admission
//! hook, decided the same way on every engine, and what a refused client
//! is told.
//!
//! A refused client is told why in one line (nothing, for the admission
//! hook, which is meant to look like a closed door), then gets our FIN.
//! What it sent before it was refused is read and thrown away, within the
//! linger budget ([`Config::linger`](crate::Config::linger) and
//! [`Config::linger_bytes`](crate::Config::linger_bytes)), so that the
//! close is a FIN and not a reset that would destroy the notice. At most
//! [`REFUSED_LINGERING`] refused clients linger at once; past that a
//! refused client is closed at once, since a flood of refusals must not
//! cost the server a descriptor each for the whole linger time.

use std::collections::HashMap;
use std::net::IpAddr;

use super::Admission;
use crate::service::PeerAddr;
use crate::stats::Stats;

/// Refused clients that may be reading out their input at once.
pub const REFUSED_LINGERING: usize = 64;

/// Why a client was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max_connections` were open.
    Full,
    /// Its address had `max_per_source` connections open.
    PerSource,
    /// The admission hook said no.
    Admission,
}

impl Refusal {
    /// The line the client gets before our FIN.
    pub(crate) fn notice(self) -> &'static [u8] {
        match self {
            Refusal::Full => b"error: server full, try again later\r\n",
            Refusal::PerSource => b"error: too many connections from your address\r\n",
            // Like socketserver's verify_request: close without a word.
            Refusal::Admission => b"",
        }
    }

    pub(crate) fn count(self, stats: &mut Stats) {
        match self {
            Refusal::Full => stats.rejected_limit += 1,
            Refusal::PerSource => stats.rejected_per_source += 1,
            Refusal::Admission => stats.rejected_admission += 1,
        }
    }
}

/// The connections open per source address, for the per-source cap
/// ([`Config::max_per_source`](crate::Config::max_per_source)). A source
/// is one IP address (IPv4 or IPv6, whole); Unix-socket peers have none
/// and are not counted. With the cap off nothing is counted at all.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    max: usize,
    open: HashMap<IpAddr, u32>,
}

impl Sources {
    /// A table for a cap of `max` connections per address (0: no cap).
    pub(crate) fn new(max: usize) -> Sources {
        Sources {
            max,
            open: HashMap::new(),
        }
    }

    fn key(&self, peer: &PeerAddr) -> Option<IpAddr> {
        match peer {
            PeerAddr::Inet(addr) if self.max > 0 => Some(addr.ip()),
            _ => None,
        }
    }

    /// Decides whether `peer` may connect, with `open` connections held
    /// now (lingering ones included) out of `max_conns`; if so, counts it
    /// as open until [`Sources::release`].
    pub(crate) fn admit(
        &mut self,
        open: usize,
        max_conns: usize,
        hook: Option<&Admission>,
        peer: &PeerAddr,
    ) -> Result<(), Refusal> {
        if open >= max_conns {
            return Err(Refusal::Full);
        }
        let key = self.key(peer);
        if let Some(ip) = key {
            if self.open.get(&ip).is_some_and(|&n| n as usize >= self.max) {
                return Err(Refusal::PerSource);
            }
        }
        if hook.is_some_and(|admit| !admit(peer)) {
            return Err(Refusal::Admission);
        }
        if let Some(ip) = key {
            *self.open.entry(ip).or_insert(0) += 1;
        }
        Ok(())
    }

    /// Forgets one connection of `peer`, admitted earlier.
    pub(crate) fn release(&mut self, peer: &PeerAddr) {
        let Some(ip) = self.key(peer) else {
            return;
        };
        if let Some(n) = self.open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(ip: &str) -> PeerAddr {
        PeerAddr::Inet(format!("{ip}:1000").parse().unwrap())
    }

    #[test]
    fn the_per_source_cap_counts_each_address_and_forgets_closed_ones() {
        let mut sources = Sources::new(2);
        let (a, b) = (from("10.0.0.1"), from("10.0.0.2"));
        assert_eq!(sources.admit(0, 10, None, &a), Ok(()));
        assert_eq!(sources.admit(1, 10, None, &a), Ok(()));
        assert_eq!(sources.admit(2, 10, None, &a), Err(Refusal::PerSource));
        assert_eq!(sources.admit(2, 10, None, &b), Ok(()));
        sources.release(&a);
        assert_eq!(sources.admit(2, 10, None, &a), Ok(()));
        assert_eq!(sources.admit(10, 10, None, &b), Err(Refusal::Full));
        for _ in 0..2 {
            sources.release(&a);
        }
        sources.release(&b);
        assert!(sources.open.is_empty(), "{:?}", sources.open);
    }

    #[test]
    fn with_the_cap_off_nothing_is_counted() {
        let mut sources = Sources::new(0);
        for open in 0..100 {
            assert_eq!(sources.admit(open, 1000, None, &from("10.0.0.1")), Ok(()));
        }
        assert!(sources.open.is_empty());
    }

    #[test]
    fn a_hook_refusal_is_not_counted_as_open() {
        let mut sources = Sources::new(1);
        let no: Admission = std::sync::Arc::new(|_: &PeerAddr| false);
        let a = from("10.0.0.1");
        assert_eq!(sources.admit(0, 10, Some(&no), &a), Err(Refusal::Admission));
        assert_eq!(sources.admit(0, 10, None, &a), Ok(()));
    }
}
