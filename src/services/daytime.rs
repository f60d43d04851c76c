//! Daytime (RFC 867): one line with the date and time, then close.

use std::time::SystemTime;

use super::clock::{ctime, Zone};
use crate::buffer::Input;
use crate::config::ReplyBudget;
use crate::service::{Context, DatagramContext, DatagramService, PeerAddr, Service};

/// Sends `Sat Nov 21 20:23:00 2026\r\n` and closes. Anything the client
/// sends is ignored.
#[derive(Clone, Copy, Debug, Default)]
pub struct Daytime {
    /// Local time (default) or UTC.
    pub zone: Zone,
}

impl Service for Daytime {
    type Session = ();

    fn on_connect(&mut self, cx: &mut Context<'_>) {
        let line = format!("{}\r\n", ctime(SystemTime::now(), self.zone));
        cx.write(line.as_bytes());
        cx.close();
    }

    fn on_data(&mut self, _cx: &mut Context<'_>, _: &mut (), input: &mut Input<'_>) {
        input.take();
    }
}

/// Over datagrams: any datagram is answered with one carrying the line.
impl DatagramService for Daytime {
    /// The answer changes once a second: a source gets a few, then one a
    /// second.
    fn reply_budget(&self, server: ReplyBudget) -> ReplyBudget {
        server.at_most(4, 1)
    }

    fn on_datagram(&mut self, cx: &mut DatagramContext<'_>, _from: &PeerAddr, _data: &[u8]) {
        let line = format!("{}\r\n", ctime(SystemTime::now(), self.zone));
        cx.reply(line.as_bytes());
    }
}
