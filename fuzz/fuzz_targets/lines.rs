#![no_main]
//! Lines, both over-long policies.

use libfuzzer_sys::fuzz_target;
use muxserve::codec::{Delimited, Overlong};

#[path = "check.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::differential(Delimited::lines(32), data, 32);
    check::differential(Delimited::lines(32).overlong(Overlong::Skip), data, 32);
});
