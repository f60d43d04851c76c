//! Byte queues for connections: [`Input`] (what a service reads) and
//! [`OutBuf`] (what waits for the kernel to take it).
//!
//! Both are built so that an idle connection owns no heap memory: the engine
//! reads into one loop-wide buffer and lends it to the service as an
//! `Input`; only bytes the service left unconsumed are copied into the
//! connection. Output is written straight to the socket after each callback,
//! and only the part the kernel refused is queued in an `OutBuf`. Both free
//! their allocation as soon as they are empty.

/// Unconsumed input lent to [`Service::on_data`](crate::Service::on_data).
///
/// The bytes may be half a message or several. Consume what was handled;
/// whatever is left is kept by the engine and shown again, followed by newer
/// bytes, on the next call.
#[derive(Debug)]
pub struct Input<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    /// Wraps bytes; nothing consumed yet. Public so that services and codecs
    /// can be tested without an engine.
    pub fn new(buf: &'a [u8]) -> Input<'a> {
        Input { buf, pos: 0 }
    }

    /// The bytes not consumed yet.
    pub fn bytes(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// How many bytes are not consumed yet.
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// True when everything was consumed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks the first `n` unconsumed bytes as handled.
    ///
    /// # Panics
    /// If `n` is more than [`len`](Input::len).
    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.len(), "consumed {n} of {} bytes", self.len());
        self.pos += n;
    }

    /// Consumes and returns every unconsumed byte.
    pub fn take(&mut self) -> &'a [u8] {
        let rest = self.bytes();
        self.pos = self.buf.len();
        rest
    }

    /// Bytes consumed so far (used by the engine to keep the rest).
    pub(crate) fn consumed(&self) -> usize {
        self.pos
    }
}

/// A queue of bytes waiting to be written: appended at the back, written
/// from the front.
///
/// It is a `Vec` plus a read offset rather than a ring, so the pending bytes
/// are always one slice, ready for one `send`. The front is compacted only
/// when the dead prefix is at least as large as the live part, which keeps
/// every byte's copy cost amortised O(1).
#[derive(Debug, Default)]
pub struct OutBuf {
    buf: Vec<u8>,
    head: usize,
    /// The bytes at the head are the rest of a write the kernel took in
    /// part (see [`OutBuf::started`]).
    started: bool,
}

impl OutBuf {
    /// An empty queue; allocates nothing.
    pub const fn new() -> OutBuf {
        OutBuf {
            buf: Vec::new(),
            head: 0,
            started: false,
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of heap this queue holds (capacity, not length).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The waiting bytes, oldest first.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.head..]
    }

    /// Appends bytes at the back.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.head > 0 && self.head >= self.len() {
            // The dead prefix is at least as big as the live part: move the
            // live part down instead of growing.
            self.started = true;
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Drops `n` bytes from the front (the kernel took them). Frees the
    /// allocation when the queue becomes empty, so a connection that has
    /// caught up owns no output memory.
    pub fn advance(&mut self, n: usize) {
        assert!(n <= self.len(), "advanced {n} of {} bytes", self.len());
        self.head += n;
        if self.head == self.buf.len() {
            self.clear();
        }
    }

    /// Drops everything and frees the allocation.
    pub fn clear(&mut self) {
        self.buf = Vec::new();
        self.head = 0;
        self.started = false;
    }

    /// Queues the rest of a write whose first bytes the kernel took, into
    /// an empty queue.
    pub fn extend_rest(&mut self, rest: &[u8]) {
        self.extend(rest);
        self.started = true;
    }

    /// Whether the peer has received the beginning of what is at the head
    /// of the queue: dropping the queue now would cut a message in two.
    pub fn started(&self) -> bool {
        self.started || self.head > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_consume_and_take() {
        let mut input = Input::new(b"hello world");
        input.consume(6);
        assert_eq!(input.bytes(), b"world");
        assert_eq!(input.take(), b"world");
        assert!(input.is_empty());
        assert_eq!(input.consumed(), 11);
    }

    #[test]
    #[should_panic(expected = "consumed 3 of 2 bytes")]
    fn input_over_consume_panics() {
        Input::new(b"ab").consume(3);
    }

    #[test]
    fn outbuf_keeps_order_and_frees_when_drained() {
        let mut out = OutBuf::new();
        assert_eq!(out.capacity(), 0);
        out.extend(b"abcdef");
        out.advance(4);
        out.extend(b"gh");
        assert_eq!(out.as_slice(), b"efgh");
        out.advance(1);
        out.extend(b"ij"); // dead prefix 1 < live 3: appended in place
        assert_eq!(out.as_slice(), b"fghij");
        out.advance(5);
        assert!(out.is_empty());
        assert_eq!(out.capacity(), 0);
    }
}
