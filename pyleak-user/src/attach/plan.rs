//! Which probes a process needs: per file it maps, its libc functions, its Python
//! allocator functions and interpreter shutdown, planned once per file.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use pyleak_common::{Layer, CALL_LAYERS};

use super::{
    as_process_names, elf::ElfFile, is_libc, is_malloc_replacement, may_hold_python,
    plan_code_dealloc, plan_finalize, plan_layer, plan_python_domain, reuse, tables::Domain,
    ProbeSpec, LIBC_FUNCTIONS, PYMALLOC_FUNCTIONS, PYMALLOC_TABLE_FUNCTIONS, PYMEM_RAW_FUNCTIONS,
    PYMEM_RAW_TABLE_FUNCTIONS,
};
use crate::layers::LayerSet;

/// How the probes of one uprobed layer are found in a file.
pub struct LayerProbes {
    /// The layer.
    pub layer: Layer,
    /// Whether a file, by its name, can hold the layer's functions.
    pub recognise: fn(&Path) -> bool,
    /// The layer's probes in a file (none where its functions are missing).
    pub plan: fn(&ElfFile) -> Vec<ProbeSpec>,
}

/// The probe table of every uprobed layer of the registry (`pyleak_common::LAYERS`), in its
/// order: [`plan_file`] reads it. A new allocator layer adds its entry here.
pub const LAYER_PROBES: [LayerProbes; CALL_LAYERS] = [
    LayerProbes {
        layer: Layer::Pymalloc,
        recognise: may_hold_python,
        plan: |elf| {
            let mut probes = plan_python_domain(
                elf,
                Layer::Pymalloc,
                &[Domain::Obj, Domain::Mem],
                &PYMALLOC_TABLE_FUNCTIONS,
                &PYMALLOC_FUNCTIONS,
            );
            // Free-list hand-overs: a block taken again by another stack.
            probes.extend(reuse::plan_reuse(elf));
            probes
        },
    },
    LayerProbes {
        layer: Layer::PymemRaw,
        recognise: may_hold_python,
        plan: |elf| {
            plan_python_domain(
                elf,
                Layer::PymemRaw,
                &[Domain::Raw],
                &PYMEM_RAW_TABLE_FUNCTIONS,
                &PYMEM_RAW_FUNCTIONS,
            )
        },
    },
    LayerProbes {
        layer: Layer::Libc,
        recognise: |f| is_libc(f) || is_malloc_replacement(f),
        plan: |elf| plan_layer(elf, Layer::Libc, &LIBC_FUNCTIONS),
    },
];

/// Plans probes per file, once per distinct file (device and inode): processes name the
/// same file their own way (`/proc/PID/root/…`, a symlink), and a file is probed once
/// per process however many names it has.
pub struct Planner {
    layers: LayerSet,
    cache: HashMap<(u64, u64), Vec<ProbeSpec>>,
}

impl Planner {
    /// A planner for `layers`.
    pub fn new(layers: LayerSet) -> Planner {
        Planner {
            layers,
            cache: HashMap::new(),
        }
    }

    /// Probes for the files a process maps (or will map), each named as given.
    pub fn plan(&mut self, files: &[PathBuf]) -> Vec<ProbeSpec> {
        self.plan_keyed(files).0
    }

    /// [`Planner::plan`], and the device and inode of each distinct file planned (a file
    /// that cannot be read is left out).
    pub fn plan_keyed(&mut self, files: &[PathBuf]) -> (Vec<ProbeSpec>, Vec<(u64, u64)>) {
        let mut out = Vec::new();
        let mut keys = Vec::new();
        for f in files {
            let Some(key) = file_key(f) else { continue };
            if keys.contains(&key) {
                continue;
            }
            keys.push(key);
            let layers = self.layers;
            let probes = self
                .cache
                .entry(key)
                .or_insert_with(|| plan_file(layers, f, f));
            out.extend(probes.iter().map(|p| ProbeSpec {
                path: f.clone(),
                ..p.clone()
            }));
        }
        (out, keys)
    }
}

/// A file's device and inode (what a uprobe is placed on), if it can be read.
pub fn file_key(f: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(f).ok().map(|m| (m.dev(), m.ino()))
}

/// Probes for one file (named `file`, read through `via`): its libc functions, its
/// Python allocator functions and interpreter shutdown.
pub fn plan_file(layers: LayerSet, file: &Path, via: &Path) -> Vec<ProbeSpec> {
    let Ok(elf) = ElfFile::open(via) else {
        return Vec::new();
    };
    let mut probes = Vec::new();
    if may_hold_python(file) {
        probes.extend(plan_finalize(&elf));
        probes.extend(plan_code_dealloc(&elf));
    }
    for l in &LAYER_PROBES {
        if layers.contains(l.layer) && (l.recognise)(file) {
            probes.extend((l.plan)(&elf));
        }
    }
    probes
}

/// Says once what will not be seen.
pub fn warn_missing(probes: &[ProbeSpec], layers: LayerSet, what: &str, files: &[PathBuf]) {
    if let Some(w) = missing_libc(probes, layers, what, files) {
        eprintln!("pyleak: warning: {w}");
    }
}

/// Why the libc layer will see nothing of `what` (mapping `files`, given `probes`), if it
/// will not: a C library without the malloc family in its symbols, or none at all (a
/// statically linked program).
pub fn missing_libc(
    probes: &[ProbeSpec],
    layers: LayerSet,
    what: &str,
    files: &[PathBuf],
) -> Option<String> {
    if !layers.contains(Layer::Libc) || probes.iter().any(|p| p.symbol == "malloc") {
        return None;
    }
    Some(match files.iter().find(|f| is_libc(f) || is_malloc_replacement(f)) {
        Some(libc) => format!(
            "{what}: its C library {} has no malloc in its symbols (.dynsym, .symtab): the libc layer sees nothing; its vm and pages layers still count its memory",
            as_process_names(libc)
        ),
        None => format!(
            "{what} maps no shared C library (statically linked): the libc layer sees nothing; its vm and pages layers still count its memory"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_uprobed_layer_of_the_registry_has_its_probe_table_in_order() {
        let listed: Vec<Layer> = LAYER_PROBES.iter().map(|l| l.layer).collect();
        assert_eq!(listed, Layer::UPROBED);
        for l in &LAYER_PROBES {
            assert!(l.layer.is_uprobed(), "{:?}", l.layer);
        }
    }

    #[test]
    fn why_the_libc_layer_sees_nothing() {
        let layers = LayerSet::ALL;
        let fake = [PathBuf::from("/proc/7/root/opt/fake/libc.so.6")];
        assert_eq!(
            missing_libc(&[], layers, "process 7", &fake).unwrap(),
            "process 7: its C library /opt/fake/libc.so.6 has no malloc in its symbols (.dynsym, .symtab): the libc layer sees nothing; its vm and pages layers still count its memory"
        );
        assert!(missing_libc(&[], layers, "./static", &[])
            .unwrap()
            .contains("statically linked"));
        assert_eq!(
            missing_libc(&[], LayerSet::parse("vm").unwrap(), "x", &[]),
            None
        );
    }
}
