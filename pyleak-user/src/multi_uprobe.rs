//! Multi-uprobe links: every uprobe of one program on one file placed, and removed, as one
//! BPF link (`BPF_TRACE_UPROBE_MULTI`, kernel 6.6+; its PID filter is exact from 6.10).
//!
//! A perf-event uprobe costs an RCU grace period at detach (~0.1 s here), so the ~900
//! probes on an LTO CPython took 45 s or more to remove. A multi-uprobe link registers all
//! its offsets at once and, when closed, unregisters them all and waits for one grace
//! period (`bpf_uprobe_multi_link_release` in the kernel's `kernel/trace/bpf_trace.c`).
//!
//! aya 0.14 cannot load a program whose expected attach type is `BPF_TRACE_UPROBE_MULTI`,
//! so this module loads its own copies of pyleak's uprobe programs: the same object parsed
//! by aya-obj, relocated against the map file descriptors of the `Ebpf` aya loaded (both
//! copies share every map), its BTF loaded for the `bpf_loop` callbacks' `func_info`, then
//! `BPF_PROG_LOAD` and `BPF_LINK_CREATE` (attribute layouts from aya-obj's generated
//! `bpf_attr`, the kernel's `include/uapi/linux/bpf.h`).

use std::{
    collections::{HashMap, HashSet},
    ffi::{CStr, CString},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{maps::Map, Ebpf};
use aya_obj::generated::{
    bpf_attach_type::BPF_TRACE_UPROBE_MULTI, bpf_attr, bpf_cmd, bpf_prog_type,
    BPF_F_UPROBE_MULTI_RETURN,
};

/// What can go wrong loading or attaching multi-uprobe programs. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum MultiUprobeError {
    /// The object could not be parsed or relocated again.
    #[error("preparing {what} for multi-uprobe links: {reason}")]
    Object {
        /// The program or step.
        what: String,
        /// Why.
        reason: String,
    },
    /// A `bpf()` command failed.
    #[error("{what}: {source}{log}")]
    Syscall {
        /// The command and its object.
        what: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
        /// The verifier's last line, when it said something.
        log: String,
    },
}

/// pyleak's uprobe programs loaded for multi-uprobe links, by name.
pub struct MultiPrograms {
    programs: HashMap<String, OwnedFd>,
    /// Kept open while the programs live (their `func_info` refers to it).
    _btf: Option<OwnedFd>,
}

impl MultiPrograms {
    /// Loads `names` from the eBPF `object` that `ebpf` was loaded from, sharing its maps.
    ///
    /// Errors: the object does not parse or relocate (a build problem), or the kernel
    /// refuses a program (see [`MultiUprobeError::unsupported`]).
    pub fn load(
        object: &[u8],
        ebpf: &Ebpf,
        names: &[&str],
    ) -> Result<MultiPrograms, MultiUprobeError> {
        let obj_err = |what: &str, e: &dyn std::fmt::Display| MultiUprobeError::Object {
            what: what.to_owned(),
            reason: e.to_string(),
        };
        let mut obj = aya_obj::Object::parse(object).map_err(|e| obj_err("the object", &e))?;
        let btf = match aya::features().btf() {
            Some(features) => match obj
                .fixup_and_sanitize_btf(features)
                .map_err(|e| obj_err("BTF", &e))?
            {
                Some(btf) => Some(load_btf(&btf.to_bytes())?),
                None => None,
            },
            None => None,
        };
        // The maps aya created, by the names aya-obj gives them.
        let fds: HashMap<String, i32> = ebpf
            .maps()
            .map(|(name, map)| (name.to_owned(), map_fd(map).as_raw_fd()))
            .collect();
        let text_sections: HashSet<usize> = obj.functions.keys().map(|&(s, _)| s).collect();
        let maps: Vec<(String, i32, aya_obj::Map)> = obj
            .maps
            .iter()
            .filter_map(|(name, m)| fds.get(name).map(|&fd| (name.clone(), fd, m.clone())))
            .collect();
        obj.relocate_maps(
            maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
            &text_sections,
        )
        .map_err(|e| obj_err("maps", &e))?;
        obj.relocate_calls(&text_sections)
            .map_err(|e| obj_err("calls", &e))?;
        obj.sanitize_functions(aya::features());
        let mut programs = HashMap::new();
        for &name in names {
            let prog = obj
                .programs
                .get(name)
                .ok_or_else(|| MultiUprobeError::Object {
                    what: name.to_owned(),
                    reason: "no such program in the object".to_owned(),
                })?;
            let func = obj
                .functions
                .get(&prog.function_key())
                .ok_or_else(|| obj_err(name, &"its function is missing"))?;
            let fd = load_program(name, prog, func, btf.as_ref().map(|b| b.as_fd()))?;
            programs.insert(name.to_owned(), fd);
        }
        Ok(MultiPrograms {
            programs,
            _btf: btf,
        })
    }

    /// Attaches program `name` at every `(file offset, cookie)` of `points` in `path`, as
    /// one link: on return from the function when `ret`, only in process `pid` when given
    /// (else in every process that maps the file). Dropping the link detaches them all.
    ///
    /// Errors: no such program was loaded, the file cannot be opened by the kernel, an
    /// offset is not in it, or the process is gone.
    pub fn attach(
        &self,
        name: &str,
        path: &Path,
        points: &[(u64, u64)],
        ret: bool,
        pid: Option<u32>,
    ) -> Result<MultiLink, MultiUprobeError> {
        let prog = self
            .programs
            .get(name)
            .ok_or_else(|| MultiUprobeError::Object {
                what: name.to_owned(),
                reason: "not loaded for multi-uprobe links".to_owned(),
            })?;
        let what = || {
            format!(
                "attaching {name} at {} offsets of {}",
                points.len(),
                path.display()
            )
        };
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| {
            MultiUprobeError::Object {
                what: what(),
                reason: e.to_string(),
            }
        })?;
        let offsets: Vec<u64> = points.iter().map(|&(o, _)| o).collect();
        let cookies: Vec<u64> = points.iter().map(|&(_, c)| c).collect();
        // SAFETY: an all-zero bpf_attr is the documented "no options" value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the link_create member of the union.
        unsafe {
            let lc = &mut attr.link_create;
            lc.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
            lc.attach_type = BPF_TRACE_UPROBE_MULTI as u32;
            let um = &mut lc.__bindgen_anon_3.uprobe_multi;
            um.path = c_path.as_ptr() as u64;
            um.offsets = offsets.as_ptr() as u64;
            um.cookies = cookies.as_ptr() as u64;
            um.cnt = points.len() as u32;
            um.flags = if ret { BPF_F_UPROBE_MULTI_RETURN } else { 0 };
            um.pid = pid.unwrap_or(0);
        }
        let fd = sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map_err(|source| {
            MultiUprobeError::Syscall {
                what: what(),
                source,
                log: String::new(),
            }
        })?;
        Ok(MultiLink { _fd: fd })
    }
}

/// One multi-uprobe link; dropping it detaches all its uprobes (one RCU grace period).
pub struct MultiLink {
    _fd: OwnedFd,
}

/// Loads the object's BTF so programs can name their functions' types (`bpf_loop`
/// callbacks need `func_info`).
fn load_btf(data: &[u8]) -> Result<OwnedFd, MultiUprobeError> {
    // SAFETY: an all-zero bpf_attr is the documented "no options" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain integers into the BTF_LOAD member of the union.
    unsafe {
        let u = &mut attr.__bindgen_anon_7;
        u.btf = data.as_ptr() as u64;
        u.btf_size = data.len() as u32;
    }
    sys_bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr).map_err(|source| MultiUprobeError::Syscall {
        what: "loading the programs' BTF".to_owned(),
        source,
        log: String::new(),
    })
}

/// `BPF_PROG_LOAD` of one relocated function as a kprobe-type program expecting
/// multi-uprobe links. On failure the verifier's log is loaded again to say why.
fn load_program(
    name: &str,
    prog: &aya_obj::Program,
    func: &aya_obj::Function,
    btf: Option<BorrowedFd<'_>>,
) -> Result<OwnedFd, MultiUprobeError> {
    let func_info = func.func_info.func_info_bytes();
    let line_info = func.line_info.line_info_bytes();
    let license: &CStr = &prog.license;
    let attempt = |log: &mut [u8]| {
        // SAFETY: an all-zero bpf_attr is the documented "no options" value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the PROG_LOAD member of the union; every
        // pointer stays valid for the call.
        unsafe {
            let u = &mut attr.__bindgen_anon_3;
            for (d, s) in u.prog_name.iter_mut().zip(name.bytes().take(15)) {
                *d = s as _;
            }
            u.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
            u.expected_attach_type = BPF_TRACE_UPROBE_MULTI as u32;
            u.insns = func.instructions.as_ptr() as u64;
            u.insn_cnt = func.instructions.len() as u32;
            u.license = license.as_ptr() as u64;
            u.kern_version = prog.kernel_version.unwrap_or(0);
            if let Some(btf) = btf {
                u.prog_btf_fd = btf.as_raw_fd() as u32;
                if func.func_info_rec_size > 0 {
                    u.func_info = func_info.as_ptr() as u64;
                    u.func_info_cnt = func.func_info.len() as u32;
                    u.func_info_rec_size = func.func_info_rec_size as u32;
                }
                if func.line_info_rec_size > 0 {
                    u.line_info = line_info.as_ptr() as u64;
                    u.line_info_cnt = func.line_info.len() as u32;
                    u.line_info_rec_size = func.line_info_rec_size as u32;
                }
            }
            if !log.is_empty() {
                u.log_level = 1;
                u.log_buf = log.as_mut_ptr() as u64;
                u.log_size = log.len() as u32;
            }
        }
        sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    attempt(&mut []).map_err(|source| {
        let mut log = vec![0u8; 1 << 20];
        let _ = attempt(&mut log);
        let text = String::from_utf8_lossy(&log);
        let last = text
            .trim_end_matches('\0')
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .map(|l| format!(" (verifier: {})", l.trim()))
            .unwrap_or_default();
        MultiUprobeError::Syscall {
            what: format!("loading {name} for multi-uprobe links"),
            source,
            log: last,
        }
    })
}

/// The `bpf()` system call for commands that return a new file descriptor.
fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid bpf_attr of the size passed; the pointers it holds are
    // valid for the call.
    let ret = unsafe {
        ::libc::syscall(
            ::libc::SYS_bpf,
            cmd as ::libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>() as ::libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// The file descriptor of any map aya created.
fn map_fd(map: &Map) -> BorrowedFd<'_> {
    #[allow(deprecated)]
    let data = match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    };
    data.fd().as_fd()
}
