//! A guest's replicated disk: its configuration, checked, and the DRBD 9 resource file
//! rendered from it.
//!
//! Both hosts render the same [`DrbdDisk`] into the same file. That matters beyond
//! tidiness: when two DRBD nodes connect they compare their protocol, their
//! `allow-two-primaries` and their split-brain policies, and refuse the connection if any
//! differ.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::DrbdError;

/// Directory real hosts write resource files to; `/etc/drbd.conf` includes `drbd.d/*.res`.
pub const DEFAULT_RESOURCE_DIR: &str = "/etc/drbd.d";

/// Highest DRBD minor number (the kernel's `MINORMASK`, 2^20 - 1).
const MAX_MINOR: u32 = (1 << 20) - 1;

/// DRBD 9 node ids run from 0 to 31.
const MAX_NODE_ID: u8 = 31;

/// A disk configuration skyferry cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DRBD disk {resource:?}: {reason}")]
pub struct InvalidDisk {
    /// The resource, as configured.
    pub resource: String,
    /// What is wrong, and what would be right.
    pub reason: String,
}

/// One host of the resource: DRBD's `on NAME { ... }` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrbdNode {
    /// The host's name exactly as `uname -n` prints it there: drbdadm finds its own section
    /// by that name.
    pub name: String,
    /// Where DRBD listens on that host and where the peer connects to.
    pub address: SocketAddr,
    /// DRBD 9 node id, 0 to 31, unique within the resource.
    pub node_id: u8,
}

/// A guest's disk, replicated by DRBD between the source and the destination host.
///
/// Deserialising checks it (see [`DrbdDisk::validate`]); in TOML:
///
/// ```toml
/// [disk]
/// resource = "web1"
/// device = "/dev/drbd10"          # what the guest uses, on both hosts
/// disk = "/dev/vg0/web1"          # the backing device, on both hosts
/// meta_disk = "internal"          # default; or a separate device
/// port = 7790                     # one TCP port per resource
/// nodes = [
///   { name = "chicago-7", address = "10.0.0.1", node_id = 0 },
///   { name = "dallas-3", address = "10.1.0.1", node_id = 1 },
/// ]
/// ```
///
/// A node's address may carry its own port (`"10.0.0.1:7791"`, `"[fd00::1]:7791"`);
/// without one it takes `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawDisk")]
pub struct DrbdDisk {
    /// DRBD resource name: letters, digits, `_`, `.`, `-`; it names the resource file too.
    pub resource: String,
    /// The DRBD device the guest uses, `/dev/drbdN` (DRBD takes the minor from the name).
    pub device: String,
    /// The backing block device.
    pub disk: String,
    /// `internal` (metadata at the end of `disk`), or a device of its own.
    pub meta_disk: String,
    /// TCP port of nodes whose address names none.
    pub port: u16,
    /// The two hosts.
    pub nodes: Vec<DrbdNode>,
}

/// The shape of a `[disk]` section before it is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    resource: String,
    device: String,
    disk: String,
    #[serde(default = "internal")]
    meta_disk: String,
    port: u16,
    nodes: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    address: String,
    node_id: u8,
}

fn internal() -> String {
    "internal".into()
}

impl TryFrom<RawDisk> for DrbdDisk {
    type Error = InvalidDisk;

    fn try_from(raw: RawDisk) -> Result<Self, InvalidDisk> {
        let invalid = |reason: String| InvalidDisk {
            resource: raw.resource.clone(),
            reason,
        };
        let mut nodes = Vec::with_capacity(raw.nodes.len());
        for n in &raw.nodes {
            let address = if let Ok(a) = n.address.parse::<SocketAddr>() {
                a
            } else if let Ok(ip) = n.address.parse::<IpAddr>() {
                SocketAddr::new(ip, raw.port)
            } else {
                return Err(invalid(format!(
                    "node {:?}: address {:?} is neither an IP address nor IP:port \
                     (IPv6 with a port: \"[fd00::1]:7790\")",
                    n.name, n.address
                )));
            };
            nodes.push(DrbdNode {
                name: n.name.clone(),
                address,
                node_id: n.node_id,
            });
        }
        let disk = DrbdDisk {
            resource: raw.resource.clone(),
            device: raw.device,
            disk: raw.disk,
            meta_disk: raw.meta_disk,
            port: raw.port,
            nodes,
        };
        disk.validate()?;
        Ok(disk)
    }
}

/// A file holding a guest's `[disk]` table, and nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    disk: DrbdDisk,
}

impl DrbdDisk {
    /// Reads the `[disk]` table of a TOML file (`skyferry start --disk FILE`), checked.
    pub fn load(path: &Path) -> Result<DrbdDisk, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str::<DiskFile>(&text)
            .map(|f| f.disk)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks everything drbdadm or the kernel would refuse later, and what would break the
    /// resource file's syntax, so the operator hears about it when the guest is configured.
    pub fn validate(&self) -> Result<(), InvalidDisk> {
        let invalid = |reason: String| InvalidDisk {
            resource: self.resource.clone(),
            reason,
        };
        check_name(&self.resource, 63).map_err(|why| invalid(format!("resource name {why}")))?;
        if self.resource == "all" {
            // drbdadm reads `all` as "every resource".
            return Err(invalid(
                "\"all\" cannot name a resource: drbdadm reads it as every \
                 resource"
                    .into(),
            ));
        }
        self.minor().map_err(invalid)?;
        check_path("disk", &self.disk).map_err(invalid)?;
        if self.meta_disk != "internal" {
            check_path("meta_disk", &self.meta_disk)
                .map_err(|why| invalid(format!("{why} (or \"internal\")")))?;
        }
        if self.port == 0 {
            return Err(invalid(
                "port 0: give the resource a TCP port of its own".into(),
            ));
        }
        let [a, b] = self.nodes.as_slice() else {
            return Err(invalid(format!(
                "{} nodes: a migration needs exactly two, the source and the destination",
                self.nodes.len()
            )));
        };
        for n in [a, b] {
            check_name(&n.name, 64)
                .map_err(|why| invalid(format!("node name {:?} {why}", n.name)))?;
            if n.node_id > MAX_NODE_ID {
                return Err(invalid(format!(
                    "node {:?}: node_id {} is above DRBD's limit of {MAX_NODE_ID}",
                    n.name, n.node_id
                )));
            }
            let ip = n.address.ip();
            if ip.is_unspecified() || ip.is_multicast() || n.address.port() == 0 {
                return Err(invalid(format!(
                    "node {:?}: {} is not an address a peer can connect to",
                    n.name, n.address
                )));
            }
        }
        if a.name == b.name {
            return Err(invalid(format!("both nodes are named {:?}", a.name)));
        }
        if a.node_id == b.node_id {
            return Err(invalid(format!("both nodes have node_id {}", a.node_id)));
        }
        if a.address == b.address {
            return Err(invalid(format!("both nodes use address {}", a.address)));
        }
        if a.address.is_ipv4() != b.address.is_ipv4() {
            return Err(invalid(format!(
                "{} and {} are of different address families; DRBD connects like to like",
                a.address, b.address
            )));
        }
        Ok(())
    }

    /// The device's minor number, from its `/dev/drbdN` name.
    pub fn minor(&self) -> Result<u32, String> {
        let bad = || {
            format!(
                "device {:?}: must be /dev/drbdN with N at most {MAX_MINOR} \
                 (DRBD takes the minor number from the name)",
                self.device
            )
        };
        let n = self.device.strip_prefix("/dev/drbd").ok_or_else(bad)?;
        if n.is_empty()
            || !n.bytes().all(|c| c.is_ascii_digit())
            || (n.len() > 1 && n.starts_with('0'))
        {
            return Err(bad());
        }
        match n.parse::<u32>() {
            Ok(m) if m <= MAX_MINOR => Ok(m),
            _ => Err(bad()),
        }
    }

    /// The node named `host` (this host's `uname -n`).
    pub fn node(&self, host: &str) -> Result<&DrbdNode, InvalidDisk> {
        self.nodes
            .iter()
            .find(|n| n.name == host)
            .ok_or_else(|| InvalidDisk {
                resource: self.resource.clone(),
                reason: format!(
                    "this host is {host:?} but the nodes are {}; drbdadm finds its own \
                     section by `uname -n`, so one node must carry this host's name",
                    self.nodes
                        .iter()
                        .map(|n| format!("{:?}", n.name))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            })
    }

    /// The node that is not `host`.
    pub fn peer_of(&self, host: &str) -> Result<&DrbdNode, InvalidDisk> {
        let me = self.node(host)?;
        self.nodes
            .iter()
            .find(|n| n.node_id != me.node_id)
            .ok_or_else(|| InvalidDisk {
                resource: self.resource.clone(),
                reason: "only one node".into(),
            })
    }

    /// The resource file's name: `skyferry-<resource>.res`.
    pub fn file_name(&self) -> String {
        format!("skyferry-{}.res", self.resource)
    }

    /// The DRBD 9 resource file, as drbdadm reads it.
    pub fn render(&self) -> Result<String, InvalidDisk> {
        self.validate()?;
        let mut s = String::new();
        // Infallible: writing to a String.
        let _ = writeln!(
            s,
            "# Written by skyferryd for the guest disk {}. skyferryd rewrites this file; \
             edit the guest's [disk] configuration instead.",
            self.resource
        );
        let _ = writeln!(s, "resource {} {{", self.resource);
        s.push_str("    net {\n");
        // Asynchronous until the migration needs the disks equal: the guest's writes do not
        // wait for the WAN. skyferryd switches to C (and back) at run time.
        s.push_str("        protocol A;\n");
        // skyferry briefly allows two primaries at the switchover, so a split brain is
        // possible in principle. Resolve it automatically only where no data can be lost: a
        // side without changes, or the side that was Secondary (it had no writer); with two
        // primaries, stay disconnected for the operator.
        s.push_str("        after-sb-0pri discard-zero-changes;\n");
        s.push_str("        after-sb-1pri discard-secondary;\n");
        s.push_str("        after-sb-2pri disconnect;\n");
        s.push_str("    }\n");
        for n in &self.nodes {
            let family = if n.address.is_ipv4() { "ipv4" } else { "ipv6" };
            let _ = write!(
                s,
                "    on {name} {{\n        node-id {id};\n        address {family} {addr};\n        \
                 device {dev};\n        disk \"{disk}\";\n        meta-disk {meta};\n    }}\n",
                name = n.name,
                id = n.node_id,
                addr = n.address,
                dev = self.device,
                disk = self.disk,
                meta = if self.meta_disk == "internal" {
                    self.meta_disk.clone()
                } else {
                    format!("\"{}\"", self.meta_disk)
                },
            );
        }
        let _ = writeln!(
            s,
            "    connection-mesh {{\n        hosts {} {};\n    }}\n}}",
            self.nodes[0].name, self.nodes[1].name
        );
        Ok(s)
    }

    /// Writes the resource file into `dir` (on a real host [`DEFAULT_RESOURCE_DIR`]) and
    /// returns its path. The file is replaced atomically: drbdadm, run by anyone at any
    /// moment, reads either the old file or the new one, never half of one.
    pub fn write_resource_file(&self, dir: &Path) -> Result<PathBuf, DrbdError> {
        let text = self.render()?;
        let path = dir.join(self.file_name());
        // Hidden and not ending in `.res`, so the `include "drbd.d/*.res"` of drbd.conf never
        // picks up a half-written file.
        let tmp = dir.join(format!(".{}.tmp-{}", self.file_name(), std::process::id()));
        let write_err = |source| DrbdError::WriteConfig {
            path: path.clone(),
            source,
        };
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename is durable only once the directory is.
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(write_err)?;
        Ok(path)
    }
}

/// A resource or host name: it goes into a file name, the resource file and command lines
/// unquoted, so it is kept to characters all of them take as they are.
fn check_name(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() || name.len() > max {
        return Err(format!("must be 1 to {max} characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or a digit".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "contains {c:?}: only letters, digits, '_', '.' and '-' are allowed"
        ));
    }
    Ok(())
}

/// A device path. The resource file quotes it (drbdadm's lexer takes `:`, common in
/// `/dev/disk/by-path/` names, only inside quotes); the characters are still kept to those
/// device names use, so no quote or backslash can end up in the file.
fn check_path(what: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.len() < 2 {
        return Err(format!("{what} {path:?}: must be an absolute device path"));
    }
    if let Some(c) = path.chars().find(|c| {
        !(c.is_ascii_alphanumeric()
            || matches!(c, '/' | '_' | '.' | '-' | '+' | ':' | '@' | '=' | ','))
    }) {
        return Err(format!(
            "{what} {path:?}: contains {c:?}; device paths here are limited to letters, \
             digits and / _ . - + : @ = ,"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
        resource = "web1"
        device = "/dev/drbd10"
        disk = "/dev/vg0/web1"
        port = 7790
        nodes = [
          { name = "chicago-7", address = "10.0.0.1", node_id = 0 },
          { name = "dallas-3", address = "10.1.0.1:7791", node_id = 1 },
        ]
    "#;

    fn parse(text: &str) -> Result<DrbdDisk, String> {
        toml::from_str::<DrbdDisk>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_section_parses_with_defaults_and_per_node_ports() {
        let d = parse(TOML).unwrap();
        assert_eq!(d.meta_disk, "internal");
        assert_eq!(d.nodes[0].address, "10.0.0.1:7790".parse().unwrap());
        assert_eq!(d.nodes[1].address, "10.1.0.1:7791".parse().unwrap());
        assert_eq!(d.minor(), Ok(10));
        assert_eq!(d.node("dallas-3").unwrap().node_id, 1);
        assert_eq!(d.peer_of("dallas-3").unwrap().name, "chicago-7");
        let e = d.node("elsewhere").unwrap_err().to_string();
        assert!(e.contains("\"chicago-7\" and \"dallas-3\""), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                "resource = \"web1\"",
                "resource = \"web 1\"",
                "contains ' '",
            ),
            (
                "resource = \"web1\"",
                "resource = \"all\"",
                "every resource",
            ),
            (
                "resource = \"web1\"",
                "resource = \"-x\"",
                "start with a letter",
            ),
            ("/dev/drbd10", "/dev/sdb", "must be /dev/drbdN"),
            ("/dev/drbd10", "/dev/drbd010", "must be /dev/drbdN"),
            ("/dev/drbd10", "/dev/drbd1048576", "at most 1048575"),
            ("\"/dev/vg0/web1\"", "\"vg0/web1\"", "absolute"),
            ("\"/dev/vg0/web1\"", "\"/dev/vg0/web;1\"", "contains ';'"),
            (
                "\"/dev/vg0/web1\"",
                "\"/dev/vg0/web\\\"1\"",
                "contains '\"'",
            ),
            ("port = 7790", "port = 0", "port 0"),
            ("node_id = 1", "node_id = 0", "both nodes have node_id 0"),
            ("node_id = 1", "node_id = 32", "above DRBD's limit"),
            ("\"dallas-3\"", "\"chicago-7\"", "both nodes are named"),
            (
                "\"10.1.0.1:7791\"",
                "\"10.0.0.1\"",
                "both nodes use address",
            ),
            (
                "\"10.1.0.1:7791\"",
                "\"[fd00::1]:7791\"",
                "different address families",
            ),
            ("\"10.1.0.1:7791\"", "\"0.0.0.0\"", "not an address a peer"),
            ("\"10.1.0.1:7791\"", "\"dallas\"", "neither an IP address"),
            (
                "port = 7790",
                "port = 7790\nmeta-disk = \"x\"",
                "unknown field",
            ),
        ];
        for (from, to, want) in cases {
            let text = TOML.replacen(from, to, 1);
            let err = parse(&text).unwrap_err();
            assert!(err.contains(want), "{to}: {err}");
        }
        let three = TOML.replace(
            "  ]",
            "  { name = \"c\", address = \"10.2.0.1\", node_id = 2 },\n]",
        );
        assert!(parse(&three).unwrap_err().contains("3 nodes"));
        let meta = TOML.replace("port = 7790", "port = 7790\nmeta_disk = \"md\"");
        let err = parse(&meta).unwrap_err();
        assert!(err.contains("(or \"internal\")"), "{err}");
    }

    #[test]
    fn renders_a_drbd9_resource() {
        let text = parse(TOML).unwrap().render().unwrap();
        for want in [
            "resource web1 {",
            "protocol A;",
            "on chicago-7 {\n        node-id 0;\n        address ipv4 10.0.0.1:7790;\n        \
             device /dev/drbd10;\n        disk \"/dev/vg0/web1\";\n        meta-disk internal;\n    }",
            "address ipv4 10.1.0.1:7791;",
            "connection-mesh {\n        hosts chicago-7 dallas-3;\n    }\n}\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        let v6 = TOML
            .replace("\"10.0.0.1\"", "\"fd00::1\"")
            .replace("\"10.1.0.1:7791\"", "\"[fd00::2]:7791\"");
        let text = parse(&v6).unwrap().render().unwrap();
        assert!(text.contains("address ipv6 [fd00::1]:7790;"), "{text}");
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = crate::guest::qemu::testutil::TempDir::new("drbd-res");
        let d = parse(TOML).unwrap();
        std::fs::write(dir.path().join("skyferry-web1.res"), "old").unwrap();
        let path = d.write_resource_file(dir.path()).unwrap();
        assert_eq!(path, dir.path().join("skyferry-web1.res"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), d.render().unwrap());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names.len(),
            1,
            "a temporary file was left behind: {names:?}"
        );
        let err = d
            .write_resource_file(&dir.path().join("missing"))
            .unwrap_err();
        assert!(
            err.to_string().contains("cannot write DRBD resource file"),
            "{err}"
        );
    }
}
