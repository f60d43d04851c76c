//! The loop on the [`select`] facade: the same `Server`, its
//! readiness learned from select(2) or poll(2) instead of epoll.
//!
//! These backends are level-triggered, so the loop's edge-triggered care
//! (draining, the still-ready list) is merely redundant here: a source that
//! is still ready is reported again anyway. Each wait costs O(registered
//! descriptors), which is what the engines are there to show.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use super::{Event, Interest, Poller, Waker, WAKE_TOKEN};
use crate::select::{self, Backend, Ready, Selector};

/// The self-pipe trick: a waker writes a byte to one end of a socket pair;
/// the other end is registered with a selector, so a blocked wait returns.
pub(crate) struct SelfPipe {
    rx: UnixStream,
    tx: Arc<UnixStream>,
}

impl SelfPipe {
    pub(crate) fn new() -> io::Result<SelfPipe> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(SelfPipe {
            rx,
            tx: Arc::new(tx),
        })
    }

    /// The end to register for reading.
    pub(crate) fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    /// Empties the pipe (level-triggered selectors report it until then).
    pub(crate) fn drain(&self) {
        let mut sink = [0u8; 64];
        while matches!((&self.rx).read(&mut sink), Ok(n) if n > 0) {}
    }

    pub(crate) fn waker(&self) -> Waker {
        let tx = Arc::clone(&self.tx);
        Arc::new(move || match (&*tx).write(&[1]) {
            // A full pipe already holds a wake-up.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other.map(drop),
        })
    }
}

pub(crate) struct FacadePoller {
    selector: Selector,
    ready: Vec<Ready>,
    wake: SelfPipe,
}

impl FacadePoller {
    pub(crate) fn new(backend: Backend) -> io::Result<FacadePoller> {
        let wake = SelfPipe::new()?;
        let mut selector = Selector::new(backend)?;
        selector.register(wake.fd(), select::Interest::READ, WAKE_TOKEN)?;
        Ok(FacadePoller {
            selector,
            ready: Vec::new(),
            wake,
        })
    }
}

fn facade_interest(interest: Interest) -> select::Interest {
    match interest {
        Interest::Read => select::Interest::READ,
        Interest::ReadWrite => select::Interest::BOTH,
        Interest::Write => select::Interest::WRITE,
        Interest::None => select::Interest {
            readable: false,
            writable: false,
        },
    }
}

impl Poller for FacadePoller {
    fn register(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        self.selector.register(fd, facade_interest(interest), token)
    }

    fn reregister(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        self.selector.modify(fd, facade_interest(interest), token)
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.selector.unregister(fd)
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        self.ready.clear();
        self.selector.select_into(timeout, &mut self.ready)?;
        for r in &self.ready {
            if r.key == WAKE_TOKEN {
                // Level-triggered: empty the pipe or it is reported for ever.
                self.wake.drain();
            }
            events.push(Event {
                token: r.key,
                readable: r.readable,
                writable: r.writable,
                // Level-triggered: a FIN left after a short read is
                // reported on the next wait, so no hint is needed.
                read_closed: false,
            });
        }
        Ok(())
    }

    fn waker(&self) -> Waker {
        self.wake.waker()
    }
}
