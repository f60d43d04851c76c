//! A line client, like the seed notes' TCP client or `nc`: what you type
//! goes to the server, what the server says comes out. Used by
//! `muxserve client`; handy against chat and stamp.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::thread;

use crate::auth::{client_handshake, Key};

/// Connects to `addr` (`HOST:PORT`) and, with a key, authenticates.
pub fn connect(addr: &str, key: Option<&Key>) -> io::Result<TcpStream> {
    let target = addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: no address"))
    })?;
    let mut stream = TcpStream::connect(target)?;
    stream.set_nodelay(true)?;
    if let Some(key) = key {
        client_handshake(&mut stream, key)?;
    }
    Ok(stream)
}

/// Copies `input` to the server and the server's bytes to `output` until
/// the server closes. When `input` ends, the client shuts down its sending
/// side (half-close) and keeps printing what the server still sends.
pub fn interact<R, W>(stream: TcpStream, mut input: R, mut output: W) -> io::Result<()>
where
    R: Read + Send + 'static,
    W: Write,
{
    let mut to_server = stream.try_clone()?;
    let sender = thread::Builder::new().name("stdin".into()).spawn(move || {
        let copied = io::copy(&mut input, &mut to_server);
        // Done typing: tell the server, keep listening.
        let _ = to_server.shutdown(Shutdown::Write);
        copied.map(drop)
    })?;
    let mut from_server = stream;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from_server.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                output.write_all(&buf[..n])?;
                output.flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    // The server is done; the typing thread may be blocked on a terminal
    // that has nothing to say, so it is not waited for unless it is done.
    if sender.is_finished() {
        if let Ok(Err(e)) = sender.join() {
            if e.kind() != io::ErrorKind::BrokenPipe {
                return Err(e);
            }
        }
    }
    Ok(())
}
