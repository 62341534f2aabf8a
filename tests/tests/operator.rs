//! What an operator meets first, with the real binaries: `start` exit codes and hints,
//! `--socket` on either side of the subcommand, `watch` and `start --wait` on a terminal (a
//! pseudo-terminal made by util-linux `script`), with NO_COLOR, and through a pipe, and
//! `skyferry demo` end to end.

use std::process::{Command, Output};

use skyferry_tests::{Daemon, binary, is_final};

fn skyferry() -> Command {
    Command::new(binary("skyferry-ctl", "skyferry"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `args` on a pseudo-terminal (`script -qefc`), with `env`; its exit code is the
/// command's.
fn in_pty(args: &[&str], env: &[(&str, &str)]) -> Output {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let mut cmd = Command::new("script");
    cmd.args(["-qefc", &quoted.join(" "), "/dev/null"])
        .env_remove("NO_COLOR")
        .env("TERM", "xterm")
        .env("COLUMNS", "120");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("util-linux script")
}

#[test]
fn start_without_a_port_gets_a_hint() {
    let out = skyferry()
        .args(["start", "--to", "dest-host"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no port") && err.contains("dest-host:7410"),
        "{err}"
    );
}

#[test]
fn start_to_a_wrong_port_fails_at_once_and_watch_says_the_guest_never_paused() {
    let src = Daemon::start("op-wrong-port", 1, false, "");
    // A port nobody listens on.
    let to = format!("127.0.0.1:{}", skyferry_tests::free_port());
    let out = src.cli(&[
        "start",
        "--to",
        &to,
        "--quiet",
        "--workload",
        "idle",
        "--mem",
        "8MiB",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!id.is_empty(), "the id comes first: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("migration {id} to {to}: failed"))
            && err.contains("the guest runs at the source"),
        "{err}"
    );
    let s = src.wait_for(&id, 30, is_final);
    assert_eq!(s["phase"], "failed", "{s}");

    // watch, through a pipe: plain lines, the outcome's exit code, the summary table, and
    // no "guest paused" for a guest that never paused.
    let out = src.cli(&["watch", &id]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(!all.contains("stop and copy"), "{all}");
    assert!(all.contains("guest paused       -"), "{all}");
    assert!(all.contains("keeps running at the source"), "{all}");
    assert!(
        all.contains(&format!("migration {id:0>16} (source)")),
        "{all}"
    );
    assert!(!all.contains('\x1b'), "escapes in a pipe: {all:?}");
}

#[test]
fn socket_goes_before_or_after_the_subcommand() {
    let d = Daemon::start("op-socket", 1, false, "");
    let socket = d.socket.to_str().unwrap();
    for args in [
        vec!["--socket", socket, "status"],
        vec!["status", "--socket", socket],
    ] {
        let out = skyferry()
            .args(&args)
            .env_remove("SKYFERRY_SOCKET")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("no migrations on this host"),
            "{args:?}"
        );
    }
}

/// A migration slow enough to be watched for many refreshes: 128 MiB at 20 MB/s.
const SLOW: [&str; 8] = [
    "--workload",
    "idle",
    "--mem",
    "128MiB",
    "--max-bandwidth",
    "20MB/s",
    "--interval",
    "100ms",
];

#[test]
fn start_wait_on_a_terminal_redraws_and_ends_with_the_summary() {
    let dst = Daemon::start("op-wait-dst", 1, true, "");
    let src = Daemon::start("op-wait-src", 1, false, "");
    let to = dst.listen.unwrap().to_string();
    let socket = src.socket.to_str().unwrap().to_string();
    let skyferry = binary("skyferry-ctl", "skyferry");
    let mut args = vec![
        skyferry.to_str().unwrap(),
        "--socket",
        &socket,
        "start",
        "--to",
        &to,
        "--wait",
    ];
    args.extend_from_slice(&SLOW);

    // A terminal: the status block is redrawn in place, then the summary.
    let out = in_pty(&args, &[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}\n{}", src.log());
    assert!(all.contains("\x1b[2K"), "no redraw on a terminal: {all:?}");
    assert!(all.contains("completed in"), "{all}");
    assert!(all.contains("(source): guest"), "no summary table: {all}");

    // NO_COLOR on a terminal: plain lines, no escapes.
    let out = in_pty(&args, &[("NO_COLOR", "1")]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(!all.contains('\x1b'), "escapes despite NO_COLOR: {all:?}");
    assert!(all.contains("iteration 1:"), "{all}");
    assert!(all.contains("completed in"), "{all}");

    // A pipe: plain lines, and `watch` of the finished migration gives the same ending.
    let out = Command::new(&skyferry).args(&args[1..]).output().unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(!all.contains('\x1b'), "{all:?}");
    assert!(all.contains("completed in"), "{all}");
    let id = all
        .lines()
        .find_map(|l| l.strip_prefix("migration "))
        .and_then(|l| l.split(':').next())
        .expect("the first line names the migration")
        .to_string();
    let out = src.cli(&["watch", id.trim_start_matches('0')]);
    let watched = text(&out);
    assert!(out.status.success(), "{watched}");
    assert!(watched.contains("completed in"), "{watched}");
    assert!(
        watched.contains(&format!("migration {id} (source)")),
        "{watched}"
    );
}

#[test]
fn the_demo_runs_on_a_terminal_and_through_a_pipe() {
    let skyferry = binary("skyferry-ctl", "skyferry");
    let args = [
        skyferry.to_str().unwrap(),
        "demo",
        "--workload",
        "idle",
        "--mem",
        "32MiB",
    ];
    let out = Command::new(&skyferry).args(&args[1..]).output().unwrap();
    let piped = text(&out);
    assert!(out.status.success(), "{piped}");
    assert!(!piped.contains('\x1b'), "escapes in a pipe: {piped:?}");
    assert!(piped.contains("iteration 1:"), "{piped}");
    assert!(piped.contains("completed in"), "{piped}");
    assert!(
        piped.contains("(source): guest"),
        "no summary table: {piped}"
    );

    let out = in_pty(&args, &[]);
    let tty = text(&out);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("completed in"), "{tty}");
    let out = in_pty(&args, &[("NO_COLOR", "1")]);
    let plain = text(&out);
    assert!(out.status.success(), "{plain}");
    assert!(
        !plain.contains('\x1b'),
        "escapes despite NO_COLOR: {plain:?}"
    );
}
