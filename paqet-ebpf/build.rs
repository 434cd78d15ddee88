//! Rebuild the eBPF object when bpf-linker (the linker for bpfel-unknown-none) changes.
fn main() {
    if let Ok(p) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
