//! The default poller: mio, which is epoll on Linux and kqueue on the BSDs
//! and macOS.
//!
//! mio is edge-triggered: it reports a source when it *becomes* ready, not
//! while it *is* ready. The loop in [`Server`](super::Server) is written for
//! that: it reads until the socket is drained (a short read or
//! `WouldBlock`), or puts the connection on its still-ready list when a
//! fairness budget stops it early, and asks for WRITABLE only while output
//! is pending. Level-triggered pollers can run the same loop unchanged;
//! they just report more often.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Poll, Token};

use super::{Event, Interest, Poller, Waker, WAKE_TOKEN};

/// How many events one `epoll_wait` may return. More ready sources simply
/// wait for the next turn, which follows at once.
const EVENTS_PER_TURN: usize = 1024;

pub(crate) struct MioPoller {
    poll: Poll,
    events: Events,
    waker: Arc<mio::Waker>,
}

impl MioPoller {
    pub(crate) fn new() -> io::Result<MioPoller> {
        let poll = Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), Token(WAKE_TOKEN))?);
        Ok(MioPoller {
            poll,
            events: Events::with_capacity(EVENTS_PER_TURN),
            waker,
        })
    }
}

fn mio_interest(interest: Interest) -> mio::Interest {
    match interest {
        // Edge-triggered: a readiness the loop does not act on is reported
        // once, not on every wait, so reading interest can stay (mio has no
        // empty interest; the loop never asks for one here).
        Interest::Read | Interest::None => mio::Interest::READABLE,
        Interest::ReadWrite => mio::Interest::READABLE | mio::Interest::WRITABLE,
        Interest::Write => mio::Interest::WRITABLE,
    }
}

impl Poller for MioPoller {
    fn register(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), Token(token), mio_interest(interest))
    }

    fn reregister(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        self.poll
            .registry()
            .reregister(&mut SourceFd(&fd), Token(token), mio_interest(interest))
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.poll.registry().deregister(&mut SourceFd(&fd))
    }

    /// Nothing to do: epoll drops a descriptor from its interest list when
    /// the last descriptor for that socket closes, and sockets are created
    /// close-on-exec and never duplicated here. Saves one `epoll_ctl` per
    /// connection. (kqueue likewise forgets closed descriptors.)
    fn closing(&mut self, _fd: RawFd) -> io::Result<()> {
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        self.poll.poll(&mut self.events, timeout)?;
        out.extend(self.events.iter().map(|e| Event {
            token: e.token().0,
            // A hang-up or error is worth a read: it returns 0 or the error.
            readable: e.is_readable() || e.is_read_closed() || e.is_error(),
            writable: e.is_writable() || e.is_write_closed() || e.is_error(),
            read_closed: e.is_read_closed() || e.is_error(),
        }));
        Ok(())
    }

    fn waker(&self) -> Waker {
        let waker = Arc::clone(&self.waker);
        Arc::new(move || waker.wake())
    }

    fn level_triggered(&self) -> bool {
        false
    }
}
