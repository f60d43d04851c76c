//! Discard (RFC 863): read everything, answer nothing.

use crate::buffer::Input;
use crate::service::{Context, DatagramContext, DatagramService, PeerAddr, Service};

/// Reads and drops every byte.
#[derive(Clone, Copy, Debug, Default)]
pub struct Discard;

impl Service for Discard {
    type Session = ();

    fn on_connect(&mut self, _cx: &mut Context<'_>) {}

    fn on_data(&mut self, _cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
        input.take();
    }
}

/// Over datagrams: every datagram is dropped.
impl DatagramService for Discard {
    fn on_datagram(&mut self, _cx: &mut DatagramContext<'_>, _from: &PeerAddr, _data: &[u8]) {}
}
