//! Assembles the KVM test guest (`src/guest/kvm/guest.S`) with GNU as and objcopy from
//! binutils, so the program the backend runs is built from source here, never a checked-in
//! blob. Its constants come from `src/guest/kvm/layout.rs`, included below.

use std::path::PathBuf;
use std::process::Command;

#[allow(dead_code)] // the layout's constants are handed to the assembler by name below
mod layout {
    include!("src/guest/kvm/layout.rs");
}

/// Every layout constant the program uses, by its assembler name.
fn symbols() -> Vec<(&'static str, u32)> {
    use layout::*;
    vec![
        ("PAGE", PAGE),
        ("PAGE_WORDS", PAGE_WORDS),
        ("HDR_WORDS", HDR_WORDS),
        ("HDR_BYTES", HDR_BYTES),
        ("BODY_WORDS", BODY_WORDS),
        ("STACK_TOP", STACK_TOP),
        ("TABLE", TABLE),
        ("P_PAGES", P_PAGES),
        ("P_DATA_FIRST", P_DATA_FIRST),
        ("P_DATA_END", P_DATA_END),
        ("P_HOT_PAGES", P_HOT_PAGES),
        ("P_HOT_PCT", P_HOT_PCT),
        ("P_PCT_FULL", P_PCT_FULL),
        ("P_PCT_PARTIAL", P_PCT_PARTIAL),
        ("P_PARTIAL_WORDS", P_PARTIAL_WORDS),
        ("ST_PROGRESS", ST_PROGRESS),
        ("ST_GEN", ST_GEN),
        ("ST_RNG", ST_RNG),
        ("ST_CUR_PFN", ST_CUR_PFN),
        ("ST_SWEEPS", ST_SWEEPS),
        ("ST_SWEEP_BAD", ST_SWEEP_BAD),
        ("ST_ARRIVED", ST_ARRIVED),
        ("ST_LAST_TSC", ST_LAST_TSC),
        ("ST_ARRIVAL_GAP", ST_ARRIVAL_GAP),
        ("ST_ARRIVALS", ST_ARRIVALS),
        ("PORT_CMD", PORT_CMD),
        ("PORT_REPORT", PORT_REPORT),
        ("PORT_BAD_PAGE", PORT_BAD_PAGE),
        ("CMD_SWEEP", CMD_SWEEP),
        ("NO_PFN", NO_PFN),
    ]
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "building the KVM test guest needs GNU binutils ({what}): {e}; \
             install binutils (Debian: apt-get install binutils)"
        )
    });
    assert!(
        out.status.success(),
        "{what} failed building the KVM test guest:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    let src = "src/guest/kvm/guest.S";
    println!("cargo::rerun-if-changed={src}");
    println!("cargo::rerun-if-changed=src/guest/kvm/layout.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("kvm-guest.o");
    let bin = out.join("kvm-guest.bin");
    let mut asm = Command::new("as");
    asm.arg("--32");
    for (name, value) in symbols() {
        asm.arg(format!("--defsym={name}={value}"));
    }
    asm.arg("-o").arg(&obj).arg(src);
    run(&mut asm, "as");
    run(
        Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin),
        "objcopy",
    );
    let len = std::fs::metadata(&bin).expect("objcopy wrote it").len();
    assert!(
        len > 0 && len <= u64::from(layout::CODE_MAX),
        "the KVM test guest is {len} bytes; layout.rs leaves {} for it",
        layout::CODE_MAX
    );
}
