//! The select(2) backend: bit sets rebuilt on every call.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::{Interest, Sys, FD_SETSIZE};

#[derive(Default)]
pub(super) struct SelectSys {
    /// Registered descriptors in order, so the highest is the last.
    fds: BTreeMap<RawFd, Interest>,
}

impl SelectSys {
    fn check(fd: RawFd) -> io::Result<()> {
        // An fd_set is a fixed array of FD_SETSIZE bits: FD_SET on a larger
        // descriptor writes past its end. Refuse instead.
        if fd < 0 || fd as usize >= FD_SETSIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {fd} is beyond select's FD_SETSIZE ({FD_SETSIZE}); use the poll or mio backend"),
            ));
        }
        Ok(())
    }
}

impl Sys for SelectSys {
    fn add(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        SelectSys::check(fd)?;
        self.fds.insert(fd, interest);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let slot = self.fds.get_mut(&fd).ok_or(io::ErrorKind::NotFound)?;
        *slot = interest;
        Ok(())
    }

    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.fds.remove(&fd).ok_or(io::ErrorKind::NotFound)?;
        Ok(())
    }

    fn wait(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<(RawFd, bool, bool)>,
    ) -> io::Result<()> {
        // SAFETY: fd_set is plain data; an all-zero one is a valid empty set
        // (which is what FD_ZERO makes).
        let mut read: libc::fd_set = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut write: libc::fd_set = unsafe { std::mem::zeroed() };
        let mut nfds = 0;
        for (&fd, interest) in &self.fds {
            // `check` kept every descriptor below FD_SETSIZE, so FD_SET
            // stays inside the sets.
            if interest.readable {
                // SAFETY: fd < FD_SETSIZE and `read` is a valid set.
                unsafe { libc::FD_SET(fd, &mut read) };
            }
            if interest.writable {
                // SAFETY: fd < FD_SETSIZE and `write` is a valid set.
                unsafe { libc::FD_SET(fd, &mut write) };
            }
            nfds = fd + 1;
        }
        let mut tv = timeout.map(|t| libc::timeval {
            tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
            // Rounded up, so a short wait is not a busy loop.
            tv_usec: t.subsec_nanos().div_ceil(1000) as libc::suseconds_t,
        });
        let tv_ptr = tv
            .as_mut()
            .map_or(std::ptr::null_mut(), |tv| tv as *mut libc::timeval);
        // SAFETY: the sets are valid, nfds bounds the descriptors in them,
        // and tv_ptr is null or points to a live timeval.
        let n = unsafe { libc::select(nfds, &mut read, &mut write, std::ptr::null_mut(), tv_ptr) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        // O(n): scan every registered descriptor's bits.
        for &fd in self.fds.keys() {
            // SAFETY: fd < FD_SETSIZE and the sets are valid.
            let (r, w) = unsafe { (libc::FD_ISSET(fd, &read), libc::FD_ISSET(fd, &write)) };
            if r || w {
                out.push((fd, r, w));
            }
        }
        Ok(())
    }
}
