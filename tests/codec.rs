//! Codecs without sockets: the same frames for every way the bytes can be
//! cut, limits at their exact edges, and no allocation a header can force.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::time::{Duration, Instant};

use muxserve::codec::{
    decode_all, Decoded, Decoder, Delimited, Encoder, FrameError, LengthPrefixed, Overlong,
};
use muxserve::framed::{FrameService, Framed};
use muxserve::{Context, Server};
use proptest::prelude::*;

/// Records the largest allocation made by the current thread while
/// tracking is on.
struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: allocations during thread teardown have no TLS left.
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// wrapper only records sizes in thread-local cells that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns the largest allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    f();
    TRACKING.with(|t| t.set(false));
    LARGEST.with(|l| l.get())
}

/// Decodes `wire` fed in pieces of `chunk` bytes, the way an engine would:
/// unconsumed bytes are kept and shown again with the next piece.
fn decode_in_chunks<D: Decoder>(decoder: &mut D, wire: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for piece in wire.chunks(chunk) {
        pending.extend_from_slice(piece);
        let (mut got, used) = decode_all(decoder, &pending).expect("valid stream");
        frames.append(&mut got);
        pending.drain(..used);
    }
    assert!(pending.is_empty(), "{} bytes left over", pending.len());
    frames
}

fn encode_all<E: Encoder>(encoder: &mut E, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut wire = Vec::new();
    for f in frames {
        encoder.encode(f, &mut wire).expect("encodable");
    }
    wire
}

fn line_frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    // Any bytes but the line end; \r is fine inside a line, not at its end.
    let byte = any::<u8>().prop_filter("no newline", |b| *b != b'\n');
    let line = prop::collection::vec(byte, 0..200)
        .prop_filter("no trailing CR", |l| l.last() != Some(&b'\r'));
    prop::collection::vec(line, 0..20)
}

fn binary_frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20)
}

proptest! {
    #[test]
    fn lines_decode_alike_for_every_chunk_size(frames in line_frames()) {
        let wire = encode_all(&mut Delimited::lines(256), &frames);
        for chunk in 1..=64 {
            prop_assert_eq!(&decode_in_chunks(&mut Delimited::lines(256), &wire, chunk), &frames);
        }
        prop_assert_eq!(&decode_in_chunks(&mut Delimited::lines(256), &wire, wire.len().max(1)), &frames);
    }

    #[test]
    fn length_prefixed_decodes_alike_for_every_chunk_size(frames in binary_frames(), width in prop::sample::select(vec![2usize, 4, 8])) {
        let wire = encode_all(&mut LengthPrefixed::new(width, 1000), &frames);
        for chunk in 1..=64 {
            prop_assert_eq!(&decode_in_chunks(&mut LengthPrefixed::new(width, 1000), &wire, chunk), &frames);
        }
    }

    #[test]
    fn one_byte_headers_round_trip(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..=255), 0..20)) {
        let wire = encode_all(&mut LengthPrefixed::new(1, 255), &frames);
        prop_assert_eq!(decode_in_chunks(&mut LengthPrefixed::new(1, 255), &wire, 1), frames);
    }

    #[test]
    fn delimited_decodes_alike_for_every_chunk_size(frames in prop::collection::vec(prop::collection::vec(1u8..=255, 0..100), 0..20)) {
        let wire = encode_all(&mut Delimited::new(0, 100), &frames);
        for chunk in 1..=64 {
            prop_assert_eq!(&decode_in_chunks(&mut Delimited::new(0, 100), &wire, chunk), &frames);
        }
    }

    #[test]
    fn skipping_long_lines_keeps_the_rest_for_every_chunk_size(frames in line_frames()) {
        let wire = encode_all(&mut Delimited::lines(256), &frames);
        let short: Vec<Vec<u8>> = frames.iter().filter(|f| f.len() <= 50).cloned().collect();
        for chunk in [1, 2, 3, 7, 64] {
            let mut d = Delimited::lines(50).overlong(Overlong::Skip);
            prop_assert_eq!(&decode_in_chunks(&mut d, &wire, chunk), &short);
        }
    }
}

#[test]
fn a_max_length_line_split_before_its_lf_is_accepted_and_one_more_byte_is_not() {
    const MAX: usize = 1000;
    let line = vec![b'x'; MAX];
    // Split between '\r' and '\n', the hardest place.
    let mut d = Delimited::lines(MAX);
    let mut wire = line.clone();
    wire.push(b'\r');
    assert_eq!(d.decode(&wire).unwrap(), None);
    wire.push(b'\n');
    assert_eq!(
        d.decode(&wire).unwrap(),
        Some(Decoded::Frame {
            frame: &line[..],
            consumed: MAX + 2
        })
    );
    // The same with a bare '\n' arriving in the second read.
    let mut d = Delimited::lines(MAX);
    assert_eq!(d.decode(&line).unwrap(), None);
    let mut wire = line.clone();
    wire.push(b'\n');
    assert!(matches!(
        d.decode(&wire).unwrap(),
        Some(Decoded::Frame { .. })
    ));
    // MAX + 1 bytes is rejected before any line end arrives.
    let mut d = Delimited::lines(MAX);
    let long = vec![b'x'; MAX + 1];
    assert!(matches!(
        d.decode(&long),
        Err(FrameError::TooLong { limit: MAX, .. })
    ));
}

#[test]
fn a_header_announcing_4_gib_is_rejected_without_allocating() {
    let mut d = LengthPrefixed::new(4, 1024 * 1024);
    let mut result = None;
    let largest = largest_allocation(|| {
        result = Some(d.decode(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]));
    });
    assert_eq!(
        result.unwrap().unwrap_err(),
        FrameError::TooLong {
            limit: 1024 * 1024,
            announced: Some(u32::MAX as u64)
        }
    );
    assert_eq!(largest, 0, "the decoder allocated");
}

/// A framed service that must never see a frame.
struct Never;

impl FrameService for Never {
    type Session = ();
    fn on_connect(&mut self, _cx: &mut Context<'_>) {}
    fn on_frame(&mut self, _cx: &mut Context<'_>, _: &mut (), _frame: &[u8]) {
        panic!("a frame got through");
    }
}

#[test]
fn through_a_server_a_4_gib_header_closes_the_connection_and_allocates_little() {
    let mut server = Server::new().unwrap();
    let addr = common::local(
        &mut server,
        Framed::new(LengthPrefixed::new(4, 1024 * 1024), Never),
    );
    let client = std::thread::spawn(move || {
        let mut c = common::connect(addr);
        c.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
        // Whatever follows must not be buffered waiting for the "frame".
        let _ = c.write_all(&[7; 200 * 1024]);
        common::read_to_end(&mut c)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let largest = largest_allocation(|| {
        while !client.is_finished() {
            assert!(Instant::now() < deadline, "the connection was not closed");
            server.run_once(Some(Duration::from_millis(10))).unwrap();
        }
    });
    assert_eq!(client.join().unwrap(), b"");
    assert_eq!(server.stats().protocol_errors, 1);
    assert!(largest <= 64 * 1024, "largest allocation {largest} bytes");
}
