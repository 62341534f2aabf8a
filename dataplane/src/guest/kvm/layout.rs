// Where the KVM test guest keeps everything in its guest-physical memory, and the I/O ports
// it talks through. The one source of these numbers: `dataplane/build.rs` includes this file
// and hands every constant to the assembler (`--defsym`), and the backend uses it as a
// module, so the guest program and its host cannot disagree.
//
// Plain `const`s only: this file is also compiled inside the build script.

/// Bytes per guest page.
pub const PAGE: u32 = 4096;
/// 32-bit words per page.
pub const PAGE_WORDS: u32 = PAGE / 4;
/// Header words of a written page: page number, generation, sum, weighted sum.
pub const HDR_WORDS: u32 = 4;
/// Header bytes of a written page.
pub const HDR_BYTES: u32 = HDR_WORDS * 4;
/// Words after the header: what the two sums cover.
pub const BODY_WORDS: u32 = PAGE_WORDS - HDR_WORDS;

/// The parameter and status page.
pub const PARAMS: u32 = 0x1000;
/// Where the program is loaded and starts (protected mode, flat, paging off).
pub const CODE: u32 = 0x2000;
/// Room for the program (the build checks it fits).
pub const CODE_MAX: u32 = 0x4000;
/// Top of the stack (two pages below it).
pub const STACK_TOP: u32 = 0x8000;
/// The generation table: one word per guest page, 0 for a page that must be all zeros.
pub const TABLE: u32 = 0x8000;

// Parameters, written by the host before the first instruction (and migrated with memory).
/// `SKYK`.
pub const P_MAGIC: u32 = PARAMS;
/// Layout version.
pub const P_VERSION: u32 = PARAMS + 0x04;
/// Guest pages in all.
pub const P_PAGES: u32 = PARAMS + 0x08;
/// First page the program writes and checks (after the table).
pub const P_DATA_FIRST: u32 = PARAMS + 0x0c;
/// Pages of the hot set, from `P_DATA_FIRST` on (at least 1).
pub const P_HOT_PAGES: u32 = PARAMS + 0x10;
/// Percent of operations that land in the hot set; the rest scatter over all data pages.
pub const P_HOT_PCT: u32 = PARAMS + 0x14;
/// Percent of operations that rewrite a whole page.
pub const P_PCT_FULL: u32 = PARAMS + 0x18;
/// Percent that rewrite a few words of a page (the rest zero a page).
pub const P_PCT_PARTIAL: u32 = PARAMS + 0x1c;
/// Words a partial rewrite changes (1 to `BODY_WORDS`).
pub const P_PARTIAL_WORDS: u32 = PARAMS + 0x20;
/// Operations per second the host paces the program at (0: it never writes).
pub const P_RATE: u32 = PARAMS + 0x24;
/// The host's TSC frequency, kHz.
pub const P_TSC_KHZ: u32 = PARAMS + 0x28;
/// End (exclusive) of the pages the program writes and checks: `P_PAGES`, or
/// [`MMIO_FIRST_PAGE`] in a guest that reaches it.
pub const P_DATA_END: u32 = PARAMS + 0x2c;

/// First page of the PC's interrupt-controller and firmware range (0xFEC00000: I/O APIC,
/// local APIC at 0xFEE00000, boot ROM), to 4 GiB. A guest never uses it as RAM, and KVM may
/// take it for device memory: here a read at 0xFEE00000 left `KVM_RUN` as an MMIO exit even
/// inside the memory slot. The program leaves these pages alone (they stay zero and still
/// migrate).
pub const MMIO_FIRST_PAGE: u32 = 0xfec0_0000 / PAGE;

// Status, written by the program (the host reads it, and writes only `ST_ARRIVED`).
/// Operations completed: the progress counter (64 bits).
pub const ST_PROGRESS: u32 = PARAMS + 0x100;
/// Last generation handed out.
pub const ST_GEN: u32 = PARAMS + 0x108;
/// The xorshift32 state.
pub const ST_RNG: u32 = PARAMS + 0x10c;
/// Page of the operation under way, `NO_PFN` between operations.
pub const ST_CUR_PFN: u32 = PARAMS + 0x110;
/// Sweeps done.
pub const ST_SWEEPS: u32 = PARAMS + 0x114;
/// Bad pages found by the last sweep.
pub const ST_SWEEP_BAD: u32 = PARAMS + 0x118;
/// 0 when the host has just placed the program on a new host; the program's next clock
/// tick measures the gap and sets it to 1.
pub const ST_ARRIVED: u32 = PARAMS + 0x11c;
/// TSC at the program's last clock tick (64 bits).
pub const ST_LAST_TSC: u32 = PARAMS + 0x120;
/// TSC ticks between the last tick before the move and the first after it (64 bits).
pub const ST_ARRIVAL_GAP: u32 = PARAMS + 0x128;
/// Moves seen.
pub const ST_ARRIVALS: u32 = PARAMS + 0x130;

/// `in`: the host's command: 0 (ask again), `CMD_SWEEP`, or a number of operations to do.
pub const PORT_CMD: u32 = 0x510;
/// `out`: a sweep's count of bad pages.
pub const PORT_REPORT: u32 = 0x511;
/// `out`: the number of one bad page, during a sweep.
pub const PORT_BAD_PAGE: u32 = 0x512;
/// The command that asks for a sweep.
pub const CMD_SWEEP: u32 = 0xffff_ffff;
/// `ST_CUR_PFN` between operations.
pub const NO_PFN: u32 = 0xffff_ffff;
