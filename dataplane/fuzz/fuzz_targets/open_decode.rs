//! Open + decode of frames from a peer. See `src/lib.rs` for the input format.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skyferry_dataplane_fuzz::open_decode(data);
});
