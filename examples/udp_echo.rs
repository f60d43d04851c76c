//! UDP echo (RFC 862) on the event loop: one callback per datagram.
//!
//! Run:    cargo run --example udp_echo
//! Poke:   nc -u 127.0.0.1 7007      (each line you type is one datagram;
//!                                    it comes straight back)

use muxserve::service::{DatagramContext, DatagramService};
use muxserve::{PeerAddr, Server};

/// Sends every datagram back to whoever sent it. There is no connection:
/// each datagram arrives whole, with its sender's address.
struct UdpEcho;

impl DatagramService for UdpEcho {
    fn on_datagram(&mut self, cx: &mut DatagramContext<'_>, from: &PeerAddr, data: &[u8]) {
        log::debug!("{} bytes from {from}", data.len());
        cx.reply(data);
    }
}

fn main() -> std::io::Result<()> {
    env_logger::init();
    let mut server = Server::new()?;
    let bound = server.bind_datagram("udp://127.0.0.1:7007", UdpEcho)?;
    println!("udp echo: {}", bound.how_to_connect());
    server.run().map(drop)
}
