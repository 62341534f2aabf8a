//! The cleartext handshake, both ends. See `src/handshake.rs` for the input format.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skyferry_dataplane_fuzz::handshake::handshake(data);
});
