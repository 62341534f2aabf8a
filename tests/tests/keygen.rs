//! `skyferry keygen`, run as the real binary.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use dataplane::crypto::PreSharedKey;

fn skyferry() -> Command {
    Command::new(skyferry_tests::binary("skyferry-ctl", "skyferry"))
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("skyferry-keygen-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn writes_an_owner_only_key_that_parses() {
    let dir = scratch("ok");
    let path = dir.join("psk");
    let out = skyferry()
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    PreSharedKey::from_hex(&text).expect("key file parses");

    // A second run must not clobber the key peers already have...
    let again = skyferry()
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

    // ...unless told to, and the new key is new.
    let forced = skyferry()
        .args(["keygen", "--force", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(forced.status.success());
    assert_ne!(std::fs::read_to_string(&path).unwrap(), text);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unwritable_place_is_a_clear_error() {
    let out = skyferry()
        .args(["keygen", "--out", "/dev/null/psk"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot create /dev/null/psk"), "{err}");

    // A directory that cannot be made (not even by root: /proc takes no new entries) says
    // how to make it.
    let out = skyferry()
        .args(["keygen", "--out", "/proc/skyferry-keygen-test/psk"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot create the directory /proc/skyferry-keygen-test")
            && err.contains("install -d -m 0700"),
        "{err}"
    );
}

#[test]
fn unknown_flags_are_refused() {
    let out = skyferry().args(["keygen", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_missing_directory_is_created_owner_only() {
    let dir = scratch("newdir");
    let path = dir.join("etc").join("skyferry").join("psk");
    let out = skyferry()
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parent = path.parent().unwrap();
    let mode = std::fs::metadata(parent).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", parent.display());
    assert!(String::from_utf8_lossy(&out.stdout).contains("created the directory"));
    PreSharedKey::from_hex(&std::fs::read_to_string(&path).unwrap()).expect("key parses");
    std::fs::remove_dir_all(dir).unwrap();
}
