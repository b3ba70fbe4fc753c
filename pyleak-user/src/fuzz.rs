//! Entry points for the fuzz targets (`fuzz/fuzz_targets/*.rs`, run by `cargo fuzz`):
//! each feeds bytes pyleak does not control to the parsers that read them, the way pyleak
//! itself calls them. A panic here is a bug: hostile input must give a one-line error or
//! nothing, never take pyleak down. Not an API: the names and shapes change with the
//! parsers.

use std::path::Path;

use pyleak_common::Layer;

use crate::{
    analysis::Analysis,
    attach::{self, elf::ElfFile, prologue, tables},
    host,
    python::{self, code, lines::LineFormat, versions},
    report::{self, drawn::LayerChoice, Metric, OutputFormat, Render},
};

/// `/proc/PID/maps`, `/proc/PID/stat` and `/proc/self/status` text, and the lockdown file.
pub fn proc_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for m in crate::proctext::maps(&text) {
        assert!(m.start <= m.end);
        let _ = (m.exec(), m.is_file(), m.deleted());
    }
    if let Some(s) = crate::proctext::Stat::parse(&text) {
        let _ = (s.is_zombie(), s.is_kernel_thread());
    }
    if let Some(caps) = host::effective_caps(&text) {
        let _ = host::missing_caps(caps);
    }
    let _ = host::lockdown_mode(&text);
    if let (Some(v), Some(mode)) = (host::kernel_version(&text), host::seccomp_mode(&text)) {
        let _ = host::uretprobe_kills(v, mode);
    }
}

/// An ELF file: symbols and their code, `DT_NEEDED`, the allocator tables and the inlined
/// allocator copies found through them, every probe planned for it as libc and as
/// libpython, the Python runtime and its version, and native symbols.
pub fn elf(data: &[u8]) {
    // Named so that every planner looks at it (libc, libpython).
    let Ok(elf) = ElfFile::from_bytes(Path::new("/fuzz/libpython3.12.so.1.0"), data.to_vec())
    else {
        return;
    };
    let _ = elf.needed();
    for (name, _, _) in attach::LIBC_FUNCTIONS {
        if let Some(f) = elf.function(name) {
            let _ = elf.function_at(f.address);
        }
    }
    let _ = attach::plan_layer(&elf, Layer::Libc, &attach::LIBC_FUNCTIONS);
    let _ = attach::plan_python_domain(
        &elf,
        Layer::Pymalloc,
        &[tables::Domain::Obj, tables::Domain::Mem],
        &attach::PYMALLOC_TABLE_FUNCTIONS,
        &attach::PYMALLOC_FUNCTIONS,
    );
    let _ = attach::plan_python_domain(
        &elf,
        Layer::PymemRaw,
        &[tables::Domain::Raw],
        &attach::PYMEM_RAW_TABLE_FUNCTIONS,
        &attach::PYMEM_RAW_FUNCTIONS,
    );
    let _ = attach::plan_finalize(&elf);
    let _ = attach::plan_py_init(&elf);
    let _ = python::detect_in(Path::new("/fuzz/libpython3.12.so.1.0"), data);
    crate::symbolize::fuzz_module(data);
}

/// The prologue decoder on random code: the first byte picks the argument count and
/// whether a return probe shares the point, the rest is the function's bytes.
pub fn prologue(data: &[u8]) {
    let Some((&head, code)) = data.split_first() else {
        return;
    };
    let args = usize::from(head & 7);
    let ret = head & 8 != 0;
    let p = prologue::choose_attach_point(code, 0x40_1000, args, ret);
    assert!(
        p.offset as usize <= code.len().max(1),
        "{p:?} in {} bytes",
        code.len()
    );
}

/// A target's memory holding random bytes where code objects and line tables should be:
/// `data` is mapped at [`MEMORY_BASE`]; the first 8 bytes give the code object's offset in
/// it and `lasti`, then every CPython version's layout reads it.
pub fn python_code(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let at = u64::from(u32::from_le_bytes(data[..4].try_into().unwrap_or_default()));
    let lasti = u32::from_le_bytes(data[4..8].try_into().unwrap_or_default());
    let mem = FakeMemory(data);
    for minor in 8..=14 {
        let Some(cpython) = versions::for_version((3, minor)) else {
            continue;
        };
        let layout = cpython.code_layout();
        let addr = MEMORY_BASE + at % (data.len() as u64);
        let _ = code::read_identity(&mem, &layout, addr);
        if let Some(info) = code::read_code(&mem, &layout, addr) {
            let _ = cpython.line(&layout, &info, lasti);
        }
    }
    // The decoders alone, on the bytes as a table.
    for format in [
        LineFormat::Lnotab,
        LineFormat::Linetable310,
        LineFormat::Locations,
    ] {
        let _ = python::lines::line_for(format, lasti >> 16, lasti & 0xffff, &data[8..], lasti);
    }
}

/// Where [`python_code`]'s bytes sit in the fake address space.
pub const MEMORY_BASE: u64 = 0x7f00_0000_0000;

/// A target's memory: `self.0` at [`MEMORY_BASE`], nothing elsewhere.
struct FakeMemory<'a>(&'a [u8]);

impl code::Memory for FakeMemory<'_> {
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let start = usize::try_from(addr.checked_sub(MEMORY_BASE)?).ok()?;
        self.0
            .get(start..start.checked_add(len)?)
            .map(<[u8]>::to_vec)
    }
}

/// A saved JSON report given to `pyleak report`: parsed, then written in every format
/// with every drawing choice.
pub fn report(data: &[u8]) {
    let Ok(analysis) = serde_json::from_slice::<Analysis>(data) else {
        return;
    };
    for format in [
        OutputFormat::Text,
        OutputFormat::Json,
        OutputFormat::Folded,
        OutputFormat::Svg,
        OutputFormat::Pprof,
        OutputFormat::Speedscope,
    ] {
        for (metric, layer, per_process) in [
            (Metric::LiveBytes, None, false),
            (Metric::Resident, Some("all"), true),
            (Metric::Allocs, Some("libc"), false),
        ] {
            let Ok(layer) = LayerChoice::parse(layer) else {
                continue;
            };
            let render = Render {
                metric,
                layer,
                per_process,
            };
            let _ = report::write(&analysis, format, &render, &mut std::io::sink());
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every input in the fuzz corpora (seeds and the inputs that once made pyleak panic,
    /// `regression-*`) goes through its target on every `cargo test`, without libFuzzer.
    #[test]
    fn the_fuzz_corpora_pass() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        type Entry = fn(&[u8]);
        let targets: [(&str, Entry); 5] = [
            ("proc_text", super::proc_text),
            ("elf", super::elf),
            ("prologue", super::prologue),
            ("python_code", super::python_code),
            ("report", super::report),
        ];
        for (name, run) in targets {
            let dir = corpus.join(name);
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).expect("the fuzz corpus") {
                let path = entry.unwrap().path();
                run(&std::fs::read(&path).unwrap());
                n += 1;
            }
            assert!(n >= 2, "{}: {n} inputs", dir.display());
        }
    }
}
