//! Copy-on-write after fork (`collect::cow`): per forked child, the pages it copied from
//! its parent by writing to them, and the stacks that wrote them. Never suspects: a copy
//! is made once per page, not by live objects growing.

use std::collections::HashMap;

use super::{CopyOnWrite, CowStack, Facts};
use crate::collect::vm::{VmModel, PAGE};

/// Stacks listed per child.
const STACKS_SHOWN: usize = 5;

/// Every child with copy-on-write breaks, most bytes first.
pub fn copy_on_write(model: &VmModel, facts: &Facts) -> Vec<CopyOnWrite> {
    let mut by_pid: HashMap<u32, HashMap<Vec<String>, (usize, u64)>> = HashMap::new();
    for (&(pid, stack_id), &pages) in &model.cow_stacks {
        let f = facts.frames_of(pid, stack_id);
        by_pid
            .entry(pid)
            .or_default()
            .entry(f.names)
            .or_insert((f.native, 0))
            .1 += pages;
    }
    let mut out: Vec<CopyOnWrite> = by_pid
        .into_iter()
        .map(|(pid, by_frames)| {
            let pages: u64 = by_frames.values().map(|v| v.1).sum();
            let mut stacks: Vec<CowStack> = by_frames
                .into_iter()
                .map(|(frames, (native_frames, pages))| CowStack {
                    frames,
                    native_frames,
                    bytes: pages * PAGE,
                    pages,
                })
                .collect();
            stacks.sort_by(|a, b| b.pages.cmp(&a.pages).then(a.frames.cmp(&b.frames)));
            stacks.truncate(STACKS_SHOWN);
            let live = model
                .procs
                .get(&pid)
                .map_or(0, |p| p.inherited.copied.len() as u64);
            CopyOnWrite {
                pid,
                parent: facts
                    .processes
                    .get(&pid)
                    .and_then(|p| p.followed.as_ref())
                    .map(|f| f.parent),
                bytes: pages * PAGE,
                pages,
                live_bytes: live * PAGE,
                stacks,
            }
        })
        .collect();
    out.sort_by(|a, b| b.pages.cmp(&a.pages).then(a.pid.cmp(&b.pid)));
    out
}
