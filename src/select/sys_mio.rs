//! The mio backend: epoll/kqueue, made level-triggered.
//!
//! mio reports a descriptor when it becomes ready, once. To report it again
//! while it stays ready, every descriptor reported by one wait is re-armed
//! (re-registered) before the next: the kernel then checks its readiness
//! afresh and queues a new event if it is still ready.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Poll, Token};

use super::{Interest, Sys};

pub(super) struct MioSys {
    poll: Poll,
    events: Events,
    interests: HashMap<RawFd, mio::Interest>,
    /// Reported by the last wait: re-armed before the next.
    rearm: Vec<RawFd>,
}

impl MioSys {
    pub(super) fn new() -> io::Result<MioSys> {
        Ok(MioSys {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            interests: HashMap::new(),
            rearm: Vec::new(),
        })
    }
}

fn to_mio(interest: Interest) -> io::Result<mio::Interest> {
    match (interest.readable, interest.writable) {
        (true, true) => Ok(mio::Interest::READABLE | mio::Interest::WRITABLE),
        (true, false) => Ok(mio::Interest::READABLE),
        (false, true) => Ok(mio::Interest::WRITABLE),
        (false, false) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the mio backend needs readable or writable interest",
        )),
    }
}

impl Sys for MioSys {
    fn add(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let i = to_mio(interest)?;
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), Token(fd as usize), i)?;
        self.interests.insert(fd, i);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let i = to_mio(interest)?;
        self.poll
            .registry()
            .reregister(&mut SourceFd(&fd), Token(fd as usize), i)?;
        self.interests.insert(fd, i);
        Ok(())
    }

    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.interests.remove(&fd);
        self.rearm.retain(|&r| r != fd);
        self.poll.registry().deregister(&mut SourceFd(&fd))
    }

    fn wait(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<(RawFd, bool, bool)>,
    ) -> io::Result<()> {
        for fd in self.rearm.drain(..) {
            if let Some(&i) = self.interests.get(&fd) {
                self.poll
                    .registry()
                    .reregister(&mut SourceFd(&fd), Token(fd as usize), i)?;
            }
        }
        self.poll.poll(&mut self.events, timeout)?;
        for e in self.events.iter() {
            let fd = e.token().0 as RawFd;
            let bad = e.is_error() || e.is_read_closed() || e.is_write_closed();
            out.push((fd, e.is_readable() || bad, e.is_writable() || bad));
            self.rearm.push(fd);
        }
        Ok(())
    }
}
