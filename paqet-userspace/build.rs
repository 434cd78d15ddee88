//! Builds the `paqet-ebpf` XDP program with aya-build (nightly toolchain, `bpfel-unknown-none`,
//! `-Z build-std=core`, bpf-linker) into `$OUT_DIR/paqet-xdp`, embedded by `io/steer.rs`.
//!
//! Without `bpf-linker` on PATH, or with `PAQET_NO_EBPF=1`, the eBPF build is skipped and
//! `cfg(paqet_no_ebpf)` is set: the crate still builds (pcap backend only) and the XDP code returns
//! a clear error at run time. Install bpf-linker with `scripts/install-bpf-linker.sh`.
//!
//! It also stamps the build with its git commit (`PAQET_GIT_COMMIT`, 12 hex digits, or `unknown`
//! outside a git checkout) and whether the work tree had uncommitted changes (`PAQET_GIT_DIRTY`:
//! `true`, `false` or `unknown`), read by `paqet-dp version` and `paqet_build_info`. A build from a
//! source tarball can pass both in the environment (they win over git).
use std::path::{Path, PathBuf};
use std::process::Command;

const EBPF_PACKAGE: &str = "paqet-ebpf";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(paqet_no_ebpf)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PAQET_NO_EBPF");
    git_stamp();

    let skip = std::env::var("PAQET_NO_EBPF")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    if skip {
        no_ebpf("PAQET_NO_EBPF is set");
        return;
    }
    let Some(linker) = find_on_path("bpf-linker") else {
        // Re-run when PATH changes so installing bpf-linker later enables the XDP build.
        println!("cargo:rerun-if-env-changed=PATH");
        no_ebpf("bpf-linker is not on PATH (run scripts/install-bpf-linker.sh and add its bin dir to PATH)");
        return;
    };
    // The object depends on the linker (tied to the nightly's LLVM) and on the shared types.
    println!("cargo:rerun-if-changed={}", linker.display());
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let common = manifest.join("../paqet-common/src");
    println!("cargo:rerun-if-changed={}", common.display());
    let root = manifest
        .join("../paqet-ebpf")
        .canonicalize()
        .unwrap_or_else(|e| {
            panic!("cannot find the {EBPF_PACKAGE} crate next to paqet-userspace: {e}")
        });
    let root_str = root
        .to_str()
        .expect("the paqet-ebpf path is valid UTF-8")
        .to_owned();

    // aya-build runs `cargo build --package paqet-ebpf` in the current directory. paqet-ebpf is its
    // own workspace (excluded from ours), so run it from there: its own profile and Cargo.lock apply.
    std::env::set_current_dir(&root)
        .unwrap_or_else(|e| panic!("cannot enter {}: {e}", root.display()));
    let pkg = aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir: &root_str,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([pkg], aya_build::Toolchain::default()) {
        panic!(
            "building the XDP program ({EBPF_PACKAGE}) failed: {e:#}\n\
             It needs the nightly toolchain with rust-src and bpf-linker (scripts/install-bpf-linker.sh).\n\
             Set PAQET_NO_EBPF=1 to build without XDP support (pcap backend only)."
        );
    }
}

/// Sets `PAQET_GIT_COMMIT` and `PAQET_GIT_DIRTY` for the crate, from the environment or from git.
fn git_stamp() {
    println!("cargo:rerun-if-env-changed=PAQET_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=PAQET_GIT_DIRTY");
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let (commit, dirty) = match std::env::var("PAQET_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => (
            c.trim().to_owned(),
            std::env::var("PAQET_GIT_DIRTY").unwrap_or_else(|_| "unknown".into()),
        ),
        _ => from_git(&manifest).unwrap_or_else(|| ("unknown".into(), "unknown".into())),
    };
    println!("cargo:rustc-env=PAQET_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=PAQET_GIT_DIRTY={dirty}");
}

/// `(commit, dirty)` of the checkout holding `dir`; `None` outside git (or without git).
fn from_git(dir: &Path) -> Option<(String, String)> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Re-run when HEAD moves (checkout, commit), when the index changes (add, commit) and when a
    // source file of the workspace changes (the dirty flag); paths are relative to this crate.
    // A path that does not exist (no packed-refs yet, a packed branch ref) would make every build stale.
    let watch = |f: String| {
        if Path::new(&f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    };
    let head_ref = git(&["symbolic-ref", "-q", "HEAD"]);
    for p in ["HEAD", "index", "packed-refs"]
        .into_iter()
        .chain(head_ref.as_deref())
    {
        if let Some(f) = git(&["rev-parse", "--path-format=absolute", "--git-path", p]) {
            watch(f);
        }
    }
    for src in [
        "src",
        "Cargo.toml",
        "../paqet-common/src",
        "../paqet-ebpf/src",
        "../Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(src).display());
    }
    // Tracked files changed (staged or not); untracked files do not make a build dirty.
    let dirty = match git(&[
        "--no-optional-locks",
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]) {
        Some(s) if s.is_empty() => "false",
        Some(_) => "true",
        None => "unknown",
    };
    Some((commit, dirty.to_owned()))
}

fn no_ebpf(why: &str) {
    println!("cargo:rustc-cfg=paqet_no_ebpf");
    println!("cargo:warning=paqet-dp is built WITHOUT the XDP program: {why}");
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
