//! Echo behind HMAC challenge-response authentication, with its client.
//!
//! Run the server:   MUXSERVE_KEY=correct-horse-battery cargo run --example auth_echo
//! Run the client:   MUXSERVE_KEY=correct-horse-battery cargo run --example auth_echo -- client
//!   or:             MUXSERVE_KEY=correct-horse-battery cargo run -- client 127.0.0.1:7012 --auth-key-env MUXSERVE_KEY
//! A wrong key:      MUXSERVE_KEY=wrong-but-long-enough cargo run --example auth_echo -- client
//!                   (prints "authentication failed")
//!
//! The key never crosses the wire: the server sends a fresh random nonce,
//! the client answers with an HMAC of it, and the server proves itself the
//! same way (see `muxserve::auth` for the bytes).

use std::io::{Read, Write};

use muxserve::auth::{client_handshake, Authenticated, Key};
use muxserve::services::Echo;
use muxserve::Server;

const ADDR: &str = "127.0.0.1:7012";

fn main() -> std::io::Result<()> {
    let key = Key::from_env("MUXSERVE_KEY")?;
    if std::env::args().nth(1).as_deref() == Some("client") {
        return client(&key);
    }
    let mut server = Server::new()?;
    server.bind(ADDR, Authenticated::new(Echo, key))?;
    println!("authenticated echo on {ADDR}; run this example with `-- client` to talk to it");
    server.run().map(drop)
}

/// Authenticates, sends one line, prints the echo.
fn client(key: &Key) -> std::io::Result<()> {
    let mut stream = std::net::TcpStream::connect(ADDR)?;
    if let Err(e) = client_handshake(&mut stream, key) {
        eprintln!("{e}");
        std::process::exit(1);
    }
    println!("authenticated; the server proved it knows the key too");
    stream.write_all(b"hello, authenticated world\n")?;
    let mut line = [0u8; 27];
    stream.read_exact(&mut line)?;
    print!("echo: {}", String::from_utf8_lossy(&line));
    Ok(())
}
