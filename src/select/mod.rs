//! A portable `select()` and `Selector`, shaped after Python's `select` and
//! `selectors` modules, for learning and comparing readiness APIs.
//!
//! ```no_run
//! use std::net::TcpListener;
//! use std::os::fd::AsRawFd;
//! use std::time::Duration;
//! use muxserve::select::{select, Backend, Interest, Selector};
//!
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! // The function: which of these descriptors are ready?
//! let ready = select(&[listener.as_raw_fd()], &[], Some(Duration::from_secs(1)))?;
//! println!("readable: {:?}", ready.readable);
//!
//! // The object: register once, ask many times.
//! let mut selector = Selector::new(Backend::Poll)?;
//! selector.register(listener.as_raw_fd(), Interest::READ, 42)?;
//! for event in selector.select(Some(Duration::from_secs(1)))? {
//!     println!("key {} readable {}", event.key, event.readable);
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Level-triggered, on every backend
//!
//! A descriptor that is still ready is reported again on the next call,
//! until it is drained (or its interest changes). That is what select(2)
//! and poll(2) do by nature and what makes simple loops correct: a loop may
//! read once per report and come back for the rest.
//!
//! # Backends and what they cost
//!
//! | backend | each call | limits |
//! |---|---|---|
//! | [`Backend::Select`] | builds and scans bit sets of every registered descriptor: O(n) in the kernel and here | descriptors must be below `FD_SETSIZE` (1024 on Linux); a larger one is refused with an error, because writing it into an `fd_set` would corrupt memory |
//! | [`Backend::Poll`] | passes and scans an array of every registered descriptor: O(n) | none but memory |
//! | [`Backend::Mio`] | epoll/kqueue keep the interest list in the kernel and return only ready descriptors: O(ready) | level-triggering is emulated: each descriptor reported last time is re-armed before the next wait, one system call each |
//!
//! With 10,000 mostly idle connections, select and poll copy and scan
//! 10,000 entries to find the handful that are ready; epoll returns just
//! the handful. That difference is what `muxserve bench` measures between
//! the `poll`/`select` engines and `mio`.
//!
//! # Portability
//!
//! Select and Poll work on any Unix. Mio works wherever mio does. Error and
//! hang-up conditions are reported as both readable and writable, so that
//! the next read or write reports them.

mod sys_mio;
mod sys_poll;
mod sys_select;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::time::Duration;

/// What to watch a descriptor for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Report when reading would not block.
    pub readable: bool,
    /// Report when writing would not block.
    pub writable: bool,
}

impl Interest {
    /// Readable only.
    pub const READ: Interest = Interest {
        readable: true,
        writable: false,
    };
    /// Writable only.
    pub const WRITE: Interest = Interest {
        readable: false,
        writable: true,
    };
    /// Both.
    pub const BOTH: Interest = Interest {
        readable: true,
        writable: true,
    };
}

/// One ready descriptor, by the key it was registered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The key given to [`Selector::register`].
    pub key: usize,
    /// Reading would not block (data, EOF or an error).
    pub readable: bool,
    /// Writing would not block (room, or an error).
    pub writable: bool,
}

/// Which system interface a [`Selector`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// select(2).
    Select,
    /// poll(2).
    Poll,
    /// mio (epoll, kqueue), with level-triggering emulated.
    Mio,
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "select" => Ok(Backend::Select),
            "poll" => Ok(Backend::Poll),
            "mio" => Ok(Backend::Mio),
            _ => Err(format!("unknown backend {s:?} (select, poll or mio)")),
        }
    }
}

/// The largest descriptor number select(2) can take, plus one.
pub const FD_SETSIZE: usize = libc::FD_SETSIZE;

/// The seam every backend fills: four functions over descriptors.
trait Sys {
    fn add(&mut self, fd: RawFd, interest: Interest) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd) -> io::Result<()>;
    /// Waits and appends `(fd, readable, writable)` for ready descriptors.
    fn wait(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<(RawFd, bool, bool)>,
    ) -> io::Result<()>;
}

/// Watches many descriptors at once, like Python's `selectors`.
pub struct Selector {
    backend: Backend,
    sys: Box<dyn Sys>,
    keys: HashMap<RawFd, usize>,
    scratch: Vec<(RawFd, bool, bool)>,
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selector")
            .field("backend", &self.backend)
            .field("registered", &self.keys.len())
            .finish()
    }
}

impl Selector {
    /// An empty selector on `backend`.
    pub fn new(backend: Backend) -> io::Result<Selector> {
        let sys: Box<dyn Sys> = match backend {
            Backend::Select => Box::new(sys_select::SelectSys::default()),
            Backend::Poll => Box::new(sys_poll::PollSys::default()),
            Backend::Mio => Box::new(sys_mio::MioSys::new()?),
        };
        Ok(Selector {
            backend,
            sys,
            keys: HashMap::new(),
            scratch: Vec::new(),
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts watching `fd` for `interest`; events for it carry `key`.
    /// The descriptor must stay open until it is unregistered.
    pub fn register(&mut self, fd: RawFd, interest: Interest, key: usize) -> io::Result<()> {
        if self.keys.contains_key(&fd) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("descriptor {fd} is registered already"),
            ));
        }
        self.sys.add(fd, interest)?;
        self.keys.insert(fd, key);
        Ok(())
    }

    /// Changes what `fd` is watched for, and its key.
    pub fn modify(&mut self, fd: RawFd, interest: Interest, key: usize) -> io::Result<()> {
        let slot = self.keys.get_mut(&fd).ok_or_else(|| not_registered(fd))?;
        self.sys.modify(fd, interest)?;
        *slot = key;
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn unregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.keys.remove(&fd).ok_or_else(|| not_registered(fd))?;
        self.sys.remove(fd)
    }

    /// Number of registered descriptors.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Waits until something registered is ready or `timeout` passes
    /// (`None`: no limit), and returns what is ready. An empty list means
    /// the time ran out. Interrupted waits (EINTR) return an empty list too.
    pub fn select(&mut self, timeout: Option<Duration>) -> io::Result<Vec<Ready>> {
        let mut out = Vec::new();
        self.select_into(timeout, &mut out)?;
        Ok(out)
    }

    /// Like [`select`](Selector::select), appending to `out` to save an
    /// allocation per call.
    pub fn select_into(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Ready>,
    ) -> io::Result<()> {
        self.scratch.clear();
        match self.sys.wait(timeout, &mut self.scratch) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        out.extend(self.scratch.iter().filter_map(|&(fd, readable, writable)| {
            // A descriptor unregistered by an earlier handler in this batch
            // is not reported.
            self.keys.get(&fd).map(|&key| Ready {
                key,
                readable,
                writable,
            })
        }));
        Ok(())
    }
}

fn not_registered(fd: RawFd) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("descriptor {fd} is not registered"),
    )
}

/// What [`select`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selected {
    /// The readers that are readable.
    pub readable: Vec<RawFd>,
    /// The writers that are writable.
    pub writable: Vec<RawFd>,
}

/// Waits until one of `readers` is readable or one of `writers` writable,
/// or `timeout` passes, with select(2) itself: Python's `select.select`.
///
/// Every descriptor must be below [`FD_SETSIZE`]; a larger one is an
/// `InvalidInput` error.
pub fn select(
    readers: &[RawFd],
    writers: &[RawFd],
    timeout: Option<Duration>,
) -> io::Result<Selected> {
    let mut sys = sys_select::SelectSys::default();
    for &fd in readers {
        sys.add(fd, Interest::READ)?;
    }
    for &fd in writers {
        if readers.contains(&fd) {
            sys.modify(fd, Interest::BOTH)?;
        } else {
            sys.add(fd, Interest::WRITE)?;
        }
    }
    let mut ready = Vec::new();
    match sys.wait(timeout, &mut ready) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
    }
    let mut out = Selected::default();
    for (fd, r, w) in ready {
        if r && readers.contains(&fd) {
            out.readable.push(fd);
        }
        if w && writers.contains(&fd) {
            out.writable.push(fd);
        }
    }
    Ok(out)
}

/// A timeout in milliseconds for poll(2) and friends: -1 for none, rounded
/// up so a short wait is not turned into a busy loop.
fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(t) => {
            let ms = t.as_nanos().div_ceil(1_000_000);
            ms.min(libc::c_int::MAX as u128) as libc::c_int
        }
    }
}
