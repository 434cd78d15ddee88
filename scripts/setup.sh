#!/usr/bin/env bash
# Installs everything paqet-dp's build, tests and demo need on a fresh Debian machine (run as root).
# Idempotent: it skips what is already there. Tools built from crates.io are cached outside the clone.
set -euo pipefail

APT_PKGS=(libpcap-dev tcpdump ethtool iperf3 kcptun iptables iproute2 curl python3 procps git
    # shipping (scripts/ship.sh): the arm64 cross build and its qemu-user runs, the OCI image, the .deb
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross libpcap-dev:arm64 qemu-user-static buildah libcap2-bin
    binutils dpkg-dev)
# libpcap-dev:arm64 comes from the arm64 half of the archive (multiarch).
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "setup: dpkg --add-architecture arm64"
    dpkg --add-architecture arm64
fi
missing=()
native=$(dpkg --print-architecture)
# With both arches of a library installed, an unqualified name is ambiguous to dpkg -s: try the native one.
for p in "${APT_PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || dpkg -s "$p:$native" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# nightly + rust-src: the eBPF crate and cargo-fuzz build with the image's nightly (never `rustup update`).
rustup component add rust-src --toolchain nightly >/dev/null 2>&1 || rustup component add rust-src --toolchain nightly

# bpf-linker linked against the nightly's own LLVM (cached outside the clone), for the XDP program.
BPF_BIN=$(scripts/install-bpf-linker.sh | tail -n 1)
echo "$BPF_BIN" > "${TMPDIR:-/tmp}/paqet-dp-bpf-linker-path"

# The arm64 cross target (scripts/build-release.sh arm64).
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu ||
    rustup target add aarch64-unknown-linux-gnu

if ! cargo deb --version >/dev/null 2>&1; then
    echo "setup: cargo install cargo-deb"
    cargo install cargo-deb --locked --quiet
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: cargo install cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
echo "setup: ok"
