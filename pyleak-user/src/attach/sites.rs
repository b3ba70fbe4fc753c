//! Allocator calls an LTO/PGO build inlined behind a guard.
//!
//! GCC's indirect-call promotion turns CPython's `_PyObject.malloc(_PyObject.ctx, n)` into
//! `if (_PyObject.malloc == _PyObject_Malloc) { inlined _PyObject_Malloc } else { call
//! through the table }`. Debian's `/usr/bin/python3.11` has ~190 such copies of
//! `_PyObject_Malloc` and ~50 of `_PyObject_Free`, and almost no calls reach the functions
//! themselves, so probes on functions see almost nothing.
//!
//! Each guard is `cmp $fn, reg` (or `cmp $fn, [table field]`) followed by `je`/`jne`. The
//! call-through-the-table branch ("fallback") is plain code that moves the arguments into
//! the System V registers and calls; decoding it tells which registers hold the arguments at
//! the guard, and, after its call, where the result goes: a `jmp J` (or `test r,r; jne J`)
//! back to the code both branches share, with the block in a known register at `J`. A probe
//! on the guard's jump (a `jcc`, which the kernel emulates) stands for the call's entry when
//! the guard holds, one at `J` for its return.
//!
//! Fixed-address executables only (the guard compares absolute addresses): Debian's and
//! Ubuntu's `/usr/bin/python3.X`. A site whose fallback does anything else is left out and
//! counted.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind, Register,
};
use object::{Object, ObjectSection};
use pyleak_common::{AllocKind, SiteInfo, REG_CONST, REG_NONE, REG_STACK};

use super::{elf::ElfFile, tables::AllocTable};

/// How many instructions a fallback branch may take before its call, and after it.
const MAX_WALK: usize = 32;

/// One guarded inline call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Address of the guard's conditional jump (where the entry probe goes).
    pub guard: u64,
    /// `SiteMalloc`, `SiteCalloc`, `SiteRealloc` or `SiteFree`.
    pub kind: AllocKind,
    /// What the kernel needs at the guard (`join` left 0: ids are given when attaching).
    pub info: SiteInfo,
    /// Where the call returns (`J`) and where the block is there (a register number, or
    /// `REG_STACK` and the slot's offset from rsp); `None` for frees.
    pub join: Option<(u64, u8, u64)>,
    /// Whether the kernel emulates the instruction at the join (cheap).
    pub join_emulated: bool,
}

/// What the scan found.
#[derive(Debug, Default)]
pub struct SiteScan {
    /// Usable sites.
    pub sites: Vec<Site>,
    /// Guards found whose fallback pyleak could not follow.
    pub skipped: usize,
}

/// pyleak's number (as in [`SiteInfo`]) for a 64-bit general register.
fn reg_number(r: Register) -> Option<u8> {
    Some(match r.full_register() {
        Register::RAX => 0,
        Register::RBX => 1,
        Register::RCX => 2,
        Register::RDX => 3,
        Register::RSI => 4,
        Register::RDI => 5,
        Register::RBP => 6,
        Register::RSP => 7,
        Register::R8 => 8,
        Register::R9 => 9,
        Register::R10 => 10,
        Register::R11 => 11,
        Register::R12 => 12,
        Register::R13 => 13,
        Register::R14 => 14,
        Register::R15 => 15,
        _ => return None,
    })
}

/// Where a register's value at the walk's start went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    /// The value register `n` had at the guard.
    Reg(u8),
    /// A constant.
    Const(u64),
    /// The stack slot at `[rsp + n]` (rsp as at the guard).
    Stack(u64),
    /// Something pyleak does not follow.
    Unknown,
}

/// The executable code of a file, decodable at any address.
struct Code_<'a> {
    ranges: Vec<(u64, &'a [u8])>,
}

impl<'a> Code_<'a> {
    fn bytes(&self, addr: u64, len: usize) -> Option<&'a [u8]> {
        let (start, bytes) = self
            .ranges
            .iter()
            .find(|(s, b)| addr >= *s && addr < s + b.len() as u64)?;
        let rel = usize::try_from(addr - start).ok()?;
        bytes.get(rel..rel + len)
    }

    fn at(&self, addr: u64) -> Option<Instruction> {
        let (start, bytes) = self
            .ranges
            .iter()
            .find(|(s, b)| addr >= *s && addr < s + b.len() as u64)?;
        let rel = usize::try_from(addr - start).ok()?;
        let end = (rel + 16).min(bytes.len());
        let i = Decoder::with_ip(64, &bytes[rel..end], addr, DecoderOptions::NONE).decode();
        (!i.is_invalid()).then_some(i)
    }
}

/// Registers an instruction writes (full registers).
fn written(factory: &mut InstructionInfoFactory, i: &Instruction) -> Vec<u8> {
    factory
        .info(i)
        .used_registers()
        .iter()
        .filter(|u| {
            matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            )
        })
        .filter_map(|u| reg_number(u.register()))
        .collect()
}

fn is_reg64(i: &Instruction, op: u32) -> bool {
    i.op_kind(op) == OpKind::Register && i.op_register(op).is_gpr64()
}

/// A register-to-register 64-bit move: (destination, source).
fn mov64(i: &Instruction) -> Option<(u8, u8)> {
    (i.mnemonic() == Mnemonic::Mov && is_reg64(i, 0) && is_reg64(i, 1))
        .then(|| Some((reg_number(i.op0_register())?, reg_number(i.op1_register())?)))?
}

/// A constant loaded into a register: (destination, value).
fn mov_const(i: &Instruction) -> Option<(u8, u64)> {
    match i.code() {
        Code::Mov_r32_imm32 | Code::Mov_r64_imm64 | Code::Mov_rm64_imm32
            if i.op0_kind() == OpKind::Register =>
        {
            Some((reg_number(i.op0_register())?, i.immediate(1)))
        }
        _ => None,
    }
}

/// A 64-bit load from `[rsp + disp]`: (destination, disp).
fn load_stack(i: &Instruction) -> Option<(u8, u64)> {
    (i.mnemonic() == Mnemonic::Mov
        && is_reg64(i, 0)
        && i.op1_kind() == OpKind::Memory
        && i.memory_base() == Register::RSP
        && i.memory_index() == Register::None)
        .then(|| Some((reg_number(i.op0_register())?, i.memory_displacement64())))?
}

/// Follows the fallback branch from `start` to its call through the table; returns the
/// sources of the call's registers and the address after the call (`None` for a tail call,
/// `jmp *reg`).
fn walk_to_call(
    code: &Code_,
    factory: &mut InstructionInfoFactory,
    start: u64,
    guard_reg: Option<u8>,
    table_fields: &[u64],
) -> Option<([Src; 16], Option<u64>)> {
    let mut src: [Src; 16] = core::array::from_fn(|n| Src::Reg(n as u8));
    let mut rsp_moved = false;
    let mut pc = start;
    for _ in 0..MAX_WALK {
        let i = code.at(pc)?;
        match i.flow_control() {
            FlowControl::UnconditionalBranch if i.op0_kind() == OpKind::NearBranch64 => {
                pc = i.near_branch64();
                continue;
            }
            FlowControl::IndirectCall | FlowControl::IndirectBranch => {
                // Through the register the guard compared, or the table field itself.
                let through_table = if i.op0_kind() == OpKind::Register {
                    let r = reg_number(i.op0_register())?;
                    guard_reg.is_some() && src[r as usize] == Src::Reg(guard_reg?)
                } else {
                    i.is_ip_rel_memory_operand()
                        && table_fields.contains(&i.ip_rel_memory_address())
                        || (i.memory_base() == Register::None
                            && i.memory_index() == Register::None
                            && table_fields.contains(&i.memory_displacement64()))
                };
                let after = (i.flow_control() == FlowControl::IndirectCall).then(|| i.next_ip());
                return through_table.then_some((src, after));
            }
            FlowControl::Next => {}
            _ => return None,
        }
        let writes = written(factory, &i);
        if let Some((d, s)) = mov64(&i) {
            src[d as usize] = src[s as usize];
        } else if let Some((d, v)) = mov_const(&i) {
            src[d as usize] = Src::Const(v);
        } else if let (Some((d, disp)), false) = (load_stack(&i), rsp_moved) {
            src[d as usize] = Src::Stack(disp);
        } else {
            for w in writes {
                src[w as usize] = Src::Unknown;
            }
        }
        rsp_moved |= src[7] != Src::Reg(7);
        if rsp_moved {
            for s in src.iter_mut() {
                if matches!(s, Src::Stack(_)) {
                    *s = Src::Unknown;
                }
            }
        }
        pc = i.next_ip();
    }
    None
}

/// A 64-bit store to `[rsp + disp]`: (source, disp).
fn store_stack(i: &Instruction) -> Option<(u8, u64)> {
    (i.mnemonic() == Mnemonic::Mov
        && i.op0_kind() == OpKind::Memory
        && i.memory_base() == Register::RSP
        && i.memory_index() == Register::None
        && is_reg64(i, 1))
    .then(|| Some((reg_number(i.op1_register())?, i.memory_displacement64())))?
}

/// Follows the fallback after its call to the code both branches share: `(J, where the
/// block is at J)`, the place being a register number or `REG_STACK` with its offset.
fn walk_to_join(
    code: &Code_,
    factory: &mut InstructionInfoFactory,
    start: u64,
) -> Option<(u64, u8, u64)> {
    let mut holds: u16 = 1; // rax
    let mut slots: Vec<u64> = Vec::new(); // stack slots holding it
    let mut tested: Option<u8> = None;
    let mut pc = start;
    for _ in 0..MAX_WALK {
        let i = code.at(pc)?;
        let cond = matches!(i.mnemonic(), Mnemonic::Jne | Mnemonic::Je);
        let join = match i.flow_control() {
            FlowControl::UnconditionalBranch if i.op0_kind() == OpKind::NearBranch64 => {
                Some(i.near_branch64())
            }
            // Non-NULL result: on to the shared code.
            FlowControl::ConditionalBranch
                if cond && tested.is_some_and(|r| holds & (1 << r) != 0) =>
            {
                if i.mnemonic() == Mnemonic::Jne {
                    Some(i.near_branch64())
                } else {
                    // NULL goes to the error path; the block falls through.
                    pc = i.next_ip();
                    continue;
                }
            }
            FlowControl::Next => None,
            _ => return None,
        };
        if let Some(j) = join {
            // The shared code's place: where the result was moved to, if anywhere.
            let others = holds & !1;
            return match (others.count_ones(), slots.as_slice()) {
                (0, []) => (holds & 1 != 0).then_some((j, 0, 0)),
                (1, []) => Some((j, others.trailing_zeros() as u8, 0)),
                (0, [disp]) => Some((j, REG_STACK, *disp)),
                _ => None,
            };
        }
        if i.mnemonic() == Mnemonic::Test && is_reg64(&i, 0) && is_reg64(&i, 1) {
            let (a, b) = (reg_number(i.op0_register())?, reg_number(i.op1_register())?);
            tested = (a == b).then_some(a);
        } else if let Some((d, s)) = mov64(&i) {
            if holds & (1 << s) != 0 {
                holds |= 1 << d;
            } else {
                holds &= !(1 << d);
            }
        } else if let Some((s, disp)) = store_stack(&i) {
            slots.retain(|&d| d != disp);
            if holds & (1 << s) != 0 {
                slots.push(disp);
            }
        } else {
            let writes = written(factory, &i);
            if writes.contains(&7) || i.op0_kind() == OpKind::Memory {
                // rsp moved, or memory written that may be a slot: give up on slots.
                if !slots.is_empty() {
                    return None;
                }
            }
            for w in writes {
                holds &= !(1 << w);
            }
            if i.mnemonic() == Mnemonic::Cmp {
                tested = None;
            }
        }
        pc = i.next_ip();
    }
    None
}

/// A cheaper place for a join probe at `j`: the first instruction the kernel emulates in the
/// straight-line code from `j` before anything writes where the block is (or rsp, or
/// memory when the block is in a stack slot). Single-stepping the instruction at `j` would
/// cost ~10 µs a call on this machine kind, an emulated one ~1 µs.
fn cheap_join(
    code: &Code_,
    factory: &mut InstructionInfoFactory,
    j: u64,
    place: u8,
) -> (u64, bool) {
    let mut pc = j;
    for _ in 0..8 {
        let Some(i) = code.at(pc) else { break };
        let Some(bytes) = code.bytes(pc, i.len()) else {
            break;
        };
        if super::prologue::is_emulated(&i, bytes) {
            return (pc, true);
        }
        if i.flow_control() != FlowControl::Next {
            break;
        }
        let writes = written(factory, &i);
        let clobbers = writes.contains(&7)
            || if place == REG_STACK {
                i.op0_kind() == OpKind::Memory
            } else {
                writes.contains(&place)
            };
        if clobbers {
            break;
        }
        pc = i.next_ip();
    }
    (j, false)
}

/// Finds the guarded inline copies of a domain's table functions in a fixed-address
/// executable. `tables`: the domains sharing these functions (object and mem).
pub fn find_sites(elf: &ElfFile, tables: &[AllocTable]) -> SiteScan {
    let mut scan = SiteScan::default();
    let Ok(file) = object::File::parse(elf.data()) else {
        return scan;
    };
    if file.kind() != object::ObjectKind::Executable || tables.is_empty() {
        return scan;
    }
    let ranges: Vec<(u64, &[u8])> = file
        .sections()
        .filter(|s| s.kind() == object::SectionKind::Text)
        .filter_map(|s| Some((s.address(), s.data().ok()?)))
        .collect();
    let code = Code_ { ranges };
    let functions = tables[0].functions;
    let kinds = [
        AllocKind::SiteMalloc,
        AllocKind::SiteCalloc,
        AllocKind::SiteRealloc,
        AllocKind::SiteFree,
    ];
    let mut factory = InstructionInfoFactory::new();
    for &(start, bytes) in &code.ranges {
        let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
        let mut prev: Option<Instruction> = None;
        for i in &mut decoder {
            let guard = prev.replace(i);
            let Some(cmp) = guard else { continue };
            if cmp.mnemonic() != Mnemonic::Cmp
                || !matches!(i.mnemonic(), Mnemonic::Je | Mnemonic::Jne)
                || !matches!(
                    cmp.op1_kind(),
                    OpKind::Immediate32to64 | OpKind::Immediate32
                )
            {
                continue;
            }
            let imm = cmp.immediate(1);
            let Some(f) = functions.iter().position(|&a| a == imm) else {
                continue;
            };
            let fields: Vec<u64> = tables
                .iter()
                .map(|t| t.address + 8 * (f as u64 + 1))
                .collect();
            let (guard_reg, guard_mem) = match cmp.op0_kind() {
                OpKind::Register if cmp.op0_register().is_gpr64() => {
                    (reg_number(cmp.op0_register()), 0)
                }
                OpKind::Memory
                    if cmp.memory_base() == Register::None || cmp.is_ip_rel_memory_operand() =>
                {
                    let a = if cmp.is_ip_rel_memory_operand() {
                        cmp.ip_rel_memory_address()
                    } else {
                        cmp.memory_displacement64()
                    };
                    if !fields.contains(&a) {
                        continue;
                    }
                    (None, a)
                }
                _ => continue,
            };
            let fallback = if i.mnemonic() == Mnemonic::Jne {
                i.near_branch64()
            } else {
                i.next_ip()
            };
            match analyse(
                &code,
                &mut factory,
                kinds[f],
                i.ip(),
                fallback,
                guard_reg,
                guard_mem,
                imm,
                &fields,
            ) {
                Some(site) => scan.sites.push(site),
                None => {
                    log::debug!(
                        "guard at {:#x} ({:?}): fallback not followed",
                        i.ip(),
                        kinds[f]
                    );
                    scan.skipped += 1
                }
            }
        }
    }
    scan
}

#[allow(clippy::too_many_arguments)]
fn analyse(
    code: &Code_,
    factory: &mut InstructionInfoFactory,
    kind: AllocKind,
    guard: u64,
    fallback: u64,
    guard_reg: Option<u8>,
    guard_mem: u64,
    expected: u64,
    fields: &[u64],
) -> Option<Site> {
    let (src, after) = walk_to_call(code, factory, fallback, guard_reg, fields)?;
    // System V: rdi = ctx, then rsi, rdx.
    let wanted: &[usize] = match kind {
        AllocKind::SiteMalloc | AllocKind::SiteFree => &[4],
        _ => &[4, 3],
    };
    let mut info = SiteInfo {
        expected,
        guard_mem,
        guard_reg: guard_reg.unwrap_or(REG_NONE),
        arg_reg: [REG_NONE; 2],
        ..SiteInfo::default()
    };
    for (k, &r) in wanted.iter().enumerate() {
        match src[r] {
            Src::Reg(n) => info.arg_reg[k] = n,
            Src::Const(v) => {
                info.arg_reg[k] = REG_CONST;
                info.arg_const[k] = v;
            }
            Src::Stack(disp) => {
                info.arg_reg[k] = REG_STACK;
                info.arg_const[k] = disp;
            }
            Src::Unknown => return None,
        }
    }
    // A tail call returns to the enclosing function's caller: such a site is left to a
    // probe on that function (the exported entry points are the ones that do this).
    let mut join_emulated = false;
    let join = if kind == AllocKind::SiteFree {
        None
    } else {
        let (j, place, disp) = walk_to_join(code, factory, after?)?;
        let (j, emulated) = cheap_join(code, factory, j, place);
        join_emulated = emulated;
        Some((j, place, disp))
    };
    Some(Site {
        guard,
        kind,
        info,
        join,
        join_emulated,
    })
}
