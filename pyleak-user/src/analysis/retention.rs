//! Allocator retention: pages malloc and pymalloc keep resident after the blocks on them
//! were freed. Not a leak (no live block holds them) and never a suspect; reported per
//! (process, mapping kind) with the stacks that faulted the pages in and what would give
//! them back.

use std::collections::HashMap;

use pyleak_common::Layer;

use super::{Facts, Retention, RetentionStack};
use crate::collect::{
    vm::{MappingKind, VmModel, PAGE},
    Snapshot,
};

/// Stacks listed per retention entry.
const STACKS_SHOWN: usize = 3;

/// What gives a kind's retained pages back (glibc's `malloc/malloc.c`, `malloc/arena.c`;
/// CPython's `Objects/obmalloc.c`), or `None` for kinds no allocator keeps.
fn gives_back(kind: MappingKind) -> Option<&'static str> {
    Some(match kind {
        MappingKind::MallocHeap => {
            "malloc_trim(0) (free pages inside the heap are kept; the break shrinks only from the top, past M_TRIM_THRESHOLD)"
        }
        MappingKind::MallocArena => {
            "malloc_trim(0) (every arena), MALLOC_ARENA_MAX=2 (fewer thread arenas), or fewer survivors at each heap's top"
        }
        MappingKind::MallocMmap => "nothing to do: malloc unmaps a big block when it is freed",
        MappingKind::PymallocArena => {
            "fewer long-lived survivors among short-lived objects: pymalloc frees an arena only when every block in it is free"
        }
        MappingKind::File | MappingKind::Stack | MappingKind::Anonymous => return None,
    })
}

/// Every (pid, kind) of allocator memory with pages faulted in while tracing and still
/// resident: resident bytes, the bytes live blocks lie on (`snap.used_on_pages`; for
/// pymalloc arenas under sampled tracing, the samples over their inclusion chance), what
/// no live block accounts for, and who faulted the pages in. Most retained first. Kinds
/// whose allocator is not probed (`snap.traced`) are left out: their use is unknown.
pub fn retention(snap: &Snapshot, model: &VmModel, facts: &Facts) -> Vec<Retention> {
    // (pid, kind) -> (resident, used, pages by stack).
    type Acc = (u64, u64, HashMap<u64, u64>);
    let mut acc: HashMap<(u32, MappingKind), Acc> = HashMap::new();
    for (&pid, p) in &model.procs {
        for (&addr, page) in &p.pages {
            let kind = match p.region_at(addr) {
                Some(r) => r.kind(),
                None => match facts.page_kinds.get(&(pid, addr)) {
                    Some(&k) => k,
                    None => continue,
                },
            };
            if gives_back(kind).is_none() {
                continue;
            }
            // Which blocks use a page is known only when their allocator is probed:
            // without it every page would read as retained.
            let owner = if kind == MappingKind::PymallocArena {
                Layer::Pymalloc
            } else {
                Layer::Libc
            };
            if !snap.traced.contains(owner) {
                continue;
            }
            let a = acc.entry((pid, kind)).or_default();
            a.0 += PAGE;
            a.1 += snap
                .used_on_pages
                .get(&(pid, addr))
                .copied()
                .unwrap_or(0)
                .min(PAGE);
            *a.2.entry(page.stack_id).or_default() += PAGE;
        }
    }
    let mut out: Vec<Retention> = acc
        .into_iter()
        .map(|((pid, kind), (resident, used, by_stack))| {
            let (used, estimated) = match (&snap.sampled, kind) {
                (Some(sp), MappingKind::PymallocArena) => {
                    let inclusion = sp.duty.get(&pid).copied().unwrap_or(1.0).max(1e-6);
                    (((used as f64 / inclusion) as u64).min(resident), true)
                }
                _ => (used, false),
            };
            let mut stacks: Vec<RetentionStack> = merge_by_frames(pid, by_stack, facts);
            stacks.sort_by(|a, b| {
                b.resident_bytes
                    .cmp(&a.resident_bytes)
                    .then(a.frames.cmp(&b.frames))
            });
            stacks.truncate(STACKS_SHOWN);
            Retention {
                pid,
                kind: kind.name().to_owned(),
                resident_bytes: resident,
                used_bytes: used,
                used_estimated: estimated,
                retained_bytes: resident - used,
                stacks,
                gives_back: gives_back(kind).unwrap_or_default().to_owned(),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.retained_bytes
            .cmp(&a.retained_bytes)
            .then(a.pid.cmp(&b.pid))
            .then(a.kind.cmp(&b.kind))
    });
    out
}

/// Pages by stack id → by the frames shown (stacks differing only in hidden frames merge).
fn merge_by_frames(pid: u32, by_stack: HashMap<u64, u64>, facts: &Facts) -> Vec<RetentionStack> {
    let mut by_frames: HashMap<Vec<String>, (usize, u64)> = HashMap::new();
    for (id, bytes) in by_stack {
        let f = facts.frames_of(pid, id);
        by_frames.entry(f.names).or_insert((f.native, 0)).1 += bytes;
    }
    by_frames
        .into_iter()
        .map(|(frames, (native_frames, resident_bytes))| RetentionStack {
            frames,
            native_frames,
            resident_bytes,
        })
        .collect()
}
