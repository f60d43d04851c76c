//! The select facade on every backend: level-triggered reports, writable
//! readiness, timeouts, unregistering, and select(2)'s descriptor limit.
//! Assertions look for the events that must be there and tolerate extra
//! (spurious) ones.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use muxserve::select::{select, Backend, Interest, Ready, Selector};

const BACKENDS: [Backend; 3] = [Backend::Select, Backend::Poll, Backend::Mio];
const MARGIN: Duration = Duration::from_millis(250);

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

fn readable(events: &[Ready], key: usize) -> bool {
    events.iter().any(|e| e.key == key && e.readable)
}

fn writable(events: &[Ready], key: usize) -> bool {
    events.iter().any(|e| e.key == key && e.writable)
}

#[test]
fn unread_data_is_reported_again_until_drained() {
    for backend in BACKENDS {
        let (mut a, mut b) = pair();
        let mut sel = Selector::new(backend).unwrap();
        sel.register(b.as_raw_fd(), Interest::READ, 7).unwrap();
        a.write_all(b"0123456789").unwrap();
        let mut half = [0u8; 5];
        for round in 0..2 {
            let events = sel.select(Some(Duration::from_secs(5))).unwrap();
            assert!(
                readable(&events, 7),
                "{backend:?} round {round}: {events:?}"
            );
            b.read_exact(&mut half).unwrap();
        }
        // Drained: a short wait reports nothing for it.
        let events = sel.select(Some(Duration::from_millis(50))).unwrap();
        assert!(
            !readable(&events, 7),
            "{backend:?}: drained but reported {events:?}"
        );
    }
}

#[test]
fn writable_readiness_and_modify() {
    for backend in BACKENDS {
        let (a, _b) = pair();
        let mut sel = Selector::new(backend).unwrap();
        sel.register(a.as_raw_fd(), Interest::READ, 1).unwrap();
        let events = sel.select(Some(Duration::from_millis(50))).unwrap();
        assert!(!writable(&events, 1), "{backend:?}: not asked for writable");
        sel.modify(a.as_raw_fd(), Interest::BOTH, 2).unwrap();
        let events = sel.select(Some(Duration::from_secs(5))).unwrap();
        assert!(writable(&events, 2), "{backend:?}: {events:?}");
        // Level-triggered: still writable, still reported.
        let events = sel.select(Some(Duration::from_secs(5))).unwrap();
        assert!(writable(&events, 2), "{backend:?}: {events:?}");
    }
}

#[test]
fn a_timeout_returns_nothing_in_time() {
    for backend in BACKENDS {
        let (_a, b) = pair();
        let mut sel = Selector::new(backend).unwrap();
        sel.register(b.as_raw_fd(), Interest::READ, 1).unwrap();
        let wait = Duration::from_millis(100);
        let start = Instant::now();
        let events = sel.select(Some(wait)).unwrap();
        let took = start.elapsed();
        assert!(!readable(&events, 1), "{backend:?}: {events:?}");
        assert!(
            took >= wait && took <= wait + MARGIN,
            "{backend:?}: took {took:?}"
        );
    }
}

#[test]
fn unregister_stops_reports() {
    for backend in BACKENDS {
        let (mut a, b) = pair();
        let mut sel = Selector::new(backend).unwrap();
        sel.register(b.as_raw_fd(), Interest::READ, 3).unwrap();
        a.write_all(b"x").unwrap();
        assert!(readable(
            &sel.select(Some(Duration::from_secs(5))).unwrap(),
            3
        ));
        sel.unregister(b.as_raw_fd()).unwrap();
        assert!(sel.is_empty());
        let events = sel.select(Some(Duration::from_millis(50))).unwrap();
        assert!(!readable(&events, 3), "{backend:?}: {events:?}");
        assert!(sel.unregister(b.as_raw_fd()).is_err());
    }
}

#[test]
fn eof_is_reported_readable() {
    for backend in BACKENDS {
        let (a, b) = pair();
        let mut sel = Selector::new(backend).unwrap();
        sel.register(b.as_raw_fd(), Interest::READ, 4).unwrap();
        drop(a);
        assert!(
            readable(&sel.select(Some(Duration::from_secs(5))).unwrap(), 4),
            "{backend:?}"
        );
    }
}

#[test]
fn the_select_function_reports_subsets() {
    let (mut a, b) = pair();
    let (c, _d) = pair();
    a.write_all(b"x").unwrap();
    let ready = select(
        &[b.as_raw_fd(), c.as_raw_fd()],
        &[a.as_raw_fd()],
        Some(Duration::from_secs(5)),
    )
    .unwrap();
    assert_eq!(ready.readable, [b.as_raw_fd()]);
    assert_eq!(ready.writable, [a.as_raw_fd()]);
    let start = Instant::now();
    let none = select(&[c.as_raw_fd()], &[], Some(Duration::from_millis(50))).unwrap();
    assert!(none.readable.is_empty() && start.elapsed() >= Duration::from_millis(50));
}

#[test]
fn select_refuses_descriptors_beyond_fd_setsize() {
    // Open sockets until one gets a descriptor of 1024 or more (sockets,
    // not files: epoll refuses regular files).
    let mut sockets = Vec::new();
    let high = loop {
        let (a, b) = UnixStream::pair().unwrap();
        let fd = b.as_raw_fd();
        sockets.push((a, b));
        if fd >= 1024 {
            break fd;
        }
        assert!(sockets.len() < 5000, "descriptors do not grow");
    };
    let mut sel = Selector::new(Backend::Select).unwrap();
    let err = sel.register(high, Interest::READ, 0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("FD_SETSIZE"), "{err}");
    assert!(select(&[high], &[], Some(Duration::ZERO)).is_err());
    // The other backends take it.
    for backend in [Backend::Poll, Backend::Mio] {
        let mut sel = Selector::new(backend).unwrap();
        sel.register(high, Interest::READ, 0).unwrap();
    }
}
