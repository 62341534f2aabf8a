//! `skyferry test-guest`: the tiny Linux guest that live-migration tests run under QEMU.
//!
//! The guest is a Debian cloud kernel plus an initramfs whose only program, `/init`
//! (`ctl/guest/skyferry-guest.c`, embedded here), dirties memory at a set rate and prints a
//! heartbeat on the serial console every 200 ms. This module builds it into a directory
//! (reusing what is already there), renders the QEMU command line for it, and reads the
//! heartbeats back from the serial log.

mod cpio;

use std::fmt::Write as _;
use std::fs;
use std::io::{ErrorKind, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The guest program's source, compiled on the host (so the binary needs no C toolchain of
/// its own, only gcc and the static libc of `libc6-dev`).
const GUEST_SOURCE: &str = include_str!("../guest/skyferry-guest.c");
const GCC_FLAGS: [&str; 5] = ["-static", "-O2", "-Wall", "-Wextra", "-Werror"];
/// Debian's metapackage for the newest cloud kernel: small, and built for VMs (virtio,
/// serial console, initramfs support all built in).
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
const STAMP_FILE: &str = "init.stamp";
pub const QEMU: &str = "qemu-system-x86_64";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to build or find the guest [default: $XDG_CACHE_HOME/skyferry/test-guest, else
    /// ~/.cache/skyferry/test-guest].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Accelerator for the example command line and --boot (kvm on ordinary hosts; tcg
    /// needs no /dev/kvm but is slower).
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    accel: Accel,
    /// Buffer the guest program dirties, in MiB.
    #[arg(long, default_value_t = Workload::default().mem_mib, value_name = "MIB")]
    mem_mib: u32,
    /// Pages the guest program dirties per second (0: idle).
    #[arg(long, default_value_t = Workload::default().rate, value_name = "PAGES")]
    rate: u32,
    /// Where it writes.
    #[arg(long, value_enum, default_value_t = Workload::default().pattern)]
    pattern: Pattern,
    /// The hot set, in MiB.
    #[arg(long, default_value_t = Workload::default().hot_mib, value_name = "MIB")]
    hot_mib: u32,
    /// Guest RAM for the printed command line, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    ram_mib: u32,
    /// RAM file for the printed command line.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/dev/shm/skyferry-test-guest.ram"
    )]
    ram_file: PathBuf,
    /// QMP socket for the printed command line [default: DIR/qmp.sock].
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// Serial log for the printed command line [default: DIR/serial.log].
    #[arg(long, value_name = "PATH")]
    serial: Option<PathBuf>,
    /// Print the command line of a migration destination (-incoming defer -S).
    #[arg(long)]
    incoming: bool,
    /// Also boot the guest under QEMU and wait for three heartbeats (checks this host).
    #[arg(long)]
    boot: bool,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<(), String> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => default_dir()?,
    };
    let guest = build(&dir)?;
    let workload = Workload {
        mem_mib: args.mem_mib,
        rate: args.rate,
        pattern: args.pattern,
        hot_mib: args.hot_mib,
    };
    let example = guest.qemu_argv(&QemuOptions {
        ram_mib: args.ram_mib,
        ram_file: &args.ram_file,
        qmp_socket: &args
            .qmp
            .clone()
            .unwrap_or_else(|| guest.dir.join("qmp.sock")),
        serial_log: &args
            .serial
            .clone()
            .unwrap_or_else(|| guest.dir.join("serial.log")),
        workload,
        incoming_defer: args.incoming,
        start_paused: args.incoming,
        ..QemuOptions::new(args.accel)
    })?;
    let boot = if args.boot {
        let timeout = Duration::from_secs(120);
        Some(boot_check(&guest, args.accel, workload, 3, timeout)?)
    } else {
        None
    };
    if args.json {
        let mut v = serde_json::json!({
            "dir": guest.dir,
            "kernel": guest.kernel,
            "initrd": guest.initrd,
            "qemu_example": example,
        });
        if let Some(b) = &boot {
            v["boot_to_first_heartbeat_s"] = b.first_heartbeat.as_secs_f64().into();
            v["heartbeats"] = b.heartbeats.count.into();
        }
        println!("{v}");
        return Ok(());
    }
    println!("test guest in {}", guest.dir.display());
    println!("  kernel  {}", guest.kernel.display());
    println!("  initrd  {}", guest.initrd.display());
    println!("example QEMU command line:");
    println!("  {}", shell_words(&example));
    if let Some(b) = &boot {
        println!(
            "booted under {}: first heartbeat after {:.1} s, {} heartbeats (last {}) after {:.1} s",
            args.accel.name(),
            b.first_heartbeat.as_secs_f64(),
            b.heartbeats.count,
            b.heartbeats.last.unwrap_or(0),
            b.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// A built guest: everything QEMU needs to boot it.
#[derive(Debug, Clone)]
pub struct TestGuest {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// `$XDG_CACHE_HOME/skyferry/test-guest`, else `~/.cache/skyferry/test-guest`.
pub fn default_dir() -> Result<PathBuf, String> {
    // The XDG spec says to ignore a relative XDG_CACHE_HOME.
    let cache = match std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => match std::env::var_os("HOME") {
            Some(home) if !home.is_empty() => PathBuf::from(home).join(".cache"),
            _ => return Err("neither XDG_CACHE_HOME nor HOME is set: pass --dir".to_owned()),
        },
    };
    Ok(cache.join("skyferry").join("test-guest"))
}

/// Builds the guest in `dir`, reusing what is there: the guest program and initramfs are
/// rebuilt only when the embedded source changed, the kernel is downloaded only once.
pub fn build(dir: &Path) -> Result<TestGuest, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let dir =
        std::path::absolute(dir).map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let guest = TestGuest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.cpio"),
        dir,
    };
    build_initrd(&guest)?;
    if !guest.kernel.exists() {
        fetch_kernel(&guest.dir, &guest.kernel)?;
    }
    Ok(guest)
}

/// Compiles `/init` and packs the initramfs unless the stamp says both match this source.
fn build_initrd(guest: &TestGuest) -> Result<(), String> {
    let dir = &guest.dir;
    let stamp_path = dir.join(STAMP_FILE);
    let stamp = format!(
        "source-fnv1a64={:016x} gcc {}\n",
        fnv1a64(GUEST_SOURCE.as_bytes()),
        GCC_FLAGS.join(" ")
    );
    let init = dir.join("init");
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
        && init.exists()
        && guest.initrd.exists()
    {
        return Ok(());
    }
    // The stamp goes last and every file is renamed into place, so an interrupted build is
    // redone rather than reused. Temporary names carry the pid: builds may run in parallel.
    let _ = fs::remove_file(&stamp_path);
    let pid = std::process::id();
    let source = dir.join("skyferry-guest.c");
    write_atomically(&source, GUEST_SOURCE.as_bytes())?;
    let init_tmp = dir.join(format!("init.tmp.{pid}"));
    let mut gcc = Command::new("gcc");
    gcc.args(GCC_FLAGS).arg("-o").arg(&init_tmp).arg(&source);
    let built = run_tool(
        &mut gcc,
        "install gcc, and libc6-dev for the static libc",
        "a static link needs libc6-dev",
    );
    if let Err(e) = built {
        let _ = fs::remove_file(&init_tmp);
        return Err(e);
    }
    fs::rename(&init_tmp, &init)
        .map_err(|e| format!("cannot rename to {}: {e}", init.display()))?;

    let binary = fs::read(&init).map_err(|e| format!("cannot read {}: {e}", init.display()))?;
    // /dev/console must exist before /init starts: the kernel opens it for PID 1's
    // stdin/stdout/stderr, and without it the heartbeats go nowhere.
    let mut w = cpio::Writer::new();
    w.dir("dev", 0o755)?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.dir("proc", 0o755)?;
    w.dir("sys", 0o755)?;
    w.file("init", 0o755, &binary)?;
    write_atomically(&guest.initrd, &w.finish())?;
    write_atomically(&stamp_path, stamp.as_bytes())
}

/// Downloads Debian's current cloud kernel package and keeps its vmlinuz.
fn fetch_kernel(dir: &Path, kernel: &Path) -> Result<(), String> {
    let no_apt = format!(
        "the guest kernel comes from Debian's {KERNEL_METAPACKAGE}: on a host without apt, \
         put a kernel image at {}",
        kernel.display()
    );
    let no_index = "if apt knows no such package, run `apt-get update`";
    let mut depends = Command::new("apt-cache");
    depends.args(["depends", KERNEL_METAPACKAGE]);
    let out = run_tool(&mut depends, &no_apt, no_index)?;
    let package = kernel_package(&String::from_utf8_lossy(&out)).ok_or_else(|| {
        format!(
            "`apt-cache depends {KERNEL_METAPACKAGE}` names no linux-image-* dependency; it \
             printed:\n{}",
            String::from_utf8_lossy(&out).trim_end()
        )
    })?;
    eprintln!("skyferry: downloading the guest kernel ({package})");

    let work = dir.join(format!("kernel-download.{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let result = (|| {
        let mut download = Command::new("apt-get");
        download.args(["download", &package]).current_dir(&work);
        run_tool(&mut download, &no_apt, no_index)?;
        let deb = find_file(&work, |n| n.starts_with(&package) && n.ends_with(".deb"))?
            .ok_or_else(|| {
                format!(
                    "`apt-get download {package}` left no .deb in {}",
                    work.display()
                )
            })?;
        let tree = work.join("tree");
        let mut extract = Command::new("dpkg");
        extract.arg("-x").arg(&deb).arg(&tree);
        run_tool(&mut extract, &no_apt, "is the download complete?")?;
        let boot = tree.join("boot");
        let vmlinuz = find_file(&boot, |n| n.starts_with("vmlinuz-"))?
            .ok_or_else(|| format!("{package} has no boot/vmlinuz-*"))?;
        let image =
            fs::read(&vmlinuz).map_err(|e| format!("cannot read {}: {e}", vmlinuz.display()))?;
        write_atomically(kernel, &image)
    })();
    let _ = fs::remove_dir_all(&work);
    result
}

/// The kernel package a metapackage depends on, from `apt-cache depends` output.
fn kernel_package(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|line| {
        let dep = line
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends:")?
            .trim();
        (dep.starts_with("linux-image-") && !dep.contains('<')).then(|| dep.to_owned())
    })
}

/// Runs a host tool, returning its stdout; errors name the command, quote its output, and
/// add what to do when the tool is missing or fails.
fn run_tool(cmd: &mut Command, if_missing: &str, if_failed: &str) -> Result<Vec<u8>, String> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let line = format!(
        "{} {}",
        tool,
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => {
                format!("`{tool}` not found (the test guest needs it): {if_missing}")
            }
            _ => format!("cannot run `{line}`: {e}"),
        })?;
    if !out.status.success() {
        let mut said = String::from_utf8_lossy(&out.stderr).trim_end().to_owned();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !stdout.trim().is_empty() {
            let _ = write!(said, "\n{}", stdout.trim_end());
        }
        return Err(format!(
            "`{line}` failed ({}): {said}\n({if_failed})",
            out.status
        ));
    }
    Ok(out.stdout)
}

fn find_file(dir: &Path, want: impl Fn(&str) -> bool) -> Result<Option<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        if entry.file_name().to_str().is_some_and(&want) {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// Writes through a temporary file and a rename, so readers never see half a file.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, data)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })
}

/// FNV-1a: a tiny hash that is stable across Rust releases (unlike `DefaultHasher`), which
/// a stamp kept on disk needs.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// QEMU's emulator: works everywhere, slowly.
    Tcg,
    /// Hardware virtualization through /dev/kvm.
    Kvm,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// How the guest program dirties memory (`sf_pattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// A hot set rewritten over and over.
    Hot,
    /// Uniformly random pages across the buffer.
    Scatter,
    /// Mostly hot, some scattered; partial writes, full rewrites and re-zeroed pages.
    Mixed,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Hot => "hot",
            Pattern::Scatter => "scatter",
            Pattern::Mixed => "mixed",
        }
    }
}

/// The guest program's parameters, passed on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Size of the dirtied buffer (`sf_mem_mib`).
    pub mem_mib: u32,
    /// Pages dirtied per second; 0 leaves the guest idle (`sf_rate`).
    pub rate: u32,
    pub pattern: Pattern,
    /// Size of the hot set (`sf_hot_mib`).
    pub hot_mib: u32,
}

impl Default for Workload {
    /// The guest program's own defaults.
    fn default() -> Self {
        Self {
            mem_mib: 32,
            rate: 2000,
            pattern: Pattern::Hot,
            hot_mib: 4,
        }
    }
}

/// One QEMU instance of the guest.
#[derive(Debug, Clone)]
pub struct QemuOptions<'a> {
    /// Guest RAM; also the size of `ram_file`.
    pub ram_mib: u32,
    /// The file backing guest RAM (shared, so skyferry can read and write it; /dev/shm
    /// keeps it in memory).
    pub ram_file: &'a Path,
    pub qmp_socket: &'a Path,
    /// Where the serial console (the heartbeats) goes.
    pub serial_log: &'a Path,
    pub accel: Accel,
    pub workload: Workload,
    /// `-incoming defer`: a migration destination, waiting for `migrate-incoming`.
    pub incoming_defer: bool,
    /// `-S`: do not start the vCPUs until QMP `cont`.
    pub start_paused: bool,
}

impl QemuOptions<'static> {
    /// 256 MiB, the default workload, started at once; paths still to fill in.
    pub fn new(accel: Accel) -> Self {
        Self {
            ram_mib: 256,
            ram_file: Path::new("/dev/shm/skyferry-test-guest.ram"),
            qmp_socket: Path::new("qmp.sock"),
            serial_log: Path::new("serial.log"),
            accel,
            workload: Workload::default(),
            incoming_defer: false,
            start_paused: false,
        }
    }
}

impl TestGuest {
    /// The QEMU command line (program name first) for one instance of this guest.
    ///
    /// Guest RAM is one shared file; everything else QEMU would migrate itself is kept small
    /// (`-nodefaults`: no VGA and its video RAM, no NIC and its option ROM).
    pub fn qemu_argv(&self, o: &QemuOptions<'_>) -> Result<Vec<String>, String> {
        let utf8 = |p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("QEMU paths must be UTF-8: {}", p.display()))
        };
        // QEMU's option parser reads `,` as a separator; a literal comma is written `,,`.
        let opt = |p: &Path| utf8(p).map(|s| s.replace(',', ",,"));
        let w = &o.workload;
        let mib = o.ram_mib;
        let mut argv: Vec<String> = [QEMU, "-accel", o.accel.name(), "-cpu", "max"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        argv.extend([
            "-machine".to_owned(),
            "pc".to_owned(),
            "-m".to_owned(),
            format!("{mib}M"),
            "-nodefaults".to_owned(),
            "-no-user-config".to_owned(),
            "-display".to_owned(),
            "none".to_owned(),
            // A guest that panics stops QEMU instead of rebooting in a loop.
            "-no-reboot".to_owned(),
            "-object".to_owned(),
            format!(
                "memory-backend-file,id=ram0,size={mib}M,mem-path={},share=on",
                opt(o.ram_file)?
            ),
            "-machine".to_owned(),
            "memory-backend=ram0".to_owned(),
            "-kernel".to_owned(),
            utf8(&self.kernel)?,
            "-initrd".to_owned(),
            utf8(&self.initrd)?,
            "-append".to_owned(),
            format!(
                "console=ttyS0 quiet panic=-1 sf_mem_mib={} sf_rate={} sf_pattern={} \
                     sf_hot_mib={}",
                w.mem_mib,
                w.rate,
                w.pattern.name(),
                w.hot_mib
            ),
            // `file:` takes the rest of the string as the path, commas included.
            "-serial".to_owned(),
            format!("file:{}", utf8(o.serial_log)?),
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", opt(o.qmp_socket)?),
        ]);
        if o.incoming_defer {
            argv.extend(["-incoming".to_owned(), "defer".to_owned()]);
        }
        if o.start_paused {
            argv.push("-S".to_owned());
        }
        Ok(argv)
    }
}

/// What the serial log says about the guest program's heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Heartbeats {
    /// Heartbeat lines in the log.
    pub count: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// Pages dirtied since the guest program started, as of the last heartbeat.
    pub dirtied: Option<u64>,
}

/// Reads heartbeats (`skyferry-heartbeat <n> dirtied=<pages>`) out of a serial log. Only
/// complete lines count: QEMU may be in the middle of writing the last one.
pub fn parse_heartbeats(log: &str) -> Heartbeats {
    let mut hb = Heartbeats::default();
    let Some(complete) = log.rfind('\n').map(|end| &log[..end]) else {
        return hb;
    };
    for line in complete.lines() {
        // Anywhere in the line: a kernel message can land in front of it on the console.
        let Some((_, rest)) = line.split_once("skyferry-heartbeat ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(n) = words.next().and_then(|w| w.parse::<u64>().ok()) else {
            continue;
        };
        hb.count += 1;
        hb.first.get_or_insert(n);
        hb.last = Some(n);
        hb.dirtied = words
            .next()
            .and_then(|w| w.strip_prefix("dirtied="))
            .and_then(|d| d.parse().ok());
    }
    hb
}

/// [`parse_heartbeats`] on a file; a log QEMU has not created yet has none.
pub fn read_heartbeats(path: &Path) -> Result<Heartbeats, String> {
    match fs::read(path) {
        Ok(bytes) => Ok(parse_heartbeats(&String::from_utf8_lossy(&bytes))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Heartbeats::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The outcome of [`boot_check`].
#[derive(Debug, Clone, Copy)]
pub struct BootCheck {
    /// From starting QEMU to the first heartbeat on the console.
    pub first_heartbeat: Duration,
    /// From starting QEMU to the last heartbeat wanted.
    pub elapsed: Duration,
    pub heartbeats: Heartbeats,
}

/// Boots the guest (256 MiB, RAM in /dev/shm), waits until it has printed `want`
/// heartbeats, then stops QEMU.
pub fn boot_check(
    guest: &TestGuest,
    accel: Accel,
    workload: Workload,
    want: u64,
    timeout: Duration,
) -> Result<BootCheck, String> {
    let run = RunDir::new()?;
    let options = QemuOptions {
        ram_file: &run.ram_file,
        qmp_socket: &run.dir.join("qmp.sock"),
        serial_log: &run.dir.join("serial.log"),
        workload,
        ..QemuOptions::new(accel)
    };
    let argv = guest.qemu_argv(&options)?;
    let start = Instant::now();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => format!("`{QEMU}` not found: install qemu-system-x86"),
            _ => format!("cannot start {QEMU}: {e}"),
        })?;
    let mut qemu = KillOnDrop(child);
    let mut first_heartbeat = None;
    loop {
        let hb = read_heartbeats(options.serial_log)?;
        if hb.count > 0 && first_heartbeat.is_none() {
            first_heartbeat = Some(start.elapsed());
        }
        if hb.count >= want {
            return Ok(BootCheck {
                first_heartbeat: first_heartbeat.unwrap_or_default(),
                elapsed: start.elapsed(),
                heartbeats: hb,
            });
        }
        if let Some(status) = qemu.0.try_wait().map_err(|e| format!("{QEMU}: {e}"))? {
            let mut stderr = String::new();
            if let Some(mut pipe) = qemu.0.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            return Err(format!(
                "{QEMU} exited ({status}) after {} heartbeats: {}\nserial log ends:\n{}\n\
                 command: {}",
                hb.count,
                stderr.trim_end(),
                log_tail(options.serial_log),
                shell_words(&argv)
            ));
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "the guest printed {} of {want} heartbeats in {} s (accel {}); serial log \
                 ends:\n{}\ncommand: {}",
                hb.count,
                timeout.as_secs(),
                accel.name(),
                log_tail(options.serial_log),
                shell_words(&argv)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of a serial log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        // `quiet` hides the kernel's messages: an empty log means /init never ran.
        return "(empty: the kernel printed nothing and /init never ran; drop `quiet` from \
                -append to see the boot)"
            .to_owned();
    }
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A child QEMU that is killed, and reaped, however the caller leaves.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private directory for one QEMU run, and its RAM file in /dev/shm; both removed on drop.
struct RunDir {
    dir: PathBuf,
    ram_file: PathBuf,
}

impl RunDir {
    fn new() -> Result<Self, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("skyferry-test-guest-{}-{nanos}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // RAM in /dev/shm stays in memory; elsewhere it would be written back to disk.
        let shm = Path::new("/dev/shm");
        let ram_dir = if shm.is_dir() { shm } else { &dir };
        Ok(Self {
            ram_file: ram_dir.join(format!("{name}.ram")),
            dir,
        })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.ram_file);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A command line an operator can paste into a POSIX shell.
fn shell_words(argv: &[String]) -> String {
    let quote = |w: &String| {
        let plain = !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=:,./+@%".contains(&b));
        if plain {
            w.clone()
        } else {
            format!("'{}'", w.replace('\'', r"'\''"))
        }
    };
    argv.iter().map(quote).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> TestGuest {
        TestGuest {
            dir: PathBuf::from("/g"),
            kernel: PathBuf::from("/g/vmlinuz"),
            initrd: PathBuf::from("/g/initrd.cpio"),
        }
    }

    #[test]
    fn argv_for_a_running_source() {
        let argv = guest()
            .qemu_argv(&QemuOptions {
                ram_file: Path::new("/dev/shm/a.ram"),
                qmp_socket: Path::new("/run/a.qmp"),
                serial_log: Path::new("/run/a.log"),
                ..QemuOptions::new(Accel::Tcg)
            })
            .unwrap();
        let expected = "qemu-system-x86_64 -accel tcg -cpu max -machine pc -m 256M \
             -nodefaults -no-user-config -display none -no-reboot \
             -object memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/a.ram,share=on \
             -machine memory-backend=ram0 -kernel /g/vmlinuz -initrd /g/initrd.cpio \
             -append 'console=ttyS0 quiet panic=-1 sf_mem_mib=32 sf_rate=2000 sf_pattern=hot \
             sf_hot_mib=4' -serial file:/run/a.log -qmp unix:/run/a.qmp,server=on,wait=off";
        assert_eq!(shell_words(&argv), expected);
        assert_eq!(argv.iter().filter(|a| a.contains("sf_rate")).count(), 1);
    }

    #[test]
    fn argv_for_a_paused_destination() {
        let argv = guest()
            .qemu_argv(&QemuOptions {
                ram_mib: 512,
                ram_file: Path::new("/dev/shm/odd,name.ram"),
                qmp_socket: Path::new("/run/b,1.qmp"),
                serial_log: Path::new("/run/b,1.log"),
                workload: Workload {
                    mem_mib: 64,
                    rate: 0,
                    pattern: Pattern::Mixed,
                    hot_mib: 8,
                },
                incoming_defer: true,
                start_paused: true,
                ..QemuOptions::new(Accel::Kvm)
            })
            .unwrap();
        let has = |pair: [&str; 2]| argv.windows(2).any(|w| w == pair);
        assert!(has(["-accel", "kvm"]));
        assert!(has(["-m", "512M"]));
        assert!(has([
            "-object",
            "memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/odd,,name.ram,share=on"
        ]));
        assert!(has(["-serial", "file:/run/b,1.log"]));
        assert!(has(["-qmp", "unix:/run/b,,1.qmp,server=on,wait=off"]));
        assert!(
            argv.iter()
                .any(|a| a.ends_with("sf_mem_mib=64 sf_rate=0 sf_pattern=mixed sf_hot_mib=8"))
        );
        assert_eq!(argv[argv.len() - 3..], ["-incoming", "defer", "-S"]);
    }

    #[test]
    fn heartbeats_from_a_serial_log() {
        let log = "[    1.2] Run /init as init process\r\n\
                   skyferry-guest ready mem_mib=32 rate=2000 pattern=hot hot_mib=4\r\n\
                   skyferry-heartbeat 7 dirtied=400\r\n\
                   [ 5.0] kernel noise skyferry-heartbeat 8 dirtied=800\r\n\
                   skyferry-heartbeat garbage\r\n\
                   skyferry-heartbeat 9 dirtied=1200\r\n\
                   skyferry-heartbeat 1";
        let hb = parse_heartbeats(log);
        assert_eq!(
            hb,
            Heartbeats {
                count: 3,
                first: Some(7),
                last: Some(9),
                dirtied: Some(1200),
            },
            "the unterminated last line is still being written"
        );
        assert_eq!(parse_heartbeats(""), Heartbeats::default());
        assert_eq!(
            parse_heartbeats("skyferry-heartbeat 3"),
            Heartbeats::default()
        );
        assert_eq!(parse_heartbeats("skyferry-heartbeat 3\n").last, Some(3));
        assert_eq!(
            read_heartbeats(Path::new("/nonexistent/serial.log")).unwrap(),
            Heartbeats::default()
        );
    }

    #[test]
    fn kernel_package_from_apt_cache() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            kernel_package(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(kernel_package("linux-image-cloud-amd64\n"), None);
        assert_eq!(
            kernel_package("x\n  Depends: <linux-image-virtual>\n"),
            None
        );
    }

    #[test]
    fn default_dir_ends_in_the_cache() {
        // Only the shape: the environment belongs to the whole test process.
        if let Ok(d) = default_dir() {
            assert!(d.ends_with("skyferry/test-guest"), "{}", d.display());
        }
    }

    #[test]
    fn shell_words_quotes_only_what_needs_it() {
        let argv = [
            "a".to_owned(),
            "b c".to_owned(),
            "it's".to_owned(),
            String::new(),
        ];
        assert_eq!(shell_words(&argv), r"a 'b c' 'it'\''s' ''");
    }

    /// The whole guest on this host: build it (gcc, a kernel from apt), boot it under QEMU's
    /// TCG, and see it print heartbeats. Skipped only when QEMU is not installed.
    #[test]
    fn boots_under_qemu_and_prints_heartbeats() {
        if Command::new(QEMU).arg("--version").output().is_err() {
            eprintln!("skipped: {QEMU} is not installed (Debian: apt-get install qemu-system-x86)");
            return;
        }
        let dir = RunDir::new().unwrap();
        let guest = build(&dir.dir.join("guest")).unwrap();
        let modified = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
        let before = [modified(&guest.kernel), modified(&guest.initrd)];
        let again = build(&guest.dir).unwrap();
        assert_eq!(again.initrd, guest.initrd);
        let after = [modified(&guest.kernel), modified(&guest.initrd)];
        assert_eq!(before, after, "a second build reuses the first");

        let check = boot_check(
            &guest,
            Accel::Tcg,
            Workload::default(),
            3,
            Duration::from_secs(120),
        )
        .unwrap();
        eprintln!(
            "TCG: first heartbeat {:.1} s after starting QEMU; {:?}",
            check.first_heartbeat.as_secs_f64(),
            check.heartbeats
        );
        assert!(check.heartbeats.count >= 3);
        let (first, last) = (
            check.heartbeats.first.unwrap(),
            check.heartbeats.last.unwrap(),
        );
        assert_eq!(first, 1, "the counter starts at 1");
        assert!(last >= first + 2, "{:?}", check.heartbeats);
        assert!(check.heartbeats.dirtied.unwrap() > 0);
    }
}
