//! Replays saved inputs through the harness the fuzzer runs (`cargo test` in this directory).
//!
//! A crash found by `cargo fuzz run open_decode` is saved under
//! `artifacts/open_decode/crash-<sha1>`; copy it to `regressions/open_decode/` and this test
//! fails until the bug is fixed.

use std::path::Path;

use skyferry_dataplane_fuzz::{CONTROL_DIGEST, CONTROL_SEALED, Outcome, open_decode, run, seeds};

#[test]
fn seeds_open_and_decode() {
    for (name, input) in seeds() {
        match run(&input) {
            Outcome::Decoded(Ok(())) => {}
            other => panic!("seed {name}: {other:?}"),
        }
    }
}

#[test]
fn warm_up_and_empty_frame_decode_under_every_config() {
    for control in 0..=u8::MAX {
        if control & (CONTROL_SEALED | CONTROL_DIGEST) != CONTROL_SEALED {
            continue;
        }
        match run(&[control]) {
            Outcome::Decoded(Ok(())) => {}
            other => panic!("control {control:#04x}: {other:?}"),
        }
    }
}

#[test]
fn short_and_empty_inputs() {
    for len in 0..16 {
        open_decode(&vec![0u8; len]);
        open_decode(&vec![0xffu8; len]);
        open_decode(&vec![0x01u8; len]);
    }
}

#[test]
fn saved_inputs_do_not_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions/open_decode");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut failed = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let input = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| open_decode(&input)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "inputs that panic: {failed:#?}");
}
