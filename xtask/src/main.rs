//! `cargo xtask`: set-up, build, demo, tests and benchmarks, each doing its own set-up on a
//! fresh machine (rust-src, bpf-linker, tracefs).

mod bench;
mod fuzz;
mod pybench;
mod soak;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

/// pyleak's developer tasks.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs (rust-src, bpf-linker) and mount tracefs.
    Setup,
    /// Build pyleak (release).
    Build,
    /// Record the bundled leaky Python demo end to end and print its report.
    Demo,
    /// Unit tests, then the privileged integration tests that load real eBPF programs, then
    /// a short fuzzing run of every parser (without a filter).
    Test {
        /// Only integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Fuzz every parser of data pyleak does not control for a bounded time (nightly and
    /// cargo-fuzz, installed when missing).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// pyleak on a leaking service with worker churn, by cgroup, for minutes: its RSS and
    /// CPU over time, lost events, what is left.
    Soak(soak::SoakArgs),
    /// Benchmarks: pyleak against the untraced run, bare probes and peers, as ratios.
    Bench(bench::BenchArgs),
}

/// The toolchain pinned in rust-toolchain.toml.
pub const TOOLCHAIN: &str = "1.95.0";
/// Debian's jemalloc (libjemalloc2), preloaded by a test.
const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
/// bpf-linker that loads rustc's own LLVM at run time (see docs/TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.10.4";

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build()?;
            Ok(())
        }
        Task::Demo => demo(),
        Task::Test { filter } => test(filter),
        Task::Soak(args) => {
            setup()?;
            let bin = build()?;
            soak::run(&bin, &args)
        }
        Task::Fuzz { seconds } => fuzz::fuzz(seconds).map(|o| fuzz::summary(&o)),
        Task::Bench(args) => {
            setup()?;
            let bin = build()?;
            bench::run(&bin, &args)
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs a command, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("pyleak loads eBPF programs: run this as root");
    }
    // The pinned toolchain: on these machines it is the installed stable one.
    let have = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()?;
    if !String::from_utf8_lossy(&have.stdout).contains(TOOLCHAIN) {
        let sysroot = Command::new("rustc")
            .args(["+stable", "--print", "sysroot"])
            .output()?;
        let sysroot = String::from_utf8(sysroot.stdout)?.trim().to_owned();
        run(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, &sysroot]))?;
    }
    let src = Command::new("rustc")
        .args([&format!("+{TOOLCHAIN}"), "--print", "sysroot"])
        .output()?;
    let sysroot = PathBuf::from(String::from_utf8(src.stdout)?.trim());
    if !sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .exists()
    {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            TOOLCHAIN,
        ]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        });
    if !matches!(linker_ok, Ok(true)) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
        run(Command::new("cargo").args([
            &format!("+{TOOLCHAIN}"),
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ]))?;
    }
    // bpftool: the tests check with it that nothing of pyleak stays in the kernel.
    // Go's pprof (golang-go): the tests read pyleak's pprof profiles back with it.
    let mut missing = Vec::new();
    if Command::new("bpftool").arg("version").output().is_err() {
        missing.push("bpftool");
    }
    if Command::new("go").arg("version").output().is_err() {
        missing.push("golang-go");
    }
    // jemalloc: a replacement malloc the libc layer must count (through LD_PRELOAD).
    if !Path::new(JEMALLOC).exists() {
        missing.push("libjemalloc2");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    if !Path::new("/sys/kernel/tracing/events").exists() {
        run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))?;
    }
    Ok(())
}

/// Installs Debian packages (after refreshing the package lists once).
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Builds pyleak (release) and returns the binary's path.
fn build() -> anyhow::Result<PathBuf> {
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release", "-p", "pyleak"]))?;
    Ok(root().join("target/release/pyleak"))
}

fn demo() -> anyhow::Result<()> {
    setup()?;
    let bin = build()?;
    let out = root().join("demo-out");
    std::fs::create_dir_all(&out)?;
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("-c")
                .arg("pass")
                .status()
                .is_ok_and(|s| s.success())
        })
        .context("the demo needs a python3")?;
    let folded = out.join("leaky.folded");
    let json = out.join("leaky.json");
    eprintln!(
        "xtask: pyleak record -o {} --json {} -- {python} demo/leaky_service.py",
        folded.display(),
        json.display()
    );
    run(Command::new(&bin)
        .current_dir(root())
        .args(["record", "--layers", "all", "--interval", "0.5", "-o"])
        .arg(&folded)
        .arg("--json")
        .arg(&json)
        .args(["--", python, "demo/leaky_service.py"]))?;
    // The same report drawn as a flamegraph, from the saved JSON.
    let svg = out.join("leaky.svg");
    let rendered = Command::new(&bin)
        .args(["report", "-o"])
        .arg(&svg)
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(rendered.success(), "pyleak report failed");
    eprintln!(
        "xtask: wrote {}, {} and {}",
        folded.display(),
        json.display(),
        svg.display()
    );
    Ok(())
}

fn test(filter: Option<String>) -> anyhow::Result<()> {
    setup()?;
    let bin = build()?;
    // Unit tests: pure logic, no privileges needed.
    run(Command::new("cargo").current_dir(root()).args([
        "test",
        "--release",
        "-p",
        "pyleak",
        "-p",
        "pyleak-common",
        "-p",
        "xtask",
    ]))?;
    // Integration tests: real eBPF against real programs, one at a time (they share the
    // kernel's probes and the CPU).
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .env("PYLEAK_BIN", &bin)
        // The exactness tests count every pymalloc call; the sampled mode's tests ask for
        // it with --pymalloc sampled.
        .env("PYLEAK_PYMALLOC", "exact")
        .args(["test", "--release", "-p", "pyleak-tests", "--"])
        .arg("--test-threads=1");
    let whole = filter.is_none();
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run(&mut cmd)?;
    // The short form of `cargo xtask fuzz`: 25 s a target, ~2 min in all after the build.
    if whole {
        fuzz::summary(&fuzz::fuzz(CI_FUZZ_SECONDS)?);
        // The short form of `cargo xtask soak`: the same script, checks and figures.
        soak::run(
            &bin,
            &soak::SoakArgs {
                minutes: soak::CI_MINUTES,
                python: None,
            },
        )?;
    }
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const CI_FUZZ_SECONDS: u64 = 25;
