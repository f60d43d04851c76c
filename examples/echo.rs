//! The smallest muxserve server: echo (RFC 862) on one event loop.
//!
//! Run:    cargo run --example echo
//! Poke:   nc 127.0.0.1 7007     (type a line; it comes back)

use muxserve::{Context, Input, Server, Service};

struct Echo;

impl Service for Echo {
    type Session = ();
    fn on_connect(&mut self, _cx: &mut Context<'_>) {}
    fn on_data(&mut self, cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
        cx.write(input.take()); // everything that arrived goes straight back
    }
}

fn main() -> std::io::Result<()> {
    let mut server = Server::new()?;
    let bound = server.bind("127.0.0.1:7007", Echo)?;
    println!("echo: {}", bound.how_to_connect());
    server.run().map(drop)
}
