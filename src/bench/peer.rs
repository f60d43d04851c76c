//! Echo servers that are not muxserve, for `muxserve bench` to compare
//! against (`muxserve serve --engine tokio|bare echo@ADDR`):
//!
//! - tokio: tokio's current-thread runtime, a task per connection, the way
//!   tokio's own examples write an echo server;
//! - bare: an echo loop written straight on mio, with nothing a library
//!   adds (no services, limits, timers, counters or panic guards). It is
//!   the floor: what the mio engine's generality costs is its distance from
//!   this loop, measured side by side.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

/// The bare loop listens with muxserve's (and tokio's) backlog, so a burst
/// of connects treats every server alike.
const BACKLOG: i32 = 1024;

/// Serves echo on `addr` with tokio until the process ends; calls `ready`
/// with the bound address first.
#[cfg(feature = "tokio-peer")]
pub fn tokio_echo(addr: SocketAddr, ready: impl FnOnce(SocketAddr)) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        // tokio listens with a backlog of 1024, like muxserve.
        let listener = tokio::net::TcpListener::bind(addr).await?;
        ready(listener.local_addr()?);
        loop {
            let (mut socket, _) = listener.accept().await?;
            socket.set_nodelay(true)?;
            tokio::spawn(async move {
                // A 16 KiB buffer per connection, as common servers have.
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if socket.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

const LISTENER: Token = Token(usize::MAX);

/// One connection of the bare loop.
struct Peer {
    stream: TcpStream,
    /// Echoed bytes the socket did not take yet; empty (no allocation)
    /// unless the peer reads slower than it sends. While it holds
    /// anything, the connection is not read.
    pending: Vec<u8>,
}

/// Serves echo on `addr` with the bare mio loop until the process ends;
/// calls `ready` with the bound address first.
pub fn bare_echo(addr: SocketAddr, ready: impl FnOnce(SocketAddr)) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut listener = TcpListener::from_std(crate::net::tcp_listener(addr, BACKLOG, None)?);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    ready(listener.local_addr()?);
    let mut peers: Slab<Peer> = Slab::new();
    // One read buffer for every connection.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                accept(&listener, &mut peers, &poll);
                continue;
            }
            let key = event.token().0;
            let Some(peer) = peers.get_mut(key) else {
                continue;
            };
            let mut open = true;
            if event.is_writable() {
                open = write_pending(peer, &poll, key);
            }
            // A short read means "drained" unless the peer's FIN came
            // with the data (then the next read returns 0, with no new
            // event to say so) or the reads were paused for output.
            let drain = event.is_read_closed() || event.is_writable();
            if open && peer.pending.is_empty() && (event.is_readable() || drain) {
                open = echo(peer, &mut buf, drain, &poll, key);
            }
            if !open {
                let mut peer = peers.remove(key);
                let _ = poll.registry().deregister(&mut peer.stream);
            }
        }
    }
}

/// Accepts until the queue is empty.
fn accept(listener: &TcpListener, peers: &mut Slab<Peer>, poll: &Poll) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                // A connection that fails here (reset already, say) is
                // dropped; the others are unaffected.
                let entry = peers.vacant_entry();
                let registered = stream.set_nodelay(true).and_then(|()| {
                    poll.registry()
                        .register(&mut stream, Token(entry.key()), Interest::READABLE)
                });
                if registered.is_ok() {
                    entry.insert(Peer {
                        stream,
                        pending: Vec::new(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // One connection died in the queue; the rest are fine.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            // Out of descriptors, say: no recovery here, this is a
            // benchmark peer. The next connect is a new edge.
            Err(e) => {
                log::warn!("bare peer: accept: {e}");
                return;
            }
        }
    }
}

/// Reads and echoes until a short read (or, with `drain`, until the
/// socket would block); returns whether the connection stays open.
fn echo(peer: &mut Peer, buf: &mut [u8], drain: bool, poll: &Poll, key: usize) -> bool {
    loop {
        let n = match peer.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        let mut sent = 0;
        while sent < n {
            match peer.stream.write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    peer.pending.extend_from_slice(&buf[sent..n]);
                    return poll
                        .registry()
                        .reregister(
                            &mut peer.stream,
                            Token(key),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_ok();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if n < buf.len() && !drain {
            return true;
        }
    }
}

/// Writes what the socket did not take before; once it is all out, stops
/// asking for writability. Returns whether the connection stays open.
fn write_pending(peer: &mut Peer, poll: &Poll, key: usize) -> bool {
    while !peer.pending.is_empty() {
        match peer.stream.write(&peer.pending) {
            Ok(m) => {
                peer.pending.drain(..m);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    peer.pending = Vec::new();
    poll.registry()
        .reregister(&mut peer.stream, Token(key), Interest::READABLE)
        .is_ok()
}
