//! drbdsetup's stand-in, shared by the DRBD steering tests (`dataplane/tests/drbd.rs`)
//! and the daemon-level disk tests (`tests/tests/disk.rs`): one simulated host's DRBD
//! kept in files, so two of them, each reading the other's role as its peer's, make a
//! source and a destination on one machine.

#![allow(dead_code)] // each including test uses a different part

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use dataplane::disk::drbd::Side;

/// The resource every test steers.
pub const RES: &str = "web1";
/// The source host's node name.
pub const SRC_NAME: &str = "skyferry-src";
/// The destination host's node name.
pub const DST_NAME: &str = "skyferry-dst";

/// drbdsetup's stand-in: one simulated host's DRBD, kept in files beside the script.
/// Every call is appended to `calls`; a call matching a line of `fail-on` (grep -E) fails
/// with exit status 17, one matching `hang-on` hangs. `net-options`, `primary` and
/// `secondary` change the state files (unless `frozen` exists) and refuse what DRBD
/// refuses: two primaries without protocol C, a second Primary without
/// allow-two-primaries, forbidding two primaries while both are Primary. `status` prints
/// the next file of `queue/`, else `status.json`, with @ROLE@ and @PEER_ROLE@ filled in;
/// `show` prints the running net options in `drbdsetup show` syntax.
pub const FAKE_DRBDSETUP: &str = r#"#!/bin/sh
# Shell builtins where possible: the tests make hundreds of calls.
d=${0%/*}
printf '%s\n' "$*" >> "$d/calls"
if [ -s "$d/fail-on" ] && printf '%s\n' "$*" | grep -Eq -f "$d/fail-on"; then
    echo "$2: fake drbdsetup fails '$*' as the test asked" >&2
    exit 17
fi
if [ -s "$d/hang-on" ] && printf '%s\n' "$*" | grep -Eq -f "$d/hang-on"; then
    sleep 60
fi
read -r role < "$d/role"
read -r peer < "$d/peer-role"
read -r proto < "$d/protocol"
read -r two < "$d/two-primaries"
case "$1" in
net-options)
    for a in "$@"; do
        case "$a" in
        --protocol=*) proto=${a#--protocol=} ;;
        --allow-two-primaries=*) two=${a#--allow-two-primaries=} ;;
        esac
    done
    if [ "$two" = yes ] && [ "$proto" != C ]; then
        echo "$2: Failure: Protocol C required" >&2
        exit 10
    fi
    if [ "$two" = no ] && [ "$role" = Primary ] && [ "$peer" = Primary ]; then
        echo "$2: Failure: (164) Can not clear allow_two_primaries as long as" >&2
        echo "there a primaries on both sides" >&2
        exit 10
    fi
    if [ ! -e "$d/frozen" ]; then
        echo "$proto" > "$d/protocol"
        echo "$two" > "$d/two-primaries"
    fi
    ;;
primary)
    if [ "$peer" = Primary ] && [ "$two" != yes ]; then
        echo "$2: State change failed: (-1) Multiple primaries not allowed by config" >&2
        exit 11
    fi
    [ -e "$d/frozen" ] || echo Primary > "$d/role"
    ;;
secondary)
    [ -e "$d/frozen" ] || echo Secondary > "$d/role"
    ;;
status)
    f="$d/status.json"
    for q in "$d"/queue/*; do
        if [ -e "$q" ]; then f=$q; fi
        break
    done
    sed -e "s/@ROLE@/$role/g" -e "s/@PEER_ROLE@/$peer/g" "$f"
    if [ "$f" != "$d/status.json" ]; then rm -f "$f"; fi
    ;;
show)
    read -r me < "$d/node-id"
    read -r peer_id < "$d/peer-node-id"
    read -r peer_name < "$d/peer-name"
    cat <<EOF
resource "$2" {
    _this_host {
        node-id $me;
    }
    connection {
        _peer_node_id $peer_id;
        net {
            protocol $proto;
            allow-two-primaries $two; # default
            _name "$peer_name";
        }
    }
}
EOF
    ;;
esac
exit 0
"#;

/// A `drbdsetup status --json` answer from a host that is node `me`, in drbdsetup 9.22's
/// layout, with the roles left as @ROLE@ / @PEER_ROLE@ for the stand-in to fill in.
pub fn status_json(
    me: u8,
    disk: &str,
    repl: &str,
    peer_disk: &str,
    out_of_sync: u64,
    pct: f64,
) -> String {
    let (peer, peer_name) = if me == 0 {
        (1, DST_NAME)
    } else {
        (0, SRC_NAME)
    };
    format!(
        r#"[
{{
  "name": "{RES}",
  "node-id": {me},
  "role": "@ROLE@",
  "suspended": false,
  "write-ordering": "flush",
  "devices": [
    {{
      "volume": 0,
      "minor": 10,
      "disk-state": "{disk}",
      "client": false,
      "quorum": true,
      "size": 10485404
    }} ],
  "connections": [
    {{
      "peer-node-id": {peer},
      "name": "{peer_name}",
      "connection-state": "Connected", 
      "congested": false,
      "peer-role": "@PEER_ROLE@",
      "peer_devices": [
        {{
          "volume": 0,
          "replication-state": "{repl}",
          "peer-disk-state": "{peer_disk}",
          "peer-client": false,
          "resync-suspended": "no",
          "out-of-sync": {out_of_sync},
          "pending": 0,
          "unacked": 0,
          "has-sync-details": false,
          "has-online-verify-details": false,
          "percent-in-sync": {pct:.2}
        }} ]
    }} ]
}}
]
"#
    )
}

pub fn in_sync(me: u8) -> String {
    status_json(me, "UpToDate", "Established", "UpToDate", 0, 100.0)
}

/// One simulated host's DRBD: the stand-in and its state files in `dir`.
pub struct FakeDrbd {
    /// Where the stand-in and its state live.
    pub dir: PathBuf,
}

impl FakeDrbd {
    /// The host playing `side` (node 0 is the source), both disks in sync, protocol A,
    /// one primary: the source.
    pub fn new(dir: PathBuf, side: Side) -> FakeDrbd {
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("drbdsetup");
        std::fs::write(&fake, FAKE_DRBDSETUP).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (me, role, peer_role, peer_name) = match side {
            Side::Source => (0, "Primary", "Secondary", DST_NAME),
            Side::Destination => (1, "Secondary", "Primary", SRC_NAME),
        };
        for (name, value) in [
            ("role", role),
            ("peer-role", peer_role),
            ("protocol", "A"),
            ("two-primaries", "no"),
            ("node-id", &me.to_string()),
            ("peer-node-id", &(1 - me).to_string()),
            ("peer-name", peer_name),
        ] {
            std::fs::write(dir.join(name), format!("{value}\n")).unwrap();
        }
        std::fs::write(dir.join("status.json"), in_sync(me)).unwrap();
        FakeDrbd { dir }
    }

    /// The stand-in's path.
    pub fn drbdsetup(&self) -> PathBuf {
        self.dir.join("drbdsetup")
    }

    /// Makes each host read the other's role as its peer's.
    pub fn link(a: &FakeDrbd, b: &FakeDrbd) {
        for (x, y) in [(a, b), (b, a)] {
            std::fs::remove_file(x.dir.join("peer-role")).unwrap();
            std::os::unix::fs::symlink(y.dir.join("role"), x.dir.join("peer-role")).unwrap();
        }
    }

    pub fn set(&self, file: &str, content: &str) {
        std::fs::write(self.dir.join(file), content).unwrap();
    }

    pub fn state(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Every drbdsetup call, arguments only.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The calls that change something (no `status`, no `show`).
    pub fn changes(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| !c.starts_with("status ") && !c.starts_with("show "))
            .collect()
    }

    /// Role, protocol and two-primaries as the stand-in holds them.
    pub fn drbd(&self) -> (String, String, String) {
        (
            self.state("role"),
            self.state("protocol"),
            self.state("two-primaries"),
        )
    }
}
