//! The same echo `Service` as `examples/echo.rs`, run with one OS thread per
//! connection instead of an event loop: muxserve's `ThreadingMixIn`.
//!
//! Run:    cargo run --example threaded_echo
//! Poke:   nc 127.0.0.1 7011
//!
//! Nothing in the service changes between engines; only the line that
//! creates the server does. Compare the two with `muxserve bench`.

use muxserve::engine::ThreadConfig;
use muxserve::{Config, Context, Input, Service, ThreadedServer};

struct Echo;

impl Service for Echo {
    type Session = ();
    fn on_connect(&mut self, _cx: &mut Context<'_>) {}
    fn on_data(&mut self, cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
        cx.write(input.take());
    }
}

fn main() -> std::io::Result<()> {
    // Small stacks: each connection is a thread.
    let threads = ThreadConfig::default();
    let mut server = ThreadedServer::new(Config::default(), threads)?;
    let bound = server.bind("127.0.0.1:7011", Echo)?;
    println!("threaded echo: {}", bound.how_to_connect());
    server.run().map(drop)
}
