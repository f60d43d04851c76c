//! [`Framed`]: runs a codec for a service, so protocol code sees messages,
//! never partial reads.
//!
//! ```
//! use muxserve::codec::Delimited;
//! use muxserve::framed::{FrameService, Framed};
//! use muxserve::Context;
//!
//! /// Answers every line with its length.
//! struct Count;
//!
//! impl FrameService for Count {
//!     type Session = ();
//!     fn on_connect(&mut self, _cx: &mut Context<'_>) {}
//!     fn on_frame(&mut self, cx: &mut Context<'_>, _: &mut (), line: &[u8]) {
//!         cx.write(format!("{}\r\n", line.len()).as_bytes());
//!     }
//! }
//!
//! let service = Framed::new(Delimited::lines(1024), Count);
//! # let _ = service;
//! ```

use crate::buffer::Input;
use crate::codec::{Decoded, Decoder, FrameError};
use crate::service::{CloseReason, Context, Service};
use crate::timer::TimerId;

/// Protocol code that works on whole messages. The callbacks mirror
/// [`Service`]'s, with [`on_frame`](FrameService::on_frame) in place of
/// `on_data`.
pub trait FrameService {
    /// State kept for each connection.
    type Session;

    /// A connection was accepted.
    fn on_connect(&mut self, cx: &mut Context<'_>) -> Self::Session;

    /// One whole message arrived (framing removed).
    fn on_frame(&mut self, cx: &mut Context<'_>, session: &mut Self::Session, frame: &[u8]);

    /// The peer sent something the codec rejects: an over-long message
    /// that the codec skips (the connection stays), or a corrupt stream
    /// (the connection closes after this callback). The default writes
    /// nothing.
    fn on_frame_error(
        &mut self,
        cx: &mut Context<'_>,
        session: &mut Self::Session,
        err: &FrameError,
    ) {
        let _ = (cx, session, err);
    }

    /// The peer shut down its sending side; by default, close after
    /// sending what is queued. Bytes of an unfinished message are dropped.
    fn on_eof(&mut self, cx: &mut Context<'_>, session: &mut Self::Session) {
        let _ = session;
        cx.close();
    }

    /// A connection timer fired.
    fn on_timer(&mut self, cx: &mut Context<'_>, session: &mut Self::Session, timer: TimerId) {
        let _ = (cx, session, timer);
    }

    /// A service timer fired.
    fn on_service_timer(&mut self, cx: &mut Context<'_>, timer: TimerId) {
        let _ = (cx, timer);
    }

    /// The connection is gone.
    fn on_close(&mut self, cx: &mut Context<'_>, session: Self::Session, why: CloseReason) {
        let _ = (cx, session, why);
    }

    /// The server started a graceful shutdown.
    fn on_shutdown(&mut self, cx: &mut Context<'_>) {
        let _ = cx;
    }
}

/// A [`FrameService`] behind a codec, usable wherever a [`Service`] is.
///
/// A connection that starts a message and does not finish it within its
/// listener's [`frame_timeout`](crate::Limits::frame_timeout) is closed: one
/// byte a second is not idle, so only this catches the slow-loris client.
#[derive(Debug, Clone)]
pub struct Framed<C, S> {
    codec: C,
    service: S,
}

impl<C, S> Framed<C, S> {
    /// Frames `service`'s input with a copy of `codec` per connection.
    pub fn new(codec: C, service: S) -> Framed<C, S> {
        Framed { codec, service }
    }

    /// The wrapped service.
    pub fn service(&self) -> &S {
        &self.service
    }
}

/// Per-connection state of a framed service.
#[derive(Debug)]
pub struct FramedSession<C, T> {
    decoder: C,
    /// Armed while a message is half-way in.
    frame_timer: Option<TimerId>,
    inner: T,
}

impl<C, S> Service for Framed<C, S>
where
    C: Decoder + Clone,
    S: FrameService,
{
    type Session = FramedSession<C, S::Session>;

    fn on_connect(&mut self, cx: &mut Context<'_>) -> Self::Session {
        FramedSession {
            decoder: self.codec.clone(),
            frame_timer: None,
            inner: self.service.on_connect(cx),
        }
    }

    fn on_data(&mut self, cx: &mut Context<'_>, s: &mut Self::Session, input: &mut Input<'_>) {
        // Stop early if the service closed the connection or paused
        // reading: what is left stays in `input` for later (or for no one).
        let mut completed = false;
        while !cx.is_closing() && !cx.is_paused() {
            match s.decoder.decode(input.bytes()) {
                Ok(None) => break,
                Ok(Some(Decoded::Frame { frame, consumed })) => {
                    input.consume(consumed);
                    completed = true;
                    cx.frame_in();
                    self.service.on_frame(cx, &mut s.inner, frame);
                }
                Ok(Some(Decoded::Skipped { consumed, error })) => {
                    input.consume(consumed);
                    if let Some(err) = error {
                        cx.protocol_error();
                        self.service.on_frame_error(cx, &mut s.inner, &err);
                    }
                }
                Err(err) => {
                    cx.protocol_error();
                    self.service.on_frame_error(cx, &mut s.inner, &err);
                    cx.close_with(CloseReason::ProtocolError);
                    break;
                }
            }
        }
        if let Some(timeout) = cx.frame_timeout() {
            // The clock runs from the first byte of the message now in
            // progress: restart it when one finished, stop it when none is
            // in progress.
            let in_progress = !input.is_empty() || s.decoder.is_skipping();
            if !in_progress || completed {
                if let Some(t) = s.frame_timer.take() {
                    cx.cancel_timer(t);
                }
            }
            if in_progress && s.frame_timer.is_none() {
                s.frame_timer = Some(cx.set_timer(timeout));
            }
        }
    }

    fn on_eof(&mut self, cx: &mut Context<'_>, s: &mut Self::Session) {
        self.service.on_eof(cx, &mut s.inner);
    }

    fn on_timer(&mut self, cx: &mut Context<'_>, s: &mut Self::Session, timer: TimerId) {
        if s.frame_timer == Some(timer) {
            s.frame_timer = None;
            cx.close_with(CloseReason::FrameTimeout);
        } else {
            self.service.on_timer(cx, &mut s.inner, timer);
        }
    }

    fn on_service_timer(&mut self, cx: &mut Context<'_>, timer: TimerId) {
        self.service.on_service_timer(cx, timer);
    }

    fn on_close(&mut self, cx: &mut Context<'_>, s: Self::Session, why: CloseReason) {
        self.service.on_close(cx, s.inner, why);
    }

    fn on_shutdown(&mut self, cx: &mut Context<'_>) {
        self.service.on_shutdown(cx);
    }
}
