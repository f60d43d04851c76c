//! The echo server of `examples/echo.rs`, written with mio and slab only:
//! a reading aid showing what muxserve's engine does for you. Every line
//! says why.
//!
//! Run:    cargo run --example raw_mio_echo
//! Poke:   nc 127.0.0.1 7008
//!
//! What it leaves out, and muxserve does not: a listen backlog above 128,
//! generations in tokens, backpressure, timers, connection limits,
//! graceful shutdown, and one shared read buffer instead of one per
//! connection.

use std::io::{self, Read, Write};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

/// The listener's token; connections use their slab index, which is always
/// below it.
const LISTENER: Token = Token(usize::MAX);

/// One client: its socket and the bytes it sent that we could not yet send
/// back.
struct Client {
    stream: TcpStream,
    pending: Vec<u8>,
}

fn main() -> io::Result<()> {
    // The poller: epoll on Linux, kqueue on the BSDs and macOS.
    let mut poll = Poll::new()?;
    // Where ready sources are reported; 128 per wait is plenty here.
    let mut events = Events::with_capacity(128);
    // mio creates the socket non-blocking and listens with a backlog of 128.
    let mut listener = TcpListener::bind("127.0.0.1:7008".parse().unwrap())?;
    // Ask to hear when connections are waiting to be accepted.
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    // All clients, indexed by token: no hashing per event.
    let mut clients: Slab<Client> = Slab::new();
    // One read buffer for everyone: a connection's data is handled at once.
    let mut buf = vec![0u8; 64 * 1024];
    println!("raw mio echo: nc 127.0.0.1 7008");

    loop {
        // Sleep until something is ready. A signal can interrupt the wait;
        // that is not an error, just wait again.
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                // Edge-triggered: accept until WouldBlock, or queued
                // connections would wait for the next, unrelated, arrival.
                loop {
                    match listener.accept() {
                        Ok((mut stream, _peer)) => {
                            // The slab picks the slot; its index is the token.
                            let entry = clients.vacant_entry();
                            let token = Token(entry.key());
                            poll.registry()
                                .register(&mut stream, token, Interest::READABLE)?;
                            entry.insert(Client {
                                stream,
                                pending: Vec::new(),
                            });
                        }
                        // The queue is empty: done until the next event.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // Interrupted by a signal: just try again.
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        // Anything else (EMFILE, say) ends this round of
                        // accepting; a real server must retry later itself.
                        Err(e) => {
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let token = event.token();
            // The client may have been removed earlier in this batch.
            let Some(client) = clients.get_mut(token.0) else {
                continue;
            };
            let mut done = false;
            if event.is_writable() {
                // Send what an earlier read could not.
                done = flush(client).is_err();
            }
            if event.is_readable() && !done {
                // Edge-triggered: read until WouldBlock or EOF.
                loop {
                    match client.stream.read(&mut buf) {
                        // EOF: the client is done sending. Echo has
                        // nothing more to say once pending bytes are out.
                        Ok(0) => {
                            done = true;
                            break;
                        }
                        // Queue the bytes behind anything still pending, so
                        // order is kept, then try to send.
                        Ok(n) => {
                            client.pending.extend_from_slice(&buf[..n]);
                            if flush(client).is_err() {
                                done = true;
                                break;
                            }
                        }
                        // Drained: wait for the next edge.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        // Reset or other failure: drop this client only.
                        Err(_) => {
                            done = true;
                            break;
                        }
                    }
                }
            }
            // Ask for WRITABLE only while something is pending; otherwise
            // an idle socket would be reported writable on every wait.
            // (This reregisters after every event to stay short; muxserve
            // makes that system call only when the interest changes.)
            let interest = if client.pending.is_empty() {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            if done {
                // Removing from the slab drops the socket, which closes it.
                // (A real server flushes pending bytes first.)
                let mut client = clients.remove(token.0);
                poll.registry().deregister(&mut client.stream)?;
            } else {
                poll.registry()
                    .reregister(&mut client.stream, token, interest)?;
            }
        }
    }
}

/// Writes pending bytes until done or the kernel's buffer is full.
fn flush(client: &mut Client) -> io::Result<()> {
    while !client.pending.is_empty() {
        match client.stream.write(&client.pending) {
            // The kernel took n bytes; drop them from the front.
            Ok(n) => {
                client.pending.drain(..n);
            }
            // Full: WRITABLE will say when to go on.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
