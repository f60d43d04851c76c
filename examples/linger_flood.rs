//! The hostile client behind the linger-flood figure in BENCHMARKS.md:
//! it connects to a service that closes first (daytime), reads the line,
//! then sends as fast as it can to the connection the server is closing,
//! and starts over when the server resets it.
//!
//! ```text
//! cargo run --release --example linger_flood -- 127.0.0.1:7013 10
//! ```
//! floods 127.0.0.1:7013 for 10 seconds and prints how many connections
//! and bytes that took.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: linger_flood HOST:PORT SECONDS";
    let addr: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let secs: f64 = args.next().expect(usage).parse().expect(usage);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let chunk = vec![b'x'; 64 * 1024];
    let (mut connections, mut bytes) = (0u64, 0u64);
    while Instant::now() < end {
        let Ok(mut c) = TcpStream::connect(addr) else {
            continue;
        };
        connections += 1;
        let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
        let mut line = [0u8; 128];
        let _ = c.read(&mut line);
        while Instant::now() < end {
            match c.write(&chunk) {
                Ok(n) => bytes += n as u64,
                Err(_) => break,
            }
        }
    }
    println!("{connections} connections, {bytes} bytes sent to closing connections");
}
