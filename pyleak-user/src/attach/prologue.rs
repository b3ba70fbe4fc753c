//! Picks a cheap uprobe attach point inside an x86_64 function prologue.
//!
//! The kernel emulates a few instructions (`push reg`, relative `jmp`/`jcc`/`call`, NOPs) when
//! a uprobe on them fires; everything else is single-stepped out of line, which is roughly ten
//! times slower. This module walks the straight-line prologue and returns the first offset whose
//! instruction is emulated while the argument registers still hold the caller's values.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind, Register,
};

/// Where to put a uprobe inside one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachPoint {
    /// Byte offset from the function's start.
    pub offset: u64,
    /// Bytes pushed/subtracted from rsp between function entry and `offset`, so the return
    /// address (the caller) is at [rsp + stack_delta] when the probe fires.
    pub stack_delta: u64,
    /// True when the instruction at `offset` is one the kernel emulates (cheap);
    /// false when we had to fall back to offset 0 with a single-stepped instruction.
    pub emulated: bool,
}

/// Candidates must start within this many bytes of the function's start.
const MAX_PROLOGUE: u64 = 48;
/// System V integer argument registers, in order.
const ARG_REGS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// True when arch/x86/kernel/uprobes.c emulates `instr` (encoded as `bytes`) instead of
/// single-stepping it: `push reg` (optionally REX 0x41), relative jmp/jcc/call without a 0x66
/// prefix (the kernel rejects those), and NOPs.
pub(crate) fn is_emulated(instr: &Instruction, bytes: &[u8]) -> bool {
    if matches!(bytes, [0x50..=0x57] | [0x41, 0x50..=0x57]) || instr.mnemonic() == Mnemonic::Nop {
        return true;
    }
    let branch = instr.is_jcc_short_or_near()
        || instr.is_jmp_short_or_near()
        || instr.code() == Code::Call_rel32_64;
    let mut prefixes = bytes.iter().take_while(|b| {
        matches!(
            b,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
        )
    });
    branch && !prefixes.any(|&b| b == 0x66)
}

/// How far rsp moves down (bytes) for a stack-growing instruction, `None` for any other write
/// to rsp (pop, `and rsp, -16`, `mov rsp, rbp`, `leave`, ...), which ends the walk.
fn rsp_growth(instr: &Instruction) -> Option<u64> {
    let imm = || {
        (instr.op_count() == 2 && instr.op0_register() == Register::RSP)
            .then(|| instr.op1_kind())
            .filter(|k| matches!(k, OpKind::Immediate8to64 | OpKind::Immediate32to64))
            .map(|_| instr.immediate(1) as i64)
    };
    let grow = match instr.mnemonic() {
        Mnemonic::Push => -i64::from(instr.stack_pointer_increment()),
        Mnemonic::Sub => imm()?,
        Mnemonic::Add => imm()?.checked_neg()?,
        _ => return None,
    };
    u64::try_from(grow).ok()
}

/// Chooses where to attach a uprobe inside one function.
///
/// `code`: the function's bytes (from its symbol start, length = symbol size, or at least
/// the first 64 bytes if the size is unknown), `addr`: its virtual address (for decoding
/// relative branches), `args`: how many integer argument registers must still hold the
/// caller's values at the attach point (System V order rdi, rsi, rdx, rcx, r8, r9),
/// `need_return_address_on_top`: true when a uretprobe will also attach at this offset —
/// then rsp must be unchanged since entry (stack_delta == 0), because the kernel hijacks the
/// return address at [rsp] when the probe fires.
///
/// Returns the first emulated instruction of the straight-line prologue that precedes every
/// write to those argument registers and every in-function branch target; otherwise offset 0.
pub fn choose_attach_point(
    code: &[u8],
    addr: u64,
    args: usize,
    need_return_address_on_top: bool,
) -> AttachPoint {
    let arg_regs = &ARG_REGS[..args.min(ARG_REGS.len())];
    let mut factory = InstructionInfoFactory::new();
    let mut candidates: Vec<AttachPoint> = Vec::new();
    let mut first_emulated = false;
    let mut min_target = u64::MAX; // smallest in-function branch target > 0
    let mut walking = true;
    let mut delta = 0u64;
    for instr in Decoder::with_ip(64, code, addr, DecoderOptions::NONE) {
        if instr.is_invalid() {
            walking = false; // keep scanning for branch targets: the decoder resynchronizes
            continue;
        }
        let offset = instr.ip().wrapping_sub(addr);
        if instr.op0_kind() == OpKind::NearBranch64 {
            let target = instr.near_branch64().wrapping_sub(addr);
            if target > 0 && target < code.len() as u64 {
                min_target = min_target.min(target);
            }
        }
        if !walking {
            continue;
        }
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(code.len());
        let end = start.saturating_add(instr.len()).min(code.len());
        let emulated = is_emulated(&instr, &code[start..end]);
        if offset == 0 {
            first_emulated = emulated;
        }
        if offset >= MAX_PROLOGUE {
            walking = false;
            continue;
        }
        candidates.push(AttachPoint {
            offset,
            stack_delta: delta,
            emulated,
        });
        // The probe fires before `instr` runs, so it may itself clobber args or rsp; anything
        // after it may not be used once it does.
        let mut stop = instr.flow_control() != FlowControl::Next;
        for used in factory.info(&instr).used_registers() {
            let writes = matches!(
                used.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            );
            if !writes {
                continue;
            }
            let reg = used.register().full_register();
            if arg_regs.contains(&reg) {
                stop = true;
            } else if reg == Register::RSP && !stop {
                match rsp_growth(&instr) {
                    Some(grow) => delta = delta.saturating_add(grow),
                    None => stop = true,
                }
            }
        }
        walking = !stop;
    }
    candidates
        .into_iter()
        .filter(|c| c.offset < min_target)
        .filter(|c| !need_return_address_on_top || c.stack_delta == 0)
        .find(|c| c.emulated)
        .unwrap_or(AttachPoint {
            offset: 0,
            stack_delta: 0,
            emulated: first_emulated,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(code: &[u8], args: usize, ret: bool) -> (u64, u64, bool) {
        pick_at(code, 0x40_1000, args, ret)
    }

    fn pick_at(code: &[u8], addr: u64, args: usize, ret: bool) -> (u64, u64, bool) {
        let p = choose_attach_point(code, addr, args, ret);
        (p.offset, p.stack_delta, p.emulated)
    }

    // Hand-assembled from glibc on this machine (objdump -d -M intel).
    // push r12; push rbp; push rbx; mov rbx,rdi; sub rsp,0x10
    const MALLOC: &[u8] = &[
        0x41, 0x54, 0x55, 0x53, 0x48, 0x89, 0xfb, 0x48, 0x83, 0xec, 0x10,
    ];
    // test rdi,rdi; je +0xbf; push rbp; lea rsi,[rdi-0x10]
    const FREE: &[u8] = &[
        0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55, 0x48, 0x8d, 0x77, 0xf0,
    ];
    // cmp byte [rip+0x140201],0; push r12; mov r12,rdx; push rbp; mov rbp,rdi; push rbx;
    // mov rbx,rsi; je +0x5a
    const POSIX_MEMALIGN: &[u8] = &[
        0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00, 0x41, 0x54, 0x49, 0x89, 0xd4, 0x55, 0x48, 0x89,
        0xfd, 0x53, 0x48, 0x89, 0xf3, 0x74, 0x5a,
    ];
    // mov rax,rsi; mul rdx; mov rsi,rax; jo +5; jmp realloc@plt
    const REALLOCARRAY: &[u8] = &[
        0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05, 0xe9, 0x40, 0xb8, 0xf8,
        0xff,
    ];
    const ENDBR: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

    #[test]
    fn glibc_prologues() {
        assert_eq!(pick(MALLOC, 1, false), (0, 0, true));
        assert_eq!(pick(MALLOC, 1, true), (0, 0, true));
        assert_eq!(pick(FREE, 1, true), (3, 0, true));
        assert_eq!(pick(POSIX_MEMALIGN, 3, true), (7, 0, true));
        assert_eq!(pick(REALLOCARRAY, 3, false), (0, 0, false));
        // Only ptr needed: `mul rdx`/`mov rsi,rax` are fine, `jo` at 9 is emulated.
        assert_eq!(pick(REALLOCARRAY, 1, false), (9, 0, true));
    }

    #[test]
    fn endbr64_prologues() {
        assert_eq!(
            pick(&[&ENDBR[..], &[0x55, 0x48, 0x89, 0xe5]].concat(), 6, true),
            (4, 0, true)
        );
        let sub = [&ENDBR[..], &[0x48, 0x83, 0xec, 0x18, 0x53]].concat(); // sub rsp,0x18; push rbx
        assert_eq!(pick(&sub, 6, false), (8, 0x18, true));
        assert_eq!(pick(&sub, 6, true), (0, 0, false));
        let add = [&ENDBR[..], &[0x48, 0x83, 0xc4, 0x80, 0x41, 0x54]].concat(); // add rsp,-0x80; push r12
        assert_eq!(pick(&add, 6, false), (8, 0x80, true));
        let nops = [&ENDBR[..], &[0x66, 0x0f, 0x1f, 0x44, 0, 0, 0x55]].concat(); // nopw; push rbp
        assert_eq!(pick(&nops, 6, true), (4, 0, true));
        let push_sub_push = [0x55, 0x48, 0x81, 0xec, 0x00, 0x01, 0x00, 0x00, 0x53]; // sub rsp,0x100
        assert_eq!(pick(&push_sub_push, 1, false), (0, 0, true));
    }

    #[test]
    fn stops_on_arg_write_rsp_write_and_length() {
        let mov_edi = [0xbf, 0x05, 0, 0, 0, 0x53]; // mov edi,5; push rbx
        assert_eq!(pick(&mov_edi, 1, false), (0, 0, false));
        assert_eq!(pick(&mov_edi, 0, false), (5, 0, true));
        let mov_dil = [0x40, 0xb7, 0x01, 0x53]; // mov dil,1; push rbx
        assert_eq!(pick(&mov_dil, 1, false), (0, 0, false));
        let deref = [0x48, 0x8b, 0x3f, 0x55]; // mov rdi,[rdi]; push rbp
        assert_eq!(pick(&deref, 1, false), (0, 0, false));
        let and_rsp = [&ENDBR[..], &[0x48, 0x83, 0xe4, 0xf0, 0x55]].concat(); // and rsp,-16; push rbp
        assert_eq!(pick(&and_rsp, 1, false), (0, 0, false));
        let movs = |n: usize| [[0x48, 0x89, 0xc0].repeat(n), vec![0x55]].concat(); // mov rax,rax
        assert_eq!(pick(&movs(15), 6, true), (45, 0, true));
        assert_eq!(pick(&movs(16), 6, true), (0, 0, false));
        let ret_first = [0xc3, 0x55]; // ret; push rbp
        assert_eq!(pick(&ret_first, 1, false), (0, 0, false));
    }

    #[test]
    fn branch_targets_inside_the_prologue() {
        // endbr64; nop; push rbp; mov rbp,rsp; ...; jmp back to the push at 5.
        let mut code = [
            &ENDBR[..],
            &[0x90, 0x55, 0x48, 0x89, 0xe5, 0x48, 0x85, 0xc0],
        ]
        .concat();
        code.extend([0xeb, (5i8 - (code.len() as i8 + 2)) as u8]);
        assert_eq!(pick(&code, 1, false), (4, 0, true));
        // Same without the nop: the only emulated candidate is a branch target.
        let mut code = [&ENDBR[..], &[0x55, 0x48, 0x89, 0xe5]].concat();
        code.extend([0x0f, 0x85]); // jne rel32 back to 4
        code.extend((4i32 - (code.len() as i32 + 4)).to_le_bytes());
        assert_eq!(pick(&code, 1, false), (0, 0, false));
    }

    #[test]
    fn odd_bytes_never_panic() {
        assert_eq!(pick(&[], 6, true), (0, 0, false));
        assert_eq!(pick(&[0x48], 6, true), (0, 0, false));
        assert_eq!(pick(&[0x0f, 0xff, 0x55], 6, true), (0, 0, false));
        assert!(!pick(&[0x66, 0xe9, 0, 0, 0, 0], 6, false).2); // 66-prefixed jmp
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 80)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let p = choose_attach_point(&bytes, x, len % 9, len % 2 == 0);
            assert!(p.offset < MAX_PROLOGUE && (p.offset == 0 || p.emulated));
        }
    }

    /// A test that cannot run on this machine: loud here, a failure under CI (where this
    /// machine kind's glibc is expected).
    fn skip(why: &str) {
        assert!(std::env::var_os("CI").is_none(), "required under CI: {why}");
        eprintln!("!!! SKIPPED real_libc_malloc_and_free: {why}");
    }

    #[test]
    fn real_libc_malloc_and_free() {
        use object::{Object, ObjectSection, ObjectSymbol};
        let path = "/lib/x86_64-linux-gnu/libc.so.6";
        let Ok(data) = std::fs::read(path) else {
            return skip(&format!("cannot read {path}"));
        };
        let file = object::File::parse(&*data).expect("parse libc");
        let func = |name: &str| {
            let sym = file
                .dynamic_symbols()
                .find(|s| s.is_definition() && s.name() == Ok(name))?;
            let size = if sym.size() == 0 { 64 } else { sym.size() };
            let bytes = file
                .sections()
                .find_map(|s| s.data_range(sym.address(), size).ok()?)?;
            Some((bytes, sym.address()))
        };
        let (Some((malloc, m_addr)), Some((free, f_addr))) = (func("malloc"), func("free")) else {
            return skip(&format!("malloc/free not in {path}"));
        };
        if !free.starts_with(&[0x48, 0x85, 0xff]) || !malloc.starts_with(&[0x41, 0x54]) {
            return skip(&format!("{path} differs from the glibc this test knows"));
        }
        assert_eq!(pick_at(malloc, m_addr, 1, true), (0, 0, true));
        assert_eq!(pick_at(free, f_addr, 1, true), (3, 0, true));
    }
}
