//! Many small services on one thread, the way inetd served them from one
//! process: TCP, UDP and Unix sockets, streams and datagrams, one loop.
//!
//! Run:    cargo run --example inetd
//! Poke:   nc 127.0.0.1 7007                   echo over TCP
//!         nc -u 127.0.0.1 7007                echo over UDP
//!         nc 127.0.0.1 1313                   daytime over TCP
//!         nc -u 127.0.0.1 1313                daytime over UDP (send any line)
//!         nc 127.0.0.1 3737 | od -An -tu1     time
//!         nc -U /tmp/muxserve-stamp.sock      stamp over a Unix stream socket
//!         nc 127.0.0.1 6667                   chat
//!
//! Ctrl-C shuts down gracefully and removes the Unix socket file.

use muxserve::services::{Chat, Daytime, Discard, Echo, Stamp, Time, Zone};
use muxserve::Server;

fn main() -> std::io::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let zone = Zone::Local;
    let mut server = Server::new()?;
    let bound = [
        server.bind("127.0.0.1:7007", Echo)?,
        server.bind_datagram("udp://127.0.0.1:7007", Echo)?,
        server.bind("127.0.0.1:7009", Discard)?,
        server.bind("127.0.0.1:1313", Daytime { zone })?,
        server.bind_datagram("udp://127.0.0.1:1313", Daytime { zone })?,
        server.bind("127.0.0.1:3737", Time)?,
        server.bind("unix:///tmp/muxserve-stamp.sock", Stamp::service(zone))?,
        server.bind("127.0.0.1:6667", Chat::new().service())?,
    ];
    for b in &bound {
        println!("{:<36} {}", b.to_string(), b.how_to_connect());
    }
    // Stop gracefully on Ctrl-C: the handle works from any thread.
    let handle = server.handle();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            handle.shutdown();
        }
    });
    let report = server.run()?;
    println!("{report}");
    Ok(())
}
