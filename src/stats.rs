//! Counters and gauges that every engine keeps.
//!
//! Each limit in muxserve has a counter here, so an operator can tell a
//! quiet server from one that is turning clients away.

use std::fmt;

use crate::service::CloseReason;

macro_rules! stats {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// A snapshot of a server's counters and gauges.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Stats {
            /// Adds what `delta` counted to these numbers (for a thread
            /// that counts on its own, then adds its counts under the
            /// lock in one step).
            pub(crate) fn absorb(&mut self, delta: &Stats) {
                $( self.$name += delta.$name; )*
            }
        }

        impl fmt::Display for Stats {
            /// One line of `name=value` pairs, zero counters left out.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut first = true;
                $(
                    if self.$name != 0 || stringify!($name) == "active" {
                        if !first { f.write_str(" ")?; }
                        first = false;
                        write!(f, "{}={}", stringify!($name), self.$name)?;
                    }
                )*
                Ok(())
            }
        }
    };
}

impl Stats {
    /// Counts a connection that closed, and the limit that closed it: the
    /// one place every engine turns a [`CloseReason`] into counters.
    pub(crate) fn record_close(&mut self, why: CloseReason) {
        self.closed += 1;
        self.active = self.active.saturating_sub(1);
        let counter = match why {
            CloseReason::IdleTimeout => &mut self.idle_timeouts,
            CloseReason::FrameTimeout => &mut self.frame_timeouts,
            CloseReason::WriteTimeout => &mut self.write_timeouts,
            CloseReason::InputLimit => &mut self.input_limit_closes,
            CloseReason::OutputLimit => &mut self.output_limit_closes,
            CloseReason::Error(_) => &mut self.io_errors,
            CloseReason::ProtocolError => &mut self.protocol_closes,
            // Counted where the panic was caught.
            CloseReason::Panic => return,
            CloseReason::Closed | CloseReason::Aborted | CloseReason::Shutdown => return,
        };
        *counter += 1;
    }
}

stats! {
    /// Connections accepted and served.
    accepted,
    /// Connections refused because `max_connections` were open.
    rejected_limit,
    /// Connections refused by the admission hook.
    rejected_admission,
    /// Connections refused because their address had `max_per_source` open.
    rejected_per_source,
    /// Times accepting was paused for lack of descriptors or memory.
    accept_pauses,
    /// Failed `accept` calls, all kinds.
    accept_errors,
    /// Of those: out of descriptors (EMFILE, ENFILE).
    accept_no_fds,
    /// Of those: out of kernel memory (ENOBUFS, ENOMEM).
    accept_no_memory,
    /// Of those: the connection died in the queue (ECONNABORTED, EPERM, EPROTO).
    accept_aborted,
    /// Connections closed, all reasons.
    closed,
    /// Connections closed by the idle timeout.
    idle_timeouts,
    /// Connections closed by the frame timeout.
    frame_timeouts,
    /// Connections closed by the write-stall timeout.
    write_timeouts,
    /// Connections closed for sending more unconsumed input than allowed.
    input_limit_closes,
    /// Connections closed because their pending output passed its cap.
    output_limit_closes,
    /// Connections closed by a read or write error (resets and the like).
    io_errors,
    /// Protocol errors reported by services (bad frames, bad lines).
    protocol_errors,
    /// Connections closed for a protocol error.
    protocol_closes,
    /// Callbacks that panicked.
    panics,
    /// Writes the kernel took only in part.
    short_writes,
    /// Bytes read from streams and datagrams.
    bytes_in,
    /// Bytes written to streams and datagrams.
    bytes_out,
    /// Messages received whole by framed services.
    frames_in,
    /// Messages sent through `Context::write_frame`/`send_frame`.
    frames_out,
    /// Datagrams received.
    datagrams_in,
    /// Datagrams sent.
    datagrams_out,
    /// Datagrams dropped because they did not fit the receive buffer.
    oversize_datagrams,
    /// Datagrams not answered because they came from a reflector port or
    /// from one of this server's own addresses.
    reflection_drops,
    /// Datagram replies refused by the reply budget (per source or in all).
    reply_budget_drops,
    /// Bytes read and thrown away from connections lingering after a close.
    linger_discarded,
    /// Lingering connections reset for sending more than `linger_bytes`.
    linger_resets,
    /// Times the engine woke up: loop turns on the loop engines, wakeups
    /// of the acceptor on the thread engine. A server with nothing to do
    /// should not add to it.
    turns,
    /// Open connections now (gauge).
    active,
    /// Most connections open at once (gauge).
    peak,
}
