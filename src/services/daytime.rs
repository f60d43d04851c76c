//! Daytime (RFC 867): one line with the date and time, then close.

use std::time::SystemTime;

use super::clock::{ctime, Zone};
use crate::buffer::Input;
use crate::service::{Context, Service};

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
