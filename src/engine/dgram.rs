//! Datagram services, served the same way by every engine.
//!
//! A datagram has no connection, so there is no session and no buffering:
//! each one that arrives is counted, screened (a datagram the kernel cut
//! short, or one from a port that answers anything, is dropped) and handed
//! to the service, whose replies are sent at once. The loop engines call
//! [`serve`] for each datagram a readable socket yields; the thread engine
//! gives each datagram socket a thread that waits in poll(2) and calls the
//! same function.

use std::io;
use std::time::Instant;

use super::contain;
use crate::config::{MAX_DATAGRAM, REFLECTOR_PORTS};
use crate::net::DgramSocket;
use crate::service::{DatagramContext, DatagramDriver, DatagramService, PeerAddr};
use crate::stats::Stats;

/// What a datagram service can do during one callback: reply (sent at
/// once) and ask the server to stop.
struct DgramIo<'a> {
    socket: &'a DgramSocket,
    stats: &'a mut Stats,
    now: Instant,
    stop: &'a mut bool,
}

impl DatagramDriver for DgramIo<'_> {
    fn now(&self) -> Instant {
        self.now
    }

    fn send_to(&mut self, to: &PeerAddr, bytes: &[u8]) -> bool {
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

/// Serves one datagram that arrived on `socket` from `from`.
///
/// `data` is what `recv_from` returned into a buffer one byte longer than
/// [`MAX_DATAGRAM`], so a datagram that did not fit shows up as too long
/// and is dropped (never answered in part). Counters go to `stats`; a
/// service asking the server to stop sets `stop`. Returns the panic message
/// if the callback panicked.
pub(crate) fn serve(
    handler: &mut dyn DatagramService,
    socket: &DgramSocket,
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
    if from.port().is_some_and(|p| REFLECTOR_PORTS.contains(&p)) {
        stats.reflection_drops += 1;
        return Ok(());
    }
    let mut io = DgramIo {
        socket,
        stats,
        now,
        stop,
    };
    contain(|| handler.on_datagram(&mut DatagramContext::new(&mut io, from), from, data))
}
