//! `skyferryd` as a service: systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING)
//! spoken to a real datagram socket standing in for systemd, a clean stop on SIGTERM, logs
//! free of terminal escapes, and `--check-config`'s answers.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use skyferry_tests::{Daemon, binary};

/// The next notification (one datagram, `KEY=VALUE` lines). The timeout only stops a broken
/// daemon from hanging the test; no assertion depends on how long a message took.
fn next(sock: &UnixDatagram, log: &impl Fn() -> String) -> String {
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification from skyferryd ({e}); log:\n{}", log()),
    }
}

/// Notifications until one carries `line`; panics after 20 others.
fn until(sock: &UnixDatagram, line: &str, log: impl Fn() -> String) -> String {
    let mut seen = Vec::new();
    for _ in 0..20 {
        let m = next(sock, &log);
        if m.lines().any(|l| l == line) {
            return m;
        }
        seen.push(m);
    }
    panic!("no {line} among {seen:?}; log:\n{}", log())
}

#[test]
fn notifies_systemd_and_stops_cleanly_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("skyferry-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    // WatchdogSec=1s: the daemon pings every half of it.
    let mut d = Daemon::start_with_env(
        "notify",
        1,
        true,
        "",
        &[
            ("NOTIFY_SOCKET", &notify_path),
            ("WATCHDOG_USEC", std::path::Path::new("1000000")),
        ],
    );
    let log_path = d.dir.join("skyferryd.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let first = next(&notify, &log);
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    // The watchdog pings only after a status round trip through the control socket.
    let ping = until(&notify, "WATCHDOG=1", log);
    assert!(ping.lines().any(|l| l == "STATUS=idle"), "{ping}");
    assert!(d.socket.exists());

    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    until(&notify, "STOPPING=1", log);
    let text = d.log();
    assert!(text.contains("SIGTERM received: stopping"), "{text}");
    assert!(!d.socket.exists(), "the control socket was left behind");
    assert!(
        !text.contains('\x1b'),
        "terminal escapes in a log file:\n{text:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_config_says_what_is_wrong_or_that_it_is_valid() {
    let dir = std::env::temp_dir().join(format!("skyferry-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("psk");
    let config = dir.join("skyferryd.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\ncontrol_socket = {:?}\npsk_file = {key:?}\n",
            dir.join("c.sock")
        ),
    )
    .unwrap();
    let check = || {
        Command::new(binary("skyferry-dataplane", "skyferryd"))
            .arg("--check-config")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("skyferry keygen --out {}", key.display())),
        "{err}"
    );

    let made = Command::new(binary("skyferry-ctl", "skyferry"))
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success());
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));
    assert!(
        !dir.join("c.sock").exists(),
        "a check must not start a daemon"
    );

    std::fs::write(&config, "[daemon]\nno_such_key = 1\n").unwrap();
    let out = check();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_key"));
    std::fs::remove_dir_all(dir).unwrap();
}
