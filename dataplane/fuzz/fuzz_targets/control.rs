//! The sealed control channel and the coordinator's lines. See `src/control.rs` for the
//! input format.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skyferry_dataplane_fuzz::control::control(data);
});
