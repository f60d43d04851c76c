#![no_main]
//! Length headers of every width, with a small limit so both paths run.

use libfuzzer_sys::fuzz_target;
use muxserve::codec::LengthPrefixed;

#[path = "check.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    for width in [1, 2, 4, 8] {
        check::differential(LengthPrefixed::new(width, 300), data, 300);
    }
});
