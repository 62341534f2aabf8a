//! The state blob of a KVM micro-VM: everything its one vCPU needs to continue elsewhere.
//!
//! `SKVM`, a little-endian u16 version, then a postcard body: general and special
//! registers, FPU/SSE, the extended control registers, pending events, debug registers, the
//! run state, the MSRs the guest may use, and the guest's clock (TSC, its frequency, and the
//! wall-clock time it was read). KVM's own structs travel as their raw bytes (the kernel ABI)
//! and must have exactly their size here. The guest has no interrupt controller (no in-kernel
//! irqchip), so there is no LAPIC, IOAPIC or PIT state to carry.

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use super::err;
use crate::guest::GuestError;

/// The blob's first bytes.
pub const MAGIC: &[u8; 4] = b"SKVM";
/// The version this build writes and reads.
pub const VERSION: u16 = 1;

/// IA32_TSC: carried apart (see [`VcpuState::tsc`]).
pub const MSR_TSC: u32 = 0x10;

/// The MSRs carried besides the TSC: SYSENTER, PAT, MISC_ENABLE and the 64-bit syscall and
/// segment-base MSRs (EFER travels in the special registers).
pub const MSRS: [u32; 10] = [
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0x1a0,       // IA32_MISC_ENABLE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// `kvm_fpu` (the legacy FXSAVE area as KVM presents it), field by field: kvm-bindings gives
/// it no byte view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Fpu {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Version 1's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BodyV1 {
    pages: u64,
    #[serde(with = "serde_bytes")]
    regs: Vec<u8>,
    #[serde(with = "serde_bytes")]
    sregs: Vec<u8>,
    fpu: Fpu,
    #[serde(with = "serde_bytes")]
    xcrs: Vec<u8>,
    #[serde(with = "serde_bytes")]
    events: Vec<u8>,
    #[serde(with = "serde_bytes")]
    debugregs: Vec<u8>,
    mp_state: u32,
    msrs: Vec<(u32, u64)>,
    tsc: u64,
    tsc_khz: u32,
    wall_ns: u64,
}

/// One vCPU's state, as taken from a paused VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuState {
    /// Guest pages (the destination must have as many).
    pub pages: u64,
    /// General registers.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, descriptor tables.
    pub sregs: kvm_sregs,
    /// x87 and SSE.
    pub fpu: kvm_fpu,
    /// XCR0 and friends.
    pub xcrs: kvm_xcrs,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Run state (runnable, halted...).
    pub mp_state: u32,
    /// `MSRS`, as read.
    pub msrs: Vec<(u32, u64)>,
    /// The guest's TSC when it paused. The destination sets the guest's TSC to this plus the
    /// wall-clock time since `wall_ns`, so the guest's clock runs on through the pause as
    /// wall time does (and the guest can measure its own downtime).
    pub tsc: u64,
    /// TSC frequency, kHz (the destination must run the guest's TSC at it).
    pub tsc_khz: u32,
    /// Wall clock (Unix ns) when `tsc` was read.
    pub wall_ns: u64,
}

fn bad(what: impl Into<String>) -> GuestError {
    GuestError::BadState(format!("kvm: {}", what.into()))
}

/// A KVM struct from exactly its raw bytes.
fn raw<T: FromBytes>(name: &str, bytes: &[u8]) -> Result<T, GuestError> {
    T::read_from_bytes(bytes).map_err(|_| {
        bad(format!(
            "{name} is {} bytes, this host's KVM struct is {}",
            bytes.len(),
            size_of::<T>()
        ))
    })
}

fn kvm_op(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> GuestError {
    move |e| err(op, e.to_string())
}

/// The wall clock, Unix ns.
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Reads MSR `index` (plus `MSRS` when `all`).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, GuestError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| err("read MSRs", e.to_string()))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm_op("read MSRs"))?;
    if n != indices.len() {
        let missing = indices[n];
        return Err(err("read MSRs", format!("KVM refused MSR {missing:#x}")));
    }
    Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
}

fn write_msrs(vcpu: &VcpuFd, values: &[(u32, u64)]) -> Result<(), GuestError> {
    let entries: Vec<kvm_msr_entry> = values
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| err("write MSRs", e.to_string()))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm_op("write MSRs"))?;
    if n != values.len() {
        return Err(err(
            "write MSRs",
            format!("KVM refused MSR {:#x}", values[n].0),
        ));
    }
    Ok(())
}

/// The guest's TSC now.
pub fn read_tsc(vcpu: &VcpuFd) -> Result<u64, GuestError> {
    Ok(read_msrs(vcpu, &[MSR_TSC])?[0].1)
}

/// Sets the guest's TSC.
pub fn write_tsc(vcpu: &VcpuFd, tsc: u64) -> Result<(), GuestError> {
    write_msrs(vcpu, &[(MSR_TSC, tsc)])
}

impl VcpuState {
    /// Takes the state of a parked vCPU of a guest of `pages` pages.
    pub fn capture(vcpu: &VcpuFd, pages: u64) -> Result<Self, GuestError> {
        let tsc = read_tsc(vcpu)?;
        let wall_ns = wall_ns();
        Ok(VcpuState {
            pages,
            regs: vcpu.get_regs().map_err(kvm_op("read registers"))?,
            sregs: vcpu.get_sregs().map_err(kvm_op("read special registers"))?,
            fpu: vcpu.get_fpu().map_err(kvm_op("read the FPU"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm_op("read XCRs"))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_op("read pending events"))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(kvm_op("read debug registers"))?,
            mp_state: vcpu
                .get_mp_state()
                .map_err(kvm_op("read the run state"))?
                .mp_state,
            msrs: read_msrs(vcpu, &MSRS)?,
            tsc,
            tsc_khz: vcpu.get_tsc_khz().map_err(kvm_op("read the TSC rate"))?,
            wall_ns,
        })
    }

    /// Installs everything but the TSC (set when the guest starts, see
    /// [`VcpuState::tsc`]) into a vCPU that has not run.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), GuestError> {
        let here = vcpu.get_tsc_khz().map_err(kvm_op("read the TSC rate"))?;
        if here != self.tsc_khz {
            vcpu.set_tsc_khz(self.tsc_khz).map_err(|e| {
                err(
                    "set the TSC rate",
                    format!(
                        "the guest's TSC ran at {} kHz, this host's runs at {here} kHz, and \
                         KVM cannot scale it here: {e}",
                        self.tsc_khz
                    ),
                )
            })?;
        }
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_op("install special registers"))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm_op("install registers"))?;
        vcpu.set_fpu(&self.fpu).map_err(kvm_op("install the FPU"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm_op("install XCRs"))?;
        write_msrs(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_op("install pending events"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm_op("install debug registers"))?;
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(kvm_op("install the run state"))
    }

    /// The blob.
    pub fn encode(&self) -> Vec<u8> {
        let body = BodyV1 {
            pages: self.pages,
            regs: self.regs.as_bytes().to_vec(),
            sregs: self.sregs.as_bytes().to_vec(),
            fpu: Fpu::from(&self.fpu),
            xcrs: self.xcrs.as_bytes().to_vec(),
            events: self.events.as_bytes().to_vec(),
            debugregs: self.debugregs.as_bytes().to_vec(),
            mp_state: self.mp_state,
            msrs: self.msrs.clone(),
            tsc: self.tsc,
            tsc_khz: self.tsc_khz,
            wall_ns: self.wall_ns,
        };
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend(postcard::to_allocvec(&body).expect("serialising to memory cannot fail"));
        out
    }

    /// Reads and checks a blob for a guest of `pages` pages.
    pub fn decode(blob: &[u8], pages: u64) -> Result<Self, GuestError> {
        let Some((magic, rest)) = blob.split_first_chunk::<4>() else {
            return Err(bad(format!(
                "{} bytes is too short for a state blob",
                blob.len()
            )));
        };
        if magic != MAGIC {
            return Err(bad(format!(
                "not a KVM state blob (starts {magic:02x?}, expected {:02x?}): the source \
                 runs another backend",
                MAGIC
            )));
        }
        let Some((version, body)) = rest.split_first_chunk::<2>() else {
            return Err(bad("the blob ends before its version"));
        };
        let version = u16::from_le_bytes(*version);
        if version != VERSION {
            return Err(bad(format!(
                "state blob version {version}; this skyferry reads version {VERSION} \
                 (upgrade the older host)"
            )));
        }
        let (b, trailing): (BodyV1, _) =
            postcard::take_from_bytes(body).map_err(|e| bad(format!("malformed body: {e}")))?;
        if !trailing.is_empty() {
            return Err(bad(format!("{} bytes after the body", trailing.len())));
        }
        if b.pages != pages {
            return Err(GuestError::SizeMismatch {
                source_pages: b.pages,
                dest_pages: pages,
            });
        }
        if b.tsc_khz == 0 {
            return Err(bad("a TSC frequency of 0 kHz"));
        }
        let mut wanted: Vec<u32> = MSRS.to_vec();
        let mut got: Vec<u32> = b.msrs.iter().map(|m| m.0).collect();
        wanted.sort_unstable();
        got.sort_unstable();
        if got != wanted {
            return Err(bad(format!(
                "MSRs {got:#x?}; this backend carries exactly {wanted:#x?}"
            )));
        }
        let state = VcpuState {
            pages: b.pages,
            regs: raw("regs", &b.regs)?,
            sregs: raw("sregs", &b.sregs)?,
            fpu: kvm_fpu::from(&b.fpu),
            xcrs: raw("xcrs", &b.xcrs)?,
            events: raw("vcpu events", &b.events)?,
            debugregs: raw("debug registers", &b.debugregs)?,
            mp_state: b.mp_state,
            msrs: b.msrs,
            tsc: b.tsc,
            tsc_khz: b.tsc_khz,
            wall_ns: b.wall_ns,
        };
        state.check()?;
        Ok(state)
    }

    /// Checks what KVM would accept but the guest could not run from.
    fn check(&self) -> Result<(), GuestError> {
        const CR0_PE: u64 = 1;
        const CR0_PG: u64 = 1 << 31;
        let s = &self.sregs;
        if s.cr0 & CR0_PE == 0 {
            return Err(bad(format!(
                "CR0 {:#x}: real mode; the micro-VM's guest runs in protected mode",
                s.cr0
            )));
        }
        if s.cr0 & CR0_PG == 0 {
            // Flat, unpaged: the next instruction must be in RAM.
            let rip = s.cs.base.wrapping_add(self.regs.rip);
            if rip >= self.pages * crate::page::PAGE_SIZE as u64 {
                return Err(bad(format!(
                    "the instruction pointer {rip:#x} lies beyond the guest's {} pages",
                    self.pages
                )));
            }
        }
        if s.cs.present == 0 {
            return Err(bad("the code segment is not present"));
        }
        if self.mp_state > kvm_bindings::KVM_MP_STATE_SUSPENDED {
            return Err(bad(format!("unknown run state {}", self.mp_state)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plausible state, without a vCPU.
    fn sample() -> VcpuState {
        let mut sregs = kvm_sregs {
            cr0: 0x11,
            ..Default::default()
        };
        sregs.cs.present = 1;
        sregs.cs.selector = 8;
        let mut fpu = kvm_fpu {
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[3] = [7; 16];
        VcpuState {
            pages: 1024,
            regs: kvm_regs {
                rip: 0x2040,
                rax: 0xdead_beef,
                rflags: 2,
                ..Default::default()
            },
            sregs,
            fpu,
            xcrs: kvm_xcrs::default(),
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
            mp_state: 0,
            msrs: MSRS.iter().map(|&m| (m, u64::from(m) * 3)).collect(),
            tsc: 123_456_789,
            tsc_khz: 2_100_000,
            wall_ns: 1_700_000_000_000_000_000,
        }
    }

    fn message(e: GuestError) -> String {
        match e {
            GuestError::BadState(m) => m,
            other => panic!("expected BadState, got {other}"),
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let blob = s.encode();
        assert_eq!(&blob[..4], MAGIC);
        assert_eq!(VcpuState::decode(&blob, 1024).unwrap(), s);
    }

    #[test]
    fn refuses_other_magic_version_and_truncation() {
        let blob = sample().encode();
        let mut other = blob.clone();
        other[0] = b'X';
        assert!(message(VcpuState::decode(&other, 1024).unwrap_err()).contains("not a KVM"));
        let mut newer = blob.clone();
        newer[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert!(message(VcpuState::decode(&newer, 1024).unwrap_err()).contains("version 2"));
        for cut in [0, 3, 5, 6, blob.len() / 2, blob.len() - 1] {
            assert!(
                matches!(
                    VcpuState::decode(&blob[..cut], 1024),
                    Err(GuestError::BadState(_))
                ),
                "cut at {cut}"
            );
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(message(VcpuState::decode(&long, 1024).unwrap_err()).contains("after the body"));
    }

    #[test]
    fn refuses_other_sizes_and_unrunnable_states() {
        let blob = sample().encode();
        assert!(matches!(
            VcpuState::decode(&blob, 2048),
            Err(GuestError::SizeMismatch {
                source_pages: 1024,
                dest_pages: 2048
            })
        ));
        let mut s = sample();
        s.regs.rip = 1024 * 4096;
        assert!(message(VcpuState::decode(&s.encode(), 1024).unwrap_err()).contains("beyond"));
        let mut s = sample();
        s.sregs.cr0 = 0;
        assert!(message(VcpuState::decode(&s.encode(), 1024).unwrap_err()).contains("real mode"));
        let mut s = sample();
        s.msrs.pop();
        assert!(message(VcpuState::decode(&s.encode(), 1024).unwrap_err()).contains("MSRs"));
        let mut s = sample();
        s.tsc_khz = 0;
        assert!(message(VcpuState::decode(&s.encode(), 1024).unwrap_err()).contains("0 kHz"));
    }

    #[test]
    fn refuses_a_struct_of_the_wrong_size() {
        let s = sample();
        let mut body = BodyV1 {
            pages: s.pages,
            regs: s.regs.as_bytes().to_vec(),
            sregs: s.sregs.as_bytes().to_vec(),
            fpu: Fpu::from(&s.fpu),
            xcrs: s.xcrs.as_bytes().to_vec(),
            events: s.events.as_bytes().to_vec(),
            debugregs: s.debugregs.as_bytes().to_vec(),
            mp_state: 0,
            msrs: s.msrs.clone(),
            tsc: 0,
            tsc_khz: 1,
            wall_ns: 0,
        };
        body.regs.pop();
        let mut blob = MAGIC.to_vec();
        blob.extend_from_slice(&VERSION.to_le_bytes());
        blob.extend(postcard::to_allocvec(&body).unwrap());
        assert!(message(VcpuState::decode(&blob, 1024).unwrap_err()).contains("regs is"));
    }
}
