//! Targets that are groups of processes: a cgroup v2 directory and its descendants
//! (`--cgroup`), the cgroup of a container found from its id (`--container`).
//!
//! The kernel filters by cgroup id, which is the inode number of the cgroup's directory,
//! and by the cgroup's level in the hierarchy (the root is level 0).

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::errors::UserError;

/// `statfs` magic of a cgroup v2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// How deep the container search descends (kubepods trees are about 5 deep).
const MAX_DEPTH: usize = 16;

/// A cgroup v2 group to trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Its directory.
    pub dir: PathBuf,
    /// Its path in the hierarchy (`/` for the root), as `/proc/PID/cgroup` shows it.
    pub path: String,
    /// Its id: the directory's inode number.
    pub id: u64,
    /// Its depth below the root.
    pub level: u32,
}

/// Where the cgroup v2 hierarchy is mounted (its root, not a sub-tree bind mount).
pub fn cgroup2_mount() -> Result<PathBuf, UserError> {
    let mounts = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(|e| UserError::NoCgroup2(e.to_string()))?;
    mounts
        .iter()
        .find(|m| m.fs_type == "cgroup2" && m.root == "/")
        .map(|m| m.mount_point.clone())
        .ok_or_else(|| UserError::NoCgroup2("no cgroup2 entry in /proc/self/mountinfo".into()))
}

/// Resolves `--cgroup PATH`: a directory of the cgroup v2 mount, given as an absolute
/// path or relative to the mount (`system.slice/app.service`).
pub fn resolve(arg: &Path) -> Result<Cgroup, UserError> {
    let mount = cgroup2_mount()?;
    let candidate = if arg.is_absolute() || arg.exists() {
        arg.to_owned()
    } else {
        mount.join(arg)
    };
    at(&mount, &candidate).map_err(|reason| UserError::NotCgroup {
        path: arg.to_owned(),
        mount: mount.clone(),
        reason,
    })
}

/// The cgroup whose directory is `dir`, in the hierarchy mounted at `mount`.
fn at(mount: &Path, dir: &Path) -> Result<Cgroup, String> {
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let meta = std::fs::metadata(&dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    if !is_cgroup2(&dir) {
        return Err("not on a cgroup v2 file system".into());
    }
    let rel = dir
        .strip_prefix(mount)
        .map_err(|_| format!("outside the cgroup v2 mount {}", mount.display()))?;
    Ok(Cgroup {
        path: format!("/{}", rel.display()),
        level: rel.components().count() as u32,
        id: meta.ino(),
        dir,
    })
}

fn is_cgroup2(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and a zeroed out-parameter of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type == CGROUP2_SUPER_MAGIC
}

/// Every process in `dir` and its descendant groups.
pub fn processes(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The cgroup v2 path of a process (`/system.slice/app.service`), if it can be read.
pub fn of_process(pid: u32) -> Option<String> {
    let groups = procfs::process::Process::new(pid as i32)
        .ok()?
        .cgroups()
        .ok()?;
    groups
        .0
        .into_iter()
        .find(|g| g.hierarchy == 0)
        .map(|g| g.pathname)
}

/// The container id a cgroup directory's name stands for: `docker-ID.scope` (Docker with
/// systemd), `cri-containerd-ID.scope` (containerd), `crio-ID.scope` (CRI-O),
/// `libpod-ID.scope` (Podman), or a bare id (the cgroupfs drivers: `/docker/ID`,
/// `/kubepods/.../ID`). Runtime monitors (`crio-conmon-ID`, `libpod-conmon-ID`) are not
/// the container.
fn container_id_of(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".scope").unwrap_or(name);
    let id = ["docker-", "cri-containerd-", "crio-", "libpod-"]
        .iter()
        .find_map(|p| stem.strip_prefix(p))
        .unwrap_or(stem);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Finds the cgroup of the container whose id is or starts with `id`, under `root` (the
/// cgroup v2 mount).
pub fn find_container(root: &Path, id: &str) -> Result<PathBuf, UserError> {
    let want = id.to_ascii_lowercase();
    if want.is_empty() || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(UserError::BadContainerId(id.to_owned()));
    }
    // Container id → its shallowest directory (Podman nests a `container` group inside).
    let mut found: BTreeMap<String, (usize, PathBuf)> = BTreeMap::new();
    let mut stack = vec![(root.to_owned(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(cid) = container_id_of(&name) {
                if cid.starts_with(&want) {
                    let entry = found
                        .entry(cid.to_owned())
                        .or_insert((usize::MAX, PathBuf::new()));
                    if depth < entry.0 {
                        *entry = (depth, e.path());
                    }
                }
            }
            if depth < MAX_DEPTH {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    let mut matches: Vec<(String, PathBuf)> = found.into_iter().map(|(k, (_, p))| (k, p)).collect();
    match matches.len() {
        0 => Err(UserError::ContainerNotFound {
            id: id.to_owned(),
            root: root.to_owned(),
        }),
        1 => Ok(matches.remove(0).1),
        _ => Err(UserError::ContainerAmbiguous {
            id: id.to_owned(),
            matches: matches
                .iter()
                .take(3)
                .map(|(k, _)| k[..12].to_owned())
                .collect::<Vec<_>>()
                .join(", "),
            count: matches.len(),
        }),
    }
}

/// Resolves `--container ID` to its cgroup.
pub fn resolve_container(id: &str) -> Result<Cgroup, UserError> {
    let mount = cgroup2_mount()?;
    let dir = find_container(&mount, id)?;
    at(&mount, &dir).map_err(|reason| UserError::NotCgroup {
        path: dir.clone(),
        mount: mount.clone(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "4f1c2a3b5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7a8";
    const B: &str = "4f1c9999aaaabbbbccccddddeeeeffff00001111222233334444555566667777";
    const C: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
    const D: &str = "d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0";
    const E: &str = "e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1";
    const F: &str = "f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2";

    /// A cgroup tree with one container of each runtime, as their drivers name them.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in [
            format!("system.slice/docker-{A}.scope"),
            format!("system.slice/docker-{B}.scope"),
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{C}.scope"),
            format!("kubepods.slice/kubepods-pod2.slice/crio-{D}.scope"),
            format!("kubepods.slice/kubepods-pod2.slice/crio-conmon-{D}.scope"),
            format!("machine.slice/libpod-{E}.scope/container"),
            format!("machine.slice/libpod-conmon-{E}.scope"),
            format!("docker/{F}"),
            "user.slice/user-0.slice".to_owned(),
        ] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        t
    }

    #[test]
    fn finds_each_runtime_by_full_id_and_unique_prefix() {
        let t = tree();
        let r = t.path();
        let want = |s: &str| r.join(s);
        assert_eq!(
            find_container(r, A).unwrap(),
            want(&format!("system.slice/docker-{A}.scope"))
        );
        assert_eq!(
            find_container(r, "4f1c2a").unwrap(),
            want(&format!("system.slice/docker-{A}.scope"))
        );
        assert_eq!(
            find_container(r, &C[..12]).unwrap(),
            want(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{C}.scope"))
        );
        // CRI-O: the container, not its monitor.
        assert_eq!(
            find_container(r, "D0D0").unwrap(),
            want(&format!(
                "kubepods.slice/kubepods-pod2.slice/crio-{D}.scope"
            ))
        );
        // Podman: the scope (its `container` child is a descendant, traced with it).
        assert_eq!(
            find_container(r, "e1e1").unwrap(),
            want(&format!("machine.slice/libpod-{E}.scope"))
        );
        assert_eq!(
            find_container(r, "f2").unwrap(),
            want(&format!("docker/{F}"))
        );
    }

    #[test]
    fn unknown_ambiguous_and_malformed_ids_are_errors() {
        let t = tree();
        let r = t.path();
        let e = find_container(r, "abc123").unwrap_err();
        assert!(matches!(e, UserError::ContainerNotFound { .. }), "{e}");
        let e = find_container(r, "4f1c").unwrap_err();
        match &e {
            UserError::ContainerAmbiguous { count, matches, .. } => {
                assert_eq!(*count, 2);
                assert_eq!(matches, &format!("{}, {}", &A[..12], &B[..12]));
            }
            other => panic!("want ambiguous, got {other}"),
        }
        let e = find_container(r, "not-hex").unwrap_err();
        assert!(matches!(e, UserError::BadContainerId(_)), "{e}");
        let e = find_container(r, "").unwrap_err();
        assert!(matches!(e, UserError::BadContainerId(_)), "{e}");
    }

    #[test]
    fn names_that_are_not_containers() {
        assert_eq!(container_id_of("user-0.slice"), None);
        assert_eq!(container_id_of(&format!("crio-conmon-{D}.scope")), None);
        assert_eq!(container_id_of(&format!("docker-{}.scope", &A[..63])), None);
        assert_eq!(container_id_of(&format!("docker-{A}.scope")), Some(A));
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let t = tempfile::tempdir().unwrap();
        let e = at(t.path(), t.path()).unwrap_err();
        assert!(e.contains("not on a cgroup v2 file system"), "{e}");
        let e = at(t.path(), &t.path().join("missing")).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
    }
}
