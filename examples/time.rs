//! Three time services on one loop: time (RFC 868), daytime (RFC 867) and
//! the seed notes' time-stamping echo.
//!
//! Run:    cargo run --example time
//! Poke:   nc 127.0.0.1 3737 | od -An -tu1     (4 bytes: seconds since 1900)
//!         nc 127.0.0.1 1313                   (one line, then the server closes)
//!         nc 127.0.0.1 2121                   (type lines; each comes back stamped)
//!
//! The time server's answer, decoded by hand in Rust:
//!
//! ```text
//! let mut b = [0u8; 4];
//! TcpStream::connect("127.0.0.1:3737")?.read_exact(&mut b)?;
//! let unix = u32::from_be_bytes(b) as i64 - 2_208_988_800;   // before 2036
//! ```

use muxserve::services::{Daytime, Stamp, Time, Zone};
use muxserve::Server;

fn main() -> std::io::Result<()> {
    let mut server = Server::new()?;
    let time = server.bind("127.0.0.1:3737", Time)?;
    let daytime = server.bind("127.0.0.1:1313", Daytime { zone: Zone::Local })?;
    let stamp = server.bind("127.0.0.1:2121", Stamp::service(Zone::Local))?;
    for (name, bound) in [("time", time), ("daytime", daytime), ("stamp", stamp)] {
        println!("{name:<8} {}", bound.how_to_connect());
    }
    server.run().map(drop)
}
