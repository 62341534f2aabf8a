//! QEMU guests end to end: a real Linux kernel under QEMU (TCG here), its RAM carried by two
//! real skyferryd processes, its device state by QEMU (`x-ignore-shared`); then the same
//! guest moved by QEMU's own migration, for the side-by-side figures. And the failure paths:
//! whatever goes wrong before the commit, the guest keeps running at the source.
//!
//! Skipped, with the reason printed, on a host without `qemu-system-x86_64` (`tests/run`
//! installs it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::guest::qemu::qmp::Qmp;
use serde_json::{Value, json};
use skyferry_tests::{Daemon, binary, is_final};

const RAM_MIB: u64 = 256;
/// The guest program's workload: a mixed pattern at a rate this TCG host sustains.
const WORKLOAD: [&str; 6] = ["--mem-mib", "48", "--rate", "3000", "--pattern", "mixed"];
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

fn qemu_missing() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: qemu-system-x86_64 is not installed (tests/run installs it)");
    }
    !ok
}

/// A private directory under /dev/shm (guest RAM lives in memory), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = PathBuf::from(format!(
            "/dev/shm/skyferry-e2e-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test guest's QEMU command line (`skyferry test-guest`, which builds the guest first).
fn guest_argv(ram_mib: u64, ram: &str, qmp: &str, serial: &str, incoming: bool) -> Vec<String> {
    let mut args: Vec<String> = ["test-guest", "--json", "--ram-file", ram, "--qmp", qmp]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    args.extend(["--serial".into(), serial.into(), "--ram-mib".into()]);
    args.push(ram_mib.to_string());
    args.extend(WORKLOAD.iter().map(|s| (*s).to_string()));
    if incoming {
        args.push("--incoming".into());
    }
    let out = Command::new(binary("skyferry-ctl", "skyferry"))
        .args(&args)
        .output()
        .expect("run skyferry test-guest");
    assert!(
        out.status.success(),
        "skyferry test-guest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("test-guest JSON");
    v["qemu_example"]
        .as_array()
        .expect("argv")
        .iter()
        .map(|a| a.as_str().expect("string").to_string())
        .collect()
}

/// A QEMU this test started, killed on drop.
struct Vm {
    child: Child,
    qmp: PathBuf,
    serial: PathBuf,
    ram: PathBuf,
}

impl Vm {
    fn start(dir: &Scratch, name: &str, ram_mib: u64, incoming: bool) -> Vm {
        Self::start_with(dir, name, ram_mib, incoming, |_| {})
    }

    /// [`start`](Self::start), with the command line changed by `edit` first.
    fn start_with(
        dir: &Scratch,
        name: &str,
        ram_mib: u64,
        incoming: bool,
        edit: impl FnOnce(&mut Vec<String>),
    ) -> Vm {
        let (ram, qmp, serial) = (
            dir.path(&format!("{name}.ram")),
            dir.path(&format!("{name}.qmp")),
            dir.path(&format!("{name}.serial")),
        );
        let s = |p: &Path| p.to_str().expect("utf-8").to_string();
        let mut argv = guest_argv(ram_mib, &s(&ram), &s(&qmp), &s(&serial), incoming);
        edit(&mut argv);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start QEMU");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !qmp.exists() {
            assert!(Instant::now() < deadline, "QEMU {name} made no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Vm {
            child,
            qmp,
            serial,
            ram,
        }
    }

    fn qmp(&self) -> Qmp {
        qmp_at(&self.qmp)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ram);
    }
}

fn qmp_at(path: &Path) -> Qmp {
    // The socket may still be held by a skyferryd that is letting go of it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Qmp::connect(path, QMP_TIMEOUT) {
            Ok(q) => return q,
            Err(e) if Instant::now() > deadline => panic!("QMP {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The last heartbeat in a serial log.
fn last_heartbeat(serial: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    // Complete lines only: the console may be mid-line.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("skyferry-heartbeat "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// Waits until the guest's heartbeat passes `beyond` (none: until it has beaten 3 times).
fn wait_heartbeat(serial: &Path, beyond: Option<u64>, secs: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let last = last_heartbeat(serial);
        match (last, beyond) {
            (Some(h), Some(b)) if h > b => return h,
            (Some(h), None) if h >= 3 => return h,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "heartbeat in {} stayed at {last:?} (waiting past {beyond:?})",
            serial.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A destination daemon that starts the destination QEMU from its command template.
fn dest_daemon(name: &str, dir: &Scratch) -> Daemon {
    let mut argv = guest_argv(
        RAM_MIB,
        "{ram_file}",
        "{qmp}",
        &format!("{}/{{guest}}.serial", dir.0.display()),
        true,
    );
    for a in &mut argv {
        *a = a.replace(&format!("{RAM_MIB}M"), "{ram_mib}M");
    }
    let qemu = format!(
        "\n[qemu]\nram_file = \"{0}/{{guest}}.ram\"\nqmp = \"{0}/{{guest}}.qmp\"\ncommand = {1}\n",
        dir.0.display(),
        serde_json::to_string(&argv).expect("argv JSON")
    );
    Daemon::start(name, 1, true, &qemu)
}

fn source_daemon(name: &str) -> Daemon {
    Daemon::start(name, 1, false, "\n[qemu]\n")
}

/// One migration's figures.
#[derive(Debug)]
struct Figures {
    how: String,
    wire_bytes: u64,
    total_ms: u64,
    downtime_ms: u64,
    iterations: u64,
    paused_bytes: Option<u64>,
}

/// Migrates the QEMU guest at `vm` with skyferry to `dest` as guest `name`; returns the
/// figures and the heartbeat at the pause.
fn skyferry_migrate(
    src: &Daemon,
    dest: &Daemon,
    vm: &Vm,
    name: &str,
    extra: &[&str],
) -> (Figures, Value) {
    let to = dest.listen.expect("listens").to_string();
    let id = start_qemu(src, &to, vm, name, extra);
    let s = src.wait_for(&id, 300, is_final);
    assert_eq!(
        s["phase"],
        "completed",
        "{s}\nsource log:\n{}\ndest log:\n{}",
        src.log(),
        dest.log()
    );
    assert_eq!(s["verified"], true, "RAM digests match at the pause");
    let f = Figures {
        how: format!("skyferry {}", extra.join(" ")),
        wire_bytes: s["wire_bytes"].as_u64().unwrap() + s["state_bytes"].as_u64().unwrap(),
        total_ms: s["elapsed_ms"].as_u64().unwrap(),
        downtime_ms: s["pause_ms"].as_u64().unwrap(),
        iterations: s["iteration"].as_u64().unwrap(),
        paused_bytes: s["paused_bytes"].as_u64(),
    };
    (f, s)
}

/// Migrates with QEMU's own migration from `src` to `dst` (started with -incoming defer -S),
/// with `caps` on both; `max_bandwidth` in bytes/s. With `count_paused`, the source stops
/// before the switchover (`pause-before-switchover`, the guest already paused) so the bytes
/// sent while paused can be read: this adds one QMP round trip to QEMU's downtime.
fn qemu_migrate(
    src: &mut Qmp,
    dst: &mut Qmp,
    caps: &[(&str, bool)],
    max_bandwidth: Option<u64>,
    count_paused: bool,
    how: &str,
) -> Figures {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    // Say every capability that matters, on or off: a QEMU keeps what was set before.
    let mut caps = caps.to_vec();
    for c in ["xbzrle", "x-ignore-shared"] {
        if !caps.iter().any(|(n, _)| *n == c) {
            caps.push((c, false));
        }
    }
    let caps = &caps[..];
    dst.set_capabilities(caps).unwrap();
    dst.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )
    .unwrap();
    let mut src_caps = caps.to_vec();
    src_caps.push(("pause-before-switchover", count_paused));
    src.set_capabilities(&src_caps).unwrap();
    if let Some(bw) = max_bandwidth {
        src.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": bw })),
        )
        .unwrap();
    }
    src.execute(
        "migrate",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )
    .unwrap();
    let mut before_pause = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let r = src.query_migrate().unwrap();
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("pre-switchover") if before_pause.is_none() => {
                before_pause = r["ram"]["transferred"].as_u64();
                src.execute(
                    "migrate-continue",
                    Some(json!({ "state": "pre-switchover" })),
                )
                .unwrap();
            }
            Some("failed" | "cancelled") => panic!("QEMU migration failed: {r}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "QEMU migration still {r}");
        std::thread::sleep(Duration::from_millis(2));
    };
    dst.wait_migration(QMP_TIMEOUT).unwrap();
    dst.cont().unwrap();
    let transferred = done["ram"]["transferred"].as_u64().unwrap();
    Figures {
        how: how.into(),
        wire_bytes: transferred,
        total_ms: done["total-time"].as_u64().unwrap(),
        downtime_ms: done["downtime"].as_u64().unwrap(),
        iterations: done["ram"]["dirty-sync-count"].as_u64().unwrap(),
        paused_bytes: before_pause.map(|b| transferred - b),
    }
}

/// QEMU's own migration of the guest whose QMP socket and serial log are `from_*` to a new
/// QEMU named `to` (paused bytes counted when capped); the heartbeat must go on there.
fn qemu_hop(
    dir: &Scratch,
    from_qmp: &Path,
    from_serial: &Path,
    to: &str,
    caps: &[(&str, bool)],
    max_bandwidth: Option<u64>,
    how: &str,
) -> (Vm, Figures) {
    let vm = Vm::start(dir, to, RAM_MIB, true);
    let beat = last_heartbeat(from_serial).expect("heartbeats at the source");
    let f = qemu_migrate(
        &mut qmp_at(from_qmp),
        &mut vm.qmp(),
        caps,
        max_bandwidth,
        max_bandwidth.is_some(),
        how,
    );
    wait_heartbeat(&vm.serial, Some(beat), 60);
    (vm, f)
}

fn print_table(rows: &[Figures]) {
    eprintln!(
        "\n| migration (256 MiB guest, TCG) | wire MB | total ms | downtime ms | iterations | MB sent while paused |"
    );
    eprintln!("|---|---|---|---|---|---|");
    for r in rows {
        eprintln!(
            "| {} | {:.1} | {} | {} | {} | {} |",
            r.how,
            r.wire_bytes as f64 / 1e6,
            r.total_ms,
            r.downtime_ms,
            r.iterations,
            r.paused_bytes
                .map_or("-".into(), |b| format!("{:.2}", b as f64 / 1e6))
        );
    }
}

#[test]
fn skyferry_carries_a_live_qemu_guest_then_qemu_migrates_it_for_comparison() {
    if qemu_missing() {
        return;
    }
    let dir = Scratch::new("qemu");
    // The destination daemon's QEMUs outlive it (they run the guest): end them however the
    // test ends.
    let _quit = QuitOnDrop(vec![dir.path("b.qmp"), dir.path("e.qmp")]);
    let src = source_daemon("qemu-src");
    let dest = dest_daemon("qemu-dst", &dir);
    let a = Vm::start(&dir, "a", RAM_MIB, false);
    wait_heartbeat(&a.serial, None, 120);

    // 1. skyferry, unlimited loopback: A -> b (a QEMU the destination daemon starts).
    let (sky, status) = skyferry_migrate(&src, &dest, &a, "b", &[]);
    let at_pause = last_heartbeat(&a.serial).expect("heartbeats before the pause");
    let b_serial = dir.path("b.serial");
    let after = wait_heartbeat(&b_serial, Some(at_pause), 60);
    eprintln!("skyferry: heartbeat {at_pause} at the pause, {after} at the destination; {status}");
    let b_state = qmp_at(&dir.path("b.qmp")).status().unwrap();
    assert!(b_state.running, "the destination guest runs");
    assert!(
        status["state_bytes"].as_u64().unwrap() > 10_000,
        "QEMU's device state travelled: {status}"
    );
    // The source QEMU quit after the hand-over: the guest runs in one place.
    assert!(
        Qmp::connect(&a.qmp, Duration::from_secs(2)).is_err(),
        "source QEMU gone"
    );
    let mut rows = vec![sky];

    // 2. QEMU's own migration, default settings: b -> C; 3. with xbzrle: C -> D.
    let (c, f) = qemu_hop(
        &dir,
        &dir.path("b.qmp"),
        &b_serial,
        "c",
        &[],
        None,
        "QEMU default",
    );
    rows.push(f);
    let xbzrle = [("xbzrle", true)];
    let (d, f) = qemu_hop(&dir, &c.qmp, &c.serial, "d", &xbzrle, None, "QEMU xbzrle");
    rows.push(f);

    // 4. Both capped at 100 Mbit/s, counting what is sent while the guest is paused.
    let (sky_capped, _) = skyferry_migrate(&src, &dest, &d, "e", &["--max-bandwidth", "100Mbit"]);
    let beat = last_heartbeat(&d.serial).unwrap();
    let e_serial = dir.path("e.serial");
    wait_heartbeat(&e_serial, Some(beat), 60);
    rows.push(sky_capped);
    let cap = Some(100_000_000 / 8);
    let (f_vm, f) = qemu_hop(
        &dir,
        &dir.path("e.qmp"),
        &e_serial,
        "f",
        &[],
        cap,
        "QEMU --max-bandwidth 100Mbit",
    );
    rows.push(f);
    let (_g, f) = qemu_hop(
        &dir,
        &f_vm.qmp,
        &f_vm.serial,
        "g",
        &xbzrle,
        cap,
        "QEMU xbzrle --max-bandwidth 100Mbit",
    );
    rows.push(f);
    print_table(&rows);
}

/// Sends QMP `quit` to the QEMUs at these sockets when dropped.
struct QuitOnDrop(Vec<PathBuf>);

impl Drop for QuitOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Ok(mut q) = Qmp::connect(p, Duration::from_secs(2)) {
                let _ = q.execute("quit", None);
            }
        }
    }
}

/// Starts a migration that must fail; returns the source's final status.
fn failing_migration(src: &Daemon, to: &str, vm: &Vm, name: &str) -> Value {
    let out = src.cli(&[
        "start",
        "--to",
        to,
        "--guest",
        &format!("qemu:{}", vm.qmp.display()),
        "--ram-file",
        vm.ram.to_str().unwrap(),
        "--name",
        name,
        "--quiet",
    ]);
    // One that fails at once makes start exit non-zero after printing its id.
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() || !id.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = src.wait_for(&id, 120, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    s
}

/// `skyferry start` of the QEMU guest `vm` from `src` to `to`, named `name`, with `extra`
/// flags; returns its id. A migration that fails at once (a completion timeout that is due
/// at the first check, say) makes `start` exit 1 after printing its id: the caller's wait
/// for its phase says how it ended.
fn start_qemu(src: &Daemon, to: &str, vm: &Vm, name: &str, extra: &[&str]) -> String {
    let guest = format!("qemu:{}", vm.qmp.display());
    let mut argv = vec![
        "start",
        "--to",
        to,
        "--guest",
        &guest,
        "--ram-file",
        vm.ram.to_str().expect("utf-8"),
        "--name",
        name,
        "--quiet",
    ];
    argv.extend_from_slice(extra);
    let out = src.cli(&argv);
    assert!(
        out.status.success() || !out.stdout.is_empty(),
        "start: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        src.log()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The guest at `vm` still runs: QEMU says so and the heartbeat goes on.
fn still_running(vm: &Vm) {
    eprintln!("checking that {} still runs", vm.qmp.display());
    assert!(vm.qmp().status().unwrap().running, "the source guest runs");
    let beat = last_heartbeat(&vm.serial).unwrap();
    wait_heartbeat(&vm.serial, Some(beat), 30);
}

#[test]
fn failures_before_the_commit_leave_the_guest_running_at_the_source() {
    if qemu_missing() {
        return;
    }
    let dir = Scratch::new("qemu-fail");
    let src = source_daemon("qemu-fail-src");
    // Operator-started destination QEMUs, found at {guest}.ram / {guest}.qmp.
    let dest = Daemon::start(
        "qemu-fail-dst",
        1,
        true,
        &format!(
            "\n[qemu]\nram_file = \"{0}/{{guest}}.ram\"\nqmp = \"{0}/{{guest}}.qmp\"\ntimeout = \"20s\"\n",
            dir.0.display()
        ),
    );
    let to = dest.listen.unwrap().to_string();
    let a = Vm::start(&dir, "a", RAM_MIB, false);
    wait_heartbeat(&a.serial, None, 120);

    // QMP unreachable, or a RAM file that is not the guest's: refused at the start.
    let bad = src.cli(&[
        "start",
        "--to",
        &to,
        "--guest",
        "qemu:/nonexistent/qmp.sock",
        "--ram-file",
        a.ram.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("QMP socket /nonexistent/qmp.sock"), "{msg}");
    let other = dir.path("other.ram");
    std::fs::write(&other, vec![0u8; 4096]).unwrap();
    let bad = src.cli(&[
        "start",
        "--to",
        &to,
        "--guest",
        &format!("qemu:{}", a.qmp.display()),
        "--ram-file",
        other.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("no memory backend of this QEMU uses"), "{msg}");
    still_running(&a);

    // No destination QEMU at all.
    let s = failing_migration(&src, &to, &a, "nobody");
    assert!(
        s["error"].as_str().unwrap().contains("nobody.ram"),
        "names the missing RAM file: {s}"
    );
    still_running(&a);

    // A destination QEMU of the wrong size.
    let small = Vm::start(&dir, "small", RAM_MIB / 2, true);
    let s = failing_migration(&src, &to, &a, "small");
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("but the source's guest has"),
        "{s}"
    );
    still_running(&a);
    assert!(!small.qmp().status().unwrap().running, "never started");

    // A destination QEMU that refuses the device state (another machine type): the RAM
    // arrives and matches, the device state does not load, the source resumes.
    let q35 = Vm::start_with(&dir, "q35", RAM_MIB, true, |argv| {
        let m = argv.iter().position(|x| x == "pc").expect("-machine pc");
        argv[m] = "q35".into();
    });
    let s = failing_migration(&src, &to, &a, "q35");
    assert!(s["error"].as_str().unwrap().contains("device state"), "{s}");
    still_running(&a);
    assert!(
        !q35.qmp().status().unwrap().running,
        "destination left unresumed"
    );

    // The destination daemon killed (SIGKILL) while the guest is paused at the source for
    // its final copy: the source resumes it, and the destination QEMU never runs.
    let held = Daemon::start_with_env(
        "qemu-fail-held",
        1,
        false,
        "\n[qemu]\n",
        &[("SKYFERRY_HOLD", Path::new("source-paused:5000"))],
    );
    let mut doomed = Daemon::start(
        "qemu-fail-doomed",
        1,
        true,
        &format!(
            "\n[qemu]\nram_file = \"{0}/{{guest}}.ram\"\nqmp = \"{0}/{{guest}}.qmp\"\ntimeout = \"20s\"\n",
            dir.0.display()
        ),
    );
    let late = Vm::start(&dir, "late", RAM_MIB, true);
    let to_doomed = doomed.listen.unwrap().to_string();
    let id = start_qemu(&held, &to_doomed, &a, "late", &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !held.log().contains("holding at source-paused") {
        assert!(Instant::now() < deadline, "{}", held.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // (QMP serves one client, the source daemon, until the migration ends.)
    doomed.kill();
    let s = held.wait_for(&id, 120, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    still_running(&a);
    assert!(!late.qmp().status().unwrap().running, "never started");

    eprintln!(
        "source log:\n{}\ndestination log:\n{}",
        src.log(),
        dest.log()
    );
}

#[test]
fn a_link_cut_in_pre_copy_resumes_and_the_qemu_guest_moves_once() {
    if qemu_missing() {
        return;
    }
    let dir = Scratch::new("qemu-resume");
    let _quit = QuitOnDrop(vec![dir.path("r.qmp")]);
    let src = source_daemon("qemu-resume-src");
    let dest = dest_daemon("qemu-resume-dst", &dir);
    let relay = skyferry_tests::relay::Relay::new(dest.listen.unwrap());
    let a = Vm::start(&dir, "a", RAM_MIB, false);
    wait_heartbeat(&a.serial, None, 120);
    let id = start_qemu(
        &src,
        &relay.addr.to_string(),
        &a,
        "r",
        &["--max-bandwidth", "30MB/s"],
    );
    let before = src.wait_for(&id, 120, |s| {
        (s["phase"] == "iterating" && s["wire_bytes"].as_u64() > Some(8 << 20)) || is_final(s)
    });
    assert!(!is_final(&before), "ended before the cut: {before}");
    relay.cut();
    let s = src.wait_for(&id, 300, is_final);
    assert_eq!(
        s["phase"],
        "completed",
        "{s}\nsource log:\n{}\ndest log:\n{}",
        src.log(),
        dest.log()
    );
    assert_eq!(s["verified"], true, "{s}");
    assert!(s["resumes"].as_u64() >= Some(1), "{s}");
    // The guest runs at the destination, and only there.
    let at_pause = last_heartbeat(&a.serial).expect("heartbeats before the pause");
    let after = wait_heartbeat(&dir.path("r.serial"), Some(at_pause), 60);
    eprintln!(
        "resumed QEMU migration: heartbeat {at_pause} at the pause, {after} at the destination; \
         {} bytes on the wire, {} resume(s)",
        s["wire_bytes"], s["resumes"]
    );
    assert!(
        Qmp::connect(&a.qmp, Duration::from_secs(2)).is_err(),
        "source QEMU gone"
    );
}

/// An operator tuned the source QEMU for QEMU's own migrations (`multifd`, `return-path`
/// on): skyferry sets them aside for its device-state migration before pre-copy and gives
/// them back. An aborted migration leaves the guest running with the operator's settings;
/// a second one completes and the guest runs on at the destination.
#[test]
fn an_operators_multifd_is_set_aside_for_the_migration_and_given_back() {
    if qemu_missing() {
        return;
    }
    let dir = Scratch::new("qemu-multifd");
    let _quit = QuitOnDrop(vec![dir.path("m2.qmp")]);
    let src = source_daemon("qemu-multifd-src");
    let dest = dest_daemon("qemu-multifd-dst", &dir);
    let a = Vm::start(&dir, "m1", RAM_MIB, false);
    wait_heartbeat(&a.serial, None, 120);
    let operators = [("multifd", true), ("return-path", true)];
    let on = |q: &mut Qmp| -> Vec<bool> {
        let caps = q.execute("query-migrate-capabilities", None).unwrap();
        operators
            .iter()
            .map(|(name, _)| {
                caps.as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["capability"] == *name && c["state"] == true)
            })
            .collect()
    };
    {
        let mut q = a.qmp();
        q.set_capabilities(&operators).unwrap();
        assert_eq!(on(&mut q), vec![true, true]);
    }

    // Aborted in pre-copy: the operator's settings are back, the guest runs here.
    let to = dest.listen.unwrap().to_string();
    let id = start_qemu(&src, &to, &a, "m-aborted", &["--max-bandwidth", "20Mbit"]);
    src.wait_for(&id, 120, |s| s["phase"] == "iterating" || is_final(s));
    assert!(src.cli(&["abort", &id]).status.success());
    let s = src.wait_for(&id, 120, is_final);
    assert_eq!(s["phase"], "aborted", "{s}\n{}", src.log());
    assert_eq!(on(&mut a.qmp()), vec![true, true], "given back");
    still_running(&a);

    // With multifd still on, a migration now completes and the guest runs on there.
    let (_, status) = skyferry_migrate(&src, &dest, &a, "m2", &[]);
    let at_pause = last_heartbeat(&a.serial).expect("heartbeats before the pause");
    let after = wait_heartbeat(&dir.path("m2.serial"), Some(at_pause), 60);
    eprintln!(
        "multifd on beforehand: heartbeat {at_pause} at the pause, {after} at the destination; {status}"
    );
    assert!(qmp_at(&dir.path("m2.qmp")).status().unwrap().running);
}

/// Auto-converge on the QEMU guest: its QEMU process goes into a CPU cgroup of skyferryd's,
/// capped step by step, under a ceiling no pause meets (1 ms) until the pause fits or the
/// ceiling's iteration bound forces it; the throttle is released and the guest runs on at
/// the destination. Whether the throttle engages rests on the dirty counts of the QEMU
/// backend's background fingerprint pass, which lag the guest's writes, so it is printed,
/// not asserted (the cgroup itself is tested in `guest/cpu_cgroup.rs`). Skipped where
/// skyferryd may not make CPU cgroups (it then turns auto-converge off and says so).
#[test]
fn auto_converge_throttles_the_qemu_process_and_the_guest_runs_on() {
    if qemu_missing() {
        return;
    }
    let dir = Scratch::new("qemu-autoconv");
    let _quit = QuitOnDrop(vec![dir.path("t2.qmp")]);
    let src = source_daemon("qemu-autoconv-src");
    let dest = dest_daemon("qemu-autoconv-dst", &dir);
    let a = Vm::start(&dir, "t1", RAM_MIB, false);
    wait_heartbeat(&a.serial, None, 120);
    let to = dest.listen.unwrap().to_string();
    let id = start_qemu(
        &src,
        &to,
        &a,
        "t2",
        &[
            "--max-bandwidth",
            "40Mbit",
            "--max-downtime",
            "1ms",
            "--completion-action",
            "force",
            "--auto-converge",
            "on",
        ],
    );
    let s = src.wait_for(&id, 600, is_final);
    let log = src.log();
    if log.contains("auto-converge off") {
        eprintln!("skipped: skyferryd could not throttle here:\n{log}");
        return;
    }
    assert_eq!(s["phase"], "completed", "{s}\n{log}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["throttle_percent"], 0, "released: {s}");
    if s["throttle_peak_percent"].as_u64() > Some(0) {
        let throttled = log.find("auto-converge: guest throttled");
        let released = log.find("auto-converge: throttle released");
        assert!(throttled < released, "released after:\n{log}");
    }
    let at_pause = last_heartbeat(&a.serial).expect("heartbeats before the pause");
    let after = wait_heartbeat(&dir.path("t2.serial"), Some(at_pause), 60);
    eprintln!(
        "QEMU auto-converge: peak throttle {} %, {} iterations, stop {}, pause {} ms; heartbeat \
         {at_pause} at the pause, {after} at the destination",
        s["throttle_peak_percent"], s["iteration"], s["stop_reason"], s["pause_ms"]
    );
}

/// The completion timeout on the QEMU guest, both actions. A 1 ms ceiling no pause meets
/// keeps pre-copy going; 0.5 s per GiB (125 ms for this guest) runs out during the first
/// iteration. `abort`: the migration fails saying why, announced first, and the guest runs
/// on at the source; `force`: the guest pauses whatever the ceiling, the migration
/// completes verified and the guest runs on at the destination.
#[test]
fn completion_timeout_abort_keeps_the_qemu_guest_and_force_moves_it() {
    if qemu_missing() {
        return;
    }
    let dir = Scratch::new("qemu-timeout");
    let _quit = QuitOnDrop(vec![dir.path("ct2.qmp")]);
    let src = source_daemon("qemu-timeout-src");
    let dest = dest_daemon("qemu-timeout-dst", &dir);
    let a = Vm::start(&dir, "ct1", RAM_MIB, false);
    wait_heartbeat(&a.serial, None, 120);
    let to = dest.listen.unwrap().to_string();
    let start = |name: &str, action: &str| {
        let flags = [
            "--max-bandwidth",
            "100Mbit",
            "--max-downtime",
            "1ms",
            "--completion-timeout-per-gib",
            "500ms",
            "--completion-action",
            action,
        ];
        start_qemu(&src, &to, &a, name, &flags)
    };

    let id = start("ct-aborted", "abort");
    let s = src.wait_for(&id, 300, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("completion timeout reached")),
        "{s}"
    );
    assert_eq!(s["completion"]["applied"], true, "{s}");
    let log = src.log();
    let announced = log.find("completion timeout in");
    let applied = log.find("completion timeout reached: aborted");
    assert!(
        announced.is_some() && applied.is_some() && announced < applied,
        "announced before it applied:\n{log}"
    );
    still_running(&a);

    let id = start("ct2", "force");
    let s = src.wait_for(&id, 300, is_final);
    assert_eq!(s["phase"], "completed", "{s}\n{}", src.log());
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["stop_reason"], "forced", "{s}");
    let at_pause = last_heartbeat(&a.serial).expect("heartbeats before the pause");
    let after = wait_heartbeat(&dir.path("ct2.serial"), Some(at_pause), 60);
    eprintln!(
        "QEMU completion timeout, force: {} iterations, pause {} ms, {} bytes while paused; \
         heartbeat {at_pause} at the pause, {after} at the destination",
        s["iteration"], s["pause_ms"], s["paused_bytes"]
    );
}
