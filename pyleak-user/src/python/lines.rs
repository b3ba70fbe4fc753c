//! Line-table decoders shared by the CPython versions: each version module says which
//! format its code objects carry ([`LineFormat`]), and [`line_for`] turns the position the
//! kernel captured into a line (docs/python-stacks.md, section 3).

/// Format of the line table, which also fixes the meaning of the captured `lasti`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// 3.8/3.9 `co_lnotab`: (u8 byte delta, i8 line delta) pairs; `lasti` is in bytes.
    Lnotab,
    /// 3.10 `co_linetable`: (u8 byte length, i8 line delta, −128 = no line) pairs;
    /// `lasti` is in code units.
    Linetable310,
    /// 3.11+ location table; `lasti` is instruction pointer − code object address.
    Locations,
}

/// The line of instruction position `lasti` as the kernel captured it, in a code object
/// whose first line is `first` and whose table is `table`:
///  - `Lnotab`: `lasti` is f_lasti in BYTES (co_lnotab pairs);
///  - `Linetable310`: `lasti` is f_lasti in CODE UNITS (co_linetable; multiply by 2);
///  - `Locations`: `lasti` is (instruction pointer − code object address) in bytes; the
///    bytecode starts at `code_adaptive`, so the address looked up is
///    `2*((lasti − adaptive)/2)`.
///
/// A negative position (f_lasti −1, or an instruction pointer before the bytecode) gives
/// `co_firstlineno`, as in CPython. An instruction without a line (or past the end of the
/// table) gives 0.
pub fn line_for(
    format: LineFormat,
    code_adaptive: u32,
    first: u32,
    table: &[u8],
    lasti: u32,
) -> u32 {
    let first = i64::from(first);
    let line = match format {
        LineFormat::Lnotab if (lasti as i32) >= 0 => lnotab_line(table, first, lasti.into()),
        LineFormat::Linetable310 if (lasti as i32) >= 0 => {
            linetable310_line(table, first, 2 * u64::from(lasti))
        }
        LineFormat::Locations => match lasti.checked_sub(code_adaptive) {
            Some(addr) => locations_line(table, first, u64::from(addr & !1)),
            None => first,
        },
        _ => first,
    };
    u32::try_from(line).unwrap_or(0)
}

/// 3.8/3.9 `PyCode_Addr2Line`: accumulate pairs until the address passes `target`.
fn lnotab_line(table: &[u8], first: i64, target: u64) -> i64 {
    let (mut line, mut addr) = (first, 0u64);
    for pair in table.chunks_exact(2) {
        addr += u64::from(pair[0]);
        if addr > target {
            break;
        }
        line += i64::from(pair[1] as i8);
    }
    line
}

/// 3.10 `_PyCode_CheckLineNumber`: the first range whose end is past `target`.
fn linetable310_line(table: &[u8], first: i64, target: u64) -> i64 {
    let (mut computed, mut end) = (first, 0u64);
    for pair in table.chunks_exact(2) {
        end += u64::from(pair[0]);
        let delta = pair[1] as i8;
        let line = if delta == -128 {
            -1
        } else {
            computed += i64::from(delta);
            computed
        };
        if target < end {
            return line;
        }
    }
    -1
}

/// 6-bit varint with continuation bit 0x40 (CPython `scan_varint`), bounded.
fn varint(table: &[u8], mut i: usize) -> u64 {
    let (mut val, mut shift) = (0u64, 0u32);
    while let Some(&b) = table.get(i) {
        val |= u64::from(b & 63) << shift;
        if b & 64 == 0 || shift >= 56 {
            break;
        }
        (i, shift) = (i + 1, shift + 6);
    }
    val
}

/// 3.11+ location table (`Objects/locations.md`): entry byte `1cccclll` covers `lll+1`
/// code units; code 15 = no line, 14/13 = signed varint delta, 10–12 = delta `code−10`.
fn locations_line(table: &[u8], first: i64, target: u64) -> i64 {
    let (mut computed, mut end, mut i) = (first, 0u64, 0usize);
    while let Some(&b) = table.get(i) {
        let code = (b >> 3) & 15;
        // Saturating: a garbage table's varints reach 2^62.
        computed = computed.saturating_add(match code {
            13 | 14 => {
                let v = varint(table, i + 1);
                let mag = (v >> 1) as i64;
                if v & 1 != 0 {
                    -mag
                } else {
                    mag
                }
            }
            10..=12 => i64::from(code - 10),
            _ => 0,
        });
        end += (u64::from(b & 7) + 1) * 2;
        if target < end {
            return if code == 15 { -1 } else { computed };
        }
        i += 1;
        while table.get(i).is_some_and(|&b| b & 0x80 == 0) {
            i += 1;
        }
    }
    -1
}

#[cfg(test)]
mod tests {
    use crate::python::{code::CodeInfo, versions};

    /// Checks each version's `line` on flattened (lasti, line) pairs, `co_firstlineno` 10.
    fn check(v: (u8, u8), table: &[u8], want: &[u32]) {
        let mut i = CodeInfo::default();
        (i.firstlineno, i.linetable) = (10, table.to_vec());
        let cp = versions::for_version(v).unwrap();
        let l = cp.code_layout();
        for p in want.chunks(2) {
            assert_eq!(cp.line(&l, &i, p[0]), p[1], "{v:?} lasti {}", p[0]);
        }
    }

    #[test]
    fn decoders() {
        // lnotab: [0,6) 10, [6,10) 11, (0,+127)(0,+3) → 143 up to 265 (255+1), 142, then 147.
        let t = [6, 1, 4, 2, 0, 127, 0, 3, 255, 0, 1, 0xff, 8, 5];
        check((3, 8), &t, &[0, 10, 5, 10, 6, 11, 9, 11, 10, 143]);
        check((3, 9), &t, &[265, 143, 266, 142, 274, 147, u32::MAX, 10]);
        // 3.10, lasti in code units: [0,6) 11, [6,10) no line, empty (12), [10,18) 14, end.
        let t = [6, 1, 4, 0x80, 0, 1, 8, 2];
        check((3, 10), &t, &[0, 11, 2, 11, 3, 0, 4, 0, 5, 14]);
        check((3, 10), &t, &[8, 14, 9, 0, u32::MAX, 10]);
        // 3.12, bytes from adaptive 192: short [0,4) 10; one-line +1 [4,6) 11; no-column −3
        // [6,12) 8; long +100 [12,14) 108; none [14,16); one-line +0 [16,20) 108; end.
        let mut t = vec![0x81, 5, 0xd8, 1, 2, 0xea, 7, 0xf0, 0x48, 3];
        t.extend([0, 0, 0, 0xf8, 0xd1, 0, 0]);
        check((3, 12), &t, &[0, 10, 190, 10, 191, 10, 192, 10, 195, 10]);
        check((3, 12), &t, &[196, 11, 197, 11, 198, 8, 203, 8, 204, 108]);
        check((3, 12), &t, &[206, 0, 208, 108, 211, 108, 212, 0]);
    }
}
