//! Shared checks for the decoder targets: the first input byte picks a
//! chunk size, the rest is the stream.

use muxserve::codec::{Decoded, Decoder};

/// Decodes `stream` fed in `chunk`-sized reads, one message at a time, as
/// `Framed` does. Returns the frames and whether the stream was rejected.
fn run<D: Decoder>(mut decoder: D, stream: &[u8], chunk: usize) -> (Vec<Vec<u8>>, bool) {
    let mut frames = Vec::new();
    let mut pending = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        pending.extend_from_slice(piece);
        loop {
            match decoder.decode(&pending) {
                Ok(None) => break,
                Ok(Some(Decoded::Frame { frame, consumed })) => {
                    assert!(consumed <= pending.len() && frame.len() <= consumed);
                    frames.push(frame.to_vec());
                    pending.drain(..consumed);
                }
                Ok(Some(Decoded::Skipped { consumed, .. })) => {
                    assert!(consumed > 0 && consumed <= pending.len());
                    pending.drain(..consumed);
                }
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

/// Whole-buffer and chunked decoding agree, and no frame passes `max`.
pub fn differential<D: Decoder + Clone>(decoder: D, data: &[u8], max: usize) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let whole = run(decoder.clone(), stream, stream.len().max(1));
    let pieces = run(decoder, stream, usize::from(chunk % 64) + 1);
    assert_eq!(whole, pieces, "chunking changed the result");
    assert!(
        whole.0.iter().all(|f| f.len() <= max),
        "a frame passed the limit"
    );
}
