//! A chat room on one event loop: the built-in `Chat` service, with output
//! caps for members that stop reading.
//!
//! Run:    cargo run --example chat
//! Poke:   nc 127.0.0.1 6667     (in two or more terminals)
//!         type a nickname first, then talk; /help lists the commands.

use muxserve::services::Chat;
use muxserve::Server;

fn main() -> std::io::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut server = Server::new()?;
    // `Chat::service()` puts the room behind a line codec: the room sees one
    // callback per line, never a partial read.
    let bound = server.bind("127.0.0.1:6667", Chat::new().service())?;
    println!("chat: {}", bound.how_to_connect());
    let report = server.run()?;
    println!("{report}");
    Ok(())
}
