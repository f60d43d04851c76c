#![no_main]
//! Messages ended by a NUL byte.

use libfuzzer_sys::fuzz_target;
use muxserve::codec::{Delimited, Overlong};

#[path = "check.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::differential(Delimited::new(0, 16), data, 16);
    check::differential(Delimited::new(0, 16).overlong(Overlong::Skip), data, 16);
});
