//! Which CPython a file holds, read from the file itself, never from its name:
//! `Py_Version` on 3.11+ (the `PY_VERSION_HEX` constant), else the `PY_VERSION` string
//! (`"3.8.18"`) that `Py_GetVersion` formats into `sys.version` (every version).

use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};
use object::{Object, ObjectSection, ObjectSymbol};

use super::versions::PyVersion;

/// Instructions of `Py_GetVersion` looked at (it is a dozen or two long).
const MAX_INSTRUCTIONS: usize = 64;
/// Longest version string read (`3.13.0rc2+` and the like are far shorter).
const MAX_RELEASE_LEN: usize = 32;

/// The CPython (major, minor) compiled into `obj`.
pub fn version_of(obj: &object::File<'_>) -> Option<PyVersion> {
    version_hex(obj).or_else(|| release_string(obj).as_deref().and_then(parse_release))
}

/// A symbol defined in `obj`, looked up in the dynamic table first.
pub fn defined<'d, 'f>(obj: &'f object::File<'d>, name: &str) -> Option<object::Symbol<'d, 'f>> {
    obj.dynamic_symbols()
        .chain(obj.symbols())
        .find(|s| s.is_definition() && s.name() == Ok(name))
}

/// `Py_Version` (3.11+): `PY_VERSION_HEX`, `0xMMmmPPLS`.
fn version_hex(obj: &object::File<'_>) -> Option<PyVersion> {
    let hex = u32::from_le_bytes(
        bytes_at(obj, defined(obj, "Py_Version")?.address(), 4)?
            .try_into()
            .ok()?,
    );
    Some(((hex >> 24) as u8, (hex >> 16) as u8))
}

/// The `PY_VERSION` string, e.g. `3.8.18`. `Py_GetVersion` passes it to
/// `snprintf("%.80s (%.80s) %.80s", …)`; the linker may have merged it into the tail of
/// a longer string (pyenv's `…/versions/3.8.18`), so no scan of `.rodata` for `"3.X.Y ("`
/// finds it in the file: it is found through the code that uses it, as the first address
/// `Py_GetVersion` loads (a RIP-relative `lea`, or an immediate in a fixed-address
/// executable) that holds a version string.
pub fn release_string(obj: &object::File<'_>) -> Option<String> {
    let f = defined(obj, "Py_GetVersion")?;
    let len = if f.size() > 0 { f.size().min(512) } else { 128 };
    let code = bytes_at(obj, f.address(), len as usize)?;
    let decoder = Decoder::with_ip(64, code, f.address(), DecoderOptions::NONE);
    for instr in decoder.into_iter().take(MAX_INSTRUCTIONS) {
        if instr.is_invalid() {
            break;
        }
        for op in 0..instr.op_count() {
            let addr = match instr.op_kind(op) {
                OpKind::Memory if instr.is_ip_rel_memory_operand() => instr.ip_rel_memory_address(),
                OpKind::Immediate32 | OpKind::Immediate32to64 => instr.immediate(op),
                _ => continue,
            };
            let Some(s) = c_string_at(obj, addr) else {
                continue;
            };
            // A format folded with the constant would read "3.11.2 (%.80s) %.80s".
            let release = s.split(' ').next().unwrap_or_default();
            if parse_release(release).is_some() {
                return Some(release.to_owned());
            }
        }
        if instr.flow_control() == FlowControl::Return {
            break;
        }
    }
    None
}

/// `3.8.18`, `3.13.0rc2`, `3.12.1+` → (3, 8), (3, 13), (3, 12): three numbers, then
/// nothing or a pre-release / local-build suffix.
pub fn parse_release(s: &str) -> Option<PyVersion> {
    let mut parts = s.splitn(3, '.');
    let major: u8 = parts.next()?.parse().ok()?;
    let minor: u8 = parts.next()?.parse().ok()?;
    let rest = parts.next()?;
    let micro_len = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let suffix = &rest[micro_len..];
    let suffix_ok = suffix.is_empty()
        || ["a", "b", "rc", "+"].iter().any(|p| suffix.starts_with(p))
            && suffix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+');
    (major >= 2 && micro_len > 0 && suffix_ok).then_some((major, minor))
}

/// `len` bytes of the file's image at link-time address `addr` (not in `.bss`).
pub fn bytes_at<'d>(obj: &object::File<'d>, addr: u64, len: usize) -> Option<&'d [u8]> {
    let sec = obj
        .sections()
        .find(|s| s.address() <= addr && addr - s.address() < s.size())?;
    let data = sec.data().ok()?;
    let off = usize::try_from(addr - sec.address()).ok()?;
    data.get(off..off.checked_add(len)?)
}

/// The printable NUL-terminated string at `addr`, if short.
fn c_string_at(obj: &object::File<'_>, addr: u64) -> Option<String> {
    let sec = obj
        .sections()
        .find(|s| s.address() <= addr && addr - s.address() < s.size())?;
    let data = sec.data().ok()?;
    let tail = data.get(usize::try_from(addr - sec.address()).ok()?..)?;
    let end = tail
        .iter()
        .take(MAX_RELEASE_LEN + 1)
        .position(|&b| b == 0)?;
    let s = &tail[..end];
    (s.iter().all(|b| b.is_ascii_graphic() || *b == b' '))
        .then(|| String::from_utf8_lossy(s).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::{detect_via, version_name, versions, Detected};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    #[test]
    fn releases_parse() {
        assert_eq!(parse_release("3.8.18"), Some((3, 8)));
        assert_eq!(parse_release("3.13.0rc2"), Some((3, 13)));
        assert_eq!(parse_release("3.12.1+"), Some((3, 12)));
        assert_eq!(parse_release("3.14.0a7"), Some((3, 14)));
        assert_eq!(parse_release("2.7.18"), Some((2, 7)));
        for bad in [
            "3.8", "3.8.", "x3.8.1", "3.8.1 x", "1.2.3", "3.8.1-2", "%.80s", "",
        ] {
            assert_eq!(parse_release(bad), None, "{bad}");
        }
    }

    /// A CPython on this machine: the file holding its runtime, and its interpreter.
    struct Install {
        runtime: PathBuf,
        python: PathBuf,
    }

    fn pyenv(release: &str, lib: &str) -> Install {
        let root = Command::new("pyenv").arg("root").output();
        let root = root.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let dir = PathBuf::from(format!("{}/versions/{release}", root.unwrap_or_default()));
        Install {
            runtime: dir.join("lib").join(lib),
            python: dir.join("bin/python"),
        }
    }

    /// Whether `i` is installed; when not, says so loudly (and fails under CI).
    fn present(i: &Install) -> bool {
        if i.runtime.exists() && i.python.exists() {
            return true;
        }
        let what = i.runtime.display();
        // Every CPython listed is expected on this machine kind: CI fails without it.
        assert!(
            std::env::var_os("CI").is_none(),
            "required under CI: {what}"
        );
        eprintln!("!!!!!!!! NOT RUN: {what} is not installed on this machine !!!!!!!!");
        false
    }

    /// `sys.version`'s first word, as the interpreter itself says it.
    fn interpreter_release(python: &Path) -> String {
        let out = Command::new(python)
            .args(["-c", "import sys; print(sys.version.split()[0])"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", python.display());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn check(i: Install) {
        if !present(&i) {
            return;
        }
        let data = std::fs::read(&i.runtime).unwrap();
        let obj = object::File::parse(&*data).unwrap();
        let want = interpreter_release(&i.python);
        // The string is read on every version, Py_Version checked too where there is one.
        assert_eq!(
            release_string(&obj).as_deref(),
            Some(want.as_str()),
            "{}",
            i.runtime.display()
        );
        let want_version = parse_release(&want).unwrap();
        if let Some(hex) = version_hex(&obj) {
            assert_eq!(hex, want_version, "Py_Version of {}", i.runtime.display());
            assert!(want_version >= (3, 11), "Py_Version appeared in 3.11");
        }
        // Detection sees what the interpreter says, under any file name.
        let misnamed = Path::new("/nowhere/libpython3.99.so.1.0");
        let (found, supported) = match detect_via(misnamed, &i.runtime).expect("a runtime") {
            Detected::Supported(rt) => (version_name(rt.cpython.version()), true),
            Detected::Unsupported { version, .. } => (version, false),
        };
        assert_eq!(found, version_name(want_version), "{}", i.runtime.display());
        assert_eq!(supported, versions::for_version(want_version).is_some());
        eprintln!("{}: {want} OK", i.runtime.display());
    }

    macro_rules! installed {
        ($($name:ident: $install:expr;)*) => {$(
            #[test]
            fn $name() {
                check($install);
            }
        )*};
    }

    installed! {
        detect_2_7_18: pyenv("2.7.18", "libpython2.7.so.1.0");
        detect_3_6_15: pyenv("3.6.15", "libpython3.6m.so.1.0");
        detect_3_7_16: pyenv("3.7.16", "libpython3.7m.so.1.0");
        detect_3_8_18: pyenv("3.8.18", "libpython3.8.so.1.0");
        detect_3_9_18: pyenv("3.9.18", "libpython3.9.so.1.0");
        detect_3_10_13: pyenv("3.10.13", "libpython3.10.so.1.0");
        detect_3_11_7: pyenv("3.11.7", "libpython3.11.so.1.0");
        detect_3_12_1: pyenv("3.12.1", "libpython3.12.so.1.0");
        detect_3_13_0: pyenv("3.13.0", "libpython3.13.so.1.0");
        detect_debian_3_11_2: Install {
            runtime: PathBuf::from("/usr/bin/python3.11"),
            python: PathBuf::from("/usr/bin/python3.11"),
        };
    }
}
