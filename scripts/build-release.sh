#!/usr/bin/env bash
# Builds the release `paqet-dp` for one architecture and prints the binary's path (last line of stdout).
#
#   scripts/build-release.sh amd64    # native: target/release/paqet-dp
#   scripts/build-release.sh arm64    # cross (aarch64-unknown-linux-gnu): target/arm64/aarch64-unknown-linux-gnu/release/paqet-dp
#   scripts/build-release.sh arm64 --test sim_pair   # an integration test's executable instead (release
#                                                     # profile: it reuses the binary's dependencies), to run under qemu
#
# arm64 needs gcc-aarch64-linux-gnu and libpcap-dev:arm64 (scripts/setup.sh installs both) and uses its
# own target directory, so it never waits on another cargo's lock. The XDP object is the same BPF on both
# (built by paqet-userspace/build.rs when bpf-linker is on PATH). Cargo output goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:?usage: scripts/build-release.sh amd64|arm64 [--test NAME]}
test_name=
if [[ ${2:-} == --test ]]; then test_name=${3:?--test needs a test name}; fi
if [[ -f ${TMPDIR:-/tmp}/paqet-dp-bpf-linker-path ]]; then
    PATH="$(cat "${TMPDIR:-/tmp}/paqet-dp-bpf-linker-path"):$PATH"
fi
abs() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
case $arch in
amd64 | x86_64)
    cargo build --release --locked -p paqet-userspace --bin paqet-dp >&2
    echo "$(abs "${CARGO_TARGET_DIR:-target}")/release/paqet-dp"
    ;;
arm64 | aarch64)
    for t in aarch64-linux-gnu-gcc; do
        command -v "$t" >/dev/null || { echo "build-release: $t missing (run scripts/setup.sh)" >&2; exit 1; }
    done
    [[ -e /usr/lib/aarch64-linux-gnu/libpcap.so ]] ||
        { echo "build-release: libpcap-dev:arm64 missing (run scripts/setup.sh)" >&2; exit 1; }
    # libpcap's version is given, not probed: the probe would load the arm64 library into this host.
    export CARGO_TARGET_DIR=${ARM64_TARGET_DIR:-target/arm64}
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export LIBPCAP_LIBDIR=/usr/lib/aarch64-linux-gnu
    export LIBPCAP_VER=${LIBPCAP_VER:-$(dpkg-query -W -f '${Version}' libpcap0.8:arm64 | sed 's/-.*//')}
    export PKG_CONFIG_ALLOW_CROSS=1
    if [[ -n $test_name ]]; then
        cargo test --release --locked --target aarch64-unknown-linux-gnu -p paqet-userspace \
            --test "$test_name" --no-run --message-format=json-render-diagnostics |
            python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])'
        exit 0
    fi
    cargo build --release --locked --target aarch64-unknown-linux-gnu -p paqet-userspace --bin paqet-dp >&2
    echo "$(abs "$CARGO_TARGET_DIR")/aarch64-unknown-linux-gnu/release/paqet-dp"
    ;;
*)
    echo "build-release: unknown architecture $arch (amd64 or arm64)" >&2
    exit 2
    ;;
esac
