//! Time (RFC 868): four bytes, seconds since 1900, then close.

use std::time::SystemTime;

use super::clock::rfc868;
use crate::buffer::Input;
use crate::config::ReplyBudget;
use crate::service::{Context, DatagramContext, DatagramService, PeerAddr, Service};

/// Sends the time as a 32-bit big-endian count of seconds since
/// 1900-01-01 00:00 UTC, and closes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Time;

impl Service for Time {
    type Session = ();

    fn on_connect(&mut self, cx: &mut Context<'_>) {
        cx.write(&rfc868(SystemTime::now()));
        cx.close();
    }

    fn on_data(&mut self, _cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
        input.take();
    }
}

/// Over datagrams: any datagram is answered with the 4 bytes.
impl DatagramService for Time {
    /// The answer changes once a second: a source gets a few, then one a
    /// second.
    fn reply_budget(&self, server: ReplyBudget) -> ReplyBudget {
        server.at_most(4, 1)
    }

    fn on_datagram(&mut self, cx: &mut DatagramContext<'_>, _from: &PeerAddr, _data: &[u8]) {
        cx.reply(&rfc868(SystemTime::now()));
    }
}
