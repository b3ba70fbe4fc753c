//! Judging blocks of real CPython processes (no eBPF): `tests/workloads/py_heap_judge.py`
//! says which of its objects it keeps, drops, and which new objects took freed blocks;
//! every verdict must agree. A child of the same user can be read without root.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

use super::*;
use crate::python::versions::for_version;

/// The CPythons this machine kind has: (label, interpreter, minor version).
fn pythons() -> Vec<(&'static str, PathBuf, u8)> {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"));
    let mut all: Vec<(&str, PathBuf, u8)> = [
        ("3.8.18", 8),
        ("3.9.18", 9),
        ("3.10.13", 10),
        ("3.11.7", 11),
        ("3.12.1", 12),
        ("3.13.0", 13),
    ]
    .into_iter()
    .map(|(v, minor)| (v, root.join("versions").join(v).join("bin/python3"), minor))
    .collect();
    all.push(("debian 3.11", PathBuf::from("/usr/bin/python3.11"), 11));
    let mut found = Vec::new();
    for (label, path, minor) in all {
        if path.exists() {
            found.push((label, path, minor));
        } else {
            // As the integration tests do (tests/src/lib.rs): loud here, fatal under CI.
            let why = format!("CPython {label} is not installed ({})", path.display());
            assert!(std::env::var_os("CI").is_none(), "required under CI: {why}");
            eprintln!("\n!!! TEST NOT RUN FOR {why} !!!\n");
        }
    }
    found
}

fn workload(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/workloads")
        .join(name)
}

/// A running workload: the child, its stdout, and its lines up to a marker.
struct Target {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Target {
    fn start(python: &PathBuf, script: &str) -> Target {
        let mut child = Command::new(python)
            .arg("-S")
            .arg(workload(script))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting python");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Target { child, lines }
    }

    fn until(&mut self, marker: &str) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for line in self.lines.by_ref() {
            let line = line.expect("reading the workload");
            if line == marker {
                return out;
            }
            out.push(line.split_whitespace().map(str::to_owned).collect());
        }
        panic!("the workload ended before `{marker}`");
    }

    fn go(&mut self) {
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGUSR1) };
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn num(s: &str) -> u64 {
    s.parse().expect("a number")
}

/// The verdicts a sample may get, from what the workload did with it, and whether the
/// block was taken by something the workload cannot see (the interpreter's own objects):
/// then what is in the block now decides.
fn allowed(
    kept: bool,
    ty: &str,
    size: u64,
    new: Option<&(u64, String)>,
    now: Option<&str>,
) -> (&'static [&'static str], bool) {
    match (kept, new) {
        (true, _) => (&["live"], false),
        (false, Some((nsize, _))) if size_class(*nsize) != size_class(size) => {
            (&["reassigned"], false)
        }
        // A list's block taken by another list: nothing immutable tells them apart.
        (false, Some((_, nty))) if nty == ty && ty == "list" => (&["live"], false),
        (false, Some(_)) => (&["reused"], false),
        // Freed, or its pool emptied and re-carved for another class; or taken unseen by
        // another object (dead or alive; another list looks like the same one) or buffer.
        (false, None) => match now {
            Some("list") if ty == "list" => (&["freed", "reassigned", "live"], true),
            _ => (&["freed", "reassigned", "reused"], true),
        },
    }
}

fn coarse(v: Verdict) -> &'static str {
    match v {
        Verdict::Live => "live",
        Verdict::Freed(Freed::PoolReassigned) => "reassigned",
        Verdict::Freed(_) => "freed",
        Verdict::Reused => "reused",
        Verdict::Unknown(_) => "unknown",
    }
}

#[test]
fn real_processes_blocks_are_judged_exactly() {
    for (label, python, minor) in pythons() {
        let cpython = for_version((3, minor)).expect("known version");
        let mut t = Target::start(&python, "py_heap_judge.py");
        let samples = t.until("ready1");
        let blocks: Vec<(u64, u64)> = samples.iter().map(|f| (num(&f[2]), num(&f[3]))).collect();
        let mut heap = Heap::for_process(t.child.id(), cpython);
        let fps = heap.fingerprint(&blocks);
        // The object in each block is found where its type's pre-header puts it.
        for (f, fp) in samples.iter().zip(&fps) {
            let fp = fp
                .as_ref()
                .unwrap_or_else(|| panic!("{label}: {f:?} unreadable"));
            assert_eq!(
                fp.type_name.as_deref(),
                Some(f[4].as_str()),
                "{label}: {f:?}"
            );
        }
        t.go();
        let new: HashMap<u64, (u64, String)> = t
            .until("ready2")
            .into_iter()
            .map(|f| (num(&f[1]), (num(&f[2]), f[3].clone())))
            .collect();
        let samples_in: Vec<Sample> = blocks
            .iter()
            .zip(fps)
            .map(|(&(addr, size), fp)| Sample {
                addr,
                size,
                fingerprint: fp.expect("checked"),
            })
            .collect();
        let t0 = Instant::now();
        let verdicts = heap.judge(&samples_in);
        let took = t0.elapsed();
        let (mut wrong, mut unseen_reuse) = (Vec::new(), Vec::new());
        let mut tally: HashMap<(String, Verdict), u32> = HashMap::new();
        let now = heap.fingerprint(&blocks);
        for (((f, s), v), now) in samples.iter().zip(&samples_in).zip(&verdicts).zip(&now) {
            let now = now.as_ref().and_then(|n| n.type_name.clone());
            let new = new.get(&s.addr);
            let (want, unseen) = allowed(f[5] == "1", &f[4], s.size, new, now.as_deref());
            *tally.entry((f[1].clone(), *v)).or_default() += 1;
            if !want.contains(&coarse(*v)) {
                wrong.push(format!(
                    "{f:?}: want {want:?}, got {v:?}, new {new:?}, now {now:?}"
                ));
            } else if unseen && !["freed", "reassigned"].contains(&coarse(*v)) {
                unseen_reuse.push(format!("{f:?}: {v:?}, now {now:?}"));
            }
        }
        let mut tally: Vec<_> = tally.into_iter().collect();
        tally.sort_by_key(|((g, v), _)| (g.clone(), format!("{v:?}")));
        eprintln!(
            "{label}: {} samples judged in {took:?}, reads {:?}\n  {tally:?}",
            samples.len(),
            heap.stats()
        );
        assert!(
            wrong.is_empty(),
            "{label}: {} wrong:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
        // Blocks the interpreter took unseen: a few at most.
        eprintln!("  taken by the interpreter's own objects: {unseen_reuse:?}");
        assert!(unseen_reuse.len() <= samples.len() / 100, "{label}");
        // Every way of being freed and reused shows up.
        let seen = |p: fn(&Verdict) -> bool| verdicts.iter().any(p);
        assert!(seen(|v| *v == Verdict::Reused), "{label}");
        assert!(seen(|v| *v == Verdict::Freed(Freed::FreeList)), "{label}");
        assert!(seen(|v| *v == Verdict::Freed(Freed::DeadObject)), "{label}");
        let arena_gone = |v: &Verdict| *v == Verdict::Freed(Freed::ArenaUnmapped);
        assert!(seen(arena_gone), "{label}");
    }
}

/// The cost of judging 100k samples of a process holding a million objects (printed,
/// not asserted: a cost figure, not a timing test).
#[test]
fn cost_of_judging_100k_samples() {
    let Some((label, python, minor)) = pythons().into_iter().find(|p| p.2 == 12) else {
        return;
    };
    let mut t = Target::start(&python, "py_heap_cost.py");
    let samples = t.until("ready1");
    let blocks: Vec<(u64, u64)> = samples.iter().map(|f| (num(&f[0]), num(&f[1]))).collect();
    let mut heap = Heap::for_process(t.child.id(), for_version((3, minor)).expect("3.12"));
    // The reads alone, for comparison (merging neighbours into fewer, longer ranges did
    // not make them faster: the kernel's cost goes with the pages touched).
    let reqs: Vec<(u64, usize)> = blocks.iter().map(|&(a, _)| (a, 64)).collect();
    let t0 = Instant::now();
    let _ = VmReader::new(t.child.id()).read_batch(&reqs);
    eprintln!("{label}: reading the 100k blocks alone: {:?}", t0.elapsed());
    let t0 = Instant::now();
    let fps = heap.fingerprint(&blocks);
    let (fp_took, fp_stats) = (t0.elapsed(), heap.stats());
    let samples_in: Vec<Sample> = blocks
        .iter()
        .zip(fps)
        .map(|(&(addr, size), fp)| Sample {
            addr,
            size,
            fingerprint: fp.expect("readable"),
        })
        .collect();
    t.go();
    let _ = t.until("ready2");
    let t0 = Instant::now();
    let verdicts = heap.judge(&samples_in);
    let took = t0.elapsed();
    let stats = heap.stats();
    let live = verdicts.iter().filter(|v| v.is_live()).count();
    eprintln!(
        "{label}: fingerprinting {} blocks: {fp_took:?}, {fp_stats:?}\n\
         judging them: {took:?}, {} syscalls, {} ranges, {} bytes, {} failed; {live} live",
        blocks.len(),
        stats.syscalls - fp_stats.syscalls,
        stats.ranges - fp_stats.ranges,
        stats.bytes - fp_stats.bytes,
        stats.failed - fp_stats.failed,
    );
    // The workload drops half of its objects.
    assert!(
        live > blocks.len() * 4 / 10 && live < blocks.len() * 6 / 10,
        "{live}"
    );
}
