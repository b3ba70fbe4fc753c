//! Bad targets: processes and programs pyleak cannot trace, or can only in part (a
//! zombie, a statically linked program, a libc without the probed symbols or stripped, a
//! pid in another namespace, Python 2): each a one-line answer that says what to do.

use std::process::Command;

use pyleak_tests::{one_line::*, *};

#[test]
fn pids_that_cannot_be_traced() {
    if !root_or_skip() {
        return;
    }
    exact_error(
        &["record", "-p", "0"],
        "no process with PID 0: check it with `ps -p 0`",
    );
    // kthreadd is PID 2 on Linux.
    exact_error(
        &["record", "-p", "2"],
        "PID 2 is a kernel thread (kthreadd), which has no user memory to trace: give a user process, e.g. from `pgrep -a python`",
    );
    // pyleak given its own pid (the shell execs it, keeping the pid).
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {} record -p $$", pyleak_bin().display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("pyleak: PID ")
            && err.ends_with(" is pyleak itself: give the process to trace\n"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
    // A thread's id (a TID: /proc/TID exists, hidden from listings).
    let mut threaded = Command::new("python3")
        .args([
            "-c",
            "import threading, time\nthreading.Thread(target=time.sleep, args=(30,)).start()\ntime.sleep(30)",
        ])
        .spawn()
        .unwrap();
    let pid = threaded.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let tid = loop {
        let tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&t| t != pid)
            .collect();
        if let Some(&t) = tids.first() {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "no thread started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    exact_error(
        &["record", "-p", &tid.to_string()],
        &format!("{tid} is a thread of process {pid}, not a process: give `-p {pid}`"),
    );
    let _ = threaded.kill();
    let _ = threaded.wait();
}

#[test]
fn zombie_pid() {
    if !root_or_skip() {
        return;
    }
    // `true` exits at once; its parent (sh exec'd into sleep) never reaps it.
    let mut parent = Command::new("sh")
        .args(["-c", "true & exec sleep 30"])
        .spawn()
        .unwrap();
    let children = format!("/proc/{0}/task/{0}/children", parent.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let zombie = loop {
        let kids = std::fs::read_to_string(&children).unwrap_or_default();
        let z = kids.split_whitespace().next().and_then(|k| {
            let stat = std::fs::read_to_string(format!("/proc/{k}/stat")).ok()?;
            stat.contains(") Z ").then(|| k.to_owned())
        });
        if let Some(z) = z {
            break z;
        }
        assert!(std::time::Instant::now() < deadline, "no zombie appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    exact_error(
        &["record", "-p", &zombie],
        &format!(
            "process {zombie} is a zombie: it has exited and waits for its parent {} to reap it; nothing is left to trace",
            parent.id()
        ),
    );
    let _ = parent.kill();
    let _ = parent.wait();
}

#[test]
fn statically_linked_program() {
    if !root_or_skip() {
        return;
    }
    let bin = cc(
        "alloc_workload.c",
        "alloc_workload_static",
        &["-static", "-O0", "-pthread"],
    );
    let dir = scratch("static");
    let json = dir.join("r.json");
    let out = pyleak(&[
        "record",
        "-q",
        "--json",
        json.to_str().unwrap(),
        "--",
        bin.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("pyleak: tracing"))
        .collect();
    assert_eq!(
        lines,
        [format!(
            "pyleak: warning: {} maps no shared C library (statically linked): the libc layer sees nothing; its vm and pages layers still count its memory",
            bin.display()
        )]
    );
    // The vm layer still counts: vm_partial leaves 7 of its 10 pages mapped, vm_remap a
    // mapping grown to 8 pages (their stacks end in the static libc's syscall wrappers).
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["layers"]["libc"]["allocs"], 0);
    let vm = report["layers"]["vm"]["live_bytes"].as_u64().unwrap();
    assert!(vm >= 15 * 4096, "vm live bytes: {vm}");
    assert_no_pyleak_programs();
}

#[test]
fn libc_without_the_probed_symbols() {
    if !root_or_skip() {
        return;
    }
    let dir = root().join("target/test-workloads/fake-libc");
    std::fs::create_dir_all(&dir).unwrap();
    let lib = dir.join("libc.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-nostdlib", "-Wl,-soname,libc.so", "-o"])
        .arg(&lib)
        .arg(root().join("tests/workloads/fake_libc.c"))
        .status()
        .unwrap();
    assert!(st.success());
    let user = dir.join("user");
    let st = Command::new("cc")
        .args(["-nostdlib", "-o"])
        .arg(&user)
        .arg(root().join("tests/workloads/fake_libc_user.c"))
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let mut target = Command::new(&user).spawn().unwrap();
    // Wait until the loader has mapped the library.
    let maps = format!("/proc/{}/maps", target.id());
    while !std::fs::read_to_string(&maps)
        .unwrap_or_default()
        .contains("libc.so")
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = pyleak(&["record", "-q", "-d", "0.5", "-p", &target.id().to_string()]);
    let _ = target.kill();
    let _ = target.wait();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("pyleak: tracing"))
        .collect();
    assert_eq!(
        lines,
        [format!(
            "pyleak: warning: process {}: its C library {} has no malloc in its symbols (.dynsym, .symtab): the libc layer sees nothing; its vm and pages layers still count its memory",
            target.id(),
            lib.display()
        )]
    );
    assert_no_pyleak_programs();
}

/// The C workload's `leak_malloc`: 10 blocks of 100 bytes still live.
fn leak_malloc_exact(report: &serde_json::Value) {
    let live = stack_sum(report, "libc", "live_bytes", |f| {
        f.iter().any(|f| f.starts_with("leak_malloc "))
    });
    let count = stack_sum(report, "libc", "live_count", |f| {
        f.iter().any(|f| f.starts_with("leak_malloc "))
    });
    assert_eq!((live, count), (1000, 10));
}

#[test]
fn stripped_libc_is_probed_by_its_dynamic_symbols() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("stripped-libc");
    let libc = dir.join("libc.so.6");
    let st = Command::new("strip")
        .args(["--strip-all", "-o"])
        .arg(&libc)
        .arg("/lib/x86_64-linux-gnu/libc.so.6")
        .status()
        .unwrap();
    assert!(st.success(), "strip");
    let go = dir.join("go");
    let mut target = Command::new(c_workload());
    target.arg("--wait").arg(&go).env("LD_LIBRARY_PATH", &dir);
    let report = attach_and_record_with(
        target,
        &go,
        "alloc_workload: done",
        &dir.join("r.json"),
        &["--layers", "libc"],
    );
    let probes = report["probes"].as_array().unwrap();
    assert!(
        probes.iter().any(|p| p["file"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{}", libc.display()))
            && p["symbol"] == "malloc"),
        "malloc probed in the stripped copy: {probes:?}"
    );
    leak_malloc_exact(&report);
    assert_no_pyleak_programs();
}

#[test]
fn pid_in_another_pid_namespace_given_as_the_host_sees_it() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("pidns");
    let go = dir.join("go");
    let mut target = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child"])
        .arg(c_workload())
        .arg("--wait")
        .arg(&go)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The workload is unshare's child: PID 1 in its namespace, another on the host.
    let children = format!("/proc/{0}/task/{0}/children", target.id());
    let host_pid = loop {
        if let Some(k) = std::fs::read_to_string(&children)
            .unwrap_or_default()
            .split_whitespace()
            .next()
        {
            if std::fs::read_link(format!("/proc/{k}/exe")).is_ok_and(|e| e == c_workload()) {
                break k.to_owned();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).unwrap();
    assert_ne!(
        ns(&host_pid),
        ns("self"),
        "the workload is in its own pid namespace"
    );
    let json = dir.join("r.json");
    let pyleak = spawn_pyleak(&[
        "record",
        "-q",
        "--layers",
        "libc",
        "-p",
        &host_pid,
        "--json",
        json.to_str().unwrap(),
    ]);
    std::fs::write(&go, b"").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(target.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "alloc_workload: done");
    signal(pyleak.id(), libc::SIGINT);
    let out = pyleak.wait_with_output().unwrap();
    let _ = target.kill();
    let _ = target.wait();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    leak_malloc_exact(&report);
    assert_no_pyleak_programs();
}

#[test]
fn python_2_process() {
    if !root_or_skip() {
        return;
    }
    let pyenv = std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".into());
    let python = std::path::PathBuf::from(pyenv).join("versions/2.7.18/bin/python2.7");
    if !skip_unless(python.exists(), "pyenv's CPython 2.7.18 is not installed") {
        return;
    }
    let mut target = Command::new(&python)
        .args(["-c", "import time\nkeep = [1] * 1000\ntime.sleep(30)"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = target.id().to_string();
    let out = pyleak(&["record", "-q", "-d", "0.5", "-p", &pid]);
    let _ = target.kill();
    let _ = target.wait();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("pyleak: tracing"))
        .collect();
    let lib = python
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("lib/libpython2.7.so.1.0");
    assert_eq!(
        lines,
        [format!(
            "pyleak: warning: process {pid} runs CPython 2.7 ({}), whose frames pyleak cannot walk (it walks 3.8 to 3.14 with the GIL): native stacks only",
            lib.display()
        )]
    );
    assert_no_pyleak_programs();
}

/// A CPython whose heap pyleak cannot read (pyenv 3.7), attached with the defaults: one
/// warning says its pymalloc layer is left out, and no pymalloc figure is made up (the
/// sampled layer's blocks were never judged: every one was reported freed, with megabytes
/// "older than 1 s" at suspects of 0 B).
#[test]
fn a_cpython_whose_heap_cannot_be_read_gets_no_sampled_pymalloc_layer() {
    if !root_or_skip() {
        return;
    }
    let py37 = std::env::var_os("PYENV_ROOT")
        .map_or_else(|| "/root/.pyenv".into(), std::path::PathBuf::from)
        .join("versions/3.7.16/bin/python3.7");
    if !skip_unless(py37.exists(), "CPython 3.7.16 (pyenv) is not installed") {
        return;
    }
    let dir = scratch("unjudged-heap");
    let json = dir.join("r.json");
    let mut target = Command::new(&py37)
        .args([
            "-c",
            "import time\nL = []\nfor i in range(400):\n    L.append([str(j) for j in range(100)]); time.sleep(0.01)\ntime.sleep(60)",
        ])
        .spawn()
        .expect("python3.7");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = Command::new(pyleak_bin())
        .env_remove("PYLEAK_PYMALLOC")
        .args(["record", "-q", "-d", "3", "-o", "/dev/null", "--json"])
        .arg(&json)
        .args(["-p", &target.id().to_string()])
        .output()
        .unwrap();
    let _ = target.kill();
    let _ = target.wait();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("its pymalloc layer is left out"),
        "{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["layers"]["pymalloc"]["allocs"], 0);
    for s in report["suspects"].as_array().unwrap() {
        assert_ne!(s["layer"], "pymalloc", "{s}");
    }
    assert_no_pyleak_programs();
}

/// A Python whose libpython was deleted or replaced on disk after it started (a package
/// upgrade under a running service): `census` says so in one line and what to do, and
/// `record --pid` traces what it can with one warning naming the file (it used to be
/// taken silently for a process that runs no CPython).
#[test]
fn a_python_whose_libpython_was_deleted_is_said_so() {
    if !root_or_skip() {
        return;
    }
    let Some((_, py)) = required_pythons(&["pyenv 3.12.1"]).into_iter().next() else {
        return;
    };
    let lib = py
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("lib/libpython3.12.so.1.0");
    let dir = scratch("deleted-libpython");
    let copy = dir.join("libpython3.12.so.1.0");
    std::fs::copy(&lib, &copy).unwrap();
    let mut target = Command::new(&py)
        .args(["-c", "import time\nprint('up', flush=True)\ntime.sleep(30)"])
        .env("LD_LIBRARY_PATH", &dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(target.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "up");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", target.id())).unwrap();
    assert!(
        maps.contains(copy.to_str().unwrap()),
        "the copy is not mapped: {maps}"
    );
    std::fs::remove_file(&copy).unwrap();
    let pid = target.id().to_string();
    let census = pyleak(&["census", "-p", &pid]);
    let record = pyleak(&["record", "-q", "-d", "0.5", "-p", &pid]);
    let _ = target.kill();
    let _ = target.wait();
    let err = String::from_utf8_lossy(&census.stderr);
    assert_eq!(census.status.code(), Some(1), "{census:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("{} was deleted or replaced", copy.display()))
            && err.contains("restart the process"),
        "{err}"
    );
    assert!(record.status.success(), "{record:?}");
    let warnings: Vec<String> = String::from_utf8_lossy(&record.stderr)
        .lines()
        .filter(|l| l.contains("warning"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&format!("process {pid} maps {}", copy.display()))
            && warnings[0].contains("deleted or replaced"),
        "{warnings:?}"
    );
    assert_no_pyleak_programs();
}
