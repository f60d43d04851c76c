#![no_main]
//! Four clients sending arbitrary bytes to the chat room. The room must
//! never panic, and what it sends must stay UTF-8 with every line ending
//! in CRLF: no client can inject a line into another's stream.
//!
//! Input: records of [client, length, bytes...]; length 255 means "that
//! client disconnects and a new one takes its place".

use libfuzzer_sys::fuzz_target;
use muxserve::services::Chat;
use muxserve::testing::Harness;

fuzz_target!(|data: &[u8]| {
    let mut h = Harness::new(Chat::new().service());
    let mut clients: Vec<_> = (0..4).map(|_| h.connect()).collect();
    let mut rest = data;
    while let [who, len, tail @ ..] = rest {
        let i = usize::from(*who % 4);
        if *len == 255 {
            h.disconnect(clients[i]);
            clients[i] = h.connect();
            rest = tail;
            continue;
        }
        let n = usize::from(*len).min(tail.len());
        h.send(clients[i], &tail[..n]);
        rest = &tail[n..];
        for &c in &clients {
            let out = h.take_output(c);
            let text = std::str::from_utf8(&out).expect("chat sent invalid UTF-8");
            for (at, _) in text.match_indices('\n') {
                assert!(
                    at > 0 && text.as_bytes()[at - 1] == b'\r',
                    "bare LF in {text:?}"
                );
            }
        }
    }
});
