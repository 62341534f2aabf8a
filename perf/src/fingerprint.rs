//! `skyferry-bench fingerprint`: what the QEMU backend's content-based dirty detection costs.
//!
//! A RAM file in /dev/shm, like a QEMU guest's, filled with a page mix (a share of it left as
//! holes, as in a guest that never touched them). Measured in the same run:
//! - `read`: every page read with `pread`, nothing else (the floor any pass pays);
//! - `final pass`: the paused, all-core pass that compares every page with its fingerprint
//!   as sent (this lands in the pause);
//! - `one core`: the same pass on one thread, what the background sweeper spends per pass
//!   (it then rests as long, so pre-copy loses at most half a core to it);
//! - `fingerprint on send`: hashing the copies `read_pages` takes (on the sending path).

use std::os::unix::fs::FileExt;
use std::time::Instant;

use clap::Args as ClapArgs;
use dataplane::guest::qemu::fingerprint::Fingerprints;
use dataplane::guest::qemu::ram_file::RamFile;
use dataplane::page::{PAGE_SIZE, Page};
use dataplane::units::parse_size;
use serde::Serialize;

use crate::measure::{best_of, gbps};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Guest RAM size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    mem: u64,
    /// Share of pages left as holes (never written), percent.
    #[arg(long, default_value_t = 50)]
    holes: u64,
    /// Runs per figure; the best is kept.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    mem_mib: u64,
    holes_percent: u64,
    read_gbps: f64,
    final_pass_gbps: f64,
    final_pass_ms_per_gib: f64,
    one_core_pass_gbps: f64,
    one_core_pass_ms_per_gib: f64,
    fingerprint_on_send_gbps: f64,
    /// final pass GB/s over plain pread GB/s.
    final_pass_vs_read: f64,
    table_mib_per_gib: f64,
}

pub fn run(a: &Args) -> Result<(), String> {
    let pages = a.mem / PAGE_SIZE as u64;
    if pages == 0 {
        return Err("--mem must be at least a page".into());
    }
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/skyferry-bench-fingerprint-{}.ram",
        std::process::id()
    ));
    let result = measure(a, pages, &path);
    let _ = std::fs::remove_file(&path);
    let r = result?;
    if a.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
    } else {
        println!(
            "QEMU backend dirty detection, {} MiB RAM file, {}% holes (best of {})",
            r.mem_mib, r.holes_percent, a.reps
        );
        println!("{:<36} {:>8} {:>10}", "", "GB/s", "ms/GiB");
        let ms = |g: f64| 1e3 * f64::from(1u32 << 30) / (g * 1e9);
        for (name, g) in [
            ("pread only (reference)", r.read_gbps),
            ("final pass, all cores (in the pause)", r.final_pass_gbps),
            ("background pass, one core", r.one_core_pass_gbps),
            ("fingerprint on send, one core", r.fingerprint_on_send_gbps),
        ] {
            println!("{name:<36} {g:>8.2} {:>10.0}", ms(g));
        }
        println!(
            "final pass / pread: {:.2}; fingerprint table: {:.0} MiB per GiB of guest",
            r.final_pass_vs_read, r.table_mib_per_gib
        );
    }
    Ok(())
}

fn measure(a: &Args, pages: u64, path: &std::path::Path) -> Result<Report, String> {
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.set_len(a.mem).map_err(|e| e.to_string())?;
    // Written pages: text-like content, a page in 8 all zeros written explicitly.
    let mut page = Page::zeroed();
    for pfn in 0..pages {
        if pfn % 100 < a.holes {
            continue;
        }
        if pfn % 8 != 0 {
            for (i, b) in page.0.iter_mut().enumerate() {
                *b = u8::try_from((pfn * 31 + i as u64 * 7) % 251).expect("below 251");
            }
        } else {
            page.0.fill(0);
        }
        file.write_all_at(&page.0, pfn * PAGE_SIZE as u64)
            .map_err(|e| e.to_string())?;
    }
    let ram = RamFile::open(path).map_err(|e| e.to_string())?;
    let fps = Fingerprints::new(pages, 0x5eed);
    let bytes = pages * PAGE_SIZE as u64;

    // Reference: pread of every page, and the "sent" fingerprints as iteration 1 takes them.
    let mut buf = vec![Page::zeroed(); 256];
    let mut sent_err = None;
    let read = best_of(a.reps, || {
        for first in (0..pages).step_by(256) {
            let n = usize::try_from((pages - first).min(256)).expect("small");
            if let Err(e) = ram.read(first, &mut buf[..n]) {
                sent_err = Some(e.to_string());
            }
        }
    });
    let mut hash_time = std::time::Duration::ZERO;
    for first in (0..pages).step_by(256) {
        let n = usize::try_from((pages - first).min(256)).expect("small");
        ram.read(first, &mut buf[..n]).map_err(|e| e.to_string())?;
        let t = Instant::now();
        for (pfn, p) in (first..).zip(&buf[..n]) {
            fps.sent(pfn, fps.of(p));
        }
        hash_time += t.elapsed();
    }
    if let Some(e) = sent_err {
        return Err(e);
    }
    let mut err = None;
    let final_pass = best_of(a.reps, || match fps.final_pass(&ram) {
        Ok(s) => assert_eq!(s.changed, 0, "nothing changed"),
        Err(e) => err = Some(e.to_string()),
    });
    let one_core = best_of(a.reps, || match fps.pass_on_one_thread(&ram) {
        Ok(s) => assert_eq!(s.changed, 0, "nothing changed"),
        Err(e) => err = Some(e.to_string()),
    });
    if let Some(e) = err {
        return Err(e);
    }
    let gib = bytes as f64 / f64::from(1u32 << 30);
    Ok(Report {
        mem_mib: a.mem >> 20,
        holes_percent: a.holes,
        read_gbps: gbps(bytes, read),
        final_pass_gbps: gbps(bytes, final_pass),
        final_pass_ms_per_gib: final_pass.as_secs_f64() * 1e3 / gib,
        one_core_pass_gbps: gbps(bytes, one_core),
        one_core_pass_ms_per_gib: one_core.as_secs_f64() * 1e3 / gib,
        fingerprint_on_send_gbps: gbps(bytes, hash_time),
        final_pass_vs_read: gbps(bytes, final_pass) / gbps(bytes, read),
        table_mib_per_gib: 16.0 * f64::from(1u32 << 18) / f64::from(1u32 << 20),
    })
}
