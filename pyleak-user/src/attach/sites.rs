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
//! The raw domain's copies are a bare call of libc's function (`malloc(n ? n : 1)`), and
//! the shared code is not always behind a `jmp`: the fallback may fall through into it and
//! the copy jump back in, or the fallback's `jmp` may land on its own NULL check while the
//! copy goes straight on. For such copies the join is where the two paths first meet, the
//! block followed along both. A copy that tail-calls libc (`jmp realloc@plt`, the fallback
//! tail-calling through the table) returns to the enclosing function's caller: its join is
//! that function's return.
//!
//! Fixed-address executables only (the guard compares absolute addresses): Debian's and
//! Ubuntu's `/usr/bin/python3.X`. A site whose fallback does anything else is left out and
//! counted.

use iced_x86::{
    Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpKind, Register,
};
use object::Object;
use pyleak_common::{AllocKind, SiteInfo, REG_CONST, REG_NONE, REG_STACK};

use super::{elf::ElfFile, fallback::*, tables::AllocTable};

/// How many instructions a fallback branch may take before its call, and after it.
pub(super) const MAX_WALK: usize = 32;

/// One guarded inline call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Address of the guard's conditional jump (where the entry probe goes).
    pub guard: u64,
    /// `SiteMalloc`, `SiteCalloc`, `SiteRealloc` or `SiteFree`.
    pub kind: AllocKind,
    /// What the kernel needs at the guard (`join` left 0: ids are given when attaching).
    pub info: SiteInfo,
    /// Where the call's block is seen; `None` for frees.
    pub join: Option<Join>,
    /// Whether the kernel emulates the instruction at the join (cheap).
    pub join_emulated: bool,
}

/// Where a guarded inline allocation's block is seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Join {
    /// The code both branches share (`J`), the block there in a register (its number) or
    /// a stack slot (`REG_STACK` and the slot's offset from rsp).
    At(u64, u8, u64),
    /// Both branches tail-call (libc's function, or through the table): the block is the
    /// return value of the function at this address, the one the guard is in.
    Return(u64),
}

/// What the scan found.
#[derive(Debug, Default)]
pub struct SiteScan {
    /// Usable sites.
    pub sites: Vec<Site>,
    /// Guards found whose fallback pyleak could not follow.
    pub skipped: usize,
}

/// Finds the guarded inline copies of a domain's table functions in a fixed-address
/// executable. `tables`: the domains sharing these functions (object and mem).
pub fn find_sites(elf: &ElfFile, tables: &[AllocTable]) -> SiteScan {
    let Ok(file) = object::File::parse(elf.data()) else {
        return SiteScan::default();
    };
    if file.kind() != object::ObjectKind::Executable {
        return SiteScan::default();
    }
    scan_code(&Code_::of(&file), tables)
}

/// [`find_sites`] on decoded code: every guard comparing with one of the tables' functions.
fn scan_code(code: &Code_, tables: &[AllocTable]) -> SiteScan {
    let mut scan = SiteScan::default();
    let Some(table) = tables.first() else {
        return scan;
    };
    let functions = table.functions;
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
                .map(|t| t.address.wrapping_add(8 * (f as u64 + 1)))
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
            let (fallback, inline) = if i.mnemonic() == Mnemonic::Jne {
                (i.near_branch64(), i.next_ip())
            } else {
                (i.next_ip(), i.near_branch64())
            };
            match analyse(
                code,
                &mut factory,
                kinds[f],
                i.ip(),
                (fallback, inline),
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
    (fallback, inline): (u64, u64),
    guard_reg: Option<u8>,
    guard_mem: u64,
    expected: u64,
    fields: &[u64],
) -> Option<Site> {
    let callee = Callee::Table { guard_reg, fields };
    let (src, after) = walk_to_call(code, factory, fallback, callee)?;
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
    let mut join_emulated = false;
    let join = if kind == AllocKind::SiteFree {
        None
    } else {
        match (after, copy_end(code, inline)) {
            // A bare call: the join is where the two paths meet.
            (Some(after), Some(CopyEnd::Call(inline_ret))) => {
                let (j, place, disp) = meet(code, factory, after, inline_ret)?;
                let (j, emulated) = cheap_join(code, factory, j, place);
                join_emulated = emulated;
                Some(Join::At(j, place, disp))
            }
            // Both tail-call: the block is what the enclosing function returns.
            (None, Some(CopyEnd::Tail)) => {
                join_emulated = true;
                Some(Join::Return(code.function_of(guard)?))
            }
            // A copy of a whole allocator (pymalloc): the fallback's jump back.
            (Some(after), None) => {
                let (j, place, disp) = walk_to_join(code, factory, after)?;
                let (j, emulated) = cheap_join(code, factory, j, place);
                join_emulated = emulated;
                Some(Join::At(j, place, disp))
            }
            _ => return None,
        }
    };
    Some(Site {
        guard,
        kind,
        info,
        join,
        join_emulated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x40_0000;
    const RAW_MALLOC: u64 = 0x4f_7350;
    const RAW_REALLOC: u64 = 0x4f_75e0;

    /// Three raw-domain copies as Debian's python3.11 has them (GNU as; offsets from BASE):
    ///
    /// ```text
    /// 00 cmp $RAW_MALLOC,%rax; je 1b; call *%rax; mov %rax,%rdi      (fallback falls through)
    /// 0d test %rdi,%rdi; je 1a; mov %r15,%rdx; call use@plt; 1a ret   (shared code)
    /// 1b mov %rsi,%rdi; call malloc@plt; mov %rax,%rdi; jmp 0d        (copy jumps back)
    /// 28 cmp $RAW_REALLOC,%rax; jne 49; mov %rbx,%rdi; call realloc@plt; mov %rax,%rbp;
    ///    test %rax,%rax; je 5d
    /// 40 mov %rbp,%rdi; call use@plt; ret                              (shared code)
    /// 49 mov %rsi,%rdx; mov %rbx,%rsi; call *%rax; mov %rax,%rbp; jmp 56
    /// 56 test %rbp,%rbp; jne 40; jmp 5d; 5d xor %eax,%eax; ret         (fallback's own check)
    /// 60 push %rbx; mov %rdi,%rbx; cmp $RAW_REALLOC,%rax; jne 72; mov %rbx,%rdi; pop %rbx;
    ///    jmp realloc@plt                                              (tail calls)
    /// 72 mov %rsi,%rdx; mov %rbx,%rsi; pop %rbx; jmp *%rax
    /// 7b malloc@plt, 81 realloc@plt, 87 use@plt: jmp *0x1000(%rip) each; 8d end
    /// ```
    const CODE: [u8; 141] = [
        0x48, 0x3d, 0x50, 0x73, 0x4f, 0x00, 0x74, 0x13, 0xff, 0xd0, 0x48, 0x89, 0xc7, 0x48, 0x85,
        0xff, 0x74, 0x08, 0x4c, 0x89, 0xfa, 0xe8, 0x6d, 0x00, 0x00, 0x00, 0xc3, 0x48, 0x89, 0xf7,
        0xe8, 0x58, 0x00, 0x00, 0x00, 0x48, 0x89, 0xc7, 0xeb, 0xe5, 0x48, 0x3d, 0xe0, 0x75, 0x4f,
        0x00, 0x75, 0x19, 0x48, 0x89, 0xdf, 0xe8, 0x49, 0x00, 0x00, 0x00, 0x48, 0x89, 0xc5, 0x48,
        0x85, 0xc0, 0x74, 0x1d, 0x48, 0x89, 0xef, 0xe8, 0x3f, 0x00, 0x00, 0x00, 0xc3, 0x48, 0x89,
        0xf2, 0x48, 0x89, 0xde, 0xff, 0xd0, 0x48, 0x89, 0xc5, 0xeb, 0x00, 0x48, 0x85, 0xed, 0x75,
        0xe5, 0xeb, 0x00, 0x31, 0xc0, 0xc3, 0x53, 0x48, 0x89, 0xfb, 0x48, 0x3d, 0xe0, 0x75, 0x4f,
        0x00, 0x75, 0x06, 0x48, 0x89, 0xdf, 0x5b, 0xeb, 0x0f, 0x48, 0x89, 0xf2, 0x48, 0x89, 0xde,
        0x5b, 0xff, 0xe0, 0xff, 0x25, 0x00, 0x10, 0x00, 0x00, 0xff, 0x25, 0x00, 0x10, 0x00, 0x00,
        0xff, 0x25, 0x00, 0x10, 0x00, 0x00,
    ];

    fn scan(functions: Vec<(u64, u64)>) -> SiteScan {
        let code = Code_ {
            ranges: vec![(BASE, &CODE[..])],
            plt: vec![(BASE + 0x7b, BASE + 0x8d)],
            functions,
        };
        let table = AllocTable {
            address: 0x95_a060,
            functions: [RAW_MALLOC, 0x4f_76c0, RAW_REALLOC, 0x4f_75b0],
        };
        scan_code(&code, &[table])
    }

    fn site(scan: &SiteScan, guard: u64) -> &Site {
        scan.sites
            .iter()
            .find(|s| s.guard == BASE + guard)
            .unwrap_or_else(|| panic!("no site at +{guard:#x}: {scan:?}"))
    }

    #[test]
    fn fallback_falling_through_into_the_shared_code() {
        let scan = scan(vec![(BASE + 0x60, BASE + 0x7b)]);
        let s = site(&scan, 0x6);
        assert_eq!(s.kind, AllocKind::SiteMalloc);
        assert_eq!(s.info.arg_reg[0], 4, "the size is in rsi at the guard");
        // Where the copy's `jmp` lands, the block in rdi; probed on the `je` after `test`.
        assert_eq!(s.join, Some(Join::At(BASE + 0x10, 5, 0)));
        assert!(s.join_emulated);
    }

    #[test]
    fn join_where_the_copy_meets_the_fallback_not_at_its_null_check() {
        let scan = scan(vec![(BASE + 0x60, BASE + 0x7b)]);
        let s = site(&scan, 0x2e);
        assert_eq!(s.kind, AllocKind::SiteRealloc);
        assert_eq!(s.info.arg_reg, [1, 4], "ptr in rbx, size in rsi");
        // Not +0x59 (the fallback's `jne` on its own NULL check, which the copy never
        // reaches) but the shared code at +0x40, probed on its `call` (rbp still holds it).
        assert_eq!(s.join, Some(Join::At(BASE + 0x43, 6, 0)));
    }

    #[test]
    fn tail_calls_join_at_the_enclosing_functions_return() {
        let scan = scan(vec![(BASE + 0x60, BASE + 0x7b)]);
        let s = site(&scan, 0x6a);
        assert_eq!(s.kind, AllocKind::SiteRealloc);
        assert_eq!(s.info.arg_reg, [1, 4]);
        assert_eq!(s.join, Some(Join::Return(BASE + 0x60)));
        assert_eq!((scan.sites.len(), scan.skipped), (3, 0));
        // Without a function to return from, the site is left out (and counted).
        let scan = self::scan(Vec::new());
        assert!(scan.sites.iter().all(|s| s.guard != BASE + 0x6a));
        assert_eq!((scan.sites.len(), scan.skipped), (2, 1));
    }
}
