//! An echo server written straight against `select()`: no engine, no
//! Service trait, just the classic loop that Python's `select.select`
//! examples teach, in Rust.
//!
//! Run:    cargo run --example select_echo
//! Poke:   nc 127.0.0.1 7010      (several at once: one thread serves all)
//!
//! Each turn asks select(2) which sockets can be read (the listener: a
//! client is waiting; a client: bytes or EOF arrived) and which can be
//! written (only those with echo bytes still pending). select scans every
//! descriptor on every call and cannot take descriptors above 1023, which
//! is why real servers moved to poll and then epoll (see `muxserve::select`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use muxserve::select::select;

fn main() -> io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:7010")?;
    // Non-blocking everywhere: select says "ready", but a read or accept
    // may still find nothing (another process took it, a spurious wakeup).
    listener.set_nonblocking(true)?;
    println!("select echo: nc 127.0.0.1 7010");
    // Each client and the bytes it sent that were not echoed yet.
    let mut clients: HashMap<RawFd, (TcpStream, Vec<u8>)> = HashMap::new();
    let mut buf = [0u8; 4096];
    loop {
        // Everyone may be read; only clients with pending bytes are
        // watched for writing (a socket is almost always writable, so
        // asking for it needlessly would make select return at once).
        let mut readers = vec![listener.as_raw_fd()];
        readers.extend(clients.keys());
        let writers: Vec<RawFd> = clients
            .iter()
            .filter(|(_, (_, pending))| !pending.is_empty())
            .map(|(&fd, _)| fd)
            .collect();
        let ready = select(&readers, &writers, None)?;

        for fd in ready.readable {
            if fd == listener.as_raw_fd() {
                // A client is waiting: accept it (and any others queued).
                loop {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            stream.set_nonblocking(true)?;
                            println!("{peer} connected");
                            clients.insert(stream.as_raw_fd(), (stream, Vec::new()));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let Some((stream, pending)) = clients.get_mut(&fd) else {
                continue;
            };
            match stream.read(&mut buf) {
                // EOF: the client closed; forget it (dropping closes it).
                Ok(0) => {
                    clients.remove(&fd);
                }
                // Level-triggered: one read per report is enough; if more
                // is waiting, select says so again next turn.
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    clients.remove(&fd);
                }
            }
        }

        for fd in ready.writable {
            let Some((stream, pending)) = clients.get_mut(&fd) else {
                continue; // closed above
            };
            match stream.write(pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    clients.remove(&fd);
                }
            }
        }
    }
}
