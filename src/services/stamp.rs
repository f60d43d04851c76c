//! Stamp: the time-stamping echo of the seed notes. Every line `msg` comes
//! back as `[Sat Nov 21 20:23:00 2026] msg`.

use std::time::SystemTime;

use super::clock::{ctime, Zone};
use crate::codec::{Delimited, FrameError, MAX_LINE};
use crate::framed::{FrameService, Framed};
use crate::service::{Context, DatagramContext, DatagramService, PeerAddr};

/// Answers each line with the time and the line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stamp {
    /// Local time (default) or UTC.
    pub zone: Zone,
}

impl Stamp {
    /// The service, framed by lines of at most [`MAX_LINE`] bytes; a longer
    /// line gets an error line and is skipped.
    pub fn service(zone: Zone) -> Framed<Delimited, Stamp> {
        let lines = Delimited::lines(MAX_LINE).overlong(crate::codec::Overlong::Skip);
        Framed::new(lines, Stamp { zone })
    }
}

impl FrameService for Stamp {
    type Session = ();

    fn on_connect(&mut self, _cx: &mut Context<'_>) {}

    fn on_frame(&mut self, cx: &mut Context<'_>, _: &mut (), line: &[u8]) {
        let mut reply = format!("[{}] ", ctime(SystemTime::now(), self.zone)).into_bytes();
        reply.extend_from_slice(line);
        if let Err(e) = cx.write_frame(&mut super::reply_lines(), &reply) {
            cx.write(format!("error: {e}\r\n").as_bytes());
        }
    }

    fn on_frame_error(&mut self, cx: &mut Context<'_>, _: &mut (), err: &FrameError) {
        cx.write(format!("error: {err}\r\n").as_bytes());
    }
}

/// Over datagrams: each datagram comes back as `[time] ` followed by its
/// bytes, unchanged (so a trailing newline stays).
impl DatagramService for Stamp {
    fn on_datagram(&mut self, cx: &mut DatagramContext<'_>, _from: &PeerAddr, data: &[u8]) {
        let mut reply = format!("[{}] ", ctime(SystemTime::now(), self.zone)).into_bytes();
        reply.extend_from_slice(data);
        cx.reply(&reply);
    }
}
