//! Local inputs cannot kill a daemon, against real `skyferryd` processes: guests larger than
//! the limits or than this host are refused at the CLI and at the daemon, which keeps serving;
//! a second daemon on a live daemon's control socket is refused, naming it; idle control
//! clients cost no thread each.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use dataplane::daemon::control::{Request, Response, StartRequest, request};
use skyferry_tests::{Daemon, binary, is_final};

/// A start request for a synthetic guest of `mem` bytes, as the CLI would send it.
fn synthetic(to: &str, mem: u64) -> Request {
    Request::Start(Box::new(StartRequest {
        to: to.into(),
        qemu: None,
        xen: None,
        kvm: false,
        group: None,
        group_size: None,
        group_failure: None,
        group_pace: false,
        disk: None,
        mac: None,
        ip: None,
        workload: "idle".into(),
        mem,
        seed: 1,
        speed: 1.0,
        guest: None,
        streams: None,
        policy: None,
        optimizations: None,
        compression: None,
        max_bandwidth: None,
        max_downtime_ms: None,
        completion_timeout_per_gib_ms: None,
        completion_action: None,
        auto_converge: None,
    }))
}

fn host_memory() -> dataplane::limits::HostMemory {
    dataplane::limits::HostMemory::read().expect("/proc/meminfo")
}

/// `skyferry start ... --mem MEM` against `src` fails with a message containing `why`, the
/// same request sent straight to the daemon (past the CLI's own check) too, and the daemon
/// is still there.
fn refused(src: &mut Daemon, to: &str, mem: &str, bytes: u64, why: &str) {
    let out = src.cli(&["start", "--to", to, "--workload", "idle", "--mem", mem]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--mem {mem} was accepted");
    assert!(stderr.contains(why), "--mem {mem}: {stderr}");
    eprint!("CLI: {stderr}");
    match request(&src.socket, &synthetic(to, bytes)) {
        Ok(Response::Error { message }) => {
            eprintln!("daemon: {message}");
            assert!(message.contains(why), "{message}");
        }
        other => panic!("the daemon took a {mem} guest: {other:?}"),
    }
    assert!(src.alive(), "the daemon died:\n{}", src.log());
}

#[test]
fn guests_too_large_for_the_limits_or_the_host_are_refused_and_the_daemon_keeps_serving() {
    let dst = Daemon::start("big-dst", 1, true, "");
    let mut src = Daemon::start("big-src", 1, false, "");
    let to = dst.listen.expect("listens").to_string();

    // 8 EiB: over the fixed bound (this aborted the daemon with a failed allocation).
    refused(
        &mut src,
        &to,
        "8EiB",
        8 << 60,
        "guest memory of 8.00 EiB is outside",
    );
    // One GiB more than this host has in all.
    let bytes = (host_memory().total / (1 << 30) + 1) << 30;
    let mem = format!("{}GiB", bytes >> 30);
    refused(
        &mut src,
        &to,
        &mem,
        bytes,
        "more than this host has available",
    );

    // Nothing was left behind, and a real migration still goes through.
    match request(&src.socket, &Request::Status { id: None }) {
        Ok(Response::Status { migrations }) => {
            assert!(migrations.is_empty(), "a refused start left {migrations:?}");
        }
        other => panic!("status: {other:?}"),
    }
    let id = src.start_migration(&to, &["--workload", "idle", "--mem", "32MiB"]);
    // `watch` (a status request every interval, each its own connection) follows it to the end.
    let watched = src.cli(&["watch", &id, "--interval", "50ms"]);
    assert!(
        watched.status.success(),
        "watch: {}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let s = src.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "completed", "{s}");
    assert_eq!(dst.wait_for(&id, 30, is_final)["phase"], "completed");
}

#[test]
fn a_second_daemon_on_a_live_daemons_socket_is_refused_and_names_it() {
    let mut first = Daemon::start("first", 1, true, "");
    let config = first.dir.join("skyferryd.toml");
    let out = std::process::Command::new(binary("skyferry-dataplane", "skyferryd"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run a second skyferryd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second daemon started: {stderr}");
    eprint!("second daemon: {stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.pid())),
        "does not name the first daemon's pid: {stderr}"
    );
    assert!(
        stderr.contains(&first.socket.display().to_string()),
        "does not name the socket: {stderr}"
    );
    // The first is untouched and still answers.
    assert!(first.alive());
    assert!(first.cli(&["status"]).status.success(), "{}", first.log());

    // A socket left by a daemon that died is taken over.
    first.kill();
    assert!(
        first.socket.exists(),
        "the dead daemon's socket file is gone"
    );
    let mut second = std::process::Command::new(binary("skyferry-dataplane", "skyferryd"))
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start skyferryd again");
    // Until it answers (or exits, which fails below).
    let answered = loop {
        if let Ok(Response::Status { .. }) = request(&first.socket, &Request::Status { id: None }) {
            break true;
        }
        if second.try_wait().expect("wait").is_some() {
            break false;
        }
        std::thread::yield_now();
    };
    let _ = second.kill();
    let _ = second.wait();
    assert!(
        answered,
        "a daemon could not take over a dead daemon's socket"
    );
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .count()
}

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in kB")
        * 1024
}

/// The line a control client got before the daemon closed it (empty if none).
fn closing_line(mut c: &UnixStream) -> String {
    let mut text = String::new();
    c.read_to_string(&mut text)
        .expect("read until the daemon closes");
    text
}

#[test]
fn idle_control_clients_are_bounded_and_cost_no_thread_each() {
    const CLIENTS: usize = 300;
    let d = Daemon::start("idle", 1, false, "");
    let pid = d.pid();
    // Once the daemon answered one request, it is idle: its threads are all there.
    assert!(d.cli(&["status"]).status.success());
    let (threads0, rss0) = (threads(pid), rss(pid));

    let mut clients: Vec<UnixStream> = (0..CLIENTS)
        .map(|_| UnixStream::connect(&d.socket).expect("connect"))
        .collect();
    // Accepted in order: once this request is answered, every client above was accepted.
    let out = d.cli(&["status"]);
    assert!(
        out.status.success(),
        "the daemon does not answer beside {CLIENTS} idle clients: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (threads1, rss1) = (threads(pid), rss(pid));
    assert!(
        threads1 <= threads0 + 1,
        "{CLIENTS} idle clients took {} threads",
        threads1 - threads0
    );
    let grown = rss1.saturating_sub(rss0);
    eprintln!(
        "{CLIENTS} idle clients: threads {threads0} -> {threads1}, RSS {} -> {} KiB",
        rss0 >> 10,
        rss1 >> 10
    );
    assert!(
        grown < 16 << 20,
        "{CLIENTS} idle clients took {grown} bytes of RSS"
    );

    // The bound: the clients waiting longest were closed, each with a line saying why.
    let first = closing_line(&clients[0]);
    assert!(first.contains("too many control clients"), "{first:?}");
    let closed = clients[..CLIENTS - 1]
        .iter()
        .take_while(|c| {
            let mut r: &UnixStream = c;
            r.set_nonblocking(true).expect("nonblocking");
            let mut b = [0u8; 1];
            let held =
                matches!(r.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            r.set_nonblocking(false).expect("blocking");
            !held
        })
        .count();
    assert!(
        (CLIENTS - 64..CLIENTS).contains(&closed),
        "{closed} of {CLIENTS} idle clients were closed (the bound is 64 waiting)"
    );

    // The newest is still held, until it idles out with a line saying so.
    let last = clients.pop().expect("a client");
    let line = closing_line(&last);
    assert!(line.contains("no whole request within"), "{line:?}");
    // A client that does send its request is answered as ever.
    let mut c = UnixStream::connect(&d.socket).expect("connect");
    c.write_all(b"{\"cmd\":\"status\",\"id\":null}\n")
        .expect("send");
    let answer = closing_line(&c);
    assert!(answer.contains("\"result\":\"status\""), "{answer}");
}

/// A destination refuses an authenticated source's Hello for a guest larger than this host
/// (with a reason the source can show), and keeps serving.
#[test]
fn a_destination_refuses_a_guest_larger_than_the_host_and_keeps_serving() {
    use dataplane::codec::CodecConfig;
    use dataplane::crypto::PreSharedKey;
    use dataplane::protocol::{Hello, ProtocolError, send_hello};

    let mut dst = Daemon::start("hello-dst", 1, true, "");
    let src = Daemon::start("hello-src", 1, false, "");
    let addr = dst.listen.expect("listens");
    // One GiB more than this host has in all (under listen.max_guest, 256 GiB by default).
    let pages = (host_memory().total >> 12) + (1 << 18);
    let hello = Hello {
        migration_id: 0x0b16,
        source_nonce: [5; 32],
        guest_pages: pages,
        streams: 2,
        codec: CodecConfig::default(),
        frame_size: 65536,
        backend: "synthetic".into(),
        guest: "too-big".into(),
        destination: None,
        resume: 0,
    };
    let key = PreSharedKey::from_hex(skyferry_tests::psk(1).trim()).expect("test key");
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    // A guard against a hang only; the answer comes at once.
    c.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    match send_hello(&mut c, &key, &hello) {
        Err(ProtocolError::Refused(why)) => {
            eprintln!("destination: {why}");
            assert!(why.contains("more than this host has available"), "{why}");
        }
        other => panic!("a {pages}-page guest was not refused: {other:?}"),
    }
    assert!(dst.alive(), "{}", dst.log());
    let id = src.start_migration(addr, &["--workload", "idle", "--mem", "32MiB"]);
    assert_eq!(src.wait_for(&id, 60, is_final)["phase"], "completed");
    assert_eq!(dst.wait_for(&id, 30, is_final)["phase"], "completed");
}
