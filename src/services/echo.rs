//! Echo (RFC 862): every byte back, in order, until the client closes.

use crate::buffer::Input;
use crate::service::{Context, DatagramContext, DatagramService, PeerAddr, Service};

/// Sends every byte back.
///
/// Half-close works by default: when the client shuts down its sending
/// side, [`Service::on_eof`] closes the connection once everything queued
/// has been sent. A client that sends without reading is held back by the
/// engine's output high-water mark, not buffered without bound.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl Service for Echo {
    type Session = ();

    fn on_connect(&mut self, _cx: &mut Context<'_>) {}

    fn on_data(&mut self, cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
        cx.write(input.take());
    }
}

/// Over datagrams: each datagram back to its sender, whole.
impl DatagramService for Echo {
    fn on_datagram(&mut self, cx: &mut DatagramContext<'_>, _from: &PeerAddr, data: &[u8]) {
        cx.reply(data);
    }
}
