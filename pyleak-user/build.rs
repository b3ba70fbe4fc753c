//! Builds `pyleak-ebpf` for the BPF target (through aya-build) so the binary can embed it.

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "pyleak-ebpf")
        .ok_or_else(|| anyhow!("pyleak-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("pyleak-ebpf has no directory"))?;
    let package = aya_build::Package {
        name: "pyleak-ebpf",
        root_dir: root.as_str(),
        ..Default::default()
    };
    // The kernel side shares pyleak-common's types and map sizes: a change there must
    // rebuild it too (aya-build watches only the eBPF crate's own files).
    println!("cargo:rerun-if-changed=../pyleak-common/src");
    // The toolchain pinned in rust-toolchain.toml (RUSTC_BOOTSTRAP lets it build `core`).
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("1.95.0"))
}
