//! The poll(2) backend: an array of `pollfd`, passed whole on every call.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::{timeout_ms, Interest, Sys};

#[derive(Default)]
pub(super) struct PollSys {
    fds: Vec<libc::pollfd>,
    /// Where each descriptor sits in `fds`.
    index: HashMap<RawFd, usize>,
}

fn events(interest: Interest) -> libc::c_short {
    let mut e = 0;
    if interest.readable {
        e |= libc::POLLIN;
    }
    if interest.writable {
        e |= libc::POLLOUT;
    }
    e
}

impl Sys for PollSys {
    fn add(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        self.index.insert(fd, self.fds.len());
        self.fds.push(libc::pollfd {
            fd,
            events: events(interest),
            revents: 0,
        });
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let &i = self.index.get(&fd).ok_or(io::ErrorKind::NotFound)?;
        self.fds[i].events = events(interest);
        Ok(())
    }

    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        let i = self.index.remove(&fd).ok_or(io::ErrorKind::NotFound)?;
        // O(1): the last entry takes the removed one's place.
        self.fds.swap_remove(i);
        if let Some(moved) = self.fds.get(i) {
            self.index.insert(moved.fd, i);
        }
        Ok(())
    }

    fn wait(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<(RawFd, bool, bool)>,
    ) -> io::Result<()> {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that
        // poll reads and whose `revents` it writes.
        let n = unsafe {
            libc::poll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                timeout_ms(timeout),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        // O(n): the kernel said how many, not which.
        let trouble = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
        for p in &self.fds {
            if p.revents != 0 {
                let bad = p.revents & trouble != 0;
                let readable = p.revents & libc::POLLIN != 0 || bad;
                let writable = p.revents & libc::POLLOUT != 0 || bad;
                out.push((p.fd, readable, writable));
            }
        }
        Ok(())
    }
}
