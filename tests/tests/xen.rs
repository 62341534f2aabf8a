//! A Xen domain migrated between two real skyferryd processes, each on its own "host" of the
//! Xen test double (`xen-ffi/double/`, loaded through `[xen]` in place of Xen's libraries),
//! driven by the real `skyferry` CLI.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use skyferry_tests::{Daemon, is_final};
use skyferry_xen_ffi::double::{self, Domain, EventKind, XenDouble};

const PAGES: u64 = 8192; // 32 MiB

struct Double {
    lib: XenDouble,
    so: PathBuf,
}

/// The double, built once; `None` (reason printed) without Xen's headers, unless required.
fn double() -> Option<&'static Double> {
    static D: OnceLock<Result<Double, String>> = OnceLock::new();
    let d = D.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xen-double");
        let so = double::build(&out).map_err(|e| e.to_string())?;
        Ok(Double {
            lib: XenDouble::load(&so).map_err(|e| e.to_string())?,
            so,
        })
    });
    match d {
        Ok(d) => Some(d),
        Err(e) if std::env::var_os("SKYFERRY_REQUIRE_XEN").is_none() => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("the Xen test double is required here: {e}"),
    }
}

/// A "host": a directory of domains, removed on drop.
struct Host(PathBuf);

impl Host {
    fn new(name: &str) -> Host {
        let dir = std::env::temp_dir().join(format!("skyferry-xen-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Host(dir)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// skyferryd on `host`, loading the double for both Xen libraries.
fn daemon(d: &Double, name: &str, host: &Host, listen: bool, xen_section: bool) -> Daemon {
    let so = d.so.display().to_string();
    let extra = if xen_section {
        format!("\n[xen]\nxenctrl = {so:?}\nxenforeignmemory = {so:?}\n")
    } else {
        String::new()
    };
    let env: [(&str, &Path); 1] = [("XEN_DOUBLE_DIR", &host.0)];
    Daemon::start_with_env(name, 4, listen, &extra, &env)
}

/// `skyferry start --quiet` of Xen domain `domid` into `dest_domid` at `to`: the migration id.
fn start_xen(d: &Daemon, to: &str, domid: u32, dest_domid: u32, extra: &[&str]) -> String {
    let (guest, dest) = (format!("xen:{domid}"), dest_domid.to_string());
    let mut args = vec![
        "start",
        "--to",
        to,
        "--quiet",
        "--guest",
        &guest,
        "--dest-domid",
        &dest,
    ];
    args.extend_from_slice(extra);
    // A migration the destination refuses fails at once: start prints its id, then exits
    // non-zero; the callers read why from its status.
    let out = d.cli(&args);
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        out.status.success() || !id.is_empty(),
        "skyferry {args:?}: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    id
}

fn cli_err(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    assert!(!out.status.success(), "skyferry {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_domain_migrates_between_two_daemons_and_runs_only_at_the_destination() {
    let Some(d) = double() else { return };
    let (src_host, dst_host) = (Host::new("src"), Host::new("dst"));
    // The source domain: memory with content, a hole, an HVM context.
    let src = d.lib.create_domain(&src_host.0, 5, PAGES).unwrap();
    for gfn in 0..PAGES {
        if gfn == 4000 {
            src.set_hole(gfn, true).unwrap();
        } else if gfn % 4 != 0 {
            src.write(gfn, 8, &gfn.to_le_bytes().repeat(100)).unwrap();
        }
    }
    src.set_context(&[0x5a; 5000]).unwrap();
    src.set_writes_per_round(100, 7);
    // The destination: what `xl create -p` made, with the same configuration.
    let dst = d.lib.create_domain(&dst_host.0, 7, PAGES).unwrap();
    dst.set_hole(4000, true).unwrap();
    dst.toolstack_pause().unwrap();

    let dst_d = daemon(d, "xen-dst", &dst_host, true, true);
    let src_d = daemon(d, "xen-src", &src_host, false, true);
    let to = dst_d.listen.unwrap().to_string();
    let done = AtomicBool::new(false);
    let (id, s) = std::thread::scope(|scope| {
        // The guest writes until it is paused.
        let guest = scope.spawn(|| guest_writes(&src, &done));
        let id = start_xen(&src_d, &to, 5, 7, &["--max-bandwidth", "200MB/s"]);
        let s = src_d.wait_for(&id, 60, is_final);
        done.store(true, Ordering::Relaxed);
        assert!(guest.join().unwrap() > 0, "the guest wrote nothing");
        (id, s)
    });
    assert_eq!(s["phase"], "completed", "{s}\nDEST LOG:\n{}", dst_d.log());
    assert_eq!(s["verified"], true);
    assert_eq!(s["guest"], "domain-5");
    let dd = dst_d.wait_for(&id, 10, is_final);
    assert_eq!(dd["phase"], "completed", "{dd}");

    for gfn in 0..PAGES {
        assert!(
            src.read(gfn).unwrap() == dst.read(gfn).unwrap(),
            "frame {gfn} differs"
        );
    }
    assert_eq!(dst.context(), src.context());
    // Paused at the source for good; running at the destination, started after the
    // source paused.
    assert_eq!(src.status().pause_count, 1);
    assert_eq!(src.status().logdirty, 0);
    assert_eq!(dst.status().pause_count, 0);
    let paused = src
        .events()
        .into_iter()
        .find(|e| e.kind() == Some(EventKind::Pause))
        .unwrap();
    let started = dst
        .events()
        .into_iter()
        .find(|e| e.kind() == Some(EventKind::Unpause))
        .unwrap();
    assert!(started.time_ns > paused.time_ns);
    assert_ne!(started.pid, paused.pid, "two daemons, two processes");

    // The daemons carry on: a second domain goes the same way.
    let src2 = d.lib.create_domain(&src_host.0, 6, 256).unwrap();
    src2.write(3, 0, b"second").unwrap();
    let dst2 = d.lib.create_domain(&dst_host.0, 8, 256).unwrap();
    dst2.toolstack_pause().unwrap();
    let id = start_xen(&src_d, &to, 6, 8, &[]);
    let s = src_d.wait_for(&id, 30, is_final);
    assert_eq!(s["phase"], "completed", "{s}");
    assert_eq!(&dst2.read(3).unwrap()[..6], b"second");
}

/// Writes pages as the guest, until `done` or until it is paused; returns how many.
fn guest_writes(src: &Domain<'_>, done: &AtomicBool) -> u64 {
    let mut n = 0u64;
    while !done.load(Ordering::Relaxed) {
        let gfn = (n * 13) % PAGES;
        if gfn != 4000 && src.write(gfn, 0, &n.to_le_bytes()).is_ok() {
            n += 1;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    n
}

#[test]
fn operator_mistakes_get_clear_errors_and_change_nothing() {
    let Some(d) = double() else { return };
    let (src_host, dst_host) = (Host::new("src-err"), Host::new("dst-err"));
    let src = d.lib.create_domain(&src_host.0, 5, 64).unwrap();
    let dst_d = daemon(d, "xen-dst-err", &dst_host, true, true);
    let plain_d = daemon(d, "xen-plain-err", &dst_host, true, false);
    let src_d = daemon(d, "xen-src-err", &src_host, false, true);
    let to = dst_d.listen.unwrap().to_string();

    let e = cli_err(&src_d, &["start", "--to", &to, "--guest", "xen:5"]);
    assert!(e.contains("--dest-domid"), "{e}");
    let e = cli_err(&src_d, &["start", "--to", &to, "--guest", "xen:five"]);
    assert!(e.contains("domain id"), "{e}");
    let e = cli_err(
        &src_d,
        &[
            "start",
            "--to",
            &to,
            "--guest",
            "xen:99",
            "--dest-domid",
            "7",
        ],
    );
    assert!(e.contains("Xen domain 99 does not exist"), "{e}");

    // The destination has no such domain: refused there, named here, the source runs on.
    let id = start_xen(&src_d, &to, 5, 7, &[]);
    let s = src_d.wait_for(&id, 30, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    let why = s["error"].to_string();
    assert!(why.contains("Xen domain 7 does not exist"), "{s}");
    assert_eq!(src.status().pause_count, 0);
    assert_eq!(src.status().logdirty, 0);

    // A destination without [xen] refuses Xen domains, saying so.
    let plain = plain_d.listen.unwrap().to_string();
    let id = start_xen(&src_d, &plain, 5, 7, &[]);
    let s = src_d.wait_for(&id, 30, is_final);
    assert!(s["error"].to_string().contains("no [xen] section"), "{s}");

    // A daemon whose libraries are Xen's real ones, on this host without Xen.
    if !Path::new("/dev/xen/privcmd").exists() {
        let real_d = Daemon::start("xen-real-err", 4, false, "\n[xen]\n");
        let e = cli_err(
            &real_d,
            &[
                "start",
                "--to",
                &to,
                "--guest",
                "xen:5",
                "--dest-domid",
                "7",
            ],
        );
        assert!(
            e.contains("Xen is not available on this host") || e.contains("cannot load"),
            "{e}"
        );
    }
}
