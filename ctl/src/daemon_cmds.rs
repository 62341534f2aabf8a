//! Commands that drive a running `skyferryd`: start, abort, status, watch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::daemon::control::{
    QemuGuestSpec, Request, Response, StartRequest, XenGuestSpec, request,
};
use dataplane::migrate::{MigrationStatus, Phase};
use dataplane::protocol::text::escape;
use dataplane::units::{format_rate, format_size, parse_duration, parse_rate_limit, parse_size};

#[derive(clap::Args, Debug)]
pub struct StartArgs {
    /// Destination daemon's migration address, HOST:PORT (the port of its [listen]
    /// address; 7410 in the example configs).
    #[arg(long, value_name = "HOST:PORT", value_parser = host_port)]
    to: String,
    /// The guest: `synthetic` (one this daemon creates, see --workload), `kvm` (a KVM
    /// micro-VM this daemon boots with the self-checking test guest, sized by --mem, its
    /// writes following --workload at --speed), `qemu:QMP_SOCKET` (a running QEMU guest whose
    /// RAM is the shared file --ram-file), or `xen:DOMID` (an HVM domain, with skyferryd in
    /// dom0; see --dest-domid).
    #[arg(long, default_value = "synthetic", value_name = "SPEC", value_parser = guest_spec)]
    guest: GuestSpec,
    /// RAM file of a QEMU guest: the mem-path of its memory-backend-file (share=on).
    #[arg(long, value_name = "PATH")]
    ram_file: Option<std::path::PathBuf>,
    /// Synchronized Arrival: arrive together with the other migrations of group G (the
    /// daemon's [coordinator] holds each until all are ready, then stops them together).
    #[arg(long, value_name = "G")]
    group: Option<String>,
    /// How many migrations the group has: none goes before all have joined and are ready
    /// (default: those that have joined by then; give it when starting members one by one).
    #[arg(long, value_name = "N", requires = "group")]
    group_size: Option<usize>,
    /// If another member of the group fails: abort (default) or continue alone.
    #[arg(long, value_name = "abort|continue", requires = "group")]
    group_failure: Option<String>,
    /// While held for the group, wait instead of re-sending pages (saves bytes).
    #[arg(long, requires = "group")]
    pace: bool,
    /// The guest's DRBD-replicated disk: a TOML file with a [disk] table (resource, device,
    /// disk, port, nodes; see docs/configuration.md). Both daemons need a [drbd] section.
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// The guest NIC's MAC: the destination announces it (RARP, and gratuitous ARP with
    /// --ip) on its [announce] interface when the guest pauses for the switchover.
    #[arg(long, value_name = "MAC", value_parser = mac)]
    mac: Option<String>,
    /// The guest's IPv4 address, for the gratuitous ARP.
    #[arg(long, value_name = "IPV4", requires = "mac")]
    ip: Option<std::net::Ipv4Addr>,
    /// For a Xen domain: the id of the domain the destination's toolstack created paused
    /// with the same configuration (xl create -p), which skyferry fills and unpauses.
    #[arg(long, value_name = "DOMID")]
    dest_domid: Option<u32>,
    /// Synthetic guest workload: kernel, tpcw, specjbb or idle.
    #[arg(long, default_value = "tpcw")]
    workload: String,
    /// Guest memory (256MiB, 1GiB, 4G).
    #[arg(long, default_value = "1GiB", value_parser = size)]
    mem: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Synthetic guest write-rate multiplier.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Guest name for displays; the destination also names a QEMU guest's RAM file and QMP
    /// socket after it (default: the RAM file's name without extension).
    #[arg(long)]
    name: Option<String>,
    /// Data streams (default: the daemon's config).
    #[arg(long)]
    streams: Option<u32>,
    /// smart or xen-default (default: the daemon's config).
    #[arg(long)]
    policy: Option<String>,
    /// all, none, or a list like zero,cbr,delta (default: the daemon's config).
    #[arg(long)]
    optimizations: Option<String>,
    /// Frame compression: off, lz4, zstd1, zstd3, or auto (only while the link, not the CPU,
    /// is the bottleneck). Default: the daemon's config.
    #[arg(long, value_parser = compression)]
    compression: Option<String>,
    /// Send-side limit (100Mbit, 1Gbit, 500MB/s; "none" for unlimited).
    #[arg(long, value_parser = rate_or_none)]
    max_bandwidth: Option<u64>,
    /// The pause ceiling (300ms, 1s): stop as soon as the predicted pause fits under it,
    /// never pause over it (the completion action decides instead). --downtime-limit is its
    /// old name.
    #[arg(long, alias = "downtime-limit", value_parser = duration)]
    max_downtime: Option<Duration>,
    /// Completion timeout per GiB of guest (800s, 2s; "0s": none): then the completion
    /// action applies. Default: the daemon's config.
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    completion_timeout_per_gib: Option<Duration>,
    /// At the completion timeout: abort (the guest stays here) or force (pause whatever the
    /// ceiling). Default: the daemon's config.
    #[arg(long, value_parser = ["abort", "force"])]
    completion_action: Option<String>,
    /// Throttle the guest's vCPUs while its dirtying outpaces the link (on or off; default:
    /// the daemon's config).
    #[arg(long, value_parser = clap::builder::BoolishValueParser::new(), value_name = "on|off")]
    auto_converge: Option<bool>,
    /// Print the migration id only (first, also when the migration then fails at once).
    #[arg(long)]
    quiet: bool,
    /// Follow the migration to its end (as `watch` does) and exit with its outcome: 0 when
    /// the guest runs at the destination, 1 otherwise. Without it, `start` still waits for
    /// the connection to the destination and fails when that does.
    #[arg(long)]
    wait: bool,
    /// With --wait: refresh interval.
    #[arg(long, default_value = "500ms", value_parser = duration, requires = "wait")]
    interval: Duration,
}

#[derive(clap::Args, Debug)]
pub struct AbortArgs {
    /// Migration id (hex, as `status` shows it).
    #[arg(value_parser = hex_id)]
    id: u64,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// One migration (hex id); all when absent.
    #[arg(value_parser = hex_id)]
    id: Option<u64>,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// A Synchronized Arrival group's members side by side (from the coordinator).
    #[arg(long, conflicts_with = "id")]
    group: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct WatchArgs {
    /// Migration id (hex); the newest when absent.
    #[arg(value_parser = hex_id)]
    id: Option<u64>,
    /// Refresh interval.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    interval: Duration,
}

fn mac(s: &str) -> Result<String, String> {
    s.parse::<dataplane::network::MacAddr>()
        .map(|m| m.to_string())
        .map_err(|e| e.to_string())
}

fn size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn rate_or_none(s: &str) -> Result<u64, String> {
    // 0 tells the daemon "no limit".
    parse_rate_limit(s)
        .map(|r| r.unwrap_or(0))
        .map_err(|e| e.to_string())
}

fn compression(s: &str) -> Result<String, String> {
    s.parse::<dataplane::codec::Compression>()
        .map(|c| c.name().to_string())
}

/// `--to`: the destination needs a port, and the operator a hint when it is missing.
fn host_port(s: &str) -> Result<String, String> {
    let port = s
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(_))) if !host.is_empty() => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} has no port: give HOST:PORT, the port of the destination's [listen] \
             address (e.g. {s}:7410 with the example configs; [v6addr]:PORT for IPv6)"
        )),
    }
}

fn hex_id(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("invalid migration id {s:?}: use the hex id `skyferry status` shows"))
}

fn call(socket: &Path, req: &Request) -> Result<Response, String> {
    match request(socket, req)? {
        Response::Error { message } => Err(message),
        r => Ok(r),
    }
}

pub(crate) fn statuses(socket: &Path, id: Option<u64>) -> Result<Vec<MigrationStatus>, String> {
    match call(socket, &Request::Status { id })? {
        Response::Status { migrations } => Ok(migrations),
        other => Err(format!("unexpected response from skyferryd: {other:?}")),
    }
}

/// `--guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GuestSpec {
    Synthetic,
    Kvm,
    Qemu(std::path::PathBuf),
    Xen(u32),
}

fn guest_spec(s: &str) -> Result<GuestSpec, String> {
    match s.split_once(':') {
        None if s == "synthetic" => Ok(GuestSpec::Synthetic),
        None if s == "kvm" => Ok(GuestSpec::Kvm),
        Some(("qemu", qmp)) if !qmp.is_empty() => Ok(GuestSpec::Qemu(qmp.into())),
        Some(("xen", domid)) => domid
            .parse()
            .map(GuestSpec::Xen)
            .map_err(|_| format!("{s:?}: xen:DOMID takes a domain id, a number")),
        _ => Err(format!(
            "{s:?}: use synthetic, kvm, qemu:QMP_SOCKET (the guest's QMP Unix socket) or \
             xen:DOMID"
        )),
    }
}

/// Refuses, before asking the daemon, a guest this host's daemon would create (synthetic or
/// KVM) that is over the limits or larger than this host's available memory, and a stream
/// count out of range. The daemon checks again, with its caches counted.
fn check_start_fits(a: &StartArgs) -> Result<(), String> {
    use dataplane::limits::{HostMemory, check_guest_size, check_streams};
    if let Some(n) = a.streams {
        check_streams("--streams", n).map_err(|e| e.to_string())?;
    }
    if matches!(a.guest, GuestSpec::Synthetic | GuestSpec::Kvm) {
        let size = |e: dataplane::limits::LimitError| format!("--mem {}: {e}", format_size(a.mem));
        check_guest_size(a.mem).map_err(size)?;
        HostMemory::read()
            .and_then(|host| host.check("the guest", a.mem))
            .map_err(size)?;
    }
    Ok(())
}

pub fn start(socket: &Path, a: &StartArgs) -> Result<(), String> {
    let qemu = match (&a.guest, &a.ram_file) {
        (GuestSpec::Qemu(qmp), Some(ram)) => Some(QemuGuestSpec {
            // The daemon resolves paths from its own directory: send absolute ones.
            qmp: std::path::absolute(qmp).map_err(|e| format!("{}: {e}", qmp.display()))?,
            ram_file: std::path::absolute(ram).map_err(|e| format!("{}: {e}", ram.display()))?,
        }),
        (GuestSpec::Qemu(_), None) => {
            return Err(
                "a QEMU guest needs --ram-file PATH (its shared memory backend's file)".into(),
            );
        }
        (_, Some(_)) => {
            return Err("--ram-file is for --guest qemu:QMP_SOCKET".into());
        }
        (_, None) => None,
    };
    let xen = match (&a.guest, a.dest_domid) {
        (GuestSpec::Xen(domid), Some(dest_domid)) => Some(XenGuestSpec {
            domid: *domid,
            dest_domid,
        }),
        (GuestSpec::Xen(_), None) => {
            return Err(
                "a Xen domain needs --dest-domid N: the domain the destination's toolstack \
                 created paused to receive it (xl create -p)"
                    .into(),
            );
        }
        (_, Some(_)) => return Err("--dest-domid is for --guest xen:DOMID".into()),
        (_, None) => None,
    };
    check_start_fits(a)?;
    let req = Request::Start(Box::new(StartRequest {
        to: a.to.clone(),
        qemu,
        xen,
        kvm: a.guest == GuestSpec::Kvm,
        group: a.group.clone(),
        group_size: a.group_size,
        group_failure: a.group_failure.clone(),
        group_pace: a.pace,
        disk: a
            .disk
            .as_deref()
            .map(dataplane::disk::drbd::DrbdDisk::load)
            .transpose()?,
        mac: a.mac.clone(),
        ip: a.ip,
        workload: a.workload.clone(),
        mem: a.mem,
        seed: a.seed,
        speed: a.speed,
        guest: a.name.clone(),
        streams: a.streams,
        policy: a.policy.clone(),
        optimizations: a.optimizations.clone(),
        compression: a.compression.clone(),
        max_bandwidth: a.max_bandwidth,
        max_downtime_ms: a
            .max_downtime
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        completion_timeout_per_gib_ms: a
            .completion_timeout_per_gib
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        completion_action: a.completion_action.clone(),
        auto_converge: a.auto_converge,
    }));
    let id = match call(socket, &req)? {
        Response::Started { id } => id,
        other => return Err(format!("unexpected response from skyferryd: {other:?}")),
    };
    // Scripts get the id first, whatever happens next (the exit code says how it went).
    if a.quiet {
        println!("{id:x}");
    }
    if a.wait {
        let view = if a.quiet {
            crate::progress::Progress::quiet()
        } else {
            crate::progress::Progress::new()
        };
        return follow(socket, id, a.interval, view, !a.quiet);
    }
    // A wrong address or port fails within the connect: say so with an exit code, rather
    // than "started". Waits for the phase to leave `connecting`, an event the daemon sets.
    loop {
        let s = statuses(socket, Some(id))?
            .into_iter()
            .next()
            .ok_or_else(|| format!("migration {id:x} is gone"))?;
        if s.phase.is_final() && s.phase != Phase::Completed {
            return Err(format!(
                "migration {id:x} to {}: {}",
                a.to,
                describe_end(&s)
            ));
        }
        if s.phase != Phase::Connecting {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !a.quiet {
        println!(
            "started migration {id:x} to {}; follow it with: skyferry watch {id:x}",
            a.to
        );
    }
    Ok(())
}

fn group_status(socket: &Path, group: &str, json: bool) -> Result<(), String> {
    let g = match call(
        socket,
        &Request::GroupStatus {
            group: group.to_string(),
        },
    )? {
        Response::Group { group } => group,
        other => return Err(format!("unexpected response from skyferryd: {other:?}")),
    };
    if json {
        println!("{}", serde_json::to_string(&g).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let ms = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| format!("{v}"));
    println!(
        "group {} ({} members, on failure: {:?}){}",
        escape(&g.name),
        g.members.len(),
        g.on_failure,
        g.broken
            .as_ref()
            .map_or_else(String::new, |b| format!(", broken: {}", escape(b)))
    );
    println!(
        "{:<16} {:>8} {:<10} {:>4} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>6} {:>12}",
        "MEMBER",
        "MiB",
        "STATE",
        "ITER",
        "SENT",
        "DIRTIED",
        "FINAL MS",
        "READY@",
        "GO@",
        "DONE@",
        "HELD",
        "PACED SAVED"
    );
    for m in g.members.values() {
        println!(
            "{:<16} {:>8} {:<10} {:>4} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>6} {:>12}",
            escape(&m.name),
            (m.pages * 4096) >> 20,
            match &m.state {
                dataplane::coordinator::MemberState::Failed(_) => "failed".to_string(),
                other => format!("{other:?}").to_lowercase(),
            },
            m.last.iteration,
            m.last.sent,
            m.last.dirtied,
            ms(m.last.final_copy_ms),
            ms(m.ready_at_ms),
            ms(m.go_at_ms),
            ms(m.done_at_ms),
            m.held_iterations,
            format_size(m.paced_saved_bytes),
        );
    }
    if let Some(spread) = g.go_spread_ms() {
        println!("all told to stop within {spread} ms of each other");
    }
    Ok(())
}

pub fn abort(socket: &Path, a: &AbortArgs) -> Result<(), String> {
    call(socket, &Request::Abort { id: a.id })?;
    // Wait briefly for the migration to reach its final state, so the answer is definite.
    for _ in 0..100 {
        if let Some(s) = statuses(socket, Some(a.id))?.first()
            && s.phase.is_final()
        {
            println!("migration {:x}: {}", a.id, describe_end(s));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "migration {:x}: abort requested; it stops at its next step",
        a.id
    );
    Ok(())
}

fn describe_end(s: &MigrationStatus) -> String {
    match s.phase {
        Phase::Completed => "completed: the guest runs at the destination".into(),
        Phase::Aborted => {
            "aborted: the guest runs at the source, the destination discarded its copy".into()
        }
        Phase::Failed => format!(
            "failed: the guest runs at the source ({})",
            escape(s.error.as_deref().unwrap_or("no detail"))
        ),
        Phase::CommittedUnconfirmed => format!(
            "committed but unconfirmed: the guest belongs to the destination; if it is held in \
             doubt there, start it with `skyferry resolve {:x} --start` on that host",
            s.id
        ),
        p => format!("{p:?}"),
    }
}

#[derive(clap::Args, Debug)]
pub struct ResolveArgs {
    /// Migration id (hex), in doubt at this destination.
    #[arg(value_parser = hex_id)]
    id: u64,
    /// The source committed (its status: committed-unconfirmed): start the guest here.
    #[arg(long, conflicts_with = "discard", required_unless_present = "discard")]
    start: bool,
    /// The source kept the guest (its status: failed or aborted): discard it here.
    #[arg(long)]
    discard: bool,
}

/// Settles a migration held in doubt at this destination.
pub fn resolve(socket: &Path, a: &ResolveArgs) -> Result<(), String> {
    match call(
        socket,
        &Request::Resolve {
            id: a.id,
            start: a.start,
        },
    )? {
        Response::Resolved { status } => {
            println!("migration {:x}: {}", a.id, describe_end(&status));
            Ok(())
        }
        other => Err(format!("unexpected response from skyferryd: {other:?}")),
    }
}

pub fn status(socket: &Path, a: &StatusArgs) -> Result<(), String> {
    if let Some(group) = &a.group {
        return group_status(socket, group, a.json);
    }
    let list = statuses(socket, a.id)?;
    if a.json {
        let v = if a.id.is_some() {
            serde_json::to_value(&list[0])
        } else {
            serde_json::to_value(serde_json::json!({ "migrations": list }))
        };
        println!("{}", v.map_err(|e| e.to_string())?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no migrations on this host");
        return Ok(());
    }
    println!(
        "{:<16} {:<11} {:<14} {:<21} {:>4} {:>10} {:>10} {:>10} {:>12} {:>8} {:<8}  NOTE",
        "ID",
        "ROLE",
        "GUEST",
        "PHASE",
        "ITER",
        "SENT",
        "REMAINING",
        "WIRE",
        "RATE",
        "PAUSE",
        "VERIFIED"
    );
    for s in &list {
        println!("{}", status_row(s));
    }
    Ok(())
}

/// One migration as a row of `status`'s table, in the operator's words.
fn status_row(s: &MigrationStatus) -> String {
    use crate::progress::{ms_text, phase_name, stop_reason_text};
    let mut note = s
        .error
        .clone()
        .or_else(|| {
            s.stop_reason
                .map(|r| format!("stopped: {}", stop_reason_text(r)))
        })
        .unwrap_or_default();
    for extra in [
        s.waiting.clone(),
        s.disk.as_ref().map(crate::progress::disk_text),
        s.disk_error
            .as_ref()
            .map(|e| format!("DISK NEEDS THE OPERATOR: {e}")),
        s.network.clone(),
        s.guest_check
            .as_ref()
            .map(crate::progress::guest_check_text),
        s.completion.filter(|n| !n.applied).map(|n| n.to_string()),
        (s.throttle_percent > 0).then(|| format!("vCPUs throttled {} %", s.throttle_percent)),
    ]
    .into_iter()
    .flatten()
    {
        if !note.is_empty() {
            note.push_str("; ");
        }
        note.push_str(&extra);
    }
    // The rate in bits only: the bytes form format_rate adds would overflow the column.
    let rate = format_rate(s.job.transfer_rate_bps);
    let rate = rate.split(" (").next().unwrap_or_default();
    format!(
        "{:<16x} {:<11} {:<14} {:<21} {:>4} {:>10} {:>10} {:>10} {:>12} {:>8} {:<8}  {}",
        s.id,
        format!("{:?}", s.role).to_lowercase(),
        escape(&s.guest),
        phase_name(s.phase),
        s.iteration,
        s.pages_sent,
        s.remaining,
        format_size(s.wire_bytes),
        rate,
        s.pause_ms.map_or_else(|| "-".into(), ms_text),
        match s.verified {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        },
        // Every text of a row is escaped: a string from a peer (a label, an error text)
        // cannot start a line of its own or drive the terminal.
        escape(&note)
    )
}

pub fn watch(socket: &Path, a: &WatchArgs) -> Result<(), String> {
    let id = match a.id {
        Some(id) => id,
        None => statuses(socket, None)?
            .last()
            .map(|s| s.id)
            .ok_or("no migrations on this host to watch")?,
    };
    follow(
        socket,
        id,
        a.interval,
        crate::progress::Progress::new(),
        true,
    )
}

/// Shows migration `id` in `view` until it ends, then (with `summary`) the summary table;
/// an error unless the guest ended up running at the destination.
fn follow(
    socket: &Path,
    id: u64,
    interval: Duration,
    mut view: crate::progress::Progress,
    summary: bool,
) -> Result<(), String> {
    loop {
        let s = statuses(socket, Some(id))?
            .into_iter()
            .next()
            .ok_or_else(|| format!("migration {id:x} is gone"))?;
        view.update(&s);
        if s.phase.is_final() {
            // `finish` prints the closing line.
            view.finish(&s);
            if summary {
                println!();
                print!("{}", crate::progress::summary_table(&s, None, &[]));
            }
            return if s.phase == Phase::Completed {
                Ok(())
            } else {
                Err(describe_end(&s))
            };
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use dataplane::migrate::{MigrationStatus, Phase, Role, StopReason};

    use super::status_row;

    #[test]
    fn status_rows_speak_the_operators_words_and_fit() {
        let mut s = MigrationStatus::new(0xabc, Role::Source, "web1", 262_144);
        s.phase = Phase::Completed;
        s.stop_reason = Some(StopReason::LocalMinimum);
        s.job.transfer_rate_bps = 125e6;
        s.pause_ms = Some(95);
        s.verified = Some(true);
        let row = status_row(&s);
        assert!(!row.contains("LocalMinimum"), "{row}");
        assert!(
            row.contains("stopped: Smart Stop found a local minimum"),
            "{row}"
        );
        assert!(row.contains("completed"), "{row}");
        assert!(row.contains(" 1.00 Gbit/s "), "{row}");
        assert!(row.contains("95 ms yes"), "{row}");
        // Every column up to NOTE has its fixed width, whatever the rate.
        s.job.transfer_rate_bps = 123_456_789_012.0;
        let wide = status_row(&s);
        assert_eq!(
            wide.find("  stopped"),
            row.find("  stopped"),
            "{wide}\n{row}"
        );
    }
}
