//! muxserve runs many network connections on one thread: a readiness-based
//! event loop keeps every connection in a slab, with its own read and write
//! buffers, and drives protocol code written against one [`Service`] trait.
//!
//! ```no_run
//! use muxserve::{Context, Input, Server, Service};
//!
//! struct Shout;
//!
//! impl Service for Shout {
//!     type Session = ();
//!     fn on_connect(&mut self, _cx: &mut Context<'_>) {}
//!     fn on_data(&mut self, cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
//!         cx.write(&input.take().to_ascii_uppercase());
//!     }
//! }
//!
//! let mut server = Server::new()?;
//! server.bind("127.0.0.1:7007", Shout)?;
//! server.run()?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Layout
//!
//! Read in this order:
//!
//! 1. `examples/echo.rs`: the smallest complete server, then
//!    `examples/raw_mio_echo.rs`, the same thing with mio and slab only,
//!    and `examples/select_echo.rs`, the same again on `select()`.
//! 2. [`engine`]: what every engine owes a service, then the loop
//!    ([`Server::run_once`]): how it accepts, reads, writes and closes.
//!    The connection bookkeeping is shared by the mio and select/poll
//!    engines; [`ThreadedServer`] is the thread-per-connection baseline.
//! 3. [`buffer`]: the bytes a connection holds, and why an idle one holds
//!    none.
//! 4. [`service`]: the [`Service`] trait and the [`Context`] callbacks use;
//!    [`DatagramService`](service::DatagramService) for UDP and Unix
//!    datagrams.
//! 5. [`codec`] and [`framed`]: messages out of a byte stream, each with a
//!    limit.
//! 6. [`services`]: the built-in protocols (echo, discard, daytime, time,
//!    stamp, chat), each a few lines on top.
//!
//! Beside them: [`select`] (a portable `select()`/`Selector` facade),
//! [`auth`] (HMAC challenge-response for any service) and [`client`],
//! [`config`] (limits, and why each number), [`timer`], [`stats`], [`net`]
//! (addresses and socket creation), [`testing`] (a service without
//! sockets) and [`bench`](mod@bench) (what `muxserve bench` runs).
//!
//! # Glossary
//!
//! - **readiness**: the kernel saying a socket can be read or written
//!   without blocking (as opposed to completion-based I/O).
//! - **edge-triggered**: readiness is reported when it appears, once; the
//!   loop must drain the socket or remember to come back (the
//!   *still-ready list*).
//! - **turn**: one wait for readiness and the handling of what it returned.
//!   `muxserve serve --trace` prints each one (see
//!   [`engine::TRACE_TARGET`]).
//! - **session**: a service's per-connection state.
//! - **backpressure**: not reading from a peer while its replies are not
//!   being read, so the server does not buffer without bound.
//! - **half-close**: one side shuts down its sending direction and keeps
//!   reading.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod auth;
pub mod bench;
pub mod buffer;
pub mod client;
pub mod codec;
pub mod config;
pub mod engine;
pub mod framed;
pub mod net;
pub mod select;
pub mod service;
pub mod services;
pub mod stats;
pub mod testing;
pub mod timer;

pub use buffer::Input;
pub use config::{Config, Limits, ReplyBudget};
pub use engine::{Engine, Handle, Host, Report, Server, ThreadedServer};
pub use net::Endpoint;
pub use service::{CloseReason, ConnId, Context, PeerAddr, Service};
pub use stats::Stats;
pub use timer::TimerId;
