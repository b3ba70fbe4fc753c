//! The instruction-level reading behind `sites`: which registers hold a guarded call's
//! arguments (walking its fallback branch to the call), and where its result is seen
//! (walking on to the join both branches share).

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind, Register,
};
use pyleak_common::REG_STACK;

use super::sites::MAX_WALK;

/// pyleak's number (as in [`SiteInfo`]) for a 64-bit general register.
pub(super) fn reg_number(r: Register) -> Option<u8> {
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
pub(super) enum Src {
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
pub(super) struct Code_<'a> {
    pub(super) ranges: Vec<(u64, &'a [u8])>,
    /// The PLT sections (`[start, end)`): calls into other files, libc's among them.
    pub(super) plt: Vec<(u64, u64)>,
    /// Functions with a symbol and a size (`[start, end)`), sorted.
    pub(super) functions: Vec<(u64, u64)>,
}

impl<'a> Code_<'a> {
    /// The executable sections of `file`, its PLT sections and its functions with a symbol
    /// and a size.
    pub(super) fn of(file: &object::File<'a>) -> Code_<'a> {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
        let ranges = file
            .sections()
            .filter(|s| s.kind() == object::SectionKind::Text)
            .filter_map(|s| Some((s.address(), s.data().ok()?)))
            .collect();
        let plt = file
            .sections()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
            .map(|s| (s.address(), s.address().saturating_add(s.size())))
            .collect();
        let mut functions: Vec<(u64, u64)> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0)
            .map(|s| (s.address(), s.address().saturating_add(s.size())))
            .collect();
        functions.sort_unstable();
        functions.dedup();
        Code_ {
            ranges,
            plt,
            functions,
        }
    }

    pub(super) fn in_plt(&self, addr: u64) -> bool {
        self.plt.iter().any(|&(s, e)| addr >= s && addr < e)
    }

    /// The start of the named function `addr` lies in.
    pub(super) fn function_of(&self, addr: u64) -> Option<u64> {
        let i = self.functions.partition_point(|&(s, _)| s <= addr);
        let (start, end) = *self.functions.get(i.checked_sub(1)?)?;
        (addr < end).then_some(start)
    }

    pub(super) fn bytes(&self, addr: u64, len: usize) -> Option<&'a [u8]> {
        let (start, bytes) = self
            .ranges
            .iter()
            .find(|(s, b)| addr >= *s && addr - s < b.len() as u64)?;
        let rel = usize::try_from(addr - start).ok()?;
        bytes.get(rel..rel.checked_add(len)?)
    }

    pub(super) fn at(&self, addr: u64) -> Option<Instruction> {
        let (start, bytes) = self
            .ranges
            .iter()
            .find(|(s, b)| addr >= *s && addr - s < b.len() as u64)?;
        let rel = usize::try_from(addr - start).ok()?;
        let end = (rel + 16).min(bytes.len());
        let i = Decoder::with_ip(64, &bytes[rel..end], addr, DecoderOptions::NONE).decode();
        (!i.is_invalid()).then_some(i)
    }
}

/// Registers an instruction writes (full registers).
pub(super) fn written(factory: &mut InstructionInfoFactory, i: &Instruction) -> Vec<u8> {
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

pub(super) fn is_reg64(i: &Instruction, op: u32) -> bool {
    i.op_kind(op) == OpKind::Register && i.op_register(op).is_gpr64()
}

/// A register-to-register 64-bit move: (destination, source).
pub(super) fn mov64(i: &Instruction) -> Option<(u8, u8)> {
    (i.mnemonic() == Mnemonic::Mov && is_reg64(i, 0) && is_reg64(i, 1))
        .then(|| Some((reg_number(i.op0_register())?, reg_number(i.op1_register())?)))?
}

/// A constant loaded into a register: (destination, value).
pub(super) fn mov_const(i: &Instruction) -> Option<(u8, u64)> {
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
pub(super) fn load_stack(i: &Instruction) -> Option<(u8, u64)> {
    (i.mnemonic() == Mnemonic::Mov
        && is_reg64(i, 0)
        && i.op1_kind() == OpKind::Memory
        && i.memory_base() == Register::RSP
        && i.memory_index() == Register::None)
        .then(|| Some((reg_number(i.op0_register())?, i.memory_displacement64())))?
}

/// What a fallback branch ends by calling.
#[derive(Debug, Clone, Copy)]
pub(super) enum Callee<'a> {
    /// A function of an allocator table: through the register the guard compared
    /// (`guard_reg`), or through one of the table's fields (link-time addresses).
    Table {
        guard_reg: Option<u8>,
        fields: &'a [u64],
    },
    /// The function at this link-time address, called directly.
    Function(u64),
}

/// Follows the fallback branch from `start` to its call of `callee`; returns the sources
/// of the call's registers and the address after the call (`None` for a tail call,
/// `jmp *reg`).
pub(super) fn walk_to_call(
    code: &Code_,
    factory: &mut InstructionInfoFactory,
    start: u64,
    callee: Callee<'_>,
) -> Option<([Src; 16], Option<u64>)> {
    let mut src: [Src; 16] = core::array::from_fn(|n| Src::Reg(n as u8));
    let mut rsp_moved = false;
    let mut pc = start;
    for _ in 0..MAX_WALK {
        let i = code.at(pc)?;
        match (i.flow_control(), callee) {
            (FlowControl::UnconditionalBranch, _) if i.op0_kind() == OpKind::NearBranch64 => {
                pc = i.near_branch64();
                continue;
            }
            (FlowControl::Call, Callee::Function(f)) if i.op0_kind() == OpKind::NearBranch64 => {
                return (i.near_branch64() == f).then_some((src, Some(i.next_ip())));
            }
            (
                FlowControl::IndirectCall | FlowControl::IndirectBranch,
                Callee::Table {
                    guard_reg,
                    fields: table_fields,
                },
            ) => {
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
            (FlowControl::Next, _) => {}
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
pub(super) fn store_stack(i: &Instruction) -> Option<(u8, u64)> {
    (i.mnemonic() == Mnemonic::Mov
        && i.op0_kind() == OpKind::Memory
        && i.memory_base() == Register::RSP
        && i.memory_index() == Register::None
        && is_reg64(i, 1))
    .then(|| Some((reg_number(i.op1_register())?, i.memory_displacement64())))?
}

/// Where the block a call returned (in rax) is as the code after the call runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Block {
    /// Registers holding it (bit n: register n).
    pub(super) regs: u16,
    /// Stack slots holding it (offsets from rsp).
    pub(super) slots: Vec<u64>,
    /// The register the last `test r,r` checked.
    pub(super) tested: Option<u8>,
}

/// Where an instruction after the call leads, following the block.
pub(super) enum Flow {
    /// On to the next instruction, the block moved as the instruction says.
    Next,
    /// On to the next instruction, nothing moved (the NULL check's branch not taken).
    FallThrough,
    /// A jump: an unconditional one, or the non-NULL branch of the NULL check.
    Jump(u64),
}

impl Block {
    /// The block as the call returns it.
    pub(super) fn returned() -> Block {
        Block {
            regs: 1,
            slots: Vec::new(),
            tested: None,
        }
    }

    /// Where `i` leads; `None` for anything not followed (another condition, a return, a
    /// call).
    pub(super) fn flow(&self, i: &Instruction) -> Option<Flow> {
        let cond = matches!(i.mnemonic(), Mnemonic::Jne | Mnemonic::Je);
        match i.flow_control() {
            FlowControl::UnconditionalBranch if i.op0_kind() == OpKind::NearBranch64 => {
                Some(Flow::Jump(i.near_branch64()))
            }
            // Non-NULL result: on to the shared code; NULL goes to the error path.
            FlowControl::ConditionalBranch
                if cond && self.tested.is_some_and(|r| self.regs & (1 << r) != 0) =>
            {
                Some(if i.mnemonic() == Mnemonic::Jne {
                    Flow::Jump(i.near_branch64())
                } else {
                    Flow::FallThrough
                })
            }
            FlowControl::Next => Some(Flow::Next),
            _ => None,
        }
    }

    /// Moves the block as the straight-line instruction `i` does; `None` when `i` may
    /// overwrite a slot holding it (rsp moved, or memory written).
    pub(super) fn step(
        &mut self,
        factory: &mut InstructionInfoFactory,
        i: &Instruction,
    ) -> Option<()> {
        if i.mnemonic() == Mnemonic::Test && is_reg64(i, 0) && is_reg64(i, 1) {
            let (a, b) = (reg_number(i.op0_register())?, reg_number(i.op1_register())?);
            self.tested = (a == b).then_some(a);
        } else if let Some((d, s)) = mov64(i) {
            if self.regs & (1 << s) != 0 {
                self.regs |= 1 << d;
            } else {
                self.regs &= !(1 << d);
            }
        } else if let Some((s, disp)) = store_stack(i) {
            self.slots.retain(|&d| d != disp);
            if self.regs & (1 << s) != 0 {
                self.slots.push(disp);
            }
        } else {
            let writes = written(factory, i);
            if (writes.contains(&7) || i.op0_kind() == OpKind::Memory) && !self.slots.is_empty() {
                return None;
            }
            for w in writes {
                self.regs &= !(1 << w);
            }
            if i.mnemonic() == Mnemonic::Cmp {
                self.tested = None;
            }
        }
        Some(())
    }
}

/// Follows the fallback after its call to the code both branches share: `(J, where the
/// block is at J)`, the place being a register number or `REG_STACK` with its offset.
pub(super) fn walk_to_join(
    code: &Code_,
    factory: &mut InstructionInfoFactory,
    start: u64,
) -> Option<(u64, u8, u64)> {
    let mut b = Block::returned();
    let mut pc = start;
    for _ in 0..MAX_WALK {
        let i = code.at(pc)?;
        match b.flow(&i)? {
            Flow::Jump(j) => {
                // The shared code's place: where the result was moved to, if anywhere.
                let others = b.regs & !1;
                return match (others.count_ones(), b.slots.as_slice()) {
                    (0, []) => (b.regs & 1 != 0).then_some((j, 0, 0)),
                    (1, []) => Some((j, others.trailing_zeros() as u8, 0)),
                    (0, [disp]) => Some((j, REG_STACK, *disp)),
                    _ => None,
                };
            }
            Flow::FallThrough => {}
            Flow::Next => b.step(factory, &i)?,
        }
        pc = i.next_ip();
    }
    None
}

/// The instructions the block passes through from `start` (just after a call), each with
/// where the block is as it starts, until the block is lost or the path goes where
/// [`Block::flow`] does not follow.
pub(super) fn follow(
    code: &Code_,
    factory: &mut InstructionInfoFactory,
    start: u64,
) -> Vec<(u64, Block)> {
    let mut out = Vec::new();
    let mut b = Block::returned();
    let mut pc = start;
    for _ in 0..MAX_WALK {
        if b.regs == 0 && b.slots.is_empty() {
            break;
        }
        let Some(i) = code.at(pc) else { break };
        out.push((pc, b.clone()));
        match b.flow(&i) {
            Some(Flow::Jump(j)) => pc = j,
            Some(Flow::FallThrough) => pc = i.next_ip(),
            Some(Flow::Next) if b.step(factory, &i).is_some() => pc = i.next_ip(),
            _ => break,
        }
    }
    out
}

/// Where the inline copy's block and the fallback's first meet: the first instruction on the
/// copy's path (from `inline_ret`, after its call) that is also on the fallback's (from
/// `fallback_ret`), with a place holding the block on both (a register other than rax
/// first, as one is less likely to be overwritten before an emulated instruction).
pub(super) fn meet(
    code: &Code_,
    factory: &mut InstructionInfoFactory,
    fallback_ret: u64,
    inline_ret: u64,
) -> Option<(u64, u8, u64)> {
    let fallback = follow(code, factory, fallback_ret);
    for (pc, b) in follow(code, factory, inline_ret) {
        let Some((_, f)) = fallback.iter().find(|(a, _)| *a == pc) else {
            continue;
        };
        let regs = b.regs & f.regs;
        let others = regs & !1;
        let slot = b.slots.iter().find(|s| f.slots.contains(s));
        return if others != 0 {
            Some((pc, others.trailing_zeros() as u8, 0))
        } else if regs & 1 != 0 {
            Some((pc, 0, 0))
        } else {
            slot.map(|&disp| (pc, REG_STACK, disp))
        };
    }
    None
}

/// How an inlined copy that is a bare call of another file's function ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyEnd {
    /// `call f@plt`; the copy goes on at this address.
    Call(u64),
    /// `jmp f@plt`: a tail call.
    Tail,
}

/// How the inlined copy from `start` ends, if it is straight-line code up to a call (or
/// tail call) into the PLT, as the raw domain's copies are (`malloc(n ? n : 1)`); `None`
/// for anything else (pymalloc's copies branch at once).
pub(super) fn copy_end(code: &Code_, start: u64) -> Option<CopyEnd> {
    let mut pc = start;
    for _ in 0..MAX_WALK {
        let i = code.at(pc)?;
        let near = i.op0_kind() == OpKind::NearBranch64;
        match i.flow_control() {
            FlowControl::Call if near && code.in_plt(i.near_branch64()) => {
                return Some(CopyEnd::Call(i.next_ip()));
            }
            FlowControl::UnconditionalBranch if near => {
                if code.in_plt(i.near_branch64()) {
                    return Some(CopyEnd::Tail);
                }
                pc = i.near_branch64();
                continue;
            }
            FlowControl::Next => {}
            _ => return None,
        }
        pc = i.next_ip();
    }
    None
}

/// A cheaper place for a join probe at `j`: the first instruction the kernel emulates in the
/// straight-line code from `j` before anything writes where the block is (or rsp, or
/// memory when the block is in a stack slot). Single-stepping the instruction at `j` would
/// cost ~10 µs a call on this machine kind, an emulated one ~1 µs.
pub(super) fn cheap_join(
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
